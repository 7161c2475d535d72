"""Validation monitoring for TensorBoard: PSNR per dose-reduction factor and a picture of one validation slice.

Both attach to the validation evaluator (``SupervisedEvaluator``, run by ``ValidationHandler`` with the
trainer's epoch as its own), so every value is logged against the training epoch it judges.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.metrics.image_quality import psnr

__all__ = ["PerDRFPSNR", "ValidationImageSummary", "drf_tag"]

logger = logging.getLogger(__name__)


def drf_tag(drf: Any) -> str:
    """``4`` / ``4.0`` / ``"4"`` -> ``"4"``; ``2.5`` -> ``"2.5"`` (the suffix of ``val_psnr_drf<N>``)."""
    if torch.is_tensor(drf):
        drf = drf.reshape(-1)[0].item()
    return f"{float(drf):g}"


def _items(engine: Engine) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(batch item, output item) pairs of the current iteration, decollated or not."""
    batch, output = engine.state.batch, engine.state.output
    if isinstance(output, dict):  # decollate=False: one dict of (B, ...) tensors
        n = output["pred"].shape[0]
        return [
            (
                {
                    k: (v[i] if isinstance(v, (list, tuple, torch.Tensor)) and len(v) == n else v)
                    for k, v in batch.items()
                },
                {k: output[k][i] for k in ("image", "label", "pred") if k in output},
            )
            for i in range(n)
        ]
    return list(zip(batch, output))


class PerDRFPSNR:
    """Validation PSNR grouped by the dose-reduction factor of each item, as ``val_psnr_drf<N>`` metrics.

    The mean ``val_psnr`` across DRFs hides a model that helps DRF 100 and harms DRF 4; these show each.
    The values go into ``engine.state.metrics`` at the end of each validation run, so a Stats or
    TensorBoardStatsHandler listed *after* this handler logs them with the other metrics.

    Args:
        drf_key: the batch key holding each item's DRF (the datalist's ``drf``).
        data_range, clip_max: as for ``val_psnr`` (normalised SUV: 1 and 1), so the means agree.
        prefix: metric name prefix.
    """

    def __init__(
        self, drf_key: str = "drf", data_range: float = 1.0, clip_max: float | None = 1.0, prefix: str = "val_psnr_drf"
    ) -> None:
        self.drf_key, self.data_range, self.clip_max, self.prefix = drf_key, float(data_range), clip_max, prefix
        self._values: dict[str, list[float]] = defaultdict(list)
        self._warned = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._values = defaultdict(list)

    def _update(self, engine: Engine) -> None:
        for item, out in _items(engine):
            if self.drf_key not in item:
                if not self._warned:  # a datalist without DRFs: say so once, do not invent one
                    logger.warning(f"validation items carry no '{self.drf_key}': no per-DRF PSNR is logged")
                    self._warned = True
                continue
            pred, label = out["pred"].detach().float().cpu(), out["label"].detach().float().cpu()
            value = float(psnr(pred[None], label[None], self.data_range, self.clip_max)[0])
            self._values[drf_tag(item[self.drf_key])].append(value)

    def _complete(self, engine: Engine) -> None:
        for tag, values in sorted(self._values.items(), key=lambda kv: float(kv[0])):
            finite = [v for v in values if math.isfinite(v)]
            engine.state.metrics[f"{self.prefix}{tag}"] = float(np.mean(finite)) if finite else float("inf")


class ValidationImageSummary:
    """One validation slice (low dose | output | full dose) as a TensorBoard image, once per validation run.

    Cheap: one coronal slice of the first validation volume, through the hottest full-dose voxel, shown in
    the radiological convention (patient's right on the viewer's left, superior up) with a fixed SUV window,
    so images of different epochs compare by eye.

    Args:
        log_dir: TensorBoard folder (the one the Stats handlers write to).
        suv_max: the SUV that the normalised intensity 1 stands for (``suv_max`` of the bundle).
        suv_window: displayed SUV range (lower, upper); values outside are clipped.
        axcodes: orientation codes of the network arrays (``network_axcodes``, e.g. ``"RAS"``).
        tag: image tag.
    """

    def __init__(
        self,
        log_dir: str,
        suv_max: float = 20.0,
        suv_window: Sequence[float] = (0.0, 7.0),
        axcodes: str = "RAS",
        tag: str = "val_slice_low_output_full",
    ) -> None:
        codes = str(axcodes).upper()
        if len(codes) != 3 or {c for c in codes} - set("LRAPSI") or len({_pair(c) for c in codes}) != 3:
            raise ValueError(f"axcodes must name one of L/R, A/P, S/I per axis (e.g. 'RAS'), got {axcodes!r}")
        lo, hi = (float(v) for v in suv_window)
        if not hi > lo:
            raise ValueError(f"suv_window must be (lower, upper) with upper > lower, got {list(suv_window)}")
        self.log_dir, self.suv_max, self.window, self.axcodes, self.tag = log_dir, float(suv_max), (lo, hi), codes, tag
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)

    def coronal(self, volume: torch.Tensor | np.ndarray, index: int | None = None) -> tuple[np.ndarray, int]:
        """(rows superior -> inferior, columns patient right -> left) slice of a (1, X, Y, Z) or (X, Y, Z)
        volume at coronal ``index`` (None: the middle); returns the slice and the index used."""
        v = np.asarray(volume.detach().float().cpu() if torch.is_tensor(volume) else volume, dtype=np.float32)
        v = v.reshape(v.shape[-3:])
        si, lr, ap = (next(i for i, c in enumerate(self.axcodes) if _pair(c) == p) for p in ("SI", "LR", "AP"))
        v = np.transpose(v, (si, lr, ap))
        if self.axcodes[si] == "S":  # index grows toward superior: flip so row 0 is the top of the body
            v = v[::-1]
        if self.axcodes[lr] == "R":  # index grows toward the patient's right: flip so column 0 is the right
            v = v[:, ::-1]
        index = v.shape[2] // 2 if index is None else int(index)
        return np.ascontiguousarray(v[:, :, index]), index

    def _write(self, engine: Engine) -> None:
        if engine.state.iteration != 1:  # the evaluator restarts its count every validation run
            return
        item, out = _items(engine)[0]
        low = out.get("image", item.get("image"))
        if low is None:
            return
        full = out["label"]
        # the hottest full-dose voxel chooses the coronal plane (coronal() leaves the A/P axis unflipped)
        v = np.asarray(full.detach().float().cpu(), dtype=np.float32).reshape(full.shape[-3:])
        ap = next(i for i, c in enumerate(self.axcodes) if _pair(c) == "AP")
        index = int(np.unravel_index(int(np.argmax(v)), v.shape)[ap])
        panels = [self._window(self.coronal(x, index)[0]) for x in (low, out["pred"], full)]
        gap = np.ones((panels[0].shape[0], 1), dtype=np.float32)
        image = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        self._writer.add_image(self.tag, image[None], global_step=engine.state.epoch, dataformats="CHW")
        self._writer.flush()

    def _window(self, normalised: np.ndarray) -> np.ndarray:
        lo, hi = self.window
        return np.clip((normalised * self.suv_max - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _pair(code: str) -> str:
    return next(p for p in ("LR", "AP", "SI") if code in p)
