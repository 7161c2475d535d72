"""Benchmark: cost of UniPET's stage 2 over stage 1 per training iteration, and of the SAN at inference.

Targets (issue "UniPET itself"): stage 2 costs at most 2.5x stage 1 per iteration; the SAN adds at most
25 % to the inference time of a window. Both variants are timed in the same run, interleaved (A, B, A, B,
...) after a warm-up, and the medians are compared, because timings on a shared machine swing widely
between identical runs.

    cd unipet_bundle && python -m scripts.benchmarks.training_speed [--config configs/train.json]
        [--override configs/published_size.json] [--repeats 7] [--window 64] [--output bench.json]

Prints a table and writes JSON (default ``runs/benchmarks/training_speed.json``).
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from scripts.benchmarks.timing_trainer import TRAINER_SETTINGS, synthetic_batch, timing_trainer, training_step
from scripts.common.cli import run_command
from scripts.common.errors import UniPETInputError
from scripts.common.io import atomic_write_json
from scripts.networks.unipet import UniPET

logger = logging.getLogger("unipet.benchmark")


def _settings(config: str, override: str | None) -> tuple[UniPET, dict[str, Any]]:
    """The config's generator (``network_def``: its padding, SAN variant and sizes) and the trainer settings."""
    parser = ConfigParser()
    parser.read_config([config] + ([override] if override else []))
    gen = parser.get_parsed_content("network_def", lazy=False)
    if type(gen) is not UniPET:
        # the inference rows compare this network with and without its SAN; the conditioned research variants
        # take their styles from elsewhere (and some need the DRF), so they cannot be rebuilt that way
        raise UniPETInputError(
            f"training_speed times the UniPET of network_def (scripts.networks.unipet.UniPET), not "
            f"{type(gen).__module__}.{type(gen).__name__}: drop the network_def override"
        )
    s = {k: parser.get_parsed_content(k) for k in (*TRAINER_SETTINGS, "precision")}
    return gen, s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run(
    config: str = "configs/train.json",
    override: str | None = None,
    repeats: int = 7,
    warmup: int = 2,
    window: int | None = None,
    device: str | None = None,
    output: str = "runs/benchmarks/training_speed.json",
    seed: int = 0,
) -> dict[str, Any]:
    """Time stage-1 vs stage-2 iterations and vanilla vs UniPET window inference; print ratios; write JSON.

    Args:
        config: training config giving the network and patch sizes.
        override: optional override file (e.g. configs/published_size.json for the published size).
        repeats: timed repetitions of each variant (interleaved); medians are reported.
        warmup: untimed repetitions of each variant first.
        window: inference window edge in voxels (default: the config's patch size; the issue quotes 64).
        device: "cpu" or "cuda" (default: cuda when available).
        output: JSON result path.
        seed: torch seed for the synthetic batch and the initial weights.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen, s = _settings(config, override)
    patch = list(s["patch_size"])
    batch = synthetic_batch(s, dev)
    n_patches = len(batch["image"])
    trainer = timing_trainer(gen.to(dev), s, dev, batch, s["precision"])

    win = int(window or patch[0])
    x = torch.rand(1, 1, win, win, win, device=dev) * 0.3
    # the same network with and without its SAN (the config's sizes, padding and SAN variant), as inference runs it
    vanilla = UniPET(**{**gen.init_kwargs, "use_san": False}).to(dev).eval()
    unipet = UniPET(**{**gen.init_kwargs, "use_san": True}).to(dev).eval()

    def infer(net):
        def go():
            with torch.no_grad():
                net(x)

        return go

    variants = {
        "stage1_iter": training_step(trainer, batch, 1),
        "stage2_iter": training_step(trainer, batch, 2),
        "vanilla_window": infer(vanilla),
        "unipet_window": infer(unipet),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    for r in range(repeats):
        for name, fn in variants.items():  # interleaved: slow phases of the machine hit every variant
            times[name].append(_time(fn, dev))
        logger.info("repeat %d/%d done", r + 1, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": str(dev),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in s.items() if k != "regional_loss"},
        "network": gen.init_kwargs,
        "precision": trainer.precision,
        "patches_per_iteration": n_patches,
        "window": win,
        "repeats": repeats,
        "median_s": med,
        "all_s": times,
        "stage1_patches_per_s": n_patches / med["stage1_iter"],
        "stage2_patches_per_s": n_patches / med["stage2_iter"],
        "ratio_stage2_over_stage1": med["stage2_iter"] / med["stage1_iter"],
        "ratio_unipet_over_vanilla_inference": med["unipet_window"] / med["vanilla_window"],
        "targets": {"ratio_stage2_over_stage1_max": 2.5, "ratio_unipet_over_vanilla_inference_max": 1.25},
    }
    result["targets_met"] = {
        "stage2_over_stage1": result["ratio_stage2_over_stage1"] <= 2.5,
        "san_inference_overhead": result["ratio_unipet_over_vanilla_inference"] <= 1.25,
    }
    rows = [
        ("stage 1 iteration (BDN, L1)", med["stage1_iter"], f"{result['stage1_patches_per_s']:.2f} patches/s"),
        ("stage 2 iteration (SAN+RALS)", med["stage2_iter"], f"{result['stage2_patches_per_s']:.2f} patches/s"),
        (f"vanilla window {win}^3", med["vanilla_window"], ""),
        (f"UniPET window {win}^3", med["unipet_window"], ""),
    ]
    print(
        f"\nUniPET training/inference benchmark on {dev} ({torch.get_num_threads()} threads), "
        f"{n_patches} patches of {patch}, {trainer.precision} (the config's precision and losses), medians of {repeats} "
        "interleaved repeats"
    )
    print(f"{'variant':34s} {'median s':>10s}  throughput")
    for name, t, extra in rows:
        print(f"{name:34s} {t:10.3f}  {extra}")
    print(
        f"{'stage 2 / stage 1 per iteration':34s} {result['ratio_stage2_over_stage1']:10.2f}  target <= 2.5: "
        f"{'met' if result['targets_met']['stage2_over_stage1'] else 'NOT met'}"
    )
    print(
        f"{'UniPET / vanilla inference':34s} {result['ratio_unipet_over_vanilla_inference']:10.2f}  target <= 1.25: "
        f"{'met' if result['targets_met']['san_inference_overhead'] else 'NOT met'}"
    )
    out = Path(output)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


def main() -> None:
    run_command(run, "python -m scripts.benchmarks.training_speed")  # the table is the output, not the returned dict


if __name__ == "__main__":
    main()
