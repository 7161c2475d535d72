"""`python -m scripts.benchmarks.san_noise_probe`: the leave-one-subject-out ridge it scores with, and a run on tiny
pairs with the shipped weights (windows at the same places for every DRF, the noise target, the table and JSON)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from conftest import run_python
from scripts.benchmarks import san_noise_probe as probe
from scripts.common.errors import UniPETInputError
from scripts.data.io import save_nifti


def test_loso_ridge_scores_held_out_subjects():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 50)
    target = rng.normal(size=200)
    informative = np.c_[2 * target + 0.05 * rng.normal(size=200), rng.normal(size=200)]
    good = probe.loso_ridge(informative, target, groups)
    assert good["r2"] > 0.95 and good["median_rel_error"] < 0.1
    useless = probe.loso_ridge(rng.normal(size=(200, 5)), target, groups)
    assert useless["r2"] < 0.1
    with pytest.raises(UniPETInputError, match="at least two subjects"):
        probe.loso_ridge(informative, target, np.zeros(200))


def _pairs(root, drfs=(4, 100), n_subjects=3, shape=(40, 40, 36)):
    rng = np.random.default_rng(1)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    for s in range(n_subjects):
        act = np.where(gaussian_filter(rng.random(shape), 3) * 10 > 4.9, 6.0, 1.0)
        save_nifti(act, affine, root / f"sub{s}" / "full_dose.nii.gz")
        for d in drfs:
            save_nifti(act + rng.normal(0, 0.05 * np.sqrt(d), shape), affine, root / f"sub{s}" / f"drf_{d}.nii.gz")
    return root


def test_probe_cli_on_tiny_pairs_with_the_shipped_weights(tmp_path):
    data = _pairs(tmp_path / "pairs")
    out = tmp_path / "probe.json"
    args = ["--dataset_dir", str(data), "--split", "training", "--windows", "6", "--output", str(out)]
    proc = run_python("-m", "scripts.benchmarks.san_noise_probe", "--checkpoint", "models/model.pt", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "SAN latent probe" in proc.stdout and "log_noise" in proc.stdout
    # the split keeps 2 of 3 subjects for training (val_fraction 0.2 of 3 rounds to one): 6 windows x 2 DRFs each
    assert result["subjects"] >= 2 and result["windows"] == 12 * result["subjects"]
    assert set(result["probe"]) == {"san_latents", "simple_features"}
    for scores in result["probe"].values():
        assert set(scores) == {"log_noise", "log_drf"} and all(np.isfinite(v["r2"]) for v in scores.values())
    # the true window noise is 0.05 * sqrt(DRF) SUV here: its quantiles per DRF say so
    q = result["window_noise_suv_q10_q50_q90_by_drf"]
    assert abs(q["4"][1] - 0.1) < 0.01 and abs(q["100"][1] - 0.5) < 0.05
    assert result["corr_log_drf_log_noise"] > 0.99
    # bad input: one line, exit 2, nothing written
    refused = tmp_path / "refused.json"
    bad = ["--checkpoint", str(tmp_path / "none.pt"), *args[:2], "--output", str(refused)]
    proc = run_python("-m", "scripts.benchmarks.san_noise_probe", *bad)
    assert proc.returncode == 2 and proc.stderr.startswith("error:"), proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and not refused.exists()
    with pytest.raises(UniPETInputError, match="--dataset_dir is required"):
        probe.run(output=str(refused))
    assert not refused.exists()
