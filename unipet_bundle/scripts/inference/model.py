"""Load the inference weights safely, or say loudly that the network is untrained.

Checkpoints are read with ``torch.load(weights_only=True)`` (:func:`scripts.engines.checkpoint.load_checkpoint`),
so a crafted file cannot run code. Accepted contents: a plain ``state_dict`` (``models/model.pt`` as
training writes it), or a dict holding one under ``generator``, ``network``, ``model`` or ``state_dict``
(e.g. ``checkpoint_latest.pt``); a ``module.`` prefix (DistributedDataParallel) is stripped. A stage-1
(BDN-only) checkpoint loads too: the SAN keeps its zero-effect initialisation, which is exactly the
stage-1 network (a warning says so).

A checkpoint path that is given but does not exist (a typo, a model not downloaded) is an error, never a
silent fall-back to the untrained network. Running untrained is an explicit choice: no checkpoint
(``--checkpoint ""`` or ``None``) *and* ``--allow_untrained true`` (default false in the configs); the
outputs then say UNTRAINED (sidecar, DICOM SeriesDescription, log).

Before anything is unpickled the file's SHA-256 is checked against ``checkpoint_sha256`` of the config
(:func:`scripts.engines.checkpoint.verify_sha256`): a mismatch stops the run (exit status 2); a null value
means "not recorded" and only logs a warning with the file's hash.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from scripts.common.errors import CheckpointError
from scripts.common.options import as_bool
from scripts.engines.checkpoint import load_checkpoint, verify_sha256

__all__ = ["bundle_version", "load_weights", "resolve_checkpoint"]

logger = logging.getLogger(__name__)

_STATE_KEYS = ("generator", "network", "model", "state_dict")


def bundle_version(bundle_root: str | os.PathLike) -> str:
    """``version`` of ``<bundle_root>/configs/metadata.json``, or ``"unknown"``."""
    try:
        meta = json.loads((Path(bundle_root) / "configs" / "metadata.json").read_text())
        return str(meta.get("version") or "unknown")
    except (OSError, ValueError, AttributeError):
        return "unknown"


def _state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(
        f"checkpoint {path} holds no network weights (expected a state_dict, or one under {', '.join(_STATE_KEYS)}): "
        "point --checkpoint at models/model.pt from training"
    )


def resolve_checkpoint(checkpoint: str | os.PathLike | None) -> Path | None:
    """The checkpoint file as an absolute path, or None when none is given (``None`` or an empty string).

    Raises:
        CheckpointError: a path is given but no file is there (a typo must never run the untrained
            network), or it names a folder.
    """
    if checkpoint is None or str(checkpoint).strip() == "":
        return None
    path = Path(checkpoint).expanduser().absolute()
    if path.is_dir():
        raise CheckpointError(f"--checkpoint {path} is a folder, not a checkpoint file: point it at the weights file (e.g. models/model.pt)")
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: the file does not exist; check --checkpoint (a typo?), train one (configs/train.json) "
            "or download the bundle's models/model.pt. To run the UNTRAINED network on purpose: --checkpoint \"\" --allow_untrained true"
        )
    return path


def load_weights(
    network: torch.nn.Module,
    checkpoint: str | os.PathLike | None,
    allow_untrained: Any = False,
    expected_sha256: str | None = None,
) -> dict[str, Any]:
    """Load ``checkpoint`` into ``network``; run untrained only when asked to (see the module docstring).

    Args:
        network: the UniPET built from ``network_def`` (on its device).
        checkpoint: path of the weights; ``None`` or an empty value means "no checkpoint" (then
            ``allow_untrained`` must be true). A path that does not exist is an error.
        allow_untrained: with no checkpoint, run the untrained UniPET (the identity, its output conv
            being zero) after a loud WARNING; False (the default) makes "no checkpoint" a ``CheckpointError``.
        expected_sha256: the recorded SHA-256 of ``checkpoint``, checked before loading; None: not
            recorded (a warning).

    Returns:
        JSON-ready provenance: ``checkpoint`` (path or None), ``trained`` (bool), ``checkpoint_sha256``.

    Raises:
        CheckpointError: a given checkpoint that does not exist, SHA-256 mismatch, unreadable/unsafe
            checkpoint, weights that do not fit ``network``, or no checkpoint while ``allow_untrained`` is False.
    """
    allow = as_bool(allow_untrained, "allow_untrained")
    path = resolve_checkpoint(checkpoint)
    if path is None:
        if not allow:
            raise CheckpointError(
                "no checkpoint given: pass --checkpoint PATH (the bundle's models/model.pt, or one you trained with "
                "configs/train.json), or --allow_untrained true to run the UNTRAINED network on purpose"
            )
        logger.warning(
            "*** UNTRAINED NETWORK *** no checkpoint given and --allow_untrained true: UniPET runs with its initial weights, "
            "which are the IDENTITY (zero output conv): outputs equal the inputs, NOT denoised, and say UNTRAINED"
        )
        return {"checkpoint": None, "trained": False, "checkpoint_sha256": None}

    digest = verify_sha256(path, expected_sha256)
    state = _state_dict(load_checkpoint(path, map_location="cpu"), path)
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    try:
        if hasattr(network, "load_bdn_state_dict"):
            missing = list(network.load_bdn_state_dict(state))
        else:
            network.load_state_dict(state)
            missing = []
    except (KeyError, RuntimeError) as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"checkpoint {path} does not fit the network ({first}); set channels/num_blocks/latent_dim/san_channels "
            "to the values it was trained with"
        ) from None
    if missing:
        logger.warning("checkpoint %s has no SAN weights (%d tensors; a stage-1 checkpoint?): the SAN has no effect", path, len(missing))
    logger.info("loaded UniPET weights from %s (sha256 %s)", path, digest[:16])
    return {"checkpoint": str(path), "trained": True, "checkpoint_sha256": digest}
