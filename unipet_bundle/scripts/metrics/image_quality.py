"""PSNR, 3D SSIM, NRMSE and the texture-fidelity ratio, one implementation for training and evaluation.

Conventions (design notes, section 2): metrics are computed on SUV clipped to ``[0, clip_max]`` with data
range ``clip_max`` (20 SUV). The networks work in normalised units (SUV / 20); the same numbers come out
when the inputs are normalised and ``clip_max = data_range = 1``, because every metric here is
scale-invariant once the data range scales with the data.

All functions take tensors shaped (B, C, X, Y, Z) and return one value per batch item, shape (B,).

Two PSNRs, never to be mixed: ``psnr`` is UniPET's (SUV clipped to [0, 20], peak 20: comparable across
subjects, the paper's number) and ``psnr_refmax`` is UDPET's and most peers' (no clipping, peak = the
maximum of the reference volume: higher for a subject with a hot bladder, not comparable across subjects).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from monai.metrics.regression import RegressionMetric
from monai.utils import MetricReduction

from scripts.common.vml_dispatch import resolve_vml_dispatch

# local standard deviations and Gaussian windows of whole volumes: oneMKL's dispatch resolved first (reproducible)
resolve_vml_dispatch()

if TYPE_CHECKING:  # numpy is imported lazily in noise_autocorrelation (the metric classes do not need it)
    import numpy as np

__all__ = [
    "psnr",
    "psnr_refmax",
    "noise_autocorrelation",
    "ssim3d",
    "nrmse",
    "local_std",
    "texture_ratio",
    "ClippedPSNRMetric",
    "SSIM3DMetric",
    "NRMSEMetric",
    "quality_metrics",
]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def _clip(x: torch.Tensor, clip_max: float | None) -> torch.Tensor:
    return x if clip_max is None else x.clamp(0.0, clip_max)


def psnr(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 20.0, clip_max: float | None = 20.0
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``; identical volumes give ``inf``."""
    mse = (_flat(_clip(pred, clip_max)) - _flat(_clip(target, clip_max))).pow(2).mean(dim=1)
    out = 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 -> +inf, no warning, no NaN
    return out.float()


def psnr_refmax(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB as UDPET and most peers define it: ``10 log10(max(target)^2 / MSE)`` on unclipped data,
    the peak being the maximum of each reference volume. Not comparable with :func:`psnr` (UniPET's)."""
    t = _flat(target)
    mse = (_flat(pred) - t).pow(2).mean(dim=1)
    peak = t.max(dim=1).values
    return (10.0 * torch.log10(peak**2 / mse)).float()


def nrmse(pred: torch.Tensor, target: torch.Tensor, clip_max: float | None = 20.0) -> torch.Tensor:
    """Normalised RMSE, ``||pred - target||_2 / ||target||_2`` (the "euclidean" normalisation); 0 when equal."""
    p, t = _flat(_clip(pred, clip_max)), _flat(_clip(target, clip_max))
    num = (p - t).pow(2).sum(dim=1).sqrt()
    den = t.pow(2).sum(dim=1).sqrt()
    return torch.where(num == 0, torch.zeros_like(num), num / den).float()


def _gaussian_1d(win_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    r = torch.arange(win_size, dtype=dtype, device=device) - (win_size - 1) / 2.0
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _separable_blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """'valid' Gaussian filtering of (N, 1, X, Y, Z) with a 1D kernel along each axis (3 cheap passes)."""
    k = g.numel()
    x = F.conv3d(x, g.view(1, 1, k, 1, 1))
    x = F.conv3d(x, g.view(1, 1, 1, k, 1))
    return F.conv3d(x, g.view(1, 1, 1, 1, k))


def ssim3d(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 20.0,
    clip_max: float | None = 20.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """3D SSIM with a ``win_size^3`` Gaussian window (sigma in voxels), mean over valid positions and channels.

    The definition of ``monai.metrics.SSIMMetric(spatial_dims=3, kernel_type="gaussian")``, and the same numbers to
    about 1e-6 (tests/test_metrics.py), but kept as our own because MONAI's is not bit-for-bit this one: it computes
    in float32 (``E[x^2] - E[x]^2`` loses digits on flat SUV regions: 1.4e-6 off on a flat 2-SUV volume with 1 %
    noise) and uses population variances, where this one works in float64 with the sample covariance (as
    scikit-image does) and a separable window (3 passes of 11 taps instead of one of 11^3). Switching would move
    every recorded SSIM (evaluation metrics.csv, the model card's table) in the 6th decimal.
    Needs every spatial size >= ``win_size``.
    """
    if min(pred.shape[2:]) < win_size:
        raise ValueError(f"SSIM needs spatial size >= {win_size}, got {tuple(pred.shape[2:])}")
    b, c = pred.shape[:2]
    x = _clip(pred, clip_max).double().reshape(b * c, 1, *pred.shape[2:])
    y = _clip(target, clip_max).double().reshape(b * c, 1, *target.shape[2:])
    g = _gaussian_1d(win_size, sigma, x.dtype, x.device)
    mu_x, mu_y = _separable_blur(x, g), _separable_blur(y, g)
    cov_scale = win_size**3 / (
        win_size**3 - 1
    )  # sample (unbiased) covariance, as skimage; MONAI uses the population one
    var_x = cov_scale * (_separable_blur(x * x, g) - mu_x**2)
    var_y = cov_scale * (_separable_blur(y * y, g) - mu_y**2)
    cov = cov_scale * (_separable_blur(x * y, g) - mu_x * mu_y)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(b, c, -1).mean(dim=(1, 2)).float()


def local_std(x: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Local standard deviation in a ``window^3`` box (same shape as ``x``, replicate padding)."""
    pad = window // 2
    xp = F.pad(x.double(), (pad,) * 6, mode="replicate")
    mean = F.avg_pool3d(xp, window, stride=1)
    mean_sq = F.avg_pool3d(xp * xp, window, stride=1)
    return (mean_sq - mean**2).clamp_min(0).sqrt().to(x.dtype)


def texture_ratio(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Mean local std of ``pred`` over that of ``target`` inside ``mask`` (the RALS stylized region).

    1.0 keeps the full-dose texture; below 1 means over-smoothing (style elimination). NaN when the mask
    is empty for a batch item.
    """
    m = mask.bool()
    sp, st = local_std(pred, window), local_std(target, window)
    out = []
    for i in range(pred.shape[0]):
        mi = m[i]
        if not mi.any():
            out.append(torch.tensor(float("nan")))
            continue
        out.append((sp[i][mi].double().mean() / st[i][mi].double().mean()).float().cpu())
    return torch.stack(out)


def quality_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    data_range: float = 20.0,
    clip_max: float | None = 20.0,
    texture_window: int = 3,
) -> dict[str, float]:
    """PSNR, SSIM, NRMSE and texture ratio of one volume pair, as plain floats (the evaluation report's row).

    Args:
        pred: image to score, shape (1, 1, X, Y, Z) (or (1, X, Y, Z)), in SUV (or any unit matching ``data_range``).
        target: reference (full dose), same shape and unit.
        mask: stylized-region mask for the texture ratio (from the full dose), same shape; empty -> NaN.
        data_range, clip_max: as in :func:`psnr` / :func:`ssim3d` (SUV: 20 and 20).
        texture_window: box size of the local standard deviation.

    Returns:
        ``{"psnr", "psnr_refmax", "ssim", "nrmse", "texture_ratio"}``: ``psnr`` is UniPET's (clipped, peak
        ``data_range``), ``psnr_refmax`` UDPET's (unclipped, peak = max of ``target``); PSNR is ``inf`` for
        identical volumes.
        The texture ratio is computed on the same clipped data as the other metrics.
    """
    if pred.dim() == 4:
        pred, target, mask = pred[None], target[None], mask[None]
    if pred.shape[0] != 1 or pred.shape != target.shape or pred.shape != mask.shape:
        raise ValueError(
            f"expected one (1, C, X, Y, Z) pred/target/mask of one shape, got {list(pred.shape)}, "
            f"{list(target.shape)}, {list(mask.shape)}"
        )
    return {
        "psnr": float(psnr(pred, target, data_range, clip_max)[0]),
        "psnr_refmax": float(psnr_refmax(pred, target)[0]),
        "ssim": float(ssim3d(pred, target, data_range, clip_max)[0]),
        "nrmse": float(nrmse(pred, target, clip_max)[0]),
        "texture_ratio": float(texture_ratio(_clip(pred, clip_max), _clip(target, clip_max), mask, texture_window)[0]),
    }


class _PerItemMetric(RegressionMetric):
    """MONAI cumulative metric returning one value per batch item (shape (B, 1)), for Ignite handlers."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)

    def _value(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._value(y_pred, y).reshape(-1, 1).to(y_pred.device)


class ClippedPSNRMetric(_PerItemMetric):
    """PSNR (dB) on data clipped to [0, clip_max] with ``data_range`` (SUV: 20/20; normalised: 1/1).

    Not ``monai.metrics.PSNRMetric`` (and not named like it, so neither shadows the other): MONAI's takes the
    data as they are, while UniPET's PSNR clips both volumes to [0, clip_max] first (a bladder at SUV 60 must not
    dominate the score), and returns one value per batch item for the per-DRF validation handlers.
    """

    def __init__(self, data_range: float = 1.0, clip_max: float | None = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_range, self.clip_max = data_range, clip_max

    def _value(self, y_pred, y):
        return psnr(y_pred, y, self.data_range, self.clip_max)


class SSIM3DMetric(_PerItemMetric):
    """3D SSIM, 11^3 Gaussian window (sigma 1.5 voxels), on data clipped to [0, clip_max]."""

    def __init__(
        self, data_range: float = 1.0, clip_max: float | None = 1.0, win_size: int = 11, sigma: float = 1.5, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.data_range, self.clip_max, self.win_size, self.sigma = data_range, clip_max, win_size, sigma

    def _value(self, y_pred, y):
        return ssim3d(y_pred, y, self.data_range, self.clip_max, self.win_size, self.sigma)


class NRMSEMetric(_PerItemMetric):
    """NRMSE ``||pred - target|| / ||target||`` on data clipped to [0, clip_max]."""

    def __init__(self, clip_max: float | None = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clip_max = clip_max

    def _value(self, y_pred, y):
        return nrmse(y_pred, y, self.clip_max)


def noise_autocorrelation(
    volume: "np.ndarray",
    mask: "np.ndarray",
    spacing: tuple[float, float, float],
    max_lag: int = 4,
    detrend_fwhm_mm: float = 20.0,
) -> dict[str, list[float]]:
    """Noise texture in a uniform region: the normalised autocorrelation of the noise versus lag, in-plane
    (mean of x and y) and axially, plus the noise CoV.

    The noise is the image minus its local mean inside ``mask`` (a normalised Gaussian convolution of
    ``detrend_fwhm_mm``, so organ edges and slow uptake gradients do not count as noise); the
    autocorrelation at lag ``k`` along an axis is ``sum n(v) n(v + k) / sum n(v)^2`` over voxel pairs both in
    ``mask``. White noise gives 1, 0, 0...; a smoother (or axially more correlated) texture decays slower.

    Args:
        volume: (x, y, z) image (SUV).
        mask: (x, y, z) bool region, e.g. the liver eroded by a voxel.
        spacing: voxel size in mm (for the lags in mm and the detrending).
        max_lag: largest lag in voxels.
        detrend_fwhm_mm: FWHM of the local mean removed before measuring.

    Returns:
        ``{"lags_inplane_mm", "acf_inplane", "lags_axial_mm", "acf_axial", "cov_pct"}`` (lists; NaN where
        no pairs exist).
    """
    import numpy as np
    from scipy import ndimage

    v = np.asarray(volume, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    sig = [detrend_fwhm_mm / 2.3548 / s for s in spacing]
    num = ndimage.gaussian_filter(np.where(m, v, 0.0), sig, mode="constant")
    den = ndimage.gaussian_filter(m.astype(np.float64), sig, mode="constant")
    noise = np.where(m, v - num / np.maximum(den, 1e-12), 0.0)
    var = float((noise[m] ** 2).mean()) if m.any() else float("nan")

    def acf(axis: int) -> list[float]:
        out = [1.0]
        n = v.shape[axis]
        for k in range(1, max_lag + 1):
            if k >= n:
                out.append(float("nan"))
                continue
            a = np.take(noise, range(n - k), axis=axis)
            b = np.take(noise, range(k, n), axis=axis)
            both = np.take(m, range(n - k), axis=axis) & np.take(m, range(k, n), axis=axis)
            out.append(float((a * b)[both].mean() / var) if both.any() and var > 0 else float("nan"))
        return out

    inplane = [(a + b) / 2.0 for a, b in zip(acf(0), acf(1))]
    mean = float(v[m].mean()) if m.any() else float("nan")
    return {
        "lags_inplane_mm": [k * 0.5 * (spacing[0] + spacing[1]) for k in range(max_lag + 1)],
        "acf_inplane": inplane,
        "lags_axial_mm": [k * spacing[2] for k in range(max_lag + 1)],
        "acf_axial": acf(2),
        "cov_pct": 100.0 * math.sqrt(var) / mean if mean and math.isfinite(var) else float("nan"),
    }


def analytic_psnr(noise_std: float, data_range: float) -> float:
    """PSNR of additive noise with standard deviation ``noise_std`` (for tests and sanity checks)."""
    return 20.0 * math.log10(data_range / noise_std)
