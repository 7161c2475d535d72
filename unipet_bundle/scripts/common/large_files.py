"""``large_files.yml``: where the weights come from and their SHA-256, in the model zoo's format.

The bundle root's ``large_files.yml`` records the SHA-256 of the shipped ``models/model.pt``; inference,
evaluation and the demo check the file against it before unpickling anything (``checkpoint_sha256`` in the
configs resolves to :func:`recorded_sha256`). The packaging tool writes the zoo's copy with download URLs.
Reader and writer share this floor module because the configs, the weight loader and the training tools
all read the record, and none of them may import the packaging tools (``scripts.deploy``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from scripts.common.errors import UniPETInputError
from scripts.common.io import atomic_write

__all__ = ["LARGE_FILES", "large_files_yaml", "read_large_files", "recorded_sha256", "write_large_files"]

LARGE_FILES = "large_files.yml"


def large_files_yaml(entries: list[dict[str, str]]) -> str:
    """The zoo's ``large_files.yml`` text: one ``path``/``url``/``hash_val``/``hash_type: sha256`` block per file."""
    lines = ["large_files:"]
    for e in entries:
        lines += [
            f'  - path: "{e["path"]}"',
            f'    url: "{e.get("url", "")}"',
            f'    hash_val: "{e["hash_val"]}"',
            '    hash_type: "sha256"',
        ]
    return "\n".join(lines) + "\n"


def read_large_files(bundle_root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{relative path: entry}`` from ``<bundle_root>/large_files.yml``; ``{}`` when there is no such file.

    Raises:
        UniPETInputError: the file exists but is not the zoo's format.
    """
    path = Path(bundle_root) / LARGE_FILES
    if not path.is_file():
        return {}
    try:
        content = yaml.safe_load(path.read_text())
        entries = content["large_files"]
        return {str(e["path"]): dict(e) for e in entries}
    except (yaml.YAMLError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise UniPETInputError(
            f"{path} is not a model-zoo large_files.yml ({type(exc).__name__}): restore it from the repository"
        ) from None


def write_large_files(bundle_root: str | os.PathLike, hashes: dict[str, str], url: str = "") -> Path:
    """Record ``{relative path: sha256}`` in ``<bundle_root>/large_files.yml`` (other entries are kept)."""
    entries = read_large_files(bundle_root)
    for rel, digest in hashes.items():
        entries[rel] = {"path": rel, "url": url or entries.get(rel, {}).get("url", ""), "hash_val": digest}
    text = large_files_yaml([{k: str(v) for k, v in e.items()} for e in entries.values()])
    return atomic_write(Path(bundle_root) / LARGE_FILES, lambda tmp: tmp.write_text(text))


def recorded_sha256(checkpoint: str | os.PathLike | None, bundle_root: str | os.PathLike) -> str | None:
    """The SHA-256 recorded for ``checkpoint`` when it is one of the bundle's listed files, else None.

    Weights a user trained or downloaded elsewhere are not listed, so they get no check (the loader warns
    and prints their hash); the shipped ``models/model.pt`` always is.
    """
    if not checkpoint:
        return None
    root = Path(bundle_root).expanduser().resolve()
    target = Path(checkpoint).expanduser().resolve()
    for rel, entry in read_large_files(root).items():
        if (root / rel).resolve() == target and str(entry.get("hash_type", "sha256")).lower() == "sha256":
            return str(entry["hash_val"])
    return None
