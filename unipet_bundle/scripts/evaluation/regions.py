"""Lesion and organ quantification: SUVmean / SUVmax bias (%) of the input and the output versus the full dose.

A denoiser can win on PSNR and still shave the peak off every small lesion; clinical reading uses SUVmax
and SUVmean of regions, so those are scored per region from an integer label map (``labels.nii.gz``) and
its table (``labels.json``: ``{"<label>": {"name", "kind": "organ" | "lesion", "true_suv", "volume_ml"}}``,
written by ``scripts.data.simulate``). Bias is ``100 * (value - reference) / reference``; the reference is
the full-dose image and, when the table gives it, the true SUV of the (simulated) activity.

All arrays are SUV volumes (x, y, z) on the label map's grid; values are not clipped here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from scripts.data.io import UniPETInputError

__all__ = [
    "REGION_COLUMNS",
    "bias_pct",
    "hottest_lesion_voxel",
    "load_label_table",
    "region_rows",
    "region_stats",
    "summarise_regions",
]

logger = logging.getLogger(__name__)

_BIAS_COLUMNS = (
    "input_suvmean_bias_pct", "input_suvmax_bias_pct", "suvmean_bias_pct", "suvmax_bias_pct",
    "full_suvmean_bias_true_pct", "full_suvmax_bias_true_pct",
    "input_suvmean_bias_true_pct", "input_suvmax_bias_true_pct",
    "suvmean_bias_true_pct", "suvmax_bias_true_pct",
)
REGION_COLUMNS = (
    "subject", "drf", "label", "name", "kind", "voxels", "volume_ml", "true_suv",
    "full_suvmean", "full_suvmax", "input_suvmean", "input_suvmax", "suvmean", "suvmax",
    *_BIAS_COLUMNS,
)
"""regions.csv columns: no prefix = denoised output, ``input_`` = low-dose input, ``full_`` = full dose;
``*_bias_pct`` versus the full dose, ``*_bias_true_pct`` versus ``true_suv`` (empty when unknown)."""


def load_label_table(path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """``labels.json`` as ``{label: {...}}`` with integer keys; ``{}`` when the file does not exist.

    Raises:
        UniPETInputError: the file exists but is not a JSON object keyed by integer labels.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {int(k): dict(v) for k, v in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise UniPETInputError(f"{path}: not a label table {{\"<int label>\": {{name, kind, true_suv}}}} ({exc}); fix or remove it") from exc


def bias_pct(value: float, reference: float | None) -> float:
    """``100 * (value - reference) / reference``; NaN when the reference is missing, zero or not finite."""
    if reference is None or not math.isfinite(reference) or reference == 0 or not math.isfinite(value):
        return float("nan")
    return 100.0 * (value - reference) / reference


def region_stats(suv: np.ndarray, labels: np.ndarray, ids: Sequence[int]) -> dict[int, tuple[float, float]]:
    """``{label: (SUVmean, SUVmax)}`` of ``suv`` inside each label of ``ids`` (one pass per statistic)."""
    if suv.shape != labels.shape:
        raise UniPETInputError(f"label map shape {labels.shape} differs from the image shape {suv.shape}; "
                               "the label map must be on the image grid")
    ids = [int(i) for i in ids]
    if not ids:
        return {}
    means = ndimage.mean(suv, labels, ids)
    maxes = ndimage.maximum(suv, labels, ids)
    return {i: (float(m), float(x)) for i, m, x in zip(ids, np.atleast_1d(means), np.atleast_1d(maxes))}


def _kind(info: Mapping[str, Any]) -> str:
    return str(info.get("kind", "unknown")).lower()


def hottest_lesion_voxel(full_suv: np.ndarray, labels: np.ndarray, table: Mapping[int, Mapping[str, Any]]) -> tuple[tuple[int, ...], str] | None:
    """Centre voxel of the lesion with the highest full-dose SUVmax, and its name (for the montage slices).

    The centre is the lesion's centroid rounded to a voxel, or its hottest voxel when the centroid falls
    outside it (a curved lesion). None when the label map holds no label of kind ``lesion``.
    """
    lesions = [i for i, info in table.items() if _kind(info) == "lesion" and np.any(labels == i)]
    if not lesions:
        return None
    stats = region_stats(full_suv, labels, lesions)
    best = max(lesions, key=lambda i: stats[i][1])
    inside = labels == best
    pos = tuple(int(round(c)) for c in ndimage.center_of_mass(inside))
    if not inside[pos]:
        pos = np.unravel_index(int(np.argmax(np.where(inside, full_suv, -np.inf))), inside.shape)
    return tuple(int(p) for p in pos), str(table[best].get("name", f"label {best}"))


def region_rows(
    subject: str,
    drf: str,
    labels: np.ndarray,
    table: Mapping[int, Mapping[str, Any]],
    full_suv: np.ndarray,
    input_suv: np.ndarray,
    pred_suv: np.ndarray,
    voxel_ml: float,
    full_stats: Mapping[int, tuple[float, float]] | None = None,
) -> list[dict[str, Any]]:
    """One row per label present in ``labels`` (background 0 excluded), columns :data:`REGION_COLUMNS`.

    Args:
        subject, drf: row identifiers.
        labels: integer label map (x, y, z).
        table: ``labels.json`` content (labels missing from it get name ``label_<n>`` and kind ``unknown``).
        full_suv, input_suv, pred_suv: full dose, low-dose input and denoised output in SUV, same shape.
        voxel_ml: voxel volume in mL.
        full_stats: precomputed :func:`region_stats` of the full dose (it is the same for every DRF).
    """
    ids = [int(i) for i in np.unique(labels) if i != 0]
    full = full_stats if full_stats is not None else region_stats(full_suv, labels, ids)
    low, den = region_stats(input_suv, labels, ids), region_stats(pred_suv, labels, ids)
    counts = dict(zip(*np.unique(labels, return_counts=True)))
    rows = []
    for i in ids:
        info = table.get(i, {})
        true = info.get("true_suv")
        true = float(true) if isinstance(true, (int, float)) and not isinstance(true, bool) else None
        (fm, fx), (lm, lx), (dm, dx) = full[i], low[i], den[i]
        rows.append({
            "subject": subject, "drf": drf, "label": i, "name": str(info.get("name", f"label_{i}")),
            "kind": _kind(info), "voxels": int(counts[i]), "volume_ml": int(counts[i]) * voxel_ml,
            "true_suv": true if true is not None else float("nan"),
            "full_suvmean": fm, "full_suvmax": fx, "input_suvmean": lm, "input_suvmax": lx, "suvmean": dm, "suvmax": dx,
            "input_suvmean_bias_pct": bias_pct(lm, fm), "input_suvmax_bias_pct": bias_pct(lx, fx),
            "suvmean_bias_pct": bias_pct(dm, fm), "suvmax_bias_pct": bias_pct(dx, fx),
            "full_suvmean_bias_true_pct": bias_pct(fm, true), "full_suvmax_bias_true_pct": bias_pct(fx, true),
            "input_suvmean_bias_true_pct": bias_pct(lm, true), "input_suvmax_bias_true_pct": bias_pct(lx, true),
            "suvmean_bias_true_pct": bias_pct(dm, true), "suvmax_bias_true_pct": bias_pct(dx, true),
        })
    return rows


def _mean_abs(values: Iterable[float]) -> float | None:
    vals = [abs(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def summarise_regions(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per DRF: region counts and the mean |bias| (%) of every bias column, for lesions and for organs.

    Keys look like ``mean_abs_lesion_suvmax_bias_pct`` (denoised vs full dose, the headline number) and
    ``mean_abs_lesion_input_suvmax_bias_pct`` (the low-dose input, for comparison); None when undefined.
    """
    out: dict[str, dict[str, Any]] = {}
    for drf in dict.fromkeys(r["drf"] for r in rows):
        at = [r for r in rows if r["drf"] == drf]
        entry: dict[str, Any] = {}
        for kind in ("lesion", "organ"):
            sel = [r for r in at if r["kind"] == kind]
            entry[f"n_{kind}s"] = len(sel)
            if sel:
                for col in _BIAS_COLUMNS:
                    entry[f"mean_abs_{kind}_{col}"] = _mean_abs(r[col] for r in sel)
        out[drf] = entry
    return out
