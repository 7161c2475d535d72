"""3D patch critic for UniPET's region-aware adversarial training (WGAN-GP).

Method: Yang et al., UniPET, Medical Image Analysis 2026 (arXiv 2606.11131); a PatchGAN-style critic
(Isola et al., CVPR 2017) without a sigmoid, as WGAN-GP requires.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PatchCritic"]


class PatchCritic(nn.Module):
    """Strided 3D conv stack scoring every receptive-field patch of a volume (higher = more full-dose-like).

    Each stage: Conv3d(kernel 4, stride 2, padding 1) -> InstanceNorm3d(affine; not on the first stage)
    -> LeakyReLU(negative_slope). A final 3x3x3 conv (stride 1, padding 1) maps to one channel. No
    sigmoid: the scores are Wasserstein critic values. Instance norm is per sample, so it is compatible
    with the per-sample gradient penalty (batch norm is not).

    Shapes: ``(B, in_channels, D, H, W) -> (B, 1, D / 2**n, H / 2**n, W / 2**n)`` with ``n =
    len(channels)`` (each stage floors ``size / 2``), e.g. 64^3 -> 4^3 and 32^3 -> 2^3 with 4 stages.

    Minimum size: every spatial size must be at least ``2**n`` (16 for 4 stages) and, because instance
    norm in training needs more than one voxel per channel, the last stage must keep more than one
    voxel: in practice use ``2**(n+1)`` = 32 or more per side (``train.json`` trains on 32^3 patches, the
    published size on 64^3).

    Args:
        in_channels: input channels (1).
        channels: output channels of the strided stages.
        negative_slope: LeakyReLU slope.
    """

    def __init__(
        self, in_channels: int = 1, channels: Sequence[int] = (64, 128, 256, 512), negative_slope: float = 0.2
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise ValueError("PatchCritic needs at least one stage in channels")
        self.in_channels = in_channels
        self.channels = channels
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(channels):
            layers.append(nn.Conv3d(prev, ch, kernel_size=4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.InstanceNorm3d(ch, affine=True))
            layers.append(nn.LeakyReLU(negative_slope))
            prev = ch
        layers.append(nn.Conv3d(prev, 1, kernel_size=3, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    @property
    def min_size(self) -> int:
        """Smallest spatial size per side that leaves the last stage more than one voxel (``2**(n+1)``)."""
        return 2 ** (len(self.channels) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score ``x`` (B, in_channels, D, H, W); returns patch scores (B, 1, D/2**n, H/2**n, W/2**n)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"PatchCritic expects input (B, {self.in_channels}, D, H, W), got {list(x.shape)}")
        smallest = 2 ** len(self.channels)
        if min(x.shape[2:]) < smallest:
            raise ValueError(
                f"PatchCritic with {len(self.channels)} stages needs every spatial size >= {smallest} "
                f"(>= {self.min_size} recommended), got {list(x.shape[2:])}; use larger patches or fewer stages"
            )
        return self.model(x)
