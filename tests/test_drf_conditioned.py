"""UniPET variants: styles from a scalar condition (the DRF-conditioned FiLM "label given" upper bound, the label-free
noise-statistics variant) and the thinning blend (DRF given): networks, batches, trainer and the training config."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from test_training import bundle_run, make_pairs, train_args

from scripts.benchmarks import train_models
from scripts.common.weights import load_checkpoint, load_network_weights
from scripts.engines.batches import PrepareDRFConditionedBatch, batch_drfs, prepare_paired_batch
from scripts.engines.gan_trainer import UniPETTrainer, generator_param_groups
from scripts.losses.rals import RALSCriticLoss, RALSGeneratorLoss
from scripts.networks.critic import PatchCritic
from scripts.networks.drf_conditioned import (
    DRFConditionedUniPET,
    DRFStyleEncoder,
    FixedDRF,
    NoiseConditionedUniPET,
    ThinningBlendUniPET,
    window_noise_features,
)
from scripts.networks.unipet import UniPET

SMALL = dict(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))


def _with_styles(net: DRFConditionedUniPET, seed: int = 0) -> DRFConditionedUniPET:
    """``net`` with non-zero style layers and output conv, so that the DRF changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for block in net.blocks:
            block.style_affine.weight.normal_(0.0, 0.3)
        net.output_conv.weight.normal_(0.0, 0.1)
    return net


def test_fresh_model_is_its_stage1_base_network_at_every_drf():
    torch.manual_seed(0)
    base = UniPET(**SMALL)
    with torch.no_grad():
        base.output_conv.weight.normal_(0.0, 0.1)  # a base network that is not the identity
    net = DRFConditionedUniPET(**SMALL)
    missing = net.load_bdn_state_dict(base.state_dict())  # a UniPET checkpoint: its SAN weights are left out
    assert missing and all(k.startswith("drf_encoder.") for k in missing)
    x = torch.rand(2, 1, 12, 12, 12)
    expected = base.forward_without_styles(x)
    for drf in (torch.tensor([4.0, 100.0]), torch.tensor(20.0)):
        torch.testing.assert_close(net(x, drf), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(net.forward_without_styles(x), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs the DRF of its input"):  # never a silent base network
        net(x)
    assert net.san is None and "drf_encoder.heads.0.weight" in net.state_dict()
    assert not any(k.startswith("san.") for k in net.state_dict())


def test_styles_follow_the_drf_per_item():
    net = _with_styles(DRFConditionedUniPET(**SMALL)).eval()
    x = torch.rand(1, 1, 12, 12, 12).expand(2, 1, 12, 12, 12).contiguous()
    with torch.no_grad():
        both = net(x, torch.tensor([4.0, 100.0]))
        alone = net(x[:1], torch.tensor([100.0]))
        broadcast = net(x, torch.tensor(4.0))  # one DRF for every window of a volume (the sliding window)
    assert (both[0] - both[1]).abs().max() > 1e-3, "DRF 4 and DRF 100 must be denoised differently"
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-6)  # no mixing across the batch
    torch.testing.assert_close(broadcast[0], both[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(FixedDRF(net, 100.0)(x[:1]), alone, rtol=0, atol=1e-6)
    styles = net.block_styles(x, torch.tensor([4.0, 100.0]))
    assert len(styles) == SMALL["num_blocks"] and (styles[0][0] - styles[0][1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs the DRF"):
        net.block_styles(x)


def test_noise_styled_model_reads_its_own_input():
    """Label-free: the styles come from each window's log high-pass std and log mean, so a noisier window of the
    same activity gets other styles, with no DRF anywhere; a fresh model is its stage-1 base network."""
    torch.manual_seed(0)
    base = UniPET(**SMALL)
    with torch.no_grad():
        base.output_conv.weight.normal_(0.0, 0.1)
    net = NoiseConditionedUniPET(**SMALL)
    missing = net.load_bdn_state_dict(base.state_dict())
    assert missing and all(k.startswith("noise_encoder.") for k in missing)
    activity = torch.full((1, 1, 12, 12, 12), 0.1)
    x = torch.cat([activity + 0.005 * torch.randn_like(activity), activity + 0.05 * torch.randn_like(activity)])
    torch.testing.assert_close(net(x), base.forward_without_styles(x), rtol=0, atol=1e-6)
    features = window_noise_features(x)
    assert features.shape == (2, 2) and features[1, 0] - features[0, 0] > 1.5  # log std: 10x the noise
    assert abs(float(features[0, 1] - features[1, 1])) < 0.1  # log mean: the same activity
    assert torch.isfinite(window_noise_features(torch.zeros(1, 1, 8, 8, 8))).all()  # air stays finite
    _with_styles(net)
    styles = net.block_styles(x)
    assert len(styles) == SMALL["num_blocks"] and (styles[0][0] - styles[0][1]).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(net(x)[1:], net(x[1:]), rtol=0, atol=1e-6)  # per window, no batch mixing
    assert not NoiseConditionedUniPET.takes_drf and DRFConditionedUniPET.takes_drf
    style = {n for n, p in net.named_parameters() if any(p is q for q in net.san_parameters())}
    assert style and all(n.startswith("noise_encoder.") or ".style_affine." in n for n in style)


def test_thinning_blend_keeps_one_over_drf_of_the_input_per_item():
    """x / DRF + (1 - 1/DRF) * UniPET(x), each item at its own DRF; the same state dict as UniPET, SAN included."""
    torch.manual_seed(0)
    base = UniPET(**SMALL)
    with torch.no_grad():
        base.output_conv.weight.normal_(0.0, 0.1)
        for block in base.blocks:
            block.style_affine.weight.normal_(0.0, 0.3)
    net = ThinningBlendUniPET(**SMALL)
    net.load_state_dict(base.state_dict())  # strict: a UniPET checkpoint (and training state) loads as it is
    x = torch.rand(2, 1, 12, 12, 12) * 3
    drf = torch.tensor([4.0, 100.0])
    with torch.no_grad():
        y = base(x)
        out = net(x, drf)
        keep = (1.0 / drf).view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(out, keep * x + (1 - keep) * y, rtol=0, atol=1e-6)
        assert float((out - y).abs().max()) > 1e-3  # the blend does something
        torch.testing.assert_close(net(x, torch.tensor(4.0))[0], out[0], rtol=0, atol=1e-6)  # one DRF for all windows
        torch.testing.assert_close(FixedDRF(net, 100.0)(x[1:]), out[1:], rtol=0, atol=1e-6)
        # a flat volume stays flat and at its level whatever the DRF, when the network keeps it
        flat = torch.full((1, 1, 12, 12, 12), 2.0)
        torch.testing.assert_close(ThinningBlendUniPET(**SMALL)(flat, torch.tensor(7.0)), flat, rtol=0, atol=1e-6)
        # the feature tap blends the same way; the styles are the SAN's, whatever the DRF
        tapped, features = net.forward_with_features(x, drf)
        torch.testing.assert_close(tapped, out, rtol=0, atol=1e-6)
        assert len(features) == SMALL["num_blocks"]
        for a, b in zip(net.block_styles(x, drf), base.block_styles(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ThinningBlendUniPET.takes_drf and net.san is not None
    with torch.no_grad():  # the zero-style base network is blended too, and needs the DRF as well
        torch.testing.assert_close(
            net.forward_without_styles(x, drf),
            keep * x + (1 - keep) * base.forward_without_styles(x),
            rtol=0,
            atol=1e-6,
        )
    for call in (net, net.forward_without_styles):
        with pytest.raises(ValueError, match="ThinningBlendUniPET needs the DRF"):
            call(x)
    with pytest.raises(ValueError, match="in_channels must equal out_channels"):
        ThinningBlendUniPET(**SMALL, in_channels=2, out_channels=1)


@pytest.mark.parametrize("network", [DRFConditionedUniPET, ThinningBlendUniPET])
@pytest.mark.parametrize("drf", [torch.tensor([4.0, 0.0]), torch.tensor([4.0, 10.0, 20.0]), torch.tensor(-1.0)])
def test_bad_drf_is_refused(network, drf):
    with pytest.raises(ValueError, match="drf must hold one DRF > 0"):
        network(**SMALL)(torch.rand(2, 1, 8, 8, 8), drf)


def test_bad_settings_are_refused():
    net = DRFConditionedUniPET(**SMALL)
    with pytest.raises(ValueError, match="drf must be > 0"):
        FixedDRF(net, 0.0)
    with pytest.raises(ValueError, match="reference_drf < span_drf"):
        DRFStyleEncoder(2, 8, reference_drf=10.0, span_drf=4.0)
    with pytest.raises(TypeError, match="unknown arguments"):
        DRFConditionedUniPET(**SMALL, san_chanels=(4, 4))


def test_style_parameters_are_the_encoder_and_style_layers():
    net = DRFConditionedUniPET(**SMALL)
    style = {n for n, p in net.named_parameters() if any(p is q for q in net.san_parameters())}
    assert style and all(n.startswith("drf_encoder.") or ".style_affine." in n for n in style)
    assert {n for n in dict(net.named_parameters()) if n.startswith("drf_encoder.")} <= style
    groups = generator_param_groups(net, 2e-4, 1e-4, 1e-3)
    assert [g["name"] for g in groups] == ["bdn", "san"] and len(groups[1]["params"]) == len(style)
    partial = UniPET(**SMALL).state_dict()
    del partial["input_conv.weight"]
    with pytest.raises(KeyError, match="missing BDN keys"):  # leaving the SAN out never hides a missing BDN weight
        net.load_bdn_state_dict(partial)


def test_prepare_batch_reads_each_items_drf():
    image = MetaTensor(torch.rand(2, 1, 4, 4, 4), meta={"filename_or_obj": "x"})
    batch = {"image": image, "label": image + 1, "drf": ["drf_4", "100"]}
    low, full, args, kwargs = PrepareDRFConditionedBatch()(batch, "cpu")
    assert args == () and kwargs["drf"].tolist() == [4.0, 100.0] and kwargs["drf"].dtype == torch.float32
    assert type(low) is torch.Tensor and type(full) is torch.Tensor  # the trainer's plain tensors
    torch.testing.assert_close(low, prepare_paired_batch(batch)[0])
    one = {"image": image[:1], "label": image[:1] + 1, "drf": ["drf_4"]}
    kept, _, _, kept_kwargs = PrepareDRFConditionedBatch(keep_meta=True)(one, "cpu")
    assert kept_kwargs["drf"].tolist() == [4.0]
    assert isinstance(kept, MetaTensor) and kept.meta["filename_or_obj"] == "x"  # the level lock reads its meta
    assert batch_drfs({"drf": torch.tensor([20])}, 1, "x").tolist() == [20.0]
    with pytest.raises(ValueError, match="a DRF-conditioned network needs each item's DRF"):
        PrepareDRFConditionedBatch()({"image": image, "label": image}, "cpu")
    with pytest.raises(ValueError, match="one DRF > 0 per item"):
        PrepareDRFConditionedBatch()({**batch, "drf": [4]}, "cpu")
    with pytest.raises(ValueError, match="one DRF per item"):
        PrepareDRFConditionedBatch()({**batch, "drf": ["high", 4]}, "cpu")
    with pytest.raises(ValueError, match="one volume at a time"):  # the sliding window would mix their windows
        PrepareDRFConditionedBatch(keep_meta=True)(batch, "cpu")


def test_trainer_gives_the_generator_each_patchs_drf():
    torch.manual_seed(0)
    gen = DRFConditionedUniPET(**SMALL)
    seen: list[list[float]] = []
    gen.drf_encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].flatten().tolist()))
    low = torch.rand(2, 1, 16, 16, 16) * 0.3
    batches = [{"image": low, "label": low * 0.5 + 0.1, "drf": ["drf_4", "drf_100"]}] * 20
    trainer = UniPETTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=12,
        train_data_loader=batches,
        generator=gen,
        g_optimizer=torch.optim.AdamW(generator_param_groups(gen, 1e-3, 1e-3, 1e-2)),
        critic=PatchCritic(channels=(4, 8)),
        d_optimizer=torch.optim.AdamW(PatchCritic(channels=(4, 8)).parameters(), lr=1e-3),
        stage1_iterations=2,
        critic_loss=RALSCriticLoss(),
        adv_loss=RALSGeneratorLoss(),
        mask_fn=lambda x: torch.ones_like(x),
        critic_pretrain_iterations=1,
        adv_weight=0.1,
        prepare_batch=PrepareDRFConditionedBatch(),
        monitor_interval=1,
    )
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    # every generator call got the DRFs (a forgotten one raises): stage 1 runs the base network, then the critic's
    # pre-training step, then per joint iteration a critic step and a generator step (plus the style monitoring)
    assert len(seen) >= 1 + 2 * 9 and all(v == [4.0, 100.0] for v in seen)
    styles = gen.block_styles(low, torch.tensor([4.0, 100.0]))
    assert (styles[0][0] - styles[0][1]).abs().max() > 1e-4, "stage 2 must learn DRF-dependent styles"
    assert outputs[-1]["style_spread_b0"] > 0  # the monitoring sees the DRFs too


@pytest.mark.slow
def test_training_config_resumes_a_unipet_snapshot_into_the_thinning_blend(tmp_path):
    """train.json, as train_models' thinning_blend branch runs it: a UniPET run's end-of-stage-1 training state resumed
    into ThinningBlendUniPET (same parameters), stage 2 trained and validated with each volume's DRF."""
    data = make_pairs(tmp_path / "pairs", n_subjects=2)
    schedule = dict(epoch_length=2, val_interval=1, val_fraction=0.5, critic_pretrain_iterations=1, stage1_epochs=1)
    parent = tmp_path / "parent"
    first = bundle_run(train_args(data, parent, tmp_path / "out1", epochs=1, **schedule))
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    snapshot = parent / "checkpoint_iter000002.pt"
    ckpt = tmp_path / "blend"
    done = bundle_run(
        train_args(
            data,
            ckpt,
            tmp_path / "out2",
            epochs=2,
            **schedule,
            init_checkpoint=snapshot,
            **{"network_def#_target_": train_models.THINNING_BLEND_TARGET},  # as the thinning_blend branch sets it
        )
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "iteration 2" in log and "g_adv" in log and "val_psnr_drf4" in log  # resumed, then stage 2 and validation
    assert f"network_def#_target_: '{train_models.THINNING_BLEND_TARGET}'" in log  # the override reached the config
    net, _ = load_network_weights(ThinningBlendUniPET(**SMALL), ckpt / "model.pt", None, strict=True)
    assert any(float(b.style_affine.weight.abs().max()) > 0 for b in net.blocks), "stage 2 trained the style layers"
    assert int(load_checkpoint(ckpt / "checkpoint_latest.pt")["trainer"]["iteration"]) == 4


@pytest.mark.slow
def test_training_config_runs_a_drf_conditioned_stage2(tmp_path):
    """train.json with the DRF-conditioned network: stage 2 only, from a stage-1 (UniPET) state dict, validated by
    the sliding window with each volume's DRF (network_takes_drf), as train_models' film branches run it."""
    data = make_pairs(tmp_path / "pairs", n_subjects=2)
    torch.manual_seed(0)
    stage1 = tmp_path / "stage1.pt"
    torch.save(UniPET(**SMALL).state_dict(), stage1)
    ckpt = tmp_path / "film"
    done = bundle_run(
        train_args(
            data,
            ckpt,
            tmp_path / "out",
            epoch_length=3,  # one critic pre-training step, then two generator steps (the first at the warm-up's zero rate)
            val_interval=1,
            val_fraction=0.5,
            critic_pretrain_iterations=1,
            epochs=1,
            stage1_epochs=0,
            bdn_ckpt=stage1,
            network_def=train_models.DRF_CONDITIONED_NETWORK,  # as train_models' film branches set it
            regional_drf_exponent=1.0,
        )
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "val_psnr_drf4" in log and "g_l1" in log
    net, _ = load_network_weights(DRFConditionedUniPET(**SMALL), ckpt / "model.pt", None, strict=True)
    state = load_checkpoint(ckpt / "model.pt")
    assert not any(k.startswith("san.") for k in state)
    assert any(float(b.style_affine.weight.abs().max()) > 0 for b in net.blocks), "stage 2 trained the style layers"
