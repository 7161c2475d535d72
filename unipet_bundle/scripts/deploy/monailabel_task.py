"""MONAI Label infer task that serves UniPET's denoised PET volume (float SUV NIfTI) from the bundle.

Why not MONAI Label's ``BundleInferTask``: it assumes segmentation. It reads label names from the
output ``channel_def``, appends a ``Restored`` step and writes the prediction with its label writer
(ITK, with the request's dtype); and it would run our ``inference.json`` pre/post-processing without the
residual return to the input grid being fed the right keys. This task instead calls the bundle's own
inference (:class:`scripts.inference.denoise.BundleDenoiser`) and writes float32 SUV on the
input's grid.

The work happens in :class:`UniPETLabelCore` (no MONAI Label needed, tested in the main environment);
:func:`task_class` builds the ``BasicInferTask`` subclass MONAI Label serves, importing MONAI Label only
when called. ``scripts/deploy/label_app/main.py`` is a ready MONAI Label app using it::

    monailabel start_server --app unipet_bundle/scripts/deploy/label_app --studies /data/suv_niftis \\
        --conf bundle_path /path/to/unipet_bundle

Request (``POST /infer/unipet_denoise?image=<id>``; ``output=image`` returns the file):

- ``image``: the datastore's path of the input: an SUV NIfTI (``*.nii``/``*.nii.gz``, e.g. from
  ``python -m scripts.data.suv``) or a PET DICOM series folder (SUV from its tags);
- ``suv_factor`` (optional): the input NIfTI is in another unit (e.g. Bq/mL from MONAI Label's DICOMweb
  datastore, which converts series with ITK and drops the SUV tags): SUV = suv_factor x value; the result
  is then returned in the input's unit;
- ``device``: ``cuda``/``cpu`` (CUDA falls back to CPU when absent).

Result: a float32 NIfTI on the input grid (load it in 3D Slicer as a *volume*, not a segmentation) and a
JSON with units, model version, whether the weights were trained, and SUV statistics.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from scripts.common.errors import UniPETInputError
from scripts.data.io import nifti_stem, save_nifti
from scripts.data.suv import check_body_suv
from scripts.inference.denoise import BundleDenoiser
from scripts.inference.inputs import InferenceInput, load_volume

__all__ = ["TASK_NAME", "UniPETLabelCore", "create_task", "task_class"]

logger = logging.getLogger(__name__)

TASK_NAME = "unipet_denoise"
DESCRIPTION = "UniPET low-dose PET denoising: returns the denoised PET volume (float32 SUV NIfTI on the input grid)"


class UniPETLabelCore:
    """Denoise one datastore image with the bundle and write the float result; one network per device.

    Args:
        bundle_path: the ``unipet_bundle`` folder.
        model_file: weights (see :class:`BundleDenoiser`); default ``models/model.pt``, else ``models/model.ts``.
        overrides: config overrides for ``inference.json`` (e.g. ``{"sw_batch_size": 4}``).
    """

    def __init__(
        self,
        bundle_path: str | os.PathLike,
        model_file: str | os.PathLike | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.bundle_path = Path(bundle_path).expanduser().resolve()
        if not (self.bundle_path / "configs" / "inference.json").is_file():
            raise UniPETInputError(
                f"{self.bundle_path} is not the unipet_bundle folder (no configs/inference.json): set --conf bundle_path"
            )
        self.model_file = Path(model_file) if model_file else None
        self.overrides = dict(overrides or {})
        self._denoisers: dict[str, BundleDenoiser] = {}

    @property
    def weights_path(self) -> Path:
        """The weights the task serves (``model.pt`` unless only ``model.ts`` exists)."""
        if self.model_file is not None:
            return self.model_file
        pt, ts = self.bundle_path / "models" / "model.pt", self.bundle_path / "models" / "model.ts"
        return ts if (ts.is_file() and not pt.is_file()) else pt

    def denoiser(self, device: str = "cpu") -> BundleDenoiser:
        if device not in self._denoisers:
            self._denoisers[device] = BundleDenoiser(
                self.bundle_path, model_file=self.model_file, device=device, overrides=self.overrides
            )
        return self._denoisers[device]

    def infer(
        self, image: str | os.PathLike, device: str = "cpu", suv_factor: Any = None
    ) -> tuple[Path, dict[str, Any]]:
        """Denoise ``image`` (SUV NIfTI, or a PET DICOM folder); returns (float32 NIfTI path, result JSON).

        Raises:
            UniPETInputError: unreadable input, bad ``suv_factor``.
        """
        path = Path(str(image)).expanduser()
        kind = "dicom" if path.is_dir() else "nifti"
        name = path.name if kind == "dicom" else nifti_stem(path)
        # a NIfTI with suv_factor holds another unit: its SUV plausibility is checked after the conversion
        volume = load_volume(InferenceInput(name, path, kind), check_body=suv_factor in (None, ""))
        factor = 1.0
        if suv_factor not in (None, ""):
            try:
                factor = float(suv_factor)
            except (TypeError, ValueError):
                raise UniPETInputError(
                    f"suv_factor must be a number (SUV = suv_factor x value), got {suv_factor!r}"
                ) from None
            if not (np.isfinite(factor) and factor > 0):
                raise UniPETInputError(f"suv_factor must be > 0, got {suv_factor!r}")
            if kind == "dicom":
                raise UniPETInputError("suv_factor is for NIfTI inputs; a DICOM series carries its own SUV tags")
        suv_in = volume.suv * np.float32(factor)
        if factor != 1.0:
            check_body_suv(
                suv_in,
                f"{path} x suv_factor {factor:g}",
                fix="suv_factor must turn the input's values into body-weight SUV (SUV = suv_factor x value)",
            )
        net = self.denoiser(device)
        suv_out = net(suv_in, volume.affine, name=name)
        values = suv_out / np.float32(factor)  # back to the input's unit (SUV unless suv_factor was given)
        fd, tmp = tempfile.mkstemp(prefix=f"unipet_{name}_", suffix=".nii.gz")
        os.close(fd)
        out = save_nifti(values, volume.affine, tmp, overwrite=True)
        units = "SUV (body weight, g/mL)" if factor == 1.0 else f"input units (SUV = {factor:g} x value)"
        result = {
            "units": units,
            "model": {"name": "UniPET", "version": net.model_version, "trained": net.trained},
            "shape": list(values.shape),
            "suv_max_input": float(np.max(suv_in)),
            "suv_max_output": float(np.max(suv_out)),
            "suv_mean_input": float(np.mean(suv_in)),
            "suv_mean_output": float(np.mean(suv_out)),
        }
        if not net.trained:
            result["warning"] = "UNTRAINED network: the output equals the input (NOT denoised)"
        logger.info("denoised %s on %s -> %s", name, device, out)
        return out, result


_TASK_CLASS: type | None = None


def task_class() -> type:
    """The MONAI Label task class (``BasicInferTask`` subclass); imports MONAI Label on first call.

    Raises:
        ImportError: MONAI Label is not installed (see docs/deployment.md, requirements-label.txt).
    """
    global _TASK_CLASS
    if _TASK_CLASS is not None:
        return _TASK_CLASS
    from monailabel.interfaces.tasks.infer_v2 import InferType
    from monailabel.tasks.infer.basic_infer import BasicInferTask
    from monailabel.utils.others.generic import name_to_device

    class UniPETDenoiseTask(BasicInferTask):
        """MONAI Label infer task: the denoised PET volume (float32 NIfTI), not a label map."""

        def __init__(
            self,
            bundle_path: str | os.PathLike,
            model_file: str | os.PathLike | None = None,
            overrides: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> None:
            self.core = UniPETLabelCore(bundle_path, model_file=model_file, overrides=overrides)
            super().__init__(
                path=str(self.core.weights_path),
                network=None,
                type=InferType.OTHERS,
                labels=None,
                dimension=3,
                description=DESCRIPTION,
                config={"suv_factor": ""},
                **kwargs,
            )

        # the bundle's own pre/post-processing runs inside __call__ (BundleDenoiser), not MONAI Label's
        def pre_transforms(self, data: Any = None) -> list:
            return []

        def post_transforms(self, data: Any = None) -> list:
            return []

        def info(self) -> dict[str, Any]:
            i = super().info()
            i["output"] = "float32 NIfTI volume, SUV (body weight) on the input grid; load it as a volume"
            return i

        def __call__(self, request: dict[str, Any], callbacks: Any = None) -> tuple[str, dict[str, Any]]:
            req = {**self._config, **dict(request)}
            if not req.get("image"):
                raise UniPETInputError("the request has no 'image'")
            device = name_to_device(req.get("device"))
            out, result = self.core.infer(req["image"], device=str(device), suv_factor=req.get("suv_factor"))
            return str(out), result

    _TASK_CLASS = UniPETDenoiseTask
    return UniPETDenoiseTask


def create_task(bundle_path: str | os.PathLike, **kwargs: Any) -> Any:
    """An instance of :func:`task_class` for ``bundle_path`` (MONAI Label must be installed)."""
    return task_class()(bundle_path, **kwargs)
