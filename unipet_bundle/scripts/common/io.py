"""Safe file writes shared by every tool: atomic writes, output-path checks, and the modes new files get.

Every output is first written to a temporary name in the destination folder and then renamed, so an
interrupted run never leaves a half-written file behind; an existing output is kept unless the caller
asks to overwrite it, and an output path that is one of the inputs is refused. NIfTI reading and writing
(which needs nibabel and knows about voxel data) lives one floor up, in :mod:`scripts.data.io`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from scripts.common.errors import UniPETInputError

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "check_output_path",
    "current_umask",
    "default_dir_mode",
    "default_file_mode",
    "json_default",
]


def check_output_path(
    output: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """Validate an output path before any work is done.

    Raises:
        UniPETInputError: the output exists and ``overwrite`` is False, or it is one of ``inputs``.
    """
    out = Path(output).expanduser().resolve()
    for inp in inputs:
        if out == Path(inp).expanduser().resolve():
            raise UniPETInputError(
                f"output {out} is also an input: choose another output path (inputs are never modified)"
            )
    if out.exists() and not overwrite:
        raise UniPETInputError(f"output {out} already exists: remove it, choose another path, or pass --overwrite")
    return out


def current_umask() -> int:
    """The process umask (Python can only read it by setting it, so it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask (``mkstemp`` makes files 0600)."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder under the current umask (``mkdtemp`` makes folders 0700)."""
    return 0o777 & ~current_umask()


def atomic_write(
    path: str | os.PathLike, write_fn: Callable[[Path], None], overwrite: bool = True, sync: bool = False
) -> Path:
    """Call ``write_fn(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The temporary name (``.<name>.<random>.tmp<suffix>``) keeps the real suffix (``.nii.gz`` etc.) so
    writers that look at it behave. ``sync`` flushes the file to disk before the rename, so that after a
    power loss ``path`` holds the old or the new content, never a truncated one (checkpoints want this).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise UniPETInputError(f"output {path} already exists: remove it, choose another path, or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=overwrite)


def json_default(obj: Any) -> Any:
    """``json.dumps``'s ``default``: numpy scalars and arrays as Python numbers and lists, paths as text."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
