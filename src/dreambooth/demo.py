"""`dreambooth demo`: the whole job on a tiny random-weight model, offline, in about a minute on a CPU.

What it can show: every stage runs end to end (data checks, class-image generation, training with prior
preservation, checkpoints, validation, saving, generation) and the training loss on the subject falls. What
it cannot show: a random-weight model draws noise-like images before and after, so the images say nothing
about whether the subject was learned.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from dreambooth.config import load_config

RESOLUTION = 64


def draw_subject(seed: int, size: int = 80) -> Image.Image:
    """A made-up subject: a red square with yellow stripes, at a random place on a random plain background."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(40, 220) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    side = rng.randrange(size // 3, size // 2)
    x, y = rng.randrange(0, size - side), rng.randrange(0, size - side)
    draw.rectangle([x, y, x + side, y + side], fill=(220, 30, 30))
    for k in range(0, side, 8):
        draw.line([x + k, y, x, y + k], fill=(250, 220, 40), width=3)
    return image


def run_demo(out: Path, steps: int = 40) -> dict:
    """Builds the tiny model and data under `out`, trains, generates, and prints where everything is."""
    from dreambooth.generate import GenerationSettings, generate_images, load_pipeline, pick_device, save_images
    from dreambooth.tiny import build_tiny_model
    from dreambooth.train import train

    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(out / "tiny-model", seed=0)
    instance = out / "data" / "instance"
    instance.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        draw_subject(i).save(instance / f"subject-{i}.png")
    overrides = {
        "model.pretrained_model": str(model), "token.identifier": "sks", "token.class_word": "toy",
        "dataset.instance_dir": str(instance), "dataset.class_dir": str(out / "data" / "class"),
        "dataset.with_prior_preservation": True, "dataset.num_class_images": 8, "dataset.random_flip": True,
        "training.resolution": RESOLUTION, "training.learning_rate": 1e-4, "training.max_train_steps": steps,
        "training.seed": 0, "output.output_dir": str(out / "run"), "output.checkpointing_steps": max(steps // 2, 1),
        "output.checkpoints_total_limit": 1, "output.logging_steps": 5,
        "validation.prompts": ["a photo of sks toy"], "validation.steps": steps, "validation.num_images": 2,
        "validation.num_inference_steps": 10,
    }
    cfg = load_config(None, overrides)
    run_dir = train(cfg)
    pipe = load_pipeline(run_dir, device=pick_device(), dtype=torch.float32, scheduler="dpm++")
    settings = GenerationSettings(prompts=["a photo of sks toy", "a photo of a toy"], seeds=[0, 1], steps=20)
    save_images(generate_images(pipe, settings), out / "generated", str(run_dir), cols=2)
    log = [json.loads(line) for line in (run_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
    summary = {"model": str(run_dir), "instance_images": str(instance), "class_images": str(out / "data" / "class"),
               "samples": str(run_dir / "samples"), "generated": str(out / "generated"),
               "first_logged_loss": log[0]["loss"], "last_logged_loss": log[-1]["loss"]}
    print("\ndemo finished")
    for key, value in summary.items():
        print(f"  {key:18s} {value}")
    print("  note: the tiny model has random weights, so its images are noise before and after training; the demo\n"
          "  shows that every stage runs, not that the subject was learned.")
    return summary
