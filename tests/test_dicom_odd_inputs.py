"""Odd clinical PET DICOM that passed silently or with a traceback before (found by probing the SUV tool like a
physicist would): slices off a uniform grid, decimal commas, images without attenuation or decay correction,
injection times in another time zone or disagreeing with each other, per-series tags that differ between slices,
and an enhanced (multi-frame) image whose first error was about its tags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pet_dicom_factory import DOSE_BQ, SERIES_DATE, expected_factor, radiopharm, write_synthetic_series

from conftest import run_python
from scripts.data.dicom_series import DicomSeriesError
from scripts.data.suv import SUVError, read_pet_series

VOLUME = np.random.default_rng(3).uniform(1e3, 2e4, size=(8, 7, 6))


def _series(tmp_path: Path, edit=None, volume: np.ndarray = VOLUME) -> Path:
    folder = tmp_path / "pet"
    write_synthetic_series(folder, volume, edit=edit)
    return folder


def _corrupt(folder: Path, good: str, bad: str, slices: int | None = None) -> None:
    """Rewrite the bytes ``good`` as ``bad`` (the same length) in the slice files, as a faulty exporter writes them
    (pydicom itself refuses to write such a value)."""
    assert len(good) == len(bad)
    files = sorted(folder.glob("*.dcm"))
    for path in files[:slices] if slices else files:
        data = path.read_bytes()
        assert good.encode() in data
        path.write_bytes(data.replace(good.encode(), bad.encode()))


def test_slices_off_a_uniform_grid_are_refused_not_misplaced(tmp_path):
    # 20 slices 3.0 mm apart, then 20 slices 3.7 mm apart: every step passes the 25 % step test, yet a single voxel
    # size would put slices up to 6.8 mm (two slices) away from where they were measured
    z = np.r_[np.arange(20) * 3.0, 57.0 + np.arange(1, 21) * 3.7]
    volume = np.random.default_rng(4).uniform(1e3, 2e4, size=(8, 7, 40))
    folder = _series(tmp_path, lambda ds, k: setattr(ds, "ImagePositionPatient", [-10, 20, float(z[k])]), volume)
    with pytest.raises(
        DicomSeriesError, match=r"not evenly spaced: steps 3\.000-3\.700 mm.*6\.8\d mm from a uniform grid"
    ):
        read_pet_series(folder)


def test_a_small_jitter_is_accepted_and_recorded(tmp_path):
    jitter = np.array([0.0, 0.3, -0.2, 0.25, -0.3, 0.0])  # mm, on 4 mm slices: well under half a step
    folder = _series(
        tmp_path, lambda ds, k: setattr(ds, "ImagePositionPatient", [-10.0, 20.0, 30.0 + 4.0 * k + float(jitter[k])])
    )
    assert 0.2 < read_pet_series(folder).info["max_slice_offset_from_grid_mm"] < 0.4


@pytest.mark.parametrize(
    ("keyword", "good", "bad", "error"),
    [
        ("RescaleSlope", "0.53904101", "0,53904101", r"RescaleSlope '0,53904101' is not a number \(a decimal comma"),
        ("ImagePositionPatient", "39.55", "39;55", r"ImagePositionPatient '\d*39;55' is not a number"),
    ],
)
def test_a_malformed_number_is_one_clear_error(tmp_path, keyword, good, bad, error):
    def edit(ds, k):
        if keyword == "RescaleSlope":
            ds.RescaleSlope = good  # the stored values then decode 0.2 % off: irrelevant, the file is refused
        else:
            ds.ImagePositionPatient = [-10.0, 20.0, float(good) + 100.0 * k]

    folder = _series(tmp_path, edit)
    _corrupt(folder, good, bad, slices=1)
    with pytest.raises(DicomSeriesError, match=error):
        read_pet_series(folder)


def test_a_malformed_weight_is_named_as_malformed_not_missing(tmp_path):
    folder = _series(tmp_path, lambda ds, k: setattr(ds, "PatientWeight", "81.25"))
    _corrupt(folder, "81.25", "81,25")
    with pytest.raises(SUVError, match=r"PatientWeight \(0010,1030\) '81,25' is not a number \(a decimal comma"):
        read_pet_series(folder)


def test_the_suv_command_gives_one_line_and_exit_2_for_a_decimal_comma(tmp_path):
    folder = _series(tmp_path, lambda ds, k: setattr(ds, "RescaleSlope", "0.53904101"))
    _corrupt(folder, "0.53904101", "0,53904101", slices=1)
    out = tmp_path / "out" / "x.nii.gz"
    proc = run_python("-m", "scripts.data.suv", "--dicom_dir", str(folder), "--output", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "decimal comma" in proc.stderr
    assert not out.exists() and not out.with_suffix("").with_suffix(".json").exists()


@pytest.mark.parametrize(
    ("values", "missing"),
    [
        (["ATTN", "SCAT"], "without DECY: the images are not decay corrected"),
        (["DECY", "SCAT"], "without ATTN: the images are not attenuation corrected"),
    ],
)
def test_images_without_attenuation_or_decay_correction_are_refused(tmp_path, values, missing):
    folder = _series(tmp_path, lambda ds, k: setattr(ds, "CorrectedImage", values))
    with pytest.raises(SUVError, match=missing):
        read_pet_series(folder)


def test_an_absent_corrected_image_tag_is_not_evidence_either_way(tmp_path):
    folder = _series(tmp_path, lambda ds, k: delattr(ds, "CorrectedImage"))
    assert read_pet_series(folder).suv_factor == pytest.approx(expected_factor(), rel=1e-6)


def test_an_injection_time_in_another_utc_offset_is_converted_to_the_scanners_clock(tmp_path):
    # the scanner runs on UTC+1 (acquisition 11:00 local); the injection was logged as 09:00 UTC = 10:00 local
    def edit(ds, k):
        ds.TimezoneOffsetFromUTC = "+0100"
        radiopharm(ds).RadiopharmaceuticalStartDateTime = f"{SERIES_DATE}090000+0000"

    series = read_pet_series(_series(tmp_path, edit))
    assert series.info["decay_time_s"] == pytest.approx(3600.0)
    assert series.suv_factor == pytest.approx(expected_factor(decay_s=3600.0), rel=1e-6)
    assert "converted from its UTC offset" in series.info["injection_time_source"]
    # the time tag (10:00, the series' clock) agrees with the converted date-time: nothing to warn about
    assert not any("disagree" in w for w in series.info["warnings"])


def test_both_ends_of_the_uptake_are_put_on_the_series_clock(tmp_path):
    # a scanner writing offsets writes them on both date-times: 10:00 UTC scan, 09:00 UTC injection, on a UTC+1 series
    def edit(ds, k):
        ds.TimezoneOffsetFromUTC = "+0100"
        ds.AcquisitionDateTime = f"{SERIES_DATE}100000+0000"
        radiopharm(ds).RadiopharmaceuticalStartDateTime = f"{SERIES_DATE}090000+0000"

    series = read_pet_series(_series(tmp_path, edit))
    assert series.info["decay_time_s"] == pytest.approx(3600.0)  # the scan's offset was dropped: 0 s, SUV 31 % low


@pytest.mark.parametrize(
    ("start", "decay_s", "warning"),
    [
        # an offset, but the series says nothing of its own clock: one local clock, and the user is told
        (f"{SERIES_DATE}100000+0100", 3600.0, "no TimezoneOffsetFromUTC"),
        # the date-time says 09:00, the time tag 10:00 (the factory's): QIBA uses the date-time, and the user is told
        (f"{SERIES_DATE}090000", 7200.0, "disagree"),
    ],
)
def test_doubtful_injection_times_are_used_as_qiba_says_with_a_warning(tmp_path, start, decay_s, warning):
    series = read_pet_series(
        _series(tmp_path, lambda ds, k: setattr(radiopharm(ds), "RadiopharmaceuticalStartDateTime", start))
    )
    assert series.info["decay_time_s"] == pytest.approx(decay_s)
    assert any(warning in w for w in series.info["warnings"])


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("RadionuclideTotalDose", str(DOSE_BQ / 2)), ("RadiopharmaceuticalStartTime", "093000")],
)
def test_slices_that_disagree_on_dose_or_injection_time_are_refused(tmp_path, keyword, value):
    def edit(ds, k):
        if k >= 3:
            setattr(radiopharm(ds), keyword, value)

    with pytest.raises(SUVError, match=f"disagree on {keyword} in RadiopharmaceuticalInformationSequence"):
        read_pet_series(_series(tmp_path, edit))


def test_an_enhanced_multi_frame_image_is_refused_as_such_first(tmp_path):
    def edit(ds, k):
        ds.NumberOfFrames = 6
        del ds.Units  # an enhanced PET keeps these in functional groups: their absence must not be the message
        del ds.DecayCorrection

    with pytest.raises(DicomSeriesError, match="multi-frame"):
        read_pet_series(_series(tmp_path, edit))


def test_pixel_padding_is_zero_activity_and_said(tmp_path):
    # a row outside the reconstructed field of view, stored as PixelPaddingValue -32768: it decoded to SUV -7.97
    def edit(ds, k):
        stored = np.frombuffer(ds.PixelData, dtype=np.int16).reshape(ds.Rows, ds.Columns).copy()
        if k == 1:
            stored[0, :] = -32768
        ds.PixelData = stored.tobytes()
        ds.PixelPaddingValue = -32768

    series = read_pet_series(_series(tmp_path, edit))
    assert series.info["padding_voxels"] == VOLUME.shape[0]
    assert np.all(series.suv[:, 0, 1] == 0.0) and series.suv.min() >= 0.0
    assert any("PixelPaddingValue" in w for w in series.info["warnings"])


def test_lossy_compressed_pixels_are_warned_about_and_recorded(tmp_path):
    series = read_pet_series(_series(tmp_path, lambda ds, k: setattr(ds, "LossyImageCompression", "01")))
    assert series.info["lossy_image_compression"] == "01"
    assert any("lossy compression" in w for w in series.info["warnings"])


def test_an_overwrite_that_fails_leaves_the_previous_pair_and_a_torn_pair_is_refused(tmp_path, monkeypatch):
    from scripts.data import suv as suv_module
    from scripts.data.suv import SUVOverrides, convert_dicom_to_suv, convert_suv_to_bqml

    folder = _series(tmp_path)
    out = tmp_path / "out" / "x.nii.gz"
    side = out.with_name("x.json")
    convert_dicom_to_suv(folder, out)
    before = out.read_bytes(), side.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # the sidecar's write fails after the new NIfTI was complete: both previous files stay as they were
    with monkeypatch.context() as m:
        m.setattr(suv_module, "atomic_write_json", disk_full)
        with pytest.raises(OSError):
            convert_dicom_to_suv(folder, out, overwrite=True, overrides=SUVOverrides(patient_weight_kg=60.0))
    assert (out.read_bytes(), side.read_bytes()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.json", "x.nii.gz"]  # no temporary left behind

    # a kill between the two renames leaves a new sidecar beside the old volume: refused, not converted wrongly
    other = tmp_path / "other" / "y.nii.gz"
    convert_dicom_to_suv(folder, other, overrides=SUVOverrides(patient_weight_kg=60.0))
    side.write_bytes(other.with_name("y.json").read_bytes())
    with pytest.raises(SUVError, match="nifti_sha256 does not match"):
        convert_suv_to_bqml(out, tmp_path / "bq.nii.gz")
    assert not (tmp_path / "bq.nii.gz").exists()
    convert_suv_to_bqml(other, tmp_path / "bq.nii.gz")  # an intact pair converts


def _strip_part10_header(folder: Path) -> None:
    """Rewrite every slice as a bare implicit-VR dataset (no preamble, no ``DICM``, no file meta), as some older PACS
    and CD exports store them."""
    import pydicom

    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        del ds.file_meta
        pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)


def test_a_series_without_the_part10_header_is_read_not_called_non_dicom(tmp_path):
    folder = _series(tmp_path)
    reference = read_pet_series(folder)
    _strip_part10_header(folder)
    series = read_pet_series(folder)
    np.testing.assert_array_equal(series.suv, reference.suv)
    np.testing.assert_array_equal(series.affine, reference.affine)


def test_inference_discovery_does_not_skip_a_patient_stored_without_the_part10_header(tmp_path):
    from scripts.inference.inputs import _dicom_modality

    folder = _series(tmp_path)
    _strip_part10_header(folder)
    assert _dicom_modality(folder) == "PT"  # a patient folder the discovery must not skip as "no DICOM files"


def test_a_file_that_is_not_dicom_is_still_refused(tmp_path):
    folder = _series(tmp_path)
    (folder / "notes.dcm").write_bytes(b"these are not the slices you are looking for\\n" * 20)
    with pytest.raises(DicomSeriesError, match="notes.dcm is not a DICOM file"):
        read_pet_series(folder)


def test_per_series_tags_written_differently_but_meaning_the_same_are_one_value(tmp_path):
    def edit(ds, k):
        if k % 2:
            radiopharm(ds).RadiopharmaceuticalStartTime = "100000"  # "100000.00" on the others
            radiopharm(ds).RadionuclideTotalDose = "3.0e8"  # "300000000" on the others
            ds.CorrectedImage = ["ATTN", "DECY"]  # ["DECY", "ATTN"] on the others

    assert read_pet_series(_series(tmp_path, edit)).suv_factor == pytest.approx(expected_factor(), rel=1e-6)


def test_a_user_factor_does_not_need_consistent_dose_tags(tmp_path):
    def edit(ds, k):
        if k >= 3:
            radiopharm(ds).RadionuclideTotalDose = str(DOSE_BQ / 2)

    assert read_pet_series(_series(tmp_path, edit), suv_factor=4e-4).suv_factor == pytest.approx(4e-4)


def test_a_failed_volume_rename_puts_the_previous_sidecar_back(tmp_path, monkeypatch):
    import os

    from scripts.common import io as io_module
    from scripts.data.suv import SUVOverrides, convert_dicom_to_suv

    folder = _series(tmp_path)
    out = tmp_path / "out" / "x.nii.gz"
    convert_dicom_to_suv(folder, out)
    before = out.read_bytes(), out.with_name("x.json").read_bytes()
    real_replace = os.replace

    def volume_rename_fails(src, dst):
        if str(dst).endswith(".nii.gz"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(io_module.os, "replace", volume_rename_fails)
        with pytest.raises(OSError):
            convert_dicom_to_suv(folder, out, overwrite=True, overrides=SUVOverrides(patient_weight_kg=60.0))
    assert (out.read_bytes(), out.with_name("x.json").read_bytes()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.json", "x.nii.gz"]
