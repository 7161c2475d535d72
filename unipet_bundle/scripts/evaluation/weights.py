"""Load the weights to evaluate, and say exactly which weights they were (path and SHA-256).

The rule is inference's: a checkpoint path that does not exist is an error (a typo in ``--ckpt_dir`` or
``--checkpoint`` must never evaluate the untrained network as if it were the model). Evaluating the untrained
network is an explicit choice: no checkpoint (``--checkpoint ""``) and ``--allow_untrained true`` (default
false in ``evaluate.json``). For UniPET (zero-initialised output convolution plus global skip) that network is
the identity, so the "denoised" metrics equal those of the low-dose input: a useful baseline, but it must
never pass for a result, so the run logs a loud warning and ``summary.json`` records ``"trained": false``.

An existing checkpoint goes through the bundle's one loader, :func:`scripts.common.weights.load_network_weights`
(SHA-256 against ``checkpoint_sha256`` before it is unpickled, ``weights_only=True``, tolerant of a stage-1
checkpoint without SAN weights).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from scripts.common.options import as_bool
from scripts.common.weights import CheckpointError, load_network_weights, provenance, resolve_checkpoint

__all__ = ["load_eval_weights"]

logger = logging.getLogger(__name__)


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
        the provenance dict of :func:`scripts.common.weights.provenance` (``checkpoint``, ``trained``,
        ``checkpoint_sha256``, ``note``) for the evaluation summary.

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
        return provenance(None, None, "no checkpoint (allow_untrained): untrained network (identity), not a result")
    info = load_network_weights(network, path, expected_sha256, strict=False)[1]
    logger.info("evaluating checkpoint %s (sha256 %s)", info["checkpoint"], info["checkpoint_sha256"][:16])
    return info
