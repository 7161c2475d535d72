"""Figures orient a reader (issue 16): an asymmetric phantom stored with a non-identity affine lands the right way
in the shared display helper, the evaluation montage views, the QC report panels and the demo's lesion choice.

The phantom has one hot marker in the patient's Right, Anterior, Superior corner region and a second, cooler one
Left-Posterior-Inferior. Radiological convention (default): patient's right on the viewer's left, superior up
(coronal), anterior up (axial).
"""

from __future__ import annotations

import numpy as np
import pytest

from scripts.evaluation.display import axcodes_affine, panel, ras_index, scale_bar_length, to_ras
from scripts.evaluation.montage import take_views
from scripts.inference.qc import analyse_input

SHAPE_RAS = (30, 24, 36)  # x (R), y (A), z (S)
RAS_HOT = (24, 18, 28)  # right, anterior, superior
RAS_COOL = (5, 4, 6)  # left, posterior, inferior


def ras_phantom() -> np.ndarray:
    v = np.full(SHAPE_RAS, 1.0, np.float32)
    v[tuple(slice(p - 1, p + 2) for p in RAS_HOT)] = 10.0
    v[tuple(slice(p - 1, p + 2) for p in RAS_COOL)] = 5.0
    return v


def stored_lps_transposed() -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """The same image stored as (S, L, P)-ordered axes: axis 0 = superior, axis 1 = towards the patient's left,
    axis 2 = towards posterior, with spacings 3, 2, 2.5 mm and an offset origin. Returns (array, affine, hot voxel)."""
    ras = ras_phantom()
    stored = np.transpose(ras, (2, 0, 1))[:, ::-1, ::-1].copy()  # (z, x reversed, y reversed)
    nx, ny = SHAPE_RAS[0], SHAPE_RAS[1]
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    aff[2, 0] = 2.5  # stored axis 0 -> +S
    aff[0, 1] = -3.0  # stored axis 1 -> -R (towards L)
    aff[1, 2] = -2.0  # stored axis 2 -> -A (towards P)
    aff[:3, 3] = (3.0 * (nx - 1) + 17.0, 2.0 * (ny - 1) - 40.0, 12.0)
    hot = (RAS_HOT[2], nx - 1 - RAS_HOT[0], ny - 1 - RAS_HOT[1])
    assert stored[hot] == 10.0
    return stored, aff, hot


def _where(img: np.ndarray, value: float) -> tuple[float, float]:
    """(row, col) centre of the pixels equal to ``value``, as fractions of the image height and width."""
    rows, cols = np.nonzero(np.isclose(img, value))
    return rows.mean() / img.shape[0], cols.mean() / img.shape[1]


def test_to_ras_and_index_map_back_to_the_same_voxel():
    stored, aff, hot = stored_lps_transposed()
    ras, spacing, oblique = to_ras(stored, aff)
    np.testing.assert_array_equal(ras, ras_phantom())
    assert list(spacing) == [3.0, 2.0, 2.5] and not oblique
    assert ras_index(hot, aff, stored.shape) == RAS_HOT


@pytest.mark.parametrize("convention", ["radiological", "neurological"])
def test_coronal_and_axial_panels_land_the_right_way(convention):
    stored, aff, hot = stored_lps_transposed()
    ras, spacing, _ = to_ras(stored, aff)
    cor = panel(ras, spacing, "coronal", mip=True, convention=convention)
    ax = panel(ras, spacing, "axial", index=RAS_HOT[2], convention=convention)
    row, col = _where(cor.image, 10.0)
    assert row < 0.5, "superior must be up on a coronal view"
    assert (col < 0.5) == (convention == "radiological"), "patient's right on the viewer's left (radiological)"
    row, col = _where(ax.image, 10.0)
    assert row < 0.5, "anterior must be up on an axial view"
    assert (col < 0.5) == (convention == "radiological")
    if convention == "radiological":
        assert (cor.letters["left"], cor.letters["right"], cor.letters["top"], cor.letters["bottom"]) == (
            "R",
            "L",
            "S",
            "I",
        )
        assert (ax.letters["left"], ax.letters["top"], ax.letters["bottom"]) == ("R", "A", "P")
    else:
        assert cor.letters["left"] == "L" and ax.letters["right"] == "R"
    # physical size: x (3 mm) across, z (2.5 mm) up on the coronal panel
    assert cor.width_mm == pytest.approx(SHAPE_RAS[0] * 3.0) and cor.height_mm == pytest.approx(SHAPE_RAS[2] * 2.5)
    sag = panel(ras, spacing, "sagittal", index=RAS_HOT[0])
    row, col = _where(sag.image, 10.0)
    assert row < 0.5 and col < 0.5 and sag.letters["left"] == "A"


def test_montage_views_follow_the_affine():
    stored, aff, hot = stored_lps_transposed()
    views = take_views(stored, hot, aff)
    row, col = _where(views["coronal"], 10.0)
    assert row < 0.5 and col < 0.5
    row, col = _where(views["axial"], 10.0)
    assert row < 0.5 and col < 0.5
    # the same through the RAS copy and no affine (what the evaluation had before): identical pictures
    ras_views = take_views(ras_phantom(), RAS_HOT)
    for v in ("coronal", "axial"):
        np.testing.assert_array_equal(views[v], ras_views[v])
    # reoriented evaluation arrays (network_axcodes) get their affine from the axcodes
    lps = np.transpose(ras_phantom()[::-1, ::-1, :], (0, 1, 2)).copy()
    lps_views = take_views(
        lps,
        (SHAPE_RAS[0] - 1 - RAS_HOT[0], SHAPE_RAS[1] - 1 - RAS_HOT[1], RAS_HOT[2]),
        axcodes_affine("LPS", (3.0, 2.0, 2.5)),
    )
    np.testing.assert_array_equal(lps_views["coronal"], ras_views["coronal"])


def test_qc_panels_follow_the_affine_and_mark_the_hottest_focus():
    stored, aff, hot = stored_lps_transposed()
    before = analyse_input(stored, aff, hotspot_min_suv=4.0)
    assert stored[tuple(before["spots"][0]["voxel"])] == 10.0
    mip = before["panels"]["mip"]
    row, col = _where(mip.image, 10.0)
    assert row < 0.5 and col < 0.5 and mip.letters["left"] == "R"
    sl = before["panels"]["slice"]
    r, c = sl.position
    assert sl.image[r, c] == 10.0, "the slice goes through the hottest focus and marks it"


def test_scale_bar_is_a_round_length_within_the_panel():
    assert scale_bar_length(600.0) == 100.0 and scale_bar_length(90.0) == 20.0 and scale_bar_length(30.0) == 9.0
