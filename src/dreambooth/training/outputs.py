"""What a finished run leaves in its output folder: a full diffusers model, or a LoRA file with its tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dreambooth import __version__
from dreambooth.formats.atomic import move_into, temporary_folder, write_text_atomic

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
    # Beside checkpoints in the run folder, so it cannot be swapped in whole: its entries move in one by one.
    with temporary_folder(run.out / ".final-model.tmp") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        move_into(tmp, run.out, last="model_index.json")


def _adapter_config(module) -> dict | None:
    config = getattr(module, "peft_config", {}).get("default")
    if config is None:
        return None
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def lora_metadata(run) -> dict[str, str]:
    """What made the LoRA, as safetensors metadata (strings): base model and hash, subjects, LoRA settings."""
    from dreambooth.models.base import model_fingerprint

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
        "dreambooth.run_id": run.run_id,
    }


def save_lora_output(run, folder: Path | None = None) -> None:
    """`pytorch_lora_weights.safetensors` (stock `load_lora_weights` reads it) and any new tokens' embeddings, in
    the output folder or in a checkpoint being written."""
    from dreambooth.formats.lora import save_lora, save_token_embeddings

    folder = folder or run.out
    acc, cfg, m = run.accelerator, run.cfg, run.models
    unet = acc.unwrap_model(m.unet) if cfg.model.train_unet else None
    text_encoder = acc.unwrap_model(m.text_encoder) if cfg.model.train_text_encoder else None
    configs = {"unet": _adapter_config(unet) if unet else None,
               "text_encoder": _adapter_config(text_encoder) if text_encoder else None}
    save_lora(folder, unet, text_encoder, configs, lora_metadata(run))
    save_token_embeddings(folder, m.tokenizer, acc.unwrap_model(m.text_encoder), m.new_token_ids)


def save_outputs(run) -> None:
    acc = run.accelerator
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    if run.cfg.model.method == "lora":
        save_lora_output(run)
    else:
        save_full_model(run)


def model_card(run) -> str:
    """README.md for the output folder, with the YAML header the Hugging Face hub reads (base model, tags, the
    instance prompt as the trigger, sample images as widgets)."""
    import yaml

    cfg, out = run.cfg, run.out
    subjects = cfg.subject_list()
    lora = cfg.model.method == "lora"
    samples = sorted((out / "samples").glob("step-*.png")) if (out / "samples").is_dir() else []
    header = {
        "base_model": str(cfg.model.pretrained_model),
        "library_name": "diffusers",
        "license": "other",
        "tags": ["text-to-image", "diffusers", "stable-diffusion", "dreambooth", "dreambooth-tool"]
        + (["lora"] if lora else []),
        "instance_prompt": subjects[0].instance_prompt,
        "inference": True,
    }
    if samples:
        shown = cfg.validation.prompts[0] if cfg.validation.prompts else subjects[0].instance_prompt
        header["widget"] = [{"text": shown, "output": {"url": f"samples/{samples[-1].name}"}}]
    load = (f'StableDiffusionPipeline.from_pretrained("{cfg.model.pretrained_model}")\n'
            'pipe.load_lora_weights("PATH_TO_THIS_FOLDER")' if lora
            else 'StableDiffusionPipeline.from_pretrained("PATH_TO_THIS_FOLDER")')
    how = f"```python\nfrom diffusers import StableDiffusionPipeline\n\npipe = {load}\n```"
    identifiers = ", ".join(f"`{s.identifier}`" for s in subjects if s.identifier)
    lines = [f"---\n{yaml.safe_dump(header, sort_keys=False)}---", "",
             f"# DreamBooth {'LoRA' if lora else 'model'}: {identifiers or subjects[0].instance_prompt}", "",
             f"Trained by `dreambooth` {__version__} (run {run.run_id}) from `{cfg.model.pretrained_model}`, "
             f"{run.global_step} steps at {cfg.training.resolution} px, "
             f"{'with' if cfg.dataset.with_prior_preservation else 'without'} prior preservation.", "",
             "Prompts: " + "; ".join(f"\"{s.instance_prompt}\"" for s in subjects) + ".", "",
             "## Use", "", how, ""]
    if any(s.identifier and s.identifier.startswith("<") for s in subjects):
        lines += ["The identifier is a new token; its trained embedding is in `token_embeddings.safetensors` "
                  "(LoRA) or in the saved tokenizer and text encoder (full model).", ""]
    if samples:
        lines += ["## Samples", "", *(f"![step {p.stem[5:]}](samples/{p.name})" for p in samples[-3:]), ""]
    lines += ["Everything that made this model is in `config.yaml` and `run_info.json` beside this card."]
    return "\n".join(lines) + "\n"


def write_model_card(run) -> None:
    write_text_atomic(run.out / "README.md", model_card(run))
