"""UDPET importer: file naming, CSV matching, SUV factor math, geometry, safety and errors."""

import hashlib
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import run_python
from scripts.common.errors import UniPETInputError
from scripts.data.layout import scan_paired_dataset
from scripts.data.suv import suv_factor_from_values
from scripts.data.udpet import convert_udpet, parse_udpet_name, read_metadata_csv

SHAPE = (8, 8, 6)
# Oblique, offset affine with non-round spacing: geometry must survive exactly.
AFFINE = np.array(
    [[-2.0364, 0.05, 0.0, 101.25], [0.03, 2.0364, 0.0, -47.5], [0.0, 0.0, 2.886, -812.125], [0.0, 0.0, 0.0, 1.0]]
)
HALF_LIFE = 6588.0
# subject -> (weight kg, injected dose Bq, delay s per file key)
SUBJECTS = {
    "Anonymous-01": (55.0, 203.5e6, {"NORMAL": 3318, "DRF-4": 3386, "DRF-20": 3404}),
    "Anonymous-02": (47.0, 166.5e6, {"NORMAL": 3385, "DRF-4": 3453, "DRF-20": 3471}),
}
HEADER = (
    "SubjectID,DoseReductionFactor,NiftiFileName,PatientWeight_kg,ImageUnits,RadiopharmaceuticalName,"
    "TimeFromInjectionToAcquisition_s,RadionuclideTotalDose_Bq,RadionuclideHalfLife_s,DecayCorrection"
)


def _write_bqml(path: Path, seed: int, scaled_int: bool = False) -> None:
    rng = np.random.default_rng(seed)
    data = rng.uniform(0, 20000, SHAPE)  # Bq/mL
    if scaled_int:  # int16 with a slope, as some exporters write
        img = nib.Nifti1Image(np.round(data / 0.5).astype(np.int16), AFFINE)
        img.header.set_slope_inter(0.5, 0.0)
    else:
        img = nib.Nifti1Image(data.astype(np.float32), AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=2)
    nib.save(img, str(path))


def make_udpet(root: Path, with_normal_rows: bool = True) -> tuple[Path, Path]:
    """Flat UDPET folder (2025 test-set naming) and a metadata CSV in the published column format."""
    inp = root / "udpet_in"
    inp.mkdir()
    lines = [HEADER]
    for s, (subject, (weight, dose, delays)) in enumerate(SUBJECTS.items()):
        for k, (key, delay) in enumerate(delays.items()):
            name = f"{subject}_{key}.nii.gz"
            _write_bqml(inp / name, seed=10 * s + k, scaled_int=(key == "DRF-20"))
            drf = "NORMAL" if key == "NORMAL" else key.split("-")[1]
            if key != "NORMAL" or with_normal_rows:
                lines.append(
                    f"{subject},{drf},{name},{weight:g},BQML,Fluorodeoxyglucose,{delay},{dose:.0f},{HALF_LIFE:g},START"
                )
    csv_path = root / ("PET_info.csv" if with_normal_rows else "PET_info_noNORMAL.csv")
    csv_path.write_text("\n".join(lines) + "\n")
    return inp, csv_path


def _hand_factor(weight_kg: float, dose_bq: float, delay_s: float) -> float:
    return weight_kg * 1000.0 / (dose_bq * 0.5 ** (delay_s / HALF_LIFE))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compute_suv_factor_by_hand():
    # the UDPET rows' factor is scripts.data.suv's (one SUV rule for DICOM series and UDPET CSV rows)
    # 55 kg, 203.5 MBq, 3386 s after injection, F-18: 2 ** (-3386 / 6588) = 0.70029525...
    # -> 55000 g / (203.5e6 Bq * 0.70029525) = 3.859376e-4 g/mL per Bq/mL
    assert suv_factor_from_values(55.0, 203.5e6, 3386.0, 6588.0) == pytest.approx(3.859376e-4, rel=1e-6)
    assert suv_factor_from_values(70.0, 100e6, 6588.0, 6588.0) == pytest.approx(70000 / 50e6)
    assert suv_factor_from_values(70.0, 100e6, 6588.0, 6588.0, "ADMIN") == pytest.approx(70000 / 100e6)
    with pytest.raises(UniPETInputError, match="half-lives"):
        suv_factor_from_values(70.0, 100e6, 3600.0, 109.7)  # half-life in minutes by mistake
    with pytest.raises(UniPETInputError, match="before injection"):
        suv_factor_from_values(70.0, 100e6, -5.0, 6588.0)


def test_decay_correction_none_is_refused_as_for_a_dicom_series(tmp_path):
    """One DecayCorrection policy (scripts.data.suv.check_decay_correction): NONE used to be decayed to the
    acquisition start here (a warning) while the DICOM path refused it; a CSV SUV factor is the way out."""
    inp, csv_path = make_udpet(tmp_path)
    text = csv_path.read_text()
    (tmp_path / "none.csv").write_text(text.replace(",START", ",NONE"))
    with pytest.raises(
        UniPETInputError, match=r"line 2: DecayCorrection is NONE \(images not decay corrected\).*SUV factor"
    ):
        convert_udpet(inp, tmp_path / "none.csv", tmp_path / "o1")
    _assert_nothing_written(tmp_path / "o1")
    (tmp_path / "odd.csv").write_text(text.replace(",START", ",DECY"))
    with pytest.raises(UniPETInputError, match=r"line 2: DecayCorrection 'DECY' is not START, ADMIN or NONE"):
        convert_udpet(inp, tmp_path / "odd.csv", tmp_path / "o2")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Anonymous-01_DRF-4.nii.gz", ("Anonymous-01", 4)),
        ("Anonymous-01_DRF-2.5.nii", ("Anonymous-01", 2.5)),
        ("Anonymous-01_NORMAL.nii.gz", ("Anonymous-01", "full")),
        ("Anonymous-01_DRF-1.nii.gz", ("Anonymous-01", "full")),
        ("case_7_Full_dose.nii.gz", ("case_7", "full")),
        ("case 7 1-20 dose.nii.gz", ("case 7", 20)),
        ("ct_image.nii.gz", None),
    ],
)
def test_parse_udpet_name(name, expected):
    assert parse_udpet_name(name) == expected


@pytest.mark.parametrize(
    "name", ["Anonymous-01_DRF-abc.nii.gz", "Anonymous-01_DRF-0.nii.gz", "Anonymous-01_DRF.nii.gz"]
)
def test_parse_udpet_name_bad_drf(name):
    with pytest.raises(UniPETInputError, match=name):
        parse_udpet_name(name)


def test_convert_per_file_factors_and_geometry(tmp_path):
    inp, csv_path = make_udpet(tmp_path)
    before = _digest(inp)
    out = tmp_path / "paired"
    written = convert_udpet(inp, csv_path, out)
    assert [p.name for p in written] == list(SUBJECTS)
    assert _digest(inp) == before  # inputs untouched

    subjects = scan_paired_dataset(out)
    assert [s.subject for s in subjects] == list(SUBJECTS) and list(subjects[0].drfs) == [4, 20]
    for subject, (weight, dose, delays) in SUBJECTS.items():
        record = json.loads((out / subject / "udpet.json").read_text())
        for key, out_name in (("NORMAL", "full_dose.nii.gz"), ("DRF-4", "drf_4.nii.gz"), ("DRF-20", "drf_20.nii.gz")):
            src = nib.load(str(inp / f"{subject}_{key}.nii.gz"))
            dst = nib.load(str(out / subject / out_name))
            factor = _hand_factor(weight, dose, delays[key])
            np.testing.assert_allclose(np.asarray(dst.dataobj), np.asarray(src.dataobj, np.float64) * factor, rtol=1e-6)
            assert record["files"][out_name]["suv_factor"] == pytest.approx(factor, rel=1e-12)
            assert record["files"][out_name]["source"] == f"{subject}_{key}.nii.gz"
            assert record["files"][out_name]["row_of_its_own"] is True
            # geometry copied exactly
            assert dst.shape == src.shape and dst.get_data_dtype() == np.float32
            np.testing.assert_array_equal(dst.affine, src.affine)
            np.testing.assert_array_equal(dst.header.get_sform(), src.header.get_sform())
            np.testing.assert_array_equal(dst.header.get_qform(), src.header.get_qform())
            assert (int(dst.header["sform_code"]), int(dst.header["qform_code"])) == (2, 1)
            np.testing.assert_array_equal(dst.header.get_zooms(), src.header.get_zooms())
    # SUV of a typical voxel is in a plausible range (Bq/mL 0..20000 -> SUV 0..~8)
    full = np.asarray(nib.load(str(out / "Anonymous-01" / "full_dose.nii.gz")).dataobj)
    assert 0 < full.max() < 10


def test_no_normal_rows_uses_earliest_row(tmp_path, caplog):
    inp, csv_path = make_udpet(tmp_path, with_normal_rows=False)
    out = tmp_path / "paired"
    convert_udpet(inp, csv_path, out)
    weight, dose, delays = SUBJECTS["Anonymous-01"]
    record = json.loads((out / "Anonymous-01" / "udpet.json").read_text())["files"]["full_dose.nii.gz"]
    assert record["row_of_its_own"] is False
    assert record["suv_factor"] == pytest.approx(_hand_factor(weight, dose, delays["DRF-4"]))  # earliest acquisition
    assert "no CSV row of their own" in caplog.text


def test_tolerant_headers_units_times_and_suv_column(tmp_path):
    inp, _ = make_udpet(tmp_path)
    # subject-level rows, headers with spaces/case/units in brackets, grams, MBq, minutes, clock times
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text(
        "subject id;Patient Weight (g);Injected dose [MBq];half life (min);Injection Time;Acquisition Time\n"
        "Anonymous-01;55000;203,5;109.8;10:00:00;10:56:26\n"
        "Anonymous-02;47000;166.5;109.8;2024-01-01 23:55:00;20240102005520\n"
    )
    out = tmp_path / "paired"
    convert_udpet(inp, csv_path, out)
    f1 = json.loads((out / "Anonymous-01" / "udpet.json").read_text())["files"]["drf_4.nii.gz"]
    assert f1["delay_s"] == pytest.approx(3386.0) and f1["half_life_s"] == pytest.approx(6588.0)
    assert f1["suv_factor"] == pytest.approx(_hand_factor(55.0, 203.5e6, 3386.0))
    f2 = json.loads((out / "Anonymous-02" / "udpet.json").read_text())["files"]["full_dose.nii.gz"]
    assert f2["delay_s"] == pytest.approx(3620.0)  # 23:55:00 -> 00:55:20 crosses midnight, with dates
    assert f2["suv_factor"] == pytest.approx(_hand_factor(47.0, 166.5e6, 3620.0))
    # Times of day only: the injection day is unknown and never assumed (issue 12, finding 1).
    csv_path.write_text(csv_path.read_text().replace("2024-01-01 23:55:00;20240102005520", "235500;005520"))
    with pytest.raises(
        UniPETInputError,
        match=r"line 3: injection time .*23:55:00 vs acquisition time .*00:55:20.*never assumed.*give dates",
    ):
        convert_udpet(inp, csv_path, tmp_path / "paired2")
    _assert_nothing_written(tmp_path / "paired2")


def test_suv_factor_column_and_column_map(tmp_path):
    inp, _ = make_udpet(tmp_path)
    csv_path = tmp_path / "factors.csv"
    csv_path.write_text("Patient,SUV factor\nAnonymous-01,0.0004\nAnonymous-02,0.0005\n")
    out = tmp_path / "a"
    convert_udpet(inp, csv_path, out)
    src = np.asarray(nib.load(str(inp / "Anonymous-02_DRF-4.nii.gz")).dataobj, np.float64)
    np.testing.assert_allclose(
        np.asarray(nib.load(str(out / "Anonymous-02" / "drf_4.nii.gz")).dataobj), src * 0.0005, rtol=1e-6
    )

    odd = tmp_path / "odd.csv"
    odd.write_text(
        "Kennung,Masse,Aktivitaet (MBq),HWZ (s),Wartezeit (min)\nAnonymous-01,55,203.5,6588,56.4333333333\n"
        "Anonymous-02,47,166.5,6588,57.55\n"
    )
    column_map = '{"subject": "Kennung", "weight": "Masse", "dose": "Aktivitaet (MBq)", "half_life": "HWZ (s)", "delay": "Wartezeit (min)"}'
    out = tmp_path / "b"
    convert_udpet(inp, odd, out, column_map=column_map)
    rec = json.loads((out / "Anonymous-01" / "udpet.json").read_text())["files"]["drf_20.nii.gz"]
    assert rec["suv_factor"] == pytest.approx(_hand_factor(55.0, 203.5e6, 3386.0), rel=1e-9)
    with pytest.raises(UniPETInputError, match=r"--column_map: unknown field\(s\) \['mass'\]"):
        read_metadata_csv(odd, {"mass": "Masse"})
    with pytest.raises(UniPETInputError, match="column 'Gewicht' \\(for weight\\) is not in odd.csv"):
        read_metadata_csv(odd, {"weight": "Gewicht"})


def test_impossible_values_are_refused_with_the_column_named(tmp_path):
    """Issue 12, finding 4: the SUV tool's plausibility rules apply to the UDPET import too."""
    inp, csv_path = make_udpet(tmp_path)
    text = csv_path.read_text()
    grams = text.replace(",55,BQML,", ",55000,BQML,", 1)  # a weight in g under a _kg header
    (tmp_path / "g.csv").write_text(grams)
    with pytest.raises(
        UniPETInputError, match=r"line 2: weight \(column 'PatientWeight_kg'\) 55000 kg is implausible.*grams.*\[g\]"
    ):
        convert_udpet(inp, tmp_path / "g.csv", tmp_path / "o1")
    _assert_nothing_written(tmp_path / "o1")
    # Images declared as SUV (GML) that hold Bq/mL: no column is wrong, the body median SUV (~10000) is.
    (tmp_path / "gml.csv").write_text(text.replace(",BQML,", ",GML,"))
    with pytest.raises(UniPETInputError, match=r"Anonymous-01_NORMAL.nii.gz: the median SUV of the body is \d+"):
        convert_udpet(inp, tmp_path / "gml.csv", tmp_path / "o2")
    _assert_nothing_written(tmp_path / "o2")


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.staging") for p in out.parent.iterdir())


def test_error_csv_missing(tmp_path):
    inp, _ = make_udpet(tmp_path)
    with pytest.raises(UniPETInputError, match="metadata CSV .*nope.csv not found"):
        convert_udpet(inp, tmp_path / "nope.csv", tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_error_subject_without_row(tmp_path):
    inp, csv_path = make_udpet(tmp_path)
    csv_path.write_text(
        "\n".join(r for r in csv_path.read_text().splitlines() if not r.startswith("Anonymous-02")) + "\n"
    )
    with pytest.raises(UniPETInputError, match=r"subject 'Anonymous-02' .* has no row in PET_info.csv"):
        convert_udpet(inp, csv_path, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_error_missing_full_dose(tmp_path):
    inp, csv_path = make_udpet(tmp_path)
    (inp / "Anonymous-02_NORMAL.nii.gz").unlink()
    with pytest.raises(UniPETInputError, match=r"subject 'Anonymous-02' has no full-dose file"):
        convert_udpet(inp, csv_path, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_error_unparseable_drf_file(tmp_path):
    inp, csv_path = make_udpet(tmp_path)
    _write_bqml(inp / "Anonymous-01_DRF-x4.nii.gz", seed=99)
    with pytest.raises(UniPETInputError, match=r"Anonymous-01_DRF-x4.nii.gz: cannot read a dose reduction factor"):
        convert_udpet(inp, csv_path, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_error_missing_columns_named(tmp_path):
    inp, _ = make_udpet(tmp_path)
    csv_path = tmp_path / "thin.csv"
    csv_path.write_text("SubjectID,PatientWeight_kg\nAnonymous-01,55\nAnonymous-02,47\n")
    with pytest.raises(UniPETInputError, match=r"lacks column\(s\) for dose, half_life, delay") as info:
        convert_udpet(inp, csv_path, tmp_path / "out")
    assert "--column_map" in str(info.value) and "weight" not in str(info.value).split("for ")[1].split(" (")[0]
    _assert_nothing_written(tmp_path / "out")


def test_error_implausible_dose_units(tmp_path):
    inp, csv_path = make_udpet(tmp_path)
    csv_path.write_text(csv_path.read_text().replace("203500000", "203.5"))
    with pytest.raises(UniPETInputError, match=r"line 2: injected dose 203.5 Bq is implausibly small"):
        convert_udpet(inp, csv_path, tmp_path / "out")


def test_error_geometry_mismatch(tmp_path):
    inp, csv_path = make_udpet(tmp_path)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 5), np.float32), AFFINE), str(inp / "Anonymous-01_DRF-4.nii.gz"))
    with pytest.raises(UniPETInputError, match=r"Anonymous-01_DRF-4.nii.gz has shape \(8, 8, 5\)"):
        convert_udpet(inp, csv_path, tmp_path / "out")


def test_output_dir_rules(tmp_path):
    inp, csv_path = make_udpet(tmp_path)
    with pytest.raises(UniPETInputError, match="overlap"):
        convert_udpet(inp, csv_path, inp / "paired")
    with pytest.raises(UniPETInputError, match="overlap"):
        convert_udpet(inp, csv_path, inp)
    out = tmp_path / "paired"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(UniPETInputError, match="not empty.*--overwrite"):
        convert_udpet(inp, csv_path, out)
    convert_udpet(inp, csv_path, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "user file"
    assert len(scan_paired_dataset(out)) == 2


def _cli(bundle_root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_python("-m", "scripts.data.udpet", *args, cwd=bundle_root, timeout=120, PYTHONPATH=str(bundle_root))


def test_cli(bundle_root, tmp_path):
    help_run = _cli(bundle_root, "--help")
    assert help_run.returncode == 0 and "metadata_csv" in (help_run.stdout + help_run.stderr).lower()

    inp, csv_path = make_udpet(tmp_path)
    out = tmp_path / "paired"
    bad = _cli(
        bundle_root, "--input_dir", str(inp), "--metadata_csv", str(tmp_path / "missing.csv"), "--output_dir", str(out)
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.csv" in errors[0]
    _assert_nothing_written(out)

    ok = _cli(bundle_root, "--input_dir", str(inp), "--metadata_csv", str(csv_path), "--output_dir", str(out))
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (out / "Anonymous-01").iterdir()) == [
        "drf_20.nii.gz",
        "drf_4.nii.gz",
        "full_dose.nii.gz",
        "udpet.json",
    ]
    again = _cli(bundle_root, "--input_dir", str(inp), "--metadata_csv", str(csv_path), "--output_dir", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
