"""Package the bundle the way the MONAI model zoo publishes it.

Writes into ``output_dir``:

- ``unipet_bundle_v<version>.zip``: the downloadable bundle, one top folder ``unipet_bundle/`` holding
  ``configs/``, ``scripts/``, ``docs/``, ``LICENSE``, ``large_files.yml``, ``requirements.txt`` (the exact
  pins of ``configs/metadata.json``: ``pip install -r unipet_bundle/requirements.txt``) and the weights ``models/model.pt``
  (and ``models/model.ts`` when exported). This is what ``python -m monai.bundle download --url`` fetches
  and unpacks to ``<bundle_dir>/unipet_bundle``;
- ``large_files.yml``: the weights' path, download URL and SHA-256, in the zoo's format
  (``python -m monai.bundle download_large_files`` reads it);
- ``zoo_pr/unipet_bundle/``: the folder to put under ``models/`` in a model-zoo pull request: the same
  files without any weights (the zoo keeps weights out of git; ``large_files.yml`` says where they are).

Left out everywhere: ``__pycache__``, ``*.pyc``, hidden files, run outputs (``eval/``, ``runs/``,
``logs/``) and training checkpoints other than ``model.pt``/``model.ts`` (``checkpoint_latest.pt`` holds
optimiser state; ``model_stage1.pt`` is an intermediate).

The version is ``metadata.json``'s ``version``, which must have a ``changelog`` entry. Outputs are
written to temporary names and renamed; existing outputs are kept unless ``overwrite``.

CLI (from the bundle root)::

    python -m scripts.deploy.package --output_dir ../dist [--weights_url https://host/path/model.pt]
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fire

from scripts.common.errors import UniPETInputError, exit_bad_input
from scripts.common.io import atomic_write
from scripts.common.large_files import large_files_yaml
from scripts.common.options import as_bool
from scripts.common.versioning import read_metadata
from scripts.common.weights import file_sha256

__all__ = [
    "BUNDLE_NAME",
    "PackageError",
    "PackageResult",
    "bundle_files",
    "large_files_yaml",
    "package_bundle",
    "requirements_text",
]

logger = logging.getLogger(__name__)

BUNDLE_NAME = "unipet_bundle"
TOP_LEVEL = ("configs", "scripts", "docs", "LICENSE")
WEIGHTS = ("models/model.pt", "models/model.ts")
_SKIP_DIRS = {"__pycache__", "eval", "runs", "logs", ".pytest_cache", ".ipynb_checkpoints"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".tmp")
# fixed timestamp: the same bundle gives a byte-identical zip
_ZIP_DATE = (2024, 1, 1, 0, 0, 0)


class PackageError(UniPETInputError):
    """The bundle cannot be packaged (missing weights/metadata, bad version, existing outputs)."""


@dataclass(frozen=True)
class PackageResult:
    """What :func:`package_bundle` wrote."""

    zip_path: Path
    large_files: Path
    zoo_pr_dir: Path
    version: str
    weights: dict[str, str]  # bundle-relative path -> sha256


def packaged_version(root: Path) -> str:
    """``version`` of ``configs/metadata.json`` (:func:`scripts.common.versioning.read_metadata`), checked against its ``changelog``.

    Raises:
        PackageError: missing/unreadable metadata, no version, or a version without a changelog entry.
    """
    meta_path = root / "configs" / "metadata.json"
    try:
        meta = read_metadata(root)
    except (OSError, ValueError) as exc:
        raise PackageError(f"{meta_path} cannot be read ({exc}): is {root} the unipet_bundle folder?") from None
    version = str(meta.get("version") or "")
    if not version or any(c in version for c in "/\\ "):
        raise PackageError(f"{meta_path}: 'version' is missing or not a plain version string ({version!r})")
    if version not in (meta.get("changelog") or {}):
        raise PackageError(f"{meta_path}: version {version} has no 'changelog' entry; add one before packaging")
    return version


def requirements_text(root: Path) -> str:
    """``requirements.txt`` for the packaged bundle: the exact pins of ``configs/metadata.json`` (torch, monai,
    numpy and ``required_packages_version``), so the zip installs what the metadata promises and nothing drifts.

    Raises:
        PackageError: unreadable metadata or a missing pin.
    """
    meta_path = root / "configs" / "metadata.json"
    try:
        meta = read_metadata(root)
        pins = {
            "torch": meta["pytorch_version"],
            "monai": meta["monai_version"],
            "numpy": meta["numpy_version"],
            **meta["required_packages_version"],
        }
    except (OSError, ValueError, KeyError) as exc:
        raise PackageError(f"{meta_path}: cannot read the version pins ({exc!r}): fix metadata.json") from None
    lines = [
        f"# UniPET bundle {meta.get('version', '?')}: exact pins from configs/metadata.json (Python 3.11).",
        "# Install: pip install -r requirements.txt   (from the unipet_bundle folder)",
        f"# torch: on a GPU host install the CUDA wheel of torch=={pins['torch']} first (see pytorch.org), then this file.",
    ]
    lines += [f"{name}=={version}" for name, version in pins.items()]
    return "\n".join(lines) + "\n"


def bundle_files(root: Path, weights: bool = True) -> Iterator[tuple[Path, str]]:
    """(file, bundle-relative POSIX path) of everything that ships, sorted; weights only when ``weights``."""
    for top in TOP_LEVEL:
        base = root / top
        if base.is_file():
            yield base, top
            continue
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or any(part.startswith(".") or part in _SKIP_DIRS for part in rel.parts):
                continue
            if path.name.endswith(_SKIP_SUFFIXES):
                continue
            yield path, rel.as_posix()
    if weights:
        for rel in WEIGHTS:
            if (root / rel).is_file():
                yield root / rel, rel


def _write_zip(target: Path, files: list[tuple[Path, str]], extra: dict[str, str], overwrite: bool) -> None:
    def fill(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for src, rel in files:
                info = zipfile.ZipInfo(f"{BUNDLE_NAME}/{rel}", date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with open(src, "rb") as f:
                    zf.writestr(info, f.read())
            for rel, text in extra.items():
                info = zipfile.ZipInfo(f"{BUNDLE_NAME}/{rel}", date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, text)

    atomic_write(target, fill, overwrite=overwrite)


def _write_tree(target: Path, files: list[tuple[Path, str]], extra: dict[str, str], overwrite: bool) -> None:
    """Copy ``files`` under ``target`` (a fresh folder), atomically replacing an old one with ``overwrite``."""
    if target.exists() and not overwrite:
        raise PackageError(f"{target} already exists: pass --overwrite true to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for src, rel in files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        for rel, text in extra.items():
            (tmp / rel).write_text(text)
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def package_bundle(
    bundle_root: str | os.PathLike = ".",
    output_dir: str | os.PathLike = "dist",
    weights_url: str | None = None,
    require_torchscript: bool = False,
    overwrite: bool = False,
) -> PackageResult:
    """Write the zoo zip, ``large_files.yml`` and the weight-free pull-request folder (module docstring).

    Args:
        bundle_root: the ``unipet_bundle`` folder.
        output_dir: where the outputs go (created); must not be inside the bundle.
        weights_url: public URL of ``model.pt`` for ``large_files.yml`` (``model.ts`` gets the same URL with
            its own file name). Default: a ``file://`` URL to the copy in ``output_dir/weights/``, which
            works on this machine only: pass the real URL for a zoo pull request.
        require_torchscript: refuse to package without ``models/model.ts``.
        overwrite: replace existing outputs.

    Raises:
        PackageError: no ``models/model.pt`` (train first), missing ``model.ts`` when required, bad
            metadata version, output inside the bundle, or existing outputs without ``overwrite``.
    """
    root = Path(bundle_root).expanduser().resolve()
    out = Path(output_dir).expanduser().resolve()
    if not (root / "configs" / "inference.json").is_file():
        raise PackageError(f"{root} is not the unipet_bundle folder (no configs/inference.json): pass --bundle_root")
    if out == root or root in out.parents:
        raise PackageError(
            f"--output_dir {out} is inside the bundle: it would package itself; choose a folder outside {root}"
        )
    version = packaged_version(root)
    if not (root / "models" / "model.pt").is_file():
        raise PackageError(
            f"{root / 'models' / 'model.pt'} not found: the zoo zip must carry trained weights (train first)"
        )
    if require_torchscript and not (root / "models" / "model.ts").is_file():
        raise PackageError("models/model.ts not found: export it first (python -m scripts.deploy.export)")

    zip_path = out / f"{BUNDLE_NAME}_v{version}.zip"
    yml_path = out / "large_files.yml"
    pr_dir = out / "zoo_pr" / BUNDLE_NAME
    if not overwrite:
        for p in (zip_path, yml_path, pr_dir):
            if p.exists():
                raise PackageError(f"{p} already exists: pass --overwrite true to replace it")

    weights = {rel: file_sha256(root / rel) for rel in WEIGHTS if (root / rel).is_file()}
    entries = []
    for rel, digest in weights.items():
        name = Path(rel).name
        if weights_url:
            url = weights_url if name == "model.pt" else weights_url.rsplit("/", 1)[0] + "/" + name
        else:
            local = out / "weights" / name
            local.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(local, lambda tmp, src=root / rel: shutil.copyfile(src, tmp), overwrite=True)
            url = local.as_uri()
        entries.append({"path": rel, "url": url, "hash_val": digest})
    yml_text = large_files_yaml(entries)

    shipped = list(bundle_files(root, weights=True))
    code_only = list(bundle_files(root, weights=False))
    extra = {"large_files.yml": yml_text, "requirements.txt": requirements_text(root)}
    _write_zip(zip_path, shipped, extra, overwrite=overwrite)
    atomic_write(yml_path, lambda tmp: tmp.write_text(yml_text), overwrite=overwrite)
    _write_tree(pr_dir, code_only, extra, overwrite=overwrite)
    _check_zip(zip_path, weights)
    logger.info(
        "wrote %s (%d files, weights %s), %s and %s", zip_path, len(shipped) + 1, ", ".join(weights), yml_path, pr_dir
    )
    if not weights_url:
        logger.warning(
            "large_files.yml points at file:// URLs on this machine: pass --weights_url for a zoo pull request"
        )
    return PackageResult(zip_path, yml_path, pr_dir, version, weights)


def _check_zip(zip_path: Path, weights: dict[str, str]) -> None:
    """Re-open the written zip: one top folder, metadata present, weights byte-identical."""
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        bad = [n for n in names if not n.startswith(f"{BUNDLE_NAME}/") or ".." in n.split("/")]
        if bad:
            raise PackageError(f"{zip_path}: entries outside {BUNDLE_NAME}/: {bad[:3]}")
        if f"{BUNDLE_NAME}/configs/metadata.json" not in names:
            raise PackageError(f"{zip_path}: configs/metadata.json missing")
        for rel, digest in weights.items():
            if hashlib.sha256(zf.read(f"{BUNDLE_NAME}/{rel}")).hexdigest() != digest:
                raise PackageError(f"{zip_path}: {rel} differs from the bundle's copy")


def main(
    output_dir: str = "../dist",
    bundle_root: str = ".",
    weights_url: str | None = None,
    require_torchscript: Any = False,
    overwrite: Any = False,
) -> None:
    """Package the bundle for the MONAI model zoo: unipet_bundle_v<version>.zip, large_files.yml, zoo_pr/.

    The zip (top folder unipet_bundle/, weights included) is what
    `python -m monai.bundle download --name unipet_bundle --url <zip URL> --bundle_dir DIR` installs;
    zoo_pr/unipet_bundle/ is the weight-free folder for a model-zoo pull request, with large_files.yml
    naming the weights' URL and SHA-256.

    Args:
        output_dir: output folder (outside the bundle).
        bundle_root: the unipet_bundle folder.
        weights_url: public URL of models/model.pt (model.ts: same folder); default file:// URLs to
            output_dir/weights/ (usable on this machine only).
        require_torchscript: fail when models/model.ts has not been exported.
        overwrite: replace existing outputs.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = package_bundle(
            bundle_root,
            output_dir,
            weights_url,
            require_torchscript=as_bool(require_torchscript, "require_torchscript"),
            overwrite=as_bool(overwrite, "overwrite"),
        )
        print(f"{result.zip_path}\n{result.large_files}\n{result.zoo_pr_dir}")
    except UniPETInputError as exc:
        exit_bad_input(exc)


if __name__ == "__main__":
    fire.Fire(main)
