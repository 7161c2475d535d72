"""MONAI Deploy App SDK operators of the UniPET app (this module imports the SDK; see the package docstring).

Each operator is thin glue around one function of :mod:`.pet_series`, which holds the logic and is
tested without the SDK. Data passed between operators are plain Python objects (lists of
:class:`~.pet_series.PETVolume` / :class:`~.pet_series.DenoisedPET`): the SDK's ``Image`` type is not
used, so nothing on the way can turn float SUV into integers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec

from scripts.deploy.deploy_app.pet_series import (
    DenoisedPET,
    PETVolume,
    _check_unique,
    denoise_volume,
    pet_volume_from_files,
    series_name,
    write_denoised,
)
from scripts.inference.denoise import BundleDenoiser

__all__ = [
    "DerivedPETSeriesWriterOperator",
    "PETSeriesToSUVOperator",
    "UniPETInferenceOperator",
    "selected_series_files",
]

logger = logging.getLogger(__name__)


def selected_series_files(study_selected_series_list: Any) -> list[tuple[str, list[str]]]:
    """(output name, slice file paths) of every series the SDK's selector picked, in selection order.

    The SDK's loader keeps each instance as a pydicom Dataset read from a file; its ``filename`` is
    where the slice lies.
    """
    out: list[tuple[str, list[str]]] = []
    for study_selected in study_selected_series_list or []:
        for selected in study_selected.selected_series:
            series = selected.series
            files = []
            for sop in series.get_sop_instances():
                native = sop.get_native_sop_instance()
                filename = getattr(native, "filename", None)
                if not isinstance(filename, str) or not filename:
                    raise RuntimeError(
                        "a selected PET instance has no file name: the series must come from files on disk"
                    )
                files.append(filename)
            out.append((series_name(str(series.SeriesInstanceUID), getattr(series, "SeriesNumber", None)), files))
    return out


class PETSeriesToSUVOperator(Operator):
    """Selected PET series -> list of float SUV volumes (replaces the SDK's ``DICOMSeriesToVolumeOperator``).

    Named input ``study_selected_series_list`` (from ``DICOMSeriesSelectorOperator``); named output
    ``pet_volumes`` (list of :class:`PETVolume`). Every series is converted before anything is emitted,
    so one unreadable series stops the app before any output is written.
    """

    def __init__(self, fragment: Fragment, *args: Any, **kwargs: Any) -> None:
        self.input_name = "study_selected_series_list"
        self.output_name = "pet_volumes"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.input_name)
        spec.output(self.output_name).condition(ConditionType.NONE)

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        selected = op_input.receive(self.input_name)
        volumes: list[PETVolume] = [
            pet_volume_from_files(files, name) for name, files in selected_series_files(selected)
        ]
        if not volumes:
            raise RuntimeError("no PET (Modality PT) series selected in the input")
        _check_unique(v.name for v in volumes)
        logger.info("%d PET series in SUV: %s", len(volumes), ", ".join(v.name for v in volumes))
        op_output.emit(volumes, self.output_name)


class UniPETInferenceOperator(Operator):
    """The bundle's inference on every volume (float32 in and out; replaces ``MonaiBundleInferenceOperator``).

    Named input ``pet_volumes``, named output ``denoised`` (list of :class:`DenoisedPET`). The network is
    built once, on first use, from ``bundle_path`` (``models/model.pt``, else ``models/model.ts``).

    Args:
        bundle_path: the ``unipet_bundle`` folder (the app's ``-m``).
        device: ``cuda:0``/``cpu``; None: CUDA when available.
    """

    def __init__(
        self, fragment: Fragment, *args: Any, bundle_path: str | Path, device: str | None = None, **kwargs: Any
    ) -> None:
        self.bundle_path = Path(bundle_path)
        self.device = device
        self.input_name = "pet_volumes"
        self.output_name = "denoised"
        self._denoiser: BundleDenoiser | None = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.input_name)
        spec.output(self.output_name).condition(ConditionType.NONE)

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        volumes: list[PETVolume] = op_input.receive(self.input_name)
        if self._denoiser is None:
            self._denoiser = BundleDenoiser(self.bundle_path, device=self.device)
        denoised: list[DenoisedPET] = [denoise_volume(self._denoiser, v) for v in volumes]
        op_output.emit(denoised, self.output_name)


class DerivedPETSeriesWriterOperator(Operator):
    """Write each denoised volume as a derived PET series (float-safe, read back and checked).

    Named input ``denoised``. Writes ``<output_folder>/<name>_denoised_dicom/`` (and, with
    ``write_nifti``, ``<name>_denoised.nii.gz``).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_folder: str | Path,
        overwrite: bool = False,
        write_nifti: bool = False,
        **kwargs: Any,
    ) -> None:
        self.output_folder = Path(output_folder)
        self.overwrite = overwrite
        self.write_nifti = write_nifti
        self.input_name = "denoised"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.input_name)

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        items: list[DenoisedPET] = op_input.receive(self.input_name)
        for item in items:
            write_denoised(item, self.output_folder, overwrite=self.overwrite, write_nifti=self.write_nifti)
