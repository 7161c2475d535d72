"""Network weights, read in one place: SHA-256 first, ``weights_only`` unpickling, one state dict, one unwrap.

:func:`atomic_torch_save` is the one writer (temporary file, fsync, rename). Every tool that loads UniPET weights (inference, evaluation, the demo, the quality benchmark, ``train.json``'s
``bdn_ckpt``, training resume) goes through :func:`load_checkpoint`, the bundle's only ``torch.load``: it uses
``weights_only=True``, so a crafted pickle cannot run code, and turns every failure into one
:class:`CheckpointError` line. :func:`verify_sha256` checks a recorded SHA-256 (``large_files.yml`` or
``--checkpoint_sha256``) *before* the file is unpickled at all.

A weights file may be a plain ``state_dict`` (``models/model.pt``) or a training checkpoint holding one under
``generator``, ``network``, ``model`` or ``state_dict`` (:func:`network_state_dict`); keys saved from a
``DistributedDataParallel`` network carry a ``module.`` prefix that :func:`strip_module_prefix` removes, and
:func:`unwrap` reaches the network inside a DDP/DataParallel wrapper. :func:`load_network_weights` is the one
loader; it returns the one provenance dict (:func:`provenance`) that the inference sidecar, the DICOM
description, the evaluation summary and the benchmarks record.

Strict or tolerant is the caller's explicit choice: ``strict=False`` accepts a checkpoint without SAN weights
(a stage-1 checkpoint: the SAN keeps its zero-effect initialisation, which reproduces the stage-1 network;
inference and evaluation want this), ``strict=True`` wants every tensor (the demo and the quality benchmark,
which compare trained models and must not silently run half of one).

This module is part of the common floor: it imports nothing outside ``scripts.common``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from scripts.common.errors import CheckpointError
from scripts.common.io import atomic_write

__all__ = [
    "STATE_KEYS",
    "CheckpointError",
    "atomic_torch_save",
    "file_sha256",
    "load_checkpoint",
    "load_network_weights",
    "network_state_dict",
    "provenance",
    "resolve_checkpoint",
    "strip_module_prefix",
    "unwrap",
    "verify_sha256",
]

logger = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

#: entries of a training checkpoint that may hold the network's state dict, in the order they are tried
STATE_KEYS = ("generator", "network", "model", "state_dict")

_MODULE_PREFIX = "module."


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, flush it to disk, then rename.

    A run killed at any moment (SIGKILL included) leaves either the previous file or the new one under
    ``path``, never a truncated one; at worst a hidden ``.<name>.*.tmp*`` file stays behind, which
    :class:`scripts.engines.checkpoint.LatestCheckpoint` removes on the next start.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write, sync=True)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str | None, option: str = "checkpoint_sha256") -> str:
    """Check a checkpoint's SHA-256 against the recorded one before it is used; return the actual hash.

    Args:
        path: the file.
        expected: the recorded hex SHA-256 (any case); None or empty means "not recorded": a warning,
            no check.
        option: the config key holding ``expected``, named in messages.

    Raises:
        CheckpointError: ``expected`` is not 64 hex digits, or the file's hash differs (a damaged
            download, or another file than the recorded one).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: check the path")
    actual = file_sha256(path)
    if expected is None or str(expected).strip().lower() in ("", "none", "null"):
        logger.warning(
            "no SHA-256 recorded for %s (%s is null): its integrity is not checked; its SHA-256 is %s",
            path,
            option,
            actual,
        )
        return actual
    wanted = str(expected).strip().lower()
    if not _SHA256_HEX.match(wanted):
        hint = "" if isinstance(expected, str) else " (the command line read it as a number: quote it as \"'<hash>'\")"
        raise CheckpointError(f"--{option} {expected!r} is not a SHA-256 (64 hex digits, as sha256sum prints it){hint}")
    if actual != wanted:
        raise CheckpointError(
            f"checkpoint {path} has SHA-256 {actual[:16]}..., not the recorded {wanted[:16]}...: the file is damaged or not the "
            f"released one; download it again, or for your own checkpoint pass --{option} with its hash (or None to skip the check)"
        )
    logger.info("checkpoint %s matches its recorded SHA-256 (%s...)", path, actual[:16])
    return actual


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; any failure becomes one clear ``CheckpointError``.

    The bundle's only ``torch.load``. A file holding anything but tensors and plain containers (a crafted
    pickle that would run code, or a whole pickled model) is refused without executing any of it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: check the path (train first, or set ckpt_dir)")
    try:
        with warnings.catch_warnings():
            # the weights-only unpickler warns about foreign pickle protocols on stderr: the error says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError (zip truncated), EOFError, ...
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} refused: it holds Python objects other than tensors (a crafted or foreign pickle, "
                "or a whole pickled model), and loading it could run code; use a state_dict checkpoint written by this bundle"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {first[:160]}); it is corrupt or truncated: "
            "delete it or point to another checkpoint"
        ) from None


def unwrap(module: Any) -> Any:
    """The network inside ``DistributedDataParallel``/``DataParallel`` wrappers (any depth); anything else as is.

    Only ``torch.nn.Module`` objects are unwrapped: an optimiser or an Ignite engine with a ``module``
    attribute is returned unchanged.
    """
    while isinstance(module, torch.nn.Module) and isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    return module


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with the ``module.`` key prefix of a state dict saved from a DDP-wrapped network removed."""
    return {(k[len(_MODULE_PREFIX) :] if k.startswith(_MODULE_PREFIX) else k): v for k, v in state.items()}


def network_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The network state dict in a loaded weights file, ``module.`` prefix removed; None when there is none.

    ``obj`` is a plain state dict (every value a tensor), or a training checkpoint with one under
    :data:`STATE_KEYS` (tried in that order).
    """
    if not isinstance(obj, Mapping):
        return None
    for key in STATE_KEYS:
        if isinstance(obj.get(key), Mapping):
            return strip_module_prefix(obj[key])
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return strip_module_prefix(obj)
    return None


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
        raise CheckpointError(
            f"--checkpoint {path} is a folder, not a checkpoint file: point it at the weights file (e.g. models/model.pt)"
        )
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: the file does not exist; check --checkpoint (a typo?), train one (configs/train.json) "
            'or download the bundle\'s models/model.pt. To run the UNTRAINED network on purpose: --checkpoint "" --allow_untrained true'
        )
    return path


def provenance(checkpoint: str | os.PathLike | None, sha256: str | None, note: str) -> dict[str, Any]:
    """The one record of which weights ran: ``{"checkpoint", "trained", "checkpoint_sha256", "note"}`` (JSON-ready).

    ``checkpoint`` None means no weights were loaded (the untrained network); ``trained`` says so.
    """
    return {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "trained": checkpoint is not None,
        "checkpoint_sha256": sha256,
        "note": note,
    }


def load_network_weights(
    network: torch.nn.Module,
    checkpoint: str | os.PathLike,
    expected_sha256: str | None = None,
    *,
    strict: bool,
    adapt: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.nn.Module] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the weights file ``checkpoint`` into ``network``: the one loader (see the module docstring).

    Order: the file must exist, its SHA-256 is checked against ``expected_sha256`` (None: not recorded, a
    warning), then it is read with ``weights_only=True``, its network state dict taken (:func:`network_state_dict`)
    and loaded into the unwrapped ``network``.

    Args:
        network: the network (DDP-wrapped or not) on its device.
        checkpoint: path of the weights file.
        expected_sha256: the recorded hex SHA-256 of the file, or None.
        strict: True: every tensor of the network must be in the file (``load_state_dict(strict=True)``).
            False: a network with ``load_bdn_state_dict`` (UniPET) may miss its SAN tensors, which keep their
            zero-effect initialisation (a stage-1 checkpoint; a warning says so); any other mismatch is an error.
        adapt: ``adapt(network, state) -> network`` called before loading, e.g. to rebuild the network for the
            checkpoint's SAN variant; its result is loaded and returned.
        map_location: where tensors are read to.

    Returns:
        (the network the weights were loaded into, :func:`provenance` of them).

    Raises:
        CheckpointError: no such file, SHA-256 mismatch, an unreadable or unsafe file, no network weights
            in it, or weights that do not fit the network.
    """
    path = Path(checkpoint).expanduser().resolve()
    digest = verify_sha256(path, expected_sha256)  # before anything is unpickled
    state = network_state_dict(load_checkpoint(path, map_location=map_location))
    if state is None:
        raise CheckpointError(
            f"checkpoint {path} holds no network weights (expected a state_dict, or one under {', '.join(STATE_KEYS)}): "
            "point --checkpoint at models/model.pt from training"
        )
    if adapt is not None:
        network = adapt(network, state)
    target = unwrap(network)
    note = "trained weights"
    try:
        if not strict and hasattr(target, "load_bdn_state_dict"):
            missing = list(target.load_bdn_state_dict(state))
        else:
            target.load_state_dict(state)
            missing = []
    except (KeyError, RuntimeError) as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"checkpoint {path} does not fit the network ({first}); set channels/num_blocks/latent_dim/san_channels "
            "to the values it was trained with"
        ) from None
    if missing:
        note = "BDN-only (stage-1) weights: the SAN keeps its zero-style initialisation"
        logger.warning(
            "checkpoint %s has no SAN weights (%d tensors; a stage-1 checkpoint?): the SAN has no effect",
            path,
            len(missing),
        )
    logger.info("loaded UniPET weights from %s (sha256 %s)", path, digest[:16])
    return network, provenance(path, digest, note)
