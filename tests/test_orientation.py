"""Issue 12 finding 5: the output must not depend on how a NIfTI or DICOM series stores its axes.

The same image stored in RAS order, in LPS order (DICOM's usual order) and sagittal-first with flipped axes
must give the same SUV output through ``configs/inference.json`` (to float rounding, after mapping each
output back from its input's own grid), and training/evaluation loading must produce one orientation:
``network_axcodes``, the one the shipped weights were trained in (the simulator's RAS arrays).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pet_dicom_factory as factory
import pytest
import torch
from scipy.ndimage import gaussian_filter

from conftest import BUNDLE_ROOT, run_inference_in_process
from scripts.common.errors import UniPETInputError
from scripts.data.io import save_nifti
from scripts.data.orientation import check_axcodes, from_network_view, to_network_view
from scripts.data.phantom import phantom_affine
from scripts.networks.unipet import UniPET

CONFIG = BUNDLE_ROOT / "configs" / "inference.json"
TINY_KW = dict(channels=4, num_blocks=2, latent_dim=8, san_channels=[4, 4])

# storage orders of one RAS image: nibabel ornt rows (axis of the stored array, flip) per RAS axis
STORAGES = {
    "RAS": [[0, 1], [1, 1], [2, 1]],
    "LPS": [[0, -1], [1, -1], [2, 1]],  # DICOM's usual order
    "sagittal_first_flipped": [[2, -1], [0, 1], [1, -1]],  # stored (P, I, R) ... permuted and mirrored
}


def _checkpoint(path: Path) -> Path:
    """A tiny UniPET that is far from the identity and not mirror-symmetric (random output conv and styles)."""
    torch.manual_seed(0)
    kw = {**TINY_KW, "san_channels": tuple(TINY_KW["san_channels"])}
    variant = json.loads(CONFIG.read_text()).get("san_variant")  # the SAN design inference.json builds
    net = UniPET(**kw, **({"san_variant": variant} if variant in ("v1", "v2") else {}))
    with torch.no_grad():
        net.output_conv.weight.normal_(0.0, 0.05)
        for block in net.blocks:
            block.style_affine.weight.normal_(0.0, 0.2)
    torch.save(net.state_dict(), path)
    return path


def _body(shape, seed: int = 0, hot: float | None = 30.0) -> np.ndarray:
    """Smooth but asymmetric SUV body with texture, a hot spot off-centre, some negative voxels."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.random(shape), 1.5)
    x = 1.0 + 6.0 * (x - x.min()) / np.ptp(x) + rng.normal(0.0, 0.3, shape)
    x[: shape[0] // 3] *= 0.3  # a cold side: mirroring must matter
    if hot is not None:
        x[shape[0] // 4 : shape[0] // 4 + 3, shape[1] // 2 : shape[1] // 2 + 2, shape[2] // 3 : shape[2] // 3 + 3] = hot
    x[0, 0, :2] = -0.3
    return x.astype(np.float32)


def _stored(vol_ras: np.ndarray, affine_ras: np.ndarray, storage: str) -> tuple[np.ndarray, np.ndarray]:
    """``vol_ras`` stored in another axis order: (array, its affine); the same voxels in the same places."""
    ornt = np.asarray(STORAGES[storage], dtype=float)
    # ornt[i] says where RAS axis i goes; apply_orientation wants, per stored axis, its RAS source
    arr = nib.orientations.apply_orientation(vol_ras, ornt)
    aff = affine_ras @ nib.orientations.inv_ornt_aff(ornt, vol_ras.shape)
    return np.ascontiguousarray(arr), aff


def _to_ras(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    view, _ = to_network_view(arr, affine, "RAS")
    return np.ascontiguousarray(view)


def _run(dataset_dir: Path, output_dir: Path, checkpoint: Path, **extra) -> None:
    run_inference_in_process(
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        checkpoint=str(checkpoint),
        checkpoint_sha256=None,
        allow_untrained=False,
        patch_size=[16, 16, 16],
        **TINY_KW,
        **extra,
    )


# ------------------------------------------------------------------------------------------- helpers


def test_storage_helpers_are_exact_views():
    vol = _body((7, 6, 5), hot=None)
    aff = phantom_affine(vol.shape, (2.0, 3.0, 4.0))
    for storage in STORAGES:
        arr, a = _stored(vol, aff, storage)
        view, back_aff = to_network_view(arr, a, "RAS")
        np.testing.assert_array_equal(view, vol)
        np.testing.assert_allclose(back_aff, aff, atol=1e-9)
        assert np.shares_memory(view, arr)
        back = from_network_view(view, a, "RAS")
        np.testing.assert_array_equal(back, arr)
        assert np.shares_memory(back, arr)
    assert nib.aff2axcodes(_stored(vol, aff, "sagittal_first_flipped")[1])[0] in ("A", "P")


def test_axcodes_option_is_checked():
    assert check_axcodes("ras") == "RAS" and check_axcodes(["L", "P", "S"]) == "LPS"
    for bad in ("RAX", "RRS", "RA", 3):
        with pytest.raises(UniPETInputError, match="network_axcodes"):
            check_axcodes(bad)


def test_every_config_names_the_orientation_the_weights_were_trained_in():
    """The simulator writes RAS arrays (diagonal positive affine): that is the network's orientation."""
    assert "".join(nib.aff2axcodes(phantom_affine((8, 8, 8), (4.0, 4.0, 4.0)))) == "RAS"
    for name in ("inference.json", "train.json"):
        config = json.loads((BUNDLE_ROOT / "configs" / name).read_text())
        assert config["network_axcodes"] == "RAS", name
    infer = json.loads(CONFIG.read_text())
    assert any(
        t.get("_target_") == "Orientationd" for t in infer["preprocessing"]["transforms"] if isinstance(t, dict)
    ) or "@orientation_transform" in json.dumps(infer["preprocessing"])


# ------------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize("resample", [True, False])
def test_nifti_output_does_not_depend_on_the_storage_order(tmp_path, resample):
    """Same image as RAS, LPS and sagittal-first-flipped NIfTI: the same denoised SUV, voxel for voxel.

    Before the fix the network saw a mirrored or transposed body and the outputs differed by far more
    than float rounding. Spacing 2.2 x 3.1 x 2.7 mm: no axis is a multiple of the 4 mm network grid, so the
    network grid must be built after reorientation for the outputs to agree.
    """
    vol = _body((26, 20, 23), seed=1)
    aff = phantom_affine(vol.shape, (2.2, 3.1, 2.7))
    aff[:3, 3] += (5.0, -7.0, 11.0)
    ckpt = _checkpoint(tmp_path / "net.pt")
    data = tmp_path / "in"
    for storage in STORAGES:
        arr, a = _stored(vol, aff, storage)
        save_nifti(arr, a, data / f"{storage}.nii.gz")
    _run(data, tmp_path / "out", ckpt, resample=resample)
    outputs = {}
    for storage in STORAGES:
        img = nib.load(str(tmp_path / "out" / f"{storage}_denoised.nii.gz"))
        arr, a = _stored(vol, aff, storage)
        np.testing.assert_allclose(img.affine, a, atol=1e-5)  # written on the input's own grid
        assert img.shape == arr.shape
        outputs[storage] = _to_ras(np.asarray(img.dataobj), img.affine)
    correction = np.abs(outputs["RAS"] - vol).max()
    assert correction > 0.05, "the test network must change the image"
    for storage in ("LPS", "sagittal_first_flipped"):
        diff = np.abs(outputs[storage] - outputs["RAS"]).max()
        assert diff < 1e-4, f"{storage}: output differs from the RAS-stored input's by {diff:.4g} SUV"


def test_dicom_output_does_not_depend_on_the_storage_order(tmp_path):
    """DICOM series of one image with LPS rows/columns (the usual), RAS rows/columns and sagittal slices.

    Each series stores int16 pixels with per-slice slopes, so the decoded inputs differ by the
    quantisation step; each series' output must therefore equal that of its own decoded volume stored as
    a RAS NIfTI (same run), to float rounding: the DICOM path reorients exactly like the NIfTI path.
    """
    vol = _body((22, 18, 20), seed=2, hot=None)
    aff = phantom_affine(vol.shape, (2.5, 3.0, 3.5))
    ckpt = _checkpoint(tmp_path / "net.pt")
    data = tmp_path / "in"
    factor = factory.expected_factor()
    for storage, ornt in (("LPS", STORAGES["LPS"]), ("RAS", STORAGES["RAS"]), ("sagittal", [[2, 1], [0, -1], [1, -1]])):
        ornt = np.asarray(ornt, dtype=float)
        arr = nib.orientations.apply_orientation(vol, ornt)
        a = aff @ nib.orientations.inv_ornt_aff(ornt, vol.shape)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ a
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        row, col, normal = (lps[:3, i] / spacing[i] for i in range(3))
        assert np.allclose(np.cross(row, col), normal), storage  # slices run along the DICOM normal
        _, dec, expected_affine = factory.write_synthetic_series(
            data / storage, arr / factor, spacing=spacing, orientation=(*row, *col), origin_lps=lps[:3, 3]
        )
        np.testing.assert_allclose(expected_affine, a, atol=1e-6)
        save_nifti(_to_ras((dec * factor).astype(np.float32), a), aff, data / f"{storage}_as_ras_nifti.nii.gz")
    _run(data, tmp_path / "out", ckpt)
    outputs = {}
    for name in ("LPS", "RAS", "sagittal", "LPS_as_ras_nifti", "RAS_as_ras_nifti", "sagittal_as_ras_nifti"):
        img = nib.load(str(tmp_path / "out" / f"{name}_denoised.nii.gz"))
        outputs[name] = _to_ras(np.asarray(img.dataobj), img.affine)
    assert np.abs(outputs["LPS"] - outputs["LPS_as_ras_nifti"]).max() < 1e-4
    assert np.abs(outputs["LPS"] - vol).max() > 0.05, "the test network must change the image"
    for storage in ("LPS", "RAS", "sagittal"):
        diff = np.abs(outputs[storage] - outputs[f"{storage}_as_ras_nifti"]).max()
        assert diff < 1e-4, f"{storage} series: output differs from its decoded volume's as RAS NIfTI by {diff:.4g} SUV"
    spread = max(np.abs(outputs[s] - outputs["LPS"]).max() for s in ("RAS", "sagittal"))
    assert spread < 0.02, (
        f"series of one image differ by {spread:.3g} SUV (more than their int16 quantisation explains)"
    )


# ------------------------------------------------------------------------------------ training, evaluation


def test_training_and_evaluation_loading_give_the_network_orientation(tmp_path):
    """train.json's preprocessing (also evaluate.json's, which reuses validate#preprocessing) reorients pairs."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    low, full = _body((12, 10, 9), seed=3, hot=None), _body((12, 10, 9), seed=4, hot=None)
    aff = phantom_affine(low.shape, (4.0, 4.0, 4.0))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    load = Compose(parser.get_parsed_content("preprocessing_transforms"))
    arrays = {}
    for storage in STORAGES:
        folder = tmp_path / storage
        for name, vol in (("low", low), ("full", full)):
            arr, a = _stored(vol, aff, storage)
            save_nifti(arr, a, folder / f"{name}.nii.gz")
        out = load({"image": str(folder / "low.nii.gz"), "label": str(folder / "full.nii.gz")})
        arrays[storage] = (np.asarray(out["image"])[0], np.asarray(out["label"])[0])
    np.testing.assert_allclose(arrays["RAS"][0] * 20.0, low, rtol=1e-5, atol=1e-5)  # RAS is already canonical
    for storage in STORAGES:
        for got, ref in zip(arrays[storage], arrays["RAS"]):
            np.testing.assert_array_equal(got, ref, err_msg=storage)


def test_evaluation_report_reads_label_maps_in_the_network_orientation(tmp_path):
    """evaluate.json's report scores regions from label maps and raw volumes read from disk: they must be
    reoriented like the evaluated arrays, or a non-RAS subject is scored on mismatched voxels."""
    from scripts.evaluation.report import _Subject

    full = _body((12, 10, 9), seed=5, hot=None)
    labels = np.zeros(full.shape, dtype=np.int16)
    labels[6:10, 1:8, 1:8] = 1
    labels[2:4, 3:5, 2:4] = 2
    full[2:4, 3:5, 2:4] = 12.0
    aff = phantom_affine(full.shape, (4.0, 4.0, 4.0))
    table = {
        "1": {"name": "liver", "kind": "organ", "true_suv": 2.0, "volume_ml": 1.0},
        "2": {"name": "lesion", "kind": "lesion", "true_suv": 12.0, "volume_ml": 0.5},
    }
    seen = {}
    for storage in STORAGES:
        folder = tmp_path / storage
        arr, a = _stored(full, aff, storage)
        lab, _ = _stored(labels, aff, storage)
        save_nifti(arr, a, folder / "full_dose.nii.gz")
        save_nifti(lab, a, folder / "labels.nii.gz", dtype=np.int16)
        (folder / "labels.json").write_text(json.dumps(table))
        subject = _Subject(storage, str(folder / "full_dose.nii.gz"), str(folder / "labels.nii.gz"), full, "RAS")
        np.testing.assert_array_equal(subject.labels, labels)
        np.testing.assert_array_equal(subject.full_raw, full)
        seen[storage] = (subject.position, subject.full_stats)
    assert all(v == seen["RAS"] for v in seen.values())


def test_in_memory_denoise_reorients_by_affine_like_the_bundle():
    """The demo's and the quality benchmark's in-memory inference (``BundleDenoiser`` with their network) sees the
    network orientation too."""
    import torch

    from scripts.inference.denoise import BundleDenoiser

    def denoise_volume(net, vol, affine, roi_size, sw_batch_size):
        overrides = {"patch_size": list(roi_size), "sw_batch_size": sw_batch_size, "resample": False, "progress": False}
        return BundleDenoiser(
            BUNDLE_ROOT, network=net, model_info={"trained": True}, device="cpu", overrides=overrides
        )(vol, affine)

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, 3, padding=1, padding_mode="replicate").eval()  # asymmetric kernel: order matters
    rng = np.random.default_rng(0)
    vol = rng.random((20, 18, 16)).astype(np.float32) * 5
    ras = np.diag([4.0, 4.0, 4.0, 1.0])
    # the same image stored L->R flipped and with the first two axes swapped (an LPS-like, transposed storage)
    stored = np.ascontiguousarray(np.transpose(vol[::-1], (1, 0, 2)))
    flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip_x[0, 3] = vol.shape[0] - 1  # voxel units: index x -> N-1-x
    swap = np.eye(4)[[1, 0, 2, 3]]
    affine_stored = ras @ flip_x @ swap
    kw = dict(roi_size=(16, 16, 16), sw_batch_size=2)
    ref = denoise_volume(net, vol, affine=ras, **kw)
    out = denoise_volume(net, stored, affine=affine_stored, **kw)
    back = np.transpose(out, (1, 0, 2))[::-1]
    np.testing.assert_allclose(back, ref, atol=1e-5)
    # an affine that calls the stored order RAS: the network sees the stored order, and the result differs
    raw = np.transpose(denoise_volume(net, stored, affine=ras, **kw), (1, 0, 2))[::-1]
    assert np.abs(raw - ref).max() > 1e-2


def test_a_sheared_nifti_is_refused_before_the_network(tmp_path):
    """A sheared grid cannot be reoriented/rescaled to the network grid: one clear error, nothing written."""
    from scripts.common.errors import UniPETInputError
    from scripts.data.io import save_nifti
    from scripts.inference.inputs import InferenceInput, load_volume

    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[0, 1] = 1.5  # x drifts with y: shear
    vol = np.full((12, 10, 8), 1.0, dtype=np.float32)
    path = save_nifti(vol, affine, tmp_path / "sheared.nii.gz")
    with pytest.raises(UniPETInputError, match="sheared"):
        load_volume(InferenceInput("sheared", path, "nifti"))
    oblique = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    oblique[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) * 4.0  # rotated, not sheared: accepted
    path = save_nifti(vol, oblique, tmp_path / "oblique.nii.gz")
    assert load_volume(InferenceInput("oblique", path, "nifti")).suv.shape == vol.shape
