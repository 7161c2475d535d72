"""Quality benchmark: UniPET against the low-dose input, a per-DRF tuned Gaussian and (when trained) the
vanilla universal model, DRF-specific models and the two ablations, per DRF, on two held-out test families
of SIMULATED data:

- ``in_family`` (``<work_dir>/sim``, datalist.json's test split): the training distribution (the
  domain-randomised profile, or the fixed one for 0.2.0 data); DRF 30 is unseen in training.
- ``unseen_recon`` (``<work_dir>/sim_unseen``, family.json): reconstructions outside the training ranges
  (``configs/simulation/unseen_recon.json``) and DRFs 7, 30, 150 never trained on.

    cd unipet_bundle && python -m scripts.benchmarks.quality --work_dir ../../unipet_data_v3 [--models unipet]

The models are those of :mod:`scripts.benchmarks.train_models` (same ``--work_dir``); UniPET is the shipped
``models/model.pt`` (its SHA-256 checked against ``large_files.yml``); ``--models`` picks a subset. Every
model is run by the bundle's own inference pipeline (``configs/inference.json`` through
``scripts.inference.denoise.BundleDenoiser``: orientation, precision wrapper, Gaussian-blended sliding
window with its window, overlap and padding, residual return), so the table comes from the workflow users
run; each whole volume stays on its own grid (``resample`` off, as evaluate.json: the simulated families are
on the 4 mm training grid already). ``quality.json``'s provenance records these settings. Scores:

- image: :func:`scripts.metrics.image_quality.quality_metrics`: ``psnr`` (UniPET's: SUV clipped to [0, 20],
  peak 20), ``psnr_refmax`` (UDPET's: unclipped, peak = max of the full dose; never mix the two), SSIM,
  NRMSE, texture ratio inside the RALS mask of the full dose;
- lesions (:func:`scripts.evaluation.regions.region_rows`, unclipped SUV): signed SUVmax, SUVpeak (1 mL) and
  SUVmean bias versus the full dose and the true SUV, recovery coefficient and contrast recovery, by size
  bin; a recovery-coefficient plot per family and DRF (``rc_<family>_drf_<d>.png``);
- liver: SUVmean bias (QIBA: within 5 %) and CoV; noise texture: the liver noise autocorrelation in-plane and
  axially of full dose, input, Gaussian and network per DRF (``texture_<family>.png``).

The Gaussian baseline is a 3D Gaussian whose FWHM is tuned per family and DRF on that family's validation
subjects (best mean PSNR over a grid): the best a physicist's post-filter can do on that data. For DRFs no
DRF-specific model was trained at, the nearest trained DRF's model stands in (marked ``*``).

Writes ``<out_dir>/quality.json`` (with, per family and DRF, which baselines UniPET beat), ``cases.csv``,
``regions.csv``, ``quality.md`` and the PNGs; with ``--update_docs`` (default) also the table in
``docs/README.md`` (between the ``quality-families-table`` markers) and ``docs/quality_families.png``.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from scripts.benchmarks.train_models import TRAIN_DRFS
from scripts.common.cli import run_command
from scripts.common.errors import UniPETInputError
from scripts.common.geometry import voxel_spacing
from scripts.common.io import atomic_write, atomic_write_json
from scripts.common.large_files import recorded_sha256
from scripts.common.weights import load_network_weights
from scripts.data.io import load_nifti
from scripts.data.layout import format_drf
from scripts.data.recon import gaussian_filter_mm
from scripts.evaluation.regions import REGION_COLUMNS, load_label_table, region_rows, summarise_regions
from scripts.evaluation.report import write_csv
from scripts.inference.denoise import BundleDenoiser, network_from_config
from scripts.losses.rals import stylized_mask
from scripts.metrics.image_quality import noise_autocorrelation, psnr, quality_metrics
from scripts.networks.drf_conditioned import (
    DRFConditionedUniPET,
    FixedDRF,
    NoiseConditionedUniPET,
    ThinningBlendUniPET,
)
from scripts.networks.unipet import match_checkpoint_san_variant

logger = logging.getLogger("unipet.quality")

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
METRICS = ("psnr", "ssim", "nrmse", "texture_ratio")
GAUSSIAN_FWHM_MM = (0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 14.0)
TABLE_BEGIN, TABLE_END = "<!-- quality-families-table:begin -->", "<!-- quality-families-table:end -->"
CASE_COLUMNS = (
    "family",
    "model",
    "subject",
    "drf",
    *METRICS,
    "psnr_refmax",
    "lesions",
    "mean_lesion_suvmax_bias_pct",
    "mean_abs_lesion_suvmax_bias_pct",
    "liver_suvmean_bias_pct",
    "liver_cov_pct",
    "acf1_inplane",
    "acf1_axial",
)
FAMILIES: dict[str, tuple[str, str]] = {
    "in_family": ("sim", "in-family (training distribution)"),
    "unseen_recon": ("sim_unseen", "unseen reconstruction (outside the training ranges)"),
}
BASELINES = (
    "input",
    "gaussian",
    "unet",
    "vanilla",
    "drf_specific",
    "san_only",
    "rals_only",
    "no_hotspot",
    "no_regional",
    "with_align",
)
# table order: the baselines UniPET is judged against, then the 0.5.2 trials and the 0.5.1 UniPET (shown, not judged
# against), then the shipped model
MODEL_ORDER = (
    *BASELINES,
    "regional_x5",
    "regional_focus",
    "unipet_0_5",
    "noise_styles",
    "film",
    "film_focus",
    "thinning_blend",
    "identity_pairs",
    "finetune_control",
    "finetune_identity",
    "unipet",
)

# model key -> (table label, checkpoint below <work_dir>/models, or None for the shipped model)
NETWORK_MODELS: dict[str, tuple[str, str | None]] = {
    "unipet": ("UniPET (SAN + RALS)", None),
    "vanilla": ("vanilla universal", "vanilla/model_stage1.pt"),
    "drf_specific": ("DRF-specific", "drf_{drf}/model_stage1.pt"),
    "san_only": ("ablation: SAN alone", "san_only/model.pt"),
    "rals_only": ("ablation: RALS alone", "rals_only/model.pt"),
    "unet": ("plain MONAI UNet (residual, L1)", "unet/model_stage1.pt"),
    "no_hotspot": ("ablation: no hot-spot sampling", "no_hotspot/model.pt"),
    "no_regional": ("ablation: no regional SUV loss", "no_regional/model.pt"),
    # 0.4.0's UniPET recipe (stage 2 with L_align at 0.2): the run whose stage 1 every branch starts from
    "with_align": ("ablation: + L_align (0.4.0 recipe)", "with_align/model.pt"),
    # 0.5.2 lesion-safety trials (train_models branches): the shipped recipe with a stronger regional loss
    "regional_x5": ("trial: regional loss x5", "regional_x5/model.pt"),
    "regional_focus": ("trial: regional loss x5, max focus 4", "regional_focus/model.pt"),
    # the UniPET shipped by 0.5.0-0.5.1 (uniform DRF sampling in stage 2)
    "unipet_0_5": ("0.5.1 UniPET (uniform DRF sampling)", "unipet/model.pt"),
    # 0.5.5: the "label given" upper bound (train_models.CONDITIONED_BRANCHES), run at each test volume's true DRF
    "film": ("upper bound: DRF given (FiLM)", "film/model.pt"),
    "film_focus": ("upper bound: DRF given, DRF-weighted focus", "film_focus/model.pt"),
    # 0.5.5 trial: label-free, styles from hand-made window statistics instead of the SAN
    "noise_styles": ("trial: styles from window noise statistics", "noise_styles/model.pt"),
    # 0.5.6 trial, DRF given: the shipped recipe with the output keeping 1/DRF of the input (the thinning identity)
    "thinning_blend": ("DRF given: input / DRF + (1 - 1/DRF) x UniPET", "thinning_blend/model.pt"),
    # 0.5.12: the shipped recipe with 15 % identity pairs (the full dose as its own input; train_models branch
    # identity_pairs), and its short trials from the shipped weights (train_models finetune: 300 more generator steps,
    # without and with the identity pairs)
    "identity_pairs": ("trial: 15 % identity pairs", "identity_pairs/model.pt"),
    "finetune_control": ("trial: shipped + 300 stage-2 steps", "finetune_control/model.pt"),
    "finetune_identity": ("trial: shipped + 300 stage-2 steps, 15 % identity pairs", "finetune_identity/model.pt"),
}
# models that are given the DRF: one network, run at each test volume's own DRF (FixedDRF)
CONDITIONED_MODELS = ("film", "film_focus", "thinning_blend")
# UniPET variants that are not the training config's network class: built with its UniPET settings
VARIANT_NETWORKS = {
    "film": DRFConditionedUniPET,
    "film_focus": DRFConditionedUniPET,
    "noise_styles": NoiseConditionedUniPET,
    "thinning_blend": ThinningBlendUniPET,
}
OPTIONAL_MODELS = (
    "no_hotspot",
    "no_regional",
    "with_align",
    "regional_x5",
    "regional_focus",
    "unipet_0_5",
    "film",
    "film_focus",
    "noise_styles",
    "thinning_blend",
    "identity_pairs",
    "finetune_control",
    "finetune_identity",
)
"""Scored by default only when their checkpoint exists (full-run ablations, ~1 h of CPU each)."""
# models whose network is not the training config's network_def (train_models.FULL_RUNS overrides it)
OTHER_NETWORKS = {"unet": "scripts.networks.plain_unet.ResidualUNet"}
LABELS = {
    "input": "low-dose input",
    "gaussian": "Gaussian, FWHM tuned per DRF",
    **{k: v[0] for k, v in NETWORK_MODELS.items()},
}


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


def _liver_core(labels: np.ndarray | None, table: Mapping | None) -> np.ndarray | None:
    """The liver eroded by one voxel (the uniform region for noise texture), or None."""
    if labels is None or not table:
        return None
    ids = [k for k, v in table.items() if v.get("kind") == "organ" and v.get("name") == "liver"]
    if not ids:
        return None
    from scipy import ndimage

    core = ndimage.binary_erosion(labels == ids[0])
    return core if core.sum() >= 27 else None


def score(
    pred: np.ndarray,
    full: np.ndarray,
    labels: np.ndarray | None,
    table: Mapping | None,
    low: np.ndarray,
    spacing: Sequence[float],
    subject: str,
    drf: str,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The evaluate workflow's metrics of one output, its lesion/organ rows and the lesion summary numbers.

    ``settings``: the training config's ``suv_max`` (clip and data range) and RALS mask keys. The returned
    row holds ``_regions`` (all region rows, for the lesion tables and plots) and ``_lesion_biases``."""
    s = float(settings["suv_max"])
    p, f = torch.from_numpy(pred)[None, None], torch.from_numpy(full)[None, None]
    mask = stylized_mask(
        f.clamp(0.0, s), window=int(settings["rals_window"]), threshold=float(settings["rals_threshold_suv2"])
    )
    row: dict[str, Any] = quality_metrics(p, f, mask, data_range=s, clip_max=s)
    biases, regions = [], []
    row["liver_suvmean_bias_pct"] = row["liver_cov_pct"] = float("nan")
    if labels is not None:
        voxel_ml = float(np.prod(spacing)) / 1000.0
        regions = region_rows(subject, drf, labels, table or {}, full, low, pred, voxel_ml, spacing=spacing)
        for r in regions:
            if r["kind"] == "lesion" and math.isfinite(r["suvmax_bias_pct"]):
                biases.append(r["suvmax_bias_pct"])
            if r["kind"] == "organ" and r["name"] == "liver":
                row["liver_suvmean_bias_pct"], row["liver_cov_pct"] = r["suvmean_bias_pct"], r["cov_pct"]
    row["lesions"] = len(biases)
    row["mean_abs_lesion_suvmax_bias_pct"] = float(np.mean(np.abs(biases))) if biases else float("nan")
    row["mean_lesion_suvmax_bias_pct"] = float(np.mean(biases)) if biases else float("nan")
    row["_lesion_biases"] = biases
    row["_regions"] = regions
    return row


def tune_gaussian(
    data: Path,
    subjects: Sequence[str],
    drfs: Sequence[float],
    suv_max: float,
    fwhms: Sequence[float] = GAUSSIAN_FWHM_MM,
) -> dict[str, dict[str, Any]]:
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


def _load_networks(
    work: Path, checkpoint: Path, config: Path, drfs: Sequence[float], models: Sequence[str]
) -> tuple[dict, dict]:
    """{(model key, drf or None): network} for ``models``, and provenance {checkpoints_sha256, settings}."""
    nets: dict[tuple[str, int | None], torch.nn.Module] = {}
    info: dict[str, Any] = {}
    template, settings = network_from_config(config, BUNDLE_ROOT)  # parsed once; each model gets a copy

    def load(path: Path, expected: str | None = None, build: Any = None) -> torch.nn.Module:
        if not path.is_file():
            raise UniPETInputError(
                f"{path} not found: train it with `python -m scripts.benchmarks.train_models` first "
                "(or leave that model out with --models)"
            )
        # strict: a benchmarked model is complete; the shipped weights use the 0.2.0 SAN (v1)
        net = copy.deepcopy(template) if build is None else build()
        net, weights = load_network_weights(net, path, expected, strict=True, adapt=match_checkpoint_san_variant)
        info[str(path)] = weights["checkpoint_sha256"]
        return net.eval()

    for key in models:
        rel = NETWORK_MODELS[key][1]
        build = _builder(key, template)
        if rel is None:
            nets[(key, None)] = load(checkpoint, recorded_sha256(checkpoint, BUNDLE_ROOT))
        elif key in CONDITIONED_MODELS:
            # the DRF-given upper bound: one network, run at each test volume's own DRF
            net = load(work / "models" / rel, build=build)
            for d in drfs:
                nets[(key, float(d))] = FixedDRF(net, float(d)).eval()
        elif "{drf}" in rel:
            for d in sorted({_nearest_trained(d) for d in drfs}):
                nets[(key, d)] = load(work / "models" / rel.format(drf=d))
        else:
            nets[(key, None)] = load(work / "models" / rel, build=build)
    return nets, {"checkpoints_sha256": info, **settings}


def _builder(key: str, template: torch.nn.Module) -> Any:
    """How to build model ``key``'s network before its weights load: None for a copy of the training config's own
    (``template``); a UniPET variant of another class (``VARIANT_NETWORKS``) gets the template's settings
    (``init_kwargs``)."""
    if key in VARIANT_NETWORKS:
        return lambda: VARIANT_NETWORKS[key](**template.init_kwargs)
    if key in OTHER_NETWORKS:
        module, _, cls = OTHER_NETWORKS[key].rpartition(".")
        return getattr(importlib.import_module(module), cls)
    return None


def _denoiser(
    net: torch.nn.Module,
    key: tuple[str, int | None],
    settings: Mapping[str, Any],
    inference_overrides: Mapping[str, Any] | None = None,
) -> BundleDenoiser:
    """``net`` run by the bundle's own inference (``configs/inference.json``: orientation, precision wrapper,
    sliding window, residual), so the table comes from the workflow users run. Each test volume stays on its
    own grid (``resample`` off: the simulated families are on the 4 mm training grid already); the
    normalisation and orientation are the training config's (``settings``), as they belong to the weights."""
    name = key[0] if key[1] is None else f"{key[0]} (DRF {key[1]})"
    return BundleDenoiser(
        BUNDLE_ROOT,
        network=net,
        model_info={"checkpoint": name, "trained": True},
        overrides={
            "resample": False,
            "progress": False,
            "suv_max": float(settings["suv_max"]),
            "network_axcodes": settings["network_axcodes"],
            **dict(inference_overrides or {}),
        },
    )


def _inference_settings(denoiser: BundleDenoiser) -> dict[str, Any]:
    """The network step's settings as run (from ``configs/inference.json``), for the provenance."""
    inferer = denoiser.inferer
    return {
        "inference_config": "configs/inference.json",
        "resample": False,
        "patch_size": [int(v) for v in inferer.roi_size],
        "sw_batch_size": int(inferer.sw_batch_size),
        "overlap": float(inferer.overlap),
        "blend_mode": str(inferer.mode),
        "padding_mode": str(inferer.padding_mode),
        "precision": denoiser.inference_network.precision,
        "level_lock_fwhm_mm": float(denoiser.level_lock_fwhm_mm),
    }


def _simulated_from_real(subject_dir: Path) -> bool:
    try:
        return json.loads((subject_dir / "simulation.json").read_text())["source"]["kind"] == "real SUV volume"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _mean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def summarise(
    rows: Sequence[Mapping[str, Any]],
    biases: Mapping[tuple[str, str], list[float]],
    regions: Sequence[Mapping[str, Any]] = (),
) -> dict[str, dict[str, Any]]:
    """{model: {drf: means over test subjects, lesion numbers over all their lesions, liver}} of one family.

    ``regions``: region rows tagged with ``model``: they add the signed lesion summary by size bin
    (``lesions``), and the liver SUVmean bias / CoV (``liver``) per model and DRF."""
    out: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        out[model] = {}
        for drf in dict.fromkeys(r["drf"] for r in rows if r["model"] == model):
            at = [r for r in rows if r["model"] == model and r["drf"] == drf]
            entry = {m: _mean([r[m] for r in at]) for m in (*METRICS, "psnr_refmax") if all(m in r for r in at)}
            lesion = biases.get((model, drf), [])
            entry["mean_abs_lesion_suvmax_bias_pct"] = float(np.mean(np.abs(lesion))) if lesion else None
            entry["mean_lesion_suvmax_bias_pct"] = float(np.mean(lesion)) if lesion else None
            for key in ("acf1_inplane", "acf1_axial", "liver_cov_pct"):
                if any(key in r for r in at):
                    entry[key] = _mean([r.get(key, float("nan")) for r in at])
            entry["subjects"] = len(at)
            entry["lesions"] = len(lesion)
            sel = [r for r in regions if r.get("model") == model and r["drf"] == drf]
            if sel:
                reg = summarise_regions(sel)[drf]
                entry["lesions_by_size"] = reg.get("lesions_by_size")
                entry["lesions_all"] = reg.get("lesions_all")
                entry["liver"] = reg.get("liver")
            out[model][drf] = entry
    return out


def _gaussian_margin(drf: float) -> float:
    """Issue 15's PSNR margin over the tuned Gaussian: 1 dB at DRF >= 10, 0.3 dB below."""
    return 1.0 if drf >= 10 else 0.3


def baselines_beaten(
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]], drfs: Sequence[str], model: str = "unipet"
) -> dict[str, dict[str, Any]]:
    """Per DRF: which baselines ``model`` beats on PSNR, and which it does not (plain lists of model keys)."""
    out = {}
    for d in drfs:
        u = summary[model][d]["psnr"]
        others = [b for b in BASELINES if b in summary and d in summary[b] and b != model]
        out[d] = {
            "beaten_on_psnr": [b for b in others if u > summary[b][d]["psnr"]],
            "not_beaten_on_psnr": [b for b in others if not u > summary[b][d]["psnr"]],
            "psnr_margin_db": {b: round(u - summary[b][d]["psnr"], 3) for b in others},
        }
    return out


# Issue 15's PSNR-gap targets against the optional comparison models, in the order the targets table lists them:
# (model key in the summary, target wording ({tol} = the allowed shortfall in dB, from the bound), bound on UniPET's
# PSNR minus the model's in dB, whether the bound is strict). Each row applies only when that model was scored.
_PSNR_GAP_TARGETS: tuple[tuple[str, str, float, bool], ...] = (
    ("vanilla", "UniPET >= vanilla universal - {tol:g} dB", -0.05, False),
    ("drf_specific", "UniPET within {tol:g} dB of (or above) the DRF-specific model", -0.3, False),
    ("unet", "UniPET ahead of the plain MONAI UNet", 0.0, True),
)


def check_targets(
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]], drfs: Sequence[str], model: str = "unipet"
) -> list[dict[str, Any]]:
    """Issue 15's targets for the shipped UniPET that this summary can judge, each with its numbers and verdict.

    Needs ``input``, ``gaussian`` and ``model`` (default ``unipet``; another key judges that model by the same
    targets, e.g. the DRF-given upper bound ``film``); the vanilla, DRF-specific and plain-UNet comparisons
    (``_PSNR_GAP_TARGETS``) are added when those models were scored."""
    u, checks = summary[model], []

    def db(key: str, d: str) -> float:  # "unipet" stands for the judged model
        return summary[model if key == "unipet" else key][d]["psnr"]

    for d in drfs:
        margin = _gaussian_margin(float(d))
        gain_in, gain_g = db("unipet", d) - db("input", d), db("unipet", d) - db("gaussian", d)
        checks.append(
            {
                "target": f"DRF {d}: PSNR above the input and >= {margin:g} dB above the tuned Gaussian",
                "value": f"{gain_in:+.2f} dB vs input, {gain_g:+.2f} dB vs Gaussian",
                "met": bool(gain_in > 0 and gain_g >= margin),
            }
        )
        tu = u[d]["texture_ratio"]
        checks.append(
            {
                "target": f"DRF {d}: texture ratio within [0.85, 1.15]",
                "value": f"{tu:.3f}" if tu is not None else "n/a",
                "met": bool(tu is not None and 0.85 <= tu <= 1.15),
            }
        )
        lim = 10.0 if float(d) <= 20 else 15.0
        b, bg = u[d].get("mean_lesion_suvmax_bias_pct"), summary["gaussian"][d].get("mean_lesion_suvmax_bias_pct")
        ok = b is not None and abs(b) <= lim and (bg is None or abs(b) <= abs(bg))
        checks.append(
            {
                "target": f"DRF {d}: mean lesion SUVmax bias within +-{lim:g} % and no worse than the Gaussian's",
                "value": (f"{b:+.1f} % (Gaussian {bg:+.1f} %)" if bg is not None else f"{b:+.1f} %")
                if b is not None
                else "n/a",
                "met": bool(ok),
            }
        )
        liver = (u[d].get("liver") or {}).get("max_abs_suvmean_bias_pct")
        mean_liver = (u[d].get("liver") or {}).get("mean_suvmean_bias_pct")
        checks.append(
            {
                "target": f"DRF {d}: liver SUVmean within +-5 % of the full dose (every subject)",
                "value": f"{mean_liver:+.1f} % mean, {liver:.1f} % worst" if liver is not None else "n/a",
                "met": bool(liver is not None and liver <= 5.0),
            }
        )
        for baseline, wording, bound_db, strict in _PSNR_GAP_TARGETS:
            if baseline in summary:
                gap = db("unipet", d) - db(baseline, d)
                checks.append(
                    {
                        "target": f"DRF {d}: {wording.format(tol=-bound_db)}",
                        "value": f"{gap:+.2f} dB",
                        "met": bool(gap > bound_db if strict else gap >= bound_db),
                    }
                )
    return checks


def _fmt(v: Any, digits: int, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def markdown(result: Mapping[str, Any]) -> str:
    """The model card's tables: per family, one block per DRF, one row per model; baselines beaten; targets."""
    clip = float(result["provenance"]["suv_max"])
    scored = result.get("scored_on", "test")
    lines = [
        f"Results on **simulated data** ({result['data']}), produced by `{result['command']}`.",
        f"PSNR: UniPET's (SUV clipped to [0, {clip:g}], peak {clip:g}) and, in its own column, UDPET's (unclipped, "
        "peak = max of the full dose; not comparable with the first). Texture ratio: 1 = full-dose texture, < 1 "
        "over-smoothed. Lesion columns: signed mean SUVmax and SUVpeak (1 mL) bias vs the full dose over all "
        f"lesions of the {scored} subjects (negative = peaks lost). Liver: SUVmean bias vs the full dose (QIBA bar 5 %) "
        "and CoV (noise). acf1: liver noise autocorrelation at one voxel in-plane / axially (full dose for comparison).",
        "",
    ]
    order = [m for m in MODEL_ORDER if any(m in f["summary"] for f in result["families"].values())]
    for fam, fr in result["families"].items():
        s, drfs = fr["summary"], fr["drfs"]
        lines += [
            f"**{FAMILIES.get(fam, (None, fam))[1]}** (`{fam}`): {fr['n_test_subjects']} "
            f"{scored} subjects "
            f"({', '.join(fr['test_subjects'])}), {fr['lesions_per_drf']} lesions, DRFs {', '.join(drfs)}"
            f"{'; never trained on: ' + ', '.join(fr['unseen_drfs']) if fr['unseen_drfs'] else ''}.",
            "",
            "| DRF | model | PSNR dB (UniPET) | PSNR dB (UDPET, ref max) | SSIM | texture ratio | lesion SUVmax bias % | "
            "lesion SUVpeak bias % | liver SUVmean bias % | liver CoV % | acf1 in-plane / axial |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        full_acf = fr.get("full_dose_texture", {})
        for d in drfs:
            for m in order:
                if m not in s:
                    continue
                e = s[m][d]
                label = LABELS[m] + (" *" if m == "drf_specific" and float(d) not in TRAIN_DRFS else "")
                if m == "gaussian":
                    label += f" ({fr['gaussian'][d]['fwhm_mm']:g} mm)"
                bold = "**" if m == "unipet" else ""
                la = e.get("lesions_all") or {}
                liver = e.get("liver") or {}
                lines.append(
                    f"| {d} | {bold}{label}{bold} | {bold}{_fmt(e['psnr'], 2)}{bold} | {_fmt(e.get('psnr_refmax'), 2)} | "
                    f"{_fmt(e['ssim'], 4)} | {_fmt(e['texture_ratio'], 3)} | {_fmt(e.get('mean_lesion_suvmax_bias_pct'), 1, True)} | "
                    f"{_fmt(la.get('mean_suvpeak_bias_pct'), 1, True)} | {_fmt(liver.get('mean_suvmean_bias_pct'), 1, True)} | "
                    f"{_fmt(liver.get('mean_cov_pct'), 1)} | {_fmt(e.get('acf1_inplane'), 2)} / {_fmt(e.get('acf1_axial'), 2)} |"
                )
        if full_acf:
            lines += [
                "",
                f"Full dose: liver CoV {_fmt(full_acf.get('liver_cov_pct'), 1)} %, acf1 in-plane / axial "
                f"{_fmt(full_acf.get('acf1_inplane'), 2)} / {_fmt(full_acf.get('acf1_axial'), 2)}.",
            ]
        lines += ["", "Baselines beaten by UniPET on PSNR (UniPET's), per DRF:", ""]
        for d in drfs:
            b = fr["baselines_beaten"][d]
            lost = b["not_beaten_on_psnr"]
            lines.append(
                f"- DRF {d}: beats {'; '.join(LABELS[x] for x in b['beaten_on_psnr']) or 'none'}"
                + (f"; does **not** beat {'; '.join(LABELS[x] for x in lost)}" if lost else "")
                + f" (UniPET minus each: {'; '.join(f'{LABELS[k]} {v:+.2f} dB' for k, v in b['psnr_margin_db'].items())})"
            )
        met = sum(c["met"] for c in fr["targets"])
        lines += [
            "",
            f"Issue-15 targets on this family ({met} of {len(fr['targets'])} met):",
            "",
            "| target | value | met |",
            "|---|---|---|",
        ]
        lines += [f"| {c['target']} | {c['value']} | {'yes' if c['met'] else '**no**'} |" for c in fr["targets"]]
        for m, checks in (fr.get("targets_by_model") or {}).items():
            lines.append(
                f"\nThe same targets for {LABELS[m]} (not shippable: it is given the DRF): "
                f"{sum(c['met'] for c in checks)} of {len(checks)} met."
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: Mapping[str, Any], path: Path) -> None:
    """PSNR, texture ratio and signed lesion SUVmax bias versus DRF, one row per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(result["families"])
    fig, axes = plt.subplots(len(fams), 3, figsize=(16, 4.6 * len(fams)), constrained_layout=True, squeeze=False)
    for row, fam in zip(axes, fams):
        fr = result["families"][fam]
        s, drfs = fr["summary"], fr["drfs"]
        x = [float(d) for d in drfs]
        for m in MODEL_ORDER:
            if m not in s:
                continue
            style = dict(lw=2.5, color="k") if m == "unipet" else dict(lw=1.2)
            for ax, key in zip(row, ("psnr", "texture_ratio", "mean_lesion_suvmax_bias_pct")):
                ax.plot(
                    x,
                    [s[m][d].get(key) if s[m][d].get(key) is not None else np.nan for d in drfs],
                    marker="o",
                    label=LABELS[m],
                    **style,
                )
        for ax, title in zip(
            row, ("PSNR (dB, UniPET's)", "texture ratio (1 = full-dose texture)", "mean lesion SUVmax bias (%)")
        ):
            ax.set_xscale("log")
            ax.set_xticks(x, [f"{d:g}" for d in x])
            ax.set_xlabel("dose reduction factor")
            ax.set_title(f"{fam}: {title}")
            ax.grid(alpha=0.3)
        row[1].axhline(1.0, color="grey", ls="--")
        row[2].axhline(0.0, color="grey", ls="--")
        row[0].legend(fontsize=8)
    fig.suptitle("UniPET quality benchmark on SIMULATED data")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def plot_recovery(
    regions: Sequence[Mapping[str, Any]], family: str, drf: str, models: Sequence[str], path: Path
) -> None:
    """Recovery coefficient SUVmax / true SUV versus lesion diameter at one DRF: full dose, input, Gaussian,
    network(s); dots per lesion, lines through the means per size bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8), constrained_layout=True)
    les = [
        r for r in regions if r["kind"] == "lesion" and r["drf"] == drf and math.isfinite(r.get("rc_max", float("nan")))
    ]
    series = [("full dose", "unipet", "full_rc_max", "grey"), ("low-dose input", "unipet", "input_rc_max", "tab:red")]
    series += [
        (LABELS[m], m, "rc_max", c)
        for m, c in zip(models, ("tab:blue", "k", "tab:green", "tab:purple", "tab:orange", "tab:brown"))
    ]
    for name, model, col, colour in series:
        sel = [r for r in les if r.get("model") == model]
        if not sel:
            continue
        dia = np.array([r["diameter_mm"] for r in sel])
        rc = np.array([r[col] for r in sel])
        ax.scatter(dia, rc, s=10, alpha=0.5, color=colour)
        order = np.argsort(dia)
        k = max(1, len(order) // 6)
        centres = [float(dia[order[i : i + k]].mean()) for i in range(0, len(order), k)]
        means = [float(rc[order[i : i + k]].mean()) for i in range(0, len(order), k)]
        ax.plot(centres, means, color=colour, lw=2 if model == "unipet" and col == "rc_max" else 1.3, label=name)
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("lesion diameter (mm, true)")
    ax.set_ylabel("recovery coefficient SUVmax / true SUV")
    ax.set_title(
        f"{family}, DRF {drf}: lesion recovery (SIMULATED data, {len({(r['subject'], r['label']) for r in les})} lesions)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def plot_texture(textures: Mapping[str, Mapping[str, Any]], family: str, drfs: Sequence[str], path: Path) -> None:
    """Liver noise autocorrelation (in-plane solid, axial dashed) per DRF: full dose, input, Gaussian, networks.

    ``textures``: {drf or "full": {model: {"lags_inplane_mm", "acf_inplane", "lags_axial_mm", "acf_axial"}}}
    (means over the test subjects)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(drfs)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.8), constrained_layout=True, squeeze=False)
    colours = {
        "full": "grey",
        "input": "tab:red",
        "gaussian": "tab:blue",
        "unipet": "k",
        "vanilla": "tab:green",
        "drf_specific": "tab:purple",
        "san_only": "tab:orange",
        "rals_only": "tab:brown",
        "unet": "tab:olive",
        "no_hotspot": "tab:pink",
        "no_regional": "tab:cyan",
    }
    for ax, d in zip(axes[0], drfs):
        curves = {"full": textures.get("full", {}).get("full")} | dict(textures.get(d, {}))
        for model, c in curves.items():
            if not c:
                continue
            name = "full dose" if model == "full" else LABELS.get(model, model)
            ax.plot(c["lags_inplane_mm"], c["acf_inplane"], color=colours.get(model, "c"), label=name)
            ax.plot(c["lags_axial_mm"], c["acf_axial"], color=colours.get(model, "c"), ls="--")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_title(f"DRF {d}")
        ax.set_xlabel("lag (mm); solid in-plane, dashed axial")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("liver noise autocorrelation")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{family}: noise texture in the liver (SIMULATED data)")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def update_model_card(docs: Path, table: str) -> None:
    text = docs.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise UniPETInputError(
            f"{docs} lacks the {TABLE_BEGIN} / {TABLE_END} markers: restore them from the repository"
        )
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    atomic_write(docs, lambda tmp: tmp.write_text(f"{head}{TABLE_BEGIN}\n{table}{TABLE_END}{tail}"))


def _family_split(work: Path, family: str) -> tuple[Path, list[str], list[str]]:
    """(data folder, validation subjects, test subjects) of one test family."""
    if family not in FAMILIES:
        raise UniPETInputError(f"unknown family {family!r}: use {sorted(FAMILIES)}")
    data = work / FAMILIES[family][0]
    if family == "in_family":
        datalist = data / "datalist.json"
        if not datalist.is_file():
            raise UniPETInputError(
                f"{datalist} not found: run `python -m scripts.benchmarks.train_models data --work_dir {work}`"
            )
        split = json.loads(datalist.read_text())
        return (
            data,
            list(dict.fromkeys(e["subject"] for e in split["validation"])),
            list(dict.fromkeys(e["subject"] for e in split["test"])),
        )
    fam = data / "family.json"
    if not fam.is_file():
        raise UniPETInputError(
            f"{fam} not found: run `python -m scripts.benchmarks.train_models unseen_family --work_dir {work}` "
            "(or leave the family out with --families in_family)"
        )
    spec = json.loads(fam.read_text())
    return data, list(spec["validation"]), list(spec["test"])


def _family_drfs(data: Path, subjects: Sequence[str]) -> list[float]:
    """The DRFs every one of ``subjects`` was simulated at (from simulation.json)."""
    common = None
    for s in subjects:
        meta = data / s / "simulation.json"
        if not meta.is_file():
            raise UniPETInputError(
                f"{meta} not found: the test subject {s} is missing or not simulated; re-run the "
                "train_models data step, or give --drfs for paired scans"
            )
        d = set(float(v) for v in json.loads(meta.read_text())["drfs"])
        common = d if common is None else common & d
    return sorted(common or [])


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.replace("[", " ").replace("]", " ").replace(",", " ").split() if v]
    return [str(v) for v in value]


def run(
    work_dir: str,
    out_dir: str | None = None,
    checkpoint: str | None = None,
    drfs: Any = None,
    families: Any = ("in_family", "unseen_recon"),
    models: Any = None,
    max_test_subjects: int = 0,
    update_docs: bool = True,
    threads: int = 0,
    inference_overrides: Any = None,
    score_on: str = "test",
) -> dict[str, Any]:
    """Evaluate the models on the test families and write the quality tables (see the module docstring).

    Args:
        work_dir: the train_models work folder (sim/ with datalist.json, sim_unseen/ with family.json, models/).
        out_dir: where the report goes (default <work_dir>/quality).
        checkpoint: UniPET weights (default: the shipped models/model.pt, SHA-256 checked).
        drfs: DRFs to evaluate (default: every DRF the family's test subjects were simulated at).
        families: test families, e.g. "[in_family,unseen_recon]".
        models: network models to score (default: unipet, unet, vanilla, drf_specific, san_only, rals_only,
            and no_hotspot / no_regional when their checkpoints exist); the input and the tuned Gaussian are
            always scored.
        max_test_subjects: score only the first N test subjects of each family (0: all).
        update_docs: write the table into docs/README.md and docs/quality.png.
        threads: torch CPU threads (0: PyTorch's default).
        inference_overrides: ``configs/inference.json`` values for every network model, e.g.
            ``"{'level_lock_fwhm_mm': 20}"`` (default: the config's own).
        score_on: ``"test"`` (default: the model card's table) or ``"validation"``: each family's validation
            subjects only, the first half tuning the Gaussian and the second half scored, so that trials can be
            compared without touching a test subject (needs >= 2 validation subjects per family; never written
            into the docs).
    """
    from scripts.common.options import as_bool

    update_docs = as_bool(update_docs, "update_docs")  # "--update_docs false" arrives as a string
    if threads:
        torch.set_num_threads(int(threads))
    work = Path(work_dir).expanduser().absolute()
    fam_list = _as_list(families)
    model_list = _as_list(models) or [
        m for m in NETWORK_MODELS if m not in OPTIONAL_MODELS or (work / "models" / str(NETWORK_MODELS[m][1])).is_file()
    ]
    unknown = [m for m in model_list if m not in NETWORK_MODELS]
    if unknown or "unipet" not in model_list:
        raise UniPETInputError(f"--models {models!r}: must include unipet, from {list(NETWORK_MODELS)}")
    splits = {f: _family_split(work, f) for f in fam_list}
    if score_on not in ("test", "validation"):
        raise UniPETInputError(f"--score_on must be test or validation, got {score_on!r}")
    if score_on == "validation":
        for f, (data, val, _) in splits.items():
            if len(val) < 2:
                raise UniPETInputError(f"--score_on validation: {f} has {len(val)} validation subject(s), needs >= 2")
            splits[f] = (data, val[: len(val) // 2], val[len(val) // 2 :])
        if update_docs:
            logger.info("--score_on validation: the docs' table (test subjects) is left as it is")
            update_docs = False
    # never over the test run's files: a validation run has its own default folder
    out = Path(out_dir).expanduser() if out_dir else work / ("quality" if score_on == "test" else "quality_validation")
    ckpt = Path(checkpoint).expanduser() if checkpoint else BUNDLE_ROOT / "models" / "model.pt"
    config = BUNDLE_ROOT / "configs" / "train.json"
    fam_drfs: dict[str, list[float]] = {}
    for f, (data, val, test) in splits.items():
        if int(max_test_subjects) > 0:
            splits[f] = (data, val, test[: int(max_test_subjects)])
            test = splits[f][2]
        fam_drfs[f] = [float(d) for d in _as_list(drfs)] if drfs is not None else _family_drfs(data, test)
    all_drfs = sorted({d for v in fam_drfs.values() for d in v})
    nets, provenance = _load_networks(work, ckpt, config, all_drfs, model_list)
    if inference_overrides is not None and not isinstance(inference_overrides, Mapping):
        raise UniPETInputError(
            f"--inference_overrides {inference_overrides!r}: give a dict, e.g. \"{{'level_lock_fwhm_mm': 20}}\""
        )
    denoisers = {key: _denoiser(net, key, provenance, inference_overrides) for key, net in nets.items()}
    provenance.update(_inference_settings(next(iter(denoisers.values()))))
    out.mkdir(parents=True, exist_ok=True)

    result: dict[str, Any] = {
        "description": "UniPET quality benchmark (simulated data), per test family",
        # every argument that changes the table, so the recorded command reproduces it
        "command": f"python -m scripts.benchmarks.quality --work_dir {work_dir}"
        + (f" --checkpoint {checkpoint}" if checkpoint else "")
        + (f' --families "[{",".join(fam_list)}]"' if fam_list != ["in_family", "unseen_recon"] else "")
        + (f" --models {','.join(model_list)}" if models else "")
        + (f" --max_test_subjects {max_test_subjects}" if max_test_subjects else "")
        + (f' --drfs "[{",".join(format_drf(d) for d in all_drfs)}]"' if drfs is not None else "")
        + (f' --inference_overrides "{dict(inference_overrides)}"' if inference_overrides else "")
        + (" --score_on validation" if score_on == "validation" else ""),
        "scored_on": score_on,
        "models": model_list,
        "families": {},
        "provenance": provenance,
    }
    all_rows: list[dict[str, Any]] = []
    all_regions: list[dict[str, Any]] = []
    for fam, (data, val, test) in splits.items():
        drf_list = fam_drfs[fam]
        drf_names = [format_drf(d) for d in drf_list]
        gaussian = tune_gaussian(data, val, drf_list, float(provenance["suv_max"]))
        logger.info(
            "%s: Gaussian FWHM per DRF (tuned on %d validation subjects): %s",
            fam,
            len(val),
            {d: g["fwhm_mm"] for d, g in gaussian.items()},
        )
        rows: list[dict[str, Any]] = []
        regions: list[dict[str, Any]] = []
        biases: dict[tuple[str, str], list[float]] = {}
        textures: dict[str, dict[str, list]] = {}
        for subject in tqdm(test, desc=f"{fam}: {score_on} subjects", unit="subject"):
            full, _, spacing, labels, table = _subject_volumes(data, subject)
            liver = _liver_core(labels, table)
            if liver is not None:
                textures.setdefault("full", {}).setdefault("full", []).append(
                    noise_autocorrelation(full, liver, spacing)
                )
            for drf in drf_list:
                d = format_drf(drf)
                low, low_affine = load_nifti(data / subject / f"drf_{d}.nii.gz")
                outputs = {"input": low, "gaussian": gaussian_filter_mm(low, spacing, gaussian[d]["fwhm_mm"])}
                for key in model_list:
                    if key == "drf_specific":
                        denoise = denoisers[(key, _nearest_trained(drf))]
                    elif key in CONDITIONED_MODELS:
                        denoise = denoisers[(key, float(drf))]
                    else:
                        denoise = denoisers[(key, None)]
                    outputs[key] = denoise(low, low_affine, name=f"{subject} DRF {d}")
                for model, pred in outputs.items():
                    row = score(pred, full, labels, table, low, spacing, subject, d, provenance)
                    biases.setdefault((model, d), []).extend(row.pop("_lesion_biases"))
                    for r in row.pop("_regions"):
                        regions.append({"family": fam, "model": model, **r})
                    if liver is not None:
                        acf = noise_autocorrelation(pred, liver, spacing)
                        textures.setdefault(d, {}).setdefault(model, []).append(acf)
                        row["acf1_inplane"], row["acf1_axial"] = acf["acf_inplane"][1], acf["acf_axial"][1]
                    rows.append({"family": fam, "model": model, "subject": subject, "drf": d, **row})
                case = {r["model"]: r["psnr"] for r in rows[-len(outputs) :]}
                logger.info(
                    "%s %s DRF %s: UniPET %.2f dB, Gaussian %.2f dB, input %.2f dB",
                    fam,
                    subject,
                    d,
                    case["unipet"],
                    case["gaussian"],
                    case["input"],
                )
        summary = summarise(rows, biases, regions)
        texture_means = {k: {m: _mean_curve(v) for m, v in per.items()} for k, per in textures.items()}
        full_tex = texture_means.get("full", {}).get("full")
        train_drfs = set(float(x) for x in TRAIN_DRFS)
        fr: dict[str, Any] = {
            "data_dir": str(data),
            "drfs": drf_names,
            "unseen_drfs": [d for d in drf_names if float(d) not in train_drfs],
            "test_subjects": test,
            "validation_subjects": val,
            "n_test_subjects": len(test),
            "lesions_per_drf": len(biases.get(("unipet", drf_names[0]), [])),
            "gaussian": gaussian,
            "summary": summary,
            "texture": texture_means,
            "full_dose_texture": {
                "liver_cov_pct": full_tex["cov_pct"],
                "acf1_inplane": full_tex["acf_inplane"][1],
                "acf1_axial": full_tex["acf_axial"][1],
            }
            if full_tex
            else {},
        }
        fr["baselines_beaten"] = baselines_beaten(summary, drf_names)
        fr["targets"] = check_targets(summary, drf_names)
        # the DRF-given upper bounds judged by the same targets: how far knowing the DRF would take the method
        fr["targets_by_model"] = {m: check_targets(summary, drf_names, m) for m in CONDITIONED_MODELS if m in summary}
        real = [s for s in test if _simulated_from_real(data / s)]
        if real:
            fr["real_subject"] = {
                "subject": real[0],
                "psnr": {
                    m: {r["drf"]: r["psnr"] for r in rows if r["model"] == m and r["subject"] == real[0]}
                    for m in LABELS
                },
            }
        result["families"][fam] = fr
        all_rows += rows
        all_regions += regions
        for d in drf_names:
            plot_recovery(regions, fam, d, ["gaussian", *model_list], out / f"rc_{fam}_drf_{d}.png")
        plot_texture(texture_means, fam, drf_names, out / f"texture_{fam}.png")
        atomic_write_json(out / "quality_partial.json", _json_safe(result))  # a long run keeps finished families
    result["data"] = "; ".join(
        f"{f}: {len(v[2])} {score_on} subjects of {FAMILIES[f][0]}/ ({', '.join(v[2])})" for f, v in splits.items()
    ) + (
        "; the family's other validation subjects tuned the Gaussian, no test subject was used; in-family, the scored "
        "subjects are also those training's validation selects checkpoints on, so only the unseen family is "
        "independent of that selection"
        if score_on == "validation"
        else ""
    )
    table = markdown(result)

    write_csv(out / "cases.csv", all_rows, CASE_COLUMNS)
    write_csv(out / "regions.csv", all_regions, ("family", "model", *REGION_COLUMNS))
    atomic_write_json(out / "quality.json", _json_safe(result))
    atomic_write(out / "quality.md", lambda tmp: tmp.write_text(table))
    plot(result, out / "quality.png")
    if update_docs:
        plot(result, BUNDLE_ROOT / "docs" / "quality_families.png")
        update_model_card(BUNDLE_ROOT / "docs" / "README.md", table)
        update_eval_metrics(BUNDLE_ROOT / "configs" / "metadata.json", result)
    print(table)
    print(
        f"wrote {out / 'quality.json'}, cases.csv, regions.csv, quality.md and the PNGs"
        + (" and updated docs/README.md" if update_docs else "")
    )
    return result


EVAL_METRIC_KEYS = {"psnr": 2, "ssim": 4, "texture_ratio": 3, "mean_lesion_suvmax_bias_pct": 1}


def eval_metrics(result: Mapping[str, Any], model: str = "unipet") -> dict[str, Any]:
    """metadata.json's ``eval_metrics``: per family and DRF, the scored model's PSNR, SSIM, texture ratio,
    signed mean lesion SUVmax bias and liver SUVmean bias, next to the input's, the tuned Gaussian's and
    (when scored) vanilla's PSNR, so the zoo entry carries the model card's headline numbers."""
    out: dict[str, Any] = {"data": result.get("data", ""), "command": result.get("command", ""), "model": model}
    for fam, fr in result["families"].items():
        s = fr["summary"]
        for d in fr["drfs"]:
            prefix = f"{fam}_drf{d}"
            for key, digits in EVAL_METRIC_KEYS.items():
                v = s[model][d].get(key)
                out[f"{prefix}_{model}_{key}"] = None if v is None else round(float(v), digits)
            liver = (s[model][d].get("liver") or {}).get("mean_suvmean_bias_pct")
            out[f"{prefix}_{model}_liver_suvmean_bias_pct"] = None if liver is None else round(float(liver), 1)
            for other in ("input", "gaussian", "vanilla"):
                if other in s and d in s[other]:
                    out[f"{prefix}_{other}_psnr"] = round(float(s[other][d]["psnr"]), 2)
    return out


def update_eval_metrics(metadata_file: Path, result: Mapping[str, Any], model: str = "unipet") -> None:
    """Write :func:`eval_metrics` of ``result`` for ``model`` (the shipped one) into ``metadata_file`` (every
    other key kept as it is). 0.4.0 shipped the vanilla model (``update_eval_metrics(meta, result, "vanilla")``);
    0.5.0 ships UniPET, the default."""
    meta = json.loads(Path(metadata_file).read_text())
    meta["eval_metrics"] = eval_metrics(result, model)
    atomic_write(metadata_file, lambda tmp: tmp.write_text(json.dumps(meta, indent=4) + "\n"))


def _mean_curve(curves: Sequence[Mapping[str, list]]) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)  # a lag beyond a tiny liver: NaN
    keys = ("acf_inplane", "acf_axial")
    out: dict[str, Any] = {
        k: [float(np.nanmean([c[k][i] for c in curves])) for i in range(len(curves[0][k]))] for k in keys
    }
    out["lags_inplane_mm"] = [
        float(np.mean([c["lags_inplane_mm"][i] for c in curves])) for i in range(len(curves[0]["lags_inplane_mm"]))
    ]
    out["lags_axial_mm"] = [
        float(np.mean([c["lags_axial_mm"][i] for c in curves])) for i in range(len(curves[0]["lags_axial_mm"]))
    ]
    out["cov_pct"] = float(np.nanmean([c["cov_pct"] for c in curves]))
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the result is written to files and printed as a table, not dumped again
    run_command(run, "python -m scripts.benchmarks.quality")


if __name__ == "__main__":
    main()
