"""Keep the best generator of each training stage, judged by a validation metric.

Stage 2 trades a little PSNR for restored texture, so one running "best" across both stages would keep
the stage-1 weights forever. Each stage therefore has its own best file: ``model_stage1.pt`` (the base
denoising network alone, which is also the "vanilla universal" baseline) and ``model.pt`` (UniPET).
Files hold the plain generator ``state_dict`` (the model-zoo convention) and are written atomically.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ignite.engine import Engine, Events

from scripts.common.errors import UniPETInputError
from scripts.common.weights import atomic_torch_save, unwrap

if TYPE_CHECKING:
    from scripts.engines.gan_trainer import StageClock

__all__ = ["StageBestCheckpoint", "split_metrics"]

logger = logging.getLogger(__name__)


def split_metrics(metrics: Mapping[str, Any], key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({key: metric}, {the others})``: the evaluator's key metric and its additional metrics.

    ``train.json`` makes the selection metric (``selection_metric``) the key metric, so that MONAI's "best
    metric" lines name what selects the saved files (see :class:`StageBestCheckpoint`).

    Raises:
        UniPETInputError: ``key`` is not one of ``metrics``.
    """
    if key not in metrics:
        raise UniPETInputError(f"selection_metric {key!r} is not a validation metric: use one of {sorted(metrics)}")
    return {key: metrics[key]}, {k: v for k, v in metrics.items() if k != key}


class StageBestCheckpoint:
    """Attach to the validation evaluator; saves the generator when ``metric_name`` improves within a stage.

    The stage of the weights being judged is the trainer's own: ``stage_clock`` is the trainer's
    :class:`~scripts.engines.gan_trainer.StageClock` (by iteration), the one source of the stage boundary for
    the trainer, the learning-rate schedule and this saver (0.2.0's saver counted epochs and could disagree).

    When ``metric_name`` is also the evaluator's key metric (``train.json`` makes ``selection_metric`` the key
    metric), MONAI's "Got new best metric of <name>" and StatsHandler's "Key metric: <name> best value" lines
    follow this saver's per-stage best: at the start of each validation the evaluator's best is set to the best
    of the current stage, so the log names the metric that selects the files and says when a file is written.

    Args:
        save_dir: folder for the files.
        generator: the network to save (a DDP wrapper is unwrapped).
        stage_clock: the trainer's ``StageClock`` (``scripts.engines.gan_trainer``); its ``stage`` is the stage
            of the weights being judged.
        metric_name: evaluator metric to maximise (``val_score``: the selection score of
            ``scripts.metrics.selection``; ``val_psnr``: PSNR alone).
        filenames: file name per stage.
        rank: only rank 0 writes.
        cmp_fn: ``cmp_fn(new, best)`` is True when ``new`` is better (default: greater).
        stage2_offset: stage-2 iterations before the generator's first stage-2 step (the critic pre-training):
            a validation within them judges weights stage 2 has not changed, so it is not a stage-2 candidate
            (a short fine-tuning run otherwise saved its starting weights as its stage-2 ``model.pt``).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        generator: torch.nn.Module,
        stage_clock: StageClock,
        metric_name: str = "val_psnr",
        filenames: dict[int, str] | None = None,
        rank: int = 0,
        cmp_fn: Callable[[float, float], bool] | None = None,
        stage2_offset: int = 0,
    ) -> None:
        if stage_clock is None or not hasattr(stage_clock, "stage"):
            raise ValueError(
                "StageBestCheckpoint needs the trainer's stage_clock (scripts.engines.gan_trainer.StageClock)"
            )
        self.save_dir = Path(save_dir)
        self.generator = generator
        self.metric_name = metric_name
        self.filenames = (
            {1: "model_stage1.pt", 2: "model.pt"} if filenames is None else {int(k): v for k, v in filenames.items()}
        )
        self.rank = rank
        self.cmp_fn = cmp_fn or (lambda new, best: new > best)
        self.best: dict[int, float] = {}
        self.best_epoch: dict[int, int] = {}
        self.stage_clock = stage_clock
        self.stage2_offset = int(stage2_offset)

    def state_dict(self) -> dict:
        return {
            "best": {str(k): v for k, v in self.best.items()},
            "best_epoch": {str(k): v for k, v in self.best_epoch.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.best = {int(k): float(v) for k, v in state.get("best", {}).items()}
        self.best_epoch = {int(k): int(v) for k, v in state.get("best_epoch", {}).items()}  # absent before 0.3.x

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.key_metric_of_stage)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def key_metric_of_stage(self, engine: Engine) -> None:
        """Before a validation: the evaluator's best key metric becomes the current stage's best (none yet: MONAI's
        "no best" state), when the key metric is ``metric_name``; otherwise MONAI's best would span both stages."""
        if getattr(engine.state, "key_metric_name", None) != self.metric_name:
            return
        stage = self.stage_clock.stage
        if stage in self.best:
            engine.state.best_metric = self.best[stage]
            engine.state.best_metric_epoch = self.best_epoch.get(stage, 0)
        else:
            engine.state.best_metric, engine.state.best_metric_epoch = -1, -1  # MONAI's initial values

    def __call__(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.metric_name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        value = float(value)
        epoch = engine.state.epoch
        stage = self.stage_clock.stage
        if stage == 2 and self.stage_clock.iteration - self.stage_clock.stage1_iterations <= self.stage2_offset:
            logger.info(
                "epoch %d: the generator has not been stepped in stage 2 yet (critic pre-training): not a candidate "
                "for %s",
                epoch,
                self.filenames[2],
            )
            return
        best = self.best.get(stage)
        if best is not None and not self.cmp_fn(value, best):
            return
        self.best[stage], self.best_epoch[stage] = value, int(epoch)
        if self.rank != 0:
            return
        path = atomic_torch_save(unwrap(self.generator).state_dict(), self.save_dir / self.filenames[stage])
        logger.info(
            "stage %d: new best %s (the selection metric) %.4f at epoch %d -> %s",
            stage,
            self.metric_name,
            value,
            epoch,
            path,
        )
