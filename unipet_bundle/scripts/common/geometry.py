"""Voxel geometry read from a 4x4 affine (NIfTI / MONAI ``MetaTensor`` convention: array index -> mm).

One implementation for every tool (the inference inputs, writer and QC report, evaluation, figures, the
demo, the simulation, the dataset layout checks), so a voxel size is computed the same way everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["voxel_spacing"]


def voxel_spacing(affine: Any) -> np.ndarray:
    """Voxel size in mm along each array axis: the norms of the affine's first three columns.

    Args:
        affine: a 4x4 (or at least 3x3) affine, as a numpy array, a nested list or a CPU tensor.

    Returns:
        float64 array of shape (3,), in mm; exact for rotated or flipped axes (the column norm does not
        depend on the direction), the same as the diagonal for an axis-aligned affine.
    """
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
