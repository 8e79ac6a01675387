"""SDXL on the tiny SDXL-shaped model: the prompt conditioning and size conditioning as diffusers' SDXL pipeline
builds them, full and LoRA training of the UNet with prior preservation, both text encoders and a new token in
both tokenizers, exact resume, generation, and outputs that stock StableDiffusionXLPipeline loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rounding_bound
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file
from test_export import image as picture
from test_sd2 import values  # the same short runs as the SD 2.x tests

from dreambooth.cli import main
from dreambooth.config_file import load_config
from dreambooth.models.families import FAMILIES
from dreambooth.models.tiny_families import build_model
from dreambooth.training.data import crop_geometry
from dreambooth.training.loop import train

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("xl") / "model", size="sdxl-tiny", seed=2)


@pytest.mark.numerics
def test_prompts_are_encoded_as_the_sdxl_pipeline_encodes_them(xl_model):
    from dreambooth.training.components import Models, PromptEncoder

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_model)
    models = Models.from_pipeline(pipe, FAMILIES["sdxl"])
    cfg = load_config(None, {"model.pretrained_model": str(xl_model), "dataset.instance_dir": "d",
                             "dataset.instance_prompt": "a photo of sks dog"})
    cond = PromptEncoder(cfg, models, torch.device("cpu"))(["a photo of sks dog", "a photo of a dog"])
    embeds, pooled = cond["embeds"], cond["pooled"]
    want, _, want_pooled, _ = pipe.encode_prompt(["a photo of sks dog", "a photo of a dog"], device="cpu",
                                                 do_classifier_free_guidance=False)
    assert torch.allclose(embeds, want) and torch.allclose(pooled, want_pooled)


def test_crop_geometry_is_original_size_crop_corner_and_target():
    # A 300x200 photo (w x h) resized to 96x64 for 64 px: cropped at x=20, or mirrored (then x = 96 - 20 - 64).
    assert crop_geometry((300, 200), (96, 64), (20, 0), False, 64).tolist() == [200, 300, 0, 20, 64, 64]
    assert crop_geometry((300, 200), (96, 64), (20, 0), True, 64).tolist() == [200, 300, 0, 12, 64, 64]


def test_sdxl_full_fine_tune_with_prior_resumes_exactly_and_loads_in_stock_diffusers(xl_model, instance_dir,
                                                                                       tmp_path):
    extra = {"dataset.with_prior_preservation": True, "dataset.class_dir": str(tmp_path / "class"),
             "dataset.class_prompt": "a photo of a dog", "dataset.num_class_images": 2,
             "dataset.class_inference_steps": 2, "dataset.random_flip": True, "training.snr_gamma": 5.0}
    straight = tmp_path / "straight"
    train(load_config(None, values(xl_model, instance_dir, straight, **extra, **{"training.max_train_steps": 4})))
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 2  # drawn by the SDXL pipeline
    stopped = tmp_path / "stopped"
    train(load_config(None, values(xl_model, instance_dir, stopped, **extra, **{
        "training.max_train_steps": 2, "output.checkpointing_steps": 2})))
    train(load_config(None, values(xl_model, instance_dir, stopped, **extra, **{
        "training.max_train_steps": 4, "output.resume_from_checkpoint": "latest"})))
    a, b, base = (load_file(str(p / UNET_FILE)) for p in (straight, stopped, xl_model))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4

    trained = StableDiffusionXLPipeline.from_pretrained(straight)
    assert np.abs(picture(trained) - picture(StableDiffusionXLPipeline.from_pretrained(xl_model))).max() > 1e-3
    assert main(["generate", "--model", str(straight), "--prompt", "a photo of sks dog", "--steps", "2",
                 "--height", "64", "--width", "64", "--out", str(tmp_path / "shots")]) == 0
    assert (tmp_path / "shots" / "0000-seed0.png").is_file()


def test_sdxl_lora_loads_in_stock_diffusers_and_through_generate(xl_model, instance_dir, tmp_path):
    out = tmp_path / "lora"
    train(load_config(None, values(xl_model, instance_dir, out, **{
        "model.method": "lora", "training.max_train_steps": 3, "training.learning_rate": 1e-2, "lora.rank": 4,
        "validation.prompts": ["a photo of sks dog"], "validation.steps": 3, "validation.num_images": 1,
        "validation.num_inference_steps": 2})))
    assert (out / "samples" / "step-000003.png").is_file()  # validation drew with the SDXL pipeline
    stock = StableDiffusionXLPipeline.from_pretrained(xl_model)
    stock.load_lora_weights(str(out))
    with_lora = picture(stock)
    assert np.abs(with_lora - picture(StableDiffusionXLPipeline.from_pretrained(xl_model))).max() > 1e-3
    assert main(["generate", "--model", str(xl_model), "--lora", str(out), "--prompt", "a photo of sks dog",
                 "--steps", "2", "--height", "64", "--width", "64", "--out", str(tmp_path / "shots")]) == 0


NEW_TOKEN = {"token.identifier": "<zq>", "token.initializer": "dog", "dataset.instance_prompt": "a photo of <zq> dog"}


def encoder_weights(folder, name):
    return load_file(str(next((folder / name).glob("*.safetensors"))))


def test_sdxl_text_encoders_and_a_new_token_train_whole_resume_exactly_and_load_in_stock_diffusers(
        xl_model, instance_dir, tmp_path):
    """Full fine-tune of the UNet and both text encoders with a new token: both tokenizers get it, both encoders
    train (at text_encoder_lr), a run stopped at step 2 and resumed ends on the same weights, stock diffusers
    loads the folder."""
    extra = {**NEW_TOKEN, "model.train_text_encoder": True, "training.text_encoder_lr": 1e-3}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(load_config(None, values(xl_model, instance_dir, straight, **extra, **{"training.max_train_steps": 4})))
    train(load_config(None, values(xl_model, instance_dir, stopped, **extra, **{
        "training.max_train_steps": 2, "output.checkpointing_steps": 2})))
    assert all((stopped / "checkpoint-2" / name).is_dir() for name in ("text_encoder_2", "tokenizer_2"))
    train(load_config(None, values(xl_model, instance_dir, stopped, **extra, **{
        "training.max_train_steps": 4, "output.resume_from_checkpoint": "latest"})))
    for name in ("unet", "text_encoder", "text_encoder_2"):
        a, b, base = (encoder_weights(p, name) for p in (straight, stopped, xl_model))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        shared = [k for k in a if k in base and a[k].shape == base[k].shape]
        assert max((a[k] - base[k]).abs().max().item() for k in shared) > 1e-5, f"{name} did not train"
    pipe = StableDiffusionXLPipeline.from_pretrained(straight)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert tokenizer.tokenize("a photo of <zq> dog") == ["a</w>", "photo</w>", "of</w>", "<zq>", "dog</w>"]
    assert main(["generate", "--model", str(straight), "--prompt", "a photo of <zq> dog", "--steps", "2",
                 "--height", "64", "--width", "64", "--out", str(tmp_path / "shots")]) == 0


def test_sdxl_new_token_alone_trains_only_its_rows_in_both_encoders(xl_model, instance_dir, tmp_path):
    """The UNet and the new token's rows train; every other row of both vocabularies stays exactly pretrained."""
    out = tmp_path / "run"
    train(load_config(None, values(xl_model, instance_dir, out, **NEW_TOKEN, **{
        "training.max_train_steps": 3, "training.text_encoder_lr": 1e-2})))
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    base = StableDiffusionXLPipeline.from_pretrained(xl_model)
    for tokenizer, encoder, base_encoder in ((pipe.tokenizer, pipe.text_encoder, base.text_encoder),
                                             (pipe.tokenizer_2, pipe.text_encoder_2, base.text_encoder_2)):
        rows, before = encoder.get_input_embeddings().weight, base_encoder.get_input_embeddings().weight
        new = tokenizer.convert_tokens_to_ids("<zq>")
        assert new == before.shape[0] and torch.equal(rows[:new], before)
        start = before[tokenizer("dog", add_special_tokens=False).input_ids].mean(0)
        assert (rows[new] - start).abs().max() > 1e-4  # trained away from the initializer's embedding


@pytest.mark.numerics
def test_sdxl_lora_on_both_text_encoders_with_a_new_token_loads_in_stock_diffusers(xl_model, instance_dir,
                                                                                   tmp_path):
    """The LoRA file holds unet, text_encoder and text_encoder_2 adapters, the token file clip_l and clip_g rows:
    stock diffusers (load_lora_weights + one load_textual_inversion per encoder) draws what `generate` draws,
    and a resumed run ends on the same file."""
    from dreambooth.formats.lora import read_token_file
    from dreambooth.formats.lora_loading import load_loras

    extra = {**NEW_TOKEN, "model.method": "lora", "model.train_text_encoder": True, "lora.rank": 4,
             "training.learning_rate": 1e-2, "training.text_encoder_lr": 1e-2}
    out, stopped = tmp_path / "lora", tmp_path / "stopped"
    train(load_config(None, values(xl_model, instance_dir, out, **extra, **{"training.max_train_steps": 3})))
    train(load_config(None, values(xl_model, instance_dir, stopped, **extra, **{
        "training.max_train_steps": 2, "output.checkpointing_steps": 2})))
    train(load_config(None, values(xl_model, instance_dir, stopped, **extra, **{
        "training.max_train_steps": 3, "output.resume_from_checkpoint": "latest"})))
    a, b = (load_file(str(p / "pytorch_lora_weights.safetensors")) for p in (out, stopped))
    assert {k.split(".")[0] for k in a} == {"unet", "text_encoder", "text_encoder_2"}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = load_file(str(out / "token_embeddings.safetensors"))
    assert set(tokens) == {"clip_l", "clip_g"} and tokens["clip_g"].shape == (1, 48)  # the tiny bigG's width
    assert list(read_token_file(out / "token_embeddings.safetensors")) == ["<zq>"]

    stock = StableDiffusionXLPipeline.from_pretrained(xl_model)
    stock.load_lora_weights(str(out))
    stock.load_textual_inversion(tokens["clip_l"], token="<zq>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(tokens["clip_g"], token="<zq>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    ours = StableDiffusionXLPipeline.from_pretrained(xl_model)
    load_loras(ours, [(out, 1.0)])  # what generate, validation of a LoRA and the service load
    theirs, bound = picture(stock, prompt="a photo of <zq> dog"), rounding_bound(stock, steps=2, guidance=7.5)
    assert np.abs(picture(ours, prompt="a photo of <zq> dog") - theirs).max() <= bound
    assert main(["generate", "--model", str(xl_model), "--lora", str(out), "--prompt", "a photo of <zq> dog",
                 "--steps", "2", "--height", "64", "--width", "64", "--out", str(tmp_path / "shots")]) == 0
    plain = picture(StableDiffusionXLPipeline.from_pretrained(xl_model), prompt="a photo of <zq> dog")
    assert np.abs(theirs - plain).max() > 5 * bound

    # exported: kohya (the token bundled for both encoders) through our loader, and the single file with the LoRA
    # merged (the token in an embedding file beside it) through stock from_single_file
    kohya = tmp_path / "k.safetensors"
    assert main(["export", str(out), "--format", "kohya", "--out", str(kohya)]) == 0
    from_kohya = StableDiffusionXLPipeline.from_pretrained(xl_model)
    load_loras(from_kohya, [(kohya, 1.0)])
    assert np.abs(picture(from_kohya, prompt="a photo of <zq> dog") - theirs).max() <= bound
    single = tmp_path / "xl.safetensors"
    assert main(["export", str(xl_model), "--merge-lora", str(out), "--format", "single-file",
                 "--out", str(single)]) == 0
    stock = StableDiffusionXLPipeline.from_single_file(str(single), config=str(xl_model), local_files_only=True)
    rows = load_file(str(tmp_path / "xl.zq.safetensors"))
    stock.load_textual_inversion(rows["clip_l"], token="<zq>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(rows["clip_g"], token="<zq>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    assert np.abs(picture(stock, prompt="a photo of <zq> dog") - theirs).max() <= bound


def test_an_sdxl_models_identity_covers_its_second_text_encoder(xl_model, tmp_path):
    """Class images depend on both encoders: two SDXL models that differ only in the second are two models."""
    import shutil

    from transformers import CLIPTextModelWithProjection

    from dreambooth.models.base import model_identity

    other = tmp_path / "other"
    shutil.copytree(xl_model, other)
    encoder = CLIPTextModelWithProjection.from_pretrained(other / "text_encoder_2")
    with torch.no_grad():
        for param in encoder.parameters():
            param.mul_(1.5)
    encoder.save_pretrained(other / "text_encoder_2")
    assert model_identity(other) != model_identity(xl_model)
