"""What a run folder says about its run, gathered for the run report (training.report_page draws it).

Everything here reads only the run folder (run_info.json, config.yaml, the JSON-lines log, samples/, checkpoints,
checkpoint_metrics.json, report/progress.json), so one code path serves a live run, `dreambooth report` on a
finished or running one, and runs made before the report existed. A piece that is missing or unreadable is
gathered as absent (None or empty), never raised: the page says it is not there.

Torch-free: `dreambooth report` answers without loading torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.formats.atomic import write_json_atomic
from dreambooth.formats.lora import read_metadata
from dreambooth.models.base import LORA_FILE
from dreambooth.training.images import IMAGE_EXTENSIONS
from dreambooth.training.rundir import (
    CHECKPOINT,
    LOCK_FILE,
    RUN_INFO,
    final_model_size,
    list_checkpoints,
    path_size,
)
from dreambooth.training.validation_loss import LOG_FILE as VALIDATION_LOSS_FILE

REPORT_PAGE = "report.html"
REPORT_DIR = "report"  # the page's own images (curves, thumbnails, sample cells), beside it
PROGRESS_FILE = "progress.json"  # what only the live run knows (device, memory, time), kept for later rebuilds
EVALUATION_FILE = "checkpoint_metrics.json"  # `dreambooth evaluate --checkpoints all` writes it into the run folder
LOSS_KEYS = ("loss", "instance_loss", "prior_loss")


@dataclass
class SampleImage:
    """One validation image: which grid it is in, where in it, and what drew it."""

    grid: Path
    index: int
    box: tuple[int, int, int, int] | None  # None: the whole grid (one saved without per-image metadata)
    prompt: str | None
    seed: int | None


@dataclass
class SampleStep:
    """The validation images of one step."""

    step: int
    grid: Path
    images: list[SampleImage] = field(default_factory=list)


@dataclass
class CheckpointFacts:
    name: str
    step: int | None
    path: Path
    size_bytes: int
    metrics: dict | None = None  # the overall row of its evaluation, when one ran
    best: bool = False


@dataclass
class RunFacts:
    """Everything the page shows, as read from the run folder."""

    out: Path
    info: dict | None
    config_text: str | None
    log: list[dict]
    samples: list[SampleStep]
    checkpoints: list[CheckpointFacts]
    evaluation: dict | None
    progress: dict | None
    status: str
    logging_dir: str = "logs"
    val_log: list[dict] = field(default_factory=list)  # the validation loss's scorings (training.validation_loss)

    @property
    def subjects(self) -> list[dict]:
        return (self.info or {}).get("subjects") or []


# ---------------------------------------------------------------------------------------------- the log


def read_log(path: Path) -> list[dict]:
    """One record per logged step, in step order, the way the weights went.

    A run resumed from a checkpoint older than its last logged step (the process was killed after the
    checkpoint) logs those steps again; the later records are the ones the weights continued from, so each
    time the step goes back, the earlier records from that step on are dropped. Lines that are not whole
    JSON (a process killed mid-write) are skipped.
    """
    records: list[dict] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        while records and records[-1]["step"] >= step:
            records.pop()
        records.append({**record, "step": step})
    return records


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing), so it starts at the data."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight ** i))
    return out


def steps_per_second(log: list[dict]) -> float | None:
    """Training speed from the log's per-step times; the median, as a resume's first record times a partial span."""
    times = sorted(r["step_time_s"] for r in log if isinstance(r.get("step_time_s"), (int, float))
                   and r["step_time_s"] > 0)
    return 1.0 / times[len(times) // 2] if times else None


# ---------------------------------------------------------------------------------------------- samples


def read_samples(out: Path) -> list[SampleStep]:
    """The validation grids (samples/step-N.png), each cut into its images by the metadata saved with it."""
    from PIL import Image

    folder = out / "samples"
    if not folder.is_dir():
        return []
    steps = []
    for grid in sorted(folder.glob("step-*.png")):
        try:
            step = int(grid.stem.split("-", 1)[1])
            with Image.open(grid) as opened:
                size = opened.size
                meta = json.loads((getattr(opened, "text", None) or {}).get("dreambooth") or "{}")
        except (OSError, ValueError):
            continue
        steps.append(SampleStep(step, grid, _cells(grid, size, meta.get("images") or [])))
    return sorted(steps, key=lambda s: s.step)


def _cells(grid: Path, size: tuple[int, int], metas: list[dict]) -> list[SampleImage]:
    """Where each image sits in a grid: rows of equal cells, left to right (generate.make_grid)."""
    try:
        w, h = int(metas[0]["width"]), int(metas[0]["height"])
    except (IndexError, KeyError, TypeError, ValueError):
        return [SampleImage(grid, 0, None, None, None)]
    cols = max(size[0] // w, 1)
    if size[0] % w or size[1] < h * -(-len(metas) // cols):
        return [SampleImage(grid, 0, None, None, None)]  # not the layout the metadata describes: show it whole
    return [SampleImage(grid, i, ((i % cols) * w, (i // cols) * h, (i % cols + 1) * w, (i // cols + 1) * h),
                        m.get("prompt"), m.get("seed")) for i, m in enumerate(metas)]


def prompt_rows(facts: RunFacts) -> list[str]:
    """The validation prompts in the order the page shows them: those with an identifier first, then the rest."""
    prompts = list(dict.fromkeys(img.prompt for s in facts.samples for img in s.images if img.prompt is not None))
    identifiers = [s.get("identifier") for s in facts.subjects if s.get("identifier")]
    return sorted(prompts, key=lambda p: not any(i in p for i in identifiers))


# ---------------------------------------------------------------------------------------------- checkpoints


def read_checkpoints(out: Path, evaluation: dict | None, last_step: int | None) -> list[CheckpointFacts]:
    """Each checkpoint and the final model, with their measures when `evaluate --checkpoints all` ran."""
    rows = [CheckpointFacts(c.path.name, c.step, c.path, path_size(c.path)) for c in list_checkpoints(out)]
    rows.sort(key=lambda c: c.step)
    size = final_model_size(out)
    if size is not None:
        rows.append(CheckpointFacts("final", last_step, out, size))
    measured = {e.get("name"): e for e in (evaluation or {}).get("checkpoints", [])}
    best = (evaluation or {}).get("best")
    for row in rows:
        entry = measured.get(row.name)
        if entry is not None:
            row.metrics = entry.get("metrics")
        row.best = row.name == best
    return rows


# ---------------------------------------------------------------------------------------------- the folder


def read_json(path: Path) -> dict | None:
    """A JSON object from a file; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_run_folder(out: Path) -> bool:
    return out.is_dir() and ((out / RUN_INFO).is_file() or any(CHECKPOINT.match(p.name) for p in out.iterdir()))


def logging_dir(out: Path, config_text: str | None) -> str:
    """The run's `output.logging_dir` as its config.yaml says, else the default."""
    try:
        import yaml

        name = ((yaml.safe_load(config_text or "") or {}).get("output") or {}).get("logging_dir")
    except (ValueError, AttributeError, yaml.YAMLError):
        name = None
    return str(name) if name else "logs"


def run_status(out: Path, checkpoints: list[CheckpointFacts], log: list[dict]) -> str:
    """Running (its lock is held), finished (a final model at least as new as anything logged or checkpointed), or
    stopped at the newest step the folder shows. The log is sparse (every logging_steps), so checkpoints count."""
    steps = [c.step for c in checkpoints if c.name != "final" and c.step is not None]
    last = max(steps + ([log[-1]["step"]] if log else []), default=None)
    at = f" at step {last}" if last is not None else ""
    if (out / LOCK_FILE).exists():
        return f"running{at}"
    final = next((c for c in checkpoints if c.name == "final"), None)
    if final is None:
        return f"stopped{at} (no final model yet)"
    if final.step is None or last is None or final.step >= last:
        return "finished"
    return f"stopped{at} (the final model in the folder is from step {final.step})"


def final_model_step(out: Path, progress: dict | None) -> int | None:
    """The step the final model was saved at: a LoRA records it in its file; a full model's is what the finishing
    process wrote to progress.json (None for a full model of a run made before the report)."""
    metadata = read_metadata(out / LORA_FILE) if (out / LORA_FILE).is_file() else {}
    for value in (metadata.get("dreambooth.steps"), (progress or {}).get("final_step")):
        try:
            return int(value)
        except (TypeError, ValueError):
            continue
    return None


def gather(out: Path, status: str | None = None) -> RunFacts:
    """Reads a run folder; raises UserError only when `out` is not a run folder at all. `status`: what the process
    writing the report knows of its run (finished, stopped), over what the folder shows."""
    out = Path(out)
    if not is_run_folder(out):
        what = "does not exist" if not out.exists() else "is not a folder" if not out.is_dir() else \
            "holds no run_info.json and no checkpoint-N folder"
        raise UserError(f"{out} {what}, so it is not a training run's output folder. Pass the --output_dir of a "
                        "`dreambooth train` run.")
    config_file = out / "config.yaml"
    config_text = config_file.read_text(encoding="utf-8") if config_file.is_file() else None
    logs = logging_dir(out, config_text)
    log = read_log(out / logs / "train_log.jsonl")
    val_log = read_log(out / logs / VALIDATION_LOSS_FILE)
    evaluation = read_json(out / EVALUATION_FILE)
    progress = read_json(out / REPORT_DIR / PROGRESS_FILE)
    checkpoints = read_checkpoints(out, evaluation, final_model_step(out, progress))
    return RunFacts(out=out, info=read_json(out / RUN_INFO), config_text=config_text, log=log,
                    samples=read_samples(out), checkpoints=checkpoints, evaluation=evaluation, progress=progress,
                    status=status or run_status(out, checkpoints, log), logging_dir=logs, val_log=val_log)


def class_images(folder: Path, limit: int) -> list[Path]:
    """The first `limit` images of a class folder, by name."""
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    return found[:limit]


# ---------------------------------------------------------------------------------------------- progress


def record_progress(out: Path, session: str, started: float, step: int, device: str, peak_memory: int | None,
                    memory_kind: str, final: bool = False) -> dict:
    """Adds or updates this process's session in report/progress.json: what a later rebuild cannot see.

    `session` names one process's part of the run (run_info.json's `started`, rewritten by each resume), so a
    resumed run's wall time adds its sessions up.
    """
    path = out / REPORT_DIR / PROGRESS_FILE
    progress = read_json(path) or {}
    sessions = [s for s in progress.get("sessions", []) if isinstance(s, dict)]
    current = next((s for s in sessions if s.get("session") == session), None)
    if current is None:
        current = {"session": session, "started": started, "first_step": step}
        sessions.append(current)
    current.update(updated=time.time(), step=step, device=device, peak_memory=peak_memory, memory_kind=memory_kind)
    progress = {**progress, "sessions": sessions}
    if final:
        progress["final_step"] = step
    write_json_atomic(path, progress)
    return progress


def wall_time(progress: dict | None) -> float | None:
    """Seconds the run's sessions spent from their start to their last report update, added up."""
    sessions = (progress or {}).get("sessions") or []
    spans = [s["updated"] - s["started"] for s in sessions
             if isinstance(s.get("updated"), (int, float)) and isinstance(s.get("started"), (int, float))]
    return sum(spans) if spans else None


def best_checkpoint(entries: list[dict]) -> tuple[str | None, str]:
    """The checkpoint to export, and why: the rule docs/design.md ("The run report") states.

    On the built-in world model, the share of subject prompts' images that show the subject (world_subject),
    ties going to the one that keeps the class prior better (world_colour); otherwise DINO, ties to CLIP-I;
    without DINO, CLIP-I. Remaining ties go to the earlier step (fewer steps, less drift from the prior).
    """
    measured = [e for e in entries if e.get("metrics")]
    if not measured:
        return None, "no checkpoint was measured"
    for keys in (("world_subject", "world_colour"), ("dino", "clip_i"), ("clip_i",)):
        if measured[0]["metrics"].get(keys[0]) is None:
            continue

        def rank(e: dict, keys: tuple[str, ...] = keys) -> tuple:
            values = [e["metrics"].get(k) for k in keys]
            return (*(v if v is not None else float("-inf") for v in values), -(e.get("step") or 0))

        best = max(measured, key=rank)
        shown = ", ".join(f"{k} {best['metrics'][k]:.3f}" for k in keys if best["metrics"].get(k) is not None)
        return best["name"], f"highest {keys[0]}" + (f" (ties: {', '.join(keys[1:])}, then the earlier step)"
                                                     if len(keys) > 1 else " (ties: the earlier step)") + f": {shown}"
    return None, "no measure to rank by (world_subject, DINO or CLIP-I)"
