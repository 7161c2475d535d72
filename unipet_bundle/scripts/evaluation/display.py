"""Show a PET volume the way a reader expects: oriented from its affine, with letters and a mm scale bar.

One helper for every figure of the bundle (the inference QC report, the demo and the evaluation montage),
so that they all agree. Arrays are stored in whatever axis order and direction the input had (DICOM
order, RAS, sagittal-first...); their affine (voxel index -> RAS+ mm, as NIfTI and MONAI use) says where
the patient is. :func:`to_ras` brings a volume to the closest RAS+ storage (axis 0 towards the
patient's Right, 1 towards Anterior, 2 towards Superior: transposes and flips only, no resampling, so
the values are the stored ones), and :func:`panel` cuts a 2D view from it:

- **coronal** (a fixed anterior-posterior position, or a maximum-intensity projection along it):
  superior up; **radiological** convention by default, i.e. the patient's right on the viewer's left
  (letters R on the left, L on the right, S at the top, I at the bottom); ``neurological`` puts the
  patient's right on the viewer's right;
- **axial** (a fixed superior-inferior position): anterior up, patient's right on the viewer's left
  (radiological);
- **sagittal** (a fixed left-right position): superior up, anterior on the viewer's left.

An oblique affine is shown in its closest orthogonal orientation (no resampling); the panel says so
(``oblique``). Panels carry their size in mm, so :func:`draw_panel` keeps the physical aspect ratio and
draws a scale bar of a round length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from scripts.common.geometry import voxel_spacing

__all__ = [
    "CONVENTIONS",
    "VIEWS",
    "Panel",
    "axcodes_affine",
    "draw_panel",
    "panel",
    "ras_index",
    "scale_bar_length",
    "to_ras",
]

VIEWS = ("coronal", "axial", "sagittal")
CONVENTIONS = ("radiological", "neurological")
_OBLIQUE_TOL = 1e-3


@dataclass
class Panel:
    """A 2D view ready to show: ``image`` (rows, cols), row 0 at the top.

    Attributes:
        image: float32 (rows, cols) in the volume's units (e.g. SUV).
        width_mm, height_mm: the panel's physical size (cols x column spacing, rows x row spacing).
        letters: the patient directions at the ``left``, ``right``, ``top`` and ``bottom`` edges
            (``R``/``L``, ``A``/``P``, ``S``/``I``).
        view: ``coronal``, ``axial`` or ``sagittal``; ``mip`` True for a maximum-intensity projection.
        oblique: the affine was oblique and the view is its closest orthogonal one.
        position: the (rows, cols) position of the slice/point marker given to :func:`panel`, if any.
    """

    image: np.ndarray
    width_mm: float
    height_mm: float
    letters: dict[str, str]
    view: str
    mip: bool = False
    oblique: bool = False
    position: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def point_mm(self, row: int, col: int) -> tuple[float, float]:
        """(x, y) in the axes' mm coordinates (y up) of the centre of pixel (row, col)."""
        rows, cols = self.image.shape
        return ((col + 0.5) * self.width_mm / cols, self.height_mm - (row + 0.5) * self.height_mm / rows)


def _is_oblique(affine: np.ndarray) -> bool:
    m = np.asarray(affine, dtype=np.float64)[:3, :3] / np.maximum(voxel_spacing(affine), 1e-12)
    return bool(np.any((np.abs(m) > _OBLIQUE_TOL) & (np.abs(m) < 1.0 - _OBLIQUE_TOL)))


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """A (X, Y, Z) volume in its closest RAS+ storage order (a view: transposes and flips only).

    Args:
        volume: (X, Y, Z) array in its storage order.
        affine: 4x4 voxel index -> RAS+ mm.

    Returns:
        ``(ras, spacing_mm, oblique)``: the reordered array (axis 0 -> patient's Right, 1 -> Anterior,
        2 -> Superior), its voxel size in mm per axis, and whether the affine was oblique.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(np.asarray(volume), ornt)
    spacing = np.empty(3)
    for axis, (target, _) in enumerate(ornt):
        spacing[int(target)] = voxel_spacing(affine)[axis]
    return ras, spacing, _is_oblique(affine)


def axcodes_affine(axcodes: str, spacing: Sequence[float]) -> np.ndarray:
    """A 4x4 affine of an array stored in ``axcodes`` orientation (e.g. ``RAS``, ``LPS``: the direction each
    axis points to) with voxel size ``spacing`` (mm); for arrays that were reoriented (MONAI ``Orientationd``)
    and whose original affine is not at hand. The origin is 0."""
    ornt = nib.orientations.axcodes2ornt(tuple(str(axcodes).upper()))
    affine = np.eye(4)
    for axis, (target, flip) in enumerate(ornt):
        affine[:3, axis] = 0.0
        affine[int(target), axis] = float(flip) * float(spacing[axis])
    return affine


def ras_index(index: Sequence[int], affine: np.ndarray, shape: Sequence[int]) -> tuple[int, int, int]:
    """A voxel index of the stored volume -> the same voxel's index in :func:`to_ras`'s array."""
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    out = [0, 0, 0]
    for axis, (target, flip) in enumerate(ornt):
        p = int(index[axis])
        out[int(target)] = p if flip > 0 else int(shape[axis]) - 1 - p
    return out[0], out[1], out[2]


def panel(
    ras: np.ndarray,
    spacing: Sequence[float],
    view: str = "coronal",
    index: int | None = None,
    mip: bool = False,
    convention: str = "radiological",
    oblique: bool = False,
    point: Sequence[int] | None = None,
) -> Panel:
    """Cut a 2D view from a RAS+ volume (:func:`to_ras`), oriented for display.

    Args:
        ras: (X, Y, Z) RAS+ array.
        spacing: its voxel size in mm (x, y, z).
        view: ``coronal`` (fixed y), ``axial`` (fixed z) or ``sagittal`` (fixed x).
        index: the slice index along the fixed axis (RAS array index); default: the middle.
        mip: maximum-intensity projection along the fixed axis instead of one slice.
        convention: ``radiological`` (patient's right on the viewer's left) or ``neurological``.
        oblique: recorded in the panel (from :func:`to_ras`).
        point: an optional RAS voxel index (x, y, z) whose in-panel (row, col) is recorded in ``position``.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    sx, sy, sz = (float(v) for v in spacing)
    fixed = {"sagittal": 0, "coronal": 1, "axial": 2}[view]
    if mip:
        plane = np.max(ras, axis=fixed)
    else:
        i = ras.shape[fixed] // 2 if index is None else int(np.clip(index, 0, ras.shape[fixed] - 1))
        plane = ras[(slice(None),) * fixed + (i,)]  # a view: np.take would copy a whole non-C-ordered volume
    radiological = convention == "radiological"
    # plane axes: coronal/axial (x, z|y), sagittal (y, z). Rows run top -> bottom, cols left -> right.
    if view == "coronal":
        img = plane.T[::-1, :]  # rows: z descending (superior at the top)
        col_spacing, row_spacing = sx, sz
        letters = {"top": "S", "bottom": "I"}
    elif view == "axial":
        img = plane.T[::-1, :]  # rows: y descending (anterior at the top)
        col_spacing, row_spacing = sx, sy
        letters = {"top": "A", "bottom": "P"}
    else:
        img = plane.T[::-1, ::-1]  # rows: z descending; cols: y descending (anterior on the left)
        col_spacing, row_spacing = sy, sz
        letters = {"top": "S", "bottom": "I", "left": "A", "right": "P"}
    if view != "sagittal":
        if radiological:  # x ascending points to the patient's right: reversed, right is on the viewer's left
            img = img[:, ::-1]
            letters.update(left="R", right="L")
        else:
            letters.update(left="L", right="R")
    position = None
    if point is not None:
        p = [int(v) for v in point]
        n = ras.shape
        if view == "coronal":
            row, col = n[2] - 1 - p[2], (n[0] - 1 - p[0]) if radiological else p[0]
        elif view == "axial":
            row, col = n[1] - 1 - p[1], (n[0] - 1 - p[0]) if radiological else p[0]
        else:
            row, col = n[2] - 1 - p[2], n[1] - 1 - p[1]
        position = (int(row), int(col))
    rows, cols = img.shape
    return Panel(
        np.ascontiguousarray(img, dtype=np.float32),
        cols * col_spacing,
        rows * row_spacing,
        letters,
        view,
        bool(mip),
        bool(oblique),
        position,
    )


def scale_bar_length(width_mm: float) -> float:
    """A round length (mm) for the scale bar: the largest of 10/20/50/100/200/500 mm within 30 % of the width."""
    choices = [c for c in (10.0, 20.0, 50.0, 100.0, 200.0, 500.0) if c <= 0.3 * width_mm]
    return choices[-1] if choices else max(1.0, round(0.3 * width_mm))


def draw_panel(
    ax: Any,
    p: Panel,
    vmin: float,
    vmax: float,
    cmap: str = "gray_r",
    title: str | None = None,
    colorbar: bool = False,
    colorbar_label: str = "SUV",
    letters: bool = True,
    scale_bar: bool = True,
    marker: bool = False,
) -> Any:
    """Show ``p`` on a matplotlib axis with its physical aspect, direction letters and a scale bar.

    Args:
        ax: a matplotlib ``Axes``.
        p: the panel.
        vmin, vmax: the fixed display window (e.g. SUV 0-10): figures of different studies compare.
        cmap: colour map (``gray_r``: hot is dark, as PET is usually read; ``RdBu_r`` for differences).
        title: panel title.
        colorbar: add a colour bar labelled ``colorbar_label``.
        letters: the R/L, A/P, S/I letters at the edges.
        scale_bar: a white-outlined bar of :func:`scale_bar_length` mm in the lower right corner.
        marker: circle the panel's ``position`` (e.g. the hottest focus).

    Returns:
        The ``AxesImage``.
    """
    import matplotlib.patheffects as pe

    im = ax.imshow(
        p.image,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        extent=(0.0, p.width_mm, 0.0, p.height_mm),
        origin="upper",
        interpolation="nearest",
        aspect="equal",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    outline = [pe.withStroke(linewidth=2.0, foreground="black")]
    if letters:
        style = dict(color="#ffb000", fontsize=9, fontweight="bold", transform=ax.transAxes, path_effects=outline)
        ax.text(0.02, 0.5, p.letters["left"], ha="left", va="center", **style)
        ax.text(0.98, 0.5, p.letters["right"], ha="right", va="center", **style)
        ax.text(0.5, 0.98, p.letters["top"], ha="center", va="top", **style)
        ax.text(0.5, 0.02, p.letters["bottom"], ha="center", va="bottom", **style)
    if scale_bar:
        length = scale_bar_length(p.width_mm)
        x1 = p.width_mm * 0.96
        y = p.height_mm * 0.04
        ax.plot(
            [x1 - length, x1],
            [y, y],
            color="white",
            linewidth=3.0,
            solid_capstyle="butt",
            path_effects=[pe.withStroke(linewidth=5.0, foreground="black")],
        )
        ax.text(
            x1 - length / 2.0,
            y + p.height_mm * 0.015,
            f"{length:g} mm",
            color="white",
            fontsize=7,
            ha="center",
            va="bottom",
            path_effects=outline,
        )
    if marker and p.position is not None:
        x, y = p.point_mm(*p.position)
        ax.add_patch(
            __import__("matplotlib.patches", fromlist=["Circle"]).Circle(
                (x, y), radius=max(8.0, 0.04 * p.width_mm), fill=False, edgecolor="#00c0ff", linewidth=1.2
            )
        )
    if p.oblique:
        ax.text(
            0.02,
            0.02,
            "oblique: nearest orthogonal view",
            color="white",
            fontsize=6,
            transform=ax.transAxes,
            path_effects=outline,
        )
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        cb.set_label(colorbar_label, fontsize=7)
        cb.ax.tick_params(labelsize=6)
    return im
