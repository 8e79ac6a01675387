"""Class images for prior preservation: generate the missing ones with the base model and record how.

A manifest in the class folder records prompt, model, resolution and each image's seed. A later run
reuses images whose recipe matches; a changed prompt, model or resolution moves the old generated images
aside (never deletes them) and generates new ones. Images the user put there are always kept and used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from dreambooth.data import scan_image_folder
from dreambooth.runinfo import write_json_atomic

MANIFEST = "dreambooth_class_images.json"  # listed in data.TOOL_FILES, so scans skip it


def default_batch_size(device_type: str, resolution: int) -> int:
    """Class images per generation batch: 16 on a GPU; on a CPU, 16 up to 256 px and the same pixels above.

    Fewer, larger UNet calls are faster on a CPU too (10 images at 30 steps: `small` at 128 px 16.1 s in one
    batch against 21.6 s in batches of 4; `tiny` at 64 px 1.9 s against 2.9 s). The pixel budget keeps SD
    sizes where the old default of 4 was: 4 at 512 px, 1 at 768 px.
    """
    if device_type == "cuda":
        return 16
    return max(1, min(16, 16 * 256 * 256 // (resolution * resolution)))


def read_manifest(class_dir: Path) -> dict:
    path = class_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def recipe(prompt: str, model: str, resolution: int) -> dict:
    return {"prompt": prompt, "model": str(model), "resolution": resolution}


def retire_stale(class_dir: Path, manifest: dict, wanted: dict) -> dict:
    """Moves images generated from another recipe into a subfolder, which scanning skips; returns the manifest."""
    if not manifest or all(manifest.get(k) == v for k, v in wanted.items()):
        return manifest or {**wanted, "images": []}
    aside = class_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for entry in manifest.get("images", []):
        src = class_dir / entry["file"]
        if src.exists():
            src.rename(aside / src.name)
    (class_dir / MANIFEST).rename(aside / MANIFEST)
    print(f"class images: the prompt, model or resolution changed; moved the old generated images to {aside}")
    return {**wanted, "images": []}


def ensure_class_images(class_dir: Path, *, prompt: str, model: str, resolution: int, num_images: int,
                        seed: int, load_pipe, batch_size: int, steps: int = 30) -> list[Path]:
    """Makes `class_dir` hold at least `num_images` usable images; returns them all.

    `load_pipe()` is called only when images are missing. Each image has its own seed, recorded in the manifest
    after every batch, so an interrupted generation continues where it stopped.
    """
    from dreambooth.generate import GenerationSettings, generate_images

    class_dir.mkdir(parents=True, exist_ok=True)
    wanted = recipe(prompt, model, resolution)
    manifest = retire_stale(class_dir, read_manifest(class_dir), wanted)
    usable = scan_image_folder(class_dir, resolution, check_duplicates=False).usable
    missing = max(0, num_images - len(usable))
    if missing:
        pipe = load_pipe()
        used = {e["seed"] for e in manifest["images"]}
        seeds = [s for s in range(seed, seed + num_images + len(used) + missing) if s not in used][:missing]
        bar = tqdm(total=missing, desc="generating class images", unit="img")
        for start in range(0, missing, batch_size):
            chunk = seeds[start:start + batch_size]
            settings = GenerationSettings(prompts=[prompt], seeds=chunk, steps=steps, height=resolution,
                                          width=resolution)
            for image, meta in generate_images(pipe, settings, batch_size=batch_size):
                name = f"class-{meta['seed']:06d}.png"
                tmp = class_dir / f".{name}.tmp"
                image.save(tmp, format="PNG")
                tmp.rename(class_dir / name)
                usable.append(class_dir / name)
                manifest["images"].append({"file": name, "seed": meta["seed"]})
            write_json_atomic(class_dir / MANIFEST, manifest)
            bar.update(len(chunk))
        bar.close()
        del pipe
    usable.sort()  # the order a scan gives, without decoding every image again
    print(f"class images: {len(usable)} in {class_dir} ({missing} generated now)")
    return usable[:num_images]
