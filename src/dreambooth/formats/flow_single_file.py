"""A Flux.1 or SD3 transformer as one `.safetensors` in its original layout (`formats.flow_layout`): what Black Forest
Labs and Stability publish as `flux1-dev.safetensors` / `sd3.5_large.safetensors`, and what ComfyUI's Load Diffusion
Model (UNETLoader), Forge and diffusers' `from_single_file` load.

The file holds the transformer alone, as those files do for Flux: the text encoders (CLIP-L and T5-XXL; SD3's two
CLIPs and T5) and the VAE are loaded from files of their own. So a LoRA that adapts a text encoder, or brings new
tokens, cannot be merged into it; the kohya export carries those.

Flux's keys are bare (`double_blocks.0.img_attn.qkv.weight`), as BFL's release; SD3's sit under
`model.diffusion_model.`, as Stability's. The transformer keeps the precision it is stored in (the published models
are bfloat16) unless --half asks for fp16.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.formats.atomic import check_new_file, save_safetensors_atomic
from dreambooth.formats.flow_layout import original_tensors
from dreambooth.formats.flow_merge import fuse_flow_loras, transformer_pipeline
from dreambooth.formats.lora import PICKLE_SUFFIXES, cast_half, find_lora_file, new_tokens
from dreambooth.models.base import CHECKPOINT_STATE, LORA_FILE, checkpoint_base, config_folder, safetensors_header
from dreambooth.models.families import Family
from dreambooth.models.loading import model_family

KEY_PREFIX = {"flux": "", "sd3": "model.diffusion_model."}
# The parts a single file of the family leaves out, as ComfyUI loads them.
LEFT_OUT = {"flux": "the text encoders (CLIP-L, T5-XXL: ComfyUI's DualCLIPLoader, type flux) and the VAE (VAELoader)",
            "sd3": "the text encoders (CLIP-L, CLIP-G, T5-XXL: ComfyUI's TripleCLIPLoader) and the VAE (VAELoader)"}


def transformer_folder(src: Path) -> tuple[Family, Path, list[tuple[Path, float]]]:
    """The family, the folder of the transformer to export and the LoRAs still to fuse into it: a model folder's own
    transformer; a training checkpoint's trained one, or its base model's with the checkpoint's LoRA."""
    own = []
    if (src / CHECKPOINT_STATE).is_file():
        base = checkpoint_base(src)[0]
        folder = config_folder(base)
        if folder is None:
            raise UserError(f"{src} was trained from {base}, which is not on this machine (not in the hub cache "
                            "either); the single-file export needs its transformer's config. Download it first.")
        family = model_family(folder)
        weights = src / family.denoiser if (src / family.denoiser).is_dir() else folder / family.denoiser
        if (src / LORA_FILE).is_file():
            own = [(src / LORA_FILE, 1.0)]
    else:
        family = model_family(src)
        weights = src / family.denoiser
    if not any(weights.glob("*.safetensors")):
        found = ", ".join(p.name for p in weights.glob("*") if p.suffix in PICKLE_SUFFIXES) or "no weights"
        raise UserError(f"{weights} has no .safetensors weights ({found}); this tool reads safetensors only.")
    return family, weights, own


def stored_dtype(folder: Path):
    """The dtype of a model folder's weights (its first tensor's), read from the safetensors header alone."""
    import torch
    from safetensors import safe_open

    file = sorted(folder.glob("*.safetensors"))[0]
    with safe_open(str(file), framework="pt") as f:
        first = next(iter(f.keys()))
        name = f.get_slice(first).get_dtype()
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(name, torch.float32)


def check_transformer_only(loras: Sequence[tuple[Path, float]]) -> None:
    """A LoRA merged into the single file may adapt the transformer only: the file has no text encoder."""
    for path, _ in loras:
        file = find_lora_file(path)
        header = safetensors_header(file)
        keys = list(header[0]) if header else []
        text = [k for k in keys if k.startswith(("text_encoder", "lora_te"))]
        if text or new_tokens(file):
            what = f"adapts the text encoder ({text[0]})" if text else f"brings new token(s) {new_tokens(file)}"
            raise UserError(f"LoRA {file} {what}, but the single file holds the transformer alone (the text "
                            "encoders are separate files), so that part would be lost. Export the LoRA itself with "
                            "--format kohya (Flux) or --format diffusers, or merge it into a whole model with "
                            "--format diffusers.")


def flow_to_single_file(src: Path, out: Path, *, half: bool = False,
                        loras: Sequence[tuple[Path, float]] = ()) -> Path:
    """Writes a Flux or SD3 folder's or training checkpoint's transformer (with `loras` fused in, if any) as one
    original-layout `.safetensors`."""
    import diffusers

    src, out = Path(src), Path(out)
    check_new_file(out)
    family, weights, own = transformer_folder(src)
    loras = own + [(find_lora_file(p), w) for p, w in loras]
    check_transformer_only(loras)
    cls = getattr(diffusers, family.denoiser_cls)
    try:
        transformer = cls.from_pretrained(weights, torch_dtype=stored_dtype(weights), use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the transformer in {weights}: {e}") from None
    fuse_flow_loras(transformer_pipeline(family, transformer), loras, src)
    tensors = original_tensors(transformer.state_dict(), family.name)
    tensors = {KEY_PREFIX[family.name] + k: v for k, v in cast_half(tensors, half).items()}
    metadata = {"dreambooth.source": str(src), "dreambooth.base_family": family.name,
                "dreambooth.contents": "transformer"}
    if loras:
        metadata["dreambooth.merged_loras"] = json.dumps([[str(p), w] for p, w in loras])
    return save_safetensors_atomic(tensors, out, metadata)


def left_out_note(family: Family, src: Path) -> str:
    """What the single file of a flow model does not hold, and where those parts are: in SRC, or for a checkpoint
    that did not train them, in its base model."""
    own = (src / "text_encoder").is_dir() or not (src / CHECKPOINT_STATE).is_file()
    folder = src if own else config_folder(src)
    return (f"note: the file holds the {family.title} transformer alone, in its original layout (ComfyUI: Load "
            f"Diffusion Model). It leaves out {LEFT_OUT[family.name]}; this model's are in {folder}'s "
            "text_encoder*/ and vae/ folders.")
