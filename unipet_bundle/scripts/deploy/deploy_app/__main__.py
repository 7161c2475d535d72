"""``python -m scripts.deploy.deploy_app -i DICOM_DIR -o OUT_DIR -m BUNDLE_DIR`` (see :mod:`.app`).

Without the MONAI Deploy App SDK installed this prints one ``error:`` line naming the install command and
exits with status 2; ``--without_sdk`` runs the same flow with the bundle's own series finder instead of
the SDK's DICOM loader and selector (:func:`.pet_series.run_without_sdk`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from scripts.common.errors import CheckpointError, UniPETInputError, exit_bad_input


def _without_sdk(argv: list[str]) -> None:
    from scripts.deploy.deploy_app.pet_series import run_without_sdk

    parser = argparse.ArgumentParser(
        prog="python -m scripts.deploy.deploy_app --without_sdk",
        description="UniPET Deploy-app flow without the App SDK",
    )
    parser.add_argument("--without_sdk", action="store_true")
    parser.add_argument("-i", "--input", required=True, help="folder of DICOM studies (searched recursively)")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("-m", "--model", required=True, help="the unipet_bundle folder")
    parser.add_argument("--device", default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--write_nifti", action="store_true")
    args = parser.parse_args(argv)
    for path in run_without_sdk(
        args.input, args.output, args.model, device=args.device, overwrite=args.overwrite, write_nifti=args.write_nifti
    ):
        print(path)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    try:
        if "--without_sdk" in argv:
            _without_sdk(argv)
            return
        try:
            from scripts.deploy.deploy_app.app import UniPETDenoiseApp
        except ImportError as exc:
            raise UniPETInputError(
                f"MONAI Deploy App SDK not importable ({exc}): pip install -r requirements-deploy.txt in a separate "
                "environment (docs/deployment.md), or run with --without_sdk"
            ) from None
        UniPETDenoiseApp().run()
    except (UniPETInputError, CheckpointError) as exc:
        exit_bad_input(exc)


if __name__ == "__main__":
    main()
