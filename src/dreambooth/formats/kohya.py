"""A diffusers/peft LoRA in the kohya/A1111 layout: `lora_unet_*` / `lora_te_*` keys with `lora_down`/`lora_up`
and the `alpha` that keeps every layer's scale, new tokens bundled as A1111 reads them.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from dreambooth.formats.atomic import check_new_file, save_safetensors_atomic
from dreambooth.formats.lora import COMPONENTS, cast_half, embedding_file_for, lora_token_vectors, read_lora


def _pattern_value(patterns: dict, module: str):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module whose dotted name ends with it (a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def kohya_alpha(module: str, rank: int, config: dict | None) -> float:
    """The kohya `alpha` giving the same scale as peft: kohya scales B@A by alpha/rank.

    peft scales by lora_alpha/r (or lora_alpha/sqrt(r) with rsLoRA, Kalajdzievski 2023), with per-module
    overrides in alpha_pattern. Without a recorded config, diffusers loads a LoRA at scale 1, i.e. alpha = rank.
    """
    if not config:
        return float(rank)
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    if alpha is None:
        alpha = config.get("lora_alpha", rank)
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return float(scale * rank)


def _kohya_name(component: str, module: str) -> str:
    if component == "text_encoder":
        # kohya and A1111 name text-encoder layers from CLIPTextModel's `text_model.` root, which transformers
        # >= 5.6 no longer has (its LoRA keys start at `encoder.`).
        module = "text_model." + module.removeprefix("text_model.")
    return COMPONENTS[component] + module.replace(".", "_")


def common_alpha(alphas: list[float]) -> float:
    """The alpha most layers have (the largest on a tie); zero only if every alpha is zero."""
    nonzero = [a for a in alphas if a != 0] or [0.0]
    counts = Counter(nonzero)
    return max(counts, key=lambda a: (counts[a], a))


def lora_to_kohya(src: Path, out: Path, *, half: bool = False) -> Path:
    """Converts a diffusers/peft LoRA (file or folder) into the kohya/A1111 format.

    Every layer gets one common alpha; a layer whose own alpha differs (peft's alpha_pattern, rsLoRA on one
    component only) has the ratio folded into its `lora_up`, which gives the same alpha/rank * up @ down. The
    file then loads the same everywhere: diffusers 0.42's kohya loader ignores per-layer alphas on attention
    layers (it logs "alpha_pattern keys did not match any targeted module"), while A1111 and ComfyUI read them.
    """
    import torch

    out = Path(out)
    check_new_file(out)
    lora = read_lora(src)
    layers = [(_kohya_name(component, module), down, up, kohya_alpha(module, down.shape[0],
                                                                      lora.adapter_config.get(component)))
              for component, modules in lora.layers.items() for module, (down, up) in modules.items()]
    alpha = common_alpha([a for *_, a in layers])
    tensors = {}
    for name, down, up, own_alpha in layers:
        if own_alpha != alpha:
            up = up * (own_alpha / alpha)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
    tensors = cast_half(tensors, half)
    for name, *_ in layers:
        # fp32 even with --half: an rsLoRA alpha such as 16 * sqrt(8) is not exact in fp16.
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    # diffusers' adapter config is dropped: the alphas now carry it, and diffusers refuses a file that has both.
    # The rest (our dreambooth.* keys, for one) is kept.
    metadata = {**lora.metadata, "ss_network_module": "networks.lora", "ss_network_alpha": str(alpha)}
    ranks = {down.shape[0] for _, down, _, _ in layers}
    if len(ranks) == 1:
        metadata["ss_network_dim"] = str(ranks.pop())
    vectors = lora_token_vectors(lora.path)
    embedding_files = {token: embedding_file_for(out, token) for token in vectors}
    for file in embedding_files.values():
        check_new_file(file)
    # A1111 and Forge read embeddings bundled in a LoRA as `bundle_emb.<name>.<key>`, and match <name> in the prompt
    # token by token, so the token itself is the name. ComfyUI does not read bundles: it gets each as an embedding
    # file of its own beside the LoRA (`emb_params`, the key kohya's textual-inversion files use).
    for token, vector in vectors.items():
        for key, rows in embedding_rows(vector).items():
            tensors[f"bundle_emb.{token}.{key}"] = cast_half({"v": rows}, half)["v"]
    if vectors:
        metadata["dreambooth.embedding_files"] = json.dumps({t: f.name for t, f in embedding_files.items()})
    written = save_safetensors_atomic(tensors, out, metadata)
    for token, vector in vectors.items():
        save_safetensors_atomic({k: v.float() for k, v in embedding_rows(vector).items()}, embedding_files[token],
                                {"dreambooth.token": token, "dreambooth.lora": out.name})
    return written


def embedding_rows(vector) -> dict:
    """A token's embedding as a textual-inversion file holds it: `emb_params` (kohya's key), or SDXL's `clip_l` and
    `clip_g` (one row for each text encoder), each one row."""
    if isinstance(vector, dict):
        return {key: v.reshape(1, -1) for key, v in vector.items()}
    return {"emb_params": vector.reshape(1, -1)}
