"""The pair lists that the training/evaluation configs feed to MONAI datasets."""

import json

import pytest
from test_training import make_pairs

from scripts.common.errors import UniPETInputError
from scripts.data.datalist import write_datalist
from scripts.data.training_data import paired_datalist


def test_on_the_fly_split_is_by_subject_with_absolute_paths(tmp_path):
    root = make_pairs(tmp_path / "d", n_subjects=5, shape=(8, 8, 6))
    train = paired_datalist(root, "training", val_fraction=0.2, seed=0)
    val = paired_datalist(root, "validation", val_fraction=0.2, seed=0)
    assert train and val
    assert {e["subject"] for e in train}.isdisjoint({e["subject"] for e in val})
    for e in train + val:
        assert e["image"].startswith(str(root.resolve())) and e["label"].endswith("full_dose.nii.gz")
    assert paired_datalist(root, "training", val_fraction=0.2, seed=0) == train  # deterministic


def test_datalist_file_and_drf_filter(tmp_path):
    root = make_pairs(tmp_path / "d", n_subjects=3, shape=(8, 8, 6))
    dl = write_datalist(root, output=tmp_path / "dl.json", val_fraction=0.34, test_fraction=0.0)
    train = paired_datalist(root, "training", datalist_file=dl, drfs=[20])
    assert train and all(int(e["drf"]) == 20 for e in train)
    assert all(not e["subject"].startswith("/") for e in train), "subject ids must stay ids"
    assert paired_datalist(root, "test", datalist_file=dl) == []  # an empty split is fine, not a crash


def test_max_items_and_errors(tmp_path):
    root = make_pairs(tmp_path / "d", n_subjects=4, shape=(8, 8, 6))
    assert len(paired_datalist(root, "training", val_fraction=0.0, max_items=3)) == 3
    with pytest.raises(UniPETInputError, match="not found"):
        paired_datalist(root, "training", datalist_file=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UniPETInputError, match="not valid JSON"):
        paired_datalist(root, "training", datalist_file=bad)
    (tmp_path / "stale.json").write_text(
        json.dumps(
            {
                "training": [
                    {"image": "gone/drf_4.nii.gz", "label": "gone/full_dose.nii.gz", "drf": 4, "subject": "gone"}
                ]
            }
        )
    )
    with pytest.raises(UniPETInputError, match="re-create the datalist"):
        paired_datalist(root, "training", datalist_file=tmp_path / "stale.json")
    with pytest.raises(UniPETInputError, match="unknown split"):
        paired_datalist(root, "train")


# --- where training patches are centred (issue 15) ----------------------------------------------------

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from conftest import BUNDLE_ROOT  # noqa: E402
from scripts.data.io import save_nifti  # noqa: E402
from scripts.data.training_data import PatchSamplingWeightsd, dose_balanced_sampler, hotspot_mask  # noqa: E402

SPACING = (4.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory):
    """A simulated subject (full dose, DRF 20, lesion labels) written as NIfTI, 72 x 64 x 48 at 4 mm."""
    from scripts.data.phantom import make_phantom
    from scripts.data.simulate import simulate_pet

    root = tmp_path_factory.mktemp("sampling")
    ph = make_phantom((72, 64, 48), SPACING, seed=11, n_lesions=(8, 8), lesion_diameter_mm=(6.0, 14.0))
    sim = simulate_pet(ph.activity, SPACING, drfs=[20], seed=3, mu_map=ph.mu)
    full = sim["full_dose"].astype(np.float32)
    low = next(iter(sim["drf"].values())).astype(np.float32)
    affine = np.diag([*SPACING, 1.0])
    save_nifti(full, affine, root / "full_dose.nii.gz")
    save_nifti(low, affine, root / "drf_20.nii.gz")
    return {"image": str(root / "drf_20.nii.gz"), "label": str(root / "full_dose.nii.gz")}, full, ph.labels


def _centre_values(entry, draws: int, **overrides) -> dict[str, np.ndarray]:
    """The value at the centre of each patch that train.json's own transforms cut from ``entry``, per key.

    train.json's preprocessing, sampling weights and crop, without the random flips (which would move the
    centre voxel of an even-sized patch by one).
    """
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, RandFlipd

    keys = list(entry)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "num_samples": draws, "load_keys": keys, **overrides})
    pre = parser.get_parsed_content("preprocessing_transforms")
    rand = [t for t in parser.get_parsed_content("train#random_transforms") if not isinstance(t, RandFlipd)]
    transform = Compose([*pre, parser.get_parsed_content("train#sampling_weights"), *rand])
    transform.set_random_state(seed=0)
    size = parser.get_parsed_content("patch_size")
    patches = transform(dict(entry))
    assert all(tuple(p["label"].shape[1:]) == tuple(size) and "crop_weight" not in p for p in patches)
    centre = tuple(s // 2 for s in size)
    return {k: np.array([float(p[k][(0, *centre)]) for p in patches]) for k in keys}


def test_patch_centres_lie_in_tissue_and_hot_spots_are_oversampled(phantom_pair):
    entry, full, labels = phantom_pair
    tissue = full > 0.5
    # within 2 voxels of a lesion, saved as a third image key so the same crop cuts it
    near = torch.nn.functional.max_pool3d(torch.from_numpy((labels >= 100).astype(np.float32))[None, None], 5, 1, 2)[
        0, 0
    ]
    path = str(Path(entry["label"]).with_name("near_lesion.nii.gz"))
    save_nifti(near.numpy() + 1.0, np.diag([*SPACING, 1.0]), path)  # +1: the loader refuses all-zero regions
    entry = {**entry, "near": path}
    on = _centre_values(entry, 400)
    off = _centre_values(entry, 400, hotspot_fraction=0.0)
    # 0.2.0 (every voxel "foreground"): centres spread like the volume, tissue.mean() of them in tissue
    frac = np.mean(on["label"] * 20 > 0.5)
    assert frac > 0.95 and frac > tissue.mean() + 0.3, (frac, tissue.mean())
    near_on, near_off = np.mean(on["near"] * 20 > 1.5), np.mean(off["near"] * 20 > 1.5)
    # 0.2.0 drew centres in proportion to volume: near.mean() ~ 0.9 % here
    assert near_on > 2 * near_off and near_on > 5 * float(near.mean()), (near_on, near_off, float(near.mean()))


def test_hotspot_mask_finds_small_hot_spheres_not_large_organs():
    x = np.ones((40, 40, 40), np.float32)
    x[5:35, 5:35, 5:20] = 6.0  # a large hot organ (30 x 30 x 15 voxels)
    x[10:13, 10:13, 28:31] = 4.0  # a 3-voxel lesion in 1 SUV background
    x[20:22, 20:22, 10:12] = 12.0  # a 2-voxel lesion inside the hot organ
    hot = hotspot_mask(x, smooth_sigma_voxels=0.0)
    assert hot[10:13, 10:13, 28:31].all() and hot[20:22, 20:22, 10:12].all()
    assert hot.sum() == 27 + 8
    smoothed = hotspot_mask(x)  # the default light smoothing keeps the lesion, nothing of the organ
    assert smoothed[11, 11, 29] and not smoothed[5:35, 5:35, 5:8].any()
    with pytest.raises(ValueError, match="max_size_voxels"):
        hotspot_mask(x, max_size_voxels=1)


def test_sampling_weights_shares_and_air_fallback(caplog):
    full = np.full((1, 20, 20, 20), 0.1 / 20, np.float32)
    full[:, 2:18, 2:18, 2:18] = 1.0 / 20
    full[:, 8:10, 8:10, 8:10] = 5.0 / 20
    w = PatchSamplingWeightsd("label", hotspot_fraction=0.25)({"label": torch.from_numpy(full)})["crop_weight"]
    assert w.shape == full.shape and abs(w.sum() - 1) < 1e-5
    assert w[full * 20 < 0.5].sum() == 0  # never centred in air
    hot_share = w[:, 6:12, 6:12, 6:12].sum() - 0.75 * 6**3 / 16**3
    assert abs(hot_share - 0.25) < 1e-5  # the one hot structure (the 2-voxel cube, smoothed) takes its share
    air = PatchSamplingWeightsd("label").weights(np.zeros((1, 4, 4, 4), np.float32))
    assert (air == 1).all() and "uniformly" in caplog.text
    with pytest.raises(ValueError, match="hotspot_fraction"):
        PatchSamplingWeightsd("label", hotspot_fraction=1.0)


def test_dose_balanced_sampler_equalises_drfs():
    datalist = [{"drf": d} for d in (4, 4, 100, 100)]
    assert dose_balanced_sampler(datalist, 0.0) is None
    sampler = dose_balanced_sampler(datalist, 0.5, seed=1)
    weights = sampler.weights.numpy()
    np.testing.assert_allclose(weights[0] / weights[2], 5.0, rtol=1e-6)  # sqrt(100 / 4)
    draws = np.array([datalist[i]["drf"] for _ in range(50) for i in sampler])
    assert 0.75 < (draws == 4).mean() < 0.92  # expected 5 / 6
    with pytest.raises(ValueError, match="dose_balance"):
        dose_balanced_sampler(datalist, -1.0)


def test_distributed_sampling_keeps_each_stages_dose_balance():
    """multi_gpu_train.json (0.5.3): each rank draws its own share with its stage's balance (until 0.5.3 the
    DistributedSampler ignored dose_balance); the trainer passes the epoch on to the distributed parts."""
    from monai.data import DistributedSampler, DistributedWeightedRandomSampler

    from scripts.data.training_data import StageDoseSampler
    from scripts.engines.gan_trainer import StageClock

    datalist = [{"drf": d} for d in (4, 4, 4, 100, 100, 100)]
    clock = StageClock(10)
    share = {"distributed": True, "num_replicas": 2, "rank": 0}
    uniform = dose_balanced_sampler(datalist, 0.0, 0, 0.0, clock, **share)
    assert isinstance(uniform, DistributedSampler) and len(uniform) == 3  # MONAI's workflow sets its epoch
    both = dose_balanced_sampler(datalist, 0.5, 0, None, clock, **share)
    assert isinstance(both, DistributedWeightedRandomSampler) and len(both) == 3
    staged = dose_balanced_sampler(datalist, 0.0, 0, 0.5, clock, **share)
    assert isinstance(staged, StageDoseSampler) and len(staged) == 3
    assert isinstance(staged.stage2, DistributedWeightedRandomSampler)
    staged.set_epoch(3)
    assert staged.stage1.epoch == staged.stage2.epoch == 3
    ranks = [set(dose_balanced_sampler(datalist, 0.0, 0, 0.5, clock, True, 2, r).stage1) for r in (0, 1)]
    assert ranks[0].isdisjoint(ranks[1]) and ranks[0] | ranks[1] == set(range(6))  # stage 1: disjoint shares
    clock.iteration = 10
    draws = [datalist[i]["drf"] for e in range(60) for i in (staged.set_epoch(e), staged)[1]]
    assert 0.7 < np.mean(np.array(draws) == 4) < 0.95  # stage 2 weighted ~ DRF^-0.5 (5 : 1 per pair)


def test_stage2_dose_balance_builds_one_sampler_per_stage(caplog):
    """0 / 0 stays the DataLoader's shuffle, equal values one weighted sampler (as before 0.5.3), and different
    values a StageDoseSampler whose stage-1 part draws exactly what DataLoader(shuffle=True) draws."""
    from scripts.data.training_data import StageDoseSampler
    from scripts.engines.gan_trainer import StageClock

    datalist = [{"drf": d} for d in (4, 4, 100, 100)]
    clock = StageClock(10)
    assert dose_balanced_sampler(datalist, 0.0, 0, 0.0, clock) is None
    assert isinstance(dose_balanced_sampler(datalist, 0.5, 0, None, clock), torch.utils.data.WeightedRandomSampler)
    with caplog.at_level("INFO"):
        sampler = dose_balanced_sampler(datalist, 0.0, 3, 0.5, clock)
    assert isinstance(sampler, StageDoseSampler) and len(sampler) == 4
    assert "DRF^-0 in stage 1 and ~ DRF^-0.5 in stage 2" in caplog.text  # --dose_balance alone no longer sets both
    torch.manual_seed(7)
    first = [int(b) for b in torch.utils.data.DataLoader(range(4), sampler=sampler)]  # stage 1: a permutation
    torch.manual_seed(7)
    assert first == [int(b) for b in torch.utils.data.DataLoader(range(4), shuffle=True)]
    assert sorted(first) == [0, 1, 2, 3]
    clock.iteration = 10  # the coming iteration 11 is in stage 2: weighted draws with replacement
    draws = np.array([datalist[i]["drf"] for _ in range(50) for i in sampler])
    assert 0.75 < (draws == 4).mean() < 0.92  # expected 5 / 6
    with pytest.raises(ValueError, match="stage_clock"):
        dose_balanced_sampler(datalist, 0.0, 0, 0.5)
    with pytest.raises(ValueError, match="stage2_dose_balance"):
        dose_balanced_sampler(datalist, 0.0, 0, float("nan"), clock)


def test_identity_pairs_are_each_full_dose_as_its_own_input_with_their_share_of_the_draws():
    from scripts.data.training_data import IDENTITY_DRF, with_identity_pairs

    pairs = [
        {"image": f"/d/{s}/drf_{d}.nii.gz", "label": f"/d/{s}/full_dose.nii.gz", "drf": d, "subject": s}
        for s in ("a", "b")
        for d in (4, 20, 100)
    ]
    before = [dict(e) for e in pairs]
    assert with_identity_pairs(pairs, 0.0) is pairs
    both = with_identity_pairs(pairs, 0.2)
    assert pairs == before and both[: len(pairs)] == pairs  # nothing modified, the pairs first
    added = both[len(pairs) :]
    assert added == [
        {"image": f"/d/{s}/full_dose.nii.gz", "label": f"/d/{s}/full_dose.nii.gz", "drf": IDENTITY_DRF, "subject": s}
        for s in ("a", "b")
    ]
    assert with_identity_pairs(both, 0.2)[len(both) :] == []  # a list that has them gets no second set
    for alpha in (0.0, 0.5):
        sampler = dose_balanced_sampler(both, alpha, seed=3, identity_fraction=0.2)
        w = sampler.weights.numpy()
        assert abs(w[len(pairs) :].sum() / w.sum() - 0.2) < 1e-9  # the share, whatever the dose balance
        np.testing.assert_allclose(w[0] / w[2], (100 / 4) ** alpha, rtol=1e-6)  # the pairs keep their balance
        draws = [both[i]["drf"] for _ in range(400) for i in sampler]
        assert 0.16 < np.mean([d == IDENTITY_DRF for d in draws]) < 0.24
    assert dose_balanced_sampler(pairs, 0.0, identity_fraction=0.2) is None  # no identity pairs: as before
    # several ranks: each weighs its own share of the list, the identity pairs keep theirs over all ranks together
    ranks = [dose_balanced_sampler(both, 0.5, 0, None, None, True, 2, r, identity_fraction=0.2) for r in (0, 1)]
    drawn = [both[i]["drf"] for _ in range(200) for s in ranks for i in s]
    assert 0.14 < np.mean([d == IDENTITY_DRF for d in drawn]) < 0.26
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="identity_fraction"):
            with_identity_pairs(pairs, bad)


def test_train_json_adds_identity_pairs_only_when_asked(tmp_path):
    from conftest import bundle_parser

    data = make_pairs(tmp_path / "pairs", n_subjects=5, drfs=(4, 20))
    plain = bundle_parser(("train.json",), dataset_dir=str(data)).get_parsed_content("train#datalist")
    assert all(e["image"] != e["label"] for e in plain)
    parser = bundle_parser(("train.json",), dataset_dir=str(data), identity_fraction=0.25)
    listed = parser.get_parsed_content("train#datalist")
    identity = [e for e in listed if e["image"] == e["label"]]
    assert len(identity) == len({e["label"] for e in plain}) and len(listed) == len(plain) + len(identity)
    sampler = parser.get_parsed_content("train#sampler")  # stage 1 uniform, stage 2 dose-balanced: both keep the share
    for stage in (sampler.stage1, sampler.stage2):
        w = stage.weights.numpy()
        assert abs(w[len(plain) :].sum() / w.sum() - 0.25) < 1e-9
    assert bundle_parser(("train.json",)).get_parsed_content("identity_fraction") == 0.0  # off by default
