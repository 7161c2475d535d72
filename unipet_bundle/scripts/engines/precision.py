"""Numerical precision of the UniPET network: ``"fp32"`` or ``"bf16"`` (autocast), for inference and training.

``bf16`` runs the convolutions under ``torch.autocast`` with ``torch.bfloat16`` (on the CPU as well as on
CUDA); weights, optimiser state, losses and everything outside the network stay float32. The network's
output is cast back to float32 before it leaves :class:`PrecisionNetwork`, so sliding-window blending,
stitching, de-normalisation and resampling always work in float32. UniPET's global skip adds the float32
input to the bf16 correction, so only the correction (not the SUV level) carries bf16 rounding.

bf16 is only used where the hardware has it natively:

* CPU: the ``avx512_bf16`` or ``amx_bf16`` flags (x86) or ``bf16`` (AArch64) in ``/proc/cpuinfo``. Without
  them PyTorch still accepts bf16 autocast but emulates it, which is slower than fp32, so the request falls
  back to fp32 with one log line;
* CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer), else fp32 with one log line.

The measurement behind the configs' default is ``python -m scripts.benchmarks.precision`` (model card).
"""

from __future__ import annotations

import contextlib
import logging
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scripts.common.errors import UniPETInputError
from scripts.common.options import as_bool

__all__ = [
    "MEMORY_FORMATS",
    "PRECISIONS",
    "PrecisionNetwork",
    "autocast",
    "check_memory_format",
    "check_precision",
    "config_precision",
    "cpu_bf16_support",
    "resolve_precision",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
MEMORY_FORMATS = ("contiguous", "channels_last_3d")
_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_logged: set[tuple[str, str, str]] = set()  # one fallback line per (request, device, reason), not per window


def check_precision(precision: str) -> str:
    """``precision`` lower-cased if it is one of :data:`PRECISIONS`, else ``UniPETInputError`` (a ValueError)."""
    if not isinstance(precision, str) or precision.strip().lower() not in PRECISIONS:
        raise UniPETInputError(
            f"precision must be one of {list(PRECISIONS)}, got {precision!r}: set the config key "
            "'precision' (e.g. --precision fp32)"
        )
    return precision.strip().lower()


def check_memory_format(memory_format: str) -> str:
    """``memory_format`` if it is one of :data:`MEMORY_FORMATS`, else ``UniPETInputError`` (a ValueError)."""
    if not isinstance(memory_format, str) or memory_format.strip().lower() not in MEMORY_FORMATS:
        raise UniPETInputError(
            f"memory_format must be one of {list(MEMORY_FORMATS)}, got {memory_format!r}: set the config key "
            "'memory_format' (e.g. --memory_format channels_last_3d)"
        )
    return memory_format.strip().lower()


def cpu_bf16_support(cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and the evidence in words.

    Args:
        cpuinfo: text of ``/proc/cpuinfo`` (read from the system when None; tests pass their own).

    Returns:
        ``(supported, reason)``; ``reason`` names the flag found, or why bf16 is treated as unsupported.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False, f"cannot read /proc/cpuinfo on {platform.system()} to find native bf16 support"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 / AArch64 spelling
            flags.update(value.split())
    found = [f for f in _X86_BF16_FLAGS if f in flags]
    if not found and "bf16" in flags:
        found = ["bf16"]
    if found:
        return True, f"CPU flags {', '.join(found)}"
    return False, "the CPU lacks native bf16 (no avx512_bf16, amx_bf16 or bf16 flag in /proc/cpuinfo)"


def resolve_precision(precision: str, device: torch.device | str, cpuinfo: str | None = None) -> str:
    """The precision that will actually run: ``precision`` if ``device`` supports it, else ``"fp32"``.

    A bf16 request on hardware without native bf16 falls back to fp32 and says so in one log line
    (WARNING; logged once per process for a given device and reason).

    Args:
        precision: ``"fp32"`` or ``"bf16"`` (``UniPETInputError`` otherwise).
        device: where the network runs.
        cpuinfo: ``/proc/cpuinfo`` text for the CPU check (tests); read from the system when None.
    """
    precision = check_precision(precision)
    if precision == "fp32":
        return "fp32"
    dev = torch.device(device)
    if dev.type == "cpu":
        ok, reason = cpu_bf16_support(cpuinfo)
    elif dev.type == "cuda":
        ok = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        reason = "" if ok else "this CUDA device does not support bf16 (needs compute capability 8.0 or newer)"
    else:
        ok, reason = False, f"bf16 autocast is not enabled for device type {dev.type!r} in this bundle"
    if ok:
        return "bf16"
    key = (precision, dev.type, reason)
    if key not in _logged:
        _logged.add(key)
        logger.warning("precision 'bf16' requested but %s: running in fp32 (set precision 'fp32' to silence)", reason)
    return "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Context manager for one *resolved* precision: bf16 autocast on ``device``'s type, or nothing for fp32."""
    if check_precision(precision) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PrecisionNetwork(nn.Module):
    """Runs ``network`` at a given precision and always returns float32.

    Use it where a network is handed to an inferer or evaluator (``configs/inference.json``,
    ``validate#evaluator``): with ``precision="bf16"`` every forward runs under bf16 autocast and its
    output is cast back to float32, so the sliding-window blending and stitching never see bf16.
    The requested precision is resolved once, at construction (with the hardware fallback of
    :func:`resolve_precision`); :attr:`precision` is what runs.

    ``memory_format="channels_last_3d"`` stores the network's convolution weights channels-last (NDHWC), so
    every activation after the first convolution is channels-last too: oneDNN's fast layout for 3D
    convolutions on the CPU, with no layout conversion around each convolution. The values are those of the
    default layout up to float rounding (the same products, summed in another order); measured on this
    2-core CPU (model card, issue 14): the fp32 network stage 1.18x faster, bf16 unchanged within noise.
    The conversion changes ``network``'s parameters in place (a frozen inference network; keep the default
    ``"contiguous"`` for a network being trained).

    Args:
        network: the wrapped module (its weights stay float32; load them into it, not into the wrapper).
        precision: ``"fp32"`` or ``"bf16"``.
        device: where ``network`` runs (for the autocast device type and the bf16 check).
        memory_format: ``"contiguous"`` (default) or ``"channels_last_3d"`` (see above).

    Shapes: as ``network``: ``(B, 1, D, H, W)`` normalised SUV in, ``(B, 1, D, H, W)`` float32 out.
    """

    def __init__(
        self,
        network: nn.Module,
        precision: str = "fp32",
        device: torch.device | str = "cpu",
        memory_format: str = "contiguous",
    ) -> None:
        super().__init__()
        self.network = network
        self.device_type = torch.device(device).type
        self.requested_precision = check_precision(precision)
        self.precision = resolve_precision(precision, device)
        self.memory_format = check_memory_format(memory_format)
        if self.memory_format != "contiguous":
            network.to(memory_format=_MEMORY_FORMATS[self.memory_format])  # 4D/5D parameters only: the conv weights

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with autocast(self.precision, self.device_type):
            out = self.network(x, **kwargs)  # kwargs: e.g. the DRF of a DRF-conditioned network
        return out.float()

    def extra_repr(self) -> str:
        return (
            f"precision={self.precision!r} (requested {self.requested_precision!r}), device_type={self.device_type!r}, "
            f"memory_format={self.memory_format!r}"
        )


def config_precision(precision: str, mixed_precision: bool | None, device: torch.device | str) -> str:
    """The requested precision from a training config's ``precision`` and its deprecated ``mixed_precision``.

    ``mixed_precision`` None (the default) defers to ``precision``. True/False (an old config or override
    file) keeps its old meaning and wins: bf16 on CUDA, fp32 on the CPU. Not yet resolved against the
    hardware (see :func:`resolve_precision`).
    """
    if mixed_precision is None:
        return check_precision(precision)
    logger.warning("'mixed_precision' is deprecated and overrides 'precision': use precision 'bf16' or 'fp32'")
    return "bf16" if as_bool(mixed_precision, "mixed_precision") and torch.device(device).type == "cuda" else "fp32"
