"""A tqdm progress bar that MONAI configs can list among handlers (``attach(engine)`` takes no options)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ignite.engine import Engine
from ignite.handlers import ProgressBar

__all__ = ["LossProgressBar"]


class LossProgressBar(ProgressBar):
    """Shows the iterations of each epoch with the chosen scalar outputs (default: ``loss`` and ``stage``).

    Args:
        keys: entries of the engine output dict to show.
        persist: keep the finished bar of each epoch on screen.
    """

    def __init__(self, keys: Sequence[str] = ("loss", "stage"), persist: bool = True, **tqdm_kwargs: Any) -> None:
        super().__init__(persist=persist, **tqdm_kwargs)
        self.keys = tuple(keys)

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        keys = self.keys

        def _show(output: Any) -> dict[str, float]:
            if not isinstance(output, dict):
                return {}
            return {k: float(output[k]) for k in keys if isinstance(output.get(k), (int, float))}

        kwargs.setdefault("output_transform", _show)
        super().attach(engine, *args, **kwargs)
