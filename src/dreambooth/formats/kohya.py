"""A diffusers/peft LoRA in the kohya/A1111 layout: `lora_unet_*` / `lora_te_*` keys with `lora_down`/`lora_up`
and the `alpha` that keeps every layer's scale, new tokens bundled as A1111 reads them.

SD 1.x and 2.x LoRAs keep diffusers' module names (`lora_unet_down_blocks_0_attentions_0_...`), as kohya's
sd-scripts write them. An SDXL LoRA is named as sd-scripts, A1111 and ComfyUI name SDXL's: the text encoders
`lora_te1_` and `lora_te2_`, the UNet by its original SGM blocks (`lora_unet_input_blocks_4_1_...`), derived from
the UNet's config by the single-file export's own rules (`models.layout.unet_rules`), so that any SDXL-shaped
UNet is numbered right and a layer with no original name stops the export.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.formats.atomic import check_new_file, save_safetensors_atomic
from dreambooth.formats.lora import (
    COMPONENTS,
    LoraFile,
    cast_half,
    embedding_file_for,
    embedding_rows,
    find_lora_file,
    lora_token_vectors,
    read_lora,
    read_safetensors,
)
from dreambooth.formats.lycoris import adapted_layers, lycoris_layer
from dreambooth.models.base import LORA_FILE, cached_snapshot, is_hub_id
from dreambooth.models.families import folder_family


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


def kohya_name(component: str, module: str, sgm_names: dict[str, str] | None = None) -> str:
    """The kohya name of a LoRA layer; `sgm_names` (SDXL's, from `sdxl_unet_names`) renames the UNet's layers and the
    first text encoder's prefix."""
    prefix = COMPONENTS[component]
    if component.startswith("text_encoder"):
        # kohya and A1111 name text-encoder layers from CLIPTextModel's `text_model.` root, which transformers
        # >= 5.6 no longer has (its LoRA keys start at `encoder.`).
        module = "text_model." + module.removeprefix("text_model.")
        if sgm_names is not None and component == "text_encoder":
            prefix = "lora_te1_"
    elif sgm_names is not None:
        module = sgm_names[module]
    return prefix + module.replace(".", "_")


def _recorded_base(lora: LoraFile) -> Path | None:
    """The base model a LoRA of this tool records, when it is on this machine (a folder, or a hub id's cached
    copy)."""
    base = lora.metadata.get("dreambooth.base_model")
    if not base:
        return None
    folder = cached_snapshot(base, None) if is_hub_id(base) else base
    return Path(folder) if folder and (Path(folder) / "unet" / "config.json").is_file() else None


def _unet_config_from_layers(modules) -> dict:
    """A UNet config with the block layout the LoRA's own layer names show, for a LoRA that names no base model on
    this machine: its levels, which have attention, and layers a level (from the attention indices).

    The numbering it gives assumes what diffusers' kohya loader assumes when it reads the names back (equal layers
    on every level, a downsampler on every level but the last), which every SDXL UNet meets; A1111 and ComfyUI
    look the names up in their own SGM-layout UNet.
    """
    last_attention: dict[str, dict[int, int]] = {"down": {}, "up": {}}  # block -> its highest attention index
    for module in modules:
        if m := re.match(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.", module):
            side = last_attention[m.group(1)]
            side[int(m.group(2))] = max(side.get(int(m.group(2)), 0), int(m.group(3)))
    down, up = last_attention["down"], last_attention["up"]
    levels = max([*down, *up, 0]) + 1
    layers = max([*down.values(), *(j - 1 for j in up.values()), 0]) + 1
    down_attention = [i in down or (levels - 1 - i) in up for i in range(levels)]
    return {"block_out_channels": (8,) * levels, "layers_per_block": layers, "norm_num_groups": 8,
            "cross_attention_dim": 8, "attention_head_dim": 2,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(down_attention)]}


def sdxl_unet_names(config: dict, modules, path: Path) -> dict[str, str]:
    """diffusers' UNet module name -> its original SGM name (`down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in`), for each of the LoRA's modules; the UNet is built from `config` on the meta
    device (no memory), so the numbering follows its real blocks."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from dreambooth.models.layout import ldm_name, unet_rules

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    by_module = {rule.diffusers: rule for rule in unet_rules(unet)}
    names = {m: ldm_name(m + ".weight", by_module) for m in modules}
    unmapped = sorted(m for m, name in names.items() if name is None)
    if unmapped:
        raise UserError(f"LoRA {path}: the UNet layer(s) {', '.join(unmapped[:5])} have no name in SDXL's original "
                        "layout, which kohya files, A1111 and ComfyUI use; export it with --format diffusers.")
    return {m: name.removesuffix(".weight") for m, name in names.items()}


def _sdxl_blocks(modules) -> bool:
    """Whether UNet layer names show SDXL's block layout: its first up block has attention, which SD 1.x's and 2.x's
    (an UpBlock2D) never has. The LoRA alone tells, wherever its base model is."""
    return any(m.startswith("up_blocks.0.attentions.") for m in modules)


def _sgm_names(lora: LoraFile) -> dict[str, str] | None:
    """SDXL's UNet names for this LoRA's layers; None for an SD 1.x/2.x LoRA. A LoRA is SDXL's when it adapts a
    second text encoder, records an SDXL base model, or has layers in SDXL's first up block; a UNet-only LoRA
    showing none of these (adapters only where both layouts have attention) keeps diffusers' names, with a note."""
    base = _recorded_base(lora)
    unet = list(lora.layers.get("unet", {}))
    sdxl_base = base is not None and getattr(folder_family(base), "name", None) == "sdxl"
    if not lora.layers.get("text_encoder_2") and not sdxl_base and not _sdxl_blocks(unet):
        if unet and lora.metadata.get("dreambooth.base_model") and base is None:
            print(f"note: LoRA {lora.path} records the base model {lora.metadata['dreambooth.base_model']}, which is "
                  "not on this machine, and its layers do not show whether it is SDXL's; its UNet keeps diffusers' "
                  "names (SD 1.x/2.x kohya files use them; for SDXL, export where the base model is).")
        return None
    modules = list(lora.layers.get("unet", {}))
    if sdxl_base:
        config = json.loads((base / "unet" / "config.json").read_text())
    else:
        config = _unet_config_from_layers(modules)
    return sdxl_unet_names(config, modules, lora.path)


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
    sgm_names = _sgm_names(lora)
    layers = [(kohya_name(component, module, sgm_names), down, up,
               kohya_alpha(module, down.shape[0], lora.adapter_config.get(component)))
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
    return save_with_tokens(tensors, metadata, lora.path, out, half)


def lycoris_to_kohya(src: Path, out: Path, *, half: bool = False) -> Path:
    """A LoKr or LoHa file of this tool (`formats.lycoris`) for A1111, Forge and ComfyUI: it is in their layout
    already, so its tensors go as they are (fp16 with `half`, alphas fp32), new tokens bundled as in a LoRA's."""
    out = Path(out)
    check_new_file(out)
    path = find_lora_file(src)
    tensors, metadata = read_safetensors(path)
    tensors = {**cast_half({k: v for k, v in tensors.items() if not k.endswith(".alpha")}, half),
               **{k: v for k, v in tensors.items() if k.endswith(".alpha")}}
    return save_with_tokens(tensors, metadata, path, out, half)


def save_with_tokens(tensors: dict, metadata: dict[str, str], lora_path: Path, out: Path, half: bool) -> Path:
    """Writes a kohya-layout file with the new tokens' embeddings of the LoRA at `lora_path` bundled in it, and each
    also in a textual-inversion file of its own beside it."""
    vectors = lora_token_vectors(lora_path)
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


# ------------------------------------------------------------------------------------- LoKr and LoHa (LyCORIS)


def lycoris_names(family, component: str, module, paths: list[str], out: Path) -> dict[str, str]:
    """Each adapted module path's LyCORIS layer name: the kohya name of a LoRA layer on that module (SDXL's UNet by
    its original SGM names, numbered from the UNet's own config; SDXL's encoders `lora_te1_`/`lora_te2_`)."""
    sgm = None
    if family.name == "sdxl":
        sgm = sdxl_unet_names(dict(module.config), paths, out) if component == "unet" else {}
    return {path: kohya_name(component, path, sgm) for path in paths}


def save_lycoris(out_dir: Path, family, modules: dict, kind: str, metadata: dict[str, str]) -> Path:
    """Writes a run's LoKr or LoHa adapters (`modules`: the denoiser and text encoders by component name, None where
    nothing trains) as one file in LyCORIS' layout (`formats.lycoris`), `pytorch_lora_weights.safetensors`, fp32,
    atomically."""
    tensors, ranks = {}, set()
    out = out_dir / LORA_FILE
    for component, module in modules.items():
        if module is None:
            continue
        layers = adapted_layers(module)
        names = lycoris_names(family, component, module, list(layers), out)
        for path, layer in layers.items():
            tensors.update(lycoris_layer(names[path], layer))
            ranks.add(int(layer.r["default"]))
    # the header kohya's sd-scripts and LyCORIS write, which A1111's and ComfyUI's model browsers show
    header = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": kind}),
              **({"ss_network_dim": str(ranks.pop())} if len(ranks) == 1 else {})}
    return save_safetensors_atomic(tensors, out, {**header, **metadata})
