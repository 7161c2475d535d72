"""Per-DRF evaluation (configs/evaluate.json): `monai.bundle run` end to end, and its parts in-process."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from test_training import TINY, bundle_run, make_pairs

from scripts.common.errors import CheckpointError, UniPETInputError
from scripts.common.io import atomic_write_json
from scripts.common.weights import atomic_torch_save
from scripts.data.datalist import write_datalist
from scripts.data.io import save_nifti
from scripts.evaluation.regions import bias_pct, hottest_lesion_voxel, region_rows, summarise_regions
from scripts.evaluation.report import METRIC_COLUMNS, EvaluationReport, write_csv
from scripts.evaluation.split import evaluation_datalist
from scripts.evaluation.weights import load_eval_weights
from scripts.networks.unipet import UniPET

EVAL_CONFIG = "['configs/train.json','configs/evaluate.json']"
SHAPE, SPACING = (20, 16, 40), (4.0, 4.0, 3.0)  # tall in z, anisotropic: exercises the montage aspect
DRFS = (4, 20)
BODY, LIVER, LESION, HOT = 1, 2, 3, 4
LESION_AT, HOT_AT = (10, 8, 12), (6, 8, 30)


def _ball(center, radius) -> np.ndarray:
    idx = np.indices(SHAPE).astype(float)
    return sum((idx[i] - center[i]) ** 2 for i in range(3)) <= radius**2


def make_labelled_pairs(root: Path, n_subjects: int = 3, with_labels=(0, 1), seed: int = 0) -> Path:
    """Simulated-looking subjects with a body, a liver, a lesion (SUV 8) and a hot lesion (SUV 25).

    Lesion voxels are set exactly after the noise so their SUV statistics are known by hand:
    lesion full dose 8 with one voxel 10, low dose 8 with one voxel 12 (SUVmax bias +20 %); hot lesion
    25 everywhere in both (the network sees SUV clipped to 20, so an identity network gives -20 %).
    """
    rng = np.random.default_rng(seed)
    affine = np.diag([*SPACING, 1.0])
    idx = np.indices(SHAPE).astype(float)
    body = ((idx[0] - 10) / 8) ** 2 + ((idx[1] - 8) / 6) ** 2 + ((idx[2] - 20) / 18) ** 2 <= 1
    liver = _ball((12, 8, 20), 3.5) & body
    lesion, hot = _ball(LESION_AT, 1.5), _ball(HOT_AT, 1.5)
    labels = np.zeros(SHAPE, np.int16)
    labels[body], labels[liver], labels[lesion], labels[hot] = BODY, LIVER, LESION, HOT
    table = {
        str(BODY): {"name": "body", "kind": "organ", "true_suv": 1.0, "volume_ml": 0.0},
        str(LIVER): {"name": "liver", "kind": "organ", "true_suv": 2.5, "volume_ml": 0.0},
        str(LESION): {"name": "lesion_1", "kind": "lesion", "true_suv": 8.0, "volume_ml": 0.0},
        str(HOT): {"name": "lesion_hot", "kind": "lesion", "true_suv": 25.0, "volume_ml": 0.0},
    }
    truth = np.where(body, 1.0, 0.05) + np.where(liver, 1.5, 0.0)
    for s in range(n_subjects):
        sub = root / f"sub{s}"

        def _noisy(sigma):
            img = truth + gaussian_filter(rng.normal(0, sigma, SHAPE), 0.7) * np.sqrt(truth)
            img[lesion], img[hot] = 8.0, 25.0
            return np.clip(img, 0, None)

        full = _noisy(0.05)
        full[LESION_AT] = 10.0
        save_nifti(full, affine, sub / "full_dose.nii.gz")
        for d in DRFS:
            low = _noisy(0.1 * np.sqrt(d))
            low[LESION_AT] = 12.0
            save_nifti(low, affine, sub / f"drf_{d}.nii.gz")
        if s in with_labels:
            save_nifti(labels, affine, sub / "labels.nii.gz", dtype=np.int16)
            atomic_write_json(sub / "labels.json", table)
        atomic_write_json(sub / "simulation.json", {"data_kind": "simulated data"})
    return root


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _strict_json(path: Path):
    def _reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=_reject)


# --------------------------------------------------------------------------------------------------
# through monai.bundle run
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def identity_run(tmp_path_factory):
    """No checkpoint (identity network), every subject, label maps on sub0 and sub1."""
    tmp = tmp_path_factory.mktemp("eval_identity")
    data = make_labelled_pairs(tmp / "pairs")
    proc = bundle_run(
        [
            "--config_file",
            EVAL_CONFIG,
            "--dataset_dir",
            str(data),
            "--ckpt_dir",
            str(tmp / "ckpt"),
            "--checkpoint",
            "",
            "--allow_untrained",
            "true",
            "--output_dir",
            str(tmp / "out"),
            "--eval_split",
            "all",
            *TINY,
        ]
    )
    return proc, tmp / "out" / "eval"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A non-identity checkpoint and a datalist with a test split."""
    tmp = tmp_path_factory.mktemp("eval_trained")
    data = make_pairs(tmp / "pairs", n_subjects=4)
    datalist = write_datalist(data, tmp / "datalist.json", val_fraction=0.25, test_fraction=0.25, seed=1)
    torch.manual_seed(0)
    net = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    with torch.no_grad():
        net.output_conv.weight.normal_(0, 0.05)  # not the identity any more
    ckpt = atomic_torch_save(net.state_dict(), tmp / "weights" / "unipet.pt")
    proc = bundle_run(
        [
            "--config_file",
            EVAL_CONFIG,
            "--dataset_dir",
            str(data),
            "--datalist_file",
            str(datalist),
            "--checkpoint",
            str(ckpt),
            "--output_dir",
            str(tmp / "out"),
            *TINY,
        ]
    )
    return proc, tmp / "out" / "eval", ckpt, json.loads(datalist.read_text())


def test_identity_run_metrics_csv(identity_run):
    proc, eval_dir = identity_run
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "UNTRAINED" in log and "WARNING" in log
    for s in range(3):
        for d in DRFS:
            assert f"sub{s} DRF {d}: PSNR" in log, "one log line per item"
    columns, rows = _csv(eval_dir / "metrics.csv")
    assert columns == list(METRIC_COLUMNS)
    assert sorted((r["subject"], r["drf"]) for r in rows) == sorted((f"sub{s}", str(d)) for s in range(3) for d in DRFS)
    for r in rows:
        vals = {k: float(r[k]) for k in columns[3:]}
        assert all(math.isfinite(v) for v in vals.values()), r
        assert 15 < vals["psnr"] < 70 and 0 < vals["ssim"] < 1 and 0 < vals["nrmse"] < 1, r
        # an identity network: the denoised output is the input (up to sliding-window blending round-off)
        for m in ("psnr", "ssim", "nrmse", "texture_ratio"):
            assert vals[m] == pytest.approx(vals[f"input_{m}"], rel=1e-4, abs=1e-5), (m, r)
        assert abs(vals["psnr_gain_db"]) < 1e-3
        assert vals["input_texture_ratio"] > 1, "a noisy input has more texture than the full dose"
    by = {(r["subject"], r["drf"]): float(r["psnr"]) for r in rows}
    assert all(by[(f"sub{s}", "4")] > by[(f"sub{s}", "20")] + 3 for s in range(3)), "DRF 20 is noisier than DRF 4"


def test_identity_run_summary(identity_run):
    proc, eval_dir = identity_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = _strict_json(eval_dir / "summary.json")
    assert "simulated" in summary["data_kind"] and "mixed" not in summary["data_kind"]
    assert summary["simulated_subjects"] == 3
    assert summary["checkpoint"]["trained"] is False and summary["checkpoint"]["checkpoint_sha256"] is None
    assert summary["subjects"] == 3 and summary["items"] == 6
    assert set(summary["splits"]) == {"training", "validation", "test"}  # eval_split "all": every subject
    _, rows = _csv(eval_dir / "metrics.csv")
    assert set(summary["per_drf"]) == {"4", "20"}
    for drf, entry in summary["per_drf"].items():
        assert entry["subjects"] == 3 and entry["psnr_inf_count"] == 0
        for col in ("psnr", "ssim", "nrmse", "texture_ratio", "input_psnr"):
            assert entry[col] == pytest.approx(np.mean([float(r[col]) for r in rows if r["drf"] == drf]), rel=1e-5)
    assert summary["files"]["regions"] == "regions.csv"
    assert sorted(summary["files"]["montages"]) == [f"montage_sub{s}.png" for s in range(3)]
    # |SUVmax bias| is 20 % for lesion_1 (noise-free peak 12 vs 10) and 0 for the 25-SUV lesion, which the
    # identity network passes through unclipped (clip_input false: quantification above 20 SUV survives)
    for drf in ("4", "20"):
        reg = summary["regions_per_drf"][drf]
        assert reg["n_lesions"] == 4  # 2 labelled subjects x 2 lesions
        assert reg["mean_abs_lesion_suvmax_bias_pct"] == pytest.approx(10.0, abs=0.01)
        assert reg["mean_abs_lesion_input_suvmax_bias_pct"] == pytest.approx(10.0, abs=0.01)


def test_identity_run_regions_by_hand(identity_run):
    proc, eval_dir = identity_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    columns, rows = _csv(eval_dir / "regions.csv")
    assert {
        "subject",
        "drf",
        "label",
        "kind",
        "suvmax_bias_pct",
        "suvmean_bias_pct",
        "input_suvmax_bias_pct",
        "suvmax_bias_true_pct",
    } <= set(columns)
    assert len(rows) == 2 * len(DRFS) * 4, "labelled subjects x DRFs x regions"
    assert {r["subject"] for r in rows} == {"sub0", "sub1"}
    n_lesion = int(_ball(LESION_AT, 1.5).sum())
    for r in rows:
        f = {k: float(r[k]) for k in columns if k not in ("subject", "drf", "name", "kind", "size_bin", "host")}
        if r["name"] == "lesion_1":
            assert r["kind"] == "lesion" and int(f["voxels"]) == n_lesion
            assert f["full_suvmax"] == pytest.approx(10.0, abs=1e-5) and f["input_suvmax"] == pytest.approx(
                12.0, abs=1e-5
            )
            assert f["suvmax_bias_pct"] == pytest.approx(20.0, abs=0.01)  # (12 - 10) / 10
            assert f["input_suvmax_bias_pct"] == pytest.approx(20.0, abs=0.01)
            full_mean, low_mean = (8 * (n_lesion - 1) + 10) / n_lesion, (8 * (n_lesion - 1) + 12) / n_lesion
            assert f["suvmean_bias_pct"] == pytest.approx(100 * (low_mean - full_mean) / full_mean, abs=0.01)
            assert f["full_suvmax_bias_true_pct"] == pytest.approx(25.0, abs=1e-3)  # 10 vs true 8
            assert f["suvmax_bias_true_pct"] == pytest.approx(50.0, abs=0.01)  # 12 vs true 8
            assert f["volume_ml"] == pytest.approx(n_lesion * 0.048, rel=1e-6)
            # the evaluate workflow passes the voxel size: SUVpeak (1 mL) is scored, and lies below SUVmax
            assert 0 < f["full_suvpeak"] <= f["full_suvmax"] and 0 < f["input_suvpeak"] <= f["input_suvmax"]
        elif r["name"] == "lesion_hot":
            # input and full dose agree at 25 SUV; the network sees it unclipped, so nothing is lost at 20
            assert f["input_suvmax_bias_pct"] == pytest.approx(0.0, abs=1e-6)
            assert f["suvmax_bias_pct"] == pytest.approx(0.0, abs=0.01)
        else:
            assert r["kind"] == "organ" and math.isfinite(f["suvmean_bias_pct"])


def test_identity_run_montages(identity_run):
    proc, eval_dir = identity_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for s in range(3):
        img = mpimg.imread(eval_dir / f"montage_sub{s}.png")
        assert img.ndim == 3 and img.shape[0] > 600 and img.shape[1] > 600
        assert img[..., :3].std() > 0.1, "a blank figure"
    assert not list(eval_dir.glob(".*tmp*")), "temporary files left behind"


def test_trained_run_on_test_split(trained_run):
    proc, eval_dir, ckpt, datalist = trained_run
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "UNTRAINED" not in log and "VALIDATION subjects instead" not in log
    summary = _strict_json(eval_dir / "summary.json")
    assert summary["checkpoint"]["trained"] is True
    assert summary["checkpoint"]["checkpoint"] == str(ckpt.resolve())
    assert summary["checkpoint"]["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert "simulated" not in summary["data_kind"] and summary["simulated_subjects"] == 0
    assert "regions_per_drf" not in summary and not (eval_dir / "regions.csv").exists()
    _, rows = _csv(eval_dir / "metrics.csv")
    test_subjects = set(datalist["subjects"]["test"])
    assert len(test_subjects) == 1
    assert {r["subject"] for r in rows} == test_subjects and {r["split"] for r in rows} == {"test"}
    assert len(rows) == len(datalist["test"]) == 2
    assert all(abs(float(r["psnr"]) - float(r["input_psnr"])) > 1e-3 for r in rows), "weights were not loaded"
    # issue 16: an evaluation run has no key metric, so no "best metric" line (a mean PSNR across DRFs selects
    # nothing here); the per-DRF numbers are the report's (same metric code as training validation)
    assert "best metric" not in log.lower() and "best value" not in log.lower()
    assert "Metrics -- val_psnr:" not in log


# --------------------------------------------------------------------------------------------------
# the parts, in-process
# --------------------------------------------------------------------------------------------------
def test_evaluation_datalist_splits_and_fallback(tmp_path, caplog):
    data = make_pairs(tmp_path / "pairs", n_subjects=3, shape=(12, 12, 12))
    with caplog.at_level(logging.WARNING):
        entries = evaluation_datalist(data, "test", None, None, 0.34, 0)
    assert "VALIDATION" in caplog.text
    assert {e["split"] for e in entries} == {"validation"} and len(entries) == 2
    assert all(Path(e["image_path"]).is_file() and Path(e["label_path"]).is_file() for e in entries)
    every = evaluation_datalist(data, "all", None, None, 0.34, 0)
    assert [(e["subject"], e["drf"]) for e in every] == [(f"sub{s}", d) for s in range(3) for d in (4, 20)]
    assert len(evaluation_datalist(data, "all", None, [20], 0.34, 0)) == 3
    with pytest.raises(UniPETInputError, match="eval_split"):
        evaluation_datalist(data, "testing")
    with pytest.raises(UniPETInputError, match="nothing to evaluate"):
        evaluation_datalist(data, "test", None, None, 0.0, 0)


def test_load_eval_weights(tmp_path, caplog):
    net = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    with caplog.at_level(logging.WARNING):
        info = load_eval_weights(net, "", allow_untrained=True)
    assert info["trained"] is False and "UNTRAINED" in caplog.text
    with pytest.raises(
        CheckpointError, match="missing.pt: the file does not exist"
    ):  # a typo never evaluates untrained
        load_eval_weights(net, tmp_path / "missing.pt", allow_untrained=True)
    with pytest.raises(CheckpointError, match="no checkpoint given"):
        load_eval_weights(net, None)
    src = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    with torch.no_grad():
        src.output_conv.weight.fill_(0.01)
    # a full training checkpoint (generator entry) loads too
    path = atomic_torch_save({"generator": src.state_dict(), "trainer": {"iteration": 3}}, tmp_path / "latest.pt")
    info = load_eval_weights(net, path)
    assert info["trained"] and info["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(net.output_conv.weight, src.output_conv.weight)
    stage1 = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4), use_san=False)
    assert "stage-1" in load_eval_weights(net, atomic_torch_save(stage1.state_dict(), tmp_path / "s1.pt"))["note"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_eval_weights(net, tmp_path / "bad.pt")
    wrong = UniPET(channels=8, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_eval_weights(net, atomic_torch_save(wrong.state_dict(), tmp_path / "wrong.pt"))


def test_region_rows_by_hand():
    labels = np.zeros((6, 6, 6), np.int32)
    labels[1:3, 1:3, 1:3] = 5  # 8 voxels, not in the table
    labels[4, 4, 4] = 7
    full = np.ones(labels.shape, np.float32)
    full[labels == 7] = 4.0
    low, pred = full * 1.5, full.copy()
    pred[4, 4, 4] = 3.0
    table = {7: {"name": "tiny", "kind": "lesion", "true_suv": 5.0}}
    rows = {r["label"]: r for r in region_rows("s", "10", labels, table, full, low, pred, voxel_ml=0.5)}
    assert set(rows) == {5, 7}
    assert rows[5]["name"] == "label_5" and rows[5]["kind"] == "unknown" and rows[5]["volume_ml"] == 4.0
    assert math.isnan(rows[5]["suvmax_bias_true_pct"])
    assert rows[7]["suvmax_bias_pct"] == pytest.approx(-25.0) and rows[7]["input_suvmax_bias_pct"] == pytest.approx(
        50.0
    )
    assert rows[7]["full_suvmean_bias_true_pct"] == pytest.approx(-20.0)
    assert hottest_lesion_voxel(full, labels, table) == ((4, 4, 4), "tiny")
    assert hottest_lesion_voxel(full, labels, {}) is None
    # slices go through the centre of the hottest lesion, not through the first of its tied maxima
    big = np.zeros(SHAPE, np.int32)
    big[_ball(LESION_AT, 2.5)], big[_ball(HOT_AT, 2.5)] = 1, 2
    suv = np.where(big == 2, 25.0, np.where(big == 1, 8.0, 1.0))
    two = {1: {"name": "a", "kind": "lesion"}, 2: {"name": "b", "kind": "lesion"}}
    assert hottest_lesion_voxel(suv, big, two) == (HOT_AT, "b")
    summary = summarise_regions(list(rows.values()))
    assert summary["10"]["n_lesions"] == 1 and summary["10"]["mean_abs_lesion_suvmax_bias_pct"] == pytest.approx(25.0)
    assert math.isnan(bias_pct(1.0, 0.0)) and math.isnan(bias_pct(1.0, None))


def test_report_handles_inf_psnr_and_empty_mask(tmp_path):
    """Identical volumes: PSNR inf in the CSV, excluded (and counted) in the summary; a flat volume: NaN texture."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (12, 12, 12)
    flat = np.full(shape, 2.0, np.float32)  # no texture anywhere: empty RALS mask
    path = save_nifti(flat, affine, tmp_path / "a" / "full_dose.nii.gz")
    report = EvaluationReport(tmp_path / "eval", write_montages=True)
    x = torch.from_numpy(flat / 20.0)[None]
    g = torch.Generator().manual_seed(0)
    noisy = x + 0.01 * torch.randn(x.shape, generator=g)
    report.add_item(
        {"subject": "a", "drf": torch.tensor(4), "label_path": str(path), "split": "test"},
        {"image": noisy, "label": x, "pred": x.clone()},
    )
    row = report.add_item(
        {"subject": "a", "drf": 10.0, "label_path": str(path), "split": "test"},
        {"image": noisy, "label": x, "pred": noisy},
    )
    assert math.isfinite(row["psnr"])
    report.write()
    _, rows = _csv(tmp_path / "eval" / "metrics.csv")
    assert [r["drf"] for r in rows] == ["4", "10"]
    assert (
        rows[0]["psnr"] == "inf" and rows[0]["texture_ratio"] == "nan" and float(rows[0]["ssim"]) == pytest.approx(1.0)
    )
    assert rows[0]["nrmse"] == "0" and rows[0]["psnr_gain_db"] == "inf"
    summary = _strict_json(tmp_path / "eval" / "summary.json")
    assert summary["per_drf"]["4"]["psnr"] is None and summary["per_drf"]["4"]["psnr_inf_count"] == 1
    assert summary["per_drf"]["10"]["psnr"] == pytest.approx(float(rows[1]["psnr"]), rel=1e-5)
    assert summary["per_drf"]["4"]["texture_ratio_nan_count"] == 1
    assert (tmp_path / "eval" / "montage_a.png").is_file()


def test_write_csv_spells_out_special_values(tmp_path):
    path = write_csv(
        tmp_path / "x.csv",
        [{"a": float("inf"), "b": float("nan"), "c": 1 / 3}, {"a": -math.inf, "c": "t"}],
        ["a", "b", "c"],
    )
    assert path.read_text() == "a,b,c\ninf,nan,0.333333\n-inf,,t\n"
