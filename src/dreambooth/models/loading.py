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
    detect_family,
    is_hub_id,
    resolve_hub_model,
)
from dreambooth.models.families import Family
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


FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


def make_scheduler(name: str | None, base_config: dict):
    """A sampler by short name ('dpm++') or diffusers class name, built from the model's scheduler config. None or
    'default': the model's own for a flow-matching model (Flux, SD3), 'dpm++' for the others."""
    import diffusers

    flow = base_config.get("_class_name", "").startswith("FlowMatch")
    if name in (None, "default"):
        name = FLOW_SCHEDULER if flow else "dpm++"
    cls_name, tweaks = SCHEDULERS.get(name, (name, {}))
    if flow and not cls_name.startswith("FlowMatch"):
        raise UserError(f"scheduler '{name}' samples the diffusion objective (SD 1.x/2.x, SDXL); this model is "
                        f"trained on flow matching and draws with {FLOW_SCHEDULER} or another FlowMatch* scheduler. "
                        "Leave the scheduler unset for the model's own.")
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
    """Loads a model's pipeline from a diffusers folder, a training checkpoint or a hub id, on `device`, with the
    sampler `scheduler` names (make_scheduler; None: the model's own, as saved)."""
    if (Path(model) / CHECKPOINT_STATE).is_file():
        return load_checkpoint_pipeline(Path(model), device=device, dtype=dtype, scheduler=scheduler,
                                        safety_checker=safety_checker)
    if is_hub_id(str(model)):
        model = resolve_hub_model(str(model), kwargs.get("revision"), what="--model")
    else:
        check_model_folder(model)
    family = model_family(model, kwargs.get("revision"))
    extra = family.behaviour().pipeline_extras(safety_checker)
    try:
        with collection_paused():  # diffusers' import and the weights live on (dreambooth.training.speed)
            pipe = pipeline_class(family).from_pretrained(str(model), dtype=dtype, **extra, **kwargs)
    except OSError as e:
        raise UserError(f"could not load the model {model}: {e}. Give a local diffusers folder; a hub id "
                        "needs a network connection and a cached download.") from None
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def model_family(model: str | Path, revision: str | None = None) -> Family:
    """A model's family (models.families), or a UserError saying the model's files do not tell it."""
    family = detect_family(model, revision)
    if family is None:
        raise UserError(f"cannot tell which model family {model} is (its model_index.json is missing or names a "
                        "pipeline this tool does not know); pass a diffusers folder of SD 1.x/2.x, SDXL, Flux.1 or "
                        "SD3.")
    return family


def pipeline_class(model: str | Path | Family):
    """The diffusers text-to-image pipeline class of a model's family."""
    import diffusers

    family = model if isinstance(model, Family) else model_family(model)
    return getattr(diffusers, family.pipeline)


def load_checkpoint_pipeline(ckpt: Path, *, device: torch.device, dtype: torch.dtype, scheduler: str | None = None,
                             safety_checker: bool = True, with_lora: bool = True):
    """A training checkpoint as a pipeline: its base model with what trained swapped in (UNet, text encoder, LoRA,
    new tokens), as diffusers users load intermediate checkpoints. `with_lora=False` leaves a LoRA run's adapters
    out (for a caller that fuses them itself)."""
    base, config = checkpoint_base(ckpt)
    family = model_family(base, config.get("revision"))
    parts = {}
    with collection_paused():
        import diffusers
        import transformers

        if (ckpt / family.denoiser).is_dir():
            parts[family.denoiser] = getattr(diffusers, family.denoiser_cls).from_pretrained(
                ckpt / family.denoiser, torch_dtype=dtype)
        for t in family.text_encoders:
            if not (ckpt / t.component).is_dir():
                continue  # a new token's rows alone come from the token file, which adds it to the tokenizer
            parts[t.component] = getattr(transformers, t.cls).from_pretrained(ckpt / t.component, torch_dtype=dtype)
            if (ckpt / t.tokenizer).is_dir():
                cls = transformers.CLIPTokenizer if t.kind == "clip" else transformers.AutoTokenizer
                parts[t.tokenizer] = cls.from_pretrained(ckpt / t.tokenizer)
    pipe = load_pipeline(base, device=device, dtype=dtype, scheduler=scheduler, safety_checker=safety_checker,
                         revision=config.get("revision"), variant=config.get("variant"), **parts)
    if (ckpt / LORA_FILE).is_file():
        if with_lora:
            load_loras(pipe, [(ckpt / LORA_FILE, 1.0)])
    elif (ckpt / TOKEN_FILE).is_file() and "text_encoder" not in parts:
        load_token_file(pipe, ckpt / TOKEN_FILE)
    return pipe
