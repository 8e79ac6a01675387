"""A Flux.1 LoRA (diffusers/peft: `transformer.<module>.lora_A.weight`) in kohya's layout, which kohya's sd-scripts
write and ComfyUI, Forge and diffusers' own `FluxPipeline.load_lora_weights` read: each layer named after the
module of Black Forest Labs' original model (`lora_unet_double_blocks_0_img_attn_qkv`,
`lora_unet_single_blocks_0_linear1`; `formats.flow_layout`), the CLIP text encoder's as `lora_te1_text_model_...`.

Where the original fuses diffusers' modules (q, k and v into `qkv`; a single block's q, k, v and MLP input into
`linear1`), their adapters become one: the down matrices stacked, the up matrices block-diagonal, so the fused
layer's update up @ down is each module's own B @ A in its own rows and nothing across. A module the LoRA does not
adapt (to_q without to_k, the default targets' single blocks without proj_mlp) is a block of zeros, and each part is
padded with zeros to the largest rank, so every block is the same size: diffusers' kohya converter then recognises
the block-diagonal form and splits it back into the original adapters exactly.

Every layer's `alpha` is its rank (a scale of 1), with peft's scale (lora_alpha / r, rsLoRA, alpha_pattern) folded
into `lora_up`: diffusers 0.42.1 reads the final layer's adapters without their alpha, and with alpha = rank every
reader gives the same update.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.formats.atomic import check_new_file, save_safetensors_atomic
from dreambooth.formats.flow_layout import LAYOUTS, place_of, swap_halves
from dreambooth.formats.kohya import kohya_alpha
from dreambooth.formats.lora import (
    ADAPTER_METADATA_KEY,
    cast_half,
    embedding_file_for,
    embedding_rows,
    find_lora_file,
    is_kohya,
    lora_state_for_peft,
    lora_token_vectors,
    read_safetensors,
    token_file_for,
)
from dreambooth.models.base import safetensors_header

# A Flux LoRA's parts by their diffusers prefix, with their kohya prefix (sd-scripts' names for Flux: the CLIP-L
# text encoder is `lora_te1_`; T5, which this tool never trains, would be `lora_te3_`).
FLUX_PARTS = {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}


def read_flux_lora(src: Path) -> tuple[Path, dict[str, dict[str, tuple]], dict[str, str]]:
    """A diffusers/peft Flux LoRA file (or folder): its path, per part {module: (down, up, peft scale)}, and its
    other metadata. Anything but plain LoRA layers of the transformer and the CLIP text encoder is refused."""
    path = find_lora_file(src)
    tensors, metadata = read_safetensors(path)
    if not tensors:
        raise UserError(f"LoRA {path} holds no tensors.")
    if is_kohya(tensors):
        raise UserError(f"LoRA {path} is already in the kohya format (keys like {next(iter(tensors))}).")
    try:
        config = json.loads(metadata.pop(ADAPTER_METADATA_KEY, "null") or "null") or {}
    except json.JSONDecodeError as e:
        raise UserError(f"LoRA {path}: its '{ADAPTER_METADATA_KEY}' header is not valid JSON ({e}), so its scale is "
                        "unknown. Re-save it with diffusers' save_lora_weights.") from None
    layers, unknown = {}, [k for k in tensors if not k.startswith(tuple(p + "." for p in FLUX_PARTS))]
    for part in FLUX_PARTS:
        own = {k[len(part) + 1:]: v for k, v in config.items() if k.startswith(part + ".")}
        if own.get("use_dora") or own.get("lora_bias"):
            raise UserError(f"LoRA {path}: its {part} adapter uses {'DoRA' if own.get('use_dora') else 'LoRA biases'}, "
                            "which the kohya format cannot express. Export it with --format diffusers.")
        pairs: dict[str, dict] = {}
        for key, value in lora_state_for_peft(part, tensors).items():
            m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
            if m is None:
                unknown.append(f"{part}.{key}")
                continue
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        layers[part] = {}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                unknown.append(f"{part}.{module} (only lora_{''.join(ab)})")
                continue
            rank = ab["A"].shape[0]
            layers[part][module] = (ab["A"], ab["B"], kohya_alpha(module, rank, own) / rank)
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UserError(f"LoRA {path} has keys the kohya export of a Flux LoRA cannot convert: {shown}. It reads "
                        "LoRA layers of the transformer (transformer.*) and the CLIP text encoder (text_encoder.*), "
                        "as diffusers and peft save them; DoRA, LoRA biases and other adapter types are not "
                        "converted. Export it with --format diffusers.")
    return path, layers, metadata


def fused_pair(parts: dict[int, tuple], widths: tuple[int, ...]):
    """One LoRA (down, up) for a layer the original model fuses from len(widths) modules, from the (down, up) of
    the parts the LoRA adapts ({index: (down, up)}, scales already folded into up).

    Each part is padded with zero rows of down and zero columns of up to the largest rank r; a part the LoRA does
    not adapt is all zeros. down: the parts' down matrices stacked, [n r, in]; up: block-diagonal, [sum of outs,
    n r], so that up @ down is each part's up @ down in its own rows.
    """
    import torch

    rank = max(down.shape[0] for down, _ in parts.values())
    width_in = {down.shape[1] for down, _ in parts.values()}
    units = {up.shape[0] // widths[i] for i, (_, up) in parts.items()}
    if len(width_in) != 1 or len(units) != 1 or any(up.shape[0] != widths[i] * next(iter(units))
                                                    for i, (_, up) in parts.items()):
        raise UserError("the adapters fused into one layer have shapes that do not fit together (in: "
                        f"{sorted(width_in)}, out: {[tuple(up.shape) for _, up in parts.values()]}).")
    width_in, unit = width_in.pop(), units.pop()
    like = next(iter(parts.values()))[0]
    downs, ups = [], []
    for i, width in enumerate(widths):
        down, up = parts.get(i, (like.new_zeros(0, width_in), like.new_zeros(width * unit, 0)))
        pad = rank - down.shape[0]
        downs.append(torch.cat([down, down.new_zeros(pad, width_in)]))
        ups.append(torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1))
    return torch.cat(downs), torch.block_diag(*ups)


def kohya_layers(layers: dict[str, dict[str, tuple]], path: Path) -> dict[str, tuple]:
    """{kohya layer name: (down, up)} of a Flux LoRA's layers (`read_flux_lora`), each at scale 1."""
    fused: dict[str, dict[int, tuple]] = {}
    widths, out, unplaced = {}, {}, []
    for module, (down, up, scale) in layers.get("transformer", {}).items():
        place = place_of(module, "flux")
        if place is None or place.norm or not place.module:
            unplaced.append(module)
            continue
        up = up * scale
        if place.swap:
            up = swap_halves(up)
        fused.setdefault(place.module, {})[place.part] = (down, up)
        widths[place.module] = place.widths
    if unplaced:
        raise UserError(f"LoRA {path} adapts transformer layer(s) with no place in {LAYOUTS['flux']}, which kohya "
                        f"files use: {', '.join(sorted(unplaced)[:5])}. Export it with --format diffusers.")
    for module, parts in fused.items():
        name = FLUX_PARTS["transformer"] + module.replace(".", "_")
        out[name] = fused_pair(parts, widths[module]) if len(widths[module]) > 1 else parts[0]
    for module, (down, up, scale) in layers.get("text_encoder", {}).items():
        # kohya names CLIP's layers from its `text_model.` root, which transformers >= 5.6 no longer has
        name = FLUX_PARTS["text_encoder"] + ("text_model." + module.removeprefix("text_model.")).replace(".", "_")
        out[name] = (down, up * scale)
    return out


def flux_lora_to_kohya(src: Path, out: Path, *, half: bool = False) -> Path:
    """Writes a diffusers/peft Flux LoRA (file or folder) in kohya's layout; new tokens' embeddings go beside it,
    each in a textual-inversion file of its own and all together in the token file our loader reads."""
    import torch

    out = Path(out)
    check_new_file(out)
    path, layers, metadata = read_flux_lora(src)
    pairs = kohya_layers(layers, path)
    tensors = {}
    for name, (down, up) in pairs.items():
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
    tensors = cast_half(tensors, half)
    for name, (down, _) in pairs.items():
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)  # scale 1: see above
    ranks = {down.shape[0] for down, _ in pairs.values()}
    metadata = {**metadata, "dreambooth.base_family": "flux", "ss_network_module": "networks.lora_flux",
                "ss_base_model_version": "flux1"}
    if len(ranks) == 1:
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = str(ranks.pop())
    vectors = lora_token_vectors(path)
    files = {token: embedding_file_for(out, token) for token in vectors}
    for file in [*files.values(), *([token_file_for(out)] if vectors else [])]:
        check_new_file(file)
    if vectors:
        metadata["dreambooth.embedding_files"] = json.dumps({t: f.name for t, f in files.items()})
    written = save_safetensors_atomic(tensors, out, metadata)
    if vectors:
        # diffusers' kohya Flux reader refuses A1111's bundled embeddings, so they stay out of the file
        token_tensors, token_metadata = read_safetensors(token_file_for(path))
        save_safetensors_atomic(token_tensors, token_file_for(out), token_metadata)
    for token, vector in vectors.items():
        save_safetensors_atomic(embedding_rows(vector), files[token], {"dreambooth.token": token,
                                                                      "dreambooth.lora": out.name})
    return written


def outside_blocks(file: Path) -> list[str]:
    """The layers of a kohya Flux file outside the double and single blocks (img_in, final_layer, ...)."""
    header = safetensors_header(file)
    names = {k.partition(".")[0] for k in (header[0] if header else {})}
    return sorted(n for n in names if n.startswith("lora_unet_")
                  and not n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")))
