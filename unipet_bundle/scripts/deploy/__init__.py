"""Deployment and distribution: TorchScript export checks, the model-zoo package, the MONAI Deploy App SDK
application and the MONAI Label infer task.

Modules (each has one job):

- :mod:`.export`: ``model.ts`` from ``model.pt`` (MONAI's ``ckpt_export``) and its comparison with the eager network;
- :mod:`.package`: the model-zoo zip (``unipet_bundle_v<version>.zip``) and ``large_files.yml``;
- :mod:`.deploy_app`: the MONAI Deploy App SDK application (the SDK is imported lazily, only by its glue);
- :mod:`.monailabel_task`: the MONAI Label infer task (MONAI Label is imported lazily);
- :mod:`.label_app`: the MONAI Label app (``label_app/main.py``) that serves that task.

Both apps denoise through :class:`scripts.inference.denoise.BundleDenoiser` (the components of
``configs/inference.json`` on an in-memory volume, no SDK needed). The user-facing text is ``docs/deployment.md``.
"""
