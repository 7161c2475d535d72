"""Window seams and level bias through the bundle's inference config (issue 15).

0.2.0 turned a flat 2.0 SUV volume into a lattice (-3.5 % lines every window stride, -16 % at the volume's
faces, -1.2 % on average): every 3x3x3 conv zero-padded each window, so each window face looked like a
drop to zero activity. The root fix is ``padding_mode="replicate"`` in the network (config key
``padding_mode``, default in inference.json and train.json). What these tests found with the shipped
weights (0.2.0, trained with zero padding):

* the lattice is gone (the output of a flat volume is flat to the faces, to float rounding);
* the level is not: the 0.2.0 network mapped a flat 2 SUV to 1.98 SUV (-1.0 %) and lowered the real
  series' body total by ~3.6 % with either padding. The 0.4.0 retraining (tissue-centred and hot-spot
  patches, regional SUV loss) did not remove that: the shipped 0.4.0 model (the vanilla universal model) gives +1.40 %
  on the flat volume and -3.0 % on the real series' body total (other 0.4.0 models: -0.16 to +1.40 %
  and -3.0 to -3.6 %); the real-series loss is mostly activity spread across the skin edge out of the
  input-thresholded mask (inside the body hull eroded by 3 voxels: -0.5 % for UniPET). See the model card.
  That mask itself was the wrong measure: it selects voxels whose noise is positive, so even a count-keeping
  Gaussian filter loses ~2 % in it; the body total is now counted inside the body hull (below).

0.5.0 adds the level lock of the inference residual (``level_lock_fwhm_mm``, on by default): the network's
correction loses its low-pass part, so the flat volume keeps its level whatever the weights (the network's own
bias, +1.41 % for the 0.5.0 UniPET and +0.72 % for the 0.5.2 one, stays visible with the lock off: a strict xfail
below).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_ROOT, run_inference_in_process
from scripts.data.body import body_hull
from scripts.data.io import save_nifti

CONFIG = BUNDLE_ROOT / "configs" / "inference.json"
SHIPPED = BUNDLE_ROOT / "models" / "model.pt"
LEVEL = 2.0  # SUV


def _infer(data: Path, out: Path, **overrides) -> None:
    run_inference_in_process(dataset_dir=str(data), output_dir=str(out), **overrides)


@pytest.fixture(scope="module")
def flat_outputs(tmp_path_factory) -> dict[str, np.ndarray]:
    """A flat 2.0 SUV volume (80 x 72 x 56 at 4 mm: 3+ windows of 32 along each axis) through
    inference.json with the shipped weights, with the default padding and with the 0.2.0 zero padding."""
    assert SHIPPED.is_file(), "models/model.pt must ship"
    root = tmp_path_factory.mktemp("flat")
    data = root / "in"
    save_nifti(np.full((80, 72, 56), LEVEL, np.float32), np.diag([4.0, 4.0, 4.0, 1.0]), data / "flat.nii.gz")
    outputs = {}
    for name, overrides in (
        ("replicate", {}),
        ("zeros", {"padding_mode": "zeros"}),
        ("unlocked", {"level_lock_fwhm_mm": 0.0}),
    ):
        out = root / name
        _infer(data, out, precision="fp32", **overrides)
        outputs[name] = np.asarray(nib.load(str(out / "flat_denoised.nii.gz")).dataobj, dtype=np.float64)
    return outputs


def _lattice(y: np.ndarray, face: int = 4) -> tuple[float, float]:
    """Largest deviation from the volume's median inside (``face`` voxels in from every face) and at the faces."""
    rel = y / np.median(y) - 1.0
    inner = np.abs(rel[face:-face, face:-face, face:-face]).max()
    return float(inner), float(np.abs(rel).max())


def test_default_config_uses_replicate_padding():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    net = parser.get_parsed_content("network_def")
    assert net.padding_mode == "replicate"
    train = ConfigParser()
    train.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    assert train["padding_mode"] == "replicate", "training must use the padding inference uses"


def test_flat_volume_has_no_window_lattice(flat_outputs):
    inner, faces = _lattice(flat_outputs["replicate"])
    assert inner < 0.01 and faces < 0.03, f"lattice {100 * inner:.2f} % inside, {100 * faces:.2f} % at the faces"
    # the 0.2.0 zero padding fails the same check (what this test guards against)
    inner0, faces0 = _lattice(flat_outputs["zeros"])
    assert inner0 > 0.01 and faces0 > 0.03, (inner0, faces0)
    inner_u, faces_u = _lattice(flat_outputs["unlocked"])  # the lattice is padding's, not hidden by the lock
    assert inner_u < 0.01 and faces_u < 0.03, (inner_u, faces_u)


def test_flat_volume_keeps_its_mean(flat_outputs):
    """With the default config, i.e. the level lock on: this tests the lock; the network's own level is the
    strict xfail below."""
    ratio = flat_outputs["replicate"].mean() / LEVEL
    assert abs(ratio - 1) < 0.005, f"flat {LEVEL} SUV came back {100 * (ratio - 1):+.2f} %"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="with the level lock off, the shipped 0.5.2 weights move a flat 2 SUV by +0.72 % (0.5.0: +1.41 %; "
    "learned level bias, from stage 1; issue 15)",
)
def test_flat_volume_keeps_its_mean_without_the_lock(flat_outputs):
    ratio = flat_outputs["unlocked"].mean() / LEVEL
    assert abs(ratio - 1) < 0.005, f"flat {LEVEL} SUV came back {100 * (ratio - 1):+.2f} %"


def test_body_hull_counts_what_a_count_preserving_filter_keeps(real_pet_dir):
    """Why the body-total test counts inside the body hull: a Gaussian filter that keeps every count (mirrored
    faces) keeps the hull total, while the input-thresholded mask loses about 2 % with it."""
    from scipy import ndimage

    from scripts.data.suv import read_pet_series

    series = read_pet_series(real_pet_dir)
    suv = series.suv.astype(np.float64)
    smooth = ndimage.gaussian_filter(suv, 1.0, mode="reflect")
    assert abs(smooth.sum() / suv.sum() - 1) < 1e-6
    hull, thresholded = body_hull(suv > 0.5, series.affine), suv > 0.5
    assert abs(smooth[hull].sum() / suv[hull].sum() - 1) < 0.005
    assert smooth[thresholded].sum() / suv[thresholded].sum() - 1 < -0.01


@pytest.mark.slow
def test_real_series_keeps_the_body_total(real_pet_dir, real_series_default_output):
    """Body total within 1 % inside the body hull and over the whole volume, with inference.json's defaults (the
    shipped weights, fp32). The whole-volume total is what the level lock keeps: without it the 0.5.0 network
    changes it by -5.2 % (the air outside the body loses its positive noise floor), while the hull total moves
    by +0.3 %."""
    from scripts.data.suv import read_pet_series

    series = read_pet_series(real_pet_dir)
    source = series.suv.astype(np.float64)
    y = np.asarray(nib.load(str(real_series_default_output / "sts001_denoised.nii.gz")).dataobj, dtype=np.float64)
    hull = body_hull(source > 0.5, series.affine)
    ratio = y[hull].sum() / source[hull].sum()
    assert abs(ratio - 1) < 0.01, f"body total (hull) changed by {100 * (ratio - 1):+.2f} %"
    whole = y.sum() / source.sum()
    assert abs(whole - 1) < 0.01, f"whole-volume total changed by {100 * (whole - 1):+.2f} %"
