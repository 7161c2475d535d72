"""The paired low-dose/full-dose dataset layout that every UniPET workflow reads, with validation.

Layout (one folder per subject; SUV images on one grid per subject)::

    <dataset_dir>/
        <subject>/
            full_dose.nii.gz          # full-dose SUV volume (x, y, z)
            drf_4.nii.gz              # low-dose SUV volume at dose reduction factor 4
            drf_2.5.nii.gz            # DRF may be a decimal
            labels.nii.gz             # optional: integer organ/lesion label map (simulator output)
            labels.json               # optional, ignored here
            activity.nii.gz           # optional, ignored here
            simulation.json           # optional, ignored here

Plain ``.nii`` is accepted wherever ``.nii.gz`` is. Unknown files are ignored, but a file whose name
starts with ``drf_`` and whose DRF does not parse as a positive number (``drf_abc.nii.gz``,
``drf_0.nii.gz``, ``drf_-4.nii.gz``) is an error, because it almost always means a typo that would
silently drop data. Folders whose name starts with ``.`` are skipped; every other folder is a subject.

Geometry is checked from the NIfTI headers only (no voxel data is read), so scanning a large dataset
is fast: every low-dose volume (and the label map) must have the full-dose volume's shape and affine.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.common.errors import UniPETInputError
from scripts.common.geometry import voxel_spacing
from scripts.data.io import NIFTI_SUFFIXES, nifti_stem

__all__ = [
    "PairedSubject",
    "check_3d",
    "check_same_grid",
    "format_drf",
    "natural_key",
    "parse_drf",
    "read_grid",
    "scan_paired_dataset",
]

logger = logging.getLogger(__name__)

FULL_DOSE_STEM = "full_dose"
LABELS_STEM = "labels"
DRF_PREFIX = "drf_"
_NUMBER = re.compile(r"^\d+(\.\d+)?$")
# Tolerance for comparing affines read from two headers: sform/qform are stored as float32.
_AFFINE_ATOL_MM = 1e-3
_AFFINE_RTOL = 1e-5


@dataclass
class PairedSubject:
    """One subject of a paired dataset.

    Attributes:
        subject: folder name of the subject (relative to the dataset dir).
        full_dose: path of the full-dose SUV volume.
        drfs: dose reduction factor -> low-dose SUV volume path, sorted by DRF.
        labels: path of the optional integer label map, else None.
    """

    subject: str
    full_dose: Path
    drfs: dict[float | int, Path] = field(default_factory=dict)
    labels: Path | None = None

    @property
    def subject_dir(self) -> Path:
        return self.full_dose.parent


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (``sub2`` before ``sub10``)."""
    return [(0, int(tok), tok) if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", text) if tok]


def parse_drf(name: str | os.PathLike) -> float | int:
    """Dose reduction factor from a DRF file name.

    Accepts a path or name with or without the NIfTI suffix and the ``drf_`` prefix:
    ``drf_20.nii.gz`` -> 20, ``/d/s/drf_2.5.nii`` -> 2.5, ``drf_20.0`` -> 20, ``"4"`` -> 4.
    Integral values come back as ``int`` so that ``drf_20`` and the JSON value ``20`` agree.

    Raises:
        UniPETInputError: the DRF is not a positive decimal number.
    """
    stem = nifti_stem(name) if str(name).endswith(NIFTI_SUFFIXES) else Path(name).name
    value = stem[len(DRF_PREFIX) :] if stem.lower().startswith(DRF_PREFIX) else stem
    if not _NUMBER.match(value):
        raise UniPETInputError(
            f"{Path(name).name}: cannot read a dose reduction factor from '{value}'; "
            "name low-dose files drf_<N>.nii.gz with N a positive number (drf_20.nii.gz, drf_2.5.nii.gz)"
        )
    drf = float(value)
    if drf <= 0:
        raise UniPETInputError(
            f"{Path(name).name}: dose reduction factor must be positive, got {value}; "
            "rename it drf_<N>.nii.gz with N > 0"
        )
    return int(drf) if drf.is_integer() else drf


def format_drf(drf: float | int) -> str:
    """Canonical text for a DRF in file names and JSON keys: ``20`` -> ``"20"``, ``2.5`` -> ``"2.5"``."""
    value = float(drf)
    return str(int(value)) if value.is_integer() else repr(value)


def read_grid(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, 4x4 affine) of a NIfTI file from its header only; no voxel data is read.

    Raises:
        UniPETInputError: the file cannot be read as NIfTI.
    """
    p = Path(path)
    try:
        img = nib.load(str(p))
        return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise UniPETInputError(
            f"{p}: cannot read the NIfTI header ({type(exc).__name__}: {exc}); is the file complete?"
        ) from exc


def check_3d(path: str | os.PathLike, shape: tuple[int, ...]) -> None:
    """Raise naming ``path`` unless ``shape`` is a 3D volume with more than one voxel along every axis."""
    if len(shape) == 4:
        raise UniPETInputError(
            f"{path}: is a 4D volume (shape {shape}); a single 3D volume is expected: save one frame (x, y, z)"
        )
    if len(shape) != 3 or min(shape) <= 1:
        raise UniPETInputError(
            f"{path}: is a {len(shape)}D image of shape {shape}, not a 3D volume; "
            "save the whole volume (x, y, z) with more than one voxel along every axis"
        )


def check_same_grid(
    reference: str | os.PathLike,
    other: str | os.PathLike,
    ref_grid: tuple[tuple[int, ...], np.ndarray] | None = None,
) -> None:
    """Raise if ``other`` is not a 3D volume on the same grid (shape, spacing, orientation) as ``reference``.

    Args:
        reference: path of the reference volume (the full dose).
        other: path of the volume to compare.
        ref_grid: the reference's ``read_grid`` result, to avoid reading its header again.

    Raises:
        UniPETInputError: naming both files and what differs.
    """
    ref_shape, ref_affine = ref_grid if ref_grid is not None else read_grid(reference)
    shape, affine = read_grid(other)
    check_3d(Path(other), shape)
    if shape != ref_shape:
        raise UniPETInputError(
            f"{other} has shape {shape} but {Path(reference).name} has {ref_shape}: "
            "resample the pair onto one grid (same shape, spacing and affine)"
        )
    if not np.allclose(affine, ref_affine, rtol=_AFFINE_RTOL, atol=_AFFINE_ATOL_MM):
        spacing = voxel_spacing(affine).round(4).tolist()
        ref_spacing = voxel_spacing(ref_affine).round(4).tolist()
        raise UniPETInputError(
            f"{other} and {Path(reference).name} differ in spacing/affine (spacing {spacing} vs {ref_spacing} mm, "
            f"origin {affine[:3, 3].round(3).tolist()} vs {ref_affine[:3, 3].round(3).tolist()}): "
            "resample the pair onto one grid (same shape, spacing and affine)"
        )


def _nifti_files(subject_dir: Path) -> list[Path]:
    return sorted(p for p in subject_dir.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))


def _scan_subject(subject_dir: Path, check_geometry: bool) -> PairedSubject:
    name = subject_dir.name
    full: list[Path] = []
    labels: list[Path] = []
    drfs: dict[float | int, Path] = {}
    for path in _nifti_files(subject_dir):
        stem = nifti_stem(path)
        if stem == FULL_DOSE_STEM:
            full.append(path)
        elif stem == LABELS_STEM:
            labels.append(path)
        elif stem.lower().startswith(DRF_PREFIX):
            try:
                drf = parse_drf(path)
            except UniPETInputError as exc:
                raise UniPETInputError(f"subject '{name}': {exc}") from None
            if drf in drfs:
                raise UniPETInputError(
                    f"subject '{name}' has two files for DRF {format_drf(drf)} ({drfs[drf].name} and {path.name}): keep one"
                )
            drfs[drf] = path
    for kind, found in (("full-dose", full), ("label", labels)):
        if len(found) > 1:
            raise UniPETInputError(
                f"subject '{name}' has {len(found)} {kind} files ({', '.join(p.name for p in found)}): keep one"
            )
    if not full:
        raise UniPETInputError(
            f"subject '{name}' ({subject_dir}) has no {FULL_DOSE_STEM}.nii.gz: add the full-dose SUV volume "
            "or move the folder out of the dataset dir"
        )
    if not drfs:
        raise UniPETInputError(
            f"subject '{name}' ({subject_dir}) has no low-dose drf_<N>.nii.gz file: add at least one "
            "(e.g. drf_20.nii.gz) or move the folder out of the dataset dir"
        )
    subject = PairedSubject(
        subject=name,
        full_dose=full[0],
        drfs={k: drfs[k] for k in sorted(drfs, key=float)},
        labels=labels[0] if labels else None,
    )
    if check_geometry:
        ref_grid = read_grid(subject.full_dose)
        check_3d(subject.full_dose, ref_grid[0])
        for path in [*subject.drfs.values(), *([subject.labels] if subject.labels else [])]:
            check_same_grid(subject.full_dose, path, ref_grid=ref_grid)
    return subject


def scan_paired_dataset(dataset_dir: str | os.PathLike, check_geometry: bool = True) -> list[PairedSubject]:
    """List and validate the subjects of a paired dataset (layout in the module docstring).

    Args:
        dataset_dir: folder holding one sub-folder per subject.
        check_geometry: also check, from the headers only, that every file is 3D and that each low-dose
            volume and label map has the full-dose shape and affine.

    Returns:
        subjects sorted by natural order of their folder names (``sub2`` before ``sub10``).

    Raises:
        UniPETInputError: one line naming the subject/file and the fix, for any layout problem.
    """
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise UniPETInputError(f"dataset dir {root} does not exist or is not a folder: check the path")
    subject_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: natural_key(p.name)
    )
    if not subject_dirs:
        raise UniPETInputError(
            f"dataset dir {root} has no subject folders: expected <subject>/full_dose.nii.gz and "
            "<subject>/drf_<N>.nii.gz (see scripts/data/layout.py)"
        )
    subjects = [_scan_subject(d, check_geometry) for d in subject_dirs]
    n_pairs = sum(len(s.drfs) for s in subjects)
    logger.info("paired dataset: %d subjects, %d low/full-dose pairs", len(subjects), n_pairs)
    return subjects
