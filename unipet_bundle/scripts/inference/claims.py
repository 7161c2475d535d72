"""Who may write an input's outputs: per-input claims, our own temporary names, no-clobber publishing.

Two inference runs into one ``output_dir`` must never damage each other's outputs (issue 12: the losing
run deleted the winner's finished NIfTI while cleaning up its own work). The rules:

- **One writer per input at a time.** Before writing the outputs of input ``<name>`` a run takes the
  claim ``output_dir/.<name>_denoised.unipet-claim``: the file is created if missing and locked with
  ``flock`` (exclusive, non-blocking). The kernel drops the lock when its process ends, ``kill -9``
  included, so a lock that cannot be taken means a live run is writing that input right now; the run
  that finds it busy stops with one line naming that run's PID and writes nothing. The claim file holds
  the owner's PID, start time and, while it publishes, the outputs it is about to rename into place; a
  successful run removes it (while still holding the lock).
- **Unique temporary names that say whose they are**: ``.<output name>.unipet-<host>-<pid>-<random>.tmp...``
  (``<host>`` is a short hash of the host name). Outputs are staged under such names and renamed into
  place only once all of them are complete.
- **No clobbering.** Without ``overwrite`` an output is published with a no-replace rename
  (``renameat2(RENAME_NOREPLACE)``, else a hard link or an existence check): if another run's output
  appeared meanwhile, it is kept and this run stops. A run only ever removes paths it created itself
  (its temporaries, and outputs it published before a later step failed).
- **Interrupted runs.** A claim file that can be locked but is not empty was left by a run that died
  while writing that input. If it died while publishing, the outputs it lists are a partial set of
  ours: the next run redoes the input and replaces exactly those files, without ``--overwrite`` (any other
  existing output is still refused). The run that takes such a claim records the partial set it inherited
  (``inherited_outputs``, with the dead run's PID in ``inherited_from``) in its own claim at once, so the
  record survives that run too: killed (``kill -9``) at any point, it leaves a claim that still lists them;
  failing (an error, a conflict, a full disk), it keeps its claim file (phase ``interrupted``) listing
  those of them it did not replace and that still exist, instead of removing it. Only a run that
  replaced all of them removes the claim. Stale temporaries are removed: those of an input whose claim a run
  holds (nobody else can be writing them), and, once per run, any whose owner PID on this host is gone
  and that are older than ``stale_minutes``. Temporaries of other hosts, of live processes or of unknown
  origin are never touched.

POSIX only for the lock (``fcntl``); without it (Windows) a claim is an ``O_EXCL`` file and an existing
one is reported as busy, with the file to remove if no run is writing.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scripts.common.errors import UniPETInputError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CLAIM_SUFFIX",
    "OutputBusyError",
    "OutputClaim",
    "OutputConflictError",
    "busy_message",
    "claim_path",
    "clean_stale_temporaries",
    "inspect_claim",
    "is_our_temporary",
    "parse_temporary",
    "partial_outputs",
    "process_alive",
    "publish",
    "remove_path",
    "temporary_path",
]

logger = logging.getLogger(__name__)

CLAIM_SUFFIX = ".unipet-claim"
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.unipet-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>tmp|old)")
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


class OutputBusyError(UniPETInputError):
    """Another live run is writing the same outputs right now."""


class OutputConflictError(UniPETInputError):
    """An output appeared while this run was working (another run wrote it); it was kept."""


def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temporary_path(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh hidden name beside ``target`` that records this host and PID (see the module docstring).

    ``kind`` is ``tmp`` (being written) or ``old`` (a replaced output on its way out). The target's own
    suffix is kept (``.nii.gz``, ``.nii``, ``.json``, ``.png``...) so writers that pick the format from the
    name (nibabel, matplotlib) write the right one.
    """
    target = Path(target)
    if target.name.endswith(".nii.gz"):
        suffix = ".nii.gz"
    else:
        suffix = Path(target.name).suffix
        suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", suffix) else ""
    return target.parent / f".{target.name}.unipet-{_host_id()}-{os.getpid()}-{secrets.token_hex(4)}.{kind}{suffix}"


def parse_temporary(name: str) -> dict[str, Any] | None:
    """``{"target", "host", "pid", "kind"}`` of a name made by :func:`temporary_path`, else None."""
    match = _TEMP_RE.match(name)
    if match is None:
        return None
    return {"target": match["target"], "host": match["host"], "pid": int(match["pid"]), "kind": match["kind"]}


def is_our_temporary(name: str) -> bool:
    """True for temporaries and claim files of UniPET inference runs (never for an input)."""
    return parse_temporary(name) is not None or (name.startswith(".") and name.endswith(CLAIM_SUFFIX))


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot (Linux ``/proc``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields and fields[0] == "Z":  # a zombie has ended; only its exit status is left
        return -1
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process ``pid`` (on this host) still runs; with ``start_ticks``, whether it is still *that*
    process (a recycled PID has another start time). Zombies count as ended."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    ticks = _start_ticks(pid)
    if ticks == -1:
        return False
    if start_ticks is not None and ticks is not None and ticks != start_ticks:
        return False
    return True


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree (never following a link); a missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------- publishing


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """Rename without replacing (Linux); True if done, False if this system/filesystem cannot.

    Raises:
        FileExistsError: ``dst`` exists.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(dst))
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def publish(tmp: Path, target: Path, replace: bool) -> None:
    """Rename the finished ``tmp`` (file or folder) to ``target``.

    ``replace`` False: never replaces anything (``FileExistsError`` if ``target`` exists, whoever made it).
    ``replace`` True: an existing ``target`` is replaced; a folder is first moved aside to a temporary
    name and removed after the new one is in place.
    """
    if replace:
        if tmp.is_dir() and (target.exists() or target.is_symlink()):
            old = temporary_path(target, "old")
            os.rename(target, old)
            os.rename(tmp, target)
            remove_path(old)
        else:
            os.replace(tmp, target)
        return
    if _renameat2_noreplace(tmp, target):
        return
    if not tmp.is_dir():
        try:
            os.link(tmp, target)  # atomic: fails if target exists
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some network/FAT filesystems): check, then rename
            if target.exists() or target.is_symlink():
                raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
            os.rename(tmp, target)
        else:
            tmp.unlink()
        return
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists", str(target))
    try:
        os.rename(tmp, target)  # refuses a non-empty folder at target
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        raise


# -------------------------------------------------------------------------------------------- claims


def claim_path(output_dir: str | os.PathLike, output_stem: str) -> Path:
    """``output_dir/.<output_stem>.unipet-claim`` (``output_stem`` is ``<name>_denoised``)."""
    return Path(output_dir) / f".{output_stem}{CLAIM_SUFFIX}"


def _read_json(text: str) -> dict[str, Any] | None:
    try:  # the first JSON value: a shorter record written over a longer one may leave its tail behind
        value, _ = json.JSONDecoder().raw_decode(text.lstrip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _safe_names(value: Any) -> set[str]:
    """The plain file names in a claim's list (anything with a path separator, or not a name, is ignored)."""
    if not isinstance(value, list):
        return set()
    return {n for n in value if isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and os.sep not in n}


def partial_outputs(owner: Mapping[str, Any] | None) -> list[str]:
    """The output names (in the claim's folder) that a claim left by an ended run records as a partial set.

    That is the outputs it was publishing (phase ``publishing``) and the partial set it had inherited from
    an earlier interrupted run and not yet replaced (``inherited_outputs``, any phase). Whether each still
    exists is for the caller to check.
    """
    if not owner:
        return []
    names = _safe_names(owner.get("inherited_outputs"))
    if owner.get("phase") == "publishing":
        names |= _safe_names(owner.get("outputs"))
    return sorted(names)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def inspect_claim(path: Path) -> dict[str, Any]:
    """What a claim file says, without taking it: ``{"state": ..., "owner": {...} | None}``.

    ``state`` is ``"none"`` (no file), ``"busy"`` (a live run holds it), or ``"stale"`` (left by a run
    that ended without finishing; ``owner`` is its content, None if unreadable).
    """
    if not path.exists():
        return {"state": "none", "owner": None}
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return {"state": "none", "owner": None}
    try:
        owner = _read_json(os.read(fd, 1 << 16).decode("utf-8", "replace"))
        if fcntl is None:  # pragma: no cover - Windows
            return {"state": "busy", "owner": owner}
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return {"state": "busy", "owner": owner}
        return {"state": "stale", "owner": owner}
    finally:
        os.close(fd)


def busy_message(path: Path, owner: Mapping[str, Any] | None, what: str) -> str:
    who = (
        f"PID {owner.get('pid')}, started {owner.get('started')}"
        if owner
        else "a run whose claim is still being written"
    )
    extra = "" if fcntl is not None else f" (if no UniPET run is writing there, remove {path})"
    return (
        f"{what}: another UniPET run ({who}) is writing these outputs into {path.parent} right now; "
        f"wait for it to finish or choose another --output_dir{extra}"
    )


class OutputClaim:
    """The claim on one input's outputs (see the module docstring); use as a context manager.

    Args:
        output_dir: the output folder.
        output_stem: ``<name>_denoised``: the claim is ``.<output_stem>.unipet-claim``.
        label: how to name the input in messages (already quoted for logs).

    Attributes (after entering):
        replaceable: existing outputs that an interrupted run recorded as a partial set (may be replaced
            without overwrite); recorded in this run's claim too (``inherited_outputs``) until replaced.
        published: outputs this run renamed into place (removed again if a later step fails).
    """

    def __init__(self, output_dir: str | os.PathLike, output_stem: str, label: str) -> None:
        self.path = claim_path(output_dir, output_stem)
        self.label = label
        self.replaceable: set[Path] = set()
        self.published: list[Path] = []
        self._fd: int | None = None
        self._content: dict[str, Any] = {}

    def __enter__(self) -> "OutputClaim":
        self.acquire()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            for path in reversed(self.published):  # ours only: published by this run moments ago
                remove_path(path)
            self.published.clear()
        self.release()

    def acquire(self) -> None:
        """Take the claim.

        Raises:
            OutputBusyError: a live run holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (os.O_EXCL if fcntl is None else 0), 0o644)
            except FileExistsError:  # pragma: no cover - without fcntl an existing claim is taken as busy
                raise OutputBusyError(busy_message(self.path, inspect_claim(self.path)["owner"], self.label)) from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = _read_json(os.read(fd, 1 << 16).decode("utf-8", "replace"))
                    os.close(fd)
                    raise OutputBusyError(busy_message(self.path, owner, self.label)) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # its owner finished and removed it between our open and our lock: again
                    os.close(fd)
                    continue
            self._fd = fd
            break
        else:  # pragma: no cover - five finished runs in a row between open and lock
            raise OutputBusyError(busy_message(self.path, None, self.label))
        left = os.read(self._fd, 1 << 16).decode("utf-8", "replace")
        dead: dict[str, Any] = {}
        if left.strip():
            owner = _read_json(left)
            # only what the dead run recorded and is still there: nothing else becomes ours to replace
            self.replaceable = {p for p in (self.path.parent / n for n in partial_outputs(owner)) if _exists(p)}
            dead = _dead_run(owner)
            logger.warning(
                "%s: outputs of a run that was interrupted while writing them (PID %s, started %s) are redone%s",
                self.label,
                dead.get("pid", "?"),
                dead.get("started", "?"),
                f"; its partial outputs {sorted(p.name for p in self.replaceable)!r} are replaced"
                if self.replaceable
                else "",
            )
        content: dict[str, Any] = {
            "pid": os.getpid(),
            "host": _host_id(),
            "start_ticks": _start_ticks(os.getpid()),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "phase": "writing",
            "outputs": [],
        }
        if self.replaceable:  # written before any work: a kill -9 from here on still leaves the partial set on record
            content["inherited_outputs"] = sorted(p.name for p in self.replaceable)
            content["inherited_from"] = dead
        try:
            self._write(content)
        except BaseException:  # not taken after all (e.g. a full disk); the dead run's record is left as it was
            os.close(self._fd)
            self._fd = None
            raise

    def _write(self, content: dict[str, Any]) -> None:
        assert self._fd is not None
        data = (json.dumps(content) + "\n").encode()
        # over the old record, then cut: if the write fails (a full disk) the old record is not lost first
        if os.pwrite(self._fd, data, 0) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        os.ftruncate(self._fd, len(data))
        os.fsync(self._fd)
        self._content = content

    def publishing(self, targets: Iterable[Path]) -> None:
        """Record that ``targets`` (in ``output_dir``) are about to be renamed into place (an inherited
        partial set stays on record: ``inherited_outputs`` is kept)."""
        self._write({**self._content, "phase": "publishing", "outputs": [Path(t).name for t in targets]})

    def clean_temporaries(self, targets: Iterable[Path]) -> list[Path]:
        """Remove leftover temporaries of ``targets`` made on this host by processes that are gone.

        Holding the claim proves no other run writes these targets now; the PID check keeps even so the
        temporaries of a live process (e.g. a concurrent writer of an older version) untouched.
        """
        names = {Path(t).name for t in targets}
        removed: list[Path] = []
        host = _host_id()
        for entry in self.path.parent.iterdir():
            info = parse_temporary(entry.name)
            if info is None or info["target"] not in names or info["host"] != host:
                continue
            if info["pid"] == os.getpid() or process_alive(info["pid"]):
                continue
            remove_path(entry)
            removed.append(entry)
            logger.info("removed %r: a temporary of an interrupted run (PID %d)", entry.name, info["pid"])
        return removed

    def release(self) -> None:
        """Drop the claim: its file is removed first (while still locked), so a waiting run starts clean.

        Unless outputs of an interrupted run that this run inherited (:attr:`replaceable`) were not all
        replaced by it (it failed, or did not plan them) and some are still there: then the file stays,
        rewritten to list just those (phase ``interrupted``), so that the next run still replaces them.
        """
        if self._fd is None:
            return
        try:
            done = {p.name for p in self.published}
            left = sorted(
                n
                for n in _safe_names(self._content.get("inherited_outputs"))
                if n not in done and _exists(self.path.parent / n)
            )
            if not left:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                return
            try:
                self._write(
                    {
                        **self._content,
                        "phase": "interrupted",
                        "outputs": [],
                        "inherited_outputs": left,
                        "ended": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    }
                )
            except OSError as exc:  # the record written when the claim was taken still lists them
                logger.warning(
                    "%s: could not update the claim %s (%s); it is kept as it was", self.label, self.path.name, exc
                )
            logger.warning(
                "%s: the partial outputs %r of an interrupted run (PID %s) are still there; the claim %r keeps "
                "them on record, so the next run of this input replaces them",
                self.label,
                left,
                _dead_run(self._content).get("pid", "?"),
                self.path.name,
            )
        finally:
            os.close(self._fd)
            self._fd = None


def _dead_run(owner: Mapping[str, Any] | None) -> dict[str, Any]:
    """Who left a partial set: the run that first died while publishing it (``inherited_from``), else the owner."""
    if not owner:
        return {}
    first = owner.get("inherited_from")
    if isinstance(first, dict) and first:
        return {k: first[k] for k in ("pid", "host", "started") if k in first}
    return {k: owner[k] for k in ("pid", "host", "started") if k in owner}


# ------------------------------------------------------------------------------------ stale leftovers


def clean_stale_temporaries(output_dir: str | os.PathLike, stale_minutes: float = 30.0) -> list[Path]:
    """Remove temporaries and claim files of earlier, interrupted runs from ``output_dir``.

    Only entries named by :func:`temporary_path` on this host whose PID is gone and that were last
    modified more than ``stale_minutes`` ago, and claim files that nobody holds, whose run never started
    publishing, and that are as old: see the module docstring. Claims of runs interrupted while
    publishing are kept (they prove which outputs are a partial set); a re-run of that input uses them.

    Returns:
        The removed paths.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    cutoff = time.time() - float(stale_minutes) * 60.0
    host = _host_id()
    removed: list[Path] = []
    for entry in folder.iterdir():
        try:
            mtime = entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        if mtime > cutoff:
            continue
        info = parse_temporary(entry.name)
        if info is not None:
            if info["host"] != host or process_alive(info["pid"]):
                continue
            remove_path(entry)
            removed.append(entry)
            logger.info(
                "removed %r: a temporary of an interrupted run (PID %d, %.0f min old)",
                entry.name,
                info["pid"],
                (time.time() - mtime) / 60.0,
            )
        elif entry.name.startswith(".") and entry.name.endswith(CLAIM_SUFFIX) and fcntl is not None:
            removed.extend(_remove_unused_claim(entry))
    return removed


def _remove_unused_claim(path: Path) -> list[Path]:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []
        owner = _read_json(os.read(fd, 1 << 16).decode("utf-8", "replace"))
        if partial_outputs(owner):
            logger.warning(
                "%r: a run was interrupted while publishing these outputs; re-run that input to redo it", path.name
            )
            return []
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                return []
        except FileNotFoundError:
            return []
        path.unlink()
        logger.info("removed %r: the claim of an interrupted run that had written nothing", path.name)
        return [path]
    finally:
        os.close(fd)
