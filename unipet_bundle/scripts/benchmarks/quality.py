"""Quality benchmark: UniPET against the low-dose input, a tuned Gaussian, the vanilla universal model,
DRF-specific models and the two ablations, per DRF, on the held-out test subjects (SIMULATED data).

    cd unipet_bundle && python -m scripts.benchmarks.quality --work_dir ../../unipet_data

The models are those of :mod:`scripts.benchmarks.train_models` (same ``--work_dir``); UniPET is the shipped
``models/model.pt`` (its SHA-256 checked against ``large_files.yml``). Every model runs the same
Gaussian-blended sliding window as training validation on the whole 4 mm volume; the scores are those of
the evaluate workflow (:func:`scripts.metrics.image_quality.quality_metrics`: PSNR/SSIM on SUV clipped to
[0, 20] with data range 20, NRMSE, texture ratio inside the RALS mask of the full dose;
:func:`scripts.evaluation.regions.region_rows`: lesion SUVmax bias versus the full dose, on unclipped SUV).

The Gaussian baseline is a 3D Gaussian whose FWHM is tuned per DRF on the validation subjects (best mean
PSNR over a grid), i.e. the best a physicist's post-filter can do on this data. DRF 30 is in no training
set; the DRF-specific column there uses the nearest trained DRF's model (20), marked ``*``.

Writes ``<out_dir>/quality.json``, ``cases.csv`` (one row per model, subject and DRF), ``quality.md`` and
``quality.png``; with ``--update_docs`` (default) also the table in ``docs/README.md`` (between the
``quality-table`` markers), ``docs/quality.png`` and ``eval_metrics`` in ``configs/metadata.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from scripts.benchmarks.train_models import ALL_DRFS, TRAIN_DRFS
from scripts.data.io import UniPETInputError, atomic_write, atomic_write_json, load_nifti
from scripts.data.layout import format_drf
from scripts.data.recon import gaussian_filter_mm
from scripts.deploy.large_files import recorded_sha256
from scripts.engines.checkpoint import CheckpointError, file_sha256, load_checkpoint, verify_sha256
from scripts.evaluation.regions import load_label_table, region_rows
from scripts.evaluation.report import write_csv
from scripts.inference.denoise import denoise_volume, network_from_config
from scripts.networks.unipet import match_checkpoint_san_variant
from scripts.inference.inputs import voxel_spacing
from scripts.losses.rals import stylized_mask
from scripts.metrics.image_quality import psnr, quality_metrics

logger = logging.getLogger("unipet.quality")

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
METRICS = ("psnr", "ssim", "nrmse", "texture_ratio")
GAUSSIAN_FWHM_MM = (0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 14.0)
TABLE_BEGIN, TABLE_END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"
CASE_COLUMNS = ("model", "subject", "drf", *METRICS, "lesions", "mean_abs_lesion_suvmax_bias_pct")

# model key -> (table label, checkpoint below <work_dir>/models, or None for the shipped model)
NETWORK_MODELS: dict[str, tuple[str, str | None]] = {
    "unipet": ("UniPET (SAN + RALS)", None),
    "vanilla": ("vanilla universal", "vanilla/model_stage1.pt"),
    "drf_specific": ("DRF-specific", "drf_{drf}/model_stage1.pt"),
    "san_only": ("ablation: SAN alone", "san_only/model.pt"),
    "rals_only": ("ablation: RALS alone", "rals_only/model.pt"),
}
LABELS = {"input": "low-dose input", "gaussian": "Gaussian, FWHM tuned per DRF",
          **{k: v[0] for k, v in NETWORK_MODELS.items()}}


def _nearest_trained(drf: float, trained: Sequence[float] = TRAIN_DRFS) -> int:
    return int(min(trained, key=lambda d: abs(math.log(d) - math.log(drf))))


def _subject_volumes(data: Path, subject: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], Any, Any]:
    full, affine = load_nifti(data / subject / "full_dose.nii.gz")
    spacing = tuple(float(v) for v in voxel_spacing(affine))
    labels = table = None
    if (data / subject / "labels.nii.gz").is_file():
        labels, _ = load_nifti(data / subject / "labels.nii.gz", dtype=np.int32)
        table = load_label_table(data / subject / "labels.json")
    return full, affine, spacing, labels, table


def score(pred: np.ndarray, full: np.ndarray, labels: np.ndarray | None, table: Mapping | None,
          low: np.ndarray, spacing: Sequence[float], subject: str, drf: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluate workflow's metrics of one output, plus the mean |lesion SUVmax bias| of its lesions.

    ``settings``: the training config's ``suv_max`` (clip and data range) and RALS mask keys."""
    s = float(settings["suv_max"])
    p, f = torch.from_numpy(pred)[None, None], torch.from_numpy(full)[None, None]
    mask = stylized_mask(f.clamp(0.0, s), window=int(settings["rals_window"]), threshold=float(settings["rals_threshold_suv2"]))
    row: dict[str, Any] = quality_metrics(p, f, mask, data_range=s, clip_max=s)
    biases = []
    if labels is not None:
        voxel_ml = float(np.prod(spacing)) / 1000.0
        for r in region_rows(subject, drf, labels, table or {}, full, low, pred, voxel_ml):
            if r["kind"] == "lesion" and math.isfinite(r["suvmax_bias_pct"]):
                biases.append(r["suvmax_bias_pct"])
    row["lesions"] = len(biases)
    row["mean_abs_lesion_suvmax_bias_pct"] = float(np.mean(np.abs(biases))) if biases else float("nan")
    row["_lesion_biases"] = biases
    return row


def tune_gaussian(data: Path, subjects: Sequence[str], drfs: Sequence[float], suv_max: float,
                  fwhms: Sequence[float] = GAUSSIAN_FWHM_MM) -> dict[str, dict[str, Any]]:
    """Per DRF, the FWHM (mm) with the best mean PSNR on ``subjects`` (validation), and that PSNR."""
    psnrs = {format_drf(d): np.zeros(len(fwhms)) for d in drfs}
    for subject in tqdm(subjects, desc="tuning the Gaussian on validation subjects", unit="subject"):
        full, _, spacing, _, _ = _subject_volumes(data, subject)
        f = torch.from_numpy(full)[None, None]
        for d in drfs:
            low, _ = load_nifti(data / subject / f"drf_{format_drf(d)}.nii.gz")
            for i, fwhm in enumerate(fwhms):
                g = torch.from_numpy(gaussian_filter_mm(low, spacing, fwhm))[None, None]
                psnrs[format_drf(d)][i] += float(psnr(g, f, suv_max, suv_max)[0]) / len(subjects)
    return {d: {"fwhm_mm": float(fwhms[int(np.argmax(v))]), "val_psnr": float(v.max())} for d, v in psnrs.items()}


def _load_networks(work: Path, checkpoint: Path, config: Path, drfs: Sequence[float]) -> tuple[dict, dict]:
    """{(model key, drf or None): network}, and provenance {model key: {drf: path, sha256}}."""
    nets: dict[tuple[str, int | None], torch.nn.Module] = {}
    info: dict[str, Any] = {}
    template, settings = network_from_config(config, BUNDLE_ROOT)  # parsed once; each model gets a copy

    def load(path: Path, expected: str | None = None) -> torch.nn.Module:
        if not path.is_file():
            raise UniPETInputError(f"{path} not found: train it with `python -m scripts.benchmarks.train_models` first")
        net = copy.deepcopy(template)
        digest = verify_sha256(path, expected) if expected else file_sha256(path)
        state = load_checkpoint(path)
        net = match_checkpoint_san_variant(net, state)  # the shipped weights use the 0.2.0 SAN (v1)
        net.load_state_dict(state)
        info[str(path)] = digest
        return net.eval()

    for key, (_, rel) in NETWORK_MODELS.items():
        if rel is None:
            nets[(key, None)] = load(checkpoint, recorded_sha256(checkpoint, BUNDLE_ROOT))
        elif "{drf}" in rel:
            for d in sorted({_nearest_trained(d) for d in drfs}):
                nets[(key, d)] = load(work / "models" / rel.format(drf=d))
        else:
            nets[(key, None)] = load(work / "models" / rel)
    return nets, {"checkpoints_sha256": info, **settings}


def _simulated_from_real(subject_dir: Path) -> bool:
    try:
        return json.loads((subject_dir / "simulation.json").read_text())["source"]["kind"] == "real SUV volume"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _mean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def summarise(rows: Sequence[Mapping[str, Any]], biases: Mapping[tuple[str, str], list[float]]) -> dict[str, dict[str, Any]]:
    """{model: {drf: means over test subjects (+ mean |lesion SUVmax bias| over all their lesions)}}."""
    out: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        out[model] = {}
        for drf in dict.fromkeys(r["drf"] for r in rows if r["model"] == model):
            at = [r for r in rows if r["model"] == model and r["drf"] == drf]
            entry = {m: _mean([r[m] for r in at]) for m in METRICS}
            lesion = biases.get((model, drf), [])
            entry["mean_abs_lesion_suvmax_bias_pct"] = float(np.mean(np.abs(lesion))) if lesion else None
            entry["subjects"] = len(at)
            entry["lesions"] = len(lesion)
            out[model][drf] = entry
    return out


def check_targets(summary: Mapping[str, Mapping[str, Mapping[str, Any]]], drfs: Sequence[str]) -> list[dict[str, Any]]:
    """The issue's targets, each with its numbers and whether it is met."""
    u, checks = summary["unipet"], []

    def db(model: str, d: str) -> float:
        return summary[model][d]["psnr"]

    for d in drfs:
        margin = 1.0 if float(d) >= 20 else 0.0
        gain_in, gain_g = db("unipet", d) - db("input", d), db("unipet", d) - db("gaussian", d)
        checks.append({"target": f"DRF {d}: UniPET PSNR above the input and the tuned Gaussian" + (" by >= 1 dB" if margin else ""),
                       "value": f"{gain_in:+.2f} dB vs input, {gain_g:+.2f} dB vs Gaussian",
                       "met": bool(gain_in >= margin and gain_g >= margin) if margin else bool(gain_in > 0 and gain_g > 0)})
        gap = db("unipet", d) - db("drf_specific", d)
        spec = "" if float(d) in TRAIN_DRFS else f" (the DRF-{_nearest_trained(float(d))} model: no model is trained at DRF {d})"
        checks.append({"target": f"DRF {d}: UniPET within 0.2 dB of (or above) the DRF-specific model{spec}",
                       "value": f"{gap:+.2f} dB", "met": bool(gap >= -0.2)})
        gap_v = db("unipet", d) - db("vanilla", d)
        checks.append({"target": f"DRF {d}: UniPET above the vanilla universal model" + (" (unseen DRF)" if float(d) not in TRAIN_DRFS else ""),
                       "value": f"{gap_v:+.2f} dB", "met": bool(gap_v > 0)})
        tu, tv = u[d]["texture_ratio"], summary["vanilla"][d]["texture_ratio"]
        defined = tu is not None and tv is not None  # None: no stylized region in any test subject
        checks.append({"target": f"DRF {d}: UniPET texture ratio closer to 1 than the vanilla model's",
                       "value": f"{tu:.3f} vs {tv:.3f}" if defined else "n/a", "met": bool(defined and abs(1 - tu) < abs(1 - tv))})
    b = u.get("20", {}).get("mean_abs_lesion_suvmax_bias_pct")
    checks.append({"target": "DRF 20: UniPET mean absolute lesion SUVmax bias under 10 %", "value": f"{b:.1f} %" if b is not None else "n/a",
                   "met": bool(b is not None and b < 10)})
    return checks


def _fmt(v: Any, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def markdown(result: Mapping[str, Any]) -> str:
    """The model card's table: one block per DRF, one row per model, and the targets."""
    s, drfs = result["summary"], result["drfs"]
    clip = float(result["provenance"]["suv_max"])
    order = ["input", "gaussian", "vanilla", "drf_specific", "san_only", "rals_only", "unipet"]
    lines = [
        f"Results on **simulated data** ({result['data']}), produced by `{result['command']}`.",
        f"PSNR/SSIM on SUV clipped to [0, {clip:g}] (data range {clip:g}), NRMSE, texture ratio (1 = full-dose texture, "
        "< 1 = over-smoothed) inside the RALS mask, mean |lesion SUVmax bias| vs the full dose over the "
        f"{result['lesions_per_drf']} lesions of the phantom test subjects. Means over {result['n_test_subjects']} "
        "test subjects. DRF 30 is unseen in training (`*`: the DRF-20 model stands in for a DRF-specific one).",
        "",
        "| DRF | model | PSNR dB | SSIM | NRMSE | texture ratio | lesion SUVmax bias % |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in drfs:
        for m in order:
            e = s[m][d]
            label = LABELS[m] + (" *" if m == "drf_specific" and float(d) not in TRAIN_DRFS else "")
            if m == "gaussian":
                label += f" ({result['gaussian'][d]['fwhm_mm']:g} mm)"
            bold = "**" if m == "unipet" else ""
            lines.append(f"| {d} | {bold}{label}{bold} | {bold}{_fmt(e['psnr'], 2)}{bold} | {_fmt(e['ssim'], 4)} | "
                         f"{_fmt(e['nrmse'], 4)} | {_fmt(e['texture_ratio'], 3)} | {_fmt(e['mean_abs_lesion_suvmax_bias_pct'], 1)} |")
    met = sum(c["met"] for c in result["targets"])
    lines += ["", f"Targets ({met} of {len(result['targets'])} met):", "", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {c['target']} | {c['value']} | {'yes' if c['met'] else '**no**'} |" for c in result["targets"]]
    real = result.get("real_subject")
    if real:
        lines += ["", f"The test subject simulated from the real series ({real['subject']}), PSNR dB:", "",
                  "| DRF | " + " | ".join(LABELS[m] for m in order) + " |", "|---" * (len(order) + 1) + "|"]
        for d in drfs:
            lines.append(f"| {d} | " + " | ".join(_fmt(real["psnr"].get(m, {}).get(d), 2) for m in order) + " |")
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, drfs = result["summary"], result["drfs"]
    x = [float(d) for d in drfs]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    for m in ["input", "gaussian", "vanilla", "drf_specific", "san_only", "rals_only", "unipet"]:
        style = dict(lw=2.5, color="k") if m == "unipet" else dict(lw=1.2)
        for ax, key in zip(axes, ("psnr", "texture_ratio", "mean_abs_lesion_suvmax_bias_pct")):
            ax.plot(x, [s[m][d][key] if s[m][d][key] is not None else np.nan for d in drfs], marker="o", label=LABELS[m], **style)
    for ax, title in zip(axes, ("PSNR (dB)", "texture ratio (1 = full-dose texture)", "mean |lesion SUVmax bias| (%)")):
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{d:g}" for d in x])
        ax.set_xlabel("dose reduction factor (30: unseen in training)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="grey", ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"UniPET quality benchmark on SIMULATED data ({result['n_test_subjects']} test subjects)")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def update_model_card(docs: Path, table: str) -> None:
    text = docs.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise UniPETInputError(f"{docs} lacks the {TABLE_BEGIN} / {TABLE_END} markers: restore them from the repository")
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    atomic_write(docs, lambda tmp: tmp.write_text(f"{head}{TABLE_BEGIN}\n{table}{TABLE_END}{tail}"))


def update_metadata(metadata: Path, result: Mapping[str, Any]) -> None:
    meta = json.loads(metadata.read_text())
    s = result["summary"]
    metrics: dict[str, Any] = {"data": f"SIMULATED: {result['data']}", "command": result["command"]}
    for d in result["drfs"]:
        for m, keys in (("unipet", METRICS), ("vanilla", ("psnr", "texture_ratio")), ("drf_specific", ("psnr",)),
                        ("gaussian", ("psnr",)), ("input", ("psnr",))):
            for k in keys:
                v = s[m][d][k]
                metrics[f"drf{d}_{m}_{k}"] = round(v, 4) if v is not None else None
        b = s["unipet"][d]["mean_abs_lesion_suvmax_bias_pct"]
        metrics[f"drf{d}_unipet_mean_abs_lesion_suvmax_bias_pct"] = round(b, 2) if b is not None else None
    metrics["targets_met"] = f"{sum(c['met'] for c in result['targets'])} of {len(result['targets'])}"
    meta["eval_metrics"] = metrics
    text = json.dumps(meta, indent=4) + "\n"  # the file's own layout, so the diff shows only eval_metrics
    atomic_write(metadata, lambda tmp: tmp.write_text(text))


def run(
    work_dir: str,
    out_dir: str | None = None,
    checkpoint: str | None = None,
    drfs: Any = ALL_DRFS,
    update_docs: bool = True,
    threads: int = 0,
) -> dict[str, Any]:
    """Evaluate every model on the test subjects and write the quality table (see the module docstring).

    Args:
        work_dir: the train_models work folder (sim/ with datalist.json, models/).
        out_dir: where the report goes (default <work_dir>/quality).
        checkpoint: UniPET weights (default: the shipped models/model.pt, SHA-256 checked).
        drfs: DRFs to evaluate (default 4, 10, 20, 30, 50, 100; 30 is unseen in training).
        update_docs: write the table into docs/README.md and eval_metrics into configs/metadata.json.
        threads: torch CPU threads (0: PyTorch's default).
    """
    if threads:
        torch.set_num_threads(int(threads))
    work = Path(work_dir).expanduser().absolute()
    data = work / "sim"
    datalist = data / "datalist.json"
    if not datalist.is_file():
        raise UniPETInputError(f"{datalist} not found: run `python -m scripts.benchmarks.train_models data --work_dir {work_dir}`")
    split = json.loads(datalist.read_text())
    test = list(dict.fromkeys(e["subject"] for e in split["test"]))
    val = list(dict.fromkeys(e["subject"] for e in split["validation"]))
    drf_list = [float(d) for d in (drfs if isinstance(drfs, (list, tuple)) else [drfs])]
    drf_names = [format_drf(d) for d in drf_list]
    out = Path(out_dir).expanduser() if out_dir else work / "quality"
    ckpt = Path(checkpoint).expanduser() if checkpoint else BUNDLE_ROOT / "models" / "model.pt"
    config = BUNDLE_ROOT / "configs" / "train.json"

    nets, provenance = _load_networks(work, ckpt, config, drf_list)
    gaussian = tune_gaussian(data, val, drf_list, float(provenance["suv_max"]))
    logger.info("Gaussian FWHM per DRF (tuned on %d validation subjects): %s", len(val),
                {d: g["fwhm_mm"] for d, g in gaussian.items()})

    rows: list[dict[str, Any]] = []
    biases: dict[tuple[str, str], list[float]] = {}
    cases = [(s, d) for s in test for d in drf_list]
    bar = tqdm(cases, desc="test cases (subject x DRF)", unit="case")
    for subject, drf in bar:
        d = format_drf(drf)
        full, _, spacing, labels, table = _subject_volumes(data, subject)
        low, _ = load_nifti(data / subject / f"drf_{d}.nii.gz")
        outputs = {"input": low, "gaussian": gaussian_filter_mm(low, spacing, gaussian[d]["fwhm_mm"])}
        for key in NETWORK_MODELS:
            net = nets[(key, _nearest_trained(drf))] if key == "drf_specific" else nets[(key, None)]
            outputs[key] = denoise_volume(net, low, provenance["suv_max"], provenance["patch_size"], provenance["sw_batch_size"])
        for model, pred in outputs.items():
            row = score(pred, full, labels, table, low, spacing, subject, d, provenance)
            biases.setdefault((model, d), []).extend(row.pop("_lesion_biases"))
            rows.append({"model": model, "subject": subject, "drf": d, **row})
        case = {r["model"]: r["psnr"] for r in rows[-len(outputs):]}
        bar.set_postfix_str(f"{subject} DRF {d}: UniPET {case['unipet']:.2f} dB, input {case['input']:.2f} dB")

    summary = summarise(rows, biases)
    real = [s for s in test if _simulated_from_real(data / s)]
    result: dict[str, Any] = {
        "description": "UniPET quality benchmark (simulated data)",
        "data": (f"{len(test)} held-out test subjects of scripts.data.simulate: {', '.join(test)}; DRFs "
                 f"{', '.join(drf_names)} (30 unseen in training); the real-series subject is the TCIA STS_001 FDG scan "
                 "used as an activity map and simulated, not a real low-dose scan"),
        "command": f"python -m scripts.benchmarks.quality --work_dir {work_dir}",
        "drfs": drf_names, "test_subjects": test, "validation_subjects": val, "n_test_subjects": len(test),
        "lesions_per_drf": len(biases.get(("unipet", drf_names[0]), [])),
        "gaussian": gaussian, "summary": summary, "provenance": provenance,
    }
    result["targets"] = check_targets(summary, drf_names)
    if real:
        result["real_subject"] = {"subject": real[0], "psnr": {
            m: {r["drf"]: r["psnr"] for r in rows if r["model"] == m and r["subject"] == real[0]} for m in LABELS}}
    table = markdown(result)

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "cases.csv", rows, CASE_COLUMNS)
    atomic_write_json(out / "quality.json", result)
    atomic_write(out / "quality.md", lambda tmp: tmp.write_text(table))
    plot(result, out / "quality.png")
    if update_docs:
        plot(result, BUNDLE_ROOT / "docs" / "quality.png")
        update_model_card(BUNDLE_ROOT / "docs" / "README.md", table)
        update_metadata(BUNDLE_ROOT / "configs" / "metadata.json", result)
    print(table)
    print(f"wrote {out / 'quality.json'}, cases.csv, quality.md, quality.png" + (" and updated docs/README.md, configs/metadata.json" if update_docs else ""))
    return result


def main() -> None:
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # serialize: the returned result is written to files and printed as a table, not dumped again
        fire.Fire(run, name="python -m scripts.benchmarks.quality", serialize=lambda _: None)
    except (UniPETInputError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
