"""`python -m scripts.benchmarks.san_noise_probe`: the leave-one-subject-out ridge it scores with, the windows it draws,
and a run on tiny pairs with the shipped weights (the noise target, the table and JSON, bad input)."""

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
    good = probe.loso_ridge(informative, target, groups, predictions=True)
    assert good["r2"] > 0.95 and good["median_rel_error"] < 0.1
    sse = float(((good["pred"] - target) ** 2).sum())  # the score is that of the held-out predictions it returns
    assert abs(good["r2"] - (1 - sse / float(((target - target.mean()) ** 2).sum()))) < 1e-12
    assert "pred" not in probe.loso_ridge(informative, target, groups)
    useless = probe.loso_ridge(rng.normal(size=(200, 5)), target, groups)
    assert useless["r2"] < 0.1
    with pytest.raises(UniPETInputError, match="at least two subjects"):
        probe.loso_ridge(informative, target, np.zeros(200))
    # one value to predict (e.g. data at one DRF): there is nothing to explain, so no R^2 (not a perfect 1)
    assert probe.loso_ridge(informative, np.full(200, 1.5), groups)["r2"] is None
    assert probe._r2({"r2": None}) == "n/a" and probe._r2({"r2": 0.4}) == "0.400"


def test_study_level_finds_a_drf_the_image_cannot_tell_when_count_levels_vary_by_subject():
    rng = np.random.default_rng(0)
    drfs = np.array([4.0, 10.0, 20.0, 50.0, 100.0])
    windows = 6
    # window noise = count factor of the subject x sqrt(DRF), with a little window-to-window spread
    counts = {"a": 0.05, "b": 0.1, "c": 0.2, "d": 0.4, "e": 0.8}
    groups = np.repeat(np.array(list(counts)), len(drfs) * windows)
    drf = np.tile(np.repeat(drfs, windows), len(counts))
    noise = np.array([counts[g] for g in groups]) * np.sqrt(drf) * np.exp(0.01 * rng.normal(size=len(drf)))
    feats = {"reads_noise": np.log(noise)[:, None], "reads_nothing": rng.normal(size=(len(drf), 3))}
    study = probe.study_level(noise, drf, groups, feats, 0.01)
    assert study["studies"] == 25
    assert abs(study["within_subject_noise_slope"] - 0.5) < 0.01
    # count factors doubling over 5 subjects: their q10-q90 lies 2 ** 3.2 = 9.2x apart in noise, 85x in DRF at slope 0.5
    assert 75 < study["drf_span_of_one_label"] < 95
    # even the oracle, the study's true noise, cannot give the DRF across subjects
    for name in ("true_noise", "reads_noise", "reads_nothing"):
        assert study["probe"][name]["log_drf"]["r2"] < 0.3, name
    lo, mid, hi = study["noise_suv_by_drf"]["4"]
    assert lo == pytest.approx(0.1, rel=0.05) and hi == pytest.approx(1.6, rel=0.05)
    # one count level for every subject: the noise gives the DRF
    same = np.exp(0.01 * rng.normal(size=len(drf))) * 0.1 * np.sqrt(drf)
    study = probe.study_level(same, drf, groups, {"reads_noise": np.log(same)[:, None]}, 0.01)
    assert study["probe"]["true_noise"]["log_drf"]["r2"] > 0.99 and study["drf_span_of_one_label"] < 1.1


def test_windows_sit_at_the_same_places_for_every_drf_and_reach_the_volume_edge(tmp_path):
    data = _pairs(tmp_path / "pairs", n_subjects=1, shape=(32, 33, 40))
    full = str(data / "sub0" / "full_dose.nii.gz")
    entries = [  # a datalist may spell a DRF "4" or "drf_100"
        {"subject": "sub0", "drf": name, "image": str(data / "sub0" / f"drf_{d}.nii.gz"), "label": full}
        for d, name in ((4, "4"), (100, "drf_100"))
    ]
    drawn = probe.draw_windows(entries, 32, 5, 0.5, 0)
    assert [d["drf"] for d in drawn] == [4.0, 100.0]
    assert drawn[0]["full"] is drawn[1]["full"] and drawn[0]["low"].shape == (5, 1, 32, 32, 32)
    # same places: the two DRFs' windows differ only by their noise (std 0.1 and 0.5 SUV around the same full dose)
    for d, sd in zip(drawn, (0.1, 0.5)):
        assert abs(float((d["low"] - d["full"]).std()) - sd) < 0.05 * sd
    with pytest.raises(UniPETInputError, match="--windows must be at least 1"):
        probe.draw_windows(entries, 32, 0, 0.5, 0)
    with pytest.raises(UniPETInputError, match="smaller than the 48"):
        probe.draw_windows(entries, 48, 5, 0.5, 0)


def test_a_network_without_a_san_is_refused():
    from scripts.networks.unipet import UniPET

    with pytest.raises(UniPETInputError, match="no SAN"):
        probe.check_has_san(UniPET(channels=4, num_blocks=2, use_san=False))
    probe.check_has_san(UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4)))  # no error
    with pytest.raises(UniPETInputError, match="no windows"):
        probe.probe(UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4)), [], 20.0)


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
    args = ["--dataset_dir", str(data), "--split", "all", "--windows", "6", "--output", str(out)]
    proc = run_python("-m", "scripts.benchmarks.san_noise_probe", "--checkpoint", "models/model.pt", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "_points" not in result and "pred" not in json.dumps(result["probe"])
    assert "SAN latent probe" in proc.stdout and "log_noise" in proc.stdout
    assert result["subjects"] == 3 and result["windows"] == 3 * 6 * 2  # every subject: 6 windows x 2 DRFs
    assert set(result["probe"]) == {"san_latents", "noise_features"}
    for scores in result["probe"].values():
        assert set(scores) == {"log_noise", "log_drf"} and all(np.isfinite(v["r2"]) for v in scores.values())
    # the true window noise is 0.05 * sqrt(DRF) SUV here: its quantiles per DRF say so
    q = result["window_noise_suv_q10_q50_q90_by_drf"]
    assert abs(q["4"][1] - 0.1) < 0.01 and abs(q["100"][1] - 0.5) < 0.05
    assert result["corr_log_drf_log_noise"] > 0.99
    # per study: every subject has the same noise at a DRF here, so the true noise reads the DRF and one label
    # spans no range; noise ~ DRF^0.5
    study = result["study_level"]
    assert study["studies"] == 6 and set(study["probe"]) == {"san_latents", "noise_features", "true_noise"}
    assert study["probe"]["true_noise"]["log_drf"]["r2"] > 0.99
    assert abs(study["within_subject_noise_slope"] - 0.5) < 0.03 and study["drf_span_of_one_label"] < 1.2
    assert "Per study" in proc.stdout and "DRF^0.5" in proc.stdout
    # bad input: one line, exit 2, nothing written
    refused = tmp_path / "refused.json"
    bad = ["--checkpoint", str(tmp_path / "none.pt"), *args[:2], "--output", str(refused)]
    proc = run_python("-m", "scripts.benchmarks.san_noise_probe", *bad)
    assert proc.returncode == 2 and proc.stderr.startswith("error:"), proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and not refused.exists() and not refused.with_suffix(".png").exists()
    with pytest.raises(UniPETInputError, match="--dataset_dir is required"):
        probe.run(output=str(refused))
    assert not refused.exists()
