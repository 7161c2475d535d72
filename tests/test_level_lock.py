"""The level lock of the inference residual (``level_lock_fwhm_mm``, issue 15: quantities are sacred).

The trained weights carry a level bias of their own (0.4.0: +1.4 % on a flat 2 SUV volume). With the lock
the network's correction loses its low-pass part on the network grid, so a flat volume keeps its level and
the volume its total activity, whatever the weights; structure finer than the FWHM passes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.data.level_lock import LevelLockd, lock_level
from scripts.inference.residual import NativeResidualSUVd


def _noise(shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_lock_removes_a_constant_and_keeps_the_sum_zero():
    flat = torch.full((24, 20, 16), 0.028)
    assert lock_level(flat.clone(), (4.0, 4.0, 4.0), 20.0).abs().max() < 1e-7
    c = _noise((30, 40, 25)) + 0.3  # a biased correction: mean 0.3
    locked = lock_level(c.clone(), (4.0, 4.0, 4.0), 20.0)
    # mirrored faces keep the filter's sum: the locked correction adds nothing to the total
    assert abs(locked.double().sum().item()) < 1e-3 * c.double().abs().sum().item()
    assert abs(locked.double().mean().item()) < 1e-6


def test_lock_passes_fine_structure_and_zero_fwhm_is_identity():
    c = _noise((32, 32, 32), seed=1)  # white: almost all its power is far above 1/FWHM
    locked = lock_level(c.clone(), (4.0, 4.0, 4.0), 20.0)
    kept = float((locked * c).sum() / (c * c).sum())
    assert kept > 0.99, f"the lock removed {100 * (1 - kept):.2f} % of a white correction"
    assert torch.equal(lock_level(c.clone(), (4.0, 4.0, 4.0), 0.0), c)
    # a smooth correction (a 40 mm wide bump) is mostly removed: that is what the lock is for
    x = torch.arange(32, dtype=torch.float32) * 4.0 - 64.0
    bump = torch.exp(-(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2) / (2 * 40.0**2))
    assert lock_level(bump.clone(), (4.0, 4.0, 4.0), 20.0).abs().max() < 0.3 * bump.max()


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "twenty", None, True, False])
def test_lock_refuses_a_bad_fwhm(bad):
    for build in (NativeResidualSUVd, LevelLockd):
        with pytest.raises(ValueError, match="level_lock_fwhm_mm"):
            build(level_lock_fwhm_mm=bad)
    with pytest.raises(ValueError, match="level_lock_fwhm_mm"):
        lock_level(torch.zeros(2, 2, 2), (4.0, 4.0, 4.0), bad)


def test_lock_refuses_a_width_below_one_voxel():
    """Below a voxel the Gaussian passes the correction almost whole, so the lock would remove all of it (the
    output would be the input): refused with the grid's voxel size, not run."""
    c = torch.randn(16, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"narrower than a voxel .*4 mm"):
        lock_level(c.clone(), (4.0, 4.0, 2.0), 3.0)
    kept = lock_level(c.clone(), (4.0, 4.0, 2.0), 4.0)  # one voxel: accepted, keeps part of the correction
    assert 0.2 < float(kept.std() / c.std()) < 0.9


def _residual_data(native: np.ndarray, native_affine: np.ndarray, net: torch.Tensor, net_affine: np.ndarray, gain):
    image = MetaTensor(net[None], affine=torch.as_tensor(net_affine), meta={"original_affine": native_affine})
    return {"image": image, "pred": image * gain, "native_suv": torch.from_numpy(native[None].copy())}


@pytest.mark.parametrize("resampled", [False, True])
def test_biased_network_keeps_the_total_and_a_flat_level(resampled):
    """A network that scales everything by 1.05 (a 5 % level bias) keeps the input's total and flat level
    with the lock; without it the total moves by 5 %."""
    suv_max = 20.0
    rng = np.random.default_rng(3)
    native = (2.0 + 0.3 * rng.standard_normal((40, 36, 32))).astype(np.float32)
    native_affine = np.diag([2.0, 2.0, 2.0, 1.0]) if resampled else np.diag([4.0, 4.0, 4.0, 1.0])
    if resampled:  # the network grid: 4 mm, half the voxels per axis, same field of view
        net = torch.from_numpy(native.reshape(20, 2, 18, 2, 16, 2).mean(axis=(1, 3, 5)) / suv_max)
        net_affine = np.diag([4.0, 4.0, 4.0, 1.0])
        net_affine[:3, 3] = 1.0  # voxel centres of 2x2x2 blocks of 2 mm voxels
    else:
        net, net_affine = torch.from_numpy(native / suv_max), native_affine
    totals = {}
    for fwhm in (0.0, 24.0):
        t = NativeResidualSUVd(suv_max=suv_max, level_lock_fwhm_mm=fwhm)
        out = t(_residual_data(native, native_affine, net, net_affine, 1.05))["pred"]
        totals[fwhm] = float(out.double().sum() / float(native.astype(np.float64).sum()))
    assert abs(totals[0.0] - 1.05) < 0.005, totals  # the bias, unlocked
    assert abs(totals[24.0] - 1.0) < 0.002, totals  # locked: the input's total


def test_inference_config_exposes_the_lock():
    from monai.bundle import ConfigParser

    from conftest import BUNDLE_ROOT

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    lock = float(parser["level_lock_fwhm_mm"])
    assert lock >= 0.0
    residual = parser.get_parsed_content("postprocessing#transforms#0")
    assert isinstance(residual, NativeResidualSUVd) and residual.level_lock_fwhm_mm == lock


def test_level_lockd_on_the_network_grid_keeps_the_input_total():
    """evaluate.json's form of the lock (prediction on the input's own grid), on a 5 % biased prediction."""
    from scripts.data.level_lock import LevelLockd

    image = MetaTensor(
        (2.0 + 0.3 * _noise((1, 24, 20, 16), seed=4)) / 20.0,
        affine=torch.diag(torch.tensor([3.0, 3.0, 2.0, 1.0])),
        meta={"filename_or_obj": "x.nii.gz"},
    )
    pred = image * 1.05
    out = LevelLockd(level_lock_fwhm_mm=20.0)({"image": image, "pred": pred})["pred"]
    assert isinstance(out, MetaTensor) and out.shape == pred.shape
    assert abs(float(out.double().sum() / image.double().sum()) - 1.0) < 1e-4
    assert torch.equal(LevelLockd(level_lock_fwhm_mm=0.0)({"image": image, "pred": pred})["pred"], pred)


@pytest.mark.parametrize("configs", [("train.json",), ("train.json", "evaluate.json")])
def test_validation_and_evaluation_score_the_locked_output(configs):
    """Training's validation (which selects the checkpoint) and evaluate.json score what inference.json writes."""
    from monai.bundle import ConfigParser

    from conftest import BUNDLE_ROOT
    from scripts.data.level_lock import LevelLockd

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / n) for n in configs])
    infer = ConfigParser()
    infer.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    lock = parser.get_parsed_content("validate#postprocessing#transforms#0")
    assert isinstance(lock, LevelLockd) and lock.level_lock_fwhm_mm == float(infer["level_lock_fwhm_mm"]) > 0
    assert parser.get_parsed_content("track_meta") is True  # the lock reads the voxel size from the affine


def test_lock_acts_in_millimetres_on_an_anisotropic_grid():
    """A Gaussian bump locked on a 4 x 4 x 2 mm grid keeps what the analytic transfer says: the low-pass of a
    Gaussian of sigma_b by one of sigma_f is a Gaussian whose peak is prod(sigma_b / sqrt(sigma_b^2 + sigma_f^2))."""
    from scripts.data.recon import FWHM_TO_SIGMA

    spacing, fwhm, sigma_b = (4.0, 4.0, 2.0), 20.0, 8.0  # bump sigma 8 mm on every axis
    shape = (48, 48, 96)
    axes = [(torch.arange(n, dtype=torch.float64) - n // 2) * sp for n, sp in zip(shape, spacing)]
    r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    bump = torch.exp(-r2 / (2 * sigma_b**2)).float()
    locked = lock_level(bump.clone(), spacing, fwhm)
    sigma_f = fwhm * FWHM_TO_SIGMA
    expected = 1.0 - (sigma_b / math.sqrt(sigma_b**2 + sigma_f**2)) ** 3
    centre = locked[shape[0] // 2, shape[1] // 2, shape[2] // 2].item()
    assert abs(centre - expected) < 0.01, (centre, expected)
    # the same bump with the axes' spacings mixed up is locked differently: the spacing is used per axis
    wrong = lock_level(bump.clone(), (2.0, 4.0, 4.0), fwhm)[shape[0] // 2, shape[1] // 2, shape[2] // 2].item()
    assert abs(wrong - expected) > 0.02


def test_evaluation_preprocessing_gives_the_lock_the_voxel_size(tmp_path):
    """The validation/evaluation preprocessing keeps the loader's affine, so LevelLockd sees 4 x 4 x 2 mm, not 1 mm."""
    from monai.bundle import ConfigParser

    from conftest import BUNDLE_ROOT
    from scripts.data.io import save_nifti
    from scripts.data.level_lock import LevelLockd

    for name in ("full_dose", "drf_4"):
        save_nifti(
            np.full((10, 12, 14), 2.0, np.float32), np.diag([4.0, 4.0, 2.0, 1.0]), tmp_path / "s" / f"{name}.nii.gz"
        )
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / n) for n in ("train.json", "evaluate.json")])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    pre = parser.get_parsed_content("validate#preprocessing")
    item = pre({"image": str(tmp_path / "s" / "drf_4.nii.gz"), "label": str(tmp_path / "s" / "full_dose.nii.gz")})
    spacing = np.linalg.norm(np.asarray(item["image"].affine)[:3, :3], axis=0)
    np.testing.assert_allclose(sorted(spacing), [2.0, 4.0, 4.0], atol=1e-5)
    out = LevelLockd(level_lock_fwhm_mm=20.0)({"image": item["image"], "pred": item["image"] * 1.05})["pred"]
    assert abs(float(out.sum() / item["image"].sum()) - 1.0) < 1e-4
    # without the loader's metadata (a user turning track_meta off) the lock refuses instead of guessing 1 mm
    train = ConfigParser()
    train.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    train["bundle_root"] = str(BUNDLE_ROOT)
    train["track_meta"] = False
    bare = train.get_parsed_content("validate#preprocessing")(
        {"image": str(tmp_path / "s" / "drf_4.nii.gz"), "label": str(tmp_path / "s" / "full_dose.nii.gz")}
    )
    with pytest.raises(ValueError, match="track_meta"):
        LevelLockd(level_lock_fwhm_mm=20.0)({"image": bare["image"], "pred": bare["image"]})


def test_lock_refuses_a_non_finite_correction():
    c = torch.zeros(8, 8, 8)
    c[4, 4, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        lock_level(c, (4.0, 4.0, 4.0), 20.0)


def test_inference_with_a_lock_narrower_than_a_voxel_is_a_user_error_and_writes_nothing(tmp_path):
    """The width rule can only be checked on the network grid, after the network ran: it must still end as a
    user error (one ``error:`` line, exit 2 at the CLI) with no output written."""
    import nibabel as nib

    from conftest import run_inference_in_process
    from scripts.common.errors import UniPETInputError, user_error

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    vol = np.full((24, 24, 16), 1.0, np.float32)
    vol[8:16, 8:16, 5:11] = 3.0
    nib.save(nib.Nifti1Image(vol, np.diag([4.0, 4.0, 4.0, 1.0])), src / "x.nii.gz")
    with pytest.raises(Exception) as info:
        run_inference_in_process(
            dataset_dir=str(src), output_dir=str(out), level_lock_fwhm_mm=2.0, qc_report=False, device="cpu"
        )
    err = user_error(info.value)
    assert isinstance(err, UniPETInputError) and "narrower than a voxel" in str(err) and "4 mm" in str(err)
    assert not out.exists() or not list(out.rglob("*.nii*"))
