"""Safe checkpoints: atomic saves, resume from the latest one, and loading that cannot run code.

Ignite's ``Checkpoint`` names files after the epoch, which a config cannot point a loader at, and a run
killed mid-write could leave a truncated file under the final name. ``LatestCheckpoint`` keeps exactly
one file with a fixed name, written to a temporary name and renamed, and resumes from it when the run
starts. Every load goes through ``torch.load(..., weights_only=True)`` so a crafted pickle cannot execute.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = ["CheckpointError", "LatestCheckpoint", "atomic_torch_save", "load_checkpoint", "load_state_into"]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the network."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; any failure becomes one clear ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: check the path (train first, or set ckpt_dir)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError (zip truncated), EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely ({type(exc).__name__}: {first[:200]}); it is corrupt, "
            "truncated or contains code: delete it or point to another checkpoint"
        ) from exc


def load_state_into(objects: Mapping[str, Any], state: Mapping[str, Any], strict: bool = True) -> None:
    """Load ``state[name]`` into each object with ``load_state_dict`` (networks, optimisers, engines)."""
    missing = [k for k in objects if k not in state]
    if missing and strict:
        raise CheckpointError(f"checkpoint lacks {missing}; it has {sorted(state)}")
    for name, obj in objects.items():
        if name not in state:
            continue
        target = obj.module if hasattr(obj, "module") and isinstance(obj, torch.nn.Module) else obj
        try:
            target.load_state_dict(state[name])
        except Exception as exc:
            raise CheckpointError(f"checkpoint entry '{name}' does not fit: {exc}") from exc


class LatestCheckpoint:
    """Save everything needed to resume every ``save_interval`` iterations and at the end; resume at start.

    Args:
        save_dir: folder of the checkpoint file.
        save_dict: objects with ``state_dict``/``load_state_dict`` (generator, critic, optimisers,
            schedulers, and the trainer engine itself for iteration/epoch counters).
        filename: fixed file name inside ``save_dir``.
        save_interval: save every this many iterations (0: only at epoch ends and completion).
        resume: load the file at ``Events.STARTED`` when it exists.
        rank: only rank 0 writes under DistributedDataParallel.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        filename: str = "checkpoint_latest.pt",
        save_interval: int = 50,
        resume: bool = True,
        rank: int = 0,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.save_interval = int(save_interval)
        self.resume = resume
        self.rank = rank

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        if self.save_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        if self.rank != 0:
            return
        state = {}
        for name, obj in self.save_dict.items():
            target = obj.module if isinstance(obj, torch.nn.Module) and hasattr(obj, "module") else obj
            state[name] = target.state_dict()
        atomic_torch_save(state, self.path)
        logger.debug("saved %s at iteration %d", self.path, engine.state.iteration)

    def load(self, engine: Engine) -> None:
        if not (self.resume and self.path.is_file()):
            return
        state = load_checkpoint(self.path)
        # the config's epoch count wins over the checkpoint's, so a finished run can be extended
        prior_max_epochs = engine.state.max_epochs
        load_state_into(self.save_dict, state, strict=False)
        engine.state.max_epochs = prior_max_epochs
        if engine.state.epoch >= prior_max_epochs:
            logger.warning(
                "checkpoint %s is already at epoch %d of %d: nothing left to train (raise `epochs` to continue)",
                self.path, engine.state.epoch, prior_max_epochs,
            )
        logger.info(
            "resumed from %s: epoch %d, iteration %d", self.path, engine.state.epoch, engine.state.iteration
        )
