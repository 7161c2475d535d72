"""OSEM reconstruction with an additive background term, and Gaussian filters (PSF, post-filter).

Data model, for every sinogram bin ``i`` of every slice (column) ``k``::

    E[y_ik] = A_ik * (P x_k)_i + b_ik

``P`` is the line-integral projector, ``A`` the "efficiency sinogram" (counts per SUV-mm of line integral:
scanner sensitivity x scan time x attenuation factor ``exp(-P mu)``), ``b`` the expected scatter + randoms.
With attenuation in ``A`` and the background added to the forward model (not subtracted from the data),
the update keeps the data Poisson and the image non-negative::

    x <- x / (P_s^T A_s) * P_s^T (A_s * y_s / (A_s * P_s x + b_s))      for each subset s

All slices are columns of one dense matrix, so each sub-iteration is two sparse x dense products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from .projector import ParallelBeamProjector

__all__ = ["FWHM_TO_SIGMA", "OSEMReconstructor", "gaussian_filter_mm", "osem"]

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


class OSEMReconstructor:
    """OSEM for one set of slices: the system model is prepared once and reused for every dose level.

    Args:
        projector: the slice geometry.
        efficiency: ``A`` above, ``(n_rows, K)`` float32, counts per unit of image x mm of path,
            attenuation included (``K`` slices as columns).
        background: expected scatter + randoms counts, ``(n_rows, K)`` float32.
        n_subsets: interleaved angle subsets (at most the number of angles).
        psf_fwhm_mm: resolution modelling ("PSF reconstruction"): FWHM (mm) of an isotropic 3D Gaussian
            detector blur ``G`` in the system model ``A P G``. For parallel beams the projection of an
            in-plane Gaussian blur is the same Gaussian along the detector (``P G_xy = G_s P``) and the
            axial blur commutes with the slice-wise projection, so ``G`` is applied to the subset sinograms
            (cheap) and its exact transpose before back projection. 0: no resolution modelling (the
            default). The K columns must then be K consecutive slices of one volume (z neighbours).
        slice_mm: slice thickness (mm), for the axial part of ``psf_fwhm_mm``.

    Memory: about ``n_subsets + 2`` images of ``(n_pixels, K)`` float32 plus two sinograms.
    """

    def __init__(
        self,
        projector: ParallelBeamProjector,
        efficiency: torch.Tensor,
        background: torch.Tensor,
        n_subsets: int = 16,
        psf_fwhm_mm: float = 0.0,
        slice_mm: float = 1.0,
    ) -> None:
        if efficiency.shape != background.shape or efficiency.dim() != 2:
            raise ValueError(
                f"efficiency {tuple(efficiency.shape)} and background {tuple(background.shape)} "
                "must both be (n_rows, K)"
            )
        if efficiency.shape[0] != projector.n_rows:
            raise ValueError(f"sinograms have {efficiency.shape[0]} rows, the projector {projector.n_rows}")
        self.projector = projector
        self.shape = tuple(efficiency.shape)
        self.background = background.float().contiguous()
        k = efficiency.shape[1]
        if psf_fwhm_mm > 0:
            # G_s along detector bins (zero outside the detector), G_z along slices (end slices replicated)
            self._g_bins = _gauss_matrix(projector.n_bins, psf_fwhm_mm * FWHM_TO_SIGMA / projector.bin_mm, False)
            self._g_z = _gauss_matrix(k, psf_fwhm_mm * FWHM_TO_SIGMA / slice_mm, True)
        else:
            self._g_bins = self._g_z = None
        self.sens_total = projector.back(self._blur(efficiency.float(), transpose=True))  # (n_pixels, K)
        self._subsets = []
        for p_s, p_s_t, rows in projector.subsets(n_subsets):
            idx = torch.from_numpy(rows)
            a_s = efficiency.index_select(0, idx).float().contiguous()
            sens = torch.sparse.mm(p_s_t, self._blur(a_s, transpose=True))
            # pixels no ray of this subset sees keep their value: 1/sens would be inf, the update is 0/0
            inv_sens = torch.where(sens > 0, 1.0 / sens.clamp_min(1e-30), torch.zeros_like(sens))
            self._subsets.append((p_s, p_s_t, idx, a_s, background.index_select(0, idx).float().contiguous(), inv_sens))

    def _blur(self, sino: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """The modelled PSF on ``(n_angles_s * n_bins, K)`` sinogram rows (identity without it)."""
        if self._g_bins is None:
            return sino
        gb, gz = (self._g_bins.T, self._g_z.T) if transpose else (self._g_bins, self._g_z)
        nb, k = self.projector.n_bins, sino.shape[1]
        out = torch.matmul(gb, sino.reshape(-1, nb, k))  # along bins, every angle at once
        return (out.reshape(-1, k) @ gz.T).contiguous()

    @property
    def n_subsets(self) -> int:
        return len(self._subsets)

    def __call__(
        self, prompts: torch.Tensor, n_iterations: int = 3, callback: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Reconstruct ``prompts`` (``(n_rows, K)`` counts, non-negative) into ``(n_pixels, K)`` images.

        The images are in the units that ``efficiency`` refers to (SUV here); slices without counts
        come back as zeros. ``callback(step)`` is called after every sub-iteration.
        """
        if tuple(prompts.shape) != self.shape:
            raise ValueError(f"prompts {tuple(prompts.shape)} must have the model's shape {self.shape}")
        prompts = prompts.float()
        # uniform start whose projection holds the measured true counts, so early-stopped OSEM is on scale
        excess = (prompts.double() - self.background.double()).sum(0).clamp_min(0.0)
        excess = torch.where(excess > 0, excess, 1e-3 * prompts.double().sum(0))
        level = (excess / self.sens_total.double().sum(0).clamp_min(1e-30)).float()
        x = (self.sens_total > 0).float() * level[None, :]
        y_sub = [prompts.index_select(0, idx) for _, _, idx, _, _, _ in self._subsets]
        step = 0
        for _ in range(int(n_iterations)):
            for (p_s, p_s_t, _idx, a_s, b_s, inv_sens), y_s in zip(self._subsets, y_sub):
                ybar = self._blur(torch.sparse.mm(p_s, x)).mul_(a_s).add_(b_s).clamp_min_(1e-12)
                ratio = torch.div(y_s, ybar).mul_(a_s)
                # pixels outside this subset's view (inv_sens 0) must keep x: blend instead of zeroing
                update = torch.sparse.mm(p_s_t, self._blur(ratio, transpose=True)).mul_(inv_sens)
                x = torch.where(inv_sens > 0, x * update, x)
                step += 1
                if callback is not None:
                    callback(step)
        return x


def _gauss_matrix(n: int, sigma: float, replicate: bool) -> torch.Tensor:
    """``(n, n)`` matrix of a 1D Gaussian blur (sigma in samples, truncated at 3.5 sigma).

    ``replicate``: samples beyond the ends are copies of the end samples (rows sum to 1); otherwise zero."""
    if sigma <= 0:
        return torch.eye(n)
    r = max(1, int(math.ceil(3.5 * sigma)))
    t = np.arange(-r, r + 1)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    m = np.zeros((n, n))
    for i in range(n):
        j = i + t
        if replicate:
            np.add.at(m[i], np.clip(j, 0, n - 1), g)
        else:
            ok = (j >= 0) & (j < n)
            m[i, j[ok]] = g[ok]
    return torch.from_numpy(m.astype(np.float32))


def osem(
    projector: ParallelBeamProjector,
    prompts: torch.Tensor,
    efficiency: torch.Tensor,
    background: torch.Tensor,
    n_iterations: int = 3,
    n_subsets: int = 16,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Reconstruct every column (slice) of ``prompts`` with OSEM (one-shot :class:`OSEMReconstructor`).

    Args:
        projector: the slice geometry.
        prompts: measured counts, ``(n_rows, K)`` float32.
        efficiency: ``A`` (see the module docstring), ``(n_rows, K)``.
        background: expected scatter + randoms, ``(n_rows, K)``.
        n_iterations: full passes over the data.
        n_subsets: interleaved angle subsets per pass.
        callback: called with the sub-iteration index after each update.

    Returns:
        ``(n_pixels, K)`` float32 images.
    """
    return OSEMReconstructor(projector, efficiency, background, n_subsets)(prompts, n_iterations, callback)


def gaussian_filter_mm(volume: np.ndarray, spacing: Sequence[float], fwhm_mm: float | Sequence[float]) -> np.ndarray:
    """3D Gaussian filter of an (x, y, z) volume with FWHM given in mm (one value or one per axis).

    Outside the volume is air in-plane (zero) and a copy of the end slice axially, so the first and
    last slices keep their level. A FWHM of 0 leaves that axis untouched.
    """
    fwhm = np.broadcast_to(np.asarray(fwhm_mm, dtype=np.float64), (3,))
    sigma = [float(f) * FWHM_TO_SIGMA / float(s) for f, s in zip(fwhm, spacing)]
    if not any(sigma):
        return np.asarray(volume, dtype=np.float32)
    return ndimage.gaussian_filter(
        np.asarray(volume, dtype=np.float32), sigma, mode=("constant", "constant", "nearest"), truncate=3.5
    )
