"""Known-value tests of the one metric implementation shared by training validation and evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.metrics import SSIMMetric

from scripts.losses.rals import stylized_mask
from scripts.metrics.image_quality import (
    ClippedPSNRMetric,
    NRMSEMetric,
    SSIM3DMetric,
    analytic_psnr,
    nrmse,
    psnr,
    quality_metrics,
    ssim3d,
    texture_ratio,
)


def _volume(shape=(1, 1, 24, 24, 24), lo=5.0, hi=15.0, seed=0) -> torch.Tensor:
    """Smooth 'activity' well inside [0, 20] SUV, so clipping never touches it."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool3d(torch.rand(shape, generator=g), 5, stride=1, padding=2, count_include_pad=False)
    x = (x - x.min()) / (x.max() - x.min())
    return lo + (hi - lo) * x


def test_identical_volumes():
    x = _volume()
    p = psnr(x, x)
    assert p.shape == (1,) and math.isinf(p.item()) and p.item() > 0 and not math.isnan(p.item())
    assert ssim3d(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert nrmse(x, x).item() == 0.0
    assert texture_ratio(x, x, torch.ones_like(x)).item() == pytest.approx(1.0, abs=1e-6)
    m = quality_metrics(x, x, torch.ones_like(x))
    assert math.isinf(m["psnr"]) and m["ssim"] == pytest.approx(1.0, abs=1e-6) and m["nrmse"] == 0.0


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0])
def test_psnr_of_gaussian_noise_matches_analytic(sigma):
    g = torch.Generator().manual_seed(1)
    x = _volume((1, 1, 64, 64, 64))
    y = x + sigma * torch.randn(x.shape, generator=g)
    assert y.min() > 0 and y.max() < 20, "noise must not reach the clip limits"
    expected = 20 * math.log10(20.0 / sigma)
    assert expected == pytest.approx(analytic_psnr(sigma, 20.0))
    assert psnr(y, x, data_range=20.0).item() == pytest.approx(expected, abs=0.1)
    # NRMSE of the same noise: sigma / RMS(x)
    assert nrmse(y, x).item() == pytest.approx(sigma / x.pow(2).mean().sqrt().item(), rel=0.02)


def test_psnr_clips_to_suv_range():
    x = _volume()
    y = x.clone()
    y[..., 0, 0, 0] = 100.0  # a hot voxel beyond the clip: counts as 20
    err = (20.0 - x[..., 0, 0, 0].item()) ** 2 / x.numel()
    assert psnr(y, x).item() == pytest.approx(10 * math.log10(400 / err), abs=1e-3)


def test_ssim_equals_monai_ssim_metric():
    g = torch.Generator().manual_seed(2)
    x = _volume((2, 1, 20, 18, 16), lo=2, hi=17, seed=3)
    y = (x + torch.randn(x.shape, generator=g)).clamp(0, 20)
    ref = SSIMMetric(spatial_dims=3, data_range=20.0, win_size=11, kernel_sigma=1.5, reduction="none")(y, x).flatten()
    ours = ssim3d(y, x, data_range=20.0)
    assert torch.allclose(ours, ref.float(), atol=1e-5), (ours, ref)
    assert (ours < 0.99).all(), "noisy volumes must not score ~1"


def test_no_metric_name_shadows_monai():
    """Our classes are not MONAI's (ours clip to [0, clip_max] and return one value per item): other names."""
    import monai.metrics

    from scripts.metrics import image_quality

    assert [n for n in image_quality.__all__ if hasattr(monai.metrics, n)] == []


def test_ssim_needs_window_sized_volumes():
    with pytest.raises(ValueError, match="spatial size"):
        ssim3d(torch.zeros(1, 1, 10, 20, 20), torch.zeros(1, 1, 10, 20, 20))


def test_texture_ratio_smoothing_and_empty_mask():
    g = torch.Generator().manual_seed(4)
    full = _volume() + 0.5 * torch.randn(1, 1, 24, 24, 24, generator=g)
    smooth = F.avg_pool3d(full, 3, stride=1, padding=1, count_include_pad=False)
    mask = stylized_mask(full, threshold=1e-3)  # SUV^2 threshold on SUV data
    assert mask.mean() > 0.5
    assert texture_ratio(full, full, mask).item() == pytest.approx(1.0, abs=1e-6)
    r = texture_ratio(smooth, full, mask).item()
    assert 0 < r < 0.8
    assert texture_ratio(full + 0.5 * torch.randn(full.shape, generator=g), full, mask).item() > 1.1
    assert math.isnan(texture_ratio(full, full, torch.zeros_like(full)).item())
    assert math.isnan(quality_metrics(smooth, full, torch.zeros_like(full))["texture_ratio"])


def test_normalised_metric_classes_equal_suv_functions():
    """Training validation (normalised units, range 1) and evaluation (SUV, range 20) give the same numbers."""
    g = torch.Generator().manual_seed(5)
    full = _volume((2, 1, 16, 16, 16))
    low = (full + torch.randn(full.shape, generator=g)).clamp(0, 20)
    for cls, fn in ((ClippedPSNRMetric, psnr), (SSIM3DMetric, ssim3d), (NRMSEMetric, nrmse)):
        metric = cls()
        metric(low / 20.0, full / 20.0)
        per_item = metric.get_buffer().flatten()
        assert torch.allclose(per_item, fn(low, full), rtol=1e-4), cls.__name__
        assert metric.aggregate().item() == pytest.approx(fn(low, full).mean().item(), rel=1e-4)


def test_quality_metrics_shape_checks():
    x = _volume()
    with pytest.raises(ValueError, match="one shape"):
        quality_metrics(x, x[..., :20], torch.ones_like(x))
    m = quality_metrics(x[0], x[0] + 0.1, torch.ones_like(x[0]))  # (C, X, Y, Z) accepted
    assert set(m) == {"psnr", "psnr_refmax", "ssim", "nrmse", "texture_ratio"}
    assert m["psnr"] == pytest.approx(20 * math.log10(20 / 0.1), abs=1e-3)
