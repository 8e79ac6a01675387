"""Random-weight Flux and SD3 models (models.tiny_flow): stock diffusers loads and draws with them, a seed gives the
same bytes, the locally built T5 tokenizer behaves like T5's, and `flux` and `sd3` have the published parameter counts
(on the meta device)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dreambooth.cli import main
from dreambooth.models.tiny_flow import T5_PIECES, build_flow_model, build_t5_tokenizer, flow_configs


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def files_of(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def within_a_percent(n: int, published: float) -> bool:
    return abs(n - published) <= published / 100


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return build_flow_model(tmp_path_factory.mktemp("flux") / "model", size="flux-tiny")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return build_flow_model(tmp_path_factory.mktemp("sd3") / "model", size="sd3-tiny")


def test_flux_has_flux1_devs_parameter_counts():
    """The counts of black-forest-labs/FLUX.1-dev's checkpoint files; "12 B" as published, 11.9 B in fact."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    configs = flow_configs("flux")
    with torch.device("meta"):
        transformer = count(FluxTransformer2DModel(**configs["transformer"]))
        clip = count(CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])))
        t5 = count(T5EncoderModel(T5Config(**configs["text_encoder_2"])))
        vae = count(AutoencoderKL(**configs["vae"]))
    assert (transformer, clip, t5, vae) == (11_901_408_320, 123_060_480, 4_762_310_656, 83_819_683)
    assert within_a_percent(transformer, 11.9e9) and within_a_percent(t5, 4.76e9) and within_a_percent(vae, 83.8e6)


def test_sd3_has_sd35_larges_parameter_counts():
    """SD3.5-large's transformer is published as 8.1 B; its text encoders and VAE are SD3's and Flux's."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    configs = flow_configs("sd3")
    with torch.device("meta"):
        transformer = count(SD3Transformer2DModel(**configs["transformer"]))
        clip_l = count(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder"])))
        clip_g = count(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])))
        t5 = count(T5EncoderModel(T5Config(**configs["text_encoder_3"])))
        vae = count(AutoencoderKL(**configs["vae"]))
    # CLIP-L is SD 1.5's text encoder plus its 768x768 projection; CLIP-G is SDXL's second text encoder
    assert (clip_l, clip_g, t5, vae) == (123_060_480 + 768 * 768, 694_659_840, 4_762_310_656, 83_819_683)
    assert transformer == 8_056_627_520 and within_a_percent(transformer, 8.1e9)
    assert configs["transformer"]["pos_embed_max_size"] == 192 and configs["transformer"]["sample_size"] == 128


@pytest.mark.parametrize("size", ["flux-tiny", "flux-schnell-tiny"])
def test_flux_tiny_loads_and_draws_in_stock_diffusers(flux, tmp_path, size):
    from diffusers import FluxPipeline

    model = flux if size == "flux-tiny" else build_flow_model(tmp_path / size, size=size)
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    pipe = FluxPipeline.from_pretrained(model)
    dev = size == "flux-tiny"
    assert pipe.transformer.config.guidance_embeds is dev  # schnell is distilled to need no guidance input
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 64  # 2x2 packing
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer_2.model_max_length == (512 if dev else 256)
    scheduler = pipe.scheduler.config
    assert (scheduler.shift, scheduler.use_dynamic_shifting) == ((3.0, True) if dev else (1.0, False))
    assert (scheduler.base_shift, scheduler.max_shift, scheduler.base_image_seq_len,
            scheduler.max_image_seq_len) == (0.5, 1.15, 256, 4096)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_sd3_tiny_loads_and_draws_in_stock_diffusers(sd3):
    from diffusers import StableDiffusion3Pipeline

    assert json.loads((sd3 / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3)
    clip_l, clip_g = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert clip_g.hidden_size > clip_l.hidden_size and clip_g.hidden_act == "gelu" and pipe.tokenizer_2.pad_token == "!"
    # SD3 zero-pads the two CLIPs' hidden states, side by side, to T5's width, and joins their pooled projections
    assert clip_l.hidden_size + clip_g.hidden_size <= pipe.text_encoder_3.config.d_model
    config = pipe.transformer.config
    assert config.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert config.pooled_projection_dim == clip_l.projection_dim + clip_g.projection_dim
    assert config.in_channels == pipe.vae.config.latent_channels == 16 and config.qk_norm == "rms_norm"
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64  # the model's own side, from its config
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("size", ["flux-tiny", "sd3-tiny"])
def test_a_seed_gives_the_same_bytes(flux, sd3, tmp_path, size):
    built = flux if size == "flux-tiny" else sd3
    again, other = (build_flow_model(tmp_path / str(seed), size=size, seed=seed) for seed in (0, 1))
    assert files_of(again) == files_of(built)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (other / weights).read_bytes() != (built / weights).read_bytes()


def test_the_t5_tokenizer_is_t5s_layout_and_round_trips(flux, sd3):
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(flux / "tokenizer_2")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1  # the sentinels come last
    ids = tokenizer("a photo of sks dog").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁sks", "▁dog", "</s>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of sks dog"
    rare = tokenizer("a zqxw dog").input_ids  # spelled out, as T5 splits an identifier it does not know
    assert tokenizer.unk_token_id not in rare and tokenizer.decode(rare, skip_special_tokens=True) == "a zqxw dog"
    padded = tokenizer("a photo of sks dog", padding="max_length", max_length=512, truncation=True)
    assert len(padded.input_ids) == 512 and padded.input_ids[5:7] == [1, 0] and sum(padded.attention_mask) == 6
    cut = tokenizer("dog " * 600, padding="max_length", max_length=512, truncation=True).input_ids
    assert len(cut) == 512 and cut[-1] == 1
    assert T5TokenizerFast.from_pretrained(sd3 / "tokenizer_3")(" a  photo\tof sks dog ").input_ids == ids
    full = build_t5_tokenizer(T5_PIECES)  # the full sizes': T5's 32,100 ids, sentinels from 32,000
    assert len(full) == 32_100 and full.convert_tokens_to_ids("<extra_id_99>") == 32_000
    assert full("a photo of sks dog").input_ids == ids


def test_the_clip_tokenizers_know_sks(flux, sd3):
    from transformers import CLIPTokenizer

    for folder in (flux / "tokenizer", sd3 / "tokenizer", sd3 / "tokenizer_2"):
        assert len(CLIPTokenizer.from_pretrained(folder)("sks").input_ids) == 3  # start, sks, end


def test_the_command_builds_a_flow_size_and_refuses_what_does_not_apply(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "sd3"), "--size", "sd3-tiny", "--resolution", "128"]) == 0
    assert json.loads((tmp_path / "sd3" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusion3Pipeline"
    assert json.loads((tmp_path / "sd3" / "transformer" / "config.json").read_text())["sample_size"] == 16
    assert main(["tiny-model", str(tmp_path / "bad"), "--size", "flux-tiny", "--resolution", "72"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert main(["tiny-model", str(tmp_path / "eps"), "--size", "flux-tiny", "--prediction-type", "epsilon"]) == 2
    assert "flow-matching" in capsys.readouterr().err
