"""The (low-dose, full-dose) pair lists that train.json and evaluate.json feed to MONAI datasets, and
the loader that checks every volume as it is read.

Either a datalist JSON written by ``python -m scripts.data.datalist`` (paths relative to the dataset
folder) or, when none is given, the same split computed on the fly from the paired layout, so that
``monai.bundle run --config_file configs/train.json --dataset_dir D`` works on a bare dataset folder.

Bad data stop the run with one line naming the file or pair (``UniPETInputError``): before any volume is
read, every pair's headers are checked (3D, same shape and affine, a positive DRF), also when a datalist
file is given; while loading, :class:`CheckedLoadImaged` names a file that cannot be read (truncated
``.nii.gz``) and applies :func:`scripts.data.volume_checks.check_pet_volume` (NaN/Inf and all-zero volumes
refused, negative voxels kept).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import LoadImaged

from scripts.data.datalist import make_datalist
from scripts.data.io import UniPETInputError
from scripts.data.layout import check_3d, check_same_grid, parse_drf, read_grid
from scripts.data.volume_checks import check_pet_volume

__all__ = ["CheckedLoadImaged", "paired_datalist"]

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
        entries with absolute paths, ready for :class:`CheckedLoadImaged` (or ``LoadImaged``).

    Raises:
        UniPETInputError: unknown split, missing/invalid datalist, a missing file, and (from a datalist
            file) a DRF that is not a positive number or a pair whose headers differ in shape/affine or are not 3D.
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
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError (a binary file)
            raise UniPETInputError(
                f"datalist {path} is not valid JSON ({type(exc).__name__}); re-create it with `python -m scripts.data.datalist`"
            ) from None
        # read by hand: MONAI's loader fails on an empty split and rewrites any value naming an existing path
        listed = content.get(split, []) if isinstance(content, dict) else None
        if not isinstance(listed, list) or not all(isinstance(e, dict) for e in listed):
            raise UniPETInputError(
                f"datalist {path}: '{split}' is not a list of entries like {{\"image\": ..., \"label\": ..., \"drf\": ...}}; "
                "re-create it with `python -m scripts.data.datalist`"
            )
        entries = [dict(e) for e in listed]
    else:
        entries = make_datalist(root, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)[split]
    for e in entries:
        for key in ("image", "label", "labels"):
            if key in e and not Path(e[key]).is_absolute():
                e[key] = str(root / e[key])
        _check_entry(e, split, checked_by_layout=not datalist_file)
    if drfs:
        wanted = [float(d) for d in drfs]
        entries = [e for e in entries if any(abs(float(e["drf"]) - w) < 1e-6 for w in wanted)]
    if max_items is not None and 0 < max_items < len(entries):
        step = len(entries) / max_items
        entries = [entries[int(i * step)] for i in range(max_items)]
    logger.info("%s: %d pairs from %s", split, len(entries), root)
    return entries


def _check_entry(entry: Mapping[str, Any], split: str, checked_by_layout: bool) -> None:
    """Files exist; from a datalist file also: a positive DRF and one grid for the pair (headers only)."""
    where = f"{split} entry {entry.get('subject', '?')} DRF {entry.get('drf')}"
    for key in ("image", "label"):
        if key not in entry:
            raise UniPETInputError(f"{where}: no '{key}' path; re-create the datalist with `python -m scripts.data.datalist`")
        if not Path(entry[key]).is_file():
            raise UniPETInputError(f"{where}: {entry[key]} not found; re-create the datalist")
    if checked_by_layout:  # scan_paired_dataset has checked names and grids already
        return
    try:
        parse_drf(str(entry.get("drf")))
    except UniPETInputError:
        raise UniPETInputError(
            f"{where}: the DRF {entry.get('drf')!r} is not a positive number; re-create the datalist with `python -m scripts.data.datalist`"
        ) from None
    try:
        check_same_grid(entry["label"], entry["image"], ref_grid=_checked_grid(entry["label"]))
    except UniPETInputError as exc:
        raise UniPETInputError(f"{where}: {exc}") from None


def _checked_grid(path: str | os.PathLike) -> tuple[tuple[int, ...], Any]:
    grid = read_grid(path)
    check_3d(path, grid[0])
    return grid


class CheckedLoadImaged(LoadImaged):
    """``LoadImaged`` that names the file it cannot read and refuses volumes unfit for training.

    Same arguments and output as :class:`monai.transforms.LoadImaged`. Each loaded array, (X, Y, Z)
    before channel handling, goes through :func:`scripts.data.volume_checks.check_pet_volume`; with
    several keys (``image`` and ``label``) their shapes must agree.

    Raises:
        UniPETInputError: unreadable or truncated file, not 3D, NaN/Inf voxels, all zero, or a pair
            whose volumes differ in shape (each message names the file(s)).
    """

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        d = dict(data)
        shapes: dict[str, tuple[int, ...]] = {}
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            path = str(d[key])
            try:
                loaded = self._loader(d[key], reader)
            except Exception as exc:  # nibabel/zlib/MONAI raise many types for truncated or foreign files
                first = " ".join(str(exc).split())[:200] or type(exc).__name__
                raise UniPETInputError(
                    f"{path}: cannot read as an image ({type(exc).__name__}: {first}); is the file complete? "
                    "replace it or remove the pair from the dataset"
                ) from None
            image = loaded[0] if isinstance(loaded, (tuple, list)) else loaded
            check_pet_volume(path, np.asarray(image))
            shapes[path] = tuple(image.shape)
            if isinstance(loaded, (tuple, list)):
                d[key] = loaded[0]
                d[meta_key or f"{key}_{meta_key_postfix}"] = loaded[1]
            else:
                d[key] = loaded
        if len(set(shapes.values())) > 1:
            listing = " vs ".join(f"{p} {list(shape)}" for p, shape in shapes.items())
            raise UniPETInputError(f"the pair differs in shape ({listing}): resample it onto one grid")
        return d
