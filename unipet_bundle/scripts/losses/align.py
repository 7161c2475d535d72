"""Style alignment loss (L_align) of UniPET: match per-channel feature statistics to the full-dose ones.

Method: Yang et al., UniPET, Medical Image Analysis 2026 (arXiv 2606.11131); instance statistics as in
AdaIN (Huang & Belongie, ICCV 2017). The public reference code computed the "full-dose" statistics
from the low-dose input, so its L_align was always zero; here the caller passes the features of the
full-dose image through the same network, and the loss detaches them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scripts.networks.unipet import spatial_mean_var

__all__ = ["instance_stats", "StyleAlignmentLoss"]


def instance_stats(feat: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and standard deviation over the spatial dimensions.

    Args:
        feat: ``(B, C, *spatial)`` feature map.
        eps: added to the (biased) variance before the square root, so the std is differentiable at 0.

    Returns:
        ``(mean, std)``, each ``(B, C)``, in the feature's units.
    """
    if feat.dim() < 3:
        raise ValueError(f"instance_stats expects (B, C, *spatial), got shape {list(feat.shape)}")
    # float32 (reductions in half precision lose the small stds we care about), two passes (spatial_mean_var)
    mean, var = spatial_mean_var(feat)
    return mean, torch.sqrt(var + eps)


class StyleAlignmentLoss(nn.Module):
    """``L_align = mean over blocks of [L1(mean_low, mean_full) + L1(std_low, std_full)]``.

    ``feats_low``: the BDN feature maps after every block for the low-dose input (gradients flow);
    ``feats_full``: the same network's features for the full-dose image. The full-dose branch is
    detached here, so the generator is pulled towards full-dose statistics and never the reverse (the
    caller may also compute it under ``torch.no_grad()`` to save memory).

    Shapes: two equally long lists of ``(B, C, D, H, W)`` tensors (pairwise equal batch and channels;
    spatial sizes may differ). Returns a scalar in feature units.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, feats_low: Sequence[torch.Tensor], feats_full: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats_low) != len(feats_full) or len(feats_low) == 0:
            raise ValueError(
                f"StyleAlignmentLoss needs two equally long, non-empty feature lists, got {len(feats_low)} "
                f"and {len(feats_full)}"
            )
        total = feats_low[0].new_zeros((), dtype=torch.float32)
        for low, full in zip(feats_low, feats_full):
            if low.shape[:2] != full.shape[:2]:
                raise ValueError(f"feature maps differ in batch/channels: {list(low.shape)} vs {list(full.shape)}")
            mean_low, std_low = instance_stats(low, self.eps)
            mean_full, std_full = instance_stats(full.detach(), self.eps)
            total = total + F.l1_loss(mean_low, mean_full) + F.l1_loss(std_low, std_full)
        return total / len(feats_low)
