"""Save a denoised volume on its input's grid and in its input's units, atomically.

Outputs of an input named ``<name>`` (the NIfTI stem or the DICOM series folder name), in ``output_dir``:

- ``<name>_denoised.nii.gz``: float32 body-weight SUV (g/mL) on the input's grid (same shape and
  affine: spacing, orientation, origin). NIfTI inputs are SUV, so SUV in gives SUV out. For a DICOM
  input in Bq/mL the network works in SUV and this output is SUV too; Bq/mL = SUV / ``suv_factor``;
- ``<name>_denoised.json``: the sidecar beside every NIfTI output: units, ``suv_factor`` (DICOM inputs:
  g/mL per Bq/mL, with every tag it came from; NIfTI inputs: null), the model version and checkpoint
  (and ``"trained": false`` with a warning when the network was untrained), and the grids used;
- ``<name>_denoised_dicom/``: with ``output_format`` ``dicom`` or ``both``, for DICOM inputs only: a
  derived PET series in the source's units (:mod:`scripts.inference.dicom_writer`), built from the headers,
  slice order and SUV factor the loader carried (``source_series``: the folder is not read again), and read
  back and compared with the denoised volume before it is published (a mismatch is an error, nothing kept).
- ``<name>_denoised_qc.png`` and ``<name>_denoised_qc.json``: with ``qc_report`` (the default), the per-study
  QC report (:mod:`scripts.inference.qc`); part of the output set, published before the sidecar.

``output_format`` ``nifti`` (default) writes the NIfTI and sidecar; ``dicom`` writes only the DICOM series
for DICOM inputs (NIfTI inputs still get a NIfTI); ``both`` writes all of them.

Safe with other runs writing into the same ``output_dir`` (:mod:`scripts.inference.claims`): the outputs
of an input are written by one run at a time (a per-input claim; a run that finds another live run
writing the same input stops with one line), staged under temporary names that record this host and
PID, and renamed into place only when all of them are complete, the sidecar last. Without ``overwrite``
nothing is ever replaced, not even an output another run published while this one worked; a run only
removes paths it created. The sidecar records the SHA-256 of the NIfTI and the SeriesInstanceUID of the
DICOM series it describes. An input whose earlier run was killed while publishing is redone (its partial
outputs replaced) without ``--overwrite``; temporaries of interrupted runs are cleaned up.
Disk full (or another write error) gives one sentence, and nothing of that input is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.common.errors import UniPETInputError, shown, write_error
from scripts.common.geometry import voxel_spacing
from scripts.common.io import default_file_mode, json_default
from scripts.common.options import as_bool, check_output_format
from scripts.data.io import nifti_image, write_nifti
from scripts.data.suv import SUV_FACTOR_UNITS
from scripts.inference.claims import (
    OutputClaim,
    OutputConflictError,
    clean_stale_temporaries,
    publish,
    remove_path,
    temporary_path,
)
from scripts.inference.dicom_writer import (
    SourceSeries,
    derivation_text,
    stage_derived_pet_series,
    verify_written_series,
)

__all__ = ["DICOM_DIR_SUFFIX", "OUTPUT_SUFFIX", "SaveDenoisedd", "planned_outputs"]

logger = logging.getLogger(__name__)

OUTPUT_SUFFIX = "_denoised"
DICOM_DIR_SUFFIX = "_denoised_dicom"


def planned_outputs(
    output_dir: str | os.PathLike, name: str, kind: str, output_format: str, qc: bool = False
) -> dict[str, Path]:
    """The outputs an input gets: keys ``nifti`` and ``sidecar`` and/or ``dicom``, and ``qc_png`` and ``qc_json``
    with ``qc`` (see the module docstring)."""
    fmt = check_output_format(output_format)
    out = Path(output_dir).expanduser()
    paths: dict[str, Path] = {}
    if kind != "dicom" or fmt in ("nifti", "both"):
        paths["nifti"] = out / f"{name}{OUTPUT_SUFFIX}.nii.gz"
        paths["sidecar"] = out / f"{name}{OUTPUT_SUFFIX}.json"
    if kind == "dicom" and fmt in ("dicom", "both"):
        paths["dicom"] = out / f"{name}{DICOM_DIR_SUFFIX}"
    if qc:
        paths["qc_png"] = out / f"{name}{OUTPUT_SUFFIX}_qc.png"
        paths["qc_json"] = out / f"{name}{OUTPUT_SUFFIX}_qc.json"
    return paths


def _scalar(value: Any) -> Any:
    """A decollated entry back to a Python value (0-d tensors and 1-element lists occur)."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist() if np.ndim(value) else value.item()
    return value


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_nifti(suv: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """float32 SUV with scl_slope 1 and q/sform code 1, as :func:`scripts.data.io.save_nifti` writes it, but
    straight to ``path`` (a temporary of ours already; a second temporary inside it would not carry our PID)."""
    write_nifti(nifti_image(suv, affine, np.float32), path)
    os.chmod(path, default_file_mode())


def _window_warning(name: str, network_shape: Sequence[int], patch_size: Any) -> None:
    """Say so when the volume (on the network grid) is smaller than the network window along an axis."""
    try:
        window = [int(v) for v in (patch_size if isinstance(patch_size, (list, tuple)) else [patch_size] * 3)]
    except (TypeError, ValueError):
        return
    if len(window) == 3 and any(n < w for n, w in zip(network_shape, window)):
        logger.warning(
            "%s: the volume is %s voxels on the network grid, smaller than the %s window: it was padded with its "
            "edge values to the window size (the inferer's padding_mode, replicate by default; zero padding would "
            "lower its level) and cropped back; the network has little context, check this output",
            shown(name),
            "x".join(map(str, network_shape)),
            "x".join(map(str, window)),
        )


class SaveDenoisedd(MapTransform):
    """Postprocessing step that writes ``data[key]`` (the denoised SUV, on the input grid) to ``output_dir``.

    Expects, besides ``data[key]`` (a ``MetaTensor`` (1, X, Y, Z) in SUV, already inverted to the input
    grid), the entries :class:`scripts.inference.inputs.LoadPETd` adds: ``image`` (its ``meta`` holds
    ``original_affine`` and ``spatial_shape``), ``name``, ``kind``, ``source``, ``suv_factor``, ``units``.
    Adds ``unipet_summary`` (name, grids, written paths) for the log line of
    :class:`scripts.inference.report.InferenceReport`.

    Args:
        keys: the prediction key (``pred``).
        output_dir: folder of the outputs (created if missing).
        output_format: ``nifti``, ``dicom`` or ``both``.
        overwrite: replace existing outputs (checked before any work by ``prepare_datalist`` too).
        model_info: what :func:`scripts.inference.model.load_weights` returned (checkpoint, trained).
        model_version: the bundle version, written into the sidecar and the DICOM descriptions.
        processing: JSON-ready settings recorded in the sidecar (suv_max, resampling, window size).
        image_key: the key of the network input (its meta holds the input grid).
        stale_minutes: temporaries of interrupted runs (this host, PID gone) older than this are removed
            from ``output_dir`` once per run (:func:`scripts.inference.claims.clean_stale_temporaries`).
        qc: the :class:`scripts.inference.qc.QCReport` handler of the run (also attached to the evaluator):
            the sidecar gets the input's SUVmax and the stage times from it, and with its ``enabled`` the
            QC PNG and JSON are written as part of the output set. None: neither.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = ".",
        output_format: str = "nifti",
        overwrite: Any = False,
        model_info: Mapping[str, Any] | None = None,
        model_version: str = "unknown",
        processing: Mapping[str, Any] | None = None,
        image_key: str = "image",
        stale_minutes: float = 30.0,
        qc: Any = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir).expanduser()
        self.output_format = check_output_format(output_format)
        self.overwrite = as_bool(overwrite, "overwrite")
        self.model_info = dict(model_info or {})
        self.model_version = str(model_version)
        self.processing = dict(processing or {})
        self.image_key = image_key
        self.stale_minutes = float(stale_minutes)
        self._swept = False
        self.qc = qc

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d["unipet_summary"] = self._save(d, key)
        return d

    def _save(self, d: dict[Hashable, Any], key: Hashable) -> dict[str, Any]:
        self._write_started = time.perf_counter()
        name, kind = str(_scalar(d["name"])), str(_scalar(d["kind"]))
        source = Path(str(_scalar(d["source"])))
        suv_factor, units = float(_scalar(d["suv_factor"])), str(_scalar(d["units"]))
        image = d[self.image_key]
        affine = np.asarray(_as_numpy(image.meta["original_affine"]), dtype=np.float64).reshape(4, 4)
        shape = tuple(int(v) for v in np.asarray(_as_numpy(image.meta["spatial_shape"])).reshape(-1))
        pred = d[key]
        suv = _as_numpy(pred).astype(np.float32, copy=False)
        if suv.ndim == 4:
            suv = suv[0]
        if suv.shape != shape:
            raise RuntimeError(
                f"{name}: prediction shape {suv.shape} is not the input's {shape} (inverse resampling failed)"
            )
        pred_affine = getattr(pred, "affine", None)
        if pred_affine is not None and not np.allclose(_as_numpy(pred_affine), affine, atol=1e-3):
            raise RuntimeError(f"{name}: prediction affine differs from the input's (inverse resampling failed)")
        label = shown(name)
        if not np.all(np.isfinite(suv)):
            raise UniPETInputError(
                f"{label}: the network produced NaN/Inf voxels; nothing written for it (check the checkpoint)"
            )

        paths = planned_outputs(
            self.output_dir,
            name,
            kind,
            self.output_format,
            qc=bool(self.qc is not None and getattr(self.qc, "enabled", False)),
        )
        headers = None
        suv_details: dict[str, Any] | None = None
        if kind == "dicom":
            # the headers, slice order and factor the volume was built with, carried from the loader: the folder
            # is not read or sorted again here (a second sort that disagreed would scramble the series silently)
            carried = _scalar(d.get("source_series"))
            if not isinstance(carried, SourceSeries):
                raise RuntimeError(
                    f"{name}: the DICOM input's source_series is missing (load DICOM inputs with LoadPETd, which carries it)"
                )
            if not np.isclose(carried.suv_factor, suv_factor, rtol=1e-9, atol=0):
                raise RuntimeError(
                    f"{name}: SUV factor {carried.suv_factor} of the source series differs from the one used ({suv_factor})"
                )
            headers, suv_details = carried.headers, carried.suv_details
        network_shape = [int(v) for v in image.shape[-3:]]
        network_spacing = voxel_spacing(_as_numpy(image.affine)).tolist() if hasattr(image, "affine") else None
        target = self.processing.get("target_spacing_mm")
        if network_spacing is not None and target is not None and not np.allclose(network_spacing, target, rtol=0.05):
            logger.warning(
                "%s: the network ran at %s mm, not at the voxel size it was trained for (%s mm; resample is off?): "
                "its noise texture is foreign to the network, expect a weaker result",
                label,
                "x".join(f"{v:.3g}" for v in network_spacing),
                "x".join(f"{float(v):.3g}" for v in target),
            )
        _window_warning(name, network_shape, self.processing.get("patch_size"))
        if not self._swept:  # once per run: leftovers of runs killed long ago
            self._swept = True
            clean_stale_temporaries(self.output_dir, self.stale_minutes)
        what = f"the outputs of {label}"
        with OutputClaim(self.output_dir, f"{name}{OUTPUT_SUFFIX}", label) as claim:
            claim.clean_temporaries(paths.values())
            for path in paths.values():
                if (path.exists() or path.is_symlink()) and not self.overwrite and path not in claim.replaceable:
                    raise OutputConflictError(
                        f"output {path} already exists (another run wrote it after this one started?): it is kept and "
                        f"nothing of {label} was written; remove it, choose another --output_dir, or pass --overwrite true"
                    )
            staged: dict[str, Path] = {}
            try:
                try:
                    self._stage(
                        staged,
                        paths,
                        name,
                        kind,
                        source,
                        units,
                        suv_factor,
                        suv_details,
                        suv,
                        affine,
                        network_shape,
                        network_spacing,
                        headers,
                    )
                except OSError as exc:
                    raise write_error(exc, what, self.output_dir) from None
                order = [
                    k for k in ("nifti", "dicom", "qc_png", "qc_json", "sidecar") if k in paths
                ]  # the sidecar last: it marks a set done
                claim.publishing(paths[k] for k in order)
                for k in order:
                    replace = self.overwrite or paths[k] in claim.replaceable
                    try:
                        publish(staged[k], paths[k], replace=replace)
                    except FileExistsError:
                        raise OutputConflictError(
                            f"output {paths[k]} appeared while this run was writing it (another run?): it is kept and "
                            f"nothing of {label} was kept from this run; remove it, choose another --output_dir, or pass --overwrite true"
                        ) from None
                    except OSError as exc:
                        raise write_error(exc, what, self.output_dir) from None
                    claim.published.append(paths[k])
            finally:
                for tmp in staged.values():  # published ones were renamed away; the rest are ours to remove
                    remove_path(tmp)
        written = [paths[k] for k in ("nifti", "sidecar", "dicom", "qc_png", "qc_json") if k in paths]
        return {
            "name": name,
            "kind": kind,
            "units": units,
            "shape": list(shape),
            "spacing_mm": voxel_spacing(affine).tolist(),
            "network_shape": network_shape,
            "network_spacing_mm": network_spacing,
            "written": [str(p) for p in written],
        }

    def _stage(
        self,
        staged: dict[str, Path],
        paths: Mapping[str, Path],
        name: str,
        kind: str,
        source: Path,
        units: str,
        suv_factor: float,
        suv_details: dict[str, Any] | None,
        suv: np.ndarray,
        affine: np.ndarray,
        network_shape: list[int],
        network_spacing: list[float] | None,
        headers: Any,
    ) -> None:
        """Write every output of one input under a temporary name (``staged``: output key -> temporary)."""
        nifti_sha = None
        series_uid = None
        if "nifti" in paths:
            staged["nifti"] = temporary_path(paths["nifti"])
            _write_nifti(suv, affine, staged["nifti"])
            nifti_sha = _file_sha256(staged["nifti"])
        if "dicom" in paths:
            assert headers is not None
            staged["dicom"] = temporary_path(paths["dicom"])
            staged["dicom"].mkdir()
            _, series_uid = stage_derived_pet_series(
                suv,
                headers,
                suv_factor,
                staged["dicom"],
                model_version=self.model_version,
                derivation_description=self._derivation(),
                trained=bool(self.model_info.get("trained", False)),
            )
            # read the staged series back as any input is read (its own sort and factor) before publishing it
            err = verify_written_series(staged["dicom"], suv, suv_factor)
            logger.info("%s: the derived series reads back within %.3g SUV of the denoised volume", shown(name), err)
        if "qc_png" in paths:
            staged["qc_png"], staged["qc_json"] = temporary_path(paths["qc_png"]), temporary_path(paths["qc_json"])
            self.qc.stage(
                name,
                suv,
                staged["qc_png"],
                staged["qc_json"],
                self._write_started,
                model={"version": self.model_version, **self.model_info},
            )
        if "sidecar" in paths:
            sidecar = self._sidecar(
                name, kind, source, units, suv_factor, suv_details, suv, affine, network_shape, network_spacing, paths
            )
            sidecar["nifti_sha256"] = nifti_sha
            sidecar["dicom_series_instance_uid"] = series_uid
            if self.qc is not None:  # input SUVmax and stage times (write_outputs_s: up to the sidecar)
                sidecar.update(self.qc.sidecar_fields(name, self._write_started))
            if "qc_json" in paths:
                sidecar["qc_report"] = {"png": paths["qc_png"].name, "json": paths["qc_json"].name}
            staged["sidecar"] = temporary_path(paths["sidecar"])
            staged["sidecar"].write_text(json.dumps(sidecar, indent=2, default=json_default) + "\n")
            os.chmod(staged["sidecar"], default_file_mode())

    def _derivation(self) -> str:
        return derivation_text(
            self.model_version,
            bool(self.model_info.get("trained", False)),
            level_lock_fwhm_mm=float(self.processing.get("level_lock_fwhm_mm", 0.0) or 0.0),
        )

    def _sidecar(
        self,
        name: str,
        kind: str,
        source: Path,
        units: str,
        suv_factor: float,
        suv_details: dict[str, Any] | None,
        suv: np.ndarray,
        affine: np.ndarray,
        network_shape: list[int],
        network_spacing: list[float] | None,
        paths: Mapping[str, Path],
    ) -> dict[str, Any]:
        trained = bool(self.model_info.get("trained", False))
        info: dict[str, Any] = {
            "description": "PET denoised by UniPET, body-weight SUV (g/mL), on the input's grid",
            "units": "SUV (body weight, g/mL)",
            "name": name,
            "source": str(source),
            "source_kind": kind,
            "source_units": units,
            "suv_factor": suv_factor if kind == "dicom" else None,
            "suv_factor_units": (SUV_FACTOR_UNITS if units == "BQML" else "SUV per source pixel unit")
            if kind == "dicom"
            else None,
            "suv_definition": (
                "SUV = suv_factor * source pixel value; source pixel value (e.g. Bq/mL) = SUV / suv_factor"
                if kind == "dicom"
                else "the NIfTI input was SUV; the output is SUV"
            ),
            "model": {
                "name": "UniPET",
                "version": self.model_version,
                "trained": trained,
                **{k: v for k, v in self.model_info.items() if k != "trained"},
            },
            "processing": {
                **self.processing,
                "network_grid_shape": network_shape,
                "network_grid_spacing_mm": network_spacing,
            },
            "shape": list(suv.shape),
            "spacing_mm": voxel_spacing(affine).tolist(),
            "affine_ras": affine.tolist(),
            "suv_output_max": float(suv.max()),
            "suv_output_min": float(suv.min()),
            "dicom_output": str(paths["dicom"]) if "dicom" in paths else None,
        }
        if not trained:
            info["warning"] = (
                "the network was UNTRAINED (no checkpoint): it is the identity and this output is NOT denoised"
            )
        if suv_details is not None:
            info["suv_details"] = suv_details
        return info
