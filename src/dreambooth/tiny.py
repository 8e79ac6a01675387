"""A tiny random-weight Stable Diffusion pipeline, built offline, so tests and demos need no model hub.

The folder it writes has the layout of a real SD 1.x checkpoint (unet, vae, text_encoder, tokenizer,
scheduler, model_index.json), so stock `StableDiffusionPipeline.from_pretrained` loads it and every code
path that reads a real base model can be exercised in seconds on a CPU.
"""

import contextlib
import json
import pathlib
from collections import Counter

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from dreambooth.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")
VAE_SCALE_FACTOR = 4  # three VAE levels halve the image twice
TEXT_HIDDEN_SIZE = 32
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


def tokenizer_words() -> list[str]:
    """The words that the tiny tokenizer encodes as a single token each."""
    return list(_WORDS)


def build_tiny_model(
    out_dir, *, prediction_type: str = "epsilon", seed: int = 0, resolution: int = 64
) -> pathlib.Path:
    """Build a tiny random SD pipeline and save it to `out_dir` in diffusers format; same seed, same bytes."""
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if resolution <= 0 or resolution % (VAE_SCALE_FACTOR * 2):
        raise UserError(f"resolution must be a positive multiple of {VAE_SCALE_FACTOR * 2}, got {resolution}")
    out_dir = pathlib.Path(out_dir)
    tokenizer = _tokenizer(out_dir / "tokenizer")
    # Module constructors draw from the global generator; forking keeps the caller's random state intact.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = StableDiffusionPipeline(
            vae=_vae(resolution),
            text_encoder=_text_encoder(tokenizer),
            tokenizer=tokenizer,
            unet=_unet(resolution // VAE_SCALE_FACTOR),
            scheduler=_scheduler(prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    with _quiet_progress_bars():
        pipeline.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").write_text(_README)
    return out_dir


@contextlib.contextmanager
def _quiet_progress_bars():
    """Hide transformers' one-step "Writing model shards" bar, then restore whatever the caller had."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _unet(sample_size: int) -> UNet2DConditionModel:
    """SD 1.x's UNet shape (cross-attention high, plain ResNet block low, attention in the middle), shrunk.

    Narrow (16, 32) levels: on 2 CPU cores a step costs mostly per-op overhead, yet (32, 64) still took
    about a quarter longer; this keeps VAE encode plus UNet forward and backward near 0.06 s at 64 px.
    """
    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=2,  # diffusers' legacy name: this is the number of heads, 8 channels each
        norm_num_groups=8,
    )


def _vae(sample_size: int) -> AutoencoderKL:
    """A three-level VAE, so latents are 1/4 of the image side (SD's is 1/8, but 8 px latents are too few)."""
    return AutoencoderKL(
        sample_size=sample_size,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.18215,
    )


def _text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A two-layer CLIP text model whose special-token ids match the tokenizer's."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _scheduler(prediction_type: str) -> DDPMScheduler:
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


def _tokenizer(folder: pathlib.Path) -> CLIPTokenizer:
    """Write CLIP-format vocab.json and merges.txt to `folder` and load them as a CLIPTokenizer.

    CLIP's layout: the 256 byte-level symbols, the same with the end-of-word mark `</w>`, one token per
    merge, then the two special tokens. SD 1.x pads with the end-of-text token, so we do too.
    """
    merges = _learn_merges(_WORDS)
    # The byte-level alphabet sorted by code point is exactly CLIP's bytes_to_unicode order.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = list(dict.fromkeys(a + b for a, b in merges))
    tokens = alphabet + [s + "</w>" for s in alphabet] + merged + [BOS, EOS]
    vocab = json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_txt, encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token=EOS)


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
