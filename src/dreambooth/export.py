"""`dreambooth export`: what SRC is, which writer of `dreambooth.formats` makes the asked format, what to say.

The writers, each reading safetensors only and writing atomically: `formats.kohya.lora_to_kohya` (a LoRA for
A1111/Forge/ComfyUI), `formats.lora.copy_lora` (a diffusers LoRA as it is), `formats.single_file.to_single_file`
(a model as one original-layout file) and `formats.merge.merge_lora` (LoRAs baked into a diffusers folder). The flow
families have their own: `formats.flux_kohya.flux_lora_to_kohya` (a Flux LoRA in kohya's layout),
`formats.flow_single_file.flow_to_single_file` (a Flux or SD3 transformer in its original layout) and
`formats.flow_merge.merge_flow_loras`; their diffusers LoRA is copied as any other.
"""

from __future__ import annotations

import json
from pathlib import Path

from dreambooth.errors import Problems, UserError
from dreambooth.formats.flow_merge import KOHYA_DROPPED, merge_flow_loras
from dreambooth.formats.flow_single_file import flow_to_single_file, left_out_note
from dreambooth.formats.flux_kohya import flux_lora_to_kohya, outside_blocks
from dreambooth.formats.kohya import lora_to_kohya, lycoris_to_kohya
from dreambooth.formats.lora import (
    check_lora_source,
    copy_lora,
    find_lora_file,
    is_kohya,
    parse_lora_spec,
    read_metadata,
    refuse_pickle,
    token_file_for,
)
from dreambooth.formats.lora_fit import check_lora_fits, transformer_lora_family
from dreambooth.formats.lycoris import TITLES, lycoris_kind
from dreambooth.formats.merge import merge_lora, model_folder
from dreambooth.formats.single_file import embedding_note, prediction_type, to_single_file
from dreambooth.models.base import (
    CHECKPOINT_STATE,
    LORA_FILE,
    SINGLE_FILE_TO_FOLDER,
    config_folder,
    file_kind,
    safetensors_header,
    safetensors_metadata,
)
from dreambooth.models.families import Family, folder_family
from dreambooth.models.loading import quiet_progress_bars
from dreambooth.training.rundir import human_size, path_size

FORMATS = ("kohya", "single-file", "diffusers")

def source_kind(src: Path) -> str:
    """'model' for a diffusers folder or a full fine-tune's checkpoint, 'lora' for a LoRA file, LoRA folder or a LoRA
    run's checkpoint ('lora-checkpoint'); anything else is a UserError."""

    if not src.exists():
        raise UserError(f"SRC {src} does not exist. Pass a training output folder, a checkpoint-N folder, a "
                        "diffusers model folder, or a LoRA .safetensors file.")
    refuse_pickle(src, "SRC")
    if src.is_dir():
        if (src / CHECKPOINT_STATE).is_file():
            return "lora-checkpoint" if (src / LORA_FILE).is_file() else "model"
        if (src / "model_index.json").is_file():
            return "model"
        if (src / LORA_FILE).is_file():
            return "lora"
        raise UserError(f"SRC {src} is neither a diffusers model folder (no model_index.json) nor a LoRA folder "
                        f"(no {LORA_FILE}). Pass the folder that training wrote, or the LoRA file.")
    if src.suffix != ".safetensors":
        raise UserError(f"SRC {src} is not a .safetensors file or a folder; pass a model folder or a LoRA file.")
    read = safetensors_metadata(src)
    if read is None:
        raise UserError(f"SRC {src} is not a readable safetensors file (its header does not read); it may be "
                        "truncated or not a safetensors file at all.")
    kind, keys = file_kind(src), read[0]
    if kind == "single-file":
        raise UserError(f"SRC {src} is already a single-file Stable Diffusion checkpoint. To export it again, "
                        f"{SINGLE_FILE_TO_FOLDER} as SRC.")
    if kind == "lora":
        return "lora"
    raise UserError(f"SRC {src} holds neither LoRA weights nor a model (first key: {keys[0] if keys else 'none'}).")


def transformer_lora(file: Path) -> str | None:
    """'flux' or 'sd3' for a LoRA of a flow family's transformer, 'unknown' for a transformer LoRA whose family
    neither its metadata nor its layers tell; None for a UNet family's LoRA."""
    header = safetensors_header(file)
    keys, metadata = (list(header[0]), header[1]) if header else ([], {})
    family = transformer_lora_family(keys, metadata)
    if family is not None:
        return family.name
    return "unknown" if any(k.startswith("transformer.") for k in keys) else None


def kohya_writer(src: Path):
    """The kohya writer for a LoRA's family: SD 1.x, 2.x and SDXL's, or Flux's; SD3's has none."""
    family = transformer_lora(find_lora_file(src))
    if family is None:
        return lora_to_kohya
    if family == "flux":
        return flux_lora_to_kohya
    what = "an SD3 LoRA" if family == "sd3" else "a transformer LoRA of no family its metadata or layers tell"
    raise UserError(f"SRC {src} is {what}; the kohya export writes SD 1.x/2.x, SDXL and Flux.1 LoRAs. Use --format "
                    "diffusers: stock StableDiffusion3Pipeline.load_lora_weights and ComfyUI's LoRA loader read "
                    "that file as it is.")


def export_lora(src: Path, out: Path, fmt: str, half: bool) -> tuple[Path, str]:
    """A LoRA file or folder in the kohya layout, or copied as a diffusers LoRA; a LoKr or LoHa file (LyCORIS'
    layout, A1111's and ComfyUI's already) goes to kohya as it is, and has no diffusers form."""
    file = find_lora_file(src)
    keys = list((safetensors_header(file) or ({}, {}))[0])
    kind = lycoris_kind(keys)
    if kind and fmt == "kohya":
        return lycoris_to_kohya(src, out, half=half), f"{TITLES[kind]} file (LyCORIS' layout)"
    if kind:
        raise UserError(f"SRC {src} is a {TITLES[kind]} adapter in LyCORIS' layout, which diffusers' LoRA format "
                        "cannot hold and its SD pipelines do not read. A1111, Forge and ComfyUI read the file as it is "
                        "(--format kohya copies it with any new token bundled); for stock diffusers, bake it into "
                        f"its base model: `dreambooth export BASE_MODEL --merge-lora {src} --format diffusers --out "
                        "DIR`.")
    if fmt == "diffusers" and is_kohya(keys):
        raise UserError(f"SRC {src} is a kohya-format LoRA; --format diffusers copies a diffusers-format "
                        "LoRA. diffusers' load_lora_weights reads kohya files as they are, and --merge-lora "
                        "takes them too.")
    if fmt == "kohya":
        return kohya_writer(src)(src, out, half=half), "kohya LoRA"
    return copy_lora(src, out, half=half), "diffusers LoRA"


def source_family(src: Path) -> Family | None:
    """The family of a model folder or training checkpoint, from its (or its base model's) config files."""
    folder = config_folder(src)
    return folder_family(folder) if folder is not None else None


def export_command(options) -> Path:
    """`dreambooth export SRC --format kohya|single-file|diffusers --out PATH [--half] [--merge-lora FILE[:W]]`.

    `options`: a command_options.ExportOptions.
    """
    src, out, fmt, half = Path(options.src), Path(options.out), options.format, bool(options.half)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt} is not one of {', '.join(FORMATS)}.")
    problems = Problems()  # what SRC and each --merge-lora are, in one message
    loras = [spec for spec in (problems.check(parse_lora_spec, text, "--merge-lora") for text in options.merge_lora)
             if spec]
    for path, _ in loras:
        problems.check(check_lora_source, path, "--merge-lora")  # a full model given as a LoRA: what to pass
    kind = problems.check(source_kind, src)
    problems.raise_if_any("export")
    if kind == "model" or (kind == "lora-checkpoint" and fmt == "single-file"):
        own = [(src / LORA_FILE, 1.0)] if kind == "lora-checkpoint" else []
        for path, _ in own + loras:  # a LoRA made for another model is refused before any weights load
            check_lora_fits(find_lora_file(path), src, "SRC")
    if kind == "lora-checkpoint":  # its LoRA as it is, or fused into its base model for one file
        kind = "model" if fmt == "single-file" else "lora"
    family, flow = None, False
    if kind == "lora":
        if loras:
            raise UserError(f"--merge-lora merges LoRAs into a full model, but SRC {src} is a LoRA. Pass the base "
                            "model folder as SRC, and this LoRA as --merge-lora.")
        if fmt == "single-file":
            raise UserError(f"SRC {src} is a LoRA, which holds only adapter weights; to bake it into a full model "
                            f"use `dreambooth export BASE_MODEL --format single-file --merge-lora {src} --out "
                            "FILE.safetensors`.")
        path, what = export_lora(src, out, fmt, half)
    else:
        if fmt == "kohya":
            raise UserError(f"SRC {src} is a full model; the kohya format is for LoRA files. Use --format "
                            "single-file for a full model (A1111/ComfyUI), or --format diffusers.")
        family = source_family(src)
        flow = family is not None and family.denoiser == "transformer"
        with quiet_progress_bars():
            if fmt == "single-file" and flow:
                path, what = flow_to_single_file(src, out, half=half, loras=loras), "single-file transformer"
            elif fmt == "single-file":
                path, what = to_single_file(src, out, half=half, loras=loras), "single-file checkpoint"
            elif flow:
                path, what = merge_flow_loras(src, loras, out, half=half), "diffusers model"
            else:
                path, what = merge_lora(src, loras, out, half=half), "diffusers model"
    print(f"wrote {what} {path} ({human_size(path_size(path))})")
    header = read_metadata(path) if path.is_file() else {}
    flux_kohya = fmt == "kohya" and header.get("ss_network_module") == "networks.lora_flux"
    embedded = json.loads(header.get("dreambooth.embedding_files", "{}"))
    if flux_kohya and outside_blocks(path):
        print(f"note: diffusers 0.42's FluxPipeline.load_lora_weights drops the adapters of {KOHYA_DROPPED} from a "
              "kohya file (ComfyUI and Forge read them); in diffusers, load the diffusers-format LoRA instead.")
    if embedded:
        if flux_kohya:
            print(f"note: the new token(s) {', '.join(embedded)} are not in the kohya file (diffusers' kohya Flux "
                  f"reader refuses A1111's bundled embeddings); they are beside it, in {token_file_for(path).name} "
                  "(this tool's loaders) and in a textual-inversion file per token.")
        elif fmt == "kohya":
            print(f"note: the kohya file carries the new token(s) {', '.join(embedded)} itself (A1111 and Forge read "
                  "its bundled embeddings; write the token in the prompt as trained).")
        print(embedding_note(path, embedded))
    if kind == "model" and fmt == "single-file" and flow:
        print(left_out_note(family, src))
    if kind == "model" and fmt == "single-file" and prediction_type(model_folder(src)) == "v_prediction":
        print("note: this model predicts v (v_prediction), which a single file does not record; A1111 needs a "
              "config .yaml with `parameterization: v` beside it, ComfyUI a v_prediction sampling node.")
    return path
