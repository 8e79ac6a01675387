"""SD3 and SD3.5: a rectified-flow MMDiT transformer conditioned on two CLIP encoders' penultimate hidden states
(side by side, padded to T5's width) followed by T5's, and both CLIPs' pooled embeddings; outputs preconditioned
to x0 in training by default, as diffusers' SD3 scripts."""

from __future__ import annotations

from dreambooth.models.families.common import Conditioning, device_of
from dreambooth.models.families.transformer import FlowBehaviour


class Behaviour(FlowBehaviour):
    default_weighting = "logit_normal"
    default_precondition = True
    default_sequence_length = 77

    def encode(self, models, prompts: list[str], max_length: int | None = None, sequence_length: int | None = None,
               mask: bool = False) -> Conditioning:
        """As StableDiffusion3Pipeline encodes them (its own encode_prompt, on the encoders' device)."""
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(
            scheduler=None, vae=None, transformer=None, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
            text_encoder_2=models.text_encoder_2, tokenizer_2=models.tokenizer_2,
            text_encoder_3=models.text_encoder_3, tokenizer_3=models.tokenizer_3)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None,
                                                  device=device_of(models.text_encoder_3),
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=sequence_length or self.default_sequence_length)
        return Conditioning({"embeds": embeds, "pooled": pooled.to(embeds.device)})

    def predict(self, cfg, models, noisy, timesteps, cond):
        return models.denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["embeds"],
                               pooled_projections=cond["pooled"], return_dict=False)[0]

    def check_config(self, cfg) -> list[str]:
        found = super().check_config(cfg)
        if cfg.training.guidance_scale is not None:
            found.append("training.guidance_scale: SD3's transformer has no guidance embedding (that is Flux.1 dev's); "
                         "it learns with classifier-free guidance's usual dropout-free prompts. Drop --guidance_scale.")
        if cfg.training.tokenizer_max_length is not None:
            found.append("training.tokenizer_max_length: SD3's CLIPs read 77 tokens as its pipeline does; T5's "
                         "length is --max_sequence_length.")
        return found
