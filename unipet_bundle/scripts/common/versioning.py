"""The bundle's version, read in one place: ``version`` of ``<bundle root>/configs/metadata.json``.

Outputs record it (inference sidecars and the derived DICOM series, simulated datasets' provenance) and the
packaging tool names the zip after it; all of them read it here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["BUNDLE_ROOT", "bundle_version", "read_metadata"]

#: the bundle root of this code (the folder holding ``configs/`` and ``scripts/``)
BUNDLE_ROOT = Path(__file__).resolve().parents[2]


def read_metadata(bundle_root: str | os.PathLike = BUNDLE_ROOT) -> Any:
    """The parsed ``<bundle_root>/configs/metadata.json``.

    Raises:
        OSError: the file cannot be read. ValueError: it is not JSON (``json.JSONDecodeError``).
    """
    return json.loads((Path(bundle_root) / "configs" / "metadata.json").read_text())


def bundle_version(bundle_root: str | os.PathLike = BUNDLE_ROOT) -> str:
    """``version`` of ``<bundle_root>/configs/metadata.json``, or ``"unknown"`` when it cannot be read.

    Outputs only record the version, so a missing or malformed metadata file must not stop a run; the
    packaging tool, which must not package an unknown version, checks it strictly itself.
    """
    try:
        return str(read_metadata(bundle_root).get("version") or "unknown")
    except (OSError, ValueError, AttributeError):
        return "unknown"
