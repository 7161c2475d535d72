"""Issue 14, the cheap paths around the network: the first input is read once, and the QC report's whole-volume
passes are cheap yet give exactly the numbers and panels of the straightforward computation.

- ``prepare_datalist`` keeps the volume it loaded to check the first input and ``LoadPETd`` takes it (one read
  instead of two), never twice, never for a changed file; a failed check keeps nothing.
- ``find_hotspots`` filters only around voxels above the threshold: the same foci as the whole-volume
  ``maximum_filter`` search, whatever the storage order (C, Fortran, flipped views).
- The reference cube's block means, the body mask's packing and the coronal slice panel read a Fortran-ordered
  (NIfTI) array in its memory order: the same numbers as a C-ordered copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from scripts.data.io import save_nifti
from scripts.evaluation.display import panel, to_ras
from scripts.inference import inputs as inputs_mod
from scripts.inference import qc as qcmod
from scripts.inference.inputs import LoadPETd, prepare_datalist
from scripts.inference.qc import analyse_input, compare_output, find_hotspots


def _volume(shape=(12, 10, 9), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1.0 + rng.random(shape)).astype(np.float32)


def _count_reads(monkeypatch) -> dict[str, int]:
    reads: dict[str, int] = {}
    real = inputs_mod.load_nifti

    def counting(path, *args, **kwargs):
        reads[Path(path).name] = reads.get(Path(path).name, 0) + 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(inputs_mod, "load_nifti", counting)
    return reads


def test_the_first_input_is_read_once_the_others_twice(tmp_path, monkeypatch):
    data = tmp_path / "in"
    a, b = _volume(seed=1), _volume(seed=2)
    save_nifti(a, np.diag([2.0, 2.0, 2.0, 1.0]), data / "a.nii.gz")
    save_nifti(b, np.diag([2.0, 2.0, 2.0, 1.0]), data / "b.nii.gz")
    reads = _count_reads(monkeypatch)
    items = prepare_datalist(data, tmp_path / "out", "nifti", False)
    assert reads == {"a.nii.gz": 1, "b.nii.gz": 1}
    loaded = [LoadPETd()(item) for item in items]
    assert reads == {"a.nii.gz": 1, "b.nii.gz": 2}, "the first input must be taken from its check, not read again"
    for d, ref in zip(loaded, (a, b)):
        np.testing.assert_array_equal(d["image"].numpy()[0], ref)
    # handed out once: the residual step writes into it, so a second load must read the file again
    loaded[0]["image"].as_tensor().add_(1.0)
    again = LoadPETd()(items[0])
    assert reads["a.nii.gz"] == 2
    np.testing.assert_array_equal(again["image"].numpy()[0], a)


def test_a_changed_first_input_is_read_again(tmp_path, monkeypatch):
    data = tmp_path / "in"
    save_nifti(_volume(seed=1), np.diag([2.0, 2.0, 2.0, 1.0]), data / "a.nii.gz")
    reads = _count_reads(monkeypatch)
    items = prepare_datalist(data, tmp_path / "out", "nifti", False)
    newer = _volume(seed=3)
    save_nifti(newer, np.diag([2.0, 2.0, 2.0, 1.0]), data / "a.nii.gz", overwrite=True)
    st = (data / "a.nii.gz").stat()
    os.utime(data / "a.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse clock must not hide it
    d = LoadPETd()(items[0])
    assert reads["a.nii.gz"] == 2
    np.testing.assert_array_equal(d["image"].numpy()[0], newer)


def test_a_failed_check_keeps_no_volume(tmp_path):
    data = tmp_path / "in"
    save_nifti(_volume(seed=1), np.diag([2.0, 2.0, 2.0, 1.0]), data / "a.nii.gz")
    bad = _volume(seed=2)
    bad[0, 0, 0] = np.nan
    save_nifti(bad, np.diag([2.0, 2.0, 2.0, 1.0]), data / "b.nii.gz")
    with pytest.raises(ValueError, match="b.nii.gz"):
        prepare_datalist(data, tmp_path / "out", "nifti", False)
    assert inputs_mod._checked._entry is None


def _whole_volume_hotspots(suv, spacing, count, min_suv, separation_mm, affine=None):
    """The straightforward search: one maximum filter over the whole volume (the definition)."""
    size = [max(3, 2 * int(round(separation_mm / 2.0 / s)) + 1) for s in spacing]
    local = ndimage.maximum_filter(np.asarray(suv, dtype=np.float32), size=size, mode="nearest")
    cand = np.argwhere((suv >= min_suv) & (suv >= local))
    if cand.size == 0:
        return []
    world = (
        (np.c_[cand, np.ones(len(cand))] @ np.asarray(affine, dtype=np.float64).T)[:, :3]
        if affine is not None
        else cand
    )
    world = np.round(world, 3)
    order = np.lexsort((world[:, 2], world[:, 1], world[:, 0], -suv[tuple(cand.T)]))
    picked = []
    for i in order:
        p = cand[i]
        if all(np.linalg.norm((p - q) * spacing) >= separation_mm for q in picked):
            picked.append(p)
            if len(picked) == count:
                break
    return [tuple(int(v) for v in p) for p in picked]


@pytest.mark.parametrize("layout", ["C", "F", "flipped"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hotspots_found_around_hot_voxels_equal_the_whole_volume_search(layout, seed, monkeypatch):
    rng = np.random.default_rng(seed)
    shape = (41, 37, 50)
    suv = rng.gamma(2.0, 0.6, shape).astype(np.float32)  # a few scattered voxels above the threshold
    for _ in range(12):  # hot clusters, some touching the faces and each other
        c = [int(rng.integers(0, n)) for n in shape]
        r = int(rng.integers(1, 4))
        suv[tuple(slice(max(0, x - r), x + r + 1) for x in c)] += float(rng.uniform(3.0, 9.0))
    suv[0, 0, 0] = suv[-1, -1, -1] = 20.0  # corners: the "nearest" faces
    spacing = np.array([2.0, 2.5, 1.65])
    affine = np.diag([*spacing, 1.0])
    if layout == "F":
        suv = np.asfortranarray(suv)
    elif layout == "flipped":
        suv = suv[::-1, :, ::-1]
    expected = _whole_volume_hotspots(suv, spacing, 60, 4.0, 9.0, affine)
    assert len(expected) >= 15, "the volume must hold many foci for the comparison to mean something"
    assert find_hotspots(suv, spacing, 60, 4.0, 9.0, affine) == expected
    monkeypatch.setattr(qcmod, "_SLAB_VOXELS", 37 * 50 * 2)  # slabs thinner than the halo
    assert find_hotspots(suv, spacing, 60, 4.0, 9.0, affine) == expected
    assert find_hotspots(suv, spacing, 5, 50.0, 9.0, affine) == []


@pytest.mark.parametrize("layout", ["C", "F", "flipped"])
def test_block_means_equal_the_plain_reshape(layout):
    x = _volume((24, 18, 30), seed=4)
    x = {"C": x, "F": np.asfortranarray(x), "flipped": x[::-1, ::-1]}[layout]
    block = (4, 3, 5)
    plain = np.ascontiguousarray(x, dtype=np.float64).reshape(6, 4, 6, 3, 6, 5).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(qcmod._block_means(x, block), plain, rtol=1e-6)


def test_a_fortran_ordered_study_gives_the_numbers_and_panels_of_a_c_ordered_copy():
    rng = np.random.default_rng(7)
    suv = np.full((40, 36, 44), 0.05, np.float32)
    suv[4:-4, 4:-4, 2:-2] = 1.0 + 0.1 * rng.standard_normal((32, 28, 40)).astype(np.float32)
    suv[26:36, 8:20, 10:22] = 2.0
    suv[9:12, 20:23, 14:17] = 12.0
    suv[15, 26, 30] = 8.0
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    out = suv * np.float32(0.97) + np.float32(0.01)
    runs = []
    for order in ("C", "F"):
        s, o = np.asarray(suv, order=order), np.asarray(out, order=order)
        before = analyse_input(s, affine)
        runs.append((before, compare_output(before, o)))
    (b_c, r_c), (b_f, r_f) = runs
    assert b_f["body_order"] == "F" and b_c["body_order"] == "C"
    assert r_c["numbers"] == r_f["numbers"]
    assert r_c["numbers"]["hotspots"] and "reference_region" in r_c["numbers"]
    for key in ("mip", "slice"):
        for a, b in ((b_c, b_f), (r_c, r_f)):
            np.testing.assert_array_equal(a["panels"][key].image, b["panels"][key].image)
    # the coronal slice panel is the stored values of that plane
    ras, spacing, _ = to_ras(np.asfortranarray(out), affine)
    np.testing.assert_array_equal(panel(ras, spacing, "coronal", index=5).image, out[:, 5, :].T[::-1, ::-1])


# ---------------------------------------------------------------- the network stage: channels-last layout


def _perturbed_unipet():
    import torch

    from scripts.benchmarks.inference_speed import perturb_network
    from scripts.networks.unipet import UniPET

    torch.manual_seed(0)
    return perturb_network(
        UniPET(channels=8, num_blocks=2, latent_dim=8, san_channels=[8, 8], padding_mode="replicate"), 0
    ).eval()


def test_channels_last_network_gives_the_default_layouts_output_within_float_rounding():
    import torch

    from scripts.engines.precision import PrecisionNetwork

    net = _perturbed_unipet()
    x = torch.rand(2, 1, 20, 18, 16) * 0.5
    with torch.no_grad():
        ref = PrecisionNetwork(net, "fp32").eval()(x)
        cl = PrecisionNetwork(net, "fp32", memory_format="channels_last_3d").eval()
        assert net.output_conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        feat = net.input_conv(x)  # the activations follow the weights' layout: no conversion per convolution
        assert feat.is_contiguous(memory_format=torch.channels_last_3d) and not feat.is_contiguous()
        out = cl(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert float((ref - x).abs().max()) > 1e-3, "the network must not be the identity for this comparison"


def test_memory_format_is_a_checked_inference_config_key():
    from monai.bundle import ConfigParser

    from scripts.common.errors import UniPETInputError
    from scripts.engines.precision import PrecisionNetwork

    bundle = Path(__file__).resolve().parents[1] / "unipet_bundle"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["checkpoint"] = ""
    parser["checkpoint_sha256"] = None
    parser["san_variant"] = "v2"
    assert parser["memory_format"] == "channels_last_3d"
    wrapped = parser.get_parsed_content("inference_network")
    assert isinstance(wrapped, PrecisionNetwork) and wrapped.memory_format == "channels_last_3d"
    with pytest.raises(UniPETInputError, match="memory_format must be one of"):
        PrecisionNetwork(_perturbed_unipet(), "fp32", memory_format="nhwc")


def test_conv3d_peak_is_the_faster_layouts():
    from scripts.benchmarks.compute_peak import conv3d_peak

    peak = conv3d_peak(4, "fp32", size=8, batch=2, repeats=1)
    by = peak["gflops_by_memory_format"]
    assert set(by) == {"contiguous", "channels_last_3d"} and peak["gflops"] == pytest.approx(max(by.values()))
    assert peak["memory_format"] == max(by, key=by.get)


def test_conv3d_peak_of_one_window_is_onednns():
    # PyTorch's conv3d runs a batch of one 16-channel 32^3 window on its im2col kernel (~20x slower here); the
    # "peak" of a sw_batch_size 1 config was that slow path and reported the 1.3x target met. It must be oneDNN's.
    import torch
    import torch.nn.functional as F
    from torch.profiler import profile

    from scripts.benchmarks.compute_peak import conv3d_peak

    def ops(fn) -> set:
        with profile() as prof:
            fn()
        return {e.key for e in prof.key_averages()}

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    x, w = torch.rand(1, 16, 32, 32, 32), torch.rand(16, 16, 3, 3, 3)
    assert "aten::slow_conv3d_forward" in ops(lambda: F.conv3d(x, w, None, 1, 1))  # the heuristic this avoids
    for layout in ("contiguous", "channels_last_3d"):
        seen = ops(lambda: conv3d_peak(16, "fp32", size=32, batch=1, repeats=1, memory_format=layout))
        assert "aten::mkldnn_convolution" in seen and "aten::slow_conv3d_forward" not in seen, seen
