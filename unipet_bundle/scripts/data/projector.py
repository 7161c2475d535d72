"""Sparse 2D parallel-beam PET system matrix (line integrals), applied to many slices at once.

The matrix ``P`` has one row per sinogram bin (angle-major: ``row = angle * n_bins + bin``) and one column
per pixel of an ``(nx, ny)`` slice in C order (``col = ix * ny + iy``, matching ``vol[:, :, k].ravel()``).
Entries are exact strip integrals of the square pixel: the footprint of a ``dx x dy`` pixel on the detector
at angle ``theta`` is the trapezoid given by the convolution of two boxes of widths ``|dx cos theta|`` and
``|dy sin theta|``; each entry is the part of that footprint that falls in a bin, divided by the bin
width. ``P @ image`` is therefore a line integral in mm (``P @ mu`` with ``mu`` in 1/mm is the attenuation
exponent) and a uniform image of value 1 projects to the chord length.

Slices go in as the columns of a dense ``(n_pixels, n_columns)`` matrix, so one sparse x dense product
projects a whole volume (and several dose levels) at once. Matrices are built once per geometry and cached.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["ParallelBeamProjector", "get_projector"]


def _trapezoid_cdf(t: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """CDF at offset ``t`` (mm, from the pixel centre) of the unit-area trapezoid box(w1) * box(w2)."""
    p = 0.5 * (w1 + w2)
    q = 0.5 * (w1 - w2)

    def r2(v: np.ndarray) -> np.ndarray:
        return np.square(np.maximum(v, 0.0))

    return (r2(t + p) - r2(t + q) - r2(t - q) + r2(t - p)) / (2.0 * w1 * w2)


class ParallelBeamProjector:
    """Exact-footprint parallel-beam projector for one slice geometry.

    Args:
        nx, ny: slice size in pixels (array axes 0 and 1).
        dx, dy: pixel size in mm.
        n_angles: number of projection angles, equally spaced over [0, 180) degrees.
        bin_mm: detector bin width in mm (default: ``min(dx, dy)``).

    Attributes:
        n_bins: detector bins per angle (they cover the slice diagonal, so every pixel is seen at every angle).
        matrix: ``torch`` sparse CSR, ``(n_angles * n_bins, nx * ny)``, float32.
    """

    def __init__(self, nx: int, ny: int, dx: float, dy: float, n_angles: int, bin_mm: float | None = None) -> None:
        if min(nx, ny, n_angles) < 1 or min(dx, dy) <= 0:
            raise ValueError(f"bad projector geometry: nx={nx} ny={ny} dx={dx} dy={dy} n_angles={n_angles}")
        self.nx, self.ny, self.dx, self.dy = int(nx), int(ny), float(dx), float(dy)
        self.n_angles = int(n_angles)
        self.bin_mm = float(bin_mm) if bin_mm else min(self.dx, self.dy)
        diag = math.hypot(self.nx * self.dx, self.ny * self.dy)
        self.n_bins = int(math.ceil(diag / self.bin_mm)) + 2
        self.angles = np.pi * np.arange(self.n_angles) / self.n_angles
        self._scipy = self._build()
        self.matrix = _to_torch_csr(self._scipy)
        self._matrix_t = _to_torch_csr(self._scipy.T.tocsr())
        self._subsets: dict[int, list[tuple[torch.Tensor, torch.Tensor, np.ndarray]]] = {}

    @property
    def n_pixels(self) -> int:
        return self.nx * self.ny

    @property
    def n_rows(self) -> int:
        return self.n_angles * self.n_bins

    def _build(self) -> sp.csr_matrix:
        xc = (np.arange(self.nx) - (self.nx - 1) / 2.0) * self.dx
        yc = (np.arange(self.ny) - (self.ny - 1) / 2.0) * self.dy
        px, py = (a.ravel() for a in np.meshgrid(xc, yc, indexing="ij"))  # C order: col = ix * ny + iy
        cols = np.arange(self.n_pixels)
        s0 = -(self.n_bins - 1) / 2.0 * self.bin_mm  # centre of bin 0
        area = self.dx * self.dy
        rows_all, cols_all, vals_all = [], [], []
        for a, theta in enumerate(self.angles):
            c, s = math.cos(theta), math.sin(theta)
            # a zero-width box is a limit of the formula; a tiny width keeps it finite and exact to ~1e-9
            w1 = max(abs(self.dx * c), 1e-4 * self.dx)
            w2 = max(abs(self.dy * s), 1e-4 * self.dy)
            half = 0.5 * (w1 + w2)
            centre = px * c + py * s
            reach = int(math.ceil(half / self.bin_mm)) + 1
            b_centre = np.rint((centre - s0) / self.bin_mm).astype(np.int64)
            for k in range(-reach, reach + 1):
                b = b_centre + k
                lo = s0 + (b - 0.5) * self.bin_mm - centre
                hi = lo + self.bin_mm
                w = (_trapezoid_cdf(hi, w1, w2) - _trapezoid_cdf(lo, w1, w2)) * (area / self.bin_mm)
                keep = (w > 1e-7 * area / self.bin_mm) & (b >= 0) & (b < self.n_bins)
                rows_all.append(a * self.n_bins + b[keep])
                cols_all.append(cols[keep])
                vals_all.append(w[keep])
        rows = np.concatenate(rows_all)
        m = sp.coo_matrix(
            (np.concatenate(vals_all), (rows, np.concatenate(cols_all))), shape=(self.n_rows, self.n_pixels)
        )
        return m.tocsr().astype(np.float32)

    def subset_angles(self, n_subsets: int) -> list[np.ndarray]:
        """Interleaved angle subsets (subset ``i`` holds angles ``i, i + n, i + 2n, ...``), as OSEM uses."""
        if n_subsets < 1 or n_subsets > self.n_angles:
            raise ValueError(f"n_subsets={n_subsets} must be in [1, n_angles={self.n_angles}]")
        return [np.arange(i, self.n_angles, n_subsets) for i in range(n_subsets)]

    def subset_rows(self, angles: np.ndarray) -> np.ndarray:
        """Sinogram row indices (angle-major) of the given angles."""
        return (angles[:, None] * self.n_bins + np.arange(self.n_bins)[None, :]).ravel()

    def subsets(self, n_subsets: int) -> list[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """Per subset: (P_s, P_s transposed, row indices), both matrices torch sparse CSR; cached."""
        if n_subsets not in self._subsets:
            out = []
            for angles in self.subset_angles(n_subsets):
                rows = self.subset_rows(angles)
                sub = self._scipy[rows]
                out.append((_to_torch_csr(sub), _to_torch_csr(sub.T.tocsr()), rows))
            self._subsets[n_subsets] = out
        return self._subsets[n_subsets]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Project ``(n_pixels, C)`` float32 columns (slices) to ``(n_rows, C)`` sinograms (line integrals, mm)."""
        return _spmm(self.matrix, images)

    def back(self, sinograms: torch.Tensor) -> torch.Tensor:
        """Back-project ``(n_rows, C)`` sinograms to ``(n_pixels, C)``: the exact transpose of :meth:`forward`."""
        return _spmm(self._matrix_t, sinograms)


def _to_torch_csr(m: sp.csr_matrix) -> torch.Tensor:
    m = m.tocsr()
    m.sort_indices()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the CPU spmm used here is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data.astype(np.float32)),
            size=m.shape,
            check_invariants=False,
        )


def _spmm(matrix: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    if dense.dim() != 2 or dense.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a ({matrix.shape[1]}, C) matrix, got {tuple(dense.shape)}")
    return torch.sparse.mm(matrix, dense.contiguous())


@functools.lru_cache(maxsize=4)
def get_projector(
    nx: int, ny: int, dx: float, dy: float, n_angles: int, bin_mm: float | None = None
) -> ParallelBeamProjector:
    """The (cached) projector for one slice geometry: built once per (shape, spacing, n_angles)."""
    return ParallelBeamProjector(nx, ny, dx, dy, n_angles, bin_mm)
