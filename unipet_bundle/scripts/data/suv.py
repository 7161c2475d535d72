"""PET DICOM series -> body-weight SUV volume (NIfTI + JSON sidecar), and SUV -> Bq/mL back.

Physics (body-weight SUV, as in the QIBA/UPICT SUV pseudo-code)::

    SUVbw = C * suv_factor,   suv_factor = weight_g / decayed_dose_Bq   [g/mL per Bq/mL]

with C the activity concentration in Bq/mL (Units BQML, after the per-slice RescaleSlope/Intercept)
and ``decayed_dose = RadionuclideTotalDose * 2 ** (-(t_ref - t_inj) / RadionuclideHalfLife)``.

- DecayCorrection START: the images are decay corrected to the series reference time, so the dose is
  decayed from injection to that time. The reference time is SeriesDate/SeriesTime, unless an
  AcquisitionDate/AcquisitionTime of the series is earlier (some scanners reset SeriesTime when a
  series is re-created after the scan) or SeriesTime is missing: then the earliest acquisition time.
- DecayCorrection ADMIN: the images are decay corrected to the administration time: no dose decay.
- DecayCorrection NONE: refused (:func:`check_decay_correction`, the one policy, also for UDPET CSV rows).
  Each bed/slice would need its own decay factor (one SUV factor for the whole volume would be wrong by up
  to tens of per cent); decay-correct the series on the scanner, or pass ``suv_factor`` if a single factor
  is acceptable to you.
- Injection time: RadiopharmaceuticalStartDateTime if present, else RadiopharmaceuticalStartTime on the
  reference date (SeriesDate). A time-only injection later in the day than the reference time is
  refused, never taken as "the day before": it is far more often a dose-calibrator clock ahead of the
  scanner's (an injection 10 min "after" the scan would otherwise get 23.8 h of decay, SUV x 6000).
  ``--injection_datetime`` (full date) or ``--injection_time`` settles it. Also refused: a time-only
  uptake over 12 h (FDG imaging is at 1-3 h; a longer gap is a wrong clock or day) and any uptake over
  10 half-lives (under 0.1 % of the activity left: no usable image). Time-zone offsets are ignored: all
  times are taken as scanner local time.
- Plausibility (each catches a unit slip of ~1000x, the common SUV error): PatientWeight 1-350 kg,
  RadionuclideTotalDose 1 MBq-10 GBq, and the median SUV of the body (voxels above 1 % of the 99.9th
  percentile) 0.05-20. Outside them the series is refused with the tag and the override named
  (``--patient_weight``, ``--injected_dose``, ``--suv_factor``); ``--allow_implausible_suv`` keeps such a
  value as a warning instead (the physicist's explicit decision, recorded in the sidecar).
- Units BQML: SUV factor from the tags above. GML: already SUVbw, factor 1. CNTS or anything else:
  refused unless ``suv_factor`` is given (it then multiplies the pixel values as they are).
- The dose is RadionuclideTotalDose in Bq (no residual-activity correction; DICOM has no standard tag).

Never logged or written: PatientName, PatientID or any other identifier of the patient.

CLI (from the bundle root)::

    python -m scripts.data.suv --dicom_dir PET_DIR --output suv.nii.gz        # + suv.json sidecar
    python -m scripts.data.suv --dicom_dir PET_DIR --output suv.nii.gz --injection_time 103500 --patient_weight 71
    python -m scripts.data.suv --suv_nifti pred.nii.gz --sidecar suv.json --output pred_bqml.nii.gz
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from scripts.common.errors import UniPETInputError, exit_bad_input
from scripts.common.io import atomic_write, atomic_write_json, check_output_path
from scripts.common.weights import file_sha256
from scripts.data.dicom_series import DicomVolume, check_single_frame, select_series, stack_series
from scripts.data.io import load_nifti, nifti_image, nifti_stem, write_nifti

__all__ = [
    "PETSeries",
    "SUVError",
    "SUVOverrides",
    "bqml_to_suv",
    "check_body_suv",
    "check_decay_correction",
    "check_suv_inputs",
    "check_uptake_s",
    "compute_suv_factor",
    "suv_bw_factor",
    "suv_factor_from_values",
    "parse_datetime",
    "parse_time",
    "uptake_time_s",
    "convert_dicom_to_suv",
    "convert_suv_to_bqml",
    "read_pet_series",
    "scan_reference_datetime",
    "sidecar_path",
    "suv_to_bqml",
]

logger = logging.getLogger(__name__)

SUV_FACTOR_UNITS = "g/mL per Bq/mL"
_UNIT_ALIASES = {"SUV": "GML", "SUVBW": "GML", "G/ML": "GML", "BQ/ML": "BQML"}
_SUV_FACTOR_HINT = "pass --suv_factor F (SUV = F x pixel value) or --units SUV if the pixels are already SUV"
# Plausibility ranges. Unit slips are the common SUV errors and each moves a value ~1000x: a weight in
# grams (71 kg stored as 71000), a dose in MBq, kBq or mCi stored as Bq. Outside a range the input is
# refused (``allow_implausible`` turns that into a warning: an explicit human decision).
# Weight: a pre-term newborn is ~1 kg; the heaviest patients scanned are ~250-300 kg (PET/CT tables
# carry 200-300 kg). A weight in grams (>= 1000) or in tonnes falls outside.
_WEIGHT_KG_RANGE = (1.0, 350.0)
# Injected activity: paediatric F-18 doses start at ~10-26 MBq (EANM minimum), adult FDG is 150-800 MBq,
# Rb-82 (2D) and O-15 water reach ~2.2 GBq. So 1 MBq-10 GBq: a dose in MBq or mCi stored as Bq (<= ~2000)
# or in kBq (< 1e6 up to 1 GBq) falls below it; 1000x too much (a slip the other way) above it.
_DOSE_BQ_RANGE = (1e6, 1e10)
# Body median SUV: SUVbw averages to ~1 over the body by construction (activity / weight, density ~1 g/mL);
# the median over body voxels of any tracer is ~0.3-3 (FDG ~0.6-1.2; PSMA/DOTATATE backgrounds ~0.3-1
# with hot organs). A weight in grams gives ~1000 x that, a dose in MBq ~1e6 x, so 0.05-20 leaves
# >= 6x margin for real studies and still catches every 1000x slip. The body is the voxels above 1 % of
# the 99.9th percentile: independent of the image's scale, not moved by a few hot voxels, and low enough
# that a hot organ filling much of a small field of view (a full bladder in a pelvic scan, SUV ~100)
# still leaves the ordinary tissue (above ~1) in the body, while air (~0.01) stays out.
_BODY_MEDIAN_SUV_RANGE = (0.05, 20.0)
_BODY_FRACTION = 0.01
_BODY_PERCENTILE = 99.9
_BODY_SAMPLE = 4_000_000  # voxels used at most (memory and time stay small on a 100 M-voxel study)
_WARN_DECAY_TIME_S = 24 * 3600.0  # dated times: a gap over a day is possible (long-lived tracers) but flagged
_MAX_TIME_ONLY_UPTAKE_S = 12 * 3600.0  # time-only tags: a longer gap is a wrong clock or day, not an uptake
_MAX_HALF_LIVES = 10.0  # under 2**-10 = 0.1 % of the activity left: no usable image, a wrong time or unit
_ALLOW_HINT = "--allow_implausible_suv true to keep it anyway"


class SUVError(UniPETInputError):
    """A PET series whose SUV factor cannot be computed from its tags (the message names the tag and the fix)."""


@dataclass(frozen=True)
class SUVOverrides:
    """User values that replace SUV tags (the SUV tool's options), and the plausibility escape hatch.

    Attributes:
        patient_weight_kg: replaces PatientWeight (kg).
        injected_dose_bq: replaces RadionuclideTotalDose (Bq) at the injection time.
        injection_time: replaces the injection time: time of day ``HHMMSS`` on the reference date.
        injection_datetime: replaces the injection date-time ``YYYYMMDDHHMMSS`` (wins over ``injection_time``).
        allow_implausible_suv: keep a weight, dose or body median SUV outside the plausible ranges as a
            warning instead of refusing it.
    """

    patient_weight_kg: float | None = None
    injected_dose_bq: float | None = None
    injection_time: str | None = None
    injection_datetime: str | None = None
    allow_implausible_suv: bool = False

    def used(self) -> dict[str, Any]:
        """The overrides given (JSON-ready), for the sidecar."""
        return {k: v for k, v in self.__dict__.items() if v not in (None, False)}


# ---------------------------------------------------------------------------------------------- time


def _text(value: Any) -> str:
    return str(value).strip() if value is not None else ""


def _parse_date(value: Any) -> date | None:
    text = _text(value).replace(".", "").replace("-", "")
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def parse_time(value: Any) -> time | None:
    """A time of day: DICOM TM ``HHMMSS.FFFFFF`` (minutes/seconds optional), or the old/CSV ``H:MM[:SS[.F]]`` form.

    The one time-of-day reader of every SUV computation (DICOM tags, ``--injection_time``, UDPET CSV cells);
    None when ``value`` is not a valid time.
    """
    text = _text(value)
    m = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?", text)
    if m is None:
        m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", text)
    if not m:
        return None
    hh, mm, ss, frac = m.groups()
    try:
        return time(int(hh), int(mm or 0), min(int(ss or 0), 59), int((frac or "0").ljust(6, "0")))
    except ValueError:
        return None


def parse_datetime(value: Any) -> datetime | None:
    """DICOM DT ``YYYYMMDDHHMMSS.FFFFFF[+/-ZZXX]``; the offset is dropped (times are taken as local).

    The one date-time reader of every SUV computation (DICOM tags, ``--injection_datetime``, UDPET CSV cells).

    A DT needs at least hours and minutes here: DICOM allows a date alone (``YYYYMMDD``) or an hour alone,
    and taking that as midnight or the full hour would decay the dose over hours that never passed (an SUV
    tens of times too high, silently). Such a value gives None, so the caller falls back or refuses.
    """
    text = re.sub(r"[+-]\d{4}$", "", _text(value))
    if len(text) < 12:
        return None
    day = _parse_date(text[:8])
    if day is None:
        return None
    clock = parse_time(text[8:]) if len(text) > 8 else time(0)
    return datetime.combine(day, clock) if clock is not None else None


def _combine(day: Any, clock: Any) -> datetime | None:
    d, t = _parse_date(day), parse_time(clock)
    return datetime.combine(d, t) if d is not None and t is not None else None


def _on_series_clock(value: Any, series_offset: Any) -> tuple[datetime | None, bool]:
    """A DICOM DT on the series' clock: ``(date-time or None, whether it was converted)``.

    A DT carrying a UTC offset other than the series' TimezoneOffsetFromUTC is moved onto the series' clock (e.g. an
    injection logged in UTC on a UTC+1 scanner); without either offset it is taken as it is (local time). Every DT
    that enters the uptake time goes through here, so both ends of it are on one clock.
    """
    parsed = parse_datetime(value)
    own, series = _utc_offset(_text(value)), _utc_offset(_text(series_offset))
    if parsed is not None and own is not None and series is not None and own != series:
        return parsed - own + series, True
    return parsed, False


def _acquisition_datetime(ds: Dataset) -> datetime | None:
    if ds.get("AcquisitionDateTime"):
        parsed, _ = _on_series_clock(ds.AcquisitionDateTime, ds.get("TimezoneOffsetFromUTC"))
        if parsed is not None:
            return parsed
    return _combine(ds.get("AcquisitionDate") or ds.get("SeriesDate") or ds.get("StudyDate"), ds.get("AcquisitionTime"))


def scan_reference_datetime(slices: Sequence[Dataset]) -> tuple[datetime, str]:
    """The time a START decay-corrected series is corrected to, and where it came from.

    SeriesDate/SeriesTime, unless the earliest AcquisitionDate/AcquisitionTime of ``slices`` is earlier
    or SeriesTime is missing; then that earliest acquisition time.

    Raises:
        SUVError: neither SeriesTime nor AcquisitionTime can be read.
    """
    first = slices[0]
    series = _combine(
        first.get("SeriesDate") or first.get("AcquisitionDate") or first.get("StudyDate"), first.get("SeriesTime")
    )
    acquisitions = [t for t in (_acquisition_datetime(ds) for ds in slices) if t is not None]
    earliest = min(acquisitions) if acquisitions else None
    if series is not None and (earliest is None or series <= earliest):
        return series, "SeriesDate/SeriesTime"
    if earliest is not None:
        if series is None:
            return earliest, "earliest AcquisitionDate/AcquisitionTime (SeriesTime missing)"
        return (
            earliest,
            f"earliest AcquisitionDate/AcquisitionTime (earlier than SeriesTime {series.time().isoformat()}, which was probably reset when the series was re-created)",
        )
    raise SUVError(
        "SeriesTime (0008,0031) and AcquisitionTime (0008,0032) are missing or unreadable: the scan time needed to decay "
        f"the dose is unknown; {_SUV_FACTOR_HINT}"
    )


_TIME_FIX = "pass --injection_datetime YYYYMMDDHHMMSS (or --injection_time HHMMSS on the scan date) with the real injection time"


def _utc_offset(text: str) -> timedelta | None:
    """The ``+HHMM``/``-HHMM`` offset of a DICOM DT or of TimezoneOffsetFromUTC, or None when there is none."""
    m = re.search(r"([+-])(\d{2})(\d{2})$", text)
    if m is None:
        return None
    sign = 1 if m.group(1) == "+" else -1
    return sign * timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))


def _injection_datetime(
    rp: Dataset,
    reference: datetime,
    overrides: SUVOverrides,
    series_offset: Any = None,
    warnings: list[str] | None = None,
) -> tuple[datetime, str, bool]:
    """(injection date-time, where it came from, whether only a time of day was known).

    ``series_offset``: the series' TimezoneOffsetFromUTC (its acquisition times are that clock's). A
    RadiopharmaceuticalStartDateTime with another explicit offset is converted to the series' clock; with an offset
    but no series offset it is taken as the same local clock (a warning says so). Conflicting injection tags add a
    warning to ``warnings``.
    """
    warnings = [] if warnings is None else warnings
    if overrides.injection_datetime is not None:
        parsed = parse_datetime(overrides.injection_datetime)
        if parsed is None:
            raise SUVError(
                f"--injection_datetime {overrides.injection_datetime!r} is not a date-time with hours and minutes: use YYYYMMDDHHMMSS, e.g. 20240102103500"
            )
        return parsed, "--injection_datetime (user)", False
    if overrides.injection_time is not None:
        clock = parse_time(overrides.injection_time)
        if clock is None:
            raise SUVError(
                f"--injection_time {overrides.injection_time!r} is not a time of day: use HHMMSS, e.g. 103500"
            )
        return datetime.combine(reference.date(), clock), "--injection_time (user) on the reference date", True
    dated = None
    if rp.get("RadiopharmaceuticalStartDateTime"):
        parsed, converted = _on_series_clock(rp.RadiopharmaceuticalStartDateTime, series_offset)
        if parsed is not None:
            source = "RadiopharmaceuticalStartDateTime (0018,1078)"
            own, series = _utc_offset(_text(rp.RadiopharmaceuticalStartDateTime)), _utc_offset(_text(series_offset))
            if converted:
                source += (
                    f" (converted from its UTC offset to the series' TimezoneOffsetFromUTC {_text(series_offset)})"
                )
            elif own is not None and series is None:
                warnings.append(
                    f"RadiopharmaceuticalStartDateTime has a UTC offset ({_text(rp.RadiopharmaceuticalStartDateTime)[-5:]}) "
                    "but the series has no TimezoneOffsetFromUTC: both taken as the same local clock"
                )
            clock = parse_time(rp.get("RadiopharmaceuticalStartTime"))
            if clock is not None:
                # both on the series' clock (the time tag has no offset of its own)
                apart = abs((datetime.combine(parsed.date(), clock) - parsed).total_seconds())
                if min(apart, 86400.0 - apart) > 1.0:
                    warnings.append(
                        f"RadiopharmaceuticalStartDateTime ({parsed.time().isoformat()}) and RadiopharmaceuticalStartTime "
                        f"({clock.isoformat()}) disagree: the date-time is used (QIBA); check the injection time, or pass "
                        "--injection_datetime"
                    )
            return parsed, source, False
        # a date without a time of day: its date is still the injection day, the time must come from elsewhere
        dated = _parse_date(_text(rp.RadiopharmaceuticalStartDateTime)[:8])
    clock = parse_time(rp.get("RadiopharmaceuticalStartTime"))
    if clock is not None and dated is not None:
        return (
            datetime.combine(dated, clock),
            "RadiopharmaceuticalStartTime (0018,1072) on the date of RadiopharmaceuticalStartDateTime (which has no time)",
            False,
        )
    if clock is None:
        raise SUVError(
            "injection time missing: RadiopharmaceuticalStartDateTime (0018,1078) and RadiopharmaceuticalStartTime (0018,1072) "
            f"are absent or unreadable in RadiopharmaceuticalInformationSequence, so the dose cannot be decayed; {_TIME_FIX}, or {_SUV_FACTOR_HINT}"
        )
    return (
        datetime.combine(reference.date(), clock),
        "RadiopharmaceuticalStartTime (0018,1072) on the reference date",
        True,
    )


def uptake_time_s(
    injection: datetime,
    reference: datetime,
    half_life_s: float | None,
    *,
    time_only: bool,
    injection_what: str = "injection time",
    reference_what: str = "scan reference time",
    fix: str = _TIME_FIX,
) -> tuple[float, list[str]]:
    """Seconds from injection to the decay reference time, by the one rule every SUV computation uses.

    Refused (never guessed): an injection after the reference time (with ``time_only`` the day is
    unknown and an injection "the day before" is never assumed: a clock ahead of the scanner's is far
    likelier), a time-only uptake over 12 h, and any uptake over 10 half-lives. A dated uptake over 24 h
    is kept with a warning.

    Args:
        injection, reference: the two instants (for ``time_only``, both on the same, arbitrary day).
        half_life_s: radionuclide half-life in s (None: the half-life rule is skipped).
        time_only: only times of day are known (no date tag).
        injection_what, reference_what: how to name the two in the message (tag names).
        fix: the caller's remedy, appended to the message (its options differ by tool).

    Returns:
        (uptake time in s, warnings).

    Raises:
        SUVError: one of the refusals above, naming both times and ``fix``.
    """
    seconds = (reference - injection).total_seconds()
    both = f"{injection_what} {_show(injection, time_only)} vs {reference_what} {_show(reference, time_only)}"
    return seconds, check_uptake_s(seconds, half_life_s, time_only=time_only, what=both, fix=fix)


def check_uptake_s(
    seconds: float, half_life_s: float | None, *, time_only: bool, what: str, fix: str = _TIME_FIX
) -> list[str]:
    """The uptake-time rule of :func:`uptake_time_s` for an uptake already in seconds (e.g. a CSV delay column).

    Args:
        seconds: injection -> decay reference time, s.
        half_life_s: half-life in s (None: that rule is skipped).
        time_only: the uptake came from times of day without dates.
        what: names the two times (or the column) in the message.
        fix: the caller's remedy.

    Returns:
        warnings (a dated uptake over 24 h).

    Raises:
        SUVError: negative, time-only over 12 h, or over 10 half-lives.
    """
    if seconds < 0:
        if time_only:
            raise SUVError(
                f"{what}: the injection is {_duration(-seconds)} after the scan and no injection date is given, so the day is "
                f"unknown (a clock ahead of the scanner's? an injection the day before is never assumed: it would mean "
                f"{_duration(seconds + 86400)} of decay); {fix}"
            )
        raise SUVError(
            f"{what}: the injection time is after the scan reference time (the scan is {_duration(-seconds)} before injection); {fix}"
        )
    if time_only and seconds > _MAX_TIME_ONLY_UPTAKE_S:
        raise SUVError(
            f"{what}: {seconds / 3600:.1f} h between injection and scan with times of day only (over 12 h: a wrong clock or "
            f"day?); {fix}"
        )
    if half_life_s is not None and seconds > _MAX_HALF_LIVES * half_life_s:
        raise SUVError(
            f"{what}: {seconds / 3600:.1f} h between injection and scan is {seconds / half_life_s:.1f} half-lives "
            f"({half_life_s:g} s), under 0.1 % of the activity left: a wrong date, time or half-life unit; {fix}"
        )
    warnings = []
    if seconds > _WARN_DECAY_TIME_S:
        warnings.append(f"{seconds / 3600:.1f} h between injection and scan: check the injection date/time")
    return warnings


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _show(moment: datetime, time_only: bool) -> str:
    return moment.time().isoformat() if time_only else moment.isoformat(sep=" ")


# --------------------------------------------------------------------------------------- SUV factor


def _positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _tag_positive(value: Any, what: str) -> float | None:
    """A tag's positive number; None when it is absent, empty, zero or negative (the caller says "missing or zero").

    Raises:
        SUVError: present but not a number (e.g. ``81,25`` from a European-locale export): named as such, never
            reported as missing and never guessed.
    """
    if value is None or _text(value) == "":
        return None
    try:
        float(value)
    except (TypeError, ValueError):
        hint = " (a decimal comma: DICOM numbers use a point)" if "," in _text(value) else ""
        raise SUVError(
            f"{what} {_text(value)[:40]!r} is not a number{hint}: fix the tag, or {_SUV_FACTOR_HINT}"
        ) from None
    return _positive_float(value)


def _corrected_image_values(value: Any) -> list[str]:
    """CorrectedImage (0028,0051)'s values, upper-case: one string or a multi-valued element alike."""
    values = [value] if isinstance(value, str) else list(value or [])
    return [_text(v).upper() for v in values if _text(v)]


def _check_corrections(ds: Dataset) -> None:
    """Refuse a CorrectedImage (0028,0051) that lacks attenuation or decay correction.

    QIBA's vendor-neutral SUV computes body-weight SUV only for images corrected for both (ATTN and DECY): a
    non-attenuation-corrected image's values are not activity concentrations, and one without decay correction would
    need a factor per bed. An absent or empty tag (type 2) is not evidence either way and is accepted.

    Raises:
        SUVError: a non-empty CorrectedImage without ATTN or without DECY.
    """
    values = _corrected_image_values(ds.get("CorrectedImage"))
    missing = [c for c in ("ATTN", "DECY") if c not in values] if values else []
    if missing:
        meaning = {"ATTN": "attenuation", "DECY": "decay"}
        listed = "\\".join(values)  # DICOM's value separator
        raise SUVError(
            f"CorrectedImage (0028,0051) is {listed}, without {' and '.join(missing)}: the images are not "
            f"{' and '.join(meaning[m] for m in missing)} corrected, so body-weight SUV is not meaningful (QIBA needs "
            f"ATTN and DECY); use the corrected series, or {_SUV_FACTOR_HINT}"
        )


def _normalise_units(units: Any) -> str:
    text = _text(units).upper().replace(" ", "")
    return _UNIT_ALIASES.get(text, text)


def _check_factor(factor: Any, what: str = "--suv_factor") -> float:
    number = _positive_float(factor)
    if number is None:
        raise SUVError(f"{what} must be a finite number > 0 (got {factor!r}); e.g. --suv_factor 2.4e-4")
    return number


def _refuse_or_warn(message: str, allow: bool, warnings: list[str]) -> None:
    if not allow:
        raise SUVError(message)
    warnings.append(f"{message.split('; ')[0]} (kept: --allow_implausible_suv)")


def check_suv_inputs(
    weight_kg: float,
    dose_bq: float,
    *,
    allow_implausible: bool = False,
    weight_what: str = "PatientWeight (0010,1030)",
    dose_what: str = "RadionuclideTotalDose (0018,1074)",
    weight_fix: str = f"pass --patient_weight KG, or {_ALLOW_HINT}",
    dose_fix: str = f"pass --injected_dose BQ, or {_ALLOW_HINT}",
) -> list[str]:
    """Refuse a physically impossible weight (kg) or injected dose (Bq); see the ranges above.

    Returns:
        warnings (only with ``allow_implausible``, one per value kept outside its range).

    Raises:
        SUVError: a value outside its range, naming it, the likely unit slip and the caller's ``*_fix``.
    """
    warnings: list[str] = []
    low, high = _WEIGHT_KG_RANGE
    if not low <= weight_kg <= high:
        slip = " (grams?)" if weight_kg > high else ""
        _refuse_or_warn(
            f"{weight_what} {weight_kg:g} kg is implausible (outside {low:g}-{high:g} kg){slip}: body-weight SUV needs the "
            f"weight in kg; {weight_fix}",
            allow_implausible,
            warnings,
        )
    low, high = _DOSE_BQ_RANGE
    if not low <= dose_bq <= high:
        slip = " (stored in MBq, kBq or mCi instead of Bq?)" if dose_bq < low else ""
        _refuse_or_warn(
            f"{dose_what} {dose_bq:.4g} Bq is implausibly {'small' if dose_bq < low else 'large'} (outside {low / 1e6:g} MBq-"
            f"{high / 1e9:g} GBq){slip}: the injected dose must be in Bq; {dose_fix}",
            allow_implausible,
            warnings,
        )
    return warnings


def suv_bw_factor(
    weight_kg: float, dose_bq: float, uptake_s: float, half_life_s: float | None, decay_correction: str = "START"
) -> tuple[float, float]:
    """Body-weight SUV factor (g/mL per Bq/mL) and the decay factor used.

    ``weight_g / (dose_Bq * 2 ** (-uptake_s / half_life_s))``; with ``decay_correction="ADMIN"`` the image
    is referred to the administration time, so the dose is not decayed (decay factor 1).
    """
    decay = 1.0 if decay_correction.upper() == "ADMIN" else 2.0 ** (-uptake_s / float(half_life_s))
    return weight_kg * 1000.0 / (dose_bq * decay), decay


def suv_factor_from_values(
    weight_kg: float,
    dose_bq: float,
    uptake_s: float,
    half_life_s: float,
    decay_correction: str = "START",
    *,
    fix: str = _TIME_FIX,
) -> float:
    """Body-weight SUV factor (g/mL per Bq/mL) from known values (a UDPET CSV row), by the DICOM series' rules.

    ``weight_g / (dose_Bq * 2**(-uptake_s / half_life_s))``, no decay for ``ADMIN``; the DecayCorrection policy
    is :func:`check_decay_correction` (NONE refused) and the uptake rule :func:`check_uptake_s` (a negative
    uptake or one over 10 half-lives refused), as for a DICOM series. The weight and dose ranges
    (:func:`check_suv_inputs`) are checked by the caller, which can name the value's source.

    Raises:
        SUVError: a non-positive weight/dose/half-life, DecayCorrection not START/ADMIN, or a refused uptake.
    """
    if weight_kg <= 0 or dose_bq <= 0 or half_life_s <= 0:
        raise SUVError(
            f"weight ({weight_kg} kg), injected dose ({dose_bq} Bq) and half-life ({half_life_s} s) must be positive"
        )
    decay = check_decay_correction(
        decay_correction,
        missing="DecayCorrection",
        fix="give START or ADMIN, or an SUV factor",
        none_fix="decay-correct the images, or give the SUV factor (one factor for the whole image) explicitly",
    )
    check_uptake_s(
        uptake_s, half_life_s, time_only=False, what=f"delay {uptake_s:g} s from injection to acquisition", fix=fix
    )
    return suv_bw_factor(weight_kg, dose_bq, uptake_s, half_life_s, decay)[0]


def check_body_suv(
    suv: np.ndarray,
    name: str,
    *,
    allow_implausible: bool = False,
    fix: str = f"check PatientWeight (kg) and RadionuclideTotalDose (Bq) and pass --patient_weight/--injected_dose or --suv_factor, or {_ALLOW_HINT}",
) -> tuple[float | None, list[str]]:
    """Refuse an SUV volume whose body median is far outside what any PET tracer gives (a unit slip).

    Args:
        suv: SUV volume, any shape.
        name: how the message names the volume (path, or the tags the factor came from).
        allow_implausible: keep it with a warning instead.
        fix: the caller's remedy, appended to the message.

    Returns:
        (body median SUV, or None when no voxel is positive (nothing to judge); warnings).

    Raises:
        SUVError: body median outside 0.05-20.
    """
    values = np.asarray(suv).ravel(order="K")  # memory order: no copy of a Fortran-ordered (NIfTI) volume either
    if values.size > _BODY_SAMPLE:  # a regular subsample (a view): the median needs no 100 M voxels, nor their copy
        values = values[:: values.size // _BODY_SAMPLE + 1]
    finite = values[np.isfinite(values)]
    if finite.size == 0 or not np.any(finite > 0):
        return None, []
    threshold = _BODY_FRACTION * float(np.percentile(finite, _BODY_PERCENTILE))
    body = finite[finite > threshold] if threshold > 0 else finite[finite > 0]
    median = float(np.median(body))
    warnings: list[str] = []
    low, high = _BODY_MEDIAN_SUV_RANGE
    if not low <= median <= high:
        _refuse_or_warn(
            f"{name}: the median SUV of the body is {median:.4g}, outside {low:g}-{high:g} for any PET tracer (body SUV averages ~1): "
            f"a unit slip in the weight (grams?) or dose (MBq?), or pixels not in SUV/Bq/mL; {fix}",
            allow_implausible,
            warnings,
        )
    return median, warnings


def check_decay_correction(
    value: Any,
    *,
    what: str = "DecayCorrection",
    missing: str = "DecayCorrection (0054,1102)",
    fix: str = _SUV_FACTOR_HINT,
    none_fix: str = "decay-correct the series on the scanner, or pass --suv_factor to apply one factor to every slice",
) -> str:
    """The one DecayCorrection policy of every SUV computation (DICOM series and UDPET CSV alike).

    ``START`` (decay the dose to the scan reference time) and ``ADMIN`` (no dose decay) are accepted. ``NONE``
    is refused: the pixels then decay with time over the scan, so each bed/slice/frame would need its own decay
    factor and one factor for the whole volume is wrong by up to tens of per cent, silently; the safe rule is to
    refuse and let the user give the factor explicitly. Anything else (or nothing) is an unknown reference.

    Args:
        value: the DecayCorrection value (tag or CSV cell).
        what, missing: how messages name the value, and the value when it is absent.
        fix, none_fix: the caller's remedies (its options differ by tool).

    Returns:
        ``"START"`` or ``"ADMIN"``.

    Raises:
        SUVError: missing, NONE, or another value.
    """
    decay = _text(value).upper()
    if not decay:
        raise SUVError(f"{missing} is missing: unknown decay reference, SUV cannot be computed; {fix}")
    if decay == "NONE":
        raise SUVError(
            f"{what} is NONE (images not decay corrected): SUV would need a decay factor per bed/slice, which is not "
            f"supported; {none_fix}"
        )
    if decay not in ("START", "ADMIN"):
        raise SUVError(f"{what} {decay!r} is not START, ADMIN or NONE: the decay reference is unknown; {fix}")
    return decay


def _suv_bw_from_tags(ds: Dataset, slices: Sequence[Dataset], overrides: SUVOverrides) -> tuple[float, dict[str, Any]]:
    """Body-weight SUV factor for a BQML series from its tags and the user's overrides (see the module docstring)."""
    info: dict[str, Any] = {}
    warnings: list[str] = []
    decay = check_decay_correction(ds.get("DecayCorrection"))
    _check_corrections(ds)
    if overrides.patient_weight_kg is not None:
        weight_kg, weight_what = _positive_float(overrides.patient_weight_kg), "--patient_weight"
        if weight_kg is None:
            raise SUVError(f"--patient_weight must be a number of kg > 0 (got {overrides.patient_weight_kg!r})")
    else:
        weight_kg, weight_what = (
            _tag_positive(ds.get("PatientWeight"), "PatientWeight (0010,1030)"),
            "PatientWeight (0010,1030)",
        )
    if weight_kg is None:
        raise SUVError(
            f"PatientWeight (0010,1030) is missing or zero: body-weight SUV needs the weight in kg; pass --patient_weight KG, or {_SUV_FACTOR_HINT}"
        )
    sequence = ds.get("RadiopharmaceuticalInformationSequence")
    if not sequence:
        raise SUVError(
            "RadiopharmaceuticalInformationSequence (0054,0016) is missing: no injected dose, injection time or half-life; "
            f"{_SUV_FACTOR_HINT}"
        )
    if len(sequence) > 1:
        warnings.append(f"RadiopharmaceuticalInformationSequence has {len(sequence)} items; the first one is used")
    rp = sequence[0]
    if overrides.injected_dose_bq is not None:
        dose_bq, dose_what = _positive_float(overrides.injected_dose_bq), "--injected_dose"
        if dose_bq is None:
            raise SUVError(f"--injected_dose must be a number of Bq > 0 (got {overrides.injected_dose_bq!r})")
    else:
        dose_bq, dose_what = (
            _tag_positive(rp.get("RadionuclideTotalDose"), "RadionuclideTotalDose (0018,1074)"),
            "RadionuclideTotalDose (0018,1074)",
        )
    if dose_bq is None:
        raise SUVError(
            f"RadionuclideTotalDose (0018,1074) is missing or zero: the injected dose (Bq) is unknown; pass --injected_dose BQ, or {_SUV_FACTOR_HINT}"
        )
    half_life_s = _tag_positive(rp.get("RadionuclideHalfLife"), "RadionuclideHalfLife (0018,1075)")
    if half_life_s is None and decay == "START":
        raise SUVError(
            f"RadionuclideHalfLife (0018,1075) is missing or zero: the dose cannot be decayed to the scan time; {_SUV_FACTOR_HINT}"
        )

    # Impossible values are refused before anything else is computed from them.
    warnings.extend(
        check_suv_inputs(
            weight_kg,
            dose_bq,
            allow_implausible=overrides.allow_implausible_suv,
            weight_what=weight_what,
            dose_what=dose_what,
        )
    )
    info["decay_correction"] = decay
    info["patient_weight_kg"] = weight_kg
    info["patient_weight_source"] = weight_what
    info["injected_dose_bq"] = dose_bq
    info["injected_dose_source"] = dose_what
    info["half_life_s"] = half_life_s
    info["radiopharmaceutical"] = _text(rp.get("Radiopharmaceutical")) or None
    nuclide = rp.get("RadionuclideCodeSequence")
    info["radionuclide"] = (_text(nuclide[0].get("CodeMeaning")) or None) if nuclide else None

    if decay == "START":
        reference, reference_source = scan_reference_datetime(slices)
        injection, injection_source, time_only = _injection_datetime(
            rp, reference, overrides, ds.get("TimezoneOffsetFromUTC"), warnings
        )
        decay_time_s, time_warnings = uptake_time_s(
            injection,
            reference,
            half_life_s,
            time_only=time_only,
            injection_what=f"injection time {injection_source.split(' (')[0]}",
            reference_what=f"scan time {reference_source.split(' (')[0]}",
        )
        warnings.extend(time_warnings)
        info.update(
            reference_datetime=reference.isoformat(),
            reference_time_source=reference_source,
            injection_datetime=injection.isoformat(),
            injection_time_source=injection_source,
            decay_time_s=decay_time_s,
        )
    else:  # ADMIN: pixel values are already referred to the administration time, as the dose is.
        decay_time_s = 0.0
        info.update(
            reference_datetime=None,
            reference_time_source="administration time (DecayCorrection ADMIN): no dose decay",
            injection_datetime=None,
            injection_time_source=None,
            decay_time_s=0.0,
        )
    factor, decay_factor = suv_bw_factor(weight_kg, dose_bq, decay_time_s, half_life_s, decay)
    info.update(decay_factor=decay_factor, decayed_dose_bq=dose_bq * decay_factor, patient_weight_g=weight_kg * 1000.0)
    info["warnings"] = warnings
    return factor, info


def compute_suv_factor(
    ds: Dataset,
    units: str | None = None,
    suv_factor: float | None = None,
    slices: Sequence[Dataset] | None = None,
    overrides: SUVOverrides | None = None,
) -> tuple[float, dict[str, Any]]:
    """Factor that turns this series' pixel values (after rescale) into body-weight SUV.

    Args:
        ds: a header of the series (tags are read from it).
        units: override of the Units tag: ``BQML`` (Bq/mL), ``GML``/``SUV`` (already SUVbw), ``CNTS``...
        suv_factor: user factor; when given it is used as is (the tag-based factor, if computable, is
            recorded in the info for comparison).
        slices: all headers of the series, for the earliest AcquisitionTime (default ``[ds]``).
        overrides: user weight/dose/injection time replacing the tags, and the plausibility escape
            hatch (default: none, tags only, implausible values refused).

    Returns:
        (factor in g/mL per Bq/mL (for BQML), JSON-ready info about every tag used).

    Raises:
        SUVError: a needed tag is missing or invalid, a value is physically impossible (weight, dose,
            injection time after the scan...), or the units cannot be converted.
    """
    overrides = overrides if overrides is not None else SUVOverrides()
    slices = list(slices) if slices is not None else [ds]
    tag_units = _normalise_units(ds.get("Units")) or None
    used_units = _normalise_units(units) if units is not None else tag_units
    info: dict[str, Any] = {
        "units_tag": tag_units,
        "units": used_units,
        "units_source": "--units override" if units is not None else "Units (0054,1001)",
        "decay_correction": _text(ds.get("DecayCorrection")).upper() or None,
        "suv_type_tag": _text(ds.get("SUVType")) or None,
        "overrides": overrides.used(),
        "warnings": [],
    }
    tag_overrides = {k: v for k, v in overrides.used().items() if k != "allow_implausible_suv"}
    if units is not None and tag_units and tag_units != used_units:
        info["warnings"].append(f"Units tag {tag_units} overridden by --units {used_units}")

    if suv_factor is not None:
        factor = _check_factor(suv_factor)
        if used_units == "GML":
            raise SUVError(
                "--suv_factor and Units GML/--units SUV contradict each other (SUV needs no factor): pass only one"
            )
        if tag_overrides:
            raise SUVError(
                f"--suv_factor and {', '.join('--' + k.removesuffix('_kg').removesuffix('_bq') for k in tag_overrides)} contradict each other "
                "(a given factor replaces every SUV tag): pass only one"
            )
        info["suv_factor_source"] = "--suv_factor (user)"
        try:
            tag_factor, _ = _suv_bw_from_tags(ds, slices, SUVOverrides()) if used_units == "BQML" else (None, None)
            info["suv_factor_from_tags"] = tag_factor
        except SUVError as exc:
            info["suv_factor_from_tags"] = None
            info["suv_factor_from_tags_error"] = str(exc)
        return factor, info

    if used_units is None:
        raise SUVError(
            "Units (0054,1001) is missing: the pixel unit is unknown; pass --units BQML if the pixels are Bq/mL, or --suv_factor/--units SUV"
        )
    if used_units == "GML":
        if tag_overrides:
            raise SUVError(
                f"Units GML (pixels already SUV) needs no {', '.join('--' + k.removesuffix('_kg').removesuffix('_bq') for k in tag_overrides)}: drop it, or pass --units BQML if the pixels are Bq/mL"
            )
        info["suv_factor_source"] = "Units GML: pixels already SUVbw (g/mL)"
        if info["suv_type_tag"] not in (None, "BW"):
            info["warnings"].append(f"SUVType {info['suv_type_tag']}: the pixels are not body-weight SUV")
        return 1.0, info
    if used_units != "BQML":
        what = "counts, not a calibrated activity concentration" if used_units == "CNTS" else "not Bq/mL"
        raise SUVError(f"Units {used_units} ({what}): SUV needs BQML pixels; {_SUV_FACTOR_HINT}")
    factor, tag_info = _suv_bw_from_tags(ds, slices, overrides)
    info["warnings"].extend(tag_info.pop("warnings"))
    info.update(tag_info)
    info["suv_factor_source"] = (
        "DICOM tags (PatientWeight, RadiopharmaceuticalInformationSequence, decay to reference time)"
    )
    return factor, info


def bqml_to_suv(arr: np.ndarray, factor: float) -> np.ndarray:
    """Activity concentration (Bq/mL, any shape) -> SUVbw as float32: ``arr * factor``."""
    factor = _check_factor(factor, "suv_factor")
    return (np.asarray(arr, dtype=np.float64) * factor).astype(np.float32)


def suv_to_bqml(arr: np.ndarray, factor: float) -> np.ndarray:
    """SUVbw (any shape) -> activity concentration in Bq/mL as float32: ``arr / factor``."""
    factor = _check_factor(factor, "suv_factor")
    return (np.asarray(arr, dtype=np.float64) / factor).astype(np.float32)


# ------------------------------------------------------------------------------------------- series


@dataclass
class PETSeries:
    """A PET series in SUVbw, with what a writer needs to go back to DICOM.

    Attributes:
        suv: float32 (X, Y, Z) = (DICOM column, row, slice sorted along the slice normal), SUVbw (g/mL).
        affine: 4x4 voxel -> RAS mm (NIfTI convention; DICOM LPS x and y negated).
        suv_factor: SUV = suv_factor * source value (g/mL per Bq/mL for BQML).
        units: source pixel units (``BQML``, ``CNTS`` (with a user factor) or ``GML``).
        info: JSON-ready provenance (tags used, geometry, scanner); no patient identifiers.
        files: slice files in ``k`` order.
        datasets: their headers (no pixel data), same order; ``reference`` is the first.
        rescale_slopes, rescale_intercepts: (Z,) per-slice rescale of the source series.
        suv_details: what :func:`compute_suv_factor` returned with the factor (tags used, decay, warnings): a
            writer deriving a series from ``datasets`` records it without computing the factor again.
    """

    suv: np.ndarray
    affine: np.ndarray
    suv_factor: float
    units: str
    info: dict[str, Any]
    files: list[Path]
    datasets: list[Dataset]
    rescale_slopes: np.ndarray
    rescale_intercepts: np.ndarray
    suv_details: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> Dataset:
        return self.datasets[0]

    @property
    def source_values(self) -> np.ndarray:
        """Pixel values in the source units (float32, (X, Y, Z)), recovered as ``suv / suv_factor``."""
        return suv_to_bqml(self.suv, self.suv_factor)

    @property
    def bqml(self) -> np.ndarray:
        """Activity concentration in Bq/mL (float32, (X, Y, Z)); only for a BQML series."""
        if self.units != "BQML":
            raise SUVError(f"the source series is in {self.units}, not BQML: Bq/mL values are not available")
        return self.source_values


def _descriptive_info(ds: Dataset) -> dict[str, Any]:
    """Scanner and series facts for the sidecar (identifier-free by construction: an explicit allow-list)."""
    keys = {
        "modality": "Modality",
        "manufacturer": "Manufacturer",
        "scanner_model": "ManufacturerModelName",
        "series_description": "SeriesDescription",
        "series_number": "SeriesNumber",
        "series_type": "SeriesType",
        "corrected_image": "CorrectedImage",
        "lossy_image_compression": "LossyImageCompression",
        "reconstruction_method": "ReconstructionMethod",
        "attenuation_correction_method": "AttenuationCorrectionMethod",
        "scatter_correction_method": "ScatterCorrectionMethod",
        "actual_frame_duration_ms": "ActualFrameDuration",
        "slice_thickness_mm": "SliceThickness",
        "patient_position": "PatientPosition",
    }
    out: dict[str, Any] = {}
    for name, keyword in keys.items():
        value = ds.get(keyword)
        if value is None or value == "":
            out[name] = None
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            out[name] = [str(v) for v in value]
        else:
            out[name] = str(value)
    return out


_RADIOPHARMACEUTICAL_KEYS = (
    "RadionuclideTotalDose",
    "RadionuclideHalfLife",
    "RadiopharmaceuticalStartDateTime",
    "RadiopharmaceuticalStartTime",
)


def _first_radiopharmaceutical(ds: Dataset) -> Dataset | None:
    sequence = ds.get("RadiopharmaceuticalInformationSequence")
    return sequence[0] if sequence else None


def _comparable(keyword: str, value: Any) -> Any:
    """A per-series tag's value as it means, not as it is written: ``100000`` and ``100000.00`` are one time,
    ``3.0e8`` and ``300000000`` one dose, ``DECY\\ATTN`` and ``ATTN\\DECY`` one set of corrections."""
    if value is None or _text(value) == "":
        return None
    if keyword == "CorrectedImage":
        return frozenset(_corrected_image_values(value))
    if keyword in ("PatientWeight", "RadionuclideTotalDose", "RadionuclideHalfLife"):
        try:
            return f"{float(value):.6g}"
        except (TypeError, ValueError):
            return _text(value)
    if keyword == "RadiopharmaceuticalStartTime":
        clock = parse_time(value)
        return clock.isoformat() if clock is not None else _text(value)
    if keyword == "RadiopharmaceuticalStartDateTime":
        parsed = parse_datetime(value)
        return (parsed.isoformat(), _utc_offset(_text(value))) if parsed is not None else _text(value)
    return _text(value).upper()


def _check_consistent(
    slices: Sequence[Dataset],
    folder: Path,
    units: str | None = None,
    suv_factor: float | None = None,
    overrides: SUVOverrides | None = None,
) -> None:
    """Per-series facts must be one value across the slices (compared as values, not as text): differing values mean
    mixed or damaged data, and the SUV factor is computed from one slice's tags, so it would depend on which. Only the
    tags the factor is computed from are compared: ``--suv_factor`` (or SUV pixels) needs no weight, dose, time or
    corrections, and each user override replaces its tag."""
    overrides = overrides if overrides is not None else SUVOverrides()
    keywords = ["Units", "DecayCorrection"]
    pixels_are_suv = _normalise_units(units if units is not None else slices[0].get("Units")) == "GML"
    from_tags = suv_factor is None and not pixels_are_suv
    if from_tags:
        keywords.append("CorrectedImage")
        if overrides.patient_weight_kg is None:
            keywords.append("PatientWeight")
    for keyword in keywords:
        values = {_comparable(keyword, ds.get(keyword)) for ds in slices}
        if len(values) > 1:
            shown = sorted({_text(ds.get(keyword)) or "(absent)" for ds in slices})
            raise SUVError(
                f"slices in {folder} disagree on {keyword} ({', '.join(shown)}): not one PET series; keep one series per folder"
            )
    if not from_tags:
        return
    skip = set()
    if overrides.injected_dose_bq is not None:
        skip.add("RadionuclideTotalDose")
    if overrides.injection_datetime is not None or overrides.injection_time is not None:
        skip.update(("RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime"))
    for keyword in _RADIOPHARMACEUTICAL_KEYS:
        if keyword in skip:
            continue
        texts, values = set(), set()
        for ds in slices:
            rp = _first_radiopharmaceutical(ds)
            raw = rp.get(keyword) if rp is not None else None
            values.add(_comparable(keyword, raw))
            texts.add(_text(raw) or "(absent)")
        if len(values) > 1:
            raise SUVError(
                f"slices in {folder} disagree on {keyword} in RadiopharmaceuticalInformationSequence "
                f"({', '.join(sorted(texts))}): the dose or injection time would depend on the slice read; re-export the "
                "series, or pass --injected_dose / --injection_datetime, or --suv_factor"
            )


def read_pet_series(
    dicom_dir: str | os.PathLike,
    units: str | None = None,
    suv_factor: float | None = None,
    series_uid: str | None = None,
    overrides: SUVOverrides | None = None,
) -> PETSeries:
    """Read a single-frame PET DICOM series and convert it to body-weight SUV.

    Args:
        dicom_dir: folder with the slices of one PT series (non-image objects such as RTSTRUCT are
            skipped; a second image series is refused unless ``series_uid`` picks one).
        units: override of the Units tag (``BQML``, ``SUV``/``GML``, ``CNTS``).
        suv_factor: use this factor (SUV = factor x pixel value) instead of the SUV tags.
        series_uid: SeriesInstanceUID to read when the folder holds several image series.
        overrides: user weight/dose/injection time and the plausibility escape hatch (:class:`SUVOverrides`).

    Returns:
        :class:`PETSeries` with ``suv`` float32 (X, Y, Z) and a RAS ``affine``.

    Raises:
        UniPETInputError (``DicomSeriesError`` or ``SUVError``): one line naming the problem and the fix;
            also for a physically impossible result (weight, dose or body median SUV out of range).
    """
    overrides = overrides if overrides is not None else SUVOverrides()
    folder = Path(dicom_dir).expanduser()
    chosen = select_series(folder, series_uid=series_uid, modality="PT")
    check_single_frame(chosen)  # an enhanced image first: its per-frame tags would only give misleading errors below
    _check_consistent(chosen.headers, folder, units, suv_factor, overrides)
    # The factor comes first so a missing tag fails before the pixel data are decoded.
    factor, info = compute_suv_factor(
        chosen.headers[0], units=units, suv_factor=suv_factor, slices=chosen.headers, overrides=overrides
    )
    suv_details = copy.deepcopy(info)  # the factor's own record, before the series facts are added (for writers)
    volume: DicomVolume = stack_series(chosen)
    suv = bqml_to_suv(volume.array, factor)
    source = {
        "BQML": "SUV from PatientWeight and RadionuclideTotalDose",
        "GML": "Units GML (pixels already SUV)",
    }.get(str(info.get("units")), "SUV")
    if suv_factor is not None:
        source = f"SUV from --suv_factor {factor:g}"
    if any(_text(ds.get("LossyImageCompression")) == "01" for ds in chosen.headers):
        info["warnings"].append(
            "LossyImageCompression (0028,2110) is 01: the pixel values went through lossy compression, so SUVs may "
            "differ from the scanner's; use the original series for quantitative work"
        )
    if volume.geometry.get("padding_voxels"):
        info["warnings"].append(
            f"{volume.geometry['padding_voxels']} voxels hold PixelPaddingValue (0028,0120) (outside the reconstructed "
            "field of view): set to 0, not converted"
        )
    body_median, body_warnings = check_body_suv(
        suv, f"{folder}: {source}", allow_implausible=overrides.allow_implausible_suv
    )
    info["warnings"].extend(body_warnings)
    info["body_median_suv"] = body_median

    info = {
        "description": "body-weight SUV (g/mL) from a PET DICOM series, written by scripts.data.suv",
        "suv_factor": factor,
        "suv_factor_units": SUV_FACTOR_UNITS if info.get("units") == "BQML" else "SUV per source pixel unit",
        "suv_definition": "SUV = suv_factor * pixel value (after per-slice RescaleSlope/RescaleIntercept)",
        **info,
        **volume.geometry,
        **_descriptive_info(volume.reference),
        "source_dicom_dir": str(folder.resolve()),
        "suv_max": float(suv.max()),
        "suv_p99_9": float(np.percentile(suv, 99.9)),
    }
    # The converter keeps any volume it can compute exactly; the denoiser's stricter rules
    # (scripts.data.volume_checks) apply when the volume is used, and these warnings say so early.
    if not np.any(suv):
        info["warnings"].append(
            "every voxel is zero (an empty or failed reconstruction?): converted, but inference and training refuse it"
        )
    if suv.shape[2] < 2:
        info["warnings"].append("the series has a single slice: converted, but UniPET denoises 3D volumes only")
    for warning in info["warnings"]:
        logger.warning("%s", warning)
    logger.info("SUV factor %.6g (%s); SUVmax %.3g", factor, info.get("suv_factor_source"), info["suv_max"])
    return PETSeries(
        suv=suv,
        affine=volume.affine,
        suv_factor=factor,
        units=str(info.get("units")),
        info=info,
        files=volume.files,
        datasets=volume.datasets,
        rescale_slopes=volume.rescale_slopes,
        rescale_intercepts=volume.rescale_intercepts,
        suv_details=suv_details,
    )


# --------------------------------------------------------------------------------------- conversions


def sidecar_path(nifti_path: str | os.PathLike) -> Path:
    """``/a/x.nii.gz`` -> ``/a/x.json``."""
    p = Path(nifti_path)
    return p.with_name(nifti_stem(p) + ".json")


def _check_nifti_name(output: str | os.PathLike) -> None:
    if not str(output).endswith((".nii.gz", ".nii")):
        raise UniPETInputError(f"output {output} must end in .nii.gz or .nii")


def _write_pair(array: np.ndarray, affine: np.ndarray, info: dict[str, Any], out: Path, overwrite: bool) -> None:
    """The NIfTI and its sidecar, the sidecar holding the NIfTI's SHA-256 (``nifti_sha256``).

    Both are complete under temporary names before either replaces a file: a failed write (a full disk) leaves any
    previous pair as it was, and a sidecar renamed before a failed NIfTI rename is put back. The sidecar is renamed
    first, so a kill between the two renames leaves a new sidecar
    beside the old NIfTI, which :func:`convert_suv_to_bqml` refuses by the hash instead of converting the old volume
    with the new factor.
    """
    side = sidecar_path(out)
    for path in (out, side):
        if path.exists() and not overwrite:
            raise UniPETInputError(f"output {path} already exists: remove it, choose another path, or pass --overwrite")
    img = nifti_image(array, affine, np.float32)
    previous = side.read_bytes() if side.exists() else None
    renamed: list[bool] = []

    def write_both(tmp: Path) -> None:
        write_nifti(img, tmp)
        atomic_write_json(side, {**info, "nifti_sha256": file_sha256(tmp)}, overwrite=overwrite)
        renamed.append(True)

    try:
        atomic_write(out, write_both, overwrite=overwrite)
    except BaseException:
        if renamed:  # the NIfTI's rename failed after the sidecar's: the previous sidecar goes back (or none)
            if previous is None:
                side.unlink(missing_ok=True)
            else:
                atomic_write(side, lambda tmp: tmp.write_bytes(previous))
        raise


def convert_dicom_to_suv(
    dicom_dir: str | os.PathLike,
    output: str | os.PathLike,
    units: str | None = None,
    suv_factor: float | None = None,
    series_uid: str | None = None,
    overwrite: bool = False,
    overrides: SUVOverrides | None = None,
) -> PETSeries:
    """DICOM PET series -> SUVbw NIfTI ``output`` and sidecar ``<stem>.json``. Outputs are checked first
    and nothing is written when the series is refused (``overrides``: see :class:`SUVOverrides`)."""
    _check_nifti_name(output)
    folder = Path(dicom_dir).expanduser().resolve()
    out = check_output_path(output, overwrite=overwrite)
    check_output_path(sidecar_path(out), overwrite=overwrite)
    if folder in out.parents:
        raise UniPETInputError(
            f"output {out} is inside the DICOM folder {folder}: write it elsewhere (the folder must hold only the series)"
        )
    series = read_pet_series(folder, units=units, suv_factor=suv_factor, series_uid=series_uid, overrides=overrides)
    _write_pair(series.suv, series.affine, series.info, out, overwrite)
    logger.info("wrote %s and %s", out, sidecar_path(out))
    return series


def convert_suv_to_bqml(
    suv_nifti: str | os.PathLike,
    output: str | os.PathLike,
    sidecar: str | os.PathLike | None = None,
    suv_factor: float | None = None,
    overwrite: bool = False,
) -> Path:
    """SUVbw NIfTI -> Bq/mL NIfTI ``output`` (+ ``<stem>.json``), same grid and affine.

    The factor is ``suv_factor`` if given, else the ``suv_factor`` of ``sidecar`` (default: the
    ``<stem>.json`` beside ``suv_nifti``, as written by the DICOM -> SUV conversion).
    """
    _check_nifti_name(output)
    src = Path(suv_nifti).expanduser()
    side = Path(sidecar).expanduser() if sidecar is not None else sidecar_path(src)
    out = check_output_path(output, overwrite=overwrite, inputs=[src, side])
    check_output_path(sidecar_path(out), overwrite=overwrite, inputs=[src, side])
    if suv_factor is not None:
        factor, source, units = _check_factor(suv_factor), "--suv_factor (user)", "BQML"
    else:
        if not side.is_file():
            raise SUVError(
                f"no SUV factor: sidecar {side} not found; pass --sidecar (the .json written with the SUV volume) or --suv_factor"
            )
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            raise SUVError(
                f"sidecar {side} is not readable JSON ({type(exc).__name__}); pass --suv_factor instead"
            ) from None
        factor = _check_factor(meta.get("suv_factor") if isinstance(meta, dict) else None, f"suv_factor in {side}")
        recorded = meta.get("nifti_sha256")
        if recorded and recorded != file_sha256(src):
            raise SUVError(
                f"sidecar {side} belongs to another version of {src} (its nifti_sha256 does not match: an interrupted "
                "--overwrite, or the volume was edited), so its SUV factor may not be this volume's; convert the DICOM "
                "series again, or pass --suv_factor"
            )
        units = str(meta.get("units") or "BQML")
        if units == "GML":
            raise SUVError(
                f"{side}: the source series was already SUV (Units GML), there is no Bq/mL scale; pass --suv_factor if you know it"
            )
        source = f"sidecar {side}"
    suv, affine = load_nifti(src)
    bad = int(suv.size - np.count_nonzero(np.isfinite(suv)))
    if bad:
        raise UniPETInputError(
            f"{src} has {bad} NaN/Inf voxel(s): they have no activity concentration; set them to 0 first"
        )
    values = suv_to_bqml(suv, factor)
    info = {
        "description": f"activity concentration ({units}) from an SUVbw volume, written by scripts.data.suv",
        "units": units,
        "suv_factor": factor,
        "suv_factor_units": SUV_FACTOR_UNITS,
        "suv_factor_source": source,
        "conversion": "value = SUV / suv_factor",
        "source_nifti": str(src.resolve()),
    }
    _write_pair(values, affine, info, out, overwrite)
    logger.info("wrote %s (factor %.6g from %s)", out, factor, source)
    return out


# ----------------------------------------------------------------------------------------------- CLI


def _cli_number(value: Any, flag: str, example: str) -> float | None:
    if value is None:
        return None
    number = _positive_float(value)
    if number is None or isinstance(value, bool):
        raise UniPETInputError(f"{flag} must be a number > 0 in {example} (got {value!r})")
    return number


def _cli_clock(value: Any, digits: int) -> str | None:
    """fire turns ``--injection_time 093000`` into a str but ``103500`` into an int: give both back as text."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).zfill(digits)
    return str(value)


def _cli_bool(value: Any, flag: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UniPETInputError(f"{flag} must be true or false (got {value!r})")


def main(
    dicom_dir: str | None = None,
    output: str | None = None,
    suv_nifti: str | None = None,
    sidecar: str | None = None,
    suv_factor: float | None = None,
    units: str | None = None,
    series_uid: str | None = None,
    overwrite: bool = False,
    patient_weight: float | None = None,
    injected_dose: float | None = None,
    injection_time: str | None = None,
    injection_datetime: str | None = None,
    allow_implausible_suv: bool = False,
) -> None:
    """Convert a PET DICOM series to body-weight SUV (NIfTI + JSON sidecar), or an SUV NIfTI back to Bq/mL.

    DICOM -> SUV:  python -m scripts.data.suv --dicom_dir PET_DIR --output suv.nii.gz
    SUV -> Bq/mL:  python -m scripts.data.suv --suv_nifti pred.nii.gz --sidecar suv.json --output pred_bqml.nii.gz

    SUVbw = Bq/mL x PatientWeight[g] / (RadionuclideTotalDose x 2^(-(t_ref - t_injection)/RadionuclideHalfLife)),
    t_ref = SeriesTime (or the earliest AcquisitionTime if earlier); DecayCorrection START or ADMIN
    (no decay); NONE is refused. RescaleSlope/RescaleIntercept are applied per slice. The sidecar
    <stem>.json records the factor and every tag used (no patient name or ID).

    Refused, with the tag and the fix named (exit 2, nothing written): an injection time of day later
    than the scan time without a date (never taken as the day before: give --injection_datetime or
    --injection_time), a time-only uptake over 12 h, an uptake over 10 half-lives, PatientWeight outside
    1-350 kg (grams?), RadionuclideTotalDose outside 1 MBq-10 GBq (MBq stored as Bq?), and a body median
    SUV outside 0.05-20 (any tracer gives ~0.3-3). Override the tag, or pass --allow_implausible_suv true.

    Args:
        dicom_dir: folder holding one PET (Modality PT) single-frame series.
        output: output NIfTI path (.nii.gz or .nii); its sidecar is <stem>.json beside it.
        suv_nifti: SUV NIfTI to convert back to Bq/mL (instead of --dicom_dir).
        sidecar: JSON with the suv_factor for --suv_nifti (default: <stem>.json beside it).
        suv_factor: SUV = suv_factor x pixel value; overrides the DICOM SUV tags (e.g. 2.4e-4 for Bq/mL,
            needed for Units CNTS) or the sidecar.
        units: override the Units tag: BQML (Bq/mL), SUV or GML (pixels already SUV), CNTS.
        series_uid: SeriesInstanceUID to read when the folder holds several image series.
        overwrite: replace existing outputs.
        patient_weight: body weight in kg, replacing PatientWeight (0010,1030) (e.g. 71, when the tag holds grams).
        injected_dose: injected activity in Bq at the injection time, replacing RadionuclideTotalDose (0018,1074)
            (e.g. 3.9e8 for 390 MBq).
        injection_time: injection time of day HHMMSS on the scan date, replacing RadiopharmaceuticalStartTime
            (0018,1072) (e.g. 103500; it must precede the scan time, and an injection on another day
            needs --injection_datetime).
        injection_datetime: injection date-time YYYYMMDDHHMMSS, replacing RadiopharmaceuticalStartDateTime
            (0018,1078) and the time-only tag (e.g. 20240101233000).
        allow_implausible_suv: true keeps a weight, dose or body median SUV outside the plausible ranges
            (warning in the log and the sidecar) instead of refusing the series. Only after checking the tags.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)  # pydicom warnings go to the log (stdout), keeping stderr for the error line
    try:
        if output is None:
            raise UniPETInputError("--output is required (the .nii.gz to write)")
        if (dicom_dir is None) == (suv_nifti is None):
            raise UniPETInputError("pass exactly one of --dicom_dir (DICOM -> SUV) or --suv_nifti (SUV -> Bq/mL)")
        if dicom_dir is not None:
            if sidecar is not None:
                raise UniPETInputError(
                    "--sidecar is only for --suv_nifti; with --dicom_dir the sidecar is written next to --output"
                )
            overrides = SUVOverrides(
                patient_weight_kg=_cli_number(patient_weight, "--patient_weight", "kg, e.g. 71"),
                injected_dose_bq=_cli_number(injected_dose, "--injected_dose", "Bq, e.g. 3.9e8"),
                injection_time=_cli_clock(injection_time, 6),
                injection_datetime=_cli_clock(injection_datetime, 14),
                allow_implausible_suv=_cli_bool(allow_implausible_suv, "--allow_implausible_suv"),
            )
            convert_dicom_to_suv(
                str(dicom_dir),
                str(output),
                units=units,
                suv_factor=suv_factor,
                series_uid=None if series_uid is None else str(series_uid),
                overwrite=bool(overwrite),
                overrides=overrides,
            )
        else:
            dicom_only = {
                "--units": units,
                "--series_uid": series_uid,
                "--patient_weight": patient_weight,
                "--injected_dose": injected_dose,
                "--injection_time": injection_time,
                "--injection_datetime": injection_datetime,
                "--allow_implausible_suv": allow_implausible_suv or None,
            }
            given = [k for k, v in dicom_only.items() if v is not None]
            if given:
                raise UniPETInputError(
                    f"{', '.join(given)}: only for --dicom_dir (the SUV -> Bq/mL direction reads the factor from the sidecar)"
                )
            convert_suv_to_bqml(
                str(suv_nifti), str(output), sidecar=sidecar, suv_factor=suv_factor, overwrite=bool(overwrite)
            )
    except UniPETInputError as exc:
        exit_bad_input(exc)
    except OSError as exc:  # disk full, permissions: still one line, no traceback
        exit_bad_input(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
