"""The benchmarks' command line: a Python callable as a ``fire`` command whose bad input gives one line and exit 2."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import CheckpointError, UniPETInputError, exit_bad_input

__all__ = ["run_command"]


def run_command(
    component: Callable[..., Any],
    name: str,
    *,
    print_result: bool = False,
    bad_input: tuple[type[BaseException], ...] = (),
) -> Any:
    """Run ``component`` (a function or class) as the command line ``name`` (``python -m ...``, shown by
    ``--help``) with ``fire``, and return its result.

    ``print_result``: let ``fire`` print the returned value; off for tools whose output is their printed table and
    written files. Bad input (:class:`~scripts.common.errors.UniPETInputError`,
    :class:`~scripts.common.errors.CheckpointError`, and the tool's own ``bad_input`` types) ends the process with
    one ``error:`` line on stderr and exit status 2 (:func:`~scripts.common.errors.exit_bad_input`); any other
    exception is a bug and keeps its traceback.
    """
    import fire

    try:
        return fire.Fire(component, name=name, serialize=None if print_result else (lambda _: None))
    except (UniPETInputError, CheckpointError, *bad_input) as exc:
        exit_bad_input(exc)
