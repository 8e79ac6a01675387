"""Image generation, shared by `dreambooth generate`, training-time validation and class-image generation."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dreambooth.errors import UserError
from dreambooth.export import find_lora_file, parse_lora_spec
from dreambooth.lora import load_loras
from dreambooth.startup import collection_paused

# Short sampler names as users type them, and the diffusers classes (with config tweaks) they mean.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


@dataclass
class GenerationSettings:
    """Everything that decides the images, recorded in each PNG's metadata."""

    prompts: list[str]
    negative_prompt: str = ""
    steps: int = 30
    guidance: float = 7.5
    seeds: list[int] = field(default_factory=lambda: [0])
    num_images: int = 1
    scheduler: str = "dpm++"
    height: int | None = None
    width: int | None = None


def make_scheduler(name: str, base_config: dict):
    """A sampler by short name ('dpm++') or diffusers class name, built from the model's scheduler config."""
    import diffusers

    cls_name, tweaks = SCHEDULERS.get(name, (name, {}))
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise UserError(f"unknown scheduler '{name}'; use one of {', '.join(SCHEDULERS)} "
                        "or a diffusers scheduler class name such as DDIMScheduler.")
    return cls.from_config({**base_config, **tweaks})


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """fp16 on a GPU and fp32 on the CPU unless told, since CPU fp16 kernels are slow or missing."""
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision:
        return names[precision]
    return torch.float16 if device.type == "cuda" else torch.float32


def check_model_folder(path: Path | str, what: str = "model") -> None:
    """A diffusers pipeline folder has model_index.json; say what else was found and what to do."""
    p = Path(path)
    if (p / "model_index.json").is_file():
        return
    if p.is_file() and p.suffix in (".safetensors", ".ckpt", ".pt", ".bin"):
        raise UserError(f"{what} {p} is a single-file checkpoint; this command needs a diffusers folder "
                        "(with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/). Convert it "
                        "with diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR).")
    if p.is_dir():
        raise UserError(f"{what} {p} is not a diffusers model folder: it has no model_index.json. Expected a "
                        "folder as written by StableDiffusionPipeline.save_pretrained (model_index.json, unet/, "
                        "vae/, text_encoder/, tokenizer/, scheduler/).")
    raise UserError(f"{what} {p} does not exist. Pass a diffusers model folder (e.g. a training output "
                    "folder, or one made by `dreambooth tiny-model DIR`).")


def load_pipeline(model: str | Path, *, device: torch.device, dtype: torch.dtype, scheduler: str | None = None,
                  safety_checker: bool = True, **kwargs):
    """Loads a Stable Diffusion pipeline from a diffusers folder (or hub id), on `device` in `dtype`."""
    if Path(model).exists() or "/" not in str(model):
        check_model_folder(model)
    extra = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    try:
        with collection_paused():  # diffusers' import and the weights live on (dreambooth.startup)
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(str(model), dtype=dtype, **extra, **kwargs)
    except OSError as e:
        raise UserError(f"could not load the model {model}: {e}. Give a local diffusers folder; a hub id "
                        "needs a network connection and a cached download.") from None
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate_images(pipe, settings: GenerationSettings, *, batch_size: int = 4) -> list[tuple[Image.Image, dict]]:
    """Images for every prompt x seed x num_images, each with the settings that reproduce it.

    Each image gets its own generator seeded with `seed + k`, so an image is the same whatever the batch
    it was drawn in.
    """
    jobs = [(p, s + k) for p in settings.prompts for s in settings.seeds for k in range(settings.num_images)]
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


def png_info(meta: dict, model: str) -> PngInfo:
    """A1111-style 'parameters' text, which image viewers and web UIs read, plus the exact JSON."""
    info = PngInfo()
    text = (f"{meta['prompt']}\nNegative prompt: {meta['negative_prompt']}\nSteps: {meta['steps']}, "
            f"Sampler: {meta['scheduler']}, CFG scale: {meta['guidance']}, Seed: {meta['seed']}, "
            f"Size: {meta['width']}x{meta['height']}, Model: {model}")
    info.add_text("parameters", text)
    info.add_text("dreambooth", json.dumps({**meta, "model": model}))
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


def save_images(results: list[tuple[Image.Image, dict]], out_dir: Path, model: str,
                cols: int | None = None) -> list[Path]:
    """Writes each image as a PNG with its settings in the metadata, and grid.png beside them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, meta) in enumerate(results):
        path = out_dir / f"{i:04d}-seed{meta['seed']}.png"
        image.save(path, pnginfo=png_info(meta, model))
        paths.append(path)
    make_grid([img for img, _ in results], cols).save(out_dir / "grid.png")
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


def generate_command(args) -> list[Path]:
    """`dreambooth generate`: load the model once, draw every prompt x seed, save PNGs and a grid."""
    for name in ("steps", "num_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    settings = GenerationSettings(
        prompts=read_prompts(args.prompt, args.prompts_file), negative_prompt=args.negative_prompt,
        steps=args.steps, guidance=args.guidance, seeds=args.seeds or [0], num_images=args.num_images,
        scheduler=args.scheduler, height=args.height, width=args.width)
    check_model_folder(args.model)
    make_scheduler(args.scheduler, {})  # an unknown name fails before the model loads
    device = pick_device(args.device)
    loras = [parse_lora_spec(text) for text in args.lora]
    for path, _ in loras:
        find_lora_file(path)  # a missing or pickle LoRA fails before the model loads
    pipe = load_pipeline(args.model, device=device, dtype=pick_dtype(args.precision, device),
                         scheduler=args.scheduler)
    load_loras(pipe, loras)
    results = generate_images(pipe, settings)
    paths = save_images(results, args.out, str(args.model), cols=len(settings.seeds) * settings.num_images)
    record = {**asdict(settings), "model": str(args.model), "loras": [[str(p), w] for p, w in loras]}
    (args.out / "settings.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {len(paths)} image(s) and grid.png to {args.out}")
    return paths
