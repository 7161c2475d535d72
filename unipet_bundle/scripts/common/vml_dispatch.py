"""Resolve oneMKL's VML kernel dispatch before any multi-threaded use, so float unary ops are reproducible.

Why: PyTorch's CPU builds route contiguous float unary ops (``exp``, ``log``, ``sqrt``, ``sin``, ...) to oneMKL's
vector math library, each intra-op thread on its own chunk. oneMKL picks each function's kernel lazily, on its first
call; when that first call runs on several threads at once, one thread may run a low-accuracy kernel for its whole
chunk of that one call (PyTorch issue 188792; errors up to thousands of ulp). Measured on this bundle's CPU machine
(torch 2.13.0): the first ``torch.exp`` of a 1024x12 float32 tensor in a fresh process gave another result in 8 of
60 processes, later calls never. The simulator's attenuation factors are such a first call: 3 of 40 runs of the
same seed drew other Poisson counts (every voxel of every dose differed), which broke "the same seed gives
bit-identical images". One call of each function on a single element, on one thread, resolves the dispatch first.

:func:`resolve_vml_dispatch` runs as the third ``initialize`` step of every run config (inference, training,
evaluation, multi-GPU training), in :class:`scripts.inference.denoise.BundleDenoiser` (MONAI Deploy, MONAI Label, the
demo) and when :mod:`scripts.data.simulate` or :mod:`scripts.metrics.image_quality` is imported: the code that runs
large unary ops. DataLoader workers forked after ``initialize`` inherit the resolved state.
"""

from __future__ import annotations

import torch

__all__ = ["VML_OPS", "resolve_vml_dispatch"]

VML_OPS = (
    "abs",
    "acos",
    "asin",
    "atan",
    "cos",
    "cosh",
    "erf",
    "erfc",
    "erfinv",
    "exp",
    "expm1",
    "lgamma",
    "log",
    "log10",
    "log1p",
    "log2",
    "rsqrt",
    "sin",
    "sinh",
    "sqrt",
    "tan",
    "tanh",
    "trunc",
)
"""Unary ops that PyTorch CPU builds route (or have routed) to oneMKL VML (``aten/src/ATen/cpu/vml.h``); calling one
that a build computes itself costs nothing but a microsecond."""

_resolved = False


def resolve_vml_dispatch() -> bool:
    """Call every op of :data:`VML_OPS` once on a one-element float32 and float64 tensor (a single-threaded call),
    so oneMKL resolves each kernel before a multi-threaded first call can race. Idempotent; returns True when this
    call did the work (False: already done in this process)."""
    global _resolved
    if _resolved:
        return False
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            x = torch.full((1,), 0.5, dtype=dtype)
            for name in VML_OPS:
                getattr(torch, name)(x)
    _resolved = True
    return True
