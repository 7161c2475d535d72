"""Safe loading, integrity, determinism and privacy.

- A crafted checkpoint (a pickle that runs code when unpickled) is refused by every loading path: our
  ``load_checkpoint``, inference's ``load_weights``, evaluation's ``load_eval_weights``, the
  ``LatestCheckpoint`` resume, and the configs' own loading expressions (train.json ``bdn_ckpt``,
  inference.json and evaluate.json ``checkpoint``); a corrupt or truncated checkpoint gives one clear line.
- SHA-256: a recorded hash is checked before anything is unpickled; a mismatch stops inference (exit 2).
- Checkpoint writes are atomic (an interrupted save keeps the old file), with normal permissions.
- Inference on CPU is deterministic: two runs give bit-identical NIfTI and identical DICOM pixel data.
- Patient names and IDs never reach the logs, progress output, sidecars or NIfTI outputs of the SUV tool,
  inference and evaluation (the derived DICOM series keeps them on purpose: a PACS files it by patient).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pet_dicom_factory as factory
import pydicom
import pytest
import torch
from ignite.engine import Engine
from test_hardening_inputs import one_error_line
from test_inference import TINY_KW, perturbed_checkpoint, phantom, run_in_process
from test_inference import bundle_run as bundle_run_inference
from test_training import bundle_run, train_args

from conftest import BUNDLE_ROOT, bundle_parser, bundle_workflow, run_python, run_workflow_in_process
from scripts.common.errors import CheckpointError, UniPETInputError, user_error
from scripts.common.large_files import read_large_files, recorded_sha256, write_large_files
from scripts.common.weights import atomic_torch_save, file_sha256, load_checkpoint, verify_sha256
from scripts.data.io import save_nifti
from scripts.data.suv import main as suv_main
from scripts.engines.checkpoint import LatestCheckpoint
from scripts.evaluation.weights import load_eval_weights
from scripts.inference.model import load_weights
from scripts.networks.unipet import UniPET

NET_OVERRIDES = {"channels": 4, "num_blocks": 2, "latent_dim": 8, "san_channels": [4, 4]}


# ------------------------------------------------------------------------------ crafted checkpoints


class _Payload:
    """Unpickling this calls ``exec``: with ``weights_only=False`` it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _malicious(tmp: Path) -> tuple[Path, Path]:
    marker = tmp / "PWNED"
    state = UniPET(**TINY_KW).state_dict()
    path = tmp / "malicious.pt"
    torch.save({"generator": state, "extra": _Payload(marker)}, path)
    return path, marker


def _truncated(tmp: Path) -> Path:
    path = atomic_torch_save(UniPET(**TINY_KW).state_dict(), tmp / "truncated.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_the_crafted_checkpoint_really_runs_code_when_loaded_unsafely(tmp_path):
    """Positive control: without weights_only the file executes its payload (so the refusals below matter)."""
    path, marker = _malicious(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def _parser(files: list[str], **overrides):
    return bundle_parser(files, **{**NET_OVERRIDES, **overrides})


def _latest(path: Path) -> None:
    target = path.parent / "resume"
    target.mkdir()
    (target / "checkpoint_latest.pt").write_bytes(path.read_bytes())
    LatestCheckpoint(target, {"generator": UniPET(**TINY_KW)}).attach(Engine(lambda engine, batch: None))


LOADERS = {
    "load_checkpoint": lambda p: load_checkpoint(p),
    "inference load_weights": lambda p: load_weights(UniPET(**TINY_KW), p, False),
    "evaluation load_eval_weights": lambda p: load_eval_weights(UniPET(**TINY_KW), p),
    "LatestCheckpoint resume": _latest,
    "train.json bdn_ckpt": lambda p: _parser(["train.json"], bdn_ckpt=str(p)).get_parsed_content("load_bdn"),
    "inference.json checkpoint": lambda p: _parser(["inference.json"], checkpoint=str(p)).get_parsed_content(
        "model_info"
    ),
    "evaluate.json checkpoint": lambda p: _parser(
        ["train.json", "evaluate.json"], checkpoint=str(p)
    ).get_parsed_content("checkpoint_info"),
}


def _checkpoint_error(load, path: Path) -> str:
    with pytest.raises(Exception) as info:
        load(path)
    found = user_error(info.value)
    assert isinstance(found, CheckpointError), f"not a clear checkpoint error: {info.value!r}"
    assert "\n" not in str(found)
    return str(found)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_malicious_checkpoint_is_refused_without_running_it(tmp_path, loader):
    path, marker = _malicious(tmp_path)
    message = _checkpoint_error(LOADERS[loader], path)
    assert "refused: it holds Python objects other than tensors" in message, message
    assert "weights_only" not in message, "never suggest turning the protection off"
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("loader", list(LOADERS))
def test_truncated_checkpoint_gives_one_clear_line(tmp_path, loader):
    message = _checkpoint_error(LOADERS[loader], _truncated(tmp_path))
    assert "is corrupt or truncated" in message, message
    if loader == "LatestCheckpoint resume":
        assert "--resume false" in message


def test_the_documented_fix_for_a_corrupt_latest_checkpoint_works(tmp_path):
    """The message says `--resume false`; from the command line that is the *string* "false"."""
    (tmp_path / "checkpoint_latest.pt").write_bytes(_truncated(tmp_path).read_bytes())
    net = UniPET(**TINY_KW)
    before = [p.detach().clone() for p in net.parameters()]
    LatestCheckpoint(tmp_path, {"generator": net}, resume="false").attach(Engine(lambda engine, batch: None))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_every_torch_load_in_the_bundle_is_weights_only():
    calls = []
    for path in (BUNDLE_ROOT / "scripts").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and not line.lstrip().startswith(("#", '"', "`")):
                calls.append((path.name, number, line))
    assert [(name, n) for name, n, _ in calls] == [("weights.py", calls[0][1])], (
        f"expected the one torch.load in scripts/common/weights.py: {calls}"
    )
    assert all("weights_only=True" in line for _, _, line in calls), calls
    for config in (BUNDLE_ROOT / "configs").glob("*.json"):
        text = config.read_text()
        assert "torch.load" not in text and "weights_only=False" not in text, config.name
        assert "CheckpointLoader" not in text or "weights_only" in text, (
            f"{config.name}: MONAI CheckpointLoader without weights_only"
        )


def test_corrupt_latest_checkpoint_stops_training_with_one_line(tmp_path):
    from test_hardening_inputs import pairs

    root = pairs(tmp_path / "pairs")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    latest = ckpt / "checkpoint_latest.pt"
    latest.write_bytes(_truncated(tmp_path).read_bytes())
    before = latest.read_bytes()
    proc = bundle_run(train_args(root, ckpt, tmp_path / "runs", epochs=1, epoch_length=1))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert "checkpoint_latest.pt cannot be loaded" in line and "--resume false" in line, line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert latest.read_bytes() == before, "the checkpoint must be left for the user to inspect"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_latest.pt"]


# ----------------------------------------------------------------------------------------- SHA-256


def test_verify_sha256(tmp_path, caplog):
    path = atomic_torch_save({"w": torch.arange(3.0)}, tmp_path / "m.pt")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert verify_sha256(path, digest) == digest == file_sha256(path)
    assert verify_sha256(path, digest.upper()) == digest
    with caplog.at_level(logging.WARNING):
        assert verify_sha256(path, None) == digest
    assert "no SHA-256 recorded" in caplog.text and digest in caplog.text
    with pytest.raises(
        CheckpointError, match=r"has SHA-256 [0-9a-f]{16}\.\.\., not the recorded 0000000000000000\.\.\."
    ) as err:
        verify_sha256(path, "0" * 64)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="is not a SHA-256"):
        verify_sha256(path, "abc")
    with pytest.raises(CheckpointError, match="read it as a number: quote it"):
        verify_sha256(path, 0)  # what fire makes of an all-digit hash


def test_hash_is_checked_before_unpickling(tmp_path):
    path, marker = _malicious(tmp_path)
    for load in (
        lambda: load_weights(UniPET(**TINY_KW), path, False, "1" * 64),
        lambda: load_eval_weights(UniPET(**TINY_KW), path, "1" * 64),
    ):
        with pytest.raises(CheckpointError, match="not the recorded 1111111111111111"):
            load()
    assert not marker.exists()


def test_recorded_hash_through_the_configs(tmp_path):
    ckpt = perturbed_checkpoint(tmp_path / "p.pt")
    digest = file_sha256(ckpt)
    info = _parser(["inference.json"], checkpoint=str(ckpt), checkpoint_sha256=digest).get_parsed_content("model_info")
    assert info["trained"] is True and info["checkpoint_sha256"] == digest
    info = _parser(["train.json", "evaluate.json"], checkpoint=str(ckpt), checkpoint_sha256=digest).get_parsed_content(
        "checkpoint_info"
    )
    assert info["trained"] is True and info["checkpoint_sha256"] == digest
    message = _checkpoint_error(
        lambda p: _parser(
            ["train.json", "evaluate.json"], checkpoint=str(p), checkpoint_sha256="f" * 64
        ).get_parsed_content("checkpoint_info"),
        ckpt,
    )
    assert "not the recorded ffffffffffffffff" in message


def test_large_files_record_is_what_the_configs_check(tmp_path):
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    ckpt = perturbed_checkpoint(root / "models" / "model.pt")
    other = perturbed_checkpoint(tmp_path / "mine.pt")
    assert recorded_sha256(ckpt, root) is None, "nothing recorded yet"
    write_large_files(root, {"models/model.pt": file_sha256(ckpt)})
    assert read_large_files(root)["models/model.pt"]["hash_type"] == "sha256"
    assert recorded_sha256(ckpt, root) == file_sha256(ckpt)
    assert recorded_sha256(root / "models" / ".." / "models" / "model.pt", root) == file_sha256(ckpt)
    assert recorded_sha256(other, root) is None, "a user's own weights elsewhere are not the shipped file"
    # the configs' default resolves to the record; a replaced models/model.pt is then refused before loading
    parsed = _parser(["inference.json"], checkpoint=str(ckpt), bundle_root=str(root))
    assert parsed.get_parsed_content("checkpoint_sha256") == file_sha256(ckpt)
    perturbed_checkpoint(ckpt, seed=1)
    message = _checkpoint_error(
        lambda p: _parser(["inference.json"], checkpoint=str(p), bundle_root=str(root)).get_parsed_content(
            "model_info"
        ),
        ckpt,
    )
    assert "not the recorded" in message
    (root / "large_files.yml").write_text("large_files: 3\n")
    with pytest.raises(UniPETInputError, match="not a model-zoo large_files.yml"):
        recorded_sha256(ckpt, root)


def test_hash_mismatch_stops_inference_with_exit_2(tmp_path):
    data, out = tmp_path / "in", tmp_path / "out"
    save_nifti(phantom((16, 16, 16)), np.diag([4.0, 4.0, 4.0, 1.0]), data / "a.nii.gz")
    ckpt = perturbed_checkpoint(tmp_path / "p.pt")
    proc = bundle_run_inference(
        ["--dataset_dir", data, "--output_dir", out, "--checkpoint", ckpt, "--checkpoint_sha256", "ab" * 32]
        + [arg for k, v in NET_OVERRIDES.items() for arg in (f"--{k}", json.dumps(v))]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "not the recorded abababababababab" in one_error_line(proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------- atomic writes


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = atomic_torch_save({"w": torch.ones(3)}, tmp_path / "checkpoint_latest.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, "checkpoints get the permissions open() would give"
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # what Ctrl-C mid-save looks like

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pt"], "no temporary file left"
    # a save killed by SIGKILL leaves its temporary file: the next run removes it
    (tmp_path / ".checkpoint_latest.pt.x1y2.tmp").write_bytes(b"partial")
    LatestCheckpoint(tmp_path, {"w": torch.nn.Linear(3, 1)}, resume=False).attach(Engine(lambda e, b: None))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pt"]


def _workflow(files: list[str], **overrides):
    return bundle_workflow(files, "train" if files == ["train.json"] else "eval", **NET_OVERRIDES, **overrides)


def test_training_never_replaces_another_runs_weights_unless_asked(tmp_path):
    from test_hardening_inputs import pairs

    root = pairs(tmp_path / "pairs")
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes(b"released weights")
    common = dict(
        dataset_dir=str(root),
        ckpt_dir=str(ckpt),
        output_dir=str(tmp_path / "runs"),
        patch_size=[8, 8, 8],
        critic_channels=[4, 8],
    )
    with pytest.raises(Exception) as info:
        _workflow(["train.json"], **common).initialize()
    message = str(user_error(info.value))
    assert "already holds model.pt of another training run" in message and "--overwrite true" in message, message
    assert (ckpt / "model.pt").read_bytes() == b"released weights"
    _workflow(["train.json"], overwrite="true", **common).initialize()  # asked: allowed
    # resuming its own run is not replacing someone else's weights
    atomic_torch_save({}, ckpt / "checkpoint_latest.pt")
    _workflow(["train.json"], **common).initialize()


def test_evaluation_never_replaces_an_earlier_report_unless_asked(tmp_path):
    eval_dir = tmp_path / "runs" / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "summary.json").write_text("{}")
    common = dict(
        dataset_dir=str(tmp_path / "absent"),
        ckpt_dir=str(tmp_path / "ckpt"),
        output_dir=str(tmp_path / "runs"),
        checkpoint="",
        allow_untrained=True,
    )
    with pytest.raises(Exception) as info:
        _workflow(["train.json", "evaluate.json"], **common).initialize()
    message = str(user_error(info.value))
    assert "already holds summary.json of an earlier evaluation" in message and "--overwrite true" in message, message
    workflow = _workflow(["train.json", "evaluate.json"], overwrite="true", **common)
    workflow.initialize()  # asked: it goes on, and meets the missing dataset only when it runs
    with pytest.raises(Exception) as info:
        workflow.run()
    assert "does not exist" in str(user_error(info.value))
    assert (eval_dir / "summary.json").read_text() == "{}"


# ---------------------------------------------------------------------------------- determinism


def test_inference_twice_is_bit_identical_on_cpu(tmp_path):
    data = tmp_path / "in"
    suv = phantom((18, 16, 12), seed=5, hot=None)
    factory.write_synthetic_series(data / "pet", suv / factory.expected_factor(), spacing=(3.0, 3.0, 4.0))
    save_nifti(phantom((20, 18, 16), seed=6), np.diag([4.0, 4.0, 4.0, 1.0]), data / "b.nii.gz")
    ckpt = perturbed_checkpoint(tmp_path / "p.pt")
    runs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        run_in_process(
            dataset_dir=str(data),
            output_dir=str(out),
            checkpoint=str(ckpt),
            output_format="both",
            patch_size=[16, 16, 16],
            **NET_OVERRIDES,
        )
        runs.append(out)
    for name in ("pet_denoised.nii.gz", "b_denoised.nii.gz"):
        first, second = (runs[0] / name).read_bytes(), (runs[1] / name).read_bytes()
        assert first == second, f"{name} differs between two runs"
    identity = np.asarray(nib.load(str(runs[0] / "b_denoised.nii.gz")).dataobj)
    assert np.abs(identity - np.asarray(nib.load(str(data / "b.nii.gz")).dataobj)).max() > 1e-3, "the network must act"
    slices = [sorted((out / "pet_denoised_dicom").glob("*.dcm")) for out in runs]
    assert len(slices[0]) == len(slices[1]) == 12
    for a, b in zip(*slices):
        da, db = pydicom.dcmread(a), pydicom.dcmread(b)
        assert da.PixelData == db.PixelData and da.RescaleSlope == db.RescaleSlope
        assert da.SOPInstanceUID != db.SOPInstanceUID, "new UIDs per run are expected (and are the only difference)"


# ---------------------------------------------------------------------------------------- privacy

SECRETS = ("SECRETNAME", "JANE", factory.PATIENT_ID, "SECRETBIRTH", "OTHERID99")


def _mark(ds, k) -> None:
    ds.PatientName = factory.PATIENT_NAME + "^" + "X" * 70  # over-long: pydicom validation warnings too
    ds.PatientID = factory.PATIENT_ID
    ds.PatientBirthName = "SECRETBIRTH^MARY"
    ds.OtherPatientIDsSequence = [pydicom.Dataset()]
    ds.OtherPatientIDsSequence[0].PatientID = "OTHERID99"


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_patient_identifiers_never_reach_logs_or_outputs(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    series_dir = tmp_path / "dicom" / "scan1"
    suv = phantom((16, 14, 12), seed=8, hot=None) + 0.5
    factory.write_synthetic_series(series_dir, suv / factory.expected_factor(), spacing=(4.0, 4.0, 4.0), edit=_mark)
    assert _leaks(b"".join(p.read_bytes() for p in series_dir.iterdir()).decode("latin-1")), (
        "the input must carry the marks"
    )

    # SUV tool
    suv_nifti = tmp_path / "suv" / "scan1.nii.gz"
    suv_main(dicom_dir=str(series_dir), output=str(suv_nifti))
    # inference (DICOM in, NIfTI + sidecar + derived DICOM out)
    run_in_process(
        dataset_dir=str(tmp_path / "dicom"),
        output_dir=str(tmp_path / "denoised"),
        output_format="both",
        checkpoint=str(perturbed_checkpoint(tmp_path / "p.pt")),
        patch_size=[16, 16, 16],
        **NET_OVERRIDES,
    )
    # evaluation on pairs made from the SUV volume the tool wrote
    full = np.asarray(nib.load(str(suv_nifti)).dataobj)
    affine = nib.load(str(suv_nifti)).affine
    save_nifti(full, affine, tmp_path / "pairs" / "scan1" / "full_dose.nii.gz")
    save_nifti(
        full + np.random.default_rng(0).normal(0, 0.2, full.shape),
        affine,
        tmp_path / "pairs" / "scan1" / "drf_10.nii.gz",
    )
    run_workflow_in_process(
        _workflow(
            ["train.json", "evaluate.json"],
            dataset_dir=str(tmp_path / "pairs"),
            ckpt_dir=str(tmp_path / "ckpt"),
            output_dir=str(tmp_path / "runs"),
            eval_split="all",
            patch_size=[16, 16, 16],
            checkpoint="",
            allow_untrained=True,
        )
    )

    captured = capfd.readouterr()
    logged = caplog.text + captured.out + captured.err
    assert "evaluating 1 pairs" in logged and "denoised scan1" in logged and "SUV factor" in logged, (
        "the runs must have logged"
    )
    assert not _leaks(logged), f"identifiers in the logs: {_leaks(logged)}"
    outputs = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file()
        and "dicom" not in p.parts
        and p.suffix != ".pt"
        and not any(part.endswith("_denoised_dicom") for part in p.parts)
    ]
    assert any(p.name == "metrics.csv" for p in outputs) and any(p.name == "scan1_denoised.json" for p in outputs)
    for p in outputs:
        body = p.read_bytes()
        if p.name.endswith(".gz"):
            import gzip

            body = gzip.decompress(body)
        assert not _leaks(body.decode("latin-1")), f"identifiers in {p}"
    # the derived series is filed with the patient's other images, so it keeps them (by design)
    derived = pydicom.dcmread(next((tmp_path / "denoised" / "scan1_denoised_dicom").glob("*.dcm")))
    assert str(derived.PatientID) == factory.PATIENT_ID


# ------------------------------------------------------------------------- disk full (issue 12, "Also")

_ENOSPC_RUN = """
import errno, runpy, sys
import pydicom.filewriter as fw
real = fw.write_data_element
def full(fp, elem, *args, **kwargs):
    if elem.tag == 0x7FE00010:  # PixelData: the disk fills up in the middle of the series
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(fp, elem, *args, **kwargs)
fw.write_data_element = full
sys.argv = ["monai.bundle"] + sys.argv[1:]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def test_disk_full_while_writing_the_dicom_series_is_one_sentence(tmp_path):
    """pydicom re-raises a write error with the whole traceback (venv paths) in its message: 564 characters
    of it used to be the "one line". Now: what happened, what to do, nothing of that input kept."""
    data, out = tmp_path / "in", tmp_path / "out"
    factory.write_synthetic_series(
        data / "pet", phantom((10, 9, 6), hot=None) / factory.expected_factor(), spacing=(4.0, 4.0, 4.0)
    )
    proc = run_python(
        "-c",
        _ENOSPC_RUN,
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        data,
        "--output_dir",
        out,
        "--output_format",
        "both",
        "--checkpoint",
        "",
        "--allow_untrained",
        "true",
        "--progress",
        "false",
        *[str(a) for kv in NET_OVERRIDES.items() for a in (f"--{kv[0]}", json.dumps(kv[1]))],
        "--patch_size",
        "[16,16,16]",
        OMP_NUM_THREADS="1",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert "is full (no space left on device) while writing the outputs of pet" in line and "free some space" in line, (
        line
    )
    assert len(line) < 300 and "site-packages" not in line and "Traceback" not in proc.stderr, line
    assert sorted(p.name for p in out.iterdir()) == [], "nothing of the input kept: no NIfTI, no series, no temporaries"


def test_a_write_error_without_errno_is_shown_by_its_first_line():
    from scripts.common.errors import _one_line

    try:
        try:
            raise OSError(28, "No space left on device", "/out/x.dcm")
        except OSError as exc:  # what pydicom's tag_in_exception does
            raise OSError(
                f'With tag (7FE0,0010) got exception: {exc}\nTraceback (most recent call last):\n  File "/venv/..."'
            ) from exc
    except OSError as wrapped:
        assert _one_line(wrapped) == "OSError: No space left on device: /out/x.dcm"
        assert _one_line(OSError("first line\nTraceback ...")) == "OSError: first line"


def test_disk_full_while_writing_the_nifti_keeps_nothing_of_that_input(tmp_path, monkeypatch):
    import errno

    from test_output_races import body, item, writer

    from scripts.common.errors import OutputWriteError
    from scripts.inference import writer as writer_module

    def full(suv, affine, path):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer_module, "_write_nifti", full)
    out = tmp_path / "out"
    with pytest.raises(
        OutputWriteError, match=r"out is full \(no space left on device\) while writing the outputs of a: nothing"
    ):
        writer(out, "full")(item(body()))
    assert list(out.iterdir()) == [], "no partial NIfTI, temporary or claim left"


def test_names_are_shown_so_that_they_cannot_start_a_line():
    from scripts.common.errors import escape_controls, shown

    assert shown("sub01") == "sub01" and shown("PET WB") == "PET WB"
    assert shown("a\nerror: x") == "'a\\nerror: x'" and "\n" not in shown("a\r\nb")
    assert shown("x\x1b[2J") == "'x\\x1b[2J'" and shown(" lead") == "' lead'"
    assert escape_controls("ok\nerror: forged\x1b") == "ok\\nerror: forged\\x1b"
