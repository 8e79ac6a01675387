"""LoRA files: writing the diffusers-format file (with what made it) and loading LoRAs for generation.

The file is `pytorch_lora_weights.safetensors`, diffusers' own name and layout, so stock
`pipe.load_lora_weights(output_dir)` loads it. A new identifier token's trained embedding goes beside it in
`token_embeddings.safetensors` ({token: vector}, the layout `pipe.load_textual_inversion` reads).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.errors import UserError
from dreambooth.export import LORA_WEIGHT_NAME as LORA_FILE
from dreambooth.export import find_lora_file
from dreambooth.formats.atomic import publish
from dreambooth.models.base import model_fingerprint  # noqa: F401 - where outputs and tests read it

TOKEN_FILE = "token_embeddings.safetensors"


def lora_layers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft-wrapped diffusers/transformers module, in diffusers' key layout."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


def save_lora(out_dir: Path, unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None,
              adapter_configs: dict[str, dict], metadata: dict[str, str]) -> Path:
    """Writes the LoRA with stock diffusers, then adds our metadata; atomic (temp file + rename)."""
    from diffusers import StableDiffusionPipeline

    tmp_dir = out_dir / ".lora.tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        tmp_dir, unet_lora_layers=lora_layers(unet) if unet is not None else None,
        text_encoder_lora_layers=lora_layers(text_encoder) if text_encoder is not None else None,
        unet_lora_adapter_metadata=adapter_configs.get("unet"),
        text_encoder_lora_adapter_metadata=adapter_configs.get("text_encoder"),
        safe_serialization=True)
    written = tmp_dir / LORA_FILE
    with safe_open(str(written), "pt") as f:
        header = dict(f.metadata() or {})
    tensors = {k: v.to(torch.float32).contiguous() for k, v in load_file(str(written)).items()}
    save_file(tensors, str(written), metadata={**header, **metadata})
    final = out_dir / LORA_FILE
    publish(written)
    os.replace(written, final)
    tmp_dir.rmdir()
    return final


def save_token_embeddings(out_dir: Path, tokenizer, text_encoder, token_ids: list[int]) -> Path | None:
    """The trained rows of new identifier tokens, {token: vector}."""
    if not token_ids:
        return None
    weight = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    rows = {tokenizer.convert_ids_to_tokens(i): weight[i].clone().contiguous() for i in token_ids}
    tmp = out_dir / f".{TOKEN_FILE}.tmp"
    save_file(rows, str(tmp))
    publish(tmp)
    os.replace(tmp, out_dir / TOKEN_FILE)
    return out_dir / TOKEN_FILE


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def token_file_for(lora_file: Path) -> Path:
    """Where a LoRA's new-token embeddings are: `token_embeddings.safetensors` beside diffusers' fixed file name
    (one LoRA per folder), `NAME.tokens.safetensors` beside any other `NAME.safetensors`, so that LoRAs can
    share a folder."""
    if lora_file.name == LORA_FILE:
        return lora_file.parent / TOKEN_FILE
    return lora_file.with_name(lora_file.name.removesuffix(".safetensors") + ".tokens.safetensors")


def check_lora_source(path: Path, flag: str = "--lora") -> Path:
    """A --lora argument as the LoRA file it names; a full model given as a LoRA is refused, saying what to pass."""
    from dreambooth.models.base import CHECKPOINT_STATE, file_kind

    p = Path(path)
    if p.is_dir() and (p / "model_index.json").is_file():
        raise UserError(f"{flag} {p} is a full model folder, not a LoRA; pass it as the model (--model, or export's "
                        "SRC), and a LoRA trained on it as the LoRA.")
    if p.is_dir() and (p / CHECKPOINT_STATE).is_file() and not (p / LORA_FILE).is_file():
        raise UserError(f"{flag} {p} is a checkpoint of a full fine-tune, not a LoRA; pass it as the model (--model, "
                        "or export's SRC).")
    if p.is_file() and p.suffix == ".safetensors" and file_kind(p) == "single-file":
        raise UserError(f"{flag} {p} is a full single-file Stable Diffusion checkpoint, not a LoRA. Convert it to a "
                        "diffusers folder (StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR)) and "
                        "pass that as --model.")
    return find_lora_file(p)


def lora_mismatch(file: Path, error: Exception, model: Path | str | None) -> UserError:
    """peft's error for a LoRA on the wrong base lists every layer (~100 lines of `size mismatch`): one line of
    it, how many, and the base model the LoRA records."""
    from dreambooth.models.base import lora_base_model

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    mismatched = [line for line in lines if "size mismatch" in line]
    detail = (mismatched or lines or [type(error).__name__])[0][:300]
    count = f"{len(mismatched)} of its layers do not fit" if mismatched else "it does not fit"
    base = lora_base_model(file)
    hint = (f" It was trained on {base}; pass that model (or a fine-tune of it) as --model." if base else
            " Is it a LoRA for this model's architecture (SD 1.x, 2.x and SDXL LoRAs do not mix)?")
    return UserError(f"LoRA {file} cannot be applied to {model or 'this model'}: {count} ({detail}).{hint}")


def note_other_base(file: Path, model: Path | str | None) -> None:
    """A LoRA on another model of the same shape loads, and may be what the user wants (a fine-tune of its base);
    say so rather than refuse."""

    meta = read_metadata(file)
    recorded, here = meta.get("dreambooth.base_model_hash"), model_fingerprint(model) if model else ""
    if recorded and here and recorded != here:
        print(f"note: LoRA {file} was trained on {meta.get('dreambooth.base_model')} (weights {recorded}); "
              f"{model} has other weights ({here}). It loads; results depend on how close the two models are.")


def bundled_embeddings(tensors: dict) -> dict[str, torch.Tensor]:
    """Embeddings bundled in a kohya LoRA as A1111 reads them: `bundle_emb.<token>.emb_params` (or
    `.string_to_param.*`), as {token: vectors}."""
    found = {}
    for key, value in tensors.items():
        if key.startswith("bundle_emb."):
            token = key[len("bundle_emb."):].rsplit(".emb_params", 1)[0].split(".string_to_param")[0]
            found[token] = value
    return found


def load_lora_adapter(pipe, path: Path, adapter_name: str, model: Path | str | None = None) -> Path:
    """One LoRA (diffusers or kohya format, file or folder) as a named adapter, with its new tokens; returns its file.

    diffusers refuses a kohya file with bundled embeddings ("Invalid LoRA checkpoint"), so those keys are taken
    out here and their embeddings loaded as textual inversions.
    """
    file = check_lora_source(path)
    with safe_open(str(file), "pt") as f:
        bundled = [k for k in f.keys() if k.startswith("bundle_emb.")]
    source = str(file)
    tensors = {}
    if bundled:
        tensors = load_file(str(file))
        source = {k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}
    try:
        if isinstance(source, dict):
            pipe.load_lora_weights(source, adapter_name=adapter_name)
        else:
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise lora_mismatch(file, e, model) from None
    note_other_base(file, model)
    load_token_embeddings(pipe, file, bundled_embeddings(tensors))
    return file


def load_loras(pipe, loras: list[tuple[Path, float]], model: Path | str | None = None) -> None:
    """Loads each LoRA as its own adapter at its weight (diffusers or kohya format), and any token embeddings."""
    names, weights = [], []
    for i, (path, weight) in enumerate(loras):
        load_lora_adapter(pipe, path, f"lora{i}", model)
        names.append(f"lora{i}")
        weights.append(weight)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)


def load_token_vectors(pipe, vectors: dict[str, torch.Tensor]) -> None:
    """New tokens with their trained embeddings, into the pipeline's tokenizer and text encoder."""
    vocab = pipe.tokenizer.get_vocab()
    for token, vector in vectors.items():
        if token not in vocab:
            vector = vector[0] if vector.ndim == 2 and vector.shape[0] == 1 else vector
            pipe.load_textual_inversion({token: vector}, token=token)


def load_token_file(pipe, file: Path) -> None:
    load_token_vectors(pipe, load_file(str(file)))


def load_token_embeddings(pipe, lora: Path, bundled: dict | None = None) -> None:
    """The new identifier tokens trained with a LoRA: bundled in it (kohya export), or in its token file."""
    if bundled:
        load_token_vectors(pipe, bundled)
        return
    file = token_file_for(lora)
    meta = read_metadata(lora)
    if not file.is_file():
        if json.loads(meta.get("dreambooth.new_tokens", "[]")):
            raise UserError(f"LoRA {lora} was trained with new token(s) {meta['dreambooth.new_tokens']} whose "
                            f"embeddings live in {file.name} beside it, which is missing; copy it along.")
        return
    load_token_file(pipe, file)
