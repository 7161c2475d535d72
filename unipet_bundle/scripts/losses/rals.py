"""Region-aware learning strategy (RALS): a WGAN-GP critic that only sees the textured ("stylized") regions.

Method: Yang et al., UniPET, Medical Image Analysis 2026 (arXiv 2606.11131); WGAN-GP from Gulrajani et
al., "Improved Training of Wasserstein GANs" (NeurIPS 2017). Flat regions are masked out of both the
real and the fake input, so the adversarial term never pushes texture into them. Device-agnostic (the
reference code's loss was GPU-only).

Mask threshold units: the reference threshold is ``0.001`` on data in SUV, i.e. ``0.001 SUV^2`` of
local variance. Our network works on ``SUV / 20`` (SUV clipped to [0, 20]); variance scales with the
square of the intensity scale, so the same regions are selected by ``0.001 / 20**2 = 2.5e-6`` in
``(SUV/20)^2`` (:data:`DEFAULT_MASK_THRESHOLD`, see :func:`normalised_threshold`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "REFERENCE_THRESHOLD_SUV2",
    "DEFAULT_SUV_SCALE",
    "DEFAULT_MASK_THRESHOLD",
    "normalised_threshold",
    "stylized_mask",
    "RALSCriticLoss",
    "RALSGeneratorLoss",
]

REFERENCE_THRESHOLD_SUV2 = 1e-3
"""Local-variance threshold of the reference code, in SUV^2."""

DEFAULT_SUV_SCALE = 20.0
"""Intensity normalisation: network units = SUV / DEFAULT_SUV_SCALE."""


def normalised_threshold(
    threshold_suv2: float = REFERENCE_THRESHOLD_SUV2, suv_scale: float = DEFAULT_SUV_SCALE
) -> float:
    """Convert a local-variance threshold from SUV^2 to network units ``(SUV / suv_scale)^2``.

    ``normalised_threshold(0.001, 20.0) == 2.5e-6``. Use ``suv_scale=1`` for data kept in SUV.
    """
    if suv_scale <= 0:
        raise ValueError(f"suv_scale must be > 0, got {suv_scale}")
    return float(threshold_suv2) / float(suv_scale) ** 2


DEFAULT_MASK_THRESHOLD = normalised_threshold()
"""2.5e-6 (SUV/20)^2: the reference 0.001 SUV^2 in our normalised units."""


def _widen(scores: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 critic scores (autocast) to float32 before a reduction; float32/float64 unchanged."""
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


def stylized_mask(
    target: torch.Tensor,
    window: int = 3,
    threshold: float = DEFAULT_MASK_THRESHOLD,
    suv_scale: float | None = None,
) -> torch.Tensor:
    """Mask of textured voxels: local variance over a ``window^3`` box ``>= threshold``.

    ``var = avgpool(x^2) - avgpool(x)^2`` with stride 1 and "same" size; at the volume border the box is
    cut to the voxels inside (no zero padding, which would invent variance along the edges). Computed
    in float32 or wider and without gradient.

    Args:
        target: full-dose image ``(B, C, D, H, W)`` (or unbatched ``(C, D, H, W)``) in network units.
        window: odd box size.
        threshold: variance threshold in the target's squared units (default: 2.5e-6 (SUV/20)^2, the
            reference's 0.001 SUV^2); read as SUV^2 and converted when ``suv_scale`` is given.
        suv_scale: when set, ``threshold`` is in SUV^2 and the target is ``SUV / suv_scale``, e.g.
            ``stylized_mask(x, threshold=0.001, suv_scale=20.0)``.

    Returns:
        float tensor of 0/1, same shape, dtype and device as ``target``.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window}")
    if target.dim() not in (4, 5):
        raise ValueError(f"stylized_mask expects (B, C, D, H, W) or (C, D, H, W), got {list(target.shape)}")
    if suv_scale is not None:
        threshold = normalised_threshold(threshold, suv_scale)
    with torch.no_grad():
        x = target.detach()
        if x.dtype != torch.float64:
            x = x.float()
        pad = window // 2
        mean = F.avg_pool3d(x, window, stride=1, padding=pad, count_include_pad=False)
        mean_sq = F.avg_pool3d(x * x, window, stride=1, padding=pad, count_include_pad=False)
        var = mean_sq - mean * mean
        return (var >= threshold).to(target.dtype)


Critic = Callable[[torch.Tensor], torch.Tensor]


class RALSCriticLoss(nn.Module):
    """WGAN-GP critic loss on masked inputs.

    ``loss = mean(critic(fake * M)) - mean(critic(real * M)) + gp_weight * GP`` where ``GP =
    mean_b (||grad_x critic(x_b)||_2 - 1)^2`` at ``x = a * real * M + (1 - a) * fake * M``,
    ``a ~ U(0, 1)`` per sample. ``fake`` is detached (this step trains the critic only).

    ``forward(critic, real, fake, mask)`` with ``real``, ``fake``, ``mask`` of shape ``(B, C, D, H, W)``
    (``mask`` from :func:`stylized_mask` on ``real``) returns ``(loss, terms)``; ``terms`` holds detached
    scalars ``d_real``, ``d_fake``, ``gradient_penalty`` and ``wasserstein`` (``d_real - d_fake``).
    """

    def __init__(self, gp_weight: float = 10.0) -> None:
        super().__init__()
        self.gp_weight = gp_weight

    def forward(
        self, critic: Critic, real: torch.Tensor, fake: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if real.shape != fake.shape or real.shape != mask.shape:
            raise ValueError(
                f"real, fake and mask must have one shape, got {list(real.shape)}, {list(fake.shape)}, "
                f"{list(mask.shape)}"
            )
        mask = mask.detach()
        real_m = real.detach() * mask
        fake_m = fake.detach() * mask
        # scores at least float32 before any reduction: under bf16 autocast the critic's output is bf16
        d_real = _widen(critic(real_m)).mean()
        d_fake = _widen(critic(fake_m)).mean()

        alpha_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
        alpha = torch.rand(alpha_shape, device=real.device, dtype=real_m.dtype)
        interp = (alpha * real_m + (1.0 - alpha) * fake_m).requires_grad_(True)
        scores = _widen(critic(interp))
        (grad,) = torch.autograd.grad(scores.sum(), interp, create_graph=True)
        gp = (grad.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()

        loss = d_fake - d_real + self.gp_weight * gp
        terms = {
            "d_real": d_real.detach(),
            "d_fake": d_fake.detach(),
            "gradient_penalty": gp.detach(),
            "wasserstein": (d_real - d_fake).detach(),
        }
        return loss, terms


class RALSGeneratorLoss(nn.Module):
    """Generator adversarial loss ``-mean(critic(fake * M))``: gradients reach ``fake`` only where ``M = 1``.

    ``forward(critic, fake, mask)``, ``fake`` and ``mask`` ``(B, C, D, H, W)``; returns a scalar.
    """

    def forward(self, critic: Critic, fake: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if fake.shape != mask.shape:
            raise ValueError(f"fake and mask must have one shape, got {list(fake.shape)} and {list(mask.shape)}")
        return -_widen(critic(fake * mask.detach())).mean()  # float32 reduction under bf16 autocast
