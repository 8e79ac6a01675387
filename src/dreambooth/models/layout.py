"""What a model is made of, read from its config files alone, for the checks that answer before any weights load:
the weight shape of every layer of its UNet and text encoders (built on the meta device, which allocates nothing), and
the original LDM/SGM name of each UNet module, which kohya files, A1111 and ComfyUI use and the single-file export
writes (`unet_rules`, derived from the model's own blocks: see docs/design.md, "The exports' key maps").

Torch, diffusers and transformers load when a function needs them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.models.families import folder_family, pipeline_family, sd_generation

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# A rule maps one diffusers module to its LDM name; `children` renames its direct sub-modules (None: same names).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


@dataclass
class Rule:
    diffusers: str
    ldm: str
    children: dict[str, str] | None = None


def _attentions(block) -> list:
    return list(getattr(block, "attentions", None) or [])


def check_mid_block(mid, what: str) -> None:
    """The original layout has one middle block shape: ResBlock, attention, ResBlock."""
    if mid is None or len(mid.resnets) != 2 or len(_attentions(mid)) != 1 or _attentions(mid)[0] is None:
        raise UserError(f"the {what} has no 'ResNet, attention, ResNet' middle block, so it has no place in the "
                        "original Stable Diffusion layout; export it with --format diffusers.")


def unet_rules(unet) -> list[Rule]:
    """The LDM name of every UNet module, walked in the order LDM numbers its input and output blocks.

    LDM's `input_blocks` are conv_in, then per level `layers` blocks of [ResBlock, (SpatialTransformer)] and,
    except where diffusers has no downsampler, one [Downsample]; `output_blocks` run over the levels in
    reverse, each block [ResBlock, (SpatialTransformer), (Upsample on a level's last block)].
    """
    rules = [Rule("conv_in", "input_blocks.0.0"), Rule("time_embedding.linear_1", "time_embed.0"),
             Rule("time_embedding.linear_2", "time_embed.2"), Rule("conv_norm_out", "out.0"),
             Rule("conv_out", "out.2")]
    if unet.config.get("addition_embed_type") == "text_time":
        # SDXL: the pooled text embedding and the 6 size/crop numbers pass through an MLP that SGM calls label_emb;
        # the sinusoidal projection of the numbers before it (add_time_proj) has no weights.
        rules += [Rule("add_embedding.linear_1", "label_emb.0.0"), Rule("add_embedding.linear_2", "label_emb.0.2")]
    k = 1
    for i, block in enumerate(unet.down_blocks):
        attentions = _attentions(block)
        for j in range(len(block.resnets)):
            rules.append(Rule(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", UNET_RESNET))
            if attentions:
                rules.append(Rule(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1"))
            k += 1
        if block.downsamplers is not None:
            rules.append(Rule(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op"))
            k += 1
    check_mid_block(unet.mid_block, "UNet")
    rules += [Rule("mid_block.resnets.0", "middle_block.0", UNET_RESNET),
              Rule("mid_block.attentions.0", "middle_block.1"),
              Rule("mid_block.resnets.1", "middle_block.2", UNET_RESNET)]
    k = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = _attentions(block)
        for j in range(len(block.resnets)):
            rules.append(Rule(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", UNET_RESNET))
            if attentions:
                rules.append(Rule(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1"))
            if j == len(block.resnets) - 1 and block.upsamplers is not None:
                slot = 2 if attentions else 1
                rules.append(Rule(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{slot}.conv"))
            k += 1
    return rules


def ldm_name(key: str, by_module: dict[str, Rule]) -> str | None:
    """The original name of a diffusers tensor (or of any name below a module, such as a LoRA layer's), by the rule
    of its deepest module; None where no rule covers it."""
    parts = key.split(".")
    rule = next((by_module[".".join(parts[:n])] for n in range(len(parts) - 1, 0, -1)
                 if ".".join(parts[:n]) in by_module), None)
    if rule is None:
        return None
    rest = key[len(rule.diffusers) + 1:]
    if rule.children is not None:
        child = next((c for c in rule.children if rest.startswith(c + ".")), None)
        if child is None:
            return None
        rest = rule.children[child] + rest[len(child):]
    return f"{rule.ldm}.{rest}"


@dataclass
class Layout:
    """What a LoRA must fit: per component ("unet", "text_encoder", "text_encoder_2"), each layer's weight shape by
    module name, and the UNet modules' original names."""

    name: str  # how messages name the model
    family: str | None  # a models.families.FAMILIES name
    shapes: dict[str, dict[str, tuple[int, ...]]]
    original_names: dict[str, str]  # UNet module -> its LDM/SGM name


def weight_shapes(module) -> dict[str, tuple[int, ...]]:
    """The weight shape of each linear, convolution and embedding layer, by module name; a layer that peft wrapped
    is named as the bare one (its adapters' own weights are left out), also where adapters of two kinds wrap it
    twice (a LoKr layer around a LoRA layer: `to_q.base_layer.base_layer`)."""
    shapes = {}
    for name, param in module.named_parameters():
        if name.endswith(".weight") and param.ndim in (2, 4) and "lora_" not in name:
            name = name.removesuffix(".weight")
            while name.endswith(".base_layer"):
                name = name.removesuffix(".base_layer")
            shapes[name] = tuple(param.shape)
    return shapes


def original_names(unet) -> dict[str, str]:
    """Each UNet module's LDM/SGM name (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`); {} for a
    UNet without the original layout's middle block."""
    try:
        by_module = {rule.diffusers: rule for rule in unet_rules(unet)}
    except UserError:
        return {}
    names = {}
    for module, _ in unet.named_modules():
        name = ldm_name(module + ".weight", by_module) if module else None
        if name is not None:
            names[module] = name.removesuffix(".weight")
    return names


def pipeline_layout(pipe, name: str) -> Layout:
    """The layout of a loaded pipeline (what its modules are now, adapters already loaded aside)."""
    parts = {"unet": pipe.unet, **{c: getattr(pipe, c) for c in TEXT_ENCODERS if getattr(pipe, c, None) is not None}}
    hidden_act = getattr(getattr(parts.get("text_encoder"), "config", None), "hidden_act", None)
    # an SDXL pipeline is SDXL whatever encoders it holds (a refiner has the second alone)
    family = pipeline_family(pipe)
    family = family.name if family else sd_generation({"hidden_act": hidden_act})
    return Layout(name, family, {c: weight_shapes(m) for c, m in parts.items()}, original_names(pipe.unet))


def config_layout(folder: Path, name: str) -> Layout:
    """The layout of a local diffusers folder, from its unet/ and text encoders' config.json alone: the modules are
    built on the meta device, so not a byte of weights is read or allocated."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    index = json.loads((folder / "model_index.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        parts = {"unet": unet}
        for component in TEXT_ENCODERS:
            entry = index.get(component)
            if not (isinstance(entry, list) and entry[-1] and (folder / component / "config.json").is_file()):
                continue
            cls = getattr(transformers, entry[-1], None) or transformers.CLIPTextModel
            parts[component] = cls(cls.config_class.from_pretrained(folder / component))
    family = folder_family(folder)
    shapes = {c: weight_shapes(m) for c, m in parts.items()}
    return Layout(name, family.name if family else None, shapes, original_names(unet))
