"""The per-subject evaluation figure: coronal and axial slices of low dose, denoised, full dose and difference.

One row per (DRF, view), four columns: low-dose input | denoised | full dose | denoised - full dose. Images
share a fixed SUV window (default 0-7 SUV, inverted grey: hot is dark, as PET is usually read) and the
difference a symmetric one (default +-2 SUV, blue = under, red = over the full dose), so figures of
different subjects and runs compare at a glance. Panels keep the physical aspect from the voxel spacing.
Arrays are (x, y, z) with a RAS affine: coronal = fixed y, shown x across and z up; axial = fixed z,
shown x across and y (anterior) up. The slices are those the image metrics score (SUV clipped to [0, 20]
for the network), so the difference panel shows no error above 20 SUV; regions.csv reports that part.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scripts.data.io import atomic_write

__all__ = ["VIEWS", "MontageRow", "take_views", "write_montage"]

VIEWS = ("coronal", "axial")


def take_views(volume: np.ndarray, position: Sequence[int]) -> dict[str, np.ndarray]:
    """2D slices through ``position`` (x, y, z index) of a (x, y, z) volume: coronal (x, z) and axial (x, y)."""
    _, y, z = (int(p) for p in position)
    return {"coronal": np.array(volume[:, y, :], dtype=np.float32), "axial": np.array(volume[:, :, z], dtype=np.float32)}


@dataclass
class MontageRow:
    """One DRF of one subject: slices of the input and the output (``take_views``) and their PSNR (dB)."""

    drf: str
    low: dict[str, np.ndarray]
    pred: dict[str, np.ndarray]
    psnr: float = float("nan")
    input_psnr: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)


def _psnr_text(value: float) -> str:
    return "PSNR inf" if np.isinf(value) else f"PSNR {value:.2f} dB"


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
) -> Path:
    """Draw the figure and save it as PNG atomically.

    Args:
        path: output ``.png``.
        title: figure title (subject id and slice position; never a patient name).
        full: full-dose slices from :func:`take_views`.
        rows: one :class:`MontageRow` per DRF, in display order.
        spacing: voxel size (x, y, z) in mm, for the aspect ratio.
        position: the (x, y, z) voxel the slices go through; red ticks on the panel edges mark where the
            other view cuts (axial level on coronal panels, coronal plane on axial panels).
        suv_window: display range of the images (SUV).
        diff_max: the difference panel shows [-diff_max, +diff_max] SUV.
        panel_width_in, max_height_in, dpi: figure size (panels shrink to keep the height bounded).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sx, sy, sz = (float(s) for s in spacing)
    nx = full["coronal"].shape[0]
    extents = {  # (left, right, bottom, top) in mm
        "coronal": (0.0, nx * sx, 0.0, full["coronal"].shape[1] * sz),
        "axial": (0.0, nx * sx, 0.0, full["axial"].shape[1] * sy),
    }
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
        len(grid_rows) + 1, 4, height_ratios=[h * width for h in heights] + [colorbar_in * 0.35],
        left=label_in / fig_w, right=1 - 0.3 / fig_w, top=1 - header_in / fig_h, bottom=0.45 / fig_h,
        hspace=0.22, wspace=0.04,
    )
    lo, hi = suv_window
    img_kw = {"cmap": "gray_r", "vmin": lo, "vmax": hi, "origin": "lower", "interpolation": "nearest"}
    diff_kw = {"cmap": "RdBu_r", "vmin": -diff_max, "vmax": diff_max, "origin": "lower", "interpolation": "nearest"}
    columns = ("low dose", "denoised", "full dose", "denoised - full dose")
    im_img = im_diff = None
    for i, (row, view) in enumerate(grid_rows):
        panels = (row.low[view], row.pred[view], full[view], row.pred[view] - full[view])
        notes = (_psnr_text(row.input_psnr), _psnr_text(row.psnr), "reference", "")
        for j, (data, note) in enumerate(zip(panels, notes)):
            ax = fig.add_subplot(gs[i, j])
            im = ax.imshow(data.T, extent=extents[view], aspect="equal", **(diff_kw if j == 3 else img_kw))
            if j == 3:
                im_diff = im
            else:
                im_img = im
            ax.set_xticks([])
            ax.set_yticks([])
            if position is not None:  # where the other view's plane cuts this one
                cut_mm = (position[2] + 0.5) * sz if view == "coronal" else (position[1] + 0.5) * sy
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
    fig.colorbar(im_img, cax=cax_img, orientation="horizontal").set_label(f"SUV (window {lo:g}-{hi:g}, inverted grey)", fontsize=9)
    cax_diff = fig.add_subplot(bars[0, 1])
    fig.colorbar(im_diff, cax=cax_diff, orientation="horizontal").set_label(f"SUV difference (+-{diff_max:g})", fontsize=9)
    fig.suptitle(title, fontsize=10, y=1 - 0.15 / fig_h, va="top")
    out = Path(path)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return out
