"""The fused CPU kernels (`scripts.networks.fused_pad`, issue 14): the padded products give PyTorch's values bit for
bit; the depthwise convolutions, the single-channel input convolution and the SAN front (high-pass, 1x1 reduction,
PReLU, channel means) the same functions up to float rounding; each is used only where it applies, with a clean
fallback when the kernels cannot be built."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import run_python
from scripts.networks import fused_pad
from scripts.networks.fused_pad import (
    DEPTHWISE_CHANNELS,
    PROJECT_CHANNELS,
    depthwise3_project_prelu,
    depthwise3_replicate,
    enable_fused_kernels,
    fused_kernel_status,
    prelu_scale_pad,
    single_channel_conv3_replicate,
)
from scripts.networks.modulated_conv import replicate_depthwise3, replicate_pad, replicate_pad_product
from scripts.networks.unipet import UniPET

CL = torch.channels_last_3d
TOOLCHAIN = bool(shutil.which("g++") or shutil.which("c++")) and bool(
    shutil.which("ninja") or importlib.util.find_spec("ninja")
)


@pytest.fixture
def fused():
    """The kernel in use for one test (built on first use), the process's previous setting restored after."""
    if not TOOLCHAIN:
        pytest.skip("no g++ or ninja here: the kernel cannot be built, the blocks run PyTorch's passes")
    was = fused_kernel_status()["enabled"]
    status = enable_fused_kernels(True)
    # a machine with the toolchain must build it: a silent fallback here would leave every other test vacuous
    assert status["in_use"], status["reason"]
    yield
    fused_pad._state["enabled"] = was


def _reference(x, scale, slope, p):
    h = x if slope is None else F.prelu(x, slope)
    if scale is None:
        return replicate_pad(h, p)
    if h.requires_grad or scale.requires_grad:
        return replicate_pad(h * scale, p)
    return replicate_pad_product(h, scale, p)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # bit patterns: -0.0 differs from 0.0, NaNs compare


@pytest.mark.parametrize("shape", [(2, 16, 6, 5, 7), (1, 3, 1, 4, 2), (3, 5, 4, 4, 4), (1, 1, 1, 1, 1)])
@pytest.mark.parametrize("p", [1, 2])
def test_the_kernel_gives_pytorchs_values_bit_for_bit(fused, shape, p):
    g = torch.Generator().manual_seed(sum(shape) + p)
    b, c = shape[:2]
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40, -3.0])
    flat[: min(flat.numel(), special.numel())] = special[: flat.numel()]  # PReLU's boundary and IEEE corners
    flat[special.numel() :: 7] = -0.0
    x = x.contiguous(memory_format=CL)
    scale = (torch.rand(b, c, 1, 1, 1, generator=g) + 0.5).contiguous()
    slopes = (torch.rand(c, generator=g) * 0.5, torch.tensor([0.25]), torch.zeros(c), torch.full((c,), float("inf")))
    for slope in (*slopes, None):
        for sc in (scale, None):
            before = fused_kernel_status()["calls"]
            out = prelu_scale_pad(x, sc, slope, p)
            assert fused_kernel_status()["calls"] == before + 1  # the kernel ran, not the fallback
            ref = _reference(x, sc, slope, p)
            assert out.shape == ref.shape == (b, c, shape[2] + 2 * p, shape[3] + 2 * p, shape[4] + 2 * p)
            assert out.is_contiguous(memory_format=CL) and torch.equal(_bits(out), _bits(ref))


def test_a_unipet_with_live_styles_gives_the_same_output_with_and_without_the_kernel(fused):
    torch.manual_seed(0)
    net = UniPET(channels=8, num_blocks=2, latent_dim=8, san_channels=(8, 8), zero_init_output=False).eval()
    with torch.no_grad():
        for block in net.blocks:  # the zero-initialised style layers made live, so every product is per sample
            block.style_affine.weight.normal_(0.0, 0.3)
            block.style_affine.bias.normal_(0.0, 0.3)
            block.act.weight.uniform_(0.05, 0.5)
    net = net.to(memory_format=CL)
    x = (torch.rand(3, 1, 12, 10, 14) * 0.3).contiguous(memory_format=CL)
    with torch.no_grad():
        before = fused_kernel_status()
        y_fused = net(x)
        after = fused_kernel_status()
        # each block's two paddings and each SAN stage's gated input; the output convolution is the depthwise
        # kernel's, the input convolution the single-channel one's, the SAN's high-pass with its first stage's
        # reduction the projecting one's
        assert after["calls"] == before["calls"] + 2 * len(net.blocks) + len(net.san.stages)
        assert after["depthwise_calls"] == before["depthwise_calls"] + 1
        assert after["input_calls"] == before["input_calls"] + 1
        assert after["project_calls"] == before["project_calls"] + 1
        fused_pad._state["enabled"] = False
        y_torch = net(x)
    # the padded products are PyTorch's bits (above); the depthwise convolutions round differently
    torch.testing.assert_close(y_fused, y_torch, rtol=0, atol=2e-6)
    assert (y_fused - x).abs().max() > 1e-3  # a network that does something, so the comparison means something


@pytest.mark.parametrize("channels", DEPTHWISE_CHANNELS)
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 1, 4, 2), (3, 4, 4, 9), (1, 1, 1, 1)])
def test_the_depthwise_kernel_is_pytorchs_convolution_up_to_rounding(fused, channels, shape):
    g = torch.Generator().manual_seed(channels + sum(shape))
    b, spatial = shape[0], shape[1:]
    x = torch.randn((b, channels, *spatial), generator=g).contiguous(memory_format=CL)
    weight = torch.randn(channels, 1, 3, 3, 3, generator=g)
    for channel_sum in (False, True):
        before = fused_kernel_status()["depthwise_calls"]
        out = depthwise3_replicate(x, weight, channel_sum)
        assert fused_kernel_status()["depthwise_calls"] == before + 1  # the kernel ran, not the fallback
        ref = replicate_depthwise3(x, weight, channel_sum)
        assert out.shape == ref.shape == (b, 1 if channel_sum else channels, *spatial)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=CL)
        # each output sums 27 (times C) products of unit-scale values: a few float32 ulps of that sum
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * (channels if channel_sum else 1))


@pytest.mark.parametrize("channels", DEPTHWISE_CHANNELS)
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 1, 4, 2), (3, 4, 4, 9), (1, 1, 1, 1)])
def test_the_input_conv_kernel_is_pytorchs_replicate_convolution_up_to_rounding(fused, channels, shape):
    g = torch.Generator().manual_seed(channels + sum(shape) + 1)
    b, spatial = shape[0], shape[1:]
    x = torch.randn((b, 1, *spatial), generator=g)
    weight = torch.randn(channels, 1, 3, 3, 3, generator=g)
    bias = torch.randn(channels, generator=g)
    conv = torch.nn.Conv3d(1, channels, 3, padding=1, padding_mode="replicate")  # what UniPET's input conv is
    for layout in (torch.contiguous_format, CL):
        for b_ in (bias, None):
            before = fused_kernel_status()["input_calls"]
            out = single_channel_conv3_replicate(x.contiguous(memory_format=layout), weight, b_)
            assert fused_kernel_status()["input_calls"] == before + 1  # the kernel ran, not the fallback
            with torch.no_grad():
                conv.weight.copy_(weight)
                conv.bias = None if b_ is None else torch.nn.Parameter(b_.clone())
                ref = conv(x)
            assert out.shape == ref.shape == (b, channels, *spatial) and out.is_contiguous(memory_format=CL)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # where it does not apply it says so (None): the caller then runs its own convolution
    for case, w in (
        (x.to(torch.bfloat16), weight),
        (x.clone().requires_grad_(), weight),
        (x, torch.randn(12, 1, 3, 3, 3)),  # a width the kernel is not compiled for
        (torch.randn(b, 2, *spatial), torch.randn(channels, 2, 3, 3, 3)),  # two input channels
    ):
        assert single_channel_conv3_replicate(case, w, None) is None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert single_channel_conv3_replicate(x, weight, bias) is None


def test_the_input_conv_module_runs_where_the_kernel_does_not_apply(fused):
    net = UniPET(channels=8, num_blocks=1, latent_dim=8, san_channels=(8,)).eval()
    calls = []
    net.input_conv.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(1, 1, 6, 6, 6)
    with torch.no_grad():
        net(x)  # the kernel: the module's hook does not run
        assert calls == []
        fused_pad._state["enabled"] = False
        net(x)  # no kernel: the module itself, hooks and all
    assert calls == [1]
    net(x)  # with gradients: the module
    assert calls == [1, 1]


@pytest.mark.parametrize("channels", DEPTHWISE_CHANNELS)
@pytest.mark.parametrize("mid", PROJECT_CHANNELS)
def test_the_projecting_kernel_is_the_sans_front_up_to_rounding(fused, channels, mid):
    g = torch.Generator().manual_seed(channels * mid)
    weight = torch.randn(channels, 1, 3, 3, 3, generator=g)
    proj = torch.randn(mid, channels, 1, 1, 1, generator=g) / channels**0.5
    slope = torch.tensor([0.2])
    # widths 7, 2 and 1: rows that end in a short group of voxels (the kernel projects four at a time)
    for shape in [(2, 6, 5, 7), (1, 1, 4, 2), (3, 4, 4, 9), (1, 1, 1, 1)]:
        x = torch.randn((shape[0], channels, *shape[1:]), generator=g).contiguous(memory_format=CL)
        before = fused_kernel_status()["project_calls"]
        y, means = depthwise3_project_prelu(x, weight, proj, slope)
        assert fused_kernel_status()["project_calls"] == before + 1
        ref = F.prelu(F.conv3d(replicate_depthwise3(x, weight), proj), slope)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=CL) and means.shape == (shape[0], mid)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(means, ref.mean(dim=(2, 3, 4)), rtol=1e-5, atol=1e-6)
    # where it does not apply it says so (None): the SAN then runs its own passes
    x = torch.randn(2, channels, 3, 4, 5).contiguous(memory_format=CL)
    for case, p_, s_ in (
        (x.to(torch.bfloat16), proj, slope),
        (x.clone().requires_grad_(), proj, slope),
        (x.contiguous(), proj, slope),  # NCDHW layout
        (x, torch.randn(12, channels, 1, 1, 1), slope),  # an output width the kernel is not compiled for
        (x, proj, torch.full((mid,), 0.2)),  # a per-channel PReLU
    ):
        assert depthwise3_project_prelu(case, weight, p_, s_) is None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert depthwise3_project_prelu(x, weight, proj, slope) is None


def test_the_san_gives_the_same_latents_with_and_without_its_fused_front(fused):
    torch.manual_seed(1)
    net = UniPET(channels=16, num_blocks=4, latent_dim=16, san_channels=(16, 32, 64, 64)).eval()  # the shipped sizes
    net = net.to(memory_format=CL)
    x = (torch.rand(2, 1, 16, 18, 13) * 0.3).contiguous(memory_format=CL)
    with torch.no_grad():
        before = fused_kernel_status()["project_calls"]
        fused_latents = net.san_latents(x)
        assert fused_kernel_status()["project_calls"] == before + 1
        fused_pad._state["enabled"] = False
        torch_latents = net.san_latents(x)
    assert len(fused_latents) == 4
    for a, b in zip(fused_latents, torch_latents):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and they are latents that differ from window to window, so the comparison means something
    assert (fused_latents[0][0] - fused_latents[0][1]).abs().max() > 1e-3


def _depthwise_by_hand(x, weight, channel_sum):
    """PyTorch's own replicate padding and grouped conv3d, written out here (not the bundle's reference path)."""
    out = F.conv3d(F.pad(x, (1,) * 6, mode="replicate"), weight.to(x.dtype), groups=x.shape[1])
    if not channel_sum:
        return out
    return out.sum(dim=1, keepdim=True, dtype=torch.float32 if x.dtype == torch.bfloat16 else x.dtype)


def test_where_the_depthwise_kernel_does_not_apply_pytorchs_passes_run(fused):
    x = torch.randn(2, 8, 3, 5, 4)
    weight = torch.randn(8, 1, 3, 3, 3)
    cl = x.contiguous(memory_format=CL)
    odd = torch.randn(2, 12, 3, 5, 4).contiguous(memory_format=CL)
    before = fused_kernel_status()["depthwise_calls"]
    cases = [
        (x, weight),  # contiguous (NCDHW) layout
        (cl.to(torch.bfloat16), weight),  # bf16
        (cl.clone().requires_grad_(), weight),  # autograd records through the features ...
        (cl, weight.clone().requires_grad_()),  # ... or through the weight
        (odd, torch.randn(12, 1, 3, 3, 3)),  # a width the kernel is not compiled for
        (cl, weight.reshape(8, 27, 1, 1, 1)),  # C * 27 weights of another shape: conv3d's error, not a guess
    ]
    for case, w in cases:
        for channel_sum in (False, True):
            if w.shape[1] != 1:
                with pytest.raises(RuntimeError):
                    depthwise3_replicate(case, w, channel_sum)
                continue
            out = depthwise3_replicate(case, w, channel_sum)
            ref = _depthwise_by_hand(case, w, channel_sum)
            torch.testing.assert_close(
                out.detach(), ref.detach(), rtol=0, atol=1e-5 if case.dtype == torch.float32 else 0.1
            )
            assert out.requires_grad == (case.requires_grad or w.requires_grad)
    # under autocast PyTorch convolves in bf16: the kernel's float32 would be another function, so it stays out
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for channel_sum in (False, True):
            out = depthwise3_replicate(cl, weight, channel_sum)
            assert torch.equal(out, replicate_depthwise3(cl, weight, channel_sum))
            assert out.dtype == (torch.float32 if channel_sum else torch.bfloat16)
    assert fused_kernel_status()["depthwise_calls"] == before
    module = fused_pad._state["module"]
    with pytest.raises(RuntimeError, match="empty axis"):  # nothing to replicate: called directly, it refuses
        module.depthwise3_replicate(torch.empty(2, 8, 0, 3, 3).contiguous(memory_format=CL), weight, False)
    with pytest.raises(RuntimeError, match="C must be 8, 16, 32 or 64"):
        module.depthwise3_replicate(odd, torch.randn(12, 1, 3, 3, 3), False)


def test_where_it_does_not_apply_pytorchs_passes_run(fused):
    x = torch.randn(2, 4, 3, 5, 4)
    scale = torch.rand(2, 4, 1, 1, 1) + 0.5
    slope = torch.full((4,), 0.2)
    cl = x.contiguous(memory_format=CL)
    before = fused_kernel_status()["calls"]
    cases = [
        (x, scale, slope),  # contiguous (NCDHW) layout
        (cl.to(torch.bfloat16), scale.bfloat16(), slope.bfloat16()),  # bf16
        (cl.clone().requires_grad_(), scale, slope),  # autograd records through the features ...
        (cl, scale.clone().requires_grad_(), slope),  # ... or through the factor
        (cl, scale[:1], slope),  # a factor broadcast over the batch: PyTorch's broadcasting
    ]
    for case, sc, sl in cases:
        out = prelu_scale_pad(case, sc, sl, 1)
        assert torch.equal(out.detach(), _reference(case, sc, sl, 1).detach())
        assert out.requires_grad == (case.requires_grad or sc.requires_grad)  # training's gradients still flow
    # an empty axis has no edge to replicate: never the kernel (called directly, it refuses)
    empty = torch.empty(2, 4, 0, 3, 3).contiguous(memory_format=CL)
    prelu_scale_pad(empty, None, None, 1)
    assert fused_kernel_status()["calls"] == before
    with pytest.raises(RuntimeError, match="empty axis"):
        fused_pad._state["module"].scale_pad(empty, torch.ones(2, 4), torch.ones(4), 1)


def test_a_failed_build_warns_once_and_falls_back_to_the_same_numbers(monkeypatch, caplog):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    builds = []
    monkeypatch.setattr(fused_pad, "_build", lambda: builds.append(1) or no_compiler())
    monkeypatch.setitem(fused_pad._state, "module", None)
    monkeypatch.setitem(fused_pad._state, "enabled", False)
    monkeypatch.setitem(fused_pad._state, "failed", "")
    with caplog.at_level(logging.INFO, logger="scripts.networks.fused_pad"):
        status = enable_fused_kernels(True)
        again = enable_fused_kernels(True)  # e.g. the next study's BundleDenoiser: no second build, no second warning
    assert not status["in_use"] and "the build failed (RuntimeError: Ninja is required" in status["reason"]
    assert again == status and len(builds) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PyTorch's passes (the same numbers up to float" in warnings[0].getMessage()
    x = torch.randn(1, 3, 2, 3, 4).contiguous(memory_format=CL)
    scale, slope = torch.rand(1, 3, 1, 1, 1), torch.rand(3)
    before = fused_kernel_status()["calls"]
    assert torch.equal(prelu_scale_pad(x, scale, slope, 1), _reference(x, scale, slope, 1))
    assert fused_kernel_status()["calls"] == before


def test_inference_switches_it_with_one_config_key(bundle_root, monkeypatch):
    config = json.loads((bundle_root / "configs" / "inference.json").read_text())
    assert config["fused_cpu_kernels"] is True
    assert "$scripts.networks.fused_pad.enable_fused_kernels(@fused_cpu_kernels)" in config["initialize"]
    monkeypatch.setitem(fused_pad._state, "enabled", True)
    status = enable_fused_kernels("false")  # as `monai.bundle run --fused_cpu_kernels false` passes it
    assert not status["enabled"] and not status["in_use"] and status["reason"] == "fused_cpu_kernels is false"
    with pytest.raises(ValueError, match="fused_cpu_kernels"):
        enable_fused_kernels("perhaps")


def test_the_command_line_reports_and_exits_zero():
    proc = run_python("-m", "scripts.networks.fused_pad", "--fused_cpu_kernels", "false", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fused CPU kernel: not used: fused_cpu_kernels is false" in proc.stdout


def test_a_built_kernel_is_imported_without_a_rebuild(fused, monkeypatch):
    import torch.utils.cpp_extension as cpp

    def no_rebuild(*args, **kwargs):
        raise AssertionError("load() called: the built library should have been imported directly")

    monkeypatch.setattr(cpp, "load", no_rebuild)
    monkeypatch.setitem(fused_pad._state, "module", None)
    assert enable_fused_kernels(True)["in_use"]


def _fake_builds(monkeypatch, tmp_path):
    """TORCH_EXTENSIONS_DIR in tmp_path and a ``load`` that records its calls instead of compiling."""
    import torch.utils.cpp_extension as cpp

    calls = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "load", lambda **kwargs: calls.append(kwargs) or object())
    monkeypatch.setitem(fused_pad._state, "module", None)
    monkeypatch.setitem(fused_pad._state, "enabled", False)
    monkeypatch.setitem(fused_pad._state, "failed", "")
    lock = fused_pad._build_directory(fused_pad._extension_name()) / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    return lock, calls


def test_a_killed_builds_lock_is_removed_instead_of_hanging_every_run(monkeypatch, tmp_path, caplog):
    lock, calls = _fake_builds(monkeypatch, tmp_path)
    old = time.time() - fused_pad.BUILD_TIMEOUT_S - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="scripts.networks.fused_pad"):
        status = enable_fused_kernels(True)
    assert status["in_use"] and len(calls) == 1 and calls[0]["build_directory"] == str(lock.parent)
    assert not lock.exists() and "did not finish" in caplog.text


def test_a_build_running_in_another_process_is_waited_for(monkeypatch, tmp_path, caplog):
    lock, calls = _fake_builds(monkeypatch, tmp_path)
    threading.Timer(1.5, lock.unlink).start()  # the other build finishes
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="scripts.networks.fused_pad"):
        status = enable_fused_kernels(True)
    assert status["in_use"] and len(calls) == 1 and time.monotonic() - start >= 1.0
    assert "did not finish" not in caplog.text


@pytest.mark.parametrize("marker", ["wrong", "matching"])
def test_a_library_without_a_finished_builds_record_is_rebuilt_not_loaded(monkeypatch, tmp_path, marker):
    """A library the linker did not finish (a killed build) would crash the process when loaded: only one whose
    bytes a finished build recorded is imported directly; anything else, and a library that fails to import, goes
    back through the build."""
    lock, calls = _fake_builds(monkeypatch, tmp_path)
    lock.unlink()
    name = fused_pad._extension_name()
    library = lock.parent / f"{name}.so"
    library.write_bytes(b"\x7fELF truncated")
    digest = fused_pad._sha256(library) if marker == "matching" else "0" * 64
    (lock.parent / f"{name}.so.sha256").write_text(digest + "\n")
    import torch.utils.cpp_extension as cpp

    record = lock.parent / f"{name}.so.sha256"
    seen = []  # at build time the old record is gone: a build killed now leaves no record vouching for it
    monkeypatch.setattr(cpp, "load", lambda **kwargs: seen.append(record.exists()) or object())
    assert enable_fused_kernels(True)["in_use"] and seen == [False]
