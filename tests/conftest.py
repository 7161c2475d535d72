"""Shared test set-up: puts the bundle root on sys.path (as ``monai.bundle run`` does) and names shared paths."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from monai.bundle import ConfigParser, ConfigWorkflow

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "unipet_bundle"
SHARED_DIR = Path(os.environ.get("UNIPET_SHARED_DIR", REPO_ROOT.parent / "shared"))
REAL_PET_DIR = SHARED_DIR / "data" / "real_pet" / "tcia_sts001_fdg_wb" / "FDG_PET" / "image"

if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

# Small thread count: CI has 2 cores and the suite must stay deterministic and fast.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE_ROOT


@pytest.fixture(scope="session")
def real_pet_dir() -> Path:
    """The real FDG series in ../shared. Missing in CI is a failure, not a skip: say how to fix it."""
    if not REAL_PET_DIR.is_dir():
        pytest.fail(
            f"real PET series not found at {REAL_PET_DIR}: clone the project with ../shared beside it "
            "or set UNIPET_SHARED_DIR to the shared folder"
        )
    return REAL_PET_DIR


@pytest.fixture(scope="session")
def real_series_default_output(real_pet_dir, tmp_path_factory) -> Path:
    """The real series (as folder ``sts001``) through ``inference.json`` with every default (the shipped
    weights, fp32): one whole-body run (~20 s on 2 cores), shared by the tests that only read its output.
    Returns the output folder (``sts001_denoised.nii.gz`` and its sidecar)."""
    root = tmp_path_factory.mktemp("real_series_default")
    data = root / "in"
    data.mkdir()
    (data / "sts001").symlink_to(real_pet_dir, target_is_directory=True)
    run_inference_in_process(dataset_dir=str(data), output_dir=str(root / "out"))
    return root / "out"


def run_python(
    *argv: object,
    cwd: str | os.PathLike = BUNDLE_ROOT,
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
    **env_vars: str,
) -> subprocess.CompletedProcess:
    """``python <argv>`` in a new interpreter, as a user runs the bundle's tools: the one subprocess runner of the tests.

    Args:
        argv: the interpreter's arguments, e.g. ``"-m", "monai.bundle", "run", ...`` or ``"-c", code, ...``
            (converted with ``str``).
        cwd: working folder (default the bundle root, where ``-m scripts.*`` and ``configs/*.json`` resolve).
        timeout: seconds before ``subprocess.TimeoutExpired``.
        env: the child's environment (default this process's); ``PYTHONUNBUFFERED=1`` is always added, so
            stdout and stderr keep their order, and so are ``env_vars`` (e.g. ``OMP_NUM_THREADS="1"``).

    Returns:
        the finished process, stdout and stderr captured as text.
    """
    full_env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1", **env_vars}
    return subprocess.run(
        [sys.executable, *map(str, argv)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def bundle_parser(config_files: Sequence[str] = ("inference.json",), **overrides: Any) -> ConfigParser:
    """The bundle's configs as ``monai.bundle run`` parses them, without running anything: the one in-process
    config parser of the tests.

    Args:
        config_files: file names under ``configs/``, merged in this order (e.g. ``("train.json", "evaluate.json")``).
        overrides: config keys set after ``bundle_root`` (this checkout's bundle), so they may replace it too.

    Returns:
        the ConfigParser; nothing parsed yet (``get_parsed_content`` instantiates on demand).
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in config_files])
    parser.update({"bundle_root": str(BUNDLE_ROOT), **overrides})
    return parser


def bundle_workflow(
    config_files: Sequence[str] = ("inference.json",), workflow_type: str = "infer", **overrides: Any
) -> ConfigWorkflow:
    """The bundle's configs in MONAI's ConfigWorkflow in this interpreter (no logging.conf), not yet initialised:
    the one in-process workflow builder of the tests.

    Args:
        config_files: file names under ``configs/``, merged in this order.
        workflow_type: ``"infer"``, ``"train"`` or ``"eval"`` (the properties ``check_properties`` checks).
        overrides: config keys; ``bundle_root`` defaults to this checkout's bundle.
    """
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=[str(BUNDLE_ROOT / "configs" / f) for f in config_files],
        logging_file=False,
        workflow_type=workflow_type,
        **{"bundle_root": str(BUNDLE_ROOT), **overrides},
    )


def run_workflow_in_process(workflow: ConfigWorkflow) -> ConfigWorkflow:
    """Initialise, run and finalise ``workflow`` (e.g. from ``bundle_workflow``) as ``monai.bundle run`` does.

    Returns:
        the same workflow, finished (its parser holds the parsed config).
    """
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def run_inference_in_process(**overrides: Any) -> ConfigWorkflow:
    """``configs/inference.json`` through MONAI's ConfigWorkflow in this interpreter (no logging.conf, no
    progress bars unless ``progress`` is given), with ``overrides`` as config keys: the one in-process inference
    runner of the tests. Returns the finished workflow."""
    overrides.setdefault("progress", False)
    return run_workflow_in_process(bundle_workflow(("inference.json",), "infer", **overrides))
