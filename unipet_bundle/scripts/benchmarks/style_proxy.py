"""Fast proxy: does stage 2 move the styles, and do they differ by dose? (issue 15; minutes on 1 CPU thread)

Trains ``configs/train.json`` (its network, losses, schedule and sampling; only the sizes below shrunk) on a
few small simulated phantoms, once per SAN variant (``v1``: 0.2.0, ``v2``: the fix), and measures on fixed
windows of a held-out subject at DRF 4, 20 and 100 at the start and the end of stage 2 (:func:`san_report`):

* ``style_abs``: mean |s| over blocks and channels;
* ``style_dose_spread``: the std of the styles across the three DRFs at the same window, averaged over
  blocks, channels and windows, divided by ``style_abs`` (0: every dose gets the same style, a dead SAN);
* ``zero_style_change``: mean |output(styles) - output(styles = 0)| over mean |output - input|, i.e. the
  share of the network's correction that the styles make.

    cd unipet_bundle && OMP_NUM_THREADS=1 python -m scripts.benchmarks.style_proxy [--stage1 150] [--stage2 150]
        [--work /tmp/unipet_style_proxy] [--output runs/benchmarks/style_proxy.json]

Prints a table and writes JSON. Not a quality result: too short and too small to say anything about PSNR.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from scripts.common.cli import run_command
from scripts.common.io import atomic_write_json

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
DRFS = (4, 20, 100)
logger = logging.getLogger("unipet.benchmark")


SAN_ALIVE = {"style_dose_spread": 0.02, "zero_style_change": 0.01}
"""Thresholds of :func:`san_is_alive`: styles differ across doses by >= 2 % of their size, and they make
>= 1 % of the network's correction (the shipped 0.2.0 model: ~1e-6 and ~0.2 %)."""


def san_is_alive(report: dict[str, float]) -> bool:
    """True when a :func:`san_report` passes both :data:`SAN_ALIVE` thresholds."""
    return all(report[k] >= v for k, v in SAN_ALIVE.items())


@torch.no_grad()
def san_report(net: torch.nn.Module, windows: dict[float, torch.Tensor]) -> dict[str, float]:
    """Style and zero-style statistics of ``net`` on windows ``{drf: (N, 1, D, H, W)}`` (same places per DRF)."""
    net.eval()
    styles = {d: torch.cat([s.float() for s in net.block_styles(x)], dim=1) for d, x in windows.items()}  # (N, S)
    stacked = torch.stack(list(styles.values()))  # (n_drfs, N, S)
    style_abs = stacked.abs().mean().item()
    spread = stacked.std(dim=0).mean().item()
    change, correction = [], []
    for x in windows.values():
        y = net(x)
        change.append((y - net.forward_without_styles(x)).abs().mean().item())
        correction.append((y - x).abs().mean().item())
    return {
        "style_abs": style_abs,
        "style_dose_spread": spread / style_abs if style_abs > 0 else 0.0,
        "zero_style_change": float(np.mean(change) / max(np.mean(correction), 1e-12)),
    }


def windows_from_arrays(
    full: np.ndarray, lows: dict[float, np.ndarray], suv_max: float = 20.0, size: int = 32, n: int = 6, seed: int = 0
) -> dict[float, torch.Tensor]:
    """``n`` windows centred in tissue (full dose > 0.5 SUV), the same places for every DRF, in network units."""
    rng = np.random.default_rng(seed)
    h = size // 2
    tissue = np.argwhere(full[h:-h, h:-h, h:-h] > 0.5)
    corners = tissue[rng.choice(len(tissue), n, replace=False)]
    return {
        float(d): torch.from_numpy(
            np.stack([low[x : x + size, y : y + size, z : z + size] / suv_max for x, y, z in corners]).astype(
                np.float32
            )
        )[:, None]
        for d, low in lows.items()
    }


def _windows(subject: Path, suv_max: float, size: int = 32, n: int = 6, seed: int = 0) -> dict[float, torch.Tensor]:
    full = np.asarray(nib.load(str(subject / "full_dose.nii.gz")).dataobj, dtype=np.float32)
    lows = {d: np.asarray(nib.load(str(subject / f"drf_{d}.nii.gz")).dataobj, dtype=np.float32) for d in DRFS}
    return windows_from_arrays(full, lows, suv_max, size, n, seed)


def run(
    stage1: int = 150,
    stage2: int = 150,
    variants: tuple[str, ...] = ("v1", "v2"),
    n_subjects: int = 4,
    work: str = "/tmp/unipet_style_proxy",
    output: str = "runs/benchmarks/style_proxy.json",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Simulate the data once (kept in ``work``), train each SAN variant, print and write the report.

    ``overrides``: more train.json keys for every run (e.g. ``{"san_learning_rate": 2e-4}``).
    """
    work_dir = Path(work)
    data = work_dir / "data"
    if not (data / f"phantom_{n_subjects - 1:03d}").is_dir():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.data.simulate",
                str(data),
                "--n_subjects",
                str(n_subjects),
                "--shape",
                "[64,64,48]",
                "--drfs",
                "[" + ",".join(str(d) for d in DRFS) + "]",
                "--seed",
                "21",
                "--overwrite",
                "true",
            ],
            cwd=BUNDLE_ROOT,
            check=True,
        )
    subjects = sorted(p for p in data.iterdir() if p.is_dir())
    held_out = subjects[-1]  # never trained on: its windows probe the SAN
    datalist = {
        "training": [
            {"image": str(s / f"drf_{d}.nii.gz"), "label": str(s / "full_dose.nii.gz"), "drf": d, "subject": s.name}
            for s in subjects[:-1]
            for d in DRFS
        ],
        "validation": [
            {
                "image": str(held_out / "drf_20.nii.gz"),
                "label": str(held_out / "full_dose.nii.gz"),
                "drf": 20,
                "subject": held_out.name,
            }
        ],
    }
    (work_dir / "datalist.json").write_text(json.dumps(datalist))
    results: dict[str, Any] = {
        "stage1_iterations": stage1,
        "stage2_iterations": stage2,
        "drfs": list(DRFS),
        "overrides": dict(overrides or {}),
    }
    for variant in variants:
        torch.manual_seed(0)
        parser = ConfigParser()
        parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
        parser.update(
            {
                "bundle_root": str(BUNDLE_ROOT),
                "dataset_dir": str(data),
                "datalist_file": str(work_dir / "datalist.json"),
                "ckpt_dir": str(work_dir / variant / "models"),
                "output_dir": str(work_dir / variant / "runs"),
                "epochs": 1,
                "epoch_length": stage1 + stage2,
                "stage1_epochs": 0,
                "stage1_iterations": stage1,
                "critic_pretrain_iterations": min(20, stage2 // 5),
                "val_interval": 1000,
                "save_interval": 100000,
                "snapshot_iterations": [],
                "resume": False,
                "overwrite": True,
                "san_variant": variant,
                "stage2_warmup_iterations": min(20, stage2 // 5),
                "precision": "fp32",
                "monitor_interval": 0,
                "stage2_dose_balance": 0.0,  # uniform, as when the model card's proxy numbers were measured (<0.5.3)
                **(overrides or {}),
            }
        )
        trainer = parser.get_parsed_content("train#trainer")
        net = parser.get_parsed_content("network")
        windows = _windows(held_out, float(parser.get_parsed_content("suv_max")))
        reports: dict[str, Any] = {}

        def probe(engine, key: str) -> None:
            reports[key] = san_report(net, windows)
            net.train()

        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(once=stage1 + min(20, stage2 // 5) + 1), probe, "stage2_start"
        )
        trainer.add_event_handler(Events.COMPLETED, probe, "stage2_end")
        t0 = time.perf_counter()
        trainer.run()
        reports["minutes"] = (time.perf_counter() - t0) / 60
        results[variant] = reports
    print(
        f"\nStyle proxy: {stage1} + {stage2} iterations of configs/train.json on {n_subjects - 1} small phantoms, "
        f"windows of a held-out one at DRF {list(DRFS)}"
    )
    print(f"{'SAN':<5}{'when':<14}{'mean |s|':>10}{'dose spread/|s|':>17}{'zero-style change':>19}")
    for variant in variants:
        for key in ("stage2_start", "stage2_end"):
            r = results[variant][key]
            print(
                f"{variant:<5}{key:<14}{r['style_abs']:>10.4f}{r['style_dose_spread']:>17.3f}{r['zero_style_change']:>19.3f}"
            )
        print(f"{variant:<5}{'run time':<14}{results[variant]['minutes']:>9.1f} min")
    out = Path(output) if Path(output).is_absolute() else BUNDLE_ROOT / output
    atomic_write_json(out, results)
    print(f"written {out}")
    return results


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    run_command(run, "python -m scripts.benchmarks.style_proxy", print_result=True)


if __name__ == "__main__":
    main()
