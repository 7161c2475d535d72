"""Lesion-level and texture metrics against hand-built cases: SUVpeak (1 mL sphere), RC, contrast recovery,
size bins, liver CoV and the QIBA flag, both PSNRs, and the noise autocorrelation."""

import math

import numpy as np
import pytest
import torch

from scripts.evaluation.regions import region_rows, summarise_regions, suv_peak
from scripts.metrics.image_quality import noise_autocorrelation, psnr, psnr_refmax

SP = (4.0, 4.0, 4.0)
SHAPE = (40, 40, 30)
CENTRE = (20, 20, 15)


def _ball(radius_mm):
    g = [(np.arange(n) - c) * s for n, c, s in zip(SHAPE, CENTRE, SP)]
    X, Y, Z = np.meshgrid(*g, indexing="ij", sparse=True)
    return X**2 + Y**2 + Z**2 <= radius_mm**2


def _case():
    labels = np.full(SHAPE, 8, np.int32)  # everything is "liver" (label 8)
    lesion = _ball(14.0)
    labels[lesion] = 100
    truth = np.where(lesion, 8.0, 2.0)
    table = {
        8: {"name": "liver", "kind": "organ", "true_suv": 2.0},
        100: {
            "name": "lesion_00",
            "kind": "lesion",
            "true_suv": 8.0,
            "diameter_mm": 28.0,
            "background_suv": 2.0,
            "host_label": 8,
            "contrast": 4.0,
        },
    }
    return labels, truth, table, lesion


def test_suvpeak_is_the_mean_over_a_1ml_sphere():
    _, truth, _, lesion = _case()
    # a uniform lesion much larger than the 1 mL sphere (6.2 mm radius): SUVpeak is its level exactly
    assert suv_peak(truth, lesion, SP) == pytest.approx(8.0, abs=1e-9)
    # one hot voxel: the sphere holds it whole (half-diagonal 3.5 mm < 6.2 mm) among 1000 / 64 voxel volumes
    spike = np.zeros(SHAPE)
    spike[CENTRE] = 100.0
    assert suv_peak(spike, lesion, SP) == pytest.approx(100.0 * 64.0 / 1000.0, rel=0.01)
    # SUVmax would be 100 there: the peak is what PERCIST reads because it is robust to one noisy voxel
    assert suv_peak(spike, lesion, (2.0, 2.0, 2.0)) == pytest.approx(100.0 * 8.0 / 1000.0, rel=0.01)


def test_region_rows_lesion_and_liver_by_hand():
    labels, truth, table, lesion = _case()
    full = truth.copy()
    low = np.where(lesion, 8.0 * 1.1, 2.0)
    pred = np.where(lesion, 8.0 * 0.9, 2.0)
    core = np.zeros(SHAPE, bool)
    core[1:-1, 1:-1, 1:-1] = True  # the liver eroded by one voxel (the lesion is inside it)
    checker = np.indices(SHAPE).sum(0) % 2 * 2 - 1  # +-1
    low = np.where(labels == 8, 2.0 + 0.2 * checker, low)  # liver noise: CoV 10 % (about the mean 2)
    rows = {r["label"]: r for r in region_rows("s", "10", labels, table, full, low, pred, 0.064, spacing=SP)}
    les, liver = rows[100], rows[8]
    assert les["size_bin"] == ">=20 mm" and les["true_contrast"] == pytest.approx(4.0)
    assert les["suvmax_bias_pct"] == pytest.approx(-10.0) and les["input_suvmax_bias_pct"] == pytest.approx(10.0)
    assert les["suvpeak"] == pytest.approx(7.2) and les["suvpeak_bias_pct"] == pytest.approx(-10.0)
    assert les["suvpeak_bias_true_pct"] == pytest.approx(-10.0) and les["full_suvpeak_bias_true_pct"] == pytest.approx(
        0.0
    )
    assert les["suvmean_bias_true_pct"] == pytest.approx(-10.0)
    assert les["rc_max"] == pytest.approx(0.9) and les["full_rc_max"] == pytest.approx(1.0)
    # contrast recovery: (7.2 / 2 - 1) / (4 - 1); the full dose recovers all of it
    assert les["full_cr"] == pytest.approx(1.0) and les["cr"] == pytest.approx((7.2 / 2 - 1) / 3)
    # the input's background shell is noisy liver whose mean is ~2 (checkerboard): CR close to 1.1's
    assert les["input_cr"] == pytest.approx((8.8 / 2 - 1) / 3, rel=0.02)
    assert liver["cov_pct"] == pytest.approx(0.0) and liver["full_cov_pct"] == pytest.approx(0.0)
    assert liver["input_cov_pct"] == pytest.approx(10.0, rel=0.01)
    summary = summarise_regions(list(rows.values()))["10"]
    assert summary["lesions_by_size"][">=20 mm"]["n"] == 1 and summary["lesions_by_size"]["<10 mm"]["n"] == 0
    assert summary["lesions_all"]["mean_suvmax_bias_pct"] == pytest.approx(-10.0)  # signed, not |.|
    assert summary["liver"]["within_qiba_5pct"] is True
    assert summary["liver"]["mean_input_cov_pct"] == pytest.approx(10.0, rel=0.01)
    # a liver 6 % low fails the QIBA bar
    rows2 = region_rows("s", "10", labels, table, full, low, np.where(labels == 8, 1.88, pred), 0.064, spacing=SP)
    assert summarise_regions(rows2)["10"]["liver"]["within_qiba_5pct"] is False


def test_the_two_psnrs_differ_as_defined():
    t = torch.zeros(1, 1, 8, 8, 8)
    t[..., 0, 0, 0] = 40.0  # a hot bladder voxel: above the UniPET clip of 20
    t[..., 1:, :, :] = 2.0
    p = t + 0.1
    mse = 0.01
    assert float(psnr_refmax(p, t)[0]) == pytest.approx(10 * math.log10(40.0**2 / mse), abs=1e-3)
    # UniPET's clips both to [0, 20]: the hot voxel differs by 0 there (both clipped to 20)
    mse_clip = 0.01 * (512 - 1) / 512
    assert float(psnr(p, t)[0]) == pytest.approx(10 * math.log10(20.0**2 / mse_clip), abs=1e-3)


def test_noise_autocorrelation_separates_white_from_axially_correlated_noise():
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32, 32), bool)
    mask[4:-4, 4:-4, 4:-4] = True
    white = 2.0 + 0.2 * rng.standard_normal(mask.shape)
    a = noise_autocorrelation(white, mask, (4.0, 4.0, 4.0))
    assert abs(a["acf_inplane"][1]) < 0.05 and abs(a["acf_axial"][1]) < 0.05
    assert a["cov_pct"] == pytest.approx(10.0, rel=0.1)
    # a [1, 1] moving average along z: neighbour correlation 0.5 axially, none in-plane
    n = rng.standard_normal((32, 32, 33))
    corr = 2.0 + 0.2 * (n[:, :, 1:] + n[:, :, :-1]) / math.sqrt(2)
    b = noise_autocorrelation(corr, mask, (4.0, 4.0, 4.0))
    assert b["acf_axial"][1] == pytest.approx(0.5, abs=0.08) and abs(b["acf_inplane"][1]) < 0.05
    assert b["lags_axial_mm"][2] == 8.0
