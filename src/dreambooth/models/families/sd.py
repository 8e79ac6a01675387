"""SD 1.x and 2.x: a UNet conditioned on one CLIP text encoder's last hidden states, trained on the diffusion
objective (epsilon or v-prediction, as the scheduler config says)."""

from __future__ import annotations

import torch

from dreambooth.models.families.common import Behaviour as Base
from dreambooth.models.families.common import Conditioning, device_of
from dreambooth.training.loss import (
    LossParts,
    diffusion_target,
    dreambooth_loss,
    min_snr_weights,
    noise_with_offset,
    snr_from_alphas,
)


class Behaviour(Base):
    def encode(self, models, prompts: list[str], max_length: int | None = None, sequence_length: int | None = None,
               mask: bool = False) -> Conditioning:
        tokenizer, encoder = models.tokenizer, models.text_encoder
        tok = tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        device = device_of(encoder)  # a frozen encoder may live on the CPU (training.offload): it answers there
        attention = tok.attention_mask.to(device) if mask else None
        return Conditioning({"embeds": encoder(tok.input_ids.to(device), attention_mask=attention)[0]})

    def denoiser_kwargs(self, cond: Conditioning, geometry: torch.Tensor | None) -> dict:
        return {"encoder_hidden_states": cond["embeds"]}

    def loss(self, cfg, models, latents, cond, geometry, is_prior, generator, mask=None) -> LossParts:
        """Noise at per-sample timesteps (offset noise when asked), the UNet's prediction of the scheduler's target,
        and the prior-preservation loss with Min-SNR-gamma weights and the loss mask (training.loss)."""
        sched = models.noise_scheduler
        noise = noise_with_offset(latents, cfg.training.noise_offset, generator)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                                  device=latents.device)
        noisy = sched.add_noise(latents, noise, timesteps)
        target = diffusion_target(sched, latents, noise, timesteps)
        pred = models.denoiser(noisy, timesteps, **self.denoiser_kwargs(cond, geometry)).sample
        weights = None
        if cfg.training.snr_gamma is not None:
            snr = snr_from_alphas(sched.alphas_cumprod, timesteps)
            weights = min_snr_weights(snr, cfg.training.snr_gamma, sched.config.prediction_type)
        return dreambooth_loss(pred, target, is_prior, cfg.training.prior_loss_weight, weights, mask)

    def check_config(self, cfg) -> list[str]:
        return flow_settings_refused(cfg, self.family.title)

    def pipeline(self, parts: dict):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def pipeline_extras(self, safety_checker: bool) -> dict:
        return {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}


# Settings of the flow-matching objective (training.flow), which a diffusion-objective family would ignore.
FLOW_SETTINGS = ("weighting_scheme", "timestep_sampling", "precondition_outputs", "guidance_scale")


def flow_settings_refused(cfg, title: str) -> list[str]:
    t = cfg.training
    return [f"training.{name}: {getattr(t, name)!r} is a setting of the flow-matching families (Flux, SD3); "
            f"{title} trains on the diffusion objective, where it means nothing. Drop it."
            for name in FLOW_SETTINGS if getattr(t, name, None) is not None]
