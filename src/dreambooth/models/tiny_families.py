"""Random-weight models of the other Stable Diffusion families, built offline like `models.tiny`'s SD 1.x ones:

- `sd2-tiny`: SD 2.x's shape shrunk (an OpenCLIP-style text encoder: GELU, padding with `!`; linear projections in
  the UNet's attention; v-prediction by default), 64 px.
- `sdxl-tiny`: SDXL's shape shrunk: two text encoders (a CLIP one, and an OpenCLIP one with a projection whose
  pooled output conditions the UNet), the UNet's `text_time` embedding of the size and crop conditioning, 64 px.
- `sdxl`: SDXL 1.0's exact architecture (UNet 2,567.5 M, text encoders 123.1 M and 694.7 M, VAE 83.7 M) at 1024 px,
  for GPU benchmarks; its configs can be instantiated on the meta device to check the counts for free.

Each folder loads in stock diffusers (`StableDiffusionPipeline` for sd2-tiny, `StableDiffusionXLPipeline` for the
SDXL ones). Training them is issue 16's work; until then `dreambooth train` refuses an SDXL folder by name.
The flow-matching sizes (`flux-tiny`, `flux-schnell-tiny`, `sd3-tiny`, `flux`, `sd3`) are `models.tiny_flow`'s.
"""

from __future__ import annotations

import pathlib

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dreambooth.errors import UserError
from dreambooth.formats.atomic import move_into, temporary_folder, temporary_name
from dreambooth.models.loading import quiet_progress_bars
from dreambooth.models.tiny import (
    CLIP_VOCAB_SIZE,
    PREDICTION_TYPES,
    SIZES,
    _sd15_text_config,
    _sd15_vae,
    _vae,
    _vocab_tokens,
    build_tiny_model,
    build_tokenizer,
    sd_noise_scheduler,
)
from dreambooth.models.tiny_flow import FLOW_SIZES, build_flow_model, flow_configs

FAMILY_SIZES = ("sd2-tiny", "sdxl-tiny", "sdxl")
DEFAULT_RESOLUTION = {"sd2-tiny": 64, "sdxl-tiny": 64, "sdxl": 1024}
DEFAULT_PREDICTION = {"sd2-tiny": "v_prediction", "sdxl-tiny": "epsilon", "sdxl": "epsilon"}
TIME_EMBED = {"sdxl-tiny": 8, "sdxl": 256}  # addition_time_embed_dim: each of the 6 size/crop numbers
SIDE_MULTIPLE = {"sd2-tiny": 8, "sdxl-tiny": 8, "sdxl": 32}  # the VAE factor times the UNet's downsamplings
ALL_SIZES = SIZES + FAMILY_SIZES + FLOW_SIZES


def build_model(out_dir, *, size: str = "tiny", prediction_type: str | None = None, seed: int = 0,
                resolution: int | None = None) -> pathlib.Path:
    """A random-weight model of any size, SD 1.x (`models.tiny`) or another family; same seed, same bytes."""
    if size not in ALL_SIZES:
        raise UserError(f"size must be one of {ALL_SIZES}, got {size!r}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if size in FLOW_SIZES:
        return build_flow_model(out_dir, size=size, prediction_type=prediction_type, seed=seed, resolution=resolution)
    if size in SIZES:
        return build_tiny_model(out_dir, prediction_type=prediction_type or "epsilon", seed=seed,
                                resolution=resolution, size=size)
    resolution = DEFAULT_RESOLUTION[size] if resolution is None else resolution
    if resolution <= 0 or resolution % SIDE_MULTIPLE[size]:
        raise UserError(f"resolution must be a positive multiple of {SIDE_MULTIPLE[size]} for size {size}, got "
                        f"{resolution}")
    out_dir = pathlib.Path(out_dir)
    with temporary_folder(temporary_name(out_dir)) as tmp:
        build_family_model(tmp, size, resolution, prediction_type, seed)
        move_into(tmp, out_dir, last="model_index.json")
    return out_dir


def tiny_model_command(options) -> pathlib.Path:
    """`dreambooth tiny-model`: `options` is a command_options.TinyModelOptions."""
    from dreambooth.training.rundir import claim_work_folder

    claim_work_folder(options.dir, "tiny-model")  # never writes random weights over someone's model
    path = build_model(options.dir, size=options.size, prediction_type=options.prediction_type, seed=options.seed,
                       resolution=options.resolution)
    print(f"{options.size} random-weight model written to {path}")
    return path


def family_configs(size: str, resolution: int | None = None) -> dict[str, dict]:
    """Constructor arguments of each module of a size (`text_encoder_2` for the SDXL ones), building nothing."""
    if size in FLOW_SIZES:
        return flow_configs(size, resolution)
    resolution = DEFAULT_RESOLUTION[size] if resolution is None else resolution
    vocab = CLIP_VOCAB_SIZE if size == "sdxl" else len(_vocab_tokens())
    ids = {"bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    if size == "sd2-tiny":
        return {"unet": _sd2_tiny_unet(resolution // 4), "vae": _vae(resolution),
                "text_encoder": dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                                     projection_dim=32, **{**ids, "pad_token_id": 0})}
    if size == "sdxl-tiny":
        te = dict(vocab_size=vocab, intermediate_size=37, num_hidden_layers=2, max_position_embeddings=77, **ids)
        return {"unet": _sdxl_tiny_unet(resolution // 4), "vae": {**_vae(resolution), "scaling_factor": 0.13025},
                "text_encoder": {**te, "hidden_size": 32, "num_attention_heads": 4},
                # wider than the first, with a projection of yet another width, as SDXL's are (768; 1280 and its
                # projection): stock from_single_file tells the two encoders apart by width
                "text_encoder_2": {**te, "hidden_size": 48, "num_attention_heads": 4, "hidden_act": "gelu",
                                   "projection_dim": 40, "pad_token_id": 0}}
    return {"unet": _sdxl_unet(resolution // 8), "vae": {**_sd15_vae(resolution), "scaling_factor": 0.13025,
                                                         "force_upcast": True},
            "text_encoder": _sd15_text_config(vocab, ids),
            "text_encoder_2": dict(vocab_size=vocab, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                                   projection_dim=1280, layer_norm_eps=1e-5, **{**ids, "pad_token_id": 0})}


def _sd2_tiny_unet(sample_size: int) -> dict:
    """SD 2.x's UNet traits (heads per level, linear projections) at the tiny model's size."""
    return dict(sample_size=sample_size, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)


def _sdxl_tiny_unet(sample_size: int) -> dict:
    """SDXL's UNet traits at the tiny model's size: no attention at the top level, a deeper transformer below, the
    context of both text encoders side by side, and the pooled text + 6 size/crop numbers as an added embedding."""
    time_embed = TIME_EMBED["sdxl-tiny"]
    return dict(sample_size=sample_size, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                cross_attention_dim=32 + 48, attention_head_dim=(2, 4), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=time_embed,
                projection_class_embeddings_input_dim=40 + 6 * time_embed, norm_num_groups=8)


def _sdxl_unet(sample_size: int) -> dict:
    """SDXL 1.0's UNet config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): 2,567,463,684
    parameters."""
    return dict(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu")


def build_family_model(out_dir: pathlib.Path, size: str, resolution: int, prediction_type: str | None,
                       seed: int) -> None:
    """Writes the random pipeline of `size` into `out_dir` (an empty staging folder; `tiny.build_tiny_model`
    moves it into place)."""
    configs = family_configs(size, resolution)
    vocab = configs["text_encoder"]["vocab_size"] if size == "sdxl" else None
    tokenizer = build_tokenizer(out_dir / "tokenizer", vocab)
    scheduler = sd_noise_scheduler(prediction_type or DEFAULT_PREDICTION[size])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        if size == "sd2-tiny":
            tokenizer.pad_token = "!"  # OpenCLIP pads with `!` (id 0), not with the end-of-text token
            tokenizer.save_pretrained(out_dir / "tokenizer")
            pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                               unet=UNet2DConditionModel(**configs["unet"]), scheduler=scheduler,
                                               safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
        else:
            tokenizer_2 = build_tokenizer(out_dir / "tokenizer_2", vocab)
            tokenizer_2.pad_token = "!"
            tokenizer_2.save_pretrained(out_dir / "tokenizer_2")
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
            pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                                 tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                                 unet=UNet2DConditionModel(**configs["unet"]), scheduler=scheduler)
    with quiet_progress_bars():
        pipeline.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").write_text(f"# Random-weight {size}\n\nMade by `dreambooth tiny-model --size {size}`. "
                                       "Every weight is random: the images it generates are noise. It exists to "
                                       "test and measure with no download.\n")
