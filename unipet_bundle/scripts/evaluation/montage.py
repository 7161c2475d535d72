"""The per-subject evaluation figure: coronal and axial slices of low dose, denoised, full dose and difference.

One row per (DRF, view), four columns: low-dose input | denoised | full dose | denoised - full dose. Images
share a fixed SUV window (default 0-7 SUV, inverted grey: hot is dark, as PET is usually read) and the
difference a symmetric one (default +-2 SUV, blue = under, red = over the full dose), so figures of
different subjects and runs compare at a glance. Panels keep the physical aspect from the voxel spacing.
Panels are oriented from the affine by :mod:`scripts.evaluation.display` (radiological by default: the
patient's right on the viewer's left; superior up on coronal, anterior up on axial views), with R/L, S/I,
A/P letters and a mm scale bar; PSNR and SSIM are printed under each panel. The slices are those the image metrics score (SUV clipped to [0, 20]
for the network), so the difference panel shows no error above 20 SUV; regions.csv reports that part.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.common.io import atomic_write
from scripts.evaluation.display import Panel, draw_panel, panel, ras_index, to_ras

__all__ = ["VIEWS", "MontageRow", "take_views", "write_montage"]

VIEWS = ("coronal", "axial")


def take_views(
    volume: np.ndarray, position: Sequence[int], affine: np.ndarray | None = None, convention: str = "radiological"
) -> dict[str, np.ndarray]:
    """2D display slices (row 0 at the top) through ``position`` (a voxel index of ``volume``): coronal and axial.

    Args:
        volume: (X, Y, Z) in its storage order.
        position: the voxel the slices go through.
        affine: voxel -> RAS+ mm (e.g. :func:`scripts.evaluation.display.axcodes_affine`); None: stored RAS.
        convention: ``radiological`` (patient's right on the viewer's left) or ``neurological``.
    """
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    ras, spacing, _ = to_ras(volume, aff)
    p = ras_index(position, aff, volume.shape)
    return {
        view: panel(ras, spacing, view, index=p[1 if view == "coronal" else 2], convention=convention).image
        for view in VIEWS
    }


@dataclass
class MontageRow:
    """One DRF of one subject: slices of the input and the output (``take_views``) and their PSNR (dB)."""

    drf: str
    low: dict[str, np.ndarray]
    pred: dict[str, np.ndarray]
    psnr: float = float("nan")
    input_psnr: float = float("nan")
    ssim: float = float("nan")
    input_ssim: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)


def _psnr_text(value: float, ssim: float = float("nan")) -> str:
    text = "PSNR inf" if np.isinf(value) else f"PSNR {value:.2f} dB"
    return text if np.isnan(ssim) else f"{text}, SSIM {ssim:.3f}"


def write_montage(
    path: str | os.PathLike,
    title: str,
    full: Mapping[str, np.ndarray],
    rows: Sequence[MontageRow],
    spacing: Sequence[float],
    position: Sequence[int] | None = None,
    suv_window: tuple[float, float] = (0.0, 7.0),
    diff_max: float = 2.0,
    panel_width_in: float = 2.6,
    max_height_in: float = 40.0,
    dpi: int = 110,
    affine: np.ndarray | None = None,
    convention: str = "radiological",
) -> Path:
    """Draw the figure and save it as PNG atomically.

    Args:
        path: output ``.png``.
        title: figure title (subject id and slice position; never a patient name).
        full: full-dose slices from :func:`take_views`.
        rows: one :class:`MontageRow` per DRF, in display order.
        spacing: voxel size (x, y, z) in mm of the stored volume, for the aspect ratio.
        position: the (x, y, z) voxel the slices go through; red ticks on the panel edges mark where the
            other view cuts (axial level on coronal panels, coronal plane on axial panels).
        affine, convention: as given to :func:`take_views` (None: the volume is stored RAS).
        suv_window: display range of the images (SUV).
        diff_max: the difference panel shows [-diff_max, +diff_max] SUV.
        panel_width_in, max_height_in, dpi: figure size (panels shrink to keep the height bounded).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    # voxel size along the RAS axes: the stored axes reordered like the panels
    ornt = nib.orientations.io_orientation(aff)
    ras_sp = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        ras_sp[int(target)] = float(spacing[axis])
    sx, sy, sz = ras_sp
    nz, nx = full["coronal"].shape
    ny = full["axial"].shape[0]
    extents = {  # (left, right, bottom, top) in mm
        "coronal": (0.0, nx * sx, 0.0, nz * sz),
        "axial": (0.0, nx * sx, 0.0, ny * sy),
    }
    letters = {
        v: panel(np.zeros((1, 1, 1), np.float32), (1.0, 1.0, 1.0), v, convention=convention).letters for v in VIEWS
    }
    ras_pos = None
    if position is not None:
        shape = [0, 0, 0]
        for axis, (target, _) in enumerate(ornt):
            shape[axis] = (nx, ny, nz)[int(target)]
        ras_pos = ras_index(position, aff, shape)
    ratio = {v: (e[3] - e[2]) / (e[1] - e[0]) for v, e in extents.items()}
    grid_rows = [(r, v) for r in rows for v in VIEWS]
    heights = [ratio[v] for _, v in grid_rows]
    width = panel_width_in
    header_in, colorbar_in, label_in = 0.9, 0.85, 0.75
    if sum(heights) * width + header_in + colorbar_in > max_height_in:
        width = (max_height_in - header_in - colorbar_in) / sum(heights)
    fig_w = label_in + 4 * width + 0.3
    fig_h = header_in + sum(heights) * width + colorbar_in
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    gs = fig.add_gridspec(
        len(grid_rows) + 1,
        4,
        height_ratios=[h * width for h in heights] + [colorbar_in * 0.35],
        left=label_in / fig_w,
        right=1 - 0.3 / fig_w,
        top=1 - header_in / fig_h,
        bottom=0.45 / fig_h,
        hspace=0.22,
        wspace=0.04,
    )
    lo, hi = suv_window
    columns = ("low dose", "denoised", "full dose", "denoised - full dose")
    im_img = im_diff = None
    for i, (row, view) in enumerate(grid_rows):
        panels = (row.low[view], row.pred[view], full[view], row.pred[view] - full[view])
        notes = (_psnr_text(row.input_psnr, row.input_ssim), _psnr_text(row.psnr, row.ssim), "reference", "")
        for j, (data, note) in enumerate(zip(panels, notes)):
            ax = fig.add_subplot(gs[i, j])
            e = extents[view]
            p = Panel(data, e[1], e[3], letters[view], view)
            im = (
                draw_panel(ax, p, -diff_max, diff_max, cmap="RdBu_r", scale_bar=False)
                if j == 3
                else draw_panel(ax, p, lo, hi, scale_bar=j == 0)
            )
            if j == 3:
                im_diff = im
            else:
                im_img = im
            ax.set_xticks([])
            ax.set_yticks([])
            if ras_pos is not None:  # where the other view's plane cuts this one
                cut_mm = (ras_pos[2] + 0.5) * sz if view == "coronal" else (ras_pos[1] + 0.5) * sy
                ax.set_yticks([cut_mm], labels=[""])
                ax.tick_params(axis="y", color="red", length=6, width=1.5, left=True, right=True, direction="inout")
            if i == 0:
                ax.set_title(columns[j], fontsize=10, fontweight="bold")
            if note:  # under the panel, not over the anatomy
                ax.set_xlabel(note, fontsize=8, labelpad=2)
            if j == 0:
                ax.set_ylabel(f"DRF {row.drf}\n{view}", fontsize=10, fontweight="bold")
    bars = gs[-1, :].subgridspec(1, 2, width_ratios=[3, 1], wspace=0.12)
    cax_img = fig.add_subplot(bars[0, 0])
    fig.colorbar(im_img, cax=cax_img, orientation="horizontal").set_label(
        f"SUV (window {lo:g}-{hi:g}, inverted grey)", fontsize=9
    )
    cax_diff = fig.add_subplot(bars[0, 1])
    fig.colorbar(im_diff, cax=cax_diff, orientation="horizontal").set_label(
        f"SUV difference (+-{diff_max:g})", fontsize=9
    )
    fig.suptitle(title, fontsize=10, y=1 - 0.15 / fig_h, va="top")
    out = Path(path)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return out
