"""Random-weight SD 2.x and SDXL models (models.tiny_families): stock diffusers loads and draws with them, they have
their family's traits, and `sdxl` has SDXL 1.0's exact parameter counts (on the meta device)."""

from __future__ import annotations

import json

import numpy as np
import torch

from dreambooth.cli import main
from dreambooth.models.tiny_families import build_model, family_configs


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_has_sdxl_10s_exact_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = family_configs("sdxl")
    with torch.device("meta"):
        assert count(UNet2DConditionModel(**configs["unet"])) == 2_567_463_684
        assert count(AutoencoderKL(**configs["vae"])) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))) == 123_060_480
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))) == 694_659_840


def test_sdxl_tiny_loads_and_draws_in_stock_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    model = build_model(tmp_path / "xl", size="sdxl-tiny")
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + \
        pipe.text_encoder_2.config.hidden_size
    assert pipe.tokenizer_2.pad_token == "!" and pipe.text_encoder_2.config.hidden_act == "gelu"
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    again = build_model(tmp_path / "again", size="sdxl-tiny")
    assert (again / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()  # same seed, same bytes


def test_sd2_tiny_is_v_prediction_with_an_openclip_style_text_encoder(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(build_model(tmp_path / "sd2", size="sd2-tiny"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer.pad_token == "!" and pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.unet.config.use_linear_projection
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_the_command_builds_every_size_and_refuses_a_bad_side(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "xl"), "--size", "sdxl-tiny", "--prediction-type", "v_prediction"]) == 0
    config = json.loads((tmp_path / "xl" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    assert main(["tiny-model", str(tmp_path / "bad"), "--size", "sdxl-tiny", "--resolution", "60"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert main(["tiny-model", str(tmp_path / "sd1")]) == 0
    assert json.loads((tmp_path / "sd1" / "scheduler" / "scheduler_config.json").read_text())[
        "prediction_type"] == "epsilon"
