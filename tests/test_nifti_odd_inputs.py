"""Odd NIfTI headers that inference used to take at face value (found by probing it as a physicist would): spatial
units other than mm, voxel sizes no PET scanner makes, and an orientation the header itself contradicts or omits."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
from test_inference import TINY as TINY_INFERENCE
from test_inference import bundle_run as bundle_run_inference

from scripts.common.errors import UniPETInputError
from scripts.data.io import load_nifti
from scripts.inference.inputs import check_voxel_size

RNG = np.random.default_rng(5)


def _save(path, affine, units="mm", qcode=1, scode=1, qform=None):
    img = nib.Nifti1Image(RNG.uniform(0.5, 3.0, size=(12, 11, 10)).astype(np.float32), affine)
    img.header.set_xyzt_units(units, "sec")
    img.set_qform(affine if qform is None else qform, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize(("units", "scale"), [("meter", 1e-3), ("micron", 1e3), ("mm", 1.0), ("unknown", 1.0)])
def test_the_affine_is_read_in_mm_whatever_the_header_units(tmp_path, units, scale):
    affine = np.diag([4.0, 4.0, 3.0, 1.0])
    affine[:3, 3] = [-20.0, 10.0, 5.0]
    stored = affine.copy()
    stored[:3, :] *= scale  # 4 mm written in the header's own unit
    _, read = load_nifti(_save(tmp_path / "x.nii.gz", stored, units))
    np.testing.assert_allclose(read, affine, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [0.004, 4000.0])
def test_a_voxel_size_no_pet_scanner_makes_is_refused(size):
    with pytest.raises(UniPETInputError, match=r"voxel size .* mm is not a PET voxel \(0\.1-20 mm\)"):
        check_voxel_size("x.nii.gz", np.diag([size, size, size, 1.0]))
    check_voxel_size("x.nii.gz", np.diag([4.0, 4.0, 2.0, 1.0]))  # a real one passes


def test_a_4000_mm_voxel_is_one_error_line_through_the_bundle_not_a_petabyte_allocation(tmp_path):
    data, out = tmp_path / "in", tmp_path / "out"
    data.mkdir()
    _save(data / "a.nii.gz", np.diag([4000.0, 4000.0, 4000.0, 1.0]))
    proc = bundle_run_inference(
        ["--dataset_dir", data, "--output_dir", out, "--checkpoint", "", "--allow_untrained", "true", *TINY_INFERENCE]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is not a PET voxel" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists() or not any(out.rglob("*.nii*"))


def test_a_header_that_contradicts_or_omits_its_orientation_is_warned_about(tmp_path, caplog):
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    flipped = np.diag([-4.0, 4.0, 4.0, 1.0])
    with caplog.at_level(logging.WARNING, logger="scripts.data.io"):
        load_nifti(_save(tmp_path / "agree.nii.gz", affine))
        assert not caplog.records
        load_nifti(_save(tmp_path / "disagree.nii.gz", affine, qform=flipped))
        assert "qform and sform disagree" in caplog.text
        caplog.clear()
        load_nifti(_save(tmp_path / "none.nii.gz", affine, qcode=0, scode=0))
        assert "neither a qform nor an sform" in caplog.text
