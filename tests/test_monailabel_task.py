"""MONAI Label infer task (issue "Deployment and distribution"): the denoised PET volume served from the bundle.

The task's work (`UniPETLabelCore`) needs no MONAI Label and is tested here against the bundle's own
inference.json output. The tests that build the real MONAI Label task class need `monailabel` and are
skipped without it; run them in the optional environment (docs/deployment.md, requirements-label.txt):

    /path/to/venv_label/bin/python -m pytest tests/test_monailabel_task.py
"""

from __future__ import annotations

import importlib.util
import sys

import nibabel as nib
import numpy as np
import pet_dicom_factory as factory
import pydicom
import pytest
from test_torchscript import make_bundle_copy

from scripts.common.errors import UniPETInputError
from scripts.data.io import save_nifti
from scripts.deploy.monailabel_task import TASK_NAME, UniPETLabelCore

HAS_LABEL = importlib.util.find_spec("monailabel") is not None
LABEL_REASON = "MONAI Label not installed here: run in the environment of requirements-label.txt (docs/deployment.md)"


def volume(shape=(30, 26, 18), seed: int = 2) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x = 1.0 + 4.0 * gaussian_filter(rng.random(shape), 2.0) + rng.normal(0.0, 0.3, shape)
    x[shape[0] // 2, shape[1] // 2, shape[2] // 2] = 38.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A bundle copy (perturbed weights), an SUV NIfTI, and inference.json's own output for it."""
    from monai.bundle import ConfigWorkflow

    base = tmp_path_factory.mktemp("label")
    root = make_bundle_copy(base / "bundle")
    affine = np.diag([-3.0, 3.5, 3.27, 1.0])
    affine[:3, 3] = (40.0, -30.0, 10.0)
    image = save_nifti(volume(), affine, base / "studies" / "pet01.nii.gz")
    workflow = ConfigWorkflow(
        config_file=str(root / "configs" / "inference.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(root),
        dataset_dir=str(base / "studies"),
        output_dir=str(base / "ref"),
        progress=False,
        device="cpu",
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    reference = nib.load(str(base / "ref" / "pet01_denoised.nii.gz"))
    core = UniPETLabelCore(root, overrides={"progress": False})
    return base, root, image, core, reference


def test_core_serves_the_bundles_float_output(served):
    _, _, image, core, reference = served
    out, result = core.infer(image, device="cpu")
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.float32, "a denoised PET volume, not a uint8 label map"
    np.testing.assert_allclose(np.asarray(img.dataobj), np.asarray(reference.dataobj), atol=1e-5)
    np.testing.assert_allclose(img.affine, reference.affine, atol=1e-5)
    assert result["units"].startswith("SUV") and result["model"]["trained"] is True
    assert result["suv_max_output"] > 30.0, "the 38 SUV hot spot is kept"
    assert (
        abs(result["suv_max_output"] - result["suv_max_input"]) < 20
        and result["suv_mean_output"] != result["suv_mean_input"]
    )


def test_core_accepts_bqml_with_suv_factor(served, tmp_path):
    base, _, image, core, reference = served
    suv = np.asarray(nib.load(str(image)).dataobj)
    factor = 2.5e-4
    bqml = save_nifti(suv / factor, nib.load(str(image)).affine, tmp_path / "pet01_bqml.nii.gz")
    out, result = core.infer(bqml, device="cpu", suv_factor=str(factor))
    back = np.asarray(nib.load(str(out)).dataobj) * factor
    np.testing.assert_allclose(back, np.asarray(reference.dataobj), rtol=1e-4, atol=1e-4)
    assert "SUV = 0.00025 x value" in result["units"]
    # a factor that does not make SUV (here 1000x too large) is refused after the conversion, like any NIfTI
    with pytest.raises(UniPETInputError, match="suv_factor"):
        core.infer(bqml, device="cpu", suv_factor=str(factor * 1000))


@pytest.mark.skipif(
    int(pydicom.__version__.split(".")[0]) < 3, reason="the test DICOM factory needs pydicom 3 (the main pin)"
)
def test_core_accepts_a_pet_dicom_folder(served, tmp_path):
    core = served[3]
    factory.write_synthetic_series(
        tmp_path / "series", volume((20, 18, 12)) / factory.expected_factor(), spacing=(4.0, 4.0, 4.0)
    )
    out, result = core.infer(tmp_path / "series", device="cpu")
    assert nib.load(str(out)).shape == (20, 18, 12) and result["units"].startswith("SUV")


def test_core_refuses_bad_requests(served, tmp_path):
    _, root, image, core, _ = served
    with pytest.raises(UniPETInputError, match="suv_factor must be a number"):
        core.infer(image, suv_factor="abc")
    with pytest.raises(UniPETInputError, match="suv_factor must be > 0"):
        core.infer(image, suv_factor=-1)
    with pytest.raises(UniPETInputError, match="no such NIfTI file"):
        core.infer(tmp_path / "missing.nii.gz")
    with pytest.raises(UniPETInputError, match="not the unipet_bundle folder"):
        UniPETLabelCore(tmp_path)


def test_module_does_not_import_monailabel():
    """The task module must import in the main environment, where MONAI Label is not installed."""
    assert "monailabel" not in sys.modules or HAS_LABEL
    if not HAS_LABEL:
        from scripts.deploy.monailabel_task import task_class

        with pytest.raises(ImportError):
            task_class()


@pytest.mark.skipif(not HAS_LABEL, reason=LABEL_REASON)
def test_monailabel_task_serves_the_denoised_volume(served):
    from scripts.deploy.monailabel_task import create_task

    _, root, image, _, reference = served
    task = create_task(root, overrides={"progress": False})
    assert task.is_valid()
    info = task.info()
    assert info["type"] == "others" and info["dimension"] == 3 and "float32" in info["output"]
    out, result = task({"image": str(image), "device": "cuda"})  # no GPU here: falls back to the CPU
    img = nib.load(out)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asarray(img.dataobj), np.asarray(reference.dataobj), atol=1e-5)
    assert result["model"]["name"] == "UniPET"


@pytest.mark.skipif(not HAS_LABEL, reason=LABEL_REASON)
def test_monailabel_app_registers_the_task(served, tmp_path):
    """The MONAI Label app of scripts/deploy/label_app (needs the full MONAI Label server dependencies)."""
    pytest.importorskip(
        "monailabel.interfaces.app",
        reason="MONAI Label server dependencies missing: use the server environment of docs/deployment.md",
    )
    import importlib.util as iu

    base, root, image, _, _ = served
    spec = iu.spec_from_file_location("unipet_label_main", root / "scripts" / "deploy" / "label_app" / "main.py")
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    studies = tmp_path / "studies"
    studies.mkdir()
    save_nifti(volume((16, 16, 8)), np.eye(4), studies / "a.nii.gz")
    app = module.UniPETLabelApp(
        str(root / "scripts" / "deploy" / "label_app"), str(studies), {"bundle_path": str(root)}
    )
    info = app.info()
    assert TASK_NAME in info["models"] and info["models"][TASK_NAME]["type"] == "others"
