"""Load the weights to evaluate, and say exactly which weights they were (path and SHA-256).

A missing checkpoint is not an error: the network is then evaluated untrained, which for UniPET (zero-
initialised output convolution plus global skip) is the identity, so the "denoised" metrics equal those of
the low-dose input. That is a useful baseline and what the tests rely on, but it must never pass for a
result: the run logs a loud warning and ``summary.json`` records ``"loaded": false``.

An existing checkpoint is checked against ``checkpoint_sha256`` (:func:`scripts.engines.checkpoint.verify_sha256`)
before it is unpickled, and read with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from scripts.engines.checkpoint import CheckpointError, file_sha256, load_checkpoint, verify_sha256

__all__ = ["file_sha256", "load_eval_weights"]

logger = logging.getLogger(__name__)


def _state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    """A plain generator state dict (``model.pt``), or the ``generator`` entry of a training checkpoint."""
    if isinstance(obj, Mapping) and isinstance(obj.get("generator"), Mapping):
        return obj["generator"]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"checkpoint {path} holds neither a network state dict nor a 'generator' entry; point --checkpoint at model.pt")


def load_eval_weights(
    network: torch.nn.Module, checkpoint: str | os.PathLike | None, expected_sha256: str | None = None
) -> dict[str, Any]:
    """Load ``checkpoint`` into ``network`` (``weights_only=True``); warn and go on untrained when it is missing.

    ``expected_sha256`` is the recorded hash of ``checkpoint``, checked before loading (None: not recorded,
    a warning).

    Stage-1 checkpoints (no SAN weights) are accepted: the SAN keeps its zero-style initialisation, which
    reproduces the stage-1 network exactly; a warning says so.

    Returns:
        ``{"path", "loaded", "sha256", "note"}`` for the evaluation summary.

    Raises:
        CheckpointError: the file exists but its SHA-256 differs from ``expected_sha256``, or it is
            unreadable, unsafe, or does not fit the network.
    """
    path = Path(checkpoint).expanduser().resolve() if checkpoint else None
    if path is None or not path.is_file():
        logger.warning(
            "!!! checkpoint %s not found: evaluating an UNTRAINED network (identity for UniPET: output = input), "
            "so 'denoised' metrics equal the low-dose input's. Train first or set --checkpoint PATH. !!!",
            path if path is not None else "(none given)",
        )
        return {"path": str(path) if path else None, "loaded": False, "sha256": None,
                "note": "checkpoint missing: untrained network (identity), not a result"}
    sha = verify_sha256(path, expected_sha256)
    state = _state_dict(load_checkpoint(path), path)
    target = network.module if hasattr(network, "module") and isinstance(network, torch.nn.Module) else network
    note = "trained weights"
    try:
        if hasattr(target, "load_bdn_state_dict"):
            missing = target.load_bdn_state_dict(state)
            if missing:
                note = "BDN-only (stage-1) weights: the SAN keeps its zero-style initialisation"
                logger.warning("checkpoint %s has no SAN weights: evaluating the stage-1 base network", path)
        else:
            target.load_state_dict(state)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the network ({exc}); check channels/num_blocks/"
                              "latent_dim/san_channels against the training run") from exc
    logger.info("evaluating checkpoint %s (sha256 %s)", path, sha[:16])
    return {"path": str(path), "loaded": True, "sha256": sha, "note": note}
