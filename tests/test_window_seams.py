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
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_ROOT, run_inference_in_process
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
    for mode in ("replicate", "zeros"):
        out = root / mode
        _infer(data, out, padding_mode=mode, precision="fp32")
        outputs[mode] = np.asarray(nib.load(str(out / "flat_denoised.nii.gz")).dataobj, dtype=np.float64)
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


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="shipped 0.4.0 weights move a flat 2 SUV by +1.40 % (learned level bias; issue 15)",
)
def test_flat_volume_keeps_its_mean(flat_outputs):
    ratio = flat_outputs["replicate"].mean() / LEVEL
    assert abs(ratio - 1) < 0.005, f"flat {LEVEL} SUV came back {100 * (ratio - 1):+.2f} %"


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="shipped 0.4.0 weights change the real series' body total by "
    "-3.0 % (activity spread across the skin edge; issue 15)",
)
def test_real_series_keeps_the_body_total(tmp_path, real_pet_dir):
    from scripts.data.suv import read_pet_series

    data = tmp_path / "in"
    data.mkdir()
    (data / "sts001").symlink_to(real_pet_dir, target_is_directory=True)
    source = read_pet_series(real_pet_dir)
    _infer(data, tmp_path / "out", precision="fp32")
    y = np.asarray(nib.load(str(tmp_path / "out" / "sts001_denoised.nii.gz")).dataobj, dtype=np.float64)
    body = source.suv > 0.5
    ratio = y[body].sum() / source.suv[body].sum()
    assert abs(ratio - 1) < 0.01, f"body total changed by {100 * (ratio - 1):+.2f} %"
