"""Read one single-frame DICOM image series from a folder into a float volume with a RAS affine.

This module knows DICOM files and geometry, not PET physics (that is :mod:`scripts.data.suv`). It

- reads every file in the folder (not sub-folders; hidden files are skipped),
- refuses files that are not DICOM or are truncated, naming the file,
- skips non-image objects (RTSTRUCT, SR, DICOMDIR, ...) with a log line, and refuses a folder holding
  more than one image series unless one is picked by ``series_uid`` (the message lists them),
- sorts the slices along the slice normal (cross product of the two ImageOrientationPatient vectors),
- checks that the slices form one regular stack (same matrix, spacing and orientation, no duplicated
  positions, no gaps, no shear),
- applies RescaleSlope/RescaleIntercept per slice (PET scanners store a different slope in every slice),
- decodes uncompressed, RLE, JPEG 2000 and JPEG Lossless (1.2.840.10008.1.2.4.70, the usual PACS archive
  syntax) pixel data: pydicom with GDCM (``python-gdcm``, a pinned requirement) as the JPEG decoder.

Array convention: ``array[i, j, k]`` with i = DICOM column index, j = DICOM row index and k = slice
index in increasing order along the slice normal, i.e. the (x, y, z) order that nibabel and MONAI's
``LoadImage(reader="NibabelReader")`` return for the NIfTI written with :func:`ras_affine`.
The affine maps (i, j, k) to RAS millimetres (DICOM patient coordinates are LPS: x and y change sign).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from scripts.common.errors import UniPETInputError

__all__ = [
    "DicomSeriesError",
    "DicomVolume",
    "SeriesSummary",
    "check_single_frame",
    "dicom_number",
    "read_dicom",
    "load_series",
    "ras_affine",
    "scan_folder",
    "select_series",
    "stack_series",
]

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Relative tolerances for "one regular stack". Real whole-body PET has slice steps that vary by a few
# per cent between bed positions (3.19-3.29 mm in the STS_001 series), so only a gap well beyond that
# (a missing slice doubles the step) is refused.
_STEP_REL_TOL = 0.25
# Every slice must lie within this fraction of a step of the uniform grid the affine describes: steps that each pass
# the test above can still add up (20 slices of 3.0 mm then 20 of 3.7 mm put slices 6.8 mm off a 3.36 mm grid),
# and beyond half a step a slice would be written into its neighbour's place. The STS_001 series: 0.04 mm.
_GRID_REL_TOL = 0.5
_ORIENTATION_TOL = 1e-3
_SHEAR_PIXEL_TOL = 0.1


class DicomSeriesError(UniPETInputError):
    """The folder does not hold exactly one readable, regular, single-frame image series."""


@dataclass
class SeriesSummary:
    """One image series found in a folder (no patient identifiers)."""

    series_uid: str
    modality: str
    description: str
    number: str
    files: list[Path] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        return f"{self.modality or '?'} series '{self.description}' #{self.number} ({len(self.files)} files, uid {self.series_uid})"


@dataclass
class DicomVolume:
    """A sorted, rescaled single-frame DICOM series.

    Attributes:
        array: float64 (X, Y, Z) = (column, row, slice along the normal); values after the per-slice
            RescaleSlope/RescaleIntercept, in the series' own units (Bq/mL for PET with Units BQML).
        affine: 4x4 voxel (i, j, k) -> RAS mm.
        files: slice files sorted like ``array[..., k]``.
        datasets: headers (no pixel data) of the same slices, same order.
        rescale_slopes: (Z,) RescaleSlope of each slice (1.0 where absent).
        rescale_intercepts: (Z,) RescaleIntercept of each slice (0.0 where absent).
        geometry: JSON-ready summary (spacing, orientation, slice step range, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    files: list[Path]
    datasets: list[Dataset]
    rescale_slopes: np.ndarray
    rescale_intercepts: np.ndarray
    geometry: dict[str, Any]

    @property
    def reference(self) -> Dataset:
        """Header of the first slice (k = 0): the template for a derived series."""
        return self.datasets[0]


def read_dicom(path: str | os.PathLike, **kwargs: Any) -> Dataset:
    """``pydicom.dcmread``, also for a dataset written without the Part-10 header (no 128-byte preamble and ``DICM``
    prefix: older PACS and CD exports write these), which pydicom refuses unless forced. A forced read is kept only
    when it found a SOP class or an image (a file that is not DICOM still raises ``InvalidDicomError``); its
    transfer syntax is the encoding it was read with, so its pixel data decode.
    """
    try:
        ds = pydicom.dcmread(path, **kwargs)
    except InvalidDicomError:
        ds = pydicom.dcmread(path, force=True, **kwargs)
        if not ("SOPClassUID" in ds or ("Modality" in ds and "Rows" in ds)):
            raise
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    if not ds.file_meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if implicit is not False
            else (pydicom.uid.ExplicitVRLittleEndian if little is not False else pydicom.uid.ExplicitVRBigEndian)
        )
    return ds


def _is_image(ds: Dataset) -> bool:
    """Image objects are recognised by SOP class, so a truncated image file is not mistaken for a non-image."""
    sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if sop is not None and "Image Storage" in pydicom.uid.UID(str(sop)).name:
        return True
    return "Rows" in ds or "PixelData" in ds


def _list_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise DicomSeriesError(f"DICOM folder {folder} does not exist: check the --dicom_dir path")
    if not folder.is_dir():
        raise DicomSeriesError(
            f"{folder} is a file, not a folder: pass the folder that holds the slice files as --dicom_dir"
        )
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and not p.name.startswith(".")]
    if not files:
        subdirs = [p.name for p in entries if p.is_dir()]
        hint = (
            f" (it has sub-folders: {', '.join(subdirs[:5])}); point --dicom_dir at the folder that holds the slices"
            if subdirs
            else "; point --dicom_dir at the folder that holds the slices"
        )
        raise DicomSeriesError(f"DICOM folder {folder} holds no files{hint}")
    return files


def scan_folder(dicom_dir: str | os.PathLike) -> tuple[dict[str, SeriesSummary], list[str]]:
    """Read every file's header and group the image objects by SeriesInstanceUID.

    Returns:
        (image series by uid, modalities of the skipped non-image objects).

    Raises:
        DicomSeriesError: missing/empty folder, a file that is not DICOM or cannot be read.
    """
    folder = Path(dicom_dir).expanduser()
    files = _list_files(folder)
    series: dict[str, SeriesSummary] = {}
    skipped: list[str] = []
    for path in tqdm(files, desc="reading DICOM headers", unit="file", disable=None, leave=False):
        try:
            ds = read_dicom(path, stop_before_pixels=True)
        except InvalidDicomError:
            raise DicomSeriesError(
                f"{path} is not a DICOM file: remove it from {folder} (the folder must hold only the series)"
            ) from None
        except Exception as exc:  # pydicom raises many types on damaged files
            raise DicomSeriesError(
                f"{path}: cannot read DICOM header ({type(exc).__name__}: {exc}); the file may be truncated, replace or remove it"
            ) from None
        if not _is_image(ds):
            skipped.append(str(ds.get("Modality", "") or "unknown"))
            continue
        for keyword in ("Rows", "Columns"):
            if keyword not in ds:  # the header stops early: grouping it would invent a second series
                raise DicomSeriesError(f"{path} has no {keyword} (truncated or incomplete file?): replace or remove it")
        uid = str(ds.get("SeriesInstanceUID", "") or "<no SeriesInstanceUID>")
        if uid not in series:
            series[uid] = SeriesSummary(
                series_uid=uid,
                modality=str(ds.get("Modality", "") or ""),
                description=str(ds.get("SeriesDescription", "") or ""),
                number=str(ds.get("SeriesNumber", "") or ""),
            )
        series[uid].files.append(path)
        series[uid].headers.append(ds)
    return series, skipped


def select_series(
    dicom_dir: str | os.PathLike, series_uid: str | None = None, modality: str | None = "PT"
) -> SeriesSummary:
    """Pick the one image series of ``dicom_dir`` (or the one with ``series_uid``) and check its modality.

    Raises:
        DicomSeriesError: no image series, several series and none picked, unknown uid, wrong modality.
    """
    folder = Path(dicom_dir).expanduser()
    series, skipped = scan_folder(folder)
    if skipped:
        logger.warning(
            "skipping %d non-image DICOM object(s) in %s: %s", len(skipped), folder, ", ".join(sorted(set(skipped)))
        )
    if not series:
        raise DicomSeriesError(
            f"{folder} holds no DICOM image slices (only {', '.join(sorted(set(skipped)))}): point --dicom_dir at the image series folder"
        )
    listing = "; ".join(s.describe() for s in series.values())
    if series_uid is not None:
        if str(series_uid) not in series:
            raise DicomSeriesError(f"series uid {series_uid} not found in {folder}; found: {listing}")
        chosen = series[str(series_uid)]
    elif len(series) > 1:
        raise DicomSeriesError(
            f"{folder} mixes {len(series)} image series: {listing}; keep one series per folder or pass --series_uid"
        )
    else:
        chosen = next(iter(series.values()))
    if modality is not None and chosen.modality != modality:
        raise DicomSeriesError(
            f"{folder} holds a {chosen.modality or 'no-Modality'} series, not {modality} (Modality {chosen.modality!r}): "
            f"point --dicom_dir at the {modality} series folder"
        )
    return chosen


def dicom_number(value: Any, keyword: str, path: Path | str) -> float:
    """A DICOM decimal/integer string as a float, or a :class:`DicomSeriesError` naming the file, the tag and the value.

    Exporting systems with a European locale sometimes write ``0,539`` for ``0.539``: guessing which one was meant
    would risk a wrong number, so such a file is refused with the reason (a bare ``float()`` gave a traceback).
    """
    try:
        return float(value)
    except (TypeError, ValueError):
        text = str(value)
        hint = " (a decimal comma: DICOM numbers use a point)" if "," in text else ""
        raise DicomSeriesError(
            f"{path}: {keyword} {text[:40]!r} is not a number{hint}; the file is malformed: fix the tag or re-export the "
            "series"
        ) from None


def _float_list(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise DicomSeriesError(
            f"{path}: {keyword} missing or malformed; the slice geometry is unknown, the series cannot be stacked"
        )
    return np.asarray([dicom_number(v, keyword, path) for v in value], dtype=np.float64)


def _padding_mask(ds: Dataset, stored: np.ndarray, path: Path) -> np.ndarray | None:
    """Where the stored values are PixelPaddingValue (0028,0120), or within it and PixelPaddingRangeLimit (0028,0121):
    pixels outside the reconstructed field of view, which hold no measurement. None without the tag."""
    value = ds.get("PixelPaddingValue")
    if value is None or value == "":
        return None
    low = high = dicom_number(value, "PixelPaddingValue", path)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is not None and limit != "":
        other = dicom_number(limit, "PixelPaddingRangeLimit", path)
        low, high = min(low, other), max(low, other)
    return (stored >= low) & (stored <= high)


def check_single_frame(chosen: SeriesSummary) -> None:
    """Refuse a multi-frame (enhanced) image: checked before anything else is read from its tags.

    Raises:
        DicomSeriesError: a file holds more than one frame.
    """
    for p, ds in zip(chosen.files, chosen.headers):
        frames = ds.get("NumberOfFrames", 1) or 1
        try:
            many = int(frames) > 1
        except (TypeError, ValueError):
            many = True  # a NumberOfFrames that is not a number is not a single-frame slice either
        if many:
            raise DicomSeriesError(
                f"{p} is a multi-frame (enhanced) image: only single-frame slice series are supported; "
                "export the series as single-frame slices"
            )


def ras_affine(
    orientation: Sequence[float], first_position: Sequence[float], pixel_spacing: Sequence[float], slice_step: float
) -> np.ndarray:
    """4x4 affine from (column i, row j, slice k) indices to RAS mm.

    Args:
        orientation: ImageOrientationPatient (6 direction cosines, LPS): row direction (along which the
            column index grows), then column direction (along which the row index grows).
        first_position: ImagePositionPatient of slice k = 0 (LPS mm, centre of its first voxel).
        pixel_spacing: DICOM PixelSpacing = (spacing between rows, spacing between columns) in mm.
        slice_step: distance between consecutive slices along the normal row x col, in mm.
    """
    iop = np.asarray(orientation, dtype=np.float64)
    row_dir = iop[:3] / np.linalg.norm(iop[:3])
    col_dir = iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = normal * float(slice_step)
    lps[:3, 3] = np.asarray(first_position, dtype=np.float64)
    return LPS_TO_RAS @ lps


def _check_same(values: list[Any], keyword: str, folder: Path, tol: float | None = None) -> None:
    first = values[0]
    for v in values[1:]:
        same = np.allclose(v, first, atol=tol, rtol=0) if tol is not None else v == first
        if not same:
            raise DicomSeriesError(
                f"slices in {folder} differ in {keyword} ({first} vs {v}): not one image stack; keep a single series per folder"
            )


def _syntax(ds: Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return f"{uid.name} {uid}" if uid is not None else "unknown"


def _decode(path: Path, rows: int, cols: int) -> tuple[np.ndarray, Dataset]:
    try:
        ds = read_dicom(path)
    except Exception as exc:
        raise DicomSeriesError(
            f"{path}: cannot read DICOM file ({type(exc).__name__}: {exc}); replace or remove it"
        ) from None
    if "PixelData" not in ds:
        raise DicomSeriesError(f"{path} has no pixel data (truncated or incomplete file?): replace or remove it")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomSeriesError(
            f"{path} is not a grey-scale image (SamplesPerPixel {ds.SamplesPerPixel}): not a PET slice"
        )
    try:
        stored = ds.pixel_array
    except Exception as exc:
        raise DicomSeriesError(
            f"{path}: cannot decode pixel data ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"the file may be truncated, or its transfer syntax ({_syntax(ds)}) has no installed decoder: install the pinned "
            "requirements (python-gdcm decodes JPEG Lossless) or decompress it with gdcmconv --raw"
        ) from None
    if stored.shape != (rows, cols):
        raise DicomSeriesError(
            f"{path}: pixel array shape {stored.shape} does not match Rows x Columns ({rows} x {cols}); the file is damaged"
        )
    del ds.PixelData
    return stored, ds


def load_series(
    dicom_dir: str | os.PathLike, series_uid: str | None = None, modality: str | None = "PT"
) -> DicomVolume:
    """Load the single image series in ``dicom_dir`` as a rescaled float64 (X, Y, Z) volume.

    Args:
        dicom_dir: folder holding the slice files of one series (non-image objects are skipped).
        series_uid: pick this SeriesInstanceUID when the folder holds several image series.
        modality: required Modality (``"PT"``); ``None`` accepts any.

    Raises:
        DicomSeriesError: see :func:`select_series` and :func:`stack_series`.
    """
    return stack_series(select_series(dicom_dir, series_uid=series_uid, modality=modality))


def stack_series(chosen: SeriesSummary) -> DicomVolume:
    """Sort, check and decode the slices of one series found by :func:`select_series`.

    Raises:
        DicomSeriesError: inconsistent matrix/orientation/spacing, duplicated positions, gaps, shear,
            missing geometry tags, or a slice whose pixel data cannot be decoded.
    """
    headers = chosen.headers
    folder = chosen.files[0].parent
    check_single_frame(chosen)

    _check_same([(int(ds.Rows), int(ds.Columns)) for ds in headers], "Rows x Columns", folder)
    iops = [_float_list(ds, "ImageOrientationPatient", 6, p) for p, ds in zip(chosen.files, headers)]
    ipps = [_float_list(ds, "ImagePositionPatient", 3, p) for p, ds in zip(chosen.files, headers)]
    spacings = [_float_list(ds, "PixelSpacing", 2, p) for p, ds in zip(chosen.files, headers)]
    _check_same(iops, "ImageOrientationPatient", folder, tol=_ORIENTATION_TOL)
    _check_same(spacings, "PixelSpacing", folder, tol=1e-4)

    iop = iops[0]
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    if abs(float(row_dir @ col_dir)) > _ORIENTATION_TOL:
        raise DicomSeriesError(
            f"ImageOrientationPatient {iop.tolist()} is not orthogonal in {folder}: the DICOM geometry is invalid"
        )
    normal = np.cross(row_dir, col_dir)
    along = np.array([float(normal @ pos) for pos in ipps])
    order = np.argsort(along, kind="stable")
    files = [chosen.files[i] for i in order]
    positions = np.asarray([ipps[i] for i in order])
    along = along[order]
    row_spacing, col_spacing = (float(v) for v in spacings[0])
    n = len(files)

    if n > 1:
        steps = np.diff(along)
        if np.min(steps) < 1e-3 * min(row_spacing, col_spacing):
            dup = int(np.sum(steps < 1e-3 * min(row_spacing, col_spacing)))
            raise DicomSeriesError(
                f"{dup} slice(s) in {folder} repeat another slice's position: a dynamic/gated series or duplicated files; "
                "export a single frame (one slice per position) into its own folder"
            )
        slice_step = float(along[-1] - along[0]) / (n - 1)  # mean step, as ITK's series reader uses
        worst = int(np.argmax(np.abs(steps - slice_step)))
        if abs(steps[worst] - slice_step) > _STEP_REL_TOL * slice_step:
            raise DicomSeriesError(
                f"irregular slice spacing in {folder}: step {steps[worst]:.3f} mm between slices at {along[worst]:.2f} and "
                f"{along[worst + 1]:.2f} mm (mean {slice_step:.3f} mm); missing slices? re-export the complete series"
            )
        offsets = along - (along[0] + slice_step * np.arange(n))  # each slice's distance from the affine's grid
        far = int(np.argmax(np.abs(offsets)))
        if abs(offsets[far]) > _GRID_REL_TOL * slice_step:
            raise DicomSeriesError(
                f"slices in {folder} are not evenly spaced: steps {steps.min():.3f}-{steps.max():.3f} mm, so the slice at "
                f"{along[far]:.2f} mm lies {abs(offsets[far]):.2f} mm from a uniform grid of {slice_step:.3f} mm (more than "
                "half a step: it would be written into another slice's place); resample the series to uniform spacing "
                "first (e.g. with ITK or dcm2niix)"
            )
        drift = positions[-1] - positions[0] - normal * (along[-1] - along[0])
        if np.linalg.norm(drift) > _SHEAR_PIXEL_TOL * min(row_spacing, col_spacing):
            raise DicomSeriesError(
                f"slices in {folder} are not stacked along their normal (in-plane drift {np.linalg.norm(drift):.2f} mm: gantry tilt or sheared volume); "
                "resample the series to an orthogonal grid first"
            )
    else:
        steps = np.zeros(0)
        slice_step = float(headers[0].get("SpacingBetweenSlices") or headers[0].get("SliceThickness") or 1.0)

    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    volume = np.empty((cols, rows, n), dtype=np.float64)
    slopes = np.ones(n)
    intercepts = np.zeros(n)
    padding_voxels = 0
    datasets: list[Dataset] = []
    for k, path in enumerate(tqdm(files, desc="decoding slices", unit="slice", disable=None, leave=False)):
        stored, ds = _decode(path, rows, cols)
        # A missing slope/intercept means identity (DICOM default); values are kept in float64 until the caller casts.
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        slopes[k] = dicom_number(slope, "RescaleSlope", path) if slope not in (None, "") else 1.0
        intercepts[k] = dicom_number(intercept, "RescaleIntercept", path) if intercept not in (None, "") else 0.0
        if not (np.isfinite(slopes[k]) and np.isfinite(intercepts[k])):
            raise DicomSeriesError(
                f"{path}: RescaleSlope/RescaleIntercept {float(slopes[k])}/{float(intercepts[k])} is not a finite number, so every voxel "
                "of the slice would be NaN/Inf; the file is damaged: re-export the series"
            )
        volume[:, :, k] = stored.T.astype(np.float64) * slopes[k] + intercepts[k]
        padded = _padding_mask(ds, stored, path)
        if padded is not None:
            # outside the reconstructed field of view: no measured activity, not a (often very negative) value
            volume[:, :, k][padded.T] = 0.0
            padding_voxels += int(padded.sum())
        datasets.append(ds)

    affine = ras_affine(iop, positions[0], (row_spacing, col_spacing), slice_step)
    geometry = {
        "num_slices": n,
        "shape_xyz": [cols, rows, n],
        "spacing_mm": [col_spacing, row_spacing, slice_step],
        "slice_step_range_mm": [float(steps.min()), float(steps.max())] if n > 1 else [slice_step, slice_step],
        "max_slice_offset_from_grid_mm": float(np.max(np.abs(offsets))) if n > 1 else 0.0,
        "padding_voxels": padding_voxels,
        "image_orientation_patient": [float(v) for v in iop],
        "first_slice_position_lps_mm": [float(v) for v in positions[0]],
        "affine_ras": affine.tolist(),
        "rescale_slope_range": [float(slopes.min()), float(slopes.max())],
        "rescale_intercept_range": [float(intercepts.min()), float(intercepts.max())],
    }
    logger.info(
        "loaded %d slices %dx%d, spacing %.4g x %.4g x %.4g mm", n, cols, rows, col_spacing, row_spacing, slice_step
    )
    return DicomVolume(
        array=volume,
        affine=affine,
        files=files,
        datasets=datasets,
        rescale_slopes=slopes,
        rescale_intercepts=intercepts,
        geometry=geometry,
    )
