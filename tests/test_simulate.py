"""Multi-DRF PET simulation: physics (counts, means, noise vs DRF, texture, axial correlation), determinism,
the on-disk layout written by the CLI, and clean refusals of bad input."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import scripts.data.simulate as sim
from conftest import run_python
from scripts.common.errors import UniPETInputError
from scripts.data.phantom import make_phantom

# A uniform elliptic water cylinder (SUV 2): every voxel of the central region has the same truth, so
# deviations from the regional mean are pure noise.
SHAPE = (64, 64, 24)
SPACING = (5.0, 5.0, 4.0)
FAST = dict(n_angles=64, n_subsets=8, n_iterations=3)
DRFS = [4, 16, 100]


def _cylinder():
    c = (np.arange(SHAPE[0]) - (SHAPE[0] - 1) / 2) * SPACING[0]
    X, Y = np.meshgrid(c, c, indexing="ij")
    body = (X / 140) ** 2 + (Y / 110) ** 2 <= 1
    act = np.repeat(body[:, :, None] * 2.0, SHAPE[2], axis=2).astype(np.float32)
    mu = np.repeat(body[:, :, None] * 0.096, SHAPE[2], axis=2).astype(np.float32)
    central = np.zeros(SHAPE, bool)
    central[:, :, 4:-4] = ((X / 100) ** 2 + (Y / 75) ** 2 <= 1)[:, :, None]
    return act, mu, central


@pytest.fixture(scope="module")
def cylinder():
    act, mu, central = _cylinder()
    res = sim.simulate_pet(act, SPACING, DRFS, seed=3, mu_map=mu, **FAST)
    return act, mu, central, res


def _noise(vol, mask):
    return np.where(mask, vol - vol[mask].mean(), 0.0)


def _lag1(noise, mask, axis):
    n = noise.shape[axis]
    a, b = np.take(noise, range(n - 1), axis=axis), np.take(noise, range(1, n), axis=axis)
    both = np.take(mask, range(n - 1), axis=axis) & np.take(mask, range(1, n), axis=axis)
    return float((a * b)[both].mean() / (noise[mask] ** 2).mean())


def _nps_inplane(vol):
    """In-plane noise power spectrum of the central block, averaged over slices; (power, radial frequency)."""
    block = vol[16:48, 16:48, 4:-4]
    block = block - block.mean()
    power = (np.abs(np.fft.fft2(block, axes=(0, 1))) ** 2).mean(axis=2)
    f = np.fft.fftfreq(32)
    return power, np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)


def test_outputs_are_aligned_float32_volumes(cylinder):
    act, _, _, res = cylinder
    assert set(res) == {"full_dose", "drf", "info"}
    assert sorted(res["drf"]) == DRFS
    for vol in [res["full_dose"], *res["drf"].values()]:
        assert vol.shape == SHAPE and vol.dtype == np.float32 and np.isfinite(vol).all() and vol.min() >= 0


def test_counts_scale_with_dose_and_background_fraction(cylinder):
    info = cylinder[3]["info"]
    counts = info["counts"]
    full = counts["full_dose"]["prompts"]
    for d in DRFS:
        assert counts[f"drf_{d}"]["prompts"] == pytest.approx(full / d, rel=0.01)
        assert counts[f"drf_{d}"]["trues_expected"] == pytest.approx(counts["full_dose"]["trues_expected"] / d)
    assert 0.30 <= info["background_fraction_of_prompts"] <= 0.40  # scatter + randoms share of the prompts
    assert info["physics"]["n_angles"] == 64


def test_means_are_preserved_across_doses(cylinder):
    act, _, central, res = cylinder
    truth = float(act[central].mean())
    full = float(res["full_dose"][central].mean())
    assert full == pytest.approx(truth, rel=0.01)  # calibrated in SUV
    for d in (4, 16):
        assert float(res["drf"][d][central].mean()) == pytest.approx(full, rel=0.02)
    # even at 1 % of the counts the regional mean holds within a few %
    assert float(res["drf"][100][central].mean()) == pytest.approx(full, rel=0.04)


def test_noise_grows_like_sqrt_drf(cylinder):
    _, _, central, res = cylinder
    std_full = res["full_dose"][central].std()
    assert 0.02 < std_full / 2.0 < 0.10  # full dose is itself a noisy scan (CoV of a few %)
    for d in DRFS:
        ratio = res["drf"][d][central].std() / std_full
        assert 0.8 * np.sqrt(d) < ratio < 1.2 * np.sqrt(d), (d, ratio)


def test_noise_texture_changes_with_drf(cylinder):
    res = cylinder[3]
    p4, radius = _nps_inplane(res["drf"][4])
    p100, _ = _nps_inplane(res["drf"][100])
    # magnitude follows the counts ...
    assert 15 < p100.sum() / p4.sum() < 40
    # ... and the normalised spectrum shifts to higher frequencies at very low counts (a different texture)
    centroid4 = (p4 * radius).sum() / p4.sum()
    centroid100 = (p100 * radius).sum() / p100.sum()
    assert centroid100 > 1.03 * centroid4


def test_noise_is_correlated_along_z_like_a_3d_scan(cylinder):
    act, mu, central, res = cylinder
    noise = _noise(res["full_dose"], central)
    assert _lag1(noise, central, axis=2) > 0.3
    assert _lag1(noise, central, axis=0) > 0.2
    # control: without the axial post-filter, 2D slice-by-slice reconstruction leaves z uncorrelated
    flat = sim.simulate_pet(act, SPACING, [4], seed=3, mu_map=mu, postfilter_axial_fwhm_mm=0.0, **FAST)
    assert abs(_lag1(_noise(flat["full_dose"], central), central, axis=2)) < 0.1


def test_same_seed_is_bit_identical_other_seed_differs(cylinder):
    act, mu, _, res = cylinder
    again = sim.simulate_pet(act, SPACING, [100, 4, 16], seed=3, mu_map=mu, **FAST)
    np.testing.assert_array_equal(again["full_dose"], res["full_dose"])
    for d in DRFS:
        np.testing.assert_array_equal(again["drf"][d], res["drf"][d])
    # a DRF's noise does not depend on which other DRFs are asked for
    alone = sim.simulate_pet(act, SPACING, [16], seed=3, mu_map=mu, **FAST)
    np.testing.assert_array_equal(alone["drf"][16], res["drf"][16])
    other = sim.simulate_pet(act, SPACING, [4], seed=4, mu_map=mu, **FAST)
    assert not np.array_equal(other["full_dose"], res["full_dose"])


def test_thinned_low_dose_shares_counts_with_full_dose_independent_does_not(cylinder):
    act, mu, central, res = cylinder
    full = _noise(res["full_dose"], central)[central]
    thin = _noise(res["drf"][4], central)[central]
    # keeping each count with p = 1/4: corr(full, low) = sqrt(p) = 0.5 for the raw counts
    assert 0.35 < np.corrcoef(full, thin)[0, 1] < 0.65
    indep = sim.simulate_pet(act, SPACING, [4], seed=3, mu_map=mu, low_dose_mode="independent", **FAST)
    assert abs(np.corrcoef(full, _noise(indep["drf"][4], central)[central])[0, 1]) < 0.1


def test_long_volumes_are_reconstructed_in_chunks_with_the_same_result(cylinder, monkeypatch):
    act, mu, _, res = cylinder
    monkeypatch.setattr(sim, "_MAX_SLICES_PER_CHUNK", 7)
    chunked = sim.simulate_pet(act, SPACING, [16], seed=3, mu_map=mu, **FAST)
    np.testing.assert_allclose(chunked["drf"][16], res["drf"][16], rtol=1e-4, atol=1e-5)


def test_phantom_quantification_and_partial_volume():
    ph = make_phantom((64, 64, 40), (6.0, 6.0, 8.0), seed=1)
    res = sim.simulate_pet(ph.activity, ph.spacing, [10], seed=0, mu_map=ph.mu, n_angles=64, n_subsets=8)
    labels = ph.labels
    liver_label = next(int(k) for k, v in ph.label_table.items() if v["name"] == "liver")
    from scipy import ndimage

    liver = ndimage.binary_erosion(labels == liver_label, iterations=2)
    truth = float(ph.activity[liver].mean())
    assert float(res["full_dose"][liver].mean()) == pytest.approx(truth, rel=0.05)
    assert float(res["drf"][10][liver].mean()) == pytest.approx(float(res["full_dose"][liver].mean()), rel=0.05)
    # the smallest lesion loses contrast (PSF + voxels): its recovered peak is below the true SUV
    lesions = [(v["diameter_mm"], int(k), v["true_suv"]) for k, v in ph.label_table.items() if v["kind"] == "lesion"]
    _, small, suv = min(lesions)
    assert float(res["full_dose"][labels == small].max()) < 0.9 * suv


def test_bad_arrays_raise_a_clear_error():
    act, mu, _ = _cylinder()
    with pytest.raises(UniPETInputError, match="3D"):
        sim.simulate_pet(act[:, :, 0], SPACING, [4])
    bad = act.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(UniPETInputError, match="NaN"):
        sim.simulate_pet(bad, SPACING, [4])
    with pytest.raises(UniPETInputError, match="Bq/mL"):
        sim.simulate_pet(act * 5000, SPACING, [4])
    with pytest.raises(UniPETInputError, match="drfs"):
        sim.simulate_pet(act, SPACING, [0.5])
    with pytest.raises(UniPETInputError, match="mu_map"):
        sim.simulate_pet(act, SPACING, [4], mu_map=mu[:, :, :3])


# ------------------------------------------------------------------------------------------------
# on disk and on the command line

SMALL = ["--shape", "[32,32,12]", "--spacing", "[12,12,32]", "--drfs", "[4,20]", "--n_angles", "32", "--n_subsets", "8"]


def _run_cli(args, bundle_root, tmp_path):
    return run_python("-m", "scripts.data.simulate", *args, cwd=bundle_root, OMP_NUM_THREADS="2")


def test_help_works(bundle_root, tmp_path):
    out = _run_cli(["--help"], bundle_root, tmp_path)
    assert out.returncode == 0
    text = out.stdout + out.stderr
    for flag in ("--drfs", "--n_subjects", "--activity", "--overwrite", "--counts_per_suv_ml"):
        assert flag in text


def test_cli_writes_the_layout_and_refuses_to_overwrite(bundle_root, tmp_path):
    out_dir = tmp_path / "ds"
    run = _run_cli(["--output_dir", str(out_dir), "--n_subjects", "2", "--seed", "5", *SMALL], bundle_root, tmp_path)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["phantom_000", "phantom_001"]  # no temp folders left
    subj = out_dir / "phantom_000"
    expected = {
        "full_dose.nii.gz",
        "drf_4.nii.gz",
        "drf_20.nii.gz",
        "activity.nii.gz",
        "labels.nii.gz",
        "labels.json",
        "simulation.json",
    }
    assert {p.name for p in subj.iterdir()} == expected
    ref = nib.load(str(subj / "full_dose.nii.gz"))
    for name in ("drf_4", "drf_20", "activity", "labels"):
        img = nib.load(str(subj / f"{name}.nii.gz"))
        assert img.shape == ref.shape == (32, 32, 12)
        np.testing.assert_allclose(img.affine, ref.affine)
        assert img.get_data_dtype() == (np.int16 if name == "labels" else np.float32)
    np.testing.assert_allclose(np.diag(ref.affine)[:3], [12.0, 12.0, 32.0])
    labels = np.asarray(nib.load(str(subj / "labels.nii.gz")).dataobj)
    table = json.loads((subj / "labels.json").read_text())
    assert {int(k) for k in table} >= set(np.unique(labels[labels > 0]).tolist())
    assert {v["kind"] for v in table.values()} == {"organ", "lesion"}
    assert all({"name", "kind", "true_suv", "volume_ml"} <= set(v) for v in table.values())
    meta = json.loads((subj / "simulation.json").read_text())
    assert "simulated data" in meta["description"]
    prompts = {k: v["prompts"] for k, v in meta["counts"].items()}
    assert prompts["drf_20"] < prompts["drf_4"] < prompts["full_dose"]
    assert meta["physics"]["n_subsets"] == 8 and meta["base_seed"] == 5 and "version" in meta["software"]
    a0 = np.asarray(nib.load(str(out_dir / "phantom_000" / "activity.nii.gz")).dataobj)
    a1 = np.asarray(nib.load(str(out_dir / "phantom_001" / "activity.nii.gz")).dataobj)
    assert not np.array_equal(a0, a1)  # subjects differ

    before = (subj / "drf_4.nii.gz").read_bytes()
    again = _run_cli(["--output_dir", str(out_dir), "--n_subjects", "1", *SMALL], bundle_root, tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error:") and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert (subj / "drf_4.nii.gz").read_bytes() == before

    # same seed + --overwrite: the folder is replaced, with bit-identical content
    first = {n: np.asarray(nib.load(str(subj / f"{n}.nii.gz")).dataobj) for n in ("full_dose", "drf_4", "drf_20")}
    sim.main(["--output_dir", str(out_dir), "--n_subjects", "1", "--seed", "5", "--overwrite", *SMALL])
    for name, a in first.items():
        b = np.asarray(nib.load(str(subj / f"{name}.nii.gz")).dataobj)
        assert np.array_equal(a, b), f"{name}: max |diff| {np.abs(a.astype(np.float64) - b).max():.3g}"
    assert (subj / "drf_4.nii.gz").read_bytes() == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["phantom_000", "phantom_001"]


def _with_nan() -> np.ndarray:
    vol = np.ones((32, 32, 4), np.float32)
    vol[5, 6, 2] = np.nan
    return vol


def _write(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: d / "missing.nii.gz", "no such NIfTI file"),
        (lambda d: _write(d / "flat.nii.gz", np.ones((32, 32), np.float32)), "3D"),
        (lambda d: _write(d / "nan.nii.gz", _with_nan()), "NaN"),
    ],
)
def test_bad_activity_file_exits_2_and_writes_nothing(tmp_path, capsys, make, message):
    src = make(tmp_path)
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        sim.main(["--output_dir", str(out_dir), "--activity", str(src), "--subject", "s1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]
    assert not out_dir.exists()


def test_real_activity_input_keeps_its_grid_and_says_labels_are_a_body_mask(tmp_path):
    act, _, _ = _cylinder()
    affine = np.diag([5.0, 5.0, 4.0, 1.0])
    affine[:3, 3] = [-100.0, -120.0, 30.0]
    src = _write(tmp_path / "patient.nii.gz", act, affine)
    subj = sim.simulate_subject(tmp_path / "out", "real01", activity=src, drfs=[10], seed=1, **FAST)
    img = nib.load(str(subj / "drf_10.nii.gz"))
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_array_equal(np.asarray(nib.load(str(subj / "activity.nii.gz")).dataobj), act)
    table = json.loads((subj / "labels.json").read_text())
    assert table["1"]["name"] == "body" and "no organ or lesion labels" in table["1"]["note"]
    meta = json.loads((subj / "simulation.json").read_text())
    assert meta["source"]["kind"] == "real SUV volume" and meta["mu_map"]["source"] == "given"
    # the input is never inside what --overwrite would delete
    with pytest.raises(UniPETInputError, match="inside the output folder"):
        sim.simulate_subject(tmp_path / "out", "real01", activity=subj / "activity.nii.gz", overwrite=True, **FAST)


def test_an_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = sim.save_nifti

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(sim, "save_nifti", failing_save)
    with pytest.raises(KeyboardInterrupt):
        sim.simulate_subject(tmp_path, "p0", shape=(32, 32, 8), spacing=(12.0, 12.0, 40.0), drfs=[4, 20], **FAST)
    assert list(tmp_path.iterdir()) == []


def test_real_activity_resampled_to_the_training_grid(tmp_path, capsys):
    act, _, _ = _cylinder()
    affine = np.diag([5.0, 5.0, 3.0, 1.0])
    affine[:3, 3] = [-100.0, -120.0, 30.0]
    src = _write(tmp_path / "patient.nii.gz", act, affine)
    subj = sim.simulate_subject(tmp_path / "out", "real01", activity=src, resample_mm=4.0, drfs=[10], seed=1, **FAST)
    img = nib.load(str(subj / "drf_10.nii.gz"))
    np.testing.assert_allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)), [4.0, 4.0, 4.0])
    np.testing.assert_allclose(img.affine[:3, 3], affine[:3, 3], atol=1e-4)  # same first voxel centre
    extent_in = np.array(act.shape) * [5.0, 5.0, 3.0]
    assert np.all(np.abs(np.array(img.shape) * 4.0 - extent_in) <= 4.0), (img.shape, act.shape)
    truth = np.asarray(nib.load(str(subj / "activity.nii.gz")).dataobj)
    assert truth.min() >= 0 and abs(truth.mean() / act.mean() - 1) < 0.05, "trilinear resampling keeps the mean SUV"
    meta = json.loads((subj / "simulation.json").read_text())
    assert meta["source"]["resampled_to_mm"] == 4.0 and meta["source"]["native_spacing_mm"] == [5.0, 5.0, 3.0]
    with pytest.raises(UniPETInputError, match="resample_mm must be"):
        sim.simulate_subject(tmp_path / "out", "real02", activity=src, resample_mm=0.0, **FAST)
    with pytest.raises(SystemExit):
        sim.main(["--output_dir", str(tmp_path / "o2"), "--n_subjects", "1", "--resample_mm", "4"])
    assert "resamples a real --activity input" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_first_subject_writes_what_the_whole_set_would(tmp_path):
    """Two processes given disjoint subject ranges (--first_subject) write the same files as one process."""
    kw = dict(n_subjects=3, seed=5, shape="[32,32,12]", spacing="[12,12,32]", drfs="[4,20]", n_angles=32, n_subsets=8)
    sim.simulate(str(tmp_path / "all"), **kw)
    sim.simulate(str(tmp_path / "part"), first_subject=2, **kw)
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == ["phantom_002"]
    for name in ("drf_4", "full_dose", "labels"):
        a = np.asarray(nib.load(str(tmp_path / "all" / "phantom_002" / f"{name}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "part" / "phantom_002" / f"{name}.nii.gz")).dataobj)
        np.testing.assert_array_equal(a, b)
    with pytest.raises(UniPETInputError, match="first_subject"):
        sim.simulate(str(tmp_path / "bad"), first_subject=3, **kw)
