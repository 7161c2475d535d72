"""Denoise one study (or a folder of studies) with the bundle's inference config, in one short command.

    cd unipet_bundle
    python -m scripts.denoise /data/patient01.nii.gz /data/denoised
    python -m scripts.denoise /data/pet_series_folder /data/denoised --output_format both
    python -m scripts.denoise --help

``IN`` is a NIfTI file (SUV), a PET DICOM series folder, or a folder holding several of them; ``OUT`` is
the output folder. This runs ``configs/inference.json`` itself (``monai.bundle.run``, the same config as
``python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT``),
so every rule of the bundle holds: the checkpoint, claims and atomic outputs, the sidecar, the QC report
(``<name>_denoised_qc.png`` / ``.json``), one-line errors with exit status 2. Any other config key can be
given as ``--key value`` (e.g. ``--qc_report false``, ``--checkpoint models/my_model.pt``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.denoise",
        description="Denoise low-dose PET with UniPET: one NIfTI file (SUV), one PET DICOM series folder, or a folder of "
        "them. Runs the bundle's configs/inference.json; writes <name>_denoised.nii.gz, its sidecar JSON and the QC "
        "report (<name>_denoised_qc.png/.json) into OUT.",
        epilog="Any other key of configs/inference.json can be set as --key value, e.g. --qc_report false, "
        "--qc_max_hotspot_change_pct 8, --checkpoint models/model.pt, --device cpu. Research use only, not for diagnosis.",
    )
    parser.add_argument(
        "input", help="a NIfTI file (*.nii, *.nii.gz, in SUV), a PET DICOM series folder, or a folder of them"
    )
    parser.add_argument("output", help="the output folder (created if missing)")
    parser.add_argument(
        "--output_format",
        choices=("nifti", "dicom", "both"),
        default=None,
        help="nifti (default of the config), dicom (a derived PET series, DICOM inputs only) or both",
    )
    parser.add_argument(
        "--overwrite", default=None, metavar="true|false", help="replace existing outputs (default false)"
    )
    parser.add_argument(
        "--config_file",
        default=str(BUNDLE_ROOT / "configs" / "inference.json"),
        help="the inference config (default: this bundle's configs/inference.json)",
    )
    return parser


def _value(text: str) -> Any:
    """A CLI value as the config expects it: JSON when it parses (numbers, lists, null), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _overrides(extra: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    items = list(extra)
    while items:
        key = items.pop(0)
        if not key.startswith("--") or len(key) < 3:
            raise SystemExit(f"error: unexpected argument {key!r}: other config keys are given as --key value")
        if "=" in key:
            key, text = key.split("=", 1)
        elif items and not items[0].startswith("--"):
            text = items.pop(0)
        else:
            raise SystemExit(f"error: {key} needs a value (--key value)")
        out[key[2:]] = _value(text)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the inference config; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = _overrides(extra)
    src, dst = Path(args.input).expanduser(), Path(args.output).expanduser()
    if not src.exists():
        print(
            f"error: input {src} does not exist: pass a NIfTI file, a PET DICOM series folder or a folder of them",
            file=sys.stderr,
        )
        return 2
    for key in ("output_format", "overwrite"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if str(BUNDLE_ROOT) not in sys.path:
        sys.path.insert(0, str(BUNDLE_ROOT))
    from monai.bundle import run

    config_file = Path(args.config_file)
    logging_file = BUNDLE_ROOT / "configs" / "logging.conf"
    run(
        config_file=str(config_file),
        logging_file=str(logging_file) if logging_file.is_file() else None,
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(src.absolute()),
        output_dir=str(dst.absolute()),
        **overrides,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
