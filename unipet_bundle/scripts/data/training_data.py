"""The (low-dose, full-dose) pair lists that train.json and evaluate.json feed to MONAI datasets.

Either a datalist JSON written by ``python -m scripts.data.datalist`` (paths relative to the dataset
folder) or, when none is given, the same split computed on the fly from the paired layout, so that
``monai.bundle run --config_file configs/train.json --dataset_dir D`` works on a bare dataset folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from scripts.data.datalist import make_datalist
from scripts.data.io import UniPETInputError

__all__ = ["paired_datalist"]

logger = logging.getLogger(__name__)

_SPLITS = ("training", "validation", "test")


def paired_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "training",
    datalist_file: str | os.PathLike | None = None,
    drfs: list[float] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    max_items: int | None = None,
) -> list[dict[str, Any]]:
    """Entries ``{"image": low-dose path, "label": full-dose path, "drf", "subject"[, "labels"]}``.

    Args:
        dataset_dir: the paired dataset folder (``<subject>/full_dose.nii.gz``, ``<subject>/drf_<N>.nii.gz``).
        split: ``training``, ``validation`` or ``test``.
        datalist_file: a datalist JSON; empty/None splits ``dataset_dir`` by subject with ``seed``.
        drfs: keep only these DRFs (None: all).
        val_fraction, test_fraction, seed: the by-subject split when no datalist file is given.
        max_items: keep at most this many entries (spread over the list), e.g. to bound validation time.

    Returns:
        entries with absolute paths, ready for ``LoadImaged``.
    """
    if split not in _SPLITS:
        raise UniPETInputError(f"unknown split '{split}': use one of {_SPLITS}")
    root = Path(dataset_dir).expanduser().resolve()
    if datalist_file:
        path = Path(datalist_file).expanduser()
        if not path.is_file():
            raise UniPETInputError(f"datalist {path} not found: write one with `python -m scripts.data.datalist` or leave datalist_file empty")
        try:
            content = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UniPETInputError(f"datalist {path} is not valid JSON ({exc}); re-create it with `python -m scripts.data.datalist`") from exc
        # read by hand: MONAI's loader fails on an empty split and rewrites any value naming an existing path
        entries = [dict(e) for e in content.get(split, [])]
    else:
        entries = make_datalist(root, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)[split]
    for e in entries:
        for key in ("image", "label", "labels"):
            if key in e and not Path(e[key]).is_absolute():
                e[key] = str(root / e[key])
    if drfs:
        wanted = [float(d) for d in drfs]
        entries = [e for e in entries if any(abs(float(e["drf"]) - w) < 1e-6 for w in wanted)]
    if max_items is not None and 0 < max_items < len(entries):
        step = len(entries) / max_items
        entries = [entries[int(i * step)] for i in range(max_items)]
    for e in entries:
        for key in ("image", "label"):
            if not Path(e[key]).is_file():
                raise UniPETInputError(f"{split} entry {e.get('subject', '?')} DRF {e.get('drf')}: {e[key]} not found; re-create the datalist")
    logger.info("%s: %d pairs from %s", split, len(entries), root)
    return entries
