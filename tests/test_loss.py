"""The loss maths, with numbers a reader can check by hand."""

import pytest
import torch

from dreambooth.training.loss import (
    dreambooth_loss,
    latent_mask,
    min_snr_weights,
    noise_with_offset,
    snr_from_alphas,
)


def preds(values):
    """One 1x1x2 'prediction' per sample, every element equal to the given value."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 1, 2).contiguous()


def test_instance_and_prior_losses_split_by_mask():
    # errors 1, 2 (instance) and 3, 4 (class): per-sample MSE 1, 4, 9, 16
    pred, target = preds([1, 2, 3, 4]), torch.zeros(4, 1, 1, 2)
    parts = dreambooth_loss(pred, target, torch.tensor([False, False, True, True]), prior_loss_weight=0.5)
    assert parts.instance_loss.item() == pytest.approx(2.5)  # (1 + 4) / 2
    assert parts.prior_loss.item() == pytest.approx(12.5)  # (9 + 16) / 2
    assert parts.loss.item() == pytest.approx(2.5 + 0.5 * 12.5)


def test_mask_order_does_not_matter():
    pred, target = preds([3, 1, 4, 2]), torch.zeros(4, 1, 1, 2)
    parts = dreambooth_loss(pred, target, torch.tensor([True, False, True, False]), prior_loss_weight=1.0)
    assert parts.instance_loss.item() == pytest.approx(2.5)
    assert parts.prior_loss.item() == pytest.approx(12.5)


def test_without_class_samples_the_prior_loss_is_zero_not_nan():
    parts = dreambooth_loss(preds([2, 2]), torch.zeros(2, 1, 1, 2), torch.tensor([False, False]), 1.0)
    assert parts.prior_loss.item() == 0.0
    assert parts.loss.item() == pytest.approx(4.0)


def test_weights_apply_per_sample_before_the_split():
    pred, target = preds([1, 1, 1, 1]), torch.zeros(4, 1, 1, 2)
    weights = torch.tensor([1.0, 0.5, 0.25, 0.75])
    parts = dreambooth_loss(pred, target, torch.tensor([False, False, True, True]), 1.0, weights)
    assert parts.instance_loss.item() == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert parts.prior_loss.item() == pytest.approx(0.5)  # (0.25 + 0.75) / 2


def test_loss_is_computed_in_fp32_for_half_predictions():
    pred = preds([300, 0]).half()
    parts = dreambooth_loss(pred, torch.zeros(2, 1, 1, 2).half(), torch.tensor([False, True]), 1.0)
    assert parts.loss.dtype == torch.float32
    assert parts.instance_loss.item() == pytest.approx(90000.0)  # overflows fp16's 65504 if squared in fp16


def test_snr_from_alphas():
    alphas = torch.tensor([0.8, 0.5, 0.2])
    snr = snr_from_alphas(alphas, torch.tensor([0, 1, 2]))
    assert snr.tolist() == pytest.approx([4.0, 1.0, 0.25])


def test_min_snr_weights_epsilon_and_v():
    snr = torch.tensor([4.0, 1.0, 0.25])
    # epsilon: min(snr, 2) / snr
    assert min_snr_weights(snr, 2.0, "epsilon").tolist() == pytest.approx([0.5, 1.0, 1.0])
    # v-prediction: min(snr, 2) / (snr + 1)
    assert min_snr_weights(snr, 2.0, "v_prediction").tolist() == pytest.approx([0.4, 0.5, 0.2])
    with pytest.raises(ValueError):
        min_snr_weights(snr, 2.0, "sample")


def test_min_snr_with_prior_preservation_at_batch_2():
    # the case that crashed diffusers (#5791): batch 2 + 2, weights follow each sample's own timestep
    alphas = torch.tensor([0.8, 0.5])
    timesteps = torch.tensor([0, 1, 1, 0])
    w = min_snr_weights(snr_from_alphas(alphas, timesteps), 1.0, "epsilon")  # snr 4,1,1,4 -> 0.25,1,1,0.25
    parts = dreambooth_loss(preds([2, 2, 2, 2]), torch.zeros(4, 1, 1, 2), torch.tensor([0, 0, 1, 1]).bool(), 1.0, w)
    assert parts.instance_loss.item() == pytest.approx((4 * 0.25 + 4 * 1.0) / 2)
    assert parts.prior_loss.item() == pytest.approx((4 * 1.0 + 4 * 0.25) / 2)


@pytest.mark.numerics
def test_offset_noise_adds_a_per_channel_constant():
    latents = torch.zeros(2, 3, 4, 4)
    plain = noise_with_offset(latents, 0.0, torch.Generator().manual_seed(0))
    shifted = noise_with_offset(latents, 0.5, torch.Generator().manual_seed(0))
    diff = shifted - plain
    assert diff.abs().sum() > 0
    # the difference is constant over each channel's pixels
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))
    again = noise_with_offset(latents, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, again)


def test_everything_stays_on_the_inputs_device_and_in_fp32_or_their_dtype():
    """On the meta device (shapes and dtypes only), a tensor made on the CPU by mistake fails to mix with the rest,
    as it would on a GPU; the dtypes are the ones a half-precision run needs."""
    timesteps = torch.tensor([0, 1, 1, 0], device="meta")
    snr = snr_from_alphas(torch.tensor([0.8, 0.5], dtype=torch.float64), timesteps)
    assert (snr.device.type, snr.dtype) == ("meta", torch.float32)
    weights = min_snr_weights(snr, 5.0, "v_prediction")
    pred = torch.zeros(4, 4, 2, 2, device="meta", dtype=torch.bfloat16)
    parts = dreambooth_loss(pred, pred, torch.tensor([0, 0, 1, 1], device="meta"), 1.0, weights)
    assert {(t.device.type, t.dtype) for t in (parts.loss, parts.instance_loss, parts.prior_loss)} == {
        ("meta", torch.float32)}
    for offset in (0.0, 0.1):
        noise = noise_with_offset(pred, offset, None)
        assert (noise.device.type, noise.dtype, noise.shape) == ("meta", torch.bfloat16, pred.shape)


def test_an_integer_prior_mask_means_the_same_as_a_boolean_one():
    pred, target = preds([1, 2, 3, 4]), torch.zeros(4, 1, 1, 2)
    parts = dreambooth_loss(pred, target, torch.tensor([0, 0, 1, 1]), prior_loss_weight=0.5)
    assert (parts.instance_loss.item(), parts.prior_loss.item()) == pytest.approx((2.5, 12.5))


def test_an_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'; expected 'epsilon' or 'v_prediction'"):
        min_snr_weights(torch.tensor([1.0]), 5.0, "sample")


# --------------------------------------------------------------------------------------------------- masked loss
def test_the_masked_loss_is_the_mean_squared_error_over_what_the_mask_keeps():
    """Errors 1, 2, 3, 4 on a 2x2 latent, the mask [[1, 0], [1, 1]]: (1 + 9 + 16) / 3 = 26/3, the mean over the three
    kept elements. kohya's plain mean of the masked errors would say 26/4 = 6.5, the unmasked loss (1+4+9+16)/4 =
    7.5."""
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    masked = dreambooth_loss(pred, target, torch.tensor([False]), 1.0, mask=mask)
    assert masked.instance_loss.item() == pytest.approx(26 / 3)
    assert dreambooth_loss(pred, target, torch.tensor([False]), 1.0).instance_loss.item() == pytest.approx(7.5)
    # the mask is shared by the channels: a second channel of errors 2 adds 4 + 4 + 4 over three more elements
    two = torch.cat([target, torch.full((1, 1, 2, 2), 2.0)], dim=1)
    parts = dreambooth_loss(torch.zeros(1, 2, 2, 2), two, torch.tensor([False]), 1.0, mask=mask)
    assert parts.instance_loss.item() == pytest.approx((26 + 12) / 6)


def test_a_grey_mask_weighs_and_an_empty_or_white_one_is_defined():
    pred, target = torch.zeros(4, 1, 2, 2), torch.tensor([[[[2.0, 4.0], [0.0, 0.0]]]]).expand(4, 1, 2, 2)
    mask = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])[None].repeat(4, 1, 1, 1)
    mask[1] = 0.0  # a crop that caught none of the subject
    mask[2] = 1.0  # white everywhere: the plain MSE
    mask[3] = torch.tensor([[0.5, 0.0], [0.0, 0.0]])  # less than one latent pixel kept: the area counts as one
    per_sample = [dreambooth_loss(pred[i:i + 1], target[i:i + 1], torch.tensor([False]), 1.0,
                                  mask=mask[i:i + 1]).loss.item() for i in range(4)]
    # (1 * 4 + 0.5 * 16) / 1.5 = 8; 0, not NaN; (4 + 16) / 4 = 5; 0.5 * 4 / 1 = 2
    assert per_sample == pytest.approx([8.0, 0.0, 5.0, 2.0])


def test_the_mask_composes_with_per_sample_weights_and_prior_preservation():
    """Instance row masked as above (26/3), class row unmasked (ones, errors 1 everywhere: 1); weights 0.5 and 2 apply
    per sample before the split, the prior loss weight after."""
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.ones(1, 2, 2)])
    mask = torch.stack([torch.tensor([[[1.0, 0.0], [1.0, 1.0]]]), torch.ones(1, 2, 2)])
    parts = dreambooth_loss(pred, target, torch.tensor([False, True]), 0.5, torch.tensor([0.5, 2.0]), mask)
    assert parts.instance_loss.item() == pytest.approx(0.5 * 26 / 3)
    assert parts.prior_loss.item() == pytest.approx(2.0)
    assert parts.loss.item() == pytest.approx(0.5 * 26 / 3 + 0.5 * 2.0)


def test_a_pixel_mask_reaches_the_latent_grid_by_area():
    """A 4x4 pixel mask onto 2x2 latents (a VAE factor of 2): each latent weighs the share of its 2x2 pixels kept."""
    pixels = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                           [1.0, 0.0, 0.0, 1.0],
                           [1.0, 1.0, 0.0, 0.0],
                           [1.0, 1.0, 0.0, 0.0]])[None, None]
    grid = latent_mask(pixels, torch.zeros(1, 4, 2, 2))
    assert grid.tolist() == [[[[0.5, 0.25], [1.0, 0.0]]]]
    assert latent_mask(None, torch.zeros(1, 4, 2, 2)) is None
