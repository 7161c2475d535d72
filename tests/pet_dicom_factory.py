"""Write small PET/CT DICOM series for tests: synthetic ones with known geometry and values, or copies
of a few slices of the real series with edited tags.

Every synthetic slice stores int16 pixels with its own RescaleSlope (and optionally RescaleIntercept),
as PET scanners do; :func:`write_synthetic_series` returns the exact values a reader must recover.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid

PATIENT_NAME = "SECRETNAME^JANE"
PATIENT_ID = "SECRETID4711"

# Defaults of the synthetic series, chosen so the SUV factor is easy to compute by hand.
WEIGHT_KG = 80.0
DOSE_BQ = 3.0e8
HALF_LIFE_S = 6586.2
INJECTION_TIME = "100000.00"
SERIES_TIME = "110000.00"  # 3600 s after injection
SERIES_DATE = "20240102"


def expected_factor(
    weight_kg: float = WEIGHT_KG, dose_bq: float = DOSE_BQ, decay_s: float = 3600.0, half_life_s: float = HALF_LIFE_S
) -> float:
    """SUVbw factor computed independently of the code under test."""
    return weight_kg * 1000.0 / (dose_bq * np.exp(-np.log(2.0) * decay_s / half_life_s))


def _ds_str(value: float) -> str:
    """DS values are at most 16 characters."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.8e}"


def make_slice(
    values: np.ndarray,
    position_lps: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    instance: int,
    series_uid: str,
    study_uid: str,
    frame_uid: str,
    modality: str = "PT",
    intercept: float = 0.0,
) -> tuple[Dataset, np.ndarray]:
    """One slice. ``values`` is (rows, columns) float; returns (dataset, decoded float values)."""
    values = np.asarray(values, dtype=np.float64)
    span = float(np.max(np.abs(values - intercept)))
    slope = float(_ds_str(span / 32000.0)) if span > 0 else 1.0
    stored = np.clip(np.round((values - intercept) / slope), -32768, 32767).astype(np.int16)
    decoded = stored.astype(np.float64) * slope + float(_ds_str(intercept))

    sop_class = PositronEmissionTomographyImageStorage if modality == "PT" else CTImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.SeriesNumber = 3 if modality == "PT" else 2
    ds.InstanceNumber = instance
    ds.SeriesDescription = "SYNTH PET" if modality == "PT" else "SYNTH CT"
    ds.Manufacturer = "UNIPET TEST"
    ds.ManufacturerModelName = "Synthetic"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = SERIES_DATE
    ds.SeriesTime = ds.AcquisitionTime = SERIES_TIME
    ds.ImagePositionPatient = [_ds_str(v) for v in position_lps]
    ds.ImageOrientationPatient = [_ds_str(v) for v in orientation]
    ds.PixelSpacing = [_ds_str(v) for v in pixel_spacing]
    ds.SliceThickness = "2.0"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = _ds_str(slope)
    ds.RescaleIntercept = _ds_str(intercept)
    ds.PixelData = stored.tobytes()
    if modality == "PT":
        ds.Units = "BQML"
        ds.DecayCorrection = "START"
        ds.CorrectedImage = ["DECY", "ATTN"]
        ds.PatientWeight = _ds_str(WEIGHT_KG)
        rp = Dataset()
        rp.Radiopharmaceutical = "FDG"
        rp.RadiopharmaceuticalStartTime = INJECTION_TIME
        rp.RadionuclideTotalDose = _ds_str(DOSE_BQ)
        rp.RadionuclideHalfLife = _ds_str(HALF_LIFE_S)
        ds.RadiopharmaceuticalInformationSequence = DicomSequence([rp])
    return ds, decoded


def write_synthetic_series(
    folder: Path,
    volume: np.ndarray,
    spacing: Sequence[float] = (2.0, 3.0, 4.0),
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin_lps: Sequence[float] = (-10.0, 20.0, 30.0),
    modality: str = "PT",
    intercepts: Sequence[float] | None = None,
    edit: Callable[[Dataset, int], None] | None = None,
    seed: int = 0,
) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Write ``volume`` (X, Y, Z) = (column, row, slice) as one series, files named in a shuffled order.

    Args:
        spacing: (column spacing, row spacing, slice step) in mm.
        orientation: ImageOrientationPatient (row direction, column direction), LPS.
        origin_lps: ImagePositionPatient of slice k = 0.
        intercepts: per-slice RescaleIntercept (default 0).
        edit: called as ``edit(ds, k)`` before each slice is saved.

    Returns:
        (files in slice order k, decoded volume (X, Y, Z) the reader must return, expected RAS affine).
    """
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(orientation, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    origin = np.asarray(origin_lps, dtype=np.float64)
    uids = generate_uid(), generate_uid(), generate_uid()
    nz = volume.shape[2]
    names = np.random.default_rng(seed).permutation(nz)  # file order must not be slice order
    decoded = np.empty(volume.shape, dtype=np.float64)
    files: list[Path] = []
    for k in range(nz):
        position = origin + k * spacing[2] * normal
        ds, dec = make_slice(
            volume[:, :, k].T,
            position,
            iop,
            (spacing[1], spacing[0]),
            int(names[k]) + 1,
            *uids,
            modality=modality,
            intercept=0.0 if intercepts is None else float(intercepts[k]),
        )
        if edit is not None:
            edit(ds, k)
        path = folder / f"img{names[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        decoded[:, :, k] = dec.T
        files.append(path)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[0]
    lps[:3, 1] = col_dir * spacing[1]
    lps[:3, 2] = normal * spacing[2]
    lps[:3, 3] = origin
    return files, decoded, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def copy_real_slices(
    src: Path, dst: Path, count: int = 5, first: int = 120, edit: Callable[[Dataset], None] | None = None
) -> list[Path]:
    """Copy ``count`` consecutive slices (by InstanceNumber-ordered file name) of the real series,
    applying ``edit(ds)`` to each (then saved with pydicom) or copying the bytes when ``edit`` is None."""
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.dcm"))[first : first + count]
    out = []
    for f in files:
        target = dst / f.name
        if edit is None:
            shutil.copyfile(f, target)
        else:
            ds = pydicom.dcmread(f)
            edit(ds)
            ds.save_as(target)
        out.append(target)
    return out


def radiopharm(ds: Dataset) -> Dataset:
    """The first RadiopharmaceuticalInformationSequence item (for edits)."""
    return ds.RadiopharmaceuticalInformationSequence[0]


def transcode_jpeg_lossless(files: Sequence[Path], dst: Path) -> list[Path]:
    """Write copies of ``files`` in JPEG Lossless (Process 14, Selection Value 1: transfer syntax
    1.2.840.10008.1.2.4.70, the usual PACS archive syntax) into ``dst``, with GDCM (a pinned requirement)."""
    import gdcm

    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(f))
        if not reader.Read():
            raise RuntimeError(f"GDCM cannot read {f}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"GDCM cannot encode {f} as JPEG Lossless")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst / f.name))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError(f"GDCM cannot write {dst / f.name}")
        out.append(dst / f.name)
    return out
