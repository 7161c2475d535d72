"""Procedural whole-body FDG digital phantom: activity (SUV), attenuation map and organ/lesion labels.

Array axis order is (x, y, z) with z axial, in NIfTI RAS+ orientation with a diagonal affine: the index
increases toward the patient's Right (x), Anterior (y) and Superior (z): the head is at high z, the
bladder at low z, the liver at +x, the spleen and heart at -x.

The body (head, neck, torso) is built from ellipsoids and elliptic cylinders with adult dimensions in mm.
A clinical whole-body scan spans ~800 mm axially; a 96 x 4 mm volume spans 384 mm, so the phantom is
compressed along z (organ positions and axial sizes scale with the axial extent, in-plane sizes are real,
lesions are true spheres in mm). Every organ is therefore present in any volume with enough slices.
Organ SUVs are drawn per subject from typical 60-min FDG ranges (liver 2-2.5, lungs ~0.5, brain 7-10,
bladder 10-60, myocardium 1.5-12, ...), each organ gets a smooth multiplicative texture, and hot
spherical lesions (6-30 mm, SUV 3-15) are placed without overlap in liver, lungs, soft tissue, bone
marrow, spleen and neck. Everything is random per ``seed`` and bit-identical for the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "MU_BONE",
    "MU_FAT",
    "MU_LUNG",
    "MU_WATER",
    "Phantom",
    "make_phantom",
    "mu_map_from_suv",
    "phantom_affine",
]

# Linear attenuation coefficients at 511 keV, in 1/cm (the unit of every mu map in this package).
MU_WATER = 0.096
MU_FAT = 0.090
MU_LUNG = 0.030
MU_BONE = 0.130

# Canonical axial length (mm) from the upper thighs to the top of the head that the phantom is squeezed into.
_CANONICAL_HEIGHT_MM = 800.0

# label -> (name, SUV range drawn per subject, mu in 1/cm, texture amplitude (relative std))
_ORGANS: dict[int, tuple[str, tuple[float, float], float, float]] = {
    1: ("fat", (0.25, 0.40), MU_FAT, 0.10),
    2: ("muscle", (0.70, 1.00), MU_WATER, 0.10),
    3: ("brain", (7.0, 10.0), MU_WATER, 0.15),
    4: ("skull", (0.4, 0.8), MU_BONE, 0.10),
    5: ("lungs", (0.40, 0.60), MU_LUNG, 0.12),
    6: ("blood_pool", (1.5, 2.2), MU_WATER, 0.04),
    7: ("myocardium", (1.5, 12.0), MU_WATER, 0.12),
    8: ("liver", (2.0, 2.5), MU_WATER, 0.06),
    9: ("spleen", (1.7, 2.3), MU_WATER, 0.06),
    10: ("kidneys", (2.5, 5.0), MU_WATER, 0.12),
    11: ("bladder", (10.0, 60.0), MU_WATER, 0.02),
    12: ("spine", (1.5, 2.2), MU_BONE, 0.10),
}
ORGAN_NAMES = {label: spec[0] for label, spec in _ORGANS.items()}
LESION_LABEL_START = 100
# Host organs for lesions and their relative chance.
_LESION_HOSTS = {"liver": 3.0, "lungs": 3.0, "muscle": 2.0, "spine": 1.0, "spleen": 1.0, "neck": 1.0}


@dataclass
class Phantom:
    """A digital subject on a voxel grid; every array is (x, y, z), z axial.

    Attributes:
        activity: noise-free activity, float32, SUV (g/mL).
        mu: linear attenuation coefficient at 511 keV, float32, in **1/cm**.
        labels: int16 label map: 0 background, 1-12 organs (see ``label_table``), 100+ one label per lesion.
        label_table: ``{label: {"name", "kind": "organ"|"lesion", "true_suv", "volume_ml", ...}}``;
            ``true_suv`` is the mean noise-free SUV inside the label.
        spacing: voxel size in mm.
        affine: 4x4 RAS affine (mm), diagonal, volume centred on the origin.
        seed: the seed it was made from.
    """

    activity: np.ndarray
    mu: np.ndarray
    labels: np.ndarray
    label_table: dict[int, dict[str, Any]]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    seed: int
    info: dict[str, Any] = field(default_factory=dict)


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Diagonal RAS affine that puts the centre of the volume at world (0, 0, 0) mm."""
    affine = np.eye(4)
    for i in range(3):
        affine[i, i] = spacing[i]
        affine[i, 3] = -(shape[i] - 1) / 2.0 * spacing[i]
    return affine


def _ellipsoid(X, Y, Z, c, r) -> np.ndarray:
    return ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 <= 1.0


def _cylinder(X, Y, Z, c, r, z_range) -> np.ndarray:
    return (((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 <= 1.0) & (Z >= z_range[0]) & (Z <= z_range[1])


def _smooth_field(rng: np.random.Generator, shape, spacing, sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma_mm``."""
    white = rng.standard_normal(shape, dtype=np.float32)
    sigma = [sigma_mm / s for s in spacing]
    f = ndimage.gaussian_filter(white, sigma, mode="wrap")
    return (f - f.mean()) / max(float(f.std()), 1e-12)


def make_phantom(
    shape: tuple[int, int, int] = (128, 128, 96),
    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0),
    seed: int = 0,
    n_lesions: tuple[int, int] = (6, 12),
    lesion_diameter_mm: tuple[float, float] = (6.0, 30.0),
    lesion_suv: tuple[float, float] = (3.0, 15.0),
    texture: bool = True,
    lesion_contrast: tuple[float, float] | None = None,
    lesion_hosts: dict[str, float] | None = None,
    lesion_partial_volume: bool = False,
) -> Phantom:
    """Build a random whole-body FDG phantom.

    Args:
        shape: (nx, ny, nz) voxels; at least 16 x 16 x 4.
        spacing: voxel size (mm) along x, y, z.
        seed: random seed; the same seed gives a bit-identical phantom.
        n_lesions: inclusive range of the number of lesions drawn per subject.
        lesion_diameter_mm: range of lesion diameters (mm), drawn log-uniformly.
        lesion_suv: range of lesion SUVs, drawn uniformly.
        texture: add smooth per-organ heterogeneity (multiplicative, a few % to 15 %).
        lesion_contrast: None: lesion SUVs are drawn from ``lesion_suv`` (the original model). A range
            (e.g. (2, 15)): each lesion's SUV is a contrast drawn log-uniformly from it times the base SUV
            of the tissue at its centre (its background), so lung and liver lesions get realistic levels.
        lesion_hosts: relative chance of each host (default ``{"liver": 3, "lungs": 3, "muscle": 2, "spine": 1,
            "spleen": 1, "neck": 1}``). Hosts: organ names, ``neck`` (soft tissue between the lungs and the
            brain) and ``nodes`` (soft tissue 4-25 mm from a hot organ: heart, kidneys, bladder, blood pool,
            like mediastinal, para-aortic and pelvic lymph nodes).
        lesion_partial_volume: False: a lesion is the set of voxels whose centre lies in its sphere, all at
            the lesion SUV (the original model; a 4 mm lesion becomes a whole 5 mm voxel). True: each voxel
            holds the volume-weighted mix of lesion and background (4^3 or, for small lesions, 8^3 sub-samples per voxel), so the
            truth is the sphere itself; the label is the voxels at least half inside (at least the centre).

    Returns:
        A :class:`Phantom` (activity in SUV, mu in 1/cm, int16 labels, label table).
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or shape[0] < 16 or shape[1] < 16 or shape[2] < 4:
        raise ValueError(f"phantom shape must be 3 sizes, at least 16 x 16 x 4; got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"phantom spacing must be 3 positive sizes in mm; got {spacing}")
    rng = np.random.default_rng(seed)

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    # in-plane: real adult sizes, scaled down only if the field of view is too small for them
    fov = min(shape[0] * spacing[0], shape[1] * spacing[1])
    body_a, body_b = 170.0 * u(0.88, 1.1), 110.0 * u(0.88, 1.1)
    k = min(1.0, 0.86 * fov / (2.0 * body_a), 0.86 * fov / (2.0 * body_b))
    # axial: canonical positions (mm from the thighs) squeezed into the real extent
    extent_z = shape[2] * spacing[2]
    kz = extent_z / _CANONICAL_HEIGHT_MM
    min_half_z = 0.75 * spacing[2]  # keep every organ at least ~1.5 slices thick

    x = (np.arange(shape[0], dtype=np.float32) - (shape[0] - 1) / 2.0) * spacing[0] / k
    y = (np.arange(shape[1], dtype=np.float32) - (shape[1] - 1) / 2.0) * spacing[1] / k
    z = ((np.arange(shape[2], dtype=np.float32) + 0.5) * spacing[2]) / kz  # canonical mm from the bottom
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij", sparse=True)

    def rz(half: float) -> float:  # canonical axial half-length whose real size is at least min_half_z
        return max(half, min_half_z / kz)

    def jit(v: float, mm: float = 10.0) -> float:
        return v + u(-mm, mm)

    def sc(v: float) -> float:
        return v * u(0.9, 1.1)

    labels = np.zeros(shape, dtype=np.int16)

    def paint(mask: np.ndarray, label: int, where: np.ndarray | None = None) -> None:
        m = np.broadcast_to(mask, shape)
        if where is not None:
            m = m & where
        labels[m] = label

    # --- body outline: torso cylinder (thighs to shoulders), neck, head; outer fat layer ---
    torso_top = 570.0 + u(-15, 15)
    fat_mm = u(8.0, 25.0)
    torso = _cylinder(X, Y, Z, (0, 0), (body_a, body_b), (-1e9, torso_top))
    torso_in = _cylinder(X, Y, Z, (0, 0), (body_a - fat_mm, body_b - fat_mm), (-1e9, torso_top - fat_mm))
    neck_r = (sc(55.0), sc(58.0))
    neck = _cylinder(X, Y, Z, (0, -10), neck_r, (torso_top - 20, 660))
    neck_in = _cylinder(X, Y, Z, (0, -10), (neck_r[0] - 6, neck_r[1] - 6), (torso_top - 20, 660))
    head_c, head_r = (0.0, 0.0, 715.0), (sc(75.0), sc(92.0), rz(85.0))
    head = _ellipsoid(X, Y, Z, head_c, head_r)
    paint(torso | neck | head, 1)
    paint(torso_in | neck_in, 2)
    # skull shell and brain
    skull_mm = 7.0
    paint(head, 4)
    brain_r = (head_r[0] - skull_mm, head_r[1] - skull_mm, max(head_r[2] - skull_mm, min_half_z / kz))
    paint(_ellipsoid(X, Y, Z, head_c, brain_r), 3)
    # lungs
    lung_z = jit(450.0)
    for side in (-1, 1):
        paint(_ellipsoid(X, Y, Z, (side * jit(82.0, 6), jit(5.0, 5), lung_z), (sc(62.0), sc(80.0), rz(sc(100.0)))), 5)
    # heart: myocardium shell around a blood pool, left-anterior
    heart_c = (-jit(30.0, 8), jit(35.0, 8), jit(420.0))
    heart_r = (sc(55.0), sc(45.0), rz(sc(50.0)))
    wall = 10.0
    paint(_ellipsoid(X, Y, Z, heart_c, heart_r), 7)
    pool_r = (heart_r[0] - wall, heart_r[1] - wall, max(heart_r[2] - wall, min_half_z / kz))
    paint(_ellipsoid(X, Y, Z, heart_c, pool_r), 6)
    # descending aorta (blood pool)
    paint(_cylinder(X, Y, Z, (-25.0, -body_b + 75.0), (12.0, 12.0), (200.0, lung_z + 40)), 6)
    # liver (patient's right = +x), cut medially so it is not a plain ellipsoid
    liver_c = (jit(70.0), jit(10.0), jit(290.0))
    liver = _ellipsoid(X, Y, Z, liver_c, (sc(95.0), sc(85.0), rz(sc(75.0)))) & (X > -35.0 + u(-10, 10))
    paint(liver, 8)
    # spleen (left, posterior)
    paint(_ellipsoid(X, Y, Z, (-jit(95.0, 6), -jit(35.0, 6), jit(300.0)), (sc(35.0), sc(55.0), rz(sc(55.0)))), 9)
    # kidneys (posterior, either side of the spine)
    kid_z = jit(230.0)
    for side in (-1, 1):
        kidney_c = (side * jit(65.0, 5), -body_b + 55.0, kid_z + side * u(0, 15))
        paint(_ellipsoid(X, Y, Z, kidney_c, (sc(28.0), sc(30.0), rz(sc(55.0)))), 10)
    # bladder (pelvis, anterior)
    paint(_ellipsoid(X, Y, Z, (0.0, jit(25.0, 8), jit(80.0)), (sc(50.0), sc(40.0), rz(sc(40.0)))), 11)
    # spine last, so it is never hidden by a neighbour: vertebral column from the pelvis into the neck
    spine_r = sc(18.0)
    paint(_cylinder(X, Y, Z, (0, -body_b + 40.0), (spine_r, spine_r), (60.0, 620.0)), 12, where=labels > 0)

    # --- activity and mu per organ, with smooth texture ---
    activity = np.zeros(shape, dtype=np.float32)
    mu = np.zeros(shape, dtype=np.float32)
    base_suv: dict[int, float] = {}
    if texture:
        # two scales: fine (~6 mm) and coarse (~20 mm) heterogeneity
        tex = 0.6 * _smooth_field(rng, shape, spacing, 6.0) + 0.8 * _smooth_field(rng, shape, spacing, 20.0)
        tex /= max(float(tex.std()), 1e-12)
    else:
        tex = np.zeros(shape, dtype=np.float32)
    for label, (name, (lo, hi), mu_val, amp) in _ORGANS.items():
        m = labels == label
        if name == "myocardium" or name == "bladder":
            suv = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))  # very variable: log-uniform
        else:
            suv = u(lo, hi)
        base_suv[label] = suv
        if m.any():
            activity[m] = suv * np.clip(1.0 + amp * tex[m], 0.3, 2.0)
            mu[m] = mu_val

    # --- lesions ---
    table: dict[int, dict[str, Any]] = {}
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    hosts = dict(lesion_hosts) if lesion_hosts is not None else dict(_LESION_HOSTS)
    lesions = _place_lesions(
        rng,
        labels,
        spacing,
        k,
        n_lesions,
        lesion_diameter_mm,
        lesion_contrast if lesion_contrast is not None else lesion_suv,
        hosts,
        log_level=lesion_contrast is not None,
    )
    for i, (centre_idx, diameter, level, host) in enumerate(lesions):
        label = LESION_LABEL_START + i
        host_label = int(labels[tuple(centre_idx)])
        background = base_suv.get(host_label, float(activity[tuple(centre_idx)]))
        suv = round(level * background, 4) if lesion_contrast is not None else level
        entry: dict[str, Any] = {}
        if lesion_partial_volume:
            # small spheres need finer sub-sampling for their volume to come out right (8^3: ~1-2 %)
            sub = 8 if diameter < 4.0 * max(spacing) else 4
            sl, frac = _sphere_fraction(shape, spacing, centre_idx, diameter / 2.0, sub)
            m = np.zeros(shape, dtype=bool)
            m[sl] = frac >= 0.5
            m[tuple(centre_idx)] = True
            act = activity[sl]
            activity[sl] = np.where(frac > 0, act * (1.0 - frac) + suv * frac, act).astype(np.float32)
            mu[sl] = np.where(frac > 0, MU_WATER, mu[sl])
            entry["sphere_volume_ml"] = round(math.pi / 6.0 * diameter**3 / 1000.0, 4)
        else:
            m = _sphere_mask(shape, spacing, centre_idx, diameter / 2.0)
            activity[m] = suv
            mu[m] = MU_WATER
        labels[m] = label
        table[label] = {
            "name": f"lesion_{i:02d}",
            "kind": "lesion",
            "true_suv": round(float(suv), 4),
            "volume_ml": round(float(m.sum()) * voxel_ml, 4),
            "diameter_mm": round(float(diameter), 2),
            "host": host,
            "centre_voxel": [int(c) for c in centre_idx],
            "background_suv": round(float(background), 4),
            "host_label": host_label,
            "contrast": round(float(suv / background), 4) if background > 0 else None,
            **entry,
        }
    organ_table = {}
    for label, (name, *_rest) in _ORGANS.items():
        m = labels == label
        n = int(m.sum())
        organ_table[label] = {
            "name": name,
            "kind": "organ",
            "true_suv": round(float(activity[m].mean()), 4) if n else round(base_suv[label], 4),
            "volume_ml": round(n * voxel_ml, 4),
            "base_suv": round(base_suv[label], 4),
        }
    organ_table.update(table)
    return Phantom(
        activity=activity,
        mu=mu,
        labels=labels,
        label_table=organ_table,
        spacing=spacing,
        affine=phantom_affine(shape, spacing),
        seed=int(seed),
        info={"inplane_scale": k, "axial_compression": kz, "fat_mm": fat_mm},
    )


def _sphere_mask(shape, spacing, centre_idx, radius_mm: float) -> np.ndarray:
    """Voxels whose centre is within ``radius_mm`` of the centre voxel (never empty)."""
    grids = [(np.arange(n) - c) * s for n, c, s in zip(shape, centre_idx, spacing)]
    X, Y, Z = np.meshgrid(*grids, indexing="ij", sparse=True)
    m = X**2 + Y**2 + Z**2 <= radius_mm**2
    m[tuple(centre_idx)] = True
    return m


def _sphere_fraction(
    shape, spacing, centre_idx, radius_mm: float, sub: int = 4
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Fraction of each voxel inside a sphere (``sub^3`` sub-samples per voxel) over its bounding box.

    Returns (the box as slices, the float32 fractions in the box)."""
    sl, grids = [], []
    offs = (np.arange(sub) + 0.5) / sub - 0.5  # sub-sample positions within a voxel, in voxels
    for n, c, s in zip(shape, centre_idx, spacing):
        r = int(math.ceil(radius_mm / s)) + 1
        lo, hi = max(0, c - r), min(n, c + r + 1)
        sl.append(slice(lo, hi))
        grids.append(((np.arange(lo, hi)[:, None] - c) + offs[None, :]) * s)  # (voxels, sub) in mm
    X = grids[0][:, None, None, :, None, None]
    Y = grids[1][None, :, None, None, :, None]
    Z = grids[2][None, None, :, None, None, :]
    inside = (X**2 + Y**2 + Z**2) <= radius_mm**2
    return tuple(sl), inside.mean(axis=(3, 4, 5)).astype(np.float32)


def _place_lesions(
    rng, labels, spacing, k, n_range, diam_range, level_range, host_weights=None, log_level: bool = False
) -> list:
    """Non-overlapping lesion centres inside host tissues; returns (centre voxel, diameter mm, level, host).

    ``level`` is drawn from ``level_range``: uniformly (an SUV, the original model) or log-uniformly
    (``log_level``: a contrast to the background)."""
    n = int(rng.integers(n_range[0], n_range[1] + 1))
    body = labels > 0
    # distance to outside the body (mm), so lesions stay inside it
    depth = ndimage.distance_transform_edt(body, sampling=spacing)
    name_to_label = {v: kk for kk, v in ORGAN_NAMES.items()}
    weights = host_weights if host_weights is not None else _LESION_HOSTS
    unknown = set(weights) - set(name_to_label) - {"neck", "nodes"}
    if unknown:
        raise ValueError(f"unknown lesion host(s) {sorted(unknown)}; known: organ names, 'neck', 'nodes'")
    hosts = list(weights)
    probs = np.array([float(weights[h]) for h in hosts])
    # neck: soft tissue in the slices between the torso top and the head
    z_has_lung = np.flatnonzero((labels == name_to_label["lungs"]).any(axis=(0, 1)))
    z_has_brain = np.flatnonzero((labels == name_to_label["brain"]).any(axis=(0, 1)))
    candidates = {}
    for h in hosts:
        if h == "neck":
            m = labels == name_to_label["muscle"]
            if len(z_has_lung) and len(z_has_brain):
                m = m.copy()
                m[:, :, : z_has_lung.max() + 1] = False
                m[:, :, z_has_brain.min() :] = False
            else:
                m = np.zeros_like(m)
        elif h == "nodes":
            hot = np.isin(labels, [name_to_label[o] for o in ("myocardium", "kidneys", "bladder", "blood_pool")])
            dist = (
                ndimage.distance_transform_edt(~hot, sampling=spacing) if hot.any() else np.full(labels.shape, np.inf)
            )
            soft = np.isin(labels, [name_to_label["muscle"], name_to_label["fat"]])
            m = soft & (dist >= 4.0) & (dist <= 25.0)
        else:
            m = labels == name_to_label[h]
        candidates[h] = np.argwhere(m)
    placed: list = []
    for _ in range(n):
        diameter = float(math.exp(rng.uniform(math.log(diam_range[0]), math.log(diam_range[1]))))
        if log_level:
            level = float(math.exp(rng.uniform(math.log(level_range[0]), math.log(level_range[1]))))
        else:
            level = round(float(rng.uniform(*level_range)), 4)  # the label table then states it exactly
        for _try in range(200):
            avail = np.array([len(candidates[h]) > 0 for h in hosts])
            if not avail.any():
                break
            p = probs * avail
            h = hosts[int(rng.choice(len(hosts), p=p / p.sum()))]
            c = candidates[h][int(rng.integers(len(candidates[h])))]
            if depth[tuple(c)] < diameter / 2.0 + 2.0:
                continue
            cmm = np.asarray(c) * spacing
            gaps = [np.linalg.norm(cmm - np.asarray(pc) * spacing) - (diameter + pd) / 2.0 for pc, pd, _, _ in placed]
            if all(g > 4.0 for g in gaps):
                placed.append((tuple(int(v) for v in c), diameter, level, h))
                break
    return placed


def mu_map_from_suv(
    suv: np.ndarray,
    spacing: tuple[float, float, float],
    body_threshold: float | None = None,
    detect_lungs: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Attenuation map (1/cm) for a real SUV volume without CT: the body is water (optionally lungs are lung).

    Args:
        suv: (x, y, z) SUV volume.
        spacing: voxel size in mm.
        body_threshold: SUV above which a smoothed voxel is inside the body (default: 0.1, or a tenth of the
            volume's 99th percentile if that is lower, so Bq/mL-scaled or dim volumes still work).
        detect_lungs: look for lungs: big connected regions of low uptake (below 60 % of the median body SUV)
            well inside the body (> 15 mm deep), holding at least 0.2 L, in slices that are not the lowest third.
            Off by default: on the real FDG series in ../shared, lung uptake (SUV ~0.4-0.5) overlaps fat and
            bowel, and this rule found bowel and arm regions instead of the lungs. A whole-water body only
            over-attenuates the thorax a little, and the simulation stays self-consistent (the same mu map
            is used to simulate and to reconstruct).

    Returns:
        (mu in 1/cm float32, int16 label map with 1 = body, 2 = lungs, a description dict).
    """
    sm = ndimage.gaussian_filter(suv.astype(np.float32), [6.0 / s for s in spacing])
    p99 = float(np.percentile(sm, 99)) if sm.size else 0.0
    thr = body_threshold if body_threshold is not None else min(0.1, 0.1 * p99)
    body = sm > thr
    # fill each axial slice so cold organs inside the body count as tissue
    for kk in range(body.shape[2]):
        body[:, :, kk] = ndimage.binary_fill_holes(body[:, :, kk])
    labels = body.astype(np.int16)
    mu = np.where(body, MU_WATER, 0.0).astype(np.float32)
    info: dict[str, Any] = {"body_threshold_suv": thr, "body_voxels": int(body.sum()), "lungs_detected": False}
    if detect_lungs and body.any():
        depth = ndimage.distance_transform_edt(body, sampling=spacing)
        med = float(np.median(sm[body]))
        cand = body & (depth > 15.0) & (sm < 0.6 * med)
        cand[:, :, : body.shape[2] // 3] = False  # lungs are never in the pelvis
        comp, n = ndimage.label(cand)
        if n:
            voxel_ml = float(np.prod(spacing)) / 1000.0
            sizes = ndimage.sum_labels(np.ones_like(comp), comp, index=np.arange(1, n + 1)) * voxel_ml
            keep = np.flatnonzero(sizes >= 200.0) + 1
            if len(keep):
                lungs = np.isin(comp, keep)
                labels[lungs] = 2
                mu[lungs] = MU_LUNG
                info.update(lungs_detected=True, lung_volume_ml=round(float(lungs.sum()) * voxel_ml, 1))
    return mu, labels, info
