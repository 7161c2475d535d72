"""What do a trained UniPET's SAN latents know? A linear probe of the noise level and of the DRF (issue 15).

The label-free SAN must read how noisy a window is. This probe draws tissue-centred windows (the training patch
size) from paired studies, at the same places for every DRF, runs the network's SAN on each, and fits a ridge
regression from the concatenated latents to

* ``log_noise``: the log of the window's true noise, the standard deviation of ``low - full`` over the window
  (SUV), which the network can see;
* ``log_drf``: the log of the study's DRF label, which on randomised data (count levels that vary by subject)
  tells a window's noise only loosely.

Each fit is scored leave-one-subject-out (R^2 and the median relative error of the predicted value), next to the
same probe on two hand-made features (:func:`scripts.networks.drf_conditioned.window_noise_features`: log std of the
window's 3x3x3 high-pass, log window mean; what the ``noise_styles`` variant reads) as a baseline.
R^2 near 1: the latents carry that quantity; near or below 0: they do not (beyond its mean).

A second, study-level part asks whether the DRF can be read from an image at all, by any label-free reading:
each study (one subject at one DRF) is summarised by the mean over its windows (latents, hand-made features) and by
its true noise (the median window noise: an oracle no network has), and a leave-one-subject-out ridge predicts its
log DRF from each. It also reports how the true noise grows with the DRF within a subject (the median slope of log
noise on log DRF) and how far apart subjects at the same DRF lie, in DRF units of that slope. Where one DRF label
spans a wide range of noise across subjects (count levels that vary by subject), a given noise level is several
DRFs at once, and so is the full-dose noise a label-free network is asked to keep.

    cd unipet_bundle && python -m scripts.benchmarks.san_noise_probe --checkpoint models/model.pt \
        --dataset_dir DIR [--datalist_file DIR/datalist.json] [--split "[validation,test]"] [--windows 24] \
        [--output runs/benchmarks/san_noise_probe.json]

The windows are the stored arrays divided by ``suv_max`` (no reorientation): the probe measures what the latents
hold, not the network's quality. Prints a table and writes JSON, and a PNG beside it (held-out predicted against true
window noise, coloured by DRF; the window noise by DRF label).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser

from scripts.common.cli import run_command
from scripts.common.errors import UniPETInputError
from scripts.common.io import atomic_write, atomic_write_json, check_output_path
from scripts.common.weights import load_network_weights
from scripts.data.io import load_nifti
from scripts.data.layout import parse_drf
from scripts.evaluation.split import evaluation_datalist
from scripts.networks.drf_conditioned import window_noise_features

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger("unipet.benchmark")


def loso_ridge(
    features: np.ndarray, target: np.ndarray, groups: np.ndarray, lam: float = 0.01, predictions: bool = False
) -> dict[str, Any]:
    """Leave-one-group-out ridge regression of ``target`` (N,) on ``features`` (N, F), standardised on each fold's
    training part; ``lam`` scales the penalty per training sample. Returns ``r2`` (1 - SSE / SST over the held-out
    predictions; None when the target holds one value) and ``median_rel_error`` (median |exp(pred - target) - 1|:
    the relative error of the predicted value for a log target), and with ``predictions`` the held-out predictions
    ``pred`` (N,). Needs at least two groups."""
    features = np.asarray(features, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    groups = np.asarray(groups)
    if len(np.unique(groups)) < 2:
        raise UniPETInputError("the probe needs windows from at least two subjects (leave-one-subject-out)")
    pred = np.zeros_like(target)
    for g in np.unique(groups):
        train, test = groups != g, groups == g
        mu, sd = features[train].mean(0), features[train].std(0) + 1e-8
        a = np.c_[(features[train] - mu) / sd, np.ones(train.sum())]
        penalty = lam * train.sum() * np.eye(a.shape[1])
        penalty[-1, -1] = 0.0  # the intercept is not shrunk
        w = np.linalg.solve(a.T @ a + penalty, a.T @ target[train])
        pred[test] = np.c_[(features[test] - mu) / sd, np.ones(test.sum())] @ w
    sst = float(((target - target.mean()) ** 2).sum())
    score: dict[str, Any] = {
        # a target with one value (e.g. one DRF in the data) leaves nothing to explain: no R^2
        "r2": 1.0 - float(((pred - target) ** 2).sum()) / sst if sst > 1e-12 else None,
        "median_rel_error": float(np.median(np.abs(np.exp(pred - target) - 1.0))),
    }
    if predictions:
        score["pred"] = pred
    return score


def noise_features(windows: np.ndarray, batch: int = 64) -> np.ndarray:
    """The baseline's features of normalised windows (N, 1, D, H, W): the bundle's one hand-made window reading,
    :func:`~scripts.networks.drf_conditioned.window_noise_features` (log std of the 3x3x3 high-pass, log mean), (N, 2)."""
    return np.concatenate(
        [window_noise_features(torch.from_numpy(windows[i : i + batch])).numpy() for i in range(0, len(windows), batch)]
    )


def study_level(
    noise: np.ndarray, drf: np.ndarray, groups: np.ndarray, feats: dict[str, np.ndarray], ridge: float
) -> dict[str, Any]:
    """Can a study's DRF be read from its image? Windows (N,) of several studies (one subject at one DRF) are
    summarised per study: ``feats`` (name: (N, F)) by their mean over the study's windows, the true window
    ``noise`` (SUV) by its median (``true_noise``: an oracle). Returns the leave-one-subject-out ridge of log DRF
    on each (``probe``), the study noise's min / median / max over subjects per DRF, the median within-subject slope
    of log noise on log DRF, and ``drf_span_of_one_label``: ``exp(median over DRFs of (q90 - q10 of log study
    noise) / slope)``, how many DRFs apart (as a factor) subjects given the same DRF look, read on that slope. The
    slope and span need two DRFs per subject; with one they are None."""
    studies = sorted(set(zip(groups.tolist(), drf.tolist())))
    members = [(groups == g) & (drf == d) for g, d in studies]
    s_groups = np.array([g for g, _ in studies])
    s_drf = np.array([d for _, d in studies], dtype=np.float64)
    s_noise = np.array([np.median(noise[m]) for m in members])
    summaries = {name: np.stack([f[m].mean(0) for m in members]) for name, f in feats.items()}
    summaries["true_noise"] = np.log(np.maximum(s_noise, 1e-9))[:, None]
    slopes = []
    for g in np.unique(s_groups):
        m = s_groups == g
        if len(set(s_drf[m].tolist())) > 1:
            slopes.append(np.polyfit(np.log(s_drf[m]), np.log(np.maximum(s_noise[m], 1e-9)), 1)[0])
    slope = float(np.median(slopes)) if slopes else None
    spans = []
    for d in sorted(set(s_drf.tolist())):
        q10, q90 = np.quantile(np.log(np.maximum(s_noise[s_drf == d], 1e-9)), [0.1, 0.9])
        spans.append(q90 - q10)
    return {
        "studies": len(studies),
        "probe": {name: {"log_drf": loso_ridge(f, np.log(s_drf), s_groups, ridge)} for name, f in summaries.items()},
        "noise_suv_by_drf": {
            f"{d:g}": [float(v) for v in np.quantile(s_noise[s_drf == d], [0.0, 0.5, 1.0])]
            for d in sorted(set(s_drf.tolist()))
        },
        "within_subject_noise_slope": slope,
        "drf_span_of_one_label": float(np.exp(np.median(spans) / slope)) if slope and slope > 0 else None,
    }


def draw_windows(
    entries: Sequence[dict[str, Any]], size: int, per_subject: int, threshold_suv: float, seed: int
) -> list[dict[str, Any]]:
    """Per entry (one low-dose study of a subject), ``per_subject`` windows of ``size``^3 voxels (SUV) centred on
    full-dose tissue above ``threshold_suv``, at the same centres for every DRF of a subject. Entries as
    :func:`scripts.evaluation.split.evaluation_datalist` gives them (``subject``, ``drf``, ``image``, ``label``).
    Only the windows are kept, not the volumes."""
    if per_subject < 1:
        raise UniPETInputError(f"--windows must be at least 1, got {per_subject}")
    rng = np.random.default_rng(seed)
    half = size // 2
    cuts: dict[str, list[tuple[slice, ...]]] = {}
    full_windows: dict[str, np.ndarray] = {}
    out = []
    for e in entries:
        subject = str(e["subject"])
        if subject not in cuts:
            full, _ = load_nifti(e["label"], mmap=False)
            if min(full.shape) < size:
                raise UniPETInputError(f"{e['label']}: shape {list(full.shape)} is smaller than the {size}^3 window")
            # every centre c with a whole window [c - half, c - half + size) inside the volume
            inner = full[tuple(slice(half, n - size + half + 1) for n in full.shape)]
            cand = np.argwhere(inner > threshold_suv) + half
            if len(cand) == 0:
                raise UniPETInputError(f"{e['label']}: no voxel above {threshold_suv} SUV to centre a window on")
            centres = cand[rng.choice(len(cand), min(per_subject, len(cand)), replace=False)]
            cuts[subject] = [tuple(slice(c - half, c - half + size) for c in ctr) for ctr in centres]
            full_windows[subject] = np.stack([full[c] for c in cuts[subject]])[:, None].astype(np.float32)
        low, _ = load_nifti(e["image"], mmap=False)
        out.append(
            {
                "subject": subject,
                "drf": float(parse_drf(str(e["drf"]))),
                "low": np.stack([low[c] for c in cuts[subject]])[:, None].astype(np.float32),
                "full": full_windows[subject],
            }
        )
    return out


@torch.no_grad()
def san_latents(net: torch.nn.Module, windows: np.ndarray, batch: int = 8) -> np.ndarray:
    """The concatenated SAN latents (N, n_stages * latent_dim) of normalised windows (N, 1, D, H, W)."""
    check_has_san(net)
    net.eval()
    parts = []
    for i in range(0, len(windows), batch):
        x = torch.from_numpy(windows[i : i + batch])
        parts.append(torch.cat([z.float() for z in net.san_latents(x)], dim=1).numpy())
    return np.concatenate(parts)


def check_has_san(net: torch.nn.Module) -> None:
    """Refuse a network without SAN latents (a ``use_san=False`` UniPET, or another network) as a user error."""
    if getattr(net, "san", None) is None or not hasattr(net, "san_latents"):
        raise UniPETInputError(
            "this checkpoint's network has no SAN (use_san false, or not a UniPET): there are no latents to probe"
        )


def probe(net: torch.nn.Module, drawn: list[dict[str, Any]], suv_max: float, ridge: float = 0.01) -> dict[str, Any]:
    """The probe's table: ``{feature set: {target: loso_ridge(...)}}`` plus the number of windows and subjects."""
    if not drawn:
        raise UniPETInputError("no windows to probe: the chosen split(s) hold no pairs")
    low = np.concatenate([d["low"] for d in drawn])
    full = np.concatenate([d["full"] for d in drawn])
    groups = np.concatenate([[d["subject"]] * len(d["low"]) for d in drawn])
    drf = np.concatenate([[d["drf"]] * len(d["low"]) for d in drawn])
    noise = (low - full).reshape(len(low), -1).std(axis=1)
    targets = {"log_noise": np.log(np.maximum(noise, 1e-9)), "log_drf": np.log(drf)}
    feats = {"san_latents": san_latents(net, low / suv_max), "noise_features": noise_features(low / suv_max)}
    scored = {
        n: {t: loso_ridge(f, y, groups, ridge, predictions=True) for t, y in targets.items()} for n, f in feats.items()
    }
    table = {n: {t: {k: v for k, v in sc.items() if k != "pred"} for t, sc in per.items()} for n, per in scored.items()}
    points = {n: {t: sc["pred"] for t, sc in per.items()} for n, per in scored.items()}
    noise_by_drf = {
        f"{d:g}": [float(q) for q in np.quantile(noise[drf == d], [0.1, 0.5, 0.9])] for d in sorted(set(drf.tolist()))
    }
    return {
        "windows": int(len(low)),
        "subjects": int(len(np.unique(groups))),
        "probe": table,
        "corr_log_drf_log_noise": float(np.corrcoef(targets["log_drf"], targets["log_noise"])[0, 1]),
        "window_noise_suv_q10_q50_q90_by_drf": noise_by_drf,
        "study_level": study_level(noise, drf, groups, feats, ridge),
        "_points": {"targets": targets, "drf": drf, "groups": groups, "pred": points},  # the figure's; not in the JSON
    }


def _r2(score: dict[str, Any]) -> str:
    """A score's R^2 for a table or title: three decimals, or ``n/a`` when there was nothing to explain."""
    return "n/a" if score["r2"] is None else f"{score['r2']:.3f}"


def plot(result: dict[str, Any], path: Path) -> None:
    """Held-out predicted against true window noise (SUV, log axes) for the latents and the hand-made features,
    coloured by DRF; the true window noise by DRF, which shows how far apart the label puts look-alikes; and each
    subject's study noise against its DRF (one line per subject: parallel lines offset by the subject's count level
    are what makes a DRF unreadable from the image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["_points"]
    drf, true = pts["drf"], np.exp(pts["targets"]["log_noise"])
    fig, axes = plt.subplots(1, 4, figsize=(21, 5), constrained_layout=True)
    drfs = sorted(set(drf.tolist()))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(drfs)))
    for ax, name in zip(axes[:2], ("san_latents", "noise_features")):
        pred = np.exp(pts["pred"][name]["log_noise"])
        for d, c in zip(drfs, colours):
            m = drf == d
            ax.scatter(true[m], pred[m], s=6, color=c, alpha=0.6, label=f"DRF {d:g}")
        lims = [min(true.min(), pred.min()), max(true.max(), pred.max())]
        ax.plot(lims, lims, color="grey", ls="--")
        score = result["probe"][name]["log_noise"]
        ax.set(xscale="log", yscale="log", xlabel="true window noise (SUV)", ylabel="predicted (held-out subject)")
        ax.set_title(f"{name}: R^2 {_r2(score)}, median error {100 * score['median_rel_error']:.0f} %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, markerscale=3)
    axes[2].boxplot([true[drf == d] for d in drfs], tick_labels=[f"{d:g}" for d in drfs])
    axes[2].set(yscale="log", xlabel="DRF label", ylabel="true window noise (SUV)")
    axes[2].set_title(f"window noise by DRF (log correlation {result['corr_log_drf_log_noise']:.2f})")
    axes[2].grid(alpha=0.3)
    groups = pts["groups"]
    for g in sorted(set(groups.tolist())):
        m = groups == g
        ds = sorted(set(drf[m].tolist()))
        axes[3].plot(ds, [np.median(true[m & (drf == d)]) for d in ds], marker="o", label=str(g))
    study = result["study_level"]
    axes[3].set(xscale="log", yscale="log", xlabel="DRF label", ylabel="study noise (median window, SUV)")
    axes[3].set_title(f"study noise per subject (reads the DRF: R^2 {_r2(study['probe']['true_noise']['log_drf'])})")
    axes[3].legend(fontsize=7)
    axes[3].grid(alpha=0.3)
    fig.suptitle(
        f"SAN latent probe: {result['checkpoint']} ({result['windows']} windows, {result['subjects']} subjects)"
    )
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def run(
    checkpoint: str = "models/model.pt",
    dataset_dir: str = "",
    datalist_file: str = "",
    split: str | Sequence[str] = ("validation", "test"),
    windows: int = 24,
    threshold_suv: float = 0.5,
    config_file: str = "configs/train.json",
    seed: int = 0,
    ridge: float = 0.01,
    output: str = "runs/benchmarks/san_noise_probe.json",
    overwrite: bool = True,
) -> dict[str, Any]:
    """Probe ``checkpoint``'s SAN latents on ``split`` of a paired dataset; print the table and write ``output``.

    Args:
        checkpoint: UniPET weights (a network with a SAN), read with the bundle's one weight loader (strict).
        dataset_dir: the paired dataset folder (``scripts.data.pairs`` layout).
        datalist_file: its datalist JSON (empty: ``dataset_dir``/datalist.json when there is one, else the split
            ``config_file`` makes: its ``val_fraction``, ``test_fraction``, ``seed`` and ``drfs``, as evaluation does).
        split: the split(s) to draw from, as ``evaluate.json``'s ``eval_split`` (default validation and test:
            subjects training never saw; test falls back to validation when it is empty).
        windows: windows per subject (the same centres at every DRF).
        threshold_suv: a window centre lies on full-dose tissue above this SUV.
        config_file: the training config that builds the network (``network_def``, ``patch_size``, ``suv_max``).
        seed: of the window centres.
        ridge: the ridge penalty per training sample (on standardised features).
        output: JSON result path (written atomically); the figure goes beside it, ``.png`` for ``.json``.
        overwrite: replace an existing ``output`` and figure.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")
    if not dataset_dir:
        raise UniPETInputError("--dataset_dir is required: the paired dataset folder to draw windows from")
    out = Path(output)
    check_output_path(out, overwrite)
    check_output_path(out.with_suffix(".png"), overwrite)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / config_file) if not Path(config_file).is_absolute() else config_file)
    size = int(parser.get_parsed_content("patch_size")[0])
    suv_max = float(parser.get_parsed_content("suv_max"))
    net, info = load_network_weights(parser.get_parsed_content("network_def"), checkpoint, strict=True)
    check_has_san(net)
    splits = [split] if isinstance(split, str) else list(split)
    split_keys = ("drfs", "val_fraction", "seed", "test_fraction")  # the split training made
    same_split = {k: parser.get_parsed_content(k) for k in split_keys}
    entries, seen = [], set()
    for sp in splits:  # "test" falls back to validation when empty: keep each pair once
        for e in evaluation_datalist(dataset_dir, sp, datalist_file or None, **same_split):
            if (e["subject"], str(e["drf"])) not in seen:
                seen.add((e["subject"], str(e["drf"])))
                entries.append(e)
    drawn = draw_windows(entries, size, int(windows), float(threshold_suv), int(seed))
    result = {
        "checkpoint": str(checkpoint),
        "splits": splits,
        "window_size": size,
        **probe(net, drawn, suv_max, float(ridge)),
    }
    points = result.pop("_points")
    atomic_write_json(out, result)
    figure = out.with_suffix(".png")
    plot({**result, "_points": points}, figure)
    print(
        f"\nSAN latent probe of {checkpoint}: {result['windows']} windows of {size}^3 from {result['subjects']} "
        f"subjects ({', '.join(splits)}), leave-one-subject-out ridge"
    )
    print(f"  {'features':16s} {'target':10s} {'R^2':>7s} {'median rel. error':>18s}")
    for name, per_target in result["probe"].items():
        for target, score in per_target.items():
            print(f"  {name:16s} {target:10s} {_r2(score):>7s} {score['median_rel_error']:18.2f}")
    print(f"  correlation of log DRF with log window noise: {result['corr_log_drf_log_noise']:.2f}")
    study = result["study_level"]
    print(
        f"\nPer study ({study['studies']} studies: the mean of its windows; true_noise = its median window noise, an oracle)"
    )
    print(f"  {'summary':16s} {'target':10s} {'R^2':>7s} {'median rel. error':>18s}")
    for name, per_target in study["probe"].items():
        score = per_target["log_drf"]
        print(f"  {name:16s} {'log_drf':10s} {_r2(score):>7s} {score['median_rel_error']:18.2f}")
    for d, (lo, mid, hi) in study["noise_suv_by_drf"].items():
        print(f"  DRF {d:>5s}: study noise {lo:.3f} / {mid:.3f} / {hi:.3f} SUV (min / median / max over subjects)")
    if study["within_subject_noise_slope"] is not None:
        span = study["drf_span_of_one_label"]
        print(
            f"  within a subject the noise grows as DRF^{study['within_subject_noise_slope']:.2f}; subjects given the "
            f"same DRF lie {span:.1f}x apart in DRF on that slope (q10-q90, median over DRFs)"
            if span is not None
            else f"  within a subject the noise grows as DRF^{study['within_subject_noise_slope']:.2f}"
        )
    print(f"wrote {out} and {figure}")
    return result


def main() -> None:
    # the result is printed as a table and written as JSON, not dumped again
    run_command(run, "python -m scripts.benchmarks.san_noise_probe")


if __name__ == "__main__":
    main()
