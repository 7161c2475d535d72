"""Two runs into one output folder, killed runs, and their leftovers (issue 12 finding 2 and "Also").

Before the fix, in 4 of 8 trials the losing run deleted the winner's finished ``*_denoised.nii.gz`` while
cleaning up its own work. Here: the claim/publish/cleanup rules of :mod:`scripts.inference.claims` one by
one, the writer (:class:`SaveDenoisedd`) racing itself in threads, and two real ``monai.bundle run``
processes racing into one folder; after every race each sidecar left must describe the NIfTI beside it
(its ``nifti_sha256``), and a run's error is one line.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from test_inference import TINY  # the tiny network's CLI flags, as the other inference tests use

from conftest import BUNDLE_ROOT, run_python
from scripts.common.errors import UniPETInputError
from scripts.data.io import save_nifti
from scripts.inference import claims
from scripts.inference.claims import (
    OutputBusyError,
    OutputClaim,
    OutputConflictError,
    clean_stale_temporaries,
    inspect_claim,
    parse_temporary,
    publish,
    temporary_path,
)
from scripts.inference.inputs import prepare_datalist
from scripts.inference.writer import SaveDenoisedd

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def body(shape=(12, 12, 10), seed: int = 0) -> np.ndarray:
    """A plain SUV volume (1-4 SUV): no hot spot, so only the output rules are under test."""
    return np.random.default_rng(seed).uniform(1.0, 4.0, size=shape).astype(np.float32)


def item(suv: np.ndarray, name: str = "a", source: Path | None = None) -> dict:
    """What the writer receives for a NIfTI input: pred on the input grid plus LoadPETd's entries."""
    meta = {"original_affine": AFFINE, "spatial_shape": np.asarray(suv.shape)}
    image = MetaTensor(torch.from_numpy(suv[None]), affine=torch.as_tensor(AFFINE), meta=meta)
    pred = MetaTensor(torch.from_numpy(suv[None].copy()), affine=torch.as_tensor(AFFINE))
    return {
        "pred": pred,
        "image": image,
        "name": name,
        "kind": "nifti",
        "source": str(source or f"/in/{name}.nii.gz"),
        "suv_factor": 1.0,
        "units": "SUV",
    }


def writer(out: Path, run: str, overwrite: bool = False) -> SaveDenoisedd:
    return SaveDenoisedd(
        output_dir=out,
        overwrite=overwrite,
        model_info={"trained": True, "checkpoint": run},
        model_version="test",
        processing={"run": run, "patch_size": [8, 8, 8]},
    )


def assert_consistent(out: Path) -> None:
    """Every sidecar describes the NIfTI beside it; no NIfTI lacks its sidecar; no temporaries are left."""
    for side in out.glob("*_denoised.json"):
        info = json.loads(side.read_text())
        nifti = out / side.name.replace(".json", ".nii.gz")
        assert nifti.is_file(), f"{side.name} points at a missing {nifti.name}"
        assert claims_sha(nifti) == info["nifti_sha256"], f"{nifti.name} is not the file {side.name} describes"
    for nifti in out.glob("*_denoised.nii.gz"):
        assert (out / nifti.name.replace(".nii.gz", ".json")).is_file(), f"{nifti.name} without its sidecar"
    left = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert left == [], f"leftovers: {left}"


def claims_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------- unit: claims


def test_a_claim_is_exclusive_and_removed_when_done(tmp_path):
    with OutputClaim(tmp_path, "a_denoised", "a") as first:
        assert first.path.exists() and inspect_claim(first.path)["state"] == "busy"
        with pytest.raises(OutputBusyError, match=rf"another UniPET run \(PID {os.getpid()}, started .*\) is writing"):
            OutputClaim(tmp_path, "a_denoised", "a").acquire()
        with OutputClaim(tmp_path, "b_denoised", "b"):  # another input: independent
            pass
    assert not first.path.exists() and inspect_claim(first.path)["state"] == "none"
    with OutputClaim(tmp_path, "a_denoised", "a"):  # free again
        pass


def test_a_failed_writer_removes_only_what_it_published(tmp_path):
    mine, theirs = tmp_path / "mine.nii.gz", tmp_path / "theirs.json"
    theirs.write_text("the winner's")
    with pytest.raises(RuntimeError, match="later step"):
        with OutputClaim(tmp_path, "x_denoised", "x") as claim:
            mine.write_text("published by this run")
            claim.published.append(mine)
            raise RuntimeError("a later step failed")
    assert not mine.exists() and theirs.read_text() == "the winner's"


def test_publish_never_replaces_without_being_asked(tmp_path):
    target = tmp_path / "a_denoised.nii.gz"
    target.write_text("winner")
    tmp = temporary_path(target)
    tmp.write_text("loser")
    with pytest.raises(FileExistsError):
        publish(tmp, target, replace=False)
    assert target.read_text() == "winner" and tmp.exists()
    publish(tmp, target, replace=True)
    assert target.read_text() == "loser" and not tmp.exists()
    # folders (the DICOM series)
    series = tmp_path / "a_denoised_dicom"
    series.mkdir()
    (series / "IM00001.dcm").write_text("winner")
    staged = temporary_path(series)
    staged.mkdir()
    (staged / "IM00001.dcm").write_text("loser")
    with pytest.raises(FileExistsError):
        publish(staged, series, replace=False)
    assert (series / "IM00001.dcm").read_text() == "winner"
    publish(staged, series, replace=True)
    assert (series / "IM00001.dcm").read_text() == "loser" and not staged.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_temporary_names_record_host_and_pid():
    tmp = temporary_path(Path("/out/a_denoised.nii.gz"))
    assert tmp.name.endswith(".tmp.nii.gz"), "nibabel needs the real suffix"
    info = parse_temporary(tmp.name)
    assert info["target"] == "a_denoised.nii.gz" and info["pid"] == os.getpid() and info["kind"] == "tmp"
    assert temporary_path(Path("/out/a_denoised_qc.png")).name.endswith(".tmp.png")
    assert temporary_path(Path("/out/a_denoised_dicom")).name.endswith(".tmp")
    assert parse_temporary(temporary_path(Path("/out/a_denoised.json")).name)["target"] == "a_denoised.json"
    assert parse_temporary("a_denoised.nii.gz") is None
    assert parse_temporary(".a_denoised.nii.gz.x1y2.tmp.nii.gz") is None, "not ours (no host/PID): never touched"


def test_stale_temporaries_only_ours_only_old_only_dead(tmp_path):
    target = tmp_path / "a_denoised.nii.gz"
    old = time.time() - 3600

    def made(path: Path, age: float = old) -> Path:
        path.write_text("x")
        os.utime(path, (age, age))
        return path

    dead = dead_pid()
    stale = made(tmp_path / temporary_path(target).name.replace(f"-{os.getpid()}-", f"-{dead}-"))
    stale_dir = tmp_path / temporary_path(tmp_path / "a_denoised_dicom").name.replace(f"-{os.getpid()}-", f"-{dead}-")
    stale_dir.mkdir()
    (stale_dir / "IM00001.dcm").write_text("x")
    os.utime(stale_dir, (old, old))
    live = made(temporary_path(target))  # this process: alive
    recent = made(tmp_path / temporary_path(target).name.replace(f"-{os.getpid()}-", f"-{dead}-"), age=time.time())
    other_host = made(tmp_path / f".a_denoised.nii.gz.unipet-00000000-{dead}-0123abcd.tmp.nii.gz")
    foreign = made(tmp_path / ".a_denoised.nii.gz.x1y2.tmp.nii.gz")
    output = made(target)
    removed = clean_stale_temporaries(tmp_path, stale_minutes=30)
    assert sorted(removed) == sorted([stale, stale_dir])
    for kept in (live, recent, other_host, foreign, output):
        assert kept.exists(), kept.name


def kill9_while_publishing(out: Path, name: str, outputs: list[str]) -> int:
    """A child process that takes the claim of ``name``, records it is publishing ``outputs``, writes the
    first of them, and is then killed with SIGKILL. Returns its PID."""
    code = (
        "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from scripts.inference.claims import OutputClaim;"
        "out = Path(sys.argv[2]); c = OutputClaim(out, sys.argv[3] + '_denoised', 'x'); c.acquire();"
        "c.publishing([out / n for n in sys.argv[4:]]); (out / sys.argv[4]).write_text('half');"
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(BUNDLE_ROOT), str(out), name, *outputs], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_a_run_killed_while_publishing_is_redone_without_overwrite(tmp_path, caplog):
    data, out = tmp_path / "in", tmp_path / "out"
    save_nifti(body(), AFFINE, data / "a.nii.gz")
    save_nifti(body(seed=1), AFFINE, data / "b.nii.gz")
    out.mkdir()
    kill9_while_publishing(out, "a", ["a_denoised.nii.gz", "a_denoised.json"])
    assert (out / "a_denoised.nii.gz").read_text() == "half" and inspect_claim(out / ".a_denoised.unipet-claim")[
        "state"
    ] == "stale"
    caplog.set_level("WARNING")
    assert [i["name"] for i in prepare_datalist(data, out, "nifti", False)] == ["a", "b"]
    assert "killed while writing its outputs" in caplog.text
    # the re-run replaces the partial set (no --overwrite) and leaves a complete, consistent one
    w = writer(out, "rerun")
    w(item(body(), "a", data / "a.nii.gz"))
    assert_consistent(out)
    assert json.loads((out / "a_denoised.json").read_text())["processing"]["run"] == "rerun"
    # now complete: done, so a third run refuses it as usual
    with pytest.raises(UniPETInputError, match="a_denoised.nii.gz already exists"):
        prepare_datalist(data, out, "nifti", False)
    # an output that the killed run's claim does not list is never taken for ours
    other = tmp_path / "other"
    other.mkdir()
    kill9_while_publishing(other, "b", ["b_denoised.json"])
    (other / "b_denoised.nii.gz").write_text("someone's")
    with pytest.raises(UniPETInputError, match="b_denoised.nii.gz already exists"):
        prepare_datalist(data, other, "nifti", False)
    assert (other / "b_denoised.nii.gz").read_text() == "someone's"


def test_a_run_killed_before_publishing_does_not_make_outputs_replaceable(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from scripts.inference.claims import OutputClaim; c = OutputClaim(Path(sys.argv[2]), 'a_denoised', 'a');"
        "c.acquire(); print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(BUNDLE_ROOT), str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert inspect_claim(out / ".a_denoised.unipet-claim")["state"] == "busy", "a live owner holds the lock"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (out / "a_denoised.nii.gz").write_text("someone's")
    with OutputClaim(out, "a_denoised", "a") as claim:
        assert claim.replaceable == set()
    # an unused claim of a dead run goes once old enough
    (out / ".b_denoised.unipet-claim").write_text(json.dumps({"pid": dead_pid(), "phase": "writing"}))
    os.utime(out / ".b_denoised.unipet-claim", (time.time() - 7200,) * 2)
    assert clean_stale_temporaries(out, 30) == [out / ".b_denoised.unipet-claim"]


def test_a_live_writer_of_the_same_input_stops_a_second_run_before_any_work(tmp_path):
    data, out = tmp_path / "in", tmp_path / "out"
    save_nifti(body(), AFFINE, data / "a.nii.gz")
    with OutputClaim(out, "a_denoised", "a"):
        with pytest.raises(OutputBusyError, match="is writing these outputs"):
            prepare_datalist(data, out, "nifti", True)


# ------------------------------------------------------------------------------- the writer, racing


def test_the_loser_never_touches_the_winners_outputs(tmp_path):
    out = tmp_path / "out"
    writer(out, "winner")(item(body(seed=1)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputConflictError, match="already exists .*it is kept"):
        writer(out, "loser")(item(body(seed=2)))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert_consistent(out)


@pytest.mark.parametrize("foreign", [["sidecar"], ["nifti", "sidecar"]], ids=["sidecar", "whole-set"])
def test_outputs_that_appear_while_staging_are_kept_and_the_loser_cleans_only_its_own(tmp_path, monkeypatch, foreign):
    """Another writer (one without claims, e.g. an older version) publishes while this run stages.

    The issue's failure: the loser replaced the winner's NIfTI, then met the winner's sidecar, gave up
    and deleted "its" NIfTI, which left the winner's sidecar pointing at a missing file (reproduced on
    0.2.0 by publishing the winner's set from inside the loser's NIfTI write).
    """
    out = tmp_path / "out"
    w = writer(out, "loser")
    real = SaveDenoisedd._stage

    def stage_then_foreign(self, staged, paths, *args):
        real(self, staged, paths, *args)
        for key in foreign:
            paths[key].write_text(f"winner's {key}")

    monkeypatch.setattr(SaveDenoisedd, "_stage", stage_then_foreign)
    with pytest.raises(OutputConflictError, match="appeared while this run was writing it"):
        w(item(body()))
    names = {"nifti": "a_denoised.nii.gz", "sidecar": "a_denoised.json"}
    assert sorted(p.name for p in out.iterdir()) == sorted(names[k] for k in foreign), (
        "only the winner's files are left"
    )
    for key in foreign:
        assert (out / names[key]).read_text() == f"winner's {key}"


@pytest.mark.parametrize("overwrite", [False, True])
def test_writers_racing_in_threads_leave_a_consistent_set(tmp_path, overwrite):
    for trial in range(6):
        out = tmp_path / f"t{trial}"
        barrier = threading.Barrier(2)
        results: dict[str, object] = {}

        def run(label: str, seed: int) -> None:
            w = writer(out, label, overwrite)
            data = item(body(shape=(20, 20, 16), seed=seed))
            barrier.wait()
            try:
                w(data)
                results[label] = "ok"
            except (OutputBusyError, OutputConflictError) as exc:
                results[label] = exc

        threads = [threading.Thread(target=run, args=(f"run{k}", k)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [k for k, v in results.items() if v == "ok"]
        assert winners, results
        if not overwrite:
            assert len(winners) == 1, results
        assert_consistent(out)
        side = json.loads((out / "a_denoised.json").read_text())
        assert side["processing"]["run"] in winners


# ------------------------------------------------------------------------- two real runs, racing


def _start(data: Path, out: Path, overlap: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--dataset_dir",
            str(data),
            "--output_dir",
            str(out),
            "--checkpoint",
            "",
            "--allow_untrained",
            "true",
            "--progress",
            "false",
            "--overlap",
            overlap,
            *TINY,
        ],
        cwd=BUNDLE_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_bundle_runs_into_one_folder(tmp_path):
    """The issue's trial: two runs with the same inputs and output folder at once, several times."""
    data = tmp_path / "in"
    for k in range(3):
        save_nifti(body(shape=(16, 16, 12), seed=k), AFFINE, data / f"s{k}.nii.gz")
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        procs = {overlap: _start(data, out, overlap) for overlap in ("0.25", "0.5")}
        results = {overlap: (p.wait(timeout=300), *p.communicate()) for overlap, p in procs.items()}
        codes = sorted(rc for rc, _, _ in results.values())
        assert codes in ([0, 0], [0, 2], [2, 2]), {k: (rc, err[-1500:]) for k, (rc, _, err) in results.items()}
        for overlap, (rc, _, err) in results.items():
            if rc == 2:
                lines = [line for line in err.splitlines() if line.startswith("error:")]
                assert len(lines) == 1 and any(
                    m in lines[0] for m in ("is writing these outputs", "already exists", "appeared while this run")
                ), err[-1500:]
                assert "Traceback" not in err
        assert_consistent(out)
        if 0 in codes:
            winner = next(o for o, r in results.items() if r[0] == 0)
            # a run that exited 0 wrote every input, and its outputs survived the other run
            for k in range(3):
                side = json.loads((out / f"s{k}_denoised.json").read_text())
                assert str(side["processing"]["overlap"]) == winner
                img = nib.load(str(out / f"s{k}_denoised.nii.gz"))
                assert img.shape == (16, 16, 12)


# ------------------------------------------------------------- kill -9 between the NIfTI and the DICOM series

_KILLABLE_RUN = """
import runpy, sys, time
sys.path.insert(0, ".")
import scripts.inference.writer as writer
real = writer.publish
def publish_then_hang(tmp, target, replace):
    real(tmp, target, replace)
    if target.name.endswith(".nii.gz"):  # the NIfTI is in place, the DICOM series and the sidecar are not
        print("PUBLISHED-NIFTI", flush=True)
        time.sleep(120)
writer.publish = publish_then_hang
sys.argv = ["monai.bundle"] + sys.argv[1:]
runpy.run_module("monai.bundle", run_name="__main__")
"""


@pytest.mark.slow
def test_kill_9_between_nifti_and_dicom_then_a_plain_rerun_completes_the_set(tmp_path):
    import pet_dicom_factory as factory

    data, out = tmp_path / "in", tmp_path / "out"
    factory.write_synthetic_series(data / "pet", body((10, 9, 6)) / factory.expected_factor(), spacing=(4.0, 4.0, 4.0))
    args = [
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--output_format",
        "both",
        "--checkpoint",
        "",
        "--allow_untrained",
        "true",
        "--progress",
        "false",
        *TINY,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_RUN, *args],
        cwd=BUNDLE_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:
        if "PUBLISHED-NIFTI" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in out.iterdir())
    assert "pet_denoised.nii.gz" in left and "pet_denoised_dicom" not in left and "pet_denoised.json" not in left, left
    assert any(".unipet-" in n for n in left), f"the killed run's temporaries and claim are there: {left}"
    rerun = run_python("-m", "monai.bundle", *args, OMP_NUM_THREADS="1")
    assert rerun.returncode == 0, rerun.stderr[-3000:]  # no --overwrite needed: the set was ours and partial
    assert "killed while writing its outputs" in rerun.stdout + rerun.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "pet_denoised.json",
        "pet_denoised.nii.gz",
        "pet_denoised_dicom",
        "pet_denoised_qc.json",
        "pet_denoised_qc.png",
    ]
    assert_consistent(out)
    side = json.loads((out / "pet_denoised.json").read_text())
    import pydicom

    first = sorted((out / "pet_denoised_dicom").iterdir())[0]
    assert pydicom.dcmread(first).SeriesInstanceUID == side["dicom_series_instance_uid"]


# ------------------------------------------- the partial set of a dead run outlives a retry that fails or dies


def _die(claim: OutputClaim) -> None:
    """What ``kill -9`` does to a claim's owner: the lock goes with the process, the claim file stays as written."""
    os.close(claim._fd)
    claim._fd = None


def _killed_while_publishing(out: Path, names: tuple[str, ...] = ("a_denoised.nii.gz", "a_denoised.json")) -> None:
    """Run A: records that it publishes ``names`` (the NIfTI first), puts the NIfTI in place and dies."""
    a = OutputClaim(out, "a_denoised", "a")
    a.acquire()
    a.publishing([out / n for n in names])
    (out / "a_denoised.nii.gz").write_text("half")
    _die(a)


def test_a_retry_that_fails_keeps_the_dead_runs_partial_set_on_record(tmp_path, monkeypatch):
    """A dies while publishing; B (no --overwrite) takes its claim and fails (disk full while staging);
    C must still replace A's partial NIfTI without --overwrite. Before the fix B's failure removed the
    claim file, A's NIfTI stayed behind for good and C refused the input ("already exists")."""
    data, out = tmp_path / "in", tmp_path / "out"
    save_nifti(body(), AFFINE, data / "a.nii.gz")
    out.mkdir()
    _killed_while_publishing(out)

    def disk_full(self, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(SaveDenoisedd, "_stage", disk_full)
        with pytest.raises(UniPETInputError, match="no space left on device"):
            writer(out, "B")(item(body(), "a", data / "a.nii.gz"))
    claim = out / ".a_denoised.unipet-claim"
    state = inspect_claim(claim)
    assert state["state"] == "stale", "B's failure must not remove the record of A's partial set"
    # only what A recorded and left: A never wrote the sidecar, so it is not on record as replaceable
    assert claims.partial_outputs(state["owner"]) == ["a_denoised.nii.gz"]
    assert (out / "a_denoised.nii.gz").read_text() == "half", "B never deletes a file it did not create"
    # C: accepted without --overwrite, replaces the partial set, and leaves a complete, consistent one
    assert [i["name"] for i in prepare_datalist(data, out, "nifti", False)] == ["a"]
    writer(out, "C")(item(body(), "a", data / "a.nii.gz"))
    assert_consistent(out)  # the claim is gone too: nothing of A's partial set is left
    assert json.loads((out / "a_denoised.json").read_text())["processing"]["run"] == "C"
    with pytest.raises(UniPETInputError, match="a_denoised.nii.gz already exists"):
        prepare_datalist(data, out, "nifti", False)


def test_a_retry_that_fails_on_a_conflict_keeps_the_record_and_widens_nothing(tmp_path):
    """B meets an output A never recorded (someone else's): it stops; A's partial NIfTI stays replaceable,
    the other file never becomes so."""
    out = tmp_path / "out"
    out.mkdir()
    _killed_while_publishing(out, ("a_denoised.nii.gz",))
    (out / "a_denoised.json").write_text("someone's")
    with pytest.raises(OutputConflictError, match="a_denoised.json already exists"):
        writer(out, "B")(item(body()))
    with OutputClaim(out, "a_denoised", "a") as c:
        assert c.replaceable == {out / "a_denoised.nii.gz"}
    assert (out / "a_denoised.json").read_text() == "someone's"


@pytest.mark.parametrize("when", ["before-publishing", "while-publishing"])
def test_a_retry_killed_keeps_the_dead_runs_partial_set_on_record(tmp_path, when):
    """B takes A's claim and is killed (simulated: its lock goes, its claim file stays as it wrote it),
    before it starts publishing or after its own NIfTI replaced A's: C still replaces the partial set."""
    out = tmp_path / "out"
    out.mkdir()
    _killed_while_publishing(out)
    b = OutputClaim(out, "a_denoised", "a")
    b.acquire()
    assert out / "a_denoised.nii.gz" in b.replaceable
    if when == "while-publishing":
        b.publishing([out / "a_denoised.nii.gz", out / "a_denoised_qc.json", out / "a_denoised.json"])
        (out / "a_denoised.nii.gz").write_text("B's")
    _die(b)
    with OutputClaim(out, "a_denoised", "a") as c:
        assert c.replaceable == {out / "a_denoised.nii.gz"}  # listed and still there; nothing else
    assert inspect_claim(out / ".a_denoised.unipet-claim")["state"] == "stale", "C replaced nothing: still on record"
    # a sweep of old leftovers keeps such a claim; a real rerun completes the set and removes it
    os.utime(out / ".a_denoised.unipet-claim", (time.time() - 7200,) * 2)
    assert clean_stale_temporaries(out, 30) == []
    writer(out, "C")(item(body()))
    assert_consistent(out)
