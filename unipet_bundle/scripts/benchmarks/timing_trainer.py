"""One UniPET training step to time: the synthetic batch and the one-iteration trainer that the training-speed,
precision and GPU benchmarks time in the same way (stage 1 or the joint stage-2 step, no data loading)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from scripts.engines.gan_trainer import UniPETTrainer
from scripts.losses.align import StyleAlignmentLoss
from scripts.losses.rals import RALSCriticLoss, RALSGeneratorLoss, normalised_threshold, stylized_mask
from scripts.networks.critic import PatchCritic

__all__ = ["TRAINER_SETTINGS", "synthetic_batch", "timing_trainer", "training_step"]

TRAINER_SETTINGS = (
    "critic_channels",
    "patch_size",
    "batch_size",
    "num_samples",
    "suv_max",
    "rals_threshold_suv2",
    "align_weight",
    "adv_weight",
    "regional_loss",
    "regional_weight",
)
"""The training-config keys :func:`synthetic_batch` and :func:`timing_trainer` read (the losses a step computes
are the config's: e.g. ``train.json`` has no L_align but a regional SUV loss)."""


def synthetic_batch(
    settings: Mapping[str, Any], device: torch.device | str, seed: int | None = None
) -> dict[str, torch.Tensor]:
    """A training batch of ``batch_size * num_samples`` random patches (normalised SUV, ``image`` 0-0.3 and a
    slightly noisier ``label``), shapes (N, 1, *patch_size): timing needs the sizes, not the content. ``seed``
    draws it from its own CPU generator (the same batch on every run); None draws from torch's global RNG on
    ``device``."""
    n = int(settings["batch_size"]) * int(settings["num_samples"])
    shape = (n, 1, *settings["patch_size"])
    if seed is None:
        low = torch.rand(shape, device=device) * 0.3
        return {"image": low, "label": (low + 0.05 * torch.randn_like(low)).clamp_min(0)}
    rng = torch.Generator().manual_seed(int(seed))
    low = torch.rand(shape, generator=rng) * 0.3
    label = (low + 0.05 * torch.randn(low.shape, generator=rng)).clamp_min(0)
    return {"image": low.to(device), "label": label.to(device)}


def timing_trainer(
    generator: torch.nn.Module,
    settings: Mapping[str, Any],
    device: torch.device | str,
    batch: Mapping[str, torch.Tensor],
    precision: str = "fp32",
) -> UniPETTrainer:
    """A :class:`UniPETTrainer` of one iteration per stage on ``batch``, with a fresh critic of the config's
    ``critic_channels``, the RALS mask at its threshold and the config's loss weights and regional loss (the
    :data:`TRAINER_SETTINGS` in ``settings``); ``precision`` as ``train.json``'s."""
    critic = PatchCritic(channels=tuple(settings["critic_channels"])).to(device)
    thr = normalised_threshold(settings["rals_threshold_suv2"], settings["suv_max"])
    return UniPETTrainer(
        device=device,
        max_epochs=1,
        epoch_length=1,
        train_data_loader=[batch],
        generator=generator,
        g_optimizer=torch.optim.AdamW(generator.parameters(), lr=1e-4),
        critic=critic,
        d_optimizer=torch.optim.AdamW(critic.parameters(), lr=1e-4, betas=(0.9, 0.99)),
        stage1_iterations=1,
        align_loss=StyleAlignmentLoss(),
        critic_loss=RALSCriticLoss(),
        adv_loss=RALSGeneratorLoss(),
        mask_fn=lambda x: stylized_mask(x, threshold=thr),
        align_weight=float(settings["align_weight"]),
        adv_weight=float(settings["adv_weight"]),
        regional_loss=settings["regional_loss"],
        regional_weight=float(settings["regional_weight"]),
        critic_pretrain_iterations=0,
        precision=precision,
    )


def training_step(trainer: UniPETTrainer, batch: Mapping[str, torch.Tensor], iteration: int) -> Callable[[], None]:
    """One training step at ``iteration`` (1: stage 1; 2: the joint stage-2 step, as ``stage1_iterations`` is 1
    and there is no critic pre-training), as a function to time."""

    def step() -> None:
        trainer.state.iteration = iteration
        trainer._iteration(trainer, batch)

    return step
