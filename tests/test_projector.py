"""Parallel-beam system matrix and OSEM: geometry, adjointness, units, and noise-free recovery."""

import math

import numpy as np
import pytest
import torch

from scripts.data.projector import ParallelBeamProjector, get_projector
from scripts.data.recon import OSEMReconstructor, gaussian_filter_mm, osem


def _disk(n: int, pixel_mm: float, radius_mm: float, centre_mm=(0.0, 0.0)) -> np.ndarray:
    c = (np.arange(n) - (n - 1) / 2.0) * pixel_mm
    X, Y = np.meshgrid(c, c, indexing="ij")
    return (((X - centre_mm[0]) ** 2 + (Y - centre_mm[1]) ** 2) <= radius_mm**2).astype(np.float32)


def test_uniform_disk_projects_the_same_at_every_angle():
    proj = ParallelBeamProjector(48, 48, 4.0, 4.0, n_angles=36)
    disk = _disk(48, 4.0, 70.0)
    sino = proj.forward(torch.from_numpy(disk.reshape(-1, 1))).numpy().reshape(proj.n_angles, proj.n_bins)
    totals = sino.sum(1)
    # every angle sees all of the activity: total = sum(pixels) * pixel area / bin width
    np.testing.assert_allclose(totals, disk.sum() * 16.0 / proj.bin_mm, rtol=1e-5)
    # a centred disk is rotation symmetric: each profile matches the mean profile up to the staircase
    # edge of a 4 mm pixel disk, so compare cumulative profiles (where the mass lies) tightly
    mean_profile = sino.mean(0)
    cdf_gap = np.abs(np.cumsum(sino, 1) - np.cumsum(mean_profile)).max() / mean_profile.sum()
    assert cdf_gap < 0.01
    shifted = ParallelBeamProjector(48, 48, 4.0, 4.0, n_angles=36)  # control: an off-centre disk is not symmetric
    off = shifted.forward(torch.from_numpy(_disk(48, 4.0, 70.0, (20.0, 0.0)).reshape(-1, 1))).numpy()
    off = off.reshape(36, shifted.n_bins)
    assert np.abs(np.cumsum(off, 1) - np.cumsum(off.mean(0))).max() / off.mean(0).sum() > 0.05
    # the central ray crosses ~ one diameter (140 mm) of unit activity: units are mm of path
    assert abs(mean_profile.max() - 140.0) < 6.0
    # profiles are symmetric about the centre bin
    np.testing.assert_allclose(mean_profile, mean_profile[::-1], atol=0.02 * mean_profile.max())


def test_off_centre_point_follows_a_sinusoid():
    proj = ParallelBeamProjector(32, 32, 2.0, 2.0, n_angles=8)
    img = np.zeros((32, 32), np.float32)
    img[24, 16] = 1.0  # x = (24 - 15.5) * 2 = 17 mm, y = 1 mm
    sino = proj.forward(torch.from_numpy(img.reshape(-1, 1))).numpy().reshape(8, proj.n_bins)
    s_bins = (np.arange(proj.n_bins) - (proj.n_bins - 1) / 2.0) * proj.bin_mm
    centroid = (sino * s_bins).sum(1) / sino.sum(1)
    expected = 17.0 * np.cos(proj.angles) + 1.0 * np.sin(proj.angles)
    # binning a trapezoid footprint shifts its centroid by a small fraction of a bin at most
    np.testing.assert_allclose(centroid, expected, atol=0.1)
    assert np.abs(centroid - (17.0 * np.cos(proj.angles) - 1.0 * np.sin(proj.angles))).max() > 1.0


@pytest.mark.parametrize("dx,dy", [(4.0, 4.0), (3.0, 5.0)])
def test_back_projection_is_the_transpose(dx, dy):
    proj = ParallelBeamProjector(20, 24, dx, dy, n_angles=12)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(proj.n_pixels, 3, generator=gen)
    y = torch.rand(proj.n_rows, 3, generator=gen)
    lhs = (proj.forward(x) * y).sum(0)
    rhs = (x * proj.back(y)).sum(0)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=0.0)
    # the subset matrices are the matching row blocks of the full one
    seen = []
    for p_s, p_s_t, rows in proj.subsets(4):
        torch.testing.assert_close(torch.sparse.mm(p_s, x), proj.forward(x)[torch.from_numpy(rows)])
        torch.testing.assert_close(p_s_t.to_dense(), p_s.to_dense().T)
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(proj.n_rows))


def test_projector_cache_and_bad_geometry():
    assert get_projector(16, 16, 4.0, 4.0, 8) is get_projector(16, 16, 4.0, 4.0, 8)
    assert get_projector(16, 16, 4.0, 4.0, 8) is not get_projector(16, 16, 4.0, 4.0, 12)
    with pytest.raises(ValueError):
        ParallelBeamProjector(16, 16, 0.0, 4.0, 8)
    with pytest.raises(ValueError):
        get_projector(16, 16, 4.0, 4.0, 8).subsets(9)


def test_osem_recovers_noise_free_data_with_attenuation_and_background():
    proj = ParallelBeamProjector(40, 40, 5.0, 5.0, n_angles=40)
    body = _disk(40, 5.0, 80.0)
    hot = _disk(40, 5.0, 20.0, centre_mm=(30.0, 0.0))
    img = np.ascontiguousarray(np.stack([(body * 2.0 + hot * 4.0).ravel(), body.ravel()], axis=1))
    mu = np.ascontiguousarray(np.stack([body.ravel(), body.ravel()], axis=1) * 0.0096)
    eff = 50.0 * torch.exp(-proj.forward(torch.from_numpy(mu)))
    trues = eff * proj.forward(torch.from_numpy(img))
    bg = torch.full_like(trues, float(trues.mean()) * 0.5)
    x = osem(proj, trues + bg, eff, bg, n_iterations=20, n_subsets=8).numpy()
    inner = _disk(40, 5.0, 60.0).ravel() > 0
    warm = inner & (_disk(40, 5.0, 30.0, centre_mm=(30.0, 0.0)).ravel() == 0)
    # background modelled additively and attenuation in the model: the image comes back in its own units
    assert abs(x[warm, 0].mean() - 2.0) < 0.04
    assert abs(x[inner, 1].mean() - 1.0) < 0.02
    assert x[_disk(40, 5.0, 10.0, centre_mm=(30.0, 0.0)).ravel() > 0, 0].mean() > 5.0
    assert x.min() >= 0.0
    # a slice without counts stays empty instead of blowing up
    model = OSEMReconstructor(proj, eff, bg * 0, n_subsets=4)
    empty = model(torch.zeros_like(trues), n_iterations=2)
    assert torch.isfinite(empty).all() and float(empty.abs().max()) == 0.0


def test_gaussian_filter_mm_keeps_the_mean_and_blurs_by_the_given_fwhm():
    vol = np.zeros((41, 41, 41), np.float32)
    vol[20, 20, 20] = 1.0
    out = gaussian_filter_mm(vol, (2.0, 2.0, 4.0), (8.0, 8.0, 8.0))
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-4)
    profile_x = out[:, 20, 20]
    half = profile_x.max() / 2
    above = np.flatnonzero(profile_x >= half)
    fwhm_x = (above[-1] - above[0] + 1) * 2.0
    assert 6.0 <= fwhm_x <= 10.0
    # along z (4 mm voxels) the same FWHM in mm covers half as many voxels
    profile_z = out[20, 20, :]
    assert profile_z[21] / profile_z[20] < profile_x[21] / profile_x[20]
    np.testing.assert_array_equal(gaussian_filter_mm(vol, (2.0, 2.0, 4.0), 0.0), vol)
