"""MONAI Label app serving UniPET denoising (one infer task, ``unipet_denoise``; no training, no labels).

Start it (in the MONAI Label environment of docs/deployment.md)::

    monailabel start_server --app /path/to/unipet_bundle/scripts/deploy/label_app \\
        --studies /data/suv_niftis --conf bundle_path /path/to/unipet_bundle

``bundle_path`` defaults to the bundle this folder lies in. The folder is deliberately not named
``monailabel``: MONAI Label puts the app folder on ``sys.path``, where such a name would shadow the package.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp

_DEFAULT_BUNDLE = Path(__file__).resolve().parents[3]

logger = logging.getLogger(__name__)


class UniPETLabelApp(MONAILabelApp):
    """MONAI Label app with the UniPET denoising task."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle_path = Path(conf.get("bundle_path") or _DEFAULT_BUNDLE).expanduser().resolve()
        if str(self.bundle_path) not in sys.path:
            sys.path.insert(0, str(self.bundle_path))  # the bundle's `scripts` package
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="UniPET",
            description="UniPET low-dose PET denoising (research use only)",
            version="1",
        )

    def init_infers(self) -> dict[str, Any]:
        from scripts.deploy.monailabel_task import TASK_NAME, create_task

        return {TASK_NAME: create_task(self.bundle_path, model_file=self.conf.get("model_file") or None)}
