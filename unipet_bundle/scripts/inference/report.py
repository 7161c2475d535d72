"""Progress lines of whole-volume inference: one per input, and a summary.

Each line names the input (its file stem or series folder name, quoted when it holds control characters
so that a newline in a name cannot forge a log line; never a DICOM patient name or ID),
its grid, the grid the network ran on, the seconds it took (reading, resampling, network, writing)
and what was written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from scripts.common.errors import shown

__all__ = ["InferenceReport"]

logger = logging.getLogger(__name__)


def _fmt(values: Sequence[float] | None, digits: int = 4) -> str:
    return "x".join(f"{float(v):.{digits}g}" for v in values) if values is not None else "?"


class InferenceReport:
    """Ignite handler for the inference evaluator (``attach(engine)``).

    Args:
        model_info: what :func:`scripts.inference.model.load_weights` returned; an untrained network
            is recalled in a WARNING at the end of the run.
        output_dir: shown in the summary.
    """

    def __init__(self, model_info: Mapping[str, Any] | None = None, output_dir: str | None = None) -> None:
        self.model_info = dict(model_info or {})
        self.output_dir = output_dir
        self._t_item = 0.0
        self._t_run = 0.0
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self._t_run = time.perf_counter()
        self._count = 0
        logger.info(
            "denoising %s input(s), network on %s", engine.state.epoch_length, getattr(engine.state, "device", "?")
        )

    def _batch_started(self, engine: Engine) -> None:
        self._t_item = time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._t_item
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for out in outputs:
            summary = out.get("unipet_summary") if isinstance(out, Mapping) else None
            if not summary:
                continue
            self._count += 1
            written = ", ".join(Path(p).name for p in summary.get("written", []))
            logger.info(
                "denoised %s (%s, %s): shape %s, spacing %s mm; network grid %s at %s mm; %.1f s -> %s",
                shown(summary["name"]),
                summary["kind"],
                summary["units"],
                _fmt(summary["shape"]),
                _fmt(summary["spacing_mm"]),
                _fmt(summary["network_shape"]),
                _fmt(summary["network_spacing_mm"]),
                seconds,
                written,
            )

    def _completed(self, engine: Engine) -> None:
        logger.info(
            "done: %d input(s) denoised in %.1f s; outputs in %s",
            self._count,
            time.perf_counter() - self._t_run,
            self.output_dir,
        )
        if not self.model_info.get("trained", True):
            logger.warning(
                "*** UNTRAINED NETWORK *** these outputs equal the inputs, NOT denoised: no checkpoint was loaded"
            )
