"""The import direction of the bundle's packages (issue 17): every ``scripts`` module and every run config
may use only the packages below it, so shared pieces live on a floor and no two packages import each other.

The allowed graph is :data:`LAYERS` (the same one ``unipet_bundle/docs/code_map.md`` documents). A module may
import its own package and any package of a lower layer; packages of the same layer may not import each
other. Every import statement counts, also one inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from conftest import BUNDLE_ROOT

#: lowest first; a name is a package under ``scripts/`` or a top-level module ``scripts/<name>.py``
LAYERS: list[tuple[str, ...]] = [
    ("common",),  # errors and the error hook, option parsing, atomic writes, weights I/O, the large_files record
    ("data",),  # NIfTI/DICOM/SUV I/O, layouts, datalists, transforms, simulation
    ("networks",),  # BDN, SAN, modulated convolution, critic
    ("losses",),  # L_align, RALS, regional SUV loss
    ("metrics",),  # image quality, texture, checkpoint selection score
    ("engines",),  # the Ignite trainer, training checkpoints, precision, progress bars, log handlers
    ("evaluation",),  # per-DRF evaluation, regions/lesions, figures
    ("inference",),  # inference.json's pieces: inputs, weights, residual, writers, claims, QC
    ("benchmarks", "deploy", "demo", "denoise"),  # applications: nothing imports them
]

#: which packages each run config may name (``$import scripts.x``, ``scripts.x.f(...)``, ``_target_``)
CONFIG_TOP = {
    "train.json": "engines",
    "multi_gpu_train.json": "engines",
    "evaluate.json": "evaluation",
    "inference.json": "inference",
}

_CONFIG_REF = re.compile(r"(?<![\w./])scripts\.(\w+)")


def _rank(layers: list[tuple[str, ...]]) -> dict[str, int]:
    return {name: i for i, layer in enumerate(layers) for name in layer}


def _module_name(path: Path, scripts_dir: Path) -> str:
    parts = list(path.relative_to(scripts_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute module names one import statement reads (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            return [node.module or ""]
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        return [".".join(base + ([node.module] if node.module else []))]
    return []


def _package(module: str) -> str | None:
    """``scripts.inference.qc`` -> ``inference``; ``scripts.demo`` -> ``demo``; ``scripts`` -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "scripts" else None


def forbidden_imports(scripts_dir: Path, layers: list[tuple[str, ...]] = LAYERS) -> list[str]:
    """``"path:line: a -> b (reason)"`` for every import of a ``scripts`` package that the layers forbid."""
    rank = _rank(layers)
    problems: list[str] = []
    for path in sorted(scripts_dir.rglob("*.py")):
        module = _module_name(path, scripts_dir)
        own = _package(module)
        if own is None:
            continue
        where = path.relative_to(scripts_dir.parent)
        if own not in rank:
            problems.append(f"{where}: package {own!r} has no layer: add it to LAYERS and docs/code_map.md")
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for target in _imported(node, module, path.name == "__init__.py"):
                other = _package(target)
                if other is None or other == own:
                    continue
                if other not in rank:
                    problems.append(f"{where}:{node.lineno}: {module} -> {target} (unknown package {other!r})")
                elif rank[other] > rank[own]:
                    problems.append(
                        f"{where}:{node.lineno}: {module} -> {target} ({own} may not import {other}, a higher layer)"
                    )
                elif rank[other] == rank[own]:
                    problems.append(f"{where}:{node.lineno}: {module} -> {target} ({own} and {other} share a layer)")
    return problems


def config_references(config: Path) -> set[str]:
    """The ``scripts`` packages a config names in any string (imports, expressions, ``_target_``)."""
    found: set[str] = set()

    def walk(obj: object) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(key)
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)
        elif isinstance(obj, str):
            found.update(_CONFIG_REF.findall(obj))

    walk(json.loads(config.read_text()))
    return found


def test_every_scripts_import_goes_down_the_layers():
    problems = forbidden_imports(BUNDLE_ROOT / "scripts")
    assert not problems, "forbidden import directions (see docs/code_map.md):\n" + "\n".join(problems)


def test_every_package_has_a_layer_and_the_code_map_shows_the_same_layers():
    packages = {p.name for p in (BUNDLE_ROOT / "scripts").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in (BUNDLE_ROOT / "scripts").glob("*.py") if p.stem != "__init__"}
    assert packages | modules == set(_rank(LAYERS)), "LAYERS must name every package and top-level module"
    code_map = (BUNDLE_ROOT / "docs" / "code_map.md").read_text()
    block = re.search(r"```text\n(.*?)```", code_map, re.S)
    assert block, "docs/code_map.md must show the layers in a ```text block"
    shown = [tuple(sorted(re.findall(r"\b[a-z_]+\b", line))) for line in block.group(1).strip().splitlines()]
    assert shown == [tuple(sorted(layer)) for layer in reversed(LAYERS)], "docs/code_map.md's layers differ from LAYERS"


@pytest.mark.parametrize("config", sorted(CONFIG_TOP))
def test_run_configs_use_only_packages_up_to_their_layer(config):
    rank = _rank(LAYERS)
    refs = config_references(BUNDLE_ROOT / "configs" / config)
    assert refs, f"{config} names no scripts package: the pattern is wrong"
    above = sorted(p for p in refs if p not in rank or rank[p] > rank[CONFIG_TOP[config]])
    assert not above, f"{config} reaches above {CONFIG_TOP[config]}: {above}"


def _module_map(package: Path) -> set[str] | None:
    """The modules a package's docstring lists (``:mod:`.x``` or ``:mod:`scripts.<package>.x```), or None."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    dotted = ".".join(package.relative_to(BUNDLE_ROOT).parts)
    found = re.findall(r":mod:`(?:\.|" + re.escape(dotted) + r"\.)(\w+)`", doc)
    return set(found) if found else None


def _modules(package: Path) -> set[str]:
    files = {p.stem for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    folders = {p.name for p in package.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    return files | folders


def test_package_module_maps_name_every_module_and_only_existing_ones():
    packages = [p.parent for p in (BUNDLE_ROOT / "scripts").rglob("__init__.py") if p.parent.name != "scripts"]
    checked = 0
    for package in sorted(packages):
        listed = _module_map(package)
        if listed is None:  # a package without a module map in its docstring
            continue
        checked += 1
        actual = _modules(package)
        assert listed == actual, (
            f"{package.relative_to(BUNDLE_ROOT)}/__init__.py's module map: missing "
            f"{sorted(actual - listed)}, not there {sorted(listed - actual)}"
        )
    assert checked >= 4, "the module maps (common, inference, evaluation, deploy...) were not found"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    scripts = tmp_path / "scripts"
    for rel, text in files.items():
        path = scripts / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return scripts


def test_the_checker_finds_upward_sideways_lazy_and_relative_imports(tmp_path):
    scripts = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "common/__init__.py": "",
            "common/errors.py": "def f():\n    from scripts.inference.options import as_bool\n",  # lazy, upward
            "data/__init__.py": "",
            "data/io.py": "from ..common import errors\nfrom . import layout\nimport scripts.common.io\n",  # allowed
            "engines/__init__.py": "",
            "engines/checkpoint.py": "from ..inference import options\n",  # relative, upward
            "inference/__init__.py": "",
            "inference/options.py": "from scripts.engines.checkpoint import x\n",  # downward: allowed
            "deploy/__init__.py": "",
            "deploy/x.py": "import scripts.benchmarks.y\n",  # same layer
            "benchmarks/__init__.py": "",
            "demo.py": "from scripts.nowhere import z\n",  # unknown package
        },
    )
    problems = forbidden_imports(scripts)
    assert len(problems) == 4, problems
    assert any("common/errors.py:2: scripts.common.errors -> scripts.inference.options" in p for p in problems)
    assert any("scripts.engines.checkpoint -> scripts.inference" in p for p in problems)
    assert any("deploy and benchmarks share a layer" in p for p in problems)
    assert any("unknown package 'nowhere'" in p for p in problems)


def test_config_references_find_imports_expressions_and_targets(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            {
                "imports": ["$import scripts.inference.errors"],
                "x": {"_target_": "scripts.deploy.large_files.Foo", "y": "$scripts.common.options.as_bool(@a, 'a')"},
                "path": "$@bundle_root + '/scripts/data/x.py'",
            }
        )
    )
    assert config_references(config) == {"inference", "deploy", "common"}
