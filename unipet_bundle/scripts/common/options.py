"""Checks of option values given to the configs and the command-line tools.

``monai.bundle run`` hands command-line values over as ``fire`` parsed them: ``--overwrite true`` arrives
as the *string* ``"true"`` (only ``True`` with a capital becomes a bool), which Python would take as true
even when it reads ``"false"``. Every boolean option therefore goes through :func:`as_bool`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from scripts.common.errors import UniPETInputError

__all__ = ["OUTPUT_FORMATS", "as_bool", "check_output_format", "check_spacing", "finite_number"]

OUTPUT_FORMATS = ("nifti", "dicom", "both")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def as_bool(value: Any, name: str) -> bool:
    """``True``/``False``, ``1``/``0`` or the strings true/false/yes/no/on/off (any case) -> bool.

    Raises:
        UniPETInputError: anything else (the message names the option).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise UniPETInputError(f"--{name} must be true or false, got {value!r}")


def finite_number(value: Any, name: str, positive: bool = False) -> float:
    """``value`` as a float that is finite and > 0 (``positive``) or >= 0, else a ValueError naming ``name``
    (NaN and infinity included: a knob that is not a number must stop a run, not make it silently different)."""
    number = float(value)
    if not (math.isfinite(number) and (number > 0 if positive else number >= 0)):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value}")
    return number


def check_output_format(value: Any) -> str:
    """``nifti`` (default), ``dicom`` or ``both`` (any case).

    Raises:
        UniPETInputError: another value.
    """
    text = str(value).strip().lower()
    if text not in OUTPUT_FORMATS:
        raise UniPETInputError(f"--output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {value!r}")
    return text


def check_spacing(value: Any, name: str = "target_spacing") -> list[float]:
    """Three positive voxel sizes in mm (a single number means isotropic).

    Raises:
        UniPETInputError: not 1 or 3 finite numbers > 0.
    """
    values: Sequence[Any] = [value] if isinstance(value, (int, float)) else value
    try:
        spacing = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UniPETInputError(f'--{name} must be 3 voxel sizes in mm, e.g. "[4.0,4.0,4.0]", got {value!r}') from None
    if len(spacing) == 1:
        spacing = spacing * 3
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise UniPETInputError(f'--{name} must be 3 voxel sizes in mm > 0, e.g. "[4.0,4.0,4.0]", got {value!r}')
    return spacing
