"""Benchmark: fp32 vs bf16 (autocast) for UniPET inference and training: speed and accuracy (issue 14).

In one run, interleaved (fp32, bf16, fp32, bf16, ...) after a warm-up, medians reported:

- inference speed: windows/s on one batch of ``sw_batch_size`` windows of ``patch_size`` (the network of
  ``configs/inference.json`` with the shipped weights), and the time of a whole demo-size volume
  (128x128x96 voxels of 4 mm) through MONAI's Gaussian-blended ``SlidingWindowInferer``;
- training speed: iterations/s of stage 1 and stage 2 at the sizes of ``configs/train.json`` (synthetic
  batch, as ``training_speed`` does);
- accuracy on the demo DRF-20 phantom (``scripts.demo``'s simulation, SIMULATED data): max and mean
  |SUV difference| between the bf16 and the fp32 outputs (whole volume and body voxels, SUV > 0.1), and
  PSNR against the simulated full dose (SUV clipped to [0, 20], data range 20) for the low-dose input, the
  fp32 output and the bf16 output;
- the conv3d peak of this machine and the network's achieved GFLOP/s (``compute_peak``) at each precision.

bf16 needs native hardware support (``scripts.engines.precision``); where it falls back to fp32 the table
says so and the comparison is void. The recommendation line applies the rule used to choose the configs'
default (:data:`RULE`): bf16 when it is at least 1.1x faster for inference and for training, changes PSNR by
at most 0.05 dB, moves no voxel by more than 2 % of its SUV (floor 1 SUV), no lesion SUVmax by more than 1 %
and no organ mean by more than 0.1 % (the training default). The inference default adds one more check
(:func:`choose_inference_default`): the lesion SUVmax changes must not all share one sign, because a clinical
output that moves every lesion the same way depending on the arithmetic carries a bias, however small.

    cd unipet_bundle && python -m scripts.benchmarks.precision [--repeats 3] [--shape "[128,128,96]"]
        [--drf 20] [--checkpoint models/model.pt] [--output runs/benchmarks/precision.json]

Prints a table and writes JSON (default ``runs/benchmarks/precision.json``).
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer

from scripts.benchmarks.compute_peak import conv3d_peak, gflops_line, network_flops
from scripts.benchmarks.timing_trainer import TRAINER_SETTINGS, synthetic_batch, timing_trainer, training_step
from scripts.common.allocator import keep_freed_memory_as_configured
from scripts.common.cli import run_command
from scripts.common.io import atomic_write_json
from scripts.common.large_files import recorded_sha256
from scripts.data.phantom import make_phantom
from scripts.data.simulate import simulate_pet
from scripts.engines.gan_trainer import UniPETTrainer
from scripts.engines.precision import PRECISIONS, PrecisionNetwork, resolve_precision
from scripts.inference.model import load_weights
from scripts.metrics.image_quality import psnr
from scripts.networks.fused_pad import fused_kernels_as_configured

__all__ = ["MIN_LESIONS_FOR_SIGN", "RULE", "choose_default", "choose_inference_default", "run"]

logger = logging.getLogger("unipet.benchmark")

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
RULE = {
    "min_speedup": 1.1,
    "max_abs_psnr_change_db": 0.05,
    "max_rel_voxel_diff": 0.02,
    "max_abs_lesion_suvmax_change_pct": 1.0,
    "max_abs_organ_mean_change_pct": 0.1,
}
"""bf16 becomes the default only if it passes all of these against fp32 in the same run: speed-up (inference
and training), PSNR change vs full dose, largest voxel difference relative to the voxel's SUV (floor 1 SUV:
``|bf16 - fp32| / max(SUV_fp32, 1)``), largest lesion SUVmax change and largest organ-mean change."""


MIN_LESIONS_FOR_SIGN = 4
"""Lesions needed before "all moved the same way" counts as a systematic shift rather than chance."""


def choose_default(result: dict[str, Any]) -> tuple[str, str]:
    """``("bf16" | "fp32", reason)`` from a benchmark result, by :data:`RULE`."""
    if result["ran_as"]["bf16"] != "bf16":
        return "fp32", "bf16 is not native on this machine (fell back to fp32)"
    checks = {
        f"inference speed-up {result['inference']['volume_speedup']:.2f} >= {RULE['min_speedup']}": result["inference"][
            "volume_speedup"
        ]
        >= RULE["min_speedup"],
        f"training speed-up {result['training']['min_speedup']:.2f} >= {RULE['min_speedup']}": result["training"][
            "min_speedup"
        ]
        >= RULE["min_speedup"],
        f"|PSNR change| {abs(result['accuracy']['psnr_change_db']):.3f} dB <= {RULE['max_abs_psnr_change_db']}": abs(
            result["accuracy"]["psnr_change_db"]
        )
        <= RULE["max_abs_psnr_change_db"],
        f"max relative voxel diff {result['accuracy']['max_rel_voxel_diff']:.4f} <= {RULE['max_rel_voxel_diff']}": result[
            "accuracy"
        ]["max_rel_voxel_diff"]
        <= RULE["max_rel_voxel_diff"],
        f"max |lesion SUVmax change| {result['accuracy']['max_abs_lesion_suvmax_change_pct']:.3f} % <= "
        f"{RULE['max_abs_lesion_suvmax_change_pct']} %": result["accuracy"]["max_abs_lesion_suvmax_change_pct"]
        <= RULE["max_abs_lesion_suvmax_change_pct"],
        f"max |organ mean change| {result['accuracy']['max_abs_organ_mean_change_pct']:.4f} % <= "
        f"{RULE['max_abs_organ_mean_change_pct']} %": result["accuracy"]["max_abs_organ_mean_change_pct"]
        <= RULE["max_abs_organ_mean_change_pct"],
    }
    failed = [k for k, ok in checks.items() if not ok]
    if failed:
        return "fp32", "bf16 fails: " + "; ".join(failed)
    return "bf16", "bf16 passes: " + "; ".join(checks)


def choose_inference_default(result: dict[str, Any]) -> tuple[str, str]:
    """``("bf16" | "fp32", reason)`` for the clinical output: :func:`choose_default` plus no systematic shift.

    A quantitative output must not depend on the arithmetic: when every lesion's SUVmax moves the same way
    under bf16 (at least :data:`MIN_LESIONS_FOR_SIGN` lesions), the shift is a bias, however small, and the
    inference default stays fp32. Training keeps :func:`choose_default`: its weights, optimiser state and
    losses are float32, and bf16 only rounds the activations of each step.
    """
    default, reason = choose_default(result)
    if default != "bf16":
        return default, reason
    changes = [float(r["change_pct"]) for r in result["accuracy"].get("lesions", [])]
    if len(changes) >= MIN_LESIONS_FOR_SIGN and (all(c < 0 for c in changes) or all(c > 0 for c in changes)):
        sign = "lower" if changes[0] < 0 else "higher"
        return "fp32", (
            f"bf16 passes the thresholds but every one of {len(changes)} lesion SUVmax values comes out "
            f"{sign} ({min(changes):+.2f} % to {max(changes):+.2f} %): a systematic shift"
        )
    return "bf16", reason


def _interleaved(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each variant, timed in interleaved rounds after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        logger.info("repeat %d/%d done", r + 1, repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def _inference_network(config: str, checkpoint: str | None) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    parser = ConfigParser()
    parser.read_config(config)
    parser["bundle_root"] = str(BUNDLE_ROOT)
    keep_freed_memory_as_configured(parser)  # the host memory setting inference runs with
    fused_kernels_as_configured(parser)  # and the fused CPU kernel, as inference runs
    net = parser.get_parsed_content("network_def").eval()
    ckpt = Path(checkpoint) if checkpoint else BUNDLE_ROOT / "models" / "model.pt"
    info = load_weights(net, ckpt, False, recorded_sha256(ckpt, BUNDLE_ROOT))
    keys = ("patch_size", "sw_batch_size", "overlap", "suv_max")
    sizes = {k: parser.get_parsed_content(k) for k in keys}
    # both precisions in the layout inference runs in (a config without the key: the default layout)
    sizes["memory_format"] = (
        str(parser.get_parsed_content("memory_format")) if "memory_format" in parser else "contiguous"
    )
    return net, sizes, info


def _trainer(config: str, precision: str, seed: int) -> tuple[UniPETTrainer, dict[str, torch.Tensor]]:
    parser = ConfigParser()
    parser.read_config(config)
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["device"] = "$torch.device('cpu')"
    torch.manual_seed(seed)
    gen = parser.get_parsed_content("network_def", lazy=False)
    s = {k: parser.get_parsed_content(k) for k in TRAINER_SETTINGS}
    batch = synthetic_batch(s, "cpu", seed)
    return timing_trainer(gen, s, "cpu", batch, precision), batch


def run(
    config: str = "configs/inference.json",
    train_config: str = "configs/train.json",
    checkpoint: str | None = None,
    shape: Sequence[int] = (128, 128, 96),
    drf: float = 20,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    output: str = "runs/benchmarks/precision.json",
) -> dict[str, Any]:
    """Compare fp32 and bf16 for inference and training on this machine; print a table; write JSON.

    Args:
        config: inference config (network, windows, suv_max); its network gets the weights of ``checkpoint``.
        train_config: training config (network and patch sizes of the training timing).
        checkpoint: weights (default: the shipped models/model.pt, SHA-256 checked).
        shape: demo phantom size in voxels of 4 mm (the demo's default).
        drf: dose reduction factor of the simulated low-dose scan.
        repeats: timed interleaved rounds (medians reported).
        warmup: untimed rounds first.
        seed: phantom, counts and synthetic-batch seed.
        output: JSON result path.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t_start = time.perf_counter()
    ran_as = {p: resolve_precision(p, "cpu") for p in PRECISIONS}
    net, sizes, info = _inference_network(config, checkpoint)
    nets = {p: PrecisionNetwork(net, p, "cpu", sizes["memory_format"]).eval() for p in PRECISIONS}
    roi = [int(v) for v in sizes["patch_size"]]
    bs, suv_max, overlap = int(sizes["sw_batch_size"]), float(sizes["suv_max"]), float(sizes["overlap"])

    logger.info("simulating the demo phantom %s at DRF %g (SIMULATED data)", list(shape), drf)
    phantom = make_phantom(tuple(int(s) for s in shape), (4.0, 4.0, 4.0), seed=seed)
    sim = simulate_pet(phantom.activity, (4.0, 4.0, 4.0), drfs=[drf], seed=seed, mu_map=phantom.mu)
    full = torch.from_numpy(sim["full_dose"].astype(np.float32))
    low = torch.from_numpy(next(iter(sim["drf"].values())).astype(np.float32))
    x_vol = (low / suv_max)[None, None]
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=bs, overlap=overlap, mode="gaussian")
    windows = torch.rand(bs, 1, *roi, generator=torch.Generator().manual_seed(seed)) * 0.3
    outputs: dict[str, torch.Tensor] = {}

    def window_batch(p: str) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                nets[p](windows)

        return go

    def volume(p: str) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                outputs[p] = inferer(x_vol, nets[p])[0, 0] * suv_max

        return go

    logger.info("timing inference (%d interleaved rounds)", repeats)
    inf = _interleaved(
        {**{f"window_{p}": window_batch(p) for p in PRECISIONS}, **{f"volume_{p}": volume(p) for p in PRECISIONS}},
        repeats,
        warmup,
    )

    logger.info("timing training (%d interleaved rounds)", repeats)
    trainers = {p: _trainer(train_config, p, seed) for p in PRECISIONS}
    train_sizes = trainers["fp32"][1]["image"].shape
    tr = _interleaved(
        {
            f"stage{st}_{p}": training_step(trainers[p][0], trainers[p][1], 1 if st == 1 else 2)
            for st in (1, 2)
            for p in PRECISIONS
        },
        repeats,
        warmup,
    )

    logger.info("conv3d peak and network GFLOP/s")
    channels = int(net.channels)
    flop_batch = network_flops(net, windows)
    peak = {p: conv3d_peak(channels, ran_as[p], roi[0], bs, "cpu", repeats=repeats)["gflops"] for p in PRECISIONS}
    achieved = {p: flop_batch / 1e9 / inf[f"window_{p}"] for p in PRECISIONS}

    diff = (outputs["bf16"] - outputs["fp32"]).abs()
    rel = diff / outputs["fp32"].abs().clamp_min(1.0)
    worst = np.unravel_index(int(torch.argmax(diff)), tuple(diff.shape))
    labels = torch.from_numpy(phantom.labels.astype(np.int64))
    lesions, organs = [], []
    for lab, meta in sorted(phantom.label_table.items()):
        m = labels == int(lab)
        if not bool(m.any()):
            continue
        if meta.get("kind") == "lesion":
            a32, a16 = float(outputs["fp32"][m].max()), float(outputs["bf16"][m].max())
            lesions.append(
                {
                    "label": int(lab),
                    "volume_ml": float(meta.get("volume_ml", math.nan)),
                    "suvmax_fp32": a32,
                    "suvmax_bf16": a16,
                    "change_pct": 100.0 * (a16 - a32) / max(abs(a32), 1e-6),
                }
            )
        else:
            a32, a16 = float(outputs["fp32"][m].mean()), float(outputs["bf16"][m].mean())
            organs.append(
                {
                    "label": int(lab),
                    "name": meta.get("name"),
                    "mean_fp32": a32,
                    "mean_bf16": a16,
                    "change_pct": 100.0 * (a16 - a32) / max(abs(a32), 1e-6),
                }
            )
    body = full > 0.1
    t_full = full[None, None]
    psnr_in = float(psnr(low[None, None], t_full)[0])
    psnr_out = {p: float(psnr(outputs[p][None, None], t_full)[0]) for p in PRECISIONS}
    result: dict[str, Any] = {
        "device": "cpu",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ran_as": ran_as,
        "repeats": repeats,
        "network": {
            "channels": channels,
            "num_blocks": int(net.num_blocks),
            "checkpoint": info.get("checkpoint"),
            "trained": bool(info.get("trained")),
        },
        "inference": {
            "window_batch": [bs, 1, *roi],
            "windows_per_s": {p: bs / inf[f"window_{p}"] for p in PRECISIONS},
            "volume_shape": list(low.shape),
            "volume_s": {p: inf[f"volume_{p}"] for p in PRECISIONS},
            "window_speedup": inf["window_fp32"] / inf["window_bf16"],
            "volume_speedup": inf["volume_fp32"] / inf["volume_bf16"],
        },
        "training": {
            "batch": list(train_sizes),
            "iterations_per_s": {f"stage{st}_{p}": 1.0 / tr[f"stage{st}_{p}"] for st in (1, 2) for p in PRECISIONS},
            "stage1_speedup": tr["stage1_fp32"] / tr["stage1_bf16"],
            "stage2_speedup": tr["stage2_fp32"] / tr["stage2_bf16"],
        },
        "accuracy": {
            "data": f"demo phantom {list(shape)} at DRF {drf:g}, seed {seed} (SIMULATED)",
            "max_abs_suv_diff": float(diff.max()),
            "mean_abs_suv_diff": float(diff.mean()),
            "max_abs_suv_diff_body": float(diff[body].max()),
            "mean_abs_suv_diff_body": float(diff[body].mean()),
            "max_rel_voxel_diff": float(rel.max()),
            "worst_voxel": {
                "index": [int(i) for i in worst],
                "suv_fp32": float(outputs["fp32"][worst]),
                "suv_bf16": float(outputs["bf16"][worst]),
                "suv_input": float(low[worst]),
            },
            "body_total_change_pct": 100.0
            * float(outputs["bf16"][body].double().sum() / outputs["fp32"][body].double().sum() - 1),
            "lesions": lesions,
            "organs": organs,
            "max_abs_lesion_suvmax_change_pct": max((abs(r["change_pct"]) for r in lesions), default=0.0),
            "max_abs_organ_mean_change_pct": max((abs(r["change_pct"]) for r in organs), default=0.0),
            "psnr_input_db": psnr_in,
            "psnr_db": psnr_out,
            "psnr_change_db": psnr_out["bf16"] - psnr_out["fp32"],
        },
        "gflops": {
            p: {"conv3d_peak": peak[p], "network": achieved[p], "peak_over_achieved": peak[p] / achieved[p]}
            for p in PRECISIONS
        },
        "rule": RULE,
    }
    result["training"]["min_speedup"] = min(result["training"]["stage1_speedup"], result["training"]["stage2_speedup"])
    result["recommended_default"], result["reason"] = choose_default(result)
    result["recommended_inference_default"], result["inference_reason"] = choose_inference_default(result)
    result["wall_s"] = time.perf_counter() - t_start

    i, t, a = result["inference"], result["training"], result["accuracy"]
    print(
        f"\nUniPET precision benchmark on the CPU ({torch.get_num_threads()} threads; bf16 ran as {ran_as['bf16']}), "
        f"medians of {repeats} interleaved repeats"
    )
    print(f"{'':44s} {'fp32':>10s} {'bf16':>10s} {'bf16 speed-up':>14s}")
    print(
        f"{'inference windows/s (batch %d of %s)' % (bs, roi):44s} {i['windows_per_s']['fp32']:10.2f} "
        f"{i['windows_per_s']['bf16']:10.2f} {i['window_speedup']:13.2f}x"
    )
    print(
        f"{'inference s, volume %s' % list(low.shape):44s} {i['volume_s']['fp32']:10.2f} {i['volume_s']['bf16']:10.2f} "
        f"{i['volume_speedup']:13.2f}x"
    )
    for st in (1, 2):
        print(
            f"{'training iterations/s, stage %d (%s)' % (st, list(train_sizes)):44s} "
            f"{t['iterations_per_s'][f'stage{st}_fp32']:10.3f} {t['iterations_per_s'][f'stage{st}_bf16']:10.3f} "
            f"{t[f'stage{st}_speedup']:13.2f}x"
        )
    print(
        f"{'PSNR vs full dose, dB (input %.2f)' % psnr_in:44s} {psnr_out['fp32']:10.3f} {psnr_out['bf16']:10.3f} "
        f"{a['psnr_change_db']:+13.3f} dB"
    )
    print(
        f"|SUV bf16 - fp32|: max {a['max_abs_suv_diff']:.4f}, mean {a['mean_abs_suv_diff']:.5f} "
        f"(body: max {a['max_abs_suv_diff_body']:.4f}, mean {a['mean_abs_suv_diff_body']:.5f}); largest relative "
        f"{a['max_rel_voxel_diff']:.4f}; worst voxel fp32 {a['worst_voxel']['suv_fp32']:.2f} SUV"
    )
    print(
        f"bf16 vs fp32: lesion SUVmax change max |{a['max_abs_lesion_suvmax_change_pct']:.3f}| % over {len(lesions)} "
        f"lesions; organ mean change max |{a['max_abs_organ_mean_change_pct']:.4f}| %; body total "
        f"{a['body_total_change_pct']:+.4f} %"
    )
    for p in PRECISIONS:
        # medians of separate timings: a context line; compute_peak's interleaved rounds judge the target
        print(gflops_line(f"network windows ({p})", achieved[p], peak[p], ran_as[p], verdict="judged by compute_peak"))
    print(f"recommended training default: {result['recommended_default']} ({result['reason']})")
    print(f"recommended inference default: {result['recommended_inference_default']} ({result['inference_reason']})")
    atomic_write_json(Path(output), result)
    print(f"wrote {output} ({result['wall_s']:.0f} s)")
    return result


def main() -> None:
    run_command(run, "python -m scripts.benchmarks.precision")  # the table is the output, not the returned dict


if __name__ == "__main__":
    main()
