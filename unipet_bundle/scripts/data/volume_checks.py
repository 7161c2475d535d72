"""What makes a volume fit to denoise or to train on, checked in one place for every tool.

Policy (the same in inference, training and evaluation; the SUV tool only converts and is laxer). The
simulator and the MONAI Deploy app use the same function with their own thresholds, given as explicit
arguments (``min_shape``, ``allow_all_zero``, ``require_float``), so one implementation serves all of them:

- **3D only.** A 2D image (or a single slice) is refused: UniPET is a 3D denoiser. Trailing singleton
  axes (X, Y, Z, 1) are dropped first.
- **4D (dynamic/gated) volumes are refused, not denoised frame by frame**: each frame of a dynamic scan
  has its own counts and therefore its own noise level and texture, and the bundle cannot tell frames
  from gates; the message says to split the frames into 3D files and denoise those.
- **NaN/Inf voxels are refused** (one would spread through every window that touches it), with the count.
- **An all-zero volume is refused**: it is an empty or failed reconstruction (or the wrong file); there is
  nothing to denoise, and a full dose of zeros gives no patch to train on.
- **A volume with no positive voxel (all negative, or negative and zero) is refused**: PET activity is
  never below zero everywhere; such a file has its sign inverted, an offset subtracted, or is not a PET
  image at all. Denoising it would "work" and give nonsense, so the message names the maximum and the
  likely causes.
- **Integer data are refused where the values must be real** (``require_float``, the Deploy app): an
  integer array means something upstream cast the SUV (the SDK's uint8 image output, its int16
  series-to-volume conversion), which would silently destroy the quantification.
- **Negative voxels are kept as they are**: OSEM/FBP reconstructions legitimately contain them and they
  carry the zero-mean noise of cold regions; clipping them would bias low-uptake means upwards.
"""

from __future__ import annotations

import numpy as np

from scripts.common.errors import UniPETInputError

__all__ = ["check_pet_volume"]


def check_pet_volume(
    name: str,
    array: np.ndarray,
    allow_all_zero: bool = False,
    *,
    min_shape: tuple[int, int, int] = (2, 2, 2),
    require_float: bool = False,
) -> np.ndarray:
    """Return ``array`` as a 3D volume, or raise one clear line naming ``name`` (see the module docstring).

    Args:
        name: what to call the volume in messages (its path).
        array: the volume, (X, Y, Z) or (X, Y, Z, 1, ...).
        allow_all_zero: accept a volume whose voxels are all zero, or that has no positive voxel at all (the
            SUV tool converts it with a warning; the Deploy app checks its outputs too).
        min_shape: the fewest voxels along (X, Y, Z); an axis of one voxel is reported as a 2D image. The
            default (2, 2, 2) refuses single slices (inference, training, evaluation); the simulator asks for
            (8, 8, 1), the Deploy app for (1, 1, 1).
        require_float: refuse integer and boolean data (the Deploy app, whose SDK may cast PET values).

    Raises:
        UniPETInputError: 2D image or single slice, 4D volume, too few voxels, integer data (``require_float``),
            NaN/Inf voxels, all-zero volume, no positive voxel.
    """
    arr = np.asarray(array)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim > 3:
        raise UniPETInputError(
            f"{name} is a {arr.ndim}D volume (shape {list(arr.shape)}): UniPET denoises one 3D volume at a time and "
            "does not denoise dynamic/gated frames itself; split the frames into 3D files (one NIfTI per frame) and use those"
        )
    if arr.ndim < 3 or any(n < 2 <= m for n, m in zip(arr.shape, min_shape)):
        raise UniPETInputError(
            f"{name} is a 2D image (shape {list(arr.shape)}): UniPET is a 3D denoiser; give it the whole 3D volume "
            "(all slices in one NIfTI file or one DICOM series folder)"
        )
    if any(n < m for n, m in zip(arr.shape, min_shape)):
        raise UniPETInputError(
            f"{name} is too small (shape {list(arr.shape)}): it needs at least {' x '.join(map(str, min_shape))} voxels"
        )
    if require_float and not np.issubdtype(arr.dtype, np.floating):
        raise UniPETInputError(
            f"{name} has dtype {arr.dtype}, not float: PET values were cast to integers upstream (e.g. by the SDK's "
            "uint8 image output or int16 series-to-volume conversion); feed the float volume instead"
        )
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise UniPETInputError(
            f"{name} has {bad} NaN/Inf voxel(s): fix the reconstruction, or set them to 0 before using it"
        )
    if not allow_all_zero and not np.any(arr):
        raise UniPETInputError(
            f"{name} is all zero (an empty or failed reconstruction, or the wrong file?): nothing to denoise or learn "
            "from; replace it or remove it"
        )
    if not allow_all_zero and float(np.max(arr)) <= 0.0:
        raise UniPETInputError(
            f"{name} has no positive voxel (maximum {float(np.max(arr)):.4g}, minimum {float(np.min(arr)):.4g}): PET "
            "activity is never negative everywhere; the sign is inverted, an offset was subtracted, or this is not a PET "
            "image: fix the file or remove it"
        )
    return arr
