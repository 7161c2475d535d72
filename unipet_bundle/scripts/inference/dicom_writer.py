"""Write a denoised SUV volume as a derived PET DICOM series that a PACS accepts and that still computes SUV.

Each output slice starts from the header of the source slice at the same position, so everything a
viewer or an SUV tool needs is kept: patient and study tags, geometry (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing, SliceThickness, FrameOfReferenceUID), Units, DecayCorrection,
PatientWeight, RadiopharmaceuticalInformationSequence, SeriesDate/SeriesTime and the acquisition times.
The SUV factor computed from the output series is therefore the source's, exactly.

What changes:

- pixel values are the denoised SUV divided by the source series' SUV factor (Bq/mL for a BQML
  series, SUV itself for GML), stored as int16 with a **per-slice RescaleSlope chosen from the slice's
  largest magnitude** (intercept 0): nothing is clipped (a 66 SUV bladder survives), negative voxels
  keep their sign, and the quantisation error is at most half a slope, i.e. 1/65534 of the slice
  maximum. The slope is written as a DS string and then re-read, so the rounding of the text cannot
  push the peak past 32767;
- new SeriesInstanceUID and SOPInstanceUIDs (``pydicom.uid.generate_uid``), SeriesNumber + 1000,
  ImageType ``DERIVED\\PRIMARY`` (the PET Image module allows only PRIMARY as value 2), SeriesDescription naming UniPET and the model version (or, for the
  untrained network, ``UniPET UNTRAINED NOT denoised``: a PACS user sees it in the series list),
  DerivationDescription, SourceImageSequence pointing at the source slice, InstanceCreationDate/Time and
  ContentDate/ContentTime set to the creation time (the content is new; the acquisition and series times that
  SUV decay correction uses are kept);
- conformance (``dciodvfy`` of dicom3tools is clean on the series of the real GE scan): PatientPosition is
  dropped when the PET PatientOrientationCodeSequence is present (the standard forbids both),
  NumberOfTimeSlices is dropped unless SeriesType is DYNAMIC, and an empty Laterality (Type 2C: unknown) is
  added when BodyPartExamined is absent or a paired structure and no laterality is given;
- the files ``IM00001.dcm``, ... are written in the source's InstanceNumber order (kept from the source;
  slice-position order when the source's numbers are missing or repeated);
- the file is Explicit VR Little Endian, uncompressed;
- private tags are removed (vendor scale factors in them, e.g. Philips' SUV scale, would no longer
  match the new slopes), and so are the pixel-statistics tags whose values no longer hold
  (Smallest/LargestImagePixelValue, ...).

Writing is atomic: the slices go to a hidden temporary folder beside the target (named by
:func:`scripts.inference.claims.temporary_path`: host, PID), which is renamed into place once complete
without replacing anything unless ``overwrite`` is asked for.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid

from scripts.common.errors import UniPETInputError
from scripts.common.io import default_dir_mode
from scripts.data.suv import read_pet_series
from scripts.inference.claims import publish, remove_path, temporary_path

__all__ = [
    "INT16_MAX",
    "atomic_write_dir",
    "derivation_text",
    "quantise_slice",
    "SeriesCheckError",
    "SourceSeries",
    "stage_derived_pet_series",
    "verify_written_series",
    "write_derived_pet_series",
]

logger = logging.getLogger(__name__)

INT16_MAX = 32767
SERIES_NUMBER_OFFSET = 1000
# Tags whose values describe the old pixel data (or whose VR depends on the old PixelRepresentation).
_STALE_TAGS = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "IconImageSequence",
)
# BodyPartExamined values (PS3.16 Annex L) of paired structures: Laterality (Type 2C) is then required.
_PAIRED_PARTS = frozenset(
    {
        "EXTREMITY",
        "ARM",
        "LEG",
        "HAND",
        "FOOT",
        "KNEE",
        "HIP",
        "SHOULDER",
        "ELBOW",
        "WRIST",
        "ANKLE",
        "BREAST",
        "EYE",
        "EAR",
        "KIDNEY",
        "LUNG",
        "FEMUR",
        "TIBIA",
        "FIBULA",
        "HUMERUS",
        "RADIUS",
        "ULNA",
        "CLAVICLE",
        "SCAPULA",
        "HEEL",
        "TOE",
        "FINGER",
        "THUMB",
        "THIGH",
        "LOWER LEG",
        "UPPER ARM",
        "FOREARM",
        "ADRENAL",
        "OVARY",
        "TESTIS",
        "PAROTID",
    }
)


def _conform(ds: Dataset) -> None:
    """Remove the conditional attributes a source may carry against the PET IOD rules (module docstring)."""
    if "PatientOrientationCodeSequence" in ds and "PatientPosition" in ds:
        del ds.PatientPosition
    series_type = ds.get("SeriesType")
    if "NumberOfTimeSlices" in ds and not (series_type and str(series_type[0]).upper() == "DYNAMIC"):
        del ds.NumberOfTimeSlices
    if "Laterality" not in ds and "ImageLaterality" not in ds:
        part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
        if not part or part in _PAIRED_PARTS:
            ds.Laterality = ""  # Type 2: present and empty means "not known"; no value is invented


def _ds_text(value: float) -> str:
    """A decimal string of at most 16 characters (the DICOM DS limit)."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.8e}"


def quantise_slice(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Float slice -> (int16 stored values, RescaleSlope as DS text) with ``stored * slope ~ values``.

    The slope is ``max|values| / 32767`` (as the DS text reads back), so no value is clipped; an
    all-zero slice gets slope 1.

    Raises:
        ValueError: non-finite values.
    """
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("cannot quantise NaN/Inf values")
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    if peak == 0.0:
        return np.zeros(v.shape, dtype=np.int16), "1"
    slope = peak / INT16_MAX
    text = _ds_text(slope)
    while peak / float(text) > INT16_MAX:  # the text rounded the slope down: nudge it up
        slope *= 1.0 + 1e-9
        text = _ds_text(slope)
    stored = np.rint(v / float(text))
    return np.clip(stored, -INT16_MAX, INT16_MAX).astype(np.int16), text


class SourceSeries:
    """The source PET series as the loader read it, carried in the data dict to the DICOM writer.

    :class:`scripts.inference.inputs.LoadPETd` puts one under ``source_series`` for a DICOM input, so the
    writer derives its series from exactly the headers, slice order and SUV factor the volume was built
    with: it never re-reads the folder, re-sorts the slices or recomputes the factor (a second sort that
    disagreed with the first would scramble the derived series silently).

    MONAI's collation cannot stack pydicom datasets, so
    :func:`scripts.inference.memory.collate_native_by_reference` passes this object by reference, and
    ``decollate_batch`` hands it back untouched because it presents itself as a 0-d value (``ndim`` 0,
    :meth:`item` returns the object itself).

    Attributes:
        headers: the slices' headers (no pixel data) in the volume's ``k`` order
            (:attr:`scripts.data.suv.PETSeries.datasets`).
        suv_factor: SUV = suv_factor x source pixel value, as the volume was converted.
        suv_details: what :func:`scripts.data.suv.compute_suv_factor` said about the factor (for the sidecar).
    """

    ndim = 0

    def __init__(self, headers: Sequence[Dataset], suv_factor: float, suv_details: dict[str, Any]) -> None:
        self.headers = list(headers)
        self.suv_factor = float(suv_factor)
        self.suv_details = dict(suv_details)

    def item(self) -> "SourceSeries":
        return self

    def __repr__(self) -> str:
        return f"SourceSeries({len(self.headers)} slices, suv_factor={self.suv_factor:g})"


class SeriesCheckError(RuntimeError):
    """A written series does not read back as the float volume it was written from (never expected)."""


def verify_written_series(series_dir: str | os.PathLike, expected_suv: np.ndarray, suv_factor: float) -> float:
    """Read a written series back and compare its SUV with the float volume it came from.

    The series is read as any input is (:func:`scripts.data.suv.read_pet_series`: its own slice sort, the SUV
    factor from its own tags). Every slice must match within half its own quantisation step
    (``max|slice| / 32767 / 2``): this catches any integer cast, clipping, lost slope or wrong slice order
    between the float volume and the files.

    Args:
        series_dir: the written series folder.
        expected_suv: float (X, Y, Z) SUV the series was written from.
        suv_factor: the factor it was written with.

    Returns:
        The largest absolute SUV difference.

    Raises:
        SeriesCheckError: a slice differs by more than its step allows, or the SUV factor changed.
    """
    back = read_pet_series(series_dir)
    expected = np.asarray(expected_suv, dtype=np.float64)
    if back.suv.shape != expected.shape:
        raise SeriesCheckError(f"{series_dir}: read back as {back.suv.shape}, written from {expected.shape}")
    if not np.isclose(back.suv_factor, suv_factor, rtol=1e-9, atol=0):
        raise SeriesCheckError(f"{series_dir}: SUV factor {back.suv_factor} read back, {suv_factor} expected")
    err = np.abs(back.suv.astype(np.float64) - expected).max(axis=(0, 1))
    # half a step of each slice, plus float32 rounding of the read-back SUV
    allowed = np.abs(expected).max(axis=(0, 1)) * (0.5 / INT16_MAX * (1 + 1e-6) + 1e-6) + 1e-6
    worst = int(np.argmax(err - allowed))
    if err[worst] > allowed[worst]:
        raise SeriesCheckError(
            f"{series_dir}: slice {worst} reads back {err[worst]:.4g} SUV off the float volume (allowed {allowed[worst]:.3g}): "
            "the series was not written float-safely"
        )
    return float(err.max())


def atomic_write_dir(target: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``fill(tmp_dir)`` on a hidden folder beside ``target``, then rename it to ``target``.

    Without ``overwrite`` nothing is ever replaced, not even a folder that another run renamed into place
    while this one was filling (no-replace rename). With ``overwrite`` an existing ``target`` is replaced
    only once the new folder is complete. On failure only the temporary folder is removed.

    Raises:
        UniPETInputError: ``target`` exists (or appeared meanwhile) and ``overwrite`` is False.
    """
    target = Path(target)
    exists = f"output {target} already exists: remove it, choose another --output_dir, or pass --overwrite true"
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise UniPETInputError(exists)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    tmp.mkdir(mode=default_dir_mode())
    try:
        fill(tmp)
        try:
            publish(tmp, target, replace=overwrite)
        except FileExistsError:
            raise UniPETInputError(exists) from None
    except BaseException:
        remove_path(tmp)
        raise
    return target


def _derived_slice(
    src: Dataset,
    values: np.ndarray,
    series_uid: str,
    series_description: str,
    derivation_description: str,
    created: datetime,
) -> Dataset:
    """One output slice: ``values`` (rows, columns) in the source units, on ``src``'s geometry."""
    ds = copy.deepcopy(src)
    if "PixelData" in ds:
        del ds.PixelData
    ds.remove_private_tags()
    for keyword in _STALE_TAGS:
        if keyword in ds:
            delattr(ds, keyword)

    sop_class = src.get("SOPClassUID") or PositronEmissionTomographyImageStorage
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    try:
        ds.SeriesNumber = int(src.SeriesNumber) + SERIES_NUMBER_OFFSET
    except (AttributeError, TypeError, ValueError):
        ds.SeriesNumber = SERIES_NUMBER_OFFSET
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SeriesDescription = series_description
    ds.DerivationDescription = derivation_description
    source_ref = Dataset()
    source_ref.ReferencedSOPClassUID = sop_class
    source_ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ds.SourceImageSequence = DicomSequence([source_ref])
    ds.InstanceCreationDate = created.strftime("%Y%m%d")
    ds.InstanceCreationTime = created.strftime("%H%M%S")
    ds.ContentDate = created.strftime("%Y%m%d")
    ds.ContentTime = created.strftime("%H%M%S")
    _conform(ds)

    stored, slope = quantise_slice(values)
    ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
    ds.RescaleSlope = slope
    ds.RescaleIntercept = "0"
    return ds


def derivation_text(model_version: str, trained: bool = True, by: str = "", level_lock_fwhm_mm: float = 0.0) -> str:
    """The DerivationDescription of a derived series: what made it (``by``, e.g. "the UniPET MONAI Deploy app"),
    from which model version, whether the network was trained, the level lock's width when one was applied
    (``level_lock_fwhm_mm`` > 0: the network's corrections coarser than that were removed), and that it is for
    research only.

    One text for every writer (inference, the Deploy app, direct calls); :func:`write_derived_pet_series`
    cuts it to the 1024-character ST limit.
    """
    state = "trained checkpoint" if trained else "UNTRAINED network (identity: NOT denoised)"
    if float(level_lock_fwhm_mm) > 0:
        state += f", level lock {float(level_lock_fwhm_mm):g} mm"
    maker = f" by {by}" if by else ""
    return (
        f"Denoised with UniPET (deep-learning PET denoising, model version {model_version}, {state}){maker}; research use "
        "only, not for diagnosis. Pixel values are in the source series' units; SUV tags are kept from the source."
    )


def _series_description(source: Dataset, model_version: str, trained: bool = True) -> str:
    """``<source description> UniPET denoised v<version>`` (untrained network: ``UniPET UNTRAINED NOT
    denoised v<version>``, which is kept whole), cut to the 64-character LO limit."""
    tag = (f"UniPET denoised v{model_version}" if trained else f"UniPET UNTRAINED NOT denoised v{model_version}")[:64]
    original = str(source.get("SeriesDescription", "") or "").strip()
    room = 64 - len(tag) - 1
    return f"{original[:room].rstrip()} {tag}" if original and room > 0 else tag


def _check_series_input(volume: np.ndarray, source_headers: Sequence[Dataset], suv_factor: float) -> None:
    if volume.ndim != 3:
        raise UniPETInputError(f"the denoised volume must be 3D (X, Y, Z), got shape {list(volume.shape)}")
    if len(source_headers) != volume.shape[2]:
        raise UniPETInputError(
            f"the denoised volume has {volume.shape[2]} slices but the source series {len(source_headers)}"
        )
    for k, ds in enumerate(source_headers):
        if (int(ds.Rows), int(ds.Columns)) != (volume.shape[1], volume.shape[0]):
            raise UniPETInputError(
                f"source slice {k} is {ds.Rows}x{ds.Columns} (rows x columns) but the volume slice is "
                f"{volume.shape[1]}x{volume.shape[0]}: not the source grid"
            )
    if not np.all(np.isfinite(volume)):
        raise UniPETInputError("the denoised volume has NaN/Inf voxels: not written")
    if not (np.isfinite(suv_factor) and suv_factor > 0):
        raise UniPETInputError(f"suv_factor must be a finite number > 0, got {suv_factor!r}")


def stage_derived_pet_series(
    suv: np.ndarray,
    source_headers: Sequence[Dataset],
    suv_factor: float,
    folder: str | os.PathLike,
    model_version: str = "unknown",
    derivation_description: str | None = None,
    trained: bool = True,
) -> tuple[list[Path], str]:
    """Write the slices of the derived series into the existing, empty ``folder`` (no renaming).

    The arguments are those of :func:`write_derived_pet_series`; callers that publish several outputs
    together (:class:`scripts.inference.writer.SaveDenoisedd`) stage into a temporary folder with this.

    Returns:
        (the written files in slice order, the new SeriesInstanceUID).

    Raises:
        UniPETInputError: shape/header mismatch, non-finite values, bad factor.
        OSError: the write failed (disk full...); files already written stay in ``folder``.
    """
    volume = np.asarray(suv)
    _check_series_input(volume, source_headers, suv_factor)
    values = volume.astype(np.float64) / float(suv_factor)
    series_uid = generate_uid()
    created = datetime.now()
    description = _series_description(source_headers[0], model_version, trained)
    derivation = derivation_description or derivation_text(model_version, trained)
    derivation = derivation[:1024]  # ST limit
    folder = Path(folder)
    order = _instance_order(source_headers)
    names = {k: f"IM{rank + 1:05d}.dcm" for rank, k in enumerate(order)}
    for k in order:  # in InstanceNumber order, so a reader that goes by file order sees the source's order
        ds = _derived_slice(source_headers[k], values[:, :, k].T, series_uid, description, derivation, created)
        ds.save_as(folder / names[k], enforce_file_format=True)
    return [folder / names[k] for k in range(volume.shape[2])], str(series_uid)


def _instance_order(headers: Sequence[Dataset]) -> list[int]:
    """Indices of ``headers`` (slice-position order) sorted by InstanceNumber; position order when the numbers
    are missing or not unique."""
    try:
        numbers = [int(ds.InstanceNumber) for ds in headers]
    except (AttributeError, TypeError, ValueError):
        return list(range(len(headers)))
    if len(set(numbers)) != len(numbers):
        return list(range(len(headers)))
    return sorted(range(len(headers)), key=lambda k: numbers[k])


def write_derived_pet_series(
    suv: np.ndarray,
    source_headers: Sequence[Dataset],
    suv_factor: float,
    output_dir: str | os.PathLike,
    model_version: str = "unknown",
    derivation_description: str | None = None,
    overwrite: bool = False,
    trained: bool = True,
) -> list[Path]:
    """Write ``suv`` as a derived PET series in ``output_dir`` (one ``IM00001.dcm``... file per slice).

    Args:
        suv: float (X, Y, Z) = (column, row, slice), body-weight SUV on the source series' grid.
        source_headers: the source slices' headers in ``k`` order (``PETSeries.datasets``, the reader's one
            slice sort; :attr:`SourceSeries.headers` in inference); pixel data, if present, is ignored.
        suv_factor: the source series' factor (SUV = factor x pixel value); pixels are written as
            ``suv / suv_factor``, i.e. in the source's own Units.
        output_dir: the series folder to create.
        model_version: written into SeriesDescription and DerivationDescription.
        derivation_description: DerivationDescription text (default: :func:`derivation_text`).
        overwrite: replace an existing ``output_dir``.
        trained: False for the untrained network: SeriesDescription then says ``UNTRAINED NOT denoised``.

    Returns:
        The written files, in slice order.

    Raises:
        UniPETInputError: shape/header mismatch, non-finite values, bad factor, existing output.
    """
    volume = np.asarray(suv)
    _check_series_input(volume, source_headers, suv_factor)
    written: list[str] = []

    def fill(tmp: Path) -> None:
        files, _ = stage_derived_pet_series(
            volume, source_headers, suv_factor, tmp, model_version, derivation_description, trained
        )
        written.extend(f.name for f in files)

    target = atomic_write_dir(output_dir, fill, overwrite=overwrite)
    logger.info("wrote derived PET series (%d slices) to %s", len(written), target)
    return [target / n for n in written]
