"""The built-in model: Stable Diffusion's architecture, small, pretrained on the shape world alone.

It is what makes the DreamBooth claims checkable offline: it draws the shape, colour and background a
caption asks for, has never seen the subject's pattern, and has the rare token `sks` in its vocabulary
unused, as the paper's identifier is. It ships in the package (`builtin_model_path()`); this module is also
the script that made it, and makes it again from the same seed:

    python -m dreambooth.evaluation.world_model --out src/dreambooth/assets/world-model

Two stages, both plain supervised training on world images drawn in-process: the VAE (reconstruction plus a
small KL term, as SD's autoencoder), then the UNet and the CLIP text encoder together on the VAE's latents
with the epsilon loss and SD's noise schedule. Captions drop the colour and/or the background at random,
and some are empty, so "a photo of a circle" draws any colour and classifier-free guidance works.
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth.evaluation import world
from dreambooth.options import option, parse_settings

WORDS = """a an the photo picture of on in with and background sks circle square triangle star red green blue
yellow white black gray purple orange pink brown dog cat toy shape object big small""".split()
CAPTION_PARTS = (("full", 0.5), ("colour", 0.15), ("background", 0.15), ("shape", 0.1), ("empty", 0.1))
# Prompts are padded to this many tokens, not CLIP's 77: world captions are at most 13 tokens long, and the
# shorter context makes every text-encoder and cross-attention call several times cheaper.
MAX_LENGTH = 24
ASSET = pathlib.Path(__file__).parents[1] / "assets" / "world-model"


def builtin_model_path() -> pathlib.Path:
    """The folder of the shipped world model (diffusers format)."""
    return ASSET


def is_world_model(path) -> bool:
    """True for a model folder pretrained on the shape world (it carries world.json), or a run or checkpoint
    trained from one."""
    path = pathlib.Path(path)
    if (path / "world.json").is_file():
        return True
    info = next((path / name for name in ("run_info.json", "trainer_state.json") if (path / name).is_file()), None)
    if info is None:
        return False
    try:
        base = json.loads(info.read_text()).get("base_model")
    except (OSError, ValueError):
        return False
    return bool(base) and (pathlib.Path(base) / "world.json").is_file()


def configs(vocab_size: int, ids: dict) -> dict[str, dict]:
    """Constructor arguments of the VAE (factor 2: 16x16 latents), the UNet and the CLIP text model."""
    vae = dict(sample_size=world.SIZE, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8)
    # Attention at the 8x8 and 4x4 levels only: at 16x16 it cost 40% of a step on the CPU for no gain a
    # caption about a colour, a shape and a background needs (SD has it at every level but the lowest).
    unet = dict(sample_size=world.SIZE // 2, block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8)
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_LENGTH, **ids)
    return {"vae": vae, "unet": unet, "text_encoder": text}


def pretrain(out: pathlib.Path, **settings) -> dict:
    """Trains the VAE, then the UNet and text encoder, and saves the pipeline to `out`; returns a summary.

    Built in a scratch folder beside `out` and moved in with model_index.json last (`formats.atomic`).
    """
    from dreambooth.formats.atomic import move_into, temporary_folder, temporary_name

    out = pathlib.Path(out)
    with temporary_folder(temporary_name(out)) as tmp:
        summary = _pretrain(tmp, **settings)
        move_into(tmp, out, last="model_index.json")
    return summary


def _pretrain(out: pathlib.Path, *, seed: int = 0, images: int = 12000, vae_steps: int = 800, steps: int = 4000,
              batch_size: int = 32, lr: float = 8e-4, log_every: int = 100) -> dict:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.models.tiny import build_tokenizer, sd_noise_scheduler

    start = time.perf_counter()
    torch.manual_seed(seed)
    out = pathlib.Path(out)
    tokenizer = build_tokenizer(out / "tokenizer", words=WORDS, max_length=MAX_LENGTH)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    cfg = configs(len(tokenizer), ids)
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    scheduler = sd_noise_scheduler("epsilon")

    scenes = world.pretraining_set(images, seed)
    pixels = torch.from_numpy(np.stack([np.asarray(world.draw(s, k)) for s, k in scenes]))
    pixels = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1)
    gen = torch.Generator().manual_seed(seed)
    log = {"vae": [], "unet": []}

    vae_loss = _train_vae(vae, pixels, vae_steps, batch_size, gen, log["vae"], log_every)
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        dists = [vae.encode(pixels[i:i + 256]).latent_dist for i in range(0, len(pixels), 256)]
    latent_dist = (torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists]))
    scaling = 1.0 / float(latent_dist[0].std())
    vae.register_to_config(scaling_factor=scaling)
    rng = random.Random(seed)
    captions = [[s.caption(p) if p != "empty" else "" for p, _ in CAPTION_PARTS] for s, _ in scenes]

    def caption(i: int) -> str:  # a caption of image i, dropping parts as CAPTION_PARTS weighs them
        return captions[i][rng.choices(range(len(CAPTION_PARTS)), [w for _, w in CAPTION_PARTS])[0]]

    _train_unet(unet, text_encoder, tokenizer, scheduler, latent_dist, scaling, caption,
                dict(steps=steps, batch_size=batch_size, lr=lr, log_every=log_every, start=start), gen, log["unet"])

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    summary = {"seed": seed, "images": images, "vae_steps": vae_steps, "steps": steps, "batch_size": batch_size,
               "lr": lr, "vae_final_loss": vae_loss,
               "unet_final_loss": log["unet"][-1]["loss"] if log["unet"] else None,
               "scaling_factor": scaling, "seconds": round(time.perf_counter() - start, 1),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "world.json").write_text(json.dumps({"world": world.describe(), "pretraining": summary}, indent=2))
    (out / "pretraining_log.json").write_text(json.dumps(log))
    return summary


def _train_unet(unet, text_encoder, tokenizer, scheduler, latent_dist, scaling: float, caption, run: dict,
                gen: torch.Generator, log: list) -> None:
    """The UNet and text encoder together on the VAE's latent distributions, with the training loss of
    `dreambooth.training.loss` (Min-SNR-5 weighted, no class images) and a cosine learning rate."""
    from dreambooth.training.loss import diffusion_target, dreambooth_loss, min_snr_weights, snr_from_alphas

    mean, std = latent_dist
    steps, batch_size, peak = run["steps"], run["batch_size"], run["lr"]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=1e-2)
    unet.train()
    text_encoder.train()
    running, no_prior = [], torch.zeros(batch_size, dtype=torch.bool)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, peak)
        idx = torch.randint(len(mean), (batch_size,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        tokens = tokenizer([caption(i) for i in idx.tolist()], padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        pred = unet(scheduler.add_noise(latents, noise, t), t, text_encoder(tokens)[0]).sample
        weights = min_snr_weights(snr_from_alphas(scheduler.alphas_cumprod, t), 5.0, "epsilon")
        loss = dreambooth_loss(pred, diffusion_target(scheduler, latents, noise, t), no_prior, 0.0, weights).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % run["log_every"] == 0:
            log.append({"step": step + 1, "loss": sum(running) / len(running),
                        "elapsed_s": round(time.perf_counter() - run["start"], 1)})
            print(f"unet step {step + 1}/{steps} loss {log[-1]['loss']:.4f} ({log[-1]['elapsed_s']} s)", flush=True)
            running = []


def _lr(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train_vae(vae, pixels: torch.Tensor, steps: int, batch_size: int, gen: torch.Generator, log: list,
               log_every: int, lr: float = 1e-3, kl_weight: float = 1e-6) -> float | None:
    """SD's autoencoder objective without the adversarial term: pixel MSE plus a small KL to N(0, I)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    vae.train()
    running, last = [], None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=100)
        x = pixels[torch.randint(len(pixels), (batch_size,), generator=gen)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0:
            last = sum(running) / len(running)
            log.append({"step": step + 1, "loss": last})
            print(f"vae step {step + 1}/{steps} loss {last:.5f}", flush=True)
            running = []
    return last


@dataclass(kw_only=True)
class PretrainOptions:
    """Pretrains the built-in world model (VAE, then UNet and text encoder) and writes it to --out."""

    out: pathlib.Path = option(ASSET, help="The folder to write the model to.")
    seed: int = option(0, minimum=0, help="Seed of the world's images and of the weights.")
    images: int = option(12000, minimum=1, help="World images drawn for pretraining.")
    vae_steps: int = option(800, minimum=1, help="VAE training steps.")
    steps: int = option(4000, minimum=1, help="UNet and text-encoder training steps.")
    batch_size: int = option(32, minimum=1, help="Images per step.")
    lr: float = option(8e-4, minimum=0, help="Learning rate.")
    threads: int | None = option(None, minimum=1, help="torch threads [default: torch's].")


def main(argv: list[str] | None = None) -> None:
    """`python -m dreambooth.evaluation.world_model`: the options are parsed as every `dreambooth` command's."""
    args = parse_settings(PretrainOptions, argv, prog="python -m dreambooth.evaluation.world_model")
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = pretrain(args.out, seed=args.seed, images=args.images, vae_steps=args.vae_steps, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
