"""The common floor's small helpers (``scripts/common``): one implementation each, used by every package."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from scripts.common.geometry import voxel_spacing


def test_voxel_spacing_is_the_column_norm_for_any_axis_order_and_any_container():
    diag = np.diag([2.0, 3.0, 4.0, 1.0])
    assert voxel_spacing(diag).tolist() == [2.0, 3.0, 4.0]
    # a flipped, transposed (x <-> z) and rotated storage keeps each array axis' own voxel size
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.array([[0.0, 0.0, -4.0], [0.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    affine[:3, 3] = [10.0, -20.0, 30.0]  # the origin plays no part
    np.testing.assert_allclose(voxel_spacing(affine), [2.0, 3.0, 4.0], rtol=0, atol=1e-12)
    # the inputs callers hand it: float32 arrays, nested lists, CPU tensors (MetaTensor affines)
    assert voxel_spacing(diag.astype(np.float32)).dtype == np.float64
    assert voxel_spacing(diag.tolist()).tolist() == [2.0, 3.0, 4.0]
    assert voxel_spacing(torch.as_tensor(diag)).tolist() == [2.0, 3.0, 4.0]
    assert voxel_spacing(diag[:3, :3]).shape == (3,)


@pytest.mark.parametrize("seed", range(3))
def test_voxel_spacing_equals_each_formula_it_replaced(seed):
    affine = np.eye(4)
    affine[:3, :3] = np.random.default_rng(seed).normal(size=(3, 3)) * 3.0
    new = voxel_spacing(affine)
    # the five copies it replaced: column norm (inference, evaluation, QC, writer, demo) and root of summed squares
    assert new.tolist() == np.linalg.norm(affine[:3, :3], axis=0).tolist()
    assert tuple(new.tolist()) == tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def test_bundle_version_is_read_from_metadata_in_one_place(tmp_path):
    import json

    from conftest import BUNDLE_ROOT
    from scripts.common.versioning import BUNDLE_ROOT as CODE_ROOT
    from scripts.common.versioning import bundle_version, read_metadata

    version = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["version"]
    assert CODE_ROOT == BUNDLE_ROOT and bundle_version() == bundle_version(BUNDLE_ROOT) == version
    assert read_metadata(BUNDLE_ROOT)["version"] == version
    # outputs only record the version: a bundle without (or with a broken) metadata.json says "unknown"
    assert bundle_version(tmp_path) == "unknown"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text("{not json")
    assert bundle_version(tmp_path) == "unknown"
    (tmp_path / "configs" / "metadata.json").write_text('{"version": "9.9.9"}')
    assert bundle_version(tmp_path) == "9.9.9"


def test_inference_config_records_the_same_version():
    from monai.bundle import ConfigParser

    from conftest import BUNDLE_ROOT
    from scripts.common.versioning import bundle_version

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    assert parser.get_parsed_content("model_version") == bundle_version()


def test_new_file_and_folder_modes_follow_the_umask_and_leave_it_unchanged():
    import os

    from scripts.common.io import current_umask, default_dir_mode, default_file_mode

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027 and current_umask() == 0o027  # reading it does not change it
        assert default_file_mode() == 0o640 and default_dir_mode() == 0o750
        os.umask(0o002)
        assert default_file_mode() == 0o664 and default_dir_mode() == 0o775
    finally:
        os.umask(old)


@pytest.mark.parametrize("trained", [True, False])
def test_one_derivation_text_gives_the_texts_of_the_inference_writer_and_the_deploy_app(trained):
    """The DerivationDescription written by inference and by the Deploy app is the text each wrote before
    it came from one function (the outputs stay byte-identical)."""
    from scripts.inference.dicom_writer import derivation_text

    state = "trained checkpoint" if trained else "UNTRAINED network (identity: NOT denoised)"
    tail = "research use only, not for diagnosis. Pixel values are in the source series' units; SUV tags are kept from the source."
    # inference/writer.py's text before issue 17
    assert derivation_text("1.2.3", trained) == (
        f"Denoised with UniPET (deep-learning PET denoising, model version 1.2.3, {state}); {tail}"
    )
    # deploy_app/pet_series.py's text before issue 17
    assert derivation_text("1.2.3", trained, by="the UniPET MONAI Deploy app") == (
        f"Denoised with UniPET (deep-learning PET denoising, model version 1.2.3, {state}) by the UniPET MONAI Deploy app; {tail}"
    )
    # 0.5.0: the level lock's width, when one was applied, is named (inference.json's default is 20 mm)
    assert derivation_text("1.2.3", trained, level_lock_fwhm_mm=20.0) == (
        f"Denoised with UniPET (deep-learning PET denoising, model version 1.2.3, {state}, level lock 20 mm); {tail}"
    )


def _volume_policies():
    """The three callers of the one volume check, with the thresholds each passes (as their code does)."""
    from scripts.data.volume_checks import check_pet_volume

    return {
        "inference/training": lambda a: check_pet_volume("v", a),
        "simulator": lambda a: check_pet_volume("v", a, min_shape=(8, 8, 1)),
        "deploy app": lambda a: check_pet_volume("v", a, allow_all_zero=True, min_shape=(1, 1, 1), require_float=True),
    }


@pytest.mark.parametrize(
    "array, accepted_by",
    [
        (np.ones((16, 16, 8)), {"inference/training", "simulator", "deploy app"}),
        (np.ones((16, 16, 8, 1)), {"inference/training", "simulator", "deploy app"}),  # trailing singleton dropped
        (np.ones((16, 16, 1)), {"simulator", "deploy app"}),  # one slice: the simulator's phantoms may be one
        (np.ones((4, 4, 10)), {"inference/training", "deploy app"}),  # fewer than 8 x 8 pixels per slice
        (np.zeros((16, 16, 8)), {"deploy app"}),  # all zero: only the app, which checks outputs too
        (-np.ones((16, 16, 8)), {"deploy app"}),  # no positive voxel
        (np.ones((16, 16, 8), dtype=np.int16), {"inference/training", "simulator"}),  # integers: refused by the app
        (np.where(np.eye(16)[..., None] > 0, np.nan, 1.0) * np.ones((16, 16, 8)), set()),  # NaN
        (np.ones((16, 16, 8, 3)), set()),  # 4D frames
        (np.ones((16, 16)), set()),  # 2D
    ],
)
def test_one_volume_check_keeps_each_callers_thresholds(array, accepted_by):
    from scripts.common.errors import UniPETInputError

    for caller, check in _volume_policies().items():
        if caller in accepted_by:
            assert check(array).ndim == 3, caller
        else:
            with pytest.raises(UniPETInputError, match=r"^v (is|has) "):
                check(array)


def test_the_simulator_and_the_deploy_app_use_the_one_volume_check(monkeypatch):
    import scripts.data.volume_checks as volume_checks
    from scripts.data import simulate
    from scripts.inference import denoise as bundle_inference  # the in-memory pipeline of the Deploy app

    seen = []
    real = volume_checks.check_pet_volume

    def spy(name, array, *args, **kwargs):
        seen.append((name, kwargs))
        return real(name, array, *args, **kwargs)

    monkeypatch.setattr(simulate, "check_pet_volume", spy)
    monkeypatch.setattr(bundle_inference, "check_pet_volume", spy)
    simulate._check_activity(np.ones((16, 16, 4)), what="act")
    bundle_inference.check_float_volume(np.ones((4, 4, 4), dtype=np.float32), "input")
    assert seen == [
        ("act", {"min_shape": (8, 8, 1)}),
        ("input", {"allow_all_zero": True, "min_shape": (1, 1, 1), "require_float": True}),
    ]


def test_the_one_cli_wrapper_prints_one_error_line_and_exits_2(capsys):
    from scripts.common.errors import UniPETInputError, exit_bad_input

    with pytest.raises(SystemExit) as stop:
        exit_bad_input(UniPETInputError("sub01.nii.gz has 3 NaN/Inf voxel(s):\n  fix it\x1b[2J"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: sub01.nii.gz has 3 NaN/Inf voxel(s): fix it\\x1b[2J\n"


@pytest.mark.parametrize(
    "module",
    [
        "scripts.data.simulate",
        "scripts.data.udpet",
        "scripts.data.datalist",
        "scripts.data.suv",
        "scripts.demo",
        "scripts.deploy.package",
        "scripts.deploy.export",
        "scripts.benchmarks.quality",
        "scripts.benchmarks.train_models",
        "scripts.benchmarks.inference_speed",
        "scripts.benchmarks.san_noise_probe",
        "scripts.benchmarks.gpu_check",
        "scripts.benchmarks.loss_scales",
        "scripts.benchmarks.style_proxy",
        "scripts.benchmarks.training_speed",
        "scripts.benchmarks.precision",
        "scripts.benchmarks.compute_peak",
    ],
)
def test_every_command_line_tool_answers_bad_input_through_the_one_wrapper(module):
    import ast
    import importlib

    source = importlib.import_module(module).__file__
    tree = ast.parse(open(source).read())
    calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    exits = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "sys.exit" and n.args and ast.unparse(n.args[0]) == "2"
    ]
    # exit_bad_input itself, or the benchmarks' fire command line that calls it (scripts.common.cli.run_command)
    wrapped = "exit_bad_input" in calls or "run_command" in calls
    assert wrapped and not exits, f"{module} prints its own error line and exit status"


def test_run_command_gives_bad_input_one_line_and_exit_2(monkeypatch, capsys):
    from scripts.common.cli import run_command
    from scripts.common.errors import CheckpointError, UniPETInputError

    def tool(size: int = 1):
        if size < 0:
            raise UniPETInputError("--size must be >= 0,\n  got a negative one")
        if size == 0:
            raise CheckpointError("no weights")
        if size == 7:
            raise KeyError("a bug")
        return {"size": size}

    monkeypatch.setattr("sys.argv", ["tool", "--size", "3"])
    assert run_command(tool, "python -m tool") == {"size": 3}
    assert capsys.readouterr().out == ""  # the tool's output is its own printing, not the returned value
    run_command(tool, "python -m tool", print_result=True)
    assert "size" in capsys.readouterr().out
    for value, message in (("-1", "error: --size must be >= 0, got a negative one"), ("0", "error: no weights")):
        monkeypatch.setattr("sys.argv", ["tool", "--size", value])
        with pytest.raises(SystemExit) as exit_:
            run_command(tool, "python -m tool")
        assert exit_.value.code == 2 and capsys.readouterr().err.strip() == message
    monkeypatch.setattr("sys.argv", ["tool", "--size", "7"])
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_command(tool, "python -m tool")

    class OwnBadInput(ValueError):
        pass

    def strict():
        raise OwnBadInput("a tool's own bad-input type")

    monkeypatch.setattr("sys.argv", ["strict"])
    with pytest.raises(SystemExit) as exit_:
        run_command(strict, "python -m strict", bad_input=(OwnBadInput,))
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: a tool's own")


def test_benchmark_without_its_weights_says_so_in_one_line():
    from conftest import run_python

    proc = run_python("-m", "scripts.benchmarks.loss_scales", "--bdn_checkpoint", "missing.pt", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint ") and "missing.pt not found" in last, last
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ host memory (issue 14)

_FAULTS_SCRIPT = """
import json, resource, sys
import torch
from scripts.common.allocator import keep_freed_memory
done = keep_freed_memory(int(sys.argv[1]))
def batch():  # the pattern of a sliding window: the same three 20 MiB tensors, batch after batch
    a = torch.ones(5 << 20)
    b = a * 2
    c = b + a
    return float(c[0])
faults = []
for _ in range(30):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    batch()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"done": done, "faults": faults}))
"""


def _faults(cache_mb: int) -> dict:
    import json
    import subprocess
    import sys

    from conftest import BUNDLE_ROOT

    proc = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT, str(cache_mb)],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    __import__("platform").libc_ver()[0] != "glibc", reason="the setting is glibc's; elsewhere it is a no-op"
)
def test_kept_freed_memory_stops_refaulting_the_same_tensors_every_batch():
    import statistics

    pages = 3 * (20 << 20) // 4096  # what one round allocates, in 4 KiB pages
    default, kept = _faults(0), _faults(256)
    assert default["done"]["applied"] is False and kept["done"]["applied"] is True
    # kept: after a few rounds the same memory is reused (measured here, rounds 21-30: no page faulted, in 12 of
    # 12 runs). glibc's defaults (measured here, rounds 21-30: all pages of every round, or one tensor in each
    # round where its dynamic threshold caught up: 0.2-1.0 of the pages) fail this bound, so a setting that did
    # not reach the allocator fails the test.
    assert statistics.mean(kept["faults"][-10:]) < 0.1 * pages, (kept["faults"][-10:], default["faults"][-10:])


@pytest.mark.parametrize("value", [-1, 1.5, 2048, float("nan"), float("inf"), "256MB", True, None])
def test_keep_freed_memory_refuses_bad_values_without_touching_the_allocator(value, monkeypatch):
    from scripts.common import allocator
    from scripts.common.errors import UniPETInputError

    monkeypatch.setattr(allocator, "_glibc", lambda: pytest.fail("the C library must not be asked"))
    with pytest.raises(UniPETInputError, match=r"host_memory_cache_mb must be a whole number of MiB from 0 to 2047"):
        allocator.keep_freed_memory(value)


def test_keep_freed_memory_zero_and_other_c_libraries_keep_the_defaults(monkeypatch):
    from scripts.common import allocator

    monkeypatch.setattr(allocator, "_applied", {})  # a process that has set nothing yet
    monkeypatch.setattr(allocator, "_glibc", lambda: pytest.fail("0 must not ask the C library"))
    assert allocator.keep_freed_memory(0) == {
        "applied": False,
        "cache_mb": 0,
        "reason": "host_memory_cache_mb is 0: the C library's defaults",
    }
    monkeypatch.setattr(allocator, "_glibc", lambda: None)  # musl, macOS, Windows
    done = allocator.keep_freed_memory(256)
    assert done["applied"] is False and "defaults kept" in done["reason"]


@pytest.mark.parametrize("config", ["inference.json", "train.json", "evaluate.json", "multi_gpu_train.json"])
def test_every_run_config_sets_the_process_up_first(config):
    from monai.bundle import ConfigParser

    from conftest import BUNDLE_ROOT

    files = [BUNDLE_ROOT / "configs" / "train.json"] if config in ("evaluate.json", "multi_gpu_train.json") else []
    parser = ConfigParser()
    parser.read_config([*files, BUNDLE_ROOT / "configs" / config])
    assert parser["host_memory_cache_mb"] == 256
    steps = parser["initialize"]
    # right after the error hook, before anything allocates the network's tensors
    assert steps[1] == "$scripts.common.allocator.keep_freed_memory(@host_memory_cache_mb)", steps
    # then oneMKL's VML dispatch, before any transform or network computes (PyTorch issue 188792)
    assert steps[2] == "$scripts.common.vml_dispatch.resolve_vml_dispatch()", steps
    # every bundle module an initialize step calls is among the config's own imports (a fresh `monai.bundle run`
    # has nothing else loaded: a module reached only through another import fails there, not in-process)
    imported = {i.split("import ", 1)[1].strip() for i in parser["imports"] if i.startswith("$import ")}
    for step in steps:
        for module in re.findall(r"(scripts(?:\.\w+)+)\.\w+\(", step):
            assert module in imported, (config, step, sorted(imported))


# ------------------------------------------------------------------------- oneMKL VML dispatch (reproducibility)

_TWICE = """
import hashlib
import numpy as np
from scripts.data.simulate import simulate_pet
from scripts.common import vml_dispatch
act = np.zeros((32, 32, 12), np.float32)
act[6:26, 8:24, 1:11] = 1.0
act[14:18, 14:18, 5:7] = 6.0
runs = [simulate_pet(act, (12.0, 12.0, 32.0), drfs=[4], seed=5, n_angles=32, n_subsets=8) for _ in range(2)]
first, again = (hashlib.md5(np.ascontiguousarray(r["drf"][4]).tobytes()).hexdigest() for r in runs)
print(vml_dispatch.resolve_vml_dispatch(), first == again, first)
"""


def test_resolve_vml_dispatch_calls_each_op_once_per_dtype_and_once_per_process(monkeypatch):
    from scripts.common import vml_dispatch

    calls = []

    def counting(name):
        real = getattr(torch, name)
        return lambda x: calls.append((name, x.dtype, x.numel())) or real(x)

    for name in vml_dispatch.VML_OPS:
        monkeypatch.setattr(torch, name, counting(name))
    monkeypatch.setattr(vml_dispatch, "_resolved", False)
    assert vml_dispatch.resolve_vml_dispatch() is True
    expected = {(name, dtype, 1) for name in vml_dispatch.VML_OPS for dtype in (torch.float32, torch.float64)}
    assert len(calls) == len(expected) and set(calls) == expected
    assert vml_dispatch.resolve_vml_dispatch() is False and len(calls) == len(expected)  # once per process


@pytest.mark.slow
def test_a_fresh_process_simulates_the_same_seed_the_same_way_from_its_first_call():
    """oneMKL resolves a VML function's kernel on its first call; when that call runs on several threads at once one
    thread may use a low-accuracy kernel for its chunk (PyTorch issue 188792). The simulator's attenuation factors are
    its first large torch.exp: without the fix, the first simulation of a fresh process differed from its second in 4
    of 24 processes (other Poisson counts in every voxel; a fresh-clone CI run failed on it once). Importing the
    simulator resolves the dispatch first: sixteen fresh processes, each simulating one seed twice, all the same."""
    from conftest import run_python

    results = []
    for _ in range(16):  # one after another: two processes at once on two cores made the race rarer, not likelier
        proc = run_python("-c", _TWICE, OMP_NUM_THREADS="2")
        assert proc.returncode == 0, proc.stderr
        results.append(proc.stdout.split()[-3:])
    # False: importing the simulator had resolved the dispatch already; True: the first run matched the second
    assert all(r[:2] == ["False", "True"] for r in results), results
    assert len({r[2] for r in results}) == 1, results


# ------------------------------------------------------------------------- parallel gzip (issue 14)


def _gz(data: bytes, threads: int, block: int = 64 << 10, level: int = 1) -> bytes:
    import io

    from scripts.common.parallel_gzip import ParallelGzipWriter

    buf = io.BytesIO()
    with ParallelGzipWriter(buf, level=level, threads=threads, block_bytes=block) as w:
        cut = len(data) // 3  # writes that straddle block edges
        assert w.write(data[:cut]) == cut and w.write(memoryview(data)[cut:]) == len(data) - cut
        assert w.tell() == len(data)
    return buf.getvalue()


@pytest.mark.parametrize("n", [0, 1, 1000, 64 << 10, (64 << 10) + 7, 1_000_003])
def test_parallel_gzip_is_one_ordinary_member_with_the_same_bytes_for_any_thread_count(n):
    import gzip
    import zlib

    rng = np.random.default_rng(n)
    data = (rng.random(n // 4 + 1, dtype=np.float32) * (rng.random(n // 4 + 1) > 0.5)).tobytes()[:n]
    one = _gz(data, threads=1)
    assert gzip.decompress(one) == data
    assert _gz(data, threads=2) == one and _gz(data, threads=3) == one  # reproducible bytes
    d = zlib.decompressobj(31)
    assert d.decompress(one) == data and d.eof and d.unused_data == b""  # a single member, nothing after it
    if n > 100_000:  # each block primed with the previous one's tail: the size of one gzip stream
        assert abs(len(one) / len(gzip.compress(data, 1, mtime=0)) - 1) < 1e-3
    assert one[:4] == b"\x1f\x8b\x08\x00" and one[4:8] == b"\0\0\0\0"  # gzip, deflate, no name, mtime 0


def test_parallel_gzip_seeks_forward_only_and_an_interrupted_stream_stays_incomplete():
    import gzip
    import io

    from scripts.common.parallel_gzip import ParallelGzipWriter

    buf = io.BytesIO()
    with ParallelGzipWriter(buf, threads=2, block_bytes=64 << 10) as w:
        w.write(b"abc")
        assert w.seek(10) == 10 and w.seek(10) == 10  # a header's padding: zeros
        with pytest.raises(io.UnsupportedOperation):
            w.seek(5)
        w.write(b"xyz")
    assert gzip.decompress(buf.getvalue()) == b"abc" + bytes(7) + b"xyz"
    with pytest.raises(ValueError, match="closed"):
        w.write(b"more")
    cut = io.BytesIO()
    with pytest.raises(RuntimeError, match="disk gone"):
        with ParallelGzipWriter(cut, threads=2, block_bytes=64 << 10) as w:
            w.write(bytes(200_000))
            raise RuntimeError("disk gone")
    with pytest.raises(EOFError):  # no trailer: no reader takes it for a whole file
        gzip.decompress(cut.getvalue())
    dropped = io.BytesIO()
    w = ParallelGzipWriter(dropped, threads=2, block_bytes=64 << 10)
    w.write(bytes(100_000))
    del w  # garbage-collected without close(): abandoned as well, not finished
    with pytest.raises(EOFError):
        gzip.decompress(dropped.getvalue())
    big = bytes(range(256)) * 4000  # one write of many blocks after a partial one
    whole = io.BytesIO()
    with ParallelGzipWriter(whole, threads=2, block_bytes=64 << 10) as w:
        w.write(b"x" * 1000)
        w.write(big)
    assert gzip.decompress(whole.getvalue()) == b"x" * 1000 + big
    for bad in (0, 10):
        with pytest.raises(ValueError, match="level"):
            ParallelGzipWriter(io.BytesIO(), level=bad)


def test_nifti_written_on_every_core_reads_like_nibabels_own_in_nibabel_and_itk(tmp_path):
    import itk
    import nibabel as nib

    from scripts.data.io import nifti_image, save_nifti, write_nifti

    rng = np.random.default_rng(0)
    suv = (rng.gamma(2.0, 1.0, size=(37, 29, 23)) * (rng.random((37, 29, 23)) > 0.3)).astype(np.float32)
    affine = np.array([[-2.0, 0, 0, 10], [0, 2.5, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    ours = save_nifti(suv, affine, tmp_path / "ours.nii.gz")
    nib.save(nifti_image(suv, affine), str(tmp_path / "nibabel.nii.gz"))
    a, b = nib.load(str(ours)), nib.load(str(tmp_path / "nibabel.nii.gz"))
    assert a.header.binaryblock == b.header.binaryblock
    assert np.array_equal(np.asarray(a.dataobj), suv) and np.array_equal(a.affine, b.affine)
    image = itk.imread(str(ours))  # zlib's gzread, as ITK, FSL and AFNI read
    assert np.array_equal(itk.array_view_from_image(image).transpose(2, 1, 0), suv)
    write_nifti(nifti_image(suv, affine), tmp_path / "plain.nii")  # uncompressed: nibabel's own writer
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "plain.nii")).dataobj), suv)
