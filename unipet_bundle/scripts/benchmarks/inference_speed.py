"""Benchmark: whole-volume inference as ``configs/inference.json`` does it vs the reference one-patch-at-a-time loop.

Issue "Whole-volume inference", benchmark section. Variants, each run in its own subprocess (so its peak
RSS is its own), interleaved (A, B, C, A, B, C, ...) and repeated, medians reported:

- ``ours``: exactly what inference.json builds (its ``network_def``, ``inferer``, ``suv_max``, patch size,
  ``sw_batch_size``, overlap, Gaussian blending, output stitched on the CPU), timed over the network +
  sliding-window stage on a synthetic SUV volume already on the network grid (normalised);
- ``ours_window64``: the same inferer with the baseline's windows (roi = ``baseline_window``, overlap
  ``1 - baseline_stride / baseline_window``). UniPET's SAN pools over the whole window, so the window
  size changes the output; this variant separates "same windows" from "smaller windows";
- ``baseline``: the reference code's approach, one ``baseline_window``^3 window at a time (batch 1) with
  stride ``baseline_stride``, overlaps averaged uniformly (:func:`one_patch_at_a_time`). On a large
  volume ``--large_baseline_windows N`` times its first N windows and scales to all of them (marked
  "extrapolated"; every window costs the same);
- ``e2e``: ``python -m monai.bundle run --config_file configs/inference.json`` on a NIfTI of the volume
  (load, reorient, resample, infer, correction back to the native grid, write: what a user waits for),
  python start-up included;
- ``e2e_today``: the same run with :data:`TODAY_PIPELINE` layered on the config: the 0.2.0 pipeline
  (a deep copy of the native volume, float64 ``Spacingd``, ``Invertd`` of both the prediction and the
  network input back to the native grid in float64, then the residual, and the network in the default
  memory layout, ``memory_format`` contiguous), kept here so the memory/speed gain of issue 14 is measured
  against it in the same run. It shares the reader (the first input read once), the QC report and the
  writer with ``e2e``: their speed-ups count for both. It has no level lock (0.5.0): with the lock on (the
  default) the two outputs differ by what the lock removes; ``--override`` a file with
  ``{"level_lock_fwhm_mm": 0}`` to compare them like for like.

For issue 14's whole-body target run the Quadra-size study at its own voxel size, e.g.
``--sizes "[[440,440,644]]" --e2e_spacing 1.65 --large_variants "['e2e_today','e2e']" --repeats 1``:
the table then prints each variant's peak RSS as a multiple of the float32 input and the speed-up of
``e2e`` over ``e2e_today`` (targets: <= 3 GB and <= 6x the input; >= 1.5x faster).

All variants use one random but fixed, non-identity network (the zero-initialised output conv and style
layers perturbed), saved as a checkpoint and loaded through the bundle's own loader. The largest
absolute difference between each variant's output and the baseline's is reported in SUV, beside the
size of the network's correction, so "equal output" can be judged.

Targets (issue): at least 2x faster than the baseline; peak RSS under 8 GB for 440x440x644; the
128x128x267 volume in under 60 s with the default network.

    cd unipet_bundle && python -m scripts.benchmarks.inference_speed [--config configs/inference.json]
        [--override my.json] [--sizes "[[128,128,267],[440,440,644]]"] [--repeats "[3,1]"] [--skip_large]
        [--large_variants "['ours']"] [--large_baseline_windows 400] [--variants "['ours','baseline']"] [--keep DIR]
        [--output runs/benchmarks/inference_speed.json]

Prints a table per size and writes JSON (default ``runs/benchmarks/inference_speed.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scripts.common.allocator import keep_freed_memory_as_configured
from scripts.common.cli import run_command
from scripts.common.io import atomic_write, atomic_write_json
from scripts.common.weights import file_sha256
from scripts.data.io import save_nifti
from scripts.networks.fused_pad import fused_kernels_as_configured

__all__ = [
    "BenchmarkInputError",
    "BenchmarkRunError",
    "VARIANTS",
    "one_patch_at_a_time",
    "patch_starts",
    "perturb_network",
    "run",
    "synthetic_suv",
    "worker_main",
]

logger = logging.getLogger("unipet.benchmark")

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("ours", "ours_window64", "baseline", "e2e_today", "e2e")
SMALL_SHAPE = (128, 128, 267)  # the targets name these two sizes
LARGE_SHAPE = (440, 440, 644)
LARGE_VOXELS = 50_000_000  # default of --large_voxels: 1 repeat by default, --skip_large skips it
TARGET_SPEEDUP = 2.0
TARGET_LARGE_RSS_GB = 8.0
TARGET_SMALL_S = 60.0
TARGET_E2E_SPEEDUP = 1.5  # issue 14: e2e vs e2e_today on the Quadra-size study
TARGET_E2E_RSS_GB = 3.0
TARGET_E2E_RSS_OVER_INPUT = 6.0
_GB = 1e9
_SLAB = 8  # rows of axis 0 per step when generating/comparing volumes: bounds the temporaries


class BenchmarkInputError(ValueError):
    """Bad benchmark option (sizes, repeats, variants, paths); the message names the fix."""


class BenchmarkRunError(RuntimeError):
    """A variant's subprocess failed; its last log lines were printed to stderr first."""


# ------------------------------------------------------------------------------ today's pipeline


class LegacyNativeResidualSUVd:
    """The 0.2.0 residual step, for the ``e2e_today`` baseline only: ``native + suv_max * (pred - input)``
    where both ``pred`` and the network input were already inverted (``Invertd``) to the native grid."""

    def __init__(
        self, keys: str = "pred", image_key: str = "net_input", native_key: str = "native_suv", suv_max: float = 20.0
    ) -> None:
        self.key, self.image_key, self.native_key, self.suv_max = keys, image_key, native_key, float(suv_max)

    def __call__(self, data: dict) -> dict:
        from monai.data import MetaTensor

        d = dict(data)
        native = torch.as_tensor(d[self.native_key]).float().cpu()
        back = torch.as_tensor(d[self.image_key]).float().cpu()
        pred = d[self.key]
        suv = native + self.suv_max * (torch.as_tensor(pred).float().cpu() - back)
        if isinstance(pred, MetaTensor):
            out = pred.clone()
            out.set_array(suv)
            d[self.key] = out
        else:
            d[self.key] = suv
        return d


def today_pipeline(config: str | os.PathLike) -> dict[str, Any]:
    """Config overrides that turn ``config`` (inference.json) back into the 0.2.0 pipeline (see ``e2e_today``).

    The writer is taken from the config itself, so both variants write the same files.
    """
    content = json.loads(Path(config).read_text())
    writer = [
        t
        for t in content["postprocessing"]["transforms"]
        if isinstance(t, dict) and str(t.get("_target_", "")).endswith("SaveDenoisedd")
    ]
    if len(writer) != 1:
        raise BenchmarkInputError(
            f"{config}: no single SaveDenoisedd in postprocessing; cannot build the e2e_today baseline"
        )
    content_keys = set(content)
    return {
        # the 0.2.0 network stage: default memory layout (channels-last weights came with issue 14)
        **({"memory_format": "contiguous"} if "memory_format" in content_keys else {}),
        # and the C library's default host memory handling (host_memory_cache_mb came with issue 14)
        **({"host_memory_cache_mb": 0} if "host_memory_cache_mb" in content_keys else {}),
        # and PyTorch's own element-wise passes (the fused CPU kernel came with issue 14; contiguous features never
        # use it, so this only keeps the baseline from building or loading it)
        **({"fused_cpu_kernels": False} if "fused_cpu_kernels" in content_keys else {}),
        "keep_native": {"_target_": "CopyItemsd", "keys": "image", "names": "native_suv"},
        "resample_transform#dtype": "$numpy.float64",
        "preprocessing#transforms": "$[@load_transform, @keep_native] + ([@resample_transform] if @resample_enabled else []) + @intensity_transforms",
        "postprocessing#transforms": [
            {"_target_": "CopyItemsd", "keys": "image", "names": "net_input"},
            {
                "_target_": "Invertd",
                "keys": ["pred", "net_input"],
                "transform": "@preprocessing",
                "orig_keys": ["image", "image"],
                "nearest_interp": False,
                "to_tensor": True,
                "device": "cpu",
            },
            {
                "_target_": "scripts.benchmarks.inference_speed.LegacyNativeResidualSUVd",
                "keys": "pred",
                "image_key": "net_input",
                "native_key": "native_suv",
                "suv_max": "@suv_max",
            },
            writer[0],
        ],
    }


# ------------------------------------------------------------------------------------- the volume


def synthetic_suv(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A whole-body-like SUV volume: float32 ``(X, Y, Z)``, Z axial, in SUV (g/mL).

    An elliptic body (SUV ~1 with smooth variation) over most of the axial extent, a liver-like
    region (~2.5), a few hot lesions (6-12) and a bladder above ``suv_max`` (~30), with multiplicative
    Gaussian noise (std 30 %) and air 0. Synthetic content is enough to time inference; it is not meant
    to look like a reconstruction. Built slab by slab along X, so the peak memory is the volume itself.
    """
    X, Y, Z = (int(s) for s in shape)
    rng = np.random.default_rng(seed)
    # (centre as a fraction of the volume, radius as a fraction of min(X, Y), SUV)
    spots = [((0.35, 0.45, 0.55), 0.18, 2.5), ((0.5, 0.55, 0.12), 0.07, 30.0)]
    spots += [
        (
            tuple(rng.uniform([0.3, 0.35, 0.15], [0.7, 0.65, 0.9])),
            float(rng.uniform(0.01, 0.03)),
            float(rng.uniform(6.0, 12.0)),
        )
        for _ in range(6)
    ]
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty((X, Y, Z), dtype=torch.float32)
    y = torch.arange(Y, dtype=torch.float32).view(1, Y, 1)
    z = torch.arange(Z, dtype=torch.float32).view(1, 1, Z)
    in_z = ((z >= 0.03 * Z) & (z <= 0.97 * Z)).float()
    scale = float(min(X, Y))
    for a in range(0, X, _SLAB):
        b = min(a + _SLAB, X)
        x = torch.arange(a, b, dtype=torch.float32).view(-1, 1, 1)
        body = ((((x - 0.5 * X) / (0.42 * X)) ** 2 + ((y - 0.5 * Y) / (0.32 * Y)) ** 2) <= 1.0).float() * in_z
        mean = body * (1.0 + 0.3 * torch.sin(x / 7.0) * torch.cos(y / 11.0) * torch.sin(z / 13.0))
        for (cx, cy, cz), r, suv in spots:
            d2 = ((x - cx * X) ** 2 + (y - cy * Y) ** 2) / (r * scale) ** 2 + ((z - cz * Z) / (r * scale)) ** 2
            mean = torch.where((d2 <= 1.0) & (body > 0), torch.full_like(mean, suv), mean)
        noise = torch.randn(mean.shape, generator=gen)
        out[a:b] = mean * (1.0 + 0.3 * noise)
    return out


# ---------------------------------------------------------------------------------- the baseline


def patch_starts(size: int, window: int, stride: int) -> list[int]:
    """Window start indices along one axis: ``0, stride, 2*stride, ...`` and one flush with the end.

    The same positions MONAI's sliding window uses with ``interval = stride`` (``min(i * stride,
    size - window)``), so both approaches see the same windows. ``size <= window``: one window at 0.
    """
    if window < 1 or stride < 1:
        raise BenchmarkInputError(f"window ({window}) and stride ({stride}) must be >= 1")
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@torch.no_grad()
def one_patch_at_a_time(
    network: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    window: int = 64,
    stride: int = 32,
    device: torch.device | str | None = None,
    max_windows: int | None = None,
) -> torch.Tensor:
    """The reference inference loop: ``window``^3 windows with ``stride``, one at a time, overlaps averaged.

    Written for the benchmark after the public UniPET code's approach (one patch per forward pass),
    with uniform averaging of overlaps instead of its crop-and-overwrite. Axes shorter than ``window``
    are zero-padded symmetrically (as MONAI does) and cropped back.

    Args:
        network: maps ``(1, C, w, w, w)`` to ``(1, C_out, w, w, w)``.
        image: ``(1, C, X, Y, Z)`` on the CPU (normalised SUV).
        window: window edge in voxels.
        stride: step between window starts in voxels.
        device: where each window runs (default: the image's device); the result stays on the CPU.
        max_windows: for timing a huge volume only: stop after this many windows (voxels no window
            reached are left 0).

    Returns:
        ``(1, C_out, X, Y, Z)`` float32 on the CPU.
    """
    if image.dim() != 5 or image.shape[0] != 1:
        raise ValueError(f"expected an image (1, C, X, Y, Z), got {list(image.shape)}")
    spatial = list(image.shape[2:])
    pads = [max(window - s, 0) for s in spatial]
    if any(pads):
        # F.pad takes the last axis first
        widths = [w for p in reversed(pads) for w in (p // 2, p - p // 2)]
        image = F.pad(image, widths)
    padded = list(image.shape[2:])
    starts = [patch_starts(s, window, stride) for s in padded]
    dev = torch.device(device) if device is not None else image.device
    out: torch.Tensor | None = None
    count = torch.zeros((1, 1, *padded), dtype=torch.float32)
    for i, corner in enumerate(product(*starts)):
        if max_windows is not None and i >= max_windows:
            break
        region = (slice(None), slice(None), *[slice(c, c + window) for c in corner])
        pred = network(image[region].to(dev)).to("cpu", torch.float32)
        if out is None:
            out = torch.zeros((1, pred.shape[1], *padded), dtype=torch.float32)
        out[region] += pred
        count[region] += 1.0
    assert out is not None
    out /= count.clamp_min_(1.0)  # >= 1 everywhere once every window ran
    crop = (slice(None), slice(None), *[slice(p // 2, p // 2 + s) for p, s in zip(pads, spatial)])
    return out[crop].contiguous() if any(pads) else out


# ----------------------------------------------------------------------------------- the network


def perturb_network(network: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make an (identity-initialised) UniPET a fixed non-identity function, in place.

    The zero-initialised output conv gets N(0, (0.1 / sqrt(fan_in))^2) weights: on the synthetic
    volume the network's correction is then ~0.4 SUV RMS inside the body, about the size of the noise,
    as for a denoiser (larger weights would make every window-border effect, and so every difference
    between inference schemes, larger in proportion). Every block's zero-initialised style layer gets
    N(0, 1 / latent_dim) weights, so the SAN acts as in a trained network. Deterministic for a ``seed``.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        conv = network.output_conv
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (0.1 / math.sqrt(conv.weight[0].numel())))
        if conv.bias is not None:
            conv.bias.zero_()
        for block in getattr(network, "blocks", []):
            affine = getattr(block, "style_affine", None)
            if affine is not None:
                affine.weight.copy_(torch.randn(affine.weight.shape, generator=gen) / math.sqrt(affine.weight.shape[1]))
    return network


def _parser(config: str, override: str | None, device: str | None, values: dict[str, Any] | None = None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([config] + ([override] if override else []))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["progress"] = False
    if device:
        parser["device"] = f"$torch.device('{device}')"
    for key, value in (values or {}).items():
        parser[key] = value
    return parser


def _settings(config: str, override: str | None) -> dict[str, Any]:
    parser = _parser(config, override, "cpu")
    keys = (
        "patch_size",
        "sw_batch_size",
        "overlap",
        "suv_max",
        "target_spacing",
        "channels",
        "num_blocks",
        "latent_dim",
        "san_channels",
    )
    s = {k: parser.get_parsed_content(k) for k in keys}
    s["blend_mode"] = parser.get_parsed_content("inferer#mode")
    s["patch_size"] = [int(v) for v in s["patch_size"]]
    return s


# -------------------------------------------------------------------------------------- a worker


def _rss_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def worker_main(spec_path: str) -> int:
    """Run one variant in this process, as a parent :func:`run` asked (``spec_path``: a JSON spec).

    Writes ``{"seconds", "cpu_seconds", "rss_before_bytes", "peak_rss_bytes", "correction_max_suv", ...}`` to the spec's
    ``result`` path. The timed part is the network + sliding-window stage only; building the network,
    making the volume and saving the output are not timed.
    """
    from monai.networks.utils import eval_mode

    from scripts.inference.model import load_weights

    spec = json.loads(Path(spec_path).read_text())
    variant = spec["variant"]
    t_setup = time.perf_counter()
    values = {}
    if variant == "ours_window64":
        values = {
            "patch_size": [spec["baseline_window"]] * 3,
            "overlap": 1.0 - spec["baseline_stride"] / spec["baseline_window"],
        }
    parser = _parser(spec["config"], spec.get("override"), spec.get("device"), values)
    suv_max = float(parser.get_parsed_content("suv_max"))
    network = parser.get_parsed_content("network")
    load_weights(network, spec["checkpoint"], False, spec.get("checkpoint_sha256"))
    if variant != "baseline":  # what inference.json hands the inferer: its precision, memory format, host memory
        network = parser.get_parsed_content("inference_network")
        keep_freed_memory_as_configured(parser)
        fused_kernels_as_configured(parser)  # and the fused CPU kernel, as inference runs
    device = parser.get_parsed_content("device")
    image = synthetic_suv(spec["shape"], spec["seed"])[None, None]
    image /= suv_max  # the config's ScaleIntensityRanged (0..suv_max -> 0..1, no clipping), in place
    fraction = 1.0  # of the work timed; < 1 when a huge baseline is timed on its first windows only
    if variant == "baseline":
        win, stride = int(spec["baseline_window"]), int(spec["baseline_stride"])
        limit = spec.get("max_windows")
        total = math.prod(len(patch_starts(max(int(s), win), win, stride)) for s in spec["shape"])
        if limit is not None and limit < total:
            fraction = limit / total
        else:
            limit = None

        def infer(x: torch.Tensor) -> torch.Tensor:
            return one_patch_at_a_time(network, x, win, stride, device, max_windows=limit)

        warm_shape = (1, 1, win, win, win)
    else:
        inferer = parser.get_parsed_content("inferer")
        roi = [int(v) for v in parser.get_parsed_content("patch_size")]

        def infer(x: torch.Tensor) -> torch.Tensor:
            return inferer(x, network)

        warm_shape = (int(parser.get_parsed_content("sw_batch_size")), 1, *roi)
    with eval_mode(network):  # what SupervisedEvaluator does: eval() and no_grad
        network(torch.zeros(warm_shape, device=device))  # first call picks kernels; not what we time
        rss_before = _rss_now()
        t0, c0 = time.perf_counter(), time.process_time()
        pred = infer(image)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # divided by the fraction timed: the baseline's cost is the same for every window
        seconds = (time.perf_counter() - t0) / fraction
        cpu_seconds = (time.process_time() - c0) / fraction  # all threads; barely moved by other processes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    pred = torch.as_tensor(pred).detach().cpu()
    pred.mul_(suv_max)
    corr_max = 0.0
    for a in range(0, image.shape[2], _SLAB):
        delta = pred[0, 0, a : a + _SLAB] - image[0, 0, a : a + _SLAB] * suv_max
        corr_max = max(corr_max, float(delta.abs().max()))
    if fraction < 1.0:
        corr_max = None  # most of the output was never computed
    if spec.get("save") and fraction == 1.0:
        atomic_write(spec["save"], lambda tmp: np.save(tmp, pred[0, 0].numpy(), allow_pickle=False))
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "setup_s": t0 - t_setup,
        "correction_max_suv": corr_max,
        "threads": torch.get_num_threads(),
        "timed_fraction": fraction,
        "precision": getattr(network, "precision", "fp32"),
        "memory_format": getattr(network, "memory_format", "contiguous"),
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------ the parent


def _run_child(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float, float, int]:
    """Run ``cmd`` in the bundle root; returns (exit code, wall s, CPU s, the child's own peak RSS in bytes)."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=BUNDLE_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            # wait4 gives this child's rusage (RUSAGE_CHILDREN would be the max over every child so far)
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C or a kill of the parent must not leave a worker running for an hour
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    return code, wall, usage.ru_utime + usage.ru_stime, int(usage.ru_maxrss) * 1024


def _fail(what: str, code: int, log: Path) -> None:
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    sys.stderr.write("\n".join(tail) + "\n")
    raise BenchmarkRunError(f"{what} failed with exit status {code} (its last lines are above)")


def _compare(a: Path, b: Path) -> dict[str, float]:
    """Max and mean absolute difference (SUV) of two saved ``(X, Y, Z)`` outputs, read slab by slab."""
    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    if x.shape != y.shape:
        raise RuntimeError(f"outputs {a.name} {x.shape} and {b.name} {y.shape} differ in shape")
    mx, total = 0.0, 0.0
    for s in range(0, x.shape[0], _SLAB):
        d = np.abs(np.asarray(x[s : s + _SLAB], dtype=np.float64) - np.asarray(y[s : s + _SLAB], dtype=np.float64))
        mx, total = max(mx, float(d.max())), total + float(d.sum())
    return {"max_abs_diff_suv": mx, "mean_abs_diff_suv": total / x.size}


def _check_sizes(sizes: Any) -> list[tuple[int, int, int]]:
    if isinstance(sizes, (list, tuple)) and len(sizes) == 3 and all(isinstance(v, (int, np.integer)) for v in sizes):
        sizes = [sizes]
    ok = isinstance(sizes, (list, tuple)) and len(sizes) > 0
    out = []
    for s in sizes if ok else []:
        if not (
            isinstance(s, (list, tuple)) and len(s) == 3 and all(isinstance(v, (int, np.integer)) and v > 0 for v in s)
        ):
            ok = False
            break
        out.append(tuple(int(v) for v in s))
    if not ok:
        raise BenchmarkInputError(
            f'--sizes must be a list of X,Y,Z voxel counts, e.g. "[[128,128,267],[440,440,644]]", got {sizes!r}'
        )
    return out


def _check_variants(names: Any, flag: str) -> list[str]:
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names or [])
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise BenchmarkInputError(f"--{flag} must list some of {', '.join(VARIANTS)}, got {names!r}")
    return [v for v in VARIANTS if v in names]


def _check_repeats(repeats: Any, sizes: list[tuple[int, int, int]], large_voxels: int) -> list[int]:
    if repeats is None:
        return [1 if math.prod(s) > large_voxels else 3 for s in sizes]
    values = list(repeats) if isinstance(repeats, (list, tuple)) else [repeats] * len(sizes)
    if len(values) != len(sizes) or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in values):
        raise BenchmarkInputError(f"--repeats must be an integer >= 1 or one per size ({len(sizes)}), got {repeats!r}")
    return [int(v) for v in values]


def _windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    return math.prod(len(patch_starts(s, r, max(int(r * (1 - overlap)), 1))) for s, r in zip(shape, roi))


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def _labels(s: dict[str, Any], bw: int, bs: int) -> dict[str, str]:
    p = s["patch_size"]
    return {
        "ours": f"ours: inference.json ({_fmt_shape(p)}, ov {s['overlap']:g}, b{s['sw_batch_size']}, {s['blend_mode']})",
        "ours_window64": f"ours at baseline windows ({bw}^3, ov {1 - bs / bw:g}, b{s['sw_batch_size']})",
        "baseline": f"baseline: {bw}^3 stride {bs}, one at a time",
        "e2e_today": "end to end, 0.2.0 pipeline (Invertd float64)",
        "e2e": "end to end: monai.bundle run on NIfTI",
    }


def _print_table(dev: str, s: dict[str, Any], n_params: int, entry: dict[str, Any], labels: dict[str, str]) -> None:
    shape = entry["shape"]
    print(
        f"\nWhole-volume inference, {_fmt_shape(shape)} ({math.prod(shape) / 1e6:.1f} M voxels) on {dev} "
        f"({torch.get_num_threads()} threads), network {s['channels']} ch / {s['num_blocks']} blocks "
        f"({n_params:,} parameters), medians of {entry['repeats']} interleaved repeat(s), load average "
        f"{entry['load_average_1min'][0]:.1f} -> {entry['load_average_1min'][1]:.1f}"
    )
    print(
        f"{'variant':52s} {'windows':>8s} {'median s':>9s} {'CPU s':>8s} {'peak RSS GB':>12s} {'x input':>8s} "
        f"{'max|diff| SUV':>14s} {'mean|diff|':>11s}"
    )
    for name, v in entry["variants"].items():
        diff = entry["vs_baseline"].get(name, {}).get("max_abs_diff_suv")
        mean = entry["vs_baseline"].get(name, {}).get("mean_abs_diff_suv")
        diff_s = f"{diff:.4f}" if diff is not None else ("(reference)" if name == "baseline" else "-")
        label = labels[name]
        if name == "baseline" and entry.get("baseline_extrapolated_from_windows"):
            label, diff_s = f"{label} [x from {entry['baseline_extrapolated_from_windows']}]", "(not compared)"
        mean_s = f"{mean:.5f}" if mean is not None else ""
        win = str(v["windows"]) if v.get("windows") is not None else "-"
        print(
            f"{label:52s} {win:>8s} {v['median_s']:9.2f} {v['median_cpu_s']:8.1f} {v['peak_rss_gb']:12.2f} "
            f"{v['peak_rss_over_input']:8.1f} {diff_s:>14s} {mean_s:>11s}"
        )
    if entry.get("correction_max_suv") is not None:
        print(
            f"{'(network correction, max |out - in|, SUV)':52s} {'':8s} {'':9s} {'':8s} {'':12s} {'':8s} "
            f"{entry['correction_max_suv']:14.4f}"
        )
    if entry.get("speedup_e2e") is not None:
        verdict = "met" if entry["speedup_e2e"] >= TARGET_E2E_SPEEDUP else "NOT met"
        print(
            f"{'speed-up e2e_today / e2e':52s} {'':8s} {entry['speedup_e2e']:9.2f} {entry['cpu_speedup_e2e']:8.2f}  "
            f"target >= {TARGET_E2E_SPEEDUP:g} (wall): {verdict}"
        )
    if entry.get("vs_e2e_today"):
        d = entry["vs_e2e_today"]
        print(
            f"{'e2e vs e2e_today outputs: max / mean |diff| SUV':52s} {d['max_abs_diff_suv']:.4g} / {d['mean_abs_diff_suv']:.3g}"
        )
    for key, text in (
        ("speedup_ours", "speed-up baseline / ours"),
        ("speedup_ours_window64", "speed-up baseline / ours at baseline windows"),
    ):
        if entry.get(key) is not None:
            verdict = "met" if entry[key] >= TARGET_SPEEDUP else "NOT met"
            print(
                f"{text:52s} {'':8s} {entry[key]:9.2f} {entry['cpu_' + key]:8.2f}  target >= {TARGET_SPEEDUP:g} "
                f"(wall): {verdict}"
            )


def _targets(entries: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(targets_met, how each was judged); a target whose size or variant was not run is None."""
    met: dict[str, Any] = {
        "speedup_2x": None,
        "large_peak_rss_under_8gb": None,
        "small_under_60s": None,
        "e2e_speedup_1_5x": None,
        "e2e_peak_rss_3gb_6x_input": None,
    }
    basis: dict[str, str] = {}
    for e in entries:  # issue 14: judged on the largest size that ran both end-to-end variants
        v = e["variants"]
        if e.get("speedup_e2e") is not None:
            met["e2e_speedup_1_5x"] = e["speedup_e2e"] >= TARGET_E2E_SPEEDUP
            basis["e2e_speedup_1_5x"] = f"{_fmt_shape(e['shape'])}: e2e_today / e2e median wall {e['speedup_e2e']:.2f}"
        if "e2e" in v:
            ok = (
                v["e2e"]["peak_rss_gb"] <= TARGET_E2E_RSS_GB
                and v["e2e"]["peak_rss_over_input"] <= TARGET_E2E_RSS_OVER_INPUT
            )
            met["e2e_peak_rss_3gb_6x_input"] = ok
            basis["e2e_peak_rss_3gb_6x_input"] = (
                f"{_fmt_shape(e['shape'])}: e2e {v['e2e']['peak_rss_gb']:.2f} GB = "
                f"{v['e2e']['peak_rss_over_input']:.1f}x the float32 input"
            )
    ratios = [
        (
            e["shape"],
            e["speedup_ours"],
            " (baseline extrapolated)" if e.get("baseline_extrapolated_from_windows") else "",
        )
        for e in entries
        if e.get("speedup_ours") is not None
    ]
    if ratios:
        met["speedup_2x"] = all(r >= TARGET_SPEEDUP for _, r, _ in ratios)
        basis["speedup_2x"] = "baseline / ours median stage time, every size run: " + ", ".join(
            f"{_fmt_shape(s)} {r:.2f}{x}" for s, r, x in ratios
        )
    for e in entries:
        v = e["variants"]
        if tuple(e["shape"]) == LARGE_SHAPE:
            peaks = {k: v[k]["peak_rss_gb"] for k in ("ours", "e2e") if k in v}
            if peaks:
                met["large_peak_rss_under_8gb"] = all(p < TARGET_LARGE_RSS_GB for p in peaks.values())
                basis["large_peak_rss_under_8gb"] = ", ".join(f"{k} {p:.2f} GB" for k, p in peaks.items())
        if tuple(e["shape"]) == SMALL_SHAPE:
            key = "e2e" if "e2e" in v else ("ours" if "ours" in v else None)
            if key:
                met["small_under_60s"] = v[key]["median_s"] < TARGET_SMALL_S
                basis["small_under_60s"] = f"{key} median {v[key]['median_s']:.1f} s"
    return met, basis


def run(
    config: str = "configs/inference.json",
    override: str | None = None,
    sizes: Any = ((128, 128, 267), (440, 440, 644)),
    repeats: Any = None,
    variants: Any = ("ours", "ours_window64", "baseline", "e2e"),
    large_variants: Any = ("ours", "baseline"),
    skip_large: bool = False,
    large_voxels: int = LARGE_VOXELS,
    e2e_spacing: float | None = None,
    baseline_window: int = 64,
    baseline_stride: int = 32,
    large_baseline_windows: int | None = None,
    device: str | None = None,
    output: str = "runs/benchmarks/inference_speed.json",
    seed: int = 0,
    checkpoint: str | None = None,
    keep: str | None = None,
) -> dict[str, Any]:
    """Time inference.json's sliding window vs one 64^3 window at a time; print tables; write JSON.

    Args:
        config: the inference config whose network_def, inferer, patch_size, sw_batch_size, overlap and
            suv_max are benchmarked.
        override: optional JSON/YAML layered on the config (e.g. another network size).
        sizes: volumes to run, X,Y,Z voxels on the network grid: "[[128,128,267],[440,440,644]]".
        repeats: interleaved repeats per size: one integer for all, or one per size (default 3, and 1
            for large sizes).
        variants: variants for normal sizes, from ours, ours_window64, baseline, e2e_today, e2e.
        large_variants: variants for large sizes (the baseline on 440x440x644 takes ~20-80 min on 2 cores).
        skip_large: skip large sizes.
        large_voxels: sizes with more voxels than this are "large".
        e2e_spacing: voxel size (mm, isotropic) of the e2e NIfTI (default: the config's target_spacing,
            so the network grid is the given size).
        baseline_window: the baseline's window edge (the reference code: 64).
        baseline_stride: the baseline's stride (the reference code: 32).
        large_baseline_windows: on large sizes, time the baseline on its first N windows
            only and scale the time to all of them (its cost is the same for every window; its peak
            RSS is still the whole run's, its output is not compared).
        device: "cpu" or "cuda" for the windows (default: the config's device).
        output: JSON result path.
        seed: seed of the synthetic volume and the network weights.
        checkpoint: weights to benchmark instead of the random perturbed network (e.g. models/model.pt);
            they must fit the config's network.
        keep: a folder to keep the outputs, checkpoint and logs in (default: a temporary one, removed).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = Path(config).expanduser().absolute()
    ovr = Path(override).expanduser().absolute() if override else None
    ckpt = Path(checkpoint).expanduser().absolute() if checkpoint else None
    for p, flag in ((cfg, "config"), (ovr, "override"), (ckpt, "checkpoint")):
        if p is not None and not p.is_file():
            raise BenchmarkInputError(f"--{flag} {p} does not exist: pass an existing file")
    size_list = _check_sizes(sizes)
    if not isinstance(large_voxels, int) or large_voxels < 1:
        raise BenchmarkInputError(f"--large_voxels must be an integer >= 1, got {large_voxels!r}")
    rep_list = _check_repeats(repeats, size_list, large_voxels)
    normal_v = _check_variants(variants, "variants")
    large_v = _check_variants(large_variants, "large_variants")
    if large_baseline_windows is not None and (
        not isinstance(large_baseline_windows, int) or large_baseline_windows < 1
    ):
        raise BenchmarkInputError(f"--large_baseline_windows must be an integer >= 1, got {large_baseline_windows!r}")
    if baseline_window < 1 or baseline_stride < 1 or baseline_stride > baseline_window:
        raise BenchmarkInputError(
            f"need 1 <= --baseline_stride <= --baseline_window, got {baseline_stride} and {baseline_window}"
        )
    s = _settings(str(cfg), str(ovr) if ovr else None)

    work = Path(keep).expanduser().absolute() if keep else Path(tempfile.mkdtemp(prefix="unipet_infer_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        parser = _parser(str(cfg), str(ovr) if ovr else None, "cpu")
        torch.manual_seed(seed)
        network = parser.get_parsed_content("network_def")
        n_params = sum(p.numel() for p in network.parameters())
        if ckpt is not None:
            from scripts.inference.model import load_weights

            load_weights(network, ckpt, allow_untrained=False)  # a checkpoint that does not fit fails here, once
            weights = ckpt
            sha = file_sha256(ckpt)
        else:
            perturb_network(network, seed)
            weights = work / "perturbed_unipet.pt"
            atomic_write(weights, lambda tmp: torch.save(network.state_dict(), tmp))
            sha = file_sha256(weights)
        dev = device or str(_parser(str(cfg), str(ovr) if ovr else None, None).get_parsed_content("device"))
        labels = _labels(s, baseline_window, baseline_stride)
        spacing = float(e2e_spacing) if e2e_spacing is not None else float(np.mean(s["target_spacing"]))
        entries = []
        for shape, reps in zip(size_list, rep_list):
            large = math.prod(shape) > large_voxels
            if large and skip_large:
                logger.info("skipping %s (--skip_large)", _fmt_shape(shape))
                continue
            entries.append(
                _bench_size(
                    shape,
                    reps,
                    large_v if large else normal_v,
                    s,
                    str(cfg),
                    ovr,
                    (weights, sha),
                    device,
                    seed,
                    spacing,
                    baseline_window,
                    baseline_stride,
                    large_baseline_windows if large else None,
                    work,
                )
            )
            _print_table(dev, s, n_params, entries[-1], labels)
            if "ours" in entries[-1]["variants"]:  # network-stage GFLOP/s next to this machine's conv3d peak (issue 14)
                from scripts.benchmarks.compute_peak import network_stage_report

                ours = entries[-1]["variants"]["ours"]
                entries[-1]["gflops"] = network_stage_report(
                    str(cfg), str(ovr) if ovr else None, shape, ours["median_s"], ours.get("precision", "fp32"), dev
                )
                print(entries[-1]["gflops"]["line"])
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    met, basis = _targets(entries)
    result = {
        "device": dev,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": str(cfg),
        "override": str(ovr) if ovr else None,
        "settings": s,
        "network_parameters": n_params,
        "weights": str(ckpt) if ckpt else f"random, perturbed_network(seed={seed})",
        "baseline": {"window": baseline_window, "stride": baseline_stride, "batch": 1, "blend": "uniform average"},
        "e2e_spacing_mm": spacing,
        "seed": seed,
        "labels": labels,
        "sizes": entries,
        "targets": {
            "speedup_min": TARGET_SPEEDUP,
            "large_shape": list(LARGE_SHAPE),
            "large_peak_rss_gb_max": TARGET_LARGE_RSS_GB,
            "small_shape": list(SMALL_SHAPE),
            "small_seconds_max": TARGET_SMALL_S,
            "e2e_speedup_min": TARGET_E2E_SPEEDUP,
            "e2e_peak_rss_gb_max": TARGET_E2E_RSS_GB,
            "e2e_peak_rss_over_input_max": TARGET_E2E_RSS_OVER_INPUT,
        },
        "today_pipeline_overrides": today_pipeline(cfg),
        "targets_met": met,
        "targets_basis": basis,
    }
    print(
        "\ntargets: "
        + "; ".join(
            f"{k}: {'not run' if v is None else ('met' if v else 'NOT met')}" + (f" ({basis[k]})" if k in basis else "")
            for k, v in met.items()
        )
    )
    out = Path(output)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


def _bench_size(
    shape, reps, variants, s, cfg, ovr, weights, device, seed, spacing, bw, bs, max_windows, work
) -> dict[str, Any]:
    """Run every variant ``reps`` times (interleaved) on one size; returns that size's JSON entry."""
    checkpoint, sha = weights
    tag = _fmt_shape(shape)
    e2e_in = work / f"e2e_in_{tag}"
    e2e_variants = [v for v in variants if v.startswith("e2e")]
    if e2e_variants:
        e2e_in.mkdir(exist_ok=True)
        affine = np.diag([spacing, spacing, spacing, 1.0])
        save_nifti(synthetic_suv(shape, seed).numpy(), affine, e2e_in / f"synthetic_{tag}.nii", overwrite=True)
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpus: dict[str, list[float]] = {v: [] for v in variants}
    load_start = os.getloadavg()[0]
    peaks: dict[str, list[int]] = {v: [] for v in variants}
    extra: dict[str, dict[str, Any]] = {v: {} for v in variants}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for r in range(reps):
        for v in variants:  # interleaved: a slow phase of the shared machine hits every variant
            log = work / f"{v}_{tag}_{r}.log"
            if v in ("e2e", "e2e_today"):
                out_dir = work / f"{v}_out_{tag}_{r}"
                extra_cfg = [str(_today_override(cfg, work))] if v == "e2e_today" else []
                cfgs = json.dumps([cfg] + ([str(ovr)] if ovr else []) + extra_cfg)
                cmd = [
                    sys.executable,
                    "-m",
                    "monai.bundle",
                    "run",
                    "--config_file",
                    cfgs,
                    "--bundle_root",
                    str(BUNDLE_ROOT),
                    "--dataset_dir",
                    str(e2e_in),
                    "--output_dir",
                    str(out_dir),
                    "--checkpoint",
                    str(checkpoint),
                    "--checkpoint_sha256",
                    sha,
                    "--allow_untrained",
                    "false",
                ]
                if device:
                    cmd += ["--device", f"$torch.device('{device}')"]
                code, wall, cpu, peak = _run_child(cmd, log, env)
                if code != 0 or not list(out_dir.glob("*_denoised.nii.gz")):
                    _fail(f"{v} run on {tag}", code, log)
                if r == 0 and len(e2e_variants) == 2:  # keep the first outputs to compare the two pipelines
                    kept = work / f"{v}_{tag}.nii.gz"
                    next(out_dir.glob("*_denoised.nii.gz")).replace(kept)
                shutil.rmtree(out_dir, ignore_errors=True)
                times[v].append(wall)
                cpus[v].append(cpu)
            else:
                spec = {
                    "variant": v,
                    "config": cfg,
                    "override": str(ovr) if ovr else None,
                    "device": device,
                    "shape": list(shape),
                    "seed": seed,
                    "checkpoint": str(checkpoint),
                    "checkpoint_sha256": sha,
                    "max_windows": max_windows,
                    "baseline_window": bw,
                    "baseline_stride": bs,
                    "result": str(work / f"{v}_{tag}_{r}.json"),
                    "save": str(work / f"{v}_{tag}.npy") if r == 0 else None,
                }
                spec_path = work / f"{v}_{tag}_{r}.spec.json"
                spec_path.write_text(json.dumps(spec))
                cmd = [
                    sys.executable,
                    "-c",
                    "import sys; from scripts.benchmarks.inference_speed import worker_main; "
                    "sys.exit(worker_main(sys.argv[1]))",
                    str(spec_path),
                ]
                code, wall, _, peak = _run_child(cmd, log, env)
                if code != 0:
                    _fail(f"variant {v} on {tag}", code, log)
                res = json.loads(Path(spec["result"]).read_text())
                times[v].append(res["seconds"])
                cpus[v].append(res["cpu_seconds"])
                extra[v] = {
                    "correction_max_suv": res["correction_max_suv"],
                    "timed_fraction": res["timed_fraction"],
                    "rss_before_gb": res["rss_before_bytes"] / _GB,
                    "setup_s": res["setup_s"],
                    "precision": res["precision"],
                    "memory_format": res["memory_format"],
                }
            peaks[v].append(peak)
            logger.info(
                "%s %s repeat %d/%d: %.2f s (CPU %.2f s), peak RSS %.2f GB",
                tag,
                v,
                r + 1,
                reps,
                times[v][-1],
                cpus[v][-1],
                peak / _GB,
            )
    roi = {
        "ours": (s["patch_size"], s["overlap"]),
        "ours_window64": ([bw] * 3, 1 - bs / bw),
        "baseline": ([bw] * 3, 1 - bs / bw),
    }
    entry: dict[str, Any] = {
        "shape": list(shape),
        "voxels": math.prod(shape),
        "repeats": reps,
        "load_average_1min": [load_start, os.getloadavg()[0]],
        "variants": {},
    }
    for v in variants:
        entry["variants"][v] = {
            "median_s": statistics.median(times[v]),
            "all_s": times[v],
            "median_cpu_s": statistics.median(cpus[v]),
            "all_cpu_s": cpus[v],
            "peak_rss_gb": max(peaks[v]) / _GB,
            "all_peak_rss_gb": [p / _GB for p in peaks[v]],
            "peak_rss_over_input": max(peaks[v]) / (4.0 * math.prod(shape)),  # x the float32 volume
            "windows": _windows(shape, *roi[v]) if v in roi else None,
            **extra[v],
        }
    entry["vs_baseline"] = {}
    extrapolated = "baseline" in variants and extra["baseline"]["timed_fraction"] < 1.0
    if extrapolated:
        entry["baseline_extrapolated_from_windows"] = max_windows
    if "baseline" in variants and not extrapolated:
        ref = work / f"baseline_{tag}.npy"
        for v in ("ours", "ours_window64"):
            if v in variants:
                entry["vs_baseline"][v] = _compare(work / f"{v}_{tag}.npy", ref)
        entry["correction_max_suv"] = extra["baseline"]["correction_max_suv"]
        for d in entry["vs_baseline"].values():  # how unequal, relative to what the network changes at all
            d["max_abs_diff_over_max_correction"] = d["max_abs_diff_suv"] / max(entry["correction_max_suv"], 1e-12)
    elif "ours" in variants:
        entry["correction_max_suv"] = extra["ours"]["correction_max_suv"]
    if "baseline" in variants:
        base = entry["variants"]["baseline"]
        for v in ("ours", "ours_window64"):
            if v in variants:
                entry[f"speedup_{v}"] = base["median_s"] / entry["variants"][v]["median_s"]
                entry[f"cpu_speedup_{v}"] = base["median_cpu_s"] / entry["variants"][v]["median_cpu_s"]
    if "e2e" in variants and "e2e_today" in variants:
        entry["speedup_e2e"] = entry["variants"]["e2e_today"]["median_s"] / entry["variants"]["e2e"]["median_s"]
        entry["cpu_speedup_e2e"] = (
            entry["variants"]["e2e_today"]["median_cpu_s"] / entry["variants"]["e2e"]["median_cpu_s"]
        )
        entry["vs_e2e_today"] = _compare_nifti(work / f"e2e_{tag}.nii.gz", work / f"e2e_today_{tag}.nii.gz")
    for f in list(work.glob(f"*_{tag}.npy")) + list(work.glob(f"e2e*_{tag}.nii.gz")):
        f.unlink()
    return entry


def _today_override(config: str, work: Path) -> Path:
    """:func:`today_pipeline` as a JSON file the bundle runner can layer on the config."""
    path = work / "today_pipeline.json"
    if not path.exists():
        atomic_write_json(path, today_pipeline(config))
    return path


def _compare_nifti(a: Path, b: Path) -> dict[str, float]:
    """Max and mean absolute difference (SUV) of two NIfTI outputs on one grid, slab by slab."""
    import nibabel as nib

    # read whole (slicing a .nii.gz re-decompresses it from the start for every slab); the parent is not measured
    x, y = (np.asarray(nib.load(str(p)).dataobj, dtype=np.float32) for p in (a, b))
    if x.shape != y.shape:
        raise RuntimeError(f"outputs {a.name} {x.shape} and {b.name} {y.shape} differ in shape")
    mx, total = 0.0, 0.0
    for s in range(0, x.shape[2], _SLAB):
        d = np.abs(x[:, :, s : s + _SLAB].astype(np.float64) - y[:, :, s : s + _SLAB])
        mx, total = max(mx, float(d.max())), total + float(d.sum())
    return {"max_abs_diff_suv": mx, "mean_abs_diff_suv": total / x.size}


def main() -> None:
    """CLI entry point: bad options give one ``error:`` line and exit status 2."""
    try:
        # the tables are the output, not the returned dict
        run_command(run, "python -m scripts.benchmarks.inference_speed", bad_input=(BenchmarkInputError,))
    except BenchmarkRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
