"""Two-stage UniPET training: the trainer's logic in-process, and tiny runs through `monai.bundle run`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ignite.engine import Events as IGNITE_EVENTS
from scipy.ndimage import gaussian_filter

from conftest import BUNDLE_ROOT, bundle_parser, run_python
from scripts.common.errors import TrainingDivergedError
from scripts.common.weights import load_checkpoint
from scripts.data.io import save_nifti
from scripts.engines.gan_trainer import UniPETTrainer
from scripts.losses.align import StyleAlignmentLoss
from scripts.losses.rals import RALSCriticLoss, RALSGeneratorLoss, stylized_mask
from scripts.networks.critic import PatchCritic
from scripts.networks.unipet import UniPET

TINY = [
    "--channels",
    "4",
    "--num_blocks",
    "2",
    "--latent_dim",
    "8",
    "--san_channels",
    "[4,4]",
    "--critic_channels",
    "[4,8]",
    "--patch_size",
    "[16,16,16]",
    "--batch_size",
    "1",
    "--num_samples",
    "2",
    "--sw_batch_size",
    "4",
    "--val_max_items",
    "2",
    "--log_interval",
    "1",
    "--save_interval",
    "1",
]


def make_pairs(root: Path, n_subjects: int = 3, shape=(24, 24, 20), drfs=(4, 20), seed: int = 0) -> Path:
    """Tiny smooth 'activity' volumes with DRF-scaled noise, in the paired layout (SUV)."""
    rng = np.random.default_rng(seed)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    for s in range(n_subjects):
        act = gaussian_filter(rng.random(shape), 2) * 10
        act = np.where(act > 4.5, act, 0.2)
        save_nifti(act + rng.normal(0, 0.05, shape), affine, root / f"sub{s}" / "full_dose.nii.gz")
        for d in drfs:
            save_nifti(act + rng.normal(0, 0.05 * np.sqrt(d), shape), affine, root / f"sub{s}" / f"drf_{d}.nii.gz")
    return root


def train_args(
    data: Path, ckpt: Path | None = None, out: Path | None = None, *, config: str = "configs/train.json", **keys: Any
) -> list[str]:
    """``monai.bundle run`` arguments of a tiny training run on the pairs in ``data``: the config, the checkpoint and
    output folders when given, ``--key value`` for every keyword in order, then the :data:`TINY` sizes."""
    args = ["--config_file", config, "--dataset_dir", str(data)]
    if ckpt is not None:
        args += ["--ckpt_dir", str(ckpt)]
    if out is not None:
        args += ["--output_dir", str(out)]
    for key, value in keys.items():
        args += [f"--{key}", str(value)]
    return [*args, *TINY]


def bundle_run(args: list[str], timeout: int = 600, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return run_python(
        "-m", "monai.bundle", "run", *args, timeout=timeout, **{"OMP_NUM_THREADS": "1", **(env_extra or {})}
    )


# --------------------------------------------------------------------------------------------------
# the trainer, in-process
# --------------------------------------------------------------------------------------------------
class RecordingCriticLoss(RALSCriticLoss):
    """Records what the critic was shown as real and fake."""

    def __init__(self):
        super().__init__(gp_weight=10.0)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, critic, real, fake, mask):
        self.calls.append((real.detach().clone(), fake.detach().clone()))
        return super().forward(critic, real, fake, mask)


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module_params) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, module_params))


@pytest.fixture()
def tiny_setup():
    torch.manual_seed(0)
    gen = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    critic = PatchCritic(channels=(4, 8))
    low = torch.rand(2, 1, 16, 16, 16) * 0.3
    full = low + 0.2  # distinguishable from the input: "real" must be this one
    batches = [{"image": low, "label": full}] * 50
    return gen, critic, batches, low, full


def _trainer(gen, critic, batches, stage1, total, pretrain, recorder=None, **overrides):
    """A tiny two-stage trainer: one epoch of ``total`` iterations unless ``overrides`` say otherwise."""
    args = dict(
        device="cpu",
        max_epochs=1,
        epoch_length=total,
        train_data_loader=batches,
        generator=gen,
        g_optimizer=torch.optim.AdamW(gen.parameters(), lr=1e-3),
        critic=critic,
        d_optimizer=torch.optim.AdamW(critic.parameters(), lr=1e-3),
        stage1_iterations=stage1,
        align_loss=StyleAlignmentLoss(),
        critic_loss=recorder or RALSCriticLoss(),
        adv_loss=RALSGeneratorLoss(),
        mask_fn=lambda x: torch.ones_like(x),
        critic_pretrain_iterations=pretrain,
    )
    return UniPETTrainer(**{**args, **overrides})


def test_stage1_trains_base_network_only(tiny_setup):
    gen, critic, batches, _, _ = tiny_setup
    san_before, critic_before = [p.detach().clone() for p in gen.san_parameters()], _params(critic)
    bdn_before = gen.input_conv.weight.detach().clone()
    trainer = _trainer(gen, critic, batches, stage1=3, total=3, pretrain=0)
    trainer.run()
    out = trainer.state.output
    assert out["stage"] == 1 and "g_l1" in out and "g_adv" not in out and out["loss"] == out["g_total"]
    assert not torch.equal(bdn_before, gen.input_conv.weight.detach()), "stage 1 must train the BDN"
    assert not _changed(san_before, gen.san_parameters()), "stage 1 must leave the SAN at zero style"
    assert not _changed(critic_before, critic.parameters()), "stage 1 must not touch the critic"


def test_stage2_shows_critic_full_dose_as_real_and_pretrains_it(tiny_setup):
    gen, critic, batches, low, full = tiny_setup
    recorder = RecordingCriticLoss()
    trainer = _trainer(gen, critic, batches, stage1=0, total=2, pretrain=1, recorder=recorder)
    gen_before, critic_before = _params(gen), _params(critic)
    # after one iteration (critic pre-training) the generator is untouched, the critic is not
    trainer.state.max_epochs = 1
    trainer.state.epoch_length = 1
    trainer.run()
    assert trainer.state.output["stage"] == 2
    # no generator step ran: the critic's loss is logged as d_loss, never as the generator's ``loss``
    assert (
        "d_loss" in trainer.state.output
        and "loss" not in trainer.state.output
        and "g_total" not in trainer.state.output
    )
    assert not _changed(gen_before, gen.parameters()), "critic pre-training must not update the generator"
    assert _changed(critic_before, critic.parameters())
    real, fake = recorder.calls[0]
    assert torch.equal(real, full), "the critic must see the full dose as real (not the low-dose input)"
    assert not torch.equal(real, low)
    assert fake.shape == full.shape


def test_stage2_joint_step_updates_san_and_logs_all_terms(tiny_setup):
    gen, critic, batches, _, _ = tiny_setup
    with torch.no_grad():  # a non-zero style so SAN gradients are not all zero by construction
        for p in gen.san_parameters():
            p.add_(0.01 * torch.randn_like(p))
    san_before = [p.detach().clone() for p in gen.san_parameters()]
    trainer = _trainer(gen, critic, batches, stage1=1, total=3, pretrain=1)
    trainer.run()
    out = trainer.state.output
    for key in (
        "loss",
        "g_total",
        "g_l1",
        "g_align",
        "g_adv",
        "g_regional",
        "d_loss",
        "d_gp",
        "d_wasserstein",
        "lr_generator",
        "lr_critic",
    ):
        assert key in out and np.isfinite(out[key]), key
    assert out["loss"] == out["g_total"] == pytest.approx(out["g_l1"] + 1e-3 * out["g_align"] + 1e-3 * out["g_adv"])
    assert out["g_align"] > 0, "L_align must be non-zero when low- and full-dose differ"
    assert _changed(san_before, gen.san_parameters()), "stage 2 must train the SAN"


def test_ablation_switches_rals_alone_and_san_alone(tiny_setup):
    gen, critic, batches, _, _ = tiny_setup
    # "RALS alone": train_san False keeps the SAN at zero style while the base network and critic train
    san_before, bdn_before, critic_before = (
        [p.detach().clone() for p in gen.san_parameters()],
        _params(gen),
        _params(critic),
    )
    trainer = _trainer(gen, critic, batches, stage1=0, total=2, pretrain=0)
    trainer.train_san, trainer.align_weight = False, 0.0
    trainer.run()
    assert not _changed(san_before, gen.san_parameters()), "train_san=False must leave the SAN untouched"
    assert _changed(bdn_before, gen.parameters()) and _changed(critic_before, critic.parameters())
    assert trainer.state.output["g_adv"] != 0.0
    # "SAN alone": adv_weight 0 trains no critic, skips critic pre-training and still trains the SAN
    with torch.no_grad():
        for p in gen.san_parameters():
            p.add_(0.01 * torch.randn_like(p))
    san_before, critic_before = [p.detach().clone() for p in gen.san_parameters()], _params(critic)
    trainer = _trainer(gen, critic, batches, stage1=0, total=2, pretrain=5)
    trainer.adv_weight = 0.0
    trainer.run()
    out = trainer.state.output
    assert not _changed(critic_before, critic.parameters()), "adv_weight 0 must not train a critic"
    assert _changed(san_before, gen.san_parameters()), "the generator must train from the first stage-2 step"
    assert out["g_adv"] == 0.0 and "d_loss" not in out and "lr_critic" not in out and out["g_align"] > 0


def test_stage2_needs_a_critic(tiny_setup):
    gen, _, batches, _, _ = tiny_setup
    with pytest.raises(ValueError, match="critic"):
        UniPETTrainer(
            device="cpu",
            max_epochs=1,
            epoch_length=2,
            train_data_loader=batches,
            generator=gen,
            g_optimizer=torch.optim.AdamW(gen.parameters()),
            stage1_iterations=1,
        )


class PoisonedCriticLoss(RALSCriticLoss):
    """The critic's loss with a NaN factor on the calls numbered in ``poisoned`` (1-based): NaN gradients there."""

    def __init__(self, poisoned: set[int]):
        super().__init__(gp_weight=10.0)
        self.poisoned, self.calls = poisoned, 0

    def forward(self, critic, real, fake, mask):
        self.calls += 1
        loss, terms = super().forward(critic, real, fake, mask)
        return (loss * float("nan"), terms) if self.calls in self.poisoned else (loss, terms)


def _weights_by_iteration(trainer, module) -> dict[int, list[torch.Tensor]]:
    seen: dict[int, list[torch.Tensor]] = {0: _params(module)}
    trainer.add_event_handler(
        IGNITE_EVENTS.ITERATION_COMPLETED, lambda engine: seen.__setitem__(engine.state.iteration, _params(module))
    )
    return seen


def test_a_nonfinite_gradient_skips_that_step_and_the_run_goes_on(tiny_setup, caplog):
    """A NaN batch (generator, stage 1) and a NaN critic loss (stage 2) each cost their one step: the weights stay as
    they were for that step, they change again at the next, nothing turns NaN, and the log and the output say so."""
    gen, critic, batches, low, full = tiny_setup
    poisoned = [dict(b) for b in batches]
    poisoned[1] = {"image": low.clone().index_fill_(2, torch.tensor([3]), float("nan")), "label": full}
    trainer = _trainer(gen, critic, poisoned, stage1=3, total=5, pretrain=2, recorder=PoisonedCriticLoss({1}))
    gen_seen, critic_seen = _weights_by_iteration(trainer, gen), _weights_by_iteration(trainer, critic)
    with caplog.at_level("WARNING"):
        trainer.run()
    assert not _changed(gen_seen[1], gen_seen[2]), "the NaN batch (iteration 2) must not move the generator"
    assert _changed(gen_seen[2], gen_seen[3]), "the next stage-1 step trains again"
    assert not _changed(critic_seen[3], critic_seen[4]), "the NaN critic loss (iteration 4) must not move the critic"
    assert _changed(critic_seen[4], critic_seen[5]), "the next critic step trains again"
    for module in (gen, critic):
        assert all(torch.isfinite(p).all() for p in module.parameters())
    clean = _trainer(gen, critic, batches, stage1=1, total=2, pretrain=1)
    clean.run()
    assert "nonfinite_skipped" not in clean.state.output and clean.nonfinite_skipped == {"generator": 0, "critic": 0}
    assert trainer.nonfinite_skipped == {"generator": 1, "critic": 1}
    assert trainer.state.output["nonfinite_skipped"] == 2
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert warnings == [
        "iteration 2: non-finite generator gradients, step skipped (weights unchanged; 1 in a row, 1 in this process)",
        "iteration 4: non-finite critic gradients, step skipped (weights unchanged; 1 in a row, 1 in this process)",
    ]


def test_nonfinite_steps_in_a_row_stop_the_run_with_what_to_change(tiny_setup):
    gen, critic, batches, low, full = tiny_setup
    bad = [{"image": low * float("nan"), "label": full}] * 10
    start = _params(gen)
    trainer = _trainer(gen, critic, bad, stage1=10, total=10, pretrain=0, max_nonfinite_steps=2)
    with pytest.raises(TrainingDivergedError) as err:
        trainer.run()
    msg = str(err.value)
    assert "3 generator steps in a row had non-finite gradients (iterations 1-3)" in msg
    assert (
        "--precision fp32" in msg and "before iteration 1 (--init_checkpoint" in msg and "--max_nonfinite_steps" in msg
    )
    assert not _changed(start, gen.parameters()), "no skipped step may touch the weights"
    # 0 stops at the first bad step
    with pytest.raises(TrainingDivergedError, match=r"1 critic step in a row .*iterations 1-1"):
        _trainer(
            gen, critic, batches, stage1=0, total=3, pretrain=3, recorder=PoisonedCriticLoss({1}), max_nonfinite_steps=0
        ).run()
    with pytest.raises(ValueError, match="max_nonfinite_steps must be >= 0"):
        _trainer(gen, critic, batches, stage1=1, total=1, pretrain=0, max_nonfinite_steps=-1)


def test_train_json_hands_max_nonfinite_steps_to_the_trainer():
    assert bundle_parser(("train.json",)).get_parsed_content("train#trainer#max_nonfinite_steps") == 10
    parser = bundle_parser(("train.json",), max_nonfinite_steps=0)
    assert parser.get_parsed_content("train#trainer#max_nonfinite_steps") == 0


def test_mask_fn_from_config_units():
    # the train.json mask: the reference 0.001 SUV^2 threshold applied to data normalised by 20
    x = torch.zeros(1, 1, 8, 8, 8)
    x[..., 2:6, 2:6, 2:6] = torch.rand(4, 4, 4) * 0.5
    m = stylized_mask(x, threshold=0.001 / 400)
    assert 0 < m.mean() < 1


# --------------------------------------------------------------------------------------------------
# through monai.bundle run
# --------------------------------------------------------------------------------------------------
def check_tensorboard_logs(log_dir: Path) -> None:
    """The TensorBoard logs of the 4-iteration run above (stage 1: iterations 1-2; stage 2: critic pre-training at
    3, joint step at 4; validation after each epoch, one subject at DRFs 4 and 20): issue 16's named terms."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    images: dict[str, int] = {}
    for event_file in sorted(log_dir.glob("events.out.tfevents*")):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
        for tag in acc.Tags()["images"]:
            images[tag] = images.get(tag, 0) + len(acc.Images(tag))
    for key in (
        "g_l1",
        "g_regional",
        "g_total",
        "g_align",
        "g_adv",
        "d_loss",
        "d_gp",
        "d_wasserstein",
        "lr_bdn",
        "lr_san",
        "lr_critic",
        "val_psnr",
        "val_psnr_drf4",
        "val_psnr_drf20",
    ):
        assert key in scalars, f"{key} not in TensorBoard (tags: {sorted(scalars)})"
    # ``loss`` is the generator's total in both stages and never the critic's: absent at the pre-training step
    assert sorted(scalars["loss"]) == [1, 2, 4]
    assert all(scalars["loss"][i] == pytest.approx(scalars["g_total"][i]) for i in (1, 2, 4))
    assert sorted(scalars["d_loss"]) == [3, 4] and sorted(scalars["g_adv"]) == [4]
    assert scalars["lr_bdn"][1] > 0 and scalars["lr_san"][4] > 0
    assert sorted(scalars["val_psnr_drf4"]) == [1, 2]
    assert images.get("val_slice_low_output_full") == 2, images


@pytest.mark.slow
def test_bundle_training_run_id_end_to_end(tmp_path):
    data = make_pairs(tmp_path / "pairs")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    proc = bundle_run(
        [
            "training",
            *train_args(
                data,
                ckpt,
                out,
                epochs=2,
                epoch_length=2,
                val_interval=1,
                critic_pretrain_iterations=1,
                val_fraction=0.34,
            ),
        ]
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for name in ("checkpoint_latest.pt", "model_stage1.pt", "model.pt"):
        assert (ckpt / name).is_file(), f"{name} missing; log tail: {log[-2000:]}"
    assert list((out / "tensorboard").glob("events.out.tfevents*")), "no TensorBoard event file"
    for term in ("g_l1", "g_align", "g_adv", "d_loss", "val_psnr", "val_ssim", "val_nrmse"):
        assert term in log, f"{term} not logged"
    state = load_checkpoint(ckpt / "checkpoint_latest.pt")
    assert state["trainer"]["iteration"] == 4
    check_tensorboard_logs(out / "tensorboard")
    for label in ("train epoch 1/2 (iterations)", "train epoch 2/2 (iterations)", "validation (volumes)"):
        assert label in proc.stderr, f"no progress bar labelled {label!r}"
    # the log names the metric that selects the files (selection_metric is MONAI's key metric), per stage
    assert "of val_psnr" not in log and "Key metric: val_psnr" not in log, log[-3000:]
    assert log.count("Got new best metric of val_score") == 2, log[-3000:]  # the first validation of each stage
    assert "stage 2: new best val_score (the selection metric)" in log
    assert "d_loss=" in proc.stderr, "the progress bar shows the critic's loss under its own name"
    # the best stage-2 weights load into the inference network
    net = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    net.load_state_dict(load_checkpoint(ckpt / "model.pt"))


@pytest.mark.slow
def test_a_diverging_bundle_run_stops_with_one_line_and_exit_2(tmp_path):
    """Through monai.bundle run: an absurd learning rate makes the next gradients non-finite; with
    max_nonfinite_steps 0 the run stops at the first of them with the error's one line, not a traceback."""
    data = make_pairs(tmp_path / "pairs", n_subjects=2)
    args = train_args(
        data, tmp_path / "ckpt", tmp_path / "out", epoch_length=4, epochs=1, stage1_epochs=1, val_fraction=0
    )
    proc = bundle_run([*args, "--learning_rate", "1e30", "--max_nonfinite_steps", "0"])
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "training diverged: 1 generator step in a row had non-finite gradients (iterations 2-2)" in err[-1]
    assert "Traceback" not in proc.stderr


def test_bundle_training_resumes_from_latest_checkpoint(tmp_path):
    data = make_pairs(tmp_path / "pairs", n_subjects=2)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    common = train_args(
        data, ckpt, out, epoch_length=2, val_interval=5, val_fraction=0, critic_pretrain_iterations=1, stage1_epochs=1
    )
    first = bundle_run([*common, "--epochs", "1"])
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert load_checkpoint(ckpt / "checkpoint_latest.pt")["trainer"]["iteration"] == 2
    second = bundle_run([*common, "--epochs", "2"])
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "resumed from" in log and "iteration 2" in log
    state = load_checkpoint(ckpt / "checkpoint_latest.pt")
    assert state["trainer"]["iteration"] == 4
    assert "g_adv" in log, "the resumed epoch is stage 2"


@pytest.mark.slow
def test_bundle_training_snapshot_and_branch_from_it(tmp_path):
    data = make_pairs(tmp_path / "pairs", n_subjects=2)
    common = train_args(
        data,
        epoch_length=2,
        val_interval=1,
        val_fraction=0.5,
        critic_pretrain_iterations=1,
        epochs=2,
        stage1_epochs=1,
    )
    parent = tmp_path / "parent"
    first = bundle_run([*common, "--ckpt_dir", str(parent), "--output_dir", str(tmp_path / "out1"), "--epochs", "1"])
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    snapshot = parent / "checkpoint_iter000002.pt"  # the default snapshot: the end of stage 1
    assert snapshot.is_file()
    assert load_checkpoint(snapshot)["trainer"]["iteration"] == 2
    # a stage-2 variant ("SAN alone") branches from it into its own folder and leaves the parent alone
    before = {p.name: p.stat().st_mtime_ns for p in parent.iterdir()}
    branch = tmp_path / "branch"
    second = bundle_run(
        [
            *common,
            "--ckpt_dir",
            str(branch),
            "--output_dir",
            str(tmp_path / "out2"),
            "--init_checkpoint",
            str(snapshot),
            "--adv_weight",
            "0",
        ]
    )
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert f"resumed from {snapshot}" in log and "iteration 2" in log
    state = load_checkpoint(branch / "checkpoint_latest.pt")
    assert state["trainer"]["iteration"] == 4
    assert (branch / "model.pt").is_file(), "the branch's own best stage-2 weights"
    assert not (branch / "model_stage1.pt").exists(), "the parent's best score must not come along"
    assert {p.name: p.stat().st_mtime_ns for p in parent.iterdir()} == before
    # the parent's best score stays behind: a branch that continues stage 1 with unchanged weights (lr 0)
    # scores exactly the parent's best, so only a fresh best record writes its own model_stage1.pt
    latest = parent / "checkpoint_latest.pt"
    assert load_checkpoint(latest)["best"]["best"], "the parent validated after stage 1"
    third = bundle_run(
        [
            *common,
            "--ckpt_dir",
            str(tmp_path / "b1"),
            "--output_dir",
            str(tmp_path / "out3"),
            "--init_checkpoint",
            str(latest),
            "--stage1_epochs",
            "2",
            "--learning_rate",
            "0",
        ]
    )
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    assert (tmp_path / "b1" / "model_stage1.pt").is_file()
    bad = bundle_run([*common, "--ckpt_dir", str(tmp_path / "b2"), "--init_checkpoint", str(tmp_path / "nope.pt")])
    assert bad.returncode != 0 and "init_checkpoint" in (bad.stdout + bad.stderr) and "Traceback" not in bad.stderr


def test_published_size_override_parses():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(
        [str(BUNDLE_ROOT / "configs" / "train.json"), str(BUNDLE_ROOT / "configs" / "published_size.json")]
    )
    net = parser.get_parsed_content("network_def")
    assert net.channels == 64 and net.num_blocks == 8 and net.latent_dim == 256
    assert parser.get_parsed_content("patch_size") == [64, 64, 64]
    assert parser.get_parsed_content("stage1_iterations") == 150 * 1000


@pytest.mark.parametrize("files", [["train.json"], ["train.json", "evaluate.json"]])
def test_validation_metrics_compare_tensors_on_one_device(files):
    """The sliding window stitches ``pred`` on its output device (the CPU) while the evaluator moves ``label`` to
    the GPU: every key the metrics read must be moved to that device too. On CUDA train.json failed at its first
    validation before 0.5.2 ("found at least two devices, cuda:0 and cpu"); on a CPU-only machine only this
    check can see it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in files])
    out_device = parser.get("validate#inferer#device")
    assert out_device == "cpu"
    moved: set[str] = set()
    for t in parser.get("validate#postprocessing#transforms"):
        if isinstance(t, dict) and t.get("_target_") == "EnsureTyped" and t.get("device") == out_device:
            moved |= {t["keys"]} if isinstance(t["keys"], str) else set(t["keys"])
    read = {"pred", "label"}
    for metric in (parser.get("validate#metrics") or {}).values():
        read |= set(re.findall(r"'(\w+)'", metric["output_transform"]))
    assert read <= moved, f"metrics read {sorted(read)} but only {sorted(moved)} are moved to {out_device!r}"


def test_training_alias_matches_run():
    cfg = json.loads((BUNDLE_ROOT / "configs" / "train.json").read_text())
    assert cfg["training"] == "$@run"
    assert cfg["run"] == ["$@train#trainer.run()"]


@pytest.mark.slow
def test_multi_process_cpu_training_gloo(tmp_path):
    data = make_pairs(tmp_path / "pairs", n_subjects=3)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    cmd = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29531",
        "-m",
        "monai.bundle",
        "run",
        *train_args(
            data,
            ckpt,
            out,
            config="['configs/train.json','configs/multi_gpu_train.json']",
            epochs=2,
            epoch_length=2,
            val_interval=1,
            critic_pretrain_iterations=1,
            val_fraction=0.34,
        ),
    ]
    proc = run_python(*cmd, timeout=600, OMP_NUM_THREADS="1")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("UniPETTrainer - INFO - Engine run resuming from iteration 0") == 2, "expected two ranks"
    for name in ("checkpoint_latest.pt", "model_stage1.pt", "model.pt"):
        assert (ckpt / name).is_file(), name
    state = load_checkpoint(ckpt / "checkpoint_latest.pt")
    assert state["trainer"]["iteration"] == 4
    # DDP state dicts are saved unwrapped: they load into a plain network
    net = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    net.load_state_dict(state["generator"])


# --- issue 15: one stage clock, stage 2 as its own optimisation, monitoring, regional loss ---------------

import io  # noqa: E402

from ignite.engine import Events  # noqa: E402

from scripts.engines.best_checkpoint import StageBestCheckpoint  # noqa: E402
from scripts.engines.gan_trainer import (  # noqa: E402
    StageClock,
    TwoStageLR,
    generator_param_groups,
    loss_terms,
    style_statistics,
)
from scripts.losses.regional import RegionalSUVLoss  # noqa: E402


def test_two_stage_schedule_restarts_for_stage2_with_its_own_san_rate():
    net = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    groups = generator_param_groups(net, 2e-4, 1e-4, 1e-3)
    assert [g["name"] for g in groups] == ["bdn", "san"]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in net.san_parameters()}
    opt = torch.optim.AdamW(groups)
    clock = StageClock(10)
    sched = TwoStageLR(opt, clock, total_iterations=30, stage2_warmup=4, stage2_offset=2, min_ratio=0.05)
    lrs = []  # the rate each 1-based iteration uses
    for _ in range(30):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    bdn, san = [r[0] for r in lrs], [r[1] for r in lrs]
    assert bdn[0] == pytest.approx(2e-4) and bdn[9] < 0.2 * 2e-4  # stage 1 cosine
    assert bdn[10] == 0 and bdn[11] == 0  # iterations 11-12: critic pre-training, no generator step
    assert san[12] == pytest.approx(1e-3 / 4) and san[15] == pytest.approx(1e-3)  # warm-up to the SAN's own peak
    assert bdn[15] == pytest.approx(1e-4)  # the BDN's stage-2 peak
    assert san[-1] == pytest.approx(1e-3 * 0.05, rel=0.2)
    # 0.2.0: one cosine over both stages left stage 2 starting at a fraction of the rate
    state = sched.state_dict()
    assert "clock" not in state and "optimizer" not in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # checkpoints stay weights-only


def test_trainer_and_best_checkpoint_share_the_stage_clock(tiny_setup, tmp_path):
    from ignite.engine import Engine

    gen, critic, batches, _, _ = tiny_setup
    clock = StageClock(3)
    with pytest.raises(ValueError, match="disagrees"):
        UniPETTrainer(
            device="cpu",
            max_epochs=1,
            epoch_length=3,
            train_data_loader=batches,
            generator=gen,
            g_optimizer=torch.optim.AdamW(gen.parameters()),
            stage1_iterations=2,
            stage_clock=clock,
        )
    trainer = UniPETTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=3,
        train_data_loader=batches,
        generator=gen,
        g_optimizer=torch.optim.AdamW(gen.parameters()),
        stage_clock=clock,
    )
    saver = StageBestCheckpoint(tmp_path, gen, stage_clock=clock)  # the clock is the saver's only source of the stage
    evaluator = Engine(lambda e, b: None)
    evaluator.state.metrics = {"val_psnr": 30.0}
    trainer.run()
    assert clock.iteration == 3 and clock.stage == 1
    saver(evaluator)
    assert (tmp_path / "model_stage1.pt").is_file() and not (tmp_path / "model.pt").exists()
    clock.iteration = 4  # the trainer's next iteration is in stage 2
    saver(evaluator)
    assert (tmp_path / "model.pt").is_file()
    # a validation during the critic pre-training judges weights stage 2 has not changed: not a stage-2 candidate
    pre = tmp_path / "offset"
    saver = StageBestCheckpoint(pre, gen, stage_clock=clock, stage2_offset=2)
    for iteration, written in ((4, False), (5, False), (6, True)):
        clock.iteration = iteration
        saver(evaluator)
        assert (pre / "model.pt").is_file() == written, iteration
    assert saver.best_epoch == {2: evaluator.state.epoch}
    assert bundle_parser(("train.json",)).get_parsed_content("validate#best_checkpoint").stage2_offset == 100


def test_each_iteration_runs_the_step_of_its_phase(tiny_setup, monkeypatch):
    """_iteration is split into a stage-1, a critic and a generator step; which run is decided by the stage clock
    (stage 1 vs 2) and, within stage 2, by critic_pretrain_iterations (adversarial runs only)."""
    gen, critic, batches, _, _ = tiny_setup
    trainer = UniPETTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=6,
        train_data_loader=batches,
        generator=gen,
        g_optimizer=torch.optim.AdamW(gen.parameters(), lr=1e-3),
        critic=critic,
        d_optimizer=torch.optim.AdamW(critic.parameters(), lr=1e-3),
        stage_clock=StageClock(2),
        align_loss=StyleAlignmentLoss(),
        critic_loss=RALSCriticLoss(),
        adv_loss=RALSGeneratorLoss(),
        mask_fn=lambda x: torch.ones_like(x),
        critic_pretrain_iterations=2,
    )
    calls: list[tuple[int, str]] = []
    for name in ("_stage1_step", "_critic_step", "_generator_step"):
        step = getattr(trainer, name)
        monkeypatch.setattr(
            trainer, name, lambda *a, _n=name, _s=step: (calls.append((trainer.state.iteration, _n)), _s(*a))[1]
        )
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    assert [trainer.phase_of(i) for i in range(1, 7)] == ["stage1"] * 2 + ["critic_pretrain"] * 2 + ["joint"] * 2
    assert calls == [
        (1, "_stage1_step"),
        (2, "_stage1_step"),
        (3, "_critic_step"),
        (4, "_critic_step"),
        (5, "_critic_step"),
        (5, "_generator_step"),
        (6, "_critic_step"),
        (6, "_generator_step"),
    ]
    assert [o["stage"] for o in outputs] == [1, 1, 2, 2, 2, 2]
    # critic pre-training: the critic's loss under its own name, no generator ``loss``
    assert all("d_loss" in o and "loss" not in o and "g_total" not in o for o in outputs[2:4])
    assert all(o["loss"] == o["g_total"] and "d_loss" in o for o in outputs[4:])
    trainer.adv_weight = 0.0  # the "SAN alone" ablation trains no critic, so it has no critic pre-training
    assert [trainer.phase_of(i) for i in (2, 3, 4)] == ["stage1", "joint", "joint"]


def test_best_metric_of_the_evaluator_is_the_selection_metric_of_the_current_stage(tiny_setup, tmp_path):
    from ignite.engine import Engine

    from scripts.engines.best_checkpoint import split_metrics

    with pytest.raises(ValueError, match="stage_clock"):
        StageBestCheckpoint(tmp_path, tiny_setup[0], stage_clock=None)
    clock = StageClock(2)
    saver = StageBestCheckpoint(tmp_path, tiny_setup[0], stage_clock=clock, metric_name="val_score")
    evaluator = Engine(lambda e, b: None)
    evaluator.state.key_metric_name, evaluator.state.best_metric, evaluator.state.best_metric_epoch = (
        "val_score",
        -1,
        -1,
    )
    clock.iteration, evaluator.state.epoch, evaluator.state.metrics = 2, 1, {"val_score": 30.0}
    saver.key_metric_of_stage(evaluator)
    saver(evaluator)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 30.0, 1  # MONAI's comparison did the same
    clock.iteration, evaluator.state.epoch = 3, 2  # stage 2: no best yet, whatever stage 1 reached
    saver.key_metric_of_stage(evaluator)
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (-1, -1)
    evaluator.state.metrics = {"val_score": 25.0}
    saver(evaluator)
    assert saver.best == {1: 30.0, 2: 25.0} and (tmp_path / "model.pt").is_file()
    resumed = StageBestCheckpoint(tmp_path, tiny_setup[0], stage_clock=clock, metric_name="val_score")
    resumed.load_state_dict(saver.state_dict())
    resumed.key_metric_of_stage(evaluator)
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (25.0, 2)
    evaluator.state.key_metric_name = "val_psnr"  # another key metric: MONAI's own best is left alone
    evaluator.state.best_metric = 31.0
    resumed.key_metric_of_stage(evaluator)
    assert evaluator.state.best_metric == 31.0
    key, others = split_metrics({"val_psnr": 1, "val_score": 2, "val_ssim": 3}, "val_score")
    assert key == {"val_score": 2} and others == {"val_psnr": 1, "val_ssim": 3}
    with pytest.raises(ValueError, match="selection_metric 'psnr' is not a validation metric"):
        split_metrics({"val_psnr": 1}, "psnr")


def test_monitoring_logs_style_statistics_and_term_gradient_norms(tiny_setup):
    gen, critic, batches, _, _ = tiny_setup
    trainer = UniPETTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=2,
        train_data_loader=batches,
        generator=gen,
        g_optimizer=torch.optim.AdamW(gen.parameters(), lr=1e-3),
        critic=critic,
        d_optimizer=torch.optim.AdamW(critic.parameters(), lr=1e-3),
        stage1_iterations=1,
        align_loss=StyleAlignmentLoss(),
        critic_loss=RALSCriticLoss(),
        adv_loss=RALSGeneratorLoss(),
        mask_fn=lambda x: torch.ones_like(x),
        regional_loss=RegionalSUVLoss((3, 5)),
        regional_weight=0.5,
        monitor_interval=1,
    )
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    s1, s2 = outputs
    assert s1["grad_l1"] > 0 and s1["grad_regional"] > 0 and "style_abs_b0" not in s1
    for key in ("grad_l1", "grad_align", "grad_adv", "grad_regional", "g_regional"):
        assert key in s2 and s2[key] >= 0, key
    assert {f"style_abs_b{i}" for i in range(2)} <= set(s2) and {f"style_spread_b{i}" for i in range(2)} <= set(s2)
    assert loss_terms(s2)["grad_adv"] == s2["grad_adv"]  # reaches the Stats/TensorBoard handlers
    with pytest.raises(ValueError, match="regional_loss"):
        UniPETTrainer(
            device="cpu",
            max_epochs=1,
            epoch_length=1,
            train_data_loader=batches,
            generator=gen,
            g_optimizer=torch.optim.AdamW(gen.parameters()),
            stage1_iterations=1,
            regional_weight=1.0,
        )


def test_style_statistics_see_a_dead_and_a_live_san():
    torch.manual_seed(0)
    net = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    x = torch.rand(3, 1, 16, 16, 16) * torch.tensor([0.1, 1.0, 3.0]).reshape(3, 1, 1, 1, 1)
    dead = style_statistics(net, x)
    assert dead["style_abs_b0"] == 0 and dead["style_spread_b0"] == 0  # zero-initialised style layers
    with torch.no_grad():
        for block in net.blocks:
            block.style_affine.weight.normal_(0, 0.5)
    live = style_statistics(net, x)
    assert live["style_abs_b0"] > 0 and live["style_spread_b0"] > 0


def _one_regional_step(batch: dict, loss, **knobs) -> tuple[float, UniPET]:
    """One stage-1 iteration (learning rate 0) of a fresh tiny UniPET whose output is not the identity, with the
    regional term at weight 1 and ``knobs``; returns the unweighted regional term and the generator."""
    torch.manual_seed(0)
    g = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    with torch.no_grad():
        g.output_conv.weight.normal_(0, 0.05)  # not the identity: a non-zero regional error
    trainer = UniPETTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=1,
        train_data_loader=[batch],
        generator=g,
        g_optimizer=torch.optim.SGD(g.parameters(), lr=0.0),
        stage1_iterations=1,
        regional_loss=loss,
        regional_weight=1.0,
        **knobs,
    )
    trainer.run()
    return trainer.state.output["g_regional"], g


def test_regional_term_is_weighted_by_each_patchs_drf(tiny_setup):
    """regional_drf_exponent (0.5.2): each patch's regional term weighs (drf / reference) ** -exponent, from the
    batch's 'drf' key; without that key the trainer refuses instead of assuming a DRF."""
    from scripts.losses.regional import RegionalSUVLoss

    *_, low, full = tiny_setup
    drf = torch.tensor([4.0, 100.0])
    loss = RegionalSUVLoss((3, 5), max_focus=2.0)

    def g_regional(exponent: float, batch: dict) -> tuple[float, UniPET]:
        return _one_regional_step(batch, loss, regional_drf_exponent=exponent)

    batch = {"image": low, "label": full, "drf": drf}
    plain, g = g_regional(0.0, batch)
    weighted, _ = g_regional(0.5, batch)
    with torch.no_grad():
        pred = g(low)
    per_item = [float(loss(pred[i : i + 1], full[i : i + 1])) for i in range(2)]
    assert abs(plain - float(loss(pred, full))) < 1e-6
    # item weights 1 and (100 / 4) ** -0.5 = 0.2; the focus weights are normalised over the batch, so compare
    # with the loss's own sample_weight rather than with single-item losses
    assert abs(weighted - float(loss(pred, full, sample_weight=torch.tensor([1.0, 0.2])))) < 1e-6
    assert weighted < plain and per_item[1] > 0
    named, _ = g_regional(0.5, {"image": low, "label": full, "drf": ["4", "drf_100"]})  # datalist spellings
    assert abs(named - weighted) < 1e-9
    with pytest.raises(ValueError, match="'drf' key"):
        g_regional(0.5, {"image": low, "label": full})
    with pytest.raises(ValueError, match="regional_drf_exponent"):
        g_regional(-1.0, batch)


def test_regional_term_is_weighted_by_the_noise_each_patch_shows(tiny_setup):
    """regional_noise_exponent (0.5.4): each patch's regional term weighs min(1, (sigma / reference) ** -exponent),
    sigma = std(low - full) over the patch, and multiplies the DRF weight when both are set."""
    from scripts.losses.regional import RegionalSUVLoss

    *_, low, full = tiny_setup
    loss = RegionalSUVLoss((3, 5), max_focus=2.0)
    noisy = full + 0.2 * torch.randn_like(full)  # patch 1 much noisier than patch 0
    low2 = torch.cat([low[:1], noisy[1:]])
    sigma = (low2 - full).flatten(1).std(dim=1)
    assert sigma[1] > 2 * sigma[0]
    ref = float(sigma[0]) * 2.0  # patch 0 is below the reference (weight capped at 1), patch 1 above it

    def run(batch: dict, **knobs) -> tuple[float, UniPET]:
        return _one_regional_step(batch, loss, **knobs)

    batch = {"image": low2, "label": full, "drf": torch.tensor([4.0, 100.0])}
    # the noise weight needs no DRF: a batch without one is fine
    weighted, g = run({"image": low2, "label": full}, regional_noise_exponent=1.0, regional_noise_reference=ref)
    with torch.no_grad():
        pred = g(low2)
    expected = torch.tensor([1.0, ref / float(sigma[1])])
    assert abs(weighted - float(loss(pred, full, sample_weight=expected))) < 1e-6
    plain, _ = run(batch)
    assert abs(plain - float(loss(pred, full))) < 1e-6 and abs(weighted - plain) > 1e-6
    both, _ = run(batch, regional_noise_exponent=1.0, regional_noise_reference=ref, regional_drf_exponent=0.5)
    assert abs(both - float(loss(pred, full, sample_weight=expected * torch.tensor([1.0, 0.2])))) < 1e-6
    for bad in ({"regional_noise_exponent": -1.0}, {"regional_noise_reference": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            run(batch, **bad)


def test_train_json_hands_the_noise_weighting_to_the_trainer_in_its_units():
    """The config gives the reference in SUV; the trainer works in normalised SUV (divided by suv_max)."""
    parser = bundle_parser(("train.json",), regional_noise_exponent=2.0, regional_noise_reference_suv=0.5, suv_max=25.0)
    assert parser.get_parsed_content("train#trainer#regional_noise_exponent") == 2.0
    assert abs(parser.get_parsed_content("train#trainer#regional_noise_reference") - 0.02) < 1e-12
    assert bundle_parser(("train.json",)).get_parsed_content("regional_noise_exponent") == 0.0  # off by default


def test_stage2_dose_balance_switches_the_sampler_at_the_stage_boundary_and_after_a_resume(tiny_setup):
    """stage2_dose_balance (0.5.3): each epoch is drawn by its stage's sampler. The trainer syncs the stage clock
    when an epoch starts, so the first epoch of a run resumed in stage 2 is drawn by stage 2's sampler too (the
    clock of a fresh process says iteration 0 until the first iteration ran)."""
    from scripts.data.training_data import StageDoseSampler

    gen, critic, _, low, full = tiny_setup
    log: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __len__(self) -> int:
            return 4

        def __iter__(self):
            log.append(self.name)
            return iter(range(4))

    def run(resume_at: int = 0) -> list[str]:
        log.clear()
        clock = StageClock(4)  # 2 epochs of 2 iterations in stage 1, then stage 2
        loader = torch.utils.data.DataLoader(
            [{"image": low[0], "label": full[0]}] * 4,
            batch_size=2,
            sampler=StageDoseSampler(Recorder("stage1"), Recorder("stage2"), clock),
        )
        trainer = _trainer(gen, critic, loader, stage1=4, total=2, pretrain=1, max_epochs=3, stage_clock=clock)
        if resume_at:  # what MONAI's CheckpointLoader restores
            trainer.state.iteration, trainer.state.epoch = resume_at, resume_at // 2
        trainer.run()
        return list(log)

    assert run() == ["stage1", "stage1", "stage2"]
    assert run(resume_at=4) == ["stage2"]


def test_stage2_is_drawn_by_its_sampler_from_its_first_iteration_when_a_pass_spans_epochs(tiny_setup):
    """Ignite keeps one data iterator across epochs until a pass over the data ends: with 3 batches per pass and
    2 iterations per epoch, the pass started at iteration 4 (stage 1) would still serve iterations 5 and 6 (stage
    2). The trainer starts a new pass after the last stage-1 iteration, so they come from stage 2's sampler."""
    from ignite.engine import Events

    from scripts.data.training_data import StageDoseSampler

    gen, critic, _, low, _ = tiny_setup
    items = [{"image": torch.full_like(low[0], 0.01 * i), "label": torch.full_like(low[0], 0.01 * i)} for i in range(6)]
    clock = StageClock(4)
    loader = torch.utils.data.DataLoader(
        items, batch_size=2, sampler=StageDoseSampler([0, 1, 2, 0, 1, 2], [3, 4, 5, 3, 4, 5], clock)
    )
    # 2 epochs of 2 iterations in stage 1, then stage 2
    trainer = _trainer(gen, critic, loader, stage1=4, total=2, pretrain=1, max_epochs=3, stage_clock=clock)
    drawn: dict[int, set[int]] = {}
    trainer.add_event_handler(
        Events.ITERATION_STARTED,
        lambda e: drawn.setdefault(
            e.state.iteration, {round(float(v) * 100) for v in e.state.batch["image"][:, 0, 0, 0, 0]}
        ),
    )
    trainer.run()
    assert set(drawn) == set(range(1, 7))
    assert all(drawn[i] <= {0, 1, 2} for i in range(1, 5)), drawn
    assert all(drawn[i] <= {3, 4, 5} for i in range(5, 7)), drawn


def test_default_config_samples_stage2_dose_balanced_with_the_trainers_clock():
    """The shipped recipe is train.json's default (0.5.3): uniform stage 1, stage 2 drawn ~ DRF^-0.5, the switch
    read from the one stage clock the trainer also uses."""
    from monai.bundle import ConfigParser

    from scripts.data.training_data import StageDoseSampler

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    assert (parser["dose_balance"], parser["stage2_dose_balance"]) == (0.0, 0.5)
    parser["train#datalist"] = [{"drf": 4}, {"drf": 100}]
    sampler = parser.get_parsed_content("train#sampler")
    assert isinstance(sampler, StageDoseSampler)
    assert sampler.stage_clock is parser.get_parsed_content("stage_clock")
    assert isinstance(sampler.stage2, torch.utils.data.WeightedRandomSampler)
    np.testing.assert_allclose(sampler.stage2.weights.numpy(), [4**-0.5, 100**-0.5], rtol=1e-6)
    assert parser.get_parsed_content("train#dataloader#shuffle") is False
