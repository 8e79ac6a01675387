"""`dreambooth export`: what SRC is, which writer of `dreambooth.formats` makes the asked format, what to say.

The writers, each reading safetensors only and writing atomically: `formats.kohya.lora_to_kohya` (a LoRA for
A1111/Forge/ComfyUI), `formats.lora.copy_lora` (a diffusers LoRA as it is), `formats.single_file.to_single_file`
(a model as one original-layout file) and `formats.merge.merge_lora` (LoRAs baked into a diffusers folder).
"""

from __future__ import annotations

import json
from pathlib import Path

from dreambooth.errors import Problems, UserError
from dreambooth.formats.kohya import lora_to_kohya
from dreambooth.formats.lora import (
    check_lora_source,
    copy_lora,
    find_lora_file,
    is_kohya,
    parse_lora_spec,
    read_metadata,
    read_safetensors,
    refuse_pickle,
)
from dreambooth.formats.lora_fit import check_lora_fits
from dreambooth.formats.merge import merge_lora, model_folder
from dreambooth.formats.single_file import embedding_note, prediction_type, to_single_file
from dreambooth.models.base import (
    CHECKPOINT_STATE,
    LORA_FILE,
    SINGLE_FILE_TO_FOLDER,
    file_kind,
    safetensors_metadata,
)
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
    if kind == "lora":
        if loras:
            raise UserError(f"--merge-lora merges LoRAs into a full model, but SRC {src} is a LoRA. Pass the base "
                            "model folder as SRC, and this LoRA as --merge-lora.")
        if fmt == "single-file":
            raise UserError(f"SRC {src} is a LoRA, which holds only adapter weights; to bake it into a full model "
                            f"use `dreambooth export BASE_MODEL --format single-file --merge-lora {src} --out "
                            "FILE.safetensors`.")
        if fmt == "diffusers" and is_kohya(read_safetensors(find_lora_file(src))[0]):
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
    print(f"wrote {what} {path} ({human_size(path_size(path))})")
    embedded = json.loads(read_metadata(path).get("dreambooth.embedding_files", "{}")) if path.is_file() else {}
    if embedded:
        if fmt == "kohya":
            print(f"note: the kohya file carries the new token(s) {', '.join(embedded)} itself (A1111 and Forge read "
                  "its bundled embeddings; write the token in the prompt as trained).")
        print(embedding_note(path, embedded))
    if kind == "model" and fmt == "single-file" and prediction_type(model_folder(src)) == "v_prediction":
        print("note: this model predicts v (v_prediction), which a single file does not record; A1111 needs a "
              "config .yaml with `parameterization: v` beside it, ComfyUI a v_prediction sampling node.")
    return path
