"""LoRAs baked into a model: loaded as adapters with stock diffusers, fused at their weights, saved as a plain
diffusers folder; and the model (folder or training checkpoint) every export of a full model starts from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.formats.atomic import atomic_folder, check_new_folder
from dreambooth.formats.lora import PICKLE_SUFFIXES, find_lora_file
from dreambooth.formats.lora_loading import load_lora_adapter, text_sides
from dreambooth.formats.lycoris import lycoris_kind
from dreambooth.models.base import CHECKPOINT_STATE, LORA_FILE, check_model_folder, checkpoint_base
from dreambooth.models.loading import load_checkpoint_pipeline, model_family, pipeline_class
from dreambooth.versions import library_versions

LORA_DOWN_SUFFIXES = ("lora_A.weight", "lora_down.weight", "lora.down.weight", "lora_linear_layer.down.weight")


def _check_safetensors_weights(model_dir: Path, subfolders) -> None:
    for sub in subfolders:
        folder = model_dir / sub
        if not any(folder.glob("*.safetensors")):
            found = ", ".join(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) or "no weights"
            raise UserError(f"{folder} has no .safetensors weights ({found}); this tool reads safetensors only. "
                            "Re-save the model where you trust its files with "
                            "StableDiffusionPipeline.from_pretrained(DIR).save_pretrained(NEW_DIR).")


def _weight_folders(model_dir: Path) -> list[str]:
    index = json.loads((model_dir / "model_index.json").read_text())
    return [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
            and value[0] is not None and (model_dir / name / "config.json").is_file()]


def model_folder(src: Path) -> Path:
    """The diffusers folder whose configs a source uses: itself, or a checkpoint's base model."""
    if (src / CHECKPOINT_STATE).is_file():
        return Path(checkpoint_base(src)[0])
    return src


def source_pipeline(src: Path, *, whole: bool = False):
    """A model folder or a training checkpoint as an fp32 pipeline on the CPU, read from safetensors only, and the
    LoRAs still to fuse into it (a LoRA run's checkpoint: its own).

    `whole`: every part of the folder (safety checker included), for a diffusers re-save; otherwise only what
    a single file holds.
    """
    import torch

    if (src / CHECKPOINT_STATE).is_file():
        base = Path(checkpoint_base(src)[0])
        if base.is_dir():
            _check_safetensors_weights(base, _weight_folders(base))
        pipe = load_checkpoint_pipeline(src, device=torch.device("cpu"), dtype=torch.float32, safety_checker=False,
                                        with_lora=False)
        return pipe, [(src / LORA_FILE, 1.0)] if (src / LORA_FILE).is_file() else []
    check_model_folder(src, what="SRC")
    family = model_family(src)
    weights = (family.denoiser, "vae", *(t.component for t in family.text_encoders))
    _check_safetensors_weights(src, _weight_folders(src) if whole else weights)
    extra = {} if whole else family.behaviour().pipeline_extras(safety_checker=False)
    if "safety_checker" in extra:
        extra["feature_extractor"] = None
    try:
        pipe = pipeline_class(family).from_pretrained(src, use_safetensors=True, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the model in {src}: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe, []


def _lora_layer_count(file: Path) -> int:
    """The layers a LoRA file adapts: one down matrix each, or one LoKr/LoHa layer each (LyCORIS' layout)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        keys = list(f.keys())
    if lycoris_kind(keys):
        return len({k.partition(".")[0] for k in keys if not k.startswith("bundle_emb.")})
    return sum(k.endswith(LORA_DOWN_SUFFIXES) for k in keys)


def _loaded_layer_count(pipe, adapter: str) -> int:
    """The pipeline's layers that hold `adapter`, of any kind (peft's LoRA, LoKr and LoHa layers each keep its
    rank in `r`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) and adapter in getattr(m, "r", {})
               for model in (pipe.unet, *(encoder for *_, encoder in text_sides(pipe))) for m in model.modules())


def fuse_loras(pipe, loras: Sequence[tuple[Path, float]], model: Path | str | None = None):
    """Loads each LoRA as its own adapter with stock diffusers, fuses them at their weights, removes the adapters.

    After `unload_lora_weights` the fused weights stay in the base layers and no peft layer is left, so
    `save_pretrained` writes a plain model. A LoRA layer that finds no module to attach to is an error, not a
    warning: a LoRA made for another architecture would otherwise merge as a silent no-op.
    """
    if not loras:
        return pipe
    names = []
    for i, (path, _) in enumerate(loras):
        name = f"export_{i}"
        # A new identifier token's trained embedding joins the tokenizer and text encoder, saved with them.
        file = load_lora_adapter(pipe, path, name, model, flag="SRC")
        expected, loaded = _lora_layer_count(file), _loaded_layer_count(pipe, name)
        if loaded != expected:
            raise UserError(f"LoRA {file} has {expected} layers but only {loaded} found a matching layer in this "
                            "model; it was made for a different architecture. Merge it into its own base model.")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras])
    sides = text_sides(pipe)
    pipe.fuse_lora(components=["unet", *(name for name, *_ in sides)], adapter_names=names)
    pipe.unload_lora_weights()
    left = [k for model in (pipe.unet, *(encoder for *_, encoder in sides)) for k in model.state_dict() if "lora" in k]
    if left:
        raise AssertionError(f"LoRA layers remain after unloading: {left[:3]}")
    return pipe


def merge_lora(base_dir: Path, loras: Sequence[tuple[Path, float]], out: Path, *, half: bool = False) -> Path:
    """Saves a model folder or training checkpoint with each (LoRA, weight) fused in as a plain diffusers folder;
    no LoRAs: a plain re-save."""
    import torch

    base_dir, out = Path(base_dir), Path(out)
    check_new_folder(out)
    loras = [(find_lora_file(p), w) for p, w in loras]
    pipe, own = source_pipeline(base_dir, whole=True)
    loras = own + loras
    fuse_loras(pipe, loras, base_dir)
    if half:
        pipe.to(torch.float16)
    with atomic_folder(out) as tmp:  # `out` never holds half a model
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "export.json").write_text(json.dumps({
            "base_model": str(base_dir), "loras": [{"file": str(p), "weight": w} for p, w in loras],
            "dtype": "fp16" if half else "as loaded", "versions": library_versions()}, indent=2) + "\n")
    return out
