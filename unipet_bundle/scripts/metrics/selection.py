"""Model selection on what the denoiser is for: PSNR, minus penalties for lost texture and biased hot spots.

PSNR alone picks the smoothest checkpoint (issue 15): it rewards erasing the noise texture the method exists
to keep, and barely notices a lesion's SUVmax dropping by a third (a lesion is a few voxels). The
selection score, in dB, per validation volume:

``score = PSNR - texture_penalty_db * |ln(texture_ratio)| / ln(1 + texture_tolerance)
                 - hotspot_penalty_db * |mean hot-spot SUVmax bias| / hotspot_tolerance``

* ``texture_ratio``: mean local std (3^3) of the output over that of the full dose in the RALS textured
  region (:func:`scripts.metrics.image_quality.texture_ratio`); a ratio off by ``texture_tolerance``
  (15 %, the target band [0.85, 1.15]) costs ``texture_penalty_db`` (1 dB).
* hot-spot SUVmax bias: for every small hot structure of the full dose (found without labels by
  :func:`scripts.data.training_data.hotspot_mask`), ``max(output) / max(full) - 1`` over its voxels; the
  signed mean over structures; ``hotspot_tolerance`` (10 %, the lesion target at DRF <= 20) costs
  ``hotspot_penalty_db`` (1 dB).

A volume with no textured region or no hot spot gets no penalty for it. Penalties 0 give plain PSNR.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from scripts.losses.rals import normalised_threshold, stylized_mask
from scripts.metrics.image_quality import _PerItemMetric, psnr, texture_ratio

__all__ = ["hotspot_suvmax_bias", "selection_score", "SelectionScoreMetric"]


def hotspot_suvmax_bias(pred_suv: np.ndarray, full_suv: np.ndarray, **hotspot_kw) -> float:
    """Signed mean over the full dose's hot structures of ``max(pred) / max(full) - 1``; NaN without any."""
    from scipy.ndimage import label as connected_components
    from scipy.ndimage import maximum

    from scripts.data.training_data import hotspot_mask

    components, n = connected_components(hotspot_mask(full_suv, **hotspot_kw))
    if n == 0:
        return float("nan")
    index = np.arange(1, n + 1)
    max_pred = np.asarray(maximum(pred_suv, components, index), dtype=np.float64)
    max_full = np.asarray(maximum(full_suv, components, index), dtype=np.float64)
    return float(np.mean(max_pred / np.maximum(max_full, 1e-6) - 1.0))


def selection_score(
    pred: torch.Tensor,
    full: torch.Tensor,
    suv_max: float = 20.0,
    texture_penalty_db: float = 1.0,
    texture_tolerance: float = 0.15,
    hotspot_penalty_db: float = 1.0,
    hotspot_tolerance: float = 0.10,
    rals_threshold_suv2: float = 1e-3,
    rals_window: int = 3,
) -> dict[str, float]:
    """The score and its parts for one volume pair ``(1, 1, X, Y, Z)`` in network units (SUV / ``suv_max``).

    Returns ``{"score", "psnr", "texture_ratio", "hotspot_bias"}`` (dB, dB, ratio, fraction; NaN parts
    carry no penalty).
    """
    pred, full = pred.float(), full.float()
    p = float(psnr(pred, full, 1.0, 1.0)[0])
    mask = stylized_mask(full, window=rals_window, threshold=normalised_threshold(rals_threshold_suv2, suv_max))
    tr = float(texture_ratio(pred.clamp(0, 1), full.clamp(0, 1), mask)[0])
    bias = hotspot_suvmax_bias(pred[0, 0].cpu().numpy() * suv_max, full[0, 0].cpu().numpy() * suv_max)
    score = p
    if texture_penalty_db > 0 and math.isfinite(tr) and tr > 0:
        score -= texture_penalty_db * abs(math.log(tr)) / math.log(1.0 + texture_tolerance)
    if hotspot_penalty_db > 0 and math.isfinite(bias):
        score -= hotspot_penalty_db * abs(bias) / hotspot_tolerance
    return {"score": score, "psnr": p, "texture_ratio": tr, "hotspot_bias": bias}


class SelectionScoreMetric(_PerItemMetric):
    """:func:`selection_score` per batch item, as a MONAI cumulative metric for ``IgniteMetricHandler``.

    Inputs in network units, shape (B, 1, X, Y, Z). Args as in :func:`selection_score`.
    """

    def __init__(
        self,
        suv_max: float = 20.0,
        texture_penalty_db: float = 1.0,
        texture_tolerance: float = 0.15,
        hotspot_penalty_db: float = 1.0,
        hotspot_tolerance: float = 0.10,
        rals_threshold_suv2: float = 1e-3,
        rals_window: int = 3,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if texture_tolerance <= 0 or hotspot_tolerance <= 0:
            raise ValueError("texture_tolerance and hotspot_tolerance must be > 0")
        self.kw = dict(
            suv_max=float(suv_max),
            texture_penalty_db=float(texture_penalty_db),
            texture_tolerance=float(texture_tolerance),
            hotspot_penalty_db=float(hotspot_penalty_db),
            hotspot_tolerance=float(hotspot_tolerance),
            rals_threshold_suv2=float(rals_threshold_suv2),
            rals_window=int(rals_window),
        )

    def _value(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scores = [selection_score(y_pred[i : i + 1], y[i : i + 1], **self.kw)["score"] for i in range(y_pred.shape[0])]
        return torch.tensor(scores, dtype=torch.float32)
