"""TorchScript export of the trained UniPET (``models/model.ts``) and its check against the eager network.

MONAI's own exporter does the export (the model zoo's command)::

    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json

It scripts (``torch.jit.script``) the network built from ``network_def`` and embeds ``metadata.json`` and
``inference.json`` in the file. UniPET scripts as written: the modulated convolution and the SAN use only
typed tensor code (``Optional`` styles, ``List`` latents), and ``forward_with_features`` is exported too.

This tool runs that export and then checks what it produced, so a broken ``model.ts`` never ships:

1. the TorchScript model and the eager network (``network_def`` + the checkpoint, loaded the way
   ``inference.json`` loads it) denoise the same random window; the largest absolute difference must be
   below ``tolerance`` (1e-4 in normalised SUV units, i.e. 2e-3 SUV);
2. ``monai.bundle verify_net_in_out`` checks input/output channels and dtype against ``metadata.json``.

CLI (from the bundle root)::

    python -m scripts.deploy.export [--ckpt_file models/model.pt] [--filepath models/model.ts] [--overwrite true]
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch

from scripts.common.errors import CheckpointError, UniPETInputError, exit_bad_input
from scripts.common.io import atomic_write
from scripts.common.options import as_bool

__all__ = ["ExportError", "compare_with_eager", "eager_network", "export_torchscript", "verify_export"]

logger = logging.getLogger(__name__)

CONFIG = Path("configs") / "inference.json"
META = Path("configs") / "metadata.json"


class ExportError(UniPETInputError):
    """The export cannot run (missing checkpoint/config) or its result does not match the eager network."""


def _resolve(root: Path, path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _on_path(root: Path) -> None:
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def export_torchscript(
    bundle_root: str | os.PathLike = ".",
    ckpt_file: str | os.PathLike = "models/model.pt",
    filepath: str | os.PathLike = "models/model.ts",
    config_file: str | os.PathLike = CONFIG,
    meta_file: str | os.PathLike = META,
    overwrite: bool = False,
) -> Path:
    """Run MONAI's ``ckpt_export`` for ``network_def``, writing ``filepath`` atomically.

    Raises:
        ExportError: missing checkpoint/config, or ``filepath`` exists without ``overwrite``.
    """
    from monai.bundle import ckpt_export

    root = Path(bundle_root).expanduser().resolve()
    ckpt, out = _resolve(root, ckpt_file), _resolve(root, filepath)
    config, meta = _resolve(root, config_file), _resolve(root, meta_file)
    for what, p in (("checkpoint", ckpt), ("config", config), ("metadata", meta)):
        if not p.is_file():
            raise ExportError(f"{what} {p} not found: train first (models/model.pt) or pass --ckpt_file/--config_file")
    if out.suffix != ".ts":
        raise ExportError(f"--filepath {out} must end in .ts")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists: pass --overwrite true to replace it")
    _on_path(root)
    # the existence check above already honoured --overwrite
    atomic_write(
        out,
        lambda tmp: ckpt_export(
            net_id="network_def",
            filepath=str(tmp),
            ckpt_file=str(ckpt),
            meta_file=str(meta),
            config_file=str(config),
            bundle_root=str(root),
        ),
    )
    logger.info("exported %s -> %s", ckpt, out)
    return out


def eager_network(
    bundle_root: str | os.PathLike, ckpt_file: str | os.PathLike, config_file: str | os.PathLike = CONFIG
) -> torch.nn.Module:
    """``network_def`` of the config on the CPU, with the checkpoint loaded as ``inference.json`` loads it."""
    from monai.bundle import ConfigParser

    from scripts.inference.model import load_weights

    root = Path(bundle_root).expanduser().resolve()
    _on_path(root)
    parser = ConfigParser()
    parser.read_config(str(_resolve(root, config_file)))
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content("network_def").cpu()
    load_weights(net, _resolve(root, ckpt_file), allow_untrained=False)
    return net.eval()


def compare_with_eager(
    ts_model: torch.jit.ScriptModule | str | os.PathLike,
    eager: torch.nn.Module,
    window: tuple[int, int, int] = (32, 32, 32),
    seed: int = 0,
) -> float:
    """Largest |TorchScript - eager| on one random window (B=1, C=1, *window) in normalised SUV units.

    The window holds uniform values in [0, 1] (SUV 0-20) plus a few hot voxels above 1, as in a scan.
    """
    model = (
        torch.jit.load(str(ts_model), map_location="cpu")
        if not isinstance(ts_model, torch.jit.ScriptModule)
        else ts_model
    )
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.rand((1, 1, *[int(v) for v in window]), generator=gen)
    x.view(-1)[:: max(1, x.numel() // 8)] = 3.0  # a few hot voxels (60 SUV)
    with torch.no_grad():
        diff = (model.eval()(x) - eager.eval()(x)).abs().max().item()
    return float(diff)


def verify_export(
    bundle_root: str | os.PathLike = ".",
    ts_file: str | os.PathLike = "models/model.ts",
    ckpt_file: str | os.PathLike = "models/model.pt",
    config_file: str | os.PathLike = CONFIG,
    meta_file: str | os.PathLike = META,
    window: tuple[int, int, int] = (32, 32, 32),
    tolerance: float = 1e-4,
    check_io: bool = True,
) -> dict[str, Any]:
    """Check ``ts_file`` against the eager network and (``check_io``) ``verify_net_in_out``.

    Returns:
        ``{"max_abs_diff": float, "tolerance": float, "window": [...], "verify_net_in_out": "passed"|"skipped",
        "embedded_configs": [...]}``

    Raises:
        ExportError: difference above ``tolerance``, or the TorchScript file lacks the embedded configs.
    """
    from monai.bundle import verify_net_in_out
    from monai.data import load_net_with_metadata

    root = Path(bundle_root).expanduser().resolve()
    ts = _resolve(root, ts_file)
    if not ts.is_file():
        raise ExportError(f"TorchScript model {ts} not found: export it first")
    try:
        model, meta, extra = load_net_with_metadata(str(ts), map_location="cpu", more_extra_files=("inference.json",))
    except ValueError:  # json.JSONDecodeError: an empty extra file, i.e. none embedded
        meta, extra = {}, {}
    if not meta or "network_data_format" not in meta or not extra.get("inference.json"):
        raise ExportError(
            f"{ts} carries no bundle metadata/inference.json: export it with ckpt_export, not torch.jit.save"
        )
    diff = compare_with_eager(model, eager_network(root, ckpt_file, config_file), window=window)
    report: dict[str, Any] = {
        "max_abs_diff": diff,
        "tolerance": float(tolerance),
        "window": [int(v) for v in window],
        "embedded_configs": sorted(["metadata.json", *extra.keys()]),
        "verify_net_in_out": "skipped",
    }
    if not np.isfinite(diff) or diff >= tolerance:
        raise ExportError(f"TorchScript and eager outputs differ by {diff:.3g} (>= {tolerance:g}): do not ship {ts}")
    if check_io:
        _on_path(root)
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(_resolve(root, meta_file)),
            config_file=str(_resolve(root, config_file)),
            device="cpu",
            bundle_root=str(root),
        )
        report["verify_net_in_out"] = "passed"
    logger.info(
        "TorchScript check: max |ts - eager| = %.3g on a %s window (tolerance %g)",
        diff,
        "x".join(map(str, window)),
        tolerance,
    )
    return report


def main(
    bundle_root: str = ".",
    ckpt_file: str = "models/model.pt",
    filepath: str = "models/model.ts",
    config_file: str = str(CONFIG),
    meta_file: str = str(META),
    tolerance: float = 1e-4,
    overwrite: Any = False,
) -> None:
    """Export models/model.pt to TorchScript (MONAI ckpt_export) and check it against the eager network.

    Prints the largest absolute difference between model.ts and the eager UniPET on a random 32^3 window
    (normalised SUV units; must be < --tolerance) and runs verify_net_in_out. Exit status 2 on bad input
    or a failed check (a .ts that fails the check is removed, so it cannot ship).

    Args:
        bundle_root: the unipet_bundle folder.
        ckpt_file: trained weights (a state_dict), relative to bundle_root.
        filepath: TorchScript output (.ts), relative to bundle_root.
        config_file: config whose network_def is exported (and embedded).
        meta_file: metadata embedded in the .ts (network_data_format is checked).
        tolerance: largest accepted |ts - eager|.
        overwrite: replace an existing --filepath.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_torchscript(
            bundle_root, ckpt_file, filepath, config_file, meta_file, overwrite=as_bool(overwrite, "overwrite")
        )
        try:
            report = verify_export(bundle_root, out, ckpt_file, config_file, meta_file, tolerance=float(tolerance))
        except ExportError:
            out.unlink(missing_ok=True)
            raise
        print(
            f"exported {out}: max |ts - eager| = {report['max_abs_diff']:.3g} (< {tolerance:g}), "
            f"verify_net_in_out {report['verify_net_in_out']}"
        )
    except (UniPETInputError, CheckpointError) as exc:
        exit_bad_input(exc)


if __name__ == "__main__":
    fire.Fire(main)
