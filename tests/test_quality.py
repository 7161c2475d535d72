"""The quality benchmark (scripts.benchmarks.quality) and the training driver (scripts.benchmarks.train_models)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLE_ROOT
from scripts.benchmarks import quality, train_models
from scripts.data import simulate as sim
from scripts.data.io import UniPETInputError
from scripts.inference.denoise import network_from_config

FAST = dict(n_angles=64, n_subsets=8, n_iterations=3)


def _perturbed_default_net(path: Path, seed: int) -> Path:
    """A state_dict of the default-size UniPET that is not the identity."""
    torch.manual_seed(seed)
    net, _ = network_from_config(BUNDLE_ROOT / "configs" / "train.json", BUNDLE_ROOT)
    with torch.no_grad():
        net.output_conv.weight.normal_(0.0, 0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("quality") / "work"
    data = work / "sim"
    for i in range(2):
        sim.simulate_subject(data, f"phantom_{i:03d}", shape=(32, 32, 24), drfs=[4, 20, 30], seed=i, **FAST)
    sim.simulate_subject(data, "real_x", activity=data / "phantom_001" / "activity.nii.gz", drfs=[4, 20, 30], seed=5, **FAST)

    def entries(subject):
        return [{"image": f"{subject}/drf_{d}.nii.gz", "label": f"{subject}/full_dose.nii.gz", "drf": d, "subject": subject}
                for d in (4, 20)]

    (data / "datalist.json").write_text(json.dumps(
        {"training": [], "validation": entries("phantom_000"), "test": entries("phantom_001") + entries("real_x")}))
    for seed, rel in enumerate(["vanilla/model_stage1.pt", "drf_4/model_stage1.pt", "drf_20/model_stage1.pt",
                                "san_only/model.pt", "rals_only/model.pt"]):
        _perturbed_default_net(work / "models" / rel, seed)
    _perturbed_default_net(work / "unipet.pt", 9)
    return work


def test_quality_benchmark_end_to_end(work):
    result = quality.run(str(work), checkpoint=str(work / "unipet.pt"), drfs=[4, 20, 30], update_docs=False)
    out = work / "quality"
    for name in ("quality.json", "cases.csv", "quality.md", "quality.png"):
        assert (out / name).is_file(), name
    assert result["test_subjects"] == ["phantom_001", "real_x"]
    assert set(result["gaussian"]) == {"4", "20", "30"}
    # a heavier DRF never wants a narrower optimal filter on the same subject
    assert result["gaussian"]["4"]["fwhm_mm"] <= result["gaussian"]["30"]["fwhm_mm"]
    s = result["summary"]
    assert set(s) == {"input", "gaussian", "unipet", "vanilla", "drf_specific", "san_only", "rals_only"}
    for m in s:
        for d in ("4", "20", "30"):
            assert s[m][d]["subjects"] == 2 and math.isfinite(s[m][d]["psnr"])
    # the tuned filter beats the raw input at a high DRF (it was tuned on another subject)
    assert s["gaussian"]["30"]["psnr"] > s["input"]["30"]["psnr"]
    # lesions come from the phantom only; the real-series subject has none, and is reported on its own
    assert s["unipet"]["20"]["lesions"] > 0
    assert result["real_subject"]["subject"] == "real_x"
    rows = (out / "cases.csv").read_text().splitlines()
    assert len(rows) == 1 + 7 * 2 * 3
    assert len(result["targets"]) == 4 * 3 + 1
    table = (out / "quality.md").read_text()
    assert "simulated data" in table and "| 30 | DRF-specific * |" in table and "Targets (" in table
    assert "sha256" not in table and result["provenance"]["checkpoints_sha256"]


def _summary(unipet: float, specific: float, vanilla: float, tex_u: float, tex_v: float, bias: float) -> dict:
    def e(psnr, tex=1.0, b=None):
        return {"psnr": psnr, "texture_ratio": tex, "mean_abs_lesion_suvmax_bias_pct": b}
    return {"input": {"20": e(30.0)}, "gaussian": {"20": e(32.0)}, "unipet": {"20": e(unipet, tex_u, bias)},
            "drf_specific": {"20": e(specific)}, "vanilla": {"20": e(vanilla, tex_v)}}


@pytest.mark.parametrize("args, met", [
    ((34.0, 34.1, 33.9, 0.9, 0.8, 5.0), [True, True, True, True, True]),
    ((32.5, 34.0, 33.0, 0.7, 0.8, 12.0), [False, False, False, False, False]),  # < 1 dB over the Gaussian
    ((33.5, 33.8, 33.6, 1.05, 0.9, 9.9), [True, False, False, True, True]),
])
def test_targets_are_judged_from_the_numbers(args, met):
    checks = quality.check_targets(_summary(*args), ["20"])
    assert [c["met"] for c in checks] == met, checks


def test_model_card_table_is_replaced_between_markers_only(tmp_path):
    docs = tmp_path / "README.md"
    docs.write_text(f"# card\nbefore\n{quality.TABLE_BEGIN}\nold table\n{quality.TABLE_END}\nafter\n")
    quality.update_model_card(docs, "| new |\n")
    assert docs.read_text() == f"# card\nbefore\n{quality.TABLE_BEGIN}\n| new |\n{quality.TABLE_END}\nafter\n"
    docs.write_text("no markers")
    with pytest.raises(UniPETInputError, match="markers"):
        quality.update_model_card(docs, "x")
    assert docs.read_text() == "no markers"
    shipped = (BUNDLE_ROOT / "docs" / "README.md").read_text()
    assert shipped.count(quality.TABLE_BEGIN) == 1 and shipped.count(quality.TABLE_END) == 1


def test_missing_model_is_a_clear_error(tmp_path, work):
    bare = tmp_path / "w"
    (bare / "sim").mkdir(parents=True)
    (bare / "sim" / "datalist.json").write_text((work / "sim" / "datalist.json").read_text())
    with pytest.raises(UniPETInputError, match="train it with `python -m scripts.benchmarks.train_models`"):
        quality.run(str(bare), checkpoint=str(work / "unipet.pt"), update_docs=False)


def test_train_models_commands(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_models, "_run", lambda cmd, threads: calls.append((cmd, threads)))
    tm = train_models.TrainModels(str(tmp_path / "w"), threads=1)
    with pytest.raises(UniPETInputError, match="run the `data` step first"):
        tm.unipet()
    (tmp_path / "w" / "sim").mkdir(parents=True)
    tm.datalist.write_text("{}")
    tm.unipet()
    cmd, threads = calls[-1]
    assert cmd[1:5] == ["-m", "monai.bundle", "run", "--config_file"] and threads == 1
    assert cmd[cmd.index("--ckpt_dir") + 1].endswith("models/unipet")
    with pytest.raises(UniPETInputError, match="run the `unipet` step first"):
        tm.branch("vanilla")
    snap = tm.models / "unipet" / train_models.SNAPSHOT
    snap.parent.mkdir(parents=True)
    snap.write_bytes(b"x")
    tm.branch("rals_only")
    cmd = calls[-1][0]
    assert cmd[cmd.index("--init_checkpoint") + 1] == str(snap)
    assert cmd[-4:] == ["--train_san", "false", "--align_weight", "0"]
    tm.drf_specific([20])
    cmd = calls[-1][0]
    assert cmd[cmd.index("--drfs") + 1] == "[20]" and cmd[cmd.index("--stage1_epochs") + 1] == "23"
    with pytest.raises(UniPETInputError, match="unknown branch"):
        tm.branch("nope")
    # the snapshot name follows the default config's stage-1 length
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    assert train_models.SNAPSHOT == f"checkpoint_iter{parser.get_parsed_content('stage1_iterations'):06d}.pt"


def test_ship_copies_weights_and_records_their_hash(tmp_path, monkeypatch):
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    monkeypatch.setattr(train_models, "BUNDLE_ROOT", root)
    tm = train_models.TrainModels(str(tmp_path / "w"))
    with pytest.raises(UniPETInputError, match="run the `unipet` step to the end first"):
        tm.ship()
    src = _perturbed_default_net(tm.models / "unipet" / "model.pt", 0)
    tm.ship()
    from scripts.deploy.large_files import recorded_sha256
    from scripts.engines.checkpoint import file_sha256

    assert (root / "models" / "model.pt").read_bytes() == src.read_bytes()
    assert recorded_sha256(root / "models" / "model.pt", root) == file_sha256(src)
    with pytest.raises(UniPETInputError, match="already exists"):
        tm.ship()


@pytest.mark.parametrize("module", ["scripts.benchmarks.quality", "scripts.benchmarks.train_models"])
def test_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=BUNDLE_ROOT, capture_output=True, text=True,
                          timeout=120, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "work_dir" in (proc.stdout + proc.stderr).lower().replace("-", "_")
