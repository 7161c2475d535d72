"""Datalist: split by subject, determinism, fractions, explicit subjects, MONAI loading and the CLI."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from conftest import run_python
from scripts.common.errors import UniPETInputError
from scripts.data.datalist import make_datalist, split_subjects, write_datalist
from scripts.data.io import save_nifti

SHAPE = (8, 8, 6)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
DRFS = (4, 10, 20)


def make_dataset(root: Path, n: int, drfs=DRFS, labels_for=()) -> Path:
    vol = np.ones(SHAPE, np.float32)
    for i in range(n):
        d = root / f"sub{i:02d}"
        d.mkdir(parents=True)
        save_nifti(vol, AFFINE, d / "full_dose.nii.gz")
        for drf in drfs:
            save_nifti(vol, AFFINE, d / f"drf_{drf}.nii.gz")
        if i in labels_for:
            save_nifti(vol.astype(np.int16), AFFINE, d / "labels.nii.gz", dtype=np.int16)
    return root


@pytest.fixture(scope="module")
def ds20(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds20"), 20, labels_for=(3,))


def _subjects(entries):
    return {e["subject"] for e in entries}


def test_split_by_subject_all_drfs_together(ds20):
    dl = make_datalist(ds20, val_fraction=0.2, test_fraction=0.1, seed=0)
    splits = {k: _subjects(dl[k]) for k in ("training", "validation", "test")}
    assert not (splits["training"] & splits["validation"])
    assert not (splits["training"] & splits["test"])
    assert not (splits["validation"] & splits["test"])
    assert set().union(*splits.values()) == {f"sub{i:02d}" for i in range(20)}
    for split in ("training", "validation", "test"):
        for subject in splits[split]:
            assert sorted(e["drf"] for e in dl[split] if e["subject"] == subject) == list(DRFS)
    # fractions honoured: 20 subjects -> 4 validation, 2 test, 14 training
    assert [len(splits[k]) for k in ("training", "validation", "test")] == [14, 4, 2]
    assert dl["num_subjects"] == {"training": 14, "validation": 4, "test": 2}
    assert len(dl["training"]) == 14 * 3


def test_entry_format_and_metadata(ds20):
    dl = make_datalist(ds20, seed=3)
    entry = next(
        e for e in dl["training"] + dl["validation"] + dl["test"] if e["subject"] == "sub05" and e["drf"] == 20
    )
    assert entry == {"image": "sub05/drf_20.nii.gz", "label": "sub05/full_dose.nii.gz", "drf": 20, "subject": "sub05"}
    with_labels = [e for k in ("training", "validation", "test") for e in dl[k] if e["subject"] == "sub03"]
    assert with_labels and all(e["labels"] == "sub03/labels.nii.gz" for e in with_labels)
    assert dl["drfs"] == [4, 10, 20] and dl["seed"] == 3
    assert dl["created_by"] == "scripts.data.datalist" and dl["description"]
    assert Path(dl["dataset_dir"]) == ds20.resolve()


def test_deterministic_by_seed(ds20):
    a = make_datalist(ds20, seed=7)
    b = make_datalist(ds20, seed=7)
    c = make_datalist(ds20, seed=8)
    assert a == b
    assert a["subjects"] != c["subjects"]


def test_explicit_subjects(ds20):
    dl = make_datalist(ds20, val_subjects=["sub01", "sub02"], test_subjects="[sub19]", test_fraction=0.5)
    assert _subjects(dl["validation"]) == {"sub01", "sub02"}
    assert _subjects(dl["test"]) == {"sub19"}
    assert len(_subjects(dl["training"])) == 17
    # explicit val, fraction-based test drawn from the rest
    dl = make_datalist(ds20, val_subjects="sub00,sub07", test_fraction=0.1)
    assert _subjects(dl["validation"]) == {"sub00", "sub07"}
    assert len(_subjects(dl["test"])) == 2 and not (_subjects(dl["test"]) & {"sub00", "sub07"})


def test_explicit_subject_errors(ds20):
    with pytest.raises(UniPETInputError, match=r"subject\(s\) \['nope'\] not in the dataset"):
        make_datalist(ds20, val_subjects=["nope"])
    with pytest.raises(UniPETInputError, match="in both"):
        make_datalist(ds20, val_subjects=["sub01"], test_subjects=["sub01"])


def test_drf_filter(ds20):
    dl = make_datalist(ds20, drfs="[4,20]")
    assert {e["drf"] for e in dl["training"]} == {4, 20} and dl["drfs"] == [4, 20]
    with pytest.raises(UniPETInputError, match=r"--drfs \[7\] not found in any subject; available DRFs: \[4, 10, 20\]"):
        make_datalist(ds20, drfs=[7])


@pytest.mark.parametrize(
    "n, expected", [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (5, (3, 1, 1)), (10, (7, 2, 1))]
)
def test_small_datasets(n, expected, caplog):
    splits = split_subjects([f"s{i}" for i in range(n)], val_fraction=0.2, test_fraction=0.1, seed=0)
    assert tuple(len(splits[k]) for k in ("training", "validation", "test")) == expected
    if n < 3:
        assert "split is empty" in caplog.text


def test_bad_fractions():
    with pytest.raises(UniPETInputError, match="val_fraction"):
        split_subjects(["a", "b"], val_fraction=1.5)
    with pytest.raises(UniPETInputError, match="leaves nothing for training"):
        split_subjects(["a", "b"], val_fraction=0.6, test_fraction=0.4)
    with pytest.raises(UniPETInputError, match="no subject left for training"):
        split_subjects(["a", "b"], val_subjects=["a"], test_subjects=["b"])


def test_loads_with_monai(ds20, tmp_path):
    out = write_datalist(ds20, output=tmp_path / "datalist.json", seed=1)
    raw = json.loads(out.read_text())
    for key in ("training", "validation", "test"):
        items = load_decathlon_datalist(out, data_list_key=key, base_dir=ds20)
        assert len(items) == len(raw[key]) > 0
        for item in items:
            assert Path(item["image"]).is_file() and Path(item["label"]).is_file()
            assert Path(item["image"]).parent == Path(item["label"]).parent
            assert Path(item["subject"]).name == Path(item["image"]).parent.name  # MONAI resolves it to the folder
            if "labels" in item:
                assert Path(item["labels"]).is_file()
    with pytest.raises(UniPETInputError, match="already exists"):
        write_datalist(ds20, output=out)
    write_datalist(ds20, output=out, overwrite=True, seed=2)
    assert json.loads(out.read_text())["seed"] == 2


def _cli(bundle_root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_python("-m", "scripts.data.datalist", *args, cwd=bundle_root, timeout=120, PYTHONPATH=str(bundle_root))


def test_cli(bundle_root, ds20, tmp_path):
    help_run = _cli(bundle_root, "--help")
    assert help_run.returncode == 0 and "--val_fraction" in help_run.stdout + help_run.stderr

    out = tmp_path / "dl.json"
    ok = _cli(
        bundle_root,
        "--dataset_dir",
        str(ds20),
        "--output",
        str(out),
        "--seed",
        "4",
        "--val_subjects",
        "[sub01,sub02]",
        "--drfs",
        "[4,10]",
    )
    assert ok.returncode == 0, ok.stderr
    data = json.loads(out.read_text())
    assert _subjects(data["validation"]) == {"sub01", "sub02"} and data["drfs"] == [4, 10]

    again = _cli(bundle_root, "--dataset_dir", str(ds20), "--output", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert json.loads(out.read_text()) == data  # untouched

    bad = tmp_path / "bad"
    (bad / "s1").mkdir(parents=True)
    save_nifti(np.ones(SHAPE, np.float32), AFFINE, bad / "s1" / "full_dose.nii.gz")
    save_nifti(np.ones(SHAPE, np.float32), AFFINE, bad / "s1" / "drf_abc.nii.gz")
    err = _cli(bundle_root, "--dataset_dir", str(bad), "--output", str(tmp_path / "bad.json"))
    assert err.returncode == 2
    error_lines = [line for line in err.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "drf_abc.nii.gz" in error_lines[0]
    assert "Traceback" not in err.stderr
    assert not (tmp_path / "bad.json").exists()
    assert not any(p.name.startswith(".bad.json") for p in tmp_path.iterdir())
