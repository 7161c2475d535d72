"""The bundle's metadata, pins and layout follow the MONAI model-zoo conventions (checked offline)."""

import configparser
import json
import re

import jsonschema
import pytest

from conftest import BUNDLE_ROOT, REPO_ROOT, SHARED_DIR, run_python

SCHEMA = SHARED_DIR / "schemas" / "meta_schema_20240725.json"


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())


@pytest.fixture(scope="module")
def requirements() -> dict:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt: '{line}' is not an exact pin"
            pins[name.lower()] = version
    return pins


def test_schema_present():
    if not SCHEMA.is_file():
        pytest.fail(f"MONAI metadata schema missing at {SCHEMA}: clone with ../shared beside the repo")


def test_metadata_valid_against_schema(metadata):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(instance=metadata, schema=schema)


def test_monai_verify_metadata_offline(tmp_path):
    # MONAI skips the download when the schema file already exists, so this runs offline.
    proc = run_python(
        "-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", SCHEMA
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


def test_version_in_changelog(metadata):
    assert re.fullmatch(r"\d+\.\d+\.\d+", metadata["version"])
    assert metadata["version"] in metadata["changelog"]


def test_network_io_names(metadata):
    fmt = metadata["network_data_format"]
    assert list(fmt["inputs"]) == ["image"]
    assert list(fmt["outputs"]) == ["pred"]
    for io in (fmt["inputs"]["image"], fmt["outputs"]["pred"]):
        assert io["num_channels"] == 1 and io["dtype"] == "float32"


def test_metadata_pins_match_requirements(metadata, requirements):
    assert requirements["torch"] == metadata["pytorch_version"]
    assert requirements["monai"] == metadata["monai_version"]
    assert requirements["numpy"] == metadata["numpy_version"]
    for name, version in metadata["required_packages_version"].items():
        assert requirements.get(name.lower()) == version, (
            f"{name}: metadata {version}, requirements {requirements.get(name.lower())}"
        )


def test_references_and_use(metadata):
    assert any("UniPET" in r and "2606.11131" in r for r in metadata["references"])
    assert "not for diagnostic use" in metadata["intended_use"]
    assert metadata["data_source"]


def test_installed_versions_match_pins(requirements):
    from importlib.metadata import version

    for name in ("torch", "monai", "pytorch-ignite", "numpy", "nibabel", "pydicom", "fire"):
        assert version(name).split("+")[0] == requirements[name], name


def test_layout_and_licenses():
    for rel in (
        "configs",
        "models",
        "scripts",
        "docs",
        "docs/README.md",
        "docs/data_license.txt",
        "LICENSE",
        "configs/logging.conf",
        "configs/metadata.json",
    ):
        assert (BUNDLE_ROOT / rel).exists(), rel
    for lic in (REPO_ROOT / "LICENSE", BUNDLE_ROOT / "LICENSE"):
        assert "Apache License" in lic.read_text() and "Version 2.0" in lic.read_text()
    assert (REPO_ROOT / "README.md").is_file()


def test_logging_conf_parses():
    cp = configparser.ConfigParser()
    cp.read(BUNDLE_ROOT / "configs" / "logging.conf")
    assert cp.has_section("logger_root")


def test_readme_opens_with_the_two_commands():
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert blocks, "README.md has no command block"
    commands = [ln.strip() for ln in blocks[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert commands == ["make demo", "make test"]
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
