"""Load the weights to evaluate, and say exactly which weights they were (path and SHA-256).

The rule is inference's (:func:`scripts.inference.model.resolve_checkpoint`): a checkpoint path that does
not exist is an error (a typo in ``--ckpt_dir`` or ``--checkpoint`` must never evaluate the untrained
network as if it were the model). Evaluating the untrained network is an explicit choice: no checkpoint
(``--checkpoint ""``) and ``--allow_untrained true`` (default false in ``evaluate.json``). For UniPET (zero-
initialised output convolution plus global skip) that network is the identity, so the "denoised" metrics
equal those of the low-dose input: a useful baseline, but it must never pass for a result, so the run logs
a loud warning and ``summary.json`` records ``"loaded": false``.

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

from scripts.common.errors import CheckpointError
from scripts.common.options import as_bool
from scripts.engines.checkpoint import file_sha256, load_checkpoint, verify_sha256
from scripts.inference.model import resolve_checkpoint

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
    network: torch.nn.Module,
    checkpoint: str | os.PathLike | None,
    expected_sha256: str | None = None,
    allow_untrained: Any = False,
) -> dict[str, Any]:
    """Load ``checkpoint`` into ``network`` (``weights_only=True``); see the module docstring for the rules.

    ``expected_sha256`` is the recorded hash of ``checkpoint``, checked before loading (None: not recorded,
    a warning). ``allow_untrained``: with no checkpoint (``None`` or ``""``), evaluate the untrained
    network (a loud warning) instead of failing.

    Stage-1 checkpoints (no SAN weights) are accepted: the SAN keeps its zero-style initialisation, which
    reproduces the stage-1 network exactly; a warning says so.

    Returns:
        ``{"path", "loaded", "sha256", "note"}`` for the evaluation summary.

    Raises:
        CheckpointError: a given checkpoint that does not exist; no checkpoint without ``allow_untrained``;
            a file whose SHA-256 differs from ``expected_sha256``, or that is unreadable, unsafe, or does not
            fit the network.
    """
    path = resolve_checkpoint(checkpoint)
    if path is None:
        if not as_bool(allow_untrained, "allow_untrained"):
            raise CheckpointError(
                "no checkpoint given: pass --checkpoint PATH (or --ckpt_dir of a training run), or --allow_untrained true "
                "to evaluate the UNTRAINED network (identity) on purpose"
            )
        logger.warning(
            "!!! no checkpoint given and --allow_untrained true: evaluating an UNTRAINED network (identity for UniPET: "
            "output = input), so 'denoised' metrics equal the low-dose input's; not a result !!!"
        )
        return {"path": None, "loaded": False, "sha256": None,
                "note": "no checkpoint (allow_untrained): untrained network (identity), not a result"}
    path = path.resolve()
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
