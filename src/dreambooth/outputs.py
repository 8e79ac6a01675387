"""What a finished run leaves in its output folder: a full diffusers model, or a LoRA file with its tokens."""

from __future__ import annotations

import json
import shutil

import torch

from dreambooth import __version__
from dreambooth.runinfo import move_into

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_full_model(run) -> None:
    """The trained pipeline in diffusers format at the output dir, loadable by stock from_pretrained.

    Frozen parts are read again from the base model rather than saved from their low-precision training
    copies, so nothing is silently saved in fp16 beside an fp32 UNet; everything is then cast to the
    requested save precision together.
    """
    from diffusers import StableDiffusionPipeline

    acc, cfg, m = run.accelerator, run.cfg, run.models
    parts = {"unet": acc.unwrap_model(m.unet), "tokenizer": m.tokenizer}
    if m.text_trains:
        parts["text_encoder"] = acc.unwrap_model(m.text_encoder)
    if cfg.output.skip_save_text_encoder:
        parts["text_encoder"] = None
    pipe = StableDiffusionPipeline.from_pretrained(cfg.model.pretrained_model, revision=cfg.model.revision,
                                                   variant=cfg.model.variant, **parts)
    pipe.to(dtype=SAVE_DTYPES[cfg.output.save_precision])
    tmp = run.out / ".final-model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    move_into(tmp, run.out, last="model_index.json")


def _adapter_config(module) -> dict | None:
    config = getattr(module, "peft_config", {}).get("default")
    if config is None:
        return None
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def lora_metadata(run) -> dict[str, str]:
    """What made the LoRA, as safetensors metadata (strings): base model and hash, subjects, LoRA settings."""
    from dreambooth.lora import model_fingerprint

    cfg, m = run.cfg, run.models
    subjects = cfg.subject_list()
    return {
        "dreambooth.version": __version__,
        "dreambooth.base_model": str(cfg.model.pretrained_model),
        "dreambooth.base_model_hash": model_fingerprint(cfg.model.pretrained_model),
        "dreambooth.identifiers": json.dumps([s.identifier for s in subjects]),
        "dreambooth.instance_prompts": json.dumps([s.instance_prompt for s in subjects]),
        "dreambooth.class_prompts": json.dumps([s.class_prompt for s in subjects]),
        "dreambooth.new_tokens": json.dumps(m.tokenizer.convert_ids_to_tokens(m.new_token_ids)),
        "dreambooth.rank": str(cfg.lora.rank),
        "dreambooth.alpha": f"{cfg.lora.alpha or cfg.lora.rank:g}",
        "dreambooth.unet_target_modules": json.dumps(cfg.lora.unet_target_modules if cfg.model.train_unet else []),
        "dreambooth.text_encoder_target_modules": json.dumps(
            cfg.lora.text_encoder_target_modules if cfg.model.train_text_encoder else []),
        "dreambooth.steps": str(run.global_step),
        "dreambooth.resolution": str(cfg.training.resolution),
    }


def save_lora_output(run) -> None:
    """`pytorch_lora_weights.safetensors` (stock `load_lora_weights` reads it) and any new tokens' embeddings."""
    from dreambooth.lora import save_lora, save_token_embeddings

    acc, cfg, m = run.accelerator, run.cfg, run.models
    unet = acc.unwrap_model(m.unet) if cfg.model.train_unet else None
    text_encoder = acc.unwrap_model(m.text_encoder) if cfg.model.train_text_encoder else None
    configs = {"unet": _adapter_config(unet) if unet else None,
               "text_encoder": _adapter_config(text_encoder) if text_encoder else None}
    save_lora(run.out, unet, text_encoder, configs, lora_metadata(run))
    save_token_embeddings(run.out, m.tokenizer, acc.unwrap_model(m.text_encoder), m.new_token_ids)


def save_outputs(run) -> None:
    acc = run.accelerator
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    if run.cfg.model.method == "lora":
        save_lora_output(run)
    else:
        save_full_model(run)
