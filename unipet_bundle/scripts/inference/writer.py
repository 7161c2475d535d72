"""Save a denoised volume on its input's grid and in its input's units, atomically.

Outputs of an input named ``<name>`` (the NIfTI stem or the DICOM series folder name), in ``output_dir``:

- ``<name>_denoised.nii.gz``: float32 body-weight SUV (g/mL) on the input's grid (same shape and
  affine: spacing, orientation, origin). NIfTI inputs are SUV, so SUV in gives SUV out. For a DICOM
  input in Bq/mL the network works in SUV and this output is SUV too; Bq/mL = SUV / ``suv_factor``;
- ``<name>_denoised.json``: the sidecar beside every NIfTI output: units, ``suv_factor`` (DICOM inputs:
  g/mL per Bq/mL, with every tag it came from; NIfTI inputs: null), the model version and checkpoint
  (and ``"trained": false`` with a warning when the network was untrained), and the grids used;
- ``<name>_denoised_dicom/``: with ``output_format`` ``dicom`` or ``both``, for DICOM inputs only: a
  derived PET series in the source's units (:mod:`scripts.inference.dicom_writer`).

``output_format`` ``nifti`` (default) writes the NIfTI and sidecar; ``dicom`` writes only the DICOM series
for DICOM inputs (NIfTI inputs still get a NIfTI); ``both`` writes all of them.

Every file is written to a temporary name in ``output_dir`` and renamed; if one output of an input
fails, the ones already written for that input are removed again.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.data.io import UniPETInputError, atomic_write_json, save_nifti
from scripts.data.suv import SUV_FACTOR_UNITS, compute_suv_factor
from scripts.inference.dicom_writer import sorted_series_headers, write_derived_pet_series
from scripts.inference.options import as_bool, check_output_format

__all__ = ["DICOM_DIR_SUFFIX", "OUTPUT_SUFFIX", "SaveDenoisedd", "planned_outputs"]

logger = logging.getLogger(__name__)

OUTPUT_SUFFIX = "_denoised"
DICOM_DIR_SUFFIX = "_denoised_dicom"


def planned_outputs(output_dir: str | os.PathLike, name: str, kind: str, output_format: str) -> dict[str, Path]:
    """The outputs an input gets: keys ``nifti`` and ``sidecar`` and/or ``dicom`` (see the module docstring)."""
    fmt = check_output_format(output_format)
    out = Path(output_dir).expanduser()
    paths: dict[str, Path] = {}
    if kind != "dicom" or fmt in ("nifti", "both"):
        paths["nifti"] = out / f"{name}{OUTPUT_SUFFIX}.nii.gz"
        paths["sidecar"] = out / f"{name}{OUTPUT_SUFFIX}.json"
    if kind == "dicom" and fmt in ("dicom", "both"):
        paths["dicom"] = out / f"{name}{DICOM_DIR_SUFFIX}"
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


def _spacing(affine: np.ndarray) -> list[float]:
    return [float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)]


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


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

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d["unipet_summary"] = self._save(d, key)
        return d

    def _save(self, d: dict[Hashable, Any], key: Hashable) -> dict[str, Any]:
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
            raise RuntimeError(f"{name}: prediction shape {suv.shape} is not the input's {shape} (inverse resampling failed)")
        pred_affine = getattr(pred, "affine", None)
        if pred_affine is not None and not np.allclose(_as_numpy(pred_affine), affine, atol=1e-3):
            raise RuntimeError(f"{name}: prediction affine differs from the input's (inverse resampling failed)")
        if not np.all(np.isfinite(suv)):
            raise UniPETInputError(f"{name}: the network produced NaN/Inf voxels; nothing written for it (check the checkpoint)")

        paths = planned_outputs(self.output_dir, name, kind, self.output_format)
        headers = None
        suv_details: dict[str, Any] | None = None
        if kind == "dicom":
            headers = sorted_series_headers(source)
            factor, suv_details = compute_suv_factor(headers[0], slices=headers)
            if not np.isclose(factor, suv_factor, rtol=1e-9, atol=0):
                raise RuntimeError(f"{name}: SUV factor {factor} from the headers differs from the one used ({suv_factor})")
        network_shape = [int(v) for v in image.shape[-3:]]
        network_spacing = _spacing(_as_numpy(image.affine)) if hasattr(image, "affine") else None
        target = self.processing.get("target_spacing_mm")
        if network_spacing is not None and target is not None and not np.allclose(network_spacing, target, rtol=0.05):
            logger.warning(
                "%s: the network ran at %s mm, not at the voxel size it was trained for (%s mm; resample is off?): "
                "its noise texture is foreign to the network, expect a weaker result",
                name, "x".join(f"{v:.3g}" for v in network_spacing), "x".join(f"{float(v):.3g}" for v in target),
            )
        written: list[Path] = []
        try:
            if "nifti" in paths:
                save_nifti(suv, affine, paths["nifti"], overwrite=self.overwrite)
                written.append(paths["nifti"])
                sidecar = self._sidecar(name, kind, source, units, suv_factor, suv_details, suv, affine,
                                        network_shape, network_spacing, paths)
                atomic_write_json(paths["sidecar"], sidecar, overwrite=self.overwrite)
                written.append(paths["sidecar"])
            if "dicom" in paths:
                assert headers is not None
                write_derived_pet_series(
                    suv, headers, suv_factor, paths["dicom"], model_version=self.model_version,
                    derivation_description=self._derivation(), overwrite=self.overwrite,
                )
                written.append(paths["dicom"])
        except BaseException:
            _remove(written)
            raise
        return {
            "name": name,
            "kind": kind,
            "units": units,
            "shape": list(shape),
            "spacing_mm": _spacing(affine),
            "network_shape": network_shape,
            "network_spacing_mm": network_spacing,
            "written": [str(p) for p in written],
        }

    def _derivation(self) -> str:
        trained = bool(self.model_info.get("trained", False))
        state = "trained checkpoint" if trained else "UNTRAINED network (identity: NOT denoised)"
        return (
            f"Denoised with UniPET (deep-learning PET denoising, model version {self.model_version}, {state}); "
            "research use only, not for diagnosis. Pixel values are in the source series' units; SUV tags are kept from the source."
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
            "suv_factor_units": (SUV_FACTOR_UNITS if units == "BQML" else "SUV per source pixel unit") if kind == "dicom" else None,
            "suv_definition": (
                "SUV = suv_factor * source pixel value; source pixel value (e.g. Bq/mL) = SUV / suv_factor"
                if kind == "dicom" else "the NIfTI input was SUV; the output is SUV"
            ),
            "model": {
                "name": "UniPET",
                "version": self.model_version,
                "trained": trained,
                **{k: v for k, v in self.model_info.items() if k != "trained"},
            },
            "processing": {**self.processing, "network_grid_shape": network_shape, "network_grid_spacing_mm": network_spacing},
            "shape": list(suv.shape),
            "spacing_mm": _spacing(affine),
            "affine_ras": affine.tolist(),
            "suv_output_max": float(suv.max()),
            "suv_output_min": float(suv.min()),
            "dicom_output": str(paths["dicom"]) if "dicom" in paths else None,
        }
        if not trained:
            info["warning"] = "the network was UNTRAINED (no checkpoint): it is the identity and this output is NOT denoised"
        if suv_details is not None:
            info["suv_details"] = suv_details
        return info

