"""Precision (fp32 / bf16 autocast) for inference and training: the wrapper, the fallback, the trainer, the configs."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT
from scripts.common.errors import UniPETInputError
from scripts.engines import precision as P
from scripts.engines.gan_trainer import UniPETTrainer
from scripts.losses.align import StyleAlignmentLoss
from scripts.losses.rals import RALSCriticLoss, RALSGeneratorLoss
from scripts.networks.critic import PatchCritic
from scripts.networks.unipet import UniPET

X86_WITH = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n"
X86_WITHOUT = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
ARM_WITH = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.fixture()
def bf16_cpu(monkeypatch):
    """Pretend the CPU has native bf16, so the bf16 paths are tested on any machine."""
    monkeypatch.setattr(P, "cpu_bf16_support", lambda cpuinfo=None: (True, "test"))


@pytest.fixture()
def no_bf16_cpu(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_support", lambda cpuinfo=None: (False, "the test CPU lacks native bf16"))
    P._logged.clear()


def _net(perturb: bool = True) -> UniPET:
    torch.manual_seed(0)
    net = UniPET(channels=8, num_blocks=2, latent_dim=8, san_channels=(8, 8), zero_init_output=not perturb)
    if perturb:  # a non-identity network, as a trained one is: style layers and output conv off zero
        with torch.no_grad():
            for blk in net.blocks:
                blk.style_affine.weight.normal_(0, 0.1)
    return net.eval()


class DtypeRecorder:
    """Forward hooks on every Conv3d: the dtypes the convolutions ran in."""

    def __init__(self, net: torch.nn.Module):
        self.dtypes: set[torch.dtype] = set()
        self.handles = [m.register_forward_hook(self._hook) for m in net.modules() if isinstance(m, torch.nn.Conv3d)]

    def _hook(self, module, args, out):
        self.dtypes.add(out.dtype)


# ---------------------------------------------------------------------------------- detection, checks
def test_check_precision_accepts_the_two_names_and_refuses_others():
    assert P.check_precision(" BF16 ") == "bf16"
    assert P.check_precision("fp32") == "fp32"
    for bad in ("fp16", "float32", "", None, 16):
        with pytest.raises(UniPETInputError, match="precision must be one of"):
            P.check_precision(bad)


def test_cpu_bf16_support_reads_the_flags():
    assert P.cpu_bf16_support(X86_WITH) == (True, "CPU flags avx512_bf16")
    assert P.cpu_bf16_support(ARM_WITH)[0] is True
    ok, reason = P.cpu_bf16_support(X86_WITHOUT)
    assert not ok and "lacks native bf16" in reason
    assert P.cpu_bf16_support("")[0] is False


def test_resolve_precision_falls_back_to_fp32_with_one_log_line(caplog):
    P._logged.clear()
    with caplog.at_level(logging.WARNING, logger=P.logger.name):
        assert P.resolve_precision("bf16", "cpu", cpuinfo=X86_WITHOUT) == "fp32"
        assert P.resolve_precision("bf16", "cpu", cpuinfo=X86_WITHOUT) == "fp32"
    lines = [r.getMessage() for r in caplog.records if r.name == P.logger.name]
    assert len(lines) == 1 and "running in fp32" in lines[0] and "lacks native bf16" in lines[0]
    assert P.resolve_precision("bf16", "cpu", cpuinfo=X86_WITH) == "bf16"
    assert P.resolve_precision("fp32", "cpu", cpuinfo=X86_WITH) == "fp32"


# ------------------------------------------------------------------------------------------ inference
def test_precision_network_bf16_runs_convs_in_bf16_and_returns_float32(bf16_cpu):
    net = _net()
    wrapped = P.PrecisionNetwork(net, "bf16", "cpu")
    assert wrapped.precision == "bf16"
    rec = DtypeRecorder(net)
    x = torch.rand(2, 1, 16, 16, 16) * 0.3
    with torch.no_grad():
        ref = net(x)
        rec.dtypes.clear()
        out = wrapped(x)
    assert rec.dtypes == {torch.bfloat16}  # autocast really ran
    assert out.dtype == torch.float32 and out.shape == x.shape
    diff = (out - ref).abs()
    assert 0 < float(diff.max()) < 0.01  # rounding, no more (normalised SUV: < 0.2 SUV at suv_max 20)
    assert all(p.dtype == torch.float32 for p in net.parameters())  # weights untouched


def test_precision_network_bf16_keeps_the_input_level_exactly(bf16_cpu):
    """The global skip adds the float32 input: an identity network (zero output conv) returns it bit-exactly,
    so bf16 never rounds the SUV level itself, only the network's correction (a flat volume stays flat)."""
    net = _net(perturb=False)
    x = torch.full((1, 1, 16, 16, 16), 2.0 / 20.0) + torch.rand(1, 1, 16, 16, 16) * 1e-3
    with torch.no_grad():
        out = P.PrecisionNetwork(net, "bf16", "cpu")(x)
    assert torch.equal(out, x)


def test_precision_network_without_native_bf16_is_exactly_fp32(no_bf16_cpu, caplog):
    net = _net()
    with caplog.at_level(logging.WARNING, logger=P.logger.name):
        wrapped = P.PrecisionNetwork(net, "bf16", "cpu")
    assert wrapped.precision == "fp32" and wrapped.requested_precision == "bf16"
    assert any("running in fp32" in r.getMessage() for r in caplog.records)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(wrapped(x), net(x))


# ------------------------------------------------------------------------------------------- training
def _trainer(precision="fp32", mixed_precision=None, stage1=1, total=2):
    torch.manual_seed(0)
    gen = UniPET(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))
    critic = PatchCritic(channels=(4, 8))
    low = torch.rand(2, 1, 16, 16, 16) * 0.3
    batches = [{"image": low, "label": low + 0.05 * torch.rand_like(low)}] * total
    return UniPETTrainer(
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
        critic_loss=RALSCriticLoss(),
        adv_loss=RALSGeneratorLoss(),
        mask_fn=lambda x: torch.ones_like(x),
        critic_pretrain_iterations=0,
        precision=precision,
        mixed_precision=mixed_precision,
    )


def test_trainer_bf16_on_cpu_autocasts_both_stages_with_float32_losses_and_weights(bf16_cpu):
    trainer = _trainer("bf16")
    assert trainer.precision == "bf16"
    rec_g, rec_d = DtypeRecorder(trainer.generator), DtypeRecorder(trainer.critic)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    assert [o["stage"] for o in outputs] == [1, 2]
    assert rec_g.dtypes == {torch.bfloat16} and rec_d.dtypes == {torch.bfloat16}
    for o in outputs:
        assert o["pred"].dtype == torch.float32
        for k in ("loss", "g_l1"):
            assert isinstance(o[k], float) and torch.isfinite(torch.tensor(o[k]))
    assert all(p.dtype == torch.float32 for p in trainer.generator.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.critic.parameters())


def test_trainer_fp32_and_fallback_never_autocast(no_bf16_cpu):
    for trainer in (_trainer("fp32"), _trainer("bf16")):
        assert trainer.precision == "fp32"
        rec = DtypeRecorder(trainer.generator)
        trainer.run()
        assert rec.dtypes == {torch.float32}


def test_trainer_legacy_mixed_precision_keeps_its_meaning(bf16_cpu):
    # mixed_precision True was "bf16 on CUDA, ignored on the CPU"; an explicit False disables bf16
    assert _trainer("bf16", mixed_precision=True).precision == "fp32"
    assert _trainer("bf16", mixed_precision=False).precision == "fp32"
    assert _trainer("bf16", mixed_precision=None).precision == "bf16"
    with pytest.raises(UniPETInputError, match="precision must be one of"):
        _trainer("half")


# -------------------------------------------------------------------------------------------- configs
def _parser(files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in files])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["device"] = "$torch.device('cpu')"
    for k, v in overrides.items():
        parser[k] = v
    return parser


@pytest.mark.parametrize("files", [["inference.json"], ["train.json"], ["train.json", "evaluate.json"]])
def test_configs_have_a_precision_key_that_reaches_the_network(files, bf16_cpu):
    key = "inference_network" if files == ["inference.json"] else "validate#evaluator#network"
    parser = _parser(files)
    assert parser["precision"] in P.PRECISIONS
    for precision in P.PRECISIONS:
        parser = _parser(files, precision=precision)
        net = parser.get_parsed_content(key)
        assert isinstance(net, P.PrecisionNetwork) and net.precision == precision
    with pytest.raises(Exception) as info:
        _parser(files, precision="fp16").get_parsed_content(key)
    chain, exc = [], info.value
    while exc is not None:  # MONAI wraps the instantiation error; the bundle's error hook prints the cause
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, UniPETInputError) and "precision must be one of" in str(e) for e in chain)


def test_train_config_passes_precision_to_the_trainer():
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    trainer_cfg = parser.config["train"]["trainer"]
    assert trainer_cfg["precision"] == "@precision" and trainer_cfg["mixed_precision"] == "@mixed_precision"
    assert parser.config["mixed_precision"] is None  # deprecated: defers to precision


def test_rals_losses_reduce_critic_scores_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    critic = PatchCritic(channels=(4, 8))
    real = torch.rand(2, 1, 16, 16, 16)
    fake = real + 0.05 * torch.rand_like(real)
    mask = torch.ones_like(real)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = RALSCriticLoss()(critic, real, fake, mask)
        adv = RALSGeneratorLoss()(critic, fake, mask)
    assert loss.dtype == torch.float32 and adv.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in terms.values())


def test_inference_sidecar_records_the_precision_that_ran(no_bf16_cpu):
    """The output's processing record says what arithmetic made it: the resolved precision, not the request."""
    parser = _parser(["inference.json"], precision="bf16")
    transforms = parser.config["postprocessing"]["transforms"]
    idx = next(i for i, t in enumerate(transforms) if isinstance(t, dict) and "processing" in t)
    assert parser.get_parsed_content(f"postprocessing#transforms#{idx}#processing#precision") == "fp32"


def _bench_result(lesion_changes: list[float]) -> dict:
    """A precision-benchmark result that passes every threshold of RULE, with the given lesion changes (%)."""
    return {
        "ran_as": {"bf16": "bf16"},
        "inference": {"volume_speedup": 1.3},
        "training": {"min_speedup": 1.6},
        "accuracy": {
            "psnr_change_db": -0.01,
            "max_rel_voxel_diff": 0.01,
            "max_abs_lesion_suvmax_change_pct": max(abs(c) for c in lesion_changes),
            "max_abs_organ_mean_change_pct": 0.05,
            "lesions": [{"change_pct": c} for c in lesion_changes],
        },
    }


def test_inference_default_refuses_bf16_when_every_lesion_moves_the_same_way():
    from scripts.benchmarks.precision import choose_default, choose_inference_default

    one_way = _bench_result([-0.04, -0.2, -0.5, -0.79])
    assert choose_default(one_way)[0] == "bf16"  # training: the thresholds alone
    default, reason = choose_inference_default(one_way)
    assert default == "fp32" and "systematic" in reason and "lower" in reason
    assert choose_inference_default(_bench_result([-0.04, 0.2, -0.5, 0.3]))[0] == "bf16"  # mixed signs: noise
    assert choose_inference_default(_bench_result([-0.1, -0.2]))[0] == "bf16"  # too few lesions to call a sign
    failing = _bench_result([-0.1, 0.1, -0.1, 0.1])
    failing["inference"]["volume_speedup"] = 1.0
    assert choose_inference_default(failing)[0] == "fp32"


def test_shipped_defaults_follow_the_measurement_rules():
    """Inference defaults to fp32 (bf16 moved every lesion down on the demo phantom), training to bf16."""
    for name, expected in (("inference.json", "fp32"), ("train.json", "bf16")):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE_ROOT / "configs" / name))
        assert parser["precision"] == expected, name
