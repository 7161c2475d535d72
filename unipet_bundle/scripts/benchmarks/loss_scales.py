"""Loss weights in our units: the generator gradient norm of every loss term at the start of stage 2.

The reference weights (L1 + 0.001 L_align + 0.001 L_adv) were set for another code base's units and were
never checked against ours (SUV / 20, our critic, our L_align on mean and std). A weight only means
something relative to the gradient its term sends into the generator, so this measures, on a few
tissue-centred batches of simulated multi-DRF data, with a stage-1 base network and a fresh SAN:

* ``||grad L1||``, ``||grad L_align||``, ``||grad L_adv||`` (after a short critic pre-training, so the
  critic's judgement is not random), ``||grad L_regional||`` (unweighted), over all generator parameters
  and over the SAN + style layers alone (the parameters stage 2 adds);
* the weight that gives each term a chosen share of the L1 gradient (``--shares``).

    cd unipet_bundle && python -m scripts.benchmarks.loss_scales [--bdn_checkpoint models/model.pt]
        [--batches 4] [--critic_steps 30] [--output runs/benchmarks/loss_scales.json]

Prints a table and writes JSON. ``--bdn_checkpoint`` takes the base network of any UniPET checkpoint
(the SAN part is ignored); empty: an untrained base network (only useful for smoke tests).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import RandWeightedCropd

from scripts.common.cli import run_command
from scripts.common.io import atomic_write_json
from scripts.common.weights import load_checkpoint
from scripts.data.training_data import PatchSamplingWeightsd
from scripts.losses.align import StyleAlignmentLoss
from scripts.losses.rals import RALSCriticLoss, RALSGeneratorLoss, normalised_threshold, stylized_mask
from scripts.losses.regional import RegionalSUVLoss

logger = logging.getLogger("unipet.benchmark")
BUNDLE_ROOT = Path(__file__).resolve().parents[2]
TERMS = ("l1", "align", "adv", "regional")


def _batches(parser: ConfigParser, n_batches: int, shape, drfs, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Tissue-centred (low, full) patch batches from simulated phantoms, every DRF in each batch."""
    from scripts.data.phantom import make_phantom
    from scripts.data.simulate import simulate_pet

    suv_max = float(parser.get_parsed_content("suv_max"))
    patch = parser.get_parsed_content("patch_size")
    spacing = (4.0, 4.0, 4.0)
    weights = PatchSamplingWeightsd(
        "label",
        suv_max=suv_max,
        tissue_threshold_suv=parser.get_parsed_content("tissue_threshold_suv"),
        hotspot_fraction=parser.get_parsed_content("hotspot_fraction"),
    )
    crop = RandWeightedCropd(["image", "label"], "crop_weight", patch, num_samples=1)
    crop.set_random_state(seed)
    batches = []
    for b in range(n_batches):
        ph = make_phantom(tuple(shape), spacing, seed=seed + b)
        sim = simulate_pet(ph.activity, spacing, drfs=list(drfs), seed=seed + 100 + b, mu_map=ph.mu)
        full = torch.from_numpy(sim["full_dose"].astype(np.float32))[None] / suv_max
        lows, fulls = [], []
        for low in sim["drf"].values():
            d = weights({"image": torch.from_numpy(low.astype(np.float32))[None] / suv_max, "label": full})
            p = crop(d)[0]
            lows.append(torch.as_tensor(p["image"]))
            fulls.append(torch.as_tensor(p["label"]))
        batches.append((torch.stack(lows), torch.stack(fulls)))
    return batches


def _grad_norm(term: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


def measure(
    config: str = "configs/train.json",
    bdn_checkpoint: str = "models/model.pt",
    batches: int = 4,
    critic_steps: int = 30,
    shape: tuple[int, int, int] = (64, 64, 48),
    drfs: tuple[float, ...] = (4, 20, 100),
    shares: dict[str, float] | None = None,
    seed: int = 0,
    output: str = "runs/benchmarks/loss_scales.json",
) -> dict[str, Any]:
    """Measure the gradient norms and print the table; returns the JSON record.

    Args:
        config: training config (network, critic, RALS mask and sampling settings come from it).
        bdn_checkpoint: weights for the base network (its SAN part is ignored); "" for an untrained one.
        batches: batches measured (one simulated subject each, every DRF in the batch).
        critic_steps: critic pre-training steps on those batches before measuring L_adv.
        shape, drfs: simulated subjects (voxels at 4 mm) and DRFs.
        shares: wanted ratio of each weighted term's gradient norm to the L1 one (default: align 0.3, adv 0.1,
            regional 0.5).
        seed: data and critic seed.
        output: JSON path (relative to the bundle root unless absolute).
    """
    torch.manual_seed(seed)
    shares = dict(shares or {"align": 0.3, "adv": 0.1, "regional": 0.5})
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / config))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    gen = parser.get_parsed_content("network_def")
    if bdn_checkpoint:
        state = load_checkpoint(
            BUNDLE_ROOT / bdn_checkpoint if not Path(bdn_checkpoint).is_absolute() else bdn_checkpoint
        )
        gen.load_bdn_state_dict({k: v for k, v in state.items() if not gen._is_san_key(k.removeprefix("module."))})
    critic = parser.get_parsed_content("critic_def")
    thr = normalised_threshold(parser.get_parsed_content("rals_threshold_suv2"), parser.get_parsed_content("suv_max"))
    window = parser.get_parsed_content("rals_window")
    mask_fn = lambda full: stylized_mask(full, window=window, threshold=thr)  # noqa: E731
    data = _batches(parser, batches, shape, drfs, seed)
    align_loss, critic_loss, adv_loss = StyleAlignmentLoss(), RALSCriticLoss(), RALSGeneratorLoss()
    regional = RegionalSUVLoss(parser.get_parsed_content("regional_windows"))

    t0 = time.perf_counter()
    d_opt = torch.optim.AdamW(
        critic.parameters(), lr=parser.get_parsed_content("critic_learning_rate"), betas=(0.9, 0.99)
    )
    for step in range(critic_steps):
        low, full = data[step % len(data)]
        with torch.no_grad():
            fake = gen(low)
        d_opt.zero_grad()
        loss, _ = critic_loss(critic, full, fake, mask_fn(full))
        loss.backward()
        d_opt.step()
    for p in critic.parameters():
        p.requires_grad_(False)

    all_params = [p for p in gen.parameters()]
    san_params = gen.san_parameters()
    rows: dict[str, list[tuple[float, float]]] = {t: [] for t in TERMS}
    for low, full in data:
        pred, feats = gen.forward_with_features(low)
        with torch.no_grad():
            _, feats_full = gen.forward_with_features(full)
        terms = {
            "l1": torch.nn.functional.l1_loss(pred, full),
            "align": align_loss(feats, feats_full),
            "adv": adv_loss(critic, pred, mask_fn(full)),
            "regional": regional(pred, full),
        }
        for name, term in terms.items():
            rows[name].append((_grad_norm(term, all_params), _grad_norm(term, san_params)))
    med = {t: (float(np.median([r[0] for r in rows[t]])), float(np.median([r[1] for r in rows[t]]))) for t in TERMS}
    suggested = {t: shares[t] * med["l1"][0] / med[t][0] if med[t][0] > 0 else float("nan") for t in shares}
    current = {t: float(parser.get_parsed_content(f"{t}_weight")) for t in ("l1", "align", "adv", "regional")}

    print(
        f"\nGenerator gradient norms at the start of stage 2 (median of {batches} batches, DRFs {list(drfs)}; "
        f"critic pre-trained {critic_steps} steps; {time.perf_counter() - t0:.0f} s)"
    )
    print(
        f"{'term':<10}{'||grad|| all':>16}{'||grad|| SAN':>16}{'config weight':>15}{'weighted/L1':>13}{'suggested':>12}"
    )
    for t in TERMS:
        ratio = current[t] * med[t][0] / (current["l1"] * med["l1"][0]) if med["l1"][0] > 0 else float("nan")
        sug = suggested.get(t, current[t])
        print(f"{t:<10}{med[t][0]:>16.4g}{med[t][1]:>16.4g}{current[t]:>15.4g}{ratio:>13.3g}{sug:>12.3g}")
    record = {
        "config": config,
        "bdn_checkpoint": bdn_checkpoint,
        "batches": batches,
        "critic_steps": critic_steps,
        "drfs": list(drfs),
        "shape": list(shape),
        "grad_norm_all": {t: med[t][0] for t in TERMS},
        "grad_norm_san": {t: med[t][1] for t in TERMS},
        "config_weights": current,
        "shares": shares,
        "suggested_weights": suggested,
    }
    out = Path(output) if Path(output).is_absolute() else BUNDLE_ROOT / output
    atomic_write_json(out, record)
    print(f"written {out}")
    return record


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_command(measure, "python -m scripts.benchmarks.loss_scales", print_result=True)


if __name__ == "__main__":
    main()
