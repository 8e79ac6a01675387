"""The tiny offline model: stock diffusers loads it, its tokenizer behaves like CLIP's, builds are reproducible."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from dreambooth.errors import UserError
from dreambooth.models.tiny import build_tiny_model, tokenizer_words

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return CLIPTokenizer.from_pretrained(tiny / "tokenizer", local_files_only=True)


def test_folder_is_a_small_sd_checkpoint(tiny):
    files = {str(p.relative_to(tiny)) for p in tiny.rglob("*") if p.is_file()}
    assert {
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        UNET_WEIGHTS,
        "unet/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/config.json",
    } <= files
    assert not any(name.endswith(".bin") for name in files)
    assert sum((tiny / name).stat().st_size for name in files) < 5_000_000
    assert json.loads((tiny / "model_index.json").read_text())["safety_checker"] == [None, None]


def test_stock_pipeline_loads_and_generates(tiny):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.vae_scale_factor == 4
    images = pipeline(
        "a photo of sks dog",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert len(images) == 1
    assert images[0].size == (64, 64)


def test_prompt_words_are_single_tokens(tokenizer):
    ids = tokenizer("a photo of sks dog").input_ids
    assert len(ids) == 5 + 2  # one id per word, plus bos and eos
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>", "<|endoftext|>",
    ]
    assert [w for w in tokenizer_words() if len(tokenizer.tokenize(w)) != 1] == []


def test_unknown_identifier_splits_into_pieces(tokenizer):
    assert len(tokenizer.tokenize("<saya_token>")) > 1
    assert len(tokenizer.tokenize("zqxw")) > 1


def test_tokenizer_matches_sd_conventions(tokenizer):
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token == "<|startoftext|>"
    padded = tokenizer("a dog", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == 77
    assert padded[-1] == tokenizer.eos_token_id


def test_text_encoder_agrees_with_tokenizer(tiny, tokenizer):
    config = json.loads((tiny / "text_encoder/config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)
    assert config["eos_token_id"] == tokenizer.eos_token_id
    assert config["max_position_embeddings"] == 77


def test_scheduler_records_prediction_type(tiny, tmp_path):
    assert json.loads((tiny / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    v_model = build_tiny_model(tmp_path, prediction_type="v_prediction")
    config = json.loads((v_model / "scheduler/scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    assert config["beta_schedule"] == "scaled_linear"


def test_bad_prediction_type_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="prediction_type"):
        build_tiny_model(tmp_path, prediction_type="sample")
    assert not any(tmp_path.iterdir())


def test_same_seed_same_weights_other_seed_other_weights(tiny, tmp_path):
    same = load_file(build_tiny_model(tmp_path / "same", seed=0) / UNET_WEIGHTS)
    other = load_file(build_tiny_model(tmp_path / "other", seed=1) / UNET_WEIGHTS)
    reference = load_file(tiny / UNET_WEIGHTS)
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not all(torch.equal(reference[k], other[k]) for k in reference)


def test_build_leaves_the_global_random_state_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path)
    assert torch.equal(torch.rand(3), expected)


# The larger sizes: `small` for CPU benchmarks, `sd15` (SD 1.5's exact architecture) for GPU benchmarks.


def _parameter_counts(size):
    """Parameters of the size's UNet, VAE and text encoder, instantiated on the meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.models.tiny import model_configs

    configs = model_configs(size)
    with torch.device("meta"):
        modules = (UNet2DConditionModel(**configs["unet"]), AutoencoderKL(**configs["vae"]),
                   CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])))
    assert all(p.is_meta for m in modules for p in m.parameters())
    return tuple(sum(p.numel() for p in m.parameters()) for m in modules)


def test_sd15_has_stable_diffusion_1_5s_exact_parameter_counts():
    # UNet 859,520,964, VAE 83,653,863, CLIP ViT-L/14 text tower 123,060,480: the counts of the real SD 1.5 files.
    assert _parameter_counts("sd15") == (859_520_964, 83_653_863, 123_060_480)


def test_small_is_a_35m_unet_with_a_256_wide_text_encoder():
    from dreambooth.models.tiny import model_configs

    unet, vae, text = _parameter_counts("small")
    assert 34_000_000 < unet < 36_000_000
    assert vae < 5_000_000 and text < 5_000_000
    configs = model_configs("small")
    assert configs["unet"]["block_out_channels"] == (64, 128, 256, 256)
    assert configs["unet"]["cross_attention_dim"] == configs["text_encoder"]["hidden_size"] == 256


def test_small_builds_loads_in_stock_diffusers_with_vae_factor_8(tmp_path):
    from dreambooth.cli import main

    model = tmp_path / "small"
    assert main(["tiny-model", str(model), "--size", "small"]) == 0
    pipeline = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.vae_scale_factor == 8
    assert pipeline.unet.config.sample_size * 8 == 128  # the size's default resolution
    image = pipeline("a photo of sks toy", num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (128, 128)
    assert "size `small`" in (model / "README.md").read_text()


def test_resolution_must_fit_the_sizes_downsampling(tmp_path):
    with pytest.raises(UserError, match="multiple of 64 for size small"):
        build_tiny_model(tmp_path, size="small", resolution=96)
    with pytest.raises(UserError, match="size must be one of"):
        build_tiny_model(tmp_path, size="huge")
    assert not any(tmp_path.iterdir())


def test_sd15_tokenizer_has_clips_ids_and_grows_like_clip(tmp_path, tokenizer):
    from dreambooth.models.tiny import CLIP_VOCAB_SIZE, build_tokenizer, model_configs

    padded = build_tokenizer(tmp_path / "tokenizer", CLIP_VOCAB_SIZE)
    config = model_configs("sd15")["text_encoder"]
    assert len(padded) == config["vocab_size"] == 49408
    assert (padded.bos_token_id, padded.eos_token_id, padded.pad_token_id) == (49406, 49407, 49407)
    assert (config["bos_token_id"], config["eos_token_id"]) == (49406, 49407)
    # Words tokenize to the same pieces as with the tiny tokenizer; only the special ids moved.
    assert padded.tokenize("a photo of sks dog") == tokenizer.tokenize("a photo of sks dog")
    assert max(padded("a photo of sks dog zqxw").input_ids[1:-1]) < len(tokenizer)
    padded.add_tokens(["<saya_token>"])
    assert padded.convert_tokens_to_ids("<saya_token>") == 49408  # the first id past CLIP's, as with SD 1.5
