"""The pair lists that the training/evaluation configs feed to MONAI datasets."""

import json

import pytest

from scripts.data.datalist import write_datalist
from scripts.data.io import UniPETInputError
from scripts.data.training_data import paired_datalist
from test_training import make_pairs


def test_on_the_fly_split_is_by_subject_with_absolute_paths(tmp_path):
    root = make_pairs(tmp_path / "d", n_subjects=5, shape=(8, 8, 6))
    train = paired_datalist(root, "training", val_fraction=0.2, seed=0)
    val = paired_datalist(root, "validation", val_fraction=0.2, seed=0)
    assert train and val
    assert {e["subject"] for e in train}.isdisjoint({e["subject"] for e in val})
    for e in train + val:
        assert e["image"].startswith(str(root.resolve())) and e["label"].endswith("full_dose.nii.gz")
    assert paired_datalist(root, "training", val_fraction=0.2, seed=0) == train  # deterministic


def test_datalist_file_and_drf_filter(tmp_path):
    root = make_pairs(tmp_path / "d", n_subjects=3, shape=(8, 8, 6))
    dl = write_datalist(root, output=tmp_path / "dl.json", val_fraction=0.34, test_fraction=0.0)
    train = paired_datalist(root, "training", datalist_file=dl, drfs=[20])
    assert train and all(int(e["drf"]) == 20 for e in train)
    assert all(not e["subject"].startswith("/") for e in train), "subject ids must stay ids"
    assert paired_datalist(root, "test", datalist_file=dl) == []  # an empty split is fine, not a crash


def test_max_items_and_errors(tmp_path):
    root = make_pairs(tmp_path / "d", n_subjects=4, shape=(8, 8, 6))
    assert len(paired_datalist(root, "training", val_fraction=0.0, max_items=3)) == 3
    with pytest.raises(UniPETInputError, match="not found"):
        paired_datalist(root, "training", datalist_file=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UniPETInputError, match="not valid JSON"):
        paired_datalist(root, "training", datalist_file=bad)
    (tmp_path / "stale.json").write_text(json.dumps({"training": [{"image": "gone/drf_4.nii.gz", "label": "gone/full_dose.nii.gz", "drf": 4, "subject": "gone"}]}))
    with pytest.raises(UniPETInputError, match="re-create the datalist"):
        paired_datalist(root, "training", datalist_file=tmp_path / "stale.json")
    with pytest.raises(UniPETInputError, match="unknown split"):
        paired_datalist(root, "train")
