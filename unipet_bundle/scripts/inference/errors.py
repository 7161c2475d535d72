"""One clear line and exit status 2 for bad input when a config runs through ``monai.bundle run``.

``monai.bundle run`` has no error handling of its own: an exception raised while the config is
evaluated reaches the interpreter wrapped in MONAI's ``RuntimeError("Failed to evaluate ...")`` with a
long traceback. :func:`install_error_hook` (the first ``initialize`` step of ``configs/inference.json``,
``train.json`` and ``evaluate.json``) installs a ``sys.excepthook`` that looks through the chain of causes:
a bad-input error (:class:`~scripts.data.io.UniPETInputError`, :class:`~scripts.engines.checkpoint.CheckpointError`,
also when a DataLoader worker raised it) or an ``OSError`` (disk full, permission denied) is printed as
``error: <message>`` on stderr, on a line of its own, and the process exits with status 2; anything else
is a bug and keeps Python's full traceback. Only uncaught exceptions reach the hook, so library callers
(and tests run in-process) still get the exception itself.

Inside an Ignite engine run, MONAI's ``StatsHandler`` answers ``Events.EXCEPTION_RAISED`` by logging the
full traceback before re-raising. :class:`ErrorPassthrough`, listed first among a config's handlers,
re-raises every exception before that handler runs, so the hook alone reports it: one line for bad
input, Python's own traceback (once) for a bug.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from types import TracebackType

from ignite.engine import Engine, Events

from scripts.data.io import UniPETInputError
from scripts.engines.checkpoint import CheckpointError

__all__ = ["EXIT_BAD_INPUT", "ErrorPassthrough", "install_error_hook", "user_error", "worker_user_error"]

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


def _user_error_names() -> set[str]:
    names: set[str] = set()
    stack: list[type] = [UniPETInputError, CheckpointError]
    while stack:
        cls = stack.pop()
        names.add(cls.__name__)
        stack.extend(cls.__subclasses__())
    return names


def worker_user_error(exc: BaseException | None) -> str | None:
    """The message of a bad-input error raised in a DataLoader worker, or None.

    PyTorch re-raises a worker's exception in the main process as a new exception (often a plain
    ``RuntimeError``, when MONAI wrapped it) whose message holds the worker's traceback as text; the
    first ``<UserErrorClass>: message`` line of that text is the bad-input error.
    """
    seen: set[int] = set()
    names = _user_error_names()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if "Original Traceback" in text:
            for match in re.finditer(r"^(?:[\w.]+\.)?(\w+): (.*)$", text, re.M):
                if match.group(1) in names:
                    return match.group(2)
        exc = exc.__cause__ or exc.__context__
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and not isinstance(exc, (UniPETInputError, CheckpointError)):
        return f"{type(exc).__name__}: {text}"
    return text


def _close_progress_bars() -> None:
    """Finish open tqdm bars (they end their line), so the error line starts at the left margin."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    for bar in list(getattr(tqdm, "_instances", [])):
        try:
            bar.close()
        except Exception:  # a half-torn-down bar must not hide the error
            pass


def _settle_pool_workers(timeout_s: float = 10.0) -> None:
    """Let thread-pool workers (e.g. CacheDataset's, still loading the next volume) finish before exiting.

    A daemon worker thread still inside native code (zlib, torch) while the interpreter shuts down makes
    the C++ runtime abort ("terminate called without an active exception", exit status 134 instead of 2).
    The pool stops handing out work once the error has propagated, so each worker ends with its task.
    """
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.daemon and thread.name.endswith("(worker)"):
            thread.join(max(0.0, deadline - time.monotonic()))


def install_error_hook() -> None:
    """Install the hook (idempotent); see the module docstring."""
    if getattr(sys.excepthook, "_unipet_hook", False):
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        found = user_error(exc)
        message = _one_line(found) if found is not None else worker_user_error(exc)
        _settle_pool_workers()
        if message is None:
            previous(exc_type, exc, tb)
            return
        _close_progress_bars()
        sys.stdout.flush()
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        # SystemExit raised inside sys.excepthook sets the exit status without a second traceback.
        sys.exit(EXIT_BAD_INPUT)

    hook._unipet_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook


class ErrorPassthrough:
    """Ignite handler: re-raise any exception of the engine before other ``EXCEPTION_RAISED`` handlers run.

    List it first among a config's handlers (it must be attached before ``StatsHandler``) so that bad
    input reaches :func:`install_error_hook` without a logged traceback in front of its one line.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, exc: BaseException) -> None:
        raise exc
