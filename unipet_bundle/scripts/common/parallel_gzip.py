"""A gzip writer that compresses on every core: one ordinary gzip member, built pigz's way (issue 14).

Why: compressing the denoised ``.nii.gz`` was the largest single cost of a whole-body study once the network
got faster (measured on a Quadra-size study, 0.5 GB of float32 SUV: 9.1 s of a 30.8 s run, in one thread of
zlib at level 1, nibabel's default). :class:`ParallelGzipWriter` cuts the byte stream into blocks, deflates
them in a thread pool (zlib releases the GIL) and writes them in order as *one* gzip member: each block is
raw deflate primed with the previous block's last 32 KiB (so it compresses like one stream) and ended by a
sync flush (byte-aligned, not final); :meth:`close` appends an empty final block, the CRC-32 of all the
data and its length. Any gzip reader (zlib's ``gzread`` in ITK and FSL, Python's ``gzip``, nibabel) reads
it as a plain gzip file. Same level, same size within ~0.1 %, the same bytes whatever the number of threads.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

__all__ = ["BLOCK_BYTES", "ParallelGzipWriter"]

BLOCK_BYTES = 8 << 20
"""Uncompressed bytes per block (each a job for one thread)."""
_WINDOW = 32 << 10  # deflate's history window: a block may refer back this far into the previous one


def _deflate_block(data: bytes, dictionary: bytes, level: int) -> bytes:
    """Raw deflate of one block, primed with ``dictionary`` (the previous block's tail), ended by a sync flush."""
    if dictionary:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15, zdict=dictionary)
    else:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


class ParallelGzipWriter(io.RawIOBase):
    """Write-only file object: what is written to it lands in ``fileobj`` as one gzip member.

    Args:
        fileobj: a binary file open for writing (not closed by this writer).
        level: zlib compression level, 1 (fastest; nibabel's default for ``.nii.gz``) to 9.
        threads: compression threads (default: the CPUs this process may use).
        block_bytes: uncompressed bytes per block.

    ``tell()`` counts uncompressed bytes; ``seek`` may only move forward (the gap is written as zeros, as
    nibabel asks for a header's padding). Memory: at most ``2 * threads`` blocks in flight.
    """

    def __init__(self, fileobj: BinaryIO, level: int = 1, threads: int | None = None, block_bytes: int = BLOCK_BYTES):
        super().__init__()
        if not 1 <= int(level) <= 9:
            raise ValueError(f"gzip level must be 1 to 9, got {level!r}")
        if block_bytes < _WINDOW:
            raise ValueError(f"block_bytes must be at least {_WINDOW}, got {block_bytes}")
        self._out = fileobj
        self._level = int(level)
        self._block = int(block_bytes)
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self._threads = max(1, int(threads or 1))
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="gzip")
        self._pending: deque[Future] = deque()
        self._buffer = bytearray()
        self._previous_tail = b""
        self._crc = 0
        self._size = 0
        # RFC 1952 header: no name, mtime 0 (reproducible bytes), XFL 4 = fastest / 2 = best, OS unknown
        xfl = 4 if self._level == 1 else 2 if self._level == 9 else 0
        self._out.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + bytes([xfl, 255]))

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self._size + offset}.get(whence)
        if target is None or target < self._size:
            raise io.UnsupportedOperation("a gzip stream being written can only move forward")
        if target > self._size:
            self.write(bytes(target - self._size))
        return self._size

    def write(self, data) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("write to a closed ParallelGzipWriter")
        view = memoryview(data).cast("B")
        n = len(view)
        self._crc = zlib.crc32(view, self._crc)
        self._size += n
        pos = 0
        if self._buffer:  # top up the partial block first
            pos = min(self._block - len(self._buffer), n)
            self._buffer += view[:pos]
            if len(self._buffer) == self._block:
                self._submit(bytes(self._buffer))
                self._buffer.clear()
        while n - pos >= self._block:  # whole blocks straight from the caller's data (one copy each)
            self._submit(bytes(view[pos : pos + self._block]))
            pos += self._block
        self._buffer += view[pos:]
        return n

    def _submit(self, block: bytes) -> None:
        self._pending.append(self._pool.submit(_deflate_block, block, self._previous_tail, self._level))
        self._previous_tail = block[-_WINDOW:]
        while len(self._pending) > 2 * self._threads:
            self._out.write(self._pending.popleft().result())

    def _abandon(self) -> None:
        """Close without the final block and trailer: an unfinished stream must not look complete to a reader."""
        if not self.closed:
            pool = getattr(self, "_pool", None)  # None: __init__ refused its arguments
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                self._pending.clear()
                self._buffer.clear()
            super().close()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abandon()
            return
        self.close()

    def __del__(self) -> None:  # garbage-collected without close(): abandoned, not finished (IOBase would close)
        self._abandon()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._buffer:
                self._submit(bytes(self._buffer))
                self._buffer.clear()
            while self._pending:
                self._out.write(self._pending.popleft().result())
            self._out.write(zlib.compressobj(self._level, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))  # final block
            self._out.write(struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            super().close()
