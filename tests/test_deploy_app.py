"""MONAI Deploy app (issue "Deployment and distribution"): PET series -> SUV -> the bundle's inference -> a
float-safe derived PET series whose SUV matches the bundle's own NIfTI output.

Everything but the SDK's DICOM loader/selector runs here without the SDK (`run_without_sdk`). The tests at
the end need the MONAI Deploy App SDK and are skipped without it; run them in the optional environment:

    /path/to/venv_deploy/bin/python -m pytest tests/test_deploy_app.py   (see unipet_bundle/docs/deployment.md)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pet_dicom_factory as factory
import pydicom
import pytest
from test_torchscript import make_bundle_copy

from conftest import run_python
from scripts.common.errors import UniPETInputError
from scripts.data.suv import read_pet_series
from scripts.deploy.deploy_app.pet_series import (
    DenoisedPET,
    find_pet_series,
    pet_volume_from_files,
    run_without_sdk,
    series_name,
    write_denoised,
)
from scripts.inference.denoise import BundleDenoiser, check_float_volume
from scripts.inference.dicom_writer import INT16_MAX, SeriesCheckError, verify_written_series

HAS_SDK = importlib.util.find_spec("monai.deploy") is not None and importlib.util.find_spec("holoscan") is not None
SDK_REASON = (
    "MONAI Deploy App SDK not installed here: run in the environment of requirements-deploy.txt (docs/deployment.md)"
)


def pet_suv(shape=(36, 32, 20), seed: int = 5) -> np.ndarray:
    """Smooth body of SUV 1-4 with a 25 SUV lesion and noise; slice 0 is empty (all zero), as end slices often are."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    body = gaussian_filter(rng.random(shape), 2.0)
    body = np.where(body > np.median(body), 1.0 + 6.0 * (body - np.median(body)) / np.ptp(body), 0.03)
    body = body + gaussian_filter(rng.normal(0.0, 0.3, shape), 0.8)
    body[18:21, 15:18, 9:11] = 25.0
    body[:, :, 0] = 0.0
    return body.astype(np.float32)


def write_study(folder: Path, suv: np.ndarray, spacing=(3.0, 3.0, 3.27)) -> np.ndarray:
    """A PET series (Bq/mL, per-slice slopes) plus a CT series and a stray text file; returns the exact SUV."""
    _, decoded, _ = factory.write_synthetic_series(folder / "pet", suv / factory.expected_factor(), spacing=spacing)
    factory.write_synthetic_series(folder / "ct", np.ones((6, 5, 4)), modality="CT")
    (folder / "notes.txt").write_text("not DICOM")
    return decoded * factory.expected_factor()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """The app flow (without the SDK's loader) and the bundle's inference.json on the same series."""
    from monai.bundle import ConfigWorkflow

    base = tmp_path_factory.mktemp("deploy")
    root = make_bundle_copy(base / "bundle")
    suv_exact = write_study(base / "in", pet_suv())
    out = base / "out"
    written = run_without_sdk(base / "in", out, root, device="cpu", write_nifti=True, overrides={"progress": False})
    ref = base / "ref"
    workflow = ConfigWorkflow(
        config_file=str(root / "configs" / "inference.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(root),
        dataset_dir=str(base / "in"),
        output_dir=str(ref),
        progress=False,
        device="cpu",
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return base, root, suv_exact, written, np.asarray(nib.load(str(ref / "pet_denoised.nii.gz")).dataobj)


def test_written_series_suv_matches_the_bundles_nifti(deployed):
    base, _, suv_exact, written, reference = deployed
    series_dir = written[0]
    assert series_dir.name.endswith("_denoised_dicom") and series_dir.name.startswith("PT3_")
    derived = read_pet_series(series_dir)
    source = read_pet_series(base / "in" / "pet")
    assert derived.suv.shape == reference.shape == suv_exact.shape
    np.testing.assert_allclose(derived.affine, source.affine, atol=1e-6)
    assert derived.suv_factor == source.suv_factor and derived.units == "BQML"
    # per slice: within half a quantisation step of the bundle's float output
    tol = np.abs(reference).max(axis=(0, 1)) / INT16_MAX * 0.5 * (1 + 1e-6) + 1e-5
    err = np.abs(derived.suv - reference).max(axis=(0, 1))
    assert np.all(err <= tol), f"worst slice error {err.max():.3g} SUV"
    # the float NIfTI the app writes is the bundle's output itself
    ours = np.asarray(nib.load(str(written[1])).dataobj)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert np.abs(reference - suv_exact).max() > 1e-2, "the perturbed network must change the image"
    assert derived.suv.max() > 20.0, "the 25 SUV lesion is not clipped"
    assert "UniPET" in derived.reference.SeriesDescription and "DERIVED" in list(derived.reference.ImageType)


def test_per_slice_slopes_survive_where_the_sdk_would_truncate(deployed):
    """Slice 0 is all zero (stored int16 with slope 1): the SDK's series-to-volume operator would store the
    whole volume as int16 and truncate every later slice's Bq/mL. Ours keeps each slice's own slope."""
    base, _, suv_exact, _, _ = deployed
    files = find_pet_series(base / "in")[0]
    volume = pet_volume_from_files(files)
    slopes = volume.rescale_slopes
    assert slopes[0] == 1.0 and np.unique(slopes[1:]).size > 5, "the test series must have per-slice slopes"
    bqml = volume.suv / volume.suv_factor
    assert np.any(np.abs(bqml[..., 1:] - np.trunc(bqml[..., 1:])) > 1e-3), "non-integer Bq/mL expected"
    np.testing.assert_allclose(volume.suv, suv_exact, rtol=1e-5, atol=1e-6)


def test_series_discovery_and_names(deployed, tmp_path):
    base = deployed[0]
    found = find_pet_series(base / "in")
    assert len(found) == 1 and len(found[0]) == 20, "one PT series of 20 slices; CT and text skipped"
    ds = pydicom.dcmread(found[0][0], stop_before_pixels=True)
    name = series_name(ds.SeriesInstanceUID, ds.SeriesNumber)
    assert name == series_name(ds.SeriesInstanceUID, ds.SeriesNumber) and name.startswith("PT3_") and len(name) == 12
    assert factory.PATIENT_ID not in name and "SECRET" not in name
    assert series_name("1.2.3", None).startswith("PTx_")
    with pytest.raises(UniPETInputError, match="no PET .* series found"):
        find_pet_series(base / "in" / "ct")
    with pytest.raises(UniPETInputError, match="does not exist"):
        find_pet_series(tmp_path / "missing")


def test_float_guards_refuse_integer_volumes():
    for bad in (np.ones((4, 4, 4), np.uint8), np.ones((4, 4, 4), np.int16)):
        with pytest.raises(UniPETInputError, match="not float: PET values were cast to integers"):
            check_float_volume(bad, "denoised volume")
    with pytest.raises(UniPETInputError, match="NaN/Inf"):
        check_float_volume(np.full((4, 4, 4), np.nan, np.float32), "x")
    with pytest.raises(UniPETInputError, match="3D"):
        check_float_volume(np.ones((4, 4), np.float32), "x")


def test_written_series_is_verified_and_an_integer_volume_is_never_written(deployed, tmp_path):
    base, root, _, written, reference = deployed
    files = find_pet_series(base / "in")[0]
    volume = pet_volume_from_files(files)
    item = DenoisedPET(volume, reference.astype(np.uint8), "0.0.0", {"trained": True})
    with pytest.raises(UniPETInputError, match="not float"):
        write_denoised(item, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # the read-back check notices a series whose values are not the float volume's
    with pytest.raises(SeriesCheckError, match="reads back"):
        verify_written_series(written[0], np.floor(reference), volume.suv_factor)
    assert verify_written_series(written[0], reference, volume.suv_factor) < 1e-3
    # outputs are never silently replaced
    item = DenoisedPET(volume, reference, "0.0.0", {"trained": True})
    with pytest.raises(UniPETInputError, match="already exists"):
        write_denoised(item, written[0].parent)


def test_denoiser_refuses_to_run_untrained(tmp_path):
    from scripts.common.errors import CheckpointError

    bare = make_bundle_copy(tmp_path, with_weights=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        BundleDenoiser(bare, device="cpu")


def test_denoiser_applies_the_configs_host_memory_setting_and_refuses_a_bad_one():
    from conftest import BUNDLE_ROOT

    # the config's setting, as inference.json's initialize applies it (here on top of the bundle's weights)
    assert BundleDenoiser(BUNDLE_ROOT, device="cpu").host_memory["cache_mb"] == 256
    with pytest.raises(UniPETInputError, match="host_memory_cache_mb must be a whole number"):
        BundleDenoiser(BUNDLE_ROOT, device="cpu", overrides={"host_memory_cache_mb": -1})
    # 0 in a process that already set it is reported as what still holds, not as the defaults
    off = BundleDenoiser(BUNDLE_ROOT, device="cpu", overrides={"host_memory_cache_mb": 0}).host_memory
    assert off["applied"] is True and off["cache_mb"] == 256 and "start a new process" in off["reason"]


def test_app_entry_point_without_sdk_says_how_to_install(tmp_path):
    if HAS_SDK:
        pytest.skip("the SDK is installed here; this checks the message shown without it")
    from conftest import BUNDLE_ROOT

    proc = run_python(
        "-m", "scripts.deploy.deploy_app", "-i", tmp_path, "-o", tmp_path / "o", "-m", BUNDLE_ROOT, timeout=120
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "requirements-deploy.txt" in lines[0] and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------- needs the SDK


@pytest.mark.skipif(not HAS_SDK, reason=SDK_REASON)
def test_sdk_series_to_volume_operator_truncates_per_slice_slopes(deployed):
    """Documents why the app does not use the SDK's DICOMSeriesToVolumeOperator for PET."""
    from monai.deploy.core import Application
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

    base, _, suv_exact, _, _ = deployed
    app = Application()
    studies = DICOMDataLoaderOperator(app, input_folder=base / "in" / "pet", name="loader").load_data_to_studies(
        base / "in" / "pet"
    )
    series = studies[0].get_all_series()[0]
    to_volume = DICOMSeriesToVolumeOperator(app, name="to_volume")
    to_volume.prepare_series(series)
    sdk = to_volume.generate_voxel_data(series)  # (Z, Y, X)
    exact_bqml = np.transpose(suv_exact / factory.expected_factor(), (2, 1, 0))
    assert not np.issubdtype(sdk.dtype, np.floating), (
        "SDK kept floats: the trap this app avoids is gone (update the docs)"
    )
    assert np.abs(sdk - exact_bqml).max() > 1e-3


@pytest.mark.skipif(not HAS_SDK, reason=SDK_REASON)
def test_sdk_app_end_to_end(deployed, tmp_path):
    """The real App SDK application (Holoscan scheduler, SDK loader + PT selector) on CPU."""
    base, root, _, _, reference = deployed
    out = tmp_path / "sdk_out"
    proc = run_python(
        "-m", "scripts.deploy.deploy_app", "-i", base / "in", "-o", out, "-m", root, cwd=root, UNIPET_DEVICE="cpu"
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    series_dirs = sorted(out.glob("*_denoised_dicom"))
    assert len(series_dirs) == 1, "one PET series in, one derived series out (the CT is not selected)"
    derived = read_pet_series(series_dirs[0])
    tol = np.abs(reference).max(axis=(0, 1)) / INT16_MAX * 0.5 * (1 + 1e-6) + 1e-5
    assert np.all(np.abs(derived.suv - reference).max(axis=(0, 1)) <= tol)
