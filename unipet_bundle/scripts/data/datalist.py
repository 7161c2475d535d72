"""Build a MONAI (decathlon-style) datalist JSON of low-dose/full-dose pairs from a paired dataset.

The JSON holds metadata plus three lists, ``"training"``, ``"validation"`` and ``"test"``, of entries::

    {"image": "<subject>/drf_20.nii.gz",    # low-dose input, relative to the dataset dir
     "label": "<subject>/full_dose.nii.gz", # full-dose target
     "drf": 20,
     "subject": "<subject>",
     "labels": "<subject>/labels.nii.gz"}   # only when the subject has a label map

Load one list with ``monai.data.load_decathlon_datalist(path, data_list_key="training", base_dir=D)``.
Two MONAI 1.6 behaviours to know: every string value that names an existing path under ``base_dir``
is made absolute, so ``"subject"`` comes back as the subject *folder* path (take ``Path(x).name`` for
the id); and loading an empty ``"test"`` list raises ``IndexError``, so check ``len(json["test"])`` first.

Splitting is by subject, never by DRF: all DRFs of a subject land in the same split, so no subject's
anatomy is seen in training and scored in validation. The split is a seeded shuffle of the subjects
(sorted first, so the result does not depend on file-system order):

- ``n_test = round(test_fraction * n)`` and ``n_val = round(val_fraction * n)``, each at least 1 when its
  fraction is positive; with fewer than 3 subjects there is no test subject and with 1 subject no
  validation subject, and val/test shrink (test first) until at least one subject is left for training.
  A warning is logged whenever a split ends up empty although its fraction was positive.
  So 1 subject -> all training; 2 subjects -> 1 training, 1 validation, no test.
- ``val_subjects`` / ``test_subjects`` fix those splits explicitly (the matching fraction is then
  ignored); the remaining subjects are split by the other fraction.
- ``drfs`` keeps only those DRFs; subjects with none of them are left out (with a warning).

CLI::

    cd unipet_bundle && python -m scripts.data.datalist --dataset_dir D --output D/datalist.json \\
        [--val_fraction 0.2] [--test_fraction 0.1] [--seed 0] [--val_subjects "[a,b]"] \\
        [--test_subjects "[c]"] [--drfs "[4,10,20]"] [--overwrite]

Quote subject ids that look like numbers, or they lose leading zeros: ``--val_subjects '["001","002"]'``.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from scripts.common.errors import UniPETInputError, exit_bad_input
from scripts.common.io import atomic_write_json, check_output_path
from scripts.data.layout import PairedSubject, natural_key, scan_paired_dataset

__all__ = ["make_datalist", "split_subjects", "write_datalist", "main"]

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")
CREATED_BY = "scripts.data.datalist"


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _as_name_list(value: Any, what: str) -> list[str] | None:
    """Normalise a CLI/library subject list: None, a list/tuple, or a string like ``"[a,b]"`` / ``"a,b"``."""
    if value is None:
        return None
    if isinstance(value, (str, int, float)):
        text = str(value).strip().strip("[]()")
        items = [t.strip().strip("'\"") for t in text.split(",")]
        return [t for t in items if t]
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    raise UniPETInputError(f'--{what} must be a list of subject names like "[a,b]", got {value!r}')


def _as_drf_list(value: Any) -> list[float] | None:
    if value is None:
        return None
    items = _as_name_list(value, "drfs") or []
    drfs = []
    for item in items:
        try:
            drf = float(item)
        except ValueError:
            raise UniPETInputError(f"--drfs: '{item}' is not a number; give DRFs like \"[4,10,20]\"") from None
        if drf <= 0:
            raise UniPETInputError(f"--drfs: DRF must be positive, got {item}")
        drfs.append(drf)
    if not drfs:
        raise UniPETInputError('--drfs is empty: give at least one DRF like "[20]" or leave it out to keep all')
    return drfs


def _check_fractions(val_fraction: Any, test_fraction: Any, explicit: bool) -> None:
    for label, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= float(frac) < 1.0:
            raise UniPETInputError(f"--{label} must be a number in [0, 1), got {frac!r}")
    if not explicit and val_fraction + test_fraction >= 1.0:
        raise UniPETInputError(
            f"--val_fraction + --test_fraction = {val_fraction + test_fraction:g} leaves nothing for training: keep the sum below 1"
        )


def split_subjects(
    names: Sequence[str],
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    seed: int = 0,
    val_subjects: Sequence[str] | None = None,
    test_subjects: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Split subject names into training/validation/test (rules in the module docstring).

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each sorted in natural order.

    Raises:
        UniPETInputError: bad fractions, unknown or overlapping explicit subjects, or no training subject left.
    """
    _check_fractions(val_fraction, test_fraction, explicit=val_subjects is not None or test_subjects is not None)
    known = set(names)
    if len(known) != len(names):
        raise UniPETInputError("subject names must be unique")
    explicit: dict[str, list[str]] = {}
    for split, chosen in (("validation", val_subjects), ("test", test_subjects)):
        if chosen is None:
            continue
        unknown = [s for s in chosen if s not in known]
        if unknown:
            raise UniPETInputError(
                f"{split} subject(s) {unknown} not in the dataset: choose from {sorted(known, key=natural_key)}"
            )
        explicit[split] = list(dict.fromkeys(chosen))
    overlap = set(explicit.get("validation", [])) & set(explicit.get("test", []))
    if overlap:
        raise UniPETInputError(
            f"subject(s) {sorted(overlap)} are in both --val_subjects and --test_subjects: pick one split each"
        )

    n = len(names)
    taken = set(explicit.get("validation", [])) | set(explicit.get("test", []))
    pool = sorted((s for s in names if s not in taken), key=natural_key)
    random.Random(seed).shuffle(pool)

    n_test = 0 if "test" in explicit or test_fraction <= 0 or n < 3 else max(1, _round_half_up(test_fraction * n))
    n_val = 0 if "validation" in explicit or val_fraction <= 0 or n < 2 else max(1, _round_half_up(val_fraction * n))
    while len(pool) - n_test - n_val < 1 and (n_test or n_val):
        if n_test:
            n_test -= 1
        else:
            n_val -= 1
    if len(pool) - n_test - n_val < 1:
        raise UniPETInputError(
            f"no subject left for training: {n} subject(s), all given to --val_subjects/--test_subjects; leave at least one out"
        )
    splits = {
        "test": explicit.get("test", pool[:n_test]),
        "validation": explicit.get("validation", pool[n_test : n_test + n_val]),
        "training": pool[n_test + n_val :],
    }
    for split, frac in (("validation", val_fraction), ("test", test_fraction)):
        if frac > 0 and split not in explicit and not splits[split]:
            logger.warning(
                "only %d subject(s): the %s split is empty (at least one subject stays in training); "
                "add subjects for a held-out %s set",
                n,
                split,
                split,
            )
    return {k: sorted(splits[k], key=natural_key) for k in SPLITS}


def _entries(subject: PairedSubject, root: Path, drfs: list[float] | None) -> list[dict[str, Any]]:
    out = []
    for drf, path in subject.drfs.items():
        if drfs is not None and not any(math.isclose(float(drf), d) for d in drfs):
            continue
        entry: dict[str, Any] = {
            "image": path.relative_to(root).as_posix(),
            "label": subject.full_dose.relative_to(root).as_posix(),
            "drf": drf,
            "subject": subject.subject,
        }
        if subject.labels is not None:
            entry["labels"] = subject.labels.relative_to(root).as_posix()
        out.append(entry)
    return out


def make_datalist(
    dataset_dir: str | os.PathLike,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    seed: int = 0,
    val_subjects: Sequence[str] | str | None = None,
    test_subjects: Sequence[str] | str | None = None,
    drfs: Sequence[float] | str | None = None,
    check_geometry: bool = True,
) -> dict[str, Any]:
    """Scan ``dataset_dir`` (see ``scripts.data.layout``) and build the datalist dict.

    Args:
        dataset_dir: paired dataset folder.
        val_fraction: fraction of subjects for validation (ignored if ``val_subjects`` is given).
        test_fraction: fraction of subjects for test (ignored if ``test_subjects`` is given).
        seed: seed of the subject shuffle; same seed and dataset -> same split.
        val_subjects: explicit validation subject names.
        test_subjects: explicit test subject names.
        drfs: keep only these DRFs (default: all found).
        check_geometry: validate shapes/affines from the headers while scanning.

    Returns:
        dict with metadata and the ``"training"``, ``"validation"``, ``"test"`` lists.

    Raises:
        UniPETInputError: invalid dataset or arguments.
    """
    # Check arguments before scanning a possibly large dataset.
    _check_fractions(val_fraction, test_fraction, explicit=val_subjects is not None or test_subjects is not None)
    wanted = _as_drf_list(drfs)
    # Resolve once up front: entry paths are made relative to this root.
    root = Path(dataset_dir).expanduser().resolve()
    subjects = scan_paired_dataset(root, check_geometry=check_geometry)
    entries = {s.subject: _entries(s, root, wanted) for s in subjects}
    if wanted is not None:
        found = {float(e["drf"]) for es in entries.values() for e in es}
        missing = [d for d in wanted if not any(math.isclose(d, f) for f in found)]
        if missing:
            available = sorted({float(k) for s in subjects for k in s.drfs})
            raise UniPETInputError(
                f"--drfs {[_fmt(d) for d in missing]} not found in any subject; available DRFs: {[_fmt(d) for d in available]}"
            )
        dropped = [name for name, es in entries.items() if not es]
        if dropped:
            logger.warning("%d subject(s) have none of the requested DRFs and are left out", len(dropped))
        partial = sum(1 for es in entries.values() if 0 < len(es) < len(wanted))
        if partial:
            logger.warning("%d subject(s) lack some of the requested DRFs; their other DRFs are kept", partial)
        for name in dropped:
            del entries[name]
    names = list(entries)
    _check_requested(val_subjects, test_subjects, names, {s.subject for s in subjects})
    splits = split_subjects(
        names,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        val_subjects=_as_name_list(val_subjects, "val_subjects"),
        test_subjects=_as_name_list(test_subjects, "test_subjects"),
    )
    all_drfs = sorted({e["drf"] for es in entries.values() for e in es}, key=float)
    datalist: dict[str, Any] = {
        "description": "UniPET low-dose (image) -> full-dose (label) SUV pairs, split by subject",
        "dataset_dir": str(root),
        "created_by": CREATED_BY,
        "drfs": all_drfs,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "num_subjects": {k: len(v) for k, v in splits.items()},
        "subjects": splits,
    }
    for split in SPLITS:
        datalist[split] = [e for name in splits[split] for e in entries[name]]
    logger.info(
        "datalist: %s subjects / %s pairs (training/validation/test)",
        "/".join(str(len(splits[k])) for k in SPLITS),
        "/".join(str(len(datalist[k])) for k in SPLITS),
    )
    return datalist


def _fmt(d: float) -> int | float:
    return int(d) if float(d).is_integer() else d


def _check_requested(val_subjects: Any, test_subjects: Any, kept: list[str], scanned: set[str]) -> None:
    """A subject named explicitly but left out by --drfs deserves its own message."""
    for what, value in (("val_subjects", val_subjects), ("test_subjects", test_subjects)):
        for name in _as_name_list(value, what) or []:
            if name in scanned and name not in kept:
                raise UniPETInputError(
                    f"--{what}: subject '{name}' has none of the requested --drfs: remove it or widen --drfs"
                )


def write_datalist(
    dataset_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> Path:
    """Build the datalist (``make_datalist(dataset_dir, **kwargs)``) and write it atomically as JSON.

    Args:
        dataset_dir: paired dataset folder.
        output: JSON path; default ``<dataset_dir>/datalist.json``.
        overwrite: replace an existing output.
        kwargs: passed to ``make_datalist``.

    Returns:
        the path written.

    Raises:
        UniPETInputError: invalid dataset/arguments, or the output exists and ``overwrite`` is False.
    """
    out = Path(output) if output is not None else Path(dataset_dir) / "datalist.json"
    out = check_output_path(out, overwrite=overwrite)
    datalist = make_datalist(dataset_dir, **kwargs)
    atomic_write_json(out, datalist, overwrite=overwrite)
    logger.info("wrote %s", out)
    return out


def main(
    dataset_dir: str,
    output: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    seed: int = 0,
    val_subjects: Any = None,
    test_subjects: Any = None,
    drfs: Any = None,
    overwrite: bool = False,
) -> None:
    """Write a MONAI datalist JSON (training/validation/test, split by subject) for a paired dataset.

    Args:
        dataset_dir: paired dataset folder: <subject>/full_dose.nii.gz and <subject>/drf_<N>.nii.gz.
        output: datalist JSON to write (default <dataset_dir>/datalist.json).
        val_fraction: fraction of subjects for validation, in [0, 1).
        test_fraction: fraction of subjects for test, in [0, 1).
        seed: seed of the subject shuffle (same seed, same split).
        val_subjects: explicit validation subjects, e.g. "[a,b]" (quote numeric ids: '["001"]').
        test_subjects: explicit test subjects, e.g. "[c]".
        drfs: keep only these DRFs, e.g. "[4,10,20]" (default: all).
        overwrite: replace an existing output file.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        write_datalist(
            dataset_dir,
            output=output,
            overwrite=overwrite,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            val_subjects=val_subjects,
            test_subjects=test_subjects,
            drfs=drfs,
        )
    except UniPETInputError as exc:
        exit_bad_input(exc)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
