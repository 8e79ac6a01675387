"""What the flow-matching transformer families (Flux.1, SD3) share: the rectified-flow loss of training.flow with
diffusers' flags and each family's defaults, and the settings of the diffusion objective they refuse."""

from __future__ import annotations

import torch

from dreambooth.formats.lycoris import LYCORIS
from dreambooth.models.families.common import Behaviour as Base
from dreambooth.models.families.common import Conditioning
from dreambooth.training.flow import (
    loss_weighting,
    noisy_latents,
    packed_seq_len,
    prediction_and_target,
    sample_sigmas,
    training_schedule,
)
from dreambooth.training.loss import LossParts, dreambooth_loss


class FlowBehaviour(Base):
    """A transformer trained on rectified flow; subclasses say how it is called (`predict`) and their defaults."""

    default_weighting = "none"
    default_precondition = False
    default_sequence_length = 512

    def __init__(self, family) -> None:
        super().__init__(family)
        self._schedules: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def sequence_length(self, cfg) -> int:
        """T5's token length: --max_sequence_length, else the family's default in diffusers' scripts."""
        return cfg.training.max_sequence_length or self.default_sequence_length

    def weighting(self, cfg) -> str:
        return cfg.training.weighting_scheme or self.default_weighting

    def precondition(self, cfg) -> bool:
        setting = cfg.training.precondition_outputs
        return self.default_precondition if setting is None else bool(setting)

    def predict(self, cfg, models, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def _schedule(self, scheduler):
        key = id(scheduler)
        if key not in self._schedules:
            self._schedules[key] = training_schedule(scheduler)
        return self._schedules[key]

    def loss(self, cfg, models, latents, cond, geometry, is_prior, generator, mask=None) -> LossParts:
        """Noise, each sample's sigma (diffusers' --weighting_scheme density, or kohya's --timestep_sampling), the
        straight path between them, the transformer's velocity (or x0, preconditioned) against its target, weighted
        per sample, with prior preservation (training.flow, training.loss). The loss is taken on the unpacked latents
        [B, C, h, w], where the mask [B, 1, h, w] lies on the same grid."""
        t, sched = cfg.training, models.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        weighting = self.weighting(cfg)
        sigmas, timesteps = sample_sigmas(
            t.timestep_sampling or weighting, latents.shape[0], generator, schedule=self._schedule(sched),
            logit_mean=t.logit_mean, logit_std=t.logit_std, mode_scale=t.mode_scale, sigmoid_scale=t.sigmoid_scale,
            discrete_flow_shift=t.discrete_flow_shift, image_seq_len=packed_seq_len(*latents.shape[-2:]),
            num_train_timesteps=sched.config.num_train_timesteps)
        sigmas, timesteps = sigmas.to(latents.device), timesteps.to(latents.device)
        noisy = noisy_latents(latents, noise, sigmas)
        pred = self.predict(cfg, models, noisy, timesteps, cond)
        pred, target = prediction_and_target(pred, noisy, latents, noise, sigmas,
                                             precondition_outputs=self.precondition(cfg))
        return dreambooth_loss(pred, target, is_prior, t.prior_loss_weight, loss_weighting(weighting, sigmas), mask)

    def check_config(self, cfg) -> list[str]:
        t, title, found = cfg.training, self.family.title, []
        if t.snr_gamma is not None:
            found.append(f"training.snr_gamma: Min-SNR-gamma weights the epsilon and v-prediction losses by the noise "
                         f"schedule's signal-to-noise ratio; {title} trains on flow matching, where it means nothing. "
                         "Drop --snr_gamma; --weighting_scheme (sigma_sqrt, cosmap, logit_normal, mode) is this "
                         "objective's way to weight timesteps.")
        if t.noise_offset:
            found.append(f"training.noise_offset: offset noise is a fix of the epsilon objective's schedule; {title} "
                         "trains on flow matching, and diffusers' scripts for it have no such option. Drop it.")
        if t.channels_last:
            found.append(f"training.channels_last: lays out a UNet's convolutions; {title}'s transformer has none. "
                         "Drop it.")
        if cfg.model.method == "lora" and cfg.lora.adapter in LYCORIS:
            # LyCORIS' layout (formats.lycoris) names the original model's fused layers (Flux's qkv and linear1,
            # SD3's qkv); a Kronecker or Hadamard product on diffusers' separate q, k and v has no exact form there
            found.append(f"lora.adapter: {cfg.lora.adapter} adapters are saved in LyCORIS' layout, which names "
                         f"{title}'s original fused layers (q, k and v as one qkv), where adapters trained on "
                         "diffusers' separate projections have no exact form; so they train SD 1.x, 2.x and SDXL "
                         f"only. For {title}, use --adapter lora or --adapter dora (diffusers' LoRA file, which "
                         "stock load_lora_weights reads).")
        return found

    def draw_defaults(self, pipe) -> dict:
        return {"steps": 28, "guidance": 7.0}
