"""Flux.1 (dev and schnell): a rectified-flow transformer over 2x2-packed latents with position ids, conditioned on
T5's hidden states and CLIP's pooled embedding, and (dev, guidance-distilled) on the guidance scale itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dreambooth.models.families.common import Conditioning, device_of
from dreambooth.models.families.transformer import FlowBehaviour
from dreambooth.training.flow import guidance_vector

DEFAULT_GUIDANCE = 3.5  # diffusers' Flux DreamBooth scripts' --guidance_scale


def has_guidance_embedding(model: str | Path) -> bool | None:
    """Whether a Flux folder's transformer takes the guidance scale (dev: yes; schnell: no); None unknown."""
    try:
        return bool(json.loads((Path(model) / "transformer" / "config.json").read_text()).get("guidance_embeds"))
    except (OSError, ValueError):
        return None


class Behaviour(FlowBehaviour):
    default_weighting = "none"
    default_precondition = False
    default_sequence_length = 512

    def encode(self, models, prompts: list[str], max_length: int | None = None, sequence_length: int | None = None,
               mask: bool = False) -> Conditioning:
        """As FluxPipeline encodes them (its own encode_prompt, on the encoders' device): T5's hidden states and
        CLIP's pooled embedding."""
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=None, vae=None, transformer=None, text_encoder=models.text_encoder,
                            tokenizer=models.tokenizer, text_encoder_2=models.text_encoder_2,
                            tokenizer_2=models.tokenizer_2)
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=device_of(models.text_encoder_2),
                                               max_sequence_length=sequence_length or self.default_sequence_length)
        return Conditioning({"embeds": embeds, "pooled": pooled.to(embeds.device)})

    def predict(self, cfg, models, noisy, timesteps, cond):
        """The transformer's velocity for unpacked latents: packed into 2x2 patches with their position ids (text
        ids zero), the timestep as a fraction, guidance where the model embeds it; unpacked again."""
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        transformer = models.denoiser
        config = getattr(transformer, "module", transformer).config
        embeds = cond["embeds"]
        out = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
            timestep=timesteps / 1000,
            guidance=guidance_vector(self.guidance(cfg), b, noisy.device, config.guidance_embeds),
            pooled_projections=cond["pooled"],
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
            return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)  # a factor of 1: h and w are latent sides already

    def sequence_length(self, cfg) -> int:
        """diffusers' Flux LoRA script reads 512 T5 tokens and its full fine-tuning script 77; so does this tool
        unless --max_sequence_length says."""
        return cfg.training.max_sequence_length or (77 if cfg.model.method == "full" else 512)

    def guidance(self, cfg) -> float:
        return DEFAULT_GUIDANCE if cfg.training.guidance_scale is None else cfg.training.guidance_scale

    def check_config(self, cfg) -> list[str]:
        found = super().check_config(cfg)
        embeds = has_guidance_embedding(cfg.model.pretrained_model)
        if embeds is False and cfg.training.guidance_scale is not None:
            found.append(f"training.guidance_scale: {cfg.model.pretrained_model} is a Flux.1 schnell-type model (its "
                         "transformer has no guidance embedding), so a training guidance means nothing to it. Drop "
                         "--guidance_scale, or train a Flux.1 dev model.")
        if cfg.training.tokenizer_max_length is not None:
            found.append("training.tokenizer_max_length: Flux's CLIP reads 77 tokens as its pipeline does; the "
                         "prompt's length is T5's, set with --max_sequence_length.")
        return found

    def draw_defaults(self, pipe) -> dict:
        if getattr(pipe.transformer.config, "guidance_embeds", True):
            return {"steps": 28, "guidance": DEFAULT_GUIDANCE}
        return {"steps": 4, "guidance": 0.0}  # schnell: distilled to a few steps, no guidance

    def check_drawing(self, settings) -> None:
        if settings.negative_prompt:
            from dreambooth.errors import UserError

            raise UserError("--negative-prompt: Flux.1 is guidance-distilled and its pipeline draws without a negative "
                            "prompt (it would be ignored). Drop it; say what you want in the prompt instead.")
