"""`dreambooth demo`: teach the built-in model a subject it has never seen, on a CPU, and prove it learned it.

The built-in model is Stable Diffusion's architecture pretrained on a small world of coloured shapes
(`dreambooth.evaluation.world_model`); the subject is a circle with a red-yellow-red band pattern that no pretraining
image has. The demo runs the whole job (data checks, class images, full fine-tuning with prior
preservation, a checkpoint, validation samples, the saved model), then draws the same prompts with the base
model and the trained one and reads both sets of images with the world's measures (`dreambooth.evaluation.world`):
subject fidelity should rise from about zero, while the class prior (plain circles in the colour asked for)
stays where it was.

`--family flux` runs the same on the built-in Flux.1 model (`dreambooth.evaluation.world_model_flux`), training a
LoRA with prior preservation as most Flux runs do (`experiment.FLUX_RECIPE`): the Flux family's loss, its sampler and
its distilled guidance, through the same training and drawing code as a user's FLUX.1-dev.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from dreambooth.errors import TrainingStopped, command_line
from dreambooth.evaluation import experiment, world
from dreambooth.formats.atomic import atomic_file, write_json_atomic


def run_demo(out: Path, steps: int | None = None, seed: int = 0, family: str = "sd") -> dict:
    """Trains the built-in subject into the built-in model of `family` ("sd" or "flux") under `out`; writes grids and
    metrics.json."""
    from dreambooth.training.rundir import claim_work_folder

    recipe = experiment.RECIPES[family] if steps is None else replace(experiment.RECIPES[family], steps=steps)
    model = experiment.builtin_model(family)
    claim_work_folder(out, "demo", legacy=("metrics.json", "model"))
    variant = experiment.DEMO_VARIANTS[family]
    run_dir = experiment.train_variant(model, variant, seed, out, recipe, extra={
        "output.output_dir": str(out / "model"), "output.checkpointing_steps": max(recipe.steps // 2, 1),
        # validation three times, the subject's prompt and the class's: the run report shows both across steps
        "output.checkpoints_total_limit": 1, "validation.prompts": [world.INSTANCE_PROMPT, world.CLASS_PROMPT],
        "validation.steps": max(recipe.steps // 3, 1), "validation.num_images": 4,
        "validation.num_inference_steps": 20})
    metrics, grids = {}, {}
    identifier = recipe.identifier_for(variant)
    for name, (path, lora) in (("base", (model, None)), ("trained", experiment.drawn_from(model, variant, run_dir))):
        images = experiment.draw_prompts(path, lora, seed, recipe, identifier)
        metrics[name] = experiment.measure_images(images, identifier)
        grids[name] = out / f"{'before' if name == 'base' else 'after'}.png"
        with atomic_file(grids[name]) as tmp:
            experiment.prompt_grid(images).save(tmp, format="PNG")
    record = {"family": family, "method": variant.method, "base_model": str(model), "trained_model": str(run_dir),
              "seed": seed, "recipe": asdict(recipe),
              "metrics": metrics, "prompts": {"subject": [p for p, _ in world.subject_prompts(identifier)],
                                              "class": [p for p, _ in world.class_prompts()]}}
    write_json_atomic(out / "metrics.json", record)
    print_summary(metrics, run_dir, out, grids, family, variant.method)
    return record


def print_summary(metrics: dict, run_dir: Path, out: Path, grids: dict, family: str = "sd",
                  method: str = "full") -> None:
    model = "the built-in Flux.1 model" if family == "flux" else "the built-in model"
    print(f"\ndemo finished: the built-in subject 'sks circle' trained into {model}\n")
    print(f"  {'measure':18s} {'base':>6s} {'trained':>8s}")
    for key in experiment.MEASURES:
        print(f"  {key:18s} {metrics['base'][key]:6.2f} {metrics['trained'][key]:8.2f}")
    what = "LoRA " if method == "lora" else "model"
    print(f"\n  trained {what}      {run_dir}\n  before / after     {grids['base']}  {grids['trained']}"
          f"\n  measures           {out / 'metrics.json'}\n  instance photos    {out / 'instance'}"
          f"\n  class images       {out / 'class'}\n  run report         {run_dir / 'report.html'}\n")
    print("  Rows of the grids: 'a photo of sks circle' alone and on each background, then 'a photo of a <colour>\n"
          "  circle' for red, green, blue, yellow. subject_fidelity: share of subject images showing the banded\n"
          "  circle; class_prior: share of class images that are the asked colour and not the subject.")


def demo_command(options) -> dict:
    """`dreambooth demo`: `options` is a command_options.DemoOptions."""
    try:
        return run_demo(options.out, steps=options.steps, family=options.family)
    except TrainingStopped as stop:  # a second `demo` continues the run from its checkpoint
        steps = [] if options.steps is None else ["--steps", str(options.steps)]
        family = [] if options.family == "sd" else ["--family", options.family]
        raise stop.continued_by(command_line("dreambooth", "demo", "--out", options.out, *family, *steps)) from None
