"""A Stable Diffusion pipeline from what the user names: a diffusers folder, a training checkpoint or a hub id; the
sampler by short name; the device and precision to draw in. Shared by `generate`, validation, class images,
evaluation and export.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dreambooth.errors import UserError
from dreambooth.formats.lora import TOKEN_FILE
from dreambooth.formats.lora_loading import load_loras, load_token_file
from dreambooth.models.base import (
    CHECKPOINT_STATE,
    LORA_FILE,
    SCHEDULERS,
    check_model_folder,
    checkpoint_base,
    is_hub_id,
    is_sdxl,
    resolve_hub_model,
)
from dreambooth.training.speed import collection_paused


@contextlib.contextmanager
def quiet_progress_bars():
    """diffusers' and transformers' load and save bars off inside the block, then as they were.

    They are nested bars whose cursor-up escape codes litter a log, for steps this tool reports in one line each.
    The hub's download bars stay on: they show that a first run is fetching gigabytes, not hanging.
    """
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    before, hub_was_off = [lib.is_progress_bar_enabled() for lib in libraries], are_progress_bars_disabled()
    for lib in libraries:
        lib.disable_progress_bar()  # transformers' turns the hub's off too
    if not hub_was_off:
        enable_progress_bars()
    try:
        yield
    finally:
        for lib, was_on in zip(libraries, before):
            lib.enable_progress_bar() if was_on else lib.disable_progress_bar()
        disable_progress_bars() if hub_was_off else enable_progress_bars()


# Precision names as the options spell them (`no` is accelerate's for fp32 mixed precision) and their dtypes.
DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_scheduler(name: str, base_config: dict):
    """A sampler by short name ('dpm++') or diffusers class name, built from the model's scheduler config."""
    import diffusers

    cls_name, tweaks = SCHEDULERS.get(name, (name, {}))
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise UserError(f"unknown scheduler '{name}'; use one of {', '.join(SCHEDULERS)} "
                        "or a diffusers scheduler class name such as DDIMScheduler.")
    return cls.from_config({**base_config, **tweaks})


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """fp16 on a GPU and fp32 on the CPU unless told, since CPU fp16 kernels are slow or missing."""
    if precision:
        return DTYPES[precision]
    return torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(model: str | Path, *, device: torch.device, dtype: torch.dtype, scheduler: str | None = None,
                  safety_checker: bool = True, **kwargs):
    """Loads a Stable Diffusion pipeline from a diffusers folder, a training checkpoint or a hub id, on `device`."""
    if (Path(model) / CHECKPOINT_STATE).is_file():
        return load_checkpoint_pipeline(Path(model), device=device, dtype=dtype, scheduler=scheduler,
                                        safety_checker=safety_checker)
    if is_hub_id(str(model)):
        model = resolve_hub_model(str(model), kwargs.get("revision"), what="--model")
    else:
        check_model_folder(model)
    extra = {} if safety_checker or is_sdxl(model) else {"safety_checker": None, "requires_safety_checker": False}
    try:
        with collection_paused():  # diffusers' import and the weights live on (dreambooth.training.speed)
            pipe = pipeline_class(model).from_pretrained(str(model), dtype=dtype, **extra, **kwargs)
    except OSError as e:
        raise UserError(f"could not load the model {model}: {e}. Give a local diffusers folder; a hub id "
                        "needs a network connection and a cached download.") from None
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_class(model: str | Path):
    """The diffusers text-to-image pipeline of a model's family (models.base.is_sdxl)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if is_sdxl(model) else StableDiffusionPipeline


def load_checkpoint_pipeline(ckpt: Path, *, device: torch.device, dtype: torch.dtype, scheduler: str | None = None,
                             safety_checker: bool = True, with_lora: bool = True):
    """A training checkpoint as a pipeline: its base model with what trained swapped in (UNet, text encoder, LoRA,
    new tokens), as diffusers users load intermediate checkpoints. `with_lora=False` leaves a LoRA run's adapters
    out (for a caller that fuses them itself)."""
    base, config = checkpoint_base(ckpt)
    parts = {}
    with collection_paused():
        if (ckpt / "unet").is_dir():
            from diffusers import UNet2DConditionModel

            parts["unet"] = UNet2DConditionModel.from_pretrained(ckpt / "unet", torch_dtype=dtype)
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        # SDXL's second text encoder has a projection (its pooled output conditions the UNet)
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (ckpt / name).is_dir():
                parts[name] = cls.from_pretrained(ckpt / name, torch_dtype=dtype)
                tokenizer = ckpt / name.replace("text_encoder", "tokenizer")
                if tokenizer.is_dir():
                    parts[tokenizer.name] = CLIPTokenizer.from_pretrained(tokenizer)
    pipe = load_pipeline(base, device=device, dtype=dtype, scheduler=scheduler, safety_checker=safety_checker,
                         revision=config.get("revision"), variant=config.get("variant"), **parts)
    if (ckpt / LORA_FILE).is_file():
        if with_lora:
            load_loras(pipe, [(ckpt / LORA_FILE, 1.0)])
    elif (ckpt / TOKEN_FILE).is_file() and "text_encoder" not in parts:
        load_token_file(pipe, ckpt / TOKEN_FILE)
    return pipe
