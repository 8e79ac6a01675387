"""LoKr and LoHa adapters in LyCORIS' layout, the file A1111, Forge and ComfyUI read: its names and shapes, and the
tensors of one layer both ways (written by `formats.kohya.save_lycoris`, read by `formats.lycoris_loading`).

Each adapted layer is named as kohya names a LoRA layer (`formats.kohya.kohya_name`: `lora_unet_` and diffusers'
UNet module path for SD 1.x/2.x, SDXL's original SGM name for SDXL; `lora_te_`, SDXL's `lora_te1_`/`lora_te2_`, and
CLIP's `text_model_...`), with LyCORIS' tensors after it: LoKr `.lokr_w1` (or `.lokr_w1_a` and `.lokr_w1_b`) and
`.lokr_w2` (or `.lokr_w2_a`, `.lokr_w2_b`), the update kron(w1, w2); LoHa `.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`,
`.hada_w2_b`, the update (w1_a @ w1_b) * (w2_a @ w2_b); and `.alpha`.

The scale differs: LyCORIS (and A1111 and ComfyUI, which follow it) scales a layer's update by alpha / rank where the
layer has a rank (a LoHa layer; a LoKr layer with a factor stored as `_a @ _b`) and by 1 where both LoKr factors are
whole matrices; peft always by alpha / r. So a LoKr layer of two whole factors is written with peft's scale folded
into `lokr_w1`, and reading folds LyCORIS' scale into the first factor and loads at peft's scale 1.

The flow families (Flux, SD3) take none: LyCORIS names their fused original layers (qkv, linear1), and a Kronecker
product of diffusers' separate q, k and v has no exact form there.
"""

from __future__ import annotations

# A layer's tensors, by adapter kind, as LyCORIS names them (peft names its parameters the same).
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
KINDS = {"lokr": LOKR_TENSORS, "loha": LOHA_TENSORS}
LYCORIS = tuple(KINDS)  # the adapter kinds (config lora.adapter) saved in this layout
TITLES = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}
# The names of trained adapter parameters, of every kind peft trains here.
ADAPTER_PARAMETERS = ("lora_", "lokr_", "hada_")


def lycoris_kind(keys) -> str | None:
    """'lokr' or 'loha' for a file in LyCORIS' layout of that kind (by its tensor names), None for anything else."""
    for kind, tensors in KINDS.items():
        if any(key.rpartition(".")[2] in tensors for key in keys):
            return kind
    return None


def layers_of(tensors: dict) -> dict[str, dict]:
    """A LyCORIS file's tensors (or shapes) grouped by layer: {layer name: {tensor name: value}}; embeddings bundled
    for A1111 (`bundle_emb.`) left out."""
    layers: dict[str, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("bundle_emb."):
            layer, _, name = key.partition(".")
            layers.setdefault(layer, {})[name] = value
    return layers


def factor_shape(parts: dict, name: str) -> tuple[int, int]:
    """A LoKr factor's [rows, columns], whole or as `_a @ _b`."""
    if name in parts:
        return tuple(parts[name][:2])
    return parts[f"{name}_a"][0], parts[f"{name}_b"][1]


def lycoris_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, int]]]:
    """{layer: {"update": (outputs, inputs x kernel)}} of a LyCORIS file, from its tensors' shapes: what each layer
    changes, to check it against a model's layer (`formats.lora_fit`)."""
    found = {}
    for layer, parts in layers_of(shapes).items():
        if "hada_w1_a" in parts and "hada_w1_b" in parts:
            found[layer] = {"update": (parts["hada_w1_a"][0], parts["hada_w1_b"][1])}
        elif any(name.startswith("lokr_w1") for name in parts) and any(name.startswith("lokr_w2") for name in parts):
            (a, b), (c, d) = factor_shape(parts, "lokr_w1"), factor_shape(parts, "lokr_w2")
            found[layer] = {"update": (a * c, b * d)}
    return found


# ------------------------------------------------------------------------------------------------- writing


def _rank(kind: str, weights: dict) -> int | None:
    """The rank LyCORIS divides alpha by for a layer's scale; None for a LoKr layer of two whole factors (scale 1)."""
    if kind == "loha":
        return weights["hada_w1_b"].shape[0]
    low = weights.get("lokr_w1_b", weights.get("lokr_w2_b"))
    return None if low is None else low.shape[0]


def lycoris_layer(name: str, layer, adapter: str = "default") -> dict:
    """One peft LoKr or LoHa layer's tensors under LyCORIS' names, with the alpha that gives peft's scale."""
    import torch

    kind = "lokr" if hasattr(layer, "lokr_w1") else "loha"
    weights = {key: getattr(layer, key)[adapter].detach().float().cpu().contiguous() for key in KINDS[kind]
               if adapter in getattr(layer, key)}
    scale, rank = float(layer.scaling[adapter]), _rank(kind, weights)
    if rank is None:  # LyCORIS ignores alpha here: the scale goes into the first factor
        weights["lokr_w1"] = weights["lokr_w1"] * scale
        alpha = float(layer.r[adapter])
    else:
        alpha = scale * rank
    tensors = {f"{name}.{key}": value for key, value in weights.items()}
    tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def adapted_layers(module, adapter: str = "default") -> dict[str, object]:
    """A module's peft LoKr and LoHa layers holding `adapter`, by module path."""
    from peft.tuners.lycoris_utils import LycorisLayer

    return {path: m for path, m in module.named_modules() if isinstance(m, LycorisLayer) and adapter in m.r}


# ------------------------------------------------------------------------------------------------- reading


def fold_scale(kind: str, parts: dict):
    """A layer's tensors with LyCORIS' scale folded into the first factor (peft then applies 1)."""
    weights = {name: value.float() for name, value in parts.items() if name in KINDS[kind]}
    rank = _rank(kind, weights)
    alpha = parts.get("alpha")
    scale = float(alpha) / rank if rank is not None and alpha is not None else 1.0
    first = "hada_w1_a" if kind == "loha" else ("lokr_w1" if "lokr_w1" in weights else "lokr_w1_a")
    if scale != 1.0:
        weights[first] = weights[first] * scale
    return weights
