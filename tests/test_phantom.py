"""Procedural FDG phantom: organs, lesions, SUV ranges, attenuation, orientation, determinism."""

import numpy as np
import pytest

from scripts.data.phantom import (
    MU_BONE,
    MU_LUNG,
    MU_WATER,
    ORGAN_NAMES,
    Phantom,
    make_phantom,
    mu_map_from_suv,
    phantom_affine,
)

SHAPE = (64, 64, 40)
SPACING = (6.0, 6.0, 8.0)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(SHAPE, SPACING, seed=7)


def _by_name(ph: Phantom) -> dict:
    return {v["name"]: (int(k), v) for k, v in ph.label_table.items() if v["kind"] == "organ"}


def test_arrays_types_and_grid(phantom):
    assert phantom.activity.shape == phantom.mu.shape == phantom.labels.shape == SHAPE
    assert phantom.activity.dtype == np.float32 and phantom.mu.dtype == np.float32
    assert phantom.labels.dtype == np.int16
    assert np.isfinite(phantom.activity).all() and phantom.activity.min() >= 0
    np.testing.assert_allclose(np.diag(phantom.affine)[:3], SPACING)
    np.testing.assert_allclose(phantom.affine, phantom_affine(SHAPE, SPACING))
    # outside the body: no activity, no attenuation
    air = phantom.labels == 0
    assert air.any() and phantom.activity[air].max() == 0 and phantom.mu[air].max() == 0


def test_every_organ_is_present_with_a_realistic_suv(phantom):
    organs = _by_name(phantom)
    assert set(organs) == set(ORGAN_NAMES.values())
    for name, (label, entry) in organs.items():
        assert entry["volume_ml"] > 0, f"{name} is missing"
        voxel_ml = np.prod(SPACING) / 1000
        assert entry["volume_ml"] == pytest.approx((phantom.labels == label).sum() * voxel_ml, rel=1e-3)
        assert entry["true_suv"] == pytest.approx(float(phantom.activity[phantom.labels == label].mean()), rel=1e-3)
    suv = {name: entry["base_suv"] for name, (_, entry) in organs.items()}
    assert 2.0 <= suv["liver"] <= 2.5
    assert 0.4 <= suv["lungs"] <= 0.6
    assert 7.0 <= suv["brain"] <= 10.0
    assert 10.0 <= suv["bladder"] <= 60.0
    assert 0.7 <= suv["muscle"] <= 1.0
    assert 0.25 <= suv["fat"] <= 0.4
    assert 1.5 <= suv["myocardium"] <= 12.0
    # tissue classes drive the attenuation map (1/cm)
    lab = {name: label for name, (label, _) in organs.items()}
    assert np.allclose(phantom.mu[phantom.labels == lab["lungs"]], MU_LUNG)
    assert np.allclose(phantom.mu[phantom.labels == lab["spine"]], MU_BONE)
    assert np.allclose(phantom.mu[phantom.labels == lab["liver"]], MU_WATER)
    # smooth heterogeneity inside organs, not flat painting
    liver = phantom.activity[phantom.labels == lab["liver"]]
    assert 0.01 < liver.std() / liver.mean() < 0.15


def test_lesions_each_have_their_own_label(phantom):
    lesions = {int(k): v for k, v in phantom.label_table.items() if v["kind"] == "lesion"}
    assert 6 <= len(lesions) <= 12
    present = set(np.unique(phantom.labels).tolist())
    for label, entry in lesions.items():
        assert label >= 100 and label in present
        m = phantom.labels == label
        assert 3.0 <= entry["true_suv"] <= 15.0
        assert 6.0 <= entry["diameter_mm"] <= 30.0
        np.testing.assert_allclose(phantom.activity[m], entry["true_suv"], rtol=1e-5)
        assert np.allclose(phantom.mu[m], MU_WATER)
    diameters = sorted(v["diameter_mm"] for v in lesions.values())
    assert diameters[-1] / diameters[0] > 1.5  # several sizes, not one


def test_anatomy_is_oriented_ras(phantom):
    organs = _by_name(phantom)

    def centre(name):
        return np.argwhere(phantom.labels == organs[name][0]).mean(0)

    assert centre("brain")[2] > centre("lungs")[2] > centre("liver")[2] > centre("bladder")[2]  # head at high z
    assert centre("liver")[0] > centre("spleen")[0]  # liver on the patient's right (+x in RAS)
    assert centre("spine")[1] < centre("bladder")[1]  # spine posterior (-y)


def test_same_seed_same_phantom_other_seed_differs(phantom):
    again = make_phantom(SHAPE, SPACING, seed=7)
    np.testing.assert_array_equal(again.activity, phantom.activity)
    np.testing.assert_array_equal(again.labels, phantom.labels)
    assert again.label_table == phantom.label_table
    other = make_phantom(SHAPE, SPACING, seed=8)
    assert not np.array_equal(other.labels, phantom.labels)
    assert not np.allclose(other.activity, phantom.activity)


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="16 x 16 x 4"):
        make_phantom((8, 8, 8), SPACING)
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(SHAPE, (0.0, 4.0, 4.0))


def test_mu_map_from_suv_marks_the_body_as_water():
    suv = np.zeros((40, 40, 10), np.float32)
    c = np.arange(40) - 19.5
    X, Y = np.meshgrid(c, c, indexing="ij")
    body = (X / 15) ** 2 + (Y / 10) ** 2 <= 1
    suv[body] = 1.0
    suv[(X / 3) ** 2 + (Y / 3) ** 2 <= 1] = 0.0  # a cold hole inside the body is still tissue
    mu, labels, info = mu_map_from_suv(suv, (4.0, 4.0, 4.0))
    assert mu.dtype == np.float32 and labels.dtype == np.int16
    assert np.allclose(mu[:, :, 5][body], MU_WATER)
    assert mu[0, 0, 5] == 0 and labels[0, 0, 5] == 0
    assert info["lungs_detected"] is False
