"""Issue 14: a folder of many studies runs in the memory of one, and the native volume is not duplicated.

No timing here (speed and peak memory of a whole-body study are the inference benchmark's job); these
checks are structural: which volumes are still referenced when the next study is loaded, and whether the
resident memory after each study grows.
"""

from __future__ import annotations

import ctypes
import gc
import json
import weakref
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from scipy.ndimage import gaussian_filter

from conftest import BUNDLE_ROOT
from scripts.data.io import save_nifti
from scripts.data.phantom import phantom_affine
from scripts.inference.memory import collate_native_by_reference
from scripts.inference.residual import add_resampled
from scripts.networks.unipet import UniPET

CONFIG = BUNDLE_ROOT / "configs" / "inference.json"
TINY_KW = dict(channels=4, num_blocks=2, latent_dim=8, san_channels=[4, 4])


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    variant = json.loads(CONFIG.read_text()).get("san_variant")
    net = UniPET(**{**TINY_KW, "san_channels": (4, 4)}, **({"san_variant": variant} if variant in ("v1", "v2") else {}))
    with torch.no_grad():
        net.output_conv.weight.normal_(0.0, 0.05)
    torch.save(net.state_dict(), path)
    return path


def _trim_heap() -> None:
    """Return freed heap pages to the system (glibc), so resident memory is what is really in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measure as is
        pass


def _study(shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.random(shape, dtype=np.float32), 2.0)
    return (1.0 + 4.0 * (x - x.min()) / np.ptp(x) + rng.normal(0.0, 0.2, shape)).astype(np.float32)


def test_three_studies_one_after_another_do_not_accumulate(tmp_path):
    """Three 1.65 mm studies through inference.json with one workflow (model loaded once).

    When study k+1 is being loaded, nothing of study k may still be referenced (before the fix Ignite's
    ``state.output`` kept the denoised native volume until the next study was loaded, so two studies were
    in memory at every change), and the resident memory after the third study is not above the first's
    by anything like a study's size.
    """
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    # 8.5 M voxels, 34 MB as float32: above glibc's largest mmap threshold (32 MB), so a freed volume goes back
    # to the system and resident memory measures what is still held, not allocator caching
    shape = (250, 220, 155)
    volume_bytes = 4 * int(np.prod(shape))
    data = tmp_path / "in"
    for k in range(3):
        save_nifti(_study(shape, k), phantom_affine(shape, (1.65, 1.65, 1.65)), data / f"study{k}.nii")
    workflow = ConfigWorkflow(
        config_file=str(CONFIG),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT),
        progress=False,
        dataset_dir=str(data),
        output_dir=str(tmp_path / "out"),
        checkpoint=str(_checkpoint(tmp_path / "net.pt")),
        checkpoint_sha256=None,
        allow_untrained=False,
        patch_size=[16, 16, 16],
        target_spacing=[8.0, 8.0, 8.0],
        **TINY_KW,
    )
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    previous: list[weakref.ref] = []
    alive_at_next_load: list[bool] = []
    rss_after: list[int] = []

    def remember(engine) -> None:  # runs after every config handler
        outputs = engine.state.output if engine.state.output is not None else []
        previous[:] = []
        for out in outputs if isinstance(outputs, list) else [outputs]:
            previous.append(weakref.ref(out["pred"]))

    def after_study(engine) -> None:
        gc.collect()
        _trim_heap()
        rss_after.append(psutil.Process().memory_info().rss)

    def loaded(engine) -> None:
        gc.collect()
        alive_at_next_load.append(any(ref() is not None for ref in previous))

    # grab the output before the config's release handler drops it: run first at ITERATION_COMPLETED
    evaluator._event_handlers[Events.ITERATION_COMPLETED].insert(0, (remember, (evaluator,), {}))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, after_study)
    evaluator.add_event_handler(Events.GET_BATCH_STARTED, loaded)  # just before the next study is read
    workflow.run()
    workflow.finalize()

    assert sorted(p.name for p in (tmp_path / "out").glob("*_denoised.nii.gz")) == [
        f"study{k}_denoised.nii.gz" for k in range(3)
    ]
    assert len(rss_after) == 3 and len(alive_at_next_load) >= 3  # (a last GET_BATCH_STARTED may find no more data)
    assert not any(alive_at_next_load), "a study's denoised volume was still held while the next one loaded"
    growth = rss_after[2] - rss_after[0]
    assert growth < 0.5 * volume_bytes, (
        f"resident memory grew by {growth / 1e6:.1f} MB over two studies of {volume_bytes / 1e6:.1f} MB"
    )


def test_correction_is_added_in_place_through_a_flipped_view():
    """The native volume itself receives the correction (no native-size copy), through a strided view."""
    native = np.zeros((6, 5, 4), dtype=np.float32, order="F")
    view = native[::-1].transpose(2, 0, 1)  # (4, 6, 5), flipped and permuted: strides only
    source = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    # target voxel j -> source coordinate: axis 0 halves, axis 1 halves, axis 2 identity
    voxel_map = np.diag([1 / 3, 2 / 5, 1.0, 1.0])
    add_resampled(view, source, voxel_map)
    expected = torch.nn.functional.interpolate(
        source[None, None], size=(4, 6, 5), mode="trilinear", align_corners=True
    )[0, 0]
    np.testing.assert_allclose(view, expected.numpy(), rtol=1e-6, atol=1e-5)
    assert np.abs(native).max() > 0  # written into the native array itself
    with pytest.raises(RuntimeError, match="rotated"):
        rot = np.eye(4)
        rot[0, 1] = 0.3
        add_resampled(view, source, rot)


def test_collation_keeps_the_native_volume_by_reference():
    """batch_size 1: the native SUV gets its batch axis as a view (MONAI's default collation copies it)."""
    from monai.data import MetaTensor

    native = torch.from_numpy(np.zeros((1, 30, 20, 10), dtype=np.float32, order="F"))
    item = {"image": MetaTensor(torch.ones(1, 4, 4, 4)), "native_suv": native, "name": "a"}
    batch = collate_native_by_reference([item])
    assert batch["native_suv"].shape == (1, 1, 30, 20, 10)
    assert batch["native_suv"].data_ptr() == native.data_ptr() and batch["native_suv"].stride()[1:] == native.stride()
    assert batch["image"].shape == (1, 1, 4, 4, 4) and batch["name"] == ["a"]
    two = collate_native_by_reference([item, dict(item)])
    assert two["native_suv"].shape == (2, 1, 30, 20, 10)
