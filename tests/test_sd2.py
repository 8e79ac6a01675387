"""SD 2.x end to end on the tiny SD2-shaped model (OpenCLIP-style text encoder padding with `!`, linear attention
projections, v-prediction): full and LoRA training, exact resume, generation, and the exports loaded back by stock
diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rounding_bound
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from test_export import image as picture

from dreambooth.cli import main
from dreambooth.config_file import load_config
from dreambooth.models.tiny_families import build_model
from dreambooth.training.loop import train

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def sd2_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("sd2") / "model", size="sd2-tiny", seed=5)


def values(model, photos, out, **extra):
    return {"model.pretrained_model": str(model), "dataset.instance_dir": str(photos),
            "dataset.instance_prompt": "a photo of sks dog", "training.resolution": 64, "training.seed": 0,
            "training.learning_rate": 1e-3, "training.snr_gamma": 5.0, "output.output_dir": str(out),
            "output.report_to": "none", **extra}


def test_sd2_full_fine_tune_resumes_exactly_generates_and_exports(sd2_model, instance_dir, tmp_path):
    straight = tmp_path / "straight"
    train(load_config(None, values(sd2_model, instance_dir, straight, **{"training.max_train_steps": 4,
                                                                          "model.train_text_encoder": True})))
    stopped = tmp_path / "stopped"
    train(load_config(None, values(sd2_model, instance_dir, stopped, **{
        "training.max_train_steps": 2, "output.checkpointing_steps": 2, "model.train_text_encoder": True})))
    train(load_config(None, values(sd2_model, instance_dir, stopped, **{
        "training.max_train_steps": 4, "output.resume_from_checkpoint": "latest",
        "model.train_text_encoder": True})))
    a, b, base = (load_file(str(p / UNET_FILE)) for p in (straight, stopped, sd2_model))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4  # it trained

    trained = StableDiffusionPipeline.from_pretrained(straight)
    assert trained.scheduler.config.prediction_type == "v_prediction" and trained.tokenizer.pad_token == "!"
    assert main(["generate", "--model", str(straight), "--prompt", "a photo of sks dog", "--steps", "2",
                 "--height", "64", "--width", "64", "--out", str(tmp_path / "shots")]) == 0
    assert len(list((tmp_path / "shots").glob("0000-seed0.png"))) == 1

    file = tmp_path / "sd2.safetensors"
    assert main(["export", str(straight), "--format", "single-file", "--out", str(file)]) == 0
    loaded = StableDiffusionPipeline.from_single_file(str(file), config=str(straight), local_files_only=True)
    for name in ("unet", "text_encoder", "vae"):
        want, got = getattr(trained, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert np.array_equal(picture(loaded), picture(trained))


@pytest.mark.numerics
def test_sd2_lora_with_the_text_encoder_loads_in_stock_diffusers_in_both_formats(sd2_model, instance_dir, tmp_path):
    out = tmp_path / "lora"
    train(load_config(None, values(sd2_model, instance_dir, out, **{
        "model.method": "lora", "model.train_text_encoder": True, "training.max_train_steps": 3,
        "training.learning_rate": 1e-2, "lora.rank": 4})))
    kohya = tmp_path / "kohya.safetensors"
    assert main(["export", str(out / "pytorch_lora_weights.safetensors"), "--format", "kohya", "--out",
                 str(kohya)]) == 0
    pictures = []
    for source in (out, kohya):
        pipe = StableDiffusionPipeline.from_pretrained(sd2_model)
        pipe.load_lora_weights(str(source))
        pictures.append(picture(pipe))
    plain = picture(StableDiffusionPipeline.from_pretrained(sd2_model))
    bound = rounding_bound(pipe, steps=2, guidance=7.5)
    assert np.abs(pictures[0] - pictures[1]).max() < bound
    assert np.abs(pictures[0] - plain).max() > 5 * bound  # the LoRA changes the picture
