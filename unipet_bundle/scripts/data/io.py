"""Safe file I/O shared by every tool: NIfTI read/write, atomic writes, and the bundle's input-error type.

Every output is first written to a temporary name in the destination folder and then renamed, so an
interrupted run never leaves a half-written file behind; an existing output is kept unless the caller
asks to overwrite it, and an output path that is one of the inputs is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "UniPETInputError",
    "atomic_write",
    "default_file_mode",
    "atomic_write_json",
    "check_output_path",
    "load_nifti",
    "nifti_stem",
    "save_nifti",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class UniPETInputError(ValueError):
    """Bad user input (path, file, tag or value). The message names the problem and how to fix it."""


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii``/``.nii.gz`` (``/a/b/sub01.nii.gz`` -> ``sub01``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


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
            raise UniPETInputError(f"output {out} is also an input: choose another output path (inputs are never modified)")
    if out.exists() and not overwrite:
        raise UniPETInputError(f"output {out} already exists: remove it, choose another path, or pass --overwrite")
    return out


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask (``mkstemp`` makes files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=overwrite)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    overwrite: bool = False,
    dtype: type = np.float32,
) -> Path:
    """Save ``array`` (x, y, z[, t]) with a 4x4 RAS ``affine`` (mm) as NIfTI, atomically.

    float data are stored as float32 with scl_slope 1, so SUV values survive exactly.
    """
    data = np.asarray(array).astype(dtype, copy=False)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)), overwrite=overwrite)


def load_nifti(path: str | os.PathLike, dtype: type = np.float32, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI volume as (array in file order (x, y, z), 4x4 affine).

    ``mmap`` (nibabel's default, True) maps an uncompressed ``.nii`` instead of reading it; False reads it
    into memory (for a volume that is read in full and then written into, as inference does).

    Raises:
        UniPETInputError: missing, truncated or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise UniPETInputError(f"{p}: no such NIfTI file; check the path")
    try:
        img = nib.load(str(p), mmap=mmap)
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files
        raise UniPETInputError(f"{p}: cannot read as NIfTI ({type(exc).__name__}: {exc}); is the file complete?") from exc
    return data, np.asarray(img.affine, dtype=np.float64)
