"""Drawing images and saving them with what made them: `dreambooth generate`, and the same code for training-time
validation, class images and `evaluate --model`. Loading the pipeline is `models.loading`."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dreambooth.errors import Problems, UserError
from dreambooth.formats.atomic import atomic_file, write_json_atomic
from dreambooth.formats.lora import check_lora_source, parse_lora_spec
from dreambooth.formats.lora_fit import check_lora_fits
from dreambooth.formats.lora_loading import load_loras
from dreambooth.models.base import CHECKPOINT_STATE, check_model_folder, is_hub_id
from dreambooth.models.loading import load_pipeline, make_scheduler, model_family, pick_device, pick_dtype
from dreambooth.options import check_settings


@dataclass
class GenerationSettings:
    """Everything that decides the images, recorded in each PNG's metadata."""

    prompts: list[str]
    negative_prompt: str = ""
    steps: int | None = None  # None: the family's (models.families.common.Behaviour.draw_defaults)
    guidance: float | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    num_images: int = 1
    scheduler: str | None = None  # None: dpm++, or a flow-matching model's own sampler
    height: int | None = None
    width: int | None = None


def image_seed(seed: int, index: int) -> int:
    """The seed of the index-th image drawn for `seed`: the seed itself for the first, a hash of both for the rest.

    `seed + index` would make `--seed 0 --seed 1 --num-images 2` draw the image of seed 1 twice. The first image
    of a seed stays the one `--seed` alone gives, and every image's own seed is recorded, so `--seed` with it
    draws that image again.
    """
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generate_images(pipe, settings: GenerationSettings, *, batch_size: int = 4) -> list[tuple[Image.Image, dict]]:
    """Images for every prompt x seed x num_images, each with the settings that reproduce it.

    Each image gets its own generator, seeded with `image_seed(seed, k)`, so an image is the same whatever
    the batch it was drawn in.
    """
    settings = resolved_settings(pipe, settings)
    jobs = [(p, image_seed(s, k)) for p in settings.prompts for s in settings.seeds for k in range(settings.num_images)]
    results = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        gens = [torch.Generator(device=pipe.device).manual_seed(seed) for _, seed in chunk]
        out = pipe(
            prompt=[p for p, _ in chunk],
            negative_prompt=[settings.negative_prompt] * len(chunk) if settings.negative_prompt else None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            generator=gens,
            height=settings.height,
            width=settings.width,
        )
        for (prompt, seed), image in zip(chunk, out.images):
            meta = {"prompt": prompt, "negative_prompt": settings.negative_prompt, "seed": seed,
                    "steps": settings.steps, "guidance": settings.guidance, "scheduler": settings.scheduler,
                    "width": image.width, "height": image.height}
            results.append((image, meta))
    return results


def _lora_text(loras: list) -> str:
    return ", ".join(f"{Path(p).name}:{w:g}" for p, w in loras)


def png_info(meta: dict, model: str, loras: list | None = None) -> PngInfo:
    """A1111-style 'parameters' text, which image viewers and web UIs read, plus the exact JSON."""
    loras = [[str(p), w] for p, w in loras or []]
    info = PngInfo()
    text = (f"{meta['prompt']}\nNegative prompt: {meta['negative_prompt']}\nSteps: {meta['steps']}, "
            f"Sampler: {meta['scheduler']}, CFG scale: {meta['guidance']}, Seed: {meta['seed']}, "
            f"Size: {meta['width']}x{meta['height']}, Model: {model}")
    if loras:
        text += f", Lora: {_lora_text(loras)}"
    info.add_text("parameters", text)
    info.add_text("dreambooth", json.dumps({**meta, "model": model, "loras": loras}))
    return info


def grid_info(metas: list[dict], source: str, extra: dict | None = None) -> PngInfo:
    """Metadata of a grid of images: where they came from and every image's settings, in order."""
    info = PngInfo()
    first = metas[0] if metas else {}
    info.add_text("parameters", f"grid of {len(metas)} image(s) from {source}; first: {first.get('prompt')}, "
                                f"Seed: {first.get('seed')}, Steps: {first.get('steps')}")
    info.add_text("dreambooth", json.dumps({"source": source, **(extra or {}), "images": metas}))
    return info


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Images side by side in rows of `cols` (default: about square)."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def save_images(results: list[tuple[Image.Image, dict]], out_dir: Path, model: str, cols: int | None = None,
                loras: list | None = None) -> list[Path]:
    """Writes each image as a PNG with its settings in the metadata, and grid.png beside them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, meta) in enumerate(results):
        path = out_dir / f"{i:04d}-seed{meta['seed']}.png"
        with atomic_file(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=png_info(meta, model, loras))
        paths.append(path)
    grid = make_grid([img for img, _ in results], cols)
    with atomic_file(out_dir / GRID_NAME) as tmp:
        grid.save(tmp, format="PNG", pnginfo=grid_info([meta for _, meta in results], model, {"loras": [
            [str(p), w] for p, w in loras or []]}))
    return paths


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UserError(f"prompts file {prompts_file} does not exist.")
        prompts = prompts + [ln.strip() for ln in prompts_file.read_text(encoding="utf-8").splitlines()
                             if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError("no prompt given: pass --prompt 'a photo of sks dog' (repeatable) or --prompts-file FILE.")
    return prompts


# --------------------------------------------------------------------------------------------- the output folder

SETTINGS_FILE = "settings.json"
GRID_NAME = "grid.png"
_OWN_IMAGE = re.compile(r"^\d{4}-seed\d+\.png$")


def claim_image_folder(out: Path, overwrite: bool) -> None:
    """`--out` must be new, empty, or an earlier `generate` output replaced with --overwrite: never a mix.

    Two runs' images in one folder would be scored as one model by `evaluate --images`, and settings.json would
    describe only the last run.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the images.")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return
    own = {SETTINGS_FILE, GRID_NAME}
    if (out / SETTINGS_FILE).is_file():
        try:
            own |= set(json.loads((out / SETTINGS_FILE).read_text()).get("images") or [])
        except (ValueError, AttributeError):
            pass
    foreign = [p.name for p in entries if p.name not in own and not _OWN_IMAGE.match(p.name)]
    if foreign or not (out / SETTINGS_FILE).is_file():
        shown = ", ".join(sorted(foreign)[:5]) or ", ".join(sorted(p.name for p in entries)[:5])
        raise UserError(f"--out {out} holds files that `dreambooth generate` did not write ({shown}); images "
                        "written there would mix with them. Choose a new or empty folder.")
    if not overwrite:
        images = sum(1 for p in entries if _OWN_IMAGE.match(p.name))
        raise UserError(f"--out {out} holds the {images} image(s) of an earlier `dreambooth generate` run; new images "
                        "would mix with them (and `evaluate --images` would score both runs as one). Choose another "
                        "--out, or pass --overwrite to replace them.")
    for entry in entries:
        entry.unlink()


@dataclass
class GenerateJob:
    """One `dreambooth generate` (or `evaluate --model`) run: the model, LoRAs, settings and where the images go."""

    model: Path
    settings: GenerationSettings
    out: Path
    loras: list[tuple[Path, float]] = field(default_factory=list)
    precision: str | None = None
    device: str | None = None
    overwrite: bool = False


def check_job(job: GenerateJob, problems: Problems | None = None) -> None:
    """Everything about a job that can be wrong, found before any weights load, all in one message (`problems`: what
    the caller found already, e.g. a prompts file that does not read)."""
    problems = problems or Problems()
    s = job.settings  # steps, image count and seed ranges are declared with the options (command_options)
    problems.check(check_seeds, s.seeds)
    model_ok = ((Path(job.model) / CHECKPOINT_STATE).is_file() or is_hub_id(str(job.model))
                or problems.passes(check_model_folder, job.model))
    family = problems.check(model_family, job.model) if model_ok else None
    # an unknown name, or a sampler of the other objective, fails before the model loads
    problems.check(make_scheduler, s.scheduler, {"_class_name": family.train_scheduler} if family else {})
    for name, value in (("--height", s.height), ("--width", s.width)):
        problems.check(check_side, name, value, family.side_multiple if family else 8)
    if family is not None:
        problems.check(family.behaviour().check_drawing, s)
    for path, _ in job.loras:
        lora = problems.check(check_lora_source, path)  # a missing, pickle or full-model "LoRA"
        if lora is not None and model_ok:
            problems.check(check_lora_fits, lora, job.model)  # one made for another model
    problems.check(claim_image_folder, job.out, job.overwrite)
    problems.raise_if_any("generate")


def check_side(name: str, value: int | None, multiple: int = 8) -> None:
    if value is not None and (value < multiple or value % multiple):
        why = "the VAE needs sides divisible by 8" if multiple == 8 else \
            "the VAE shrinks 8x and the transformer reads 2x2 patches of latents"
        raise UserError(f"{name} {value} is not a multiple of {multiple}; {why} (e.g. "
                        f"{max(multiple, value // multiple * multiple)} or {value // multiple * multiple + multiple}).")


def check_seeds(seeds: list[int]) -> None:
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise UserError(f"--seed {repeated[0]} is given more than once; a seed draws the same images every time. "
                        "Give each seed once (--num-images draws more images per seed).")


def resolved_settings(pipe, settings: GenerationSettings) -> GenerationSettings:
    """The settings with what was left unset filled from the pipeline's family: its steps and guidance, and the
    sampler the pipeline draws with, so that every PNG records what drew it."""
    from dataclasses import replace

    from dreambooth.models.families import FAMILIES, pipeline_family

    if settings.steps is None or settings.guidance is None:
        defaults = (pipeline_family(pipe) or FAMILIES["sd1"]).behaviour().draw_defaults(pipe)
        settings = replace(settings, steps=settings.steps or defaults["steps"],
                           guidance=defaults["guidance"] if settings.guidance is None else settings.guidance)
    if settings.scheduler is None and hasattr(pipe, "scheduler"):
        settings = replace(settings, scheduler=type(pipe.scheduler).__name__)
    return settings


def run_job(job: GenerateJob) -> list[Path]:
    """Loads the model once, draws every prompt x seed x image, saves PNGs, grid.png and settings.json (the job
    checked by `check_job` first)."""
    device = pick_device(job.device)
    pipe = load_pipeline(job.model, device=device, dtype=pick_dtype(job.precision, device),
                         scheduler=job.settings.scheduler or "default")
    job.settings = resolved_settings(pipe, job.settings)
    load_loras(pipe, job.loras, model=job.model)
    results = generate_images(pipe, job.settings)
    paths = save_images(results, job.out, str(job.model), cols=len(job.settings.seeds) * job.settings.num_images,
                        loras=job.loras)
    record = {"command": "generate", **asdict(job.settings), "model": str(job.model),
              "loras": [[str(p), w] for p, w in job.loras], "images": [p.name for p in paths]}
    write_json_atomic(job.out / SETTINGS_FILE, record)
    print(f"wrote {len(paths)} image(s) and grid.png to {job.out}")
    return paths


def generate_command(options) -> list[Path]:
    """`dreambooth generate`: its options (a command_options.GenerateOptions) as a job."""
    check_settings(options)
    problems = Problems()
    prompts = problems.check(read_prompts, options.prompt, options.prompts_file) or []
    loras = [spec for spec in (problems.check(parse_lora_spec, text) for text in options.lora) if spec]
    settings = GenerationSettings(
        prompts=prompts, negative_prompt=options.negative_prompt, steps=options.steps, guidance=options.guidance,
        seeds=options.seeds or [0], num_images=options.num_images, scheduler=options.scheduler,
        height=options.height, width=options.width)
    job = GenerateJob(model=options.model, settings=settings, out=options.out, loras=loras,
                      precision=options.precision, device=options.device, overwrite=options.overwrite)
    check_job(job, problems)
    return run_job(job)
