"""NIfTI read/write for every tool: atomic, float-safe, and with one clear error for a bad file.

Writes go through :func:`scripts.common.io.atomic_write` (a temporary name, then a rename), so an
interrupted run never leaves a half-written volume behind. The bundle's error type and the generic atomic
writes live on the common floor (:mod:`scripts.common.errors`, :mod:`scripts.common.io`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.common.errors import UniPETInputError
from scripts.common.io import atomic_write
from scripts.common.parallel_gzip import ParallelGzipWriter

logger = logging.getLogger(__name__)

__all__ = [
    "NIFTI_SUFFIXES",
    "load_nifti",
    "nifti_image",
    "nifti_stem",
    "save_nifti",
    "write_nifti",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii``/``.nii.gz`` (``/a/b/sub01.nii.gz`` -> ``sub01``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def nifti_image(array: np.ndarray, affine: np.ndarray, dtype: type = np.float32) -> nib.Nifti1Image:
    """``array`` (x, y, z[, t]) with a 4x4 RAS ``affine`` (mm) as the bundle writes every volume: ``dtype`` data
    (float32 with scl_slope 1 for SUV, so the values survive exactly), mm units, q/sform code 1."""
    data = np.asarray(array).astype(dtype, copy=False)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return img


def write_nifti(img: nib.spatialimages.SpatialImage, path: str | os.PathLike) -> None:
    """Write ``img`` to ``path`` as it stands (no temporary: callers pass one of theirs). A single-file image to a
    ``.gz`` path is compressed on every core (:class:`scripts.common.parallel_gzip.ParallelGzipWriter`: one gzip
    member at nibabel's level 1, ~1.8x faster on two cores, the same file size); anything else goes through
    ``nibabel.save``."""
    if str(path).endswith(".gz") and isinstance(img, nib.filebasedimages.SerializableImage):
        if len(img.files_types) == 1:
            with open(path, "wb") as raw, ParallelGzipWriter(raw) as gz:
                img.to_stream(gz)
            return
    nib.save(img, str(path))


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    overwrite: bool = False,
    dtype: type = np.float32,
) -> Path:
    """Save ``array`` (x, y, z[, t]) with a 4x4 RAS ``affine`` (mm) as NIfTI (:func:`nifti_image`), atomically.

    float data are stored as float32 with scl_slope 1, so SUV values survive exactly.
    """
    img = nifti_image(array, affine, dtype)
    return atomic_write(path, lambda tmp: write_nifti(img, tmp), overwrite=overwrite)


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
        raise UniPETInputError(
            f"{p}: cannot read as NIfTI ({type(exc).__name__}: {exc}); is the file complete?"
        ) from exc
    return data, _affine_in_mm(img, p)


_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}


def _affine_in_mm(img: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    """The image's affine in mm, whatever spatial unit its header states, with a warning where the header's
    orientation is doubtful. Every volume the bundle writes is in mm (:func:`nifti_image`), so a header in metres or
    microns must be converted on reading, or a 4 mm voxel is taken as 0.004 or 4000 mm (nothing denoised, or an
    allocation of petabytes). "unknown" is mm, as NIfTI readers assume."""
    affine = np.asarray(img.affine, dtype=np.float64).copy()
    header = img.header
    if not isinstance(header, nib.Nifti1Header):
        return affine
    unit = header.get_xyzt_units()[0] or "unknown"
    affine[:3, :] *= _UNIT_TO_MM.get(unit, 1.0)
    if unit in ("meter", "micron"):
        logger.info("%s: header units %s: affine converted to mm", path, unit)
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qform is not None and sform is not None and not np.allclose(qform, sform, rtol=0, atol=1e-3):
        logger.warning(
            "%s: the header's qform and sform disagree (largest difference %.3g): the sform is used (the NIfTI rule, "
            "as nibabel and MONAI read it), while ITK-based viewers read the qform; check the orientation",
            path,
            float(np.max(np.abs(np.asarray(qform) - np.asarray(sform)))),
        )
    elif int(qcode) == 0 and int(scode) == 0:
        logger.warning(
            "%s: the header has neither a qform nor an sform (orientation unknown): the voxel sizes alone place the "
            "image (a default axis order and origin); the output's geometry is no better than that",
            path,
        )
    return affine
