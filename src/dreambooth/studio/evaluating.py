"""The studio's "evaluate every checkpoint": `dreambooth evaluate --model OUTPUT --checkpoints all` of a project, run
as one of the studio's runs (studio.runs, kind 'evaluate'), and the scores its evaluations left.

Each evaluation writes into PROJECT/evaluations/ID/ (ID: the run's), as the command writes any --out: a folder of
images and metrics.json per checkpoint, and checkpoints.json with every checkpoint's overall scores and the one the
command names best (training.report.best_checkpoint: the built-in world's subject share, else DINO with CLIP-I
breaking ties, else CLIP-I). The studio marks that one; it ranks nothing itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from dreambooth.errors import UserError

EVALUATIONS = "evaluations"
RECORD = "checkpoints.json"  # what `evaluate --checkpoints all` writes into its --out


def evaluate_argv(project: Path, out: Path, *, clip: Path | None, dino: Path | None, prompts: list[str] | None = None,
                  num_images: int | None = None, steps: int | None = None, seeds: list[int] | None = None) -> list[str]:
    """The arguments after `dreambooth` that evaluate the project's run folder, every checkpoint and the final model,
    into `out`: the photos, identifier and class word from its config.yaml; the prompts given, else its validation
    prompts, else 'a photo of IDENTIFIER CLASS'.

    The scorers are checked here as the command checks them (a given folder must be complete; without one, a
    complete one must be in the hub cache), so a studio that has none refuses with the command's own message
    before anything is queued."""
    from dreambooth.config_file import load_config
    from dreambooth.evaluation.evaluate import choose_scorers
    from dreambooth.evaluation.world_model import is_world_model

    cfg = load_config(project / "config.yaml")  # paths in it resolved against its folder, as `train` reads them
    identifier, class_word = cfg.token.identifier, cfg.token.class_word
    if not identifier or not class_word:
        raise UserError(f"project {project}: evaluate reads prompts with the identifier replaced by the class word, "
                        "and the recipe sets token.identifier and token.class_word; set both and evaluate again.")
    choose_scorers(clip, dino, is_world_model(cfg.model.pretrained_model))
    prompts = prompts or cfg.validation.prompts or [f"a photo of {identifier} {class_word}"]
    argv = ["evaluate", "--model", str(cfg.output.output_dir), "--checkpoints", "all",
            "--real", str(cfg.dataset.instance_dir), "--identifier", identifier, "--class-word", class_word,
            "--out", str(out)]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    for seed in seeds or ():
        argv += ["--seed", str(seed)]
    if num_images is not None:
        argv += ["--num-images", str(num_images)]
    if steps is not None:
        argv += ["--steps", str(steps)]
    if clip is not None:
        argv += ["--clip", str(clip)]
    if dino is not None:
        argv += ["--dino", str(dino)]
    return argv


def evaluations(project: Path) -> list[dict]:
    """Each finished evaluation of the project, oldest first: its id, the run folder it scored, every checkpoint's
    step and overall scores with `best` true on the one the command named, and the command's reason."""
    folder = project / EVALUATIONS
    found = []
    for record_file in sorted(folder.glob(f"*/{RECORD}")) if folder.is_dir() else ():
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # written atomically: a file that does not read is not one of the command's
        if not isinstance(record, dict):
            continue
        checkpoints = [{"name": e.get("name"), "step": e.get("step"), "path": e.get("path"),
                        "metrics": e.get("metrics") or {}, "best": e.get("name") == record.get("best")}
                       for e in record.get("checkpoints") or [] if isinstance(e, dict)]
        found.append({"id": record_file.parent.name, "run": record.get("run"), "best": record.get("best"),
                      "why": record.get("why"), "checkpoints": checkpoints})
    return found
