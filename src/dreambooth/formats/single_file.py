"""A diffusers SD 1.x, 2.x or SDXL folder as one `.safetensors` in the original layout (CompVis/LDM for SD 1.x and
2.x, Stability's SGM for SDXL), which AUTOMATIC1111 and ComfyUI load (the OpenCLIP text encoders included).

The key map is derived from the model's own blocks (`models.layout.unet_rules`, `vae_rules`), so it is right for any SD
1.x-shaped UNet (diffusers' own conversion script assumes SD's four levels and drops the up-block weights of other
shapes), and a tensor the map does not cover stops the export (docs/design.md, "The exports' key maps"). SDXL's
UNet has the same block layout plus the added embedding of the pooled text and size conditioning (`label_emb`);
its text encoders sit under `conditioner.embedders.0` (OpenAI CLIP, transformers' names) and `.1` (OpenCLIP).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.formats.atomic import check_new_file, save_safetensors_atomic
from dreambooth.formats.lora import (
    SDXL_TOKEN_KEYS,
    cast_half,
    embedding_file_for,
    embedding_rows,
    find_lora_file,
    read_safetensors,
)
from dreambooth.formats.lora_loading import text_sides
from dreambooth.formats.merge import fuse_loras, model_folder, source_pipeline
from dreambooth.models.families import folder_family
from dreambooth.models.layout import Rule, check_mid_block, ldm_name, unet_rules

VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}


VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_rules(vae) -> list[Rule]:
    """The LDM names of the VAE: `down.N.block.M`, `mid.block_1/attn_1/block_2`, and `up.N` numbered from the
    lowest resolution, which is the reverse of diffusers' decoder `up_blocks` order."""
    rules = [Rule(f"{part}.{name}", f"{part}.{ldm}") for part in ("encoder", "decoder")
             for name, ldm in (("conv_in", "conv_in"), ("conv_norm_out", "norm_out"), ("conv_out", "conv_out"))]
    rules += [Rule("quant_conv", "quant_conv"), Rule("post_quant_conv", "post_quant_conv")]
    for i, block in enumerate(vae.encoder.down_blocks):
        rules += [Rule(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
                  for j in range(len(block.resnets))]
        if block.downsamplers is not None:
            rules.append(Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
    levels = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = levels - 1 - i
        rules += [Rule(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", VAE_RESNET)
                  for j in range(len(block.resnets))]
        if block.upsamplers is not None:
            rules.append(Rule(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"))
    for part in ("encoder", "decoder"):
        check_mid_block(getattr(vae, part).mid_block, f"VAE {part}")
        rules += [Rule(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET),
                  Rule(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION),
                  Rule(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET)]
    return rules


def apply_rules(state_dict: dict, rules: list[Rule], ldm_prefix: str, what: str) -> dict:
    """Renames every tensor by the rule of its deepest module; a tensor no rule covers stops the export."""
    by_module = {r.diffusers: r for r in rules}
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        name = ldm_name(key, by_module)
        if name is None:
            unmapped.append(key)
            continue
        target = ldm_prefix + name
        if target in out:
            raise AssertionError(f"two {what} tensors map to {target}; the key map is wrong")
        out[target] = tensor
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
        raise UserError(f"the {what} has tensors with no place in the original Stable Diffusion layout: {shown}. "
                        "It is not a Stable Diffusion 1/2- or SDXL-shaped model (an upscaler, or an inpainting or "
                        "other variant with extra embeddings?); export it with --format diffusers instead.")
    return out


def _vae_attention_as_conv(tensors: dict) -> dict:
    """LDM's VAE attention q/k/v/proj_out are 1x1 convolutions: [C, C] linear weights become [C, C, 1, 1]."""
    names = tuple(f"mid.attn_1.{n}.weight" for n in ("q", "k", "v", "proj_out"))
    return {k: v[:, :, None, None] if k.endswith(names) and v.ndim == 2 else v for k, v in tensors.items()}


# The OpenCLIP text towers (SD 2.x's ViT-H, SDXL's second encoder bigG): transformers' CLIP names -> OpenCLIP's.
OPENCLIP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}


# Where each family's original checkpoint keeps its text encoder(s): SD 1.x's OpenAI CLIP or SD 2.x's OpenCLIP under
# `cond_stage_model`, SDXL's two under SGM's `conditioner.embedders.N`.
TEXT_PREFIXES = {"openai": "cond_stage_model.transformer.", "openclip": "cond_stage_model.model."}
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
SDXL_TEXT_FAMILIES = ("openai", "openclip")


def text_family(class_name: str, hidden_act: str) -> str:
    """`openai` (OpenAI CLIP, quick GELU: SD 1.x, SDXL's first encoder) or `openclip` (OpenCLIP, GELU: SD 2.x, SDXL's
    second encoder, which has a projection); anything else stops."""
    if class_name == "CLIPTextModel" and hidden_act == "quick_gelu":
        return "openai"
    if class_name in ("CLIPTextModel", "CLIPTextModelWithProjection") and hidden_act == "gelu":
        return "openclip"
    raise UserError(f"the text encoder is {class_name} with {hidden_act} activations, neither OpenAI's CLIP (SD 1.x, "
                    "SDXL's first encoder) nor OpenCLIP (SD 2.x, SDXL's second), so it has no place in the original "
                    "layout. Export with --format diffusers.")


def openclip_tensors(state_dict: dict, prefix: str = TEXT_PREFIXES["openclip"]) -> dict:
    """An OpenCLIP text tower's original names under `prefix`: q/k/v joined into one `in_proj` per layer, and the
    projection (SDXL's second encoder; its pooled output conditions the UNet) as OpenCLIP's `text_projection`
    matrix, which multiplies from the right: the transpose of transformers' Linear weight.

    A diffusers SD 2.x folder holds 23 of OpenCLIP ViT-H's 24 layers and no text projection (SD 2.x conditions on
    the penultimate layer, so diffusers drops the rest); the file has what the folder has, which stock
    `from_single_file` and A1111's penultimate-layer encoder read. OpenCLIP's `logit_scale` belongs to the
    image-text training objective, not to the text tower, and no folder has it.
    """
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out, layers = {}, sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for key, name in OPENCLIP_NAMES.items():
        out[f"{prefix}{name}"] = state.pop(key)
    projection = state.pop("text_projection.weight", None)
    if projection is not None:
        out[f"{prefix}text_projection"] = projection.T.contiguous()
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state.pop(f"{src}self_attn.{p}_proj.{kind}")
                                                         for p in ("q", "k", "v")])
            for name, ldm in OPENCLIP_LAYER.items():
                out[f"{dst}{ldm}.{kind}"] = state.pop(f"{src}{name}.{kind}")
    state.pop("embeddings.position_ids", None)  # a buffer of older transformers, not a weight
    if state:
        raise UserError(f"the text encoder has tensors with no place in OpenCLIP's original layout: "
                        f"{', '.join(sorted(state)[:5])}. Export it with --format diffusers.")
    return out


def text_encoder_tensors(text_encoder, prefix: str | None = None, family: str | None = None) -> dict:
    """One text encoder under its original names: OpenAI's CLIP keeps transformers' names below `text_model.`,
    OpenCLIP its own (`openclip_tensors`). `prefix` and `family` default to SD 1.x/2.x's; SDXL passes its own, and
    an encoder of the other family than asked stops the export."""
    found = text_family(type(text_encoder).__name__, text_encoder.config.hidden_act)
    if family is not None and found != family:
        raise UserError(f"an SDXL model's text encoders are OpenAI's CLIP, then OpenCLIP; this one is {found} where "
                        f"{family} belongs, so it has no place in SDXL's original layout. Export with --format "
                        "diffusers.")
    prefix = prefix or TEXT_PREFIXES[found]
    if found == "openclip":
        tensors = openclip_tensors(text_encoder.state_dict(), prefix)
    else:
        # transformers >= 5.6 dropped CLIPTextModel's `text_model.` level; older versions still have it.
        tensors = {f"{prefix}text_model.{k.removeprefix('text_model.')}": v
                   for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    text_in = sum(p.numel() for k, p in text_encoder.state_dict().items() if not k.endswith("position_ids"))
    if sum(v.numel() for v in tensors.values()) != text_in:
        raise AssertionError("the text encoder's key map lost some weights")
    return tensors


def checkpoint_tensors(unet, vae, text_encoder, text_encoder_2=None) -> dict:
    """Every weight of the models under its original name; with `text_encoder_2`, SDXL's layout."""
    tensors = apply_rules(unet.state_dict(), unet_rules(unet), "model.diffusion_model.", "UNet")
    tensors.update(_vae_attention_as_conv(apply_rules(vae.state_dict(), vae_rules(vae), "first_stage_model.", "VAE")))
    if text_encoder_2 is None:
        tensors.update(text_encoder_tensors(text_encoder))
        return tensors
    for encoder, prefix, family in zip((text_encoder, text_encoder_2), SDXL_TEXT_PREFIXES, SDXL_TEXT_FAMILIES):
        tensors.update(text_encoder_tensors(encoder, prefix, family))
    return tensors


def split_new_tokens(pipe) -> dict:
    """Takes identifier tokens added in training out of the text encoders, so that what is left has CLIP's own
    vocabulary: the original single-file layout has no tokenizer, and a loader builds each text encoder from the
    base model's config, whose embedding has exactly that many rows. Returns {token: vector}, or for SDXL
    {token: {"clip_l": vector, "clip_g": vector}}."""
    split = [_split_encoder(tokenizer, encoder) for _, tokenizer, encoder in text_sides(pipe)]
    if len(split) == 1:
        return split[0]
    if list(split[0]) != list(split[1]):
        raise UserError(f"the model's two tokenizers have different new tokens ({list(split[0])} and "
                        f"{list(split[1])}), so no SDXL embedding file can carry them; export with --format diffusers.")
    return {token: {key: part[token] for key, part in zip(SDXL_TOKEN_KEYS, split)} for token in split[0]}


def _split_encoder(tokenizer, text_encoder) -> dict:
    import torch

    base_size = tokenizer.vocab_size
    weight = text_encoder.get_input_embeddings().weight
    if weight.shape[0] <= base_size:
        return {}
    vectors = {tokenizer.convert_ids_to_tokens(i): weight[i].detach().float().clone()
               for i in range(base_size, weight.shape[0])}
    kept = torch.nn.Embedding(base_size, weight.shape[1])
    kept.weight.data = weight[:base_size].detach().clone()
    text_encoder.set_input_embeddings(kept)
    text_encoder.config.vocab_size = base_size
    return vectors


def prediction_type(model_dir: Path) -> str:
    config = model_dir / "scheduler" / "scheduler_config.json"
    return json.loads(config.read_text()).get("prediction_type", "epsilon") if config.is_file() else "epsilon"


def _single_file_metadata(src: Path, loras) -> dict[str, str]:
    """What made the file; the prediction type matters most, as the original layout has no place for it."""
    metadata = {"dreambooth.source": str(src), "dreambooth.prediction_type": prediction_type(model_folder(src))}
    if loras:
        metadata["dreambooth.merged_loras"] = json.dumps([[str(p), w] for p, w in loras])
    return metadata


def _encoder_family(config_file: Path) -> str | None:
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    return text_family((config.get("architectures") or ["CLIPTextModel"])[0], config.get("hidden_act", "quick_gelu"))


def _check_text_encoder(model_dir: Path) -> None:
    """Text encoders with no place in the original layout stop the export before any weights load (config.json):
    SD 1.x's OpenAI CLIP or SD 2.x's OpenCLIP alone, or SDXL's pair in that order."""
    first = _encoder_family(model_dir / "text_encoder" / "config.json")
    if getattr(folder_family(model_dir), "name", None) != "sdxl":
        return
    second = _encoder_family(model_dir / "text_encoder_2" / "config.json")
    if (first, second) != SDXL_TEXT_FAMILIES:
        raise UserError(f"{model_dir} is SDXL-shaped but its text encoders are {first or 'missing'} and "
                        f"{second or 'missing'}, not OpenAI's CLIP and OpenCLIP (an SDXL refiner has only the "
                        "second); the single-file export writes SDXL base models. Export it with --format diffusers.")


def to_single_file(src: Path, out: Path, *, half: bool = False, loras: Sequence[tuple[Path, float]] = ()) -> Path:
    """Writes a diffusers SD 1.x, 2.x or SDXL folder or a training checkpoint (with `loras` fused in, if any) as one
    original-layout `.safetensors`; new identifier tokens go into embedding files beside it."""
    src, out = Path(src), Path(out)
    check_new_file(out)
    _check_text_encoder(model_folder(src))
    loras = [(find_lora_file(p), w) for p, w in loras]
    pipe, own = source_pipeline(src)
    loras = own + loras
    fuse_loras(pipe, loras, src)
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    vectors = split_new_tokens(pipe)
    files = {token: embedding_file_for(out, token) for token in vectors}
    for file in files.values():
        check_new_file(file)
    tensors = checkpoint_tensors(pipe.unet, pipe.vae, pipe.text_encoder, text_encoder_2)
    metadata = _single_file_metadata(src, loras)
    if vectors:
        metadata["dreambooth.new_tokens"] = json.dumps(list(vectors))
        metadata["dreambooth.embedding_files"] = json.dumps({t: f.name for t, f in files.items()})
    written = save_safetensors_atomic(cast_half(tensors, half), out, metadata)
    for token, vector in vectors.items():
        save_safetensors_atomic(embedding_rows(vector), files[token],
                                {"dreambooth.token": token, "dreambooth.model": out.name})
    return written


def embedding_note(out: Path, files: dict[str, str]) -> str:
    """How to use the embedding files of new tokens written beside an export."""
    lines = [f"note: new token(s) {', '.join(files)} are not in CLIP's fixed vocabulary; each one's trained embedding "
             "is a textual-inversion file beside the export:"]
    for token, name in files.items():
        stem = name.removesuffix(".safetensors")
        diffusers = f"pipe.load_textual_inversion('{name}', token='{token}')"
        if set(read_safetensors(out.parent / name)[0]) == set(SDXL_TOKEN_KEYS):
            diffusers = (f"t = safetensors.torch.load_file('{name}'); pipe.load_textual_inversion(t['clip_l'], "
                         f"token='{token}', text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer) and the same "
                         "with t['clip_g'], pipe.text_encoder_2, pipe.tokenizer_2")
        lines.append(f"  {token}: {out.parent / name}  (A1111/Forge: put it in embeddings/ and write {stem} where "
                     f"the prompt has {token}; ComfyUI: embedding:{stem}; diffusers: {diffusers})")
    return "\n".join(lines)
