"""LoRA files: writing the diffusers-format file (with what made it) and loading LoRAs for generation.

The file is `pytorch_lora_weights.safetensors`, diffusers' own name and layout, so stock
`pipe.load_lora_weights(output_dir)` loads it. A new identifier token's trained embedding goes beside it in
`token_embeddings.safetensors` ({token: vector}, the layout `pipe.load_textual_inversion` reads).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.errors import UserError
from dreambooth.export import LORA_WEIGHT_NAME as LORA_FILE
from dreambooth.export import find_lora_file
from dreambooth.runinfo import publish

TOKEN_FILE = "token_embeddings.safetensors"


def model_fingerprint(model: str) -> str:
    """A short hash of the base model's UNet weights file, to tell base models apart; '' for a hub id."""
    folder = Path(model) / "unet"
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return ""
    digest = hashlib.sha256()
    with files[0].open("rb") as f:
        digest.update(f.read(1 << 20))  # the header and first MiB: enough to tell models apart, fast for 3 GB files
    digest.update(str(files[0].stat().st_size).encode())
    return digest.hexdigest()[:16]


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


def load_loras(pipe, loras: list[tuple[Path, float]]) -> None:
    """Loads each LoRA as its own adapter at its weight (diffusers or kohya format), and any token embeddings."""
    names, weights = [], []
    for i, (path, weight) in enumerate(loras):
        file = find_lora_file(path)
        name = f"lora{i}"
        try:
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"could not load LoRA {file} into this model: {e}. Was it trained on a model of this "
                            "architecture?") from None
        names.append(name)
        weights.append(weight)
        load_token_embeddings(pipe, file)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)


def load_token_embeddings(pipe, lora: Path) -> None:
    """The new identifier tokens trained with a LoRA: from token_embeddings.safetensors beside it."""
    file = lora.parent / TOKEN_FILE
    meta = read_metadata(lora)
    if not file.is_file():
        if json.loads(meta.get("dreambooth.new_tokens", "[]")):
            raise UserError(f"LoRA {lora} was trained with new token(s) {meta['dreambooth.new_tokens']} whose "
                            f"embeddings live in {TOKEN_FILE} beside it, which is missing; copy it along.")
        return
    vocab = pipe.tokenizer.get_vocab()
    for token, vector in load_file(str(file)).items():
        if token not in vocab:
            pipe.load_textual_inversion({token: vector}, token=token)
