"""SDXL: a UNet conditioned on two CLIP text encoders' penultimate hidden states side by side, the second's pooled,
projected embedding, and each image's size and crop (Podell et al. 2023); the diffusion objective as SD's."""

from __future__ import annotations

import torch

from dreambooth.models.families.common import Conditioning, device_of
from dreambooth.models.families.sd import Behaviour as SD


class Behaviour(SD):
    def encode(self, models, prompts: list[str], max_length: int | None = None, sequence_length: int | None = None,
               mask: bool = False) -> Conditioning:
        """As SDXL's pipeline builds it: the penultimate hidden states of both encoders side by side, and the second
        encoder's pooled, projected embedding. Each tokenizer pads to its own length (77)."""
        states, pooled = [], None
        for tokenizer, encoder in ((models.tokenizer, models.text_encoder),
                                   (models.tokenizer_2, models.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device_of(encoder))
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        device = states[0].device
        return Conditioning({"embeds": torch.cat([s.to(device) for s in states], dim=-1), "pooled": pooled.to(device)})

    def denoiser_kwargs(self, cond: Conditioning, geometry: torch.Tensor | None) -> dict:
        """The size and crop conditioning is the image's geometry as it is: (original h, w, crop top, left, target h,
        w), training.data.crop_geometry."""
        pooled = cond["pooled"]
        return {"encoder_hidden_states": cond["embeds"],
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": geometry.to(pooled)}}

    def pipeline(self, parts: dict):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(**parts)

    def pipeline_extras(self, safety_checker: bool) -> dict:
        return {}  # SDXL has no safety checker
