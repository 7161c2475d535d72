"""The plain baseline a user would pick instead of UniPET: MONAI's ``UNet`` with no normalisation, residual, L1.

Issue 15 asks UniPET to beat what a MONAI user would train in its place. DESIGN.md section 5 measured why
this baseline has no normalisation layers (per-window instance norm makes a quantitative output depend on
each window's statistics) and why it is residual (``output = input + UNet(input)`` on SUV / 20 trains
quickly). The last layer is zero-initialised, so like UniPET the untrained network is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn

__all__ = ["ResidualUNet"]


class ResidualUNet(nn.Module):
    """``x + UNet(x)``: MONAI ``UNet`` (3D, no normalisation, PReLU) predicting a correction.

    Shapes: ``(B, 1, D, H, W) -> (B, 1, D, H, W)``; each size must be divisible by ``prod(strides)`` (8 by
    default: train on 32^3 patches and infer with 32^3 windows, as UniPET does).

    Args:
        channels: feature channels per level (MONAI ``UNet``'s ``channels``).
        strides: down-sampling per level (``len(channels) - 1`` entries).
        num_res_units: residual units per level.
    """

    def __init__(
        self, channels: Sequence[int] = (16, 32, 64, 128), strides: Sequence[int] = (2, 2, 2), num_res_units: int = 2
    ) -> None:
        super().__init__()
        self.unet = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=int(num_res_units),
            norm=None,
            act="PRELU",
        )
        # the top level ends in an up-convolution followed by a residual unit (conv + identity): zero both
        # so the correction starts at exactly 0; gradients still reach the up-convolution via the identity
        for last in [m for m in self.unet.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))][-2:]:
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.unet(x)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The trainer's interface (``FeatureTap``): no block features (trained with L1 only, no style alignment)."""
        return self.forward(x), []
