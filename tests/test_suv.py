"""PET DICOM -> SUV: physics, geometry (vs nibabel, MONAI and ITK), the real series, bad input and the CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pet_dicom_factory import (
    DOSE_BQ,
    PATIENT_ID,
    PATIENT_NAME,
    WEIGHT_KG,
    copy_real_slices,
    expected_factor,
    make_slice,
    radiopharm,
    write_synthetic_series,
)
from pydicom.uid import generate_uid

from conftest import run_python
from scripts.common.errors import UniPETInputError
from scripts.data.dicom_series import DicomSeriesError
from scripts.data.suv import (
    SUVError,
    SUVOverrides,
    bqml_to_suv,
    compute_suv_factor,
    convert_dicom_to_suv,
    convert_suv_to_bqml,
    read_pet_series,
    suv_to_bqml,
)

RNG_SEED = 1234


def _one_slice(**tags) -> pydicom.Dataset:
    ds, _ = make_slice(
        np.ones((4, 3)), (0, 0, 0), (1, 0, 0, 0, 1, 0), (1, 1), 1, generate_uid(), generate_uid(), generate_uid()
    )
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------ physics


def test_start_decays_dose_from_injection_to_series_time():
    factor, info = compute_suv_factor(_one_slice())
    assert factor == pytest.approx(expected_factor(), rel=1e-9)
    assert info["decay_time_s"] == pytest.approx(3600.0)
    assert info["reference_time_source"] == "SeriesDate/SeriesTime"
    assert info["decayed_dose_bq"] == pytest.approx(DOSE_BQ * 0.5 ** (3600 / 6586.2))


def test_admin_means_no_decay_and_needs_no_times():
    ds = _one_slice(DecayCorrection="ADMIN")
    del radiopharm(ds).RadiopharmaceuticalStartTime
    del ds.SeriesTime
    factor, info = compute_suv_factor(ds)
    assert factor == pytest.approx(WEIGHT_KG * 1000 / DOSE_BQ, rel=1e-12)
    assert info["decay_factor"] == 1.0


def test_decay_correction_none_is_refused():
    with pytest.raises(SUVError, match=r"DecayCorrection is NONE.*--suv_factor"):
        compute_suv_factor(_one_slice(DecayCorrection="NONE"))


def test_start_datetime_preferred_and_midnight_crossing():
    # Full date-time wins over the time-only tag (which here would give a different, wrong decay).
    ds = _one_slice(SeriesDate="20240102", SeriesTime="003000", AcquisitionDate="20240102", AcquisitionTime="003000")
    radiopharm(ds).RadiopharmaceuticalStartDateTime = "20240101233000.00+0100"
    radiopharm(ds).RadiopharmaceuticalStartTime = "000000"
    factor, info = compute_suv_factor(ds)
    assert info["decay_time_s"] == pytest.approx(3600.0)
    assert "StartDateTime" in info["injection_time_source"]
    assert factor == pytest.approx(expected_factor(), rel=1e-9)
    # Time only: 23:30 for a scan at 00:30 may be the day before, or a clock ahead: never guessed (issue 12,
    # finding 1); the user's --injection_datetime settles it.
    del radiopharm(ds).RadiopharmaceuticalStartDateTime
    radiopharm(ds).RadiopharmaceuticalStartTime = "233000"
    with pytest.raises(SUVError, match=r"23:30:00 vs scan time .* 00:30:00.*never assumed.*--injection_datetime"):
        compute_suv_factor(ds)
    factor, info = compute_suv_factor(ds, overrides=SUVOverrides(injection_datetime="20240101233000"))
    assert info["decay_time_s"] == pytest.approx(3600.0)
    assert info["injection_time_source"] == "--injection_datetime (user)"
    assert info["injection_datetime"].startswith("2024-01-01T23:30")
    assert factor == pytest.approx(expected_factor(), rel=1e-9)


def test_earliest_acquisition_time_used_when_before_series_time_or_series_time_missing():
    early = _one_slice(SeriesTime="120000", AcquisitionTime="110000")
    late = _one_slice(SeriesTime="120000", AcquisitionTime="113000")
    factor, info = compute_suv_factor(late, slices=[late, early])
    assert info["decay_time_s"] == pytest.approx(3600.0)
    assert "earliest AcquisitionDate" in info["reference_time_source"]
    assert factor == pytest.approx(expected_factor(), rel=1e-9)
    del late.SeriesTime
    _, info = compute_suv_factor(late, slices=[late])
    assert info["decay_time_s"] == pytest.approx(5400.0)
    assert "SeriesTime missing" in info["reference_time_source"]


def test_injection_after_scan_is_refused():
    ds = _one_slice()
    radiopharm(ds).RadiopharmaceuticalStartDateTime = "20240102120000"
    with pytest.raises(SUVError, match="after the scan reference time"):
        compute_suv_factor(ds)


def test_units_gml_cnts_and_overrides():
    assert compute_suv_factor(_one_slice(Units="GML"))[0] == 1.0
    assert compute_suv_factor(_one_slice(), units="SUV")[0] == 1.0  # --units SUV: pixels already SUV
    with pytest.raises(SUVError, match=r"Units CNTS.*--suv_factor"):
        compute_suv_factor(_one_slice(Units="CNTS"))
    factor, info = compute_suv_factor(_one_slice(Units="CNTS"), suv_factor=2.5e-4)
    assert factor == 2.5e-4 and info["suv_factor_source"].startswith("--suv_factor")
    # A user factor on a BQML series records the tag-based one for comparison.
    _, info = compute_suv_factor(_one_slice(), suv_factor=1e-4)
    assert info["suv_factor_from_tags"] == pytest.approx(expected_factor(), rel=1e-9)
    with pytest.raises(SUVError, match="contradict"):
        compute_suv_factor(_one_slice(Units="GML"), suv_factor=1e-4)
    for bad in (0, -1.0, float("nan"), "abc"):
        with pytest.raises(SUVError, match="suv_factor must be a finite number"):
            compute_suv_factor(_one_slice(), suv_factor=bad)


def test_bqml_suv_round_trip():
    arr = np.random.default_rng(RNG_SEED).uniform(0, 5e4, size=(4, 5, 6))
    suv = bqml_to_suv(arr, 2.4e-4)
    assert suv.dtype == np.float32 and suv.shape == arr.shape
    np.testing.assert_allclose(suv, arr * 2.4e-4, rtol=1e-6)
    np.testing.assert_allclose(suv_to_bqml(suv, 2.4e-4), arr, rtol=1e-6)
    with pytest.raises(SUVError):
        suv_to_bqml(suv, 0.0)


# ----------------------------------------------------------------------------------------- geometry


def _oblique_iop() -> tuple[float, ...]:
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rot = rx @ rz
    return tuple(np.round(np.concatenate([rot[:, 0], rot[:, 1]]), 8))


def test_synthetic_oblique_series_geometry_matches_nibabel_monai_and_itk(tmp_path):
    import itk
    from monai.transforms import LoadImage

    rng = np.random.default_rng(RNG_SEED)
    volume = rng.uniform(0, 2e4, size=(7, 5, 4))  # X != Y != Z catches any axis swap
    volume[:, :, 2] *= 10  # very different per-slice slopes
    iop = _oblique_iop()
    files, decoded, affine = write_synthetic_series(
        tmp_path / "pet",
        volume,
        spacing=(2.0, 3.0, 4.0),
        orientation=iop,
        origin_lps=(-10.0, 20.0, 30.0),
        intercepts=[0, 5.0, -3.0, 0],
    )
    series = read_pet_series(tmp_path / "pet")
    factor = expected_factor()
    assert series.suv.shape == (7, 5, 4) and series.suv.dtype == np.float32
    assert [p.name for p in series.files] == [p.name for p in files]
    np.testing.assert_allclose(series.affine, affine, atol=1e-6)
    np.testing.assert_allclose(series.suv, decoded * factor, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(series.bqml, decoded, rtol=1e-6, atol=1e-3)
    assert len(set(series.rescale_slopes)) == 4 and list(series.rescale_intercepts) == [0, 5.0, -3.0, 0]

    out = tmp_path / "out" / "suv.nii.gz"
    convert_dicom_to_suv(tmp_path / "pet", out)
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(img.dataobj), decoded * factor, rtol=1e-6, atol=1e-9)
    # The voxel (i, j, k) of the NIfTI sits where DICOM puts column i, row j of slice k.
    i, j, k = 6, 1, 3
    ds = pydicom.dcmread(files[k])
    lps = np.asarray(ds.ImagePositionPatient, float) + i * 2.0 * np.asarray(iop[:3]) + j * 3.0 * np.asarray(iop[3:])
    np.testing.assert_allclose(nib.affines.apply_affine(img.affine, (i, j, k)), lps * [-1, -1, 1], atol=1e-4)

    monai_img = LoadImage(reader="NibabelReader", image_only=True)(str(out))
    assert tuple(monai_img.shape) == (7, 5, 4)
    np.testing.assert_allclose(np.asarray(monai_img), decoded * factor, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(monai_img.affine), affine, atol=1e-5)

    itk_img = itk.imread(str(tmp_path / "pet"), itk.F)
    np.testing.assert_allclose(itk.array_from_image(itk_img).transpose(2, 1, 0), decoded, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(np.asarray(itk_img.GetSpacing()), [2.0, 3.0, 4.0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(itk_img.GetOrigin()), [-10.0, 20.0, 30.0], atol=1e-4)
    itk_dir = np.asarray(itk_img.GetDirection())
    np.testing.assert_allclose(np.diag([-1, -1, 1]) @ itk_dir @ np.diag([2.0, 3.0, 4.0]), affine[:3, :3], atol=1e-5)


# ------------------------------------------------------------------------------------- real series


@pytest.fixture(scope="module")
def real_series(real_pet_dir):
    return read_pet_series(real_pet_dir)


def test_real_series_suv(real_series, real_pet_dir):
    s = real_series
    assert s.suv.shape == (128, 128, 267)
    assert s.suv_factor == pytest.approx(2.429e-4, rel=1e-3)
    assert s.info["decay_time_s"] == pytest.approx(2711.0)
    assert float(s.suv.max()) == pytest.approx(66.5, abs=0.1)
    assert float(np.percentile(s.suv, 99.9)) == pytest.approx(4.76, abs=0.02)
    expected_affine = np.array(
        [[-4.6875, 0, 0, 297.65625], [0, -4.6875, 0, 297.65625], [0, 0, 869.82 / 266, -881.3], [0, 0, 0, 1]]
    )
    np.testing.assert_allclose(s.affine, expected_affine, atol=1e-4)
    assert s.info["spacing_mm"] == pytest.approx([4.6875, 4.6875, 3.27], abs=1e-4)
    assert s.info["rescale_slope_range"][1] / s.info["rescale_slope_range"][0] > 10
    # Per-slice slope: the slice with the largest slope decodes with its own slope, not the first one's.
    k = int(np.argmax(s.rescale_slopes))
    ds = pydicom.dcmread(s.files[k])
    np.testing.assert_allclose(s.bqml[:, :, k], ds.pixel_array.T * float(ds.RescaleSlope), rtol=1e-5, atol=1e-2)
    assert k != 0 and abs(float(ds.RescaleSlope) - s.rescale_slopes[0]) > 0.1
    # Slice order: increasing z (feet first in this HFS series).
    z = [float(d.ImagePositionPatient[2]) for d in s.datasets]
    assert z == sorted(z) and z[0] == pytest.approx(-881.3)


def test_real_series_matches_itk(real_series, real_pet_dir):
    import itk

    img = itk.imread(str(real_pet_dir), itk.F)
    arr = itk.array_from_image(img).transpose(2, 1, 0)
    np.testing.assert_allclose(arr, real_series.bqml, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(np.asarray(img.GetSpacing()), real_series.info["spacing_mm"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(img.GetOrigin()), real_series.info["first_slice_position_lps_mm"], atol=1e-4)


def test_real_folder_with_rtstruct_beside_is_read(tmp_path, real_pet_dir, caplog):
    copy_real_slices(real_pet_dir, tmp_path / "d", count=3)
    rtstruct = real_pet_dir.parent / "mask" / "1-1.dcm"
    (tmp_path / "d" / "rtstruct.dcm").write_bytes(rtstruct.read_bytes())
    with caplog.at_level(logging.WARNING):
        s = read_pet_series(tmp_path / "d")
    assert s.suv.shape == (128, 128, 3)
    assert "RTSTRUCT" in caplog.text


# ----------------------------------------------------------------------------------------- bad input


def _identify(ds: pydicom.Dataset) -> None:
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID


def _drop(path: str):
    """Edit that deletes a tag (``Keyword`` or ``rp.Keyword`` inside the radiopharmaceutical item)."""

    def edit(ds: pydicom.Dataset) -> None:
        _identify(ds)
        for item in path.split("+"):
            target = radiopharm(ds) if item.startswith("rp.") else ds
            delattr(target, item.removeprefix("rp."))

    return edit


MISSING_TAG_CASES = {
    "PatientWeight": ("PatientWeight", r"PatientWeight \(0010,1030\) is missing.*--suv_factor"),
    "dose": ("rp.RadionuclideTotalDose", r"RadionuclideTotalDose \(0018,1074\) is missing.*--suv_factor"),
    "injection time": (
        "rp.RadiopharmaceuticalStartTime",
        r"injection time missing.*RadiopharmaceuticalStartTime.*--suv_factor",
    ),
    "half-life": ("rp.RadionuclideHalfLife", r"RadionuclideHalfLife \(0018,1075\) is missing.*--suv_factor"),
    "Units": ("Units", r"Units \(0054,1001\) is missing.*--units BQML.*--suv_factor"),
    "DecayCorrection": ("DecayCorrection", r"DecayCorrection \(0054,1102\) is missing.*--suv_factor"),
    "series and acquisition time": (
        "SeriesTime+AcquisitionTime",
        r"SeriesTime \(0008,0031\) and AcquisitionTime.*--suv_factor",
    ),
}


@pytest.mark.parametrize("case", list(MISSING_TAG_CASES))
def test_each_missing_suv_tag_is_named(tmp_path, real_pet_dir, case, caplog):
    tag, pattern = MISSING_TAG_CASES[case]
    copy_real_slices(real_pet_dir, tmp_path / "d", count=2, edit=_drop(tag))
    with caplog.at_level(logging.DEBUG), pytest.raises(SUVError, match=pattern) as err:
        read_pet_series(tmp_path / "d")
    assert "\n" not in str(err.value)
    assert PATIENT_NAME.split("^")[0] not in caplog.text + str(err.value) and PATIENT_ID not in caplog.text + str(
        err.value
    )
    # The documented fix works: a user factor needs none of those tags.
    assert read_pet_series(tmp_path / "d", suv_factor=2.4e-4).suv_factor == 2.4e-4


def _ct_volume() -> np.ndarray:
    return np.random.default_rng(RNG_SEED).uniform(-1000, 1000, size=(6, 6, 3))


def _bad_folder(kind: str, root: Path, real_pet_dir: Path) -> tuple[Path, type, str]:
    d = root / "d"
    if kind == "missing":
        return root / "nope", DicomSeriesError, "does not exist"
    d.mkdir()
    if kind == "empty":
        return d, DicomSeriesError, "holds no files"
    if kind == "ct":
        write_synthetic_series(d, _ct_volume(), modality="CT")
        return d, DicomSeriesError, r"holds a CT series, not PT"
    if kind == "mixed":
        copy_real_slices(real_pet_dir, d, count=2)
        write_synthetic_series(d, _ct_volume(), modality="CT")
        return d, DicomSeriesError, r"mixes 2 image series: .*PT series 'PET AC'.*CT series 'SYNTH CT'.*--series_uid"
    files = copy_real_slices(real_pet_dir, d, count=5)
    if kind == "truncated":
        files[2].write_bytes(files[2].read_bytes()[:-4000])
        return d, DicomSeriesError, rf"{files[2].name}: cannot decode pixel data.*truncated"
    if kind == "truncated header":
        files[2].write_bytes(files[2].read_bytes()[:900])
        return d, DicomSeriesError, rf"{files[2].name} has no Rows.*truncated"
    if kind == "not dicom":
        (d / "notes.txt").write_text("not a slice")
        return d, DicomSeriesError, r"notes.txt is not a DICOM file: remove it"
    if kind == "gap":
        files[2].unlink()
        return d, DicomSeriesError, "irregular slice spacing.*missing slices"
    if kind == "duplicate":
        ds = pydicom.dcmread(files[1])
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(d / "copy.dcm")
        return d, DicomSeriesError, "repeat another slice's position"
    raise AssertionError(kind)


BAD_FOLDERS = ["missing", "empty", "ct", "mixed", "truncated", "truncated header", "not dicom", "gap", "duplicate"]


@pytest.mark.parametrize("kind", BAD_FOLDERS)
def test_bad_folder_gives_one_clear_line(tmp_path, real_pet_dir, kind):
    folder, exc_type, pattern = _bad_folder(kind, tmp_path, real_pet_dir)
    before = _tree_digest(folder) if folder.exists() else None
    out = tmp_path / "out" / "x.nii.gz"
    with pytest.raises(exc_type, match=pattern) as err:
        convert_dicom_to_suv(folder, out)
    assert "\n" not in str(err.value)
    assert not out.parent.exists() or not any(out.parent.iterdir())
    if before is not None:
        assert _tree_digest(folder) == before


def test_series_uid_picks_one_of_mixed_series(tmp_path, real_pet_dir):
    copy_real_slices(real_pet_dir, tmp_path, count=2)
    write_synthetic_series(tmp_path, _ct_volume(), modality="CT")
    uid = str(pydicom.dcmread(next(tmp_path.glob("1-*.dcm"))).SeriesInstanceUID)
    assert read_pet_series(tmp_path, series_uid=uid).suv.shape == (128, 128, 2)


def test_existing_output_and_output_inside_input_are_refused(tmp_path, real_pet_dir):
    copy_real_slices(real_pet_dir, tmp_path / "d", count=2)
    out = tmp_path / "x.nii.gz"
    out.write_bytes(b"keep me")
    with pytest.raises(UniPETInputError, match="already exists.*--overwrite"):
        convert_dicom_to_suv(tmp_path / "d", out)
    assert out.read_bytes() == b"keep me" and not (tmp_path / "x.json").exists()
    (tmp_path / "y.json").write_text("{}")  # an existing sidecar alone also blocks
    with pytest.raises(UniPETInputError, match="y.json already exists"):
        convert_dicom_to_suv(tmp_path / "d", tmp_path / "y.nii.gz")
    assert not (tmp_path / "y.nii.gz").exists()
    with pytest.raises(UniPETInputError, match="inside the DICOM folder"):
        convert_dicom_to_suv(tmp_path / "d", tmp_path / "d" / "x.nii.gz")
    convert_dicom_to_suv(tmp_path / "d", out, overwrite=True)
    assert nib.load(str(out)).shape == (128, 128, 2)


def test_suv_to_bqml_uses_sidecar_or_user_factor(tmp_path):
    from scripts.data.io import save_nifti

    suv = np.random.default_rng(RNG_SEED).uniform(0, 10, size=(3, 4, 5)).astype(np.float32)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    save_nifti(suv, affine, tmp_path / "pred.nii.gz")
    with pytest.raises(SUVError, match=r"pred.json not found.*--sidecar.*--suv_factor"):
        convert_suv_to_bqml(tmp_path / "pred.nii.gz", tmp_path / "bq.nii.gz")
    assert not (tmp_path / "bq.nii.gz").exists()
    (tmp_path / "scan.json").write_text(json.dumps({"suv_factor": 2.0e-4, "units": "BQML"}))
    convert_suv_to_bqml(tmp_path / "pred.nii.gz", tmp_path / "bq.nii.gz", sidecar=tmp_path / "scan.json")
    img = nib.load(str(tmp_path / "bq.nii.gz"))
    np.testing.assert_allclose(np.asarray(img.dataobj), suv / 2.0e-4, rtol=1e-6)
    np.testing.assert_allclose(img.affine, affine)
    assert json.loads((tmp_path / "bq.json").read_text())["suv_factor_source"].startswith("sidecar")
    convert_suv_to_bqml(
        tmp_path / "pred.nii.gz", tmp_path / "bq2.nii.gz", sidecar=tmp_path / "scan.json", suv_factor=1e-4
    )
    np.testing.assert_allclose(np.asarray(nib.load(str(tmp_path / "bq2.nii.gz")).dataobj), suv / 1e-4, rtol=1e-6)
    (tmp_path / "gml.json").write_text(json.dumps({"suv_factor": 1.0, "units": "GML"}))
    with pytest.raises(SUVError, match="already SUV"):
        convert_suv_to_bqml(tmp_path / "pred.nii.gz", tmp_path / "bq3.nii.gz", sidecar=tmp_path / "gml.json")
    with pytest.raises(UniPETInputError, match="also an input"):
        convert_suv_to_bqml(tmp_path / "pred.nii.gz", tmp_path / "pred.nii.gz", suv_factor=1e-4, overwrite=True)


def test_multiframe_pet_is_refused(tmp_path):
    write_synthetic_series(tmp_path, np.ones((4, 4, 2)), edit=lambda ds, k: setattr(ds, "NumberOfFrames", 2))
    with pytest.raises(DicomSeriesError, match="multi-frame"):
        read_pet_series(tmp_path)


# --------------------------------------------------------------------------------------------- CLI


def _cli(bundle_root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_python("-m", "scripts.data.suv", *args, cwd=bundle_root, timeout=120, PYTHONPATH=str(bundle_root))


def test_cli_help(bundle_root):
    res = _cli(bundle_root, "--help")
    assert res.returncode == 0
    text = res.stdout + res.stderr
    for flag in (
        "--dicom_dir",
        "--suv_nifti",
        "--suv_factor",
        "--units",
        "--overwrite",
        "SUVbw",
        "--patient_weight",
        "--injected_dose",
        "--injection_time",
        "--injection_datetime",
        "--allow_implausible_suv",
        "never taken as the day before",
    ):
        assert flag in text, flag


def test_cli_round_trip_and_no_identifiers(tmp_path, real_pet_dir, bundle_root):
    src = tmp_path / "d"
    files = copy_real_slices(real_pet_dir, src, count=4, edit=_identify)
    before = _tree_digest(src)
    res = _cli(bundle_root, "--dicom_dir", str(src), "--output", str(tmp_path / "o" / "suv.nii.gz"))
    assert res.returncode == 0, res.stderr
    sidecar_text = (tmp_path / "o" / "suv.json").read_text()
    for secret in (PATIENT_ID, "SECRETNAME"):
        assert secret not in sidecar_text + res.stdout + res.stderr
    meta = json.loads(sidecar_text)
    assert meta["suv_factor"] == pytest.approx(2.429e-4, rel=1e-3)
    assert meta["num_slices"] == 4 and meta["units"] == "BQML" and meta["decay_correction"] == "START"
    assert meta["injection_time_source"].startswith("RadiopharmaceuticalStartTime")
    assert _tree_digest(src) == before

    res = _cli(
        bundle_root, "--suv_nifti", str(tmp_path / "o" / "suv.nii.gz"), "--output", str(tmp_path / "o" / "bq.nii.gz")
    )
    assert res.returncode == 0, res.stderr
    back = nib.load(str(tmp_path / "o" / "bq.nii.gz"))
    manual = np.stack([(lambda d: d.pixel_array.T * float(d.RescaleSlope))(pydicom.dcmread(f)) for f in files], axis=-1)
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    manual = manual[:, :, np.argsort(z)]
    np.testing.assert_allclose(np.asarray(back.dataobj), manual, rtol=1e-5, atol=1e-2)
    assert json.loads((tmp_path / "o" / "bq.json").read_text())["units"] == "BQML"


CLI_ERRORS = {
    "missing folder": (lambda d, o: ["--dicom_dir", str(d / "absent"), "--output", str(o)], "does not exist"),
    "missing weight": (lambda d, o: ["--dicom_dir", str(d), "--output", str(o)], "PatientWeight"),
    "output exists": (
        lambda d, o: ["--dicom_dir", str(d), "--output", str(o.parent / "exists.nii.gz")],
        "already exists",
    ),
    "cnts": (lambda d, o: ["--dicom_dir", str(d), "--output", str(o), "--units", "CNTS"], "Units CNTS"),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_errors_exit_2_with_one_line(tmp_path, real_pet_dir, bundle_root, case):
    make_args, needle = CLI_ERRORS[case]
    src = tmp_path / "d"
    copy_real_slices(real_pet_dir, src, count=2, edit=_drop("PatientWeight") if case == "missing weight" else _identify)
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "exists.nii.gz").write_bytes(b"old")
    before_in, before_out = _tree_digest(src), _tree_digest(out_dir)
    res = _cli(bundle_root, *make_args(src, out_dir / "x.nii.gz"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert PATIENT_ID not in res.stdout + res.stderr
    assert _tree_digest(src) == before_in and _tree_digest(out_dir) == before_out
