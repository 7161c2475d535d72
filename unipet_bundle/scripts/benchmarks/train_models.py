"""Reproduce the shipped weights and every model of the quality comparison, with the bundle's own configs.

    cd unipet_bundle && python -m scripts.benchmarks.train_models all --work_dir ../../unipet_data

Each step is one documented command (printed before it runs), so the sequence can also be run by hand;
every training step is a ``python -m monai.bundle run --config_file configs/train.json`` with overrides and
resumes from its own ``checkpoint_latest.pt`` when re-run after an interruption:

1. ``data``: the SIMULATED datasets. ``sim/``: 36 procedural phantoms (seed 6) under the domain-randomised
   profile (``configs/simulation/randomised.json``: every subject its own count level, OSEM schedule, PSF
   modelling, post-filters, voxel size, scatter and randoms) and one subject simulated from the real
   whole-body series of ``../shared/data/real_pet`` (converted to SUV, resampled to 4 mm, used as the
   activity map, randomised physics), all at DRFs 4, 10, 20, 30, 50, 100; a datalist holds the split by
   subject: the last 4 phantoms + the real-series subject test, the 4 before them validate, the rest train.
   Training and validation use DRFs 4, 10, 20, 50, 100 only; DRF 30 is the unseen DRF of the test.
   ``sim_unseen/``: the held-out unseen-reconstruction family (``unseen_recon`` profile, seed 1313, DRFs
   4, 7, 20, 30, 100, 150; never trained on): 6 phantoms, the first 2 tune the Gaussian baseline, the other
   4 are its test subjects (``family.json`` says which). ``--profile fixed`` gives the 0.2.0 data.
2. ``with_align``: both stages of ``configs/train.json`` with L_align at 0.2 (0.4.0's UniPET recipe; stage 1:
   2000 iterations, stage 2: 1000), which also keeps the state at the end of stage 1
   (``checkpoint_iter002000.pt``): the branch point of every model below.
3. Branches from that state, each into its own folder (same stage 1, same data, same LR schedule):
   ``unipet`` (**the shipped model since 0.5.0**: stage 2 without L_align, validated every epoch),
   ``vanilla`` (1000 more stage-1 iterations on all DRFs: the vanilla universal model, compute-matched to
   UniPET), ``drf_specific`` (300 more stage-1 iterations on one DRF each), ``san_only`` (stage 2 with the SAN
   and L_align, no adversarial RALS term) and ``rals_only`` (stage 2 with the SAN frozen and no alignment loss).
   Issue 15 adds ``reference_weights`` (0.2.0's 0.001 loss weights) and ``psnr_selection`` (best by PSNR).
   ``full_run NAME``: a whole run with other settings, same compute: ``unet`` (MONAI ``UNet``, no
   normalisation, residual, L1: ``scripts.networks.plain_unet.ResidualUNet``), ``no_hotspot``
   (``hotspot_fraction`` 0), ``no_regional`` (``regional_weight`` 0), ``dose_balanced`` (``dose_balance`` 0.5).
4. ``ship``: copies UniPET's ``model.pt`` into ``models/`` and records its SHA-256 in ``large_files.yml``.

The steps that reproduce 0.4.0 runs (``with_align``, ``san_only``) pin ``--align_weight 0.2``, so the changed
default (0.5.0: ``align_weight`` 0.2 -> 0) does not change what they reproduce; ``psnr_selection`` and the
full runs (``no_hotspot``, ``no_regional``, ``dose_balanced``) use the 0.5.0 defaults: they are ablations of the
0.5.0 recipe (stage 2 without L_align). Every run here keeps the pre-0.5.3 sampling of stage 2 (its own
``--dose_balance``) and, except ``LOCKED_SELECTION_RUNS``, the unlocked validation (``UNLOCKED_SELECTION``), so each
reproduces what it gave. 0.5.2-0.5.3 lesion-safety trials: ``regional_x5``, ``regional_focus``,
``dose_balanced_s2`` (shipped since 0.5.2), ``focus_balanced``, ``focus_low_drf``; 0.5.4: ``focus_noise``,
``focus_noise_sq``, ``focus_noise_half``, ``focus_noise_light`` (the focus weighted by each patch's visible noise,
``regional_noise_exponent`` 1 / 2 / 2 at ``regional_weight`` 0.5 / 2 at 0.3). ``branch unipet`` validates every epoch, the other runs every 2
epochs, so its best checkpoint is picked from twice as many candidates. 0.5.5: ``film`` and ``film_focus``, the
"label given" upper bound (``CONDITIONED_BRANCHES``: UniPET's styles from the DRF label, FiLM, instead of the SAN;
the shipped recipe, and ``focus_low_drf``'s), which start from the same stage-1 weights (``--bdn_ckpt``) and
train stage 2 alone; not shippable (inference needs the DRF), scored by ``scripts.benchmarks.quality``; and, the same
way, ``noise_styles`` / ``noise_styles_fast`` (label-free: styles from two statistics of each window, the second at
4x the style learning rate). 0.5.6: ``thinning_blend`` (DRF given): ``dose_balanced_s2`` with its output keeping
1/DRF of its input (``ThinningBlendUniPET``, UniPET's own parameters), so it resumes the snapshot like the others.

0.5.12: ``finetune NAME`` (``FINETUNE_RUNS``): short trials that continue the shipped ``models/model.pt`` with a fresh
critic for 400 stage-2 iterations (``--bdn_ckpt``; the first 100 train the critic alone, so 300 generator steps), the
shipped stage-2 recipe otherwise (selected on the locked validation, as a new run is):
``control`` (nothing else) and ``identity`` (``--identity_fraction 0.15``: identity pairs, the full dose as its own
input). Minutes each; compare them with ``quality --score_on validation`` (validation subjects only). The full
branch of the second is ``branch identity_pairs`` (``dose_balanced_s2`` with ``--identity_fraction 0.15``).

Steps 3's branches are independent: on a 2-core CPU, run two of them at once with ``--threads 1``.
The Gaussian-filter baseline needs no training (``scripts.benchmarks.quality`` tunes it).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from scripts.common.cli import run_command
from scripts.common.errors import UniPETInputError
from scripts.common.io import atomic_write, check_output_path
from scripts.common.large_files import LARGE_FILES, write_large_files
from scripts.common.weights import file_sha256

logger = logging.getLogger("unipet.train_models")

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
REAL_SERIES = BUNDLE_ROOT.parent.parent / "shared" / "data" / "real_pet" / "tcia_sts001_fdg_wb" / "FDG_PET" / "image"
ALL_DRFS = (4, 10, 20, 30, 50, 100)
TRAIN_DRFS = (4, 10, 20, 50, 100)
N_PHANTOMS, PHANTOM_SEED, N_VAL, N_TEST = 36, 6, 4, 4
UNSEEN_PROFILE, N_UNSEEN, N_UNSEEN_VAL, UNSEEN_SEED = "unseen_recon", 6, 2, 1313
VAL_SUBJECTS = [f"phantom_{i:03d}" for i in range(28, 32)]  # with the defaults (36 phantoms)
TEST_SUBJECTS = [f"phantom_{i:03d}" for i in range(32, 36)] + ["real_sts001"]
STAGE1_EPOCHS, EPOCHS, DRF_SPECIFIC_EPOCHS = 20, 30, 3
SNAPSHOT = "checkpoint_iter002000.pt"  # the end of stage 1 of the default config (20 epochs x 100)
SNAPSHOT_RUN = "with_align"  # the full run whose stage 1 every branch starts from
# 0.4.0's stage 2 (L_align at 0.2; the default was 0.2 until 0.5.0): it costs 1.6 dB of validation PSNR
ALIGN_0_4 = ["--align_weight", "0.2"]

# Two 0.5.3 defaults change what a run does: training's validation scores the level-locked prediction (what
# inference writes), and stage 2 samples dose-balanced (stage2_dose_balance 0.5, the shipped recipe). The runs
# below that predate them selected their best checkpoint on the unlocked network and drew stage 2 as stage 1;
# they keep doing so, so that each reproduces the weights and quality rows it gave (the shipped 0.5.2 weights
# among them). Runs named in LOCKED_SELECTION_RUNS select on the locked validation (the default).
UNLOCKED_SELECTION = ["--level_lock_fwhm_mm", "0", "--track_meta", "False"]  # the pre-0.5.3 validation config
LOCKED_SELECTION_RUNS = {
    "focus_low_drf",
    "focus_noise",
    "focus_noise_sq",
    "focus_noise_half",
    "focus_noise_light",
    "film",
    "film_focus",
    "noise_styles",
    "noise_styles_fast",
    "thinning_blend",
    "identity_pairs",
}


def _pre_0_5_3(extra: list[str]) -> list[str]:
    """Stage 2 sampled with the run's own ``--dose_balance`` (0 when it sets none), as before 0.5.3."""
    balance = extra[extra.index("--dose_balance") + 1] if "--dose_balance" in extra else "0"
    return ["--stage2_dose_balance", balance]


# the stage-2 overrides the lesion-safety trials build on: 0.5.0's UniPET (stage 2 without L_align, validated every
# epoch), its dose-balanced variant (shipped since 0.5.2) and the hot-spot-focused regional loss (0.5.2 trial)
UNIPET_S2 = ["--align_weight", "0", "--val_interval", "1"]
DOSE_BALANCED_S2 = [*UNIPET_S2, "--dose_balance", "0.5"]
REGIONAL_FOCUS = ["--regional_weight", "1.0", "--regional_max_focus", "4"]

# name -> overrides of configs/train.json for the branches from the end of stage 1
BRANCHES: dict[str, list[str]] = {
    # the shipped UniPET (0.5.0): stage 2 without L_align; validated every epoch (the other runs: every 2)
    "unipet": [*UNIPET_S2],
    "vanilla": ["--stage1_epochs", str(EPOCHS)],
    "san_only": ["--adv_weight", "0", *ALIGN_0_4],
    "rals_only": ["--train_san", "false", "--align_weight", "0"],
    # issue 15 ablations of stage-2-only settings (same stage 1)
    "reference_weights": ["--align_weight", "0.001", "--adv_weight", "0.001"],  # 0.2.0's loss weights
    "psnr_selection": ["--selection_metric", "val_psnr"],  # best checkpoint by PSNR alone
    # 0.5.2 lesion-safety trials: the shipped recipe (unipet) with a stronger regional SUV-consistency loss
    "regional_x5": [*UNIPET_S2, "--regional_weight", "1.0"],
    "regional_focus": [*UNIPET_S2, *REGIONAL_FOCUS],
    # the shipped UniPET since 0.5.2: the 0.5.0 recipe (unipet) with dose-balanced sampling in stage 2 (every DRF an
    # equal expected share of the L1 loss; uniform sampling let the high DRFs dominate and over-smoothed DRF 4)
    "dose_balanced_s2": [*DOSE_BALANCED_S2],
    # 0.5.3 trials, not shipped (model card): dose_balanced_s2 plus the hot-spot-focused regional term, weighted per
    # patch by (DRF / 4) ** -exponent, meant to act where lesions lose most (low DRF) and not where the focus cost
    # PSNR (DRF 50-100); both kept lesions at DRF 4-20 but left noise at DRF 50-100, the 1 / DRF weighting no less
    "focus_balanced": [*DOSE_BALANCED_S2, *REGIONAL_FOCUS, "--regional_drf_exponent", "0.5"],
    "focus_low_drf": [*DOSE_BALANCED_S2, *REGIONAL_FOCUS, "--regional_drf_exponent", "1.0"],
    # 0.5.4 trial: the focus weighted by the noise each patch shows (what the network can see) instead of its DRF label,
    # which on the randomised data tells a patch's noise only loosely (correlation 0.69 of the logs, san_noise_probe)
    "focus_noise": [*DOSE_BALANCED_S2, *REGIONAL_FOCUS, "--regional_noise_exponent", "1.0"],
    "focus_noise_sq": [*DOSE_BALANCED_S2, *REGIONAL_FOCUS, "--regional_noise_exponent", "2.0"],  # inverse variance
    # half the regional weight: a point between the shipped model and focus_noise_sq on the lesion / high-DRF trade
    "focus_noise_half": [
        *DOSE_BALANCED_S2,
        "--regional_weight",
        "0.5",
        "--regional_max_focus",
        "4",
        "--regional_noise_exponent",
        "2.0",
    ],
    "focus_noise_light": [  # and at 0.3, next to the shipped model's 0.2 without the focus
        *DOSE_BALANCED_S2,
        "--regional_weight",
        "0.3",
        "--regional_max_focus",
        "4",
        "--regional_noise_exponent",
        "2.0",
    ],
}

# UniPET with its styles from a scalar condition instead of the SAN (scripts.networks.drf_conditioned): the "label
# given" upper bound (issue 15's optional FiLM model: the DRF label) and a label-free variant (hand-made noise
# statistics of each window), same training config otherwise.
_STYLED = (
    "'channels': '@channels', 'num_blocks': '@num_blocks', 'latent_dim': '@latent_dim', "
    "'san_channels': '@san_channels', 'padding_mode': '@padding_mode'}"
)
DRF_CONDITIONED_NETWORK = "{'_target_': 'scripts.networks.drf_conditioned.DRFConditionedUniPET', " + _STYLED
NOISE_CONDITIONED_NETWORK = "{'_target_': 'scripts.networks.drf_conditioned.NoiseConditionedUniPET', " + _STYLED
# name -> (network_def, overrides) for the branches with another style source. They cannot resume the snapshot's
# training state (its network holds a SAN these have not), so each starts from the snapshot's weights (--bdn_ckpt:
# the same stage-1 base network) and trains stage 2 alone for the branches' 1000 iterations, with the same stage-2
# schedule; only the base network's AdamW moments start afresh. The DRF-given ones are not shippable (inference
# needs the DRF); all are scored by the quality benchmark.
CONDITIONED_BRANCHES: dict[str, tuple[str, list[str]]] = {
    "film": (DRF_CONDITIONED_NETWORK, [*DOSE_BALANCED_S2]),  # the shipped recipe (dose_balanced_s2), DRF given
    # the DRF-weighted lesion focus (focus_low_drf's recipe), which the label-free SAN could not switch by dose
    "film_focus": (DRF_CONDITIONED_NETWORK, [*DOSE_BALANCED_S2, *REGIONAL_FOCUS, "--regional_drf_exponent", "1.0"]),
    # label-free: the shipped recipe, styles from each window's log high-pass std and log mean instead of the SAN
    "noise_styles": (NOISE_CONDITIONED_NETWORK, [*DOSE_BALANCED_S2]),
    # the same with the style layers and encoder learning 4x faster (san_learning_rate 2e-4 -> 8e-4): is the label-free
    # reading slower to learn from than the DRF label, or does it carry less?
    "noise_styles_fast": (NOISE_CONDITIONED_NETWORK, [*DOSE_BALANCED_S2, "--san_learning_rate", "8e-4"]),
}

# 0.5.6 trial, DRF given: UniPET whose output keeps 1/DRF of its input
# (scripts.networks.drf_conditioned.ThinningBlendUniPET: the share of the full dose's counts a thinned low dose holds),
# so the network under it has one target at every DRF, the noise-free full dose. Same parameters as UniPET, so unlike
# the CONDITIONED_BRANCHES it resumes the snapshot's training state like every branch in BRANCHES: the shipped recipe
# (dose_balanced_s2) with only train.json's network class changed (its arguments stay the config's own).
# 0.5.12: the shipped recipe with 15 % identity pairs (the full dose as its own input); the short trial of
# ``finetune identity`` bought +0.3 dB at DRF 4 and cost 0.1-0.2 dB at DRF 100 on validation subjects; not run in full yet
BRANCHES["identity_pairs"] = [*DOSE_BALANCED_S2, "--identity_fraction", "0.15"]

THINNING_BLEND_TARGET = "scripts.networks.drf_conditioned.ThinningBlendUniPET"
BRANCHES["thinning_blend"] = [*DOSE_BALANCED_S2, "--network_def#_target_", THINNING_BLEND_TARGET]

# name -> overrides of configs/train.json for full runs (both stages, same schedule and data as `with_align`, but
# today's defaults, i.e. no L_align in stage 2):
# the settings that change stage 1 too, and the plain MONAI UNet a user would pick instead
FULL_RUNS: dict[str, list[str]] = {
    "no_hotspot": ["--hotspot_fraction", "0"],  # patches centred on tissue only
    "no_regional": ["--regional_weight", "0"],  # no regional SUV-consistency loss
    "dose_balanced": ["--dose_balance", "0.5"],  # every DRF an equal share of the L1 loss (option, off by default)
    # MONAI UNet, no normalisation, residual, L1 only (stage 1 for the whole run), same iterations
    "unet": [
        "--network_def",
        "{'_target_': 'scripts.networks.plain_unet.ResidualUNet'}",
        "--stage1_epochs",
        str(EPOCHS),
        "--regional_weight",
        "0",
    ],
}


# Short trials from the shipped weights (``finetune``): the shipped recipe's stage 2 (dose-balanced, no L_align, locked
# validation every epoch) for 400 iterations, so a change can be tried in minutes against ``control``.
FINETUNE_EPOCHS = 4
FINETUNE_RUNS: dict[str, list[str]] = {
    "control": [],
    "identity": ["--identity_fraction", "0.15"],
}
FINETUNE_BASE = ["--align_weight", "0", "--val_interval", "1", "--dose_balance", "0", "--stage2_dose_balance", "0.5"]


def _py() -> list[str]:
    return [sys.executable]


def _run_parallel(cmds: list[list[str]], threads: int | None) -> None:
    """Run independent commands at once (one per core), each printed first; fail if any fails."""
    if len(cmds) == 1:
        _run(cmds[0], threads)
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    procs = []
    for cmd in cmds:
        print("$ " + " ".join(shlex.quote(c) for c in cmd) + " &", flush=True)
        procs.append(subprocess.Popen(cmd, cwd=BUNDLE_ROOT, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"error: a step above failed (exit codes {codes})")


def _run(cmd: list[str], threads: int | None) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    done = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: the step above failed with exit code {done.returncode}")


class TrainModels:
    """The command sequence behind the shipped weights and the quality table (see the module docstring).

    Args:
        work_dir: folder for the simulated data, the trained models and the run logs (outside the repository).
        threads: CPU threads per training process (OMP_NUM_THREADS); 0 leaves PyTorch's default.
    """

    def __init__(self, work_dir: str, threads: int = 0) -> None:
        self.work = Path(work_dir).expanduser().absolute()
        self.threads = int(threads)
        self.sim_dir = self.work / "sim"  # not "data": that name is the step (a method)
        self.datalist = self.sim_dir / "datalist.json"
        self.models = self.work / "models"

    # -- data ------------------------------------------------------------------------------------------
    def data(
        self,
        real_series: str = str(REAL_SERIES),
        profile: str = "randomised",
        n_phantoms: int = N_PHANTOMS,
        n_val: int = N_VAL,
        n_test: int = N_TEST,
        real: bool = True,
        n_unseen: int = N_UNSEEN,
        n_unseen_val: int = N_UNSEEN_VAL,
        jobs: int = 2,
    ) -> None:
        """Simulate the datasets (see the module docstring) and write the datalist and ``family.json``.

        Args:
            real_series: the real DICOM series used as an activity map (``--real false`` skips it).
            profile: simulation profile of ``sim/`` (randomised; ``fixed`` for the 0.2.0 data).
            n_phantoms, n_val, n_test: phantoms of ``sim/`` and how many of the last ones validate / test.
            real: add the real-series subject to ``sim/``'s test split.
            n_unseen, n_unseen_val: phantoms of ``sim_unseen/`` and how many of the first ones tune the
                Gaussian (the rest are test subjects); 0 skips the family.
            jobs: simulation processes at once (one thread each), each on its own range of phantoms; the
                files do not depend on it (each subject's seed depends on its index alone).
        """
        from scripts.common.options import as_bool

        n_phantoms, n_val, n_test, real = int(n_phantoms), int(n_val), int(n_test), as_bool(real, "real")
        if n_phantoms - n_val - n_test < 1 or n_val < 1 or n_test < 1:
            raise UniPETInputError(
                f"--n_phantoms {n_phantoms} must leave >= 1 training subject after --n_val {n_val} "
                f"and --n_test {n_test} (each >= 1)"
            )
        drfs = "[" + ",".join(str(d) for d in ALL_DRFS) + "]"
        names = [f"phantom_{i:03d}" for i in range(n_phantoms)]
        test = names[n_phantoms - n_test :]
        val = names[n_phantoms - n_test - n_val : n_phantoms - n_test]
        if not all((self.sim_dir / p).is_dir() for p in names):
            # seeded, so re-simulating an interrupted set (--overwrite) gives the same files
            jobs = max(1, min(int(jobs), n_phantoms))
            bounds = [round(i * n_phantoms / jobs) for i in range(jobs + 1)]
            _run_parallel(
                [
                    [
                        *_py(),
                        "-m",
                        "scripts.data.simulate",
                        str(self.sim_dir),
                        "--n_subjects",
                        str(hi),
                        "--first_subject",
                        str(lo),
                        "--profile",
                        profile,
                        "--seed",
                        str(PHANTOM_SEED),
                        "--drfs",
                        drfs,
                        "--overwrite",
                        "true",
                    ]
                    for lo, hi in zip(bounds, bounds[1:])
                ],
                1 if jobs > 1 else None,
            )
        if real:
            suv = self.work / "real" / "sts001_suv.nii.gz"
            if not suv.is_file():
                _run([*_py(), "-m", "scripts.data.suv", "--dicom_dir", real_series, "--output", str(suv)], None)
            if not (self.sim_dir / "real_sts001").is_dir():
                _run(
                    [
                        *_py(),
                        "-m",
                        "scripts.data.simulate",
                        str(self.sim_dir),
                        "--activity",
                        str(suv),
                        "--subject",
                        "real_sts001",
                        "--profile",
                        profile,
                        "--resample_mm",
                        "4",
                        "--seed",
                        str(PHANTOM_SEED),
                        "--drfs",
                        drfs,
                    ],
                    None,
                )
            test = test + ["real_sts001"]
        if not self.datalist.is_file():
            _run(
                [
                    *_py(),
                    "-m",
                    "scripts.data.datalist",
                    str(self.sim_dir),
                    "--output",
                    str(self.datalist),
                    "--val_subjects",
                    "[" + ",".join(val) + "]",
                    "--test_subjects",
                    "[" + ",".join(test) + "]",
                    "--drfs",
                    "[" + ",".join(str(d) for d in TRAIN_DRFS) + "]",
                ],
                None,
            )
        if int(n_unseen) > 0:
            self.unseen_family(int(n_unseen), int(n_unseen_val))

    def unseen_family(self, n_subjects: int = N_UNSEEN, n_val: int = N_UNSEEN_VAL) -> None:
        """The held-out unseen-reconstruction test family in ``sim_unseen/`` (one simulate command + family.json)."""
        if n_subjects - n_val < 1 or n_val < 1:
            raise UniPETInputError(
                f"the unseen family needs >= 1 Gaussian-tuning and >= 1 test subject; got "
                f"{n_subjects} subjects, {n_val} for tuning"
            )
        folder = self.work / "sim_unseen"
        names = [f"phantom_{i:03d}" for i in range(n_subjects)]
        if not all((folder / p).is_dir() for p in names):
            _run(
                [
                    *_py(),
                    "-m",
                    "scripts.data.simulate",
                    str(folder),
                    "--profile",
                    UNSEEN_PROFILE,
                    "--n_subjects",
                    str(n_subjects),
                    "--seed",
                    str(UNSEEN_SEED),
                    "--overwrite",
                    "true",
                ],
                None,
            )
        family = {
            "description": "unseen-reconstruction test family (simulated data): never used in training",
            "profile": UNSEEN_PROFILE,
            "seed": UNSEEN_SEED,
            "validation": names[:n_val],
            "test": names[n_val:],
            "note": "validation subjects only tune the Gaussian baseline's FWHM per DRF",
        }
        atomic_write(folder / "family.json", lambda tmp: tmp.write_text(json.dumps(family, indent=2) + "\n"))

    # -- training ----------------------------------------------------------------------------------------
    def _train(self, name: str, extra: list[str], legacy: bool = True) -> None:
        if legacy:
            # every run before 0.5.12 sets its stage-2 sampling explicitly (all predate the stage2_dose_balance default)
            extra = [*extra, *_pre_0_5_3(extra)]
            if name not in LOCKED_SELECTION_RUNS:
                extra = [*extra, *UNLOCKED_SELECTION]
        if not self.datalist.is_file():
            raise UniPETInputError(f"{self.datalist} not found: run the `data` step first")
        _run(
            [
                *_py(),
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                "configs/train.json",
                "--dataset_dir",
                str(self.sim_dir),
                "--datalist_file",
                str(self.datalist),
                "--ckpt_dir",
                str(self.models / name),
                "--output_dir",
                str(self.work / "runs" / name),
                *extra,
            ],
            self.threads,
        )

    def _snapshot(self) -> Path:
        path = self.models / SNAPSHOT_RUN / SNAPSHOT
        if not path.is_file():
            raise UniPETInputError(f"{path} not found: run the `{SNAPSHOT_RUN}` step first (at least through stage 1)")
        return path

    def with_align(self) -> None:
        """Both stages with L_align at 0.2 (0.4.0's UniPET); its end of stage 1 is every branch's start."""
        self._train(SNAPSHOT_RUN, ALIGN_0_4)

    def branch(self, name: str) -> None:
        """One branch from the end of stage 1 (``BRANCHES``: unipet, vanilla, san_only, rals_only, ...; and the
        branches with another style source, ``CONDITIONED_BRANCHES``: film, film_focus, noise_styles,
        noise_styles_fast)."""
        if name in CONDITIONED_BRANCHES:
            start = [
                "--bdn_ckpt",
                str(self._snapshot()),
                "--stage1_epochs",
                "0",
                "--epochs",
                str(EPOCHS - STAGE1_EPOCHS),
            ]
            network, overrides = CONDITIONED_BRANCHES[name]
            self._train(name, [*start, "--network_def", network, *overrides])
            return
        if name not in BRANCHES:
            raise UniPETInputError(f"unknown branch {name!r}: use one of {sorted([*BRANCHES, *CONDITIONED_BRANCHES])}")
        self._train(name, ["--init_checkpoint", str(self._snapshot()), *BRANCHES[name]])

    def full_run(self, name: str) -> None:
        """One full two-stage run with the overrides of ``FULL_RUNS[name]`` (ablations, the plain UNet)."""
        if name not in FULL_RUNS:
            raise UniPETInputError(f"unknown full run {name!r}: use one of {sorted(FULL_RUNS)}")
        self._train(name, FULL_RUNS[name])

    def finetune(self, name: str) -> None:
        """A short trial from the shipped ``models/model.pt`` (``FINETUNE_RUNS``: control, identity), into
        ``models/finetune_<name>``; see the module docstring."""
        if name not in FINETUNE_RUNS:
            raise UniPETInputError(f"unknown finetune run {name!r}: use one of {sorted(FINETUNE_RUNS)}")
        start = ["--bdn_ckpt", str(BUNDLE_ROOT / "models" / "model.pt"), "--stage1_epochs", "0"]
        self._train(
            f"finetune_{name}",
            [*start, "--epochs", str(FINETUNE_EPOCHS), *FINETUNE_BASE, *FINETUNE_RUNS[name]],
            legacy=False,
        )

    def drf_specific(self, drfs: Any = TRAIN_DRFS) -> None:
        """One model per training DRF: 300 more stage-1 iterations on that DRF alone, from the end of stage 1."""
        snapshot = self._snapshot()
        epochs = str(STAGE1_EPOCHS + DRF_SPECIFIC_EPOCHS)
        for drf in drfs if isinstance(drfs, (list, tuple)) else [drfs]:
            self._train(
                f"drf_{int(drf)}",
                [
                    "--init_checkpoint",
                    str(snapshot),
                    "--drfs",
                    f"[{int(drf)}]",
                    "--epochs",
                    epochs,
                    "--stage1_epochs",
                    epochs,
                    "--val_interval",
                    "1",
                ],
            )

    # -- shipping ------------------------------------------------------------------------------------------
    def ship(self, overwrite: bool = False, model: str = "dose_balanced_s2") -> None:
        """Copy a model's best weights to models/model.pt and record their SHA-256 in large_files.yml.

        ``model``: ``dose_balanced_s2`` (UniPET with dose-balanced stage 2, the default since 0.5.2), ``unipet``
        (the 0.5.0-0.5.1 UniPET: its best stage-2 weights) or, when the quality table shows that
        SAN/RALS do not beat it, another model of the same architecture (``vanilla``: best stage-1 weights, as
        0.4.0 shipped; ``with_align``, ``san_only``, ``rals_only``, ``no_hotspot``, ``no_regional``); the
        model card must then say which.
        """
        files = {
            "dose_balanced_s2": "model.pt",
            "unipet": "model.pt",
            "with_align": "model.pt",
            "vanilla": "model_stage1.pt",
            "san_only": "model.pt",
            "rals_only": "model.pt",
            "no_hotspot": "model.pt",
            "no_regional": "model.pt",
        }
        if model not in files:
            raise UniPETInputError(
                f"--model {model!r} cannot be shipped: configs/inference.json builds UniPET; use one of {sorted(files)}"
            )
        source = self.models / model / files[model]
        if not source.is_file():
            raise UniPETInputError(f"{source} not found: run the `{model}` step to the end first")
        target = BUNDLE_ROOT / "models" / "model.pt"
        check_output_path(target, overwrite=overwrite, inputs=[source])
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), sync=True)
        digest = file_sha256(target)
        write_large_files(BUNDLE_ROOT, {"models/model.pt": digest})
        print(f"shipped {target} (sha256 {digest}); recorded in {BUNDLE_ROOT / LARGE_FILES}")

    def all(self, ship_model: str = "dose_balanced_s2") -> None:
        """Every step in order, one process at a time, then ship ``ship_model`` (0.4.0 shipped ``vanilla``;
        0.5.0-0.5.1 ``unipet``, trained without L_align; 0.5.2 ``dose_balanced_s2``: see the model card)."""
        self.data()
        self.with_align()
        for name in BRANCHES:
            self.branch(name)
        for name in FULL_RUNS:
            self.full_run(name)
        self.drf_specific()
        self.ship(model=ship_model)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_command(TrainModels, "python -m scripts.benchmarks.train_models")


if __name__ == "__main__":
    main()
