"""The flow-matching maths (Flux.1, SD3/3.5): numbers a reader can check by hand, diffusers' own helpers on the same
draws, and the training step of diffusers' SD3 and Flux DreamBooth scripts and of kohya's FLUX.1 trainer, rewritten
here from reading them."""

import inspect
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from dreambooth.training.flow import (
    SAMPLING_KINDS,
    TIMESTEP_SAMPLINGS,
    WEIGHTING_SCHEMES,
    flux_mu,
    flux_shift_sigmas,
    guidance_vector,
    loss_weighting,
    noisy_latents,
    packed_seq_len,
    prediction_and_target,
    sample_sigmas,
    schedule_lookup,
    shift_sigmas,
    timestep_density,
    training_schedule,
    velocity_target,
)
from dreambooth.training.loss import dreambooth_loss


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sd3_scheduler():
    """SD3 and SD3.5's scheduler config: shift 3.0, no dynamic shifting."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def flux_scheduler():
    """FLUX.1's scheduler config trains unshifted (see test_flux_scheduler_config_trains_unshifted)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


# --- by hand ----------------------------------------------------------------------------------------------------


def test_noising_and_target_by_hand():
    x0, noise = torch.full((1, 1, 2, 2), 4.0), torch.full((1, 1, 2, 2), -4.0)
    x_t = noisy_latents(x0, noise, torch.tensor([0.25]))
    assert torch.all(x_t == 2.0)  # 0.75 * 4 + 0.25 * -4
    assert torch.all(velocity_target(x0, noise) == -8.0)  # -4 - 4


def test_sigma_is_per_sample_over_any_latent_rank():
    x0, noise = torch.ones(2, 3, 5), torch.zeros(2, 3, 5)  # packed (B, tokens, channels), as Flux's
    x_t = noisy_latents(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.all(x_t[0] == 1.0) and torch.all(x_t[1] == 0.0)  # sigma 0 is the data, sigma 1 the noise


def test_noisy_latents_keep_the_latents_dtype():
    x0 = torch.ones(2, 4, 2, 2, dtype=torch.bfloat16)
    assert noisy_latents(x0, x0, torch.tensor([0.3, 0.6])).dtype == torch.bfloat16


def test_preconditioned_outputs_by_hand():
    # x0 = 4, noise = -4, sigma 0.25: x_t = 2; a perfect velocity -8 implies x0 = 2 - 0.25 * -8 = 4
    x0, noise, sigmas = torch.full((1, 1, 1, 1), 4.0), torch.full((1, 1, 1, 1), -4.0), torch.tensor([0.25])
    x_t, v = noisy_latents(x0, noise, sigmas), velocity_target(x0, noise)
    pred, target = prediction_and_target(v, x_t, x0, noise, sigmas, precondition_outputs=True)
    assert pred.item() == 4.0 and target.item() == 4.0
    pred, target = prediction_and_target(v, x_t, x0, noise, sigmas, precondition_outputs=False)
    assert pred.item() == -8.0 and target.item() == -8.0


def test_loss_weighting_by_hand():
    sigmas = torch.tensor([0.5, 0.25])
    assert loss_weighting("sigma_sqrt", sigmas).tolist() == [4.0, 16.0]  # sigma ** -2
    cosmap = loss_weighting("cosmap", sigmas).tolist()
    assert cosmap[0] == pytest.approx(2 / (math.pi * 0.5))  # 1 - 1 + 0.5
    assert cosmap[1] == pytest.approx(2 / (math.pi * 0.625))  # 1 - 0.5 + 0.125
    for scheme in ("logit_normal", "mode", "none"):
        assert loss_weighting(scheme, sigmas).tolist() == [1.0, 1.0]


def test_shift_by_hand():
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    assert shift_sigmas(sigmas, 3.0).tolist() == [0.0, 0.75, 1.0]  # 1.5 / (1 + 2 * 0.5); the ends stay
    assert shift_sigmas(sigmas, 1.0).tolist() == sigmas.tolist()


def test_flux_mu_by_hand():
    assert packed_seq_len(32, 32) == 256 and packed_seq_len(128, 128) == 4096  # 256 and 1024 pixels, VAE / 8
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(2176) == pytest.approx(0.825)  # half-way


def test_flux_shift_by_hand():
    half = torch.tensor([0.5])
    assert flux_shift_sigmas(half, math.log(3.0)).item() == pytest.approx(0.75)  # 3 / (3 + 1), as shift 3
    assert flux_shift_sigmas(half, 0.0).item() == pytest.approx(0.5)  # mu 0 shifts nothing


def test_schedule_lookup_by_hand():
    timesteps, sigmas = training_schedule(flux_scheduler())  # 1000, 999, ..., 1 and sigmas t / 1000
    got_sigmas, got_timesteps = schedule_lookup(torch.tensor([0.0, 0.5, 0.9995, 1.0]), timesteps, sigmas)
    assert got_timesteps.tolist() == [1000.0, 500.0, 1.0, 1.0]  # entries 0, 500, 999 and (u = 1) the last
    assert got_sigmas.tolist() == pytest.approx([1.0, 0.5, 0.001, 0.001])


def test_guidance_vector():
    g = guidance_vector(3.5, 3, "cpu", embeds=True)
    assert g.tolist() == [3.5, 3.5, 3.5] and g.dtype == torch.float32
    assert guidance_vector(3.5, 3, "cpu", embeds=False) is None


def test_defaults_are_the_trainers_flag_defaults():
    defaults = {k: p.default for k, p in inspect.signature(sample_sigmas).parameters.items()}
    assert defaults["logit_mean"] == 0.0 and defaults["logit_std"] == 1.0 and defaults["mode_scale"] == 1.29
    assert defaults["sigmoid_scale"] == 1.0 and defaults["discrete_flow_shift"] == 3.0


# --- against diffusers' helpers, on the same draws --------------------------------------------------------------


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_density_equals_diffusers_on_the_same_draws(scheme, seed):
    kw = dict(logit_mean=0.3, logit_std=1.7, mode_scale=1.29)
    ours = timestep_density(scheme, 64, gen(seed), **kw)
    with_generator = compute_density_for_timestep_sampling(scheme, 64, generator=gen(seed), **kw)
    torch.manual_seed(seed)  # the scripts call it without a generator: the global one, seeded alike
    global_rng = compute_density_for_timestep_sampling(scheme, 64, **kw)
    assert torch.equal(ours, with_generator) and torch.equal(ours, global_rng)


def test_mode_density_stays_in_the_unit_interval():
    u = timestep_density("mode", 4096, gen(0))
    assert 0.0 <= u.min() and u.max() <= 1.0


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_loss_weighting_equals_diffusers(scheme):
    sigmas = training_schedule(sd3_scheduler())[1][::37]
    assert torch.equal(loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas).float())


@pytest.mark.numerics
def test_flux_mu_equals_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq_len in (256, 1024, 2176, 4096, 6400):
        assert math.isclose(flux_mu(seq_len), calculate_shift(seq_len), rel_tol=1e-12)


@pytest.mark.numerics
def test_flux_shift_equals_the_schedulers_time_shift_and_is_a_logit_offset():
    sigmas = torch.linspace(0.01, 0.99, 99)
    mu = flux_mu(4096)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    torch.testing.assert_close(flux_shift_sigmas(sigmas, mu), scheduler.time_shift(mu, 1.0, sigmas))
    logit = torch.log(sigmas / (1 - sigmas))
    torch.testing.assert_close(flux_shift_sigmas(sigmas, mu), torch.sigmoid(logit + mu))
    torch.testing.assert_close(shift_sigmas(sigmas, 3.0), flux_shift_sigmas(sigmas, math.log(3.0)))


def test_flux_scheduler_config_trains_unshifted():
    """FLUX.1's scheduler config says shift 3.0 with use_dynamic_shifting: the shift is then applied per resolution
    at inference (set_timesteps) and the training table is the unshifted one."""
    flux_config = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    timesteps, sigmas = training_schedule(FlowMatchEulerDiscreteScheduler(**flux_config))
    plain_timesteps, plain_sigmas = training_schedule(flux_scheduler())
    assert torch.equal(timesteps, plain_timesteps) and torch.equal(sigmas, plain_sigmas)


def test_training_schedule_ignores_a_validation_set_timesteps():
    scheduler = sd3_scheduler()
    before = training_schedule(scheduler)
    scheduler.set_timesteps(28)
    after = training_schedule(scheduler)
    assert len(scheduler.timesteps) == 28 and torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


# --- against the scripts' training step -------------------------------------------------------------------------


def fake_transformer(noisy, timestep, guidance=None):
    """A stand-in whose output depends on the noisy input, the timestep and the guidance it is given."""
    out = 0.5 * noisy + timestep.view(-1, 1, 1, 1) / 1000
    return out if guidance is None else out + 0.01 * guidance.view(-1, 1, 1, 1)


def diffusers_step(scheduler, model_input, noise, weighting_scheme, prior_loss_weight, *, flux, precondition):
    """diffusers' train_dreambooth[_lora]_{sd3,flux}.py, one step with prior preservation (instances, then as many
    class images), rewritten inline; the global RNG as the scripts leave it, the flags at their defaults. Flux's
    latent packing is a reshape and is left out."""
    bsz = model_input.shape[0]
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme, batch_size=bsz, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten()
    while len(sigmas.shape) < model_input.ndim:
        sigmas = sigmas.unsqueeze(-1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    if flux:
        guidance = torch.tensor([3.5]).expand(bsz)
        model_pred = fake_transformer(noisy, timesteps / 1000, guidance)
    else:
        model_pred = fake_transformer(noisy, timesteps)
    if precondition:
        model_pred = model_pred * (-sigmas) + noisy
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = model_input if precondition else noise - model_input
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)
    prior_loss = torch.mean(
        (weighting_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2).reshape(
            target_prior.shape[0], -1), 1).mean()
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()
    return sigmas.flatten(), timesteps, noisy, loss + prior_loss_weight * prior_loss


def our_step(scheduler, model_input, noise, weighting_scheme, prior_loss_weight, generator, *, flux, precondition):
    """The same step from this module and dreambooth_loss."""
    bsz = model_input.shape[0]
    sigmas, timesteps = sample_sigmas(weighting_scheme, bsz, generator, schedule=training_schedule(scheduler))
    noisy = noisy_latents(model_input, noise, sigmas)
    if flux:
        model_pred = fake_transformer(noisy, timesteps / 1000, guidance_vector(3.5, bsz, "cpu", embeds=True))
    else:
        model_pred = fake_transformer(noisy, timesteps)
    pred, target = prediction_and_target(model_pred, noisy, model_input, noise, sigmas,
                                         precondition_outputs=precondition)
    is_prior = torch.arange(bsz) >= bsz // 2
    parts = dreambooth_loss(pred, target, is_prior, prior_loss_weight, loss_weighting(weighting_scheme, sigmas))
    return sigmas, timesteps, noisy, parts.loss


@pytest.mark.numerics
@pytest.mark.parametrize(("family", "scheme", "precondition"), [
    ("sd3", "logit_normal", True),  # SD3's defaults
    ("sd3", "mode", True),
    ("sd3", "cosmap", True),
    ("sd3", "sigma_sqrt", False),
    ("flux", "none", False),  # Flux's defaults
    ("flux", "logit_normal", False),
    ("flux", "cosmap", False),
    ("flux", "sigma_sqrt", False),
])
@pytest.mark.parametrize("seed", [0, 7])
def test_the_step_equals_the_diffusers_scripts(family, scheme, precondition, seed):
    flux = family == "flux"
    scheduler = flux_scheduler() if flux else sd3_scheduler()
    data = gen(100 + seed)
    model_input = torch.randn(6, 4, 4, 4, generator=data)
    noise = torch.randn(6, 4, 4, 4, generator=data)
    torch.manual_seed(seed)
    expected = diffusers_step(scheduler, model_input, noise, scheme, 0.7, flux=flux, precondition=precondition)
    got = our_step(scheduler, model_input, noise, scheme, 0.7, gen(seed), flux=flux, precondition=precondition)
    for name, a, b in zip(("sigmas", "timesteps", "noisy input"), got[:3], expected[:3]):
        assert torch.equal(a, b), name
    # The loss is reduced in another order (per-sample weights after the mean, a masked mean for the split).
    torch.testing.assert_close(got[3], expected[3], rtol=1e-6, atol=0.0)


@pytest.mark.numerics
@pytest.mark.parametrize("prior", [False, True])
def test_per_sample_weights_equal_diffusers_elementwise_weighting(prior):
    data = gen(3)
    pred, target = torch.randn(4, 4, 8, 8, generator=data), torch.randn(4, 4, 8, 8, generator=data)
    sigmas = torch.rand(4, generator=data)
    weighting = compute_loss_weighting_for_sd3("cosmap", sigmas.view(-1, 1, 1, 1))  # broadcast over each sample
    per_sample = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(4, -1), 1)
    is_prior = torch.tensor([False, False, prior, prior])
    expected = per_sample[:2].mean() + 0.5 * per_sample[2:].mean() if prior else per_sample.mean()
    got = dreambooth_loss(pred, target, is_prior, 0.5, loss_weighting("cosmap", sigmas)).loss
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)


def kohya_sigmas(kind, bsz, seq_len, sigmoid_scale, shift):
    """kohya-ss/sd-scripts' flux_train_utils.get_noisy_model_input_and_timesteps, the sigma draw, rewritten inline
    (global RNG)."""
    if kind == "uniform":
        sigmas = torch.rand((bsz,))
    elif kind == "sigmoid":
        sigmas = torch.sigmoid(sigmoid_scale * torch.randn((bsz,)))
    else:
        sigmas = (torch.randn(bsz) * sigmoid_scale).sigmoid()
        if kind == "shift":
            sigmas = (sigmas * shift) / (1 + (shift - 1) * sigmas)
        else:
            m = (1.15 - 0.5) / (4096 - 256)
            mu = seq_len * m + (0.5 - m * 256)
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    return sigmas, sigmas * 1000


@pytest.mark.numerics
@pytest.mark.parametrize("kind", TIMESTEP_SAMPLINGS)
def test_kohya_kinds_equal_its_trainer(kind):
    seq_len = packed_seq_len(64, 96)
    torch.manual_seed(5)
    expected = kohya_sigmas(kind, 32, seq_len, 1.5, 3.1582)
    got = sample_sigmas(kind, 32, gen(5), sigmoid_scale=1.5, discrete_flow_shift=3.1582, image_seq_len=seq_len)
    # flux_shift's mu is written base + slope * (len - 256), kohya's slope * len + intercept: an ulp apart.
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)


# --- randomness and refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SAMPLING_KINDS)
def test_the_generator_is_respected_and_the_global_rng_untouched(kind):
    kw = dict(schedule=training_schedule(sd3_scheduler()), image_seq_len=4096)
    state = torch.get_rng_state()
    first, again = sample_sigmas(kind, 16, gen(1), **kw), sample_sigmas(kind, 16, gen(1), **kw)
    other = sample_sigmas(kind, 16, gen(2), **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_unknown_names_raise_naming_the_valid_ones():
    with pytest.raises(ValueError, match="logit_normal.*flux_shift"):
        sample_sigmas("logitnormal", 2, gen(0))
    with pytest.raises(ValueError, match="sigma_sqrt, logit_normal, mode, cosmap, none"):
        timestep_density("uniform", 2, gen(0))  # kohya's kind, not a diffusers scheme
    with pytest.raises(ValueError, match="sigma_sqrt, logit_normal, mode, cosmap, none"):
        loss_weighting("cosmp", torch.tensor([0.5]))


def test_missing_inputs_raise():
    with pytest.raises(ValueError, match="training_schedule"):
        sample_sigmas("logit_normal", 2, gen(0))
    with pytest.raises(ValueError, match="image_seq_len"):
        sample_sigmas("flux_shift", 2, gen(0))
