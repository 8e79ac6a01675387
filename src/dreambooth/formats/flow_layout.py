"""Where each diffusers module of a flow transformer sits in its original layout: Black Forest Labs' Flux.1
(`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, `img_in`, `final_layer`, ...) and Stability's MMDiT for
SD3 (`joint_blocks.N.x_block.attn.qkv`, `x_embedder`, `final_layer`, ...).

These are the names ComfyUI, Forge and kohya's sd-scripts use: a transformer saved alone
(`formats.flow_single_file`), and a Flux LoRA in kohya's layout, whose layer names are the original module names
behind `lora_unet_` (`formats.flux_kohya`). Written from the two models' definitions as diffusers' single-file
converters read them, not copied from a converter; the tests load what we write with those converters.

The original layout fuses what diffusers keeps apart: a block's query, key and value projections are one `qkv`
layer, and a Flux single-stream block's q, k, v and MLP input projection are one `linear1`, their outputs stacked in
that order. The final layer's modulation (and SD3's last block's context modulation) gives (shift, scale) where
diffusers' AdaLayerNormContinuous gives (scale, shift). Flux's RMSNorm weights are called `scale`.

Torch-free; `original_tensors` imports torch when called.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dreambooth.errors import UserError

QKV = (1, 1, 1)
# q, k, v and the MLP input of a Flux single block: the MLP is 4 times as wide (mlp_ratio, fixed in BFL's model and
# in diffusers' FluxSingleTransformerBlock alike)
LINEAR1 = (1, 1, 1, 4)


@dataclass(frozen=True)
class Place:
    """A diffusers module's place in the original layout."""

    module: str  # the original module: "double_blocks.0.img_attn.qkv" ("" for SD3's lone pos_embed tensor)
    part: int = 0  # which of the modules fused into it this one is
    widths: tuple[int, ...] = (1,)  # the fused modules' output widths, as multiples of their common input width
    swap: bool = False  # its output's two halves are (shift, scale) there, (scale, shift) in diffusers
    norm: bool = False  # an RMSNorm whose `weight` is the original's `scale` (Flux)

    @property
    def fused(self) -> bool:
        return len(self.widths) > 1


def _rule(name: str, module: str, part: int = 0, widths: tuple[int, ...] = (1,), **kw) -> tuple:
    """A diffusers module name with {i} for a block index, and its place with {i} for the same index."""
    pattern = r"(\d+)".join(re.escape(piece) for piece in name.split("{i}"))
    return re.compile(pattern), Place(module, part, widths, **kw)


FLUX_RULES = (
    _rule("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    _rule("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    _rule("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    _rule("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    _rule("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    _rule("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    _rule("context_embedder", "txt_in"),
    _rule("x_embedder", "img_in"),
    _rule("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True),
    _rule("proj_out", "final_layer.linear"),
    # double-stream blocks: the image stream `img_*`, the text stream `txt_*`
    _rule("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.lin"),
    _rule("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.lin"),
    _rule("transformer_blocks.{i}.attn.to_q", "double_blocks.{i}.img_attn.qkv", 0, QKV),
    _rule("transformer_blocks.{i}.attn.to_k", "double_blocks.{i}.img_attn.qkv", 1, QKV),
    _rule("transformer_blocks.{i}.attn.to_v", "double_blocks.{i}.img_attn.qkv", 2, QKV),
    _rule("transformer_blocks.{i}.attn.add_q_proj", "double_blocks.{i}.txt_attn.qkv", 0, QKV),
    _rule("transformer_blocks.{i}.attn.add_k_proj", "double_blocks.{i}.txt_attn.qkv", 1, QKV),
    _rule("transformer_blocks.{i}.attn.add_v_proj", "double_blocks.{i}.txt_attn.qkv", 2, QKV),
    _rule("transformer_blocks.{i}.attn.norm_q", "double_blocks.{i}.img_attn.norm.query_norm", norm=True),
    _rule("transformer_blocks.{i}.attn.norm_k", "double_blocks.{i}.img_attn.norm.key_norm", norm=True),
    _rule("transformer_blocks.{i}.attn.norm_added_q", "double_blocks.{i}.txt_attn.norm.query_norm", norm=True),
    _rule("transformer_blocks.{i}.attn.norm_added_k", "double_blocks.{i}.txt_attn.norm.key_norm", norm=True),
    _rule("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj"),
    _rule("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj"),
    _rule("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.0"),
    _rule("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.2"),
    _rule("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.0"),
    _rule("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.2"),
    # single-stream blocks
    _rule("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.lin"),
    _rule("single_transformer_blocks.{i}.attn.to_q", "single_blocks.{i}.linear1", 0, LINEAR1),
    _rule("single_transformer_blocks.{i}.attn.to_k", "single_blocks.{i}.linear1", 1, LINEAR1),
    _rule("single_transformer_blocks.{i}.attn.to_v", "single_blocks.{i}.linear1", 2, LINEAR1),
    _rule("single_transformer_blocks.{i}.proj_mlp", "single_blocks.{i}.linear1", 3, LINEAR1),
    _rule("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2"),
    _rule("single_transformer_blocks.{i}.attn.norm_q", "single_blocks.{i}.norm.query_norm", norm=True),
    _rule("single_transformer_blocks.{i}.attn.norm_k", "single_blocks.{i}.norm.key_norm", norm=True),
)

SD3_RULES = (
    _rule("pos_embed", ""),  # the fixed sin-cos position table: a lone tensor `pos_embed`
    _rule("pos_embed.proj", "x_embedder.proj"),
    _rule("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    _rule("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    _rule("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
    _rule("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
    _rule("context_embedder", "context_embedder"),
    _rule("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True),
    _rule("proj_out", "final_layer.linear"),
    # joint blocks: the image stream `x_block`, the text stream `context_block`
    _rule("transformer_blocks.{i}.norm1.linear", "joint_blocks.{i}.x_block.adaLN_modulation.1"),
    _rule("transformer_blocks.{i}.norm1_context.linear", "joint_blocks.{i}.context_block.adaLN_modulation.1"),
    _rule("transformer_blocks.{i}.attn.to_q", "joint_blocks.{i}.x_block.attn.qkv", 0, QKV),
    _rule("transformer_blocks.{i}.attn.to_k", "joint_blocks.{i}.x_block.attn.qkv", 1, QKV),
    _rule("transformer_blocks.{i}.attn.to_v", "joint_blocks.{i}.x_block.attn.qkv", 2, QKV),
    _rule("transformer_blocks.{i}.attn.add_q_proj", "joint_blocks.{i}.context_block.attn.qkv", 0, QKV),
    _rule("transformer_blocks.{i}.attn.add_k_proj", "joint_blocks.{i}.context_block.attn.qkv", 1, QKV),
    _rule("transformer_blocks.{i}.attn.add_v_proj", "joint_blocks.{i}.context_block.attn.qkv", 2, QKV),
    _rule("transformer_blocks.{i}.attn.norm_q", "joint_blocks.{i}.x_block.attn.ln_q"),
    _rule("transformer_blocks.{i}.attn.norm_k", "joint_blocks.{i}.x_block.attn.ln_k"),
    _rule("transformer_blocks.{i}.attn.norm_added_q", "joint_blocks.{i}.context_block.attn.ln_q"),
    _rule("transformer_blocks.{i}.attn.norm_added_k", "joint_blocks.{i}.context_block.attn.ln_k"),
    _rule("transformer_blocks.{i}.attn.to_out.0", "joint_blocks.{i}.x_block.attn.proj"),
    _rule("transformer_blocks.{i}.attn.to_add_out", "joint_blocks.{i}.context_block.attn.proj"),
    # SD3.5 medium's second self-attention of the image stream (MMDiT-X)
    _rule("transformer_blocks.{i}.attn2.to_q", "joint_blocks.{i}.x_block.attn2.qkv", 0, QKV),
    _rule("transformer_blocks.{i}.attn2.to_k", "joint_blocks.{i}.x_block.attn2.qkv", 1, QKV),
    _rule("transformer_blocks.{i}.attn2.to_v", "joint_blocks.{i}.x_block.attn2.qkv", 2, QKV),
    _rule("transformer_blocks.{i}.attn2.norm_q", "joint_blocks.{i}.x_block.attn2.ln_q"),
    _rule("transformer_blocks.{i}.attn2.norm_k", "joint_blocks.{i}.x_block.attn2.ln_k"),
    _rule("transformer_blocks.{i}.attn2.to_out.0", "joint_blocks.{i}.x_block.attn2.proj"),
    _rule("transformer_blocks.{i}.ff.net.0.proj", "joint_blocks.{i}.x_block.mlp.fc1"),
    _rule("transformer_blocks.{i}.ff.net.2", "joint_blocks.{i}.x_block.mlp.fc2"),
    _rule("transformer_blocks.{i}.ff_context.net.0.proj", "joint_blocks.{i}.context_block.mlp.fc1"),
    _rule("transformer_blocks.{i}.ff_context.net.2", "joint_blocks.{i}.context_block.mlp.fc2"),
)

RULES = {"flux": FLUX_RULES, "sd3": SD3_RULES}
# How messages name each original layout.
LAYOUTS = {"flux": "Black Forest Labs' Flux.1 layout", "sd3": "Stability's SD3 (MMDiT) layout"}


def place_of(module: str, family: str) -> Place | None:
    """Where a diffusers module of `family`'s transformer ("flux" or "sd3") sits in the original layout; None when
    it has no place there."""
    for pattern, place in RULES[family]:
        if m := pattern.fullmatch(module):
            return Place(place.module.format(i=m.group(1)) if m.groups() else place.module, place.part,
                         place.widths, place.swap, place.norm)
    return None


def places(modules, family: str) -> dict[str, Place | None]:
    """Each module's place. SD3's last joint block attends to the text but does not update it ("context pre-only"):
    its context modulation is an AdaLayerNormContinuous, in (shift, scale) order in the original like the final
    layer's; the block is the one whose text stream has no output projection."""
    found = {m: place_of(m, family) for m in modules}
    if family == "sd3":
        blocks = {m.split(".")[1] for m in modules if m.startswith("transformer_blocks.")}
        pre_only = {b for b in blocks if f"transformer_blocks.{b}.attn.to_add_out" not in set(modules)}
        for b in pre_only:
            module = f"transformer_blocks.{b}.norm1_context.linear"
            if found.get(module) is not None:
                found[module] = Place(found[module].module, swap=True)
    return found


def swap_halves(tensor):
    """(a, b) -> (b, a) along the output dimension: diffusers' (scale, shift) and the original's (shift, scale)."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def original_tensors(state_dict: dict, family: str, what: str = "transformer") -> dict:
    """A diffusers transformer's state dict under its original names, fused layers concatenated in their order; a
    tensor with no place, or a fused layer missing a part, stops the export."""
    import torch

    by_module: dict[str, list[str]] = {}
    for key in state_dict:
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    where = places(by_module, family)
    unmapped = sorted(k for m, keys in by_module.items() if where[m] is None for k in keys)
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
        raise UserError(f"the {what} has tensors with no place in {LAYOUTS[family]}: {shown}. It is not a plain "
                        f"{'Flux.1' if family == 'flux' else 'SD3'} transformer; export it with --format diffusers.")
    parts: dict[str, dict[int, object]] = {}
    counts: dict[str, int] = {}
    for key, tensor in state_dict.items():
        module, _, name = key.rpartition(".")
        place = where[module]
        if place.swap:
            tensor = swap_halves(tensor)
        name = "scale" if place.norm and name == "weight" else name
        target = f"{place.module}.{name}" if place.module else name
        if place.part in parts.setdefault(target, {}):
            raise AssertionError(f"two {what} tensors map to {target}; the key map is wrong")
        parts[target][place.part] = tensor
        counts[target] = len(place.widths)
    out = {}
    for target, pieces in parts.items():
        if len(pieces) != counts[target]:
            raise UserError(f"the {what}'s fused layer {target} lacks {counts[target] - len(pieces)} of its "
                            f"{counts[target]} parts, so it has no place in {LAYOUTS[family]}; export it with "
                            "--format diffusers.")
        out[target] = torch.cat([pieces[i] for i in range(len(pieces))]) if len(pieces) > 1 else pieces[0]
    return out
