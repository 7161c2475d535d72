"""Training checkpoints: atomic saves and resume from the latest one.

Ignite's ``Checkpoint`` names files after the epoch, which a config cannot point a loader at, and a run
killed mid-write could leave a truncated file under the final name. ``LatestCheckpoint`` keeps exactly
one file with a fixed name, written to a temporary name, flushed to disk and renamed, and resumes from
it: the file is read (and every network, optimiser and scheduler state loaded) when the handler is
attached, so a corrupt or unsafe file stops the run with one line before training starts; the engine's
counters are restored when the run starts. Every load goes through the bundle's one weights reader,
:func:`scripts.common.weights.load_checkpoint` (``weights_only=True``, so a crafted pickle cannot execute);
hashes, the safe reader and the network loader live in :mod:`scripts.common.weights`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from scripts.common.options import as_bool
from scripts.common.weights import (
    CheckpointError,
    atomic_torch_save,
    file_sha256,
    load_checkpoint,
    network_state_dict,
    unwrap,
)

__all__ = ["LatestCheckpoint", "checkpoint_san_variant_or", "load_state_into"]

logger = logging.getLogger(__name__)


def checkpoint_san_variant_or(
    path: str | os.PathLike | None, default: str = "v3", expected_sha256: str | None = None
) -> str:
    """The SAN variant (``"v1"``/``"v2"``/``"v3"``) of the UniPET weights in ``path``, or ``default`` when it cannot tell.

    For configs whose network must match the weights they load (inference.json, evaluate.json): 0.2.0
    weights hold a v1 SAN, 0.3 runs a v2 one, models trained since 0.4 (and the shipped one) v3. A missing,
    unreadable or SHA-mismatching file gives ``default`` silently: the config's own weight loading then
    reports the problem in its words. Reads the file with ``weights_only=True`` like every load here.
    """
    from scripts.networks.unipet import checkpoint_san_variant

    if not path or not Path(path).is_file():
        return default
    try:
        if expected_sha256 and file_sha256(path).lower() != str(expected_sha256).lower():
            return default
        state = network_state_dict(load_checkpoint(path))
    except CheckpointError:
        return default
    if state is None:
        return default
    return checkpoint_san_variant(state) or default


def load_state_into(objects: Mapping[str, Any], state: Mapping[str, Any], strict: bool = True) -> None:
    """Load ``state[name]`` into each object with ``load_state_dict`` (networks, optimisers, engines)."""
    missing = [k for k in objects if k not in state]
    if missing and strict:
        raise CheckpointError(f"checkpoint lacks {missing}; it has {sorted(state)}")
    for name, obj in objects.items():
        if name not in state:
            continue
        target = unwrap(obj)
        try:
            target.load_state_dict(state[name])
        except Exception as exc:
            detail = " ".join(str(exc).split())[:300]
            raise CheckpointError(
                f"checkpoint entry '{name}' does not fit ({detail}); the settings (channels, num_blocks, latent_dim, "
                "san_channels, critic_channels, optimiser) must be those of the run that wrote it"
            ) from exc


class LatestCheckpoint:
    """Save everything needed to resume every ``save_interval`` iterations and at the end; resume on attach.

    Resuming: :meth:`attach` reads the file (when ``resume`` and it exists) and loads every object of
    ``save_dict`` except Ignite engines at once, so a corrupt, unsafe or mismatched checkpoint fails before
    the run starts; engines (the trainer's iteration and epoch counters) are restored at
    ``Events.STARTED``, since ``Engine.run`` resets a finished engine's state first. The next run then
    starts with the iteration after the saved one, with the same network, critic, optimiser (AdamW
    moments and step counts) and scheduler states. Data order and random patches are not restored: a
    resumed epoch draws new ones.

    Args:
        save_dir: folder of the checkpoint file.
        save_dict: objects with ``state_dict``/``load_state_dict`` (generator, critic, optimisers,
            schedulers, and the trainer engine itself for iteration/epoch counters).
        filename: fixed file name inside ``save_dir``.
        save_interval: save every this many iterations (0: only at epoch ends and completion).
        resume: resume from the file when it exists (a bool, or true/false as text from the command line).
        rank: only rank 0 writes under DistributedDataParallel.
        protect: other files of ``save_dir`` the run will write (the best weights, ``model.pt``): when
            there is no checkpoint to resume from and one of them exists, it belongs to another run and
            :meth:`attach` refuses to start rather than replace it.
        overwrite: allow replacing the ``protect`` files of another run.
        snapshot_iterations: iterations whose full state is also kept as ``checkpoint_iter<N>.pt`` (e.g. the
            end of stage 1, so that stage-2 variants can branch from the same point).
        init_checkpoint: a checkpoint of another run to start from when ``save_dir`` has none of its own
            (e.g. another run's ``checkpoint_iter<N>.pt``); the run then continues at iteration N + 1 and
            writes only into ``save_dir``. Empty: start afresh.
        init_exclude: ``save_dict`` keys not taken from ``init_checkpoint`` (default: ``best``, since another
            run's best validation score, measured on its own data and for its own files, means nothing here).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        filename: str = "checkpoint_latest.pt",
        save_interval: int = 50,
        resume: Any = True,
        rank: int = 0,
        protect: Sequence[str] = (),
        overwrite: Any = False,
        snapshot_iterations: Sequence[int] = (),
        init_checkpoint: str | os.PathLike | None = None,
        init_exclude: Sequence[str] = ("best",),
    ) -> None:
        self.path = Path(save_dir) / filename
        self.snapshot_iterations = frozenset(int(i) for i in (snapshot_iterations or ()))
        self.init_checkpoint = Path(init_checkpoint).expanduser() if init_checkpoint else None
        self.save_dict = dict(save_dict)
        self.save_interval = int(save_interval)
        self.resume = as_bool(resume, "resume")  # `--resume false` arrives as the string "false"
        self.rank = rank
        self.protect = tuple(protect)
        self.overwrite = as_bool(overwrite, "overwrite")
        self.init_exclude = frozenset(init_exclude or ())
        self._engine_state: dict[str, Any] | None = None
        self._source = self.path

    def attach(self, engine: Engine) -> None:
        self._remove_stale_temporaries()
        self._load_now()
        # a fresh run, or a branch from another run's checkpoint, must not replace this folder's weights
        if (self._engine_state is None or self._source != self.path) and not self.overwrite:
            taken = [name for name in self.protect if (self.path.parent / name).exists()]
            if taken:
                raise CheckpointError(
                    f"{self.path.parent} already holds {', '.join(taken)} of another training run and no {self.path.name} "
                    "to resume from: this run would replace them; choose another --ckpt_dir, move them away, or pass "
                    "--overwrite true"
                )
        engine.add_event_handler(Events.STARTED, self.load)
        if self.snapshot_iterations:
            # before the periodic save: a kill between the two saves must not skip the snapshot on resume
            engine.add_event_handler(
                Events.ITERATION_COMPLETED(event_filter=lambda _, it: it in self.snapshot_iterations),
                self.save_snapshot,
            )
        if self.save_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def _state(self) -> dict[str, Any]:
        state = {}
        for name, obj in self.save_dict.items():
            state[name] = unwrap(obj).state_dict()
        return state

    def snapshot_path(self, iteration: int) -> Path:
        return self.path.parent / f"checkpoint_iter{int(iteration):06d}.pt"

    def save_snapshot(self, engine: Engine) -> None:
        if self.rank != 0:
            return
        path = atomic_torch_save(self._state(), self.snapshot_path(engine.state.iteration))
        logger.info("kept the state at iteration %d as %s", engine.state.iteration, path)

    def save(self, engine: Engine) -> None:
        if self.rank != 0:
            return
        atomic_torch_save(self._state(), self.path)
        logger.debug("saved %s at iteration %d", self.path, engine.state.iteration)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of a save that was killed (SIGKILL, power loss) before its rename."""
        if self.rank != 0 or not self.path.parent.is_dir():
            return
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp*"):
            tmp.unlink(missing_ok=True)
            logger.info("removed %s, left by an interrupted save", tmp.name)

    def _load_now(self) -> None:
        """Read the file and load every non-engine object; keep the engines' states for ``load``."""
        self._engine_state = None
        own = self.resume and self.path.is_file()
        if own:
            source = self.path
            if self.init_checkpoint is not None:
                logger.warning(
                    "resuming %s; init_checkpoint %s is not used (it only starts a run)",
                    self.path,
                    self.init_checkpoint,
                )
        elif self.init_checkpoint is not None:
            source = self.init_checkpoint
            if not source.is_file():
                raise CheckpointError(
                    f"init_checkpoint {source} not found: give an existing checkpoint file or leave it empty"
                )
        else:
            return
        try:
            state = load_checkpoint(source)
            if not isinstance(state, Mapping):
                raise CheckpointError(f"checkpoint {source} is not a dict of states")
            if source != self.path:
                state = {k: v for k, v in state.items() if k not in self.init_exclude}
                lacking = [k for k in self.save_dict if k not in self.init_exclude and k not in state]
                if lacking:
                    raise CheckpointError(
                        f"init_checkpoint {source} is not a training checkpoint (it lacks {', '.join(lacking)}): give a "
                        "checkpoint_latest.pt or checkpoint_iter<N>.pt; to start from weights alone use --bdn_ckpt"
                    )
            others = {k: v for k, v in self.save_dict.items() if not isinstance(v, Engine)}
            load_state_into(others, state, strict=False)
        except CheckpointError as exc:
            how = (
                "fix --init_checkpoint or leave it empty"
                if source != self.path
                else "delete or move it to start afresh, or pass --resume false"
            )
            raise CheckpointError(f"{exc} [resuming from {source}: {how}]") from None
        self._engine_state = dict(state)
        self._source = source

    def load(self, engine: Engine) -> None:
        if self._engine_state is None:
            return
        state, self._engine_state = self._engine_state, None
        engines = {k: v for k, v in self.save_dict.items() if isinstance(v, Engine)}
        # the config's epoch count wins over the checkpoint's, so a finished run can be extended
        prior_max_epochs = engine.state.max_epochs
        load_state_into(engines, state, strict=False)
        engine.state.max_epochs = prior_max_epochs
        if engine.state.epoch >= prior_max_epochs:
            logger.warning(
                "checkpoint %s is already at epoch %d of %d: nothing left to train (raise `epochs` to continue)",
                self._source,
                engine.state.epoch,
                prior_max_epochs,
            )
        logger.info("resumed from %s: epoch %d, iteration %d", self._source, engine.state.epoch, engine.state.iteration)
