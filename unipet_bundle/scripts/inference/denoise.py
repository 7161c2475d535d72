"""The bundle's own inference pipeline (``configs/inference.json``) on an in-memory SUV volume.

Tools that hold a volume in memory (the MONAI Deploy app, the MONAI Label task, the demo, the quality
benchmark) must not re-implement inference: any difference in resampling, normalisation, window size, blending or the
residual return to the input grid would make their output differ from ``monai.bundle run``. This
module parses ``inference.json`` and runs exactly its components, in the order MONAI's
``SupervisedEvaluator`` runs them, with two substitutions only:

- the loader (``load_transform``: a file or DICOM folder -> SUV) is replaced by a pass-through, since
  the caller hands over the SUV volume and its affine;
- the writer (``SaveDenoisedd``) is dropped from ``postprocessing``: the caller decides what to write.

So ``BundleDenoiser(...)(suv, affine)`` returns what ``inference.json`` writes to
``<name>_denoised.nii.gz`` for the same volume (``tests/test_deploy_app.py`` checks this).

Weights: ``model.pt`` through the config's own ``network_def`` and ``load_weights`` (the default), a
TorchScript ``model.ts`` (``model_file=...model.ts``), e.g. in a MONAI Deploy package that ships only it, or
a network the caller built and loaded (``network=...``: the demo and the quality benchmark, whose networks
come from a training config, :func:`network_from_config`).

Until issue 17 the demo and the quality benchmark used a hand-written copy of the network step (this module
then held it) and ``BundleDenoiser`` lived in ``scripts/deploy/``; it is here now because applications may
not import each other (``docs/code_map.md``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.transforms import Compose

from scripts.common.allocator import keep_freed_memory_as_configured
from scripts.common.errors import UniPETInputError, user_error
from scripts.common.versioning import bundle_version
from scripts.common.vml_dispatch import resolve_vml_dispatch
from scripts.common.weights import file_sha256
from scripts.data.level_lock import check_lock_fwhm
from scripts.data.volume_checks import check_pet_volume
from scripts.inference.writer import SaveDenoisedd
from scripts.networks.fused_pad import fused_kernels_as_configured

__all__ = ["BundleDenoiser", "check_float_volume", "network_from_config", "suv_metatensor"]

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("configs") / "inference.json"


def check_float_volume(array: Any, what: str) -> np.ndarray:
    """``array`` as a float ndarray (X, Y, Z), refusing integer data and NaN/Inf.

    SUV and Bq/mL are real numbers: an integer array here means something upstream cast it (MONAI Deploy's
    bundle operator casts "image" outputs to uint8; its series-to-volume operator can store a whole series
    as int16), which would silently destroy the quantification.

    Raises:
        UniPETInputError: integer or boolean dtype, not 3D, or non-finite values
            (:func:`scripts.data.volume_checks.check_pet_volume`).
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    # the bundle's volume policy with the app's thresholds: any 3D size, all-zero allowed (outputs are checked too)
    return check_pet_volume(what, array, allow_all_zero=True, min_shape=(1, 1, 1), require_float=True)


def suv_metatensor(suv: np.ndarray, affine: np.ndarray, name: str = "memory") -> MetaTensor:
    """(1, X, Y, Z) float32 ``MetaTensor`` with the metadata :class:`scripts.inference.inputs.LoadPETd` sets."""
    aff = np.asarray(affine, dtype=np.float64).reshape(4, 4)
    meta = {
        "original_affine": aff.copy(),
        "spatial_shape": np.asarray(suv.shape),
        "filename_or_obj": name,
        "space": "RAS",
        "original_channel_dim": "no_channel",
    }
    data = torch.from_numpy(np.ascontiguousarray(suv, dtype=np.float32)[None])
    return MetaTensor(data, affine=torch.as_tensor(aff), meta=meta)


class BundleDenoiser:
    """Denoise SUV volumes held in memory with the bundle's inference pipeline.

    Args:
        bundle_root: the bundle folder (holds ``configs/`` and ``models/``); put on ``sys.path`` so the
            config's ``scripts.*`` targets import.
        config_file: inference config, relative to ``bundle_root`` unless absolute.
        model_file: weights: ``None`` -> the config's ``checkpoint`` (``models/model.pt``), or, when that
            file is missing and ``models/model.ts`` exists, the TorchScript model; a path ending in ``.ts``
            -> that TorchScript model; any other path -> that checkpoint.
        device: ``"cpu"``, ``"cuda:0"``...; ``None`` keeps the config's choice (CUDA when available).
        allow_untrained: run the untrained network (the identity) when there are no weights; False (the
            default here, unlike ``inference.json``) makes missing weights an error, as an application
            must never present an untouched image as denoised.
        overrides: further config values (``patch_size``, ``sw_batch_size``, ``channels``...), as
            ``monai.bundle run --key value`` would set them. The config's ``host_memory_cache_mb`` and
            ``fused_cpu_kernels`` are applied to this process as ``inference.json``'s ``initialize`` does (see
            :mod:`scripts.common.allocator` and :mod:`scripts.networks.fused_pad`).
        network: an eager network that already holds its weights (e.g. from ``scripts.common.weights``), used
            instead of the config's ``network`` and weights (``model_file`` is then not read); everything
            else (precision wrapper, sliding window, pre- and postprocessing) is still the config's. The demo
            and the quality benchmark run their networks this way.
        model_info: with ``network``, its provenance (``checkpoint``, ``trained``, ...) in place of the
            config's ``model_info``; required with ``network``.

    Raises:
        UniPETInputError: missing bundle/config; CheckpointError: weights missing or not fitting.
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike,
        config_file: str | os.PathLike = DEFAULT_CONFIG,
        model_file: str | os.PathLike | None = None,
        device: str | None = None,
        allow_untrained: bool = False,
        overrides: Mapping[str, Any] | None = None,
        network: torch.nn.Module | None = None,
        model_info: Mapping[str, Any] | None = None,
    ) -> None:
        if (network is None) != (model_info is None):
            raise ValueError("give network and model_info together (model_info says which weights the network holds)")
        self.bundle_root = Path(bundle_root).expanduser().resolve()
        config = Path(config_file)
        config = config if config.is_absolute() else self.bundle_root / config
        if not config.is_file():
            raise UniPETInputError(
                f"bundle config {config} not found: pass the unipet_bundle folder as the bundle root"
            )
        if str(self.bundle_root) not in sys.path:
            sys.path.insert(0, str(self.bundle_root))

        try:
            self._build(config, model_file, device, allow_untrained, overrides, network, model_info)
        except RuntimeError as exc:
            # ConfigParser wraps every error of an expression in RuntimeError("Failed to evaluate ...");
            # a bad-input error inside (missing weights, bad option) is shown as itself
            found = user_error(exc)
            if found is not None and found is not exc:
                raise found from None
            raise

    def _build(
        self,
        config: Path,
        model_file: str | os.PathLike | None,
        device: str | None,
        allow_untrained: bool,
        overrides: Mapping[str, Any] | None,
        network: torch.nn.Module | None = None,
        model_info: Mapping[str, Any] | None = None,
    ) -> None:
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["bundle_root"] = str(self.bundle_root)
        for key, value in dict(overrides or {}).items():
            parser[key] = value
        if device is not None:
            parser["device"] = str(device)
        parser["allow_untrained"] = bool(allow_untrained)
        parser["load_transform"] = {"_target_": "Identityd", "keys": "image"}

        ts_path = None if network is not None else self._torchscript_path(parser, model_file)
        if network is not None:
            # the caller's network and weights replace the config's network_def and model_info (not read)
            parser["network"] = network
            parser["model_info"] = dict(model_info or {})
            self.network = network
        elif ts_path is not None:
            network = torch.jit.load(str(ts_path), map_location="cpu")
            # the config's network/model_info would build and load the eager network: replace both
            parser["network"] = network
            parser["model_info"] = {
                "checkpoint": str(ts_path),
                "trained": True,
                "checkpoint_sha256": file_sha256(ts_path),
                "format": "torchscript",
            }
            self.network = network
        else:
            if model_file is not None:
                parser["checkpoint"] = str(Path(model_file).expanduser().absolute())
            self.network = parser.get_parsed_content("network")
        self.device = torch.device(parser.get_parsed_content("device"))
        # what inference.json's initialize does: freed host memory kept for reuse (process-wide; an embedding
        # application that wants the C library's defaults overrides host_memory_cache_mb with 0)
        self.host_memory: dict[str, Any] = keep_freed_memory_as_configured(parser)
        resolve_vml_dispatch()  # and oneMKL's VML kernels resolved before any multi-threaded first call
        self.fused_kernels: dict[str, Any] = fused_kernels_as_configured(parser)  # and the fused CPU kernel
        self.network = self.network.to(self.device).eval()
        # the evaluator's network in inference.json: the config's precision wrapper around the network
        self.inference_network = parser.get_parsed_content("inference_network").eval()
        self.model_info: dict[str, Any] = dict(parser.get_parsed_content("model_info"))
        self.model_version = bundle_version(self.bundle_root)
        self.suv_max = float(parser.get_parsed_content("suv_max"))
        self.level_lock_fwhm_mm = check_lock_fwhm(parser.get_parsed_content("level_lock_fwhm_mm"))
        self.patch_size = [int(v) for v in parser.get_parsed_content("patch_size")]
        self.inferer = parser.get_parsed_content("inferer")
        preprocessing = parser.get_parsed_content("preprocessing")
        postprocessing = parser.get_parsed_content("postprocessing")
        self.preprocessing = preprocessing
        # the writer is the caller's business; everything before it is the bundle's
        self.postprocessing = Compose([t for t in postprocessing.transforms if not isinstance(t, SaveDenoisedd)])
        logger.info(
            "bundle inference ready: %s, weights %s (trained=%s), device %s, windows %s",
            config.name,
            self.model_info.get("checkpoint"),
            self.model_info.get("trained"),
            self.device,
            "x".join(map(str, self.patch_size)),
        )

    def _torchscript_path(self, parser: ConfigParser, model_file: str | os.PathLike | None) -> Path | None:
        if model_file is not None:
            path = Path(model_file).expanduser().absolute()
            if path.suffix == ".ts":
                if not path.is_file():
                    raise UniPETInputError(
                        f"TorchScript model {path} not found: export it with ckpt_export (docs/deployment.md)"
                    )
                return path
            return None
        checkpoint = Path(str(parser.get_parsed_content("checkpoint")))
        ts = self.bundle_root / "models" / "model.ts"
        return ts if not checkpoint.is_file() and ts.is_file() else None

    @property
    def trained(self) -> bool:
        return bool(self.model_info.get("trained", False))

    def __call__(self, suv: Any, affine: Any, name: str = "memory") -> np.ndarray:
        """Denoise one volume.

        Args:
            suv: float (X, Y, Z) body-weight SUV, any grid (resampled to the training voxel size and back
                as ``inference.json`` does).
            affine: 4x4 voxel -> RAS mm.
            name: shown in log lines (never a patient identifier).

        Returns:
            float32 (X, Y, Z) denoised SUV on the input's grid.
        """
        volume = check_float_volume(suv, f"input volume {name}")
        item = {
            "image": suv_metatensor(volume, np.asarray(affine), name),
            "name": name,
            "kind": "memory",
            "source": name,
            "suv_factor": 1.0,
            "units": "SUV",
        }
        data = self.preprocessing(item)
        batch = list_data_collate([data])
        with torch.no_grad():
            pred = self.inferer(batch["image"].to(self.device), self.inference_network)
        merged = dict(decollate_batch(batch)[0])
        merged["pred"] = decollate_batch(pred)[0]
        out = self.postprocessing(merged)["pred"]
        result = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        result = np.asarray(result[0] if result.ndim == 4 else result, dtype=np.float32)
        if result.shape != volume.shape:
            raise RuntimeError(f"{name}: denoised shape {result.shape} differs from the input's {volume.shape}")
        return check_float_volume(result, f"denoised volume {name}")


def network_from_config(
    config_file: str | os.PathLike, bundle_root: str | os.PathLike
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The untrained ``network_def`` of a training config, and the settings that belong to its weights and its
    scoring: ``suv_max`` and ``network_axcodes`` (the normalisation and orientation it is trained in),
    ``patch_size``, ``sw_batch_size``, ``rals_threshold_suv2``, ``rals_window``. Hand the loaded network to
    :class:`BundleDenoiser` (``network=``) to denoise with it."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(Path(bundle_root))
    net = parser.get_parsed_content("network_def")
    keys = ("patch_size", "sw_batch_size", "suv_max", "network_axcodes", "rals_threshold_suv2", "rals_window")
    return net.eval(), {k: parser.get_parsed_content(k) for k in keys}
