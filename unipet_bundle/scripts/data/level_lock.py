"""The level lock: a denoiser's correction without its low-pass part, so levels and totals stay the measured ones.

The trained weights carry a level bias of their own (0.4.0 and 0.5.0: +1.4 % on a noise-free flat 2 SUV
volume; -1 to -1.7 % of the body total on simulated test subjects). With the lock the correction
``c = output - input`` becomes ``c - G * c`` (``G``: a Gaussian of FWHM ``level_lock_fwhm_mm``, mirrored at the
volume's faces, which keeps the sum). The network may then only remove structure finer than the FWHM: the
mean over any region much larger than it, a flat volume's level and the volume's total activity are the
input's, whatever the weights. The price is the input's noise at scales above the FWHM, which comes back
(measured in the model card: at 20 mm, -0.1 to -0.2 dB at DRF 100, +0.1 to +1 dB at DRF 4-20).

Used by ``inference.json`` (:class:`scripts.inference.residual.NativeResidualSUVd`, on the network grid before
the correction goes back to the input grid) and by ``train.json``'s validation, which ``evaluate.json``
inherits (:class:`LevelLockd`), with one key, ``level_lock_fwhm_mm``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from scripts.common.errors import UniPETInputError
from scripts.common.geometry import voxel_spacing
from scripts.data.recon import FWHM_TO_SIGMA

__all__ = ["LevelLockd", "check_lock_fwhm", "lock_level", "plain_float32"]


def plain_float32(x: Any) -> torch.Tensor:
    """A plain CPU float32 tensor (no MetaTensor bookkeeping on the arithmetic); no copy when already one."""
    t = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return t.detach().to("cpu", torch.float32)


def check_lock_fwhm(fwhm_mm: Any) -> float:
    """``fwhm_mm`` as a float, or a :class:`UniPETInputError` (a ``ValueError``, so the CLIs print one line and
    exit 2) naming the key: it must be finite and >= 0 (0: lock off)."""
    try:
        # a bool is a mistyped switch, not a width (True would be 1 mm: a lock that removes everything)
        fwhm = float("nan") if isinstance(fwhm_mm, bool) else float(fwhm_mm)
    except (TypeError, ValueError):
        fwhm = float("nan")
    if not math.isfinite(fwhm) or fwhm < 0.0:
        raise UniPETInputError(
            f"level_lock_fwhm_mm must be a finite number >= 0 (0 turns the lock off), got {fwhm_mm!r}"
        )
    return fwhm


def lock_level(correction: torch.Tensor, spacing_mm: Any, fwhm_mm: float) -> torch.Tensor:
    """Remove the low-pass part of ``correction`` in place and return it: ``c <- c - G_fwhm * c``.

    Args:
        correction: (x, y, z) float32 tensor, the network's correction in SUV on the network grid.
        spacing_mm: that grid's voxel size (3 values, mm).
        fwhm_mm: FWHM of the Gaussian low-pass (mm); 0 returns ``correction`` unchanged.

    The filter mirrors the volume at its faces (half-sample symmetric, scipy's ``reflect``), which keeps the
    volume's sum exactly, so the corrected volume keeps the input's total activity; a constant correction
    (a flat bias) is removed entirely.
    """
    fwhm = check_lock_fwhm(fwhm_mm)
    if fwhm == 0.0:
        return correction
    widest = max(float(s) for s in spacing_mm)
    if fwhm < widest:
        # a Gaussian narrower than a voxel passes the correction almost whole, so the lock would remove all of it
        # and return the input unchanged (1 mm at 4 mm voxels keeps 0 % of it): the opposite of a small width
        raise UniPETInputError(
            f"level_lock_fwhm_mm {fwhm:g} mm is narrower than a voxel of the network grid ({widest:g} mm): the lock "
            f"would remove the whole correction; set 0 to turn it off or a width of at least {widest:g} mm "
            "(default 20)"
        )
    c = correction.numpy()
    if not np.isfinite(c).all():
        # a NaN would spread over the whole kernel (~4 FWHM wide) and the error would name the lock
        raise ValueError("the network's correction holds NaN or Inf voxels: the network failed on this input")
    sigma = [fwhm * FWHM_TO_SIGMA / float(s) for s in spacing_mm]
    # float32 in and out (scipy filters each line in double precision): no float64 copy of the volume
    low = ndimage.gaussian_filter(c, sigma, output=np.float32, mode="reflect", truncate=4.0)
    np.subtract(c, low, out=c)
    return correction


class LevelLockd(MapTransform):
    """The level lock of :class:`scripts.inference.residual.NativeResidualSUVd`, for a prediction on the grid of
    the network input itself.

    Training's validation (which selects the checkpoint) and ``evaluate.json`` score the network on each volume's
    grid (no return to a native grid); this applies the same lock there, so what is scored is what
    ``inference.json`` writes. A non-finite prediction is an error (the network has diverged), which ends a
    training run at that validation.

    Args:
        keys: the prediction key (``pred``): (1, x, y, z) in normalised units (SUV / ``suv_max``).
        image_key: the network input (``image``), same shape, a ``MetaTensor`` whose ``affine`` gives the
            voxel size in mm.
        level_lock_fwhm_mm: FWHM of the removed low-pass part of ``pred - image`` (mm); 0 leaves ``pred``.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str = "image",
        level_lock_fwhm_mm: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        # a bad value is refused at parse time
        self.image_key, self.level_lock_fwhm_mm = image_key, check_lock_fwhm(level_lock_fwhm_mm)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.level_lock_fwhm_mm == 0.0:
            return d
        image = d[self.image_key]
        meta = getattr(image, "meta", None) or {}
        if not isinstance(image, MetaTensor) or "filename_or_obj" not in meta:
            # without the loader's metadata MONAI re-wraps the array with an identity affine (1 mm voxels):
            # the lock would silently act at the wrong scale
            raise ValueError(
                f"LevelLockd needs '{self.image_key}' as a MetaTensor with the loader's metadata (its affine gives "
                "the voxel size): keep track_meta on in the preprocessing"
            )
        spacing = voxel_spacing(image.affine)
        for key in self.key_iterator(d):
            pred = d[key]
            base = plain_float32(image)[0]
            correction = plain_float32(pred)[0] - base
            lock_level(correction, spacing, self.level_lock_fwhm_mm)  # unit-free: the lock is linear
            locked = pred.detach().float().clone()  # float32: a bf16 prediction would round the correction away
            d[key] = locked.copy_((base + correction)[None])  # keeps type, meta and device
        return d
