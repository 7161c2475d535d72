"""Smoke tests of the benchmark CLIs (tiny sizes, one repeat) and of the inference benchmark's baseline.

The CLIs run in subprocesses exactly as a user runs them; each check below fails if a ratio field goes
missing or non-finite, the table stops printing, or the perturbed network collapses to the identity.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from conftest import run_python
from scripts.benchmarks.inference_speed import one_patch_at_a_time, patch_starts, perturb_network, synthetic_suv
from scripts.networks.unipet import UniPET

TINY_NET = {"channels": 4, "num_blocks": 2, "latent_dim": 8, "san_channels": [4, 4]}


def _cli(module: str, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return run_python("-m", module, *args, timeout=timeout)


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture
def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb_network(UniPET(**{**TINY_NET, "san_channels": tuple(TINY_NET["san_channels"])}), seed=0).eval()


# ------------------------------------------------------------------------------ library pieces


def test_patch_starts_cover_the_axis_like_monai():
    assert patch_starts(267, 64, 32) == [0, 32, 64, 96, 128, 160, 192, 203]
    assert patch_starts(128, 64, 32) == [0, 32, 64]
    assert patch_starts(40, 64, 32) == [0]


def test_baseline_equals_monai_constant_blend_on_the_same_windows(tiny_net):
    # Same windows, uniform weights: the one-at-a-time loop must reproduce MONAI's stitching, including
    # an axis shorter than the window (padded and cropped back).
    x = synthetic_suv((20, 17, 30), seed=1)[None, None] / 20.0
    for image in (x, x[:, :, :10]):
        with torch.no_grad():
            ours = SlidingWindowInferer([16] * 3, sw_batch_size=3, overlap=0.5, mode="constant")(image, tiny_net)
            base = one_patch_at_a_time(tiny_net, image, window=16, stride=8)
        assert base.shape == image.shape
        assert torch.allclose(base, ours, atol=1e-5), float((base - ours).abs().max())
        assert float((base - image).abs().max()) > 1e-3  # the perturbed network is not the identity


def test_baseline_window_limit_times_a_prefix_only(tiny_net):
    x = synthetic_suv((24, 20, 30), seed=2)[None, None] / 20.0
    with torch.no_grad():
        full = one_patch_at_a_time(tiny_net, x, window=16, stride=8)
        same = one_patch_at_a_time(tiny_net, x, window=16, stride=8, max_windows=10_000)
        part = one_patch_at_a_time(tiny_net, x, window=16, stride=8, max_windows=2)
    assert torch.equal(full, same)
    assert float((part[..., -4:] == 0).float().mean()) == 1.0  # the last windows along z never ran
    assert torch.isfinite(part).all()


def test_synthetic_volume_is_deterministic_and_whole_body_like():
    a, b, c = synthetic_suv((24, 20, 40), 0), synthetic_suv((24, 20, 40), 0), synthetic_suv((24, 20, 40), 1)
    assert a.shape == (24, 20, 40) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.max()) > 20.0  # a bladder above suv_max, as real studies have
    assert float((a == 0).float().mean()) > 0.2  # air around the body


# ------------------------------------------------------------------------------------- CLIs


def test_inference_benchmark_cli(tmp_path: Path):
    override = tmp_path / "tiny.json"
    override.write_text(json.dumps({**TINY_NET, "patch_size": [16, 16, 16]}))
    out = tmp_path / "bench.json"
    proc = _cli(
        "scripts.benchmarks.inference_speed",
        [
            "--override",
            str(override),
            "--sizes",
            "[[24,20,30],[40,40,40]]",
            "--repeats",
            "1",
            "--variants",
            "ours,baseline,e2e",
            "--baseline_window",
            "16",
            "--baseline_stride",
            "8",
            # the second size counts as "large": its baseline is timed on 3 of its 64 windows and scaled
            "--large_voxels",
            "30000",
            "--large_variants",
            "ours,baseline",
            "--large_baseline_windows",
            "3",
            "--output",
            str(out),
        ],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median s" in proc.stdout and "speed-up baseline / ours" in proc.stdout and "end to end" in proc.stdout
    res = json.loads(out.read_text())
    entry, large = res["sizes"]
    assert entry["shape"] == [24, 20, 30] and set(entry["variants"]) == {"ours", "baseline", "e2e"}
    assert _finite_positive(entry["speedup_ours"])
    for v in entry["variants"].values():
        assert _finite_positive(v["median_s"]) and 0.05 < v["peak_rss_gb"] < 8.0
    # 16^3 windows at overlap 0.25 with Gaussian weights vs stride 8 averaged: close, not equal
    diff = entry["vs_baseline"]["ours"]["max_abs_diff_suv"]
    assert math.isfinite(diff) and diff > 0
    assert entry["correction_max_suv"] > 0.1
    assert set(res["targets_met"]) == {
        "speedup_2x",
        "large_peak_rss_under_8gb",
        "small_under_60s",
        "e2e_speedup_1_5x",
        "e2e_peak_rss_3gb_6x_input",
    }
    assert large["baseline_extrapolated_from_windows"] == 3 and large["variants"]["baseline"]["windows"] == 64
    assert large["variants"]["baseline"]["timed_fraction"] == pytest.approx(3 / 64)
    assert _finite_positive(large["speedup_ours"]) and large["vs_baseline"] == {}  # a partial output is not compared
    assert "[x from 3]" in proc.stdout
    assert res["targets_met"]["speedup_2x"] == (min(entry["speedup_ours"], large["speedup_ours"]) >= 2.0)
    assert res["targets_met"]["large_peak_rss_under_8gb"] is None  # that size was not run


def test_inference_benchmark_end_to_end_against_todays_pipeline(tmp_path: Path):
    """Issue 14's comparison: e2e (correction-only inverse) vs e2e_today (the 0.2.0 Invertd pipeline), one run.

    At 1.65 mm the tiny study is resampled to the 4 mm network grid and back, so both inverses are
    exercised; their outputs must agree closely (they differ only in float64 vs float32 interpolation). The
    level lock is off here: the 0.2.0 pipeline has none, and with it on the outputs differ by what it removes.
    """
    override = tmp_path / "tiny.json"
    override.write_text(json.dumps({**TINY_NET, "patch_size": [16, 16, 16], "level_lock_fwhm_mm": 0.0}))
    out = tmp_path / "bench.json"
    proc = _cli(
        "scripts.benchmarks.inference_speed",
        [
            "--override",
            str(override),
            "--sizes",
            "[[60,50,70]]",
            "--repeats",
            "1",
            "--e2e_spacing",
            "1.65",
            "--variants",
            "e2e_today,e2e",
            "--output",
            str(out),
        ],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speed-up e2e_today / e2e" in proc.stdout and "x input" in proc.stdout
    res = json.loads(out.read_text())
    (entry,) = res["sizes"]
    assert set(entry["variants"]) == {"e2e_today", "e2e"}
    for v in entry["variants"].values():
        assert _finite_positive(v["peak_rss_over_input"])
        assert v["peak_rss_over_input"] == pytest.approx(v["peak_rss_gb"] * 1e9 / (4 * 60 * 50 * 70))
    assert _finite_positive(entry["speedup_e2e"]) and _finite_positive(entry["cpu_speedup_e2e"])
    assert entry["vs_e2e_today"]["max_abs_diff_suv"] < 0.05  # same method, only the inverse's arithmetic differs
    assert res["targets_met"]["e2e_speedup_1_5x"] == (entry["speedup_e2e"] >= 1.5)
    assert res["targets_met"]["e2e_peak_rss_3gb_6x_input"] is not None
    assert "Invertd" in json.dumps(res["today_pipeline_overrides"])
    # the baseline is the 0.2.0 pipeline: the C library's default host memory handling, not ours
    assert res["today_pipeline_overrides"]["host_memory_cache_mb"] == 0
    assert res["today_pipeline_overrides"]["fused_cpu_kernels"] is False  # nor our fused kernel


def test_inference_benchmark_bad_sizes_is_one_error_line(tmp_path: Path):
    proc = _cli("scripts.benchmarks.inference_speed", ["--sizes", "[[10,10]]", "--output", str(tmp_path / "x.json")])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --sizes"), proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_training_benchmark_cli(tmp_path: Path):
    override = tmp_path / "tiny_train.json"
    override.write_text(
        json.dumps(
            {**TINY_NET, "critic_channels": [4, 8], "patch_size": [16, 16, 16], "batch_size": 1, "num_samples": 1}
        )
    )
    out = tmp_path / "train_bench.json"
    proc = _cli(
        "scripts.benchmarks.training_speed",
        ["--override", str(override), "--repeats", "1", "--warmup", "0", "--output", str(out)],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 2 / stage 1 per iteration" in proc.stdout and "UniPET / vanilla inference" in proc.stdout
    res = json.loads(out.read_text())
    assert _finite_positive(res["ratio_stage2_over_stage1"])
    assert _finite_positive(res["ratio_unipet_over_vanilla_inference"])
    assert set(res["targets_met"]) == {"stage2_over_stage1", "san_inference_overhead"}
    # it times what train.json trains: its network (padding, SAN variant), precision and losses
    assert res["network"]["padding_mode"] == "replicate" and res["network"]["san_variant"] == "v3"
    assert res["precision"] in ("bf16", "fp32") and "(the config's precision and losses)" in proc.stdout
    assert res["settings"]["align_weight"] == 0.0 and res["settings"]["regional_weight"] > 0
    # a conditioned research network cannot be rebuilt without its SAN: one error line, nothing written
    bad = tmp_path / "film.json"
    bad.write_text(json.dumps({"network_def#_target_": "scripts.networks.drf_conditioned.DRFConditionedUniPET"}))
    out2 = tmp_path / "film_bench.json"
    proc = _cli("scripts.benchmarks.training_speed", ["--override", str(bad), "--output", str(out2)])
    assert proc.returncode == 2 and "DRFConditionedUniPET" in proc.stderr and not out2.exists()
