"""UniPET generator: base denoising network (BDN) steered by a style alignment network (SAN).

Method: Yang et al., "UniPET: a universal network for high-quality PET image denoising across varied
dose reduction factors", Medical Image Analysis 2026 (arXiv 2606.11131). Our own implementation of the
published design (see ``DESIGN.md`` section 2); it differs from the public reference code where that
code is wrong or inefficient (see the class docstrings).
"""

# No ``from __future__ import annotations``: TorchScript must see real annotations.
import logging
from collections.abc import Mapping
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .modulated_conv import ModulatedConv3d

__all__ = ["ChannelAttention3d", "SANStage", "StyleAlignmentNetwork", "ModulatedResBlock", "UniPET"]

logger = logging.getLogger(__name__)


class ChannelAttention3d(nn.Module):
    """Squeeze-and-excitation channel attention: ``x * sigmoid(MLP(global_avg_pool(x)))``.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3, 4))
        w = torch.sigmoid(self.fc2(self.act(self.fc1(w))))
        return x * w.reshape(w.shape[0], w.shape[1], 1, 1, 1)


class SANStage(nn.Module):
    """One stride-2 encoder stage of the style alignment network, plus its latent head.

    1x1 conv (in -> mid) + PReLU, SE channel attention, strided 3x3x3 conv (mid -> mid) + PReLU,
    1x1 conv (mid -> out) + PReLU; then global average pooling and a linear layer to the latent.

    Shapes: ``(B, in, D, H, W) -> ((B, out, ceil(D/2), ceil(H/2), ceil(W/2)), (B, latent_dim))``.
    """

    def __init__(self, in_channels: int, out_channels: int, latent_dim: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(out_channels // reduction, 8)
        self.reduce = nn.Conv3d(in_channels, mid, 1, bias=False)
        self.act1 = nn.PReLU()
        self.attention = ChannelAttention3d(mid)
        self.down = nn.Conv3d(mid, mid, 3, stride=2, padding=1, bias=False)
        self.act2 = nn.PReLU()
        self.expand = nn.Conv3d(mid, out_channels, 1, bias=False)
        self.act3 = nn.PReLU()
        self.to_latent = nn.Linear(out_channels, latent_dim)
        self.latent_act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.attention(self.act1(self.reduce(x)))
        x = self.act2(self.down(x))
        x = self.act3(self.expand(x))
        latent = self.latent_act(self.to_latent(x.mean(dim=(2, 3, 4))))
        return x, latent


class StyleAlignmentNetwork(nn.Module):
    """SAN: a stride-2 encoder whose every stage emits a global style latent.

    It reads the BDN's input-conv features of the low-dose image itself, so it needs no dose label and
    works for dose reduction factors never seen in training. Global pooling makes the latents
    independent of the input size, but they do depend on the window's content: run inference on
    windows the size of the training patches.

    Shapes: ``(B, in_channels, D, H, W) -> [(B, latent_dim)] * len(channels)``.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], latent_dim: int, reduction: int = 4) -> None:
        super().__init__()
        stages = []
        prev = in_channels
        for ch in channels:
            stages.append(SANStage(prev, ch, latent_dim, reduction))
            prev = ch
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        latents: List[torch.Tensor] = []
        for stage in self.stages:
            x, latent = stage(x)
            latents.append(latent)
        return latents


class ModulatedResBlock(nn.Module):
    """BDN residual block: ``x + r * modconv2(PReLU(modconv1(x, s1)), s2)``, ``r`` a learnable per-channel scale.

    With ``latent_dim`` set, a zero-initialised linear layer maps the SAN latent to the two styles
    ``s1, s2`` (one value per input channel each), so a freshly attached SAN leaves the block's output
    unchanged. Without it (or with ``latent=None``) both styles are zero.

    Shapes: ``x (B, C, D, H, W)``, ``latent (B, latent_dim)`` -> ``(B, C, D, H, W)``.
    """

    def __init__(self, channels: int, latent_dim: Optional[int] = None, residual_scale_init: float = 0.1) -> None:
        super().__init__()
        self.channels = channels
        self.conv1 = ModulatedConv3d(channels, channels, 3)
        self.act = nn.PReLU(channels)
        self.conv2 = ModulatedConv3d(channels, channels, 3)
        self.residual_scale = nn.Parameter(torch.full((1, channels, 1, 1, 1), float(residual_scale_init)))
        # None unless SAN-driven; TorchScript resolves the `is not None` test at compile time.
        self.style_affine = None
        if latent_dim is not None:
            self.style_affine = nn.Linear(latent_dim, 2 * channels)
            nn.init.zeros_(self.style_affine.weight)
            nn.init.zeros_(self.style_affine.bias)

    def forward(self, x: torch.Tensor, latent: Optional[torch.Tensor] = None) -> torch.Tensor:
        s1: Optional[torch.Tensor] = None
        s2: Optional[torch.Tensor] = None
        affine = self.style_affine
        if affine is not None and latent is not None:
            styles = affine(latent)
            s1 = styles[:, : self.channels]
            s2 = styles[:, self.channels :]
        res = self.conv2(self.act(self.conv1(x, s1)), s2)
        return x + res * self.residual_scale


class UniPET(nn.Module):
    """UniPET generator: one 3D denoiser for every dose reduction factor (Yang et al., MedIA 2026, arXiv 2606.11131).

    Base denoising network (BDN), full resolution, no down-sampling and no normalisation layers (a
    quantitative denoiser must not depend on each window's statistics; demodulation keeps activations
    bounded)::

        f0  = conv3x3x3(x)                                  in_channels -> channels
        f_i = f_{i-1} + r_i * modconv(PReLU(modconv(f_{i-1}, s_i1)), s_i2)    i = 1..num_blocks
        y   = conv3x3x3(f_N) + x                            channels -> out_channels (global skip)

    Style alignment network (SAN, ``use_san=True``): ``len(san_channels)`` stride-2 encoder stages read
    ``f0`` and each emits a ``latent_dim`` latent by global average pooling; the latents drive
    consecutive groups of BDN blocks (block ``i`` uses latent ``i * n_stages // num_blocks``; with
    8 blocks and 4 stages that is 2 blocks per latent) through per-block affine layers ``latent ->
    (s_i1, s_i2)``. Those affine layers are zero-initialised: loading a stage-1 (``use_san=False``)
    checkpoint into a ``use_san=True`` model (:meth:`load_bdn_state_dict`) gives exactly the stage-1
    function, and stage 2 departs from it smoothly. ``use_san=False`` is the BDN alone with zero
    styles (the "vanilla universal" baseline); it holds no SAN or affine parameters.

    The output conv is zero-initialised by default (``zero_init_output``), so an untrained network is
    the identity: training starts from "leave the input as it is", never from random noise added to it.

    Units: input and output are normalised SUV (SUV clipped to [0, 20], divided by 20; the global skip
    makes the network predict a correction in those units).

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)`` for any ``D, H, W >= 1``. Each
    SAN stage halves the size (rounding up), so with ``n`` stages a size below ``2**n`` (16 for the
    default) leaves the deepest stages a single voxel: it runs but their latents carry little
    information; use windows of at least 16 (training uses 64^3 patches).

    Parameter counts (``use_san=True`` / ``False``): default (channels 64, 8 blocks, latent 256,
    SAN 32-64-128-256) 2,343,909 / 1,774,017; small CPU config (channels 16, 4 blocks, latent 64, SAN
    16-32-64-64) 98,109 / 56,305.

    Args:
        in_channels: input channels (1: the low-dose PET).
        out_channels: output channels (1). The global skip needs ``in_channels == out_channels``.
        channels: BDN feature width ``C``.
        num_blocks: number of residual blocks (>= number of SAN stages when ``use_san``).
        latent_dim: SAN latent size.
        san_channels: output channels of each SAN stage (its length is the number of stages).
        use_san: build the SAN and the per-block affine layers.
        residual_scale_init: initial value of every block's per-channel residual scale.
        san_reduction: SAN bottleneck ratio (a stage's inner width is ``max(out // san_reduction, 8)``).
        zero_init_output: zero-initialise the output conv (untrained network = identity).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 64,
        num_blocks: int = 8,
        latent_dim: int = 256,
        san_channels: Sequence[int] = (32, 64, 128, 256),
        use_san: bool = True,
        residual_scale_init: float = 0.1,
        san_reduction: int = 4,
        zero_init_output: bool = True,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        san_channels = tuple(int(c) for c in san_channels)
        if use_san and len(san_channels) == 0:
            raise ValueError("use_san=True needs at least one SAN stage in san_channels")
        if use_san and num_blocks < len(san_channels):
            raise ValueError(
                f"num_blocks ({num_blocks}) must be >= the number of SAN stages ({len(san_channels)}), "
                "or some stages would drive no block"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.num_blocks = num_blocks
        self.latent_dim = latent_dim
        self.san_channels = san_channels
        self.use_san = use_san
        self.global_skip = in_channels == out_channels

        self.input_conv = nn.Conv3d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            [ModulatedResBlock(channels, latent_dim if use_san else None, residual_scale_init) for _ in range(num_blocks)]
        )
        self.output_conv = nn.Conv3d(channels, out_channels, 3, padding=1)
        if zero_init_output:
            nn.init.zeros_(self.output_conv.weight)
            nn.init.zeros_(self.output_conv.bias)

        self.san = None
        n_stages = len(san_channels) if use_san else 0
        if use_san:
            self.san = StyleAlignmentNetwork(channels, san_channels, latent_dim, san_reduction)
        # Even spread of blocks over stages; with num_blocks divisible by n_stages this is
        # ceil(num_blocks / n_stages) consecutive blocks per latent, and every latent is always used
        # (an unused stage would break DistributedDataParallel without find_unused_parameters).
        self.latent_index: List[int] = [i * n_stages // num_blocks for i in range(num_blocks)]

    def _run(self, x: torch.Tensor, keep_features: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"UniPET expects input (B, {self.in_channels}, D, H, W), got {list(x.shape)}")
        feat = self.input_conv(x)
        latents: List[torch.Tensor] = []
        san = self.san
        if san is not None:
            latents = san(feat)
        features: List[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            latent: Optional[torch.Tensor] = None
            if len(latents) > 0:
                latent = latents[self.latent_index[i]]
            feat = block(feat, latent)
            if keep_features:
                features.append(feat)
        out = self.output_conv(feat)
        if self.global_skip:
            out = out + x
        return out, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise ``x`` (B, in_channels, D, H, W), normalised SUV; returns (B, out_channels, D, H, W)."""
        return self._run(x, False)[0]

    @torch.jit.export
    def forward_with_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Prediction plus the BDN feature map after every block (``num_blocks`` tensors of shape (B, C, D, H, W)).

        For the style alignment loss; :meth:`forward` does not keep these maps (saves memory in inference).
        """
        return self._run(x, True)

    def san_parameters(self) -> List[nn.Parameter]:
        """Parameters added by stage 2 (SAN and the per-block style affine layers); empty when ``use_san=False``."""
        return [p for n, p in self.named_parameters() if self._is_san_key(n)]

    @staticmethod
    def _is_san_key(name: str) -> bool:
        return name.startswith("san.") or ".style_affine." in name

    def load_bdn_state_dict(self, state_dict: Mapping[str, Any]) -> List[str]:
        """Load a stage-1 (BDN-only) or a full checkpoint; SAN/affine weights missing from it keep their init.

        A ``module.`` prefix (DistributedDataParallel) is stripped. Any missing BDN weight, or any key
        this model does not have (e.g. SAN weights into a ``use_san=False`` model), raises ``KeyError``.
        Returns the names of the parameters left at their initial value (the SAN ones).
        """
        cleaned = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        result = self.load_state_dict(cleaned, strict=False)
        missing_bdn = [k for k in result.missing_keys if not self._is_san_key(k)]
        if missing_bdn or result.unexpected_keys:
            raise KeyError(
                f"checkpoint does not match this UniPET: missing BDN keys {missing_bdn[:5]}, unexpected keys "
                f"{list(result.unexpected_keys)[:5]}; check channels/num_blocks/use_san against the checkpoint"
            )
        if result.missing_keys:
            logger.info("loaded BDN weights; %d SAN tensors keep their initial values", len(result.missing_keys))
        return list(result.missing_keys)
