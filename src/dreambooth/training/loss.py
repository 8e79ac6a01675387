"""The DreamBooth loss as pure functions: the diffusion target (epsilon or v), noise-prediction MSE with prior
preservation, Min-SNR-gamma weighting, masked loss, and offset noise.

Nothing here touches a model, an optimizer or global randomness, so every number can be checked by hand
(tests/test_loss.py does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict at `timesteps`, as the scheduler's config says: the noise itself (epsilon), or
    the velocity alpha_t * noise - sigma_t * latents (v_prediction, Salimans & Ho 2022, arXiv:2202.00512)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction_type {kind!r}; expected 'epsilon' or 'v_prediction'")


def snr_from_alphas(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of each sample's timestep."""
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return a / (1.0 - a)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556).

    The paper weights the x0-space loss by min(SNR, gamma). Written in the space the UNet predicts, that is
    min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v-prediction. The weights belong to
    each sample's own timestep, so they are computed per sample before any instance/class split: diffusers'
    script computed them on the unsplit batch and then mixed them with the halved losses (issue #5791).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


@dataclass
class LossParts:
    """The total loss to backpropagate and its two parts, as tensors (reading them syncs the device)."""

    loss: torch.Tensor
    instance_loss: torch.Tensor
    prior_loss: torch.Tensor


def dreambooth_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    is_prior: torch.Tensor,
    prior_loss_weight: float,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> LossParts:
    """instance_loss + prior_loss_weight * prior_loss, each the (weighted) mean of per-sample MSEs.

    `is_prior` marks the class (prior-preservation) samples of the batch; `weights` are optional per-sample
    weights such as `min_snr_weights`; `mask` an optional loss mask on the latent grid, [B, 1, h, w] in [0, 1]
    (`masked_mse`). With no class samples the prior loss is zero. Computed in fp32 whatever the precision of the
    prediction.
    """
    squared = (model_pred.float() - target.float()).pow(2)
    per_sample = squared.flatten(1).mean(dim=1) if mask is None else masked_mse(squared, mask)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    is_prior = is_prior.to(device=per_sample.device, dtype=torch.bool)
    instance = _masked_mean(per_sample, ~is_prior)
    prior = _masked_mean(per_sample, is_prior)
    return LossParts(loss=instance + prior_loss_weight * prior, instance_loss=instance, prior_loss=prior)


def masked_mse(squared: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of squared errors [B, C, h, w] over what the mask [B, 1, h, w] keeps: sum(m * e^2) /
    (C * sum(m)), the mask shared by the latent channels.

    Normalised by the mask's area, not by the whole image as kohya's sd-scripts do (`apply_masked_loss` in
    library/custom_train_functions.py multiplies by the mask, then the caller takes the plain mean): there a subject
    that fills a fifth of its photo gets a fifth of the gradient, a learning rate that changes with the framing and
    shrinks the instance loss against the prior loss. Here each photo weighs the same whatever its mask covers, and
    an all-white mask gives the plain MSE. The area counts at least one latent pixel, so a crop that catches none of
    the subject adds zero, not NaN, and a sliver of it is not blown up past one latent's worth.
    """
    mask = mask.to(squared)
    area = mask.flatten(1).sum(dim=1).clamp(min=1.0) * squared.shape[1]
    return (squared * mask).flatten(1).sum(dim=1) / area


def latent_mask(mask: torch.Tensor | None, latents: torch.Tensor) -> torch.Tensor | None:
    """A pixel loss mask [B, 1, H, W] on the latents' grid [B, 1, h, w], on their device; None stays None.

    Area pooling (each latent pixel's weight is the mean of the 8x8 pixels it encodes, kohya's
    `interpolate(mode="area")` too): a latent half on the subject weighs a half. Nearest or bilinear sampling
    would read one or four of its 64 pixels, so a mask's edge would jump with the crop.
    """
    if mask is None:
        return None
    return torch.nn.functional.adaptive_avg_pool2d(mask.float(), latents.shape[-2:]).to(latents.device)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the selected values; zero (not NaN) when none is selected, without a host sync."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def noise_with_offset(latents: torch.Tensor, offset: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise plus `offset` times a per-channel constant (offset noise, Guttenberg 2023)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset:
        shift = torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=latents.device,
                            dtype=latents.dtype)
        noise = noise + offset * shift
    return noise
