"""LoRAs baked into a Flux.1 or SD3 model with stock diffusers: into a whole pipeline (saved as a diffusers folder),
or into the transformer alone (for the single-file export, `formats.flow_single_file`).

`formats.merge` does this for the UNet families; the flow families' pipelines hold a transformer, and a LoRA file
for them may be diffusers' or kohya's, which their own `load_lora_weights` converts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.formats.atomic import atomic_folder, check_new_folder
from dreambooth.formats.lora import find_lora_file, is_kohya, read_safetensors
from dreambooth.formats.lora_loading import load_lora_adapter
from dreambooth.formats.merge import LORA_DOWN_SUFFIXES, source_pipeline
from dreambooth.models.families import Family, pipeline_family
from dreambooth.versions import library_versions

# What diffusers 0.42.1's kohya Flux reader leaves out: adapters of the layers outside the blocks come back without
# the `transformer.` prefix, and no model takes them.
KOHYA_DROPPED = "img_in, txt_in, time_in, vector_in, guidance_in and final_layer"


def lora_parts(pipe) -> list[str]:
    """The pipeline's parts a LoRA can adapt and that it holds: the transformer and its CLIP text encoders."""
    family = pipeline_family(pipe)
    return [c for c in (family.denoiser, *(t.component for t in family.text_encoders if t.trains))
            if getattr(pipe, c, None) is not None]


def _expected_layers(pipe, file: Path) -> int:
    """The adapted layers of a LoRA file once the pipeline's own reader has converted it (a kohya Flux file's fused
    layers come back as their parts)."""
    state = pipe.lora_state_dict(str(file))
    state = state[0] if isinstance(state, tuple) else state
    return sum(k.endswith(LORA_DOWN_SUFFIXES) for k in state)


def _loaded_layers(pipe, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})
               for part in lora_parts(pipe) for m in getattr(pipe, part).modules())


def fuse_flow_loras(pipe, loras: Sequence[tuple[Path, float]], model: Path | str | None = None):
    """Loads each LoRA as its own adapter with stock diffusers, fuses them at their weights into the pipeline's
    transformer (and CLIP text encoder, where a LoRA adapts it and the pipeline holds it), removes the adapters.

    A LoRA layer that finds no module is an error, not diffusers' warning: a LoRA of another shape would merge as a
    silent no-op.
    """
    if not loras:
        return pipe
    names = []
    for i, (path, _) in enumerate(loras):
        name = f"export_{i}"
        file = load_lora_adapter(pipe, path, name, model, flag="SRC")  # refuses what diffusers cannot convert
        expected, loaded = _expected_layers(pipe, file), _loaded_layers(pipe, name)
        if loaded != expected:
            why = (f" diffusers' kohya reader drops the adapters of Flux's {KOHYA_DROPPED}; merge the LoRA's "
                   "diffusers-format original" if is_kohya(read_safetensors(file)[0]) else
                   " It was made for a model of another shape; merge it into its own base model")
            raise UserError(f"LoRA {file} has {expected} layers but only {loaded} found a matching layer in this "
                            f"model.{why}.")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras])
    parts = lora_parts(pipe)
    pipe.fuse_lora(components=parts, adapter_names=names)
    pipe.unload_lora_weights()
    left = [k for part in parts for k in getattr(pipe, part).state_dict() if "lora" in k]
    if left:
        raise AssertionError(f"LoRA layers remain after unloading: {left[:3]}")
    return pipe


def transformer_pipeline(family: Family, transformer):
    """The family's stock pipeline around its transformer alone, for diffusers' LoRA loading and fusing."""
    import diffusers

    others = {c: None for c in family.components if c != family.denoiser}
    return getattr(diffusers, family.pipeline)(**others, **{family.denoiser: transformer})


def merge_flow_loras(src: Path, loras: Sequence[tuple[Path, float]], out: Path, *, half: bool = False) -> Path:
    """A Flux or SD3 folder or training checkpoint with each (LoRA, weight) fused in, saved as a plain diffusers
    folder (`formats.merge.merge_lora`'s twin for the flow families)."""
    import torch

    src, out = Path(src), Path(out)
    check_new_folder(out)
    loras = [(find_lora_file(p), w) for p, w in loras]
    pipe, own = source_pipeline(src, whole=True)
    loras = own + loras
    fuse_flow_loras(pipe, loras, src)
    if half:
        pipe.to(torch.float16)
    with atomic_folder(out) as tmp:  # `out` never holds half a model
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "export.json").write_text(json.dumps({
            "base_model": str(src), "loras": [{"file": str(p), "weight": w} for p, w in loras],
            "dtype": "fp16" if half else "as loaded", "versions": library_versions()}, indent=2) + "\n")
    return out
