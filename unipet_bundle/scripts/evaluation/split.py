"""The pairs that ``configs/evaluate.json`` scores: the held-out test split, else validation, or every subject.

Training (``train.json``) splits a bare dataset folder with no test fraction, so without a datalist file
there are no test subjects: evaluation then falls back to the validation subjects (never seen in
training, but used to pick the best checkpoint, so slightly optimistic) and says so. ``"all"`` scores every
subject, training ones included, e.g. to look at a dataset that was never used for training.

Without ``datalist_file``, a ``datalist.json`` in the dataset folder (what ``python -m scripts.data.datalist``
writes by default) is used, and the log says so: its test split is the held-out one. The run logs which
subjects and DRFs it evaluates.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from scripts.common.errors import UniPETInputError
from scripts.data.layout import natural_key
from scripts.data.training_data import paired_datalist

__all__ = ["EVAL_SPLITS", "evaluation_datalist"]

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("test", "validation", "training", "all")


def evaluation_datalist(
    dataset_dir: str | os.PathLike,
    eval_split: str = "test",
    datalist_file: str | os.PathLike | None = None,
    drfs: list[float] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    test_fraction: float = 0.0,
) -> list[dict[str, Any]]:
    """Entries to evaluate, sorted by subject then DRF, each tagged with the split it came from.

    Args:
        dataset_dir: the paired dataset folder.
        eval_split: ``test`` (falls back to ``validation`` with a warning when empty), ``validation``,
            ``training`` or ``all``.
        datalist_file, drfs, val_fraction, seed: as in training, so that the split is the same one.
        test_fraction: test fraction of the on-the-fly split (training uses 0: keep it so, or the "test"
            subjects would be ones the network was trained on).

    Returns:
        entries of :func:`scripts.data.training_data.paired_datalist` plus ``"split"`` and
        ``"image_path"`` / ``"label_path"`` (the file paths, kept after ``LoadImaged`` replaces
        ``image``/``label`` with arrays).

    Raises:
        UniPETInputError: unknown split, or nothing to evaluate.
    """
    if eval_split not in EVAL_SPLITS:
        raise UniPETInputError(f"eval_split '{eval_split}' is not one of {EVAL_SPLITS}: set --eval_split accordingly")
    if not datalist_file:
        found = Path(dataset_dir).expanduser() / "datalist.json"
        if found.is_file():
            logger.info(
                "using the datalist %s found in the dataset folder (written by scripts.data.datalist); "
                "pass --datalist_file to use another",
                found,
            )
            datalist_file = found

    def _get(split: str) -> list[dict[str, Any]]:
        entries = paired_datalist(dataset_dir, split, datalist_file, drfs, val_fraction, test_fraction, seed)
        return [dict(e, split=split) for e in entries]

    if eval_split == "all":
        entries = [e for split in ("training", "validation", "test") for e in _get(split)]
    else:
        entries = _get(eval_split)
        if not entries and eval_split == "test":
            logger.warning(
                "no test subjects in %s: evaluating the VALIDATION subjects instead (they chose the best "
                "checkpoint, so the numbers are slightly optimistic); write a datalist with a test split "
                "(`python -m scripts.data.datalist --test_fraction 0.1`, before training) for a clean test set",
                datalist_file or "the on-the-fly split",
            )
            entries = _get("validation")
    if not entries:
        raise UniPETInputError(
            f"nothing to evaluate: the '{eval_split}' split of {dataset_dir} is empty (with the fallback to validation "
            "for 'test'); use --eval_split all, or a datalist with test/validation subjects"
        )
    for e in entries:
        e["image_path"], e["label_path"] = str(e["image"]), str(e["label"])
        e["subject"] = str(e.get("subject") or Path(e["label"]).parent.name)
        # MONAI's datalist loader turns a subject id naming an existing folder into its absolute path
        if os.sep in e["subject"]:
            e["subject"] = Path(e["subject"]).name
    entries.sort(key=lambda e: (natural_key(e["subject"]), float(e["drf"])))
    subjects = sorted({e["subject"] for e in entries}, key=natural_key)
    shown_subjects = ", ".join(subjects[:20]) + (f", ... ({len(subjects) - 20} more)" if len(subjects) > 20 else "")
    drf_list = ", ".join(f"{d:g}" for d in sorted({float(e["drf"]) for e in entries}))
    splits = ", ".join(sorted({e["split"] for e in entries}))
    logger.info(
        "evaluating %d pairs: %d subjects (%s) of the %s split(s) from %s, DRFs %s",
        len(entries),
        len(subjects),
        shown_subjects,
        splits,
        datalist_file or "the on-the-fly split",
        drf_list,
    )
    return entries
