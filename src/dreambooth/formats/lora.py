"""The LoRA file: its names, reading it (the spellings diffusers and peft write; a kohya file is told apart and
refused where it cannot be converted), writing it, and its new tokens.

The file is `pytorch_lora_weights.safetensors` (`models.base.LORA_FILE`), diffusers' own name and layout, so stock
`pipe.load_lora_weights(output_dir)` loads it (a LoKr or LoHa run writes that name in LyCORIS' layout instead:
`formats.lycoris`). A new identifier token's trained embedding goes beside it in
`token_embeddings.safetensors` ({token: vector}, the layout `pipe.load_textual_inversion` reads), or
`NAME.tokens.safetensors` beside any other `NAME.safetensors`; an SDXL token lives in both text encoders, so its
file holds `clip_l` and `clip_g` rows (the layout SDXL embeddings are shared in, which stock diffusers loads with
one `load_textual_inversion` call per encoder), and so does SD3's; a token added to T5 as well (Flux, SD3) adds a
`t5` row. Loading LoRAs into a pipeline is
`formats.lora_loading`; the kohya layout is `formats.kohya`. Torch and safetensors load when a function needs them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dreambooth.errors import UserError
from dreambooth.formats.atomic import check_new_file, check_new_folder, save_safetensors_atomic
from dreambooth.models.base import (
    CHECKPOINT_STATE,
    LORA_FILE,
    SINGLE_FILE_TO_FOLDER,
    file_kind,
    safetensors_metadata,
)

if TYPE_CHECKING:
    import torch

TOKEN_FILE = "token_embeddings.safetensors"
# An SDXL token's rows in its two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG), by the names SDXL embedding files
# use, in the order of the pipeline's text_encoder and text_encoder_2.
SDXL_TOKEN_KEYS = ("clip_l", "clip_g")
# Every key a token file of several encoders may hold: the CLIP encoders', and T5's where the token was added to it
# (token.t5_new_token; the key diffusers' advanced Flux script writes T5's rows under).
TOKEN_KEYS = (*SDXL_TOKEN_KEYS, "t5")

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


# diffusers' key under which `save_lora_weights(..., *_lora_adapter_metadata=...)` stores the peft LoraConfig
# fields, as JSON with keys prefixed by component ("unet.r", "text_encoder.lora_alpha", ...).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


# A LoRA file's parts by their diffusers prefix, with the kohya prefix of each: SD 1.x and 2.x have one text
# encoder (`lora_te_`); SDXL two, `lora_te1_` and `lora_te2_` (formats.kohya renames the first for SDXL).
COMPONENTS = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def refuse_pickle(path: Path, what: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{what} {path} is a pickle file ({path.suffix}); this tool reads safetensors only, "
                        "because loading a pickle can run arbitrary code. Convert it where you trust it, e.g. "
                        "`safetensors.torch.save_file(torch.load(FILE, weights_only=True), 'out.safetensors')`, "
                        "and pass the .safetensors file.")


def cast_half(tensors: dict, half: bool) -> dict:
    import torch

    if not half:
        return tensors
    return {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}


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
    refuse_pickle(src, "LoRA")
    if src.is_dir():
        if (src / LORA_FILE).is_file():
            return src / LORA_FILE
        pickles = [p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f" It holds {', '.join(pickles)}: pickle files are not read, only safetensors." if pickles else ""
        raise UserError(f"LoRA folder {src} has no {LORA_FILE}.{hint} Pass the LoRA .safetensors file "
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




def is_kohya(keys) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def read_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
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
    if component in ("unet", "transformer"):
        return convert_unet_state_dict_to_peft(tensors)
    try:
        return convert_state_dict_to_peft(tensors)
    except ValueError:
        return tensors  # unknown spelling: reported key by key by the caller


def lora_state_for_peft(component: str, tensors: dict) -> dict:
    """One component's tensors of a diffusers-format LoRA file ("unet.", "text_encoder." or SDXL's
    "text_encoder_2." keys), under peft's names (`...to_q.lora_A.weight`)."""
    prefix = component + "."
    return _to_peft_names(component, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def read_lora(src: Path) -> LoraFile:
    """Reads a diffusers/peft LoRA file (or folder) into per-component (down, up) pairs; refuses anything else."""
    path = find_lora_file(src)
    tensors, metadata = read_safetensors(path)
    if not tensors:
        raise UserError(f"LoRA {path} holds no tensors.")
    if is_kohya(tensors):
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
    configs = {c: {k[len(c) + 1:]: v for k, v in raw_config.items() if k.startswith(c + ".")} for c in COMPONENTS}
    refuse_dora(path, configs)
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UserError(f"LoRA {path} has keys this export cannot convert: {shown}. It reads Stable Diffusion "
                        "1/2 and SDXL LoRAs saved by diffusers or peft (unet.*, text_encoder.* and text_encoder_2.* "
                        "with lora_A/lora_B or lora.down/lora.up weights); DoRA, LoRA biases and other adapter types "
                        "are not converted.")
    return LoraFile(path=path, layers=layers, adapter_config={c: v for c, v in configs.items() if v},
                    metadata=metadata)


def refuse_dora(path: Path, configs: dict[str, dict]) -> None:
    """DoRA's magnitudes and LoRA biases have no one reading in the kohya/A1111 layout: its DoRA key (`dora_scale`)
    is normalised per input by A1111 and per output by peft and ComfyUI, and diffusers' kohya reader drops it."""
    for component, cfg in configs.items():
        if cfg.get("use_dora") or cfg.get("lora_bias"):
            what = "DoRA" if cfg.get("use_dora") else "LoRA biases (lora_bias)"
            raise UserError(f"LoRA {path}: its {component} adapter uses {what}, which the kohya/A1111 LoRA format "
                            "cannot express (A1111 and ComfyUI read a DoRA scale differently, and diffusers' kohya "
                            "reader drops it). Export it with --format diffusers (the file stock load_lora_weights "
                            "reads), or merge it into its base model with --merge-lora.")


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata, from its header alone ({} if it is not one)."""
    read = safetensors_metadata(path)
    return read[1] if read else {}


def token_file_for(lora_file: Path) -> Path:
    """Where a LoRA's new-token embeddings are: `token_embeddings.safetensors` beside diffusers' fixed file name
    (one LoRA per folder), `NAME.tokens.safetensors` beside any other `NAME.safetensors`, so that LoRAs can
    share a folder."""
    if lora_file.name == LORA_FILE:
        return lora_file.parent / TOKEN_FILE
    return lora_file.with_name(lora_file.name.removesuffix(".safetensors") + ".tokens.safetensors")


def lora_token_vectors(lora_file: Path) -> dict:
    """The new-token embeddings a LoRA was trained with ({token: vector}), from its token file; a UserError if the
    LoRA records new tokens and the file is missing."""
    tokens = new_tokens(lora_file)
    if not tokens:
        return {}
    file = token_file_for(lora_file)
    if not file.is_file():
        raise UserError(f"LoRA {lora_file} was trained with new token(s) {', '.join(tokens)} whose embeddings live in "
                        f"{file.name} beside it, which is missing; put it back beside the LoRA.")
    return read_token_file(file)


def embedding_file_for(out: Path, token: str) -> Path:
    """`mydog.safetensors` + `<saya_token>` -> `mydog.saya_token.safetensors`: a textual-inversion file per new token,
    named after the export so that several share a folder (the name is what ComfyUI's `embedding:` refers to)."""
    clean = re.sub(r"[^\w.-]+", "_", token).strip("_.") or "token"
    return out.with_name(f"{out.name.removesuffix('.safetensors')}.{clean}.safetensors")


def embedding_rows(vector) -> dict:
    """A token's embedding as a textual-inversion file holds it, one row each: `emb_params` (kohya's key), or SDXL's
    `clip_l` and `clip_g` (a row for each text encoder, the layout A1111 and diffusers' docs use)."""
    if isinstance(vector, dict):
        return {key: v.reshape(1, -1).float() for key, v in vector.items()}
    return {"emb_params": vector.reshape(1, -1).float()}


def copy_lora(src: Path, out: Path, *, half: bool = False) -> Path:
    """The diffusers-format LoRA as it is (optionally fp16), to a file or to `out/pytorch_lora_weights.safetensors`,
    with its new tokens' embeddings beside it under the name `lora.token_file_for` gives."""
    path = find_lora_file(src)
    out = Path(out)
    if out.suffix != ".safetensors":
        check_new_folder(out)
        out = out / LORA_FILE
    else:
        check_new_file(out)
    vectors = lora_token_vectors(path)
    token_out = token_file_for(out)
    if vectors:
        check_new_file(token_out)
    tensors, metadata = read_safetensors(path)
    save_safetensors_atomic(cast_half(tensors, half), out, metadata)
    if vectors:  # the token file as it is (an SDXL one's layout lives in its metadata)
        token_tensors, token_metadata = read_safetensors(token_file_for(path))
        save_safetensors_atomic(token_tensors, token_out, token_metadata)
    return out


def parse_lora_spec(spec: str, flag: str = "--lora") -> tuple[Path, float]:
    """`FILE[:WEIGHT]`. A spec that names an existing path is that path at weight 1 (a file with ':' in its name,
    or C:\\x); otherwise the text after the last ':' is the weight, which must then be a finite number."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or Path(spec).expanduser().exists():
        return Path(spec), 1.0
    try:
        weight = float(tail)
    except ValueError:
        if not Path(head).expanduser().exists():
            return Path(spec), 1.0  # neither reads: the caller says that the file does not exist
        raise UserError(f"{flag} {spec}: the weight '{tail}' after the last ':' is not a number; write "
                        f"{head}:0.8, or {head} alone for weight 1.0.") from None
    if not math.isfinite(weight):
        raise UserError(f"{flag} {spec}: the weight '{tail}' is not a finite number; write {head}:0.8, or {head} "
                        "alone for weight 1.0.")
    return Path(head), weight


def check_lora_source(path: Path, flag: str = "--lora") -> Path:
    """A --lora argument as the LoRA file it names; a full model given as a LoRA is refused, saying what to pass."""
    p = Path(path)
    if p.is_dir() and (p / "model_index.json").is_file():
        raise UserError(f"{flag} {p} is a full model folder, not a LoRA; pass it as the model (--model, or export's "
                        "SRC), and a LoRA trained on it as the LoRA.")
    if p.is_dir() and (p / CHECKPOINT_STATE).is_file() and not (p / LORA_FILE).is_file():
        raise UserError(f"{flag} {p} is a checkpoint of a full fine-tune, not a LoRA; pass it as the model (--model, "
                        "or export's SRC).")
    if p.is_file() and p.suffix == ".safetensors" and file_kind(p) == "single-file":
        raise UserError(f"{flag} {p} is a full single-file Stable Diffusion checkpoint, not a LoRA. To use it as "
                        f"the model, {SINGLE_FILE_TO_FOLDER} as --model.")
    return find_lora_file(p)


def lora_layers(module: torch.nn.Module, diffusers_names: bool = True,
                text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft-wrapped diffusers/transformers module, in diffusers' key layout (`lora.down`,
    as diffusers' SD and SDXL scripts save), or peft's (`lora_A`, as its Flux and SD3 scripts save).

    A text encoder's DoRA magnitudes are written as `lora_magnitude_vector.weight`: diffusers hands text encoders to
    transformers' `load_adapter`, which (5.23) puts the adapter's name after `lora_magnitude_vector` and so misses
    the `.weight` that peft's own loader adds first; peft reads either spelling.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module)
    if text_encoder:
        state = {k + ".weight" if k.endswith("lora_magnitude_vector") else k: v for k, v in state.items()}
    return convert_state_dict_to_diffusers(state) if diffusers_names else state


def save_lora(out_dir: Path, family, modules: dict[str, torch.nn.Module | None], adapter_configs: dict[str, dict],
              metadata: dict[str, str]) -> Path:
    """Writes the LoRA with the family's stock diffusers pipeline (models.families), in fp32 and with our metadata
    added, atomically.

    `modules` maps the denoiser ("unet" or "transformer") and the text encoders by component name to the adapted
    module (None where that part does not train); each pipeline writes its parts under their own prefixes
    (`unet.`, `transformer.`, `text_encoder_2.`).
    """
    import shutil

    import diffusers
    import torch
    from safetensors.torch import load_file

    scratch = out_dir / ".lora.tmp"  # diffusers writes only to a folder; the run folder's rules know this name
    shutil.rmtree(scratch, ignore_errors=True)
    kwargs = {}
    for name, module in modules.items():
        kwargs[f"{name}_lora_layers"] = (lora_layers(module, family.denoiser == "unet", name != family.denoiser)
                                         if module is not None else None)
        kwargs[f"{name}_lora_adapter_metadata"] = adapter_configs.get(name)
    pipeline = getattr(diffusers, family.pipeline)
    try:
        pipeline.save_lora_weights(scratch, **kwargs, safe_serialization=True)
        header = read_metadata(scratch / LORA_FILE)
        tensors = {k: v.to(torch.float32) for k, v in load_file(str(scratch / LORA_FILE)).items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return save_safetensors_atomic(tensors, out_dir / LORA_FILE, {**header, **metadata})


def save_token_embeddings(out_dir: Path, sides: list[tuple]) -> Path | None:
    """The trained rows of new identifier tokens. `sides` is [(token key, tokenizer, text encoder, token ids)] per
    text encoder. One encoder with tokens (SD 1.x/2.x, a Flux token in CLIP alone): {token: vector}. Several (SDXL's
    and SD3's two CLIPs, a token added to T5 too): one tensor per encoder under its key (`clip_l`, `clip_g`, `t5`),
    one row per token, in the order the `dreambooth.tokens` metadata lists them."""
    import torch

    sides = [side for side in sides if side[3]]
    if not sides:
        return None
    rows = {}
    for key, tokenizer, text_encoder, token_ids in sides:
        weight = text_encoder.get_input_embeddings().weight.detach().float().cpu()
        rows[key] = {tokenizer.convert_ids_to_tokens(i): weight[i].clone() for i in token_ids}
    if len(rows) == 1:
        return save_safetensors_atomic(next(iter(rows.values())), out_dir / TOKEN_FILE)
    tokens = list(next(iter(rows.values())))
    if any(list(r) != tokens for r in rows.values()):
        raise ValueError(f"the new tokens differ between the text encoders: {[list(r) for r in rows.values()]}")
    tensors = {key: torch.stack([r[t] for t in tokens]) for key, r in rows.items()}
    return save_safetensors_atomic(tensors, out_dir / TOKEN_FILE, {"dreambooth.tokens": json.dumps(tokens)})


def read_token_file(file: Path) -> dict:
    """A token file's embeddings by token: {token: vector}, or where the token lives in several text encoders
    {token: {"clip_l": vector, "clip_g": vector}} (SDXL), with "t5" where it was added to T5 too (a single-token
    `clip_l`/`clip_g` file made elsewhere is named by its file name, as A1111 does)."""
    tensors, metadata = read_safetensors(file)
    if len(tensors) < 2 or not set(tensors) <= set(TOKEN_KEYS):
        return tensors
    keys = [key for key in TOKEN_KEYS if key in tensors]
    counts = {key: tensors[key].reshape(-1, tensors[key].shape[-1]).shape[0] for key in keys}
    tokens = json.loads(metadata.get("dreambooth.tokens", "null") or "null") or [file.name.split(".")[0]]
    if any(count != len(tokens) for count in counts.values()):
        raise UserError(f"token file {file} holds {counts} rows per encoder for {len(tokens)} token(s) {tokens}; "
                        "it is damaged or was not written by this tool. Train again or pass the matching file.")
    return {token: {key: tensors[key].reshape(len(tokens), -1)[i] for key in keys} for i, token in enumerate(tokens)}
