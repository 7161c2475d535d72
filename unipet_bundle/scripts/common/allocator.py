"""Host memory reuse for the network's tensors: glibc ``malloc`` settings for a CPU run (issue 14).

Why: a sliding window allocates the same dozen feature maps (tens of MB each) for every batch of windows.
With glibc's defaults a freed block of that size goes back to the kernel (it was ``mmap``-ed, or it sat at
the top of the heap above the trim threshold), so the next batch faults every page in again and the kernel
zeroes it: on the 2-core CPU that was ~20 % of the inference network's time (measured: the 16-channel
UniPET on batches of eight 32^3 windows, fp32, 125 ms -> 95 ms per batch with the settings below, the
same numbers bit for bit; model card, "Network GFLOP/s next to the machine's conv3d peak").

:func:`keep_freed_memory` asks glibc to serve blocks of up to 32 MiB (the largest ``M_MMAP_THRESHOLD``
glibc accepts on 64-bit) from the heap and to keep up to ``cache_mb`` MiB of freed memory at the heap's
top instead of returning it. Blocks above 32 MiB (a whole volume) are still ``mmap``-ed and go back to
the kernel when freed. Memory a process holds may grow by up to ``cache_mb`` at each heap's top, plus what
fragmentation keeps between live blocks (measured: +0.04 GB peak RSS on a Quadra-size study; each DataLoader
worker process has its own). The setting is process-wide and lasts until the process ends; it turns glibc's
dynamic threshold off. Other C libraries (musl, macOS, Windows) are left alone, with one log line. CUDA memory
is not concerned (PyTorch caches it itself).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
from typing import Any

from scripts.common.errors import UniPETInputError

__all__ = ["CACHE_MB_MAX", "HEAP_BLOCK_MAX_MB", "CONFIG_KEY", "keep_freed_memory", "keep_freed_memory_as_configured"]

logger = logging.getLogger("unipet.allocator")

HEAP_BLOCK_MAX_MB = 32
"""Blocks up to this size (MiB) come from the heap: glibc's largest ``M_MMAP_THRESHOLD`` on 64-bit."""
CACHE_MB_MAX = 2047
"""The largest ``cache_mb``: ``mallopt`` takes the trim threshold in bytes as a C ``int``."""

CONFIG_KEY = "host_memory_cache_mb"
"""The configs' key for :func:`keep_freed_memory`'s ``cache_mb``."""

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_applied: dict[str, Any] = {}


def _glibc() -> Any:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def keep_freed_memory(cache_mb: Any) -> dict[str, Any]:
    """Keep up to ``cache_mb`` MiB of freed host memory for reuse (see the module docstring); 0 = glibc's defaults.

    Called by the configs' ``initialize`` with their ``host_memory_cache_mb``. Returns what holds afterwards:
    ``{"applied": bool, "cache_mb": int, "reason": str}``. A later call with another size changes it; 0 after a
    size was set cannot restore glibc's dynamic defaults and says so (``applied`` stays True).

    Raises:
        UniPETInputError: ``cache_mb`` is not a whole number of MiB >= 0.
    """
    whole = isinstance(cache_mb, int) or (isinstance(cache_mb, float) and cache_mb.is_integer())
    if isinstance(cache_mb, bool) or not whole or not 0 <= cache_mb <= CACHE_MB_MAX:
        raise UniPETInputError(
            f"host_memory_cache_mb must be a whole number of MiB from 0 to {CACHE_MB_MAX} (0 keeps the C library's "
            f"defaults; mallopt takes a C int of bytes), got {cache_mb!r}"
        )
    mb = int(cache_mb)
    if mb == 0:
        if _applied.get("applied"):  # glibc cannot be put back to its dynamic defaults: say what still holds
            reason = (
                f"host_memory_cache_mb 0 asked, but this process already keeps up to {_applied['cache_mb']} MiB "
                "(set earlier; glibc's settings last until the process ends): start a new process for the defaults"
            )
            logger.warning("host memory: %s", reason)
            return {"applied": True, "cache_mb": int(_applied["cache_mb"]), "reason": reason}
        return {"applied": False, "cache_mb": 0, "reason": "host_memory_cache_mb is 0: the C library's defaults"}
    libc = _glibc()
    if libc is None:
        reason = f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown C library'}): defaults kept"
        if _applied.get("reason") != reason:
            logger.info("host memory: %s", reason)
        _applied.update(applied=False, cache_mb=mb, reason=reason)
        return dict(_applied)
    ok = (
        libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_MAX_MB << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, mb << 20) == 1
    )
    if not ok:
        reason = "glibc refused mallopt: defaults kept"
        logger.warning("host memory: %s", reason)
        return {"applied": False, "cache_mb": mb, "reason": reason}
    reason = f"glibc keeps up to {mb} MiB of freed memory; blocks up to {HEAP_BLOCK_MAX_MB} MiB from the heap"
    if _applied.get("cache_mb") != mb or not _applied.get("applied"):
        logger.info("host memory: %s (host_memory_cache_mb; 0 = the C library's defaults)", reason)
    _applied.update(applied=True, cache_mb=mb, reason=reason)
    return dict(_applied)


def keep_freed_memory_as_configured(parser: Any) -> dict[str, Any]:
    """:func:`keep_freed_memory` with a parsed bundle config's ``host_memory_cache_mb`` (0 where the config has no
    such key): for the benchmarks, which build a config's network without running its ``initialize``."""
    return keep_freed_memory(parser.get_parsed_content(CONFIG_KEY) if CONFIG_KEY in parser else 0)
