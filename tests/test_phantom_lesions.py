"""Lesion model of the randomised profile: contrast to the background, sizes 4-30 mm, hosts including lymph
nodes near hot organs, partial-volume sampling (the truth is the sphere), and the old model unchanged."""

import math

import numpy as np
import pytest

from scripts.data.phantom import ORGAN_NAMES, make_phantom

OPTS = dict(
    n_lesions=(16, 16),
    lesion_diameter_mm=(4.0, 30.0),
    lesion_contrast=(2.0, 15.0),
    lesion_hosts={"liver": 1, "lungs": 1, "spine": 1, "nodes": 2},
    lesion_partial_volume=True,
    texture=False,
)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((96, 96, 64), (4.0, 4.0, 5.0), seed=11, **OPTS)


def test_lesions_have_contrast_to_their_background_and_hosts(phantom):
    lesions = [v for v in phantom.label_table.values() if v["kind"] == "lesion"]
    assert len(lesions) >= 12
    assert {les["host"] for les in lesions} <= {"liver", "lungs", "spine", "nodes"}
    assert "nodes" in {les["host"] for les in lesions}
    for les in lesions:
        assert 4.0 <= les["diameter_mm"] <= 30.0
        assert 2.0 - 1e-3 <= les["contrast"] <= 15.0 + 1e-3
        assert les["background_suv"] == pytest.approx(phantom.label_table[les["host_label"]]["base_suv"], abs=1e-3)
        if les["host"] == "nodes":
            assert ORGAN_NAMES[les["host_label"]] in ("muscle", "fat")


def test_partial_volume_lesions_hold_the_activity_of_their_sphere(phantom):
    """Without texture the background is flat, so the lesion's excess activity over its bounding box must be
    (SUV - background) x the sphere's volume, even for a 4 mm lesion on a 4 x 4 x 5 mm grid."""
    voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
    checked = 0
    for label, les in phantom.label_table.items():
        if les["kind"] != "lesion":
            continue
        c = les["centre_voxel"]
        r = [int(math.ceil(les["diameter_mm"] / 2 / s)) + 2 for s in phantom.spacing]
        box = tuple(slice(max(0, ci - ri), ci + ri + 1) for ci, ri in zip(c, r))
        bg = les["background_suv"]
        lab = phantom.labels[box]
        host = (lab == les["host_label"]) | (lab == label)
        if not np.all(host | (lab >= 100)):  # a box that also holds another tissue: skip
            continue
        excess = float((phantom.activity[box] - bg).sum()) * voxel_ml  # partial voxels outside the label too
        expected = (les["true_suv"] - bg) * les["sphere_volume_ml"]
        # other lesions in the box would add their own excess; only boxes with this lesion alone count
        if set(np.unique(lab[lab >= 100])) == {label}:
            checked += 1
            assert excess == pytest.approx(expected, rel=0.05), les
        assert phantom.activity[tuple(c)] <= les["true_suv"] + 1e-4
    assert checked >= 2


def test_the_original_lesion_model_is_unchanged():
    a = make_phantom((64, 64, 32), (5.0, 5.0, 8.0), seed=3)
    lesions = [v for v in a.label_table.values() if v["kind"] == "lesion"]
    assert 6 <= len(lesions) <= 12
    for les in lesions:
        m = a.labels == [k for k, v in a.label_table.items() if v is les][0]
        assert np.all(a.activity[m] == np.float32(les["true_suv"]))  # binary spheres at the drawn SUV
        assert 3.0 <= les["true_suv"] <= 15.0
