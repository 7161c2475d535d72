"""The SDK-free parts of the Deploy app: PET series -> SUV volume, denoising, float-safe writing and its check.

Each function here is what one operator of :mod:`.operators` calls, so the whole app minus the SDK's
own DICOM loader and series selector can run and be tested without the SDK (:func:`run_without_sdk`
stands in for those two with :func:`find_pet_series`).

Output names never contain patient names or IDs: a series is named ``PT<SeriesNumber>_<8 hex digits>``,
the digits being a hash of its SeriesInstanceUID (unique, not reversible).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from scripts.common.errors import UniPETInputError
from scripts.data.dicom_series import read_dicom
from scripts.data.io import save_nifti
from scripts.data.suv import read_pet_series
from scripts.inference.denoise import BundleDenoiser, check_float_volume
from scripts.inference.dicom_writer import derivation_text, verify_written_series, write_derived_pet_series

__all__ = [
    "DenoisedPET",
    "PETVolume",
    "denoise_volume",
    "find_pet_series",
    "pet_volume_from_files",
    "run_without_sdk",
    "series_name",
    "write_denoised",
]

logger = logging.getLogger(__name__)

DICOM_SUFFIX = "_denoised_dicom"


@dataclass
class PETVolume:
    """One PET series in SUV, with what the writer needs to derive a series from it.

    Attributes:
        name: output name (:func:`series_name`), no patient identifiers.
        suv: float32 (X, Y, Z) = (column, row, slice along the normal), body-weight SUV.
        affine: 4x4 voxel -> RAS mm.
        suv_factor: SUV = suv_factor x source pixel value (g/mL per Bq/mL for a BQML series).
        units: the source series' Units (``BQML``, ``GML``).
        headers: the source slices' headers (no pixel data) in ``k`` order.
        rescale_slopes: (Z,) the source's per-slice RescaleSlope, kept for the record.
    """

    name: str
    suv: np.ndarray
    affine: np.ndarray
    suv_factor: float
    units: str
    headers: list[Dataset] = field(repr=False)
    rescale_slopes: np.ndarray = field(repr=False)


@dataclass
class DenoisedPET:
    """A :class:`PETVolume` and its denoised SUV (float32, same grid), plus the model's provenance."""

    source: PETVolume
    suv: np.ndarray
    model_version: str
    model_info: dict[str, Any]
    level_lock_fwhm_mm: float = 0.0


def series_name(series_uid: str, series_number: Any = None) -> str:
    """``PT<SeriesNumber>_<sha1(SeriesInstanceUID)[:8]>``: unique per series, free of patient identifiers."""
    digest = hashlib.sha1(str(series_uid).encode()).hexdigest()[:8]
    try:
        number = str(int(str(series_number)))
    except (TypeError, ValueError):
        number = "x"
    return f"PT{number}_{digest}"


def pet_volume_from_files(files: Sequence[str | os.PathLike], name: str | None = None) -> PETVolume:
    """Read the slice files of one PET series (anywhere on disk) into SUV.

    The files are linked into a private temporary folder so :func:`scripts.data.suv.read_pet_series`
    (geometry checks, per-slice RescaleSlope/Intercept in float64, SUV from the tags) reads exactly this
    series, whatever else lies beside its files.

    Raises:
        UniPETInputError: no files, or the series cannot be read/converted (the message names the fix).
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise UniPETInputError("the selected PET series has no files")
    with tempfile.TemporaryDirectory(prefix="unipet_series_") as tmp:
        for k, path in enumerate(paths):
            link = Path(tmp) / f"{k:05d}.dcm"
            try:
                os.symlink(path.resolve(), link)
            except OSError:  # no symlinks (some file systems): copy instead
                shutil.copyfile(path, link)
        series = read_pet_series(tmp)
    ref = series.reference
    return PETVolume(
        name=name or series_name(str(ref.get("SeriesInstanceUID", "")), ref.get("SeriesNumber")),
        suv=check_float_volume(series.suv, "PET volume"),
        affine=np.asarray(series.affine, dtype=np.float64),
        suv_factor=float(series.suv_factor),
        units=str(series.units),
        headers=list(series.datasets),
        rescale_slopes=np.asarray(series.rescale_slopes, dtype=np.float64),
    )


def find_pet_series(input_dir: str | os.PathLike) -> list[list[Path]]:
    """Slice files of every PT image series under ``input_dir`` (recursive), one list per series.

    The SDK-free stand-in for the SDK's DICOM loader + PT series selector: files are grouped by
    (StudyInstanceUID, SeriesInstanceUID); non-DICOM files and other modalities are skipped.

    Raises:
        UniPETInputError: missing folder, or no PET series found.
    """
    root = Path(input_dir).expanduser()
    if not root.is_dir():
        raise UniPETInputError(f"input folder {root} does not exist: pass the folder holding the DICOM studies")
    groups: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = read_dicom(
                path,
                stop_before_pixels=True,
                specific_tags=["Modality", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Rows"],
            )
        except Exception:  # not DICOM: the SDK's loader skips such files too
            continue
        if str(ds.get("Modality", "")).strip().upper() != "PT":
            continue
        groups.setdefault((str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))), []).append(path)
    if not groups:
        raise UniPETInputError(f"no PET (Modality PT) DICOM series found under {root}")
    return [groups[k] for k in sorted(groups)]


def denoise_volume(denoiser: BundleDenoiser, volume: PETVolume) -> DenoisedPET:
    """Run the bundle's inference on one volume; the result is checked to be float (never uint8)."""
    denoised = denoiser(volume.suv, volume.affine, name=volume.name)
    return DenoisedPET(
        volume,
        check_float_volume(denoised, f"denoised {volume.name}"),
        denoiser.model_version,
        dict(denoiser.model_info),
        denoiser.level_lock_fwhm_mm,
    )


def write_denoised(
    item: DenoisedPET,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    write_nifti: bool = False,
) -> list[Path]:
    """Write ``<output_dir>/<name>_denoised_dicom/`` (derived PET series, source units) and check it.

    With ``write_nifti`` also ``<name>_denoised.nii.gz`` (float32 SUV on the source grid).

    Returns:
        The written paths (the series folder first).

    Raises:
        UniPETInputError: existing output without ``overwrite``; SeriesCheckError: failed read-back check
        (the series is then removed).
    """
    out = Path(output_dir).expanduser()
    suv = check_float_volume(item.suv, f"denoised {item.source.name}")
    trained = bool(item.model_info.get("trained", False))
    derivation = derivation_text(
        item.model_version, trained, by="the UniPET MONAI Deploy app", level_lock_fwhm_mm=item.level_lock_fwhm_mm
    )
    series_dir = out / f"{item.source.name}{DICOM_SUFFIX}"
    write_derived_pet_series(
        suv,
        item.source.headers,
        item.source.suv_factor,
        series_dir,
        model_version=item.model_version,
        derivation_description=derivation,
        overwrite=overwrite,
        trained=trained,
    )
    try:
        err = verify_written_series(series_dir, suv, item.source.suv_factor)
    except BaseException:
        shutil.rmtree(series_dir, ignore_errors=True)
        raise
    written = [series_dir]
    logger.info("wrote %s (%d slices; read-back SUV error %.3g)", series_dir, len(item.source.headers), err)
    if write_nifti:
        written.append(
            save_nifti(suv, item.source.affine, out / f"{item.source.name}_denoised.nii.gz", overwrite=overwrite)
        )
    return written


def run_without_sdk(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    bundle_root: str | os.PathLike,
    model_file: str | os.PathLike | None = None,
    device: str | None = None,
    overwrite: bool = False,
    write_nifti: bool = False,
    overrides: dict[str, Any] | None = None,
) -> list[Path]:
    """The app's flow with :func:`find_pet_series` in place of the SDK loader/selector (tests, SDK-less hosts).

    Every series is read and checked before the network is built, so a bad input fails before any output.
    """
    volumes = [pet_volume_from_files(files) for files in find_pet_series(input_dir)]
    _check_unique(v.name for v in volumes)
    denoiser = BundleDenoiser(bundle_root, model_file=model_file, device=device, overrides=overrides)
    written: list[Path] = []
    for volume in volumes:
        written += write_denoised(
            denoise_volume(denoiser, volume), output_dir, overwrite=overwrite, write_nifti=write_nifti
        )
    return written


def _check_unique(names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UniPETInputError(
                f"two selected series map to the output name {name}: the input holds the same series twice"
            )
        seen.add(name)
