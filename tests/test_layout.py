"""Paired dataset layout: scanning, sorting, DRF parsing and every validation error."""

from pathlib import Path

import numpy as np
import pytest

from scripts.common.errors import UniPETInputError
from scripts.data.io import save_nifti
from scripts.data.layout import format_drf, parse_drf, scan_paired_dataset

SHAPE = (8, 8, 6)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _vol(path: Path, shape=SHAPE, affine=AFFINE, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return save_nifti(rng.random(shape, dtype=np.float32), affine, path, overwrite=True)


def make_subject(root: Path, name: str, drfs=(4, 20), suffix=".nii.gz", labels=False) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    _vol(d / f"full_dose{suffix}")
    for drf in drfs:
        _vol(d / f"drf_{drf}{suffix}", seed=1)
    if labels:
        save_nifti(np.zeros(SHAPE, np.int16), AFFINE, d / "labels.nii.gz", dtype=np.int16)
    return d


@pytest.mark.parametrize(
    "name, expected",
    [
        ("drf_20.nii.gz", 20),
        ("drf_2.5.nii", 2.5),
        ("/a/b/drf_100.nii.gz", 100),
        ("drf_20.0.nii.gz", 20),
        ("drf_4", 4),
        ("10", 10),
    ],
)
def test_parse_drf_ok(name, expected):
    value = parse_drf(name)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("name", ["drf_abc.nii.gz", "drf_0.nii.gz", "drf_-4.nii.gz", "drf_.nii.gz", "drf_1e2.nii.gz"])
def test_parse_drf_bad(name):
    with pytest.raises(UniPETInputError, match=name.split(".nii")[0]):
        parse_drf(name)


def test_format_drf():
    assert format_drf(20) == "20" and format_drf(20.0) == "20" and format_drf(2.5) == "2.5"


def test_scan_ok_sorted_mixed_suffixes_decimal_drf(tmp_path):
    make_subject(tmp_path, "sub10", drfs=(20, 4))
    make_subject(tmp_path, "sub2", drfs=(2.5, 10), suffix=".nii", labels=True)
    make_subject(tmp_path, "sub1", drfs=(100,))
    (tmp_path / "datalist.json").write_text("{}")  # top-level files are not subjects
    (tmp_path / ".cache").mkdir()  # hidden folders are skipped
    (tmp_path / "sub1" / "notes.txt").write_text("ignored")
    (tmp_path / "sub1" / "activity.nii.gz").write_bytes(b"")  # unknown NIfTI names are ignored, not read

    subjects = scan_paired_dataset(tmp_path)
    assert [s.subject for s in subjects] == ["sub1", "sub2", "sub10"]
    sub2 = subjects[1]
    assert list(sub2.drfs) == [2.5, 10]
    assert sub2.drfs[2.5].name == "drf_2.5.nii" and sub2.full_dose.name == "full_dose.nii"
    assert sub2.labels is not None and sub2.labels.name == "labels.nii.gz"
    assert subjects[0].labels is None
    assert list(subjects[2].drfs) == [4, 20]
    assert all(isinstance(k, int) for k in subjects[2].drfs)
    assert scan_paired_dataset(tmp_path) == subjects  # deterministic


def test_missing_dir(tmp_path):
    with pytest.raises(UniPETInputError, match="does not exist"):
        scan_paired_dataset(tmp_path / "nope")


def test_empty_dataset(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(UniPETInputError, match="no subject folders"):
        scan_paired_dataset(tmp_path)


def test_subject_without_full_dose(tmp_path):
    make_subject(tmp_path, "a")
    d = make_subject(tmp_path, "b")
    (d / "full_dose.nii.gz").unlink()
    with pytest.raises(UniPETInputError, match=r"subject 'b'.*no full_dose"):
        scan_paired_dataset(tmp_path)


def test_subject_without_drf(tmp_path):
    make_subject(tmp_path, "a", drfs=())
    with pytest.raises(UniPETInputError, match=r"subject 'a'.*no low-dose drf_<N>"):
        scan_paired_dataset(tmp_path)


@pytest.mark.parametrize("bad", ["drf_abc.nii.gz", "drf_0.nii.gz", "drf_-4.nii.gz"])
def test_unparseable_drf_file(tmp_path, bad):
    d = make_subject(tmp_path, "a")
    _vol(d / bad)
    with pytest.raises(UniPETInputError, match=rf"subject 'a'.*{bad}"):
        scan_paired_dataset(tmp_path, check_geometry=False)


def test_duplicate_drf(tmp_path):
    d = make_subject(tmp_path, "a", drfs=(20,))
    _vol(d / "drf_20.nii")
    with pytest.raises(UniPETInputError, match="two files for DRF 20"):
        scan_paired_dataset(tmp_path)


def test_shape_mismatch_names_pair(tmp_path):
    d = make_subject(tmp_path, "a", drfs=(4,))
    _vol(d / "drf_20.nii.gz", shape=(8, 8, 5))
    with pytest.raises(UniPETInputError, match=r"drf_20\.nii\.gz has shape \(8, 8, 5\) but full_dose\.nii\.gz"):
        scan_paired_dataset(tmp_path)


def test_spacing_mismatch_names_pair(tmp_path):
    d = make_subject(tmp_path, "a", drfs=(4,))
    _vol(d / "drf_20.nii.gz", affine=np.diag([2.0, 2.0, 2.5, 1.0]))
    with pytest.raises(UniPETInputError, match=r"drf_20\.nii\.gz and full_dose\.nii\.gz differ in spacing/affine"):
        scan_paired_dataset(tmp_path)
    # header-only scan can be switched off
    assert len(scan_paired_dataset(tmp_path, check_geometry=False)[0].drfs) == 2


def test_origin_mismatch(tmp_path):
    d = make_subject(tmp_path, "a", drfs=(4,))
    shifted = AFFINE.copy()
    shifted[:3, 3] = [0.0, 0.0, 10.0]
    _vol(d / "drf_20.nii.gz", affine=shifted)
    with pytest.raises(UniPETInputError, match="differ in spacing/affine"):
        scan_paired_dataset(tmp_path)


def test_labels_geometry_checked(tmp_path):
    d = make_subject(tmp_path, "a", drfs=(4,))
    save_nifti(np.zeros((8, 8, 5), np.int16), AFFINE, d / "labels.nii.gz", dtype=np.int16)
    with pytest.raises(UniPETInputError, match="labels.nii.gz has shape"):
        scan_paired_dataset(tmp_path)


def test_2d_image(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    _vol(d / "full_dose.nii.gz", shape=(8, 8))
    _vol(d / "drf_4.nii.gz", shape=(8, 8))
    with pytest.raises(UniPETInputError, match=r"full_dose\.nii\.gz: is a 2D image"):
        scan_paired_dataset(tmp_path)


def test_4d_volume(tmp_path):
    d = make_subject(tmp_path, "a", drfs=(4,))
    _vol(d / "drf_10.nii.gz", shape=(8, 8, 6, 2))
    with pytest.raises(UniPETInputError, match=r"drf_10\.nii\.gz: is a 4D volume"):
        scan_paired_dataset(tmp_path)


def test_corrupt_header(tmp_path):
    d = make_subject(tmp_path, "a", drfs=(4,))
    (d / "drf_10.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(UniPETInputError, match=r"drf_10\.nii\.gz: cannot read the NIfTI header"):
        scan_paired_dataset(tmp_path)
