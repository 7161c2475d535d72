"""One clear line and exit status 2 for bad input when inference runs through ``monai.bundle run``.

``monai.bundle run`` has no error handling of its own: an exception raised while the config is
evaluated reaches the interpreter wrapped in MONAI's ``RuntimeError("Failed to evaluate ...")`` with a
long traceback. :func:`install_error_hook` (the first ``initialize`` step of ``configs/inference.json``)
installs a ``sys.excepthook`` that looks through the chain of causes: a bad-input error
(:class:`~scripts.data.io.UniPETInputError`, :class:`~scripts.engines.checkpoint.CheckpointError`) or an
``OSError`` (disk full, permission denied) is printed as ``error: <message>`` on stderr and the process
exits with status 2; anything else is a bug and keeps Python's full traceback. Only uncaught exceptions
reach the hook, so library callers (and tests run in-process) still get the exception itself.
"""

from __future__ import annotations

import sys
from types import TracebackType

from scripts.data.io import UniPETInputError
from scripts.engines.checkpoint import CheckpointError

__all__ = ["EXIT_BAD_INPUT", "install_error_hook", "user_error"]

EXIT_BAD_INPUT = 2
_USER_ERRORS = (UniPETInputError, CheckpointError, OSError)


def user_error(exc: BaseException | None) -> BaseException | None:
    """The first bad-input error in ``exc``'s chain of causes/contexts, or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _USER_ERRORS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and not isinstance(exc, (UniPETInputError, CheckpointError)):
        return f"{type(exc).__name__}: {text}"
    return text


def install_error_hook() -> None:
    """Install the hook (idempotent); see the module docstring."""
    if getattr(sys.excepthook, "_unipet_hook", False):
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        found = user_error(exc)
        if found is None:
            previous(exc_type, exc, tb)
            return
        sys.stdout.flush()
        print(f"error: {_one_line(found)}", file=sys.stderr, flush=True)
        # SystemExit raised inside sys.excepthook sets the exit status without a second traceback.
        sys.exit(EXIT_BAD_INPUT)

    hook._unipet_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook
