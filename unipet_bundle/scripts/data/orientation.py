"""The one array orientation the network sees, in training, evaluation and inference alike.

A network trained on one axis order denoises a mirrored or transposed body differently (on the real
series: up to 7 SUV apart). Every volume is therefore reoriented to ``network_axcodes`` (a config key,
default ``"RAS"``) before the network and mapped back after. ``RAS`` is what the shipped weights were
trained in: the simulator writes (x, y, z) arrays with a diagonal, positive RAS affine
(:func:`scripts.data.phantom.phantom_affine`), and ``LoadImaged(reader="NibabelReader")`` returns NIfTI
arrays in file order.

Reorientation is a pure index permutation and flip (exact, no interpolation), computed from the affine
exactly as MONAI's ``Orientation`` does it (``nibabel.io_orientation`` -> ``ornt_transform``), so the
configs can use MONAI's ``Orientationd`` while the code here (evaluation label maps, the inverse in
inference) uses numpy *views* of the same mapping: no copy of a whole-body volume.
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from scripts.common.errors import UniPETInputError

__all__ = ["DEFAULT_AXCODES", "check_axcodes", "from_network_view", "network_ornt", "to_network_view"]

DEFAULT_AXCODES = "RAS"
_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def check_axcodes(value: Any, name: str = "network_axcodes") -> str:
    """Three axis codes, one of L/R, one of P/A and one of I/S (e.g. ``"RAS"``, ``"LPS"``), upper case.

    Raises:
        UniPETInputError: anything else.
    """
    text = "".join(value) if isinstance(value, (list, tuple)) else str(value)
    text = text.strip().upper()
    ok = len(text) == 3 and all(sum(c in pair for c in text) == 1 for pair in _LABELS)
    if not ok:
        raise UniPETInputError(
            f'--{name} must be three axis codes, one each of L/R, P/A and I/S (e.g. "RAS", the orientation the '
            f"shipped weights were trained in), got {value!r}"
        )
    return text


def _orientations(affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    src = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    dst = nib.orientations.axcodes2ornt(check_axcodes(axcodes), labels=_LABELS)
    return src, dst


def network_ornt(affine: np.ndarray, axcodes: str = DEFAULT_AXCODES) -> np.ndarray:
    """The nibabel orientation transform (3x2: target axis, flip) from an array with ``affine`` to ``axcodes``.

    The same computation as ``monai.transforms.Orientation`` (nearest axes for oblique affines).
    """
    src, dst = _orientations(affine, axcodes)
    return nib.orientations.ornt_transform(src, dst)


def to_network_view(
    array: np.ndarray, affine: np.ndarray, axcodes: str = DEFAULT_AXCODES
) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (X, Y, Z) with its voxel->RAS ``affine`` as a view in ``axcodes`` order, and the view's affine.

    No data are copied (flips and transposes are strides); writing into the view writes into ``array``.
    """
    arr = np.asarray(array)
    ornt = network_ornt(affine, axcodes)
    view = nib.orientations.apply_orientation(arr, ornt)
    new_affine = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, arr.shape[:3])
    return view, new_affine


def from_network_view(array: np.ndarray, affine: np.ndarray, axcodes: str = DEFAULT_AXCODES) -> np.ndarray:
    """The inverse of :func:`to_network_view`: ``array`` in ``axcodes`` order back to the storage order of a
    volume whose (storage) affine is ``affine``. A view, no copy."""
    src, dst = _orientations(affine, axcodes)
    return nib.orientations.apply_orientation(np.asarray(array), nib.orientations.ornt_transform(dst, src))
