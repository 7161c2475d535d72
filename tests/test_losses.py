"""Unit tests for the UniPET losses: style alignment (L_align) and region-aware WGAN-GP (RALS)."""

from __future__ import annotations

import pytest
import torch

from scripts.losses.align import StyleAlignmentLoss, instance_stats
from scripts.losses.rals import (
    DEFAULT_MASK_THRESHOLD,
    RALSCriticLoss,
    RALSGeneratorLoss,
    normalised_threshold,
    stylized_mask,
)
from scripts.networks.critic import PatchCritic
from scripts.networks.unipet import UniPET

SMALL = dict(channels=8, num_blocks=4, latent_dim=16, san_channels=(8, 8, 16, 16))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class LinearCritic(torch.nn.Module):
    """``f(x) = <w, x>`` per sample: its input gradient is ``w`` everywhere, so GP = (||w|| - 1)^2 exactly."""

    def __init__(self, shape: tuple[int, ...], norm: float) -> None:
        super().__init__()
        w = torch.randn(shape, dtype=torch.float64)
        self.w = torch.nn.Parameter(w * norm / w.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(dim=1, keepdim=True)


def _textured_half(shape=(1, 1, 16, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-SUV volume: flat at 0.1 for x < 8, noisy (std 0.05) for x >= 8; and the textured half's mask."""
    vol = torch.full(shape, 0.1)
    vol[..., 8:] += 0.05 * torch.randn(*shape[:-1], shape[-1] - 8)
    return vol, (torch.arange(shape[-1]) >= 8).float().expand(shape)


# --- L_align ---------------------------------------------------------------------------------------


def test_instance_stats_values():
    feat = torch.randn(2, 3, 4, 5, 6) * 2 + 1
    mean, std = instance_stats(feat, eps=1e-6)
    assert mean.shape == std.shape == (2, 3)
    flat = feat.flatten(2)
    torch.testing.assert_close(mean, flat.mean(dim=2))
    torch.testing.assert_close(std, torch.sqrt(flat.var(dim=2, unbiased=False) + 1e-6))
    # Constant map: std is sqrt(eps), not NaN, and differentiable.
    const = torch.ones(1, 1, 3, 3, 3, requires_grad=True)
    _, s = instance_stats(const, eps=1e-6)
    s.sum().backward()
    assert torch.isfinite(const.grad).all()


def test_align_loss_by_hand():
    low = [torch.ones(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4)]
    full = [3 * torch.ones(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4)]
    # block 1: |1 - 3| on the mean, std equal; block 2: identical -> mean over 2 blocks = 1.
    assert StyleAlignmentLoss()(low, full).item() == pytest.approx(1.0)
    noisy = torch.randn(1, 2, 8, 8, 8) * 2.0
    mean_n, std_n = instance_stats(noisy)
    # vs a zero map (mean 0, std sqrt(eps)): mean |mean_n| + mean |std_n - sqrt(eps)|.
    expected = mean_n.abs().mean() + (std_n - 1e-3).abs().mean()
    assert StyleAlignmentLoss()([noisy], [torch.zeros_like(noisy)]).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="equally long"):
        StyleAlignmentLoss()(low, full[:1])


def test_align_loss_through_unipet_is_not_always_zero():
    """The reference code fed the low-dose image to both branches, so L_align was 0: ours must not be."""
    model = UniPET(use_san=True, **SMALL)
    full, _ = _textured_half((2, 1, 16, 16, 16))
    low = full + 0.1 * torch.randn_like(full)  # a noisier, lower-dose-like input
    loss_fn = StyleAlignmentLoss()
    _, feats_low = model.forward_with_features(low)
    with torch.no_grad():
        _, feats_full = model.forward_with_features(full)
        _, feats_low_again = model.forward_with_features(low)
    assert loss_fn(feats_low, feats_full).item() > 1e-3
    assert loss_fn(feats_low, feats_low_again).item() == pytest.approx(0.0, abs=1e-7)


def test_align_loss_gradients_flow_from_low_dose_branch_only():
    model = UniPET(use_san=True, **SMALL)
    full, _ = _textured_half((1, 1, 16, 16, 16))
    low = (full + 0.1 * torch.randn_like(full)).requires_grad_(True)
    full = full.clone().requires_grad_(True)
    # Both passes with autograd on: the loss itself must cut the full-dose branch.
    _, feats_low = model.forward_with_features(low)
    _, feats_full = model.forward_with_features(full)
    loss = StyleAlignmentLoss()(feats_low, feats_full)
    loss.backward()
    assert full.grad is None
    assert low.grad is not None and low.grad.abs().max() > 0
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["input_conv.weight"] is not None and grads["input_conv.weight"].abs().max() > 0
    first_grad = grads["input_conv.weight"].clone()

    # Same gradient as with the full-dose pass under no_grad: nothing leaked through the full branch.
    model.zero_grad()
    _, feats_low = model.forward_with_features(low.detach())
    with torch.no_grad():
        _, feats_full = model.forward_with_features(full.detach())
    StyleAlignmentLoss()(feats_low, feats_full).backward()
    torch.testing.assert_close(model.input_conv.weight.grad, first_grad)


# --- stylized mask ------------------------------------------------------------------------------------


def test_threshold_conversion():
    assert normalised_threshold(0.001, 20.0) == pytest.approx(2.5e-6)
    assert DEFAULT_MASK_THRESHOLD == pytest.approx(2.5e-6)
    assert normalised_threshold(0.001, 1.0) == pytest.approx(0.001)
    with pytest.raises(ValueError):
        normalised_threshold(0.001, 0.0)


def test_mask_zero_on_constant_and_set_on_texture():
    const = torch.full((1, 1, 12, 12, 12), 0.5)  # a zero-padded variance would light up the borders
    mask = stylized_mask(const)
    assert mask.shape == const.shape and mask.dtype == const.dtype
    assert mask.sum() == 0
    vol, textured = _textured_half()
    mask = stylized_mask(vol)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    # Flat half (away from the 3^3 boundary reach) is unmasked; the textured half is masked.
    assert mask[..., :7].sum() == 0
    assert mask[..., 8:].mean() > 0.95


def test_mask_local_variance_matches_hand_value():
    """A spike of height a in zeros: every interior 3^3 box holding it has var = a^2 * 26 / 729."""
    a = 0.1
    vol = torch.zeros(1, 1, 9, 9, 9, dtype=torch.float64)
    vol[0, 0, 4, 4, 4] = a
    var = a * a * 26 / 729
    below = stylized_mask(vol, threshold=var * 0.999)
    above = stylized_mask(vol, threshold=var * 1.001)
    assert below.sum() == 27 and below[0, 0, 3:6, 3:6, 3:6].all()
    assert above.sum() == 0
    assert stylized_mask(vol, window=5, threshold=var * 0.999).sum() == 0  # 5^3 box dilutes it


def test_mask_threshold_units():
    """SUV volume with 0.001 SUV^2 == the same volume / 20 with the converted default threshold."""
    g = torch.Generator().manual_seed(3)
    ramp = torch.linspace(0.0, 0.08, 24, dtype=torch.float64)  # noise std in SUV grows along x
    suv = 2.0 + torch.randn(1, 1, 24, 24, 24, generator=g, dtype=torch.float64) * ramp
    mask_suv = stylized_mask(suv, threshold=0.001)
    mask_norm = stylized_mask(suv / 20.0)
    mask_kw = stylized_mask(suv / 20.0, threshold=0.001, suv_scale=20.0)
    assert 0.1 < mask_suv.mean() < 0.9  # both flat and textured voxels: the comparison means something
    torch.testing.assert_close(mask_norm, mask_suv, atol=0, rtol=0)
    torch.testing.assert_close(mask_kw, mask_suv, atol=0, rtol=0)
    # Using the SUV threshold on normalised data would mask nothing: the unit conversion matters.
    assert stylized_mask(suv / 20.0, threshold=0.001).sum() == 0


# --- RALS adversarial losses -------------------------------------------------------------------------


def test_generator_adversarial_gradient_is_zero_outside_mask():
    vol, _ = _textured_half()
    mask = stylized_mask(vol)
    critic = PatchCritic(channels=(4, 8))
    fake = (vol + 0.02 * torch.randn_like(vol)).requires_grad_(True)
    loss = RALSGeneratorLoss()(critic, fake, mask)
    loss.backward()
    assert fake.grad[mask == 0].abs().max() == 0
    assert fake.grad[mask == 1].abs().max() > 0


def test_critic_loss_ignores_flat_regions():
    vol, _ = _textured_half()
    mask = stylized_mask(vol)
    critic = PatchCritic(channels=(4, 8))
    fake = vol + 0.02 * torch.randn_like(vol)
    loss_fn = RALSCriticLoss()
    _, terms = loss_fn(critic, vol, fake, mask)
    fake_changed = torch.where(mask == 0, fake + 5.0 * torch.randn_like(fake), fake)
    real_changed = torch.where(mask == 0, vol - 3.0, vol)
    _, terms2 = loss_fn(critic, real_changed, fake_changed, mask)
    assert terms2["d_fake"] == terms["d_fake"]
    assert terms2["d_real"] == terms["d_real"]


def test_critic_loss_trains_critic_only():
    vol, _ = _textured_half((2, 1, 16, 16, 16))
    mask = stylized_mask(vol)
    critic = PatchCritic(channels=(4, 8))
    fake = (vol + 0.02 * torch.randn_like(vol)).requires_grad_(True)
    loss, terms = RALSCriticLoss(gp_weight=10.0)(critic, vol, fake, mask)
    assert torch.isfinite(loss)
    assert set(terms) == {"d_real", "d_fake", "gradient_penalty", "wasserstein"}
    assert terms["gradient_penalty"] > 0
    torch.testing.assert_close(loss.detach(), terms["d_fake"] - terms["d_real"] + 10.0 * terms["gradient_penalty"])
    loss.backward()
    assert fake.grad is None
    assert all(p.grad is not None for p in critic.parameters())
    assert critic.model[0].weight.grad.abs().max() > 0


@pytest.mark.parametrize("norm, expected_gp", [(1.0, 0.0), (2.0, 1.0), (0.5, 0.25)])
def test_gradient_penalty_of_linear_critic(norm, expected_gp):
    shape = (1, 1, 6, 6, 6)
    critic = LinearCritic(shape, norm)
    real = torch.rand(3, *shape[1:], dtype=torch.float64)
    fake = torch.rand(3, *shape[1:], dtype=torch.float64)
    mask = torch.ones_like(real)
    loss, terms = RALSCriticLoss(gp_weight=10.0)(critic, real, fake, mask)
    assert terms["gradient_penalty"].item() == pytest.approx(expected_gp, abs=1e-10)
    expected_w = (critic(real).mean() - critic(fake).mean()).item()
    assert terms["wasserstein"].item() == pytest.approx(expected_w, rel=1e-9)
    assert loss.item() == pytest.approx(-expected_w + 10.0 * expected_gp, rel=1e-9, abs=1e-9)


def test_shape_mismatch_is_a_clear_error():
    critic = PatchCritic(channels=(4, 8))
    x = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="one shape"):
        RALSCriticLoss()(critic, x, x, torch.ones(1, 1, 16, 16, 8))
    with pytest.raises(ValueError, match="one shape"):
        RALSGeneratorLoss()(critic, x, torch.ones(1, 1, 8, 16, 16))


# --- regional SUV-consistency loss (issue 15) -----------------------------------------------------------

from scripts.losses.regional import RegionalSUVLoss  # noqa: E402


def test_regional_loss_sees_level_shifts_and_lesion_peaks_that_voxel_l1_barely_sees():
    torch.manual_seed(0)
    full = 0.1 + 0.02 * torch.randn(1, 1, 24, 24, 24)
    full[..., 10:12, 10:12, 10:12] = 0.6  # a 2-voxel hot lesion (12 SUV at SUV/20)
    loss = RegionalSUVLoss((5, 9, 17))
    assert loss(full, full).item() == 0
    # a denoiser that smooths the noise away but keeps the lesion and the level: low regional loss
    smooth = torch.nn.functional.avg_pool3d(full, 3, 1, 1, count_include_pad=False)
    smooth[..., 10:12, 10:12, 10:12] = 0.6
    # one that also halves the lesion (-50 % SUVmax): the local max term sees it
    flat_lesion = smooth.clone()
    flat_lesion[..., 10:12, 10:12, 10:12] = 0.3
    # one that lowers every level by 2 %
    low_level = smooth * 0.98
    l_smooth, l_lesion, l_level = (loss(x, full).item() for x in (smooth, flat_lesion, low_level))
    assert l_lesion > 1.5 * l_smooth, (l_lesion, l_smooth)
    assert l_level > l_smooth
    # voxel-wise L1 hardly tells the halved lesion from the good output (8 of 13824 voxels)
    l1 = torch.nn.functional.l1_loss
    assert l1(flat_lesion, full) / l1(smooth, full) < 1.05


def test_regional_box_max_of_the_full_dose_is_max_pool3d_bit_for_bit():
    """The target's local maxima (no gradient) come from a sliding view, the prediction's from max_pool3d (its
    backward): the same values, windows clipped at the faces, odd sizes, every axis."""
    import torch.nn.functional as F

    from scripts.losses.regional import _box

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 7, 12, 5, generator=gen)
    for kernel in [(5, 5, 5), (7, 9, 5), (1, 3, 1)]:
        pad = tuple(k // 2 for k in kernel)
        ref = F.max_pool3d(x, kernel, 1, pad)
        assert torch.equal(_box(x, kernel, "max"), ref)
        xg = x.clone().requires_grad_(True)
        assert torch.equal(_box(xg, kernel, "max"), ref)


def test_regional_loss_gradient_shapes_and_errors():
    loss = RegionalSUVLoss((3, 17))
    pred = torch.rand(2, 1, 8, 10, 12, requires_grad=True)  # smaller than the 17 window: clipped per axis
    full = torch.rand(2, 1, 8, 10, 12, requires_grad=True)
    loss(pred, full).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0 and full.grad is None  # no gradient to the target
    with pytest.raises(ValueError, match="odd"):
        RegionalSUVLoss((4,))
    with pytest.raises(ValueError, match="mean_weight"):
        RegionalSUVLoss(mean_weight=0, max_weight=0)
    with pytest.raises(ValueError, match="equal"):
        loss(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 5))


def test_regional_max_focus_weighs_hot_spot_windows_up_and_keeps_the_scale():
    """max_focus (0.5.2): the local-max term of windows with a full-dose hot spot counts more than that of flat
    tissue; 0 is the unweighted loss; the weights average 1, so a uniform error keeps its size."""
    torch.manual_seed(0)
    full = 0.1 + 0.01 * torch.randn(1, 1, 24, 24, 24)
    full[..., 10:12, 10:12, 10:12] = 0.6
    lesion_off = full.clone()
    lesion_off[..., 10:12, 10:12, 10:12] = 0.45  # -25 % SUVmax, background exact
    noisy_bg = full + 0.03 * torch.rand_like(full)  # background error, lesion kept (+ up to 0.03)
    noisy_bg[..., 10:12, 10:12, 10:12] = 0.6
    plain = RegionalSUVLoss((5, 9), mean_weight=0)
    focus = RegionalSUVLoss((5, 9), mean_weight=0, max_focus=4.0)
    assert RegionalSUVLoss((5, 9), mean_weight=0, max_focus=0.0)(lesion_off, full) == plain(lesion_off, full)
    # the focused loss ranks the lesion error higher relative to the background error than the plain one does
    ratio_plain = plain(lesion_off, full) / plain(noisy_bg, full)
    ratio_focus = focus(lesion_off, full) / focus(noisy_bg, full)
    assert ratio_focus > 1.5 * ratio_plain, (float(ratio_focus), float(ratio_plain))
    shifted = full + 0.05  # the same error in every window: weights of mean 1 keep it
    torch.testing.assert_close(focus(shifted, full), plain(shifted, full))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_focus"):
            RegionalSUVLoss(max_focus=bad)


def test_regional_sample_weight_scales_each_item():
    torch.manual_seed(0)
    full = torch.rand(2, 1, 12, 12, 12)
    pred = full + 0.05 * torch.randn_like(full)
    loss = RegionalSUVLoss((3, 5))
    both = loss(pred, full)
    torch.testing.assert_close(loss(pred, full, sample_weight=torch.ones(2)), both)
    first_only = loss(pred, full, sample_weight=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(first_only, loss(pred[:1], full[:1]) / 2)  # the mean still runs over the batch
    for bad in (torch.tensor([1.0]), torch.tensor([1.0, -1.0]), torch.tensor([1.0, float("inf")])):
        with pytest.raises(ValueError, match="sample_weight"):
            loss(pred, full, sample_weight=bad)
