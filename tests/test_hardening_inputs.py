"""Bad input, tool by tool: one clear line naming the problem and the fix, exit status 2, nothing written,
the input untouched; and the inputs that are odd but valid (GML units, negative voxels, ...) are handled.

Tables (cases already covered elsewhere are not repeated: test_suv.py, test_inference.py, test_layout.py):

- ``SUV_REFUSED`` / ``SUV_HANDLED``: ``python -m scripts.data.suv`` through its entry point ``main`` in-process
  (exit status, stderr, outputs), plus one real subprocess;
- ``INFER_REFUSED`` / ``INFER_HANDLED``: inference's input check (``prepare_datalist``, the step
  configs/inference.json runs before anything is written), plus one ``monai.bundle run``;
- ``TRAIN_REFUSED`` / ``TRAIN_HANDLED``: the datasets of configs/train.json (also evaluate.json's pairs and
  loader), parsed in-process, plus one ``monai.bundle run`` of each of train.json and evaluate.json.

Policies under test (scripts/data/volume_checks.py): 4D (dynamic) volumes are refused, not denoised frame
by frame; all-zero volumes are refused by inference/training/evaluation and converted with a warning by the
SUV tool; negative voxels are kept; NaN/Inf voxels are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pet_dicom_factory as factory
import pytest
from pydicom.uid import MRImageStorage, generate_uid
from test_inference import TINY as TINY_INFERENCE
from test_inference import bundle_run as bundle_run_inference
from test_training import TINY, bundle_run, train_args

from conftest import BUNDLE_ROOT, bundle_parser, run_python
from scripts.common.errors import UniPETInputError, user_error, worker_user_error
from scripts.data.io import save_nifti
from scripts.data.suv import main as suv_main
from scripts.inference.inputs import prepare_datalist

RNG = np.random.default_rng(7)
BQML = RNG.uniform(500.0, 5000.0, size=(8, 7, 5))  # a small PET series in Bq/mL
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


# ------------------------------------------------------------------------------------------ helpers


def tree_digest(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def series(folder: Path, volume: np.ndarray = BQML, edit: Callable | None = None, prefix: str = "", **kw) -> list[Path]:
    """A synthetic DICOM series in ``folder``; ``prefix`` keeps file names apart when series share a folder."""
    staging = folder.parent / f".staging_{folder.name}_{prefix}"
    files, _, _ = factory.write_synthetic_series(
        staging, volume, edit=(lambda ds, k: edit(ds, k)) if edit else None, **kw
    )
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = folder / f"{prefix}{f.name}"
        shutil.move(f, target)
        out.append(target)
    staging.rmdir()
    return out


def delete(*keywords: str) -> Callable:
    """Edit deleting tags; ``rp.X`` is inside the radiopharmaceutical item."""

    def edit(ds, k):
        for keyword in keywords:
            target = factory.radiopharm(ds) if keyword.startswith("rp.") else ds
            delattr(target, keyword.removeprefix("rp."))

    return edit


def set_tag(keyword: str, value, only_slice: int | None = None) -> Callable:
    def edit(ds, k):
        if only_slice is None or k == only_slice:
            setattr(ds, keyword, value)

    return edit


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def mr_edit(ds, k):
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage


# MONAI's own notices on stderr: the config-trust notice of `monai.bundle run`, and its warning that the
# optional GPU DICOM decoder is not installed. Neither is an error; everything else must be our one line.
MONAI_NOTICES = ("parsing config_file ", "NvImgCodecPydicomReader: ")


def one_error_line(stderr: str) -> str:
    """The single ``error: ...`` line of ``stderr``, which must hold nothing else but MONAI's notices and
    progress-bar redraws (tqdm's ``NN%|`` lines, ended by the hook before the error line)."""
    lines = [
        line
        for line in stderr.strip().split("\n")
        if line.strip() and not line.startswith(MONAI_NOTICES) and "%|" not in line
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------- SUV tool
# Each builder prepares tmp/in (a DICOM folder or an SUV NIfTI) and returns the CLI keyword arguments.


def _dicom(make: Callable[[Path], object]) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        make(tmp / "in")
        return {"dicom_dir": str(tmp / "in")}

    return build


def _dynamic(folder: Path) -> None:
    uid = generate_uid()
    for frame in (0, 1):  # two frames of one series at the same positions
        series(folder, BQML * (1 + frame), edit=set_tag("SeriesInstanceUID", uid), prefix=f"f{frame}_")


def _mixed(folder: Path) -> None:
    series(folder, prefix="pt_")
    series(folder, RNG.uniform(-1000, 1000, size=(8, 7, 3)), modality="CT", prefix="ct_")


def _nifti(make: Callable[[Path], object]) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        (tmp / "in").mkdir()
        path = tmp / "in" / "suv.nii.gz"
        make(path)
        (tmp / "in" / "suv.json").write_text(json.dumps({"suv_factor": 2.0e-4, "units": "BQML"}))
        return {"suv_nifti": str(path)}

    return build


def _suv_volume(values: np.ndarray) -> Callable[[Path], object]:
    return lambda path: save_nifti(values, AFFINE, path)


SUV_REFUSED = {
    "missing path": (lambda tmp: {"dicom_dir": str(tmp / "absent")}, r"does not exist"),
    "empty folder": (_dicom(lambda d: d.mkdir()), r"holds no files"),
    "CT series": (_dicom(lambda d: series(d, modality="CT")), r"holds a CT series, not PT"),
    "MR series": (_dicom(lambda d: series(d, modality="MR", edit=mr_edit)), r"holds a MR series, not PT"),
    "no PatientWeight": (
        _dicom(lambda d: series(d, edit=delete("PatientWeight"))),
        r"PatientWeight \(0010,1030\) is missing.*--suv_factor",
    ),
    "no dose": (
        _dicom(lambda d: series(d, edit=delete("rp.RadionuclideTotalDose"))),
        r"RadionuclideTotalDose .* is missing.*--suv_factor",
    ),
    "no injection time": (
        _dicom(lambda d: series(d, edit=delete("rp.RadiopharmaceuticalStartTime"))),
        r"injection time missing.*--suv_factor",
    ),
    "no half-life": (
        _dicom(lambda d: series(d, edit=delete("rp.RadionuclideHalfLife"))),
        r"RadionuclideHalfLife .* is missing.*--suv_factor",
    ),
    "no Units": (_dicom(lambda d: series(d, edit=delete("Units"))), r"Units \(0054,1001\) is missing.*--units BQML"),
    "Units CNTS": (
        _dicom(lambda d: series(d, edit=set_tag("Units", "CNTS"))),
        r"Units CNTS \(counts, not a calibrated .*--suv_factor",
    ),
    "Units PROPCNTS": (
        _dicom(lambda d: series(d, edit=set_tag("Units", "PROPCNTS"))),
        r"Units PROPCNTS \(not Bq/mL\).*--suv_factor",
    ),
    "two series mixed": (
        _dicom(_mixed),
        r"mixes 2 image series: .*(PT series.*CT series|CT series.*PT series).*--series_uid",
    ),
    "dynamic (4D) series": (
        _dicom(_dynamic),
        r"repeat another slice's position: a dynamic/gated series.*export a single frame",
    ),
    "truncated slice": (
        _dicom(lambda d: truncate(series(d)[2], 0.97)),
        r"img\d+\.dcm: cannot decode pixel data.*truncated",
    ),
    "non-DICOM file among slices": (
        _dicom(lambda d: (series(d), (d / "notes.txt").write_text("x"))),
        r"notes\.txt is not a DICOM file: remove it",
    ),
    "NaN RescaleSlope": (
        _dicom(lambda d: series(d, edit=set_tag("RescaleSlope", "NaN", only_slice=2))),
        r"RescaleSlope/RescaleIntercept nan/0\.0 is not a finite number",
    ),
    "SUV NIfTI missing": (
        lambda tmp: {"suv_nifti": str(tmp / "absent.nii.gz"), "suv_factor": 2e-4},
        r"no such NIfTI file",
    ),
    "SUV NIfTI truncated": (
        _nifti(lambda p: truncate(save_nifti(RNG.random((24, 24, 24)), AFFINE, p))),
        r"cannot read as NIfTI.*is the file complete",
    ),
    "SUV NIfTI with NaN": (
        _nifti(_suv_volume(np.where(RNG.random((6, 6, 6)) > 0.9, np.nan, 1.0))),
        r"has \d+ NaN/Inf voxel\(s\).*set them to 0",
    ),
}


@pytest.mark.parametrize("case", list(SUV_REFUSED))
def test_suv_tool_refuses_with_one_line(tmp_path, capsys, caplog, case):
    build, pattern = SUV_REFUSED[case]
    kwargs = build(tmp_path)
    before = tree_digest(tmp_path / "in")
    out = tmp_path / "out" / "x.nii.gz"
    with caplog.at_level(logging.DEBUG), pytest.raises(SystemExit) as exit_info:
        suv_main(output=str(out), **kwargs)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert re.search(pattern, line), line
    assert "Traceback" not in captured.out + captured.err + caplog.text
    assert not (tmp_path / "out").exists(), "nothing may be written for a refused input"
    assert tree_digest(tmp_path / "in") == before, "the input must never be modified"
    assert factory.PATIENT_ID not in captured.out + captured.err + caplog.text


def _build_handled(kind: str, tmp: Path) -> np.ndarray:
    """Write the input of a handled case; return the SUV the output must hold."""
    if kind == "Units GML (already SUV)":
        values = RNG.uniform(0.1, 8.0, size=(8, 7, 5))
        _, decoded, _ = factory.write_synthetic_series(tmp / "in", values, edit=set_tag("Units", "GML"))
        return decoded
    if kind == "negative voxels":
        values = BQML.copy()
        values[0, 0, :] = -300.0  # OSEM undershoot in a cold corner
        _, decoded, _ = factory.write_synthetic_series(tmp / "in", values)
        return decoded * factory.expected_factor()
    if kind == "all-zero series":
        factory.write_synthetic_series(tmp / "in", np.zeros((8, 7, 5)))
        return np.zeros((8, 7, 5))
    if kind == "single slice":
        _, decoded, _ = factory.write_synthetic_series(tmp / "in", BQML[:, :, :1])
        return decoded * factory.expected_factor()
    raise AssertionError(kind)


SUV_HANDLED = {
    "Units GML (already SUV)": None,
    "negative voxels": None,
    "all-zero series": "every voxel is zero",
    "single slice": "single slice",
}


@pytest.mark.parametrize("case", list(SUV_HANDLED))
def test_suv_tool_handles_odd_but_valid_series(tmp_path, capsys, caplog, case):
    expected = _build_handled(case, tmp_path)
    out = tmp_path / "out" / "suv.nii.gz"
    with caplog.at_level(logging.INFO):
        suv_main(dicom_dir=str(tmp_path / "in"), output=str(out))
    assert capsys.readouterr().err == ""
    suv = np.asarray(nib.load(str(out)).dataobj)
    np.testing.assert_allclose(suv, expected, rtol=1e-5, atol=1e-9)
    warning = SUV_HANDLED[case]
    if warning:
        assert warning in caplog.text and warning in json.dumps(json.loads(out.with_name("suv.json").read_text()))
    if case == "negative voxels":
        assert suv.min() < 0, "negative voxels must stay negative (not clipped)"


def test_suv_cli_subprocess_one_line(tmp_path):
    series(tmp_path / "in", edit=set_tag("RescaleSlope", "NaN", only_slice=1))
    before = tree_digest(tmp_path / "in")
    proc = run_python(
        "-m",
        "scripts.data.suv",
        "--dicom_dir",
        tmp_path / "in",
        "--output",
        tmp_path / "out" / "x.nii.gz",
        timeout=120,
        PYTHONPATH=str(BUNDLE_ROOT),
    )
    assert proc.returncode == 2
    assert "not a finite number" in one_error_line(proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists() and tree_digest(tmp_path / "in") == before


# ---------------------------------------------------------------------------------------- inference
# Each builder fills tmp/in (the --dataset_dir); 2D, 4D, NaN and truncated NIfTI are in test_inference.py.


def _pet_dir(make: Callable[[Path], object]) -> Callable[[Path], None]:
    return lambda data: make(data / "pet")


INFER_REFUSED = {
    "missing dataset dir": (lambda data: None, r"does not exist: check --dataset_dir"),
    "empty dataset dir": (lambda data: data.mkdir(), r"nothing to denoise in .*PET \(Modality PT\)"),
    "only CT and MR series": (
        lambda data: (series(data / "ct", modality="CT"), series(data / "mr", modality="MR", edit=mr_edit)),
        r"nothing to denoise",
    ),
    "no dose": (
        _pet_dir(lambda d: series(d, edit=delete("rp.RadionuclideTotalDose"))),
        r"RadionuclideTotalDose .*python -m scripts\.data\.suv",
    ),
    "no injection time": (
        _pet_dir(lambda d: series(d, edit=delete("rp.RadiopharmaceuticalStartTime"))),
        r"injection time missing.*python -m scripts\.data\.suv",
    ),
    "no half-life": (
        _pet_dir(lambda d: series(d, edit=delete("rp.RadionuclideHalfLife"))),
        r"RadionuclideHalfLife .*python -m scripts\.data\.suv",
    ),
    "no Units": (
        _pet_dir(lambda d: series(d, edit=delete("Units"))),
        r"Units \(0054,1001\) is missing.*python -m scripts\.data\.suv",
    ),
    "Units CNTS": (
        _pet_dir(lambda d: series(d, edit=set_tag("Units", "CNTS"))),
        r"Units CNTS .*python -m scripts\.data\.suv",
    ),
    "Units PROPCNTS": (
        _pet_dir(lambda d: series(d, edit=set_tag("Units", "PROPCNTS"))),
        r"Units PROPCNTS .*python -m scripts\.data\.suv",
    ),
    "two series in one folder": (_pet_dir(_mixed), r"mixes 2 image series.*give every series its own sub-folder"),
    "dynamic (4D) series": (_pet_dir(_dynamic), r"dynamic/gated series"),
    "single-slice series (2D)": (_pet_dir(lambda d: series(d, BQML[:, :, :1])), r"is a 2D image"),
    "truncated slice": (_pet_dir(lambda d: truncate(series(d)[1], 0.97)), r"cannot decode pixel data"),
    "non-DICOM file among slices": (
        _pet_dir(lambda d: (series(d), (d / "readme.txt").write_text("x"))),
        r"readme\.txt is not a DICOM file",
    ),
    "all-zero series": (
        _pet_dir(lambda d: series(d, np.zeros((8, 7, 5)))),
        r"pet is all zero .*replace it or remove it",
    ),
    "all-zero NIfTI": (
        lambda data: save_nifti(np.zeros((8, 8, 8)), AFFINE, data / "zero.nii.gz"),
        r"zero\.nii\.gz is all zero",
    ),
    "Inf voxels": (
        lambda data: save_nifti(
            np.where(np.arange(512).reshape(8, 8, 8) % 97 == 0, np.inf, 1.0), AFFINE, data / "inf.nii.gz"
        ),
        r"inf\.nii\.gz has 6 NaN/Inf voxel",
    ),
    # issue 12: all-negative volumes were denoised silently
    "all-negative NIfTI": (
        lambda data: save_nifti(-RNG.uniform(0.1, 2.0, size=(8, 8, 8)), AFFINE, data / "neg.nii.gz"),
        r"neg\.nii\.gz has no positive voxel \(maximum -0\.\d+.*sign is inverted",
    ),
    "zero and negative NIfTI": (
        lambda data: save_nifti(np.minimum(0.0, RNG.normal(0, 1, size=(8, 8, 8))), AFFINE, data / "nonpos.nii.gz"),
        r"nonpos\.nii\.gz has no positive voxel \(maximum 0,",
    ),
}


@pytest.mark.parametrize("case", list(INFER_REFUSED))
def test_inference_refuses_before_writing(tmp_path, case):
    make, pattern = INFER_REFUSED[case]
    data, out = tmp_path / "in", tmp_path / "out"
    make(data)
    before = tree_digest(data)
    with pytest.raises(UniPETInputError) as err:
        prepare_datalist(data, out, "both", False)
    assert re.search(pattern, str(err.value)), str(err.value)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert tree_digest(data) == before


def test_inference_accepts_a_gml_series_and_negative_voxels(tmp_path):
    values = RNG.uniform(0.1, 8.0, size=(8, 7, 5))
    values[0, 0, :] = -0.3
    factory.write_synthetic_series(tmp_path / "in" / "pet", values, edit=set_tag("Units", "GML"))
    items = prepare_datalist(tmp_path / "in", tmp_path / "out", "both", False)
    assert [(i["name"], i["kind"]) for i in items] == [("pet", "dicom")]


def test_inference_bundle_run_one_line(tmp_path):
    data, out = tmp_path / "in", tmp_path / "out"
    save_nifti(RNG.uniform(0.5, 5.0, size=(16, 16, 16)), AFFINE, data / "a_good.nii.gz")
    _mixed(data / "b_mixed")
    before = tree_digest(data)
    proc = bundle_run_inference(
        ["--dataset_dir", data, "--output_dir", out, "--checkpoint", "", "--allow_untrained", "true", *TINY_INFERENCE]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "mixes 2 image series" in one_error_line(proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists() and tree_digest(data) == before


def test_inference_refuses_a_bad_host_memory_cache_in_one_line(tmp_path):
    data, out = tmp_path / "in", tmp_path / "out"
    save_nifti(RNG.uniform(0.5, 5.0, size=(16, 16, 16)), AFFINE, data / "a.nii.gz")
    before = tree_digest(data)
    proc = bundle_run_inference(
        ["--dataset_dir", data, "--output_dir", out, "--checkpoint", "", "--allow_untrained", "true"]
        + [*TINY_INFERENCE, "--host_memory_cache_mb", "-5"]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(
        r"host_memory_cache_mb must be a whole number of MiB from 0 to 2047 .* got -5", one_error_line(proc.stderr)
    )
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists() and tree_digest(data) == before


# ------------------------------------------------------------------------------ training / evaluation


def put(values: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    return save_nifti(values, affine, path, overwrite=True)


def pairs(root: Path, n_subjects: int = 2, shape=(12, 12, 10)) -> Path:
    """Small paired dataset (SUV, with a few negative voxels as OSEM gives)."""
    rng = np.random.default_rng(0)
    for s in range(n_subjects):
        full = rng.uniform(0.5, 6.0, size=shape)
        full[0, 0, :] = -0.4
        put(full, root / f"sub{s}" / "full_dose.nii.gz")
        for d in (4, 20):
            put(full + rng.normal(0, 0.1 * np.sqrt(d), shape), root / f"sub{s}" / f"drf_{d}.nii.gz")
    return root


def _datalist(root: Path, drf="20", spacing=None) -> Path:
    if spacing is not None:
        put(np.ones((12, 12, 10)), root / "sub0" / "drf_20.nii.gz", np.diag([*spacing, 1.0]))
    path = root / "datalist.json"
    entry = {"image": "sub0/drf_20.nii.gz", "label": "sub0/full_dose.nii.gz", "drf": drf, "subject": "sub0"}
    path.write_text(json.dumps({"training": [entry], "validation": [], "test": []}))
    return path


def _replace(rel: str, values=None, raw: Callable[[Path], object] | None = None) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        path = root / rel
        if raw is not None:
            raw(path)
        else:
            put(values, path)

    return make


def _nan(shape=(12, 12, 10)) -> np.ndarray:
    v = np.ones(shape)
    v[3, 4, 5] = np.nan
    return v


# (make(root) -> datalist_file or None, pattern); root is a valid 2-subject dataset unless the case says otherwise
TRAIN_REFUSED = {
    "missing dataset dir": (lambda root: shutil.rmtree(root), r"dataset dir .* does not exist"),
    "empty dataset dir": (lambda root: [shutil.rmtree(p) for p in list(root.iterdir())], r"has no subject folders"),
    "DRF name that does not parse": (
        lambda root: put(np.ones((12, 12, 10)), root / "sub1" / "drf_high.nii.gz"),
        r"subject 'sub1': drf_high\.nii\.gz: cannot read a dose reduction factor from 'high'",
    ),
    "pair differs in shape": (
        _replace("sub1/drf_4.nii.gz", np.ones((12, 12, 9))),
        r"sub1/drf_4\.nii\.gz has shape \(12, 12, 9\) but full_dose",
    ),
    "pair differs in spacing": (
        lambda root: put(np.ones((12, 12, 10)), root / "sub0" / "drf_4.nii.gz", np.diag([4.0, 4.0, 3.0, 1.0])),
        r"sub0/drf_4\.nii\.gz and full_dose\.nii\.gz differ in spacing",
    ),
    "pair differs in spacing (datalist file)": (
        lambda root: _datalist(root, spacing=(2.0, 2.0, 2.0)),
        r"training entry sub0 DRF 20: .*drf_20\.nii\.gz and full_dose\.nii\.gz differ in spacing",
    ),
    "DRF in datalist file does not parse": (
        lambda root: _datalist(root, drf="twenty"),
        r"the DRF 'twenty' is not a positive number",
    ),
    "truncated .nii.gz": (
        _replace("sub1/drf_20.nii.gz", raw=lambda p: truncate(put(RNG.random((12, 12, 10)), p))),
        r"sub1/drf_20\.nii\.gz: cannot read as an image .*is the file complete",
    ),
    "2D image": (_replace("sub0/full_dose.nii.gz", np.ones((12, 12))), r"full_dose\.nii\.gz: is a 2D image"),
    "4D volume": (_replace("sub0/drf_4.nii.gz", np.ones((12, 12, 10, 3))), r"drf_4\.nii\.gz: is a 4D volume"),
    "NaN voxels": (_replace("sub1/drf_4.nii.gz", _nan()), r"sub1/drf_4\.nii\.gz has 1 NaN/Inf voxel"),
    "all-zero full dose": (
        _replace("sub0/full_dose.nii.gz", np.zeros((12, 12, 10))),
        r"sub0/full_dose\.nii\.gz is all zero",
    ),
}


def _train_parser(root: Path, datalist_file: Path | None = None, **extra):
    return bundle_parser(
        ["train.json"],
        **{"dataset_dir": str(root), "datalist_file": str(datalist_file or ""), "val_fraction": 0.5, **extra},
    )


@pytest.mark.parametrize("case", list(TRAIN_REFUSED))
def test_training_data_refused_with_one_line(tmp_path, case):
    make, pattern = TRAIN_REFUSED[case]
    root = pairs(tmp_path / "pairs")
    datalist = make(root)
    before = tree_digest(tmp_path)
    parser = _train_parser(root, datalist if isinstance(datalist, Path) and datalist.name == "datalist.json" else None)
    with pytest.raises(Exception) as info:
        for key in ("train#dataset", "validate#dataset"):  # what train.json's initialize builds first
            parser.get_parsed_content(key)
    found = user_error(info.value)
    assert isinstance(found, UniPETInputError), f"not a one-line user error: {info.value!r}"
    assert re.search(pattern, str(found)), str(found)
    assert "\n" not in str(found)
    assert tree_digest(tmp_path) == before


def test_training_keeps_negative_voxels(tmp_path):
    root = pairs(tmp_path / "pairs")
    dataset = _train_parser(root).get_parsed_content("validate#dataset")
    item = dataset[0]
    for key in ("label", "image"):
        raw = np.asarray(nib.load(dataset.data[0][key]).dataobj)
        assert raw.min() < 0
        np.testing.assert_allclose(item[key][0].numpy(), raw / 20.0, rtol=1e-6, atol=1e-7)


def test_training_bundle_run_one_line_and_no_folders(tmp_path):
    root = pairs(tmp_path / "pairs")
    truncate(put(RNG.random((12, 12, 10)), root / "sub0" / "drf_4.nii.gz"))
    before = tree_digest(root)
    ckpt, out = tmp_path / "ckpt", tmp_path / "runs"
    proc = bundle_run(train_args(root, ckpt, out, epochs=1, epoch_length=1))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "sub0/drf_4.nii.gz: cannot read as an image" in one_error_line(proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not ckpt.exists() and not out.exists() and tree_digest(root) == before


def test_evaluation_bundle_run_one_line_without_logged_traceback(tmp_path):
    """The bad volume is met inside the evaluator's run: StatsHandler must not log a traceback first."""
    root = pairs(tmp_path / "pairs", shape=(16, 16, 12))  # SSIM needs 11 voxels along each axis
    put(_nan((16, 16, 12)), root / "sub1" / "drf_20.nii.gz")  # evaluated after sub0's pairs
    ckpt, out = tmp_path / "ckpt", tmp_path / "runs"
    proc = bundle_run(
        [
            "--config_file",
            "['configs/train.json','configs/evaluate.json']",
            "--dataset_dir",
            str(root),
            "--ckpt_dir",
            str(ckpt),
            "--checkpoint",
            "",
            "--allow_untrained",
            "true",
            "--output_dir",
            str(out),
            "--eval_split",
            "all",
            *TINY,
        ]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "sub1/drf_20.nii.gz has 1 NaN/Inf voxel" in one_error_line(proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:]
    assert not list((out / "eval").glob("*.csv")) and not (out / "eval" / "summary.json").exists()


def test_error_raised_in_a_dataloader_worker_is_still_one_line(tmp_path):
    """With --num_workers > 0 the error comes back from a worker process as text inside a RuntimeError."""
    from monai.data import DataLoader, Dataset

    from scripts.data.training_data import CheckedLoadImaged

    root = pairs(tmp_path / "pairs")
    put(_nan(), root / "sub0" / "drf_4.nii.gz")
    data = [{"image": str(root / "sub0" / "drf_4.nii.gz"), "label": str(root / "sub0" / "full_dose.nii.gz")}]
    loader = DataLoader(Dataset(data, CheckedLoadImaged(["image", "label"], image_only=True)), num_workers=1)
    with pytest.raises(Exception) as info:
        next(iter(loader))
    found = user_error(info.value)  # PyTorch 2.13 re-raises it as a RuntimeError: then the text is parsed
    message = str(found) if found is not None else worker_user_error(info.value)
    assert message is not None and message.endswith(
        "drf_4.nii.gz has 1 NaN/Inf voxel(s): fix the reconstruction, or set them to 0 before using it"
    )


# ------------------------------------------------------------------ names in logs, hidden entries (issue 12)

FORGED = "p1\nerror: forged line\x1b[2J"


def test_a_newline_in_a_folder_name_cannot_forge_log_lines_and_hidden_entries_are_reported(tmp_path):
    data, out = tmp_path / "in", tmp_path / "out"
    save_nifti(RNG.uniform(0.5, 5.0, size=(16, 16, 16)), AFFINE, data / "a.nii.gz")
    series(data / FORGED)
    save_nifti(RNG.uniform(0.5, 5.0, size=(16, 16, 16)), AFFINE, data / ".hidden_scan.nii.gz")
    series(data / ".hidden_series")
    (data / ".DS_Store").write_text("x")
    (data / "notes.txt").write_text("x")
    proc = bundle_run_inference(
        ["--dataset_dir", data, "--output_dir", out, "--checkpoint", "", "--allow_untrained", "true"]
        + ["--progress", "false", *TINY_INFERENCE],
        OMP_NUM_THREADS="1",
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert not [line for line in log.splitlines() if line.startswith("error:")], "a folder name forged an error line"
    assert "\x1b" not in log, "terminal escape sequences from a name reached the log"
    assert "'p1\\nerror: forged line\\x1b[2J'" in log, (
        "the name must be shown quoted, with its control characters escaped"
    )
    assert re.search(r"skipping hidden folder \.hidden_series: names starting with '\.' are hidden.*rename it", log)
    assert "skipping hidden file .hidden_scan.nii.gz" in log and "skipping hidden file .DS_Store" in log
    assert "skipping file notes.txt: not a NIfTI file" in log
    assert (out / f"{FORGED}_denoised.nii.gz").is_file() and (out / "a_denoised.nii.gz").is_file()
    assert not (out / ".hidden_scan_denoised.nii.gz").exists()
