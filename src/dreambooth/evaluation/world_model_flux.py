"""The built-in Flux model: Flux.1's architecture, small, pretrained on the shape world alone.

What `world_model` is for Stable Diffusion, this is for Flux.1: a model whose truth is known, on which `dreambooth demo
--family flux` checks that the Flux loss, sampling and guidance are right. It ships in the package
(`builtin_flux_model_path()`) as a stock FluxPipeline folder; this module is also the script that made it:

    python -m dreambooth.evaluation.world_model_flux --out src/dreambooth/assets/world-model-flux

The VAE, then two training stages on world images drawn in-process, the captions dropping parts as `world_model`'s do:

1. The VAE is the SD world model's (`world_model`, its first stage): the same world's pixels, factor 2, 4 latent
   channels, so 16x16 latents and 8x8 = 64 tokens once packed in 2x2 patches. Training another would cost a third of
   the pretraining for the same autoencoder; Flux's own VAE differs from SD's in its 16 channels, which at 32 px
   would hold more numbers than the image. Only its shift and scale are Flux's: measured here, so that the latents
   the transformer sees are zero-mean and unit-variance, as FLUX.1's shift_factor and scaling_factor make its.
2. The transformer and the CLIP text encoder (T5 too) on rectified flow, with `training.flow`'s definitions, the ones
   `dreambooth train` uses for Flux: straight paths, velocity targets, sigmas from the scheduler's table. The guidance
   input is held at 1.
3. Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", arXiv:2210.03142): the
   transformer learns to give, at guidance input w, what classifier-free guidance with weight w gives from a frozen
   copy of the stage-2 model, v(empty) + w (v(caption) - v(empty)), for w drawn from GUIDANCE_RANGE.

Why distilled guidance (guidance_embeds=True, as FLUX.1-dev) rather than a schnell-type model drawn with true CFG:
every drawing this tool makes of a Flux model (class images for prior preservation, validation samples, `generate`,
the demo's measures) goes through FluxPipeline's `guidance_scale`, which only a guidance-embedding transformer reads;
true CFG (`true_cfg_scale` with a negative prompt) would leave the class images and validation unguided. Distilled,
the model draws guided through the same code a user's FLUX.1-dev does, and DreamBooth trains it the way diffusers'
Flux scripts train dev (training.flow.guidance_vector).

The prompt length. FluxPipeline pads T5's tokens to 512 (its `max_sequence_length`), and the transformer attends to
every pad: on this CPU a 512-token prompt makes a step 8 times dearer than a 16-token one. The T5 encoder here has
no layers (its output is each token's embedding, RMS-normed: the transformer's text stream gives the words their
context), so every pad is the same vector at the same (zero) text position, and n identical keys in a softmax weigh
as one key with log(n) added to its logit. Pretraining runs a prompt of any padded length on its real tokens and one
pad, with that bias (`pad_bias`, exact to float rounding), and draws the length per sample between MIN_T5_LENGTH and
512: the model draws the same at 512 tokens (the pipeline's default) as at the 16 the demo trains with.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from dreambooth.evaluation import world
from dreambooth.evaluation.world_model import CAPTION_PARTS, MAX_LENGTH, WORDS, _lr, builtin_model_path
from dreambooth.options import option, parse_settings

T5_LENGTH = 512  # FluxPipeline's default max_sequence_length, and the longest it takes
MIN_T5_LENGTH = 16  # the shortest padded prompt pretraining shows; world captions are at most 11 T5 tokens
GUIDANCE_RANGE = (1.0, 8.0)  # the guidance weights stage 3 distils (1: the plain conditional velocity)
ASSET = pathlib.Path(__file__).parents[1] / "assets" / "world-model-flux"


def builtin_flux_model_path() -> pathlib.Path:
    """The folder of the shipped Flux world model (diffusers format)."""
    return ASSET


def configs(clip_vocab: int, t5_vocab: int, ids: dict) -> dict[str, dict]:
    """Constructor arguments of the transformer, CLIP (the SD world model's) and T5."""
    from dreambooth.evaluation.world_model import configs as sd_configs

    sd = sd_configs(clip_vocab, ids)
    # Flux's transformer at 128 wide: 2 double-stream and 2 single-stream blocks of 4 heads of 32, RoPE axes 8+12+12
    # (image index, row, column) as Flux's 16+56+56 make 128; 4 latent channels packed 2x2 are 16 in.
    transformer = dict(patch_size=1, in_channels=4 * sd["vae"]["latent_channels"], num_layers=2, num_single_layers=2,
                       attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                       pooled_projection_dim=sd["text_encoder"]["hidden_size"], guidance_embeds=True,
                       axes_dims_rope=(8, 12, 12))
    t5 = dict(vocab_size=t5_vocab, d_model=64, d_kv=16, d_ff=64, num_layers=0, num_heads=4, dropout_rate=0.0,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)
    return {"transformer": transformer, "text_encoder": sd["text_encoder"], "text_encoder_2": t5}


def pad_bias(ids: torch.Tensor, pad_id: int, lengths: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """The additive attention mask (B, 1, 1, text + image tokens) under which T5 ids padded to a few tokens weigh as
    if padded to `lengths` (B,): log(wanted pads / present pads) on each pad, 0 elsewhere. Exact when every pad is
    the same vector at the same position, as with this model's layer-free T5 and Flux's all-zero text ids."""
    is_pad = ids == pad_id
    present = is_pad.sum(1, keepdim=True)
    if not bool((present > 0).all()):
        raise ValueError("every row needs at least one pad token to stand for the rest")
    wanted = lengths.view(-1, 1) - (~is_pad).sum(1, keepdim=True)
    bias = torch.where(is_pad, torch.log(wanted.float() / present.float()), torch.zeros(()))
    return torch.cat([bias, torch.zeros(len(ids), image_tokens)], 1)[:, None, None, :]


def adaln_zero(transformer) -> None:
    """DiT's adaLN-Zero initialisation (Peebles and Xie 2023, arXiv:2212.09748, sec. 3.2), which diffusers' Flux
    classes leave out (FLUX.1 ships trained): every block's modulation, the output norm's and the output projection
    start at zero, so each block starts as the identity and the model's first prediction is zero."""
    zeroed = [transformer.norm_out.linear, transformer.proj_out]
    zeroed += [b.norm1.linear for b in transformer.transformer_blocks]
    zeroed += [b.norm1_context.linear for b in transformer.transformer_blocks]
    zeroed += [b.norm.linear for b in transformer.single_transformer_blocks]
    for layer in zeroed:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


@dataclass
class Prompts:
    """A batch of captions as the transformer reads them: T5's hidden states, CLIP's pooled embedding, the pad bias."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor


def encode(parts: dict, captions: list[str], lengths: torch.Tensor, image_tokens: int) -> Prompts:
    """As FluxPipeline.encode_prompt reads them (CLIP padded to its model_max_length, its pooled output; T5's last
    hidden state), with T5 padded to the longest caption plus one pad and `pad_bias` standing for the rest."""
    clip = parts["tokenizer"](captions, padding="max_length", max_length=parts["tokenizer"].model_max_length,
                              truncation=True, return_tensors="pt").input_ids
    t5_ids = parts["tokenizer_2"](captions, padding="longest", return_tensors="pt").input_ids
    t5_ids = torch.nn.functional.pad(t5_ids, (0, 1), value=parts["tokenizer_2"].pad_token_id)
    return Prompts(embeds=parts["text_encoder_2"](t5_ids)[0], pooled=parts["text_encoder"](clip).pooler_output,
                   mask=pad_bias(t5_ids, parts["tokenizer_2"].pad_token_id, lengths, image_tokens))


def velocity(transformer, noisy: torch.Tensor, sigmas: torch.Tensor, prompts: Prompts,
             guidance: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity for unpacked latents, called as FluxPipeline calls it (2x2 packing, position ids,
    timestep as sigma, the guidance weight), plus the pad bias."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    out = transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=sigmas,
                      guidance=guidance, pooled_projections=prompts.pooled, encoder_hidden_states=prompts.embeds,
                      txt_ids=torch.zeros(prompts.embeds.shape[1], 3),
                      img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
                      joint_attention_kwargs={"attention_mask": prompts.mask}, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h, w, 1)


def pretrain(out: pathlib.Path, **settings) -> dict:
    """Trains the transformer and text encoders, then distils guidance; saves the pipeline to `out`
    (built beside it and moved in with model_index.json last, `formats.atomic`); returns a summary."""
    from dreambooth.formats.atomic import move_into, temporary_folder, temporary_name

    out = pathlib.Path(out)
    with temporary_folder(temporary_name(out)) as tmp:
        summary = _pretrain(tmp, **settings)
        move_into(tmp, out, last="model_index.json")
    return summary


def _pretrain(out: pathlib.Path, *, seed: int = 0, images: int = 12000, steps: int = 4000,
              distil_steps: int = 1000, batch_size: int = 32, lr: float = 1e-3, log_every: int = 100) -> dict:
    from diffusers import FluxPipeline

    from dreambooth.models.loading import quiet_progress_bars

    start = time.perf_counter()
    torch.manual_seed(seed)
    parts = _build(pathlib.Path(out))
    scenes = world.pretraining_set(images, seed)
    pixels = torch.from_numpy(np.stack([np.asarray(world.draw(s, k)) for s, k in scenes]))
    pixels = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1)
    vae = parts["vae"]
    with torch.no_grad():
        dists = [vae.encode(pixels[i:i + 256]).latent_dist for i in range(0, len(pixels), 256)]
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    shift, scaling = float(mean.mean()), 1.0 / float(mean.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)  # FluxPipeline decodes z / scaling + shift

    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    captions = [[s.caption(p) if p != "empty" else "" for p, _ in CAPTION_PARTS] for s, _ in scenes]

    def batch(size: int) -> tuple[torch.Tensor, list[str]]:  # latents and captions, parts dropped as world_model's
        idx = torch.randint(len(mean), (size,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen) - shift) * scaling
        weights = [w for _, w in CAPTION_PARTS]
        return latents, [captions[i][rng.choices(range(len(CAPTION_PARTS)), weights)[0]] for i in idx.tolist()]

    log = {"flow": [], "distil": []}
    run = dict(batch_size=batch_size, lr=lr, log_every=log_every, start=start)
    _train_flow(parts, batch, dict(run, steps=steps), gen, log["flow"])
    _distil_guidance(parts, batch, dict(run, steps=distil_steps), gen, log["distil"])

    pipe = FluxPipeline(**{name: part.eval() if isinstance(part, torch.nn.Module) else part
                           for name, part in parts.items()})
    with quiet_progress_bars():
        pipe.save_pretrained(out, safe_serialization=True)
    summary = {"seed": seed, "images": images, "vae": "the SD world model's", "steps": steps,
               "distil_steps": distil_steps, "batch_size": batch_size, "lr": lr,
               "guidance_range": list(GUIDANCE_RANGE), "t5_lengths": [MIN_T5_LENGTH, T5_LENGTH],
               "flow_final_loss": log["flow"][-1]["loss"] if log["flow"] else None,
               "distil_final_loss": log["distil"][-1]["loss"] if log["distil"] else None,
               "shift_factor": shift, "scaling_factor": scaling, "seconds": round(time.perf_counter() - start, 1),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "world.json").write_text(json.dumps({"world": world.describe(), "pretraining": summary}, indent=2))
    (out / "pretraining_log.json").write_text(json.dumps(log))
    return summary


def _build(out: pathlib.Path) -> dict:
    """The pipeline's parts, new (the VAE the SD world model's): the CLIP tokenizer written to `out`, the weights
    drawn from torch's global generator in a fixed order."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from dreambooth.models.tiny import build_tokenizer
    from dreambooth.models.tiny_flow import build_t5_tokenizer, flow_scheduler

    tokenizer = build_tokenizer(out / "tokenizer", words=WORDS, max_length=MAX_LENGTH)
    tokenizer_2 = build_t5_tokenizer(words=WORDS, max_length=T5_LENGTH)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    cfg = configs(len(tokenizer), len(tokenizer_2), ids)
    # This order (VAE, CLIP, T5, transformer) is part of what a seed means: keep it.
    parts = {"vae": AutoencoderKL.from_pretrained(builtin_model_path() / "vae").requires_grad_(False).eval(),
             "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
             "text_encoder_2": T5EncoderModel(T5Config(**cfg["text_encoder_2"])),
             "transformer": FluxTransformer2DModel(**cfg["transformer"]),
             "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": flow_scheduler("flux-tiny")}
    adaln_zero(parts["transformer"])
    return parts


def sample_lengths(size: int, gen: torch.Generator) -> torch.Tensor:
    """Each sample's padded T5 length: half at 512 (what FluxPipeline pads to), half log-uniform down to
    MIN_T5_LENGTH (what a shorter --max_sequence_length pads to)."""
    u = torch.rand(size, generator=gen)
    short = torch.exp(math.log(MIN_T5_LENGTH) + u * math.log(T5_LENGTH / MIN_T5_LENGTH)).round().long()
    return torch.where(torch.rand(size, generator=gen) < 0.5, torch.full_like(short, T5_LENGTH), short)


def _noised(parts: dict, latents: torch.Tensor, gen: torch.Generator):
    """Noise, sigmas from the scheduler's table (uniform over it, Flux's `none` weighting) and the noisy latents."""
    from dreambooth.training.flow import noisy_latents, sample_sigmas, training_schedule

    noise = torch.randn(latents.shape, generator=gen)
    sigmas, _ = sample_sigmas("none", len(latents), gen, schedule=training_schedule(parts["scheduler"]))
    return noise, sigmas, noisy_latents(latents, noise, sigmas)


def _train_flow(parts: dict, batch, run: dict, gen: torch.Generator, log: list) -> None:
    """Stage 2: the transformer with CLIP and T5 on the rectified-flow loss (`training.flow`), guidance input 1."""
    from dreambooth.training.flow import packed_seq_len, velocity_target

    transformer, encoders = parts["transformer"], [parts["text_encoder"], parts["text_encoder_2"]]
    params = [p for m in (transformer, *encoders) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=run["lr"], weight_decay=1e-2)
    for module in (transformer, *encoders):
        module.train()

    def loss_of_batch() -> torch.Tensor:
        latents, captions = batch(run["batch_size"])
        prompts = encode(parts, captions, sample_lengths(len(captions), gen), packed_seq_len(*latents.shape[-2:]))
        noise, sigmas, noisy = _noised(parts, latents, gen)
        pred = velocity(transformer, noisy, sigmas, prompts, torch.ones(len(captions)))
        return torch.nn.functional.mse_loss(pred, velocity_target(latents, noise))

    _optimise(opt, params, loss_of_batch, run, log, "flow")


def _distil_guidance(parts: dict, batch, run: dict, gen: torch.Generator, log: list) -> None:
    """Stage 3: the transformer learns classifier-free guidance of a frozen copy of itself at the weight its guidance
    input says (arXiv:2210.03142); the text encoders stay as stage 2 left them."""
    from dreambooth.training.flow import packed_seq_len

    transformer = parts["transformer"]
    teacher = copy.deepcopy(transformer).requires_grad_(False).eval()
    for name in ("text_encoder", "text_encoder_2"):
        parts[name].requires_grad_(False).eval()
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=run["lr"] / 4, weight_decay=1e-2)
    transformer.train()
    low, high = GUIDANCE_RANGE

    def loss_of_batch() -> torch.Tensor:
        latents, captions = batch(run["batch_size"])
        n = len(captions)
        lengths = sample_lengths(n, gen)
        weights = low + (high - low) * torch.rand(n, generator=gen)
        noise, sigmas, noisy = _noised(parts, latents, gen)
        with torch.no_grad():
            both = encode(parts, captions + [""] * n, lengths.repeat(2), packed_seq_len(*latents.shape[-2:]))
            v = velocity(teacher, noisy.repeat(2, 1, 1, 1), sigmas.repeat(2), both, torch.ones(2 * n))
            cond, uncond = v[:n], v[n:]
            target = uncond + weights.view(-1, 1, 1, 1) * (cond - uncond)
            prompts = Prompts(both.embeds[:n], both.pooled[:n], both.mask[:n])
        return torch.nn.functional.mse_loss(velocity(transformer, noisy, sigmas, prompts, weights), target)

    _optimise(opt, params, loss_of_batch, dict(run, lr=run["lr"] / 4), log, "distil")


def _optimise(opt, params: list, loss_of_batch, run: dict, log: list, stage: str) -> None:
    """The steps of one stage: warm-up and cosine rate (`world_model._lr`), gradients clipped at 1, the mean loss
    logged every `log_every` steps."""
    steps, running = run["steps"], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, run["lr"], warmup=min(200, steps // 10 + 1))
        loss = loss_of_batch()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % run["log_every"] == 0 or step + 1 == steps:
            log.append({"step": step + 1, "loss": sum(running) / len(running),
                        "elapsed_s": round(time.perf_counter() - run["start"], 1)})
            print(f"{stage} step {step + 1}/{steps} loss {log[-1]['loss']:.4f} ({log[-1]['elapsed_s']} s)",
                  flush=True)
            running = []


@dataclass(kw_only=True)
class PretrainOptions:
    """Pretrains the built-in Flux world model (flow, then guidance distillation) and writes it to --out."""

    out: pathlib.Path = option(ASSET, help="The folder to write the model to.")
    seed: int = option(0, minimum=0, help="Seed of the world's images and of the weights.")
    images: int = option(12000, minimum=1, help="World images drawn for pretraining.")
    steps: int = option(4000, minimum=1, help="Transformer and text-encoder training steps (rectified flow).")
    distil_steps: int = option(1000, minimum=1, help="Guidance distillation steps.")
    batch_size: int = option(32, minimum=1, help="Images per step.")
    lr: float = option(1e-3, minimum=0, help="Learning rate of the flow stage (distillation: a quarter of it).")
    threads: int | None = option(None, minimum=1, help="torch threads [default: torch's].")


def main(argv: list[str] | None = None) -> None:
    """`python -m dreambooth.evaluation.world_model_flux`: the options are parsed as every `dreambooth` command's."""
    args = parse_settings(PretrainOptions, argv, prog="python -m dreambooth.evaluation.world_model_flux")
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = pretrain(args.out, seed=args.seed, images=args.images, steps=args.steps,
                       distil_steps=args.distil_steps, batch_size=args.batch_size, lr=args.lr)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
