"""StyleGAN2-style modulated 3D convolution, the building block of the UniPET base denoising network.

Reference: Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (CVPR 2020), weight
(de)modulation; used in 3D by Yang et al., UniPET, Medical Image Analysis 2026 (arXiv 2606.11131).
"""

# No ``from __future__ import annotations``: TorchScript must see real annotations.
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModulatedConv3d",
    "PADDING_MODES",
    "prelu_replicate_pad",
    "replicate_depthwise3",
    "replicate_pad",
    "replicate_pad_product",
]

PADDING_MODES = ("zeros", "replicate", "reflect")
"""Padding modes of the UniPET convolutions (``torch.nn.Conv3d`` names)."""


def _padded_empty(x: torch.Tensor, p: int) -> torch.Tensor:
    """An uninitialised ``(B, C, D + 2p, H + 2p, W + 2p)`` tensor in ``x``'s memory format, dtype and device."""
    b, c, d, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.empty(
            (b, c, d + 2 * p, h + 2 * p, w + 2 * p),
            dtype=x.dtype,
            device=x.device,
            memory_format=torch.channels_last_3d,
        )
    return torch.empty((b, c, d + 2 * p, h + 2 * p, w + 2 * p), dtype=x.dtype, device=x.device)


def _fill_replicate_faces(out: torch.Tensor, p: int) -> torch.Tensor:
    """Edge-replicate the ``p``-voxel border of ``out`` from its interior (written already), in place.

    The two faces of each axis are copied from the already padded array, axis after axis, so edges and
    corners come out replicated."""
    d, h, w = out.shape[2] - 2 * p, out.shape[3] - 2 * p, out.shape[4] - 2 * p
    for i in range(p):
        out[:, :, i, p : p + h, p : p + w] = out[:, :, p, p : p + h, p : p + w]
        out[:, :, p + d + i, p : p + h, p : p + w] = out[:, :, p + d - 1, p : p + h, p : p + w]
    for i in range(p):
        out[:, :, :, i, p : p + w] = out[:, :, :, p, p : p + w]
        out[:, :, :, p + h + i, p : p + w] = out[:, :, :, p + h - 1, p : p + w]
    for i in range(p):
        out[:, :, :, :, i] = out[:, :, :, :, p]
        out[:, :, :, :, p + w + i] = out[:, :, :, :, p + w - 1]
    return out


def replicate_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """Edge-replicate padding of the last three axes by ``p`` voxels, in ``x``'s memory format.

    The same values as ``F.pad(x, [p] * 6, mode="replicate")`` (tested bit for bit, gradients too), but
    that kernel is ~3x slower on a channels-last input and clones in bf16: it was 8 % (fp32) to 15-29 %
    (bf16, channels-last) of the network's CPU time (issue 14 profile). Interior copy, then the faces.
    When autograd records (training), ``F.pad`` itself: each of the slice writes here is an in-place op whose
    backward clones the whole padded gradient (seven clones per padding), 9-20x slower than ``F.pad``'s backward
    (fp32 141 vs 16 ms, bf16 channels-last 265 vs 13 ms for four 16-channel 32^3 patches).

    Shapes: ``(B, C, D, H, W) -> (B, C, D + 2p, H + 2p, W + 2p)``.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return F.pad(x, [p, p, p, p, p, p], mode="replicate")
    d, h, w = x.shape[2], x.shape[3], x.shape[4]
    out = _padded_empty(x, p)
    out[:, :, p : p + d, p : p + h, p : p + w] = x
    return _fill_replicate_faces(out, p)


def replicate_pad_product(x: torch.Tensor, scale: torch.Tensor, p: int) -> torch.Tensor:
    """``replicate_pad(x * scale, p)`` with the product written straight into the padded tensor's interior.

    ``scale`` broadcasts against ``x`` (e.g. a per-sample, per-channel factor ``(B, C, 1, 1, 1)``) and has
    ``x``'s dtype. Saves the interior copy of the padding (a full pass over the features: ~13 % of the
    network's CPU time before 0.5.2). The same values bit for bit. No autograd (an ``out=`` product):
    callers use it only with gradients off (inference, validation).

    Shapes: ``(B, C, D, H, W) -> (B, C, D + 2p, H + 2p, W + 2p)``.
    """
    d, h, w = x.shape[2], x.shape[3], x.shape[4]
    out = _padded_empty(x, p)
    torch.mul(x, scale, out=out[:, :, p : p + d, p : p + h, p : p + w])
    return _fill_replicate_faces(out, p)


def prelu_replicate_pad(
    x: torch.Tensor, scale: Optional[torch.Tensor], slope: Optional[torch.Tensor], p: int
) -> torch.Tensor:
    """``replicate_pad(PReLU(x) * scale, p)`` in PyTorch's passes, each factor optional (``None``: skipped).

    Without autograd the product goes straight into the padded tensor (:func:`replicate_pad_product`); when
    autograd records through ``x`` or ``scale``, a plain product and :func:`replicate_pad` (an ``out=`` product has
    no autograd). The reference path of the fused CPU kernel (``scripts.networks.fused_pad``) and the one under
    TorchScript.

    Shapes: ``(B, C, D, H, W) -> (B, C, D + 2p, H + 2p, W + 2p)``.
    """
    h = x if slope is None else F.prelu(x, slope)
    if scale is None:
        return replicate_pad(h, p)
    if torch.is_grad_enabled() and (h.requires_grad or scale.requires_grad):
        return replicate_pad(h * scale, p)
    return replicate_pad_product(h, scale, p)


def replicate_depthwise3(x: torch.Tensor, weight: torch.Tensor, channel_sum: bool = False) -> torch.Tensor:
    """``conv3d(replicate_pad(x, 1), weight, groups=C)`` in PyTorch's passes, summed over the channels with
    ``channel_sum`` (accumulated in float32 for bf16/fp16 features, a float32 result); no bias.

    The reference path of the fused CPU kernel (``scripts.networks.fused_pad.depthwise3_replicate``) and the one under
    TorchScript. ``weight``: ``(C, 1, 3, 3, 3)``.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``, or ``(B, 1, D, H, W)`` with ``channel_sum``.
    """
    out = F.conv3d(replicate_pad(x, 1), weight.to(x.dtype), None, 1, 0, 1, x.shape[1])
    if not channel_sum:
        return out
    acc = x.dtype
    if acc == torch.bfloat16 or acc == torch.float16:
        acc = torch.float32
    return out.sum(dim=1, keepdim=True, dtype=acc)


class ModulatedConv3d(nn.Module):
    """3D convolution whose weights are scaled per sample and per input channel by a style vector.

    For a style ``s`` of shape ``(B, Cin)`` the weights of sample ``b`` are
    ``W_b = W * (1 + s_b)`` (broadcast over output channels and kernel). With ``demodulate`` each output
    filter of ``W_b`` is divided by ``sqrt(sum over (Cin, kd, kh, kw) of W_b^2 + eps)``, so for
    independent unit-variance inputs each output channel has unit variance whatever the style: this is
    what keeps activations bounded in a network with no normalisation layers. The per-sample weights
    are applied as one grouped convolution (one group per sample). Stride 1, "same" padding, no bias.

    ``padding_mode`` chooses what the kernel sees beyond the input's faces: ``"zeros"`` (0.2.0; a window
    face then looks like a drop to zero activity, which biases every window's border low),
    ``"replicate"`` (the edge voxel repeated: a flat region stays flat up to the face) or ``"reflect"``.

    ``style=None`` means ``s = 0`` for every sample: the result is then an ordinary convolution with the
    (demodulated) shared weight, computed without the grouped path (cheaper, same numbers up to float
    rounding).

    Args:
        in_channels: input channels ``Cin``.
        out_channels: output channels ``Cout``.
        kernel_size: odd cubic kernel size (3 by default).
        demodulate: divide each per-sample output filter by its L2 norm (StyleGAN2 demodulation).
        eps: added under the square root of the demodulation norm.
        padding_mode: ``"zeros"``, ``"replicate"`` or ``"reflect"`` (as ``torch.nn.Conv3d``'s).

    Shapes:
        ``x``: ``(B, Cin, D, H, W)``; ``style``: ``(B, Cin)`` or ``None``; output ``(B, Cout, D, H, W)``.
        Any ``D, H, W >= 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        demodulate: bool = True,
        eps: float = 1e-8,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer for 'same' padding, got {kernel_size}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.padding = kernel_size // 2
        self.demodulate = demodulate
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # std 1/sqrt(fan_in): unit gain without demodulation. With demodulation the output does not
        # depend on the weight scale, but a small scale keeps Adam's fixed-size steps meaningful
        # relative to the weights (a unit-std init would learn ~40x slower).
        fan_in = self.in_channels * self.kernel_size**3
        nn.init.normal_(self.weight, mean=0.0, std=1.0 / math.sqrt(fan_in))

    def _pad(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """The input padded for a "valid" conv (non-zero modes), or unchanged with the conv's own zero padding."""
        if self.padding_mode == "zeros" or self.padding == 0:
            return x, self.padding
        p = self.padding
        if self.padding_mode == "replicate":
            return replicate_pad(x, p), 0
        return F.pad(x, [p, p, p, p, p, p], mode=self.padding_mode), 0

    def conv_unmodulated(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, Cin, D, H, W) convolved with the raw shared weight (padding as configured, no (de)modulation).

        With :meth:`demodulation`: ``forward(x, s) == conv_unmodulated(x * (1 + s)) * demodulation(s, B)`` up to
        float rounding, which lets a caller fold the per-channel factors into its own element-wise passes
        (:class:`scripts.networks.unipet.ModulatedResBlock`)."""
        xp, pad = self._pad(x)
        return F.conv3d(xp, self.weight.to(x.dtype), None, 1, pad)

    def conv_padded(self, xp: torch.Tensor) -> torch.Tensor:
        """:meth:`conv_unmodulated` for an input that is already padded by ``kernel_size // 2`` voxels (a "valid"
        conv): ``(B, Cin, D + 2p, H + 2p, W + 2p) -> (B, Cout, D, H, W)``."""
        return F.conv3d(xp, self.weight.to(xp.dtype), None, 1, 0)

    def demodulation(self, style: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
        """The demodulation factor, ``(B, Cout, 1, 1, 1)`` for a style ``(B, Cin)`` or ``(1, Cout, 1, 1, 1)`` for
        ``style=None`` (zero style), float32 and > 0; ``None`` without demodulation."""
        if not self.demodulate:
            return None
        w2 = self.weight.float().pow(2).sum(dim=(2, 3, 4))  # (Cout, Cin)
        if style is None:
            return torch.rsqrt(w2.sum(dim=1) + self.eps).reshape(1, self.out_channels, 1, 1, 1)
        return torch.rsqrt((1.0 + style.float()).pow(2) @ w2.t() + self.eps).reshape(batch, self.out_channels, 1, 1, 1)

    def forward(self, x: torch.Tensor, style: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Convolve ``x`` (B, Cin, D, H, W) with weights modulated by ``style`` (B, Cin); returns (B, Cout, D, H, W)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"ModulatedConv3d expects input (B, {self.in_channels}, D, H, W), got {list(x.shape)}")
        if style is None:
            weight = self.weight
            if self.demodulate:
                norm = torch.rsqrt(weight.pow(2).sum(dim=(1, 2, 3, 4), keepdim=True) + self.eps)
                weight = weight * norm
            xp, pad = self._pad(x)
            return F.conv3d(xp, weight.to(x.dtype), None, 1, pad)

        b = x.shape[0]
        if style.dim() != 2 or style.shape[0] != b or style.shape[1] != self.in_channels:
            raise ValueError(f"ModulatedConv3d expects style (B={b}, {self.in_channels}), got {list(style.shape)}")
        # conv(x, W * (1 + s)) == conv(x * (1 + s), W): scale the input channels per sample and run one
        # ordinary batched conv with the shared weight, instead of a grouped conv over per-sample weight
        # copies (the same numbers, several times faster on a CPU and lighter on memory). Demodulation is
        # then a per-sample, per-output-channel factor on the result.
        scale = (1.0 + style).to(x.dtype)
        # scaling before padding is exact for every mode (padding copies or zeros voxels, channel-wise)
        xp, pad = self._pad(x * scale.reshape(b, self.in_channels, 1, 1, 1))
        out = F.conv3d(xp, self.weight.to(x.dtype), None, 1, pad)
        if self.demodulate:
            w2 = self.weight.pow(2).sum(dim=(2, 3, 4))  # (Cout, Cin)
            demod = torch.rsqrt((1.0 + style).pow(2) @ w2.t() + self.eps)  # (B, Cout)
            out = out * demod.to(out.dtype).reshape(b, self.out_channels, 1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"demodulate={self.demodulate}, eps={self.eps}, padding_mode={self.padding_mode}"
        )
