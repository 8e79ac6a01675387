"""`dreambooth evaluate`: the DreamBooth paper's metrics of a trained subject, with local CLIP and DINO weights (the
folders as given, or found in the hub cache: `evaluation.scorers`).

Ruiz et al. 2023 (DreamBooth), sec. 4.1:

- DINO: cosine similarity between the ViT CLS embeddings (DINO ViT-S/16 in the paper) of a generated image and
  a real photo of the subject, averaged over all pairs. Subject fidelity; unlike CLIP, DINO is not trained to
  ignore what tells two members of a class apart.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: cosine similarity between the CLIP embeddings of a generated image and of its prompt, with the
  identifier replaced by the class word (the text encoder has never seen the identifier). Prompt fidelity.

`score_images` is the library entry point; `evaluate_command` is the CLI around it.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from dreambooth.errors import Problems, UserError
from dreambooth.evaluation.scorers import (
    CLIP_EXAMPLE,
    KINDS,
    ScorerFolder,
    find_in_hub_cache,
    folder_problem,
    missing_note,
    nothing_to_measure,
)
from dreambooth.formats.lora import check_lora_source, parse_lora_spec
from dreambooth.formats.lora_fit import check_lora_fits
from dreambooth.models.loading import pick_device
from dreambooth.options import check_settings
from dreambooth.training.images import IMAGE_EXTENSIONS, load_image, scan_image_folder

# A scorer maps (generated images, their prompts) to named columns of one value per image. Columns from
# `extra_scorers` (e.g. a built-in world's own measures) are averaged per prompt and overall like DINO and CLIP.
Scorer = Callable[[list[Image.Image], list[str]], dict[str, list[float]]]

LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
GRID_NAME = "grid.png"  # written by generate.save_images beside the images; it is not one of them


# ---------------------------------------------------------------------------------------------- pure helpers


def class_prompt_for(prompt: str, identifier: str, class_word: str) -> str:
    """The prompt that CLIP-T compares an image with: the subject named by its class word only.

    Each whole-word occurrence of the identifier (case-insensitive; `sks` or `<saya_token>`) is dropped when
    the class word (or its plural) follows it, and replaced by the class word otherwise. An article `a`/`an`
    just before it is re-chosen, by spelling, for the class word that now follows:
    "a photo of sks dog" -> "a photo of dog", "an sks dog" -> "a dog", "<saya_token> on a beach" (girl) ->
    "girl on a beach", "a sks owl" -> "an owl". A prompt without the identifier is returned unchanged.
    """
    if not identifier:
        return prompt
    word = re.escape(class_word)
    pattern = re.compile(rf"(?:\b(?P<article>an?)\s+)?(?<![\w<>]){re.escape(identifier)}(?![\w<>])"
                         rf"(?:\s+(?P<cls>{word}(?:e?s)?)(?![\w>]))?", re.IGNORECASE)

    def replace(match: re.Match) -> str:
        subject = match.group("cls") or class_word
        article = match.group("article")
        if not article:
            return subject
        fixed = "an" if subject[:1].lower() in "aeiou" else "a"
        return f"{fixed.capitalize() if article[0].isupper() else fixed} {subject}"

    return pattern.sub(replace, prompt)


def mean_cosine(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """For each generated embedding (row), its cosine similarity to every real embedding, averaged: shape (N,)."""
    a = torch.nn.functional.normalize(generated.float(), dim=-1)
    b = torch.nn.functional.normalize(real.float(), dim=-1)
    return (a @ b.T).mean(dim=1)


def summarize(columns: dict[str, list[float]], prompts: list[str]) -> dict:
    """Per-prompt means (prompts in first-seen order) and overall means over all images.

    The overall mean is over images, as in the paper, so it equals the image-weighted mean of the per-prompt
    values; with every image compared to every real photo it is also the mean over all pairs.
    """
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    per_prompt = {prompt: {"images": len(rows), **{name: _mean(values[i] for i in rows)
                                                   for name, values in columns.items()}}
                  for prompt, rows in groups.items()}
    overall = {"images": len(prompts), "prompts": len(groups),
               **{name: _mean(values) for name, values in columns.items()}}
    return {"per_prompt": per_prompt, "overall": overall}


def _mean(values) -> float | None:
    """Mean of the values that apply (a scorer gives None for an image its measure says nothing about)."""
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def format_table(metrics: dict) -> str:
    """The per-prompt rows and the overall row, aligned, three decimals."""
    names = [k for k, v in metrics["overall"].items() if k not in ("images", "prompts") and
             (v is None or isinstance(v, float))]
    rows = [[prompt, str(row["images"]), *(_cell(row[n]) for n in names)]
            for prompt, row in metrics["per_prompt"].items()]
    overall = metrics["overall"]
    rows.append([f"overall ({overall['prompts']} prompts)", str(overall["images"]),
                 *(_cell(overall[n]) for n in names)])
    header = ["prompt", "images", *(LABELS.get(n, n) for n in names)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])])


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------- models


def _image_processor_options() -> dict:
    """The options that select the PIL image processor in this transformers version."""
    # The torchvision processors resize slightly differently, so scores would depend on whether torchvision
    # (not a dependency) is installed; PIL preprocessing is what CLIP and DINO were evaluated with.
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"backend": "pil"} if major >= 5 else {"use_fast": False}


def _load(folder: Path, flag: str, device: torch.device, *, tokenizer: bool = False) -> SimpleNamespace:
    """The model (eval mode, fp32, on `device`), its image processor and, if asked, its tokenizer."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    try:
        # fp32 whatever the saved dtype (transformers 5 loads the saved dtype by default): scores are small
        # differences of cosines, and these models are small next to Stable Diffusion.
        model = AutoModel.from_pretrained(str(folder)).float().to(device).eval()
        processor = AutoImageProcessor.from_pretrained(str(folder), **_image_processor_options())
        tok = AutoTokenizer.from_pretrained(str(folder)) if tokenizer else None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"could not load {flag} {folder}: {e}") from None
    return SimpleNamespace(model=model, processor=processor, tokenizer=tok)


def _features(output) -> torch.Tensor:
    """transformers 4.x returns the projected CLIP embedding; 5.x returns an output holding it as pooler_output."""
    return output if torch.is_tensor(output) else output.pooler_output


@torch.no_grad()
def embed_images(loaded: SimpleNamespace, images: list[Image.Image], encode: Callable, batch_size: int = 32):
    """`encode(pixel_values)` over the images in batches, after the folder's own preprocessing: (N, D) on CPU."""
    device = next(loaded.model.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = loaded.processor(images=images[start:start + batch_size], return_tensors="pt")["pixel_values"]
        chunks.append(encode(pixels.to(device)).float().cpu())
    return torch.cat(chunks)


def dino_scores(images: list[Image.Image], real: list[Image.Image], dino_dir: Path, device) -> dict[str, list[float]]:
    """DINO per generated image: mean cosine of its CLS embedding to those of the real photos."""
    dino = _load(dino_dir, "--dino", device)

    def cls(pixels):
        return dino.model(pixel_values=pixels).last_hidden_state[:, 0]

    return {"dino": mean_cosine(embed_images(dino, images, cls), embed_images(dino, real, cls)).tolist()}


@torch.no_grad()
def clip_scores(images: list[Image.Image], class_prompts: list[str], real: list[Image.Image], clip_dir: Path,
                device) -> dict[str, list[float]]:
    """CLIP-I (image vs real photos, mean over photos) and CLIP-T (image vs its class prompt) per generated image."""
    clip = _load(clip_dir, "--clip", device, tokenizer=True)
    if not hasattr(clip.model, "get_text_features"):
        raise UserError(f"--clip {clip_dir} holds a {type(clip.model).__name__}, which has no text tower; CLIP-T "
                        f"needs {CLIP_EXAMPLE} with both towers (CLIPModel).")

    def image_features(pixels):
        return _features(clip.model.get_image_features(pixel_values=pixels))

    generated = embed_images(clip, images, image_features)
    texts = list(dict.fromkeys(class_prompts))
    tokens = clip.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                            max_length=clip.model.config.text_config.max_position_embeddings)
    text = _features(clip.model.get_text_features(input_ids=tokens.input_ids.to(device),
                                                  attention_mask=tokens.attention_mask.to(device))).float().cpu()
    per_image_text = text[[texts.index(p) for p in class_prompts]]
    return {"clip_i": mean_cosine(generated, embed_images(clip, real, image_features)).tolist(),
            "clip_t": torch.nn.functional.cosine_similarity(generated, per_image_text, dim=-1).tolist()}


def score_images(images: list[Image.Image], prompts: list[str], real: list[Image.Image], *, identifier: str,
                 class_word: str, clip_dir: Path | None = None, dino_dir: Path | None = None, device=None,
                 extra_scorers: Sequence[Scorer] = ()) -> dict:
    """DINO, CLIP-I and CLIP-T of generated images (with the prompts that made them) against the real photos.

    Returns {"per_prompt": {prompt: {"images", "class_prompt", "dino", "clip_i", "clip_t"}}, "overall": {...}};
    a metric is present when its folder is given. Each of `extra_scorers` adds columns of its own, averaged the
    same way.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not images or not real:
        raise UserError("nothing to score: need at least one generated image and one real photo.")
    if clip_dir is None and dino_dir is None and not extra_scorers:
        raise UserError("nothing to measure: pass --clip DIR (CLIP-I and CLIP-T) and/or --dino DIR (DINO).")
    device = pick_device(str(device) if device else None)
    class_prompts = [class_prompt_for(p, identifier, class_word) for p in prompts]
    columns: dict[str, list[float]] = {}
    if dino_dir is not None:
        columns.update(dino_scores(images, real, Path(dino_dir), device))
    if clip_dir is not None:
        columns.update(clip_scores(images, class_prompts, real, Path(clip_dir), device))
    for scorer in extra_scorers:
        columns.update(scorer(images, prompts))
    metrics = summarize(columns, prompts)
    if clip_dir is not None:
        for prompt, class_prompt in zip(prompts, class_prompts):
            metrics["per_prompt"][prompt]["class_prompt"] = class_prompt
    return metrics


# ---------------------------------------------------------------------------------------------- inputs


def check_real_folder(folder: Path):
    """The subject's photos in `folder`, checked (a folder holding at least one usable image); their scan report."""
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"--real {folder} {state}. Pass the folder of the subject's real photos (the instance "
                        "images the model was trained on).")
    report = scan_image_folder(folder, 0, check_duplicates=False)
    if not report.usable:
        listed = ", ".join(f"{issue.path.name} ({issue.reason})" for issue in report.rejected()[:10])
        raise UserError(f"--real {folder} holds no usable image{': ' + listed if listed else ''}. Pass the folder "
                        "of the subject's real photos (the instance images the model was trained on).")
    return report


def load_real_images(folder: Path) -> list[Image.Image]:
    """The subject's photos, decoded to RGB; unusable files are skipped with a note, none usable is an error."""
    report = check_real_folder(folder)
    for issue in report.rejected():
        print(f"note: --real: skipped {issue.path.name} ({issue.reason})")
    return [load_image(path) for path in report.usable]


def generated_image_paths(folder: Path) -> list[Path]:
    """The images in a `dreambooth generate` output folder, without its grid.png."""
    if not folder.is_dir():
        raise UserError(f"--images {folder} does not exist. Pass a folder written by `dreambooth generate`, or "
                        "use --model to generate the images here.")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith(".") and p.name != GRID_NAME)
    if not paths:
        raise UserError(f"--images {folder} holds no images. Generate some with `dreambooth generate --out "
                        f"{folder} ...`, or use --model to generate them here.")
    return paths


def read_generated(paths: list[Path]) -> tuple[list[Image.Image], list[str]]:
    """Each image and its prompt, read from the 'dreambooth' metadata that `dreambooth generate` writes.

    Images of more than one model (or set of LoRAs) are refused: their scores would be averaged as one model's.
    """
    images, prompts, sources = [], [], {}
    for path in paths:
        images.append(load_image(path))
        with Image.open(path) as opened:
            text = (getattr(opened, "text", None) or {}).get("dreambooth")
        try:
            meta = json.loads(text)
            prompts.append(str(meta["prompt"]))
        except (TypeError, ValueError, KeyError):
            raise UserError(f"{path} carries no prompt in its metadata (the 'dreambooth' PNG text that "
                            "`dreambooth generate` writes), so CLIP-T cannot know what it was asked to show. "
                            "Generate the images with `dreambooth generate`, or use --model.") from None
        source = json.dumps([meta.get("model"), meta.get("loras") or []])
        sources.setdefault(source, path.name)
    if len(sources) > 1:
        described = "; ".join(f"{json.loads(k)[0]} {json.loads(k)[1] or ''} (e.g. {v})".replace(" ()", "")
                              for k, v in list(sources.items())[:3])
        raise UserError(f"the images in {paths[0].parent} come from {len(sources)} different models or LoRA sets "
                        f"({described}); their scores would be averaged as one model's. Evaluate each model's images "
                        "in a folder of their own.")
    return images, prompts


def _generate(options) -> list[Path]:
    """The --model images, made by `dreambooth generate` itself into OUT/images (settings.json beside them)."""
    from dreambooth.generate import generate_command

    return generate_command(options.generate_options())


def _uses_world_model(options) -> bool:
    """True when the images come from the built-in world model (or a model trained from it): add its measures."""
    from dreambooth.evaluation.world_model import is_world_model

    model = options.model
    if model is None and options.images is not None and (options.images / "settings.json").is_file():
        try:
            model = json.loads((options.images / "settings.json").read_text()).get("model")
        except ValueError:
            model = None
    return bool(model) and is_world_model(model)


def choose_scorers(clip: Path | None, dino: Path | None, world: bool) -> dict[str, ScorerFolder | None]:
    """The folder each measure scores with: as given (checked from its files), else a complete one found in the hub
    cache. On the built-in world (or a model trained from it) nothing is searched: its own measures are what its
    evaluations report, and a found CLIP would add columns to them."""
    chosen: dict[str, ScorerFolder | None] = {}
    for kind, given in (("clip", clip), ("dino", dino)):
        flag = KINDS[kind].flag
        if given is not None:
            if problem := folder_problem(Path(given), kind):
                raise UserError(f"{flag} {given} {problem}")
            chosen[kind] = ScorerFolder(Path(given), flag)
        else:
            chosen[kind] = None if world else find_in_hub_cache(kind)
    if not world and not any(chosen.values()):
        raise UserError(nothing_to_measure())
    return chosen


def say_scorers(scorers: dict[str, ScorerFolder | None], world: bool) -> None:
    """Which folder each measure uses when none was given, and what a missing one would add."""
    for kind, scorer in scorers.items():
        if scorer is not None and scorer.source != KINDS[kind].flag:
            print(f"{KINDS[kind].label}: {scorer.source}, {scorer.folder} (pass {KINDS[kind].flag} DIR to use another)")
        elif scorer is None and not world:
            print(missing_note(kind))


def check_inputs(options) -> tuple[bool, dict[str, ScorerFolder | None]]:
    """Everything about an evaluation that can be wrong, before photos, images or weights load, in one message:
    whether the built-in world's measures apply, and the CLIP and DINO folders."""
    problems = Problems()
    world = _uses_world_model(options)
    scorers = problems.check(choose_scorers, options.clip, options.dino, world)
    problems.found += _option_problems(options)
    for spec in options.lora if options.model is not None else ():
        lora = problems.check(parse_lora_spec, spec)
        source = problems.check(check_lora_source, lora[0]) if lora else None
        if source is not None:
            problems.check(check_lora_fits, source, options.model)
    problems.check(check_real_folder, options.real)
    if options.images is not None:
        problems.check(generated_image_paths, options.images)
    problems.raise_if_any("evaluate")
    return world, scorers


def _option_problems(options) -> list[str]:
    """What is wrong with the options among themselves."""
    found = []
    if not options.identifier.strip() or not options.class_word.strip():
        found.append("--identifier and --class-word must not be empty (e.g. --identifier sks --class-word dog).")
    if options.images is not None and (options.prompt or options.prompts_file or options.lora or options.seeds):
        found.append("--prompt, --prompts-file, --lora and --seed choose what --model generates; with --images each "
                     "image's prompt is read from its metadata. Drop them, or use --model.")
    if (options.out / "metrics.json").is_file() and not options.overwrite:
        found.append(f"--out {options.out} holds the results of an earlier evaluation (metrics.json); choose another "
                     "--out, or pass --overwrite to replace them.")
    return found


def evaluate_command(options) -> dict:
    """`dreambooth evaluate`: check every input, get the images, score them, print the table, write metrics.json.

    `options`: a command_options.EvaluateOptions.
    """
    from dreambooth.formats.atomic import write_json_atomic
    from dreambooth.versions import library_versions

    check_settings(options)
    if options.checkpoints == "all":
        return evaluate_checkpoints(options)
    world, scorers = check_inputs(options)
    say_scorers(scorers, world)
    real = load_real_images(options.real)
    paths = generated_image_paths(options.images) if options.images is not None else _generate(options)
    images, prompts = read_generated(paths)
    missing = sorted({p for p in prompts if class_prompt_for(p, options.identifier, options.class_word) == p})
    if missing:
        print(f"note: {len(missing)} prompt(s) do not contain the identifier '{options.identifier}' and are scored as "
              f"written: {'; '.join(missing[:3])}")
    extra = []
    if world:
        from dreambooth.evaluation.world import score_columns

        extra.append(score_columns)
    clip, dino = scorers["clip"], scorers["dino"]
    scores = score_images(images, prompts, real, identifier=options.identifier, class_word=options.class_word,
                          clip_dir=clip and clip.folder, dino_dir=dino and dino.folder, device=options.device,
                          extra_scorers=extra)
    metrics = {
        "inputs": {"real": str(options.real), "real_images": len(real),
                   "images": str(options.images if options.images is not None else options.out / "images"),
                   "generated_images": len(images), "model": str(options.model) if options.model else None,
                   "loras": list(options.lora), "clip": str(clip.folder) if clip else None,
                   "clip_source": clip and clip.source, "dino": str(dino.folder) if dino else None,
                   "dino_source": dino and dino.source, "identifier": options.identifier,
                   "class_word": options.class_word},
        **scores,
        "versions": library_versions(),
    }
    write_json_atomic(options.out / "metrics.json", metrics)
    print(format_table(metrics))
    print(f"wrote {options.out / 'metrics.json'}")
    return metrics


def evaluate_checkpoints(options) -> dict:
    """`evaluate --model RUN_DIR --checkpoints all`: each checkpoint and the final model scored as `evaluate --model`
    would (into OUT/NAME/), the best named (training.report.best_checkpoint), the table written into the run folder
    for its report."""
    from dataclasses import replace

    from dreambooth.formats.atomic import write_json_atomic
    from dreambooth.training.report import EVALUATION_FILE, best_checkpoint, gather
    from dreambooth.training.report_page import write_report
    from dreambooth.versions import library_versions

    run_dir = options.model
    if run_dir is None:
        raise UserError("--checkpoints all scores the checkpoints of a run: pass its output folder as --model.")
    facts = gather(run_dir)
    if not facts.checkpoints:
        raise UserError(f"--model {run_dir} holds no checkpoint-N folder and no final model yet; nothing to score.")
    info = facts.info or {}
    lora = info.get("method") == "lora" or (run_dir / "pytorch_lora_weights.safetensors").is_file()
    if lora and not info.get("base_model"):
        raise UserError(f"--model {run_dir} is a LoRA run without run_info.json, so its base model is unknown; "
                        "score each checkpoint with `dreambooth evaluate --model BASE --lora CHECKPOINT`.")
    each = {}
    for c in facts.checkpoints:
        model, loras = (Path(info["base_model"]), [str(c.path), *options.lora]) if lora else (c.path, options.lora)
        each[c.name] = replace(options, model=model, lora=loras, checkpoints=None, out=options.out / c.name)
        check_inputs(each[c.name])  # every checkpoint's problems before the first one is drawn
    entries = []
    for c in facts.checkpoints:
        print(f"\n{c.name} (step {c.step}):")
        metrics = evaluate_command(each[c.name])
        entries.append({"name": c.name, "step": c.step, "path": str(c.path), "metrics": metrics["overall"],
                        "metrics_file": str(options.out / c.name / "metrics.json")})
    best, why = best_checkpoint(entries)
    record = {"run": str(run_dir), "checkpoints": entries, "best": best, "why": why, "versions": library_versions()}
    write_json_atomic(run_dir / EVALUATION_FILE, record)
    write_json_atomic(options.out / "checkpoints.json", record)
    print("\n" + format_checkpoints(entries, best))
    chosen = next((e for e in entries if e["name"] == best), None)
    if chosen is not None:
        print(f"best: {best} ({why}); export that one: dreambooth export {chosen['path']} ...")
    print(f"wrote {run_dir / EVALUATION_FILE} and {options.out / 'checkpoints.json'}")
    try:
        print(f"run report: {write_report(run_dir)}")
    except (OSError, ValueError) as e:
        print(f"warning: the run report was not rebuilt ({e}); `dreambooth report {run_dir}` retries")
    return record


def format_checkpoints(entries: list[dict], best: str | None) -> str:
    """One row per checkpoint: its step and overall measures, the best one marked."""
    names = [k for k in dict.fromkeys(k for e in entries for k, v in e["metrics"].items()
                                      if k not in ("images", "prompts") and isinstance(v, float))]
    header = ["checkpoint", "step", *(LABELS.get(n, n) for n in names)]
    rows = [[e["name"] + (" *" if e["name"] == best else ""), str(e["step"]),
             *(_cell(e["metrics"].get(n)) for n in names)] for e in entries]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))])
             for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], "* best"])
