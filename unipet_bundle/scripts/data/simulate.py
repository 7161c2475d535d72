"""Simulate aligned full-dose / low-dose PET from a true activity volume, with scanner physics.

For each subject: a true SUV volume (a procedural phantom, or a real full-dose SUV NIfTI) is blurred by
the detector PSF, forward projected slice by slice with attenuation (mu map from the phantom's tissue
classes, or a body/lung mask for real data), given a smooth scatter and a uniform randoms background,
sampled as Poisson prompts (the full dose is itself a realistic noisy scan), thinned to 1/DRF of the
counts for every dose reduction factor (as list-mode subsampling does), reconstructed with OSEM (3
iterations x 16 subsets by default, background and attenuation in the system model) and post-filtered in
3D, including along z, so noise is correlated axially as in a 3D-reconstructed clinical scan. Images stay
calibrated in SUV at every dose.

Output layout (what the paired-data readers expect), per subject folder::

    <output_dir>/<subject>/full_dose.nii.gz   drf_<N>.nii.gz ...   (SUV, float32, same grid and affine)
                           activity.nii.gz  labels.nii.gz  labels.json  simulation.json

Command line (run from the bundle root)::

    python -m scripts.data.simulate --output_dir D [--n_subjects 3] [--profile fixed|randomised|unseen_recon]
        [--shape "[128,128,96]"] [--spacing "[4.0,4.0,4.0]"] [--drfs "[2,4,10,20,50,100]"] [--seed 0]
        [--activity X.nii.gz --subject NAME] [--overwrite] [any physics knob, e.g. --scatter_fwhm_mm 150]

Profiles (``configs/simulation/*.json``) are data: the default ``fixed`` is the single 0.2.0 setting
(bit-identical output); ``randomised`` draws a scanner and reconstruction per subject (seeded by the subject
seed, recorded in ``simulation.json``); ``unseen_recon`` is the held-out test family, made with one command::

    python -m scripts.data.simulate --output_dir D --profile unseen_recon --n_subjects 4 --seed 1313

Speed: the 128 x 128 x 96 subject with 6-7 dose levels takes ~11 s (fixed) and up to ~40 s (randomised,
6 x 24 OSEM with resolution modelling) on one CPU thread.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import scipy
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from scripts.common.errors import UniPETInputError, exit_bad_input
from scripts.common.geometry import voxel_spacing
from scripts.common.io import atomic_write_json, check_output_path, default_dir_mode
from scripts.common.versioning import bundle_version
from scripts.common.vml_dispatch import resolve_vml_dispatch

from .io import load_nifti, nifti_stem, save_nifti
from .phantom import make_phantom, mu_map_from_suv
from .projector import get_projector
from .recon import OSEMReconstructor, gaussian_filter_mm
from .volume_checks import check_pet_volume

# the attenuation factors are a large first torch.exp: resolve oneMKL's dispatch before it (reproducible counts)
resolve_vml_dispatch()

__all__ = [
    "DEFAULT_DRFS",
    "PHYSICS_DEFAULTS",
    "draw_subject",
    "load_profile",
    "drf_name",
    "load_activity",
    "main",
    "simulate",
    "simulate_pet",
    "simulate_subject",
]

logger = logging.getLogger(__name__)

DEFAULT_DRFS = (2, 4, 10, 20, 50, 100)

# Physics knobs and their defaults (units in the names). Calibrated on the default phantom (128 x 128 x 96,
# 4 mm): full-dose liver CoV 9-11 % (true texture of ~5 % included), scatter + randoms 36 % of the prompts.
# Axial noise texture: the 6 mm axial post-filter gives a liver autocorrelation of ~0.5-0.58 between
# neighbouring 4 mm slices, matching the real GE Discovery ST series in ../shared (0.54-0.71 at 3.3 mm,
# 0.29-0.54 at 6.5 mm, liver boxes). In-plane that older scan is smoother (0.63-0.78 at 4.7 mm) than our
# 5 mm filter gives (~0.4-0.65 at 4 mm, a modern-scanner setting); raise postfilter_fwhm_mm to match it.
PHYSICS_DEFAULTS: dict[str, Any] = {
    "counts_per_suv_ml": 20000.0,  # expected full-dose true counts from 1 mL at SUV 1, before attenuation
    "n_angles": None,  # projection angles over 180 deg; None: the smallest multiple of n_subsets >= max(nx, ny)
    "n_iterations": 3,
    "n_subsets": 16,
    "psf_fwhm_mm": 4.5,  # detector resolution, 3D Gaussian applied to the true activity
    "postfilter_fwhm_mm": 5.0,  # in-plane Gaussian post-filter
    "postfilter_axial_fwhm_mm": 6.0,  # axial Gaussian post-filter (gives the noise its z-correlation)
    "scatter_fraction": 0.25,  # scatter / (trues + scatter)
    "randoms_fraction": 0.15,  # randoms / prompts
    "scatter_fwhm_mm": 150.0,  # width of the (smooth) scatter kernel across the detector
    "low_dose_mode": "thin",  # "thin": binomial subsample of the full-dose counts; "independent": new Poisson
    "psf_modelling": False,  # resolution modelling in OSEM (PSF reconstruction) with the detector PSF
}
PROFILE_DIR = Path(__file__).resolve().parents[2] / "configs" / "simulation"
# knobs a profile may draw per subject: the physics keys (but not n_angles / low_dose_mode) and these
_GRID_DRAWS = ("voxel_inplane_mm", "voxel_axial_mm")
_DRAWABLE = tuple(k for k in PHYSICS_DEFAULTS if k not in ("n_angles", "low_dose_mode")) + (
    "count_level_factor",
    *_GRID_DRAWS,
)
_INT_KNOBS = ("n_iterations", "n_subsets")
_PROFILE_SEED_KEY = 0x9E57  # the draws use their own stream, so the phantom and the noise seeds are unchanged
_MAX_SLICES_PER_CHUNK = 128  # OSEM columns per batch: bounds memory for long real volumes


def drf_name(drf: float) -> str:
    """File stem of one dose level: ``drf_4``, ``drf_2.5``."""
    return f"drf_{drf:g}"


def _as_drfs(drfs: Any) -> list[float]:
    if isinstance(drfs, (int, float)) and not isinstance(drfs, bool):
        drfs = [drfs]
    if isinstance(drfs, str):
        drfs = [v for v in drfs.replace("[", " ").replace("]", " ").replace(",", " ").split()]
    try:
        values = sorted({float(d) for d in drfs})
    except (TypeError, ValueError) as exc:
        raise UniPETInputError(f'--drfs must be a list of numbers like "[2,4,10]"; got {drfs!r}') from exc
    if not values or any(not math.isfinite(d) or d < 1 for d in values):
        raise UniPETInputError(f"--drfs must be numbers >= 1 (dose reduction factors); got {drfs!r}")
    return [int(d) if d.is_integer() else d for d in values]


def _as_triple(value: Any, name: str, kind: type) -> tuple:
    if isinstance(value, str):
        value = value.replace("[", " ").replace("]", " ").replace("(", " ").replace(")", " ").replace(",", " ").split()
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise UniPETInputError(f'--{name} must be three numbers like "[128,128,96]"; got {value!r}') from exc
    if len(out) != 3 or any(v <= 0 for v in out):
        raise UniPETInputError(f"--{name} must be three positive numbers; got {value!r}")
    return out


def _check_physics(params: dict[str, Any]) -> None:
    unknown = set(params) - set(PHYSICS_DEFAULTS)
    if unknown:
        raise UniPETInputError(f"unknown physics option(s) {sorted(unknown)}; known: {sorted(PHYSICS_DEFAULTS)}")
    p = {**PHYSICS_DEFAULTS, **params}
    if not p["counts_per_suv_ml"] > 0:
        raise UniPETInputError("counts_per_suv_ml must be > 0")
    if not (0 <= p["scatter_fraction"] < 1 and 0 <= p["randoms_fraction"] < 1):
        raise UniPETInputError("scatter_fraction and randoms_fraction must be in [0, 1)")
    if int(p["n_iterations"]) < 1 or int(p["n_subsets"]) < 1:
        raise UniPETInputError("n_iterations and n_subsets must be >= 1")
    if p["n_angles"] is not None and int(p["n_angles"]) < int(p["n_subsets"]):
        raise UniPETInputError(f"n_angles ({p['n_angles']}) must be >= n_subsets ({p['n_subsets']})")
    if p["low_dose_mode"] not in ("thin", "independent"):
        raise UniPETInputError(f"low_dose_mode must be 'thin' or 'independent'; got {p['low_dose_mode']!r}")
    for key in ("psf_fwhm_mm", "postfilter_fwhm_mm", "postfilter_axial_fwhm_mm", "scatter_fwhm_mm"):
        if p[key] < 0:
            raise UniPETInputError(f"{key} must be >= 0 mm")
    if not isinstance(p["psf_modelling"], (bool, np.bool_)):
        raise UniPETInputError(f"psf_modelling must be true or false; got {p['psf_modelling']!r}")


def _check_activity(activity: np.ndarray, what: str = "activity") -> np.ndarray:
    """Validate a true activity volume (SUV) and return it as float32 with negatives set to 0."""
    # the bundle's volume policy (3D, finite, some positive voxel) with the simulator's size: at least 8 x 8 pixels
    # per slice, one slice will do; checked after the float32 cast, so a value float32 cannot hold is refused too
    a = check_pet_volume(what, np.asarray(activity).astype(np.float32, copy=False), min_shape=(8, 8, 1))
    hi = float(np.percentile(a[a > 0], 99.9))
    if hi > 200.0:
        raise UniPETInputError(
            f"{what} looks like Bq/mL, not SUV (99.9th percentile {hi:.3g}); convert it to SUV first"
        )
    neg = int(np.count_nonzero(a < 0))
    if neg:
        logger.warning("%s: %d negative voxels set to 0", what, neg)
        a = np.maximum(a, 0.0)
    return a


def _scatter_shape(
    trues: np.ndarray, n_angles: int, n_bins: int, bin_mm: float, dz: float, fwhm_mm: float
) -> np.ndarray:
    """Smooth scatter distribution: the trues blurred widely across the detector, a little across angles and z."""
    sino = trues.reshape(n_angles, n_bins, -1)
    sig = [
        max(n_angles / 36.0, 0.5),  # ~5 degrees: scatter varies slowly with angle
        fwhm_mm * 0.4247 / bin_mm,
        40.0 * 0.4247 / dz,  # scatter also comes from neighbouring slices (3D acquisition)
    ]
    return ndimage.gaussian_filter(sino, sig, mode=("wrap", "constant", "nearest"), truncate=3.0).reshape(trues.shape)


def simulate_pet(
    activity: np.ndarray,
    spacing: Sequence[float],
    drfs: Sequence[float] = DEFAULT_DRFS,
    seed: int = 0,
    mu_map: np.ndarray | None = None,
    *,
    counts_per_suv_ml: float = PHYSICS_DEFAULTS["counts_per_suv_ml"],
    n_angles: int | None = PHYSICS_DEFAULTS["n_angles"],
    n_iterations: int = PHYSICS_DEFAULTS["n_iterations"],
    n_subsets: int = PHYSICS_DEFAULTS["n_subsets"],
    psf_fwhm_mm: float = PHYSICS_DEFAULTS["psf_fwhm_mm"],
    postfilter_fwhm_mm: float = PHYSICS_DEFAULTS["postfilter_fwhm_mm"],
    postfilter_axial_fwhm_mm: float = PHYSICS_DEFAULTS["postfilter_axial_fwhm_mm"],
    scatter_fraction: float = PHYSICS_DEFAULTS["scatter_fraction"],
    randoms_fraction: float = PHYSICS_DEFAULTS["randoms_fraction"],
    scatter_fwhm_mm: float = PHYSICS_DEFAULTS["scatter_fwhm_mm"],
    low_dose_mode: str = PHYSICS_DEFAULTS["low_dose_mode"],
    psf_modelling: bool = PHYSICS_DEFAULTS["psf_modelling"],
    progress: bool = False,
) -> dict[str, Any]:
    """Simulate a full-dose scan and low-dose scans at every DRF from one true activity volume.

    Args:
        activity: true activity, (x, y, z) with z axial, SUV (g/mL); negatives are set to 0.
        spacing: voxel size (mm) along x, y, z.
        drfs: dose reduction factors (>= 1); the low-dose scan at DRF N has 1/N of the full-dose counts.
        seed: random seed; the same seed gives bit-identical images. Each DRF draws from its own stream
            keyed by its value, so DRF 10 is the same whichever other DRFs are asked for.
        mu_map: attenuation at 511 keV in **1/cm**, same shape; None: body mask -> water
            (see :func:`scripts.data.phantom.mu_map_from_suv`).
        counts_per_suv_ml: expected full-dose true coincidences from 1 mL of SUV 1 before attenuation
            (sets the count level: the default gives a liver CoV ~10 % on the 4 mm phantom).
        n_angles: projection angles over 180 degrees; None: the smallest multiple of ``n_subsets`` that
            is at least max(nx, ny) (clinical scanners use ~0.4-0.8 angles per radial bin).
        n_iterations, n_subsets: OSEM iterations and interleaved angle subsets (3 x 16 ~ clinical 3 x 21).
        psf_fwhm_mm: detector resolution, a 3D Gaussian applied to the activity before projection; the
            reconstruction does not model it, so small lesions lose contrast (partial volume) as in PET.
        postfilter_fwhm_mm, postfilter_axial_fwhm_mm: Gaussian post-filter FWHM in-plane and along z (mm).
        scatter_fraction: scatter / (trues + scatter) in every slice.
        randoms_fraction: randoms / prompts in every slice (uniform over the sinogram).
        scatter_fwhm_mm: width of the scatter kernel across the detector (mm).
        low_dose_mode: ``"thin"`` keeps each full-dose count with probability 1/DRF (like list-mode
            subsampling, so low dose and full dose share counts); ``"independent"`` draws new Poisson data.
        psf_modelling: resolution modelling in the reconstruction ("PSF" / "HD" reconstruction): OSEM's
            system model includes the detector PSF (``psf_fwhm_mm``, 3D Gaussian), which recovers contrast,
            gives edge overshoot and coarser, blobbier noise than the same OSEM without it.
        progress: show a progress bar over dose levels.

    Returns:
        ``{"full_dose": (x, y, z) float32 SUV, "drf": {N: (x, y, z) float32 SUV}, "info": {...}}``; info
        holds the parameters and, per dose level, prompts / trues / scatter / randoms counts.
    """
    t0 = time.perf_counter()
    physics = dict(
        counts_per_suv_ml=float(counts_per_suv_ml),
        n_angles=n_angles,
        n_iterations=int(n_iterations),
        n_subsets=int(n_subsets),
        psf_fwhm_mm=float(psf_fwhm_mm),
        postfilter_fwhm_mm=float(postfilter_fwhm_mm),
        postfilter_axial_fwhm_mm=float(postfilter_axial_fwhm_mm),
        scatter_fraction=float(scatter_fraction),
        randoms_fraction=float(randoms_fraction),
        scatter_fwhm_mm=float(scatter_fwhm_mm),
        low_dose_mode=low_dose_mode,
        psf_modelling=bool(psf_modelling),
    )
    _check_physics(physics)
    activity = _check_activity(activity)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise UniPETInputError(f"spacing must be three positive voxel sizes in mm; got {spacing}")
    drf_list = _as_drfs(drfs)
    nx, ny, nz = activity.shape
    mu_info: dict[str, Any] = {"source": "given"}
    if mu_map is None:
        mu_map, _, mu_info = mu_map_from_suv(activity, spacing)
        mu_info = {"source": "estimated from the activity (body mask -> water)", **mu_info}
    mu_map = np.asarray(mu_map, dtype=np.float32)
    if mu_map.shape != activity.shape:
        raise UniPETInputError(f"mu_map shape {mu_map.shape} differs from the activity shape {activity.shape}")
    if not np.all(np.isfinite(mu_map)) or mu_map.min() < 0 or mu_map.max() > 1.0:
        raise UniPETInputError("mu_map must be finite, in 1/cm, between 0 and 1 (water is 0.096)")
    if n_angles is None:
        n_angles = int(math.ceil(max(nx, ny) / n_subsets) * n_subsets)
    n_angles = int(n_angles)
    physics["n_angles"] = n_angles

    proj = get_projector(nx, ny, spacing[0], spacing[1], n_angles)
    # counts per (SUV x mm of line integral) in one bin: a pixel's column of P sums to n_angles*dx*dy/bin
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    scale = counts_per_suv_ml * voxel_ml * proj.bin_mm / (n_angles * spacing[0] * spacing[1])

    # --- expected data (noise free), all slices as columns ---
    blurred = gaussian_filter_mm(activity, spacing, psf_fwhm_mm)
    img_cols = torch.from_numpy(np.ascontiguousarray(blurred.reshape(nx * ny, nz)))
    mu_cols = torch.from_numpy(np.ascontiguousarray((mu_map * 0.1).reshape(nx * ny, nz)))  # 1/cm -> 1/mm
    efficiency = scale * torch.exp(-proj.forward(mu_cols))
    trues = (efficiency * proj.forward(img_cols)).numpy().astype(np.float64)
    t_slice = trues.sum(0)
    scatter = _scatter_shape(trues, n_angles, proj.n_bins, proj.bin_mm, spacing[2], scatter_fwhm_mm)
    s_sum = scatter.sum(0)
    s_target = scatter_fraction / (1.0 - scatter_fraction) * t_slice
    scatter *= np.divide(s_target, s_sum, out=np.zeros_like(s_sum), where=s_sum > 0)[None, :]
    r_slice = randoms_fraction / (1.0 - randoms_fraction) * (t_slice + s_target)
    randoms = np.broadcast_to(r_slice[None, :] / proj.n_rows, trues.shape)
    background = scatter + randoms
    expected = trues + background

    def stream(key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, key]))

    full_counts = stream(0).poisson(expected)
    levels: list[tuple[str, float]] = [("full_dose", 1.0)] + [(drf_name(d), float(d)) for d in drf_list]
    counts_info: dict[str, Any] = {}
    data: dict[str, torch.Tensor] = {}
    for name, drf in levels:
        if drf == 1.0:
            counts = full_counts
        elif low_dose_mode == "thin":
            counts = stream(int(round(drf * 1000))).binomial(full_counts, 1.0 / drf)
        else:
            counts = stream(int(round(drf * 1000))).poisson(expected / drf)
        counts_info[name] = {
            "drf": drf,
            "prompts": int(counts.sum()),
            "trues_expected": float(t_slice.sum() / drf),
            "scatter_expected": float(s_target.sum() / drf),
            "randoms_expected": float(r_slice.sum() / drf),
        }
        # DRF-N counts times N follow the full-dose model exactly, so one system model serves every dose
        data[name] = torch.from_numpy((counts * drf).astype(np.float32))
    del full_counts

    eff_t = efficiency.float()
    # resolution modelling: the reconstruction's system model blurs with the detector PSF. Long volumes
    # are reconstructed in axial chunks; the modelled axial blur then replicates each chunk's end slices,
    # a small approximation only at chunk borders.
    psf_model_mm = float(psf_fwhm_mm) if psf_modelling else 0.0
    bg_t = torch.from_numpy(background.astype(np.float32))
    recon = {name: np.empty((nx * ny, nz), dtype=np.float32) for name, _ in levels}
    chunks = [slice(k0, min(nz, k0 + _MAX_SLICES_PER_CHUNK)) for k0 in range(0, nz, _MAX_SLICES_PER_CHUNK)]
    with tqdm(total=len(chunks) * len(levels), desc="OSEM", unit="dose", leave=False, disable=not progress) as bar:
        for sl in chunks:
            model = OSEMReconstructor(
                proj,
                eff_t[:, sl].contiguous(),
                bg_t[:, sl].contiguous(),
                n_subsets,
                psf_fwhm_mm=psf_model_mm,
                slice_mm=spacing[2],
            )
            for name, _ in levels:
                bar.set_postfix_str(name)
                recon[name][:, sl] = model(data[name][:, sl].contiguous(), n_iterations).numpy()
                bar.update(1)
            del model
    images = {
        name: gaussian_filter_mm(
            vol.reshape(nx, ny, nz), spacing, (postfilter_fwhm_mm, postfilter_fwhm_mm, postfilter_axial_fwhm_mm)
        ).astype(np.float32)
        for name, vol in recon.items()
    }

    prompts_full = counts_info["full_dose"]["prompts"]
    info = {
        "physics": physics,
        "seed": int(seed),
        "drfs": drf_list,
        "spacing_mm": list(spacing),
        "shape": [nx, ny, nz],
        "n_bins": proj.n_bins,
        "bin_mm": proj.bin_mm,
        "mu_map": mu_info,
        "counts": counts_info,
        "background_fraction_of_prompts": float(background.sum() / max(expected.sum(), 1e-30)),
        "full_dose_prompts_per_slice_mean": float(prompts_full / nz),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return {"full_dose": images["full_dose"], "drf": {d: images[drf_name(d)] for d in drf_list}, "info": info}


# ----------------------------------------------------------------------------------------------------
# profiles: which scanner and reconstruction each subject gets (data in configs/simulation/*.json)

_DISTRIBUTIONS = ("value", "uniform", "loguniform", "integers", "choice")
_PHANTOM_KEYS = (
    "n_lesions",
    "lesion_diameter_mm",
    "lesion_suv",
    "texture",
    "lesion_contrast",
    "lesion_hosts",
    "lesion_partial_volume",
)


def load_profile(profile: str | os.PathLike | dict[str, Any] = "fixed") -> dict[str, Any]:
    """Read and check a simulation profile: a name in ``configs/simulation/`` or a path to a JSON file.

    A profile holds ``drfs`` (default dose levels), ``grid`` (``shape`` + ``spacing_mm``, or
    ``field_of_view_mm`` + ``max_shape`` when the voxel size is drawn), ``physics`` (fixed physics keys),
    ``draws`` (per-subject random knobs: ``{"<knob>": {"uniform" | "loguniform" | "integers": [lo, hi]}``,
    ``{"choice": [...]}`` or ``{"value": v}``) and ``phantom`` (keyword arguments of
    :func:`scripts.data.phantom.make_phantom`: lesion count, sizes, contrasts, hosts).

    Raises:
        UniPETInputError: unknown profile, unreadable JSON, unknown keys or bad ranges (says which).
    """
    if isinstance(profile, dict):
        prof, where = dict(profile), "profile"
    else:
        text = str(profile)
        path = Path(text).expanduser() if text.endswith(".json") else PROFILE_DIR / f"{text}.json"
        if not path.is_file():
            known = sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
            raise UniPETInputError(f"--profile {text!r}: no such profile; use one of {known} or a path to a .json file")
        try:
            prof = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UniPETInputError(f"{path}: not a readable JSON profile ({exc})") from exc
        if not isinstance(prof, dict):
            raise UniPETInputError(f"{path}: a profile must be a JSON object")
        prof.setdefault("name", path.stem)
        prof["file"], where = str(path), str(path)
    unknown = set(prof) - {"name", "description", "drfs", "grid", "physics", "draws", "phantom", "file"}
    if unknown:
        raise UniPETInputError(f"{where}: unknown profile key(s) {sorted(unknown)}")
    prof.setdefault("physics", {})
    prof.setdefault("draws", {})
    prof.setdefault("phantom", {})
    prof.setdefault("grid", {"shape": [128, 128, 96], "spacing_mm": [4.0, 4.0, 4.0]})
    prof["drfs"] = _as_drfs(prof.get("drfs", DEFAULT_DRFS))
    bad_phys = set(prof["physics"]) - set(PHYSICS_DEFAULTS)
    if bad_phys:
        raise UniPETInputError(f"{where}: unknown physics key(s) {sorted(bad_phys)}; known: {sorted(PHYSICS_DEFAULTS)}")
    for knob, spec in prof["draws"].items():
        if knob not in _DRAWABLE:
            raise UniPETInputError(f"{where}: cannot draw {knob!r}; drawable knobs: {sorted(_DRAWABLE)}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
            raise UniPETInputError(
                f'{where}: draw {knob!r} must be one of {{"uniform"|"loguniform"|"integers": '
                f'[lo, hi]}}, {{"choice": [...]}}, {{"value": v}}; got {spec!r}'
            )
        kind, arg = next(iter(spec.items()))
        if kind in ("uniform", "loguniform", "integers"):
            if not (
                isinstance(arg, list)
                and len(arg) == 2
                and all(isinstance(v, (int, float)) for v in arg)
                and arg[0] <= arg[1]
            ):
                raise UniPETInputError(f"{where}: draw {knob!r}: {kind} needs [lo, hi] with lo <= hi; got {arg!r}")
            if kind == "loguniform" and arg[0] <= 0:
                raise UniPETInputError(f"{where}: draw {knob!r}: loguniform needs lo > 0; got {arg!r}")
        if kind == "choice" and not (isinstance(arg, list) and arg):
            raise UniPETInputError(f"{where}: draw {knob!r}: choice needs a non-empty list; got {arg!r}")
    bad_ph = set(prof["phantom"]) - set(_PHANTOM_KEYS)
    if bad_ph:
        raise UniPETInputError(f"{where}: unknown phantom key(s) {sorted(bad_ph)}; known: {list(_PHANTOM_KEYS)}")
    grid = prof["grid"]
    if not (("shape" in grid and "spacing_mm" in grid) or ("field_of_view_mm" in grid and "max_shape" in grid)):
        raise UniPETInputError(f"{where}: grid needs shape + spacing_mm, or field_of_view_mm + max_shape")
    return prof


def _draw(rng: np.random.Generator, spec: dict[str, Any]) -> Any:
    kind, arg = next(iter(spec.items()))
    if kind == "value":
        return arg
    if kind == "uniform":
        return float(rng.uniform(arg[0], arg[1]))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1]))))
    if kind == "integers":
        return int(rng.integers(int(arg[0]), int(arg[1]) + 1))
    return arg[int(rng.integers(len(arg)))]


def draw_subject(
    profile: dict[str, Any],
    subject_seed: int,
    overrides: dict[str, Any] | None = None,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """One subject's scanner and reconstruction under ``profile`` (see :func:`load_profile`).

    Draws come from their own random stream, ``SeedSequence([subject_seed, 0x9E57])``, in a fixed order
    (the profile's draw order), so the same subject seed gives the same draws, and the phantom and noise
    (seeded from the same subject seed by other streams) are those of the fixed profile.

    Args:
        profile: a loaded profile.
        subject_seed: the subject's seed.
        overrides: physics knobs given explicitly (CLI); they replace the profile's value or draw.
        shape: explicit grid size: with a drawn voxel size it is the cap (instead of ``max_shape``).
        spacing: explicit voxel size (mm): replaces the profile's spacing or its voxel-size draws.

    Returns:
        ``{"physics": simulate_pet keywords, "shape": (nx, ny, nz), "spacing": (mm, mm, mm),
        "draws": {knob: drawn value}, "overridden": [...]}``.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    rng = np.random.default_rng(np.random.SeedSequence([int(subject_seed) & 0xFFFFFFFF, _PROFILE_SEED_KEY]))
    draws = {knob: _draw(rng, spec) for knob, spec in profile["draws"].items()}
    physics = {**PHYSICS_DEFAULTS, **profile["physics"]}
    for knob, value in draws.items():
        if knob in physics:
            physics[knob] = int(value) if knob in _INT_KNOBS else (bool(value) if knob == "psf_modelling" else value)
    factor = float(draws.get("count_level_factor", 1.0))
    physics["counts_per_suv_ml"] = float(physics["counts_per_suv_ml"]) * factor
    physics.update(overrides)
    grid = profile["grid"]
    if spacing is not None:
        spacing_t = _as_triple(spacing, "spacing", float)
    elif "spacing_mm" in grid:
        spacing_t = _as_triple(grid["spacing_mm"], "spacing", float)
    else:
        vin = float(draws.get("voxel_inplane_mm", 4.0))
        vax = float(draws.get("voxel_axial_mm", vin))
        spacing_t = (vin, vin, vax)
    if "field_of_view_mm" in grid:
        cap = _as_triple(shape if shape is not None else grid["max_shape"], "shape", int)
        fov = _as_triple(grid["field_of_view_mm"], "field_of_view_mm", float)
        shape_t = tuple(
            int(min(c, max(16 if i < 2 else 4, round(f / v)))) for i, (c, f, v) in enumerate(zip(cap, fov, spacing_t))
        )
    else:
        shape_t = _as_triple(shape if shape is not None else grid["shape"], "shape", int)
    return {
        "physics": physics,
        "shape": shape_t,
        "spacing": spacing_t,
        "draws": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in draws.items()},
        "overridden": sorted(overrides),
    }


# ----------------------------------------------------------------------------------------------------
# subjects on disk


def load_activity(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read a real full-dose SUV NIfTI: (validated float32 volume, affine, spacing mm).

    Raises:
        UniPETInputError: missing/unreadable file, not 3D, NaN/inf voxels, not in SUV, z not axial.
    """
    data, affine = load_nifti(path)
    name = Path(path).name
    data = _check_activity(data, what=name)
    axcodes = nib.orientations.aff2axcodes(affine)
    if axcodes[2] not in ("S", "I"):
        raise UniPETInputError(
            f"{name}: array axis 2 must be axial (S/I) but the orientation is {''.join(axcodes)}; "
            "reorient it (e.g. to RAS) first"
        )
    spacing = tuple(voxel_spacing(affine).tolist())
    return data, affine, spacing


def resample_activity(
    activity: np.ndarray, affine: np.ndarray, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Resample a true activity volume (x, y, z; SUV) to isotropic ``spacing_mm`` (trilinear, border padding).

    The network is trained on 4 mm phantoms; resampling a real activity map to the same grid first makes
    the simulated scan's noise texture comparable with the training data. Returns (volume, affine, spacing).
    """
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    if not (isinstance(spacing_mm, (int, float)) and not isinstance(spacing_mm, bool) and 0.5 <= spacing_mm <= 20):
        raise UniPETInputError(f"--resample_mm must be a number of mm between 0.5 and 20; got {spacing_mm!r}")
    img = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(activity, dtype=np.float32))[None],
        affine=torch.as_tensor(affine, dtype=torch.float64),
    )
    out = Spacing(pixdim=(float(spacing_mm),) * 3, mode="bilinear", padding_mode="border", dtype=torch.float32)(img)
    new_affine = out.affine.numpy().astype(np.float64)
    return out[0].numpy().astype(np.float32), new_affine, (float(spacing_mm),) * 3


def _check_subject_name(subject: str) -> str:
    subject = str(subject)
    if not subject or subject.startswith(".") or "/" in subject or "\\" in subject or subject in ("..",):
        raise UniPETInputError(f"subject name {subject!r} must be a plain folder name (no '/', not starting with '.')")
    return subject


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def simulate_subject(
    output_dir: str | os.PathLike,
    subject: str,
    *,
    activity: str | os.PathLike | None = None,
    resample_mm: float | None = None,
    shape: Sequence[int] = (128, 128, 96),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    drfs: Sequence[float] = DEFAULT_DRFS,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    provenance: dict[str, Any] | None = None,
    phantom_options: dict[str, Any] | None = None,
    **physics: Any,
) -> Path:
    """Simulate one subject and write its folder ``<output_dir>/<subject>/`` atomically.

    Args:
        output_dir: dataset folder (created if needed).
        subject: subject folder name.
        activity: a real full-dose SUV NIfTI (x, y, z; z axial); None: a procedural phantom of ``shape``
            and ``spacing`` (ignored for a real volume, which keeps its own grid and affine).
        resample_mm: with ``activity``: resample it to this isotropic spacing (mm) first; None keeps its grid.
        drfs: dose reduction factors to simulate.
        seed: subject seed; the phantom and the noise use two seeds derived from it.
        overwrite: replace an existing subject folder (it is swapped out only once the new one is complete).
        progress: progress bar over dose levels.
        provenance: extra entries for simulation.json (the CLI records the base seed, the profile and the
            subject's draws under ``randomisation``).
        phantom_options: keyword arguments of :func:`scripts.data.phantom.make_phantom` (a profile's
            ``phantom`` entry: lesion count, sizes, contrasts, hosts); None: its defaults.
        **physics: keyword arguments of :func:`simulate_pet` (see ``PHYSICS_DEFAULTS``).

    Returns:
        The subject folder.

    Raises:
        UniPETInputError: bad input, or the folder exists and ``overwrite`` is False. Nothing is written then.
    """
    subject = _check_subject_name(subject)
    _check_physics(physics)
    drf_list = _as_drfs(drfs)
    out_root = Path(output_dir).expanduser()
    if out_root.exists() and not out_root.is_dir():
        raise UniPETInputError(f"--output_dir {out_root} exists and is not a folder")
    target = out_root / subject
    inputs = [activity] if activity is not None else []
    check_output_path(target, overwrite=overwrite, inputs=inputs)
    if activity is not None and _is_within(Path(activity), target):
        raise UniPETInputError(f"{activity} lies inside the output folder {target}; it would be deleted by --overwrite")
    phantom_seed, noise_seed = (int(v) for v in np.random.SeedSequence(int(seed) & 0xFFFFFFFF).generate_state(2))

    t0 = time.perf_counter()
    if activity is None:
        shape_t = _as_triple(shape, "shape", int)
        spacing_t = _as_triple(spacing, "spacing", float)
        try:
            ph = make_phantom(shape_t, spacing_t, seed=phantom_seed, **(phantom_options or {}))
        except (ValueError, TypeError) as exc:
            raise UniPETInputError(f"phantom: {exc}") from exc
        truth, mu, labels, affine, spacing_t = ph.activity, ph.mu, ph.labels, ph.affine, ph.spacing
        label_table = {str(k): v for k, v in ph.label_table.items()}
        source = {"kind": "procedural phantom", "phantom_seed": phantom_seed, "phantom_info": ph.info}
    else:
        truth, affine, spacing_t = load_activity(activity)
        native_spacing = spacing_t
        if resample_mm is not None:
            truth, affine, spacing_t = resample_activity(truth, affine, resample_mm)
        mu, labels, mu_info = mu_map_from_suv(truth, spacing_t)
        voxel_ml = float(np.prod(spacing_t)) / 1000.0
        note = (
            "real SUV input without organ labels: only a body mask (smoothed SUV above a threshold) is "
            "labelled (attenuation: water inside it); no organ or lesion labels"
        )
        label_table = {}
        for lab, name in ((1, "body"), (2, "lungs")):
            m = labels == lab
            if m.any():
                label_table[str(lab)] = {
                    "name": name,
                    "kind": "organ",
                    "true_suv": round(float(truth[m].mean()), 4),
                    "volume_ml": round(float(m.sum()) * voxel_ml, 2),
                    "note": note,
                }
        source = {
            "kind": "real SUV volume",
            "file": Path(activity).name,
            "mu_map": mu_info,
            "labels_note": note,
            "native_spacing_mm": [round(v, 4) for v in native_spacing],
            "resampled_to_mm": resample_mm,
        }
    logger.info(
        "%s: %s %s at %s mm, DRFs %s",
        subject,
        source["kind"],
        tuple(truth.shape),
        tuple(round(s, 3) for s in spacing_t),
        drf_list,
    )
    result = simulate_pet(truth, spacing_t, drf_list, seed=noise_seed, mu_map=mu, progress=progress, **physics)
    info = dict(result["info"])
    info.pop("seed")

    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{subject}.tmp-", dir=out_root))
    try:
        os.chmod(tmp, default_dir_mode())  # mkdtemp makes it private; the dataset folder should not be
        save_nifti(result["full_dose"], affine, tmp / "full_dose.nii.gz")
        for d in drf_list:
            save_nifti(result["drf"][d], affine, tmp / f"{drf_name(d)}.nii.gz")
        save_nifti(truth, affine, tmp / "activity.nii.gz")
        save_nifti(labels.astype(np.int16), affine, tmp / "labels.nii.gz", dtype=np.int16)
        atomic_write_json(tmp / "labels.json", label_table)
        meta = {
            "description": "simulated data: PET scans simulated from a known activity volume (not patient "
            "scans); full dose and low dose at each DRF share the same truth and grid",
            "data_kind": "simulated data",
            "subject": subject,
            "software": {
                "name": "unipet_bundle scripts.data.simulate",
                "version": bundle_version(),
                "numpy": np.__version__,
                "scipy": scipy.__version__,
                "torch": torch.__version__,
            },
            "subject_seed": int(seed),
            "noise_seed": noise_seed,
            **(provenance or {}),
            "source": source,
            "units": "SUV (g/mL), float32; mu map in 1/cm",
            "axis_order": "x, y, z (z axial), NIfTI RAS affine",
            "files": {
                "full_dose": "full_dose.nii.gz",
                **{drf_name(d): f"{drf_name(d)}.nii.gz" for d in drf_list},
                "activity": "activity.nii.gz",
                "labels": "labels.nii.gz",
            },
            **info,
        }
        atomic_write_json(tmp / "simulation.json", meta)
        old = None
        if target.exists():  # overwrite: swap the finished folder in, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{subject}.old-", dir=out_root))
            os.rename(target, old / subject)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    c = info["counts"]
    logger.info(
        "%s: written in %.1f s; full-dose prompts %.3g (%.0f%% scatter+randoms), DRF %s prompts %.3g",
        subject,
        time.perf_counter() - t0,
        c["full_dose"]["prompts"],
        100 * info["background_fraction_of_prompts"],
        drf_list[-1],
        c[drf_name(drf_list[-1])]["prompts"],
    )
    return target


# ----------------------------------------------------------------------------------------------------
# command line


def simulate(
    output_dir: str,
    n_subjects: int = 3,
    profile: str = "fixed",
    first_subject: int = 0,
    shape: Any = None,
    spacing: Any = None,
    drfs: Any = None,
    seed: int = 0,
    activity: str | None = None,
    subject: str | None = None,
    resample_mm: float | None = None,
    overwrite: bool = False,
    counts_per_suv_ml: float | None = None,
    n_angles: int | None = None,
    n_iterations: int | None = None,
    n_subsets: int | None = None,
    psf_fwhm_mm: float | None = None,
    psf_modelling: bool | None = None,
    postfilter_fwhm_mm: float | None = None,
    postfilter_axial_fwhm_mm: float | None = None,
    scatter_fraction: float | None = None,
    randoms_fraction: float | None = None,
    scatter_fwhm_mm: float | None = None,
    low_dose_mode: str | None = None,
) -> None:
    """Simulate paired full-dose / low-dose PET (simulated data) into <output_dir>/<subject>/.

    Each subject folder gets full_dose.nii.gz, drf_<N>.nii.gz per DRF (SUV, float32), activity.nii.gz
    (noise-free truth), labels.nii.gz + labels.json (organs and lesions, one label per lesion with its
    diameter, true SUV, background and contrast) and simulation.json (every physics value used and, under
    "randomisation", the profile and this subject's draws). Physics: PSF blur, attenuated 2D projection,
    scatter + randoms, Poisson counts, 1/DRF thinning, OSEM (optionally with resolution modelling) and a
    3D post-filter.

    Profiles (configs/simulation/<name>.json, or a path) say which scanner and reconstruction each subject
    gets: "fixed" (default; the single setting of 0.2.0, output unchanged), "randomised" (per-subject draws
    over count level, OSEM schedule, PSF modelling, post-filters, voxel size, scatter, randoms: the
    training data) and "unseen_recon" (the held-out test family: reconstructions outside the training
    ranges and DRFs 7, 30, 150). A physics option given here replaces the profile's value or draw.

    Args:
        output_dir: dataset folder to write subject folders into.
        n_subjects: number of procedural phantoms (phantom_000, phantom_001, ...); ignored with --activity.
        profile: simulation profile name (fixed, randomised, unseen_recon) or a .json path.
        first_subject: simulate only phantoms first_subject .. n_subjects-1 (each subject's seed depends on
            its index alone, so two processes given disjoint ranges write what one process would).
        shape: phantom size in voxels, e.g. "[128,128,96]" (x, y, z; z axial); with a drawn voxel size,
            the cap on the grid (default: the profile's).
        spacing: phantom voxel size in mm, e.g. "[4.0,4.0,4.0]" (default: the profile's, or its draw).
        drfs: dose reduction factors, e.g. "[2,4,10,20,50,100]" (default: the profile's).
        seed: base seed; subject i uses a seed derived from (seed, i); same seed -> identical files.
        activity: a real full-dose SUV NIfTI to simulate from instead of phantoms (keeps its grid).
        subject: subject folder name for --activity (default: the file name without .nii.gz).
        resample_mm: with --activity: resample it to this isotropic voxel size first, e.g. 4 (the phantoms' grid).
        overwrite: replace existing subject folders (otherwise they are refused).
        counts_per_suv_ml: full-dose count level: expected true counts from 1 mL at SUV 1 (before attenuation).
        n_angles: projection angles over 180 degrees (default: the matrix size rounded up to a multiple of n_subsets).
        n_iterations: OSEM iterations.
        n_subsets: OSEM subsets.
        psf_fwhm_mm: detector resolution (3D Gaussian FWHM, mm).
        psf_modelling: model the detector PSF in the reconstruction (true/false).
        postfilter_fwhm_mm: in-plane post-filter FWHM (mm).
        postfilter_axial_fwhm_mm: axial post-filter FWHM (mm).
        scatter_fraction: scatter / (trues + scatter).
        randoms_fraction: randoms / prompts.
        scatter_fwhm_mm: width of the smooth scatter kernel across the detector (mm).
        low_dose_mode: "thin" (subsample the full-dose counts, like list mode) or "independent".
    """
    prof = load_profile(profile)
    overrides = dict(
        counts_per_suv_ml=counts_per_suv_ml,
        n_angles=n_angles,
        n_iterations=n_iterations,
        n_subsets=n_subsets,
        psf_fwhm_mm=psf_fwhm_mm,
        psf_modelling=psf_modelling,
        postfilter_fwhm_mm=postfilter_fwhm_mm,
        postfilter_axial_fwhm_mm=postfilter_axial_fwhm_mm,
        scatter_fraction=scatter_fraction,
        randoms_fraction=randoms_fraction,
        scatter_fwhm_mm=scatter_fwhm_mm,
        low_dose_mode=low_dose_mode,
    )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "psf_modelling" in overrides:
        from scripts.common.options import as_bool

        overrides["psf_modelling"] = as_bool(overrides["psf_modelling"], "psf_modelling")
    _check_physics({**prof["physics"], **overrides})
    drf_list = _as_drfs(drfs) if drfs is not None else prof["drfs"]
    out_root = Path(str(output_dir)).expanduser()
    if activity is not None:
        jobs = [(_check_subject_name(subject if subject else nifti_stem(activity)), int(seed))]
        provenance = {"base_seed": int(seed), "seed_rule": "the subject seed is the base seed"}
    else:
        if subject is not None:
            raise UniPETInputError("--subject names a real --activity input; phantoms are named phantom_000, ...")
        if resample_mm is not None:
            raise UniPETInputError("--resample_mm resamples a real --activity input; phantoms are made on --spacing")
        if int(n_subjects) < 1:
            raise UniPETInputError(f"--n_subjects must be >= 1; got {n_subjects}")
        if not 0 <= int(first_subject) < int(n_subjects):
            raise UniPETInputError(
                f"--first_subject must be in [0, n_subjects - 1 = {int(n_subjects) - 1}]; got {first_subject}"
            )
        if shape is not None:
            shape_chk = _as_triple(shape, "shape", int)
            if shape_chk[0] < 16 or shape_chk[1] < 16 or shape_chk[2] < 4:
                raise UniPETInputError(f"--shape must be at least [16,16,4]; got {list(shape_chk)}")
        if spacing is not None:
            _as_triple(spacing, "spacing", float)
        seeds = np.random.SeedSequence(int(seed) & 0xFFFFFFFF).spawn(int(n_subjects))
        jobs = [
            (f"phantom_{i:03d}", int(s.generate_state(1)[0])) for i, s in enumerate(seeds) if i >= int(first_subject)
        ]
        provenance = {
            "base_seed": int(seed),
            "seed_rule": "subject_seed of subject i = SeedSequence(base_seed).spawn(n)[i].generate_state(1)[0]",
        }
    # every subject's draws first: a bad combination is refused before any work
    plans = []
    for name, subject_seed in jobs:
        plan = draw_subject(prof, subject_seed, overrides, shape, spacing)
        _check_physics(plan["physics"])
        plans.append((name, subject_seed, plan))
    # refuse before any work, so a clash at subject 3 does not leave subjects 1-2 behind half a dataset
    for name, _ in jobs:
        check_output_path(out_root / name, overwrite=overwrite, inputs=[activity] if activity else [])
    if activity is not None:
        load_activity(activity)  # validate before the progress bar starts; cheap next to the simulation
    logger.info(
        "simulating %d subject(s) into %s (simulated data), profile %s, DRFs %s",
        len(jobs),
        out_root,
        prof["name"],
        drf_list,
    )
    t0 = time.perf_counter()
    for name, subject_seed, plan in tqdm(plans, desc="subjects", unit="subject"):
        randomisation = {
            "profile": prof["name"],
            "profile_file": Path(prof.get("file", "")).name or None,
            "draws": plan["draws"],
            "overridden_on_the_command_line": plan["overridden"],
            "draw_seed_rule": "SeedSequence([subject_seed, 0x9E57])",
        }
        if activity is not None and any(k in plan["draws"] for k in _GRID_DRAWS):
            randomisation["note"] = "voxel-size draws unused: a real --activity keeps its grid (or --resample_mm)"
        if prof["phantom"] and activity is not None:
            randomisation.setdefault("note", "")
            randomisation["note"] += "; the profile's phantom (lesion) options do not apply to a real --activity"
        simulate_subject(
            out_root,
            name,
            activity=activity,
            resample_mm=resample_mm,
            shape=plan["shape"],
            spacing=plan["spacing"],
            drfs=drf_list,
            seed=subject_seed,
            overwrite=overwrite,
            progress=True,
            provenance={**provenance, "randomisation": randomisation},
            phantom_options=prof["phantom"] or None,
            **plan["physics"],
        )
    logger.info("done: %d subject(s) in %.1f s", len(jobs), time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``python -m scripts.data.simulate --help``."""
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        fire.Fire(simulate, command=list(argv) if argv is not None else None, name="python -m scripts.data.simulate")
    except UniPETInputError as exc:
        exit_bad_input(exc)


if __name__ == "__main__":
    main()
