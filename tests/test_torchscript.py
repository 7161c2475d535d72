"""TorchScript export (issue "Deployment and distribution"): MONAI's ckpt_export on our network, model.ts vs eager.

No trained weights exist yet, so every test works on a temporary copy of the bundle whose models/model.pt
is a freshly initialised UniPET of the size in configs/inference.json, perturbed so that it is not the
identity (random output conv and style layers). models/ of the real bundle is never written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLE_ROOT, run_python
from scripts.deploy.export import ExportError, compare_with_eager, eager_network, export_torchscript, verify_export
from scripts.inference.denoise import BundleDenoiser
from scripts.networks.unipet import UniPET

EXPORT_CMD = [
    "ckpt_export",
    "network_def",
    "--filepath",
    "models/model.ts",
    "--ckpt_file",
    "models/model.pt",
    "--meta_file",
    "configs/metadata.json",
    "--config_file",
    "configs/inference.json",
]


def default_network_kwargs(bundle_root: Path = BUNDLE_ROOT) -> dict:
    """The network size of the bundle's inference.json (the size a shipped model.pt has)."""
    cfg = json.loads((bundle_root / "configs" / "inference.json").read_text())
    return {k: cfg[k] for k in ("channels", "num_blocks", "latent_dim", "san_channels")}


def perturbed_unipet(seed: int = 0) -> UniPET:
    """A default-size UniPET that is NOT the identity: random output conv and style layers."""
    torch.manual_seed(seed)
    net = UniPET(**default_network_kwargs())
    with torch.no_grad():
        net.output_conv.weight.normal_(0.0, 0.05)
        net.output_conv.bias.fill_(0.002)
        for block in net.blocks:
            block.style_affine.weight.normal_(0.0, 0.2)
    return net.eval()


def make_bundle_copy(dest: Path, with_weights: bool = True, seed: int = 0) -> Path:
    """Copy configs, scripts, docs and LICENSE of the bundle to ``dest/unipet_bundle``; add a perturbed model.pt."""
    root = dest / "unipet_bundle"
    root.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("configs", "scripts", "docs"):
        shutil.copytree(BUNDLE_ROOT / name, root / name, ignore=ignore)
    shutil.copyfile(BUNDLE_ROOT / "LICENSE", root / "LICENSE")
    (root / "models").mkdir()
    if with_weights:
        torch.save(perturbed_unipet(seed).state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A bundle copy with model.pt and the model.ts made by the model zoo's own command."""
    root = make_bundle_copy(tmp_path_factory.mktemp("ts"))
    proc = run_python("-m", "monai.bundle", *EXPORT_CMD, cwd=root)
    return root, proc


def test_ckpt_export_command_scripts_unipet(exported):
    root, proc = exported
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ts = root / "models" / "model.ts"
    assert ts.is_file() and ts.stat().st_size > 100_000
    model = torch.jit.load(str(ts))
    assert isinstance(model, torch.jit.ScriptModule)
    assert hasattr(model, "forward_with_features"), "the exported method for L_align must survive scripting"


def test_model_ts_matches_eager_network_and_verify_net_in_out(exported):
    root, proc = exported
    assert proc.returncode == 0
    report = verify_export(
        root, "models/model.ts", "models/model.pt", window=(32, 32, 32), tolerance=1e-4, check_io=True
    )
    print(f"\nTorchScript vs eager, random 32^3 window: max abs difference = {report['max_abs_diff']:.3g}")
    assert report["max_abs_diff"] < 1e-4
    assert report["verify_net_in_out"] == "passed"
    assert {"metadata.json", "inference.json"} <= set(report["embedded_configs"])
    # the comparison is not vacuous: the perturbed network changes its input
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (torch.jit.load(str(root / "models" / "model.ts"))(x) - x).abs().max() > 1e-3


def test_comparison_detects_a_different_network(exported):
    root, _ = exported
    eager = eager_network(root, "models/model.pt")
    with torch.no_grad():
        eager.blocks[0].conv1.weight.add_(0.05)
    assert compare_with_eager(root / "models" / "model.ts", eager) > 1e-3


def test_bundle_inference_with_model_ts_equals_model_pt(exported):
    """Deploy packages may ship only model.ts: the bundle's inference gives the same SUV with either."""
    root, _ = exported
    rng = np.random.default_rng(0)
    suv = np.clip(rng.normal(2.0, 0.5, (28, 24, 20)), 0, None).astype(np.float32)
    suv[14, 12, 10] = 45.0
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    eager = BundleDenoiser(root, device="cpu", overrides={"progress": False})(suv, affine)
    scripted = BundleDenoiser(
        root, model_file=root / "models" / "model.ts", device="cpu", overrides={"progress": False}
    )
    assert scripted.model_info["format"] == "torchscript" and scripted.trained
    out = scripted(suv, affine)
    assert out.dtype == np.float32 and out.shape == suv.shape
    np.testing.assert_allclose(out, eager, atol=2e-3)  # 1e-4 in network units is 2e-3 SUV
    assert np.abs(out - suv).max() > 1e-2, "the perturbed network must change the image"


def test_export_tool_refuses_bad_input(tmp_path, exported):
    root, _ = exported
    with pytest.raises(ExportError, match="already exists: pass --overwrite true"):
        export_torchscript(root, filepath="models/model.ts")
    bare = make_bundle_copy(tmp_path / "bare", with_weights=False)
    with pytest.raises(ExportError, match="checkpoint .*model.pt not found"):
        export_torchscript(bare)
    with pytest.raises(ExportError, match="must end in .ts"):
        export_torchscript(root, filepath="models/model.pt2", overwrite=True)
    # a plain torch.jit.save has no embedded bundle metadata: refused, so only ckpt_export output ships
    torch.jit.save(torch.jit.script(perturbed_unipet()), str(tmp_path / "plain.ts"))
    with pytest.raises(ExportError, match="carries no bundle metadata"):
        verify_export(root, tmp_path / "plain.ts", "models/model.pt", check_io=False)
