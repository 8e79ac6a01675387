"""Class images for prior preservation: plan, generate the missing ones with the base model, commit at start.

A manifest in the class folder records the recipe (prompt, the base model's identity, resolution) and each
generated image's seed. Images of the same recipe are reused; images the user put there are always kept and
used. Nothing in the user's folder moves until the run is known to start:

1. `plan_class_images` (pre-flight) reads the folder and decides what is kept, what was generated from another
   recipe (stale), and how many are missing;
2. `generate_missing` writes new images into a staging folder, `.dreambooth-pending/`, with its own manifest after
   every batch, so an interrupted generation continues where it stopped;
3. `commit` (when training is about to step) moves stale images aside into `replaced-<time>/`, never deleting
   them, and moves the staged ones in.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from dreambooth.config import Config
from dreambooth.errors import UserError
from dreambooth.formats.atomic import atomic_file, write_json_atomic
from dreambooth.training.images import scan_image_folder

MANIFEST = "dreambooth_class_images.json"  # listed in images.TOOL_FILES, so scans skip it
STAGING = ".dreambooth-pending"


GPU_MAX_BATCH = 64
GPU_BYTES_PER_IMAGE_512 = 512 * 2**20  # an estimate (fp16, guidance doubles the batch), not a measurement


def default_batch_size(device_type: str, resolution: int, free_bytes: int | None = None) -> int:
    """Class images per generation batch. On a GPU: as many as the free memory holds by an estimate of 0.5 GiB an
    image at 512 px (scaled by pixels), at most 64, 16 when the free memory is unknown; a batch that still runs out
    of memory is halved and drawn again (`generate_missing`). On a CPU: 16 up to 256 px and the same pixels above.

    Fewer, larger UNet calls are faster on a CPU too (10 images at 30 steps: `small` at 128 px 16.1 s in one
    batch against 21.6 s in batches of 4; `tiny` at 64 px 1.9 s against 2.9 s). The pixel budget keeps SD
    sizes where the old default of 4 was: 4 at 512 px, 1 at 768 px.
    """
    if device_type == "cuda":
        if free_bytes is None:
            return 16
        per_image = GPU_BYTES_PER_IMAGE_512 * resolution * resolution / (512 * 512)
        return max(1, min(GPU_MAX_BATCH, int(free_bytes // per_image)))
    return max(1, min(16, 16 * 256 * 256 // (resolution * resolution)))


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def recipe(prompt: str, model: str, resolution: int, model_identity: str | None = None) -> dict:
    """What decides a generated class image (besides its seed). `model` is kept for people reading the manifest;
    the identity (dreambooth.models.base.model_identity) is what is compared."""
    return {"prompt": prompt, "model": str(model), "model_identity": model_identity or str(model),
            "resolution": resolution}


def same_recipe(manifest: dict, wanted: dict) -> bool:
    """Manifests written before identities were recorded compare the model's absolute path."""
    if manifest.get("prompt") != wanted["prompt"] or manifest.get("resolution") != wanted["resolution"]:
        return False
    if "model_identity" in manifest:
        return manifest["model_identity"] == wanted["model_identity"]
    return os.path.abspath(str(manifest.get("model"))) == os.path.abspath(wanted["model"])


@dataclass
class ClassImagePlan:
    """What one class folder holds for this run, and what the run will do to it."""

    folder: Path
    recipe: dict
    wanted: int
    kept: list[Path] = field(default_factory=list)  # usable now: the user's images and this recipe's
    stale: list[str] = field(default_factory=list)  # generated from another recipe: moved aside at commit
    staged: list[Path] = field(default_factory=list)  # generated for this recipe, waiting in the staging folder
    entries: list[dict] = field(default_factory=list)  # manifest entries of the kept generated images
    staged_entries: list[dict] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return max(0, self.wanted - len(self.kept) - len(self.staged))

    def images(self) -> list[Path]:
        """The images the run trains on: the first `wanted` in file-name order."""
        return sorted(self.kept + self.staged, key=lambda p: p.name)[:self.wanted]

    def describe(self) -> str:
        line = (f"class images ({self.folder}): {len(self.kept) + len(self.staged)} usable, {self.missing} to "
                f"generate (of {self.wanted} wanted)")
        if self.stale:
            line += (f"; {len(self.stale)} generated from another prompt, model or resolution will be moved to "
                     f"{self.folder}/replaced-<time>/ when training starts")
        return line


def plan_class_images(folder: Path, wanted_recipe: dict, num_images: int) -> ClassImagePlan:
    """Reads a class folder (and its staging folder) without changing anything."""
    plan = ClassImagePlan(folder, wanted_recipe, num_images)
    manifest = read_manifest(folder)
    generated = {e["file"]: e for e in manifest.get("images", []) if isinstance(e, dict) and "file" in e}
    if manifest and not same_recipe(manifest, wanted_recipe):
        plan.stale = [name for name in generated if (folder / name).exists()]
    else:
        plan.entries = [e for name, e in generated.items() if (folder / name).exists()]
    usable = scan_image_folder(folder, wanted_recipe["resolution"], check_duplicates=False).usable
    plan.kept = [p for p in usable if p.name not in set(plan.stale)]
    staging = read_manifest(folder / STAGING)
    if staging and same_recipe(staging, wanted_recipe):
        plan.staged_entries = [e for e in staging.get("images", []) if (folder / STAGING / e["file"]).is_file()]
        plan.staged = [folder / STAGING / e["file"] for e in plan.staged_entries]
    return plan


def generate_missing(plan: ClassImagePlan, *, seed: int, load_pipe, batch_size: int | None, steps: int = 30) -> None:
    """Generates the plan's missing images into the staging folder; `load_pipe()` is called only if any are missing.

    Each image has its own seed, recorded in the staging manifest after every batch.
    """
    from dreambooth.generate import GenerationSettings, generate_images

    missing = plan.missing
    if not missing:
        return
    staging = plan.folder / STAGING
    if staging.exists() and not plan.staged:
        shutil.rmtree(staging)  # this tool's own scratch, left by a generation for another recipe
    staging.mkdir(parents=True, exist_ok=True)
    pipe = load_pipe()
    if batch_size is None:  # from the memory the loaded pipeline leaves free
        import torch

        free = torch.cuda.mem_get_info(pipe.device)[0] if pipe.device.type == "cuda" else None
        batch_size = default_batch_size(pipe.device.type, plan.recipe["resolution"], free)
    used = {e["seed"] for e in plan.entries + plan.staged_entries}
    seeds = [s for s in range(seed, seed + plan.wanted + len(used) + missing) if s not in used][:missing]
    bar = tqdm(total=missing, desc="generating class images", unit="img")
    start = 0
    while start < missing:
        chunk = seeds[start:start + batch_size]
        settings = GenerationSettings(prompts=[plan.recipe["prompt"]], seeds=chunk, steps=steps,
                                      height=plan.recipe["resolution"], width=plan.recipe["resolution"])
        try:
            results = generate_images(pipe, settings, batch_size=batch_size)
        except _out_of_memory() as e:
            if batch_size == 1:
                raise UserError(f"generating class images ran out of memory with one image at a time ({e}). Use "
                                "--prior_generation_precision fp16, a smaller resolution, or free the GPU.") from None
            batch_size //= 2  # every image has its own seed, so a smaller batch draws the same images
            release_memory()
            tqdm.write(f"class images: out of memory; going on in batches of {batch_size}")
            continue
        for image, meta in results:
            name = f"class-{meta['seed']:06d}.png"
            with atomic_file(staging / name) as tmp:
                image.save(tmp, format="PNG")
            plan.staged.append(staging / name)
            plan.staged_entries.append({"file": name, "seed": meta["seed"]})
        write_json_atomic(staging / MANIFEST, {**plan.recipe, "images": plan.staged_entries})
        bar.update(len(chunk))
        start += len(chunk)
    bar.close()


def _out_of_memory() -> type[BaseException]:
    import torch

    return torch.OutOfMemoryError


def release_memory() -> None:
    """Collects now and hands CUDA's cached blocks back: what a pipeline held, or what a batch that did not fit
    left behind, is free for what comes next."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unused_path(folder: Path, stem: str, suffix: str = "") -> Path:
    """folder/stem+suffix, or stem-2, stem-3, ... if taken: a time-stamped name is not unique within a second, and a
    rename onto an existing file would silently replace it."""
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


def commit(plan: ClassImagePlan) -> dict[Path, Path]:
    """Carries out the plan in the user's folder: stale images aside, staged images in; returns old -> new paths."""
    folder, moved = plan.folder, {}
    changes = bool(plan.stale or plan.staged)
    if plan.stale:
        aside = unused_path(folder, f"replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.mkdir()
        for name in plan.stale:
            (folder / name).rename(aside / name)
        if (folder / MANIFEST).exists():
            (folder / MANIFEST).rename(aside / MANIFEST)
        print(f"class images: the prompt, model or resolution changed; moved {len(plan.stale)} old generated "
              f"image(s) to {aside}")
        plan.stale = []
    for path, entry in zip(list(plan.staged), list(plan.staged_entries)):
        target = folder / path.name
        if target.exists():  # a user's file of the same name is never replaced: keep ours under another name
            target = unused_path(folder, f"class-{entry['seed']:06d}-{time.strftime('%H%M%S')}", ".png")
            entry = {**entry, "file": target.name}
        path.rename(target)
        moved[path] = target
        plan.kept.append(target)
        plan.entries.append(entry)
    if changes:
        write_json_atomic(folder / MANIFEST, {**plan.recipe, "images": plan.entries})
    plan.staged, plan.staged_entries = [], []
    shutil.rmtree(folder / STAGING, ignore_errors=True)
    return moved


def ensure_class_images(class_dir: Path, *, prompt: str, model: str, resolution: int, num_images: int,
                        seed: int, load_pipe, batch_size: int, steps: int = 30,
                        model_identity: str | None = None) -> list[Path]:
    """Plan, generate and commit in one go (for callers outside a training run); returns the images to use."""
    class_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_class_images(class_dir, recipe(prompt, model, resolution, model_identity), num_images)
    generated = plan.missing
    generate_missing(plan, seed=seed, load_pipe=load_pipe, batch_size=batch_size, steps=steps)
    commit(plan)
    print(f"class images: {len(plan.kept)} in {class_dir} ({generated} generated now)")
    return plan.images()


def prepare_class_images(cfg: Config, accelerator, report) -> list[list[Path]] | None:
    """Each subject's class images, generating the missing ones (into the staging folder) on the main process.

    Nothing in the class folder itself changes here: `start_run` commits the plans once the run can start.
    """
    if not cfg.dataset.with_prior_preservation:
        return None
    from dreambooth.models.loading import load_pipeline, pick_dtype

    ds = cfg.dataset
    pipe = None

    def load_once():  # subjects share one pipeline
        nonlocal pipe
        dtype = pick_dtype(ds.prior_generation_precision, accelerator.device)
        vae = {}
        if cfg.model.pretrained_vae:
            from dreambooth.training.components import load_vae

            vae = {"vae": load_vae(cfg, dtype)}
        pipe = pipe or load_pipeline(cfg.model.pretrained_model, device=accelerator.device, dtype=dtype,
                                     safety_checker=False, revision=cfg.model.revision, variant=cfg.model.variant,
                                     **vae)
        return pipe

    # On a GPU the batch follows the memory the loaded pipeline leaves free (generate_missing); on a CPU a fixed size.
    batch_size = ds.sample_batch_size or (None if accelerator.device.type == "cuda" else
                                          default_batch_size(accelerator.device.type, cfg.training.resolution))
    for folder, plan in report.class_plans.items():
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                generate_missing(plan, seed=cfg.training.seed, load_pipe=load_once, batch_size=batch_size,
                                 steps=ds.class_inference_steps)
            else:  # the main process has generated them by now
                report.class_plans[folder] = plan_class_images(folder, plan.recipe, plan.wanted)
    if pipe is not None:
        # The pipeline sits in reference cycles, so deleting it frees nothing until the collector's next full
        # pass, which may come long after the training models have loaded beside it (on a GPU: its fp16
        # weights on top of the training peak). Collect it now.
        del pipe
        release_memory()
    per_subject = []
    for s in cfg.subject_list():
        images = report.class_plans[Path(s.class_dir)].images()
        if not images:
            raise UserError(f"dataset.class_dir: {s.class_dir} holds no usable class image after generation.")
        per_subject.append(images)
    return per_subject
