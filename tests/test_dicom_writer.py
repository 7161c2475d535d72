"""The derived PET DICOM series writer: read back with our own reader, the SUV, its factor and the geometry survive."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pet_dicom_factory as factory
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from pydicom.uid import ExplicitVRLittleEndian

from scripts.common.errors import UniPETInputError
from scripts.data.suv import read_pet_series
from scripts.inference import dicom_writer
from scripts.inference.dicom_writer import (
    INT16_MAX,
    SeriesCheckError,
    SourceSeries,
    quantise_slice,
    write_derived_pet_series,
)
from scripts.inference.inputs import LoadPETd
from scripts.inference.writer import SaveDenoisedd


def _synthetic(tmp_path, shape=(12, 10, 6), seed=0, edit=None):
    """A BQML series (per-slice slopes, oblique orientation) and what our reader makes of it."""
    rng = np.random.default_rng(seed)
    suv = rng.gamma(2.0, 0.8, shape)
    bqml = suv / factory.expected_factor()
    orientation = (0.9848077530, 0.1736481777, 0.0, -0.1736481777, 0.9848077530, 0.0)  # 10 degrees in-plane
    factory.write_synthetic_series(tmp_path / "src", bqml, spacing=(2.0, 3.0, 4.0), orientation=orientation, edit=edit)
    return read_pet_series(tmp_path / "src")


def _denoised(series, rng: np.random.Generator) -> np.ndarray:
    """A plausible output: smoother, with a hot spot far above the source slice max and a few negative voxels."""
    out = (series.suv * 0.8 + 0.1).astype(np.float32)
    out[3, 4, 2] = 66.0
    out[5, 5, 1] = -0.7
    out[:, :, 4] = 0.0  # an empty slice
    out[:, :, 5] += rng.normal(0, 1e-3, out[:, :, 5].shape).astype(np.float32)
    return out


def _quantisation_tolerance(volume: np.ndarray) -> np.ndarray:
    """Per slice: half a slope (max |v| / 32767 / 2) plus float32 rounding."""
    peak = np.abs(volume).max(axis=(0, 1))
    return peak / INT16_MAX * 0.5 * (1 + 1e-6) + 1e-6 * np.maximum(peak, 1.0)


# ------------------------------------------------------------------------------------------- slopes


def test_quantise_slice_uses_full_range_without_clipping():
    values = np.array([[66.0, -3.0], [1e-3, 0.25]])
    stored, slope = quantise_slice(values)
    assert stored.dtype == np.int16 and len(slope) <= 16
    assert int(np.abs(stored).max()) == INT16_MAX  # the peak maps to the top of the range
    assert np.all(np.abs(stored.astype(np.float64) * float(slope) - values) <= 0.5 * float(slope) * (1 + 1e-9))
    assert stored[0, 1] < 0, "negative voxels keep their sign"
    zeros, one = quantise_slice(np.zeros((3, 3)))
    assert one == "1" and not zeros.any()
    with pytest.raises(ValueError):
        quantise_slice(np.array([[np.nan, 1.0]]))


def test_slope_text_rounding_never_pushes_the_peak_out_of_range():
    rng = np.random.default_rng(1)
    for peak in np.concatenate([10.0 ** rng.uniform(-6, 7, 3000), [INT16_MAX * 1.00000000049]]):
        stored, slope = quantise_slice(np.array([[peak, -peak / 3]]))
        assert peak / float(slope) <= INT16_MAX + 1e-9, (peak, slope)
        assert stored[0, 0] == INT16_MAX  # the peak is neither clipped nor wasted
        assert len(slope) <= 16


# ------------------------------------------------------------------------------------------- series


def test_written_series_reads_back_with_same_suv_factor_and_geometry(tmp_path):
    def add_private_and_stats(ds, k):
        ds.add_new(0x00091001, "LO", "vendor scale")  # private: must not survive
        ds.add_new(0x00091000, "LO", "VENDOR")
        ds.SeriesNumber = 7

    series = _synthetic(tmp_path, edit=add_private_and_stats)
    rng = np.random.default_rng(2)
    denoised = _denoised(series, rng)
    files = write_derived_pet_series(
        denoised, series.datasets, series.suv_factor, tmp_path / "out", model_version="9.8.7"
    )
    assert sorted(f.name for f in files) == [f"IM{k:05d}.dcm" for k in range(1, denoised.shape[2] + 1)]
    by_name = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in sorted(files)]
    assert by_name == sorted(by_name), "files are named (and written) in InstanceNumber order"

    back = read_pet_series(tmp_path / "out")
    assert back.suv_factor == series.suv_factor, "the SUV tags must be kept exactly"
    assert back.units == "BQML"
    np.testing.assert_allclose(back.affine, series.affine, atol=1e-6)
    assert back.suv.shape == denoised.shape
    err = np.abs(back.suv.astype(np.float64) - denoised).max(axis=(0, 1))
    assert np.all(err <= _quantisation_tolerance(denoised)), (err, _quantisation_tolerance(denoised))
    assert back.suv.max() == pytest.approx(66.0, rel=1e-4), "hot spot clipped"
    assert back.suv[5, 5, 1] == pytest.approx(-0.7, abs=1e-3), "negative voxel lost"
    assert not back.suv[:, :, 4].any()

    src_uids = {ds.SOPInstanceUID for ds in series.datasets}
    out = [pydicom.dcmread(f) for f in files]
    assert len({ds.SeriesInstanceUID for ds in out}) == 1
    assert out[0].SeriesInstanceUID != series.reference.SeriesInstanceUID
    assert len({ds.SOPInstanceUID for ds in out}) == len(out) and not src_uids & {ds.SOPInstanceUID for ds in out}
    slopes = {ds.RescaleSlope for ds in out}
    assert len(slopes) > 2, "slopes must be per slice"
    for k, (ds, src) in enumerate(zip(out, series.datasets)):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY"]  # PET Image module: value 2 is PRIMARY (dciodvfy)
        assert (
            "UniPET" in ds.SeriesDescription and "9.8.7" in ds.SeriesDescription and "SYNTH PET" in ds.SeriesDescription
        )
        assert "UniPET" in ds.DerivationDescription and "9.8.7" in ds.DerivationDescription
        assert ds.SeriesNumber == 1007
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16
        assert float(ds.RescaleIntercept) == 0.0
        for keyword in (
            "PatientName",
            "PatientID",
            "StudyInstanceUID",
            "FrameOfReferenceUID",
            "Units",
            "DecayCorrection",
            "PatientWeight",
            "SeriesDate",
            "SeriesTime",
            "AcquisitionTime",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "SliceThickness",
            "InstanceNumber",
        ):
            assert ds.get(keyword) == src.get(keyword), keyword
        assert ds.RadiopharmaceuticalInformationSequence == src.RadiopharmaceuticalInformationSequence
        assert not any(elem.tag.is_private for elem in ds), "private tags must be removed"


def _loaded_for_the_writer(tmp_path, shape=(8, 7, 9)):
    """A DICOM input as inference.json's writer receives it: LoadPETd's entries plus a denoised ``pred``."""
    series = _synthetic(tmp_path, shape=shape, seed=3)  # the factory shuffles file names
    by_file_name = [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in sorted((tmp_path / "src").iterdir())
    ]
    assert by_file_name != [d.SOPInstanceUID for d in series.datasets], "the test needs file names out of slice order"
    d = LoadPETd("image")({"image": str(tmp_path / "src"), "name": "pet", "kind": "dicom"})
    carried = d["source_series"]
    assert isinstance(carried, SourceSeries) and "PixelData" not in carried.headers[0]
    assert [h.SOPInstanceUID for h in carried.headers] == [h.SOPInstanceUID for h in series.datasets]
    image = d["image"]
    denoised = _denoised(series, np.random.default_rng(4))
    d["pred"] = MetaTensor(torch.from_numpy(denoised[None]), affine=image.affine.clone())
    return d, series, denoised


def _dicom_writer(out):
    return SaveDenoisedd(output_dir=out, output_format="both", model_info={"trained": True}, model_version="0.0.test")


def test_inference_writer_uses_the_headers_the_loader_carried(tmp_path):
    """The writer derives the series from LoadPETd's sorted headers and factor: it never reads the source folder
    again (it is gone here), and the series reads back as the denoised volume, slice k from source slice k."""
    d, series, denoised = _loaded_for_the_writer(tmp_path)
    shutil.rmtree(tmp_path / "src")
    _dicom_writer(tmp_path / "out")(d)
    back = read_pet_series(tmp_path / "out" / "pet_denoised_dicom")
    assert back.suv_factor == pytest.approx(series.suv_factor, rel=1e-12)
    assert np.all(np.abs(back.suv - denoised).max(axis=(0, 1)) <= _quantisation_tolerance(denoised))
    refs = [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in back.datasets]
    assert refs == [h.SOPInstanceUID for h in series.datasets]
    sidecar = json.loads((tmp_path / "out" / "pet_denoised.json").read_text())
    assert sidecar["suv_factor"] == series.suv_factor and sidecar["suv_details"] == series.suv_details


def test_read_back_mismatch_is_an_error_and_nothing_is_published(tmp_path):
    """The carried slice order is honoured as given (no second sort): an order that does not match the volume
    writes a scrambled series, which the read-back catches before anything is published."""
    d, series, _ = _loaded_for_the_writer(tmp_path)
    d["source_series"] = SourceSeries(series.datasets[::-1], series.suv_factor, series.suv_details)
    with pytest.raises(SeriesCheckError, match="reads back .* SUV off the float volume"):
        _dicom_writer(tmp_path / "out")(d)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".unipet")) == []
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name or p.name.startswith(".pet")]


def test_real_series_slices_keep_their_suv_factor(tmp_path, real_pet_dir):
    """The real scanner's tags (implicit VR, vendor layout) survive the rewrite: same SUV factor, same geometry."""
    factory.copy_real_slices(real_pet_dir, tmp_path / "src", count=5, first=120)
    series = read_pet_series(tmp_path / "src")
    denoised = series.suv * 0.9
    write_derived_pet_series(denoised, series.datasets, series.suv_factor, tmp_path / "out")
    back = read_pet_series(tmp_path / "out")
    assert back.suv_factor == series.suv_factor
    np.testing.assert_allclose(back.affine, series.affine, atol=1e-6)
    err = np.abs(back.suv - denoised).max(axis=(0, 1))
    assert np.all(err <= _quantisation_tolerance(denoised))


# -------------------------------------------------------------------------------------- atomicity


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_failure_mid_series_leaves_nothing(tmp_path, monkeypatch):
    series = _synthetic(tmp_path, shape=(6, 5, 5))
    real = dicom_writer._derived_slice
    calls = []

    def failing(src, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(src, *args, **kwargs)

    monkeypatch.setattr(dicom_writer, "_derived_slice", failing)
    (tmp_path / "outdir").mkdir()
    with pytest.raises(OSError, match="disk full"):
        write_derived_pet_series(series.suv, series.datasets, series.suv_factor, tmp_path / "outdir" / "den")
    assert not (tmp_path / "outdir" / "den").exists()
    assert _leftovers(tmp_path / "outdir") == [], "temporary folder left behind"


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    series = _synthetic(tmp_path, shape=(6, 5, 4))
    target = tmp_path / "den"
    first = write_derived_pet_series(series.suv, series.datasets, series.suv_factor, target)
    uid = pydicom.dcmread(first[0]).SeriesInstanceUID
    with pytest.raises(UniPETInputError, match="already exists"):
        write_derived_pet_series(series.suv, series.datasets, series.suv_factor, target)
    assert pydicom.dcmread(first[0]).SeriesInstanceUID == uid
    second = write_derived_pet_series(series.suv * 2, series.datasets, series.suv_factor, target, overwrite=True)
    assert pydicom.dcmread(second[0]).SeriesInstanceUID != uid
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in second)
    assert _leftovers(tmp_path) == []
    np.testing.assert_allclose(read_pet_series(target).suv, series.suv * 2, rtol=1e-4, atol=1e-4)


def test_mismatched_volume_is_refused(tmp_path):
    series = _synthetic(tmp_path, shape=(6, 5, 4))
    with pytest.raises(UniPETInputError, match="slices"):
        write_derived_pet_series(series.suv[:, :, :3], series.datasets, series.suv_factor, tmp_path / "a")
    with pytest.raises(UniPETInputError, match="rows x columns"):
        write_derived_pet_series(series.suv.transpose(1, 0, 2), series.datasets, series.suv_factor, tmp_path / "b")
    bad = series.suv.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(UniPETInputError, match="NaN"):
        write_derived_pet_series(bad, series.datasets, series.suv_factor, tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in "abc")
