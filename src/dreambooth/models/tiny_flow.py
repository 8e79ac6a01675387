"""Random-weight models of the flow-matching families (Flux.1, SD3/3.5), built offline like `models.tiny`'s:

- `flux-tiny`: FLUX.1-dev's shape shrunk: a 32-wide transformer of 2 double-stream and 2 single-stream blocks (2 heads
  of 16, RoPE axes 4+6+6) with the guidance embedding, 137 k parameters; a CLIP text encoder (39 k) and a T5 encoder
  (136 k); 64 px.
- `flux-schnell-tiny`: the same without the guidance embedding (128 k), with FLUX.1-schnell's scheduler (shift 1, no
  resolution-dependent shift) and its 256-token T5 limit.
- `sd3-tiny`: SD3.5-large's shape shrunk: a 32-wide MMDiT of 2 joint blocks (4 heads of 8, RMS-normed queries and
  keys, 2x2 patches), 84 k parameters; two CLIP text encoders with projections, 32 and 48 wide as CLIP-L and CLIP-G
  (40 k, 66 k), and the T5 encoder (136 k); 64 px.
- `flux`: FLUX.1-dev's exact architecture (transformer 11,901.4 M, CLIP-L text 123.1 M, T5-XXL encoder 4,762.3 M,
  VAE 83.8 M) at 1024 px, in bfloat16 as published (~34 GB on disk; ~60 GB of memory to build), for GPU benchmarks.
- `sd3`: SD3.5-large's exact architecture (transformer 8,056.6 M, CLIP-L 123.7 M and CLIP-G 694.7 M with their
  projections, T5-XXL encoder 4,762.3 M, VAE 83.8 M) at 1024 px, in bfloat16 (~27 GB on disk), for GPU benchmarks.

Every size has a 16-channel VAE of four levels (factor 8), and its transformer takes 2x2 latent patches (Flux packs
them, SD3 patchifies), so an image side must be a multiple of 16 (`SIDE_MULTIPLE`). The tiny VAE (271 k) is 16-16-32-32
wide, one ResNet a level: on one core at 64 px it encodes in 4 ms and decodes in 8, where a transformer forward with
512 T5 tokens takes 11, so keeping the real factor costs little. The full sizes' configs can be instantiated on the
meta device (`flow_configs`) to check their counts for free.

The T5 tokenizer is a Unigram vocabulary written here, with T5's special ids (`<pad>` 0, `</s>` 1, `<unk>` 2, the 100
`<extra_id_N>` sentinels last) and its end-of-sequence post-processor; the CLIP ones are `models.tiny`'s. Each folder
loads in stock diffusers (`FluxPipeline`, `StableDiffusion3Pipeline`).
"""

from __future__ import annotations

import pathlib

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from dreambooth.errors import UserError
from dreambooth.formats.atomic import move_into, temporary_folder, temporary_name
from dreambooth.models.loading import quiet_progress_bars
from dreambooth.models.tiny import (
    CLIP_VOCAB_SIZE,
    _sd15_text_config,
    _text_config,
    _vocab_tokens,
    build_tokenizer,
    tokenizer_words,
)

FLOW_SIZES = ("flux-tiny", "flux-schnell-tiny", "sd3-tiny", "flux", "sd3")
FULL_SIZES = ("flux", "sd3")
FAMILY = {"flux-tiny": "flux", "flux-schnell-tiny": "flux", "flux": "flux", "sd3-tiny": "sd3", "sd3": "sd3"}
DEFAULT_RESOLUTION = {"flux-tiny": 64, "flux-schnell-tiny": 64, "sd3-tiny": 64, "flux": 1024, "sd3": 1024}
LATENT_CHANNELS = 16
VAE_SCALE_FACTOR = 8  # four VAE levels, as in Flux's and SD3's own VAEs
SIDE_MULTIPLE = {size: VAE_SCALE_FACTOR * 2 for size in FLOW_SIZES}  # the VAE factor times the 2x2 latent patches
# The tokens the T5 tokenizer pads or cuts a prompt to (its model_max_length), as in each model's tokenizer config;
# the stock pipelines pass their own max_sequence_length (Flux 512, SD3 256).
T5_MAX_LENGTH = {"flux-tiny": 512, "flux-schnell-tiny": 256, "sd3-tiny": 512, "flux": 512, "sd3": 512}
T5_VOCAB_SIZE = 32128  # T5 v1.1's embedding rows: its tokenizer's 32,100 ids rounded up to a multiple of 128
T5_PIECES = 32000  # T5's SentencePiece vocabulary; the 100 sentinels follow it
T5_SENTINELS = 100
VAE_FACTORS = {"flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159},  # FLUX.1-dev's vae/config.json
               "sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609}}  # SD3/3.5's vae/config.json
# The published full models are bfloat16; in float32 Flux would be 68 GB, over a benchmark machine's disk.
DTYPE = {"flux": torch.bfloat16, "sd3": torch.bfloat16}
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

_README = """# Random-weight {size}

Made by `dreambooth tiny-model --size {size}`. Every weight is random: the images it generates are noise. It exists to
test and measure with no download. Image sides must be multiples of {multiple} (VAE factor {factor} times the
transformer's 2x2 latent patches); its own side is {resolution} px.
"""


def build_flow_model(out_dir, *, size: str, prediction_type: str | None = None, seed: int = 0,
                     resolution: int | None = None) -> pathlib.Path:
    """Build a random-weight Flux or SD3 pipeline of `size` and save it to `out_dir`; same seed, same bytes.

    Flow-matching models predict the velocity from noise to image: there is no prediction type to choose.
    """
    if size not in FLOW_SIZES:
        raise UserError(f"size must be one of {FLOW_SIZES}, got {size!r}")
    if prediction_type is not None:
        raise UserError(f"size {size} is a flow-matching model, which predicts the flow from noise to image: "
                        "--prediction-type applies to the Stable Diffusion 1.x, 2.x and SDXL sizes only")
    resolution = DEFAULT_RESOLUTION[size] if resolution is None else resolution
    if resolution <= 0 or resolution % SIDE_MULTIPLE[size]:
        raise UserError(f"resolution must be a positive multiple of {SIDE_MULTIPLE[size]} for size {size}, got "
                        f"{resolution}")
    out_dir = pathlib.Path(out_dir)
    # Built beside out_dir and moved in with model_index.json last: a folder that loads is a whole model.
    with temporary_folder(temporary_name(out_dir)) as tmp:
        _build(tmp, size, resolution, seed)
        move_into(tmp, out_dir, last="model_index.json")
    return out_dir


def _build(out_dir: pathlib.Path, size: str, resolution: int, seed: int) -> None:
    configs = flow_configs(size, resolution)
    full = size in FULL_SIZES
    clip_vocab = CLIP_VOCAB_SIZE if full else None
    tokenizer = build_tokenizer(out_dir / "tokenizer", clip_vocab)
    t5_tokenizer = build_t5_tokenizer(T5_PIECES if full else None, max_length=T5_MAX_LENGTH[size])
    dtype = DTYPE.get(size, torch.float32)

    def made(module: torch.nn.Module) -> torch.nn.Module:
        # Each cast as it is made: a full size never holds two float32 giants at once.
        return module if dtype == torch.float32 else module.to(dtype)

    # Module constructors draw from the global generator; forking keeps the caller's random state intact.
    # The order (VAE, text encoders in pipeline order, transformer) is part of what a seed means: keep it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = made(AutoencoderKL(**configs["vae"]))
        if FAMILY[size] == "flux":
            text_encoder = made(CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])))
            t5 = made(T5EncoderModel(T5Config(**configs["text_encoder_2"])))
            pipeline = FluxPipeline(scheduler=flow_scheduler(size), vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                                    transformer=made(FluxTransformer2DModel(**configs["transformer"])))
        else:
            tokenizer_2 = build_tokenizer(out_dir / "tokenizer_2", clip_vocab)
            tokenizer_2.pad_token = "!"  # the OpenCLIP bigG tokenizer pads with `!` (id 0), as SDXL's second does
            text_encoder = made(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder"])))
            text_encoder_2 = made(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])))
            t5 = made(T5EncoderModel(T5Config(**configs["text_encoder_3"])))
            pipeline = StableDiffusion3Pipeline(
                transformer=made(SD3Transformer2DModel(**configs["transformer"])), scheduler=flow_scheduler(size),
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2, text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    with quiet_progress_bars():
        pipeline.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").write_text(_README.format(size=size, multiple=SIDE_MULTIPLE[size],
                                                      factor=VAE_SCALE_FACTOR, resolution=resolution))


def flow_configs(size: str, resolution: int | None = None) -> dict[str, dict]:
    """Constructor arguments of each module of a size, building nothing: `transformer` and `vae` for the diffusers
    classes, `text_encoder`... for `CLIPTextConfig` or `T5Config` (Flux: CLIP, T5; SD3: CLIP-L, CLIP-G, T5)."""
    if size not in FLOW_SIZES:
        raise UserError(f"size must be one of {FLOW_SIZES}, got {size!r}")
    resolution = DEFAULT_RESOLUTION[size] if resolution is None else resolution
    full = size in FULL_SIZES
    vocab = CLIP_VOCAB_SIZE if full else len(_vocab_tokens())
    ids = {"bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    vae = {**(_full_vae if full else _tiny_vae)(resolution), **VAE_FACTORS[FAMILY[size]]}
    t5 = _t5_xxl_config() if full else _tiny_t5_config(len(t5_vocabulary()))
    if FAMILY[size] == "flux":
        clip = _sd15_text_config(vocab, ids) if full else _text_config(vocab, ids)
        transformer = _flux_transformer() if full else _flux_tiny_transformer(
            joint_attention_dim=t5["d_model"], pooled_projection_dim=clip["hidden_size"],
            guidance_embeds=size == "flux-tiny")
        return {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5}
    if full:
        clip_l = {**_sd15_text_config(vocab, ids), "projection_dim": 768}
        # CLIP ViT-bigG/14's text tower with its projection (SD3's text_encoder_2, as SDXL's): 694,659,840 parameters
        clip_g = dict(vocab_size=vocab, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                      layer_norm_eps=1e-5, **{**ids, "pad_token_id": 0})
        transformer = _sd35_large_transformer(resolution)
    else:
        clip_l = {**_text_config(vocab, ids), "projection_dim": 32}
        clip_g = dict(vocab_size=vocab, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=48,
                      **{**ids, "pad_token_id": 0})
        transformer = _sd3_tiny_transformer(resolution, joint_attention_dim=t5["d_model"],
                                            pooled_projection_dim=clip_l["projection_dim"] + clip_g["projection_dim"])
    return {"transformer": transformer, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g,
            "text_encoder_3": t5}


def flow_scheduler(size: str) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler each model ships with (scheduler/scheduler_config.json of FLUX.1-dev, FLUX.1-schnell, SD3.5).

    Flux-dev shifts its timesteps by how many image tokens there are (mu from 0.5 at 256 tokens to 1.15 at 4096,
    Esser et al. 2024, "Scaling Rectified Flow Transformers", section 5.3.2); schnell, distilled for 1-4 steps, does
    not shift; SD3 shifts by a fixed 3.
    """
    if size == "flux-schnell-tiny":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)
    if FAMILY[size] == "flux":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _tiny_vae(sample_size: int) -> dict:
    """Flux's and SD3's VAE shape (four levels, 16 latent channels, no quant convs), 16-16-32-32 wide."""
    return dict(sample_size=sample_size, block_out_channels=(16, 16, 32, 32),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8, use_quant_conv=False,
                use_post_quant_conv=False)


def _full_vae(sample_size: int) -> dict:
    """FLUX.1-dev's and SD3.5's VAE (vae/config.json; the two differ only in scaling and shift): 83,819,683
    parameters."""
    return dict(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, latent_channels=LATENT_CHANNELS, norm_num_groups=32, act_fn="silu",
                use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)


def _tiny_t5_config(vocab_size: int) -> dict:
    """T5 v1.1's encoder traits (gated GELU, relative position buckets, no tied embeddings), 2 layers of 96 wide:
    wider than SD3-tiny's two CLIPs together (32 + 48), which SD3 zero-pads to T5's width."""
    return dict(vocab_size=vocab_size, d_model=96, d_kv=24, d_ff=64, num_layers=2, num_heads=4,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
                dropout_rate=0.1, layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


def _t5_xxl_config() -> dict:
    """google/t5-v1_1-xxl's encoder, Flux's text_encoder_2 and SD3's text_encoder_3: 4,762,310,656 parameters."""
    return dict(vocab_size=T5_VOCAB_SIZE, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
                dropout_rate=0.1, layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


def _flux_tiny_transformer(*, joint_attention_dim: int, pooled_projection_dim: int, guidance_embeds: bool) -> dict:
    """Flux's transformer traits at the tiny size: 16 latent channels packed 2x2 (64 in), double-stream blocks then
    single-stream ones, heads whose RoPE axes (image index, height, width) sum to the head width as Flux's 16+56+56
    do 128. Two heads of 16: per-op overhead rules on a CPU, and a head narrower than 16 leaves RoPE axes of 4."""
    return dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
                pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))


def _flux_transformer() -> dict:
    """FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev, transformer/config.json): 11,901,408,320
    parameters."""
    return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def _sd3_tiny_transformer(resolution: int, *, joint_attention_dim: int, pooled_projection_dim: int) -> dict:
    """SD3.5-large's MMDiT traits at the tiny size: 2x2 patches of 16 channels, RMS-normed queries and keys, the
    caption projected to the transformer's width, a position table 3 times the native patch grid (192 for 64)."""
    return dict(sample_size=resolution // VAE_SCALE_FACTOR, patch_size=2, in_channels=LATENT_CHANNELS,
                out_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                joint_attention_dim=joint_attention_dim, caption_projection_dim=32,
                pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=3 * resolution // SIDE_MULTIPLE["sd3"],
                qk_norm="rms_norm")


def _sd35_large_transformer(resolution: int) -> dict:
    """SD3.5-large's transformer (stabilityai/stable-diffusion-3.5-large, transformer/config.json): 8,056,627,520
    parameters (published as 8.1 B)."""
    return dict(sample_size=resolution // VAE_SCALE_FACTOR, patch_size=2, in_channels=16, out_channels=16,
                num_layers=38, attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                caption_projection_dim=2432, pooled_projection_dim=2048,
                pos_embed_max_size=3 * resolution // SIDE_MULTIPLE["sd3"], qk_norm="rms_norm")


def t5_vocabulary(pieces: int | None = None, words: list[str] | None = None) -> list[tuple[str, float]]:
    """The Unigram vocabulary in id order, each piece with its log-probability score.

    T5's layout: `<pad>` 0, `</s>` 1, `<unk>` 2, the pieces, then `<extra_id_99>` down to `<extra_id_0>`. Each word
    (default: the tiny CLIP tokenizer's) is one piece `▁word`, more likely than any split of it; single characters,
    unlikely ones, spell out anything else, as T5 splits a rare identifier. With `pieces`, unused fillers follow so
    that the sentinels sit where T5's do (32,000 for the full sizes).
    """
    words = tokenizer_words() if words is None else words
    # Written by hand, not trained: a UnigramTrainer on a hundred words would cut them into arbitrary pieces, where
    # the tests want one token per known word, like the CLIP tokenizer's.
    characters = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/&+*#@%=<>"))
    vocab = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -5.0) for w in dict.fromkeys(words)] + [(c, -10.0) for c in characters]
    if pieces is not None:
        if pieces < len(vocab):
            raise ValueError(f"pieces {pieces} is below the {len(vocab)} pieces the words need")
        vocab += [(f"<unused_{i}>", -100.0) for i in range(pieces - len(vocab))]
    return vocab + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_SENTINELS))]


def build_t5_tokenizer(pieces: int | None = None, words: list[str] | None = None,
                       max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer over `t5_vocabulary(pieces, words)`; `save_pretrained` writes the tokenizer.json and
    tokenizer_config.json that `T5TokenizerFast.from_pretrained` loads (no SentencePiece model file is needed).

    As T5's: text split at whitespace, each word marked with a leading `▁` (Metaspace), `</s>` appended to every
    sequence, padding with `<pad>`; `max_length` is its model_max_length. Unlike T5's, no Unicode normalisation:
    a character outside the vocabulary becomes `<unk>`.
    """
    vocab = t5_vocabulary(pieces, words)
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    # No normalizer, and these pre-tokenizers: what transformers 5's T5Tokenizer rebuilds from tokenizer.json when it
    # loads one without a SentencePiece charsmap, so the tokenizer built here and the one a pipeline loads agree.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                                    split=True)])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(single=["$A", EOS], pair=["$A", EOS, "$B", EOS],
                                                             special_tokens=[(EOS, 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, unk_token=UNK, pad_token=PAD,
                           extra_ids=T5_SENTINELS, model_max_length=max_length)
