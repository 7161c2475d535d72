"""Batches to network inputs: the ``prepare_batch`` functions of training and validation, and the one reader of
the datalist's ``drf`` key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import default_prepare_batch
from monai.utils import CommonKeys as Keys

from scripts.data.layout import parse_drf

__all__ = ["batch_drfs", "prepare_paired_batch", "PrepareDRFConditionedBatch"]


def prepare_paired_batch(
    batchdata: dict[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-dose ``image``, full-dose ``label``) as float tensors on ``device``, shapes (B, 1, X, Y, Z)."""
    low = batchdata[Keys.IMAGE].to(device=device, non_blocking=non_blocking, dtype=torch.float32)
    full = batchdata[Keys.LABEL].to(device=device, non_blocking=non_blocking, dtype=torch.float32)
    return low.as_tensor() if hasattr(low, "as_tensor") else low, full.as_tensor() if hasattr(
        full, "as_tensor"
    ) else full


def batch_drfs(batchdata: Any, n: int, needed_by: str) -> torch.Tensor:
    """The DRFs of a batch's ``n`` items as a float32 tensor ``(n,)``, from its ``drf`` key.

    A datalist may name a DRF ``4`` or ``"drf_4"`` (:func:`scripts.data.layout.parse_drf`). ``needed_by`` names
    the setting that asked, for the error when the key is missing. Raises ValueError when the key is missing,
    a value is not a DRF, or the count is not ``n``.
    """
    drf = batchdata.get("drf") if isinstance(batchdata, Mapping) else None
    if drf is None:
        raise ValueError(
            f"{needed_by} needs each item's DRF in the batch ('drf' key, as "
            "scripts.data.training_data.paired_datalist writes it)"
        )
    values = drf.flatten().tolist() if torch.is_tensor(drf) else list(drf) if isinstance(drf, (list, tuple)) else [drf]
    try:
        drf_t = torch.tensor([float(parse_drf(str(v))) for v in values], dtype=torch.float32)
    except ValueError as exc:
        raise ValueError(f"batch 'drf' must hold one DRF per item, got {values}: {exc}") from exc
    if drf_t.numel() != n or not bool(torch.all(drf_t > 0)):
        raise ValueError(f"batch 'drf' must hold one DRF > 0 per item ({n}), got {drf_t.tolist()}")
    return drf_t


class PrepareDRFConditionedBatch:
    """``prepare_batch`` for a network that takes the DRF (``DRFConditionedUniPET``): returns (low-dose ``image``,
    full-dose ``label``, no positional extras, ``{"drf": (B,) float32 tensor}``), MONAI's 4-tuple convention.
    MONAI's evaluators and the UniPET trainer pass that dict to the network; a sliding window hands it to every
    window batch of the volume.

    Args:
        keep_meta: MONAI's ``default_prepare_batch`` (MetaTensors as they come: the validation's level lock reads
            the voxel size from them), for the evaluators, which run one volume per batch (a larger batch is
            refused: the sliding window mixes the volumes' windows). False: plain float32 tensors, as
            :func:`prepare_paired_batch` gives the trainer (metadata tracking on every op would slow training).
    """

    def __init__(self, keep_meta: bool = False) -> None:
        self.keep_meta = bool(keep_meta)

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: torch.device | str | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        if self.keep_meta:
            low, full = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
            if low.shape[0] != 1:
                # a sliding window batches windows of every volume of the batch together, so one DRF per volume
                # could not follow its windows
                raise ValueError(
                    f"a DRF-conditioned network is validated one volume at a time (batch_size 1), got {low.shape[0]}"
                )
        else:
            low, full = prepare_paired_batch(batchdata, device, non_blocking)
        drf = batch_drfs(batchdata, low.shape[0], "a DRF-conditioned network").to(device=low.device)
        return low, full, (), {"drf": drf}
