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

from .fused_pad import (
    depthwise3_project_prelu,
    depthwise3_replicate,
    prelu_scale_pad,
    single_channel_conv3_replicate,
)
from .modulated_conv import PADDING_MODES, ModulatedConv3d, prelu_replicate_pad, replicate_depthwise3

__all__ = [
    "local_mean3",
    "high_pass3",
    "spatial_mean_var",
    "ChannelAttention3d",
    "SANStage",
    "StyleAlignmentNetwork",
    "ModulatedResBlock",
    "UniPET",
    "SAN_VARIANTS",
    "checkpoint_san_variant",
    "match_checkpoint_san_variant",
]

SAN_VARIANTS = ("v1", "v2", "v3")
"""SAN designs. ``v1``: version 0.2.0: PyTorch default initialisation, SE gate ``sigmoid`` (halves the
signal), global *mean* pooling; its activations shrink ~40x per stage and every latent ends up equal to
its head's bias (dead). ``v2``: He-normal initialisation with the PReLU gain, unit-gain SE gate
(``2 * sigmoid``), latent head on the per-channel *mean and standard deviation* with a zero bias, so the
latent is the features' and not the bias's. ``v3`` (0.4.0 default): ``v2`` reading the *high-pass* of the
input-conv features (the features minus their 3x3x3 local mean) and pooling the mean and the *log* of the
standard deviation. Why: in a window the spread of the features is dominated by anatomy (organs, edges),
not by noise, so ``v2``'s latents moved ~30x more from window to window than from DRF 4 to DRF 100 at
initialisation; the local high-pass removes most of the anatomy and keeps the noise, and the log turns the
noise amplitude's multiplicative change with dose into an additive one. Measured at initialisation on
windows of a simulated subject (seeds 0-2): latent change DRF 4 -> 100 over change across windows
0.03 (v2) -> 0.59 (v3)."""

logger = logging.getLogger(__name__)


@torch.jit.unused
def _fused_padded(x: torch.Tensor, scale: Optional[torch.Tensor], slope: Optional[torch.Tensor]) -> torch.Tensor:
    """Eager mode: the fused CPU kernel where it applies, else PyTorch's passes (:func:`fused_pad.prelu_scale_pad`)."""
    return prelu_scale_pad(x, scale, slope, 1)


def padded_input(
    x: torch.Tensor, scale: Optional[torch.Tensor] = None, slope: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``replicate_pad(PReLU(x) * scale, 1)``, each factor optional: a 3x3x3 convolution's replicate-padded input.

    In eager mode one fused pass on the CPU where it applies (float32 channels-last features, no autograd;
    :mod:`scripts.networks.fused_pad`, switched by ``fused_cpu_kernels``), else PyTorch's passes; under TorchScript
    always PyTorch's passes. The same values either way (tested bit for bit). ``scale``: ``(B, C, 1, 1, 1)``;
    ``slope``: a PReLU weight.

    Shapes: ``(B, C, D, H, W) -> (B, C, D + 2, H + 2, W + 2)``.
    """
    if not torch.jit.is_scripting():
        return _fused_padded(x, scale, slope)
    return prelu_replicate_pad(x, scale, slope, 1)


@torch.jit.unused
def _fused_depthwise(x: torch.Tensor, weight: torch.Tensor, channel_sum: bool) -> torch.Tensor:
    """Eager mode: the fused CPU kernel where it applies, else PyTorch's passes (``fused_pad.depthwise3_replicate``)."""
    return depthwise3_replicate(x, weight, channel_sum)


def depthwise3(x: torch.Tensor, weight: torch.Tensor, channel_sum: bool = False) -> torch.Tensor:
    """``conv3d(replicate_pad(x, 1), weight, groups=C)``, summed over the channels with ``channel_sum``; no bias.

    In eager mode the fused CPU kernel where it applies (float32 channels-last features, no autograd; it reads the
    faces in place instead of padding a copy: :mod:`scripts.networks.fused_pad`), else PyTorch's passes; under
    TorchScript always PyTorch's passes. The same function up to float rounding (tested). ``weight``:
    ``(C, 1, 3, 3, 3)``.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``, or ``(B, 1, D, H, W)`` with ``channel_sum``.
    """
    if not torch.jit.is_scripting():
        return _fused_depthwise(x, weight, channel_sum)
    return replicate_depthwise3(x, weight, channel_sum)


@torch.jit.unused
def _fused_single_channel(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """Eager mode: the fused CPU kernel's ``1 -> C`` replicate-padded convolution, or None where it does not apply
    (``fused_pad.single_channel_conv3_replicate``)."""
    return single_channel_conv3_replicate(x, weight, bias)


def local_mean3(x: torch.Tensor) -> torch.Tensor:
    """The 3x3x3 local mean of each channel, faces edge-replicated (``avg_pool3d`` of the replicate-padded input).

    ``avg_pool3d`` has no fast 3D kernel on the CPU (it was 19 % of the network's inference time, issue 14).
    float32 input: a depthwise box convolution (14x faster), summing then dividing once as ``avg_pool3d``
    does: bit-identical on this CPU build (measured), equal up to rounding in general (tested to 1e-6).
    Other dtypes (bf16 features under autocast): three separable sums in float32, returning float32, which
    keeps what autocast did with ``avg_pool3d`` (it ran in float32 there, so the SAN's high-pass
    ``x - local_mean3(x)`` is float32); a box convolution would be cast to bf16 and round the mean.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``.
    """
    c = x.shape[1]
    if x.dtype == torch.float32:
        ones = torch.ones((c, 1, 3, 3, 3), dtype=x.dtype, device=x.device)
        return nn.functional.conv3d(padded_input(x), ones, None, 1, 0, 1, c).div_(27.0)
    p = padded_input(x.float())
    p = p[:, :, :-2] + p[:, :, 1:-1] + p[:, :, 2:]
    p = p[:, :, :, :-2] + p[:, :, :, 1:-1] + p[:, :, :, 2:]
    p = p[:, :, :, :, :-2] + p[:, :, :, :, 1:-1] + p[:, :, :, :, 2:]
    return p.div_(27.0)


@torch.jit.unused
def _autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (eager mode only: TorchScript cannot ask)."""
    return torch.is_autocast_enabled(x.device.type)


def high_pass3(x: torch.Tensor) -> torch.Tensor:
    """``x - local_mean3(x)``: each channel minus its 3x3x3 local mean, faces edge-replicated (the SAN's input).

    float32 input: one depthwise convolution (:func:`depthwise3`) of the edge-replicated input with the kernel
    ``delta - 1/27``, the same function up to float rounding (tested to 2e-6) in one pass instead of three (the box
    mean, its division and the difference: 6.5 instead of 10.1 ms for eight 32^3 windows of 16 channels, issue 14;
    ~2.7 ms since the fused kernel, 0.5.10). Other dtypes (bf16 features under autocast), and float32 while autocast
    is on in eager mode (the convolution would round the input itself to bf16, not only its mean):
    ``x.float() - local_mean3(x)``, float32.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``.
    """
    if x.dtype != torch.float32 or (not torch.jit.is_scripting() and _autocast_on(x)):
        return x.float() - local_mean3(x)
    return depthwise3(x, _high_pass_kernel(x))


def _high_pass_kernel(x: torch.Tensor) -> torch.Tensor:
    """The depthwise kernel ``delta - 1/27`` of :func:`high_pass3` for ``x``'s channels, ``(C, 1, 3, 3, 3)``."""
    kernel = torch.full((x.shape[1], 1, 3, 3, 3), -1.0 / 27.0, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1, 1] = 26.0 / 27.0
    return kernel


@torch.jit.unused
def _fused_san_front(
    x: torch.Tensor, reduce: torch.Tensor, slope: torch.Tensor
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Eager mode: ``act1(reduce(high_pass3(x)))`` and its channel means from one fused CPU pass, or None where the
    kernel does not apply (``fused_pad.depthwise3_project_prelu``)."""
    if x.dtype != torch.float32:
        return None
    return depthwise3_project_prelu(x, _high_pass_kernel(x), reduce, slope)


def spatial_mean_var(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and (biased) variance over the spatial axes, in two passes, at least float32.

    Two vectorised passes (the mean, then the mean squared deviation) instead of ``torch.var_mean``, whose CPU
    kernel (Welford, one voxel after another) took ~10x longer on the SAN's and L_align's feature maps (issue 14);
    the same statistics to ~1e-7 relative. Used by the SAN's pooled statistics and L_align's instance statistics.

    Shapes: ``(B, C, *spatial) -> ((B, C), (B, C))``.
    """
    flat = x.flatten(2)
    if flat.dtype == torch.float16 or flat.dtype == torch.bfloat16:
        flat = flat.float()
    mean = flat.mean(dim=2)
    var = (flat - mean.unsqueeze(2)).square().mean(dim=2)
    return mean, var


class ChannelAttention3d(nn.Module):
    """Squeeze-and-excitation channel attention: ``x * gain * sigmoid(MLP(global_avg_pool(x)))``.

    ``gain`` 1 is the classic gate (0.2.0), which halves the signal at initialisation (sigmoid ~ 0.5);
    the v2/v3 SAN uses ``gain=2`` so the gate starts at unit gain and stacked stages keep their scale.

    Not MONAI's ``ChannelSELayer`` (checked, issue 17): its gate has no gain, so it cannot express the
    unit-gain gate that keeps the v2/v3 SAN's activations alive, and its parameter names (``fc.0``,
    ``fc.2``) differ from ours, so 0.2.0-0.4.0 weights would no longer load strictly.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``.
    """

    def __init__(self, channels: int, reduction: int = 4, gain: float = 1.0) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels)
        self.gain = float(gain)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample, per-channel factor ``gain * sigmoid(MLP(global_avg_pool(x)))``, ``(B, C, 1, 1, 1)``."""
        return self.gate_from_mean(x.mean(dim=(2, 3, 4)))

    def gate_from_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """:meth:`gate` from the input's per-sample, per-channel mean ``(B, C)`` (already known to a fused caller)."""
        w = torch.sigmoid(self.fc2(self.act(self.fc1(mean))))
        if self.gain != 1.0:
            w = w * self.gain
        return w.reshape(w.shape[0], w.shape[1], 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SANStage(nn.Module):
    """One stride-2 encoder stage of the style alignment network, plus its latent head.

    1x1 conv (in -> mid) + PReLU, SE channel attention, strided 3x3x3 conv (mid -> mid) + PReLU,
    1x1 conv (mid -> out) + PReLU; then global pooling and a linear layer to the latent: ``v1`` pools
    the per-channel mean (``out`` values), ``v2`` the mean and the standard deviation (``2 * out``
    values, the statistics that define a style; the std is what carries the noise level). See
    :data:`SAN_VARIANTS` for the initialisation.

    Shapes: ``(B, in, D, H, W) -> ((B, out, ceil(D/2), ceil(H/2), ceil(W/2)), (B, latent_dim))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        latent_dim: int,
        reduction: int = 4,
        variant: str = "v3",
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if variant not in SAN_VARIANTS:
            raise ValueError(f"san_variant must be one of {SAN_VARIANTS}, got {variant!r}")
        self.use_std = variant != "v1"
        self.log_std = variant == "v3"
        mid = max(out_channels // reduction, 8)
        self.reduce = nn.Conv3d(in_channels, mid, 1, bias=False)
        self.act1 = nn.PReLU()
        self.attention = ChannelAttention3d(mid, gain=1.0 if variant == "v1" else 2.0)
        self.down = nn.Conv3d(mid, mid, 3, stride=2, padding=1, bias=False, padding_mode=padding_mode)
        self.act2 = nn.PReLU()
        self.expand = nn.Conv3d(mid, out_channels, 1, bias=False)
        self.act3 = nn.PReLU()
        self.to_latent = nn.Linear(out_channels * (2 if self.use_std else 1), latent_dim)
        self.latent_act = nn.LeakyReLU(0.2)
        if variant != "v1":
            self._init_v2()

    def _init_v2(self) -> None:
        # He-normal with the PReLU gain (slope 0.25 at init): each conv + PReLU keeps the activation's
        # second moment, instead of shrinking it by the default init's ~1/sqrt(3) per layer (which, with
        # the 1x1 convs, the sigmoid gate and the stride, compounded to ~40x per stage in v1).
        slope = 0.25
        for conv in (self.reduce, self.down, self.expand):
            nn.init.kaiming_normal_(conv.weight, a=slope, nonlinearity="leaky_relu")
        # The head: unit-gain weights and a zero bias, so the latent is a function of the pooled
        # statistics from the first step (in v1 the default bias, ~1/sqrt(fan_in), dwarfed them).
        nn.init.kaiming_normal_(self.to_latent.weight, a=0.2, nonlinearity="leaky_relu")
        nn.init.zeros_(self.to_latent.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.forward_reduced(self.act1(self.reduce(x)), None)

    def forward_reduced(self, x: torch.Tensor, mean: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stage after its 1x1 reduction and first PReLU: ``x`` (B, mid, D, H, W) is ``act1(reduce(input))``,
        ``mean`` its per-channel mean (B, mid) when a fused caller already has it (used only with replicate padding),
        else None. Returns what :meth:`forward` returns."""
        down = self.down
        if down.padding_mode == "replicate":
            # The same numbers as attention then nn.Conv3d with its own replicate padding (F.pad, ~3x slower on a
            # channels-last input: see replicate_pad); without gradients the gate's product is written straight
            # into the padded input (no interior copy), as in ModulatedResBlock.
            gate = self.attention.gate_from_mean(x.mean(dim=(2, 3, 4)) if mean is None else mean).to(x.dtype)
            xp = padded_input(x, gate)
            x = self.act2(nn.functional.conv3d(xp, down.weight, down.bias, 2, 0))
        else:
            x = self.act2(down(self.attention(x)))
        x = self.act3(self.expand(x))
        if self.use_std:
            mean, var = spatial_mean_var(x)
            std = torch.sqrt(var + 1e-12)
            if self.log_std:
                # 1e-6: the floor of a feature that is constant over the window (no noise at all)
                std = torch.log(std + 1e-6)
            pooled = torch.cat([mean, std], dim=1).to(x.dtype)
        else:
            pooled = x.mean(dim=(2, 3, 4))
        latent = self.latent_act(self.to_latent(pooled))
        return x, latent


class StyleAlignmentNetwork(nn.Module):
    """SAN: a stride-2 encoder whose every stage emits a global style latent.

    It reads the BDN's input-conv features of the low-dose image itself (``v3``: their local high-pass),
    so it needs no dose label and
    works for dose reduction factors never seen in training. Global pooling makes the latents
    independent of the input size, but they do depend on the window's content: run inference on
    windows the size of the training patches.

    Shapes: ``(B, in_channels, D, H, W) -> [(B, latent_dim)] * len(channels)``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        latent_dim: int,
        reduction: int = 4,
        variant: str = "v3",
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        stages = []
        prev = in_channels
        for ch in channels:
            stages.append(SANStage(prev, ch, latent_dim, reduction, variant, padding_mode))
            prev = ch
        self.stages = nn.ModuleList(stages)
        self.high_pass = variant == "v3"
        if self.high_pass:
            # v2 and v3 weights have the same shapes: this marker tells a v3 checkpoint apart
            # (checkpoint_san_variant) and makes a v3 state strict-load only into a v3 network
            self.register_buffer("high_pass_marker", torch.ones(1))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        latents: List[torch.Tensor] = []
        first = 0  # the stages already run
        if self.high_pass:
            # features minus their 3x3x3 local mean (edge-replicated, whatever the conv padding: this is a
            # statistic, and zero padding would put a false edge at every window face); see SAN_VARIANTS
            front: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
            if not torch.jit.is_scripting() and not torch.is_grad_enabled() and len(self.stages) > 0:
                stage0 = self.stages[0]
                if stage0.down.padding_mode == "replicate":
                    # the high-pass, the first stage's reduction, PReLU and gate mean in one fused CPU pass where it
                    # applies (issue 14: four full-size passes in one; the same function up to float rounding; the
                    # hooks of those sub-modules do not run then)
                    front = _fused_san_front(x, stage0.reduce.weight, stage0.act1.weight)
                    if front is not None:
                        x, latent = stage0.forward_reduced(front[0], front[1])
                        latents.append(latent)
                        first = 1
            if front is None:
                x = high_pass3(x)
        for i, stage in enumerate(self.stages):
            if i >= first:
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

    def __init__(
        self,
        channels: int,
        latent_dim: Optional[int] = None,
        residual_scale_init: float = 0.1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.conv1 = ModulatedConv3d(channels, channels, 3, padding_mode=padding_mode)
        self.act = nn.PReLU(channels)
        self.conv2 = ModulatedConv3d(channels, channels, 3, padding_mode=padding_mode)
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
        # x + r * modconv2(PReLU(modconv1(x, s1)), s2) with the per-channel factors folded together: the
        # demodulation d1 > 0 commutes with PReLU (PReLU(d * a) = d * PReLU(a)), so d1 and conv2's input
        # modulation (1 + s2) are one multiply, and d2 * r rides on the residual add (addcmul): three
        # element-wise passes per block instead of six (issue 14; the same function up to float rounding).
        b = x.shape[0]
        # Without gradients (inference, validation) and with replicate padding, each product is written straight
        # into the next conv's padded input (replicate_pad_product): no interior copy, the same values.
        # Autograd cannot go through those out= products, so training keeps the plain path.
        direct = self.conv1.padding_mode == "replicate" and not torch.is_grad_enabled()
        scale1: Optional[torch.Tensor] = None
        if s1 is not None:
            scale1 = (1.0 + s1).to(x.dtype).reshape(b, self.channels, 1, 1, 1)
        if direct:
            a = self.conv1.conv_padded(padded_input(x, scale1))
        else:
            a = self.conv1.conv_unmodulated(x if scale1 is None else x * scale1)
        mid = self.conv1.demodulation(s1, b)
        if s2 is not None:
            scale2 = (1.0 + s2.float()).reshape(b, self.channels, 1, 1, 1)
            mid = scale2 if mid is None else mid * scale2
        if direct:
            # PReLU, the product and the padding in one pass where the fused CPU kernel applies
            c = self.conv2.conv_padded(padded_input(a, None if mid is None else mid.to(a.dtype), self.act.weight))
        else:
            h = self.act(a)
            if mid is not None:
                h = h * mid.to(h.dtype)
            c = self.conv2.conv_unmodulated(h)
        d2 = self.conv2.demodulation(s2, b)
        k = self.residual_scale if d2 is None else d2 * self.residual_scale
        if direct and c.dtype == x.dtype:
            # into c, which only this block holds (never x: a caller may keep it): a fresh output tensor cost
            # 4.5 instead of 1.4 ms per block (fp32, eight 32^3 windows), the network 1.03-1.07x
            return torch.addcmul(x, c, k.to(c.dtype), out=c)
        return torch.addcmul(x, c, k.to(c.dtype))


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
    information; use windows of at least 16 (``train.json`` trains on 32^3 patches, the published size on 64^3).

    Parameter counts (``use_san=True`` with SAN v2 / v1, ``use_san=False``): default (channels 64, 8
    blocks, latent 256, SAN 32-64-128-256) 2,466,789 / 2,343,909 / 1,774,017; small CPU config
    (channels 16, 4 blocks, latent 64, SAN 16-32-64-64) 109,373 / 98,109 / 56,305.

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
        padding_mode: what every 3x3x3 conv sees beyond a window's faces: ``"zeros"`` (0.2.0: each window
            face looks like a drop to zero activity, so sliding-window outputs sag at every window
            border, a lattice on a flat volume), ``"replicate"`` (the default: a flat region stays flat
            up to the face) or ``"reflect"``. Train and infer with the same mode. It has no parameters,
            so weights load under any mode.
        san_variant: ``"v3"`` (default since 0.4: the SAN reads the local high-pass of the features and
            pools mean and log-std, so its latents follow the noise level more than the anatomy), ``"v2"``
            (0.3: mean and std of the features themselves) or ``"v1"`` (0.2.0; its latents are dead); see
            :data:`SAN_VARIANTS`. A checkpoint loads only into the variant it was trained with (v1 differs
            in the latent heads' shapes, v3 in its ``san.high_pass_marker`` buffer).
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
        padding_mode: str = "replicate",
        san_variant: str = "v3",
    ) -> None:
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if san_variant not in SAN_VARIANTS:
            raise ValueError(f"san_variant must be one of {SAN_VARIANTS}, got {san_variant!r}")
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
        self.padding_mode = padding_mode
        self.san_variant = san_variant
        # constructor arguments, so a copy with another SAN variant can be built (match_checkpoint_san_variant)
        self.init_kwargs = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            num_blocks=num_blocks,
            latent_dim=latent_dim,
            san_channels=san_channels,
            use_san=use_san,
            residual_scale_init=residual_scale_init,
            san_reduction=san_reduction,
            zero_init_output=zero_init_output,
            padding_mode=padding_mode,
            san_variant=san_variant,
        )
        self.global_skip = in_channels == out_channels

        self.input_conv = nn.Conv3d(in_channels, channels, 3, padding=1, padding_mode=padding_mode)
        self.blocks = nn.ModuleList(
            [
                ModulatedResBlock(channels, latent_dim if use_san else None, residual_scale_init, padding_mode)
                for _ in range(num_blocks)
            ]
        )
        self.output_conv = nn.Conv3d(channels, out_channels, 3, padding=1, padding_mode=padding_mode)
        if zero_init_output:
            nn.init.zeros_(self.output_conv.weight)
            nn.init.zeros_(self.output_conv.bias)

        self.san: Optional[StyleAlignmentNetwork] = None
        n_stages = len(san_channels) if use_san else 0
        if use_san:
            self.san = self._build_san(san_reduction)
        # Even spread of blocks over stages; with num_blocks divisible by n_stages this is
        # ceil(num_blocks / n_stages) consecutive blocks per latent, and every latent is always used
        # (an unused stage would break DistributedDataParallel without find_unused_parameters).
        self.latent_index: List[int] = [i * n_stages // num_blocks for i in range(num_blocks)]

    def _build_san(self, san_reduction: int) -> Optional[StyleAlignmentNetwork]:
        """The SAN of a ``use_san`` model, built after the base network. Subclasses whose latents come from elsewhere
        (:mod:`scripts.networks.drf_conditioned`) return None: they keep the style stages and layers, not the SAN."""
        return StyleAlignmentNetwork(
            self.channels, self.san_channels, self.latent_dim, san_reduction, self.san_variant, self.padding_mode
        )

    def _style_latents(self, x: torch.Tensor, feat: torch.Tensor, drf: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """The latent of every style stage for the input ``x`` and its input-conv features ``feat``: the SAN's of
        ``feat`` (``drf`` unused: the label-free model reads the noise itself); empty without a SAN. Subclasses
        take the latents from elsewhere (:mod:`scripts.networks.drf_conditioned`: the DRF label, or hand-made
        statistics of ``x``)."""
        san = self.san
        if san is None:
            return []
        return san(feat)

    def _run(
        self, x: torch.Tensor, keep_features: bool, use_styles: bool = True, drf: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"UniPET expects input (B, {self.in_channels}, D, H, W), got {list(x.shape)}")
        feat = self._input(x)
        latents: List[torch.Tensor] = []
        if use_styles:
            latents = self._style_latents(x, feat, drf)
        features: List[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            latent: Optional[torch.Tensor] = None
            if len(latents) > 0:
                latent = latents[self.latent_index[i]]
            feat = block(feat, latent)
            if keep_features:
                features.append(feat)
        out = self._output(feat)
        if self.global_skip:
            out = out + x
        return out, features

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """The input conv. Without gradients, with one input channel and replicate padding, in eager mode, the fused
        CPU kernel where it applies (:func:`fused_pad.single_channel_conv3_replicate`: oneDNN has no fast kernel for
        one input channel, ~2.5x slower here; the module's own hooks do not run then); the same function up to float
        rounding. Everywhere else the module itself."""
        conv = self.input_conv
        if (
            self.in_channels == 1
            and self.padding_mode == "replicate"
            and not torch.is_grad_enabled()
            and not torch.jit.is_scripting()
        ):
            out = _fused_single_channel(x, conv.weight, conv.bias)
            if out is not None:
                return out
        return conv(x)

    def _output(self, feat: torch.Tensor) -> torch.Tensor:
        """The output conv. Without gradients and with one output channel and replicate padding it runs as a
        depthwise 3x3x3 conv and a channel sum (the same function up to float rounding): a ``C -> 1`` conv3d has
        no fast CPU kernel and cost as much as a full ``C -> C`` layer (issue 14 profile), the depthwise form
        ~1/5 of that. The channel sum accumulates in float32 for bf16/fp16 features (a float32 result)."""
        conv = self.output_conv
        if self.out_channels != 1 or self.padding_mode != "replicate" or torch.is_grad_enabled():
            return conv(feat)
        c = feat.shape[1]
        out = depthwise3(feat, conv.weight.reshape(c, 1, 3, 3, 3), True)
        bias = conv.bias
        if bias is not None:
            out = out + bias.to(out.dtype).reshape(1, 1, 1, 1, 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise ``x`` (B, in_channels, D, H, W), normalised SUV; returns (B, out_channels, D, H, W)."""
        return self._run(x, False)[0]

    @torch.jit.export
    def forward_with_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Prediction plus the BDN feature map after every block (``num_blocks`` tensors of shape (B, C, D, H, W)).

        For the style alignment loss; :meth:`forward` does not keep these maps (saves memory in inference).
        """
        return self._run(x, True)

    @torch.jit.export
    def forward_without_styles(self, x: torch.Tensor) -> torch.Tensor:
        """The base network alone (every style zero), for checking that the styles matter: same shapes as forward."""
        return self._run(x, False, False)[0]

    @torch.jit.export
    def san_latents(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The SAN's latent of every stage, ``len(san_channels)`` tensors ``(B, latent_dim)``, for an input ``x``
        (B, in_channels, D, H, W); empty for ``use_san=False``. For SAN checks and probes."""
        san = self.san
        if san is None:
            return []
        return san(self._input(x))

    @torch.jit.export
    def block_styles(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The style vectors of every block, ``num_blocks`` tensors ``(B, 2 * channels)`` (``s1`` then ``s2``).

        Empty for ``use_san=False``. For monitoring (mean |s|, spread across a batch) and SAN checks.
        """
        if self.san is None:
            return []
        return self._styles(self.san_latents(x))

    def _styles(self, latents: List[torch.Tensor]) -> List[torch.Tensor]:
        """Each block's style vector ``(B, 2 * channels)`` from the stage latents (blocks without style layers: none)."""
        styles: List[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            affine = block.style_affine
            if affine is not None:
                styles.append(affine(latents[self.latent_index[i]]))
        return styles

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


def checkpoint_san_variant(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The SAN variant a UniPET ``state_dict`` was saved from (``"v1"``/``"v2"``/``"v3"``), None without a SAN.

    Told apart by the first latent head's input width: the stage's channels (v1, mean pooling) or twice
    that (v2/v3, mean and std pooling), and v3 by its ``san.high_pass_marker`` buffer. A ``module.``
    prefix is ignored.
    """
    cleaned = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    head = cleaned.get("san.stages.0.to_latent.weight")
    expand = cleaned.get("san.stages.0.expand.weight")
    if head is None or expand is None:
        return None
    if int(head.shape[1]) != 2 * int(expand.shape[0]):
        return "v1"
    return "v3" if "san.high_pass_marker" in cleaned else "v2"


def match_checkpoint_san_variant(net: "UniPET", state_dict: Mapping[str, Any]) -> "UniPET":
    """``net`` itself, or a fresh copy built for the checkpoint's SAN variant when they differ (logged).

    For tools that build the network from ``configs/train.json`` (v3 since 0.4) and load weights that
    may come from an earlier version (0.2.0's v1 weights, 0.3.0 runs' v2); every other setting is kept.
    """
    variant = checkpoint_san_variant(state_dict)
    if variant is None or not isinstance(net, UniPET) or variant == net.san_variant:
        return net
    logger.info(
        "checkpoint holds a SAN %s; building the network with san_variant=%s (config: %s)",
        variant,
        variant,
        net.san_variant,
    )
    device = next(net.parameters()).device
    return UniPET(**{**net.init_kwargs, "san_variant": variant}).to(device).train(net.training)
