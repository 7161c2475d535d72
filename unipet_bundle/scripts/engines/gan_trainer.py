"""Two-stage UniPET training as one Ignite engine.

MONAI's GanTrainer feeds random latents to the generator and its AdversarialTrainer shows the critic the
*inputs* as real; neither fits paired low-dose -> full-dose denoising, so this trainer overrides
``_iteration`` itself (as the model zoo's generative bundles do).

Both stages live in one engine so that a single checkpoint chain resumes anywhere, across the stage
boundary included:

* stage 1 (iterations ``1 .. stage1_iterations``): the base denoising network alone, L1 loss, SAN off
  (style all zero), critic untouched;
* stage 2 (the rest): SAN on, generator loss ``L1 + align_weight * L_align + adv_weight * L_adv`` with the
  region-aware (RALS) masked WGAN-GP critic; the first ``critic_pretrain_iterations`` of stage 2 train the
  critic alone against the frozen stage-1 generator (the reference code's critic pre-training, done right),
  then ``n_critic`` critic steps per generator step.

Ablations of stage 2: ``adv_weight=0`` trains no critic and skips the pre-training ("SAN alone");
``train_san=False`` with ``align_weight=0`` keeps the SAN at zero style ("RALS alone").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

from scripts.engines.precision import autocast, config_precision, resolve_precision
from scripts.inference.options import as_bool

__all__ = ["UniPETTrainer", "FeatureTap", "loss_terms", "prepare_paired_batch"]


class FeatureTap(nn.Module):
    """Wraps a UniPET generator so that ``forward`` returns ``(pred, block_features)``.

    DistributedDataParallel only synchronises gradients of what runs through its own ``forward``; the
    style-alignment loss needs the per-block features, so the trainer calls this wrapper (possibly wrapped
    in DDP) instead of ``generator.forward_with_features`` directly.
    """

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.generator.forward_with_features(x)


def prepare_paired_batch(
    batchdata: dict[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-dose ``image``, full-dose ``label``) as float tensors on ``device``, shapes (B, 1, X, Y, Z)."""
    low = batchdata[Keys.IMAGE].to(device=device, non_blocking=non_blocking, dtype=torch.float32)
    full = batchdata[Keys.LABEL].to(device=device, non_blocking=non_blocking, dtype=torch.float32)
    return low.as_tensor() if hasattr(low, "as_tensor") else low, full.as_tensor() if hasattr(full, "as_tensor") else full


def loss_terms(output: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a trainer output (``loss``, every loss term, ``stage``), for Stats/TensorBoard handlers."""
    return {k: float(v) for k, v in output.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "module"):  # DistributedDataParallel / DataParallel
        module = module.module
    return module


class UniPETTrainer(Trainer):
    """Ignite trainer for UniPET (stage 1: BDN with L1; stage 2: SAN + style alignment + RALS critic).

    Args:
        device: where the networks run.
        max_epochs: total epochs of both stages.
        train_data_loader: yields dicts with ``image`` (low dose) and ``label`` (full dose), each
            (B, 1, X, Y, Z) in normalised SUV (SUV clipped to [0, 20] / 20).
        generator: the UniPET generator (``scripts.networks.unipet.UniPET``; may be DDP-wrapped).
        g_optimizer: optimiser over the generator's parameters (BDN and SAN; parameters without a gradient
            in stage 1 are skipped by Adam-type optimisers).
        critic: the patch critic; may be None when ``stage1_iterations`` covers the whole run.
        d_optimizer: optimiser of the critic (None with ``critic`` None).
        feature_tap: ``FeatureTap(generator)``, possibly DDP-wrapped; built here when not given.
        stage1_iterations: iterations of stage 1 (L1 only). 0 starts directly in stage 2 (load stage-1
            weights into the generator first).
        align_loss: ``StyleAlignmentLoss``; with ``align_weight`` its weight in the generator loss.
        critic_loss: ``RALSCriticLoss`` (masked WGAN-GP); ``adv_loss``: ``RALSGeneratorLoss``.
        mask_fn: maps the full-dose batch to the RALS stylized-region mask (same shape, {0, 1}).
        align_weight, adv_weight, l1_weight: loss weights (reference: 0.001, 0.001, 1).
        n_critic: critic steps per generator step in stage 2.
        critic_pretrain_iterations: stage-2 iterations at the start that train the critic alone.
        train_san: train the SAN in stage 2 (the method). False keeps it frozen at its zero style, so stage 2
            fine-tunes the plain base network (the "RALS alone" ablation, with ``align_weight`` 0).
            ``adv_weight`` 0 trains no critic (the "SAN alone" ablation).
        precision: ``"fp32"`` or ``"bf16"``: bf16 autocast of the networks (CPU or CUDA); weights, optimiser
            state and losses stay float32. Falls back to fp32, with one log line, on hardware without native
            bf16 (``scripts.engines.precision.resolve_precision``). :attr:`precision` is what runs.
        mixed_precision: deprecated (before ``precision``): None (default) defers to ``precision``; True/False
            keeps its old meaning and overrides ``precision``: bf16 autocast on CUDA, fp32 on the CPU.
        epoch_length, non_blocking, prepare_batch, iteration_update, postprocessing, key_train_metric,
        additional_metrics, metric_cmp_fn, train_handlers, decollate: as in ``monai.engines.SupervisedTrainer``.

    The engine output holds ``image``, ``label``, ``pred`` and ``loss`` plus every loss term
    (``loss_l1``, ``loss_align``, ``loss_adv``, ``loss_critic``, ``critic_wdist``, ``critic_gp``), and
    ``stage``, so StatsHandler/TensorBoardStatsHandler can log each of them.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        generator: nn.Module,
        g_optimizer: Optimizer,
        critic: nn.Module | None = None,
        d_optimizer: Optimizer | None = None,
        feature_tap: nn.Module | None = None,
        stage1_iterations: int = 0,
        align_loss: Callable | None = None,
        critic_loss: Callable | None = None,
        adv_loss: Callable | None = None,
        mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        l1_weight: float = 1.0,
        align_weight: float = 1e-3,
        adv_weight: float = 1e-3,
        n_critic: int = 1,
        critic_pretrain_iterations: int = 0,
        train_san: bool = True,
        precision: str = "fp32",
        mixed_precision: bool | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_paired_batch,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        train_handlers: Sequence | None = None,
        decollate: bool = False,
    ) -> None:
        kwargs: dict[str, Any] = {}
        if metric_cmp_fn is not None:
            kwargs["metric_cmp_fn"] = metric_cmp_fn
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=False,  # bf16 autocast needs no GradScaler; handled below
            decollate=decollate,
            **kwargs,
        )
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        total = max_epochs * (self.state.epoch_length or 0)
        if stage1_iterations < total and (critic is None or d_optimizer is None or critic_loss is None or adv_loss is None):
            raise ValueError(
                f"stage 2 runs for {total - stage1_iterations} iterations but critic, d_optimizer, critic_loss or "
                "adv_loss is missing: give them, or set stage1_iterations >= max_epochs * epoch_length"
            )
        self.generator = generator
        self.feature_tap = feature_tap if feature_tap is not None else FeatureTap(generator)
        self.g_optimizer = g_optimizer
        self.critic = critic
        self.d_optimizer = d_optimizer
        self.stage1_iterations = int(stage1_iterations)
        self.align_loss = align_loss
        self.critic_loss = critic_loss
        self.adv_loss = adv_loss
        self.mask_fn = mask_fn
        self.l1_weight = float(l1_weight)
        self.align_weight = float(align_weight)
        self.adv_weight = float(adv_weight)
        self.n_critic = int(n_critic)
        self.critic_pretrain_iterations = int(critic_pretrain_iterations)
        self.train_san = as_bool(train_san, "train_san")
        device_type = torch.device(device).type
        # mixed_precision (deprecated) True/False keeps its old meaning and wins over precision
        self.precision = resolve_precision(config_precision(precision, mixed_precision, device), device)
        self.mixed_precision = self.precision == "bf16"
        self._device_type = device_type
        self._san_enabled: bool | None = None

    # -- helpers -------------------------------------------------------------------------------------
    def stage_of(self, iteration: int) -> int:
        """1 or 2 for a 1-based iteration number."""
        return 1 if iteration <= self.stage1_iterations else 2

    def _autocast(self):
        return autocast(self.precision, self._device_type)

    def _set_san(self, enabled: bool) -> None:
        """Freeze (stage 1) or train (stage 2) the SAN and its per-block style layers.

        The style layers are zero-initialised, so a frozen SAN contributes a style of exactly zero and the
        generator is the plain base network in stage 1, in training and in validation alike.
        """
        net = _unwrap(self.generator)
        if enabled == self._san_enabled or not hasattr(net, "san_parameters"):
            return
        for p in net.san_parameters():
            p.requires_grad_(enabled)
        self._san_enabled = enabled

    # -- one iteration -------------------------------------------------------------------------------
    def _iteration(self, engine: UniPETTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        low, full = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.state.output = output = {Keys.IMAGE: low, Keys.LABEL: full}
        stage = engine.stage_of(engine.state.iteration)
        output["stage"] = stage
        engine.generator.train()
        if stage == 1:
            engine._set_san(False)
            engine.g_optimizer.zero_grad(set_to_none=True)
            with engine._autocast():
                # through the feature tap: under DDP it is the one wrapper that synchronises gradients
                pred, _ = engine.feature_tap(low)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                l1 = torch.nn.functional.l1_loss(pred.float(), full)
            loss = engine.l1_weight * l1
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.g_optimizer.step()
            output.update({Keys.PRED: pred.detach(), Keys.LOSS: loss.item(), "loss_l1": l1.item()})
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
            return output

        engine._set_san(engine.train_san)
        mask = engine.mask_fn(full) if engine.mask_fn is not None else torch.ones_like(full)
        output["mask_fraction"] = mask.float().mean().item()
        # adv_weight 0 (the "SAN alone" ablation): the critic could not influence the generator, so none is trained
        adversarial = engine.adv_weight > 0
        if adversarial:
            engine.critic.train()
            with torch.no_grad(), engine._autocast():
                fake = engine.generator(low).float()
            for _ in range(engine.n_critic):
                engine.d_optimizer.zero_grad(set_to_none=True)
                with engine._autocast():
                    d_loss, terms = engine.critic_loss(engine.critic, full, fake, mask)
                d_loss.backward()
                engine.d_optimizer.step()
            output["loss_critic"] = d_loss.item()
            output.update({f"critic_{k}": float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()})

        stage2_iteration = engine.state.iteration - engine.stage1_iterations
        if adversarial and stage2_iteration <= engine.critic_pretrain_iterations:
            # critic pre-training: the generator is frozen and shows the critic its current output
            output.update({Keys.PRED: fake, Keys.LOSS: d_loss.item()})
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
            return output

        engine.g_optimizer.zero_grad(set_to_none=True)
        # The critic is a fixed judge for the generator step: frozen, and called unwrapped so that a DDP
        # critic does not wait for gradients that this step never produces.
        judge = _unwrap(engine.critic)
        for p in judge.parameters():
            p.requires_grad_(False)
        try:
            with engine._autocast():
                pred, feats_low = engine.feature_tap(low)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                pred = pred.float()
                l1 = torch.nn.functional.l1_loss(pred, full)
                if engine.align_loss is not None and engine.align_weight > 0:
                    with torch.no_grad():
                        _, feats_full = engine.feature_tap(full)
                    align = engine.align_loss(feats_low, feats_full)
                else:
                    align = torch.zeros((), device=pred.device)
                adv = engine.adv_loss(judge, pred, mask) if adversarial else torch.zeros((), device=pred.device)
                loss = engine.l1_weight * l1 + engine.align_weight * align + engine.adv_weight * adv
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.g_optimizer.step()
        finally:
            for p in judge.parameters():
                p.requires_grad_(True)
        output.update(
            {
                Keys.PRED: pred.detach(),
                Keys.LOSS: loss.item(),
                "loss_l1": l1.item(),
                "loss_align": float(align.detach()),
                "loss_adv": float(adv.detach()),
            }
        )
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output
