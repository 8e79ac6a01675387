"""Random-weight Stable Diffusion pipelines, built offline, so tests, demos and benchmarks need no model hub.

The folder it writes has the layout of a real SD 1.x checkpoint (unet, vae, text_encoder, tokenizer,
scheduler, model_index.json), so stock `StableDiffusionPipeline.from_pretrained` loads it and every code
path that reads a real base model can be exercised offline. Three sizes:

- `tiny`: 0.2 M-parameter UNet at 64 px; a training step takes a few hundredths of a second on a CPU (tests).
- `small`: SD's shape shrunk to a 35 M-parameter UNet at 128 px, VAE factor 8 (CPU benchmarks).
- `sd15`: Stable Diffusion 1.5's exact architecture (UNet 859.5 M, VAE 83.7 M, CLIP ViT-L text 123.1 M) at
  512 px, so speed and memory measured on it are those of real SD 1.5 (GPU benchmarks; ~4 GB on disk).
"""

import json
import pathlib
import random
from collections import Counter

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image, ImageDraw
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreambooth.errors import UserError
from dreambooth.formats.atomic import move_into, temporary_folder, temporary_name
from dreambooth.models.loading import quiet_progress_bars

PREDICTION_TYPES = ("epsilon", "v_prediction")
SIZES = ("tiny", "small", "sd15")
DEFAULT_RESOLUTION = {"tiny": 64, "small": 128, "sd15": 512}
VAE_SCALE_FACTOR = 4  # tiny: three VAE levels halve the image twice
SD_VAE_SCALE_FACTOR = 8  # small and sd15: four levels, as in SD
TEXT_HIDDEN_SIZE = 32
CLIP_VOCAB_SIZE = 49408  # CLIP's vocabulary: <|startoftext|> is 49406, <|endoftext|> 49407
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words that become one token each. `sks` is the rare identifier of the DreamBooth paper; anything else
# (e.g. "zqxw") is split into several pieces, as a real CLIP tokenizer splits an unknown identifier.
_WORDS = """
a an the photo picture of in on with and dog cat girl boy man woman person toy object shape circle
square triangle star red green blue yellow white black orange purple background style sks
is at by for to from front top side view close up portrait painting drawing image high quality
small big sitting standing lying wearing hat beach snow grass forest city street table room water
""".split()

_README = """# Tiny random-weight Stable Diffusion

Made by `dreambooth tiny-model`. Every weight is random: the images it generates are noise. It exists
so that training, generation and evaluation can be tested end to end in seconds, with no download.
"""

_SIZED_README = """# Random-weight Stable Diffusion, size `{size}`

Made by `dreambooth tiny-model --size {size}`. Every weight is random: the images it generates are noise.
{what}
It exists to measure training speed and memory with no download; it says nothing about image quality.
"""

_WHAT = {
    "small": "Stable Diffusion's UNet shape shrunk to 35 M parameters (channels 64-128-256-256, cross-attention\n"
             "256), a 256-wide 4-layer CLIP text encoder and a 4-level VAE (factor 8), for 128 px.",
    "sd15": "Stable Diffusion 1.5's exact architecture (UNet 859.5 M, VAE 83.7 M, CLIP ViT-L/14 text encoder\n"
            "123.1 M parameters) for 512 px. The tokenizer is a small generated BPE vocabulary padded to CLIP's\n"
            "49,408 ids with CLIP's special-token ids, so token ids, embedding shapes and added tokens behave as\n"
            "with the real SD 1.5 tokenizer.",
}


def synthetic_photo(seed: int, size: int = 80) -> Image.Image:
    """A made-up subject photo for the random-weight models: a red square with yellow stripes, on a random
    plain background at a random place (speed measurements and smoke runs; `dreambooth.evaluation.world` has the subject
    whose learning can be measured)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(40, 220) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    side = rng.randrange(size // 3, size // 2)
    x, y = rng.randrange(0, size - side), rng.randrange(0, size - side)
    draw.rectangle([x, y, x + side, y + side], fill=(220, 30, 30))
    for k in range(0, side, 8):
        draw.line([x + k, y, x, y + k], fill=(250, 220, 40), width=3)
    return image


def tokenizer_words() -> list[str]:
    """The words that the tiny tokenizer encodes as a single token each."""
    return list(_WORDS)


def build_tiny_model(
    out_dir, *, prediction_type: str = "epsilon", seed: int = 0, resolution: int | None = None, size: str = "tiny"
) -> pathlib.Path:
    """Build a random SD pipeline of `size` and save it to `out_dir` in diffusers format; same seed, same bytes.

    `resolution` defaults to the size's own (tiny 64, small 128, sd15 512).
    """
    if size not in SIZES:
        raise UserError(f"size must be one of {SIZES}, got {size!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    resolution = DEFAULT_RESOLUTION[size] if resolution is None else resolution
    step = resolution_multiple(size)
    if resolution <= 0 or resolution % step:
        raise UserError(f"resolution must be a positive multiple of {step} for size {size}, got {resolution}")
    out_dir = pathlib.Path(out_dir)
    # Built beside out_dir and moved in with model_index.json last: a folder that loads is a whole model.
    with temporary_folder(temporary_name(out_dir)) as tmp:
        _build(tmp, size, resolution, prediction_type, seed)
        move_into(tmp, out_dir, last="model_index.json")
    return out_dir


def _build(out_dir: pathlib.Path, size: str, resolution: int, prediction_type: str, seed: int) -> None:
    tokenizer = build_tokenizer(out_dir / "tokenizer", _vocab_size(size))
    configs = model_configs(size, resolution)
    # Module constructors draw from the global generator; forking keeps the caller's random state intact.
    # The order (VAE, text encoder, UNet) is part of what a seed means: keep it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = StableDiffusionPipeline(
            vae=AutoencoderKL(**configs["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**configs["unet"]),
            scheduler=sd_noise_scheduler(prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    with quiet_progress_bars():
        pipeline.save_pretrained(out_dir, safe_serialization=True)
    readme = _README if size == "tiny" else _SIZED_README.format(size=size, what=_WHAT[size])
    (out_dir / "README.md").write_text(readme)


def resolution_multiple(size: str) -> int:
    """Image sides must divide by the VAE factor times the UNet's downsamplings (tiny has one, SD three)."""
    return VAE_SCALE_FACTOR * 2 if size == "tiny" else SD_VAE_SCALE_FACTOR * 8


def model_configs(size: str = "tiny", resolution: int | None = None) -> dict[str, dict]:
    """Constructor arguments of the UNet, the VAE and the CLIPTextConfig of a size, without building anything.

    `UNet2DConditionModel(**c["unet"])`, `AutoencoderKL(**c["vae"])` and `CLIPTextConfig(**c["text_encoder"])`
    give the modules `build_tiny_model` saves (instantiate on the meta device to inspect sd15 for free).
    """
    if size not in SIZES:
        raise UserError(f"size must be one of {SIZES}, got {size!r}")
    resolution = DEFAULT_RESOLUTION[size] if resolution is None else resolution
    factor = VAE_SCALE_FACTOR if size == "tiny" else SD_VAE_SCALE_FACTOR
    builders = {"tiny": (_unet, _vae, _text_config), "small": (_small_unet, _small_vae, _small_text_config),
                "sd15": (_sd15_unet, _sd15_vae, _sd15_text_config)}[size]
    unet, vae, text = builders
    vocab = _vocab_size(size)
    ids = {"bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    return {"unet": unet(resolution // factor), "vae": vae(resolution), "text_encoder": text(vocab, ids)}


def _unet(sample_size: int) -> dict:
    """SD 1.x's UNet shape (cross-attention high, plain ResNet block low, attention in the middle), shrunk.

    Narrow (16, 32) levels: on 2 CPU cores a step costs mostly per-op overhead, yet (32, 64) still took
    about a quarter longer; this keeps VAE encode plus UNet forward and backward near 0.06 s at 64 px.
    """
    return dict(
        sample_size=sample_size,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=2,  # diffusers' legacy name: this is the number of heads, 8 channels each
        norm_num_groups=8,
    )


def _vae(sample_size: int) -> dict:
    """A three-level VAE, so latents are 1/4 of the image side (SD's is 1/8, but 8 px latents are too few)."""
    return dict(
        sample_size=sample_size,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.18215,
    )


def _text_config(vocab_size: int, ids: dict) -> dict:
    """A two-layer CLIP text model whose special-token ids match the tokenizer's."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        **ids,
    )


# SD 1.x's block layout: cross-attention in the three high levels, a plain ResNet level at the bottom.
_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def _small_unet(sample_size: int) -> dict:
    """SD 1.x's UNet at a quarter of its width with a 256-wide text context: 35 M parameters.

    Heads of 32 channels at every level (SD 1.5 has 8 heads of 40-160 channels); 8 heads of 8 channels at
    the 64-wide level would be mostly overhead.
    """
    return dict(
        sample_size=sample_size,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=_SD_DOWN,
        up_block_types=_SD_UP,
        cross_attention_dim=256,
        attention_head_dim=(2, 4, 8, 8),  # diffusers' legacy name: heads per level
    )


def _small_vae(sample_size: int) -> dict:
    """SD's four-level VAE (factor 8) at a quarter of its width, one ResNet per level."""
    return dict(
        sample_size=sample_size,
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        scaling_factor=0.18215,
    )


def _small_text_config(vocab_size: int, ids: dict) -> dict:
    """A 4-layer, 256-wide CLIP text model (CLIP ViT-L's is 12 layers, 768 wide)."""
    return dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=77, **ids)


def _sd15_unet(sample_size: int) -> dict:
    """Stable Diffusion 1.5's UNet config (runwayml/stable-diffusion-v1-5, unet/config.json): 859,520,964 parameters."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=_SD_DOWN,
        up_block_types=_SD_UP,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        center_input_sample=False,
        mid_block_scale_factor=1,
    )


def _sd15_vae(sample_size: int) -> dict:
    """Stable Diffusion 1.5's VAE config (vae/config.json): 83,653,863 parameters."""
    return dict(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        act_fn="silu",
        scaling_factor=0.18215,
    )


def _sd15_text_config(vocab_size: int, ids: dict) -> dict:
    """CLIP ViT-L/14's text tower, SD 1.5's text encoder (text_encoder/config.json): 123,060,480 parameters."""
    return dict(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, **ids)


def sd_noise_scheduler(prediction_type: str) -> DDPMScheduler:
    """The noise schedule SD 1.x was trained with.

    `from_config` keeps `set_alpha_to_one`, which DDPM ignores, in the saved config, so a DDIM or PNDM
    sampler built from this config later gets SD's value rather than its own default.
    """
    return DDPMScheduler.from_config(
        {
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "prediction_type": prediction_type,
        }
    )


def build_tokenizer(folder: pathlib.Path, vocab_size: int | None = None, words: list[str] | None = None,
               max_length: int = 77) -> CLIPTokenizer:
    """Write CLIP-format vocab.json and merges.txt to `folder` and load them as a CLIPTokenizer.

    CLIP's layout: the 256 byte-level symbols, the same with the end-of-word mark `</w>`, one token per
    merge, then the two special tokens. SD 1.x pads with the end-of-text token, so we do too. With
    `vocab_size`, unused filler entries go before the special tokens so that the vocabulary has exactly that
    many ids and the special tokens sit where CLIP's do; no merge produces a filler, so text never maps to one.
    `words` (default: the tiny model's) are the words that become one token each; `max_length` is the
    padded prompt length (CLIP's is 77).
    """
    words = _WORDS if words is None else words
    tokens = _vocab_tokens(vocab_size, words)
    vocab = json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _learn_merges(words))
    (folder / "merges.txt").write_text(merges_txt, encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, pad_token=EOS)


def _vocab_tokens(vocab_size: int | None = None, words: list[str] | None = None) -> list[str]:
    """The tokenizer's vocabulary in id order (see `_tokenizer`)."""
    words = _WORDS if words is None else words
    # The byte-level alphabet sorted by code point is exactly CLIP's bytes_to_unicode order.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = list(dict.fromkeys(a + b for a, b in _learn_merges(words)))
    tokens = alphabet + [s + "</w>" for s in alphabet] + merged
    if vocab_size is not None:
        if vocab_size < len(tokens) + 2:
            raise ValueError(f"vocab_size {vocab_size} is below the {len(tokens) + 2} tokens the words need")
        tokens += [f"<|unused_{i}|>" for i in range(vocab_size - len(tokens) - 2)]
    return tokens + [BOS, EOS]


def _vocab_size(size: str) -> int:
    """sd15 gets CLIP's 49,408 ids; tiny and small keep the generated vocabulary as it is."""
    return CLIP_VOCAB_SIZE if size == "sd15" else len(_vocab_tokens())


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol, breaking ties alphabetically.

    Written by hand because `tokenizers`' BpeTrainer breaks ties between equally frequent pairs in hash
    order, which changes from one process to the next; the tiny model must be the same on every build.
    """
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges = []
    while pairs := Counter(pair for w in words for pair in zip(w, w[1:])):
        best = max(sorted(pairs), key=pairs.__getitem__)
        merges.append(best)
        words = [_merge(w, best) for w in words]
    return merges


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace each occurrence of `pair` in `symbols`, left to right, by the joined symbol."""
    out, i = [], 0
    while i < len(symbols):
        if tuple(symbols[i : i + 2]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out
