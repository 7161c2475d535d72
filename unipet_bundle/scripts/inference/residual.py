"""Put the network's correction, not its whole output, back on the input grid, in bounded memory.

Resampling to the training voxel size and back blurs twice: on the real GE series a do-nothing network
still lost 6 % of SUVmax and 1.9 % of the body mean that way. The network is residual (output = input +
correction), so only the correction crosses grids:

    SUV_out(native) = SUV_in(native) + suv_max * resample(pred - network input)

With the identity network the correction is exactly zero and the input comes back bit for bit; hot spots
keep their native peak, only the (smooth) correction is interpolated.

Memory (a Quadra-size study is 440x440x644 voxels, 0.5 GB as float32): the correction is formed on the
small network grid, resampled in float32 with separable linear interpolation (three 1D passes, the last
one in slabs; no coordinate grid of the native size is ever built), and added *in place* to the native
SUV through a view that undoes the reorientation (flips and transposes are strides, not copies). Peak
extra memory is about one native-size plane stack of the two coarse axes (~0.2 GB for Quadra), instead of
MONAI ``Invertd``'s float64 resamplings of both the prediction and the network input (each with a
native-size float64 coordinate grid; 8.4 GB peak).

Level lock (``level_lock_fwhm_mm`` > 0, :mod:`scripts.data.level_lock`): before the correction crosses grids,
its low-pass part is removed on the network grid, so levels over regions larger than the FWHM and the total
activity are the input's.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.common.geometry import voxel_spacing
from scripts.data.level_lock import check_lock_fwhm, lock_level, plain_float32
from scripts.data.orientation import DEFAULT_AXCODES, check_axcodes, to_network_view

__all__ = ["NativeResidualSUVd", "add_resampled"]

# voxels per slab of the last interpolation pass: bounds its temporaries to a few tens of MB
_SLAB_VOXELS = 4_000_000


def _axis_weights(
    n_out: int, n_in: int, scale: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear interpolation along one axis: output voxel j samples input coordinate ``scale * j + offset``,
    clamped to the input (border padding, as the forward ``Spacingd``). Returns (i0, i1, w1) with
    ``out[j] = (1 - w1) in[i0] + w1 in[i1]``."""
    coords = (torch.arange(n_out, dtype=torch.float64) * scale + offset).clamp_(0.0, float(n_in - 1))
    i0 = coords.floor().long().clamp_(0, n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    w1 = (coords - i0.double()).float()
    return i0, i1, w1


def _interp(x: torch.Tensor, axis: int, i0: torch.Tensor, i1: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    shape = [1, 1, 1]
    shape[axis] = -1
    w = w1.view(shape)
    a = x.index_select(axis, i0)
    a.mul_(1.0 - w)
    a.addcmul_(x.index_select(axis, i1), w)
    return a


@torch.no_grad()
def add_resampled(target: np.ndarray, source: torch.Tensor, voxel_map: np.ndarray) -> None:
    """``target += linear resample of source`` in place, for an axis-aligned grid relation.

    Args:
        target: (X, Y, Z) float32 array (any strides, e.g. a flipped/transposed view of the native volume).
        source: (x, y, z) float32 tensor on the coarse grid.
        voxel_map: 4x4 map from ``target`` voxel indices to ``source`` voxel coordinates; must be diagonal
            plus translation (the network grid only rescales the reoriented native grid).
    """
    m = np.asarray(voxel_map, dtype=np.float64)
    if not np.allclose(m[:3, :3] - np.diag(np.diag(m[:3, :3])), 0.0, atol=1e-6):
        raise RuntimeError(
            "the network grid is rotated against the reoriented input grid; cannot map the correction back"
        )
    n_out, n_in = target.shape, tuple(source.shape)
    w = [_axis_weights(n_out[a], n_in[a], float(m[a, a]), float(m[a, 3])) for a in range(3)]
    x = source.float()
    x = _interp(x, 2, *w[2])  # (x, y, Z)
    x = _interp(x, 1, *w[1])  # (x, Y, Z): the largest temporary
    rows = max(1, _SLAB_VOXELS // max(1, n_out[1] * n_out[2]))
    for r0 in range(0, n_out[0], rows):
        r1 = min(r0 + rows, n_out[0])
        i0, i1, w1 = (t[r0:r1] for t in w[0])
        slab = _interp(x, 0, i0, i1, w1)
        chunk = target[r0:r1]
        np.add(chunk, slab.numpy(), out=chunk)


class NativeResidualSUVd(MapTransform):
    """``pred`` (normalised, on the network grid) -> denoised SUV on the native grid, via the residual.

    Args:
        keys: the prediction key (``pred``): (1, x, y, z) on the network grid, normalised units.
        image_key: the network input (``image``), a ``MetaTensor`` (1, x, y, z) on the same grid whose
            ``affine`` is the network grid's and whose ``meta["original_affine"]`` is the input's.
        native_key: the input's SUV (1, X, Y, Z) in its own storage order, as read (not a copy:
            :class:`scripts.inference.inputs.KeepNatived`). It is **overwritten** with the result, which
            then also becomes ``data[key]`` (a ``MetaTensor`` with the input's affine).
        suv_max: the normalisation (network units = SUV / suv_max).
        axcodes: ``network_axcodes``: the orientation the preprocessing's ``Orientationd`` produced.
        level_lock_fwhm_mm: remove the correction's low-pass part at this FWHM (mm) on the network grid
            (:func:`scripts.data.level_lock.lock_level`); 0 (off) returns the network's correction as it is.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str = "image",
        native_key: str = "native_suv",
        suv_max: float = 20.0,
        axcodes: str = DEFAULT_AXCODES,
        level_lock_fwhm_mm: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.level_lock_fwhm_mm = check_lock_fwhm(level_lock_fwhm_mm)  # a bad value is refused at parse time
        self.image_key, self.native_key, self.suv_max = image_key, native_key, float(suv_max)
        self.axcodes = check_axcodes(axcodes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        native = plain_float32(d[self.native_key])
        if not native[0].numpy().flags.writeable:  # e.g. a read-only memory map: never write into an input file
            native = native.clone()
        storage_affine = np.asarray(torch.as_tensor(image.meta["original_affine"]).cpu().double().numpy()).reshape(4, 4)
        net_affine = torch.as_tensor(image.affine).cpu().double().numpy().reshape(4, 4)
        for key in self.key_iterator(d):
            pred = d[key]
            correction = plain_float32(pred)[0] - plain_float32(image)[0]
            correction.mul_(self.suv_max)
            lock_level(correction, voxel_spacing(net_affine), self.level_lock_fwhm_mm)
            native_np = native[0].numpy()
            view, view_affine = to_network_view(native_np, storage_affine, self.axcodes)
            if tuple(view.shape) != tuple(correction.shape) or not np.allclose(view_affine, net_affine, atol=1e-4):
                add_resampled(view, correction, np.linalg.solve(net_affine, view_affine))
            else:  # no resampling: the network grid is the reoriented native grid
                np.add(view, correction.numpy(), out=view)
            meta = {
                k: v for k, v in (getattr(pred, "meta", {}) or {}).items() if k != "affine"
            }  # the grid is the input's now
            d[key] = MetaTensor(native, affine=torch.as_tensor(storage_affine), meta=meta)
        return d
