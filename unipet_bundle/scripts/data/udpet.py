"""Import Ultra-low Dose PET challenge (UDPET) NIfTI data into the paired SUV layout.

What the challenge distributes (from the public challenge pages and participants' public code,
udpet-challenge.github.io and KUL-recon-lab/2025_ud_pet_kul, read 2026):

- The *test* sets (2024/2025) are NIfTI in Bq/mL, one file per subject and DRF, named
  ``<SubjectID>_DRF-<n>.nii.gz`` (e.g. ``Anonymous-01_DRF-4.nii.gz``; n in 4, 10, 20, 50, 100), with
  one CSV, ``PET_info_noNORMAL.csv``, with one row per *file* and these columns:
  ``SubjectID, DoseReductionFactor, NiftiFileName, PatientWeight_kg, ImageUnits (BQML),
  PixelSpacing_x_mm, PixelSpacing_y_mm, SliceThickness_mm, Manufacturer, ManufacturerModelName,
  ReconstructionMethod, RadiopharmaceuticalName, TimeFromInjectionToAcquisition_s,
  RadionuclideTotalDose_Bq, RadionuclideHalfLife_s, DecayCorrection (START)``.
  The acquisition delay differs by a few seconds between the DRFs of one subject (each low-dose
  frame is a window from the middle of the scan), so the SUV factor is computed per file.
- The *training* set comes as DICOM, one folder per dose ("Full_dose", "1-4 dose", ..., "1-100 dose").
  The full-dose NIfTI name is **not documented publicly**. The CSV name "noNORMAL" suggests a
  full-dose entry called ``NORMAL``; we **assume** ``<id>_NORMAL.nii.gz`` and also accept
  ``<id>_DRF-1``, ``<id>_Full_dose``/``<id>_FullDose``/``<id>_FD``, and, for DICOM folders converted
  with their own names, ``<id>_1-<n> dose.nii.gz`` for low dose (all case-insensitive; separators
  ``_``, ``-`` or space). Files matching none of these are skipped with a warning (counted, not named);
  a name with a ``DRF`` token whose value is not a positive number is an error.

Conversion (body-weight SUV, g/mL)::

    SUV = Bq/mL * weight_g / (injected_dose_Bq * 2 ** (-delay_s / half_life_s))

``delay_s`` is ``TimeFromInjectionToAcquisition`` or acquisition time minus injection time. The rules
are :mod:`scripts.data.suv`'s, so a UDPET import and a DICOM series agree: times of day without dates
with the injection "after" the acquisition are refused (never taken as the day before; give dates),
a time-only delay over 12 h and any delay over 10 half-lives are refused, and so are a weight outside
1-350 kg or a dose outside 1 MBq-10 GBq (a column in g or MBq without its unit in the header). With
``DecayCorrection = ADMIN`` the image is already corrected to injection time, so the dose is not
decayed; ``START`` (the UDPET value, and the default) decays it to the acquisition start; ``NONE`` is
refused, as for a DICOM series (images not decay corrected need a factor per frame: give the file's SUV
factor in the CSV instead). The factor itself is :func:`scripts.data.suv.suv_factor_from_values`. ``ImageUnits`` ``GML``/``SUV`` means the
file is already SUV (factor 1); any unit other than ``BQML`` is an error. A CSV column with an SUV
factor (``suv_factor``, ``SUVFactor``, ...) is used as given when its cell is not empty.

Matching CSV rows to files: by file name (``NiftiFileName``) when the CSV has it, else by subject
and DRF (``DoseReductionFactor``; ``NORMAL``/``FULL``/``1`` mean full dose), else by subject alone.
A file of a known subject without its own row (the full dose, with the test-set CSV) uses the
subject's row with the earliest acquisition and says so in ``udpet.json`` and in a warning.

Column names are matched tolerantly: case, spaces, punctuation and a unit in brackets or as a
``_unit`` suffix are ignored for matching (``PatientWeight_kg`` = ``patient weight (kg)``), and the
unit is honoured: weight kg (default) / g / lb; dose Bq (default) / kBq / MBq / GBq / mCi / uCi;
times s (default) / ms / min / h. Accepted names per field (after normalisation) are in
``FIELD_ALIASES``; ``--column_map '{"weight": "Body mass (kg)"}'`` maps a field to your header
explicitly. Fields: subject, file, drf, weight, dose, delay, half_life, injection_time,
acquisition_time, suv_factor, decay_correction, units.

Output: ``<output_dir>/<SubjectID>/full_dose.nii.gz``, ``drf_<n>.nii.gz`` (float32 SUV, header and
geometry copied from the source file, scaling reset) and ``udpet.json`` (factor, its inputs and
the source file of every output). Everything is validated before anything is written, the
conversion is staged in a hidden folder beside ``output_dir`` and moved in at the end, and inputs
are never modified (``output_dir`` may not be inside the input dir or contain it).

CLI::

    cd unipet_bundle && python -m scripts.data.udpet --input_dir U --metadata_csv U/PET_info.csv \\
        --output_dir D [--overwrite] [--column_map '{"weight": "Weight (kg)"}']
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from scripts.common.errors import UniPETInputError, exit_bad_input
from scripts.common.io import atomic_write, atomic_write_json
from scripts.data.io import NIFTI_SUFFIXES, nifti_stem, write_nifti
from scripts.data.layout import check_3d, check_same_grid, format_drf, natural_key, read_grid, scan_paired_dataset
from scripts.data.suv import (
    check_body_suv,
    check_suv_inputs,
    parse_datetime,
    parse_time,
    suv_factor_from_values,
    uptake_time_s,
)

__all__ = [
    "FIELD_ALIASES",
    "UdpetSubject",
    "convert_udpet",
    "find_udpet_files",
    "main",
    "parse_udpet_name",
    "plan_conversion",
    "read_metadata_csv",
]

logger = logging.getLogger(__name__)

CREATED_BY = "scripts.data.udpet"

# Normalised header names (lowercase alphanumerics, unit removed) accepted per field, best first.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "subject": ("subjectid", "subject", "patientid", "pid", "caseid", "case", "patient", "id"),
    "file": ("niftifilename", "niftifile", "filename", "file", "nifti", "imagefile", "image"),
    "drf": ("dosereductionfactor", "drf", "dosereduction"),
    "weight": ("patientweight", "patientsweight", "weight", "bodyweight"),
    "dose": (
        "radionuclidetotaldose",
        "injecteddose",
        "injectedactivity",
        "injectedradioactivity",
        "totaldose",
        "dose",
        "activity",
    ),
    "delay": (
        "timefrominjectiontoacquisition",
        "timefrominjection",
        "injectiontoacquisition",
        "timesinceinjection",
        "uptaketime",
        "delay",
    ),
    "half_life": ("radionuclidehalflife", "halflife", "t12"),
    "injection_time": (
        "radiopharmaceuticalstartdatetime",
        "radiopharmaceuticalstarttime",
        "injectiondatetime",
        "injectiontime",
    ),
    "acquisition_time": ("acquisitiondatetime", "acquisitiontime", "seriesdatetime", "seriestime", "scanstarttime"),
    "suv_factor": ("suvfactor", "suvfac", "suvconversionfactor", "suvscalefactor", "suvbwscalefactor", "bqmltosuv"),
    "decay_correction": ("decaycorrection",),
    "units": ("imageunits", "units", "unit"),
}

# Unit -> multiplier to the internal unit (grams, becquerels, seconds).
_WEIGHT_UNITS = {None: 1000.0, "kg": 1000.0, "g": 1.0, "lb": 453.59237, "lbs": 453.59237}
_DOSE_UNITS = {None: 1.0, "bq": 1.0, "kbq": 1e3, "mbq": 1e6, "gbq": 1e9, "mci": 3.7e7, "uci": 3.7e4, "µci": 3.7e4}
_TIME_UNITS = {
    None: 1.0,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "seconds": 1.0,
    "ms": 1e-3,
    "min": 60.0,
    "mins": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hours": 3600.0,
}
_UNITS_BY_FIELD = {"weight": _WEIGHT_UNITS, "dose": _DOSE_UNITS, "delay": _TIME_UNITS, "half_life": _TIME_UNITS}
_SUFFIX_UNITS = sorted({u for table in _UNITS_BY_FIELD.values() for u in table if u}, key=len, reverse=True)
_SUFFIX_RE = re.compile(r"^(?P<base>.*?)[ _]+(?P<unit>" + "|".join(map(re.escape, _SUFFIX_UNITS)) + r")$", re.I)
_BRACKET_RE = re.compile(r"[\(\[]\s*(?P<unit>[^\)\]]*?)\s*[\)\]]")

# The plausibility ranges (weight, dose, body median SUV) and the uptake-time rules are those of
# scripts.data.suv (one rule wherever SUV is computed); here the fix is the CSV header's unit or the value.
_CSV_UNIT_FIX = "say the unit in the column header (e.g. '{header} [{unit}]') or via --column_map, or correct the value"
_CSV_DELAY_FIX = "check the injection and acquisition times and their units (seconds unless the header says otherwise, e.g. 'half life [min]')"
_CSV_TIME_FIX = "give dates with the times (YYYYMMDDHHMMSS or ISO 'YYYY-MM-DD HH:MM:SS') or a TimeFromInjectionToAcquisition column in s"

_FULL_DOSE_TOKENS = {"normal", "full", "fulldose", "fd", "1"}
_DRF_RE = re.compile(r"^(?P<subject>.+?)[ _-]+DRF[ _-]*(?P<drf>.*)$", re.I)
_FULL_RE = re.compile(r"^(?P<subject>.+?)[ _-]+(?:NORMAL|FULL[ _-]?DOSE|FD)$", re.I)
_FRACTION_RE = re.compile(r"^(?P<subject>.+?)[ _-]+1-(?P<drf>\d+(?:\.\d+)?)[ _-]?dose$", re.I)
_NUMBER_RE = re.compile(r"^\d+(?:\.\d+)?$")

FULL = "full"  # key of the full-dose file in per-subject dicts


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9µ]", "", text.lower())


def _split_header(header: str) -> tuple[str, str | None]:
    """``"Weight (kg)"`` -> ``("weight", "kg")``; ``"PatientWeight_kg"`` -> ``("patientweight", "kg")``."""
    text = header.strip()
    m = _BRACKET_RE.search(text)
    if m:
        return _normalise(_BRACKET_RE.sub(" ", text)), m.group("unit").strip().lower() or None
    m = _SUFFIX_RE.match(text)
    if m and _normalise(m.group("base")):
        return _normalise(m.group("base")), m.group("unit").lower()
    return _normalise(text), None


def _drf_value(text: str, path: Path) -> float | int:
    if not _NUMBER_RE.match(text) or float(text) <= 0:
        raise UniPETInputError(
            f"{path}: cannot read a dose reduction factor from '{text}'; UDPET low-dose files are named "
            "<id>_DRF-<n>.nii.gz with n a positive number: rename the file or move it out of the input dir"
        )
    value = float(text)
    return int(value) if value.is_integer() else value


def parse_udpet_name(path: str | os.PathLike) -> tuple[str, float | int | str] | None:
    """``(subject, drf)`` from a UDPET file name, with ``drf == "full"`` for the full dose; None if not UDPET.

    ``A-01_DRF-4.nii.gz`` -> ``("A-01", 4)``; ``A-01_NORMAL.nii.gz`` / ``A-01_DRF-1.nii.gz`` -> ``("A-01", "full")``.

    Raises:
        UniPETInputError: the name has a DRF token whose value is not a positive number.
    """
    p = Path(path)
    stem = nifti_stem(p)
    m = _FULL_RE.match(stem)
    if m:
        return m.group("subject"), FULL
    m = _DRF_RE.match(stem) or _FRACTION_RE.match(stem)
    if m:
        drf = _drf_value(m.group("drf").strip(), p)
        return m.group("subject"), FULL if drf == 1 else drf
    return None


def find_udpet_files(input_dir: str | os.PathLike) -> dict[str, dict[Any, Path]]:
    """Find UDPET NIfTI files under ``input_dir`` (any depth): ``{subject: {drf or "full": path}}``.

    Raises:
        UniPETInputError: missing folder, no UDPET file, a bad DRF in a name, or two files for one subject/DRF.
    """
    root = Path(input_dir).expanduser()
    if not root.is_dir():
        raise UniPETInputError(f"input dir {root} does not exist or is not a folder: check --input_dir")
    found: dict[str, dict[Any, Path]] = {}
    skipped = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or not path.name.endswith(NIFTI_SUFFIXES) or any(s.startswith(".") for s in rel.parts):
            continue
        parsed = parse_udpet_name(path)
        if parsed is None:
            skipped += 1
            continue
        subject, drf = parsed
        files = found.setdefault(subject, {})
        if drf in files:
            raise UniPETInputError(f"two files for subject '{subject}' DRF {drf}: {files[drf]} and {path}; keep one")
        files[drf] = path
    if skipped:
        logger.warning("skipped %d NIfTI file(s) not named <id>_DRF-<n> or <id>_NORMAL", skipped)
    if not found:
        raise UniPETInputError(
            f"no UDPET files in {root}: expected <id>_DRF-<n>.nii.gz low-dose and <id>_NORMAL.nii.gz full-dose files"
        )
    return found


@dataclass
class _Column:
    header: str
    unit: str | None


@dataclass
class _Row:
    number: int  # line number in the CSV file (header is line 1)
    values: dict[str, str]  # field -> raw cell text
    subject: str | None = None
    drf: Any = None  # "full", a number, or None when unknown


@dataclass
class MetadataTable:
    """The metadata CSV: resolved columns per field and the rows."""

    path: Path
    columns: dict[str, _Column]
    rows: list[_Row] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_file: dict[str, _Row] | None = None
        self._by_subject: dict[str, list[_Row]] | None = None

    def by_file(self) -> dict[str, _Row]:
        """File name and NIfTI stem -> first row naming that file."""
        if self._by_file is None:
            self._by_file = {}
            for r in self.rows:
                name = Path(r.values.get("file", "")).name
                if name:
                    self._by_file.setdefault(name, r)
                    self._by_file.setdefault(nifti_stem(name), r)
        return self._by_file

    def by_subject(self) -> dict[str, list[_Row]]:
        if self._by_subject is None:
            self._by_subject = {}
            for r in self.rows:
                if r.subject is not None:
                    self._by_subject.setdefault(r.subject, []).append(r)
        return self._by_subject


def _load_column_map(column_map: Any) -> dict[str, str]:
    if column_map is None or column_map == "":
        return {}
    if isinstance(column_map, str):
        text = column_map.strip()
        candidate = Path(text).expanduser()
        try:
            if not text.startswith("{") and candidate.is_file():
                text = candidate.read_text()
            column_map = json.loads(text)
        except (OSError, json.JSONDecodeError) as exc:
            raise UniPETInputError(
                f"--column_map is neither a JSON object nor a JSON file ({exc}); "
                'example: --column_map \'{"weight": "Weight (kg)"}\''
            ) from None
    if not isinstance(column_map, dict):
        raise UniPETInputError('--column_map must map field names to CSV headers, e.g. \'{"weight": "Weight (kg)"}\'')
    unknown = sorted(set(column_map) - set(FIELD_ALIASES))
    if unknown:
        raise UniPETInputError(f"--column_map: unknown field(s) {unknown}; fields are {sorted(FIELD_ALIASES)}")
    return {str(k): str(v) for k, v in column_map.items()}


def _sniff_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample.splitlines()[0] if sample else ",", delimiters=",;\t").delimiter
    except csv.Error:
        return ","


def read_metadata_csv(metadata_csv: str | os.PathLike, column_map: Any = None) -> MetadataTable:
    """Read the UDPET metadata CSV and resolve its columns (rules in the module docstring).

    Raises:
        UniPETInputError: missing/unreadable CSV, unknown ``column_map`` fields or headers, no subject/file column.
    """
    path = Path(metadata_csv).expanduser()
    if not path.is_file():
        raise UniPETInputError(f"metadata CSV {path} not found: check --metadata_csv")
    overrides = _load_column_map(column_map)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UniPETInputError(f"metadata CSV {path} cannot be read ({exc}): save it as UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text), delimiter=_sniff_delimiter(text))
    headers = [h for h in (reader.fieldnames or []) if h is not None]
    if not headers:
        raise UniPETInputError(f"metadata CSV {path} is empty: it needs a header line and one row per file or subject")

    columns: dict[str, _Column] = {}
    by_exact = {h.strip().lower(): h for h in headers}
    for fld, header in overrides.items():
        actual = by_exact.get(header.strip().lower())
        if actual is None:
            raise UniPETInputError(
                f"--column_map: column '{header}' (for {fld}) is not in {path.name}; its columns are {headers}"
            )
        columns[fld] = _Column(actual, _split_header(actual)[1])
    split = {h: _split_header(h) for h in headers}
    for fld, aliases in FIELD_ALIASES.items():
        if fld in columns:
            continue
        for alias in aliases:
            match = next((h for h in headers if split[h][0] == alias), None)
            if match is not None:
                columns[fld] = _Column(match, split[match][1])
                break
    for fld, col in columns.items():
        units = _UNITS_BY_FIELD.get(fld)
        if units is not None and col.unit not in units:
            raise UniPETInputError(
                f"metadata CSV column '{col.header}': unit '{col.unit}' not understood for {fld}; "
                f"use one of {sorted(u for u in units if u)}"
            )
    if "subject" not in columns and "file" not in columns:
        raise UniPETInputError(
            f"metadata CSV {path.name} has no subject column ({', '.join(FIELD_ALIASES['subject'][:3])}, ...) and no "
            f'file-name column (NiftiFileName, ...): add one or map yours with --column_map \'{{"subject": "<header>"}}\''
        )

    table = MetadataTable(path=path, columns=columns)
    for index, raw in enumerate(reader):
        values = {fld: (raw.get(col.header) or "").strip() for fld, col in columns.items()}
        if not any(values.values()):
            continue
        row = _Row(number=index + 2, values=values)
        if values.get("subject"):
            row.subject = values["subject"]
        if values.get("file"):
            parsed = _safe_parse(values["file"])
            if parsed is not None:
                row.subject = row.subject or parsed[0]
                row.drf = parsed[1]
        if values.get("drf"):
            row.drf = _csv_drf(values["drf"], row.number, columns["drf"].header)
        table.rows.append(row)
    return table


def _safe_parse(name: str) -> tuple[str, Any] | None:
    try:
        return parse_udpet_name(Path(name).name)
    except UniPETInputError:
        return None


def _csv_drf(text: str, line: int, header: str) -> Any:
    token = _normalise(text)
    if token in _FULL_DOSE_TOKENS:
        return FULL
    try:
        value = float(text.replace(",", "."))
    except ValueError:
        raise UniPETInputError(
            f"metadata CSV line {line}, column '{header}': '{text}' is not a DRF (a number or NORMAL)"
        ) from None
    if value <= 0:
        raise UniPETInputError(f"metadata CSV line {line}, column '{header}': DRF must be positive, got {text}")
    if value == 1:
        return FULL
    return int(value) if value.is_integer() else value


def _number(row: _Row, fld: str, table: MetadataTable) -> float:
    header = table.columns[fld].header
    text = row.values.get(fld, "")
    if not text:
        raise UniPETInputError(f"metadata CSV line {row.number}: column '{header}' is empty; fill it in")
    try:
        value = float(text)
    except ValueError:
        try:
            value = float(text.replace(",", ".")) if text.count(",") == 1 and "." not in text else float("nan")
        except ValueError:
            value = float("nan")
    if not math.isfinite(value):
        raise UniPETInputError(f"metadata CSV line {row.number}, column '{header}': '{text}' is not a number")
    return value * _UNITS_BY_FIELD.get(fld, {None: 1.0}).get(table.columns[fld].unit, 1.0)


def _clock(text: str, row: _Row, header: str) -> datetime | float:
    """A datetime (when a date is given) or seconds since midnight; DICOM DT/TM and ``H:MM[:SS]`` are read by
    :mod:`scripts.data.suv`'s parsers (the ones DICOM series use), ISO ``YYYY-MM-DD HH:MM:SS`` by Python's."""
    t = text.strip()
    if re.fullmatch(r"\d{14}(\.\d+)?", t):  # DICOM DT with seconds (a shorter digit string is a TM or nothing)
        parsed = parse_datetime(t)
        if parsed is not None:
            return parsed
    clock = parse_time(t)  # DICOM TM (HHMMSS[.F]) or H:MM[:SS[.F]]
    if clock is not None and (":" in t or re.fullmatch(r"\d{6}(\.\d+)?", t)):
        return clock.hour * 3600 + clock.minute * 60 + clock.second + clock.microsecond / 1e6
    try:
        return datetime.fromisoformat(t)
    except ValueError:
        raise UniPETInputError(
            f"metadata CSV line {row.number}, column '{header}': cannot read time '{text}'; "
            "use HH:MM:SS, HHMMSS, YYYYMMDDHHMMSS or ISO 'YYYY-MM-DD HH:MM:SS'"
        ) from None


def _delay_s(row: _Row, table: MetadataTable) -> float:
    if row.values.get("delay"):
        return _number(row, "delay", table)
    inj = _clock(row.values.get("injection_time", ""), row, table.columns["injection_time"].header)
    acq = _clock(row.values.get("acquisition_time", ""), row, table.columns["acquisition_time"].header)
    if isinstance(inj, datetime) and isinstance(acq, datetime):
        return (acq - inj).total_seconds()
    # Times of day only: the day is unknown, so an injection "after" the scan is refused, never taken as
    # the day before (the rule of scripts.data.suv.uptake_time_s).
    to_s = lambda v: v.hour * 3600 + v.minute * 60 + v.second + v.microsecond / 1e6 if isinstance(v, datetime) else v  # noqa: E731
    day = datetime(2000, 1, 1)
    delay, _ = uptake_time_s(  # SUVError is a UniPETInputError
        day + timedelta(seconds=to_s(inj)),
        day + timedelta(seconds=to_s(acq)),
        None,
        time_only=True,
        injection_what=f"metadata CSV line {row.number}: injection time '{table.columns['injection_time'].header}'",
        reference_what=f"acquisition time '{table.columns['acquisition_time'].header}'",
        fix=_CSV_TIME_FIX,
    )
    return delay


_REQUIRED = ("weight", "dose", "half_life")


def _missing_columns(table: MetadataTable) -> list[str]:
    missing = [f for f in _REQUIRED if f not in table.columns]
    if "delay" not in table.columns and not {"injection_time", "acquisition_time"} <= set(table.columns):
        missing.append("delay (or injection_time + acquisition_time)")
    return missing


def _missing_message(table: MetadataTable, missing: list[str], where: str = "") -> str:
    accepted = "; ".join(f"{m.split()[0]}: {', '.join(FIELD_ALIASES[m.split()[0]][:3])}" for m in missing)
    return (
        f"metadata CSV {table.path.name}{where} lacks column(s) for {', '.join(missing)} (accepted headers, any case, "
        f"unit in brackets or as _unit: {accepted}, ...); rename them or pass --column_map "
        '\'{"weight": "<your header>"}\''
    )


def _row_factor(row: _Row, table: MetadataTable) -> tuple[float, dict[str, Any]]:
    """SUV factor of one CSV row and what it was computed from."""
    units = _normalise(row.values.get("units", "")) or "bqml"
    info: dict[str, Any] = {"csv_line": row.number}
    if units in {"gml", "suv", "suvbw"}:
        info["factor_from"] = f"image units {row.values['units']} (already SUV)"
        return 1.0, info
    if units != "bqml":
        raise UniPETInputError(
            f"metadata CSV line {row.number}: image units '{row.values['units']}' are not Bq/mL (BQML); "
            "only BQML (or GML = SUV) images can be converted"
        )
    if row.values.get("suv_factor"):
        factor = _number(row, "suv_factor", table)
        if factor <= 0:
            raise UniPETInputError(f"metadata CSV line {row.number}: SUV factor must be positive, got {factor}")
        info["factor_from"] = f"CSV column '{table.columns['suv_factor'].header}'"
        return factor, info
    missing = _missing_columns(table)
    if missing:
        raise UniPETInputError(_missing_message(table, missing, f" (line {row.number} has no SUV factor)"))
    weight_g = _number(row, "weight", table)
    dose_bq = _number(row, "dose", table)
    half_life_s = _number(row, "half_life", table)
    delay_s = _delay_s(row, table)
    # Impossible values (a weight in g, a dose in MBq, without a unit in the header) are refused.
    check_suv_inputs(
        weight_g / 1000.0,
        dose_bq,
        weight_what=f"metadata CSV line {row.number}: weight (column '{table.columns['weight'].header}')",
        dose_what=f"metadata CSV line {row.number}: injected dose",
        weight_fix=_CSV_UNIT_FIX.format(header=table.columns["weight"].header, unit="g"),
        dose_fix=_CSV_UNIT_FIX.format(header=table.columns["dose"].header, unit="MBq"),
    )
    correction = (row.values.get("decay_correction") or "START").upper()
    try:  # the DICOM series' rules (scripts.data.suv): DecayCorrection NONE is refused there and here
        factor = suv_factor_from_values(
            weight_g / 1000.0, dose_bq, delay_s, half_life_s, correction, fix=_CSV_DELAY_FIX
        )
    except UniPETInputError as exc:
        raise UniPETInputError(f"metadata CSV line {row.number}: {exc}") from None
    info.update(
        factor_from="computed: weight_g / (dose_Bq * 2 ** (-delay_s / half_life_s))",
        weight_kg=weight_g / 1000.0,
        injected_dose_bq=dose_bq,
        delay_s=delay_s,
        half_life_s=half_life_s,
        decay_correction=correction,
    )
    return factor, info


@dataclass
class UdpetSubject:
    """Validated conversion plan of one subject: source file and SUV factor per output file."""

    subject: str
    sources: dict[str, Path]  # output file name -> source file
    factors: dict[str, float]  # output file name -> SUV factor
    details: dict[str, dict[str, Any]]  # output file name -> udpet.json record


def _output_name(drf: Any) -> str:
    return "full_dose.nii.gz" if drf == FULL else f"drf_{format_drf(drf)}.nii.gz"


def _select_row(table: MetadataTable, subject: str, drf: Any, path: Path) -> tuple[_Row, bool]:
    """The CSV row for one file and whether it is a fallback (no row of its own)."""
    rows = table.by_subject().get(subject, [])
    if "file" in table.columns:
        row = table.by_file().get(path.name) or table.by_file().get(nifti_stem(path))
        if row is not None:
            return row, False
    if "drf" in table.columns or "file" in table.columns:
        for r in rows:
            if r.drf is not None and (
                r.drf == drf or (drf != FULL and r.drf != FULL and math.isclose(float(r.drf), float(drf)))
            ):
                return r, False
    if not rows:
        column = table.columns.get("subject", table.columns.get("file"))
        raise UniPETInputError(
            f"subject '{subject}' ({path.name}) has no row in {table.path.name} (column '{column.header}'): "
            "add its metadata row or move its files out of the input dir"
        )
    if len(rows) == 1:
        return rows[0], False
    if "drf" not in table.columns and "file" not in table.columns:
        factors = {_row_factor(r, table)[0] for r in rows}
        if len(factors) == 1:
            return rows[0], False
        raise UniPETInputError(
            f"subject '{subject}' has {len(rows)} rows in {table.path.name} (lines {[r.number for r in rows]}) with different "
            "SUV factors and no DRF or file-name column to tell them apart: add one or keep one row per subject"
        )
    # No row of its own (typically the full dose with the test-set CSV): the scan started first,
    # so the subject's earliest acquisition is the closest reference time.
    delays = []
    for r in rows:
        try:
            delays.append(_delay_s(r, table))
        except (UniPETInputError, KeyError):
            delays.append(math.inf)
    return rows[int(np.argmin(delays))], True


def plan_conversion(
    input_dir: str | os.PathLike, metadata_csv: str | os.PathLike, column_map: Any = None
) -> list[UdpetSubject]:
    """Find, match and validate everything (files, CSV rows, SUV factors, geometry) without writing.

    Raises:
        UniPETInputError: any problem, naming the file/subject/column and the fix.
    """
    files = find_udpet_files(input_dir)
    table = read_metadata_csv(metadata_csv, column_map)
    if "suv_factor" not in table.columns:
        missing = _missing_columns(table)
        if missing:
            raise UniPETInputError(_missing_message(table, missing))
    root = Path(input_dir).expanduser()
    plans = []
    n_fallback = 0
    for subject in sorted(files, key=natural_key):
        by_drf = files[subject]
        if subject.startswith("."):
            raise UniPETInputError(
                f"subject id '{subject}' starts with '.', which the paired layout skips: rename its files"
            )
        if FULL not in by_drf:
            raise UniPETInputError(
                f"subject '{subject}' has no full-dose file (<id>_NORMAL.nii.gz or <id>_DRF-1.nii.gz next to "
                f"{by_drf[next(iter(by_drf))].name}): add it; test sets without full dose cannot make training pairs"
            )
        if len(by_drf) == 1:
            raise UniPETInputError(
                f"subject '{subject}' has a full-dose file but no <id>_DRF-<n> low-dose file: add at least one"
            )
        full_path = by_drf[FULL]
        ref_grid = read_grid(full_path)
        check_3d(full_path, ref_grid[0])
        plan = UdpetSubject(subject, {}, {}, {})
        for drf in [FULL, *sorted((d for d in by_drf if d != FULL), key=float)]:
            path = by_drf[drf]
            if drf != FULL:
                check_same_grid(full_path, path, ref_grid=ref_grid)
            row, fallback = _select_row(table, subject, drf, path)
            factor, info = _row_factor(row, table)
            n_fallback += fallback
            name = _output_name(drf)
            plan.sources[name] = path
            plan.factors[name] = factor
            plan.details[name] = {
                "source": path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path),
                "drf": "full" if drf == FULL else drf,
                "suv_factor": factor,
                **info,
                "row_of_its_own": not fallback,
            }
        plans.append(plan)
    if n_fallback:
        logger.warning(
            "%d file(s) have no CSV row of their own (usually the full dose); they use their subject's row with the "
            "earliest acquisition (see row_of_its_own in udpet.json)",
            n_fallback,
        )
    return plans


def _write_suv(source: Path, factor: float, dest: Path) -> None:
    """Write ``source`` (Bq/mL) times ``factor`` as float32, keeping its header and geometry exactly."""
    try:
        src = nib.load(str(source))
        data = np.asarray(src.dataobj, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for truncated files
        raise UniPETInputError(
            f"{source}: cannot read as NIfTI ({type(exc).__name__}: {exc}); is the file complete?"
        ) from exc
    suv = data * factor
    # A unit slip that no column shows (an "SUV" file holding Bq/mL, a wrong SUV factor column) is caught here:
    # refused like the SUV tool does, and nothing reaches output_dir (this runs in the staging folder).
    check_body_suv(
        suv, str(source), fix="check the CSV's units, weight, dose and SUV factor for this file (see udpet.json)"
    )
    header = src.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0.0, 0.0  # display range of the Bq/mL image no longer applies
    header["descrip"] = b"SUVbw g/mL (UniPET UDPET import)"
    # affine=None keeps the source qform/sform (codes and values) instead of rebuilding them.
    img = type(src)(suv.astype(np.float32), None, header=header)
    atomic_write(dest, lambda tmp: write_nifti(img, tmp))


def _check_dirs(input_dir: Path, output_dir: Path, overwrite: bool) -> None:
    inp, out = input_dir.expanduser().resolve(), output_dir.expanduser().resolve()
    if out == inp or inp in out.parents or out in inp.parents:
        raise UniPETInputError(
            f"--output_dir {out} and --input_dir {inp} overlap: write the paired dataset to a separate folder "
            "(inputs are never modified)"
        )
    if out.exists() and not out.is_dir():
        raise UniPETInputError(f"--output_dir {out} is a file: choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UniPETInputError(f"--output_dir {out} exists and is not empty: choose another folder or pass --overwrite")


def convert_udpet(
    input_dir: str | os.PathLike,
    metadata_csv: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    column_map: Any = None,
) -> list[Path]:
    """Convert a UDPET NIfTI folder (Bq/mL) to the paired SUV layout (details in the module docstring).

    Args:
        input_dir: folder with ``<id>_DRF-<n>.nii.gz`` and ``<id>_NORMAL.nii.gz`` files (any depth).
        metadata_csv: the UDPET metadata CSV (weight, dose, times, half-life, or an SUV factor).
        output_dir: paired dataset folder to create (``<id>/full_dose.nii.gz``, ``<id>/drf_<n>.nii.gz``).
        overwrite: allow a non-empty ``output_dir``; its files of the same names are replaced.
        column_map: field -> CSV header overrides (dict, JSON text or JSON file path).

    Returns:
        the subject folders written.

    Raises:
        UniPETInputError: any input problem; nothing is written then.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir).expanduser().resolve()
    _check_dirs(input_dir, output_dir, overwrite)
    plans = plan_conversion(input_dir, metadata_csv, column_map)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging-", dir=output_dir.parent))
    try:
        for i, plan in enumerate(tqdm(plans, desc="UDPET -> SUV", unit="subject", disable=None)):
            subject_dir = staging / plan.subject
            for name, source in plan.sources.items():
                _write_suv(source, plan.factors[name], subject_dir / name)
            atomic_write_json(
                subject_dir / "udpet.json",
                {
                    "created_by": CREATED_BY,
                    "units": {"input": "Bq/mL", "output": "SUVbw (g/mL)"},
                    "files": plan.details,
                },
            )
            logger.info("converted subject %d/%d (%d files)", i + 1, len(plans), len(plan.sources))
        scan_paired_dataset(staging)  # the result must be a valid paired dataset before it is moved in
        output_dir.mkdir(exist_ok=True)
        for plan in plans:
            (output_dir / plan.subject).mkdir(exist_ok=True)
            for item in sorted((staging / plan.subject).iterdir()):
                os.replace(item, output_dir / plan.subject / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %d subjects to %s", len(plans), output_dir)
    return [output_dir / p.subject for p in plans]


def main(
    input_dir: str,
    metadata_csv: str,
    output_dir: str,
    overwrite: bool = False,
    column_map: Any = None,
) -> None:
    """Convert UDPET challenge NIfTI (Bq/mL, <id>_DRF-<n>.nii.gz + <id>_NORMAL.nii.gz) to the paired SUV layout.

    Args:
        input_dir: folder with the UDPET NIfTI files (searched recursively); never modified.
        metadata_csv: UDPET metadata CSV (PatientWeight_kg, RadionuclideTotalDose_Bq, TimeFromInjectionToAcquisition_s,
            RadionuclideHalfLife_s, DecayCorrection; or an SUV factor column). Column names are matched tolerantly.
        output_dir: paired dataset folder to write: <id>/full_dose.nii.gz, <id>/drf_<n>.nii.gz, <id>/udpet.json.
        overwrite: allow writing into a non-empty output_dir (same-named files are replaced).
        column_map: JSON object (or JSON file) mapping fields to your CSV headers, e.g. '{"weight": "Weight (kg)"}'.
            Fields: subject, file, drf, weight, dose, delay, half_life, injection_time, acquisition_time,
            suv_factor, decay_correction, units.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert_udpet(input_dir, metadata_csv, output_dir, overwrite=overwrite, column_map=column_map)
    except UniPETInputError as exc:
        exit_bad_input(exc)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
