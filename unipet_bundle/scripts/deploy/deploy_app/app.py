"""The UniPET MONAI Deploy application (App SDK 4.0; imports the SDK).

Run (from the bundle root, in an environment with ``requirements-deploy.txt``)::

    python -m scripts.deploy.deploy_app -i DICOM_STUDIES_DIR -o OUTPUT_DIR -m .

``-m`` is the ``unipet_bundle`` folder (weights in ``models/``). Environment variables the SDK reads
instead of the flags: ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_MODEL_PATH``.
``UNIPET_DEVICE`` (``cpu``, ``cuda:0``) picks the device, ``UNIPET_WRITE_NIFTI=1`` also writes the
float SUV NIfTI, ``UNIPET_OVERWRITE=1`` replaces existing outputs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

from scripts.deploy.deploy_app.operators import (
    DerivedPETSeriesWriterOperator,
    PETSeriesToSUVOperator,
    UniPETInferenceOperator,
)

__all__ = ["PET_SELECTION_RULES", "UniPETDenoiseApp"]

logger = logging.getLogger(__name__)

# Every PT series of every study; whether a series can be denoised (Units, decay correction, geometry)
# is decided by the SUV reader, which names the problem.
PET_SELECTION_RULES = """
{
    "selections": [
        {
            "name": "PET series",
            "conditions": {
                "Modality": "(?i)^PT$"
            }
        }
    ]
}
"""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class UniPETDenoiseApp(Application):
    """DICOM studies in, one derived (denoised) PET series per PET series out. See the package docstring."""

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)  # -i/-o/-m, else the HOLOSCAN_* variables
        input_path = Path(app_context.input_path)
        output_path = Path(app_context.output_path)
        bundle_path = Path(app_context.model_path)

        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(
            self, rules=PET_SELECTION_RULES, all_matched=True, name="pet_series_selector"
        )
        to_suv = PETSeriesToSUVOperator(self, name="pet_series_to_suv")
        infer = UniPETInferenceOperator(
            self,
            bundle_path=bundle_path,
            device=os.environ.get("UNIPET_DEVICE") or None,
            name="unipet_bundle_inference",
        )
        writer = DerivedPETSeriesWriterOperator(
            self,
            output_folder=output_path,
            overwrite=_flag("UNIPET_OVERWRITE"),
            write_nifti=_flag("UNIPET_WRITE_NIFTI"),
            name="derived_pet_writer",
        )

        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_suv, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_suv, infer, {("pet_volumes", "pet_volumes")})
        self.add_flow(infer, writer, {("denoised", "denoised")})
        logger.info("UniPET app: %s -> %s with bundle %s", input_path, output_path, bundle_path)
