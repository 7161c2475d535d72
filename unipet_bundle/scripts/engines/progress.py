"""A labelled tqdm progress bar that MONAI configs can list among handlers (``attach(engine)`` takes no options),
and the logging routing that keeps log lines off the bar's line.

A tqdm bar leaves the cursor at the end of its own line; a log record printed by a plain
``logging.StreamHandler`` while the bar is open is appended to it ("... 40%|####  | loss=0.1INFO - ...").
While a :class:`LossProgressBar` is attached to a running engine, every console ``StreamHandler`` of the
logging tree writes inside ``tqdm.external_write_mode``: the bar is cleared, the record printed on its own
line, and the bar redrawn below it (what ``tqdm.write`` does for ``print``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from tqdm import tqdm

__all__ = ["LossProgressBar", "route_logging_through_tqdm", "restore_logging"]

_lock = threading.Lock()
_users = 0
_EMIT = "_unipet_original_emit"


def _console_handlers() -> list[logging.StreamHandler]:
    """Every StreamHandler (not FileHandler) of the root logger and of each named logger."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    found: dict[int, logging.StreamHandler] = {}
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                found[id(h)] = h
    return list(found.values())


def _wrap(handler: logging.StreamHandler) -> None:
    if _EMIT in handler.__dict__:
        return
    original = handler.emit

    def emit(record: logging.LogRecord) -> None:
        # clears any bar on the same terminal (stdout and stderr count as one), writes, redraws the bar
        with tqdm.external_write_mode(file=handler.stream):
            original(record)

    setattr(handler, _EMIT, original)
    handler.emit = emit  # type: ignore[method-assign]


def route_logging_through_tqdm() -> None:
    """Make the console log handlers write around active tqdm bars (idempotent; counted, see :func:`restore_logging`).

    Handlers added later (e.g. by MONAI handlers at attach time) are picked up by the next call.
    """
    global _users
    with _lock:
        _users += 1
        for h in _console_handlers():
            _wrap(h)


def restore_logging() -> None:
    """Undo :func:`route_logging_through_tqdm` once the last user is done."""
    global _users
    with _lock:
        _users = max(0, _users - 1)
        if _users:
            return
        for h in _console_handlers():
            if _EMIT in h.__dict__:
                del h.__dict__["emit"]
                delattr(h, _EMIT)


class LossProgressBar(ProgressBar):
    """A progress bar that says what it counts, with the chosen scalar outputs (default: ``loss`` and ``stage``).

    The description reads ``"<label> epoch <e>/<E> (<unit>)"`` for a multi-epoch engine (the trainer:
    ``"train epoch 3/30 (iterations)"``) and ``"<label> (<unit>)"`` otherwise (``"evaluation (volumes)"``).
    While the engine runs, console log lines are printed above the bar, never glued onto it.

    Args:
        keys: entries of the engine output dict to show (absent keys are skipped: ``loss`` is absent during
            critic pre-training).
        persist: keep the finished bar of each epoch on screen.
        label: what runs (``"train"``, ``"validation"``, ``"evaluation"``).
        unit: what one step of the bar counts (``"iterations"``, ``"volumes"``).
        show_epoch: add ``epoch e/E``; None: only when the engine runs more than one epoch.
        tqdm_kwargs: passed to ``tqdm`` (``desc`` is replaced by the label).
    """

    def __init__(
        self,
        keys: Sequence[str] = ("loss", "stage"),
        persist: bool = True,
        label: str = "train",
        unit: str = "iterations",
        show_epoch: bool | None = None,
        **tqdm_kwargs: Any,
    ) -> None:
        tqdm_kwargs.pop("desc", None)
        super().__init__(persist=persist, **tqdm_kwargs)
        self.keys = tuple(keys)
        self.label, self.unit, self.show_epoch = str(label), str(unit), show_epoch

    def description(self, engine: Engine) -> str:
        """The bar's label for the engine's current epoch."""
        max_epochs = engine.state.max_epochs or 1
        show = self.show_epoch if self.show_epoch is not None else max_epochs > 1
        epoch = f" epoch {engine.state.epoch}/{max_epochs}" if show else ""
        return f"{self.label}{epoch} ({self.unit})"

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        keys = self.keys

        def _show(output: Any) -> dict[str, float]:
            if not isinstance(output, dict):
                return {}
            return {k: float(output[k]) for k in keys if isinstance(output.get(k), (int, float))}

        kwargs.setdefault("output_transform", _show)
        owner = self

        class _LabelledBar(tqdm):
            """ignite sets "Epoch [e/E]" on every update; this bar shows :meth:`description` instead (no flicker)."""

            def __init__(self, *a: Any, **kw: Any) -> None:
                kw["desc"] = owner.description(engine) + ": "  # as tqdm.set_description writes it
                super().__init__(*a, **kw)

            def set_description(self, desc: str | None = None, refresh: bool | None = True) -> None:
                super().set_description(owner.description(engine), refresh=refresh)

        self.pbar_cls = _LabelledBar
        super().attach(engine, *args, **kwargs)
        engine.add_event_handler(Events.STARTED, self._route)
        engine.add_event_handler(Events.EPOCH_STARTED, self._rescan)
        # not on EXCEPTION_RAISED: a handler there makes ignite swallow the exception (a routed handler left
        # behind after an error only writes around bars, which is harmless)
        for event in (Events.COMPLETED, Events.TERMINATE):
            engine.add_event_handler(event, self._unroute)
        self._routed = False

    def _route(self, engine: Engine) -> None:
        if not self._routed:
            route_logging_through_tqdm()
            self._routed = True

    def _rescan(self, engine: Engine) -> None:
        if self._routed:  # pick up console handlers added since the run started
            for h in _console_handlers():
                _wrap(h)

    def _unroute(self, engine: Engine, *args: Any) -> None:
        if self._routed:
            self._routed = False
            restore_logging()
