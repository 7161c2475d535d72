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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from scripts.engines.checkpoint import atomic_torch_save

__all__ = ["StageBestCheckpoint"]

logger = logging.getLogger(__name__)


class StageBestCheckpoint:
    """Attach to the validation evaluator; saves the generator when ``metric_name`` improves within a stage.

    Args:
        save_dir: folder for the files.
        generator: the network to save (a DDP wrapper is unwrapped).
        stage1_epochs: epochs of stage 1; the evaluator's epoch (the trainer's, set by ``ValidationHandler``)
            tells the stage of the weights being judged. Used only without ``stage_clock``.
        metric_name: evaluator metric to maximise (``val_score``: the selection score of
            ``scripts.metrics.selection``; ``val_psnr``: PSNR alone).
        stage_clock: the trainer's ``StageClock`` (``scripts.engines.gan_trainer``): the stage of the weights
            is then the trainer's own, by iteration, so the two cannot disagree (preferred).
        filenames: file name per stage.
        rank: only rank 0 writes.
        cmp_fn: ``cmp_fn(new, best)`` is True when ``new`` is better (default: greater).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        generator: torch.nn.Module,
        stage1_epochs: int = 0,
        metric_name: str = "val_psnr",
        filenames: dict[int, str] | None = None,
        rank: int = 0,
        cmp_fn: Callable[[float, float], bool] | None = None,
        stage_clock: Any = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.generator = generator
        self.stage1_epochs = int(stage1_epochs)
        self.metric_name = metric_name
        self.filenames = {1: "model_stage1.pt", 2: "model.pt"} if filenames is None else {int(k): v for k, v in filenames.items()}
        self.rank = rank
        self.cmp_fn = cmp_fn or (lambda new, best: new > best)
        self.best: dict[int, float] = {}
        self.stage_clock = stage_clock

    def state_dict(self) -> dict:
        return {"best": {str(k): v for k, v in self.best.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.best = {int(k): float(v) for k, v in state.get("best", {}).items()}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.metric_name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        value = float(value)
        epoch = engine.state.epoch
        stage = self.stage_clock.stage if self.stage_clock is not None else (1 if epoch <= self.stage1_epochs else 2)
        best = self.best.get(stage)
        if best is not None and not self.cmp_fn(value, best):
            return
        self.best[stage] = value
        if self.rank != 0:
            return
        net = self.generator.module if hasattr(self.generator, "module") else self.generator
        path = atomic_torch_save(net.state_dict(), self.save_dir / self.filenames[stage])
        logger.info("stage %d: new best %s %.4f at epoch %d -> %s", stage, self.metric_name, value, epoch, path)
