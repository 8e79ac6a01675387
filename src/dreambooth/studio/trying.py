"""The studio's "try it": a project's trained result (its output or one of its checkpoints) and its base model drawn
on the same prompt and seed, side by side, through `dreambooth generate`'s own job (check_job, then run_job), one
try at a time. Each try is a folder PROJECT/tries/ID/ with `trained/` and `base/`, each as `generate` writes it."""

from __future__ import annotations

import datetime
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from dreambooth.errors import UserError

CHECKPOINT = re.compile(r"^checkpoint-\d+$")
_one_at_a_time = threading.Lock()  # a try loads two pipelines; two at once would double the memory


@dataclass(frozen=True)
class Trial:
    """What to draw: the prompt, its seed and settings, which result (`final` or `checkpoint-N`), the LoRA's scale."""

    prompt: str
    seed: int = 0
    guidance: float | None = None
    steps: int | None = None
    negative_prompt: str = ""
    result: str = "final"
    lora_scale: float = 1.0


def trained_model(project, result: str) -> tuple[Path, list[tuple[Path, float]] | None]:
    """The model folder `generate` draws the project's result with, and its LoRA when the run trained one: the
    output folder (a full model, or the LoRA over the base), or a checkpoint folder inside it."""
    from dreambooth.config_file import load_config
    from dreambooth.models.base import LORA_FILE

    cfg = load_config(project.config_path)
    out = Path(cfg.output.output_dir)
    if result != "final" and not CHECKPOINT.match(result):
        raise UserError(f"result {result!r}: give `final` (the run's output) or a checkpoint's folder name, such as "
                        "checkpoint-200.")
    folder = out if result == "final" else out / result
    if not folder.is_dir():
        raise UserError(f"{project.name} has no {result} result yet ({folder} is missing): train it first, or "
                        "choose one of the checkpoints its runs saved.")
    lora = folder / LORA_FILE
    if lora.is_file():
        return Path(cfg.model.pretrained_model), [(lora, 1.0)]
    return folder, None


def try_result(project, trial: Trial, *, device: str | None = None) -> dict:
    """Draws the trial with the trained result and with the base model; the try's id and the two images' paths
    relative to the project."""
    from dreambooth.config_file import load_config
    from dreambooth.generate import GenerateJob, GenerationSettings, check_job, run_job

    model, loras = trained_model(project, trial.result)
    if loras:
        loras = [(path, trial.lora_scale) for path, _ in loras]
    base = Path(load_config(project.config_path).model.pretrained_model)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = project.path / "tries" / f"{stamp}-{secrets.token_hex(3)}"
    settings = GenerationSettings(prompts=[trial.prompt], negative_prompt=trial.negative_prompt, steps=trial.steps,
                                  guidance=trial.guidance, seeds=[trial.seed])
    jobs = {"trained": GenerateJob(model=model, settings=settings, out=folder / "trained", loras=loras or [],
                                   device=device),
            "base": GenerateJob(model=base, settings=settings, out=folder / "base", device=device)}
    for job in jobs.values():
        check_job(job)  # every mistake of either side before a weight loads
    with _one_at_a_time:
        images = {side: run_job(job)[0] for side, job in jobs.items()}
    return {"id": folder.name, "result": trial.result,
            "images": {side: str(path.relative_to(project.path)) for side, path in images.items()}}
