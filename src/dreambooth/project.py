"""`dreambooth init`: a project folder ready for photos, with the config file of docs/design.md."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from dreambooth.config_file import resolve_model_ref
from dreambooth.errors import UserError
from dreambooth.formats.atomic import write_text_atomic
from dreambooth.models.base import is_hub_id
from dreambooth.models.families import folder_family

PROJECT_README = """# DreamBooth project: {identifier} {class_word}

1. Put 3-10 photos of your subject in `data/instance/` (JPEG/PNG/WebP; varied backgrounds and poses,
   the subject clearly visible, at least {resolution} px on the short side).
2. {model_step}
3. Train: `dreambooth train --config config.yaml` (any option can be overridden, e.g. `--max_train_steps 400`).
   Class images for prior preservation are generated into `data/class/` the first time and reused.
4. Generate: `dreambooth generate --model output --prompt "a photo of {identifier} {class_word} on a beach"`.

Prompts: `prompts/instance.txt` and `prompts/class.txt` (first non-comment line; `{{identifier}}` and
`{{class_word}}` are filled in from `config.yaml`).

The trained subject as a character: `characters.yaml` (its look, style, negative prompt, seed policy).
`dreambooth compile-prompt --character NAME --state state.json` turns a state (emotion, action, location, ...;
`--schema` prints them all) into the prompt, settings and seed of a picture.
"""


def project_config(identifier: str, class_word: str, model: str | None) -> dict:
    """The config.yaml that init writes: the sections of docs/design.md, with prior preservation on."""
    return {
        "model": {"pretrained_model": model, "train_denoiser": True, "train_text_encoder": False},
        "token": {"identifier": identifier, "initializer": class_word, "class_word": class_word},
        "training": {"resolution": 512, "batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 5e-6,
                     "max_train_steps": 800, "prior_loss_weight": 1.0, "mixed_precision": "no", "seed": 0},
        "dataset": {"instance_dir": "data/instance", "class_dir": "data/class", "with_prior_preservation": True,
                    "num_class_images": 200},
        "validation": {"prompts": [f"a photo of {identifier} {class_word} on a beach"], "steps": 200},
        "output": {"output_dir": "output", "checkpointing_steps": 200, "checkpoints_total_limit": 2},
    }


def project_characters(identifier: str, class_word: str, model: str | None = None) -> dict:
    """The characters.yaml that init writes: the subject as a character of the trained model (`output`). Size,
    steps, guidance and sampler are left to the model's family (null); a Flux model draws without a negative
    prompt, so its character has none."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", identifier).strip("_") or "character"
    family = folder_family(model) if model else None
    negative = None if family is not None and family.name == "flux" else "blurry, lowres"
    return {"characters": [{
        "name": name, "model": "output", "identifier": identifier, "class_word": class_word,
        "appearance": [], "style": None, "negative_prompt": negative,
        "width": None, "height": None,  # null: the size the trained model was made for (SDXL 1024, SD 1.x 512)
        "steps": None, "guidance": None, "scheduler": None,  # null: the family's (SD: 30, 7.5, dpm++)
        "seed_policy": "state", "seed": 0}]}


def init_project(directory: Path, *, identifier: str, class_word: str, model: str | None,
                 force: bool = False) -> None:
    """Writes data/instance, data/class, prompts/, config.yaml and a README; never overwrites without --force.

    `model` is written into config.yaml as it is (a path there is read relative to the config file's folder);
    None leaves the key for the user to set."""
    config = directory / "config.yaml"
    if config.exists() and not force:
        raise UserError(f"{config} already exists; pass --force to overwrite it (photos and prompts are kept).")
    if not class_word.strip() or not identifier.strip():
        raise UserError("--identifier and --class-word must not be empty.")
    for sub in ("data/instance", "data/class", "prompts"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    prompts = {"instance.txt": "a photo of {identifier} {class_word}", "class.txt": "a photo of a {class_word}"}
    for name, text in prompts.items():
        path = directory / "prompts" / name
        if not path.exists():
            path.write_text(f"# first non-comment line is used\n{text}\n", encoding="utf-8")
    cfg = project_config(identifier, class_word, model)
    write_text_atomic(config, yaml.safe_dump(cfg, sort_keys=False))
    characters = directory / "characters.yaml"
    if not characters.exists():  # the user's characters are kept, as the prompts are, even with --force
        header = "# Characters for `dreambooth compile-prompt` (`--schema` prints the state it reads).\n"
        write_text_atomic(characters, header + yaml.safe_dump(project_characters(identifier, class_word, model),
                                                              sort_keys=False))
    model_step = (f"The base model is `{model}` (`model.pretrained_model` in `config.yaml`)." if model else
                  "Set `model.pretrained_model` in `config.yaml` to a Stable Diffusion folder in diffusers format.")
    readme = directory / "README.md"
    if not readme.exists() or force:
        write_text_atomic(readme, PROJECT_README.format(identifier=identifier, class_word=class_word, resolution=512,
                                                        model_step=model_step))
    todo = "" if model else f"set model.pretrained_model in {config}, "
    print(f"project written to {directory}: put photos in {directory / 'data/instance'}, {todo}then "
          f"`dreambooth train --config {config}`")


def model_for_config(model: str, directory: Path) -> str:
    """`init --model` as config.yaml holds it. The argument is read as every path argument is, relative to where
    the command runs; the config file's paths are relative to its own folder, so a folder is written relative to
    the project when it lies inside it, else absolute. A hub id stays one; anything else must exist."""
    resolved = resolve_model_ref(model, Path.cwd())
    if is_hub_id(resolved):
        return resolved
    path = Path(resolved)
    if not path.exists():
        raise UserError(f"--model {model}: {path} does not exist. Give a diffusers model folder (relative to where "
                        "you run the command, or absolute) or a hub id such as stabilityai/stable-diffusion-2-1-base; "
                        "or leave --model out and set model.pretrained_model in config.yaml later.")
    project = Path(os.path.abspath(directory))
    return os.path.relpath(path, project) if path.is_relative_to(project) else str(path)


def init_command(options) -> None:
    """`dreambooth init`: `options` is a command_options.InitOptions."""
    model = None if options.model is None else model_for_config(options.model, options.dir)
    init_project(options.dir, identifier=options.identifier, class_word=options.class_word, model=model,
                 force=options.force)
