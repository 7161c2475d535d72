"""`make demo`: simulate a phantom PET scan at DRF 20, denoise it with UniPET, report and save the result.

    cd unipet_bundle && python -m scripts.demo [--drf 20] [--input full_dose_suv.nii.gz]
        [--checkpoint models/model.pt] [--output_dir ../demo_output] [--seed 0]

By default a procedural digital phantom (simulated data) is made and scanned with the bundle's PET
simulator at full dose and at the given DRF; with ``--input`` a full-dose SUV NIfTI is used as the
activity map instead (resampled to the network's 4 mm grid). The low-dose scan is denoised with the
network of ``configs/train.json`` (weights from ``--checkpoint``, default the shipped ``models/model.pt``,
whose SHA-256 is checked against ``large_files.yml``; without weights the network is UNTRAINED and the demo
says so) run by the bundle's own inference pipeline (``configs/inference.json`` through
``scripts.inference.denoise.BundleDenoiser``, on the volume's own 4 mm grid: no resampling), PSNR/SSIM against the simulated full dose are printed for the input and the output, with the
SUVmax of the hottest lesion (full dose, low dose, denoised), and the volumes plus a PNG montage (coronal and
axial slices through that lesion, radiological orientation from the affine, R/L/A/P/S/I letters, a mm scale
bar) are written to ``--output_dir``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch

from scripts.common.errors import CheckpointError, UniPETInputError, exit_bad_input
from scripts.common.geometry import voxel_spacing
from scripts.common.large_files import recorded_sha256
from scripts.common.options import as_bool
from scripts.common.weights import load_network_weights
from scripts.data.io import save_nifti
from scripts.data.phantom import make_phantom
from scripts.data.simulate import load_activity, resample_activity, simulate_pet
from scripts.evaluation.display import draw_panel, panel, ras_index, to_ras
from scripts.evaluation.regions import hottest_lesion_voxel
from scripts.inference.denoise import BundleDenoiser, network_from_config
from scripts.inference.qc import find_hotspots
from scripts.metrics.image_quality import psnr, ssim3d
from scripts.networks.unipet import match_checkpoint_san_variant

logger = logging.getLogger("unipet.demo")

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
UNTRAINED_BANNER = (
    "\n" + "!" * 78 + "\n"
    "!!  NO TRAINED WEIGHTS: run untrained on request (--checkpoint '' --allow_untrained true).\n"
    "!!  The network below is UNTRAINED (its output layer starts at zero, so it returns its input).\n"
    "!!  The numbers show the pipeline working, not UniPET's quality.\n" + "!" * 78 + "\n"
)


def _network(config: str, checkpoint: Path | None) -> tuple[torch.nn.Module, dict[str, Any], bool]:
    net, sizes = network_from_config(config, BUNDLE_ROOT)
    trained = checkpoint is not None
    if trained:
        # strict: the demo shows a trained model, never half of one; the shipped weights use the 0.2.0 SAN (v1)
        net, _ = load_network_weights(
            net, checkpoint, recorded_sha256(checkpoint, BUNDLE_ROOT), strict=True, adapt=match_checkpoint_san_variant
        )
    return net.eval(), sizes, trained


def hottest_lesion(
    full: np.ndarray, affine: np.ndarray, labels: np.ndarray | None = None, table: dict[int, Any] | None = None
) -> tuple[tuple[int, int, int], np.ndarray, str]:
    """Where the demo slices go: the lesion with the highest full-dose SUVmax (phantom label map), else the
    hottest focus of the full dose (an ``--input`` map has no labels). Returns (voxel, mask of the voxels its
    SUVmax is taken over, a name)."""
    if labels is not None and table:
        found = hottest_lesion_voxel(full, labels, table)
        if found is not None:
            pos, name = found
            label = int(labels[pos])  # hottest_lesion_voxel returns a voxel inside the lesion
            return tuple(int(v) for v in pos), labels == label, f"lesion '{name}'"
    spacing = voxel_spacing(affine)
    spots = find_hotspots(full, spacing, 1, float(np.percentile(full, 99.0)), 20.0, affine)
    pos = spots[0] if spots else tuple(int(v) for v in np.unravel_index(int(np.argmax(full)), full.shape))
    grid = np.meshgrid(*[(np.arange(n) - p) * s for n, p, s in zip(full.shape, pos, spacing)], indexing="ij")
    return pos, (grid[0] ** 2 + grid[1] ** 2 + grid[2] ** 2) <= 10.0**2, "hottest focus (10 mm sphere)"


def _montage(
    path: Path,
    low: np.ndarray,
    den: np.ndarray,
    full: np.ndarray,
    affine: np.ndarray,
    drf: float,
    scores: dict[str, Any],
    position: tuple[int, int, int],
    lesion: str,
    convention: str = "radiological",
) -> None:
    """2 x 4 panels (coronal and axial through ``position``; low dose, UniPET, full dose, difference), oriented
    from ``affine`` (:mod:`scripts.evaluation.display`: radiological by default), letters, scale bar, PSNR/SSIM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = 7.0
    suvmax = scores["lesion_suvmax"]
    cols = [
        (
            f"low dose (DRF {drf:g})\nPSNR {scores['input_psnr']:.2f} dB, SSIM {scores['input_ssim']:.3f}\n"
            f"lesion SUVmax {suvmax['low']:.2f}",
            low,
        ),
        (
            f"UniPET\nPSNR {scores['output_psnr']:.2f} dB, SSIM {scores['output_ssim']:.3f}\n"
            f"lesion SUVmax {suvmax['denoised']:.2f}",
            den,
        ),
        (f"full dose\n\nlesion SUVmax {suvmax['full']:.2f}", full),
        ("UniPET - full dose\n\n", den - full),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(15, 8.5), constrained_layout=True)
    point = ras_index(position, affine, full.shape)
    for c, (title, vol) in enumerate(cols):
        diff = c == 3
        ras, spacing, oblique = to_ras(vol, affine)
        for r, view in enumerate(("coronal", "axial")):
            p = panel(
                ras,
                spacing,
                view,
                index=point[1 if view == "coronal" else 2],
                convention=convention,
                oblique=oblique,
                point=point,
            )
            draw_panel(
                axes[r, c],
                p,
                -2.0 if diff else 0.0,
                2.0 if diff else vmax,
                cmap="RdBu_r" if diff else "gray_r",
                title=title if r == 0 else None,
                colorbar=c >= 2,
                colorbar_label="SUV difference" if diff else "SUV",
                scale_bar=c == 0,
                marker=True,
            )
    axes[0, 0].set_ylabel("coronal")
    axes[1, 0].set_ylabel("axial")
    fig.suptitle(
        f"UniPET demo on SIMULATED data{'' if scores['trained'] else ' (UNTRAINED network)'}: slices through "
        f"the {lesion} (circled); {convention} view"
    )
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def run(
    drf: float = 20,
    input: str | None = None,  # noqa: A002 - the CLI flag a user expects
    checkpoint: str | None = None,
    output_dir: str | None = None,
    config: str | None = None,
    shape: Any = (128, 128, 96),
    seed: int = 0,
    overwrite: bool = True,
    allow_untrained: bool = False,
) -> None:
    """Simulate a DRF-`drf` scan, denoise it with UniPET, print PSNR/SSIM and save NIfTI + PNG.

    Args:
        drf: dose reduction factor of the simulated low-dose scan.
        input: optional full-dose SUV NIfTI used as the activity map (default: a procedural phantom).
        checkpoint: generator weights (default: models/model.pt in the bundle). A path that does not exist is an
            error; ``""`` with ``allow_untrained`` runs the untrained network (the identity), on request only.
        output_dir: where to write (default: demo_output/ beside the bundle).
        config: training config that defines the network (default: configs/train.json).
        shape: phantom size (x, y, z) in voxels of 4 mm.
        seed: seed of the phantom and of the counts.
        overwrite: replace earlier demo outputs in output_dir.
        allow_untrained: with ``checkpoint=""``, run the untrained network to show the pipeline (loudly labelled).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")
    t_start = time.perf_counter()
    # the same rule as inference: a named checkpoint must exist; untrained only when asked for explicitly
    if checkpoint is not None and str(checkpoint) == "":
        if not as_bool(allow_untrained, "allow_untrained"):
            raise UniPETInputError(
                "--checkpoint '' runs the UNTRAINED network (its output equals its input): "
                "add --allow_untrained true to do that on purpose, or name a checkpoint"
            )
        ckpt: Path | None = None
    else:
        ckpt = Path(checkpoint) if checkpoint else BUNDLE_ROOT / "models" / "model.pt"
        if not ckpt.is_file():
            raise UniPETInputError(
                f"checkpoint {ckpt} does not exist: check the path (the shipped weights are "
                "models/model.pt), or run the untrained network on purpose with "
                "--checkpoint '' --allow_untrained true"
            )
    out = Path(output_dir) if output_dir else BUNDLE_ROOT.parent / "demo_output"
    # the input first: a bad --input is one error line, before any weights are read
    if input:
        activity, affine, spacing = load_activity(input)
        if not np.allclose(spacing, 4.0, atol=0.05):  # the network's training grid
            activity, affine, spacing = resample_activity(activity, affine, 4.0)
        mu = labels = table = None
        source = f"activity map {Path(input).name} (on a 4 mm grid)"
    else:
        spacing = (4.0, 4.0, 4.0)
        phantom = make_phantom(tuple(int(s) for s in shape), spacing, seed=seed)
        activity, mu, affine = phantom.activity, phantom.mu, phantom.affine
        labels, table = phantom.labels, phantom.label_table
        source = f"procedural phantom (seed {seed}, {tuple(int(s) for s in shape)} voxels of 4 mm)"
    net, sizes, trained = _network(config or str(BUNDLE_ROOT / "configs" / "train.json"), ckpt)
    if not trained:
        print(UNTRAINED_BANNER, flush=True)
    logger.info("simulating full dose and DRF %g from a %s (SIMULATED data)", drf, source)
    t0 = time.perf_counter()
    sim = simulate_pet(activity, spacing, drfs=[drf], seed=seed, mu_map=mu, progress=True)
    full = sim["full_dose"].astype(np.float32)
    low = next(iter(sim["drf"].values())).astype(np.float32)
    logger.info("simulation took %.1f s", time.perf_counter() - t0)

    t0 = time.perf_counter()
    # the bundle's own inference (configs/inference.json: orientation, precision, sliding window, residual) with
    # this network; the volume stays on its own grid (already the 4 mm training grid), so no resampling
    denoiser = BundleDenoiser(
        BUNDLE_ROOT,
        network=net,
        model_info={"checkpoint": str(ckpt) if trained else None, "trained": trained},
        overrides={
            "resample": False,
            "progress": True,
            "suv_max": float(sizes["suv_max"]),
            "network_axcodes": sizes["network_axcodes"],
        },
    )
    den = denoiser(low, affine, name="demo")
    t_infer = time.perf_counter() - t0

    t_full = torch.from_numpy(full)[None, None]
    scores = {
        "trained": trained,
        "input_psnr": float(psnr(torch.from_numpy(low)[None, None], t_full)[0]),
        "output_psnr": float(psnr(torch.from_numpy(den)[None, None], t_full)[0]),
        "input_ssim": float(ssim3d(torch.from_numpy(low)[None, None], t_full)[0]),
        "output_ssim": float(ssim3d(torch.from_numpy(den)[None, None], t_full)[0]),
    }
    position, mask, lesion = hottest_lesion(full, affine, labels, table)
    scores["lesion_suvmax"] = {k: float(v[mask].max()) for k, v in (("full", full), ("low", low), ("denoised", den))}
    names = {"full_dose.nii.gz": full, f"low_dose_drf{drf:g}.nii.gz": low, f"denoised_drf{drf:g}.nii.gz": den}
    for name, vol in names.items():
        save_nifti(vol, affine, out / name, overwrite=overwrite)
    png = out / f"montage_drf{drf:g}.png"
    _montage(png, low, den, full, affine, drf, scores, position, lesion)

    print(f"\nUniPET demo (SIMULATED data: {source}, DRF {drf:g}, PSNR/SSIM vs the simulated full dose,")
    print("SUV clipped to [0, 20], data range 20)")
    print(f"{'':24s} {'PSNR dB':>9s} {'SSIM':>8s}")
    print(f"{'low-dose input':24s} {scores['input_psnr']:9.2f} {scores['input_ssim']:8.4f}")
    label = "UniPET output" if trained else "UNTRAINED network output"
    print(f"{label:24s} {scores['output_psnr']:9.2f} {scores['output_ssim']:8.4f}")
    m = scores["lesion_suvmax"]
    print(
        f"{lesion} SUVmax: full dose {m['full']:.2f}, low dose {m['low']:.2f} ({100 * (m['low'] / m['full'] - 1):+.1f} %), "
        f"denoised {m['denoised']:.2f} ({100 * (m['denoised'] / m['full'] - 1):+.1f} %)"
    )
    print(
        f"weights: {ckpt if trained else 'none (untrained network)'}; inference {t_infer:.1f} s, "
        f"total {time.perf_counter() - t_start:.1f} s"
    )
    print(f"wrote {', '.join(names)} and {png.name} to {out}")
    if not trained:
        print(UNTRAINED_BANNER, flush=True)


def main() -> None:
    try:
        fire.Fire(run)
    except (UniPETInputError, CheckpointError) as exc:
        exit_bad_input(exc)


if __name__ == "__main__":
    main()
