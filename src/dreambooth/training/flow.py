"""The flow-matching training maths of the transformer families (Flux.1, SD3/3.5) as pure functions: the noisy input
and its target, the timestep densities, the loss weights, SD3's output preconditioning and Flux's guidance input.

The flags they answer to, with the defaults of diffusers' examples/dreambooth/train_dreambooth[_lora]_{sd3,flux}.py
and of kohya-ss/sd-scripts' FLUX.1 trainers:

    --weighting_scheme     SD3 logit_normal, Flux none   `sample_sigmas` kind (diffusers' kinds) and `loss_weighting`
    --logit_mean/_std      0.0 / 1.0                     logit_normal
    --mode_scale           1.29                          mode
    --timestep_sampling    kohya; its default `sigma`    `sample_sigmas` kind (kohya's kinds; `sigma` means
                           is the diffusers path         "use --weighting_scheme", i.e. diffusers' kinds)
    --sigmoid_scale        1.0                           sigmoid, shift, flux_shift (kohya's help names only sigmoid)
    --discrete_flow_shift  3.0                           shift
    --precondition_outputs SD3 1; Flux has no such flag  `prediction_and_target`
    --guidance_scale       Flux 3.5                      `guidance_vector`

diffusers' `training_utils.compute_density_for_timestep_sampling` and `compute_loss_weighting_for_sd3` do part of
this, but read any unknown scheme name as uniform and unweighted (a typo silently trains another objective), and
kohya's kinds are in no library; so the maths is written here, and tests/test_flow.py holds it equal to diffusers'
functions and to both scripts' training step on the same draws. Every draw takes a torch.Generator and happens on
its device; nothing here touches a model, an optimizer or global randomness.
"""

from __future__ import annotations

import math

import torch

# diffusers' --weighting_scheme: u is drawn from a density over [0, 1] and read off the scheduler's training table.
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
# kohya's --timestep_sampling (less its `sigma`, which is the above): sigma itself is drawn, continuous.
TIMESTEP_SAMPLINGS = ("uniform", "sigmoid", "shift", "flux_shift")
SAMPLING_KINDS = WEIGHTING_SCHEMES + TIMESTEP_SAMPLINGS


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) sigmas as (B, 1, ..., 1) in `like`'s dtype and device, to broadcast over each sample's elements."""
    return sigmas.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * x_0 + sigma * noise, the straight path of rectified flow (Liu et al. 2022,
    arXiv:2209.03003; SD3, Esser et al. 2024, arXiv:2403.03206). Sigma is cast to the latents' dtype first, as
    diffusers' scripts do, so the transformer's input keeps that dtype."""
    s = _per_sample(sigmas, latents)
    return (1.0 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d sigma = noise - x_0, the velocity the Flux and SD3 transformers are trained to predict."""
    return noise - latents


def prediction_and_target(
    model_pred: torch.Tensor,
    noisy: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    precondition_outputs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tensors the loss compares: the velocity against noise - x_0, or, preconditioned (SD3's
    --precondition_outputs, after EDM's output scaling, Karras et al. 2022, arXiv:2206.00364 sec. 5), the x_0 it
    implies, x_t - sigma * prediction, against x_0."""
    if not precondition_outputs:
        return model_pred, velocity_target(latents, noise)
    return model_pred * (-_per_sample(sigmas, model_pred)) + noisy, latents


def timestep_density(
    weighting_scheme: str,
    batch_size: int,
    generator: torch.Generator,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """u in [0, 1] per sample from SD3's timestep samplers (arXiv:2403.03206, "tailored SNR samplers"): logit-normal,
    sigmoid(N(logit_mean, logit_std)); mode, f(u) = 1 - u - s * (cos^2(pi u / 2) - 1 + u) of a uniform u, s =
    mode_scale; uniform for the rest (sigma_sqrt and cosmap weight the loss instead, see `loss_weighting`)."""
    _check(weighting_scheme, WEIGHTING_SCHEMES, "weighting_scheme")
    size, device = (batch_size,), generator.device
    if weighting_scheme == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, size, generator=generator, device=device))
    u = torch.rand(size, generator=generator, device=device)
    if weighting_scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def schedule_lookup(
    u: torch.Tensor, schedule_timesteps: torch.Tensor, schedule_sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) at entry floor(u * N) of an N-entry training table (timesteps descending from N), as
    diffusers' scripts index FlowMatchEulerDiscreteScheduler's `timesteps` and then find each one's sigma."""
    n = schedule_timesteps.numel()
    # u = 1 (a saturated sigmoid, or mode's f at a uniform draw of exactly 0) would index one past the table, an
    # IndexError in diffusers' scripts; it belongs to the last entry.
    index = (u * n).long().clamp(max=n - 1)
    # The scripts look each timestep up again to find its sigma; the table's timesteps are distinct, so that is
    # the same entry of `sigmas`.
    return schedule_sigmas.to(u.device)[index], schedule_timesteps.to(u.device)[index]


def training_schedule(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The (timesteps, sigmas) table a FlowMatchEulerDiscreteScheduler trains on, from a fresh one of its config, so
    that a `set_timesteps` made for validation cannot leak in (diffusers' scripts keep a deepcopy for that)."""
    fresh = type(scheduler).from_config(scheduler.config)
    return fresh.timesteps, fresh.sigmas


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """shift * sigma / (1 + (shift - 1) * sigma): SD3's resolution-dependent timestep shift (arXiv:2403.03206), the
    `shift` of FlowMatchEulerDiscreteScheduler and kohya's --discrete_flow_shift. Equal to
    sigmoid(logit(sigma) + log(shift)), so it moves a logit-normal density's mean by log(shift)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def packed_seq_len(latent_height: int, latent_width: int) -> int:
    """Tokens in a Flux latent once packed in 2x2 patches: 256 at 256x256 pixels, 4096 at 1024x1024."""
    return (latent_height // 2) * (latent_width // 2)


def flux_mu(
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The mu of Flux's resolution-dependent shift: linear in the packed sequence length, through (256, 0.5) and
    (4096, 1.15), as FLUX.1's scheduler config and diffusers' `calculate_shift` (pipeline_flux) set it."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """exp(mu) / (exp(mu) + (1 / sigma - 1)): Flux's exponential time shift (FlowMatchEulerDiscreteScheduler's
    `time_shift` with exponent 1), the same map as `shift_sigmas` with shift = exp(mu)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def _sigmoid_normal(batch_size: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    """sigmoid(scale * N(0, 1)) per sample: kohya's draw for sigmoid, shift and flux_shift (from XLabs' x-flux)."""
    return torch.sigmoid(scale * torch.randn((batch_size,), generator=generator, device=generator.device))


def _continuous_sigmas(
    kind: str, batch_size: int, generator: torch.Generator, sigmoid_scale: float, discrete_flow_shift: float,
    image_seq_len: int | None,
) -> torch.Tensor:
    """Sigma per sample for kohya's --timestep_sampling kinds."""
    if kind == "uniform":
        return torch.rand((batch_size,), generator=generator, device=generator.device)
    sigmas = _sigmoid_normal(batch_size, generator, sigmoid_scale)
    if kind == "shift":
        return shift_sigmas(sigmas, discrete_flow_shift)
    if kind == "flux_shift":
        if image_seq_len is None:
            raise ValueError("flux_shift needs image_seq_len (packed_seq_len of the latents)")
        return flux_shift_sigmas(sigmas, flux_mu(image_seq_len))
    return sigmas


def sample_sigmas(
    kind: str,
    batch_size: int,
    generator: torch.Generator,
    *,
    schedule: tuple[torch.Tensor, torch.Tensor] | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    sigmoid_scale: float = 1.0,
    discrete_flow_shift: float = 3.0,
    image_seq_len: int | None = None,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's (sigma, timestep), shape (B,). diffusers' kinds (WEIGHTING_SCHEMES) draw u by
    `timestep_density` and read `schedule`, the (timesteps, sigmas) of `training_schedule`; kohya's kinds
    (TIMESTEP_SAMPLINGS) draw sigma itself and give timestep = sigma * num_train_timesteps. SD3's transformer takes
    the timestep as it is, Flux's takes timestep / 1000."""
    _check(kind, SAMPLING_KINDS, "timestep sampling kind")
    if kind in TIMESTEP_SAMPLINGS:
        sigmas = _continuous_sigmas(kind, batch_size, generator, sigmoid_scale, discrete_flow_shift, image_seq_len)
        return sigmas, sigmas * num_train_timesteps
    if schedule is None:
        raise ValueError(f"{kind} reads the scheduler's training table: pass schedule=training_schedule(scheduler)")
    u = timestep_density(kind, batch_size, generator, logit_mean=logit_mean, logit_std=logit_std,
                         mode_scale=mode_scale)
    return schedule_lookup(u, *schedule)


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample fp32 loss weights of SD3's schemes, whose timesteps are drawn uniformly so the weight carries the
    density: sigma^-2 for sigma_sqrt, CosMap's 2 / (pi * (1 - 2 sigma + 2 sigma^2)) for cosmap (arXiv:2403.03206),
    one otherwise.

    Pass them to `dreambooth_loss` as `weights`. diffusers multiplies every element by a weighting broadcast from
    (B, 1, 1, 1) before the per-sample mean; it is constant within a sample, so mean(w * d^2) = w * mean(d^2).
    """
    _check(weighting_scheme, WEIGHTING_SCHEMES, "weighting_scheme")
    s = sigmas.float()
    if weighting_scheme == "sigma_sqrt":
        return s**-2.0
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    return torch.ones_like(s)


def guidance_vector(scale: float, batch_size: int, device: torch.device | str, embeds: bool) -> torch.Tensor | None:
    """The guidance strength FLUX.1-dev's transformer embeds (it is guidance-distilled; config `guidance_embeds`),
    one fp32 value per sample; None for a transformer without that embedding (FLUX.1-schnell)."""
    return torch.full((batch_size,), float(scale), device=device, dtype=torch.float32) if embeds else None


def _check(name: str, valid: tuple[str, ...], what: str) -> None:
    """Refuse an unknown name, listing the known ones."""
    if name not in valid:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(valid)}")
