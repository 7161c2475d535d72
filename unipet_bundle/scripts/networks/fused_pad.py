"""Fused CPU kernels for the network's padded passes (issue 14), built once per machine.

Without gradients a :class:`~scripts.networks.unipet.ModulatedResBlock` pads two products per block for its
convolutions: ``x * (1 + s1)`` and ``PReLU(a) * d1 * (1 + s2)``. PyTorch spends three memory-bound passes on each
(PReLU, the product into the padded interior, the faces); at the default 16 channels they are a third of a block's
CPU time next to its two convolutions. ``csrc/scale_pad.cpp`` writes the padded result in one pass, with the same
values bit for bit (tested). :func:`scripts.networks.unipet.padded_input` uses it for every other replicate padding
the network does without gradients too (the SAN's gated stage inputs).

``csrc/depthwise3.cpp`` (:func:`depthwise3_replicate`) runs the network's two depthwise 3x3x3 convolutions, the SAN's
high-pass and the output convolution (a depthwise one summed over the channels), on the unpadded input, reading its
faces in place: no padded copy, and a loop faster than oneDNN's depthwise kernel at these widths. The same function
up to float rounding (tested), not bit for bit. The same file's :func:`single_channel_conv3_replicate` runs the
network's ``1 -> C`` input convolution the same way (oneDNN has no fast kernel for one input channel: ~7 ms of a
~320 ms network on eight 32^3 windows, ~2.5 ms here), and :func:`depthwise3_project_prelu` the SAN's high-pass together
with its first stage's 1x1 reduction, PReLU and channel means (four full-size passes in one).

The kernels are C++, one library compiled on first use with ``torch.utils.cpp_extension`` (g++ and ninja; ~1 min),
as MONAI builds its own optional C++ parts, into ``<TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions>/unipet/<name>``,
the name holding a hash of the sources, torch's version and the flags; later processes import the built library
directly. A build lock left by a killed build is removed after :data:`BUILD_TIMEOUT_S` instead of being waited on
forever.

They are used only where they apply: float32, channels-last-3d features on the CPU (inference's default
``memory_format``), no autograd (and, for the depthwise one, no autocast), outside TorchScript. Everywhere else,
and when the build fails (no compiler: one WARNING says why), the network runs PyTorch's own passes: the same numbers
(up to float rounding for the depthwise convolutions), slower.

Switched by ``configs/inference.json``'s ``fused_cpu_kernels`` (default true; an ``initialize`` step calls
:func:`enable_fused_kernels`; :class:`scripts.inference.denoise.BundleDenoiser` and the benchmarks read the same
key). ``python -m scripts.networks.fused_pad`` builds it ahead (``make setup`` does) and says whether it loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from scripts.common.io import atomic_write
from scripts.networks.modulated_conv import prelu_replicate_pad, replicate_depthwise3

__all__ = [
    "enable_fused_kernels",
    "fused_kernels_as_configured",
    "fused_kernel_status",
    "depthwise3_project_prelu",
    "depthwise3_replicate",
    "prelu_scale_pad",
    "single_channel_conv3_replicate",
]

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("scale_pad.cpp", "depthwise3.cpp", "module.cpp"))
DEPTHWISE_CHANNELS = (8, 16, 32, 64)
"""Channel counts :func:`depthwise3_replicate`'s kernel is compiled for (others run PyTorch's path)."""
PROJECT_CHANNELS = (8, 16)
"""Output channel counts :func:`depthwise3_project_prelu`'s kernel is compiled for."""
CONFIG_KEY = "fused_cpu_kernels"

_lock = threading.Lock()
# "enabled": asked for; "module": the loaded extension or None; "reason": why it is not used (or "in use");
# "calls", "depthwise_calls", "input_calls", "project_calls": kernel calls made (the tests check that a kernel ran,
# not only that it was built)
# "failed": why the build failed in this process ("" until then), so it is tried once
_state: dict[str, Any] = {
    "enabled": False,
    "module": None,
    "reason": "not enabled",
    "calls": 0,
    "depthwise_calls": 0,
    "input_calls": 0,
    "project_calls": 0,
    "failed": "",
}


BUILD_TIMEOUT_S = 600.0
"""A build lock older than this is an interrupted build's (a build takes ~1 min): removed, not waited on forever."""


def _extension_name() -> str:
    # the source, torch's and Python's versions, the CPU architecture and the flags in the name: an edited kernel,
    # another interpreter or another machine sharing the cache never loads (or overwrites) another's build
    key = f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}|{_CFLAGS}"
    h = hashlib.sha256()
    for source in SOURCES:  # each file's name and size before its bytes: text moved between files changes the name
        data = source.read_bytes()
        h.update(f"{source.name}|{len(data)}|".encode() + data)
    h.update(key.encode())
    digest = h.hexdigest()[:12]
    return f"unipet_fused_{digest}"


# no -march=native: the cache may be shared by machines of other CPUs (the depthwise loop carries its own AVX-512 and
# AVX + FMA clones, chosen at load time; the padding loop is memory-bound). -fopenmp: at::parallel_for's OpenMP loop
# lives in the header.
_CFLAGS = ("-O3", "-fopenmp")


def _build_directory(name: str) -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / "unipet" / name


def _import_built(name: str, library: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clear_stale_lock(lock: Path) -> None:
    """Wait for a build another process is running; remove the lock of one that was killed.

    PyTorch's own build lock is a bare file that ``load`` waits on for as long as it exists, so a build killed
    mid-way (Ctrl-C, a job's time limit) would hang every later run at start-up."""
    deadline = time.monotonic() + BUILD_TIMEOUT_S  # also bounds a lock stamped in the future (clock skew)
    while lock.exists():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > BUILD_TIMEOUT_S or time.monotonic() > deadline:
            logger.warning("fused CPU kernel: removing %s, left %.0f s ago by a build that did not finish", lock, age)
            lock.unlink(missing_ok=True)
            return
        time.sleep(1.0)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build() -> Any:
    name = _extension_name()
    build_dir = _build_directory(name)
    library, lock = build_dir / f"{name}.so", build_dir / "lock"
    # the linker writes the library in place, so a file alone may be a killed build's torso (loading one is a
    # SIGBUS, not an ImportError): imported directly only when a finished build vouched for these very bytes
    done = build_dir / f"{name}.so.sha256"
    if library.is_file() and done.is_file() and not lock.exists():
        if done.read_text().strip() == _sha256(library):
            try:  # without PyTorch's lock and ninja's up-to-date check
                return _import_built(name, library)
            except ImportError as err:
                logger.info("fused CPU kernel: rebuilding (%s)", err)
    build_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(lock)
    done.unlink(missing_ok=True)
    from torch.utils.cpp_extension import load

    module = load(
        name=name,
        sources=[str(source) for source in SOURCES],
        extra_cflags=list(_CFLAGS),
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )
    if library.is_file():
        atomic_write(done, lambda tmp: tmp.write_text(_sha256(library) + "\n"))
    return module


def enable_fused_kernels(enabled: bool = True) -> dict[str, Any]:
    """Use the fused kernels from now on in this process (building them on first use), or stop using them.

    Never raises for a failed build: it logs one WARNING with the reason and the network keeps PyTorch's passes (the
    same numbers up to float rounding). Returns :func:`fused_kernel_status`.
    """
    from scripts.common.options import as_bool

    enabled = as_bool(enabled, CONFIG_KEY)
    with _lock:
        _state["enabled"] = enabled
        if not enabled:
            _state["reason"] = f"{CONFIG_KEY} is false"
            logger.info("fused CPU kernel off (%s false): PyTorch's element-wise passes", CONFIG_KEY)
            return fused_kernel_status()
        if _state["module"] is None and _state["failed"]:
            # tried in this process already: one WARNING then, no rebuild per study (a Deploy app makes a
            # BundleDenoiser per request)
            _state["reason"] = _state["failed"]
            return fused_kernel_status()
        if _state["module"] is None:
            missing = [str(source) for source in SOURCES if not source.is_file()]
            if missing:
                _state["reason"] = f"its source {missing[0]} is missing"
            else:
                try:
                    logger.info("fused CPU kernel: loading (compiled once per machine, ~1 min the first time)")
                    _state["module"] = _build()
                except Exception as err:  # no compiler, no ninja, unwritable cache: all mean "use PyTorch's path"
                    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    _state["reason"] = f"the build failed ({type(err).__name__}: {first[:300]})"
            if _state["module"] is None:
                _state["failed"] = _state["reason"]
                logger.warning(
                    "fused CPU kernel not used: %s; the network runs PyTorch's passes (the same numbers up to float "
                    "rounding, slower). Install g++ and ninja, or set %s false to silence this",
                    _state["reason"],
                    CONFIG_KEY,
                )
                return fused_kernel_status()
        _state["reason"] = "in use"
        logger.info("fused CPU kernel in use (float32 channels-last features without gradients)")
    return fused_kernel_status()


def fused_kernels_as_configured(parser: Any) -> dict[str, Any]:
    """:func:`enable_fused_kernels` with a parsed bundle config's ``fused_cpu_kernels`` (false when absent)."""
    enabled = parser.get_parsed_content(CONFIG_KEY) if CONFIG_KEY in parser else False
    return enable_fused_kernels(enabled)


def fused_kernel_status() -> dict[str, Any]:
    """``{"enabled", "loaded", "in_use", "reason", "calls", "depthwise_calls", "input_calls", "project_calls"}`` of this
    process (the ``*calls`` count each kernel's calls)."""
    loaded = _state["module"] is not None
    return {
        "enabled": bool(_state["enabled"]),
        "loaded": loaded,
        "in_use": bool(_state["enabled"]) and loaded,
        "reason": str(_state["reason"]),
        "calls": int(_state["calls"]),
        "depthwise_calls": int(_state["depthwise_calls"]),
        "input_calls": int(_state["input_calls"]),
        "project_calls": int(_state["project_calls"]),
    }


def _applies(x: torch.Tensor, scale: Optional[torch.Tensor], slope: Optional[torch.Tensor]) -> bool:
    if not (_state["enabled"] and _state["module"] is not None):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scale, slope)):
        return False  # autograd records: PyTorch's differentiable passes
    if not (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 5
        and x.numel() > 0
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return False
    b, c = x.shape[0], x.shape[1]
    if scale is not None and not (
        scale.device.type == "cpu" and scale.dtype == torch.float32 and tuple(scale.shape) == (b, c, 1, 1, 1)
    ):
        return False  # only the per-sample, per-channel factor; any other broadcast is PyTorch's
    return slope is None or (
        slope.device.type == "cpu" and slope.dtype == torch.float32 and slope.dim() == 1 and slope.numel() in (1, c)
    )


def _weights_apply(c: int, weight: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether a convolution kernel can take ``weight`` (and ``others``) for ``c`` channels: a ``(c, 1, 3, 3, 3)``
    weight, ``c`` in :data:`DEPTHWISE_CHANNELS`, every tensor float32 on the CPU and none recording gradients, autocast
    off (PyTorch's convolution would run in bf16 there: the kernel's float32 would be another function)."""
    tensors = [t for t in (weight, *others) if t is not None]
    return (
        c in DEPTHWISE_CHANNELS
        and tuple(weight.shape) == (c, 1, 3, 3, 3)
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not torch.is_autocast_enabled("cpu")
    )


def prelu_scale_pad(
    x: torch.Tensor, scale: Optional[torch.Tensor], slope: Optional[torch.Tensor], p: int
) -> torch.Tensor:
    """``replicate_pad(PReLU(x) * scale, p)``; ``slope=None`` skips the PReLU, ``scale=None`` the product.

    Args:
        x: ``(B, C, D, H, W)`` features.
        scale: per-sample, per-channel factor ``(B, C, 1, 1, 1)`` in ``x``'s dtype, or None.
        slope: the PReLU's weight, ``(C,)`` or ``(1,)``, or None.
        p: padding width (voxels).

    Returns ``(B, C, D + 2p, H + 2p, W + 2p)`` in ``x``'s memory format: from the fused kernel where it applies
    (see the module docstring), else from PyTorch's passes; the same values either way. When autograd records, it
    is PyTorch's differentiable passes.
    """
    if _applies(x, scale, slope):
        b, c = x.shape[0], x.shape[1]
        s = x.new_ones((b, c)) if scale is None else scale.reshape(b, c).contiguous()
        if slope is None:
            k = x.new_ones((c,))
        else:
            k = slope.detach().to(torch.float32).reshape(-1).expand(c).contiguous()
        _state["calls"] += 1
        return _state["module"].scale_pad(x, s, k, int(p))
    return prelu_replicate_pad(x, scale, slope, p)


def depthwise3_replicate(x: torch.Tensor, weight: torch.Tensor, channel_sum: bool = False) -> torch.Tensor:
    """``conv3d(replicate_pad(x, 1), weight, groups=C)``, summed over the channels with ``channel_sum``; no bias.

    Args:
        x: ``(B, C, D, H, W)`` features.
        weight: ``(C, 1, 3, 3, 3)`` depthwise kernel.
        channel_sum: return the sum over the channels, ``(B, 1, D, H, W)``, accumulated in float32 (a float32
            result for bf16/fp16 features).

    Returns ``(B, C, D, H, W)`` (or ``(B, 1, D, H, W)``): from the fused kernel where it applies (float32
    channels-last features on the CPU, C in :data:`DEPTHWISE_CHANNELS`, a ``(C, 1, 3, 3, 3)`` weight, nothing recording
    gradients, autocast off; see the module docstring), else PyTorch's passes
    (:func:`~scripts.networks.modulated_conv.replicate_depthwise3`); the same function up to float rounding.
    """
    c = x.shape[1] if x.dim() == 5 else 0
    if _applies(x, None, None) and _weights_apply(c, weight):  # (_applies: a 5-D tensor with no empty axis)
        _state["depthwise_calls"] += 1
        return _state["module"].depthwise3_replicate(x, weight.detach().contiguous(), bool(channel_sum))
    return replicate_depthwise3(x, weight, channel_sum)


def single_channel_conv3_replicate(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """``conv3d(pad(x, 1, mode="replicate"), weight, bias)`` for a single-channel input from the fused kernel (what
    ``nn.Conv3d(1, C, 3, padding=1, padding_mode="replicate")`` computes), or None where it does not apply (the caller
    then runs its own convolution, hooks and all).

    Args:
        x: ``(B, 1, D, H, W)`` input.
        weight: ``(C, 1, 3, 3, 3)`` kernel.
        bias: ``(C,)`` or None.

    Returns ``(B, C, D, H, W)`` channels-last where it applies (float32 contiguous input on the CPU, C in
    :data:`DEPTHWISE_CHANNELS`, nothing recording gradients, autocast off), else None. The same function as PyTorch's
    convolution up to float rounding.
    """
    c = weight.shape[0] if weight.dim() == 5 else 0
    if not (
        _applies(x, None, None)  # one channel: channels-last and NCDHW are the same bytes
        and x.shape[1] == 1
        and _weights_apply(c, weight, bias)
        and (bias is None or bias.numel() == c)
    ):
        return None
    _state["input_calls"] += 1
    b = None if bias is None else bias.detach().reshape(-1).contiguous()
    return _state["module"].single_channel_conv3_replicate(x, weight.detach().contiguous(), b)


def depthwise3_project_prelu(
    x: torch.Tensor, weight: torch.Tensor, proj: torch.Tensor, slope: torch.Tensor
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``y = prelu(conv3d(depthwise3(x), proj), slope)`` and ``y.mean(dim=(2, 3, 4))`` from one fused pass, or None where
    the kernel does not apply (the caller then runs its own passes).

    Args:
        x: ``(B, C, D, H, W)`` features, C in :data:`DEPTHWISE_CHANNELS`.
        weight: ``(C, 1, 3, 3, 3)`` depthwise kernel (edge-replicated faces, as :func:`depthwise3_replicate`).
        proj: ``(M, C, 1, 1, 1)`` 1x1 convolution weight, no bias, M in :data:`PROJECT_CHANNELS`.
        slope: the PReLU's single weight, ``(1,)``.

    Returns ``(y (B, M, D, H, W) channels-last, means (B, M) float32)`` where it applies (float32 channels-last
    features on the CPU, nothing recording gradients, autocast off), else None. The same function as those passes up
    to float rounding (each row's sums in float, the rows' sums added in double in a fixed order: the same means on
    any number of threads).
    """
    c = x.shape[1] if x.dim() == 5 else 0
    m = proj.shape[0] if proj.dim() == 5 else 0
    if not (
        _applies(x, None, None)
        and m in PROJECT_CHANNELS
        and tuple(proj.shape) == (m, c, 1, 1, 1)
        and slope.numel() == 1
        and _weights_apply(c, weight, proj, slope)
    ):
        return None
    _state["project_calls"] += 1
    y, means = _state["module"].depthwise3_project_prelu(
        x, weight.detach().contiguous(), proj.detach().reshape(m, c).contiguous(), float(slope.detach().reshape(()))
    )
    return y, means


def build(fused_cpu_kernels: bool = True) -> None:
    """Build (once per machine) and load the fused CPU kernels, and say whether they are in use.

    Exit status 0 either way: without them the bundle runs PyTorch's passes (the same numbers up to float rounding,
    slower).

    Args:
        fused_cpu_kernels: false only reports that the kernel is off.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    status = enable_fused_kernels(fused_cpu_kernels)
    print(f"fused CPU kernel: {'in use' if status['in_use'] else 'not used: ' + status['reason']}")


def main() -> None:
    from scripts.common.cli import run_command

    run_command(build, "python -m scripts.networks.fused_pad")


if __name__ == "__main__":
    main()
