"""`dreambooth export`: a LoRA in the kohya/A1111 format, a model as one original-layout file, LoRAs merged in.

Three writers, each reading safetensors only and writing atomically:

- `lora_to_kohya`: a diffusers/peft LoRA file -> `lora_unet_*` / `lora_te_*` keys with the `alpha` that keeps
  every layer's scale.
- `to_single_file`: a diffusers folder -> one `.safetensors` in the original Stable Diffusion (CompVis/LDM)
  key layout that AUTOMATIC1111 and ComfyUI load. The key map is derived from the model's own blocks, so it is
  right for any SD 1.x-family shape, and a tensor the map does not cover stops the export.
- `merge_lora`: a diffusers folder with LoRAs fused at given weights, saved as a plain diffusers folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.formats.atomic import publish

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FORMATS = ("kohya", "single-file", "diffusers")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
# diffusers' key under which `save_lora_weights(..., *_lora_adapter_metadata=...)` stores the peft LoraConfig
# fields, as JSON with keys prefixed by component ("unet.r", "text_encoder.lora_alpha", ...).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}

# --- Small file helpers -----------------------------------------------------------------------------------------


def human_size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GB"


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _refuse_pickle(path: Path, what: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{what} {path} is a pickle file ({path.suffix}); this tool reads safetensors only, "
                        "because loading a pickle can run arbitrary code. Convert it where you trust it, e.g. "
                        "`safetensors.torch.save_file(torch.load(FILE, weights_only=True), 'out.safetensors')`, "
                        "and pass the .safetensors file.")


def _check_file_out(out: Path) -> None:
    """A file output must be a new `.safetensors` path: nothing is overwritten."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'model.safetensors'}.")
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors (this format is one safetensors file).")
    if out.exists():
        raise UserError(f"--out {out} already exists; delete it or choose another name.")


def _check_folder_out(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder; delete it or choose another "
                        "folder (export never overwrites a model).")


def save_safetensors_atomic(tensors: dict, out: Path, metadata: dict[str, str] | None = None) -> Path:
    """Writes a temporary file beside `out`, then renames it, so `out` is either absent or complete."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt", **(metadata or {})})
        publish(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _cast(tensors: dict, half: bool) -> dict:
    import torch

    if not half:
        return tensors
    return {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}


# --- Reading a LoRA ---------------------------------------------------------------------------------------------


@dataclass
class LoraFile:
    """A diffusers/peft LoRA, normalised: per component, module path -> (lora_A = down, lora_B = up)."""

    path: Path
    layers: dict[str, dict[str, tuple]]  # component -> module -> (down, up)
    adapter_config: dict[str, dict]  # component -> peft LoraConfig fields, when the file recorded them
    metadata: dict[str, str] = field(default_factory=dict)  # the file's other safetensors metadata


def find_lora_file(src: Path) -> Path:
    """`src` itself, or the `pytorch_lora_weights.safetensors` inside a folder."""
    src = Path(src)
    _refuse_pickle(src, "LoRA")
    if src.is_dir():
        if (src / LORA_WEIGHT_NAME).is_file():
            return src / LORA_WEIGHT_NAME
        pickles = [p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f" It holds {', '.join(pickles)}: pickle files are not read, only safetensors." if pickles else ""
        raise UserError(f"LoRA folder {src} has no {LORA_WEIGHT_NAME}.{hint} Pass the LoRA .safetensors file "
                        "itself, or the folder that diffusers' save_lora_weights wrote.")
    if not src.is_file():
        raise UserError(f"LoRA {src} does not exist.")
    if src.suffix != ".safetensors":
        raise UserError(f"LoRA {src} is not a .safetensors file; pass a LoRA saved as safetensors.")
    return src


def new_tokens(lora_file: Path) -> list[str]:
    """The identifier tokens a LoRA was trained with that the base tokenizer lacks (our training records them);
    their embeddings live in `token_embeddings.safetensors` beside the LoRA, not in it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(lora_file), framework="pt", device="cpu") as f:
            return list(json.loads((f.metadata() or {}).get("dreambooth.new_tokens", "[]")))
    except (SafetensorError, OSError, json.JSONDecodeError):
        return []


def _header_metadata(path: Path) -> dict[str, str]:
    from dreambooth.models.base import safetensors_metadata

    read = safetensors_metadata(path)
    return read[1] if read else {}


def _is_kohya(keys) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def _read_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt.") from None
    metadata.pop("format", None)
    return tensors, metadata


def _to_peft_names(component: str, tensors: dict) -> dict:
    """diffusers' older on-disk spellings (`lora.down`, `lora_linear_layer.down`, `processor.to_q_lora`) -> peft's.

    diffusers' own training scripts still save through `convert_state_dict_to_diffusers`, so their files use the
    old spellings; diffusers ships the inverse mapping, which we use rather than restate it.
    """
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if all(".lora_A." in k or ".lora_B." in k for k in tensors):
        return tensors
    if component == "unet":
        return convert_unet_state_dict_to_peft(tensors)
    try:
        return convert_state_dict_to_peft(tensors)
    except ValueError:
        return tensors  # unknown spelling: reported key by key by the caller


def lora_state_for_peft(component: str, tensors: dict) -> dict:
    """One component's tensors of a diffusers-format LoRA file ("unet." or "text_encoder." keys), under peft's
    names (`...to_q.lora_A.weight`)."""
    prefix = component + "."
    return _to_peft_names(component, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def read_lora(src: Path) -> LoraFile:
    """Reads a diffusers/peft LoRA file (or folder) into per-component (down, up) pairs; refuses anything else."""
    path = find_lora_file(src)
    tensors, metadata = _read_safetensors(path)
    if not tensors:
        raise UserError(f"LoRA {path} holds no tensors.")
    if _is_kohya(tensors):
        raise UserError(f"LoRA {path} is already in the kohya format (keys like {next(iter(tensors))}); "
                        "A1111, ComfyUI and diffusers' load_lora_weights read it as it is.")
    try:
        raw_config = json.loads(metadata.pop(ADAPTER_METADATA_KEY, "null") or "null") or {}
    except json.JSONDecodeError as e:
        raise UserError(f"LoRA {path}: its '{ADAPTER_METADATA_KEY}' header is not valid JSON ({e}), so its alpha "
                        "is unknown. Re-save the LoRA with diffusers' save_lora_weights.") from None
    layers, unknown = {}, []
    for component in COMPONENTS:
        prefix = component + "."
        part = lora_state_for_peft(component, tensors)
        pairs: dict[str, dict] = {}
        for key, value in part.items():
            m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
            if m is None:
                unknown.append(prefix + key)
                continue
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        layers[component] = {}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                unknown.append(f"{prefix}{module} (only lora_{''.join(ab)})")
            else:
                layers[component][module] = (ab["A"], ab["B"])
    unknown += [k for k in tensors if not k.startswith(tuple(c + "." for c in COMPONENTS))]
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UserError(f"LoRA {path} has keys this export cannot convert: {shown}. It reads Stable Diffusion 1/2 "
                        "LoRAs saved by diffusers or peft (unet.* and text_encoder.* with lora_A/lora_B or "
                        "lora.down/lora.up weights); DoRA, LoRA biases, SDXL's text_encoder_2 and other "
                        "adapter types are not converted.")
    configs = {c: {k[len(c) + 1:]: v for k, v in raw_config.items() if k.startswith(c + ".")} for c in COMPONENTS}
    for component, cfg in configs.items():
        if cfg.get("use_dora") or cfg.get("lora_bias"):
            what = "DoRA" if cfg.get("use_dora") else "LoRA biases (lora_bias)"
            raise UserError(f"LoRA {path}: its {component} adapter uses {what}, which the kohya/A1111 LoRA "
                            "format cannot express. Export it with --format diffusers, or merge it into a model.")
    return LoraFile(path=path, layers=layers, adapter_config={c: v for c, v in configs.items() if v},
                    metadata=metadata)


# --- LoRA -> kohya ----------------------------------------------------------------------------------------------


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
    _check_file_out(out)
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
    tensors = _cast(tensors, half)
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
        _check_file_out(file)
    # A1111 and Forge read embeddings bundled in a LoRA as `bundle_emb.<name>.<key>`, and match <name> in the prompt
    # token by token, so the token itself is the name. ComfyUI does not read bundles: it gets each as an embedding
    # file of its own beside the LoRA (`emb_params`, the key kohya's textual-inversion files use).
    for token, vector in vectors.items():
        tensors[f"bundle_emb.{token}.emb_params"] = _cast({"v": vector.reshape(1, -1)}, half)["v"]
    if vectors:
        metadata["dreambooth.embedding_files"] = json.dumps({t: f.name for t, f in embedding_files.items()})
    written = save_safetensors_atomic(tensors, out, metadata)
    for token, vector in vectors.items():
        save_safetensors_atomic({"emb_params": vector.reshape(1, -1).float()}, embedding_files[token],
                                {"dreambooth.token": token, "dreambooth.formats.lora": out.name})
    return written


def lora_token_vectors(lora_file: Path) -> dict:
    """The new-token embeddings a LoRA was trained with ({token: vector}), from its token file; a UserError if the
    LoRA records new tokens and the file is missing."""
    from dreambooth.formats.lora import token_file_for

    tokens = new_tokens(lora_file)
    if not tokens:
        return {}
    file = token_file_for(lora_file)
    if not file.is_file():
        raise UserError(f"LoRA {lora_file} was trained with new token(s) {', '.join(tokens)} whose embeddings live in "
                        f"{file.name} beside it, which is missing; put it back beside the LoRA.")
    return _read_safetensors(file)[0]


def embedding_file_for(out: Path, token: str) -> Path:
    """`mydog.safetensors` + `<saya_token>` -> `mydog.saya_token.safetensors`: a textual-inversion file per new token,
    named after the export so that several share a folder (the name is what ComfyUI's `embedding:` refers to)."""
    clean = re.sub(r"[^\w.-]+", "_", token).strip("_.") or "token"
    return out.with_name(f"{out.name.removesuffix('.safetensors')}.{clean}.safetensors")


def copy_lora(src: Path, out: Path, *, half: bool = False) -> Path:
    """The diffusers-format LoRA as it is (optionally fp16), to a file or to `out/pytorch_lora_weights.safetensors`,
    with its new tokens' embeddings beside it under the name `lora.token_file_for` gives."""
    from dreambooth.formats.lora import token_file_for

    path = find_lora_file(src)
    out = Path(out)
    if out.suffix != ".safetensors":
        _check_folder_out(out)
        out = out / LORA_WEIGHT_NAME
    else:
        _check_file_out(out)
    vectors = lora_token_vectors(path)
    token_out = token_file_for(out)
    if vectors:
        _check_file_out(token_out)
    tensors, metadata = _read_safetensors(path)
    save_safetensors_atomic(_cast(tensors, half), out, metadata)
    if vectors:
        save_safetensors_atomic(vectors, token_out)
    return out


# --- Diffusers folder -> one original-layout (LDM) file ---------------------------------------------------------

# A rule maps one diffusers module to its LDM name; `children` renames its direct sub-modules (None: same names).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@dataclass
class Rule:
    diffusers: str
    ldm: str
    children: dict[str, str] | None = None


def _attentions(block) -> list:
    return list(getattr(block, "attentions", None) or [])


def _check_mid_block(mid, what: str) -> None:
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
    _check_mid_block(unet.mid_block, "UNet")
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
        _check_mid_block(getattr(vae, part).mid_block, f"VAE {part}")
        rules += [Rule(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET),
                  Rule(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION),
                  Rule(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET)]
    return rules


def apply_rules(state_dict: dict, rules: list[Rule], ldm_prefix: str, what: str) -> dict:
    """Renames every tensor by the rule of its deepest module; a tensor no rule covers stops the export."""
    by_module = {r.diffusers: r for r in rules}
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        parts = key.split(".")
        rule = next((by_module[".".join(parts[:n])] for n in range(len(parts) - 1, 0, -1)
                     if ".".join(parts[:n]) in by_module), None)
        rest = key[len(rule.diffusers) + 1:] if rule else None
        if rule is not None and rule.children is not None:
            child = next((c for c in rule.children if rest.startswith(c + ".")), None)
            rest = None if child is None else rule.children[child] + rest[len(child):]
        if rest is None:
            unmapped.append(key)
            continue
        target = f"{ldm_prefix}{rule.ldm}.{rest}"
        if target in out:
            raise AssertionError(f"two {what} tensors map to {target}; the key map is wrong")
        out[target] = tensor
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
        raise UserError(f"the {what} has tensors with no place in the original Stable Diffusion layout: {shown}. "
                        "It is not a Stable Diffusion 1/2-shaped model (SDXL, an upscaler or an inpainting "
                        "variant with extra embeddings?); export it with --format diffusers instead.")
    return out


def _vae_attention_as_conv(tensors: dict) -> dict:
    """LDM's VAE attention q/k/v/proj_out are 1x1 convolutions: [C, C] linear weights become [C, C, 1, 1]."""
    names = tuple(f"mid.attn_1.{n}.weight" for n in ("q", "k", "v", "proj_out"))
    return {k: v[:, :, None, None] if k.endswith(names) and v.ndim == 2 else v for k, v in tensors.items()}


def _refuse_non_sd1_text_encoder(class_name: str, hidden_act: str) -> None:
    if class_name != "CLIPTextModel" or hidden_act != "quick_gelu":
        raise UserError(
            f"the text encoder is {class_name} with {hidden_act} activations, not SD 1.x's OpenAI CLIP. For "
            "Stable Diffusion 2.x (OpenCLIP ViT-H) diffusers keeps only 23 of the 24 text layers and drops the text "
            "projection, so the original single-file layout cannot be rebuilt faithfully from a diffusers folder. "
            "Export with --format diffusers, or export the LoRA with --format kohya and apply it to the original "
            "checkpoint.")


def text_encoder_tensors(text_encoder) -> dict:
    """SD 1.x keeps OpenAI's CLIP text model under `cond_stage_model.transformer.text_model.`."""
    _refuse_non_sd1_text_encoder(type(text_encoder).__name__, text_encoder.config.hidden_act)
    # transformers >= 5.6 dropped CLIPTextModel's `text_model.` level; older versions still have it.
    return {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
            for k, v in text_encoder.state_dict().items()}


def checkpoint_tensors(unet, vae, text_encoder) -> dict:
    """Every weight of the three models under its original Stable Diffusion name."""
    tensors = apply_rules(unet.state_dict(), unet_rules(unet), "model.diffusion_model.", "UNet")
    tensors.update(_vae_attention_as_conv(apply_rules(vae.state_dict(), vae_rules(vae), "first_stage_model.", "VAE")))
    tensors.update(text_encoder_tensors(text_encoder))
    expected = len(unet.state_dict()) + len(vae.state_dict()) + len(text_encoder.state_dict())
    if len(tensors) != expected:
        raise AssertionError(f"{expected} tensors in, {len(tensors)} out: the key map lost some")
    return tensors


def _check_safetensors_weights(model_dir: Path, subfolders) -> None:
    for sub in subfolders:
        folder = model_dir / sub
        if not any(folder.glob("*.safetensors")):
            found = ", ".join(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) or "no weights"
            raise UserError(f"{folder} has no .safetensors weights ({found}); this tool reads safetensors only. "
                            "Re-save the model where you trust its files with "
                            "StableDiffusionPipeline.from_pretrained(DIR).save_pretrained(NEW_DIR).")


def source_pipeline(src: Path, *, whole: bool = False):
    """A model folder or a training checkpoint as an fp32 pipeline on the CPU, read from safetensors only, and the
    LoRAs still to fuse into it (a LoRA run's checkpoint: its own).

    `whole`: every part of the folder (safety checker included), for a diffusers re-save; otherwise only what
    a single file holds.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    from dreambooth.models.base import CHECKPOINT_STATE, check_model_folder

    if (src / CHECKPOINT_STATE).is_file():
        from dreambooth.formats.lora import LORA_FILE
        from dreambooth.generate import checkpoint_base, load_checkpoint_pipeline

        base = Path(checkpoint_base(src)[0])
        if base.is_dir():
            _check_safetensors_weights(base, _weight_folders(base))
        pipe = load_checkpoint_pipeline(src, device=torch.device("cpu"), dtype=torch.float32, safety_checker=False,
                                        with_lora=False)
        return pipe, [(src / LORA_FILE, 1.0)] if (src / LORA_FILE).is_file() else []
    check_model_folder(src, what="SRC")
    _check_safetensors_weights(src, _weight_folders(src) if whole else ("unet", "vae", "text_encoder"))
    extra = {} if whole else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        pipe = StableDiffusionPipeline.from_pretrained(src, use_safetensors=True, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the model in {src}: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe, []


def split_new_tokens(pipe) -> dict:
    """Takes identifier tokens added in training out of the text encoder ({token: vector}), so that what is left has
    CLIP's own vocabulary: the original single-file layout has no tokenizer, and a loader builds the text encoder
    from the base model's config, whose embedding has exactly that many rows."""
    import torch

    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
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


def _prediction_type(model_dir: Path) -> str:
    config = model_dir / "scheduler" / "scheduler_config.json"
    return json.loads(config.read_text()).get("prediction_type", "epsilon") if config.is_file() else "epsilon"


def _single_file_metadata(src: Path, loras) -> dict[str, str]:
    """What made the file; the prediction type matters most, as the original layout has no place for it."""
    metadata = {"dreambooth.source": str(src), "dreambooth.prediction_type": _prediction_type(_model_folder(src))}
    if loras:
        metadata["dreambooth.merged_loras"] = json.dumps([[str(p), w] for p, w in loras])
    return metadata


def _check_sd1_text_encoder(model_dir: Path) -> None:
    """The SD 2 refusal, read from config.json so that it comes before any weights load."""
    config_file = model_dir / "text_encoder" / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        _refuse_non_sd1_text_encoder((config.get("architectures") or ["CLIPTextModel"])[0],
                                     config.get("hidden_act", "quick_gelu"))


def _model_folder(src: Path) -> Path:
    """The diffusers folder whose configs a source uses: itself, or a checkpoint's base model."""
    from dreambooth.models.base import CHECKPOINT_STATE

    if (src / CHECKPOINT_STATE).is_file():
        from dreambooth.generate import checkpoint_base

        return Path(checkpoint_base(src)[0])
    return src


def to_single_file(src: Path, out: Path, *, half: bool = False, loras: Sequence[tuple[Path, float]] = ()) -> Path:
    """Writes a diffusers SD 1.x folder or a training checkpoint (with `loras` fused in, if any) as one
    original-layout `.safetensors`; new identifier tokens go into embedding files beside it."""
    src, out = Path(src), Path(out)
    _check_file_out(out)
    _check_sd1_text_encoder(_model_folder(src))
    loras = [(find_lora_file(p), w) for p, w in loras]
    pipe, own = source_pipeline(src)
    loras = own + loras
    fuse_loras(pipe, loras)
    vectors = split_new_tokens(pipe)
    files = {token: embedding_file_for(out, token) for token in vectors}
    for file in files.values():
        _check_file_out(file)
    tensors = checkpoint_tensors(pipe.unet, pipe.vae, pipe.text_encoder)
    metadata = _single_file_metadata(src, loras)
    if vectors:
        metadata["dreambooth.new_tokens"] = json.dumps(list(vectors))
        metadata["dreambooth.embedding_files"] = json.dumps({t: f.name for t, f in files.items()})
    written = save_safetensors_atomic(_cast(tensors, half), out, metadata)
    for token, vector in vectors.items():
        save_safetensors_atomic({"emb_params": vector.reshape(1, -1)}, files[token],
                                {"dreambooth.token": token, "dreambooth.model": out.name})
    return written


def embedding_note(out: Path, files: dict[str, str]) -> str:
    """How to use the embedding files of new tokens written beside an export."""
    lines = [f"note: new token(s) {', '.join(files)} are not in CLIP's fixed vocabulary; each one's trained embedding "
             "is a textual-inversion file beside the export:"]
    for token, name in files.items():
        stem = name.removesuffix(".safetensors")
        lines.append(f"  {token}: {out.parent / name}  (A1111/Forge: put it in embeddings/ and write {stem} where "
                     f"the prompt has {token}; ComfyUI: embedding:{stem}; diffusers: "
                     f"pipe.load_textual_inversion('{name}', token='{token}'))")
    return "\n".join(lines)


# --- Merging LoRAs into a model ---------------------------------------------------------------------------------

LORA_DOWN_SUFFIXES = ("lora_A.weight", "lora_down.weight", "lora.down.weight", "lora_linear_layer.down.weight")


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`FILE[:WEIGHT]`: the text after the last ':' is the weight only if it reads as a number (C:\\x stays a path)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return Path(spec), 1.0
        if not math.isfinite(weight):
            raise UserError(f"--merge-lora {spec}: the weight {tail} is not a finite number.")
        return Path(head), weight
    return Path(spec), 1.0


def _lora_layer_count(file: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        return sum(k.endswith(LORA_DOWN_SUFFIXES) for k in f.keys())


def _loaded_layer_count(pipe, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})
               for model in (pipe.unet, pipe.text_encoder) for m in model.modules())


def fuse_loras(pipe, loras: Sequence[tuple[Path, float]]):
    """Loads each LoRA as its own adapter with stock diffusers, fuses them at their weights, removes the adapters.

    After `unload_lora_weights` the fused weights stay in the base layers and no peft layer is left, so
    `save_pretrained` writes a plain model. A LoRA layer that finds no module to attach to is an error, not a
    warning: a LoRA made for another architecture would otherwise merge as a silent no-op.
    """
    from dreambooth.formats.lora import load_lora_adapter

    if not loras:
        return pipe
    names = []
    for i, (path, _) in enumerate(loras):
        name = f"export_{i}"
        with warnings.catch_warnings():
            # Several adapters on one model is the point here, not the mistake peft warns about.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            # A new identifier token's trained embedding joins the tokenizer and text encoder, saved with them.
            file = load_lora_adapter(pipe, path, name)
        expected, loaded = _lora_layer_count(file), _loaded_layer_count(pipe, name)
        if loaded != expected:
            raise UserError(f"LoRA {file} has {expected} layers but only {loaded} found a matching layer in this "
                            "model; it was made for a different architecture. Merge it into its own base model.")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras])
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=names)
    pipe.unload_lora_weights()
    left = [k for model in (pipe.unet, pipe.text_encoder) for k in model.state_dict() if "lora" in k]
    if left:
        raise AssertionError(f"LoRA layers remain after unloading: {left[:3]}")
    return pipe


def _pipeline_around(model_dir: Path, unet, vae, text_encoder):
    """A pipeline over already-loaded models, for diffusers' LoRA loader (it needs the tokenizer and scheduler)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.schedulers import DDPMScheduler
    from transformers import CLIPTokenizer

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet,
        tokenizer=CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _weight_folders(model_dir: Path) -> list[str]:
    index = json.loads((model_dir / "model_index.json").read_text())
    return [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
            and value[0] is not None and (model_dir / name / "config.json").is_file()]


def merge_lora(base_dir: Path, loras: Sequence[tuple[Path, float]], out: Path, *, half: bool = False) -> Path:
    """Saves a model folder or training checkpoint with each (LoRA, weight) fused in as a plain diffusers folder;
    no LoRAs: a plain re-save."""
    import torch

    from dreambooth.formats.atomic import library_versions

    base_dir, out = Path(base_dir), Path(out)
    _check_folder_out(out)
    loras = [(find_lora_file(p), w) for p, w in loras]
    pipe, own = source_pipeline(base_dir, whole=True)
    loras = own + loras
    fuse_loras(pipe, loras)
    if half:
        pipe.to(torch.float16)
    # Saved beside `out` and renamed into place, so `out` never holds half a model.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "export.json").write_text(json.dumps({
            "base_model": str(base_dir), "loras": [{"file": str(p), "weight": w} for p, w in loras],
            "dtype": "fp16" if half else "as loaded", "versions": library_versions()}, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()
        publish(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- The command ------------------------------------------------------------------------------------------------


def source_kind(src: Path) -> str:
    """'model' for a diffusers folder or a full fine-tune's checkpoint, 'lora' for a LoRA file, LoRA folder or a LoRA
    run's checkpoint ('lora-checkpoint'); anything else is a UserError."""
    from safetensors import SafetensorError, safe_open

    from dreambooth.models.base import CHECKPOINT_STATE

    if not src.exists():
        raise UserError(f"SRC {src} does not exist. Pass a training output folder, a checkpoint-N folder, a "
                        "diffusers model folder, or a LoRA .safetensors file.")
    _refuse_pickle(src, "SRC")
    if src.is_dir():
        if (src / CHECKPOINT_STATE).is_file():
            return "lora-checkpoint" if (src / LORA_WEIGHT_NAME).is_file() else "model"
        if (src / "model_index.json").is_file():
            return "model"
        if (src / LORA_WEIGHT_NAME).is_file():
            return "lora"
        raise UserError(f"SRC {src} is neither a diffusers model folder (no model_index.json) nor a LoRA folder "
                        f"(no {LORA_WEIGHT_NAME}). Pass the folder that training wrote, or the LoRA file.")
    if src.suffix != ".safetensors":
        raise UserError(f"SRC {src} is not a .safetensors file or a folder; pass a model folder or a LoRA file.")
    try:
        with safe_open(str(src), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"SRC {src} is not a readable safetensors file ({e}).") from None
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        raise UserError(f"SRC {src} is already a single-file Stable Diffusion checkpoint. To get a diffusers "
                        "folder from it use diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained"
                        "(DIR), then export that folder.")
    if keys and all("lora" in k or k.endswith(".alpha") or k.startswith("bundle_emb.") for k in keys):
        return "lora"
    raise UserError(f"SRC {src} holds neither LoRA weights nor a model (first key: {keys[0] if keys else 'none'}).")


@contextlib.contextmanager
def quiet_progress_bars():
    """diffusers' and transformers' load and save bars off, so the command reports in one line; then restored."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in enabled:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was_on in enabled:
            if was_on:
                lib.enable_progress_bar()


def export_command(args) -> Path:
    """`dreambooth export SRC --format kohya|single-file|diffusers --out PATH [--half] [--merge-lora FILE[:W]]`."""
    src, out, fmt, half = Path(args.src), Path(args.out), args.format, bool(args.half)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt} is not one of {', '.join(FORMATS)}.")
    from dreambooth.formats.lora import check_lora_source

    loras = [parse_lora_spec(spec) for spec in (args.merge_lora or [])]
    for path, _ in loras:
        check_lora_source(path, "--merge-lora")  # a full model given as a LoRA is refused, saying what to pass
    kind = source_kind(src)
    if kind == "lora-checkpoint":  # its LoRA as it is, or fused into its base model for one file
        kind = "model" if fmt == "single-file" else "lora"
    if kind == "lora":
        if loras:
            raise UserError(f"--merge-lora merges LoRAs into a full model, but SRC {src} is a LoRA. Pass the base "
                            "model folder as SRC, and this LoRA as --merge-lora.")
        if fmt == "single-file":
            raise UserError(f"SRC {src} is a LoRA, which holds only adapter weights; to bake it into a full model "
                            f"use `dreambooth export BASE_MODEL --format single-file --merge-lora {src}`.")
        if fmt == "diffusers" and _is_kohya(_read_safetensors(find_lora_file(src))[0]):
            raise UserError(f"SRC {src} is a kohya-format LoRA; --format diffusers copies a diffusers-format "
                            "LoRA. diffusers' load_lora_weights reads kohya files as they are, and --merge-lora "
                            "takes them too.")
        path = lora_to_kohya(src, out, half=half) if fmt == "kohya" else copy_lora(src, out, half=half)
        what = "kohya LoRA" if fmt == "kohya" else "diffusers LoRA"
    else:
        if fmt == "kohya":
            raise UserError(f"SRC {src} is a full model; the kohya format is for LoRA files. Use --format "
                            "single-file for a full model (A1111/ComfyUI), or --format diffusers.")
        with quiet_progress_bars():
            if fmt == "single-file":
                path, what = to_single_file(src, out, half=half, loras=loras), "single-file checkpoint"
            else:
                path, what = merge_lora(src, loras, out, half=half), "diffusers model"
    print(f"wrote {what} {path} ({human_size(_size_of(path))})")
    embedded = json.loads(_header_metadata(path).get("dreambooth.embedding_files", "{}")) if path.is_file() else {}
    if embedded:
        if fmt == "kohya":
            print(f"note: the kohya file carries the new token(s) {', '.join(embedded)} itself (A1111 and Forge read "
                  "its bundled embeddings; write the token in the prompt as trained).")
        print(embedding_note(path, embedded))
    if kind == "model" and fmt == "single-file" and _prediction_type(_model_folder(src)) == "v_prediction":
        print("note: this model predicts v (v_prediction), which a single file does not record; A1111 needs a "
              "config .yaml with `parameterization: v` beside it, ComfyUI a v_prediction sampling node.")
    return path
