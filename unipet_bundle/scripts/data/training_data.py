"""The (low-dose, full-dose) pair lists that train.json and evaluate.json feed to MONAI datasets, and
the loader that checks every volume as it is read.

Either a datalist JSON written by ``python -m scripts.data.datalist`` (paths relative to the dataset
folder) or, when none is given, the same split computed on the fly from the paired layout, so that
``monai.bundle run --config_file configs/train.json --dataset_dir D`` works on a bare dataset folder.

Bad data stop the run with one line naming the file or pair (``UniPETInputError``): before any volume is
read, every pair's headers are checked (3D, same shape and affine, a positive DRF), also when a datalist
file is given; while loading, :class:`CheckedLoadImaged` names a file that cannot be read (truncated
``.nii.gz``) and applies :func:`scripts.data.volume_checks.check_pet_volume` (NaN/Inf and all-zero volumes
refused, negative voxels kept).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import LoadImaged, MapTransform

from scripts.common.errors import UniPETInputError
from scripts.common.options import finite_number
from scripts.data.datalist import make_datalist
from scripts.data.layout import check_3d, check_same_grid, parse_drf, read_grid
from scripts.data.volume_checks import check_pet_volume

__all__ = [
    "CheckedLoadImaged",
    "paired_datalist",
    "PatchSamplingWeightsd",
    "hotspot_mask",
    "dose_balanced_sampler",
    "StageDoseSampler",
    "with_identity_pairs",
    "IDENTITY_DRF",
]

logger = logging.getLogger(__name__)

_SPLITS = ("training", "validation", "test")
IDENTITY_DRF = 1.0  # an identity pair: the full dose as its own low-dose input, the "dose" it was acquired at


def paired_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "training",
    datalist_file: str | os.PathLike | None = None,
    drfs: list[float] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    max_items: int | None = None,
) -> list[dict[str, Any]]:
    """Entries ``{"image": low-dose path, "label": full-dose path, "drf", "subject"[, "labels"]}``.

    Args:
        dataset_dir: the paired dataset folder (``<subject>/full_dose.nii.gz``, ``<subject>/drf_<N>.nii.gz``).
        split: ``training``, ``validation`` or ``test``.
        datalist_file: a datalist JSON; empty/None splits ``dataset_dir`` by subject with ``seed``.
        drfs: keep only these DRFs (None: all).
        val_fraction, test_fraction, seed: the by-subject split when no datalist file is given.
        max_items: keep at most this many entries (spread over the list), e.g. to bound validation time.

    Returns:
        entries with absolute paths, ready for :class:`CheckedLoadImaged` (or ``LoadImaged``).

    Raises:
        UniPETInputError: unknown split, missing/invalid datalist, a missing file, and (from a datalist
            file) a DRF that is not a positive number or a pair whose headers differ in shape/affine or are not 3D.
    """
    if split not in _SPLITS:
        raise UniPETInputError(f"unknown split '{split}': use one of {_SPLITS}")
    root = Path(dataset_dir).expanduser().resolve()
    if datalist_file:
        path = Path(datalist_file).expanduser()
        if not path.is_file():
            raise UniPETInputError(
                f"datalist {path} not found: write one with `python -m scripts.data.datalist` or leave datalist_file empty"
            )
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError (a binary file)
            raise UniPETInputError(
                f"datalist {path} is not valid JSON ({type(exc).__name__}); re-create it with `python -m scripts.data.datalist`"
            ) from None
        # read by hand: MONAI's loader fails on an empty split and rewrites any value naming an existing path
        listed = content.get(split, []) if isinstance(content, dict) else None
        if not isinstance(listed, list) or not all(isinstance(e, dict) for e in listed):
            raise UniPETInputError(
                f'datalist {path}: \'{split}\' is not a list of entries like {{"image": ..., "label": ..., "drf": ...}}; '
                "re-create it with `python -m scripts.data.datalist`"
            )
        entries = [dict(e) for e in listed]
    else:
        entries = make_datalist(root, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)[split]
    for e in entries:
        for key in ("image", "label", "labels"):
            if key in e and not Path(e[key]).is_absolute():
                e[key] = str(root / e[key])
        _check_entry(e, split, checked_by_layout=not datalist_file)
    if drfs:
        wanted = [float(d) for d in drfs]
        entries = [e for e in entries if any(abs(float(e["drf"]) - w) < 1e-6 for w in wanted)]
    if max_items is not None and 0 < max_items < len(entries):
        step = len(entries) / max_items
        entries = [entries[int(i * step)] for i in range(max_items)]
    logger.info("%s: %d pairs from %s", split, len(entries), root)
    return entries


def _identity_fraction(value: Any) -> float:
    share = finite_number(value, "identity_fraction")
    if share >= 1.0:
        raise ValueError(f"identity_fraction must be below 1 (a share of the training draws), got {value}")
    return share


def _is_identity(entry: Mapping[str, Any]) -> bool:
    return "image" in entry and str(entry["image"]) == str(entry.get("label"))


def with_identity_pairs(datalist: list[dict[str, Any]], identity_fraction: float = 0.0) -> list[dict[str, Any]]:
    """``datalist`` plus, when ``identity_fraction`` > 0, one identity pair per full-dose volume: that volume as its
    own low-dose input (``drf`` :data:`IDENTITY_DRF`), whose right answer is to leave it as it is.

    Why: trained on DRF 4-100 only, the network has never seen an input as clean as its target and smooths every
    input, clean ones too; on a reconstruction whose DRF-4 images are nearly as clean as the full dose (the unseen
    test family) that costs more than it removes. The share of the draws these pairs get is set by
    :func:`dose_balanced_sampler` (same ``identity_fraction``), whatever the number of subjects.

    Returns a new list (the entries given are not modified); the list given when the fraction is 0.
    """
    share = _identity_fraction(identity_fraction)
    if share == 0.0 or not datalist:
        return datalist
    have = {str(e["label"]) for e in datalist if _is_identity(e)}  # a list that has them gets no second set
    identity: dict[str, dict[str, Any]] = {}
    for e in datalist:
        if str(e["label"]) not in have and str(e["label"]) not in identity:
            identity[str(e["label"])] = {**e, "image": e["label"], "drf": IDENTITY_DRF}
    logger.info(
        "training: %d identity pairs (full dose as its own input), %.0f %% of the draws", len(identity), 100 * share
    )
    return [*datalist, *identity.values()]


def _check_entry(entry: Mapping[str, Any], split: str, checked_by_layout: bool) -> None:
    """Files exist; from a datalist file also: a positive DRF and one grid for the pair (headers only)."""
    where = f"{split} entry {entry.get('subject', '?')} DRF {entry.get('drf')}"
    for key in ("image", "label"):
        if key not in entry:
            raise UniPETInputError(
                f"{where}: no '{key}' path; re-create the datalist with `python -m scripts.data.datalist`"
            )
        if not Path(entry[key]).is_file():
            raise UniPETInputError(f"{where}: {entry[key]} not found; re-create the datalist")
    if checked_by_layout:  # scan_paired_dataset has checked names and grids already
        return
    try:
        parse_drf(str(entry.get("drf")))
    except UniPETInputError:
        raise UniPETInputError(
            f"{where}: the DRF {entry.get('drf')!r} is not a positive number; re-create the datalist with `python -m scripts.data.datalist`"
        ) from None
    try:
        check_same_grid(entry["label"], entry["image"], ref_grid=_checked_grid(entry["label"]))
    except UniPETInputError as exc:
        raise UniPETInputError(f"{where}: {exc}") from None


def _checked_grid(path: str | os.PathLike) -> tuple[tuple[int, ...], Any]:
    grid = read_grid(path)
    check_3d(path, grid[0])
    return grid


class CheckedLoadImaged(LoadImaged):
    """``LoadImaged`` that names the file it cannot read and refuses volumes unfit for training.

    Same arguments and output as :class:`monai.transforms.LoadImaged`. Each loaded array, (X, Y, Z)
    before channel handling, goes through :func:`scripts.data.volume_checks.check_pet_volume`; with
    several keys (``image`` and ``label``) their shapes must agree.

    Raises:
        UniPETInputError: unreadable or truncated file, not 3D, NaN/Inf voxels, all zero, or a pair
            whose volumes differ in shape (each message names the file(s)).
    """

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        d = dict(data)
        shapes: dict[str, tuple[int, ...]] = {}
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            path = str(d[key])
            try:
                loaded = self._loader(d[key], reader)
            except Exception as exc:  # nibabel/zlib/MONAI raise many types for truncated or foreign files
                first = " ".join(str(exc).split())[:200] or type(exc).__name__
                raise UniPETInputError(
                    f"{path}: cannot read as an image ({type(exc).__name__}: {first}); is the file complete? "
                    "replace it or remove the pair from the dataset"
                ) from None
            image = loaded[0] if isinstance(loaded, (tuple, list)) else loaded
            check_pet_volume(path, np.asarray(image))
            shapes[path] = tuple(image.shape)
            if isinstance(loaded, (tuple, list)):
                d[key] = loaded[0]
                d[meta_key or f"{key}_{meta_key_postfix}"] = loaded[1]
            else:
                d[key] = loaded
        if len(set(shapes.values())) > 1:
            listing = " vs ".join(f"{p} {list(shape)}" for p, shape in shapes.items())
            raise UniPETInputError(f"the pair differs in shape ({listing}): resample it onto one grid")
        return d


# --- where training patches are centred (issue 15) ----------------------------------------------------


def hotspot_mask(
    full_suv: np.ndarray,
    max_size_voxels: int = 7,
    min_excess_suv: float = 1.0,
    min_contrast: float = 1.5,
    smooth_sigma_voxels: float = 1.0,
) -> np.ndarray:
    """Voxels of small hot structures in a full-dose SUV volume, found without labels.

    A white top-hat on the lightly smoothed volume (Gaussian, ``smooth_sigma_voxels``, so single-voxel
    noise does not count): the grey opening (minimum then maximum filter over a ``max_size_voxels``
    cube) removes every bright structure narrower than the cube and keeps larger ones (liver, bladder
    interior), so ``excess = suv - opening`` is what small structures add over their surroundings. A
    voxel is hot when the excess is at least ``min_excess_suv`` SUV *and* ``suv >= min_contrast *
    opening`` (a noise bump in a hot organ has excess but little contrast).

    Shapes: ``(X, Y, Z)`` SUV -> bool of the same shape.
    """
    from scipy.ndimage import gaussian_filter, maximum_filter, minimum_filter

    x = np.asarray(full_suv, dtype=np.float32)
    size = int(max_size_voxels)
    if size < 3:
        raise ValueError(f"hotspot max_size_voxels must be >= 3, got {size}")
    if smooth_sigma_voxels > 0:
        x = gaussian_filter(x, float(smooth_sigma_voxels), mode="nearest")
    opening = maximum_filter(minimum_filter(x, size=size, mode="nearest"), size=size, mode="nearest")
    excess = x - opening
    return (excess >= float(min_excess_suv)) & (x >= float(min_contrast) * np.maximum(opening, 1e-6))


class PatchSamplingWeightsd(MapTransform):
    """Writes the patch-centre weight map for ``RandWeightedCropd`` from the full-dose image.

    MONAI's ``RandCropByPosNegLabeld`` counts every non-zero label voxel as foreground; a simulated or
    reconstructed full dose is positive almost everywhere, so in 0.2.0 only ~16 % of patch centres were in
    tissue. Here the centres are drawn from:

    * tissue: full dose above ``tissue_threshold_suv`` (share ``1 - hotspot_fraction``, uniform over tissue);
    * hot spots (:func:`hotspot_mask`, no labels needed): share ``hotspot_fraction`` (0 turns it off),
      split equally between the connected hot structures (then uniform over each one's voxels), so a
      4-voxel lesion is a centre as often as the kidneys, far more often than its volume would give.

    A volume with no tissue above the threshold gets uniform weights and a warning (never silently).

    Args:
        keys: the full-dose key (``label``), in network units (SUV / ``suv_max``), shape (1, X, Y, Z).
        weight_key: where the weight map goes (same shape); delete it after cropping.
        suv_max: the intensity normalisation (SUV per network unit).
        tissue_threshold_suv: SUV above which a voxel is tissue (0.5: above air and lung noise).
        hotspot_fraction: share of patch centres on hot spots, in [0, 1).
        hotspot_max_size_voxels, hotspot_min_excess_suv, hotspot_min_contrast: see :func:`hotspot_mask`.
    """

    def __init__(
        self,
        keys: Any = "label",
        weight_key: str = "crop_weight",
        suv_max: float = 20.0,
        tissue_threshold_suv: float = 0.5,
        hotspot_fraction: float = 0.0,
        hotspot_max_size_voxels: int = 7,
        hotspot_min_excess_suv: float = 1.0,
        hotspot_min_contrast: float = 1.5,
    ) -> None:
        super().__init__(keys)
        if not 0.0 <= float(hotspot_fraction) < 1.0:
            raise ValueError(f"hotspot_fraction must be in [0, 1), got {hotspot_fraction}")
        if float(suv_max) <= 0:
            raise ValueError(f"suv_max must be > 0, got {suv_max}")
        self.weight_key = weight_key
        self.suv_max = float(suv_max)
        self.tissue_threshold_suv = float(tissue_threshold_suv)
        self.hotspot_fraction = float(hotspot_fraction)
        self.hotspot_kw = dict(
            max_size_voxels=int(hotspot_max_size_voxels),
            min_excess_suv=float(hotspot_min_excess_suv),
            min_contrast=float(hotspot_min_contrast),
        )

    def weights(self, full: np.ndarray) -> np.ndarray:
        """Weight map (float32, same shape) for a full dose in network units."""
        suv = np.asarray(full, dtype=np.float32) * self.suv_max
        tissue = suv > self.tissue_threshold_suv
        n_tissue = int(tissue.sum())
        if n_tissue == 0:
            logger.warning(
                "no voxel above %.2f SUV in a full-dose volume: patch centres drawn uniformly",
                self.tissue_threshold_suv,
            )
            return np.ones_like(suv)
        w = tissue.astype(np.float32) / n_tissue
        if self.hotspot_fraction > 0:
            spatial = suv[0] if suv.ndim == 4 else suv
            from scipy.ndimage import label as connected_components

            components, n = connected_components(hotspot_mask(spatial, **self.hotspot_kw))
            if n > 0:
                sizes = np.bincount(components.ravel(), minlength=n + 1).astype(np.float64)
                per_voxel = np.zeros(n + 1)
                per_voxel[1:] = 1.0 / (n * sizes[1:])  # every structure gets 1/n of the hot share
                hot = per_voxel[components].astype(np.float32).reshape(suv.shape)
                w = (1.0 - self.hotspot_fraction) * w + self.hotspot_fraction * hot
        return w.astype(np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            full = d[key]
            array = full.detach().cpu().numpy() if hasattr(full, "detach") else np.asarray(full)
            d[self.weight_key] = self.weights(array)
        return d


def dose_balanced_sampler(
    datalist: list[dict[str, Any]],
    dose_balance: float = 0.0,
    seed: int = 0,
    stage2_dose_balance: float | None = None,
    stage_clock: Any = None,
    distributed: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
    identity_fraction: float = 0.0,
) -> Any:
    """A sampler that draws each (low-dose, full-dose) pair with probability ``~ DRF ** -dose_balance``.

    The L1 loss of a pair grows with its noise, ~sqrt(DRF), so with uniform sampling the highest DRFs
    dominate the gradient; ``dose_balance=0.5`` makes every DRF's expected share of the L1 loss equal,
    ``0`` is uniform sampling. Sampling is with replacement, ``len(datalist)`` draws per pass, seeded.

    ``stage2_dose_balance`` (None: the same as ``dose_balance``) sets stage 2's value on its own; the shipped
    recipe is 0 in stage 1 and 0.5 in stage 2. When the two differ the sampler asks ``stage_clock`` (the
    trainer's :class:`scripts.engines.gan_trainer.StageClock`) which stage the coming iteration is in whenever
    the DataLoader starts a pass over the data; :class:`scripts.engines.gan_trainer.UniPETTrainer` syncs the clock
    when an epoch starts (so a resumed run is right from its first batch) and starts a new pass right after the
    last stage-1 iteration, so stage 2 is drawn by its own sampler from its first iteration.

    ``identity_fraction``: the identity pairs of the datalist (:func:`with_identity_pairs`: image and label the same
    file) together get this share of the draws in both stages, spread evenly over them; the other pairs share the
    rest as above. With it, stage 1 draws with replacement even when ``dose_balance`` is 0. Distributed, each rank
    weighs its own share of the datalist (MONAI's ``DistributedWeightedRandomSampler``), so the share holds over all
    ranks together, not exactly on each.

    ``distributed`` (``multi_gpu_train.json``): each rank draws from its own share of the datalist, with MONAI's
    ``DistributedSampler`` (uniform) or ``DistributedWeightedRandomSampler`` (``num_replicas``, ``rank``: from the
    process group unless given).

    Returns:
        None when both stages sample uniformly and no identity pairs are weighted (the DataLoader then shuffles, as
        before 0.5.3); a
        ``torch.utils.data.WeightedRandomSampler`` when both stages share one nonzero value; otherwise a
        :class:`StageDoseSampler`. Distributed: ``DistributedSampler`` / ``DistributedWeightedRandomSampler``
        in those two cases (MONAI's workflow sets their epoch), else a :class:`StageDoseSampler` of them.
    """
    import torch

    alpha1 = finite_number(dose_balance, "dose_balance")
    alpha2 = alpha1 if stage2_dose_balance is None else finite_number(stage2_dose_balance, "stage2_dose_balance")
    if datalist:
        # --dose_balance alone no longer sets stage 2 (0.5.3): say what each stage draws
        logger.info(
            "training pairs drawn ~ DRF^-%g in stage 1 and ~ DRF^-%g in stage 2 (dose_balance, stage2_dose_balance; "
            "0 = uniform)",
            alpha1,
            alpha2,
        )
    share = _identity_fraction(identity_fraction)
    identity = np.array([_is_identity(e) for e in datalist], dtype=bool)
    weighted_identity = share > 0.0 and identity.any() and not identity.all()
    if share > 0.0 and not weighted_identity and datalist:
        logger.warning(
            "identity_fraction %g but the training datalist has %s: nothing drawn as identity pairs (the datalist "
            "goes through scripts.data.training_data.with_identity_pairs with the same fraction in train.json)",
            share,
            "only identity pairs" if identity.all() else "no identity pairs",
        )
    if not datalist or (alpha1 == alpha2 == 0.0 and not distributed and not weighted_identity):
        return None
    drfs = np.array([float(e["drf"]) for e in datalist], dtype=np.float64)

    def weights(alpha: float) -> list[float]:
        w = drfs**-alpha
        if weighted_identity:
            w[identity] = share / (1.0 - share) * w[~identity].sum() / identity.sum()
        return w.tolist()

    def sampler(alpha: float) -> Any:
        uniform = alpha == 0.0 and not weighted_identity
        if distributed:
            from monai.data import DistributedSampler, DistributedWeightedRandomSampler

            ranks = {"even_divisible": True, "num_replicas": num_replicas, "rank": rank}
            if uniform:
                return DistributedSampler(range(len(datalist)), shuffle=True, **ranks)
            generator = torch.Generator().manual_seed(int(seed))
            return DistributedWeightedRandomSampler(range(len(datalist)), weights(alpha), generator=generator, **ranks)
        if uniform:
            # what DataLoader(shuffle=True) builds: the same draws as a uniform run without this sampler
            return torch.utils.data.RandomSampler(range(len(datalist)))
        generator = torch.Generator().manual_seed(int(seed))
        return torch.utils.data.WeightedRandomSampler(
            weights(alpha), num_samples=len(datalist), replacement=True, generator=generator
        )

    if alpha1 == alpha2:
        return sampler(alpha1)
    if stage_clock is None:
        raise ValueError("stage2_dose_balance differs from dose_balance: the sampler needs the trainer's stage_clock")
    return StageDoseSampler(sampler(alpha1), sampler(alpha2), stage_clock)


class StageDoseSampler:
    """Draws each pass over the data from the sampler of the stage the pass starts in (see
    :func:`dose_balanced_sampler`).

    Args:
        stage1, stage2: samplers over the same datalist (same length).
        stage_clock: an object with ``iteration`` (the last iteration run) and ``stage_of(iteration)``.
    """

    def __init__(self, stage1: Any, stage2: Any, stage_clock: Any) -> None:
        self.stage1, self.stage2, self.stage_clock = stage1, stage2, stage_clock

    def __len__(self) -> int:
        return len(self.stage1)

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to distributed parts (their shuffle follows it); the trainer calls this."""
        for part in (self.stage1, self.stage2):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __iter__(self) -> Any:
        # read when the DataLoader starts a pass: the trainer keeps the clock at the last iteration run, syncs it
        # when an epoch starts (right after a resume too) and starts a new pass at the stage boundary
        coming = self.stage_clock.stage_of(self.stage_clock.iteration + 1)
        yield from self.stage2 if coming == 2 else self.stage1
