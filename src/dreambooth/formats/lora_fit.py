"""Whether a LoRA fits a model, from the LoRA file's header and the model's layout alone: the layers it adapts and
their shapes, the family it was made for, and which of its layers the model lacks or has in another shape.

Every command that applies a LoRA asks this before any weights load (`check_lora_fits`, from the model's config
files), and the LoRA loader asks it again of the loaded pipeline before diffusers loads anything
(`formats.lora_loading`), so a LoRA made for another model gets one paragraph instead of peft's and diffusers' pages
of warnings and size mismatches (which, besides, counted only the layers whose names happened to exist).

It reads every spelling the loader reads: diffusers' and peft's (`unet.`, `text_encoder.`, `text_encoder_2.`, with
lora_A/lora_B or the older lora.down/lora_linear_layer names, through diffusers' own converters) and kohya/A1111's
(`lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`; the UNet by diffusers' module names or by the original LDM/SGM
ones). Torch and diffusers load when a function needs them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.formats.lora import COMPONENTS, is_kohya, lora_state_for_peft
from dreambooth.formats.lycoris import lycoris_kind, lycoris_shapes
from dreambooth.models.base import config_folder, safetensors_header
from dreambooth.models.families import FAMILIES as FAMILIES_BY_NAME
from dreambooth.models.families import TITLES as FAMILIES
from dreambooth.models.families import Family, folder_family
from dreambooth.models.layout import Layout, config_layout

# kohya's prefixes and the pipeline component each adapts (`lora_te_` is SD 1.x/2.x's encoder and SDXL's first).
KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
               "lora_te2_": "text_encoder_2"}
KOHYA_SIDES = {"lora_down.weight": "down", "lora_up.weight": "up"}
PART_NAMES = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}
# The width of the text embedding a UNet's cross-attention reads, by family (CLIP ViT-L, OpenCLIP ViT-H, both of
# SDXL's concatenated): what a LoRA's attn2.to_k/to_v layers take in.
CROSS_ATTENTION_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass
class AdaptedLayers:
    """A LoRA file's adapted layers, read from its header: (component, module as the file names it) -> the shapes of
    its down (lora_A) and up (lora_B) weights."""

    path: Path
    layers: dict[tuple[str, str], dict[str, tuple[int, ...]]]
    metadata: dict[str, str]


@dataclass
class Fit:
    """How a LoRA's layers meet a model's: each adapted layer counted once, whatever number of tensors it has."""

    adapted: int
    missing: list[tuple[str, str]]  # (component, module): no layer of that name in the model
    reshaped: list[tuple[str, str, dict, tuple]]  # (component, model's module, LoRA's shapes, model's weight shape)


def read_adapted_layers(file: Path) -> AdaptedLayers:
    """The layers a LoRA file adapts and their shapes, from its header (no tensor is read)."""
    read = safetensors_header(Path(file))
    if read is None:
        raise UserError(f"LoRA {file} is not a readable safetensors file (its header does not read); it may be "
                        "truncated or not a LoRA at all.")
    shapes, metadata = read
    layers: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    if lycoris_kind(shapes):
        for layer, sides in lycoris_shapes(shapes).items():
            prefix = next((p for p in KOHYA_PARTS if layer.startswith(p)), None)
            if prefix:
                layers[(KOHYA_PARTS[prefix], layer[len(prefix):])] = sides
        return AdaptedLayers(Path(file), layers, metadata)
    if is_kohya(shapes):
        for key, shape in shapes.items():
            prefix = next((p for p in KOHYA_PARTS if key.startswith(p)), None)
            module, _, rest = key.partition(".")
            if prefix and rest in KOHYA_SIDES:
                layers.setdefault((KOHYA_PARTS[prefix], module[len(prefix):]), {})[KOHYA_SIDES[rest]] = shape
        return AdaptedLayers(Path(file), layers, metadata)
    for component in COMPONENTS:
        for key, shape in lora_state_for_peft(component, shapes).items():  # renames keys only; shapes pass through
            if m := re.fullmatch(r"(.+)\.lora_([AB])\.weight", key):
                layers.setdefault((component, m.group(1)), {})["down" if m.group(2) == "A" else "up"] = shape
    return AdaptedLayers(Path(file), layers, metadata)


def flat_name(component: str, module: str) -> str:
    """A layer's name as kohya spells it (dots as underscores), without the text model's root that transformers 5.6
    dropped: the one spelling in which every LoRA format and the model's own names compare."""
    name = module.replace(".", "_")
    return name if component == "unet" else name.removeprefix("text_model_")


def _fits(sides: dict[str, tuple[int, ...]], weight: tuple[int, ...]) -> bool:
    """A layer with weight [out, in, *kernel] takes a down weight [rank, in, *kernel] and an up weight [out, rank, ...]
    of as many dimensions (peft's and kohya's LoRA of a linear or convolution layer); a LoKr or LoHa layer an update
    [out, in x kernel] (`formats.lycoris.lycoris_shapes`)."""
    if "update" in sides:
        out, flat = sides["update"]
        return weight[0] == out and math.prod(weight[1:]) == flat
    down, up = sides.get("down"), sides.get("up")
    if down is not None and (len(down) != len(weight) or down[1:] != weight[1:]):
        return False
    return up is None or (len(up) == len(weight) and up[:1] == weight[:1])


def module_index(layout: Layout) -> dict[str, dict[str, str]]:
    """Each component's modules by their flat name (`flat_name`), a UNet module under its diffusers and its original
    name: how a layer named in any LoRA format finds the model's module."""
    index = {component: {flat_name(component, m): m for m in shapes} for component, shapes in layout.shapes.items()}
    for module, original in layout.original_names.items():
        if module in layout.shapes.get("unet", {}):
            index["unet"].setdefault(flat_name("unet", original), module)
    return index


def compare(lora: AdaptedLayers, layout: Layout) -> Fit:
    """Each adapted layer against the model's layer of the same name (a UNet layer by its diffusers or its original
    name): missing, or of another shape."""
    index = module_index(layout)
    missing, reshaped = [], []
    for (component, module), sides in sorted(lora.layers.items()):
        found = index.get(component, {}).get(flat_name(component, module))
        if found is None:
            missing.append((component, module))
        elif not _fits(sides, layout.shapes[component][found]):
            reshaped.append((component, found, sides, layout.shapes[component][found]))
    return Fit(len(lora.layers), missing, reshaped)


def _recorded_family(metadata: dict[str, str]) -> tuple[str | None, str]:
    """The family a LoRA's metadata gives: ours (the base model's family, or the base model itself when it is on
    this machine), or kohya's sd-scripts' (`ss_base_model_version`, `ss_v2`, `modelspec.architecture`)."""
    base = metadata.get("dreambooth.base_model")
    if metadata.get("dreambooth.base_family") in FAMILIES:
        return metadata["dreambooth.base_family"], f"trained on {base}" if base else "its metadata says so"
    try:
        folder = config_folder(base) if base else None
    except UserError:  # a checkpoint whose own base is gone: nothing to read
        folder = None
    if folder is not None and (family := folder_family(folder)):
        return family.name, f"trained on {base}"
    kohya = f"{metadata.get('ss_base_model_version', '')} {metadata.get('modelspec.architecture', '')}".lower()
    said = "its ss_base_model_version/modelspec.architecture metadata"
    if "xl" in kohya:
        return "sdxl", said
    if "v2" in kohya or metadata.get("ss_v2") == "True":
        return "sd2", said
    if "v1" in kohya:
        return "sd1", said
    return None, ""


def lora_family(lora: AdaptedLayers) -> tuple[str | None, str]:
    """The family a LoRA was made for ('sd1', 'sd2', 'sdxl' or None) and what tells it: its metadata, the layers only
    SDXL has, or the width of the text its cross-attention reads."""
    family, why = _recorded_family(lora.metadata)
    if family:
        return family, why
    unet = [flat_name("unet", m) for c, m in lora.layers if c == "unet"]
    if any(c == "text_encoder_2" for c, _ in lora.layers):
        return "sdxl", "it adapts a second text encoder, which only SDXL has"
    if any(n.startswith(("up_blocks_0_attentions_", "output_blocks_0_1_")) for n in unet):
        return "sdxl", "it adapts attention in the UNet's first up block, which only SDXL's has"
    if any(re.search(r"transformer_blocks_[1-9]", n) for n in unet):
        return "sdxl", "its UNet has several transformer blocks per attention, as only SDXL's has"
    widths = {sides["down"][1] for (c, m), sides in lora.layers.items()
              if c == "unet" and re.search(r"attn2_to_[kv]$", flat_name(c, m)) and len(sides.get("down", ())) > 1}
    if len(widths) == 1 and (family := CROSS_ATTENTION_WIDTHS.get(width := widths.pop())):
        return family, f"its cross-attention reads {width}-wide text embeddings, {FAMILIES[family]}'s"
    return None, ""


def _in_out(shape: tuple[int, ...], kernel: tuple[int, ...] = ()) -> str:
    return f"{shape[0]}->{shape[1]}" + (f" {'x'.join(map(str, kernel))}" if kernel else "")


def _how_many(fit: Fit, layout: Layout) -> str:
    """The count of layers that do not fit, by why, with an example of a shape that differs."""
    name, parts = layout.name, []
    if fit.missing:
        absent = {c for c, _ in fit.missing if c not in layout.shapes}
        where = "".join(f", {sum(c == a for c, _ in fit.missing)} of them in a {PART_NAMES[a]}, which {name} does not "
                        "have" for a in sorted(absent))
        parts.append(f"{len(fit.missing)} adapt a layer {name} does not have{where}")
    if fit.reshaped:
        component, module, sides, weight = fit.reshaped[0]
        down, up = sides.get("down"), sides.get("up")
        theirs = sides["update"][::-1] if "update" in sides else (down[1] if down else "?", up[0] if up else "?")
        parts.append(f"{len(fit.reshaped)} have another shape (e.g. the {PART_NAMES[component]}'s {module}: "
                     f"{_in_out(theirs)} in the LoRA, {_in_out((weight[1], weight[0]), weight[2:])} in {name}, as "
                     "inputs->outputs)")
    return (f"{len(fit.missing) + len(fit.reshaped)} of its {fit.adapted} adapted layers do not fit ("
            f"{'; '.join(parts)}; each adapted layer counted once, however many tensors it has)")


def fit_error(lora: AdaptedLayers, layout: Layout, flag: str = "--model") -> UserError | None:
    """The refusal of a LoRA that does not fit a model, naming both families, the count, and what to pass as `flag`;
    None when it fits (a LoRA of the model's family trained on another model of its shape fits)."""
    fit = compare(lora, layout)
    family, why = lora_family(lora)
    other_family = family is not None and layout.family is not None and family != layout.family
    if not fit.adapted or (not fit.missing and not fit.reshaped and not other_family):
        return None
    unknown = "a LoRA whose family neither its metadata nor its layers show"
    what = f"an {FAMILIES[family]} LoRA ({why})" if family else unknown
    model = f"{layout.name}, an {FAMILIES[layout.family]} model" if layout.family else layout.name
    if fit.missing or fit.reshaped:
        count = _how_many(fit, layout)
    else:
        count = (f"its {fit.adapted} adapted layers have {layout.name}'s shapes, but they were trained with "
                 f"{FAMILIES[family]}'s text encoder and UNet, whose features mean other things than "
                 f"{FAMILIES[layout.family]}'s")
    base = lora.metadata.get("dreambooth.base_model")
    if base:
        advice = f"Apply it to the model it was trained on, or a fine-tune of it ({flag} {base})"
    elif family:
        advice = f"Apply it to an {FAMILIES[family]} model of its shape"
    else:
        advice = "Apply it to the model it was made for"
    if layout.family and layout.family != family:
        advice += f"; for {layout.name}, use a LoRA trained on an {FAMILIES[layout.family]} model"
    return UserError(f"LoRA {lora.path} is {what} and cannot be applied to {model}: {count}. {advice}.")


def check_lora_fits(file: Path, model: Path | str, flag: str = "--model") -> None:
    """Refuses, before any weights load, a LoRA that does not fit `model` (a folder, a training checkpoint or a hub
    id in the hub cache), read from the model's config files; a model not on this machine is left to the loader's
    own check of the loaded pipeline."""
    folder = config_folder(model)
    if folder is None:
        return
    model_family = folder_family(folder)
    header = safetensors_header(file)
    keys = list(header[0]) if header else []
    theirs = transformer_lora_family(keys, header[1] if header else {})
    if theirs is not None or (model_family is not None and model_family.denoiser != "unet"):
        family_error(file, theirs, model_family, str(model), flag)
        return
    error = fit_error(read_adapted_layers(file), config_layout(folder, str(model)), flag)
    if error is not None:
        raise error


def transformer_lora_family(keys: list[str], metadata: dict[str, str]) -> Family | None:
    """The flow family (Flux, SD3) a LoRA was made for, from this tool's metadata, or from its keys: diffusers writes
    a transformer's adapters under `transformer.`, and only Flux's has single-stream blocks; None for a UNet LoRA."""
    recorded = FAMILIES_BY_NAME.get(metadata.get("dreambooth.base_family", ""))
    if recorded is not None:
        return recorded if recorded.denoiser != "unet" else None
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys):
        return FAMILIES_BY_NAME["flux"]  # kohya's and ComfyUI's Flux layout (BFL's module names)
    if not any(k.startswith("transformer.") for k in keys):
        return None
    if any(".single_transformer_blocks." in k for k in keys):
        return FAMILIES_BY_NAME["flux"]
    return FAMILIES_BY_NAME["sd3"] if any(k.startswith("text_encoder_2.") for k in keys) else None


def family_error(file: Path, theirs: Family | None, model: Family | None, name: str, flag: str) -> None:
    """Refuses a LoRA of one family on a model of another where a transformer family is involved (their layers
    share no names with a UNet's, so the loader would fail after loading the weights, or skip them all)."""
    unet_lora = theirs is None
    if model is None or (theirs is not None and theirs.name == model.name):
        return
    if unet_lora and model.denoiser == "unet":
        return
    what = "a UNet LoRA (SD 1.x/2.x or SDXL)" if unet_lora else f"{article(theirs.title)} {theirs.title} LoRA"
    own = "an SD 1.x/2.x or SDXL model" if unet_lora else f"{article(theirs.title)} {theirs.title} model"
    raise UserError(f"LoRA {file} is {what} and cannot be applied to {name}, {article(model.title)} {model.title} "
                    f"model: their layers have nothing in common. Apply it with {own} as {flag}, or use a LoRA "
                    f"trained on {article(model.title)} {model.title} model with {name}.")


def article(title: str) -> str:
    """'a' or 'an' before a family's name as it is read out ("an SD 1.x", "a Flux.1")."""
    return "an" if title[0] in "AEIOSX" else "a"
