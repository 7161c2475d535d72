"""The shipped weights (models/model.pt): recorded, intact, loadable, and better than the low-dose input."""

from __future__ import annotations

import numpy as np
import torch

from conftest import BUNDLE_ROOT
from scripts.common.large_files import read_large_files, recorded_sha256
from scripts.common.weights import file_sha256, load_checkpoint, verify_sha256
from scripts.data.phantom import make_phantom
from scripts.data.simulate import simulate_pet
from scripts.inference.denoise import BundleDenoiser, network_from_config
from scripts.metrics.image_quality import psnr, ssim3d
from scripts.networks.unipet import checkpoint_san_variant, match_checkpoint_san_variant

SHIPPED = BUNDLE_ROOT / "models" / "model.pt"


def test_shipped_weights_are_recorded_and_intact():
    assert SHIPPED.is_file(), "models/model.pt must ship (python -m scripts.benchmarks.train_models ship)"
    entry = read_large_files(BUNDLE_ROOT)["models/model.pt"]
    assert entry["hash_type"] == "sha256"
    assert entry["hash_val"] == file_sha256(SHIPPED), "large_files.yml must record the shipped file's SHA-256"
    assert recorded_sha256(SHIPPED, BUNDLE_ROOT) == entry["hash_val"]


def test_shipped_weights_beat_the_low_dose_input_on_a_fresh_drf20_scan():
    net, sizes = network_from_config(BUNDLE_ROOT / "configs" / "train.json", BUNDLE_ROOT)
    verify_sha256(SHIPPED, recorded_sha256(SHIPPED, BUNDLE_ROOT))
    state = load_checkpoint(SHIPPED)
    assert checkpoint_san_variant(state) == "v3"  # 0.4.0: the train.json SAN since 0.4
    net = match_checkpoint_san_variant(net, state)
    net.load_state_dict(state)  # strict: every key of the default network (with the shipped SAN variant)
    # a phantom and noise seed no training subject used (those come from SeedSequence(6))
    spacing = (4.0, 4.0, 4.0)
    ph = make_phantom((96, 96, 64), spacing, seed=20261125)
    sim = simulate_pet(ph.activity, spacing, drfs=[20], seed=77, mu_map=ph.mu)
    full, low = sim["full_dose"].astype(np.float32), next(iter(sim["drf"].values())).astype(np.float32)
    # the bundle's own inference (configs/inference.json) with this network, on the phantom's own grid
    den = BundleDenoiser(
        BUNDLE_ROOT,
        network=net.eval(),
        model_info={"checkpoint": str(SHIPPED), "trained": True},
        device="cpu",
        overrides={"resample": False, "progress": False},
    )(low, ph.affine)
    f, lo, de = (torch.from_numpy(v)[None, None] for v in (full, low, den))
    gain = float(psnr(de, f)[0] - psnr(lo, f)[0])
    assert gain > 1.0, f"PSNR gain of the shipped weights at DRF 20: {gain:.2f} dB"
    assert float(ssim3d(de, f)[0]) > float(ssim3d(lo, f)[0])
    # denoising keeps the activity: the mean body SUV moves by under 2 %
    body = full > 0.3
    assert abs(den[body].mean() / full[body].mean() - 1) < 0.02
