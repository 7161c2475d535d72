"""SUV safety (issue 12): injection time after the scan with time-only tags (finding 1), physically
impossible SUV tags and results (finding 4), and JPEG Lossless series.

Each case here passed silently before the fix: a 10-minute clock skew gave a 6268x SUV factor, a weight in
grams or a dose in MBq gave SUVmax in the tens of thousands or millions, all with exit 0 and outputs written.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pet_dicom_factory import (
    PATIENT_ID,
    copy_real_slices,
    expected_factor,
    make_slice,
    radiopharm,
    transcode_jpeg_lossless,
    write_synthetic_series,
)
from pydicom.uid import generate_uid

from conftest import run_python
from scripts.data.io import save_nifti
from scripts.data.suv import SUVError, SUVOverrides, check_body_suv, compute_suv_factor, read_pet_series
from scripts.inference.inputs import prepare_datalist

# A body-like synthetic PET in Bq/mL: SUV 0.2-2 with the default tags (factor ~3.9e-4), median ~0.4.
BQML = np.random.default_rng(12).uniform(500.0, 5000.0, size=(10, 9, 6))
REAL_FACTOR = 2.429e-4  # the real series' SUV factor from its own tags (71 kg, 388.8 MBq, 45 min)


def _digest(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _cli(bundle_root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_python(
        "-m", "scripts.data.suv", *args, cwd=bundle_root, timeout=120, PYTHONPATH=str(bundle_root), OMP_NUM_THREADS="1"
    )


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stdout + res.stderr and PATIENT_ID not in res.stdout + res.stderr
    return lines[0]


def _header(**tags) -> pydicom.Dataset:
    ds, _ = make_slice(
        np.ones((4, 3)), (0, 0, 0), (1, 0, 0, 0, 1, 0), (1, 1), 1, generate_uid(), generate_uid(), generate_uid()
    )
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def _set_rp(keyword: str, value: str):
    return lambda ds, k=0: setattr(radiopharm(ds), keyword, value)


def _set(keyword: str, value: str):
    return lambda ds, k=0: setattr(ds, keyword, value)


# ------------------------------------------------------------------------ finding 1: injection time


def test_real_series_injection_ten_minutes_after_series_time_is_refused_and_override_works(
    tmp_path, real_pet_dir, bundle_root
):
    """The issue's case: the real GE series (time-only tags), injection 10 min after SeriesTime 11:20:11."""
    src = tmp_path / "d"
    copy_real_slices(
        real_pet_dir, src, count=3, edit=lambda ds: setattr(radiopharm(ds), "RadiopharmaceuticalStartTime", "113011.00")
    )
    before = _digest(src)
    out = tmp_path / "o" / "suv.nii.gz"
    line = _one_line_error(_cli(bundle_root, "--dicom_dir", str(src), "--output", str(out)))
    for needle in (
        "RadiopharmaceuticalStartTime 11:30:11",
        "11:20:11",
        "10 min after the scan",
        "never assumed",
        "--injection_time",
        "--injection_datetime",
    ):
        assert needle in line, line
    assert not out.parent.exists() and _digest(src) == before

    # The named fix: the real injection time (10:35:00, the original tag) gives the original factor.
    res = _cli(bundle_root, "--dicom_dir", str(src), "--output", str(out), "--injection_time", "103500")
    assert res.returncode == 0, res.stderr
    meta = json.loads(out.with_suffix("").with_suffix(".json").read_text())
    assert meta["suv_factor"] == pytest.approx(REAL_FACTOR, rel=1e-3)
    assert meta["injection_time_source"].startswith("--injection_time") and meta["overrides"] == {
        "injection_time": "103500"
    }


def test_time_only_rules_and_dated_rules():
    # An injection "the day before" is never assumed from times of day, however close to midnight.
    ds = _header(SeriesTime="000500", AcquisitionTime="000500")
    radiopharm(ds).RadiopharmaceuticalStartTime = "235500"
    with pytest.raises(SUVError, match=r"23:55:00 vs scan time SeriesDate/SeriesTime 00:05:00.*never assumed"):
        compute_suv_factor(ds)
    # A dated midnight crossing is fine.
    radiopharm(ds).RadiopharmaceuticalStartDateTime = "20240101235500"
    assert compute_suv_factor(ds)[1]["decay_time_s"] == pytest.approx(600.0)
    # Time-only uptake over 12 h: a wrong clock or day, refused (13 h here).
    ds = _header(SeriesTime="230000", AcquisitionTime="230000")
    with pytest.raises(SUVError, match=r"13.0 h between injection and scan with times of day only"):
        compute_suv_factor(ds)
    # ... unless the user gives the date-time, when only the half-life rule applies (13 h F-18 = 7.1 half-lives).
    assert compute_suv_factor(ds, overrides=SUVOverrides(injection_datetime="20240102100000"))[1][
        "decay_time_s"
    ] == pytest.approx(46800.0)
    # Any uptake over 10 half-lives (49 h of F-18: 2e-8 of the activity left) is refused, dated or not.
    ds = _header()
    radiopharm(ds).RadiopharmaceuticalStartDateTime = "20231231100000"
    with pytest.raises(SUVError, match=r"49.0 h between injection and scan is 26.8 half-lives"):
        compute_suv_factor(ds)
    # A long-lived tracer (Zr-89, 78.4 h) imaged 3 days later is real: kept, with a warning.
    ds = _header(SeriesDate="20240104", AcquisitionDate="20240104")
    radiopharm(ds).RadiopharmaceuticalStartDateTime = "20240101110000"
    radiopharm(ds).RadionuclideHalfLife = "282240"
    factor, info = compute_suv_factor(ds)
    assert info["decay_time_s"] == pytest.approx(3 * 86400.0) and any("72.0 h" in w for w in info["warnings"])
    # Bad override text is one clear error.
    with pytest.raises(SUVError, match=r"--injection_time '25h' is not a time of day"):
        compute_suv_factor(_header(), overrides=SUVOverrides(injection_time="25h"))


def test_inference_refuses_a_series_with_injection_after_scan(tmp_path):
    """Same rule in the inference loader: refused while checking inputs, before anything is written."""
    write_synthetic_series(tmp_path / "in" / "pet", BQML, edit=_set_rp("RadiopharmaceuticalStartTime", "111000.00"))
    with pytest.raises(
        SUVError,
        match=r"11:10:00 vs scan time SeriesDate/SeriesTime 11:00:00.*--injection_time.*python -m scripts.data.suv",
    ):
        prepare_datalist(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- finding 4: impossible SUV tags


IMPOSSIBLE = {
    # case: (edit, what the one line must name, the override that fixes it, the factor it then gives)
    "weight in grams": (
        _set("PatientWeight", "80000"),
        ["PatientWeight (0010,1030) 80000 kg", "grams?", "--patient_weight"],
        ["--patient_weight", "80"],
        expected_factor(),
    ),
    "dose in MBq": (
        _set_rp("RadionuclideTotalDose", "300"),
        ["RadionuclideTotalDose (0018,1074) 300 Bq", "MBq", "--injected_dose"],
        ["--injected_dose", "3e8"],
        expected_factor(),
    ),
    "dose in kBq": (
        _set_rp("RadionuclideTotalDose", "300000"),
        ["RadionuclideTotalDose (0018,1074) 3e+05 Bq", "--injected_dose"],
        ["--injected_dose", "3e8"],
        expected_factor(),
    ),
    "weight in tonnes": (
        _set("PatientWeight", "0.08"),
        ["PatientWeight (0010,1030) 0.08 kg", "--patient_weight"],
        ["--patient_weight", "80"],
        expected_factor(),
    ),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_impossible_suv_tags_are_refused_with_tag_and_override_named(tmp_path, bundle_root, case):
    edit, needles, fix, factor = IMPOSSIBLE[case]
    write_synthetic_series(tmp_path / "d", BQML, edit=edit)
    before = _digest(tmp_path / "d")
    out = tmp_path / "o" / "suv.nii.gz"
    line = _one_line_error(_cli(bundle_root, "--dicom_dir", str(tmp_path / "d"), "--output", str(out)))
    for needle in needles + ["--allow_implausible_suv"]:
        assert needle in line, line
    assert not out.parent.exists() and _digest(tmp_path / "d") == before
    res = _cli(bundle_root, "--dicom_dir", str(tmp_path / "d"), "--output", str(out), *fix)
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "o" / "suv.json").read_text())
    assert meta["suv_factor"] == pytest.approx(factor, rel=1e-6) and meta["warnings"] == []
    assert 0.2 < meta["body_median_suv"] < 2.0


@pytest.mark.parametrize(
    "tag, value, needle",
    [
        ("PatientWeight", "71000", "PatientWeight (0010,1030) 71000 kg is implausible"),
        ("rp.RadionuclideTotalDose", "388.777472", "RadionuclideTotalDose (0018,1074) 388.8 Bq is implausibly small"),
    ],
)
def test_real_series_with_weight_in_grams_or_dose_in_mbq_is_refused(
    tmp_path, real_pet_dir, bundle_root, tag, value, needle
):
    """The issue's cases on the real series: SUVmax 63,170 and 6e7, exit 0, outputs written before the fix."""
    target = (lambda ds: radiopharm(ds)) if tag.startswith("rp.") else (lambda ds: ds)
    copy_real_slices(
        real_pet_dir, tmp_path / "d", count=3, edit=lambda ds: setattr(target(ds), tag.removeprefix("rp."), value)
    )
    before = _digest(tmp_path / "d")
    out = tmp_path / "o" / "suv.nii.gz"
    line = _one_line_error(_cli(bundle_root, "--dicom_dir", str(tmp_path / "d"), "--output", str(out)))
    assert needle in line and "--allow_implausible_suv" in line, line
    assert not out.parent.exists() and _digest(tmp_path / "d") == before


def test_escape_hatch_keeps_an_implausible_series_with_warnings(tmp_path, bundle_root):
    write_synthetic_series(tmp_path / "d", BQML, edit=_set("PatientWeight", "80000"))
    out = tmp_path / "o" / "suv.nii.gz"
    res = _cli(bundle_root, "--dicom_dir", str(tmp_path / "d"), "--output", str(out), "--allow_implausible_suv", "true")
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "o" / "suv.json").read_text())
    assert meta["suv_factor"] == pytest.approx(expected_factor(weight_kg=80000.0), rel=1e-6)
    assert meta["overrides"] == {"allow_implausible_suv": True}
    assert any("PatientWeight" in w and "kept" in w for w in meta["warnings"])
    assert any("median SUV of the body" in w for w in meta["warnings"])  # ~430: also kept, also flagged
    assert "WARNING" in res.stdout
    # An override that contradicts --suv_factor is refused, not silently dropped.
    line = _one_line_error(
        _cli(
            bundle_root,
            "--dicom_dir",
            str(tmp_path / "d"),
            "--output",
            str(tmp_path / "x.nii.gz"),
            "--suv_factor",
            "1e-4",
            "--patient_weight",
            "80",
        )
    )
    assert "contradict" in line


def test_body_median_suv_is_checked_for_gml_series_user_factors_and_nifti_inputs(tmp_path):
    # A "GML" (already SUV) series that holds Bq/mL: no tag to check, the body median gives it away.
    write_synthetic_series(tmp_path / "gml", BQML, edit=_set("Units", "GML"))
    with pytest.raises(SUVError, match=r"Units GML.*median SUV of the body is \d+.*outside 0.05-20"):
        read_pet_series(tmp_path / "gml")
    # A user factor 1000x too large.
    write_synthetic_series(tmp_path / "bq", BQML)
    with pytest.raises(SUVError, match=r"--suv_factor 0.3895.*median SUV of the body is 1049"):
        read_pet_series(tmp_path / "bq", suv_factor=expected_factor() * 1000)
    # Inference: a NIfTI input holding Bq/mL (or an SUV from a weight in grams) is refused before any output.
    data = tmp_path / "in"
    data.mkdir()
    save_nifti(BQML.astype(np.float32), np.diag([4.0, 4.0, 4.0, 1.0]), data / "scan.nii.gz")
    with pytest.raises(
        SUVError, match=r"scan.nii.gz: the median SUV of the body is \d+.*convert Bq/mL with python -m scripts.data.suv"
    ):
        prepare_datalist(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The same volume in SUV passes, and so do empty and all-negative volumes (nothing to judge here).
    assert check_body_suv(BQML * expected_factor(), "x")[0] == pytest.approx(
        np.median(BQML * expected_factor()), rel=0.05
    )
    assert check_body_suv(np.zeros((4, 4, 4)), "x") == (None, [])
    assert check_body_suv(-np.ones((4, 4, 4)), "x") == (None, [])
    # The body median ignores air and a single hot voxel: a body in a large empty FOV with a bladder.
    fov = np.zeros((40, 40, 20))
    fov[10:30, 12:28, 2:18] = np.random.default_rng(3).gamma(4.0, 0.2, size=(20, 16, 16))
    fov[20, 20, 10] = 500.0
    median, _ = check_body_suv(fov, "x")
    assert 0.6 < median < 1.0
    # A hot organ filling much of a small field of view (a full bladder at SUV 100 in a pelvic scan, 6 % of
    # the voxels) must not be taken for the body.
    pelvis = np.full((30, 30, 20), 0.01)
    pelvis[3:27, 3:27, :] = np.random.default_rng(4).gamma(4.0, 0.25, size=(24, 24, 20))
    pelvis[10:20, 10:20, 5:16] = 100.0
    median, _ = check_body_suv(pelvis, "x")
    assert 0.8 < median < 2.0


def test_inference_refuses_a_dicom_series_with_weight_in_grams(tmp_path):
    write_synthetic_series(tmp_path / "in" / "pet", BQML, edit=_set("PatientWeight", "80000"))
    with pytest.raises(
        SUVError, match=r"PatientWeight \(0010,1030\) 80000 kg is implausible.*python -m scripts.data.suv"
    ):
        prepare_datalist(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_real_series_passes_every_check(real_series_suv):
    info = real_series_suv.info
    assert info["suv_factor"] == pytest.approx(REAL_FACTOR, rel=1e-3)
    assert info["warnings"] == []
    assert 0.4 < info["body_median_suv"] < 0.9  # 0.58 measured: FDG soft tissue


@pytest.fixture(scope="module")
def real_series_suv(real_pet_dir):
    return read_pet_series(real_pet_dir)


# ------------------------------------------------------------------------------ JPEG Lossless input


def test_jpeg_lossless_real_slices_read_to_the_same_values(tmp_path, real_pet_dir):
    plain = copy_real_slices(real_pet_dir, tmp_path / "plain", count=4)
    packed = transcode_jpeg_lossless(plain, tmp_path / "jpeg")
    assert (
        str(pydicom.dcmread(packed[0], stop_before_pixels=True).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"
    )
    assert sum(p.stat().st_size for p in packed) < 0.8 * sum(p.stat().st_size for p in plain)  # really compressed
    a, b = read_pet_series(tmp_path / "plain"), read_pet_series(tmp_path / "jpeg")
    np.testing.assert_array_equal(b.suv, a.suv)
    np.testing.assert_array_equal(b.affine, a.affine)
    assert b.suv_factor == a.suv_factor


def test_jpeg_lossless_synthetic_signed_values_and_per_slice_slopes(tmp_path):
    volume = BQML.copy()
    volume[0, :, :] = -400.0  # negative voxels (OSEM undershoot) go through the signed path of the codec
    files, decoded, _ = write_synthetic_series(tmp_path / "plain", volume, intercepts=[0.0, 5.0, 0.0, -3.0, 0.0, 0.0])
    transcode_jpeg_lossless(files, tmp_path / "jpeg")
    series = read_pet_series(tmp_path / "jpeg")
    np.testing.assert_allclose(series.suv, (decoded * expected_factor()).astype(np.float32), rtol=1e-6, atol=1e-7)
    assert len(set(series.rescale_slopes.tolist())) > 1 and series.suv.min() < 0


def test_a_date_only_datetime_is_never_taken_as_midnight():
    """DICOM DT may hold a date alone; taking "20240102" as 00:00 decays the dose over hours that never passed."""
    ds = _header()
    reference, info = compute_suv_factor(ds)  # the factory's time-only tags: the right answer
    assert "RadiopharmaceuticalStartTime" in info["injection_time_source"]
    # a date-only StartDateTime: its date with the StartTime of day, the same factor (was 38x too large)
    radiopharm(ds).RadiopharmaceuticalStartDateTime = ds.SeriesDate
    factor, info = compute_suv_factor(ds)
    assert factor == pytest.approx(reference, rel=1e-9)
    assert "date of RadiopharmaceuticalStartDateTime" in info["injection_time_source"]
    # hour precision only is not a time of day either
    radiopharm(ds).RadiopharmaceuticalStartDateTime = ds.SeriesDate + "09"
    assert compute_suv_factor(ds)[0] == pytest.approx(reference, rel=1e-9)
    # a date-only StartDateTime and no StartTime: refused, never midnight
    del radiopharm(ds).RadiopharmaceuticalStartTime
    with pytest.raises(SUVError, match=r"injection time missing.*--injection_datetime"):
        compute_suv_factor(ds)
    # the user's override needs hours and minutes too
    with pytest.raises(SUVError, match=r"--injection_datetime '20240102' is not a date-time with hours and minutes"):
        compute_suv_factor(ds, overrides=SUVOverrides(injection_datetime="20240102"))
    # a date-only AcquisitionDateTime falls back to AcquisitionDate/AcquisitionTime (not midnight)
    ds = _header(AcquisitionDateTime="20240102")
    assert compute_suv_factor(ds)[0] == pytest.approx(reference, rel=1e-9)
