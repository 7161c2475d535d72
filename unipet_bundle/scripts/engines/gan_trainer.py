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

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

from scripts.common.errors import TrainingDivergedError
from scripts.common.options import as_bool, finite_number
from scripts.common.weights import unwrap as _unwrap  # the one DDP/DataParallel unwrap
from scripts.engines.batches import batch_drfs, prepare_paired_batch
from scripts.engines.precision import autocast, config_precision, resolve_precision

__all__ = [
    "UniPETTrainer",
    "FeatureTap",
    "StageClock",
    "TwoStageLR",
    "generator_param_groups",
    "style_statistics",
    "loss_terms",
    "prepare_paired_batch",
]

logger = logging.getLogger(__name__)


class FeatureTap(nn.Module):
    """Wraps a UniPET generator so that ``forward`` returns ``(pred, block_features)``.

    DistributedDataParallel only synchronises gradients of what runs through its own ``forward``; the
    style-alignment loss needs the per-block features, so the trainer calls this wrapper (possibly wrapped
    in DDP) instead of ``generator.forward_with_features`` directly.
    """

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # kwargs: the generator's other inputs (the DRF of a DRF-conditioned network); none for UniPET
        return self.generator.forward_with_features(x, **kwargs)


def loss_terms(output: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a trainer output (``loss``, every loss term, the learning rates, ``stage``), for
    Stats/TensorBoard handlers. See :class:`UniPETTrainer` for the names."""
    return {k: float(v) for k, v in output.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class StageClock:
    """The one source of the stage boundary: iterations ``1 .. stage1_iterations`` are stage 1, the rest stage 2.

    The trainer, the learning-rate schedule (:class:`TwoStageLR`) and the best-checkpoint saver
    (``StageBestCheckpoint``) all ask this object, so they cannot disagree about which stage the
    weights are in (0.2.0 split by iterations in the trainer and by epochs in the saver). The trainer
    sets :attr:`iteration` at every iteration; :attr:`stage` is the stage of the weights as they are now.
    """

    def __init__(self, stage1_iterations: int) -> None:
        if int(stage1_iterations) < 0:
            raise ValueError(f"stage1_iterations must be >= 0, got {stage1_iterations}")
        self.stage1_iterations = int(stage1_iterations)
        self.iteration = 0

    def stage_of(self, iteration: int) -> int:
        """1 or 2 for a 1-based iteration number."""
        return 1 if iteration <= self.stage1_iterations else 2

    @property
    def stage(self) -> int:
        """The stage of the last iteration run (1 before any)."""
        return self.stage_of(max(self.iteration, 1))


def generator_param_groups(
    generator: nn.Module, learning_rate: float, stage2_learning_rate: float, san_learning_rate: float
) -> list[dict[str, Any]]:
    """Optimiser parameter groups: the base network (``bdn``) and the SAN with the style layers (``san``).

    Each group carries its peak learning rate per stage (``stage1_lr``, ``stage2_lr``), which
    :class:`TwoStageLR` reads: the BDN learns at ``learning_rate`` in stage 1 and fine-tunes at
    ``stage2_learning_rate``; the SAN and the zero-initialised style layers, new in stage 2, get their own
    ``san_learning_rate`` (they must move from zero within stage 2). A generator without a SAN gives one group.
    """
    net = _unwrap(generator)
    san_ids = {id(p) for p in net.san_parameters()} if hasattr(net, "san_parameters") else set()
    bdn = [p for p in net.parameters() if id(p) not in san_ids]
    san = [p for p in net.parameters() if id(p) in san_ids]
    groups = [
        {
            "params": bdn,
            "lr": float(learning_rate),
            "name": "bdn",
            "stage1_lr": float(learning_rate),
            "stage2_lr": float(stage2_learning_rate),
        }
    ]
    if san:
        groups.append(
            {
                "params": san,
                "lr": float(san_learning_rate),
                "name": "san",
                "stage1_lr": float(san_learning_rate),
                "stage2_lr": float(san_learning_rate),
            }
        )
    return groups


class TwoStageLR(torch.optim.lr_scheduler.LRScheduler):
    """Per-iteration learning rate with a fresh schedule for stage 2 (step it every iteration).

    Stage 1: cosine from each group's ``stage1_lr`` down to ``min_ratio`` of it over the stage. Stage 2
    restarts: after ``stage2_offset`` iterations (the critic pre-training, when the generator does not
    step) a linear warm-up over ``stage2_warmup`` iterations to each group's ``stage2_lr``, then cosine to
    ``min_ratio`` of it at the end of training. 0.2.0 ran one cosine over both stages, so the
    zero-initialised style layers started at a fraction of the rate and decayed to 5 %.

    Args:
        optimizer: with groups from :func:`generator_param_groups` (groups without ``stage1_lr`` /
            ``stage2_lr`` use their initial ``lr`` for both).
        stage_clock: the :class:`StageClock` the trainer uses.
        total_iterations: iterations of the whole run (both stages).
        stage2_warmup: warm-up iterations of stage 2.
        stage2_offset: stage-2 iterations before the generator's first step (critic pre-training).
        min_ratio: the final fraction of each peak.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        stage_clock: StageClock,
        total_iterations: int,
        stage2_warmup: int = 50,
        stage2_offset: int = 0,
        min_ratio: float = 0.05,
        last_epoch: int = -1,
    ) -> None:
        self.clock = stage_clock
        self.total = max(1, int(total_iterations))
        self.stage2_warmup = max(0, int(stage2_warmup))
        self.stage2_offset = max(0, int(stage2_offset))
        self.min_ratio = float(min_ratio)
        for g in optimizer.param_groups:
            g.setdefault("stage1_lr", g.get("initial_lr", g["lr"]))
            g.setdefault("stage2_lr", g.get("initial_lr", g["lr"]))
        super().__init__(optimizer, last_epoch)

    def _cosine(self, t: float) -> float:
        t = min(max(t, 0.0), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    def factor(self, iteration: int, stage: int) -> float:
        """Fraction of the stage's peak at a 1-based iteration."""
        s1 = self.clock.stage1_iterations
        if stage == 1:
            return self._cosine((iteration - 1) / max(1, s1))
        j = iteration - s1 - self.stage2_offset  # 1-based generator step within stage 2
        if j <= 0:
            return 0.0
        if j <= self.stage2_warmup:
            return j / self.stage2_warmup
        span = max(1, self.total - s1 - self.stage2_offset - self.stage2_warmup)
        return self._cosine((j - self.stage2_warmup) / span)

    def state_dict(self) -> dict[str, Any]:
        # the clock is the trainer's (restored with it), not part of the schedule; keeps checkpoints weights-only
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "clock")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in ("optimizer", "clock")})

    def get_lr(self) -> list[float]:
        iteration = self.last_epoch + 1  # the rate set now is used by the next iteration
        stage = self.clock.stage_of(iteration)
        key = "stage1_lr" if stage == 1 else "stage2_lr"
        return [g[key] * self.factor(iteration, stage) for g in self.optimizer.param_groups]


@torch.no_grad()
def style_statistics(generator: nn.Module, x: torch.Tensor, **kwargs: Any) -> dict[str, float]:
    """Per-block style monitoring: ``style_abs_b{i}`` (mean |s|) and ``style_spread_b{i}`` (std across the
    batch, averaged over channels: 0 means every input gets the same style, i.e. a dead SAN).

    Empty for a generator without styles. ``x``: (B, 1, D, H, W) low-dose batch; ``kwargs``: the generator's
    other inputs (the DRF of a DRF-conditioned network).
    """
    net = _unwrap(generator)
    if not hasattr(net, "block_styles"):
        return {}
    out: dict[str, float] = {}
    for i, s in enumerate(net.block_styles(x, **kwargs)):
        s = s.float()
        out[f"style_abs_b{i}"] = s.abs().mean().item()
        out[f"style_spread_b{i}"] = s.std(dim=0).mean().item() if s.shape[0] > 1 else 0.0
    return out


# RALSCriticLoss term -> output key (other terms get a ``d_`` prefix)
_CRITIC_TERM_NAMES = {
    "gradient_penalty": "d_gp",
    "wasserstein": "d_wasserstein",
    "d_real": "d_real",
    "d_fake": "d_fake",
}


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
        regional_loss: ``RegionalSUVLoss`` (local means and maxima vs the full dose), used in both stages
            with ``regional_weight`` (0: off).
        regional_drf_exponent, regional_drf_reference: each patch's regional term is weighted by
            ``(drf / regional_drf_reference) ** -regional_drf_exponent`` (0: every patch alike). The DRF comes
            from the batch's ``drf`` key (training only: inference needs no DRF). At high DRF a noisy lesion
            cannot be told from a noise peak, so pressing on its local maximum there buys noise, not lesions;
            at low DRF it is cheap. A batch without ``drf`` is an error when the exponent is set. The weights are
            not renormalised: patches above the reference DRF simply count less.
        regional_noise_exponent, regional_noise_reference: each patch's regional term is also weighted by
            ``min(1, (sigma / regional_noise_reference) ** -regional_noise_exponent)`` (0: off), where ``sigma`` is
            the standard deviation of ``low - full`` over the patch, in the trainer's units (normalised SUV; the
            config gives the reference in SUV). The noise a window shows, unlike its DRF label, is what the
            network can see: on randomised data a DRF-4 patch of a low-count study can be noisier than a DRF-20
            patch of another (training only: inference needs nothing). Multiplies the DRF weight when both are set.
        stage_clock: the :class:`StageClock` shared with the schedule and the best-checkpoint saver; when
            given, ``stage1_iterations`` must be left at 0 or agree with it.
        monitor_interval: every this many iterations (0: never) the output also holds the generator
            gradient norm of each weighted loss term (``grad_l1``, ``grad_align``, ``grad_adv``,
            ``grad_regional``; one extra backward pass each; not under DDP) and, in stage 2, the style
            statistics of :func:`style_statistics`, so a dead SAN shows while training.
        n_critic: critic steps per generator step in stage 2.
        critic_pretrain_iterations: stage-2 iterations at the start that train the critic alone.
        train_san: train the SAN in stage 2 (the method). False keeps it frozen at its zero style, so stage 2
            fine-tunes the plain base network (the "RALS alone" ablation, with ``align_weight`` 0).
            ``adv_weight`` 0 trains no critic (the "SAN alone" ablation).
        max_nonfinite_steps: optimiser steps with a non-finite gradient are skipped (the weights stay as they
            were, one WARNING each); more than this many of one network (generator or critic) in a row stop the
            run with a :class:`~scripts.common.errors.TrainingDivergedError`. 0 stops at the first.
        precision: ``"fp32"`` or ``"bf16"``: bf16 autocast of the networks (CPU or CUDA); weights, optimiser
            state and losses stay float32. Falls back to fp32, with one log line, on hardware without native
            bf16 (``scripts.engines.precision.resolve_precision``). :attr:`precision` is what runs.
        mixed_precision: deprecated (before ``precision``): None (default) defers to ``precision``; True/False
            keeps its old meaning and overrides ``precision``: bf16 autocast on CUDA, fp32 on the CPU.
        epoch_length, non_blocking, prepare_batch, iteration_update, postprocessing, key_train_metric,
        additional_metrics, metric_cmp_fn, train_handlers, decollate: as in ``monai.engines.SupervisedTrainer``.

    The engine output holds ``image``, ``label``, ``pred``, ``stage`` and scalars named for what they are, so
    StatsHandler/TensorBoardStatsHandler (through :func:`loss_terms`) log each under its own name:

    * generator (every iteration that steps the generator): ``g_l1``, ``g_regional`` and, in stage 2,
      ``g_align``, ``g_adv`` (unweighted terms), ``g_total`` (the weighted sum that is back-propagated) and
      ``loss`` (always the same value as ``g_total``: one curve across both stages, never the critic's);
    * critic (stage 2, adversarial): ``d_loss`` (``-wasserstein + gp_weight * gp``: it is dominated by the
      gradient penalty and can be in the thousands), ``d_wasserstein``, ``d_gp``, ``d_real``, ``d_fake``.
      During critic pre-training no generator step runs and the output holds no ``loss`` / ``g_*`` keys;
    * ``nonfinite_skipped``: optimiser steps skipped for non-finite gradients (both networks) since this process
      started (a resumed run counts afresh), present from the first skipped step on;
    * learning rates used by this iteration: ``lr_<group>`` per generator group (``lr_bdn``, ``lr_san``) and
      ``lr_critic`` (stage 2, adversarial);
    * monitoring (see ``monitor_interval``): ``grad_*`` and ``style_*``.
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
        regional_loss: Callable | None = None,
        regional_weight: float = 0.0,
        regional_drf_exponent: float = 0.0,
        regional_drf_reference: float = 4.0,
        regional_noise_exponent: float = 0.0,
        regional_noise_reference: float = 0.0125,
        stage_clock: StageClock | None = None,
        monitor_interval: int = 0,
        n_critic: int = 1,
        critic_pretrain_iterations: int = 0,
        train_san: bool = True,
        max_nonfinite_steps: int = 10,
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
        if stage_clock is None:
            stage_clock = StageClock(stage1_iterations)
        elif stage1_iterations and int(stage1_iterations) != stage_clock.stage1_iterations:
            raise ValueError(
                f"stage1_iterations ({stage1_iterations}) disagrees with the stage clock ({stage_clock.stage1_iterations}): "
                "give one of them"
            )
        stage1_iterations = stage_clock.stage1_iterations
        total = max_epochs * (self.state.epoch_length or 0)
        if stage1_iterations < total and (
            critic is None or d_optimizer is None or critic_loss is None or adv_loss is None
        ):
            raise ValueError(
                f"stage 2 runs for {total - stage1_iterations} iterations but critic, d_optimizer, critic_loss or "
                "adv_loss is missing: give them, or set stage1_iterations >= max_epochs * epoch_length"
            )
        self.generator = generator
        self.feature_tap = feature_tap if feature_tap is not None else FeatureTap(generator)
        self.g_optimizer = g_optimizer
        self.critic = critic
        self.d_optimizer = d_optimizer
        self.align_loss = align_loss
        self.stage_clock = stage_clock
        self.stage1_iterations = stage_clock.stage1_iterations
        self.regional_loss = regional_loss
        self.regional_weight = float(regional_weight)
        self.regional_drf_exponent = finite_number(regional_drf_exponent, "regional_drf_exponent", positive=False)
        self.regional_drf_reference = finite_number(regional_drf_reference, "regional_drf_reference", positive=True)
        self.regional_noise_exponent = finite_number(regional_noise_exponent, "regional_noise_exponent", positive=False)
        self.regional_noise_reference = finite_number(
            regional_noise_reference, "regional_noise_reference", positive=True
        )
        self._regional_sample_weight: torch.Tensor | None = None
        self._generator_kwargs: dict[str, Any] = {}  # the generator's keyword inputs of this iteration
        if self.regional_weight > 0 and regional_loss is None:
            raise ValueError("regional_weight > 0 needs a regional_loss (scripts.losses.regional.RegionalSUVLoss)")
        self.monitor_interval = int(monitor_interval)
        self.critic_loss = critic_loss
        self.adv_loss = adv_loss
        self.mask_fn = mask_fn
        self.l1_weight = float(l1_weight)
        self.align_weight = float(align_weight)
        self.adv_weight = float(adv_weight)
        self.n_critic = int(n_critic)
        self.critic_pretrain_iterations = int(critic_pretrain_iterations)
        self.train_san = as_bool(train_san, "train_san")
        if int(max_nonfinite_steps) < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        # per network: [steps skipped in a row, the iteration of the first of them]; and skipped in this process
        self._nonfinite_streak: dict[str, list[int]] = {"generator": [0, 0], "critic": [0, 0]}
        self.nonfinite_skipped = {"generator": 0, "critic": 0}
        device_type = torch.device(device).type
        # mixed_precision (deprecated) True/False keeps its old meaning and wins over precision
        self.precision = resolve_precision(config_precision(precision, mixed_precision, device), device)
        self.mixed_precision = self.precision == "bf16"
        self._device_type = device_type
        self._san_enabled: bool | None = None
        # the clock also tells the training sampler which stage a pass over the data starts in
        # (stage2_dose_balance): sync it when each epoch starts, so it is right from the first epoch of a resumed
        # run, before any iteration
        self.add_event_handler(Events.EPOCH_STARTED, self._sync_stage_clock)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._restart_data_at_stage2)

    @staticmethod
    def _sync_stage_clock(engine: UniPETTrainer) -> None:
        engine.stage_clock.iteration = engine.state.iteration
        sampler = UniPETTrainer._stage_sampler(engine)
        if hasattr(sampler, "set_epoch"):
            # MONAI's workflow sets the epoch of a DistributedSampler only; a per-stage sampler of them is ours
            sampler.set_epoch(engine.state.epoch)

    @staticmethod
    def _stage_sampler(engine: UniPETTrainer) -> Any:
        """The data loader's sampler when it draws by this trainer's stage clock (``StageDoseSampler``), else None."""
        sampler = getattr(engine.state.dataloader, "sampler", None)
        return sampler if getattr(sampler, "stage_clock", None) is engine.stage_clock else None

    @staticmethod
    def _restart_data_at_stage2(engine: UniPETTrainer) -> None:
        """Ignite keeps one data iterator across epochs until it runs out, so a sampler that reads the stage
        when an iterator starts (``StageDoseSampler``) would serve stage 1's draws into stage 2 for up to a
        whole pass: start a new iterator right after the last stage-1 iteration."""
        if (
            engine.state.iteration == engine.stage_clock.stage1_iterations
            and engine.state.iteration < engine.state.max_epochs * engine.state.epoch_length  # a stage 2 follows
            and UniPETTrainer._stage_sampler(engine) is not None
        ):
            engine.set_data(engine.state.dataloader)

    # -- helpers -------------------------------------------------------------------------------------
    def stage_of(self, iteration: int) -> int:
        """1 or 2 for a 1-based iteration number (from the shared :class:`StageClock`)."""
        return self.stage_clock.stage_of(iteration)

    def _monitoring(self) -> bool:
        return self.monitor_interval > 0 and self.state.iteration % self.monitor_interval == 0

    def _term_grad_norms(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Generator gradient norm of each (weighted) loss term; the graph is kept for the real backward."""
        if isinstance(self.feature_tap, nn.parallel.DistributedDataParallel):
            return {}  # autograd.grad would bypass DDP's gradient synchronisation
        params = [p for p in _unwrap(self.generator).parameters() if p.requires_grad]
        norms: dict[str, float] = {}
        for name, term in terms.items():
            if not term.requires_grad:
                continue
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            norms[f"grad_{name}"] = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))
        return norms

    def _learning_rates(self, critic: bool) -> dict[str, float]:
        """The rates this iteration steps with (before the per-iteration scheduler moves them)."""
        groups = self.g_optimizer.param_groups
        # named groups (generator_param_groups: bdn, san); a plain optimiser's single group is "generator"
        rates = {
            f"lr_{g.get('name') or ('generator' if len(groups) == 1 else f'g{i}')}": float(g["lr"])
            for i, g in enumerate(groups)
        }
        if critic and self.d_optimizer is not None:
            rates["lr_critic"] = float(self.d_optimizer.param_groups[0]["lr"])
        return rates

    def _regional(self, pred: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        if self.regional_loss is None or self.regional_weight <= 0:
            return torch.zeros((), device=pred.device)
        w = self._regional_sample_weight
        if w is None:
            return self.regional_loss(pred, full)
        return self.regional_loss(pred, full, sample_weight=w.to(pred.device))

    def _set_regional_sample_weight(self, batchdata: Any, low: torch.Tensor, full: torch.Tensor) -> None:
        """Per-patch weights of the regional term from the batch's DRFs (``regional_drf_exponent``) and the noise
        each patch shows (``regional_noise_exponent``), or None when neither is set. ``low``, ``full``: the
        (B, 1, X, Y, Z) prepared batch."""
        self._regional_sample_weight = None
        if self.regional_weight <= 0 or self.regional_loss is None:
            return
        weight = torch.ones(low.shape[0], dtype=torch.float32)
        if self.regional_drf_exponent > 0:
            weight = weight * self._drf_weight(batchdata, low.shape[0])
        if self.regional_noise_exponent > 0:
            with torch.no_grad():
                sigma = (low.float() - full.float()).flatten(1).std(dim=1).cpu()
            ratio = sigma.clamp_min(1e-12) / self.regional_noise_reference
            weight = weight * ratio.pow(-self.regional_noise_exponent).clamp(max=1.0)
        if self.regional_drf_exponent > 0 or self.regional_noise_exponent > 0:
            self._regional_sample_weight = weight

    def _drf_weight(self, batchdata: Any, n: int) -> torch.Tensor:
        """``(drf / regional_drf_reference) ** -regional_drf_exponent`` per patch, from the batch's ``drf`` key."""
        drf_t = batch_drfs(batchdata, n, "regional_drf_exponent > 0 (set it to 0 otherwise)")
        return (drf_t / self.regional_drf_reference) ** -self.regional_drf_exponent

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

    def phase_of(self, iteration: int) -> str:
        """What a 1-based iteration trains: ``"stage1"`` (the BDN with L1), ``"critic_pretrain"`` (stage 2's first
        ``critic_pretrain_iterations``, adversarial runs only: the critic alone) or ``"joint"`` (stage 2: critic
        and generator steps). The stage (1 or 2) comes from the shared :class:`StageClock`."""
        if self.stage_clock.stage_of(iteration) == 1:
            return "stage1"
        if self.adv_weight > 0 and iteration - self.stage_clock.stage1_iterations <= self.critic_pretrain_iterations:
            return "critic_pretrain"
        return "joint"

    # -- one iteration -------------------------------------------------------------------------------
    def _iteration(self, engine: UniPETTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        """One training iteration: the stage-1 step, or in stage 2 the critic step(s) and then (after the critic
        pre-training) the generator step. Each step adds its scalars to ``engine.state.output`` as it runs."""
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        if len(batch) not in (2, 4) or (len(batch) == 4 and len(batch[2]) > 0):
            raise ValueError(
                "prepare_batch must return (low, full) or (low, full, (), {keyword inputs of the generator}); "
                f"got {len(batch)} items"
            )
        low, full = batch[0], batch[1]
        # a 4-tuple (MONAI's prepare_batch convention) carries keyword inputs of the generator, e.g. the DRF of a
        # DRF-conditioned network (scripts.engines.batches.PrepareDRFConditionedBatch); every call gets them
        engine._generator_kwargs = dict(batch[3]) if len(batch) == 4 else {}
        engine._set_regional_sample_weight(batchdata, low, full)
        engine.state.output = output = {Keys.IMAGE: low, Keys.LABEL: full}
        engine.stage_clock.iteration = engine.state.iteration
        phase = engine.phase_of(engine.state.iteration)
        stage = 1 if phase == "stage1" else 2
        output["stage"] = stage
        engine.generator.train()
        # adv_weight 0 (the "SAN alone" ablation): the critic could not influence the generator, so none is trained
        adversarial = stage == 2 and engine.adv_weight > 0
        output.update(engine._learning_rates(critic=adversarial))
        if stage == 1:
            engine._stage1_step(low, full, output)
        else:
            engine._set_san(engine.train_san)
            mask = engine.mask_fn(full) if engine.mask_fn is not None else torch.ones_like(full)
            output["mask_fraction"] = mask.float().mean().item()
            fake = engine._critic_step(low, full, mask, output) if adversarial else None
            if phase == "critic_pretrain":
                # the generator is frozen and shows the critic its current output; no generator step ran, so no
                # ``loss`` (the generator's total): its curve shows a gap, never the critic's loss (``d_loss``)
                output[Keys.PRED] = fake
            else:
                engine._generator_step(low, full, mask, adversarial, output)
        skipped = sum(engine.nonfinite_skipped.values())
        if skipped:  # from the first skipped step on, so the curve shows when and how often
            output["nonfinite_skipped"] = skipped
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output

    def _step_if_finite(self, network: str, optimizer: Optimizer) -> bool:
        """``optimizer.step()`` when every gradient of its parameters is finite; else no step (the weights and the
        optimiser's moments stay as they were), a WARNING, and after more than ``max_nonfinite_steps`` such steps of
        one network in a row a :class:`TrainingDivergedError`.

        One bad batch (a transient NaN in a bf16 critic step: six of seventeen short fine-tuning runs here) then costs
        one step instead of every weight: without this check a single NaN gradient spreads through Adam into all
        weights, and the run trains on NaN for the rest of its hours. The decision reads the gradients only: under DDP
        they are all-reduced, so every rank decides the same way. Returns whether the step ran.
        """
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            optimizer.step()
            self._nonfinite_streak[network][0] = 0
            return True
        optimizer.zero_grad(set_to_none=True)
        streak = self._nonfinite_streak[network]
        iteration = int(self.state.iteration)
        if streak[0] == 0:
            streak[1] = iteration
        streak[0] += 1
        self.nonfinite_skipped[network] += 1
        logger.warning(
            "iteration %d: non-finite %s gradients, step skipped (weights unchanged; %d in a row, %d in this process)",
            iteration,
            network,
            streak[0],
            self.nonfinite_skipped[network],
        )
        if streak[0] > self.max_nonfinite_steps:
            steps = f"{streak[0]} {network} step" + ("s" if streak[0] != 1 else "")
            raise TrainingDivergedError(
                f"training diverged: {steps} in a row had non-finite gradients (iterations {streak[1]}-{iteration}) "
                "and were skipped, so no weights were changed by them; resuming from these same weights will likely "
                "repeat it. Try --precision fp32 first (bf16 autocast), or start again from a checkpoint saved before "
                f"iteration {streak[1]} (--init_checkpoint checkpoint_iter<N>.pt) with a lower learning rate; "
                f"--max_nonfinite_steps (now {self.max_nonfinite_steps}) sets how many skipped steps in a row are "
                "tolerated"
            )
        return False

    def _stage1_step(self, low: torch.Tensor, full: torch.Tensor, output: dict[str, Any]) -> None:
        """Stage 1: one step of the base network with L1 (+ the regional term); SAN frozen at zero style.

        ``low``, ``full``: (B, 1, X, Y, Z) normalised SUV. Adds ``pred``, ``loss``, ``g_total``, ``g_l1``,
        ``g_regional`` (and ``grad_*`` when monitoring) to ``output``.
        """
        self._set_san(False)
        self.g_optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            # through the feature tap: under DDP it is the one wrapper that synchronises gradients
            pred, _ = self.feature_tap(low, **self._generator_kwargs)
            self.fire_event(IterationEvents.FORWARD_COMPLETED)
            l1 = torch.nn.functional.l1_loss(pred.float(), full)
            regional = self._regional(pred.float(), full)
        loss = self.l1_weight * l1 + self.regional_weight * regional
        self.fire_event(IterationEvents.LOSS_COMPLETED)
        if self._monitoring():
            output.update(
                self._term_grad_norms({"l1": self.l1_weight * l1, "regional": self.regional_weight * regional})
            )
        loss.backward()
        self.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self._step_if_finite("generator", self.g_optimizer)
        output.update(
            {
                Keys.PRED: pred.detach(),
                Keys.LOSS: loss.item(),
                "g_total": loss.item(),
                "g_l1": l1.item(),
                "g_regional": float(regional.detach()),
            }
        )

    def _critic_step(
        self, low: torch.Tensor, full: torch.Tensor, mask: torch.Tensor, output: dict[str, Any]
    ) -> torch.Tensor:
        """Stage 2: ``n_critic`` RALS critic steps, full dose (masked) as real, the generator's output as fake.

        Returns the fake (the generator's current output, float32, no gradient). Adds ``d_loss`` and the critic
        terms (``d_gp``, ``d_wasserstein``, ``d_real``, ``d_fake``) of the last step to ``output``.
        """
        self.critic.train()
        with torch.no_grad(), self._autocast():
            fake = self.generator(low, **self._generator_kwargs).float()
        for _ in range(self.n_critic):
            self.d_optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                d_loss, terms = self.critic_loss(self.critic, full, fake, mask)
            d_loss.backward()
            self._step_if_finite("critic", self.d_optimizer)
        # the critic's own names: its loss is not the generator's and must never reach ``loss``
        output["d_loss"] = d_loss.item()
        output.update(
            {
                _CRITIC_TERM_NAMES.get(k, f"d_{k}"): float(v.detach()) if torch.is_tensor(v) else float(v)
                for k, v in terms.items()
            }
        )
        return fake

    def _generator_step(
        self, low: torch.Tensor, full: torch.Tensor, mask: torch.Tensor, adversarial: bool, output: dict[str, Any]
    ) -> None:
        """Stage 2: one generator step, ``l1_weight * L1 + align_weight * L_align + adv_weight * L_adv +
        regional_weight * L_regional`` (L_adv only when ``adversarial``).

        Adds ``pred``, ``loss``, ``g_total``, ``g_l1``, ``g_align``, ``g_adv``, ``g_regional`` (and, when
        monitoring, ``grad_*`` and ``style_*``) to ``output``.
        """
        self.g_optimizer.zero_grad(set_to_none=True)
        # The critic is a fixed judge for the generator step: frozen, and called unwrapped so that a DDP
        # critic does not wait for gradients that this step never produces.
        judge = _unwrap(self.critic)
        for p in judge.parameters():
            p.requires_grad_(False)
        try:
            with self._autocast():
                pred, feats_low = self.feature_tap(low, **self._generator_kwargs)
                self.fire_event(IterationEvents.FORWARD_COMPLETED)
                pred = pred.float()
                l1 = torch.nn.functional.l1_loss(pred, full)
                if self.align_loss is not None and self.align_weight > 0:
                    with torch.no_grad():
                        # the same keyword inputs as the low dose (a DRF-conditioned network sees the low dose's DRF
                        # here too; every conditioned run of train_models keeps L_align off)
                        _, feats_full = self.feature_tap(full, **self._generator_kwargs)
                    align = self.align_loss(feats_low, feats_full)
                else:
                    align = torch.zeros((), device=pred.device)
                adv = self.adv_loss(judge, pred, mask) if adversarial else torch.zeros((), device=pred.device)
                regional = self._regional(pred, full)
                loss = (
                    self.l1_weight * l1
                    + self.align_weight * align
                    + self.adv_weight * adv
                    + self.regional_weight * regional
                )
            self.fire_event(IterationEvents.LOSS_COMPLETED)
            if self._monitoring():
                output.update(
                    self._term_grad_norms(
                        {
                            "l1": self.l1_weight * l1,
                            "align": self.align_weight * align,
                            "adv": self.adv_weight * adv,
                            "regional": self.regional_weight * regional,
                        }
                    )
                )
                output.update(style_statistics(self.generator, low, **self._generator_kwargs))
            loss.backward()
            self.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self._step_if_finite("generator", self.g_optimizer)
        finally:
            for p in judge.parameters():
                p.requires_grad_(True)
        output.update(
            {
                Keys.PRED: pred.detach(),
                Keys.LOSS: loss.item(),
                "g_total": loss.item(),
                "g_l1": l1.item(),
                "g_align": float(align.detach()),
                "g_adv": float(adv.detach()),
                "g_regional": float(regional.detach()),
            }
        )
