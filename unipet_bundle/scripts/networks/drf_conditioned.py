"""UniPET variants that are told, or read differently, what the label-free SAN must infer: three research variants.

UniPET's style alignment network (SAN) reads the noise of each window through a learned encoder. The first two
replace the SAN by a small MLP of one or two numbers, keeping every other part (base network, per-block style
layers, losses, training recipe); the third keeps UniPET whole and puts the DRF in by the physics of the data:

* :class:`DRFConditionedUniPET`, the "label given" upper bound: the MLP reads the dose reduction factor. It
  answers how much of what a dose-aware network could do the label-free SAN reaches.
* :class:`NoiseConditionedUniPET`, label-free: the MLP reads two hand-made statistics of the window itself
  (:func:`window_noise_features`: log std of a high-pass, log mean; the hand-made features ``san_noise_probe``
  compares the SAN with). It asks whether a fixed, simple noise reading steers the same network better than the
  learned SAN.
* :class:`ThinningBlendUniPET`, DRF given: UniPET's output blended with ``1/DRF`` of its input, the share of the
  full dose's counts a thinned low dose holds; the network under it estimates the noise-free full dose, label-free.

The DRF-given ones are not products: inference needs the study's DRF, which a clinical series does not carry
reliably, so ``configs/inference.json`` never builds them (the quality benchmark runs them with the test volume's
true DRF, through :class:`FixedDRF`).
"""

# No ``from __future__ import annotations``: UniPET's methods stay TorchScript-compatible.
import math
from collections.abc import Mapping
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from .unipet import UniPET, high_pass3

__all__ = [
    "StyleMLP",
    "DRFStyleEncoder",
    "window_noise_features",
    "ConditionedStylesUniPET",
    "DRFConditionedUniPET",
    "NoiseConditionedUniPET",
    "ThinningBlendUniPET",
    "drf_per_item",
    "FixedDRF",
]


class StyleMLP(nn.Module):
    """An MLP from a few numbers per input to one latent per style stage (FiLM conditioning).

    Two hidden layers, then a linear head per stage with the same LeakyReLU as the SAN's latents, so the
    per-block style layers see latents of the same kind.

    Shapes: ``(B, n_inputs) -> [(B, latent_dim)] * n_latents``.
    """

    def __init__(self, n_inputs: int, n_latents: int, latent_dim: int, hidden: int = 64) -> None:
        super().__init__()
        if min(n_inputs, n_latents, latent_dim, hidden) < 1:
            raise ValueError(
                f"n_inputs, n_latents, latent_dim and hidden must be >= 1, got {n_inputs}, {n_latents}, "
                f"{latent_dim}, {hidden}"
            )
        self.body = nn.Sequential(
            nn.Linear(n_inputs, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2)
        )
        self.heads = nn.ModuleList([nn.Linear(hidden, latent_dim) for _ in range(n_latents)])
        self.latent_act = nn.LeakyReLU(0.2)

    def forward(self, u: torch.Tensor) -> List[torch.Tensor]:
        h = self.body(u.float())
        return [self.latent_act(head(h)) for head in self.heads]


class DRFStyleEncoder(StyleMLP):
    """:class:`StyleMLP` of the dose reduction factor.

    The DRF enters as ``u = log(drf / reference_drf) / log(span_drf / reference_drf)`` (0 at DRF 4, 1 at
    DRF 100 with the defaults): noise grows as ``sqrt(drf)``, so the log is the natural scale, and
    ``u`` keeps the training range near [0, 1].

    Shapes: ``drf (B,)`` (DRF > 0, dimensionless) ``-> [(B, latent_dim)] * n_latents``.
    """

    def __init__(
        self,
        n_latents: int,
        latent_dim: int,
        hidden: int = 64,
        reference_drf: float = 4.0,
        span_drf: float = 100.0,
    ) -> None:
        super().__init__(1, n_latents, latent_dim, hidden)
        if not (reference_drf > 0 and span_drf > reference_drf):
            raise ValueError(f"need 0 < reference_drf < span_drf, got {reference_drf} and {span_drf}")
        self.log_reference = math.log(float(reference_drf))
        self.log_span = math.log(float(span_drf)) - self.log_reference

    def forward(self, drf: torch.Tensor) -> List[torch.Tensor]:  # type: ignore[override]
        return super().forward((torch.log(drf.float().reshape(-1, 1)) - self.log_reference) / self.log_span)


def window_noise_features(x: torch.Tensor) -> torch.Tensor:
    """Two label-free statistics of each window: ``log`` of the standard deviation of its local high-pass (the
    window minus its 3x3x3 local mean: mostly noise, little anatomy) and ``log`` of its mean (PET noise grows with
    the activity), each floored at 1e-4 (normalised SUV; 0.002 SUV) so that air stays finite.

    Shapes: ``(B, 1, D, H, W)`` normalised SUV ``-> (B, 2)`` float32.
    """
    x = x.float()
    high_pass = high_pass3(x).flatten(1)
    std = high_pass.std(dim=1, correction=0)
    mean = x.flatten(1).mean(dim=1)
    return torch.stack([torch.log(std.clamp_min(1e-4)), torch.log(mean.clamp_min(1e-4))], dim=1)


def drf_per_item(drf: Optional[torch.Tensor], n: int, device: torch.device, needed_by: str) -> torch.Tensor:
    """The DRF of each of ``n`` inputs as a float32 tensor ``(n,)`` on ``device``, from ``drf`` (``(n,)``, or one
    value for all: a sliding window runs several windows of one volume at once). Raises ValueError when it is
    missing (never a silent fallback: a path that forgot to pass the DRF would give plausible, wrong output), not
    one per input, or not > 0; ``needed_by`` names the network in that message."""
    if drf is None:
        raise ValueError(
            f"{needed_by} needs the DRF of its input (forward(x, drf)); run it through FixedDRF, or train and "
            "validate it with network_takes_drf (configs/train.json)"
        )
    drf = torch.as_tensor(drf, dtype=torch.float32, device=device).reshape(-1)
    if drf.numel() == 1:
        drf = drf.expand(n)
    if drf.numel() != n or not bool(torch.all(drf > 0)):
        raise ValueError(f"drf must hold one DRF > 0 per input (or one for all {n}), got {drf.tolist()}")
    return drf


class ConditionedStylesUniPET(UniPET):
    """UniPET whose style latents come from a :class:`StyleMLP` (attribute ``encoder_name``) instead of the SAN.

    Same base network and per-block style layers as :class:`~scripts.networks.unipet.UniPET` (``use_san=True``;
    the zero-initialised style layers make a fresh model exactly its stage-1 base network). A stage-1 checkpoint
    of either model loads with :meth:`load_bdn_state_dict` (a UniPET checkpoint's SAN weights are dropped: this
    model has no SAN). Subclasses build the encoder and say what it reads (:meth:`_style_latents`).

    Args:
        Every argument is UniPET's (``use_san`` is always on: the style layers are what is conditioned; the SAN
        settings a training config passes are ignored, ``san_channels`` only sets how many style stages there are).
    """

    takes_drf = False  # whether training and validation must hand it each item's DRF (train.json: network_takes_drf)
    encoder_name = ""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 64,
        num_blocks: int = 8,
        latent_dim: int = 256,
        san_channels: Sequence[int] = (32, 64, 128, 256),
        residual_scale_init: float = 0.1,
        zero_init_output: bool = True,
        padding_mode: str = "replicate",
        **unused: Any,
    ) -> None:
        # the training config passes UniPET's SAN settings too; they have no meaning here
        unused.pop("use_san", None), unused.pop("san_variant", None), unused.pop("san_reduction", None)
        if unused:
            raise TypeError(f"{type(self).__name__} got unknown arguments {sorted(unused)}")
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            num_blocks=num_blocks,
            latent_dim=latent_dim,
            san_channels=san_channels,
            use_san=True,
            residual_scale_init=residual_scale_init,
            zero_init_output=zero_init_output,
            padding_mode=padding_mode,
        )

    def _build_san(self, san_reduction: int) -> None:  # type: ignore[override]
        return None  # the style latents come from the subclass's encoder

    def _is_san_key(self, name: str) -> bool:  # type: ignore[override]
        return name.startswith(self.encoder_name + ".") or ".style_affine." in name

    def load_bdn_state_dict(self, state_dict: Mapping[str, Any]) -> List[str]:
        """Load a stage-1 (or any UniPET) checkpoint's base network; a UniPET's SAN weights are left out."""
        kept = {k: v for k, v in state_dict.items() if not k.removeprefix("module.").startswith("san.")}
        return super().load_bdn_state_dict(kept)


class DRFConditionedUniPET(ConditionedStylesUniPET):
    """UniPET with its styles from the DRF label instead of the SAN: the "label given" (FiLM) upper bound.

    The latents come from :class:`DRFStyleEncoder` of the DRF passed to :meth:`forward`.

    Units: input and output normalised SUV, as UniPET; ``drf`` dimensionless (> 0).

    Shapes: ``x (B, in_channels, D, H, W)``, ``drf (B,)`` or one value for the whole batch (a sliding window
    runs several windows of one volume at once) ``-> (B, out_channels, D, H, W)``. Without ``drf`` it raises
    ValueError; :meth:`forward_without_styles` is the base network with zero styles.

    Args:
        drf_hidden: width of the DRF encoder's hidden layers.
        reference_drf, span_drf: the DRFs mapped to 0 and 1 on the encoder's log scale.
        Every other argument is :class:`ConditionedStylesUniPET`'s.
    """

    takes_drf = True
    encoder_name = "drf_encoder"

    def __init__(
        self, *args: Any, drf_hidden: int = 64, reference_drf: float = 4.0, span_drf: float = 100.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.drf_encoder = DRFStyleEncoder(len(self.san_channels), self.latent_dim, drf_hidden, reference_drf, span_drf)

    def _style_latents(self, x: torch.Tensor, feat: torch.Tensor, drf: Optional[torch.Tensor]) -> List[torch.Tensor]:
        return self.drf_encoder(drf_per_item(drf, feat.shape[0], feat.device, type(self).__name__))

    def forward(self, x: torch.Tensor, drf: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        """Denoise ``x`` (B, in_channels, D, H, W), normalised SUV, at dose reduction factor(s) ``drf``."""
        return self._run(x, False, True, drf)[0]

    def forward_with_features(self, x: torch.Tensor, drf: Optional[torch.Tensor] = None):  # type: ignore[override]
        """Prediction plus the base network's feature map after every block (the trainer's feature tap)."""
        return self._run(x, True, True, drf)

    def block_styles(self, x: torch.Tensor, drf: Optional[torch.Tensor] = None) -> List[torch.Tensor]:  # type: ignore[override]
        """The style vectors of every block for the DRF(s) ``drf``; ``x`` sets the batch size."""
        return self._styles(self._style_latents(x, x, drf))


class NoiseConditionedUniPET(ConditionedStylesUniPET):
    """Label-free UniPET whose styles come from two hand-made statistics of each input window, not the SAN.

    The latents come from a :class:`StyleMLP` of :func:`window_noise_features` (log std of the window's local
    high-pass, log mean), computed from the network's own input: like UniPET it needs no DRF, so it runs through
    the bundle's inference and training unchanged.

    Units: input and output normalised SUV. Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)``.

    Args:
        noise_hidden: width of the encoder's hidden layers.
        Every other argument is :class:`ConditionedStylesUniPET`'s.
    """

    encoder_name = "noise_encoder"

    def __init__(self, *args: Any, noise_hidden: int = 64, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_encoder = StyleMLP(2, len(self.san_channels), self.latent_dim, noise_hidden)

    def _style_latents(self, x: torch.Tensor, feat: torch.Tensor, drf: Optional[torch.Tensor]) -> List[torch.Tensor]:
        return self.noise_encoder(window_noise_features(x[:, :1]))

    def block_styles(self, x: torch.Tensor) -> List[torch.Tensor]:  # type: ignore[override]
        """The style vectors of every block for the windows ``x`` (B, 1, D, H, W)."""
        return self._styles(self._style_latents(x, x, None))


class ThinningBlendUniPET(UniPET):
    """UniPET (label-free SAN and all) whose correction is scaled by ``1 - 1/DRF``: the output is
    ``x / DRF + (1 - 1 / DRF) * unipet(x)``, for a DRF that is known.

    Why: paired low-dose data are made by thinning the full-dose counts (list-mode subsampling; the simulator does
    the same), so the full dose is the low dose's own counts plus independent ones with ``1 - 1/DRF`` of the expected
    total, and its mean given the low dose is ``x / DRF + (1 - 1/DRF) * E[noise-free full dose | x]``: exactly so in
    the counts, approximately after the (not linear) reconstruction. The blend puts that part in by the physics, so
    the network under it has one target at every DRF, the noise-free full dose, which it can estimate from the noise
    it sees (the SAN) without knowing the DRF; the label enters only through the blend, never through learned
    weights, so it means the same on any reconstruction (unlike :class:`DRFConditionedUniPET`, whose learned use of
    the label did not carry over to an unseen reconstruction).
    Not a label-free model: the output needs the DRF.

    Same parameters and state dict as :class:`~scripts.networks.unipet.UniPET` (a UniPET checkpoint and training
    state load as they are). Units: normalised SUV in and out; ``drf`` dimensionless (> 0).

    Shapes: ``x (B, in_channels, D, H, W)`` with ``in_channels == out_channels``, ``drf (B,)`` or one value for the
    whole batch ``-> (B, out_channels, D, H, W)``. Without ``drf`` it raises ValueError.
    """

    takes_drf = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.global_skip:
            raise ValueError(
                "ThinningBlendUniPET blends its output with its input: in_channels must equal out_channels"
            )

    def _blend(self, x: torch.Tensor, out: torch.Tensor, drf: Optional[torch.Tensor]) -> torch.Tensor:
        keep = 1.0 / drf_per_item(drf, x.shape[0], x.device, type(self).__name__)
        keep = keep.reshape(-1, *([1] * (x.dim() - 1))).to(out.dtype)
        return out + keep * (x.to(out.dtype) - out)

    def forward(self, x: torch.Tensor, drf: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        """Denoise ``x`` (B, in_channels, D, H, W), normalised SUV, at dose reduction factor(s) ``drf``."""
        return self._blend(x, self._run(x, False)[0], drf)

    def forward_with_features(self, x: torch.Tensor, drf: Optional[torch.Tensor] = None):  # type: ignore[override]
        """The blended prediction plus the network's feature map after every block (the trainer's feature tap)."""
        out, features = self._run(x, True)
        return self._blend(x, out, drf), features

    def block_styles(self, x: torch.Tensor, drf: Optional[torch.Tensor] = None) -> List[torch.Tensor]:  # type: ignore[override]
        """The SAN's style vectors for ``x`` (the DRF does not enter them)."""
        return super().block_styles(x)

    def forward_without_styles(self, x: torch.Tensor, drf: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        """The base network with zero styles, blended the same way (so it too needs the DRF: never a silent,
        unblended output)."""
        return self._blend(x, self._run(x, False, False)[0], drf)


class FixedDRF(nn.Module):
    """A network that takes the DRF (:class:`DRFConditionedUniPET`, :class:`ThinningBlendUniPET`) run at one known
    DRF, so it takes ``forward(x)`` like every other network (the inference path, the quality benchmark's per-DRF
    models). Shapes as the wrapped network's."""

    def __init__(self, network: nn.Module, drf: float) -> None:
        super().__init__()
        if not float(drf) > 0:
            raise ValueError(f"drf must be > 0, got {drf}")
        self.network = network
        self.register_buffer("drf", torch.tensor([float(drf)]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x, self.drf)
