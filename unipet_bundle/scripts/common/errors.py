"""The bundle's error types, and one clear line with exit status 2 for bad input (configs and CLIs alike).

:class:`UniPETInputError` (bad user input: path, file, tag or value) and :class:`CheckpointError` (a
checkpoint that is missing, corrupt, unsafe or does not fit the network) are defined here, on the common
floor, so that every package can raise them and the one hook below can recognise them.

``monai.bundle run`` has no error handling of its own: an exception raised while the config is
evaluated reaches the interpreter wrapped in MONAI's ``RuntimeError("Failed to evaluate ...")`` with a
long traceback. :func:`install_error_hook` (the first ``initialize`` step of ``configs/inference.json``,
``train.json`` and ``evaluate.json``) installs a ``sys.excepthook`` that looks through the chain of causes:
a bad-input error (:class:`UniPETInputError`, :class:`CheckpointError`,
also when a DataLoader worker raised it) or an ``OSError`` (disk full, permission denied) is printed as
``error: <message>`` on stderr, on a line of its own, and the process exits with status 2; anything else
is a bug and keeps Python's full traceback. Only uncaught exceptions reach the hook, so library callers
(and tests run in-process) still get the exception itself.

An ``OSError`` is shown as its own errno text and file name (``OSError: No space left on device:
'/out/x.dcm'``), never as its flattened message: pydicom re-raises write errors with a whole traceback
(venv paths included) in the message. Writers that know what they were doing raise
:class:`OutputWriteError` instead, one sentence that says what happened and what to do (:func:`write_error`).

Log lines cannot be forged through a name: :func:`install_error_hook` also makes every record of the
bundle's own loggers (``scripts.*``) show control characters (newline, carriage return, escape...) as
``\n``-style escapes, so a folder named ``"x\nerror: ..."`` stays on its own log line.

Inside an Ignite engine run, MONAI's ``StatsHandler`` answers ``Events.EXCEPTION_RAISED`` by logging the
full traceback before re-raising. :class:`ErrorPassthrough`, listed first among a config's handlers,
re-raises every exception before that handler runs, so the hook alone reports it: one line for bad
input, Python's own traceback (once) for a bug.
"""

from __future__ import annotations

import errno
import logging
import re
import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:  # ignite (and with it torch) only when an engine attaches: the CLIs' --help starts faster
    from ignite.engine import Engine

__all__ = [
    "CheckpointError",
    "EXIT_BAD_INPUT",
    "ErrorPassthrough",
    "OutputWriteError",
    "UniPETInputError",
    "escape_controls",
    "exit_bad_input",
    "install_error_hook",
    "os_error_root",
    "shown",
    "user_error",
    "worker_user_error",
    "write_error",
]

EXIT_BAD_INPUT = 2


class UniPETInputError(ValueError):
    """Bad user input (path, file, tag or value). The message names the problem and how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the network."""


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite losses or gradients step after step: the message says which network, since when,
    and what to change (the weights were not updated by those steps)."""


_USER_ERRORS = (UniPETInputError, CheckpointError, TrainingDivergedError, OSError)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputWriteError(UniPETInputError):
    """Writing an output failed for a reason outside the bundle (disk full, read-only, no permission)."""


def escape_controls(text: str) -> str:
    """``text`` with control characters (newline, CR, tab, ESC, line separators...) as ``\\n``-style escapes."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def shown(name: object) -> str:
    """A name (file stem, folder name) as log lines and messages show it: as is when it is plain printable
    text, else quoted like ``repr`` (``'a\\nb'``), so that no name can start a log line of its own."""
    text = str(name)
    plain = text.isprintable() and text == text.strip() and "'" not in text and '"' not in text and text != ""
    return text if plain else repr(text)


def os_error_root(exc: BaseException | None) -> OSError | None:
    """The first ``OSError`` with an ``errno`` in ``exc``'s chain (pydicom re-raises without one), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def write_error(exc: BaseException, what: str, folder: object) -> BaseException:
    """One sentence for an ``OSError`` met while writing ``what`` (e.g. ``"the outputs of 'sub01'"``) in
    ``folder``: disk full, quota, read-only filesystem, no permission; any other error is returned as is."""
    root = os_error_root(exc)
    if root is None:
        return exc
    if root.errno in _DISK_FULL:
        return OutputWriteError(
            f"the disk holding {folder} is full (no space left on device) while writing {what}: nothing of it was "
            "kept; free some space or choose another --output_dir, then run again"
        )
    if root.errno == errno.EROFS:
        return OutputWriteError(
            f"{folder} is on a read-only filesystem: cannot write {what}; choose another --output_dir"
        )
    if root.errno in (errno.EACCES, errno.EPERM):
        return OutputWriteError(
            f"no permission to write {what} in {folder}: nothing of it was kept; choose another --output_dir"
        )
    return OutputWriteError(
        f"cannot write {what} in {folder}: {root.strerror or type(root).__name__}"
        + (f" ({shown(root.filename)})" if root.filename else "")
        + "; nothing of it was kept"
    )


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
    stack: list[type] = [UniPETInputError, CheckpointError, TrainingDivergedError]
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
    if isinstance(exc, OSError) and not isinstance(exc, (UniPETInputError, CheckpointError)):
        root = os_error_root(exc)
        if root is not None and root.strerror:
            where = f": {shown(root.filename)}" if root.filename else ""
            return f"{type(root).__name__}: {root.strerror}{where}"
        # no errno: the message's first line (pydicom appends a whole traceback to it)
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first[:300]}"
    return " ".join(str(exc).split())


def exit_bad_input(exc: BaseException | str) -> NoReturn:
    """The command-line tools' answer to bad input: ``error: <message>`` on one line of stderr, exit status 2.

    The one CLI wrapper: every ``python -m scripts...`` tool calls it from its ``except`` clause, so its error
    line looks like the one :func:`install_error_hook` prints for the configs (white space folded to single
    spaces, control characters escaped).
    """
    print(f"error: {escape_controls(' '.join(str(exc).split()))}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _install_log_guard() -> None:
    """Make the messages of the bundle's own log records (``scripts.*``) escape control characters."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_unipet_guard", False):
        return

    def guarded(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if record.name.startswith("scripts"):
            try:
                message = record.getMessage()
            except Exception:  # a bad format string is the handler's to report, as without the guard
                return record
            safe = escape_controls(message)
            if safe != message:
                record.msg, record.args = safe, None
        return record

    guarded._unipet_guard = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(guarded)


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
    """Install the hook and the log guard (idempotent); see the module docstring."""
    _install_log_guard()
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
        print(f"error: {escape_controls(' '.join(message.split()))}", file=sys.stderr, flush=True)
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
        from ignite.engine import Events

        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, exc: BaseException) -> None:
        raise exc
