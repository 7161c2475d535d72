"""Interrupted training: SIGKILL mid-run, resume, and end exactly where an uninterrupted run ends.

Two kinds of evidence:

1. ``monai.bundle run`` of configs/train.json killed with SIGKILL twice (once in stage 1, once in stage 2
   after the critic pre-training), resumed each time: every resumed run starts with the iteration after
   the checkpointed one, the iterations are contiguous, and the final checkpoint has the same iteration
   count, AdamW step counts (generator and critic, per parameter) and scheduler position as an
   uninterrupted run of the same config. The checkpoint read right after each kill always loads (atomic).
2. In-process, with the randomness of each iteration pinned to its number: a run interrupted after
   iteration 4 and resumed into fresh networks and optimisers gives the same losses for iterations 5-6 and
   the same final weights and optimiser states as the uninterrupted run, so generator, critic and both
   optimisers' states (AdamW moments, not just step counts) are restored exactly.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from test_training import make_pairs, train_args

from conftest import BUNDLE_ROOT
from scripts.common.errors import CheckpointError
from scripts.common.weights import load_checkpoint
from scripts.engines.checkpoint import LatestCheckpoint
from scripts.engines.gan_trainer import UniPETTrainer
from scripts.losses.align import StyleAlignmentLoss
from scripts.losses.rals import RALSCriticLoss, RALSGeneratorLoss
from scripts.networks.critic import PatchCritic
from scripts.networks.unipet import UniPET

EPOCHS, EPOCH_LENGTH, PRETRAIN = 2, 10, 2
TOTAL = EPOCHS * EPOCH_LENGTH
STAGE1 = EPOCH_LENGTH  # stage1_epochs 1
KILL_AT = (3, STAGE1 + PRETRAIN + 2)  # one kill in stage 1, one in joint stage 2
SCHEDULE = dict(
    epochs=EPOCHS,
    epoch_length=EPOCH_LENGTH,
    stage1_epochs=1,
    critic_pretrain_iterations=PRETRAIN,
    val_interval=5,
    val_fraction=0,
)
ITER_LINE = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- (.*)")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds spin-waiting on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(data: Path, ckpt: Path, out: Path) -> list[str]:
    return train_args(data, ckpt, out, **SCHEDULE)


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=BUNDLE_ROOT,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )


def _iteration(ckpt: Path) -> int:
    return int(load_checkpoint(ckpt)["trainer"]["iteration"])


def _run_and_kill(args: list[str], ckpt: Path, at: int, log: Path, timeout: float = 120.0) -> int:
    """Start a training run, SIGKILL it once it has logged iteration ``at``; return the checkpoint's iteration."""
    proc = _start(args, log)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            done = _logged_iterations(log.read_text(errors="replace"))
            if done and done[-1][0] >= at:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself ({proc.returncode}): {log.read_text()[-2000:]}"
    saved = _iteration(ckpt)  # must load: the kill can never leave a half-written checkpoint
    assert at - 1 <= saved < TOTAL, saved
    return saved


def _logged_iterations(text: str) -> list[tuple[int, str]]:
    """(global iteration, logged terms) of every StatsHandler iteration line."""
    out = []
    for epoch, it, length, terms in ITER_LINE.findall(text):
        out.append(((int(epoch) - 1) * int(length) + int(it), terms))
    return out


def _adam_steps(optimizer_state: dict) -> dict[int, float]:
    return {int(k): float(v["step"]) for k, v in optimizer_state["state"].items()}


def _final_state(ckpt: Path) -> dict:
    state = load_checkpoint(ckpt)
    return {
        "iteration": int(state["trainer"]["iteration"]),
        "g_steps": _adam_steps(state["g_optimizer"]),
        "d_steps": _adam_steps(state["d_optimizer"]),
        "scheduler_epoch": int(state["lr_scheduler"]["last_epoch"]),
    }


def _uninterrupted(data: Path, ckpt: Path, out: Path) -> dict:
    """The same config, uninterrupted, in-process (saves an interpreter start)."""
    from monai.bundle import ConfigWorkflow

    cli = _args(data, ckpt, out)[2:]
    overrides = {}
    for key, value in zip(cli[::2], cli[1::2]):
        try:
            overrides[key[2:]] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a path
            overrides[key[2:]] = value
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_ROOT / "configs" / "train.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(BUNDLE_ROOT),
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return _final_state(ckpt / "checkpoint_latest.pt")


@pytest.mark.slow
def test_sigkill_twice_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    data = make_pairs(tmp_path / "pairs", n_subjects=2)
    reference = _uninterrupted(data, tmp_path / "ref_ckpt", tmp_path / "ref_out")
    joint = TOTAL - STAGE1 - PRETRAIN
    assert reference["iteration"] == TOTAL and reference["scheduler_epoch"] == TOTAL
    assert (
        max(reference["g_steps"].values()) == STAGE1 + joint and max(reference["d_steps"].values()) == PRETRAIN + joint
    )

    ckpt_dir, out = tmp_path / "ckpt", tmp_path / "out"
    ckpt, args = ckpt_dir / "checkpoint_latest.pt", _args(data, ckpt_dir, out)
    saved = _run_and_kill(args, ckpt, KILL_AT[0], tmp_path / "run0.log")
    for cycle, at in enumerate(KILL_AT[1:], start=1):
        log = tmp_path / f"run{cycle}.log"
        new_saved = _run_and_kill(args, ckpt, at, log)
        lines = _logged_iterations(log.read_text())
        assert lines[0][0] == saved + 1, f"cycle {cycle}: resumed at {lines[0][0]}, checkpoint was at {saved}"
        assert f"iteration {saved}" in log.read_text()
        saved = new_saved
    log = tmp_path / "final.log"
    final = _start(args, log)
    final.wait(timeout=300)
    text = log.read_text()
    assert final.returncode == 0, text[-3000:]
    lines = _logged_iterations(text)
    assert [it for it, _ in lines] == list(range(saved + 1, TOTAL + 1)), (
        "iterations must continue without gap or repeat"
    )
    first_terms = lines[0][1]
    assert "g_adv" in first_terms and "g_l1" in first_terms, "joint stage 2 must continue (no new critic pre-training)"
    losses = [float(m) for _, terms in lines for m in re.findall(r"(?<!_)loss: ([-\d.e+]+)", terms)]
    assert losses and np.all(np.isfinite(losses))

    assert _final_state(ckpt) == reference, "the resumed chain must end with the uninterrupted run's counters"
    assert not list(ckpt_dir.glob(".*.tmp*")), "temporary files of killed saves must be cleaned up"


# --------------------------------------------------------------------------------------------------
# exact continuation, in-process
# --------------------------------------------------------------------------------------------------
class _Killed(Exception):
    pass


def _build(seed: int, ckpt_dir: Path, kill_after: int | None = None) -> tuple[UniPETTrainer, dict, dict]:
    torch.manual_seed(seed)  # fresh weights differ per seed: resuming must overwrite them
    gen = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    critic = PatchCritic(channels=(4, 8))
    g_opt, d_opt = torch.optim.AdamW(gen.parameters(), lr=1e-2), torch.optim.AdamW(critic.parameters(), lr=1e-2)
    rng = torch.Generator().manual_seed(0)
    low = torch.rand(1, 1, 12, 12, 12, generator=rng) * 0.3
    batches = [{"image": low, "label": low + 0.1 * torch.rand(low.shape, generator=rng)}] * 6
    trainer = UniPETTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=6,
        train_data_loader=batches,
        generator=gen,
        g_optimizer=g_opt,
        critic=critic,
        d_optimizer=d_opt,
        stage1_iterations=2,
        align_loss=StyleAlignmentLoss(),
        critic_loss=RALSCriticLoss(),
        adv_loss=RALSGeneratorLoss(),
        mask_fn=lambda x: torch.ones_like(x),
        critic_pretrain_iterations=1,
    )
    losses: dict[int, float] = {}
    # the GP interpolation draws random numbers: pin them to the iteration so runs are comparable
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: torch.manual_seed(1000 + e.state.iteration))
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: losses.__setitem__(
            e.state.iteration, float(e.state.output.get("loss", e.state.output.get("d_loss")))
        ),
    )
    if kill_after is not None:

        def kill(engine):
            if engine.state.iteration == kill_after + 1:
                raise _Killed()

        trainer.add_event_handler(Events.ITERATION_STARTED, kill)
    objects = {"generator": gen, "critic": critic, "g_optimizer": g_opt, "d_optimizer": d_opt, "trainer": trainer}
    LatestCheckpoint(ckpt_dir, objects, save_interval=1).attach(trainer)
    return trainer, objects, losses


def test_resume_continues_the_losses_and_states_exactly(tmp_path):
    ref, ref_objects, ref_losses = _build(0, tmp_path / "ref")
    ref.run()
    assert sorted(ref_losses) == list(range(1, 7))

    first, _, first_losses = _build(0, tmp_path / "cut", kill_after=4)
    with pytest.raises(_Killed):
        first.run()
    assert sorted(first_losses) == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "cut" / "checkpoint_latest.pt")["trainer"]["iteration"] == 4

    resumed, objects, losses = _build(123, tmp_path / "cut")  # other initial weights: all must come from the file
    resumed.run()
    assert sorted(losses) == [5, 6], "the resumed run must start with iteration 5"
    for it in (5, 6):  # joint stage 2: generator, critic and both optimisers' moments are in play
        assert losses[it] == pytest.approx(ref_losses[it], rel=1e-5, abs=1e-7), it
    for name in ("generator", "critic"):
        for (key, a), b in zip(ref_objects[name].state_dict().items(), objects[name].state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"{name}.{key}")
    for name in ("g_optimizer", "d_optimizer"):
        ref_state, state = ref_objects[name].state_dict()["state"], objects[name].state_dict()["state"]
        assert ref_state.keys() == state.keys()
        for idx in ref_state:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(
                    state[idx][key], ref_state[idx][key], rtol=1e-5, atol=1e-8, msg=f"{name}[{idx}].{key}"
                )


# ------------------------------------------------------------------------- branching from another run
def _run_parent(folder: Path) -> Path:
    """A 4-iteration run whose state at iteration 2 is kept as a snapshot; returns the snapshot."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = Engine(lambda e, b: opt.step())
    LatestCheckpoint(
        folder, {"generator": net, "g_optimizer": opt, "trainer": trainer}, save_interval=1, snapshot_iterations=[2]
    ).attach(trainer)
    trainer.run([0] * 4, max_epochs=1)
    return folder / "checkpoint_iter000002.pt"


def test_branching_from_a_snapshot_and_its_refusals(tmp_path):
    snapshot = _run_parent(tmp_path / "parent")
    assert load_checkpoint(snapshot)["trainer"]["iteration"] == 2

    def child(folder, init, **kw):
        net, trainer = torch.nn.Linear(3, 1), Engine(lambda e, b: None)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        LatestCheckpoint(
            folder,
            {"generator": net, "g_optimizer": opt, "trainer": trainer},
            init_checkpoint=init,
            protect=["model.pt"],
            **kw,
        ).attach(trainer)
        return net, trainer

    net, trainer = child(tmp_path / "branch", snapshot)
    trainer.run([0] * 4, max_epochs=1)
    assert trainer.state.iteration == 4, "the branch goes on from iteration 3"
    torch.testing.assert_close(net.weight, load_checkpoint(snapshot)["generator"]["weight"])  # its step is a no-op

    # a branch must not replace the weights of a folder that holds another run's model.pt
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.pt").write_bytes(b"shipped")
    with pytest.raises(CheckpointError, match="already holds model.pt"):
        child(taken, snapshot)
    assert (taken / "model.pt").read_bytes() == b"shipped"
    # weights alone are not a training state: a clear error, not a silent fresh start
    weights = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(3, 1).state_dict(), weights)
    with pytest.raises(CheckpointError, match="not a training checkpoint .*--bdn_ckpt"):
        child(tmp_path / "w", weights)
    with pytest.raises(CheckpointError, match="init_checkpoint .* not found"):
        child(tmp_path / "m", tmp_path / "missing.pt")
    # resume false ignores the folder's own checkpoint but still starts from the given one
    _, trainer = child(tmp_path / "branch", snapshot, resume=False, overwrite=True)
    trainer.run([0] * 4, max_epochs=1)
    assert trainer.state.iteration == 4
