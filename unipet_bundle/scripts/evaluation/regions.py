"""Lesion and organ quantification: SUVmean / SUVmax bias (%) of the input and the output versus the full dose.

A denoiser can win on PSNR and still shave the peak off every small lesion; clinical reading uses SUVmax
and SUVmean of regions, so those are scored per region from an integer label map (``labels.nii.gz``) and
its table (``labels.json``: ``{"<label>": {"name", "kind": "organ" | "lesion", "true_suv", "volume_ml"}}``,
written by ``scripts.data.simulate``). Bias is ``100 * (value - reference) / reference``; the reference is
the full-dose image and, when the table gives it, the true SUV of the (simulated) activity.

Lesion-level scoring (with ``spacing``): per lesion SUVmax, SUVpeak (the highest mean over a 1 mL sphere,
12.4 mm across, centred on a lesion voxel, as PERCIST defines it) and SUVmean, each as bias versus the full
dose and versus the true SUV; the recovery coefficient RC = SUVmax / true SUV; and the contrast recovery
CR = (SUVmean / background - 1) / (true contrast - 1), with the background measured in a shell of host tissue
(4-10 mm outside the lesion's edge, voxels of its host tissue only). Lesions are binned by true
diameter (:data:`SIZE_BINS_MM`). Organs: SUVmean bias and the coefficient of variation (noise) inside the
organ eroded by one voxel (QIBA reads the liver: SUVmean within 5 % of the reference is the bar).

All arrays are SUV volumes (x, y, z) on the label map's grid; values are not clipped here.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from scripts.common.errors import UniPETInputError

__all__ = [
    "REGION_COLUMNS",
    "SIZE_BINS_MM",
    "bias_pct",
    "size_bin",
    "suv_peak",
    "hottest_lesion_voxel",
    "load_label_table",
    "region_rows",
    "region_stats",
    "lesion_summary",
    "liver_summary",
    "summarise_regions",
]

logger = logging.getLogger(__name__)

_BIAS_COLUMNS = (
    "input_suvmean_bias_pct",
    "input_suvmax_bias_pct",
    "suvmean_bias_pct",
    "suvmax_bias_pct",
    "full_suvmean_bias_true_pct",
    "full_suvmax_bias_true_pct",
    "input_suvmean_bias_true_pct",
    "input_suvmax_bias_true_pct",
    "suvmean_bias_true_pct",
    "suvmax_bias_true_pct",
)
_PEAK_COLUMNS = (
    "input_suvpeak_bias_pct",
    "suvpeak_bias_pct",
    "full_suvpeak_bias_true_pct",
    "input_suvpeak_bias_true_pct",
    "suvpeak_bias_true_pct",
)
# Lesion-only numbers after diameter_mm, size_bin and host: NaN on organ and background rows.
_LESION_NUMBER_COLUMNS = (
    "background_suv",
    "true_contrast",
    "full_suvpeak",
    "input_suvpeak",
    "suvpeak",
    *_PEAK_COLUMNS,
    "full_rc_max",
    "input_rc_max",
    "rc_max",
    "full_cr",
    "input_cr",
    "cr",
    "full_cov_pct",
    "input_cov_pct",
    "cov_pct",
)
REGION_COLUMNS = (
    "subject",
    "drf",
    "label",
    "name",
    "kind",
    "voxels",
    "volume_ml",
    "true_suv",
    "full_suvmean",
    "full_suvmax",
    "input_suvmean",
    "input_suvmax",
    "suvmean",
    "suvmax",
    *_BIAS_COLUMNS,
    "diameter_mm",
    "size_bin",
    "host",
    *_LESION_NUMBER_COLUMNS,
)
SIZE_BINS_MM = ((0.0, 10.0, "<10 mm"), (10.0, 20.0, "10-20 mm"), (20.0, math.inf, ">=20 mm"))
"""Lesion size bins by true diameter: (lower, upper, name), lower inclusive."""
_PEAK_ML = 1.0
_SHELL_MM = (4.0, 10.0)  # background shell around a lesion: from its edge + 4 mm to + 10 mm (spill-in spared)
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
        raise UniPETInputError(
            f'{path}: not a label table {{"<int label>": {{name, kind, true_suv}}}} ({exc}); fix or remove it'
        ) from exc


def bias_pct(value: float, reference: float | None) -> float:
    """``100 * (value - reference) / reference``; NaN when the reference is missing, zero or not finite."""
    if reference is None or not math.isfinite(reference) or reference == 0 or not math.isfinite(value):
        return float("nan")
    return 100.0 * (value - reference) / reference


def region_stats(suv: np.ndarray, labels: np.ndarray, ids: Sequence[int]) -> dict[int, tuple[float, float]]:
    """``{label: (SUVmean, SUVmax)}`` of ``suv`` inside each label of ``ids`` (one pass per statistic)."""
    if suv.shape != labels.shape:
        raise UniPETInputError(
            f"label map shape {labels.shape} differs from the image shape {suv.shape}; "
            "the label map must be on the image grid"
        )
    ids = [int(i) for i in ids]
    if not ids:
        return {}
    means = ndimage.mean(suv, labels, ids)
    maxes = ndimage.maximum(suv, labels, ids)
    return {i: (float(m), float(x)) for i, m, x in zip(ids, np.atleast_1d(means), np.atleast_1d(maxes))}


def _kind(info: Mapping[str, Any]) -> str:
    return str(info.get("kind", "unknown")).lower()


def hottest_lesion_voxel(
    full_suv: np.ndarray, labels: np.ndarray, table: Mapping[int, Mapping[str, Any]]
) -> tuple[tuple[int, ...], str] | None:
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


def size_bin(diameter_mm: float | None) -> str:
    """The :data:`SIZE_BINS_MM` name of a lesion diameter ("" when unknown)."""
    if diameter_mm is None or not math.isfinite(diameter_mm):
        return ""
    return next(name for lo, hi, name in SIZE_BINS_MM if lo <= diameter_mm < hi)


@functools.lru_cache(maxsize=16)
def _peak_kernel(spacing: tuple[float, float, float], volume_ml: float = _PEAK_ML) -> np.ndarray:
    """Normalised weights of a ``volume_ml`` sphere on the voxel grid (each voxel's fraction inside, 16^3
    sub-samples), so the weighted mean is the mean over exactly that sphere."""
    radius = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)  # mm; 1 mL -> 6.2 mm
    sub = 16  # 6 and 10 happen to miss the 1 mL volume by 1.4 % at 4 mm voxels (lattice effect); 16: < 0.1 %
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    axes = []
    for sp in spacing:
        r = int(math.ceil(radius / sp + 0.5))
        axes.append(((np.arange(-r, r + 1)[:, None] + offs[None, :]) * sp))
    X = axes[0][:, None, None, :, None, None]
    Y = axes[1][None, :, None, None, :, None]
    Z = axes[2][None, None, :, None, None, :]
    w = ((X**2 + Y**2 + Z**2) <= radius**2).mean(axis=(3, 4, 5))
    return (w / w.sum()).astype(np.float64)


def suv_peak(suv: np.ndarray, mask: np.ndarray, spacing: Sequence[float], volume_ml: float = _PEAK_ML) -> float:
    """SUVpeak: the highest mean SUV over a ``volume_ml`` sphere centred on a voxel of ``mask`` (PERCIST:
    1 mL, 1.2 cm across). Near the volume's faces the sphere is cut and the mean is over its inside part.
    NaN for an empty mask."""
    if not mask.any():
        return float("nan")
    k = _peak_kernel(tuple(float(v) for v in spacing), float(volume_ml))
    r = [(n - 1) // 2 for n in k.shape]
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - r, 0)
    hi = np.minimum(idx.max(0) + np.array(r) + 1, suv.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = np.asarray(suv[box], dtype=np.float64)
    inside = np.ones_like(sub)
    num = ndimage.correlate(sub, k, mode="constant", cval=0.0)
    den = ndimage.correlate(inside, k, mode="constant", cval=0.0)  # < 1 only where the sphere leaves the volume
    local = num / np.maximum(den, 1e-12)
    return float(local[mask[box]].max())


def _lesion_geometry(
    labels: np.ndarray, label: int, host_label: int | None, spacing: Sequence[float]
) -> tuple[np.ndarray, tuple[slice, ...], np.ndarray]:
    """(lesion mask in a box, the box, background-shell mask in the box) for one lesion."""
    m = labels == label
    idx = np.argwhere(m)
    pad = [int(math.ceil(_SHELL_MM[1] / s)) + 1 for s in spacing]
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + np.array(pad) + 1, labels.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    lab = labels[box]
    les = lab == label
    dist = ndimage.distance_transform_edt(~les, sampling=spacing)
    shell = (dist > _SHELL_MM[0]) & (dist <= _SHELL_MM[1])
    shell &= (lab == host_label) if host_label is not None else (lab > 0) & (lab < 100)
    return les, box, shell


def _cov_pct(suv: np.ndarray, mask: np.ndarray) -> float:
    vals = suv[mask]
    if vals.size < 2 or vals.mean() == 0:
        return float("nan")
    return float(100.0 * vals.std() / vals.mean())


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
    spacing: Sequence[float] | None = None,
    cov_organs: Sequence[str] = ("liver",),
) -> list[dict[str, Any]]:
    """One row per label present in ``labels`` (background 0 excluded), columns :data:`REGION_COLUMNS`.

    Args:
        subject, drf: row identifiers.
        labels: integer label map (x, y, z).
        table: ``labels.json`` content (labels missing from it get name ``label_<n>`` and kind ``unknown``).
        full_suv, input_suv, pred_suv: full dose, low-dose input and denoised output in SUV, same shape.
        voxel_ml: voxel volume in mL.
        full_stats: precomputed :func:`region_stats` of the full dose (it is the same for every DRF).
        spacing: voxel size (mm): with it, lesions also get SUVpeak, RC and CR (else those stay NaN).
        cov_organs: organ names whose CoV (noise, eroded by one voxel) is reported.
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
        rows.append(
            {
                "subject": subject,
                "drf": drf,
                "label": i,
                "name": str(info.get("name", f"label_{i}")),
                "kind": _kind(info),
                "voxels": int(counts[i]),
                "volume_ml": int(counts[i]) * voxel_ml,
                "true_suv": true if true is not None else float("nan"),
                "full_suvmean": fm,
                "full_suvmax": fx,
                "input_suvmean": lm,
                "input_suvmax": lx,
                "suvmean": dm,
                "suvmax": dx,
                "input_suvmean_bias_pct": bias_pct(lm, fm),
                "input_suvmax_bias_pct": bias_pct(lx, fx),
                "suvmean_bias_pct": bias_pct(dm, fm),
                "suvmax_bias_pct": bias_pct(dx, fx),
                "full_suvmean_bias_true_pct": bias_pct(fm, true),
                "full_suvmax_bias_true_pct": bias_pct(fx, true),
                "input_suvmean_bias_true_pct": bias_pct(lm, true),
                "input_suvmax_bias_true_pct": bias_pct(lx, true),
                "suvmean_bias_true_pct": bias_pct(dm, true),
                "suvmax_bias_true_pct": bias_pct(dx, true),
            }
        )
        row = rows[-1]
        for col in ("diameter_mm", *_LESION_NUMBER_COLUMNS):
            row[col] = float("nan")
        row["size_bin"], row["host"] = "", str(info.get("host", ""))
        if row["kind"] == "lesion":
            diam = _num(info.get("diameter_mm"))
            bg_true = _num(info.get("background_suv"))
            row["diameter_mm"] = diam if diam is not None else float("nan")
            row["size_bin"] = size_bin(diam)
            row["background_suv"] = bg_true if bg_true is not None else float("nan")
            contrast = true / bg_true if true is not None and bg_true else None
            row["true_contrast"] = contrast if contrast is not None else float("nan")
            if true:
                row["full_rc_max"], row["input_rc_max"], row["rc_max"] = fx / true, lx / true, dx / true
            if spacing is not None:
                host = info.get("host_label")
                les, box, shell = _lesion_geometry(labels, i, int(host) if host is not None else None, spacing)
                peaks = []
                for prefix, vol in (("full_", full_suv), ("input_", input_suv), ("", pred_suv)):
                    peak = suv_peak(vol[box], les, spacing)
                    peaks.append(peak)
                    row[f"{prefix}suvpeak"] = peak
                    if contrast is not None and contrast != 1 and shell.any():
                        bg = float(vol[box][shell].mean())
                        mean = float(vol[box][les].mean())
                        row[f"{prefix}cr"] = (mean / bg - 1.0) / (contrast - 1.0) if bg > 0 else float("nan")
                fp, lp, dp = peaks
                row.update(
                    {
                        "input_suvpeak_bias_pct": bias_pct(lp, fp),
                        "suvpeak_bias_pct": bias_pct(dp, fp),
                        "full_suvpeak_bias_true_pct": bias_pct(fp, true),
                        "input_suvpeak_bias_true_pct": bias_pct(lp, true),
                        "suvpeak_bias_true_pct": bias_pct(dp, true),
                    }
                )
        elif row["kind"] == "organ" and row["name"] in cov_organs:
            core = ndimage.binary_erosion(labels == i)
            if core.sum() >= 2:
                row["full_cov_pct"], row["input_cov_pct"], row["cov_pct"] = (
                    _cov_pct(full_suv, core),
                    _cov_pct(input_suv, core),
                    _cov_pct(pred_suv, core),
                )
    return rows


def _num(value: Any) -> float | None:
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


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
        lesions = [r for r in at if r["kind"] == "lesion"]
        if lesions:
            entry["lesions_by_size"] = {
                name: lesion_summary([r for r in lesions if r.get("size_bin") == name]) for _, _, name in SIZE_BINS_MM
            }
            entry["lesions_all"] = lesion_summary(lesions)
        liver = [r for r in at if r["kind"] == "organ" and r["name"] == "liver"]
        if liver:
            entry["liver"] = liver_summary(liver)
        out[drf] = entry
    return out


_LESION_SIGNED = (
    "suvmax_bias_pct",
    "suvpeak_bias_pct",
    "suvmean_bias_pct",
    "suvmax_bias_true_pct",
    "suvpeak_bias_true_pct",
    "suvmean_bias_true_pct",
    "input_suvmax_bias_pct",
    "input_suvpeak_bias_pct",
    "input_suvmean_bias_pct",
    "full_suvmax_bias_true_pct",
    "full_suvpeak_bias_true_pct",
    "rc_max",
    "input_rc_max",
    "full_rc_max",
    "cr",
    "input_cr",
    "full_cr",
)


def _signed_mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def lesion_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Lesion rows -> count, signed means (``mean_<col>``) and mean |bias| of the SUVmax/SUVpeak/SUVmean
    columns; undefined means are None."""
    out: dict[str, Any] = {"n": len(rows)}
    for col in _LESION_SIGNED:
        out[f"mean_{col}"] = _signed_mean(r.get(col) for r in rows)
    for col in ("suvmax_bias_pct", "suvpeak_bias_pct", "suvmean_bias_pct"):
        out[f"mean_abs_{col}"] = _mean_abs(r.get(col) for r in rows)
    return out


def liver_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Liver rows (one per subject) -> mean SUVmean bias vs the full dose and the truth, the worst |bias|,
    whether every subject is within the QIBA 5 % bar, and mean CoV (%) of output, input and full dose."""
    worst = _max_abs(r["suvmean_bias_pct"] for r in rows)
    return {
        "n": len(rows),
        "mean_suvmean_bias_pct": _signed_mean(r["suvmean_bias_pct"] for r in rows),
        "mean_input_suvmean_bias_pct": _signed_mean(r["input_suvmean_bias_pct"] for r in rows),
        "mean_suvmean_bias_true_pct": _signed_mean(r["suvmean_bias_true_pct"] for r in rows),
        "max_abs_suvmean_bias_pct": worst,
        "within_qiba_5pct": None if worst is None else bool(worst <= 5.0),
        "mean_cov_pct": _signed_mean(r.get("cov_pct") for r in rows),
        "mean_input_cov_pct": _signed_mean(r.get("input_cov_pct") for r in rows),
        "mean_full_cov_pct": _signed_mean(r.get("full_cov_pct") for r in rows),
    }


def _max_abs(values: Iterable[float]) -> float | None:
    vals = [abs(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(max(vals)) if vals else None
