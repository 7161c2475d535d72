"""Per-study quality-control report of an inference run: what a PET physicist checks before trusting an output.

For every input ``<name>`` the run writes, beside its other outputs and as part of the same output set
(staged under our temporary names, published by the run that holds the input's claim, before the sidecar:
:mod:`scripts.inference.claims`, :class:`scripts.inference.writer.SaveDenoisedd`):

- ``<name>_denoised_qc.png``: coronal maximum-intensity projections (top row) and a coronal slice through
  the hottest focus (bottom row) of the input, the output and output - input, in fixed SUV windows with
  colour bars (``qc_suv_window``, ``qc_diff_window``), oriented from the affine (radiological: the
  patient's right on the viewer's left; :mod:`scripts.evaluation.display`), with R/L/S/I letters and a
  mm scale bar;
- ``<name>_denoised_qc.json``: the numbers below, the thresholds and any warnings.

What is measured (input = the SUV the run read, output = the SUV it wrote, both on the input's grid):

- **hottest foci**: local maxima of the input at least ``qc_hotspot_min_suv`` and at least
  ``qc_hotspot_separation_mm`` apart, the ``qc_num_hotspots`` highest. For each, in a sphere of half that
  separation around the input's peak voxel: SUVmax, SUVpeak (highest 1 mL sphere mean, PERCIST) and
  SUVmean (voxels at or above 50 % of the input's SUVmax there, the same voxels before and after), and
  their change in %. The brain and bladder are often among them: they are the hottest foci too.
- **body total activity**: sum of SUV x voxel volume (SUV·mL, proportional to activity) over the body hull
  (input SUV above ``qc_body_min_suv``, the holes of every axial slice filled and dilated by
  ``qc_body_margin_mm``: :func:`scripts.data.body.body_hull`; the same voxels before and after) and over the
  whole field of view. Until 0.5.0 the body was the thresholded voxels alone, in which any count-keeping
  smoothing loses ~2 % (noise-selected voxels and the skin edge).
- **liver**: not segmented. With ``qc_liver_center_mm`` (RAS+ mm, e.g. read off a viewer) the report
  uses a 30 mm sphere there (PERCIST's liver VOI). Otherwise it places a 30 mm cube automatically: in the
  patient's right half, fully inside the body, with a mean SUV of 1.3-3.5 on an 8 mm-block average of the
  input, the cube whose block averages vary least (chosen on smoothed data, so the choice does not depend
  on the noise the denoiser removes). In FDG whole-body scans that is usually the liver; it is reported
  as ``reference_region`` with its centre, so check it. SUVmean and CoV (std/mean, %) before and after.
- **run time per stage**: reading and preprocessing, this QC analysis of the input, the network (with
  the correction back to the input grid), and writing the outputs.

A body total change beyond ``qc_max_body_total_change_pct`` or a hot-spot SUVmax change beyond
``qc_max_hotspot_change_pct`` logs a ``WARNING`` line naming the study and the focus, and is listed under
``warnings`` in the JSON. The shipped 0.2.0 model lowers hot spots on the real series: expect warnings.

The handler also gives the sidecar the input's SUVmax and the stage times when the report is off
(``qc_report: false``: no PNG/JSON, the numbers above are not computed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from scipy import ndimage

from scripts.common.errors import shown
from scripts.common.geometry import voxel_spacing
from scripts.common.io import default_file_mode, json_default
from scripts.common.options import as_bool
from scripts.data.body import body_hull
from scripts.evaluation.display import draw_panel, panel, ras_index, to_ras
from scripts.evaluation.regions import suv_peak

__all__ = ["QC_JSON_SUFFIX", "QC_PNG_SUFFIX", "QCReport", "analyse_input", "compare_output"]

logger = logging.getLogger(__name__)

QC_PNG_SUFFIX = "_denoised_qc.png"
QC_JSON_SUFFIX = "_denoised_qc.json"
_REF_MM = 30.0  # PERCIST liver VOI: 3 cm
_REF_BLOCK_MM = 8.0
_REF_RANGE = (1.3, 3.5)  # FDG liver SUVmean range used to pick the automatic reference cube
_SLAB_VOXELS = 4_000_000  # voxels per slab of the whole-volume passes: bounds their temporaries


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.numpy()
    return np.asarray(x)


def _order(x: np.ndarray) -> str:
    """``"F"`` for a Fortran-ordered array (NIfTI), else ``"C"``: the order that reads ``x`` without a copy."""
    return "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"


def _pct(after: float, before: float) -> float:
    return float(100.0 * (after - before) / before) if before not in (0.0,) and math.isfinite(before) else float("nan")


def _sphere_box(
    shape: Sequence[int], spacing: np.ndarray, centre: Sequence[int], radius_mm: float
) -> tuple[tuple[slice, ...], np.ndarray]:
    r = np.ceil(radius_mm / spacing).astype(int)
    lo = np.maximum(np.asarray(centre) - r, 0)
    hi = np.minimum(np.asarray(centre) + r + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grids = np.meshgrid(*[(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, centre, spacing)], indexing="ij")
    return box, (grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2) <= radius_mm**2


def _maxima_in_box(suv: np.ndarray, box: tuple[slice, ...], size: Sequence[int], min_suv: float) -> np.ndarray:
    """Voxels (absolute (N, 3) indices) of ``suv[box]`` that are at least ``min_suv`` and the maximum of their
    ``size`` neighbourhood, the neighbourhood clipped to the box ("nearest" padding at its faces).

    In slabs along axis 0 with a halo (exact; bounded memory: no box-size filter output)."""
    halo = size[0] // 2
    a0, a1 = box[0].start, box[0].stop
    rows = max(1, _SLAB_VOXELS // max(1, int(np.prod([s.stop - s.start for s in box[1:]]))))
    found = [np.zeros((0, 3), dtype=np.int64)]
    for start in range(a0, a1, rows):
        stop = min(a1, start + rows)
        lo, hi = max(a0, start - halo), min(a1, stop + halo)
        block = np.asarray(suv[lo:hi, box[1], box[2]], dtype=np.float32)
        core = slice(start - lo, stop - lo)
        if not block[core].max() >= min_suv:
            continue
        local = ndimage.maximum_filter(block, size=size, mode="nearest")
        c = np.argwhere((block[core] >= min_suv) & (block[core] >= local[core]))
        c += np.array([start, box[1].start, box[2].start])
        found.append(c)
    return np.concatenate(found)


def _hot_blocks(suv: np.ndarray, min_suv: float, block: Sequence[int]) -> np.ndarray:
    """Which ``block``-sized blocks (the last of an axis may be shorter) hold a voxel of at least ``min_suv``:
    bool, ``ceil(shape / block)``. One thresholding pass, in slabs along the array's slowest axis in memory
    (a NIfTI array is Fortran-ordered: slabs along axis 0 would stride through all of it for each slab);
    such voxels are few, so their indices are cheap, and a slab bounds them when they are not."""
    perm = [int(a) for a in np.argsort([-abs(st) for st in suv.strides], kind="stable")]
    view = suv.transpose(perm)
    blk = [block[a] for a in perm]
    out = np.zeros([-(-view.shape[a] // blk[a]) for a in range(3)], dtype=bool)
    rows = max(1, _SLAB_VOXELS // max(1, int(np.prod(view.shape[1:]))))
    for start in range(0, view.shape[0], rows):
        slab = np.asarray(view[start : start + rows])
        i, j, k = np.unravel_index(np.flatnonzero(slab >= min_suv), slab.shape)
        out[(i + start) // blk[0], j // blk[1], k // blk[2]] = True
    return out.transpose(np.argsort(perm))


def find_hotspots(
    suv: np.ndarray,
    spacing: np.ndarray,
    count: int,
    min_suv: float,
    separation_mm: float,
    affine: np.ndarray | None = None,
) -> list[tuple[int, int, int]]:
    """Voxel indices of the ``count`` highest local maxima at least ``min_suv`` and ``separation_mm`` apart.

    A local maximum is a voxel whose value is the largest of its neighbourhood (``separation_mm`` wide, at
    least 3 voxels; "nearest" padding at the volume's faces), as ``scipy.ndimage.maximum_filter`` finds it.
    Only neighbourhoods around voxels of at least ``min_suv`` can hold a focus, so the filter runs only
    there (exactly the whole-volume result, several times faster on a whole-body study): the volume is cut
    into blocks of at least one halo (half the neighbourhood), the blocks holding such voxels and their neighbour
    blocks are grouped into connected regions, and each region's bounding box (which holds the whole
    neighbourhood of every voxel of its hot blocks) is filtered on its own, in slabs.

    Equal values (a plateau) are ordered by their RAS+ mm position (with ``affine``), so the same study
    stored in another axis order gives the same foci."""
    size = [max(3, 2 * int(round(separation_mm / 2.0 / s)) + 1) for s in spacing]
    # blocks of at least one halo: a voxel's neighbourhood lies in its block and the 26 around it (4 voxels at
    # least, so the block grid stays small when the neighbourhood is only a few voxels wide)
    block = [max(s // 2, 4) for s in size]
    coarse_hot = _hot_blocks(suv, min_suv, block)
    labels, _ = ndimage.label(
        ndimage.binary_dilation(coarse_hot, structure=np.ones((3, 3, 3), dtype=bool)),
        structure=np.ones((3, 3, 3), dtype=int),
    )
    found = [np.zeros((0, 3), dtype=np.int64)]
    for k, region in enumerate(ndimage.find_objects(labels), 1):
        if region is None:
            continue
        box = tuple(slice(r.start * b, min(r.stop * b, n)) for r, b, n in zip(region, block, suv.shape))
        c = _maxima_in_box(suv, box, size, min_suv)
        # keep the voxels of this region's own blocks: their neighbourhoods lie inside the box (so the box's
        # faces change nothing for them); the box may overlap another region's, whose voxels that one keeps
        found.append(c[labels[tuple((c // np.asarray(block)).T)] == k])
    cand = np.concatenate(found)
    if cand.size == 0:
        return []
    world = (
        (np.c_[cand, np.ones(len(cand))] @ np.asarray(affine, dtype=np.float64).T)[:, :3]
        if affine is not None
        else cand
    )
    world = np.round(world, 3)
    order = np.lexsort((world[:, 2], world[:, 1], world[:, 0], -suv[tuple(cand.T)]))
    picked: list[np.ndarray] = []
    for i in order:
        p = cand[i]
        if all(np.linalg.norm((p - q) * spacing) >= separation_mm for q in picked):
            picked.append(p)
            if len(picked) == count:
                break
    return [tuple(int(v) for v in p) for p in picked]


def _focus_stats(
    suv: np.ndarray, box: tuple[slice, ...], sphere: np.ndarray, mean_mask: np.ndarray, spacing: np.ndarray
) -> dict[str, float]:
    sub = np.asarray(suv[box], dtype=np.float64)
    return {
        "suv_max": float(sub[sphere].max()),
        "suv_peak": suv_peak(sub, sphere, spacing),
        "suv_mean": float(sub[mean_mask].mean()),
    }


def _block_means(x: np.ndarray, block: Sequence[int]) -> np.ndarray:
    """Means of ``x`` over ``block``-sized blocks (each axis a multiple of its block): float32, ``shape / block``.

    In slabs of whole block rows along the array's slowest axis in memory (a NIfTI array is Fortran-ordered:
    block rows of its axis 0 would stride through the whole volume), summed in float64, so the result does
    not depend on how the array is stored (the reference cube must not move with the storage order)."""
    perm = [int(a) for a in np.argsort([-abs(st) for st in x.strides], kind="stable")]
    view = x.transpose(perm)
    b = [int(block[a]) for a in perm]
    n = [view.shape[a] // b[a] for a in range(3)]
    out = np.empty(n, dtype=np.float32)
    step = max(1, _SLAB_VOXELS // max(1, b[0] * int(np.prod(view.shape[1:]))))
    for i0 in range(0, n[0], step):
        i1 = min(n[0], i0 + step)
        part = np.ascontiguousarray(view[i0 * b[0] : i1 * b[0]], dtype=np.float32)
        sums = part.reshape(i1 - i0, b[0], n[1], b[1], n[2], b[2]).sum(axis=(1, 3, 5), dtype=np.float64)
        out[i0:i1] = sums / float(b[0] * b[1] * b[2])
    return out.transpose(np.argsort(perm))


def _reference_cube(
    suv: np.ndarray, affine: np.ndarray, body: np.ndarray
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """The automatic liver-like reference cube (see the module docstring) as a box of the stored array, or None
    when no cube qualifies. The search runs on the RAS+ view (:func:`scripts.evaluation.display.to_ras`), so
    the block grid, and the cube found, do not depend on how the input stores its axes."""
    ras, spacing, _ = to_ras(suv, affine)
    ras_body, _, _ = to_ras(body, affine)
    block = [max(1, int(round(_REF_BLOCK_MM / s))) for s in spacing]
    n = [ras.shape[a] // block[a] for a in range(3)]
    if min(n) < 4:
        return None
    crop = tuple(slice(0, n[a] * block[a]) for a in range(3))

    coarse, inside = _block_means(ras[crop], block), _block_means(ras_body[crop], block)
    k = [max(2, int(round(_REF_MM / (block[a] * spacing[a])))) for a in range(3)]
    mean = ndimage.uniform_filter(coarse, size=k, mode="constant")
    sq = ndimage.uniform_filter(coarse**2, size=k, mode="constant")
    full = ndimage.minimum_filter(inside, size=k, mode="constant") >= 0.999
    cov = np.sqrt(np.maximum(sq - mean**2, 0.0)) / np.maximum(mean, 1e-6)
    ok = full & (mean >= _REF_RANGE[0]) & (mean <= _REF_RANGE[1])
    body_x = np.argwhere(inside > 0.5)[:, 0]
    if body_x.size == 0:
        return None
    ok &= (np.arange(n[0]) > np.median(body_x))[:, None, None]  # RAS axis 0 points to the patient's right
    if not ok.any():
        return None
    best = np.unravel_index(np.argmin(np.where(ok, cov, np.inf)), cov.shape)
    # a window of size k centred (scipy's origin 0) at c covers blocks [c - k // 2, c - k // 2 + k)
    lo = [int((best[a] - k[a] // 2) * block[a]) for a in range(3)]
    hi = [int(lo[a] + k[a] * block[a]) for a in range(3)]
    ras_box = [(max(0, a), min(b, ras.shape[i])) for i, (a, b) in enumerate(zip(lo, hi))]
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    box = []
    for axis, (target, flip) in enumerate(ornt):
        a, b = ras_box[int(target)]
        box.append(slice(a, b) if flip > 0 else slice(suv.shape[axis] - b, suv.shape[axis] - a))
    box_t = tuple(box)
    return box_t, np.ones([sl.stop - sl.start for sl in box_t], dtype=bool)


def _region_stats(suv: np.ndarray, box: tuple[slice, ...], mask: np.ndarray) -> dict[str, float]:
    vals = np.asarray(suv[box], dtype=np.float64)[mask]
    mean = float(vals.mean())
    return {"suv_mean": mean, "cov_pct": float(100.0 * vals.std() / mean) if mean > 0 else float("nan")}


def analyse_input(
    suv: np.ndarray,
    affine: np.ndarray,
    num_hotspots: int = 5,
    hotspot_min_suv: float = 4.0,
    hotspot_separation_mm: float = 20.0,
    body_min_suv: float = 0.3,
    liver_center_mm: Sequence[float] | None = None,
    convention: str = "radiological",
    body_margin_mm: float = 12.0,
) -> dict[str, Any]:
    """The input half of the report (before the network touches the data; the input array is not modified).

    Args:
        suv: (X, Y, Z) input SUV in its storage order.
        affine: 4x4 voxel -> RAS+ mm.
        num_hotspots, hotspot_min_suv, hotspot_separation_mm, body_min_suv, liver_center_mm, convention,
        body_margin_mm: see :class:`QCReport`.

    Returns:
        A dict with ``numbers`` (JSON-ready before-values) and private entries (masks, boxes, 2D panels)
        that :func:`compare_output` needs.
    """
    suv = np.asarray(suv)
    affine = np.asarray(affine, dtype=np.float64)
    spacing = voxel_spacing(affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    body = suv > body_min_suv  # tissue (the reference cube must lie in it)
    hull = body_hull(body, affine, body_margin_mm)  # what the body total counts
    spots = []
    for rank, p in enumerate(
        find_hotspots(suv, spacing, num_hotspots, hotspot_min_suv, hotspot_separation_mm, affine), 1
    ):
        box, sphere = _sphere_box(suv.shape, spacing, p, max(hotspot_separation_mm / 2.0, 1.5 * float(spacing.max())))
        mean_mask = sphere & (np.asarray(suv[box]) >= 0.5 * float(suv[p]))
        spots.append(
            {
                "rank": rank,
                "voxel": list(p),
                "mm": (affine @ np.r_[p, 1.0])[:3].round(1).tolist(),
                "box": box,
                "sphere": sphere,
                "mean_mask": mean_mask,
                "before": _focus_stats(suv, box, sphere, mean_mask, spacing),
            }
        )
    ref: dict[str, Any] | None = None
    if liver_center_mm is not None:
        centre = np.rint(np.linalg.solve(affine, np.r_[np.asarray(liver_center_mm, dtype=np.float64), 1.0])[:3]).astype(
            int
        )
        if np.all(centre >= 0) and np.all(centre < suv.shape):
            box, sphere = _sphere_box(suv.shape, spacing, centre, _REF_MM / 2.0)
            ref = {
                "kind": "liver",
                "method": "30 mm sphere at the given qc_liver_center_mm",
                "box": box,
                "mask": sphere,
            }
        else:
            logger.warning(
                "qc_liver_center_mm %s lies outside the image: the liver is not reported", list(liver_center_mm)
            )
    else:
        found = _reference_cube(suv, affine, body)
        if found is not None:
            ref = {
                "kind": "reference_region",
                "method": "automatic liver-like cube (not segmented; see scripts.inference.qc): "
                "30 mm, patient's right half, inside the body, block mean SUV 1.3-3.5, most uniform",
                "box": found[0],
                "mask": found[1],
            }
    if ref is not None:
        centre = [(s.start + s.stop - 1) / 2.0 for s in ref["box"]]
        ref["centre_mm"] = (affine @ np.r_[centre, 1.0])[:3].round(1).tolist()
        ref["before"] = _region_stats(suv, ref["box"], ref["mask"])
    ras, ras_spacing, oblique = to_ras(suv, affine)
    hot = ras_index(spots[0]["voxel"], affine, suv.shape) if spots else tuple(int(v) // 2 for v in ras.shape)
    body_sum = float(np.sum(suv, where=hull, dtype=np.float64))
    return {
        "affine": affine,
        "shape": suv.shape,
        # packed in memory order (a C-order reshape of a Fortran-ordered mask would copy and transpose it)
        "body_bits": np.packbits(hull.ravel(order=_order(hull))),
        "body_order": _order(hull),
        "spots": spots,
        "ref": ref,
        "slice_y": int(hot[1]),
        "hot_ras": hot,
        "panels": {
            "mip": panel(ras, ras_spacing, "coronal", mip=True, convention=convention, oblique=oblique),
            "slice": panel(
                ras, ras_spacing, "coronal", index=hot[1], convention=convention, oblique=oblique, point=hot
            ),
        },
        "numbers": {
            "input_suv_max": float(suv.max()),
            "body_min_suv": float(body_min_suv),
            "body_margin_mm": float(body_margin_mm),
            "body_volume_ml": float(hull.sum()) * voxel_ml,
            "body_total_before_suv_ml": body_sum * voxel_ml,
            "fov_total_before_suv_ml": float(np.sum(suv, dtype=np.float64)) * voxel_ml,
        },
    }


def compare_output(before: Mapping[str, Any], out: np.ndarray, convention: str = "radiological") -> dict[str, Any]:
    """The output half: the same regions measured on the output; returns the JSON-ready numbers and the panels."""
    out = np.asarray(out)
    affine = before["affine"]
    spacing = voxel_spacing(affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    body = np.unpackbits(before["body_bits"], count=int(np.prod(before["shape"]))).view(bool)
    body = body.reshape(before["shape"], order=before.get("body_order", "C"))
    n = dict(before["numbers"])
    n["body_total_after_suv_ml"] = float(np.sum(out, where=body, dtype=np.float64)) * voxel_ml
    n["body_total_change_pct"] = _pct(n["body_total_after_suv_ml"], n["body_total_before_suv_ml"])
    n["fov_total_after_suv_ml"] = float(np.sum(out, dtype=np.float64)) * voxel_ml
    n["fov_total_change_pct"] = _pct(n["fov_total_after_suv_ml"], n["fov_total_before_suv_ml"])
    n["output_suv_max"] = float(out.max())
    spots = []
    for s in before["spots"]:
        after = _focus_stats(out, s["box"], s["sphere"], s["mean_mask"], spacing)
        spots.append(
            {
                "rank": s["rank"],
                "voxel": s["voxel"],
                "mm": s["mm"],
                "before": s["before"],
                "after": after,
                "change_pct": {k: _pct(after[k], s["before"][k]) for k in after},
            }
        )
    n["hotspots"] = spots
    ref = before["ref"]
    if ref is not None:
        after = _region_stats(out, ref["box"], ref["mask"])
        n[ref["kind"]] = {
            "method": ref["method"],
            "centre_mm": ref["centre_mm"],
            "before": ref["before"],
            "after": after,
            "suv_mean_change_pct": _pct(after["suv_mean"], ref["before"]["suv_mean"]),
        }
    ras, ras_spacing, oblique = to_ras(out, affine)
    panels = {
        "mip": panel(ras, ras_spacing, "coronal", mip=True, convention=convention, oblique=oblique),
        "slice": panel(
            ras,
            ras_spacing,
            "coronal",
            index=before["slice_y"],
            convention=convention,
            oblique=oblique,
            point=before["hot_ras"],
        ),
    }
    return {"numbers": n, "panels": panels}


def render_png(
    path: Path,
    title: str,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    suv_window: Sequence[float],
    diff_window: float,
    dpi: int = 80,
) -> None:
    """The 2x3 QC figure (see the module docstring), written to ``path`` (a temporary name of ours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scripts.evaluation.display import Panel

    fig, axes = plt.subplots(2, 3, figsize=(10.5, 8.4), constrained_layout=True)
    lo, hi = float(suv_window[0]), float(suv_window[1])
    for row, key in enumerate(("mip", "slice")):
        p_in, p_out = before["panels"][key], after["panels"][key]
        diff = Panel(
            p_out.image - p_in.image,
            p_in.width_mm,
            p_in.height_mm,
            p_in.letters,
            p_in.view,
            p_in.mip,
            p_in.oblique,
            p_in.position,
        )
        what = "coronal MIP" if key == "mip" else "coronal slice through focus 1"
        draw_panel(axes[row, 0], p_in, lo, hi, title=f"input, {what}", colorbar=True, marker=key == "slice")
        draw_panel(axes[row, 1], p_out, lo, hi, title=f"denoised, {what}", colorbar=True, marker=key == "slice")
        draw_panel(
            axes[row, 2],
            diff,
            -diff_window,
            diff_window,
            cmap="RdBu_r",
            title=f"denoised - input ({'of the MIPs' if key == 'mip' else 'slice'})",
            colorbar=True,
            colorbar_label="SUV difference",
            marker=key == "slice",
        )
    fig.suptitle(title, fontsize=9)
    with open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)
    os.chmod(path, default_file_mode())


class QCReport:
    """Ignite handler of the inference evaluator that analyses each input before the network, and is called
    by :class:`scripts.inference.writer.SaveDenoisedd` (its ``qc`` argument) to write the report.

    Attach it among the evaluator's ``val_handlers`` (it listens to ``GET_BATCH_STARTED`` and
    ``GET_BATCH_COMPLETED``: the input SUV is read from the batch's ``native_key`` before the residual step
    overwrites it) and give the same object to the writer.

    Args:
        enabled: ``qc_report``: write the PNG + JSON report per study (``false``: only the sidecar's
            input SUVmax and stage times).
        max_body_total_change_pct: ``qc_max_body_total_change_pct``: WARNING above this |change| of the body total.
        max_hotspot_change_pct: ``qc_max_hotspot_change_pct``: WARNING above this |change| of a focus' SUVmax.
        num_hotspots: ``qc_num_hotspots``: how many of the hottest foci are reported.
        hotspot_min_suv: ``qc_hotspot_min_suv``: foci below this SUVmax are not reported.
        hotspot_separation_mm: ``qc_hotspot_separation_mm``: minimum distance between foci; the sphere each
            focus is measured in has half this radius (at least 1.5 voxels).
        body_min_suv: ``qc_body_min_suv``: body = input SUV above this (the reference cube lies in it).
        body_margin_mm: ``qc_body_margin_mm``: the body total counts the body hull: the body with the holes of
            every axial slice filled, dilated by this (:func:`scripts.data.body.body_hull`).
        liver_center_mm: ``qc_liver_center_mm``: RAS+ mm of the liver VOI centre, or None (automatic cube).
        suv_window: ``qc_suv_window``: [min, max] SUV of the image panels.
        diff_window: ``qc_diff_window``: the difference panels show -this..+this SUV.
        convention: ``display_convention``: ``radiological`` or ``neurological``.
        native_key: the batch key of the input SUV on its own grid.
        image_key: the batch key of the network input (its ``meta["original_affine"]`` is the input's affine).
    """

    def __init__(
        self,
        enabled: Any = True,
        max_body_total_change_pct: float = 2.0,
        max_hotspot_change_pct: float = 10.0,
        num_hotspots: int = 5,
        hotspot_min_suv: float = 4.0,
        hotspot_separation_mm: float = 20.0,
        body_min_suv: float = 0.3,
        body_margin_mm: float = 12.0,
        liver_center_mm: Sequence[float] | None = None,
        suv_window: Sequence[float] = (0.0, 10.0),
        diff_window: float = 2.0,
        convention: str = "radiological",
        native_key: str = "native_suv",
        image_key: str = "image",
    ) -> None:
        self.enabled = as_bool(enabled, "qc_report")
        self.max_body_total_change_pct = float(max_body_total_change_pct)
        self.max_hotspot_change_pct = float(max_hotspot_change_pct)
        self.num_hotspots = int(num_hotspots)
        self.hotspot_min_suv = float(hotspot_min_suv)
        self.hotspot_separation_mm = float(hotspot_separation_mm)
        self.body_min_suv = float(body_min_suv)
        self.body_margin_mm = float(body_margin_mm)
        self.liver_center_mm = None if liver_center_mm is None else [float(v) for v in liver_center_mm]
        self.suv_window = [float(v) for v in suv_window]
        self.diff_window = float(diff_window)
        self.convention = str(convention)
        if self.convention not in ("radiological", "neurological"):
            raise ValueError(f"display_convention must be radiological or neurological, got {convention!r}")
        self.native_key, self.image_key = native_key, image_key
        self._inputs: dict[str, dict[str, Any]] = {}
        self._t0 = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_completed)

    def _batch_started(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()
        self._inputs.clear()  # a study at a time: nothing of the previous one is kept

    def _batch_completed(self, engine: Engine) -> None:
        t1 = time.perf_counter()
        batch = engine.state.batch
        names = batch["name"] if isinstance(batch["name"], (list, tuple)) else [batch["name"]]
        native = _np(batch[self.native_key])
        affines = _np(batch[self.image_key].meta["original_affine"]).reshape(-1, 4, 4)
        for i, name in enumerate(names):
            suv = native[i, 0] if native.ndim == 5 else native[0]
            if self.enabled:
                entry = analyse_input(
                    suv,
                    affines[i],
                    self.num_hotspots,
                    self.hotspot_min_suv,
                    self.hotspot_separation_mm,
                    self.body_min_suv,
                    self.liver_center_mm,
                    self.convention,
                    self.body_margin_mm,
                )
            else:
                entry = {"numbers": {"input_suv_max": float(suv.max())}}
            self._inputs[str(name)] = entry
        t2 = time.perf_counter()
        for entry in self._inputs.values():
            entry["times"] = {"read_and_preprocess_s": t1 - self._t0, "qc_input_analysis_s": t2 - t1, "_net_start": t2}

    def sidecar_fields(self, name: str, write_started: float) -> dict[str, Any]:
        """``input_suv_max`` and ``timing_s`` for the sidecar (empty if this input was not seen)."""
        entry = self._inputs.get(name)
        if entry is None:
            return {}
        return {"input_suv_max": entry["numbers"]["input_suv_max"], "timing_s": self._times(entry, write_started)}

    @staticmethod
    def _times(entry: Mapping[str, Any], write_started: float) -> dict[str, float]:
        t = dict(entry.get("times", {}))
        net_start = t.pop("_net_start", None)
        if net_start is not None:
            t["network_and_correction_to_input_grid_s"] = write_started - net_start
        t["write_outputs_s"] = time.perf_counter() - write_started
        return {k: round(float(v), 3) for k, v in t.items()}

    def stage(
        self,
        name: str,
        out_suv: np.ndarray,
        png_path: Path,
        json_path: Path,
        write_started: float,
        model: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write the PNG and JSON of ``name`` to the given (temporary) paths; log the summary and warnings."""
        entry = self._inputs.get(name)
        if entry is None or "spots" not in entry:
            raise RuntimeError(
                f"{shown(name)}: the QC report has no analysis of this input (is the QCReport handler attached "
                "to the evaluator as well as given to the writer?)"
            )
        result = compare_output(entry, out_suv, self.convention)
        n = result["numbers"]
        label = shown(name)
        warnings: list[str] = []
        change = n["body_total_change_pct"]
        if math.isfinite(change) and abs(change) > self.max_body_total_change_pct:
            warnings.append(
                f"{label}: body total activity changed by {change:+.1f} % (allowed: a change of at most "
                f"{self.max_body_total_change_pct:g} %, qc_max_body_total_change_pct)"
            )
        for s in n["hotspots"]:
            c = s["change_pct"]["suv_max"]
            if math.isfinite(c) and abs(c) > self.max_hotspot_change_pct:
                warnings.append(
                    f"{label}: hot spot {s['rank']} at {s['mm']} mm (RAS): SUVmax {s['before']['suv_max']:.2f} -> "
                    f"{s['after']['suv_max']:.2f} ({c:+.1f} %), beyond the allowed {self.max_hotspot_change_pct:g} % (qc_max_hotspot_change_pct)"
                )
        n["timing_s"] = self._times(entry, write_started)
        report = {
            "description": "UniPET per-study QC report (see scripts/inference/qc.py for how each number is measured)",
            "name": name,
            "model": dict(model or {}),
            "display": {"convention": self.convention, "suv_window": self.suv_window, "diff_window": self.diff_window},
            "thresholds": {
                "qc_max_body_total_change_pct": self.max_body_total_change_pct,
                "qc_max_hotspot_change_pct": self.max_hotspot_change_pct,
                "qc_num_hotspots": self.num_hotspots,
                "qc_hotspot_min_suv": self.hotspot_min_suv,
                "qc_hotspot_separation_mm": self.hotspot_separation_mm,
            },
            **n,
            "warnings": warnings,
        }
        trained = bool((model or {}).get("trained", True))
        foci = (
            "; ".join(
                f"focus {s['rank']} SUVmax {s['before']['suv_max']:.1f}->{s['after']['suv_max']:.1f} "
                f"({s['change_pct']['suv_max']:+.1f} %)"
                for s in n["hotspots"][:3]
            )
            or "no focus above threshold"
        )
        title = (
            f"{label}  |  UniPET {(model or {}).get('version', '')}{'' if trained else ' UNTRAINED (identity)'}  |  "
            f"body total {change:+.2f} %  |  {foci}"
        )
        render_png(png_path, title, entry, result, self.suv_window, self.diff_window)
        json_path.write_text(json.dumps(report, indent=2, default=json_default, allow_nan=True) + "\n")
        os.chmod(json_path, default_file_mode())
        ref = n.get("liver") or n.get("reference_region")
        ref_text = (
            (
                f"; {'liver' if 'liver' in n else 'reference region (liver-like cube)'} SUVmean "
                f"{ref['before']['suv_mean']:.2f}->{ref['after']['suv_mean']:.2f}, CoV {ref['before']['cov_pct']:.1f}->"
                f"{ref['after']['cov_pct']:.1f} %"
            )
            if ref
            else "; no liver/reference region found"
        )
        t = n["timing_s"]
        logger.info(
            "QC %s: body total %+.2f %%; %s%s; times %s",
            label,
            change,
            foci,
            ref_text,
            ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in t.items()),
        )
        for w in warnings:
            logger.warning("QC %s", w)
        return report
