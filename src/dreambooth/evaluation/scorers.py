"""The CLIP and DINO folders `dreambooth evaluate` scores with: one the user names (--clip, --dino), checked from its
files before anything loads; when none is named, a complete one already in the Hugging Face hub cache; when there
is none, exactly what to get and where it goes. Nothing is ever downloaded.

The paper's measures (Ruiz et al. 2023, sec. 4.1) use a DINO ViT-S/16 and CLIP; any transformers CLIPModel folder
(both towers' weights, tokenizer, image processor) and any DINO ViT or Dinov2 folder with its image processor will
do, as save_pretrained writes them or as `hf download` leaves them in the hub cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 4.x / 5.x save_pretrained
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
CLIP_EXAMPLE = "a CLIP model (e.g. openai/clip-vit-base-patch32)"
DINO_EXAMPLE = "a DINO ViT (e.g. facebook/dino-vits16, the paper's DINO ViT-S/16)"


@dataclass(frozen=True)
class Kind:
    """A measure's model: its flag, what it must be, and the hub models commonly used for it, in the order a search
    of the hub cache prefers them (the first is the one messages suggest downloading)."""

    flag: str
    label: str
    measures: str
    example: str
    needs: str
    repos: tuple[str, ...]


KINDS = {
    "clip": Kind("--clip", "CLIP", "CLIP-I and CLIP-T", CLIP_EXAMPLE,
                 "a CLIP model folder (CLIPModel: both towers' weights, its tokenizer and its image processor, as "
                 "save_pretrained writes them), e.g. openai/clip-vit-base-patch32 or openai/clip-vit-large-patch14",
                 ("openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14")),
    "dino": Kind("--dino", "DINO", "DINO", DINO_EXAMPLE,
                 "a DINO ViT folder with its image processor, e.g. facebook/dino-vits16 (the paper's ViT-S/16) or a "
                 "Dinov2 one such as facebook/dinov2-small",
                 ("facebook/dino-vits16", "facebook/dino-vitb16", "facebook/dinov2-small", "facebook/dinov2-base")),
}
SAVED = "saved with save_pretrained (config.json, model.safetensors, preprocessor_config.json)"


@dataclass(frozen=True)
class ScorerFolder:
    """A folder a measure scores with, and where it came from ("--clip", or a hub model in the hub cache)."""

    folder: Path
    source: str


def hub_cache() -> tuple[Path, str]:
    """The Hugging Face hub cache as huggingface_hub finds it, and what set it: HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub. Read when asked: the library reads the variables once, when it is imported."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser(), "HF_HUB_CACHE"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub", "HF_HOME/hub"
    return Path(constants.HF_HUB_CACHE), "the default; HF_HUB_CACHE or HF_HOME move it"


def _tower_problem(config: dict, kind: str) -> str | None:
    """A model of the wrong kind for the measure, told from its config.json: CLIP needs both towers (a Stable Diffusion
    model's text encoder is CLIP's text tower alone), DINO an image model alone."""
    model_type = str(config.get("model_type", ""))
    name = f"a {(config.get('architectures') or [model_type or 'model'])[0]}"
    towers = ("text_config" in config, "vision_config" in config)
    if kind == "dino":
        if towers[0]:
            return f"holds {name} with a text tower; --dino needs {DINO_EXAMPLE}. Did you mean --clip?"
        return f"holds {name}, a text encoder; --dino needs {DINO_EXAMPLE}." if "text" in model_type else None
    if all(towers):
        return None
    if "text" in model_type:
        return (f"holds {name}, a text encoder without CLIP's vision tower (a Stable Diffusion model's text_encoder/ "
                "is one): CLIP-I and CLIP-T embed images, so they need the whole CLIP model, both towers (CLIPModel), "
                f"with its tokenizer and image processor, e.g. openai/clip-vit-large-patch14 (SD 1.x's text encoder "
                "is its text tower) or openai/clip-vit-base-patch32. Pass such a folder as --clip.")
    if "vision" in model_type:
        return (f"holds {name}, CLIP's vision tower alone; CLIP-T also needs its text tower. Pass the whole CLIP "
                "model (CLIPModel, with its tokenizer and image processor) as --clip.")
    return (f"holds {name}, not a CLIP model with a text and a vision tower; --clip needs {CLIP_EXAMPLE}."
            + (" Did you mean --dino?" if model_type in ("vit", "dinov2") else ""))


def folder_problem(folder: Path, kind: str) -> str | None:
    """What keeps `folder` from scoring `kind` ('clip' or 'dino'), said after the folder's name; None when it is a
    complete folder of that kind. Read from its files and config.json alone, before anything loads."""
    flag, what = KINDS[kind].flag, KINDS[kind].example
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        return f"{state}. Pass a local folder holding {what} {SAVED}; this tool never downloads weights."
    if (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
        tower = ": its text_encoder/ is CLIP's text tower alone, which cannot embed images" if kind == "clip" else ""
        return f"is a diffusers pipeline (model_index.json), not a scorer{tower}; {flag} needs {what} {SAVED}."
    if not (folder / "config.json").is_file():
        return f"has no config.json, so it is not a transformers model folder. Pass a folder holding {what} {SAVED}."
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"has a config.json that does not read ({e}); save the model there again with save_pretrained."
    if problem := _tower_problem(config if isinstance(config, dict) else {}, kind):
        return problem
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        return ("has config.json but no weights (model.safetensors). Save the model there with "
                "model.save_pretrained(DIR).")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        return ("has no preprocessor_config.json, so how images are resized and normalised for this model is "
                "unknown. Save the model's image processor there: AutoImageProcessor.from_pretrained(HUB_ID)"
                f".save_pretrained('{folder}').")
    if kind == "clip" and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return ("has no tokenizer (tokenizer.json or vocab.json), which CLIP-T needs to read prompts. Save it there: "
                f"AutoTokenizer.from_pretrained(HUB_ID).save_pretrained('{folder}').")
    return None


def _of_kind(folder: Path, repo_id: str, kind: str) -> bool:
    """Whether a hub model is one a search may pick for the measure: a CLIP model, or a ViT or Dinov2 whose name says
    DINO (a ViT trained with labels would measure something else)."""
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    if kind == "clip":
        return model_type == "clip"
    return model_type in ("vit", "dinov2") and "dino" in repo_id.lower()


def find_in_hub_cache(kind: str) -> ScorerFolder | None:
    """A complete model for the measure already in the hub cache (`models--ORG--NAME/snapshots/HASH/`, the revision
    refs/main names first), the commonly used ones first; None when there is none. Nothing is fetched."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(hub_cache()[0])
    except (CacheNotFound, OSError, ValueError):
        return None
    preferred = KINDS[kind].repos
    repos = sorted((r for r in cache.repos if r.repo_type == "model"),
                   key=lambda r: (preferred.index(r.repo_id) if r.repo_id in preferred else len(preferred), r.repo_id))
    for repo in repos:
        for revision in sorted(repo.revisions, key=lambda r: ("main" not in r.refs, -r.last_modified)):
            folder = Path(revision.snapshot_path)
            if _of_kind(folder, repo.repo_id, kind) and folder_problem(folder, kind) is None:
                return ScorerFolder(folder, f"{repo.repo_id} in the hub cache")
    return None


def nothing_to_measure() -> str:
    """The refusal when no folder was given and the hub cache holds none: what each measure wants, where such
    folders are commonly found, and how to get them."""
    cache, set_by = hub_cache()
    clip, dino = KINDS["clip"], KINDS["dino"]
    return (f"nothing to measure: no --clip or --dino was given, and the Hugging Face hub cache here ({cache}, "
            f"{set_by}) holds no complete CLIP or DINO model. evaluate needs, for {clip.measures}, {clip.needs}; for "
            f"{dino.measures}, {dino.needs}. On a connected machine `hf download {clip.repos[0]}` and `hf download "
            f"{dino.repos[0]}` put them in its hub cache (~/.cache/huggingface/hub/models--ORG--NAME/snapshots/HASH/); "
            "copy those models--* folders into the hub cache here and evaluate finds them, or pass any such folder as "
            "--clip DIR / --dino DIR.")


def missing_note(kind: str) -> str:
    """What a measure that found no folder would need, when the other one runs."""
    k = KINDS[kind]
    return (f"note: no {k.measures}: no {k.flag} was given and the hub cache ({hub_cache()[0]}) holds no {k.label} "
            f"model; it needs {k.needs} (`hf download {k.repos[0]}` on a connected machine, then copy its hub cache "
            f"folder here, or pass a folder as {k.flag} DIR).")
