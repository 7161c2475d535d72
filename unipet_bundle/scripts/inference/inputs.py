"""The inputs of whole-volume inference: discover them, validate them all, load each into SUV.

What is denoised (only the direct entries of ``dataset_dir``; deeper folders are not searched):

- every ``*.nii`` / ``*.nii.gz`` file: an SUV volume (body weight, g/mL), e.g. one written by
  ``python -m scripts.data.suv``; its name is the file stem (``sub01.nii.gz`` -> ``sub01``);
- every sub-folder holding a PET (Modality PT) DICOM series: converted to SUV with the series' own
  tags (:func:`scripts.data.suv.read_pet_series`); its name is the folder name.

Sub-folders without a PT series (CT, reports, anything not DICOM) and other files are skipped with a
log line that says why; hidden entries (names starting with ``.``) are skipped too, with a warning for a
hidden folder or NIfTI file (rename it to denoise it). Names are shown quoted when they hold control
characters (a newline in a folder name cannot forge a log line). When ``output_dir`` is ``dataset_dir``
itself, ``*_denoised*`` entries are taken for outputs of an earlier run and are not denoised again.

:func:`prepare_datalist` checks *everything* before any work starts (each input is read in full, so a
truncated file is found; 2D images, 4D (dynamic) volumes, NaN/Inf voxels and all-zero volumes are
refused, negative voxels are kept: :mod:`scripts.data.volume_checks`; every output path is checked),
so a bad input never leaves some outputs written and others not. An input whose outputs another live
run is writing is refused; one whose earlier run was killed while publishing is redone without
``overwrite`` (only the partial outputs that run recorded are replaced: :mod:`scripts.inference.claims`).
The first input (the one denoised first; a one-study run's only one) is read once: the volume its check
loaded is kept and handed to :class:`LoadPETd`, unless the file changed in between (size, modification
time, inode; for a DICOM folder, those of every file). The others are read twice (once to check them,
once to denoise them), so memory holds at most two volumes while checking and one while denoising.

Array convention: (X, Y, Z) in file order, as nibabel and MONAI's ``LoadImage(reader="NibabelReader")``
give for NIfTI and as training uses; a DICOM series is (column, row, slice sorted along the slice
normal), the same order ``scripts.data.suv`` writes to NIfTI. Affines map voxels to RAS mm.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.common.errors import UniPETInputError, shown
from scripts.common.geometry import voxel_spacing
from scripts.common.io import check_output_path
from scripts.common.options import as_bool, check_output_format
from scripts.data.dicom_series import DicomSeriesError, read_dicom
from scripts.data.io import NIFTI_SUFFIXES, load_nifti, nifti_stem
from scripts.data.suv import SUVError, check_body_suv, read_pet_series
from scripts.data.volume_checks import check_pet_volume
from scripts.inference.claims import (
    OutputBusyError,
    busy_message,
    claim_path,
    inspect_claim,
    is_our_temporary,
    partial_outputs,
)
from scripts.inference.dicom_writer import SourceSeries
from scripts.inference.writer import DICOM_DIR_SUFFIX, OUTPUT_SUFFIX, planned_outputs

__all__ = [
    "InferenceInput",
    "KeepNatived",
    "LoadPETd",
    "LoadedVolume",
    "discover_inputs",
    "load_volume",
    "prepare_datalist",
]

logger = logging.getLogger(__name__)

# Above this an "SUV" NIfTI almost certainly holds Bq/mL (SUVmax of FDG bladders is ~100 at most).
_SUSPICIOUS_SUV = 1000.0


@dataclass(frozen=True)
class InferenceInput:
    """One thing to denoise: a NIfTI file (``kind="nifti"``) or a PET DICOM series folder (``"dicom"``)."""

    name: str
    path: Path
    kind: str

    def as_item(self) -> dict[str, str]:
        """The datalist entry: ``{"image": path, "name": name, "kind": kind}``."""
        return {"image": str(self.path), "name": self.name, "kind": self.kind}


@dataclass
class LoadedVolume:
    """An input in SUV, with its geometry.

    Attributes:
        suv: float32 (X, Y, Z), body-weight SUV (g/mL); negative voxels kept as reconstructed. Not
            necessarily C-contiguous (a NIfTI file's array is kept in its Fortran order: no copy).
        affine: 4x4 voxel -> RAS mm.
        suv_factor: SUV = suv_factor x source value (g/mL per Bq/mL for a BQML series; 1.0 for NIfTI).
        units: source units: ``SUV`` for NIfTI, the DICOM Units tag (``BQML``, ``GML``) for a series.
        series: for a DICOM series, its headers in the volume's slice order, factor and SUV record, carried
            to the DICOM writer (:class:`scripts.inference.dicom_writer.SourceSeries`); None for NIfTI.
    """

    suv: np.ndarray
    affine: np.ndarray
    suv_factor: float
    units: str
    series: SourceSeries | None = None


def _fmt(values: Sequence[float], digits: int = 4) -> str:
    return "x".join(f"{float(v):.{digits}g}" for v in values)


# ------------------------------------------------------------------------------------------ discovery


def _dicom_modality(folder: Path) -> str | None:
    """``"PT"`` if any file of ``folder`` is a DICOM object with Modality PT, else the first other
    modality found, else None (no DICOM file). Headers only; unreadable files are left to validation."""
    other: str | None = None
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            ds = read_dicom(path, stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID", "Rows"])
        except Exception:  # not DICOM, or damaged: a PET folder with such a file fails validation later
            continue
        modality = str(ds.get("Modality", "") or "").strip()
        if modality == "PT":
            return "PT"
        other = other or modality or "unknown-modality"
    return other


def _one_per_target(found: list[InferenceInput]) -> list[InferenceInput]:
    """``found`` with each file or folder on disk once: entries that are the same file (a symbolic link to another
    entry, or a hard link) are denoised once, under the name of the entry that is not a symbolic link (else the first
    in sorted order), and each one left out is warned about by name."""
    groups: dict[Any, list[InferenceInput]] = {}  # in listing order
    for item in found:
        try:
            st = item.path.stat()  # follows links: the file or folder itself
            key: Any = (st.st_dev, st.st_ino)
        except OSError:  # gone or unreadable since it was listed: kept alone, validation names it
            key = id(item)
        groups.setdefault(key, []).append(item)
    kept: list[InferenceInput] = []
    for same in groups.values():
        chosen = next((i for i in same if not i.path.is_symlink()), same[0])
        kept.append(chosen)
        for other in same:
            if other is not chosen:
                logger.warning(
                    "skipping %s: it is the same %s on disk as %s (%s); the study is denoised once, as %s",
                    shown(other.path.name),
                    "file" if other.kind == "nifti" else "folder",
                    shown(chosen.path.name),
                    "a symbolic link to it" if other.path.is_symlink() else "a hard link",
                    shown(chosen.name),
                )
    return sorted(kept, key=lambda i: i.path.name)


def discover_inputs(
    dataset_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None
) -> list[InferenceInput]:
    """NIfTI files and PET DICOM series folders directly in ``dataset_dir``, sorted by name.

    ``dataset_dir`` may also be one study: a single NIfTI file, or a single PET DICOM series folder (a folder
    whose own files are PET DICOM); its output name is the file stem or the folder name.

    Raises:
        UniPETInputError: the folder is missing, is a file, or holds nothing to denoise.
    """
    folder = Path(dataset_dir).expanduser()
    if not folder.exists():
        raise UniPETInputError(f"dataset folder {folder} does not exist: check --dataset_dir")
    if folder.is_file() and folder.name.endswith(NIFTI_SUFFIXES):  # one-file denoising
        logger.info("one study: the NIfTI file %s", shown(folder.name))
        return [InferenceInput(nifti_stem(folder), folder, "nifti")]
    if not folder.is_dir():
        raise UniPETInputError(
            f"--dataset_dir {folder} is a file but not a NIfTI file (*.nii, *.nii.gz): pass a NIfTI file, a PET DICOM "
            "series folder, or the folder that holds NIfTI files and/or DICOM series folders"
        )
    if _dicom_modality(folder) == "PT":  # one series: the folder itself holds the PET DICOM files
        logger.info("one study: the PET DICOM series folder %s", shown(folder.name))
        return [InferenceInput(folder.name, folder, "dicom")]
    outputs_here = output_dir is not None and Path(output_dir).expanduser().resolve() == folder.resolve()
    found: list[InferenceInput] = []
    for entry in sorted(folder.iterdir()):
        label = shown(entry.name)  # quoted when it holds a newline or other control characters: no forged log lines
        if entry.name.startswith("."):
            if is_our_temporary(entry.name):
                logger.info("skipping %s: a temporary or claim file of a UniPET inference run", label)
            elif entry.is_dir() or entry.name.endswith(NIFTI_SUFFIXES):
                logger.warning(
                    "skipping hidden %s %s: names starting with '.' are hidden (system or temporary files) and are not "
                    "denoised; rename it without the leading dot to denoise it",
                    "folder" if entry.is_dir() else "file",
                    label,
                )
            else:
                logger.info("skipping hidden file %s", label)
            continue
        if entry.is_file() and entry.name.endswith(NIFTI_SUFFIXES):
            name = nifti_stem(entry)
            if outputs_here and name.endswith(OUTPUT_SUFFIX):
                logger.info("skipping %s: an output of an earlier run (output_dir is the dataset folder)", label)
                continue
            found.append(InferenceInput(name, entry, "nifti"))
        elif entry.is_dir():
            if outputs_here and entry.name.endswith(DICOM_DIR_SUFFIX):
                logger.info("skipping folder %s: an output of an earlier run (output_dir is the dataset folder)", label)
                continue
            modality = _dicom_modality(entry)
            if modality == "PT":
                found.append(InferenceInput(entry.name, entry, "dicom"))
            else:
                what = "no DICOM files" if modality is None else f"a {modality} series, not PET"
                logger.info("skipping folder %s: %s", label, what)
        elif entry.is_symlink() and not entry.exists():
            logger.warning(
                "skipping %s: a link to %s, which cannot be opened (missing, or a loop of links)",
                label,
                shown(os.readlink(entry)),
            )
        elif outputs_here and entry.name.endswith(f"{OUTPUT_SUFFIX}.json"):
            logger.info("skipping %s: an output of an earlier run (output_dir is the dataset folder)", label)
        else:
            logger.info("skipping file %s: not a NIfTI file (*.nii, *.nii.gz) nor a DICOM series folder", label)
    found = _one_per_target(found)
    if not found:
        raise UniPETInputError(
            f"nothing to denoise in {folder}: looked for *.nii and *.nii.gz files and for sub-folders holding a PET "
            "(Modality PT) DICOM series, directly inside it (or pass one NIfTI file or one PET series folder)"
        )
    return found


# ------------------------------------------------------------------------------------------ loading


def check_orthogonal_axes(name: str, affine: np.ndarray, tol: float = 1e-3) -> None:
    """Refuse a sheared voxel grid (axes not at right angles), before any network work.

    The network grid is the input grid reoriented and rescaled; a sheared grid cannot be mapped to it and
    back without interpolating the whole image (the DICOM reader refuses shear for the same reason).

    Raises:
        UniPETInputError: the affine's axes are not orthogonal (cosine above ``tol``).
    """
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = axes / np.maximum(np.linalg.norm(axes, axis=0, keepdims=True), 1e-12)
    worst = float(np.max(np.abs(unit.T @ unit - np.eye(3))))
    if worst > tol:
        raise UniPETInputError(
            f"{name}: the voxel axes are sheared (not at right angles; largest cosine {worst:.3g}), which the "
            "network grid cannot follow: resample the image to an orthogonal grid first (e.g. with ITK or nibabel)"
        )


VOXEL_MM_RANGE = (0.1, 20.0)
"""Voxel sizes (mm) of real PET, preclinical (~0.4 mm) to coarse clinical (~6 mm) with a margin either way."""


def check_voxel_size(name: str, affine: np.ndarray) -> None:
    """Refuse a voxel size no PET scanner produces, before any network work: it means a header whose units or affine
    are wrong (a 4 mm voxel stored as 4000 with units "mm" tried to allocate petabytes; as 0.004 it was left
    untouched as "denoised").

    Raises:
        UniPETInputError: a voxel edge outside :data:`VOXEL_MM_RANGE`.
    """
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    low, high = VOXEL_MM_RANGE
    if np.any(sizes < low) or np.any(sizes > high) or not np.all(np.isfinite(sizes)):
        shown = "x".join(f"{v:.4g}" for v in sizes)
        raise UniPETInputError(
            f"{name}: voxel size {shown} mm is not a PET voxel ({low:g}-{high:g} mm): the header's affine or spatial "
            "units (xyzt_units) are wrong; fix the header (e.g. with nibabel) and run again"
        )


def load_volume(item: InferenceInput, check_body: bool = True) -> LoadedVolume:
    """Read ``item`` into SUV (float32 (X, Y, Z)) with its RAS affine; see the module docstring.

    ``check_body=False`` skips the body-median SUV plausibility check of a NIfTI input, for a caller that
    converts the values to SUV itself (the MONAI Label task's ``suv_factor``) and checks the converted volume.

    Raises:
        UniPETInputError: unreadable/truncated file, bad DICOM series or SUV tags, or a volume
            :func:`scripts.data.volume_checks.check_pet_volume` refuses (every message names the input).
    """
    if item.kind == "nifti":
        # read into memory, not a memory map of the file: the residual step adds the correction into this
        # array in place, and page faults on a mapped whole-body file cost more than one sequential read
        data, affine = load_nifti(item.path, dtype=np.float32, mmap=False)
        suv = check_pet_volume(str(item.path), data)
        check_orthogonal_axes(str(item.path), affine)
        check_voxel_size(str(item.path), affine)
        if check_body:
            check_body_suv(
                suv,
                str(item.path),
                fix="a NIfTI input must hold body-weight SUV: convert Bq/mL with python -m scripts.data.suv",
            )  # issue 12
        peak = float(suv.max())
        if peak > _SUSPICIOUS_SUV:
            logger.warning(
                "%s: values up to %.4g: this looks like Bq/mL, not SUV; NIfTI inputs must be SUV "
                "(convert with python -m scripts.data.suv), or the result will be wrong",
                item.name,
                peak,
            )
        # no C-order copy: nibabel gives a float32 file as a Fortran-ordered array; every consumer takes strides
        return LoadedVolume(np.asarray(suv, dtype=np.float32), affine, 1.0, "SUV")
    if item.kind == "dicom":
        try:
            series = read_pet_series(item.path)
        except SUVError as exc:
            # its hints name options of the SUV tool, which inference does not have
            raise SUVError(
                f"{item.path}: {exc} [inference reads SUV from the DICOM tags only: convert this series with "
                "python -m scripts.data.suv and those options, then denoise the NIfTI]"
            ) from None
        except DicomSeriesError as exc:
            # the hints name --dicom_dir/--series_uid of the SUV tool; here every sub-folder is one series
            raise DicomSeriesError(
                f"{exc} [inference reads each sub-folder of --dataset_dir as one PET series: give every series its own "
                "sub-folder holding only its slices]"
            ) from None
        suv = check_pet_volume(str(item.path), series.suv)
        return LoadedVolume(
            np.ascontiguousarray(suv, dtype=np.float32),
            series.affine,
            float(series.suv_factor),
            series.units,
            SourceSeries(series.datasets, series.suv_factor, series.suv_details),
        )
    raise UniPETInputError(f"{item.path}: unknown input kind {item.kind!r} (expected 'nifti' or 'dicom')")


def _source_key(path: Path) -> tuple[Any, ...]:
    """What identifies the content of an input file or DICOM folder without reading it: the path, and the size,
    modification time and inode of the file (of every file of the folder)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return (str(path.absolute()),) + tuple(
        (p.name, st.st_size, st.st_mtime_ns, st.st_ino) for p in files for st in [p.stat()]
    )


class _CheckedVolume:
    """The volume :func:`prepare_datalist` loaded to check the first input, kept for :class:`LoadPETd`, so a
    one-study run reads its (whole-body, 0.5 GB) input once. Handed out at most once (the residual step writes
    into it), and only while the input is unchanged on disk."""

    def __init__(self) -> None:
        self._entry: tuple[tuple[str, str, str], tuple[Any, ...], LoadedVolume] | None = None

    def keep(self, item: InferenceInput, volume: LoadedVolume) -> None:
        self._entry = ((item.name, str(item.path), item.kind), _source_key(item.path), volume)

    def clear(self) -> None:
        self._entry = None

    def take(self, item: InferenceInput) -> LoadedVolume | None:
        entry, self._entry = self._entry, None
        if entry is None or entry[0] != (item.name, str(item.path), item.kind):
            return None
        try:
            same = entry[1] == _source_key(item.path)
        except OSError:
            same = False
        return entry[2] if same else None


_checked = _CheckedVolume()


@contextlib.contextmanager
def _quiet(logger_name: str = "scripts.data") -> Iterator[None]:
    """The readers log a few lines per input; during validation once is enough (when denoising)."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        log.setLevel(level)


# ---------------------------------------------------------------------------------------- datalist


def _check_names(inputs: Sequence[InferenceInput]) -> None:
    by_name: dict[str, list[InferenceInput]] = {}
    for item in inputs:
        by_name.setdefault(item.name, []).append(item)
    for name, items in by_name.items():
        if len(items) > 1:
            listing = " and ".join(i.path.name + ("/" if i.kind == "dicom" else "") for i in items)
            raise UniPETInputError(
                f"inputs {listing} have the same name {name!r}, so their outputs would collide: rename one of them"
            )


def _check_output_dir(output_dir: Path, inputs: Sequence[InferenceInput]) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UniPETInputError(f"--output_dir {output_dir} is a file, not a folder: choose a folder")
    existing = output_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UniPETInputError(
            f"--output_dir {output_dir}: no permission to write in {existing}; choose another folder"
        )
    resolved = output_dir.resolve()
    for item in inputs:
        if item.kind != "dicom":
            continue
        series = item.path.resolve()
        if resolved == series or series in resolved.parents:
            raise UniPETInputError(
                f"--output_dir {output_dir} is inside the DICOM series folder {item.path}: outputs there would mix "
                "with the series; choose another folder (the dataset folder itself is fine)"
            )


def _partial_outputs(output_dir: Path, item: InferenceInput, planned: Mapping[str, Path]) -> set[Path]:
    """The planned outputs of ``item`` that a killed run left half-published (may be replaced without
    ``overwrite``; :mod:`scripts.inference.claims`). Nothing is changed here.

    Raises:
        OutputBusyError: a live run is writing this input's outputs into ``output_dir`` right now.
    """
    claim = claim_path(output_dir, f"{item.name}{OUTPUT_SUFFIX}")
    state = inspect_claim(claim)
    if state["state"] == "busy":
        raise OutputBusyError(busy_message(claim, state["owner"], shown(item.name)))
    owner = state["owner"]
    if state["state"] != "stale" or not owner:
        return set()
    # a killed run's publishing list, or a partial set a later run inherited and did not replace (it failed)
    left = {output_dir / n for n in partial_outputs(owner)}
    partial = {p for p in planned.values() if p in left and (p.exists() or p.is_symlink())}
    if partial:
        first = owner.get("inherited_from")
        logger.warning(
            "%s: an earlier run (PID %s) was killed while writing its outputs; the partial set %s is redone",
            shown(item.name),
            (first if isinstance(first, dict) and first else owner).get("pid"),
            sorted(p.name for p in partial),
        )
    return partial


def prepare_datalist(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    output_format: str = "nifti",
    overwrite: Any = False,
    qc_report: Any = False,
) -> list[dict[str, str]]:
    """Discover the inputs, check every output path and every input, and return the datalist.

    Nothing is written. Returns ``[{"image": path, "name": name, "kind": "nifti" | "dicom"}, ...]``.

    Raises:
        UniPETInputError: the first problem found (missing folder, nothing to denoise, colliding names,
            an output that exists without ``overwrite``, an output that would replace an input, an
            unreadable or unsuitable input).
    """
    fmt = check_output_format(output_format)
    replace = as_bool(overwrite, "overwrite")
    inputs = discover_inputs(dataset_dir, output_dir)
    out_dir = Path(output_dir).expanduser()
    _check_output_dir(out_dir, inputs)
    _check_names(inputs)
    input_paths = [item.path for item in inputs]
    for item in inputs:
        planned = planned_outputs(out_dir, item.name, item.kind, fmt, qc=as_bool(qc_report, "qc_report"))
        partial = _partial_outputs(out_dir, item, planned)
        for path in planned.values():
            check_output_path(path, overwrite=replace or path in partial, inputs=input_paths)
    if fmt == "dicom" and any(item.kind == "nifti" for item in inputs):
        logger.warning(
            "output_format dicom: NIfTI inputs get NIfTI outputs (a DICOM series can only be derived from a DICOM input)"
        )
    _checked.clear()
    try:
        for i, item in enumerate(inputs):
            # the first input's volume is kept for LoadPETd (read once); its readers log now, as they would then
            with contextlib.nullcontext() if i == 0 else _quiet():
                volume = load_volume(item)
            logger.info(
                "checked %s (%s, %s): shape %s, spacing %s mm",
                shown(item.name),
                item.kind,
                volume.units,
                _fmt(volume.suv.shape),
                _fmt(voxel_spacing(volume.affine)),
            )
            if i == 0:
                _checked.keep(item, volume)
            del volume
    except BaseException:
        _checked.clear()
        raise
    logger.info("%d input(s) to denoise in %s", len(inputs), dataset_dir)
    return [item.as_item() for item in inputs]


# ------------------------------------------------------------------------------------------ transform


class LoadPETd(MapTransform):
    """Load a datalist entry (see :func:`prepare_datalist`) into a channel-first SUV ``MetaTensor``.

    ``data[key]`` (a path) becomes a float32 ``MetaTensor`` (1, X, Y, Z) in SUV with the input's RAS
    ``affine``; ``meta`` also holds ``original_affine`` and ``spatial_shape`` (the grid outputs are
    written on) and ``filename_or_obj``. Added entries: ``source`` (the path), ``suv_factor`` and
    ``units`` (see :class:`LoadedVolume`), and for a DICOM series ``source_series`` (its sorted headers, factor
    and SUV record, for the DICOM writer: :class:`scripts.inference.dicom_writer.SourceSeries`). ``name`` and
    ``kind`` must be in the entry.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = Path(str(d[key]))
            item = InferenceInput(str(d["name"]), path, str(d["kind"]))
            volume = _checked.take(item) or load_volume(item)  # the first input was loaded by its check
            affine = np.asarray(volume.affine, dtype=np.float64)
            meta = {
                "original_affine": affine.copy(),
                "spatial_shape": np.asarray(volume.suv.shape),
                "filename_or_obj": str(path),
                "space": "RAS",
                "original_channel_dim": "no_channel",
            }
            d[key] = MetaTensor(torch.from_numpy(volume.suv[None]), affine=torch.as_tensor(affine), meta=meta)
            d["source"] = str(path)
            d["suv_factor"] = float(volume.suv_factor)
            d["units"] = str(volume.units)
            if volume.series is not None:
                d["source_series"] = volume.series
        return d


class KeepNatived(MapTransform):
    """Keep the loaded native SUV under ``native_key`` for the residual step, *without copying it*.

    ``data[native_key]`` becomes a plain tensor sharing ``data[key]``'s memory (MONAI's ``CopyItemsd``
    would deep-copy a 0.5 GB whole-body volume). Safe because the later preprocessing transforms
    (``Orientationd``, ``Spacingd``, intensity scaling) return new tensors and never write into their
    input; :class:`scripts.inference.residual.NativeResidualSUVd` finally adds the correction into it.
    Not named ``image_*``: MONAI's Spacingd treats every ``image_*`` key as the image's meta dict.
    """

    def __init__(
        self, keys: KeysCollection = "image", native_key: str = "native_suv", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.native_key = native_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            d[self.native_key] = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
        return d
