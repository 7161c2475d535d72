"""The validation criterion that selects the best checkpoint: PSNR minus texture and hot-spot penalties (issue 15)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from scripts.metrics.selection import SelectionScoreMetric, hotspot_suvmax_bias, selection_score


def _volumes():
    rng = np.random.default_rng(0)
    truth = np.full((40, 40, 40), 2.0)
    truth[18:21, 18:21, 18:21] = 10.0  # a 3-voxel lesion
    full = truth + gaussian_filter(rng.normal(0, 0.6, truth.shape), 0.7)
    noisy = truth + gaussian_filter(rng.normal(0, 1.5, truth.shape), 0.7)
    return truth, full, noisy


def test_psnr_prefers_the_over_smoothed_output_and_the_score_does_not():
    truth, full, noisy = _volumes()
    # over-smoothed: texture gone, lesion peak flattened (what PSNR rewards)
    smooth = gaussian_filter(noisy, 2.0)
    # texture-preserving: noise reduced to the full-dose level, lesion kept
    kept = truth + (noisy - truth) * 0.5
    t = lambda v: torch.from_numpy(v / 20.0).float()[None, None]  # noqa: E731
    s_smooth = selection_score(t(smooth), t(full))
    s_kept = selection_score(t(kept), t(full))
    assert s_smooth["psnr"] > s_kept["psnr"], "the setting of the test: PSNR alone picks the smooth one"
    assert s_smooth["texture_ratio"] < 0.6 and s_smooth["hotspot_bias"] < -0.3
    assert s_kept["score"] > s_smooth["score"]
    # penalties off: plain PSNR
    assert selection_score(t(smooth), t(full), texture_penalty_db=0, hotspot_penalty_db=0)["score"] == pytest.approx(
        s_smooth["psnr"]
    )


def test_hotspot_bias_and_metric_shapes():
    truth, full, _ = _volumes()
    low = full.copy()
    low[18:21, 18:21, 18:21] *= 0.8
    assert hotspot_suvmax_bias(low, full) == pytest.approx(-0.2, abs=0.02)
    assert math.isnan(hotspot_suvmax_bias(np.ones((10, 10, 10)), np.ones((10, 10, 10))))
    metric = SelectionScoreMetric()
    x = torch.from_numpy(np.stack([full, low]) / 20.0).float()[:, None]
    out = metric(x, torch.from_numpy(np.stack([full, full]) / 20.0).float()[:, None])
    assert out.shape == (2, 1) and out[1, 0] < out[0, 0]
    with pytest.raises(ValueError, match="tolerance"):
        SelectionScoreMetric(texture_tolerance=0)
