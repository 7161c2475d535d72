"""Ignite handler that scores every evaluated item on the SUV scale and writes the ``eval/`` report.

Attach it to the evaluator of ``configs/evaluate.json`` (it is listed among ``validate#handlers``). Per item
(one subject at one DRF) it computes, with :mod:`scripts.metrics.image_quality` (the code that also scores
validation during training), PSNR, 3D SSIM, NRMSE and the texture ratio of the denoised output and of the
low-dose input against the full dose, logs one line, and, where a label map exists, the lesion/organ bias
(:mod:`scripts.evaluation.regions`). When the run completes it writes, each file atomically:

- ``metrics.csv``: one row per subject and DRF (``inf`` / ``nan`` written as such);
- ``regions.csv``: one row per subject, DRF and region (only when some subject has a label map);
- ``summary.json``: per-DRF means, counts, data kind (simulated or not), checkpoint path and SHA-256;
- ``montage_<subject>.png``: see :mod:`scripts.evaluation.montage`.

An earlier report in ``eval_dir`` is not replaced unless asked (:func:`check_eval_dir`, run by evaluate.json
before anything is evaluated, with the ``overwrite`` key).

Units: the evaluator's ``image``/``label``/``pred`` are normalised (SUV clipped to [0, suv_max] / suv_max);
they are multiplied back by ``suv_max`` and the image metrics use SUV clipped to [0, suv_max] with data
range ``suv_max`` (20). The region statistics use the unclipped SUV of the input files (the output is as the
network gives it), so a lesion hotter than ``suv_max`` shows what the clipping costs.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch

from scripts.common.errors import UniPETInputError
from scripts.common.geometry import voxel_spacing
from scripts.common.io import atomic_write, atomic_write_json
from scripts.common.options import as_bool
from scripts.data.io import load_nifti
from scripts.data.layout import format_drf, natural_key, read_grid
from scripts.data.orientation import DEFAULT_AXCODES, check_axcodes, to_network_view
from scripts.evaluation.display import axcodes_affine
from scripts.evaluation.montage import MontageRow, take_views, write_montage
from scripts.evaluation.regions import (
    REGION_COLUMNS,
    hottest_lesion_voxel,
    load_label_table,
    region_rows,
    region_stats,
    summarise_regions,
)
from scripts.losses.rals import stylized_mask
from scripts.metrics.image_quality import quality_metrics

__all__ = ["METRIC_COLUMNS", "REPORT_FILES", "EvaluationReport", "check_eval_dir", "format_value", "write_csv"]

logger = logging.getLogger(__name__)

_METRICS = ("psnr", "psnr_refmax", "ssim", "nrmse", "texture_ratio")
METRIC_COLUMNS = (
    "subject",
    "split",
    "drf",
    *_METRICS,
    *(f"input_{m}" for m in _METRICS),
    "psnr_gain_db",
    "mask_fraction",
)
"""metrics.csv columns: no prefix = denoised output vs full dose, ``input_`` = low-dose input vs full dose."""


REPORT_FILES = ("metrics.csv", "regions.csv", "summary.json")
"""The report files of ``eval_dir`` that an earlier evaluation leaves (montages are named per subject)."""


def check_eval_dir(eval_dir: str | os.PathLike, overwrite: Any = False) -> Path:
    """Refuse, before anything is evaluated, to replace the report of an earlier evaluation.

    Raises:
        UniPETInputError: ``eval_dir`` holds one of :data:`REPORT_FILES` and ``overwrite`` is false.
    """
    folder = Path(eval_dir)
    taken = [name for name in REPORT_FILES if (folder / name).exists()]
    if taken and not as_bool(overwrite, "overwrite"):
        raise UniPETInputError(
            f"{folder} already holds {', '.join(taken)} of an earlier evaluation: choose another --eval_dir "
            "(or --output_dir), or pass --overwrite true to replace them"
        )
    return folder


def format_value(value: Any) -> str:
    """CSV text: floats with 6 significant digits, ``inf``/``-inf``/``nan`` spelled out, others as ``str``."""
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.6g}"
    return str(value)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` with exactly ``columns`` (header first), atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([format_value(r.get(c, "")) for c in columns])
    text = buf.getvalue()
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _finite_mean(values: Sequence[float]) -> float | None:
    vals = [float(v) for v in values if math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def _json_safe(obj: Any) -> Any:
    """Strict JSON: NaN/inf become None (the CSV keeps them spelled out)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def network_array(array: np.ndarray, affine: np.ndarray, axcodes: str) -> np.ndarray:
    """A volume read from disk in the network orientation (a view), like the evaluated arrays."""
    return to_network_view(array, affine, axcodes)[0]


class _Subject:
    """What the report keeps per subject across its DRFs: grid, montage slices, and (while the subject is
    being evaluated) its label map and full-dose SUV, released when the next subject starts."""

    def __init__(
        self, name: str, label_path: str, labels_path: str | None, full_suv: np.ndarray, axcodes: str = DEFAULT_AXCODES
    ) -> None:
        self.name, self.label_path, self.labels_path, self.axcodes = name, label_path, labels_path, axcodes
        shape, affine = read_grid(label_path)
        # the evaluated arrays are in the network orientation (train.json's Orientationd): so are the files' here
        dummy, affine = to_network_view(np.broadcast_to(np.float32(0), tuple(shape)), affine, axcodes)
        shape = dummy.shape
        if tuple(shape) != tuple(full_suv.shape):
            raise UniPETInputError(
                f"{name}: the evaluated volume has shape {tuple(full_suv.shape)} but {label_path} has {tuple(shape)}; "
                "evaluation needs preprocessing without resampling"
            )
        self.spacing = tuple(voxel_spacing(affine).tolist())
        self.voxel_ml = float(np.prod(self.spacing)) / 1000.0
        self.simulated = (Path(label_path).parent / "simulation.json").is_file()
        self.labels = self.table = self.full_stats = self.full_raw = None
        where = None
        if labels_path:
            self.load_arrays()
            where = hottest_lesion_voxel(self.full_raw, self.labels, self.table)
        if where is not None:
            self.position, self.where = where[0], f"hottest lesion ({where[1]})"
        else:
            self.position, self.where = tuple(s // 2 for s in full_suv.shape), "volume centre"
        self.display_affine = axcodes_affine(axcodes, self.spacing)  # the montage orients its panels from it
        self.full_views = take_views(full_suv, self.position, self.display_affine)
        self.montage_rows: list[MontageRow] = []

    def load_arrays(self) -> None:
        """Read the label map, its table and the unclipped full dose (for the region statistics)."""
        if not self.labels_path or self.labels is not None:
            return
        full_raw = network_array(*load_nifti(self.label_path), self.axcodes)
        labels = network_array(*load_nifti(self.labels_path, dtype=np.int32), self.axcodes)
        if labels.shape != full_raw.shape:
            raise UniPETInputError(
                f"{self.name}: label map {self.labels_path} has shape {labels.shape}, image "
                f"{full_raw.shape}; write the label map on the image grid"
            )
        self.labels, self.full_raw = labels, full_raw
        self.table = load_label_table(Path(self.labels_path).with_name("labels.json"))
        self.full_stats = region_stats(full_raw, labels, [int(i) for i in np.unique(labels) if i != 0])

    def release(self) -> None:
        """Drop the whole-volume arrays (a whole-body label map and SUV volume per subject add up)."""
        self.labels = self.full_raw = None


class EvaluationReport:
    """Score each evaluated (subject, DRF) item and write ``metrics.csv``, ``regions.csv``, ``summary.json``, montages.

    The batch items must carry ``subject``, ``drf``, ``label_path`` and optionally ``image_path``,
    ``labels`` (label map path) and ``split`` (see :func:`scripts.evaluation.split.evaluation_datalist`); the
    evaluator output carries ``image``, ``label`` and ``pred`` of shape (1, X, Y, Z) in normalised units.

    Args:
        eval_dir: output folder (created).
        suv_max: normalisation scale and clip (SUV); metrics use data range ``suv_max``.
        checkpoint_info: from :func:`scripts.evaluation.weights.load_eval_weights`, copied into the summary.
        dataset_dir: recorded in the summary.
        rals_threshold_suv2, rals_window: the stylized-region mask on the full dose (SUV^2 threshold), as in
            training.
        texture_window: box of the local standard deviation in the texture ratio.
        write_montages: draw ``montage_<subject>.png``.
        montage_suv_window: image display range (SUV); montage_diff_max: difference range (+-SUV).
        axcodes: ``network_axcodes``: the orientation of the evaluated arrays; label maps and raw volumes
            read from disk are reoriented to it.
    """

    def __init__(
        self,
        eval_dir: str | os.PathLike,
        suv_max: float = 20.0,
        checkpoint_info: Mapping[str, Any] | None = None,
        dataset_dir: str | os.PathLike | None = None,
        rals_threshold_suv2: float = 1e-3,
        rals_window: int = 3,
        texture_window: int = 3,
        write_montages: bool = True,
        montage_suv_window: Sequence[float] = (0.0, 7.0),
        montage_diff_max: float = 2.0,
        axcodes: str = DEFAULT_AXCODES,
    ) -> None:
        self.eval_dir = Path(eval_dir)
        self.axcodes = check_axcodes(axcodes)
        self.suv_max = float(suv_max)
        self.checkpoint_info = dict(checkpoint_info or {})
        self.dataset_dir = str(dataset_dir) if dataset_dir is not None else None
        self.rals_threshold_suv2 = float(rals_threshold_suv2)
        self.rals_window = int(rals_window)
        self.texture_window = int(texture_window)
        self.write_montages = bool(write_montages)
        self.montage_suv_window = (float(montage_suv_window[0]), float(montage_suv_window[1]))
        self.montage_diff_max = float(montage_diff_max)
        self.rows: list[dict[str, Any]] = []
        self.region_rows: list[dict[str, Any]] = []
        self.subjects: dict[str, _Subject] = {}
        self._current: str | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _reset(self, engine: Engine | None = None) -> None:
        self.rows, self.region_rows, self.subjects, self._current = [], [], {}, None

    # ------------------------------------------------------------------ per item
    def record(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(batch, dict):  # evaluator built with decollate=False
            batch, output = decollate_batch(batch), decollate_batch(output)
        for item, out in zip(batch, output):
            self.add_item(item, out)

    def add_item(self, item: Mapping[str, Any], out: Mapping[str, Any]) -> dict[str, Any]:
        """Score one item; returns its metrics row (also kept for :meth:`write`)."""
        subject = str(item["subject"])
        drf = format_drf(float(item["drf"]))
        s = self.suv_max

        def _suv(key: str) -> torch.Tensor:
            t = out[key]
            t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
            return (t.detach().float().cpu() * s)[None]  # (1, 1, X, Y, Z)

        pred, low, full = _suv("pred"), _suv("image"), _suv("label")
        mask = stylized_mask(full.clamp(0.0, s), window=self.rals_window, threshold=self.rals_threshold_suv2)
        den = quality_metrics(pred, full, mask, data_range=s, clip_max=s, texture_window=self.texture_window)
        inp = quality_metrics(low, full, mask, data_range=s, clip_max=s, texture_window=self.texture_window)
        row = {
            "subject": subject,
            "split": str(item.get("split", "")),
            "drf": drf,
            **den,
            **{f"input_{k}": v for k, v in inp.items()},
            "psnr_gain_db": den["psnr"] - inp["psnr"],  # inf for a perfect output, NaN when both are perfect
            "mask_fraction": float(mask.mean()),
        }
        self.rows.append(row)
        logger.info(
            "%s DRF %s: PSNR %.2f dB (input %.2f dB, gain %+.2f), SSIM %.4f (input %.4f), NRMSE %.4f, texture ratio %.3f",
            subject,
            drf,
            den["psnr"],
            inp["psnr"],
            row["psnr_gain_db"],
            den["ssim"],
            inp["ssim"],
            den["nrmse"],
            den["texture_ratio"],
        )

        if subject not in self.subjects:
            self.subjects[subject] = _Subject(
                subject, str(item["label_path"]), item.get("labels") or None, full[0, 0].numpy(), self.axcodes
            )
        subj = self.subjects[subject]
        if self._current not in (None, subject):
            self.subjects[self._current].release()
        self._current = subject
        subj.load_arrays()
        pred_np, low_np = pred[0, 0].numpy(), low[0, 0].numpy()
        if subj.labels is not None:
            low_raw = network_array(*load_nifti(item["image_path"]), self.axcodes) if item.get("image_path") else low_np
            self.region_rows += region_rows(
                subject,
                drf,
                subj.labels,
                subj.table,
                subj.full_raw,
                low_raw,
                pred_np,
                subj.voxel_ml,
                subj.full_stats,
                spacing=subj.spacing,
            )
        if self.write_montages:
            views = [take_views(v, subj.position, subj.display_affine) for v in (low_np, pred_np)]
            subj.montage_rows.append(
                MontageRow(drf, views[0], views[1], den["psnr"], inp["psnr"], den["ssim"], inp["ssim"])
            )
        return row

    # ------------------------------------------------------------------ at the end
    def summary(self) -> dict[str, Any]:
        """The content of ``summary.json`` (strict JSON: undefined means are None)."""
        per_drf: dict[str, dict[str, Any]] = {}
        for drf in sorted({r["drf"] for r in self.rows}, key=float):
            at = [r for r in self.rows if r["drf"] == drf]
            entry: dict[str, Any] = {"subjects": len({r["subject"] for r in at})}
            for col in METRIC_COLUMNS[3:]:
                entry[col] = _finite_mean([r[col] for r in at])
            for col in ("psnr", "input_psnr"):
                entry[f"{col}_inf_count"] = sum(1 for r in at if math.isinf(r[col]))
            entry["texture_ratio_nan_count"] = sum(1 for r in at if math.isnan(r["texture_ratio"]))
            if entry["psnr"] is not None and entry["input_psnr"] is not None:
                entry["beats_input_psnr"] = bool(entry["psnr"] > entry["input_psnr"])
            per_drf[drf] = entry
        n_sim = sum(s.simulated for s in self.subjects.values())
        n = len(self.subjects)
        if n and n_sim == n:
            kind = "simulated data: every evaluated subject has a simulation.json (not patient scans)"
        elif n_sim:
            kind = f"mixed: {n_sim} of {n} evaluated subjects are simulated data (simulation.json), the others are paired scans"
        else:
            kind = "paired scans: no evaluated subject has a simulation.json"
        summary: dict[str, Any] = {
            "description": "UniPET per-DRF evaluation: denoised output and low-dose input versus the full dose",
            "data_kind": kind,
            "simulated_subjects": n_sim,
            "dataset_dir": self.dataset_dir,
            "subjects": n,
            "items": len(self.rows),
            "splits": {
                sp: len({r["subject"] for r in self.rows if r["split"] == sp})
                for sp in dict.fromkeys(r["split"] for r in self.rows)
            },
            "checkpoint": self.checkpoint_info,
            "definitions": {
                "intensity": f"SUV clipped to [0, {self.suv_max:g}], data range {self.suv_max:g}",
                "psnr": "UniPET's PSNR: 10 log10(range^2 / MSE) dB on the clipped SUV above; means exclude inf "
                "(identical volumes), counted in *_inf_count",
                "psnr_refmax": "UDPET's PSNR (most peers): 10 log10(max(full dose)^2 / MSE) dB on unclipped SUV; "
                "not comparable with psnr",
                "beats_input_psnr": "per DRF: the mean output PSNR is above the mean input PSNR (the only baseline "
                "here; the quality benchmark adds the tuned Gaussian and other models)",
                "ssim": "3D SSIM, 11^3 Gaussian window, sigma 1.5 voxels",
                "nrmse": "||x - full|| / ||full||",
                "texture_ratio": f"mean local std ({self.texture_window}^3) of x over that of the full dose inside the RALS "
                f"stylized mask (full-dose local variance >= {self.rals_threshold_suv2:g} SUV^2); 1 = full-dose texture",
                "prefix input_": "the low-dose input itself; no prefix: the denoised output",
                "regions": "SUVmean/SUVmax bias % = 100 (x - ref) / ref, unclipped SUV; ref = full dose (*_bias_pct) "
                "or labels.json true_suv (*_bias_true_pct); lesions also SUVpeak (1 mL sphere), rc_max = "
                "SUVmax / true SUV, cr = contrast recovery vs a 4-10 mm host-tissue shell, by size bin "
                "(regions_per_drf.*.lesions_by_size, signed means); liver: SUVmean bias (QIBA bar 5 %) and CoV",
            },
            "per_drf": per_drf,
        }
        if self.region_rows:
            summary["regions_per_drf"] = summarise_regions(self.region_rows)
        return _json_safe(summary)

    def write(self, engine: Engine | None = None) -> None:
        """Write every output into ``eval_dir`` (each file atomically)."""
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        rows = sorted(self.rows, key=lambda r: (natural_key(r["subject"]), float(r["drf"])))
        write_csv(self.eval_dir / "metrics.csv", rows, METRIC_COLUMNS)
        files = {"metrics": "metrics.csv"}
        if self.region_rows:
            write_csv(self.eval_dir / "regions.csv", self.region_rows, REGION_COLUMNS)
            files["regions"] = "regions.csv"
        montages = []
        if self.write_montages:
            for subj in self.subjects.values():
                rows_sorted = sorted(subj.montage_rows, key=lambda r: float(r.drf))
                name = f"montage_{_safe_name(subj.name)}.png"
                title = (
                    f"{subj.name}: slices through the {subj.where}; images {self.montage_suv_window[0]:g}-"
                    f"{self.montage_suv_window[1]:g} SUV, difference +-{self.montage_diff_max:g} SUV"
                )
                write_montage(
                    self.eval_dir / name,
                    title,
                    subj.full_views,
                    rows_sorted,
                    subj.spacing,
                    subj.position,
                    self.montage_suv_window,
                    self.montage_diff_max,
                    affine=subj.display_affine,
                )
                montages.append(name)
        files["montages"] = montages
        summary = self.summary()
        summary["files"] = files
        atomic_write_json(self.eval_dir / "summary.json", summary)
        for drf, entry in summary["per_drf"].items():
            logger.info(
                "DRF %s (%d subjects): PSNR %s dB (input %s), SSIM %s (input %s), texture ratio %s",
                drf,
                entry["subjects"],
                _fmt(entry["psnr"]),
                _fmt(entry["input_psnr"]),
                _fmt(entry["ssim"], 4),
                _fmt(entry["input_ssim"], 4),
                _fmt(entry["texture_ratio"], 3),
            )
        logger.info("evaluation written to %s", self.eval_dir)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
