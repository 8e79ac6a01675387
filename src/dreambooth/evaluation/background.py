"""Masked loss on the built-in world: the subject's photos all on one background, which an identifier learns with
the subject unless the loss is masked to the subject (`python -m dreambooth.evaluation.background --out DIR`).

The photos are the demo's banded circles, all on purple; each has a `NAME.mask.png` of the circle (read back from its
pixels, one pixel wider for the antialiased edge). The demo's recipe (full fine-tuning with prior preservation) is
trained with and without `--masked_loss` (and masked with the prior weighted 2) at each seed, and drawn for the
world's prompts; the class images are generated once and shared. Besides the world's
measures, `background_leak`: the share of images from "a photo of sks circle on a <colour> background" prompts
asking for another colour than purple that come out on purple, the background the photos share.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dreambooth.evaluation import experiment, world
from dreambooth.options import option, parse_settings

SHARED = "purple"


def write_photos(folder: Path, n: int = 5, seed: int = 1234) -> Path:
    """`n` subject photos on the shared background, each with the mask of its circle."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        image = world.draw(world.subject_scene(rng, background=SHARED), seed=i)
        image.save(folder / f"subject-{i}.png")
        object_mask(image).save(folder / f"subject-{i}.mask.png")
    return folder


def object_mask(image: Image.Image) -> Image.Image:
    """White where the pixels differ from the background (the border's median colour) as the world's reader tells
    an object from it, grown by one pixel to take the antialiased edge."""
    pixels = np.asarray(image, dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
    mask = Image.fromarray(np.where(distance > world.MASK_DISTANCE, 255, 0).astype("uint8"))
    return mask.filter(ImageFilter.MaxFilter(3))


def background_leak(images: dict[str, list[Image.Image]]) -> float:
    """Share of images asked for another background than the shared one that show the shared one."""
    asked = [(p, bg) for p, bg in world.subject_prompts() if bg and bg != SHARED]
    readings = [world.read_image(im).background for p, _ in asked for im in images[p]]
    return sum(r == SHARED for r in readings) / max(len(readings), 1)


# The variants: (name, config overrides). Masked loss weighs each photo's loss by its mask's area (training.loss),
# which makes the subject's pixels count more against the class images; the third variant weighs those up too.
VARIANTS = (("plain", {}), ("masked", {"dataset.masked_loss": True}),
            ("masked, prior weight 2", {"dataset.masked_loss": True, "training.prior_loss_weight": 2.0}))


def run(out: Path, seeds: list[int], variants: list[str] | None = None) -> list[dict]:
    """Each variant at each seed, on photos that share one background; one JSON line per run in results.jsonl and
    a grid per run (one row per prompt)."""
    model = experiment.builtin_model("sd")
    recipe = experiment.RECIPES["sd"]
    trained = experiment.DEMO_VARIANTS["sd"]
    photos = write_photos(out / "photos")
    results = []
    for seed in seeds:
        for name, overrides in VARIANTS:
            if variants and name not in variants:
                continue
            start = time.perf_counter()
            slug = name.replace(", ", "-").replace(" ", "-")
            run_dir = experiment.train_variant(model, trained, seed, out / f"seed{seed}-{slug}", recipe, extra={
                "dataset.instance_dir": str(photos), "dataset.class_dir": str(out / "class"), **overrides})
            images = experiment.draw_prompts(run_dir, None, seed, recipe)
            row = {"seed": seed, "variant": name, **experiment.measure_images(images),
                   "background_leak": background_leak(images), "seconds": round(time.perf_counter() - start, 1)}
            results.append(row)
            experiment.prompt_grid(images).save(out / f"grid-seed{seed}-{slug}.png")
            with (out / "results.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return results


@dataclass(kw_only=True)
class BackgroundOptions:
    """Trains the demo's recipe on photos sharing one background, with and without masked loss, and measures each."""

    out: Path = option(help="The folder to write the runs, grids and results.jsonl to.")
    seeds: list[int] = option([0, 1, 2], minimum=0, help="Training seeds (repeatable).")
    variants: list[str] = option([], help="Only these variants (repeatable): plain, masked, 'masked, prior weight 2' "
                                 "[default: all].")


def main(argv: list[str] | None = None) -> None:
    """`python -m dreambooth.evaluation.background`: the options are parsed as every `dreambooth` command's."""
    args = parse_settings(BackgroundOptions, argv, prog="python -m dreambooth.evaluation.background")
    names = [name for name, _ in VARIANTS]
    unknown = [v for v in args.variants if v not in names]
    if unknown:
        raise SystemExit(f"--variants: {', '.join(unknown)} is none of {', '.join(names)}.")
    run(args.out, args.seeds, args.variants or None)


if __name__ == "__main__":
    main()
