"""Load the inference weights safely, or say loudly that the network is untrained.

The loading itself is the bundle's one weights loader, :func:`scripts.common.weights.load_network_weights`
(SHA-256 checked against ``checkpoint_sha256`` of the config before anything is unpickled, a mismatch stops
the run with exit status 2 and a null value only logs a warning with the file's hash; ``weights_only=True``
reading; a plain ``state_dict`` or one under ``generator``, ``network``, ``model`` or ``state_dict``; the
``module.`` prefix of DistributedDataParallel stripped). Inference loads tolerantly (``strict=False``): a
stage-1 (BDN-only) checkpoint loads too, the SAN keeping its zero-effect initialisation, which is exactly
the stage-1 network (a warning says so).

A checkpoint path that is given but does not exist (a typo, a model not downloaded) is an error, never a
silent fall-back to the untrained network. Running untrained is an explicit choice: no checkpoint
(``--checkpoint ""`` or ``None``) *and* ``--allow_untrained true`` (default false in the configs); the
outputs then say UNTRAINED (sidecar, DICOM SeriesDescription, log).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from scripts.common.options import as_bool
from scripts.common.weights import CheckpointError, load_network_weights, provenance, resolve_checkpoint

__all__ = ["load_weights"]

logger = logging.getLogger(__name__)


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
        JSON-ready provenance (:func:`scripts.common.weights.provenance`): ``checkpoint`` (path or None),
        ``trained`` (bool), ``checkpoint_sha256``, ``note``.

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
        return provenance(None, None, "no checkpoint (allow_untrained): untrained network (identity), not a result")

    return load_network_weights(network, path, expected_sha256, strict=False)[1]
