"""Model-zoo package (issue "Deployment and distribution"): the zip, large_files.yml, the weight-free PR folder,
and the user's path end to end: `monai.bundle download --url file://<zip>`, then inference.json from the
downloaded copy on a simulated PET volume.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy.ndimage import gaussian_filter
from test_torchscript import make_bundle_copy

from conftest import run_python
from scripts.data.io import save_nifti
from scripts.data.phantom import make_phantom
from scripts.deploy.package import BUNDLE_NAME, PackageError, package_bundle
from scripts.networks.fused_pad import SOURCES


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundle_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_python("-m", "monai.bundle", *args, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    base = tmp_path_factory.mktemp("pkg")
    root = make_bundle_copy(base / "src")
    (root / "scripts" / "__pycache__").mkdir(exist_ok=True)
    (root / "scripts" / "__pycache__" / "junk.cpython-311.pyc").write_bytes(b"x")
    (root / "eval").mkdir()
    (root / "eval" / "old_output.nii.gz").write_bytes(b"x")
    (root / "models" / "checkpoint_latest.pt").write_bytes(b"optimiser state")
    result = package_bundle(root, base / "dist")
    return root, result


def test_zip_is_the_zoo_layout_with_weights(packaged):
    root, result = packaged
    version = json.loads((root / "configs" / "metadata.json").read_text())["version"]
    assert result.version == version and result.zip_path.name == f"{BUNDLE_NAME}_v{version}.zip"
    with zipfile.ZipFile(result.zip_path) as zf:
        names = set(zf.namelist())
        assert all(n.startswith(f"{BUNDLE_NAME}/") for n in names), "one top folder, unipet_bundle/"
        for required in (
            "configs/metadata.json",
            "configs/inference.json",
            "configs/train.json",
            "models/model.pt",
            "scripts/__init__.py",
            "scripts/networks/unipet.py",
            # the fused CPU kernels build from their sources on the user's machine
            *(f"scripts/networks/csrc/{source.name}" for source in SOURCES),
            "docs/README.md",
            "LICENSE",
            "large_files.yml",
        ):
            assert f"{BUNDLE_NAME}/{required}" in names, required
        assert not any("__pycache__" in n or n.endswith(".pyc") or "/eval/" in n for n in names)
        assert f"{BUNDLE_NAME}/models/checkpoint_latest.pt" not in names, "training state must not ship"
        assert hashlib.sha256(zf.read(f"{BUNDLE_NAME}/models/model.pt")).hexdigest() == sha256(
            root / "models" / "model.pt"
        )


def test_large_files_yml_and_weight_free_pr_folder(packaged):
    root, result = packaged
    entries = yaml.safe_load(result.large_files.read_text())["large_files"]
    assert [e["path"] for e in entries] == ["models/model.pt"]
    assert entries[0]["hash_type"] == "sha256" and entries[0]["hash_val"] == sha256(root / "models" / "model.pt")
    assert entries[0]["url"].startswith("file://")
    pr = result.zoo_pr_dir
    assert (pr / "configs" / "metadata.json").is_file() and (pr / "large_files.yml").is_file()
    assert not any(p.suffix in (".pt", ".ts") for p in pr.rglob("*")), "a zoo pull request carries no weights"


def test_download_large_files_fetches_and_checks_the_weights(packaged, tmp_path):
    """What the zoo does with large_files.yml: download into models/ and verify the SHA-256."""
    from monai.apps.utils import HashCheckError
    from monai.bundle import download_large_files

    root, result = packaged
    good = shutil.copytree(result.zoo_pr_dir, tmp_path / "good")
    download_large_files(bundle_path=str(good))
    assert sha256(good / "models" / "model.pt") == sha256(root / "models" / "model.pt")
    bad = shutil.copytree(result.zoo_pr_dir, tmp_path / "bad")
    text = (bad / "large_files.yml").read_text()
    (bad / "large_files.yml").write_text(text.replace(sha256(root / "models" / "model.pt"), "0" * 64))
    with pytest.raises(HashCheckError):
        download_large_files(bundle_path=str(bad))


def test_package_refuses_bad_input(packaged, tmp_path):
    root, result = packaged
    with pytest.raises(PackageError, match="already exists"):
        package_bundle(root, result.zip_path.parent)
    with pytest.raises(PackageError, match="inside the bundle"):
        package_bundle(root, root / "dist")
    bare = make_bundle_copy(tmp_path / "bare", with_weights=False)
    with pytest.raises(PackageError, match="model.pt not found: the zoo zip must carry trained weights"):
        package_bundle(bare, tmp_path / "out")
    meta = json.loads((bare / "configs" / "metadata.json").read_text())
    meta["version"] = "9.9.9"
    (bare / "configs" / "metadata.json").write_text(json.dumps(meta))
    (bare / "models" / "model.pt").write_bytes((root / "models" / "model.pt").read_bytes())
    with pytest.raises(PackageError, match="9.9.9 has no 'changelog' entry"):
        package_bundle(bare, tmp_path / "out")
    with pytest.raises(PackageError, match="model.ts not found"):
        package_bundle(root, tmp_path / "out2", require_torchscript=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.zip"))


def simulated_volume(shape=(40, 40, 24), spacing=(4.0, 4.0, 4.0), seed: int = 0) -> np.ndarray:
    """A procedural FDG phantom (simulated data) with correlated noise, as a low-dose scan looks."""
    activity = make_phantom(shape, spacing, seed=seed, n_lesions=(2, 3)).activity
    rng = np.random.default_rng(seed)
    noise = gaussian_filter(rng.normal(0.0, 1.0, shape), 1.0)
    return np.asarray(activity * (1.0 + 0.6 * noise), dtype=np.float32)


def test_download_from_zip_then_run_inference_json(packaged, tmp_path):
    """The model-zoo user's path: download the zip, run inference.json from the downloaded copy."""
    root, result = packaged
    dl = tmp_path / "downloads"
    proc = bundle_cli(
        [
            "download",
            "--name",
            BUNDLE_NAME,
            "--version",
            result.version,
            "--url",
            result.zip_path.as_uri(),
            "--bundle_dir",
            str(dl),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    copy = dl / BUNDLE_NAME
    assert (copy / "configs" / "inference.json").is_file()
    assert sha256(copy / "models" / "model.pt") == sha256(root / "models" / "model.pt")

    x = simulated_volume()
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = (-80.0, -80.0, -48.0)
    save_nifti(x, affine, tmp_path / "data" / "sim01.nii.gz")
    out = tmp_path / "out"
    proc = bundle_cli(
        [
            "run",
            "--config_file",
            "configs/inference.json",
            "--dataset_dir",
            str(tmp_path / "data"),
            "--output_dir",
            str(out),
            "--progress",
            "false",
        ],
        cwd=copy,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    img = nib.load(str(out / "sim01_denoised.nii.gz"))
    y = np.asarray(img.dataobj)
    assert y.shape == x.shape and img.get_data_dtype() == np.float32 and np.isfinite(y).all()
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert np.abs(y - x).max() > 1e-2, "the downloaded (perturbed) weights must act on the image"
    side = json.loads((out / "sim01_denoised.json").read_text())
    assert side["model"]["trained"] is True
    assert side["model"]["checkpoint_sha256"] == sha256(root / "models" / "model.pt")
    assert Path(side["model"]["checkpoint"]).resolve() == (copy / "models" / "model.pt").resolve()


def test_zip_carries_the_metadata_pins_as_requirements_txt(packaged):
    """Issue 16: the model card says `pip install -r requirements.txt`; the zip must carry it, with metadata's pins."""
    root, result = packaged
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    with zipfile.ZipFile(result.zip_path) as zf:
        text = zf.read(f"{BUNDLE_NAME}/requirements.txt").decode()
    pins = dict(line.split("==") for line in text.splitlines() if line and not line.startswith("#"))
    assert pins == {
        "torch": meta["pytorch_version"],
        "monai": meta["monai_version"],
        "numpy": meta["numpy_version"],
        **meta["required_packages_version"],
    }
    assert (result.zoo_pr_dir / "requirements.txt").read_text() == text
    card = (root / "docs" / "README.md").read_text()
    assert "pip install -r requirements.txt" in card


def test_every_third_party_import_of_the_scripts_is_pinned_in_metadata():
    """A package the shipped code imports but metadata.json does not pin would be missing after
    `pip install -r requirements.txt` (PyYAML was: scripts.common.large_files, imported by inference.json)."""
    import ast
    import importlib.metadata as md

    from conftest import BUNDLE_ROOT

    meta = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
    norm = lambda s: s.lower().replace("_", "-")  # noqa: E731
    pinned = {norm(p) for p in ("torch", "monai", "numpy", *meta["required_packages_version"])}
    exempt = {"monailabel"}  # the MONAI Label app runs inside a MONAI Label server install (docs/deployment.md)
    dists = md.packages_distributions()
    missing = {}
    for f in (BUNDLE_ROOT / "scripts").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module.split(".")[0]]
            else:
                continue
            for m in mods:
                if m in sys.stdlib_module_names or m in ("scripts", *exempt):
                    continue
                if not any(norm(d) in pinned for d in dists.get(m, [m])):
                    missing.setdefault(m, f.relative_to(BUNDLE_ROOT).as_posix())
    assert not missing, f"imported but not pinned in metadata.json required_packages_version: {missing}"
