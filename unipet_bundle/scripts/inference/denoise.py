"""Denoise an in-memory SUV volume with a UniPET network (the demo and the quality benchmark).

The bundle's inference workflow (``configs/inference.json``) adds file handling, resampling and DICOM on
top; this is the plain network step shared by the tools that already hold the volume on the 4 mm grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer

from scripts.data.orientation import DEFAULT_AXCODES, from_network_view, to_network_view

__all__ = ["denoise_volume", "network_from_config"]


def network_from_config(
    config_file: str | os.PathLike, bundle_root: str | os.PathLike
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The untrained ``network_def`` of a training config, and its settings that scoring and inference need:
    ``patch_size``, ``sw_batch_size``, ``suv_max``, ``rals_threshold_suv2``, ``rals_window``."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(Path(bundle_root))
    net = parser.get_parsed_content("network_def")
    keys = ("patch_size", "sw_batch_size", "suv_max", "rals_threshold_suv2", "rals_window")
    return net.eval(), {k: parser.get_parsed_content(k) for k in keys}


@torch.no_grad()
def denoise_volume(
    net: torch.nn.Module,
    low_suv: np.ndarray,
    suv_max: float = 20.0,
    roi_size: Any = (32, 32, 32),
    sw_batch_size: int = 8,
    overlap: float = 0.25,
    progress: bool = False,
    affine: np.ndarray | None = None,
    axcodes: str = DEFAULT_AXCODES,
) -> np.ndarray:
    """Denoise one low-dose volume.

    Args:
        net: the UniPET generator in eval mode (on the CPU).
        low_suv: (x, y, z) low-dose SUV, float; the network sees it divided by ``suv_max`` (not clipped).
        suv_max: the training normalisation (SUV).
        roi_size, sw_batch_size, overlap: the Gaussian-blended sliding window of training validation.
        progress: progress bar over windows.
        affine: the volume's voxel->RAS affine. Given, the network sees the volume in ``axcodes`` order (the
            orientation it was trained in, as ``inference.json`` does) and the result comes back in the input's
            storage order; ``None`` feeds the array as stored (only for arrays already in ``axcodes`` order).
        axcodes: the network's orientation (``network_axcodes`` of the configs).

    Returns:
        (x, y, z) float32 SUV.
    """
    inferer = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=int(sw_batch_size), overlap=overlap,
                                   mode="gaussian", progress=progress)
    view = low_suv if affine is None else to_network_view(low_suv, affine, axcodes)[0]
    x = torch.from_numpy(np.ascontiguousarray(view, dtype=np.float32) / float(suv_max))[None, None]
    out = (inferer(x, net)[0, 0].numpy() * float(suv_max)).astype(np.float32)
    return out if affine is None else np.ascontiguousarray(from_network_view(out, affine, axcodes))
