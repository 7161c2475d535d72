"""Ready for a GPU: one script that measures the bundle's GPU paths and writes one JSON (issue 14).

On a CUDA machine (target: under 5 minutes in all):

- ``train_stage1`` / ``train_stage2``: training iterations per second at the published size
  (``configs/train.json`` + ``configs/published_size.json``: 64 channels, 8 blocks, 64^3 patches) in bf16,
  synthetic batch, after a warm-up; stage 2 is the joint SAN + RALS critic step;
- ``inference_network``: the network + sliding-window stage of ``configs/inference.json`` (its network,
  windows, Gaussian blending, output stitched on the CPU, its ``precision``) on a Quadra-size study
  (440x440x644 voxels of 1.65 mm) resampled to the network's 4 mm grid;
- ``inference_e2e``: the same study as a NIfTI through ``python -m monai.bundle run --config_file
  configs/inference.json`` (load, resample, infer, invert, write: what a user waits for);
- ``train_workflow``: ``python -m monai.bundle run training --config_file configs/train.json`` on one device at
  the published size, a few iterations of both stages with validation (the whole workflow a user runs: data
  loading, hot-spot sampling, regional loss, critic, validation metrics, checkpoints) on small synthetic pairs;
- ``evaluate``: ``configs/evaluate.json`` with the shipped weights on the same pairs (level lock, report);
- ``multi_gpu_train``: ``configs/multi_gpu_train.json`` at the published size under ``torchrun`` with nccl
  (one process per GPU), a few iterations of both stages on tiny synthetic pairs;

with the peak GPU memory of each (in-process sections: ``torch.cuda.max_memory_allocated``; subprocess
sections: the device's used memory polled every 0.2 s, CUDA contexts included, minus the idle level).

On a machine without CUDA it says so, runs the same code paths at tiny sizes on the CPU (gloo instead of
nccl, peak RSS instead of GPU memory), marks the JSON ``"dry_run": true`` and exits 0 when they all work.
A failing section is reported in one line and in the JSON, and makes the exit status 1.

    cd unipet_bundle && python -m scripts.benchmarks.gpu_check [--out runs/benchmarks/gpu_check.json] [--iterations 10]
        [--sections "['train','train_workflow','inference_network','inference_e2e','evaluate','multi_gpu_train']"]
        [--dry_run false]
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser

from scripts.benchmarks.timing_trainer import TRAINER_SETTINGS, synthetic_batch, timing_trainer, training_step
from scripts.common.cli import run_command
from scripts.common.errors import UniPETInputError
from scripts.common.io import atomic_write, atomic_write_json
from scripts.common.options import as_bool
from scripts.data.io import save_nifti
from scripts.engines.precision import PrecisionNetwork

__all__ = ["SECTIONS", "TINY", "run", "synthetic_study"]

logger = logging.getLogger("unipet.gpu_check")

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("train", "train_workflow", "inference_network", "inference_e2e", "evaluate", "multi_gpu_train")
QUADRA_SHAPE = (440, 440, 644)
QUADRA_SPACING = (1.65, 1.65, 1.65)
TARGET_TOTAL_S = 300.0
# the dry run's sizes: the same code paths, seconds on a CPU
TINY = {
    "channels": 4,
    "num_blocks": 2,
    "latent_dim": 8,
    "san_channels": [4, 4],
    "critic_channels": [4, 8],
    "patch_size": [16, 16, 16],
    "batch_size": 1,
    "num_samples": 2,
    "sw_batch_size": 4,
}
TINY_STUDY = ((40, 40, 48), (4.0, 4.0, 4.0))
_GB = 1e9


# ------------------------------------------------------------------------------------------ memory
def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GB  # Linux: KiB


class DeviceMemoryPoller:
    """Peak device memory used by any process while the ``with`` block runs (CUDA), polled every ``interval`` s.

    Reports ``peak_gb`` above the level found on entry (the idle level, this process's context included).
    Without CUDA it reports the peak RSS of finished child processes instead (``peak_rss_children_gb``).
    """

    def __init__(self, cuda: bool, interval: float = 0.2) -> None:
        self.cuda, self.interval = cuda, interval
        self.peak_gb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_gb = max(self.peak_gb, (self._used() - self._base) / _GB)
            self._stop.wait(self.interval)

    def __enter__(self) -> DeviceMemoryPoller:
        if self.cuda:
            self._base = self._used()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / _GB

    def as_dict(self) -> dict[str, float]:
        key = "peak_gpu_memory_gb_device_level" if self.cuda else "peak_rss_children_gb"
        return {key: round(self.peak_gb, 3)}


def _in_process_memory(dev: torch.device) -> dict[str, float]:
    if dev.type == "cuda":
        return {"peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(dev) / _GB, 3)}
    return {"peak_rss_gb_process": round(_rss_gb(), 3)}


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------------------------------- configs
def _parser(files: Sequence[str], overrides: dict[str, Any], device: torch.device) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in files])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["device"] = f"$torch.device('{device}')"
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _cli_overrides(overrides: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for k, v in overrides.items():
        args += [f"--{k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v)]
    return args


# ------------------------------------------------------------------------------------------ sections
def train_section(dev: torch.device, dry: bool, iterations: int, warmup: int = 2) -> dict[str, Any]:
    """Stage-1 and stage-2 iterations/s at the published size (tiny in a dry run), bf16, synthetic batch."""
    files = ["train.json"] + ([] if dry else ["published_size.json"])
    parser = _parser(files, {**(TINY if dry else {}), "precision": "bf16"}, dev)
    s = {k: parser.get_parsed_content(k) for k in (*TRAINER_SETTINGS, "precision")}
    torch.manual_seed(0)
    gen = parser.get_parsed_content("network_def", lazy=False).to(dev)
    batch = synthetic_batch(s, dev)
    n = len(batch["image"])
    trainer = timing_trainer(gen, s, dev, batch, s["precision"])
    out: dict[str, Any] = {}
    for stage in (1, 2):
        step = training_step(trainer, batch, stage)
        for _ in range(warmup):
            step()
        _reset_peak(dev)
        t0 = time.perf_counter()
        for _ in range(iterations):
            step()
        _sync(dev)
        sec = time.perf_counter() - t0
        out[f"train_stage{stage}"] = {
            "iterations_per_s": iterations / sec,
            "patches_per_s": iterations * n / sec,
            "iterations": iterations,
            "batch": [n, 1, *s["patch_size"]],
            "precision": trainer.precision,
            "config": "+".join(files) + (" (dry-run sizes)" if dry else ""),
            **_in_process_memory(dev),
        }
    return out


def synthetic_study(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A whole-body-like SUV volume ``(X, Y, Z)`` float32: elliptic body ~1 SUV with 20 % noise, a liver ~2.5,
    a few lesions 6-10, air 0. Built slab by slab along X (peak memory ~ the volume)."""
    X, Y, Z = (int(s) for s in shape)
    rng = np.random.default_rng(seed)
    out = np.zeros((X, Y, Z), dtype=np.float32)
    y = np.arange(Y, dtype=np.float32)[None, :, None]
    z = np.arange(Z, dtype=np.float32)[None, None, :]
    lesions = rng.uniform([0.3, 0.35, 0.2], [0.7, 0.65, 0.9], size=(5, 3)) * [X, Y, Z]
    r_les = 0.02 * min(X, Y) + 1
    for a in range(0, X, 16):
        x = np.arange(a, min(a + 16, X), dtype=np.float32)[:, None, None]
        body = ((x - X / 2) / (0.42 * X)) ** 2 + ((y - Y / 2) / (0.3 * Y)) ** 2 <= 1.0
        body = body & (z >= 0.03 * Z) & (z <= 0.97 * Z)
        liver = ((x - 0.4 * X) ** 2 + (y - 0.5 * Y) ** 2 + (z - 0.6 * Z) ** 2) <= (0.12 * min(X, Y)) ** 2
        slab = np.where(body, 1.0, 0.0).astype(np.float32) + 1.5 * (liver & body)
        for cx, cy, cz in lesions:
            slab += 7.0 * (((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) <= r_les**2)
        slab *= 1.0 + 0.2 * rng.standard_normal(slab.shape, dtype=np.float32)
        out[a : a + slab.shape[0]] = np.clip(slab, 0.0, None)
    return out


def _study(dry: bool) -> tuple[tuple[int, ...], tuple[float, ...]]:
    return TINY_STUDY if dry else (QUADRA_SHAPE, QUADRA_SPACING)


def inference_network_section(dev: torch.device, dry: bool) -> dict[str, Any]:
    """inference.json's network + sliding-window stage (its precision) on the study resampled to 4 mm."""
    shape, spacing = _study(dry)
    parser = _parser(
        ["inference.json"], {"progress": False, **({"allow_untrained": True, "checkpoint": ""} if dry else {})}, dev
    )
    net = parser.get_parsed_content("network")
    model_info = parser.get_parsed_content(
        "model_info"
    )  # the shipped weights, SHA-256 checked (untrained in a dry run)
    wrapped = parser.get_parsed_content("inference_network")
    inferer = parser.get_parsed_content("inferer")
    target = parser.get_parsed_content("target_pixdim")
    grid = [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target)]
    suv_max = float(parser.get_parsed_content("suv_max"))
    vol = torch.from_numpy(synthetic_study(grid)) / suv_max
    _reset_peak(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        pred = inferer(vol[None, None], wrapped)
    _sync(dev)
    sec = time.perf_counter() - t0
    assert isinstance(wrapped, PrecisionNetwork) and pred.dtype == torch.float32 and bool(torch.isfinite(pred).all())
    return {
        "inference_network": {
            "seconds": sec,
            "study_shape": list(shape),
            "study_spacing_mm": list(spacing),
            "network_grid_shape": grid,
            "precision": wrapped.precision,
            "trained_weights": bool(model_info.get("trained")),
            "channels": int(net.channels),
            **_in_process_memory(dev),
        }
    }


def _run_logged(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, log = 124, f"timed out after {timeout:.0f} s: {exc}"
    return code, log, time.perf_counter() - t0


# what a dying process leaves behind: Python errors, and the C++ aborts (gloo, OpenMP) that print no "Error"
_FATAL_MARKERS = ("terminate called", "what():", "enforce fail", "fatal python error", "segmentation fault", "aborted")


def _log_summary(log: str, tail: int = 600) -> str:
    """The error lines of a subprocess log (first few, de-duplicated) and its last ``tail`` characters."""
    errors: list[str] = []
    for line in log.splitlines():
        text = line.split("]: ", 1)[-1].strip()  # torchrun prefixes "[rankN]: "
        fatal = "Error" in text or text.lower().startswith("error") or any(m in text.lower() for m in _FATAL_MARKERS)
        if fatal and text not in errors:
            errors.append(text)
    return " | ".join(errors[:6]) + " ... " + log[-tail:].replace("\n", " ")


class SubprocessSectionError(RuntimeError):
    """A section's subprocess failed; ``log`` is its whole output, which ``run`` keeps beside the JSON."""

    def __init__(self, what: str, code: int, log: str) -> None:
        super().__init__(f"{what} failed (exit {code}): {_log_summary(log)}")
        self.log = log


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(BUNDLE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def inference_e2e_section(dev: torch.device, dry: bool, work: Path, timeout: float) -> dict[str, Any]:
    """The study as a NIfTI through ``monai.bundle run`` with configs/inference.json."""
    shape, spacing = _study(dry)
    data, out = work / "e2e_in", work / "e2e_out"
    affine = np.diag([*spacing, 1.0])
    save_nifti(synthetic_study(shape), affine, data / "quadra_study.nii")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--progress",
        "false",
    ]
    if dry:
        cmd += ["--checkpoint", "", "--allow_untrained", "true"]
    with DeviceMemoryPoller(dev.type == "cuda") as mem:
        code, log, sec = _run_logged(cmd, _env(), timeout)
    if code != 0 or not (out / "quadra_study_denoised.nii.gz").is_file():
        raise SubprocessSectionError("inference.json run", code, log)
    return {
        "inference_e2e": {
            "seconds": sec,
            "study_shape": list(shape),
            "study_spacing_mm": list(spacing),
            "python_startup_included": True,
            **mem.as_dict(),
        }
    }


def _pairs(work: Path, shape: Sequence[int], n_subjects: int = 2, seed: int = 0) -> Path:
    """Synthetic training pairs (DRF 4 and 20 per subject) under ``work``; made once per shape and count."""
    root = work / f"pairs_{n_subjects}x{'x'.join(str(int(n)) for n in shape)}"
    if root.is_dir():
        return root
    rng = np.random.default_rng(seed)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    for s in range(n_subjects):
        act = synthetic_study(shape, seed + s)
        save_nifti(act, affine, root / f"sub{s}" / "full_dose.nii.gz")
        for drf in (4, 20):  # two items per subject
            noise = rng.normal(0, 0.05 * np.sqrt(drf), act.shape).astype(np.float32) * np.sqrt(act)
            save_nifti(act + noise, affine, root / f"sub{s}" / f"drf_{drf}.nii.gz")
    return root


def _train_overrides(dry: bool, n_items: int) -> dict[str, Any]:
    """A few iterations of both stages with one validation at the end (tiny networks in a dry run)."""
    return {
        **(TINY if dry else {}),
        "epochs": 2,
        "epoch_length": 2,
        "stage1_epochs": 1,
        "val_interval": 2,
        "critic_pretrain_iterations": 1,
        "val_fraction": 0.34,
        "val_max_items": n_items,
        "num_workers": 0,
        "precision": "bf16",
    }


def _bundle_cmd(files: Sequence[str], data: Path, run_dir: Path, overrides: dict[str, Any]) -> list[str]:
    return [
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        repr([f"configs/{f}" for f in files]),
        "--dataset_dir",
        str(data),
        "--ckpt_dir",
        str(run_dir / "ckpt"),
        "--output_dir",
        str(run_dir / "runs"),
        *_cli_overrides(overrides),
    ]


def _published(dry: bool) -> tuple[list[str], int]:
    """The extra config file and the patch edge of the training sections."""
    return ([], TINY["patch_size"][0]) if dry else (["published_size.json"], 64)


def train_workflow_section(dev: torch.device, dry: bool, work: Path, timeout: float) -> dict[str, Any]:
    """configs/train.json through ``monai.bundle run`` on one device: 4 iterations, both stages, validation."""
    extra, patch = _published(dry)
    files = ["train.json", *extra]
    data = _pairs(work, [patch + 8] * 3, n_subjects=3)
    run_dir = work / "train_workflow"
    cmd = [sys.executable, *_bundle_cmd(files, data, run_dir, _train_overrides(dry, 2))]
    with DeviceMemoryPoller(dev.type == "cuda") as mem:
        code, log, sec = _run_logged(cmd, _env(), timeout)
    if code != 0 or not (run_dir / "ckpt" / "model.pt").is_file():
        raise SubprocessSectionError("train.json run", code, log)
    return {
        "train_workflow": {
            "seconds_incl_startup": sec,
            "iterations": 4,
            "stages": [1, 2],
            "validation": "val_psnr" in log,  # the validation metrics were logged
            "config": "+".join(files) + (" (dry-run sizes)" if dry else ""),
            **mem.as_dict(),
        }
    }


def evaluate_section(dev: torch.device, dry: bool, work: Path, timeout: float) -> dict[str, Any]:
    """configs/evaluate.json (shipped weights; untrained tiny network in a dry run) on the synthetic pairs."""
    _, patch = _published(dry)
    data = _pairs(work, [patch + 8] * 3, n_subjects=3)
    run_dir = work / "evaluate"
    overrides: dict[str, Any] = {"eval_split": "all", "write_montages": "false"}
    files = ["train.json", "evaluate.json"]
    cmd = [sys.executable, *_bundle_cmd(files, data, run_dir, {**(TINY if dry else {}), **overrides})]
    if dry:
        cmd += ["--checkpoint", "", "--allow_untrained", "true"]
    else:
        cmd += ["--checkpoint", str(BUNDLE_ROOT / "models" / "model.pt")]
    with DeviceMemoryPoller(dev.type == "cuda") as mem:
        code, log, sec = _run_logged(cmd, _env(), timeout)
    summary = run_dir / "runs" / "eval" / "summary.json"
    if code != 0 or not summary.is_file():
        raise SubprocessSectionError("evaluate.json run", code, log)
    return {
        "evaluate": {
            "seconds_incl_startup": sec,
            "items": 6,
            "volume_shape": [patch + 8] * 3,
            "config": "+".join(files),
            **mem.as_dict(),
        }
    }


def multi_gpu_section(dev: torch.device, dry: bool, work: Path, timeout: float) -> dict[str, Any]:
    """configs/multi_gpu_train.json under torchrun (nccl on CUDA, gloo in a dry run): 4 iterations, both stages."""
    cuda = dev.type == "cuda"
    nproc = max(1, torch.cuda.device_count()) if cuda else 2
    extra, patch = _published(dry)
    files = ["train.json", "multi_gpu_train.json", *extra]
    # every rank needs at least one validation item (DistributedSampler): 2 items per subject, a third of them
    data = _pairs(work, [patch + 8] * 3, n_subjects=max(3, 2 * nproc))
    run_dir = work / "multi_gpu"
    port = 29500 + os.getpid() % 1000
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={port}",
        *_bundle_cmd(files, data, run_dir, _train_overrides(dry, max(2, nproc))),
    ]
    env = _env()
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"
    with DeviceMemoryPoller(cuda) as mem:
        code, log, sec = _run_logged(cmd, env, timeout)
    if code != 0 or not (run_dir / "ckpt" / "checkpoint_latest.pt").is_file():
        raise SubprocessSectionError("torchrun multi_gpu_train.json", code, log)
    return {
        "multi_gpu_train": {
            "seconds_incl_startup": sec,
            "processes": nproc,
            "backend": "nccl" if cuda else "gloo",
            "iterations": 4,
            "stages": [1, 2],
            "config": "+".join(files),
            **mem.as_dict(),
        }
    }


# ---------------------------------------------------------------------------------------------- main
def run(
    out: str = "runs/benchmarks/gpu_check.json",
    iterations: int = 10,
    sections: Sequence[str] = SECTIONS,
    dry_run: bool | None = None,
    timeout_s: float = 240.0,
) -> int:
    """Measure the GPU paths (or dry-run them on tiny sizes without CUDA) and write one JSON.

    Args:
        out: JSON result path (written atomically, also when a section fails; default under runs/, git-ignored).
        iterations: timed training iterations per stage (after 2 warm-up iterations).
        sections: any of "train", "train_workflow", "inference_network", "inference_e2e", "evaluate",
            "multi_gpu_train".
        dry_run: force (true) or forbid (false) the tiny CPU dry run; default: dry run exactly when CUDA is
            absent. A dry run on a CUDA machine still uses the GPU, at tiny sizes.
        timeout_s: limit of each subprocess section (bundle inference run, torchrun).

    Returns the exit status: 0 when every section ran, 1 otherwise.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")
    cuda = torch.cuda.is_available()
    try:  # fire hands "--dry_run false" over as the string "false"
        dry = (not cuda) if dry_run is None else as_bool(dry_run, "dry_run")
    except UniPETInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cuda and not dry:
        print(
            "error: --dry_run false needs a CUDA device and none is available; run without it for the CPU dry run",
            file=sys.stderr,
        )
        return 2
    chosen = [sections] if isinstance(sections, str) else list(sections)
    bad = [s for s in chosen if s not in SECTIONS and s != "train"]
    if bad:
        print(f"error: unknown sections {bad}: choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    dev = torch.device("cuda:0" if cuda else "cpu")
    if not cuda:
        print(
            "No CUDA device: this is a DRY RUN of the same code paths on tiny sizes on the CPU (gloo, peak RSS); "
            "its numbers are not GPU numbers. Run it on a CUDA machine for the real check.",
            flush=True,
        )
    elif dry:
        print(
            "DRY RUN on the GPU at tiny sizes (--dry_run true): the numbers are not the published-size ones.",
            flush=True,
        )
    result: dict[str, Any] = {
        "cuda": cuda,
        "dry_run": dry,
        "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sections": {},
        "errors": {},
    }
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="unipet_gpu_check_"))
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "train": lambda: train_section(dev, dry, iterations),
        "inference_network": lambda: inference_network_section(dev, dry),
        "train_workflow": lambda: train_workflow_section(dev, dry, work, timeout_s),
        "inference_e2e": lambda: inference_e2e_section(dev, dry, work, timeout_s),
        "evaluate": lambda: evaluate_section(dev, dry, work, timeout_s),
        "multi_gpu_train": lambda: multi_gpu_section(dev, dry, work, timeout_s),
    }
    try:
        for name in SECTIONS:
            if name not in chosen:
                continue
            logger.info("section %s ...", name)
            t0 = time.perf_counter()
            log_path = _section_log_path(Path(out), name)
            try:
                result["sections"].update(steps[name]())
                logger.info("section %s done in %.1f s", name, time.perf_counter() - t0)
                log_path.unlink(missing_ok=True)  # an earlier run's failure log would now mislead
            except Exception as exc:  # one failing section must not hide the others' numbers
                msg = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, SubprocessSectionError):  # the whole log, for what the summary cut
                    try:
                        atomic_write(log_path, lambda tmp, text=exc.log: tmp.write_text(text))
                        msg += f" (whole log: {log_path})"
                    except OSError as write_exc:
                        msg += f" (its whole log could not be written to {log_path}: {write_exc})"
                result["errors"][name] = msg
                logger.debug(traceback.format_exc())
                print(
                    f"error: section {name} failed: {msg.splitlines()[0] if msg else type(exc).__name__}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = time.perf_counter() - t_start
    result["under_5_min"] = result["total_s"] < TARGET_TOTAL_S
    atomic_write_json(Path(out), result)
    _print_table(result)
    print(f"wrote {out}")
    return 1 if result["errors"] else 0


def _section_log_path(out: Path, section: str) -> Path:
    """Where a failed subprocess section's whole log is kept: beside the JSON, named for the section."""
    return out.with_name(f"{out.stem}.{section}.log")


def _print_table(result: dict[str, Any]) -> None:
    kind = "DRY RUN (tiny sizes, not GPU numbers)" if result["dry_run"] else "published sizes"
    print(
        f"\nUniPET GPU check on {result['device']} ({kind}), {result['total_s']:.0f} s in all "
        f"(target < {TARGET_TOTAL_S:.0f} s: {'met' if result['under_5_min'] else 'NOT met'})"
    )
    for name, sec in result["sections"].items():
        mem = {k: v for k, v in sec.items() if "peak" in k}
        speed = (
            f"{sec['iterations_per_s']:.2f} it/s"
            if "iterations_per_s" in sec
            else f"{sec.get('seconds', sec.get('seconds_incl_startup', math.nan)):.1f} s"
        )
        print(f"  {name:20s} {speed:>14s}  {', '.join(f'{k} {v}' for k, v in mem.items())}")
    for name, msg in result["errors"].items():
        print(f"  {name:20s} FAILED: {msg.splitlines()[0][:200]}")


def main() -> None:
    # the table is the output; the value is the exit status
    sys.exit(run_command(run, "python -m scripts.benchmarks.gpu_check"))


if __name__ == "__main__":
    main()
