"""The output folder and the one run it holds: a run id, the settings a resume must share, refusals, the lock.

A run folder holds exactly one run. Its `run_info.json` and every checkpoint's `trainer_state.json` carry the
run's id and the settings that make it that run (base model by content, method, what trains, LoRA shape,
identifiers, resolution, optimizer). Training into a folder that holds another run is refused unless the user resumes
it or asks to replace it; resuming from a checkpoint whose settings differ, or that belongs to another run
than the folder, is refused. Nothing is removed before the run is known to start (`claim`).

Torch-free: the plan is made in pre-flight, before weights load; the lock and `claim` act on it when the run
starts. `claim_work_folder` gives the same protection to the folders of `demo`, `experiment`, `compare` and
`tiny-model`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth.config import lora_denoiser_targets
from dreambooth.config_file import load_config, resolve_model_ref
from dreambooth.errors import UserError
from dreambooth.formats.atomic import write_text_atomic
from dreambooth.models.base import CHECKPOINT_STATE, LORA_FILE
from dreambooth.models.families import FAMILIES, folder_family

RUN_INFO = "run_info.json"
LOCK_FILE = ".dreambooth.lock"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_FILE = re.compile(r"^\..+\.\d+\.tmp$")  # formats.atomic.temporary_name
SCRATCH_FOLDERS = (".final-model.tmp", ".lora.tmp")  # training.outputs and formats.lora save through these
# What a run writes at the top of its folder; overwriting a run removes these and nothing else.
MODEL_PARTS = ("model_index.json", *sorted({part for family in FAMILIES.values() for part in family.components}),
               "safety_checker", "feature_extractor", "pytorch_lora_weights.safetensors",
               "token_embeddings.safetensors")
RUN_FILES = (RUN_INFO, "config.yaml", "README.md", "samples", "latent_cache", "report.html", "report",
             "checkpoint_metrics.json", *SCRATCH_FOLDERS)


def path_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links are not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def final_model_size(out: Path) -> int | None:
    """Bytes of what a user ships from a run folder: the LoRA file with its token files, or the diffusers model's
    parts; None when there is no final model (yet)."""
    if (out / LORA_FILE).is_file():
        return sum(p.stat().st_size for p in out.glob("*.safetensors") if p.is_file())
    if (out / "model_index.json").is_file():
        return sum(path_size(out / part) for part in MODEL_PARTS if (out / part).exists())
    return None


def human_size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GB"


def new_run_id() -> str:
    """Sortable by start time, unique without coordination: 20261129-224501-3f9a1c."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_settings(cfg, base_identity: str) -> dict:
    """The settings that make a run that run: a checkpoint resumes only into a run that shares them all.

    Learning rate, steps, schedule, batch size, precision and the data may change on resume (a longer run, a
    smaller batch after an out-of-memory error); these may not, since the saved weights would mean something
    else or not fit.
    """
    lora = cfg.model.method == "lora"
    # recorded under the names checkpoints have always had (train_unet: the denoiser), so older ones still compare
    return {
        "base_model": base_identity,
        "method": cfg.model.method,
        "train_unet": cfg.model.train_denoiser,
        "train_text_encoder": cfg.model.train_text_encoder,
        "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha or cfg.lora.rank,
                 "unet_target_modules": sorted(lora_denoiser_targets(cfg)),
                 "text_encoder_target_modules": sorted(cfg.lora.text_encoder_target_modules),
                 # recorded for the other kinds only, so a LoRA run's earlier checkpoints still compare
                 **adapter_settings(cfg)} if lora else None,
        "identifiers": [[s.identifier, s.initializer] for s in cfg.subject_list()],
        "resolution": cfg.training.resolution,
        "optimizer": cfg.training.optimizer_kind,  # a checkpoint's optimizer state is its own kind's
    }


def with_optimizer(theirs: dict, ours: dict) -> dict:
    """A checkpoint's settings as this version records them. The optimizer is recorded since Prodigy and Lion came;
    a checkpoint from before was trained by AdamW (8-bit with --use_8bit_adam, which was not recorded either), so it
    resumes into a run of either AdamW, as it always did."""
    if "optimizer" in theirs:
        return theirs
    adamw = ours.get("optimizer") in ("adamw", "adamw8bit")
    return {**theirs, "optimizer": ours["optimizer"] if adamw else "adamw"}


def adapter_settings(cfg) -> dict:
    """The adapter kind (and LoKr's factor) where it is not plain LoRA: the saved adapters are of that kind."""
    if cfg.lora.adapter == "lora":
        return {}
    factor = {"lokr_factor": cfg.lora.lokr_factor} if cfg.lora.adapter == "lokr" else {}
    return {"adapter": cfg.lora.adapter, **factor}


def other_base_model(checkpoint: CheckpointInfo, model) -> str:
    """Why a checkpoint cannot resume on this base model: the model it was trained on and both families, by name
    (the settings record the models by the hash of their weights, which tells the user nothing)."""

    def described(path) -> str:
        family = folder_family(path) if path else None
        return f"{path} (an {family.title} model)" if family else str(path)

    base = checkpoint.state.get("base_model")
    trained_on = described(base) if base else "another base model"
    return (f"output.resume_from_checkpoint: {checkpoint.path} was trained on {trained_on}, and this run's base "
            f"model is {described(model)}, another model (its weights differ); what the checkpoint trained belongs to "
            f"its own base. Resume with --pretrained_model_name_or_path {base or 'THAT_MODEL'} "
            "(model.pretrained_model), or start a new run from this model in another --output_dir.")


def describe_difference(theirs: dict, ours: dict) -> str:
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    return "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in keys)


# --------------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    run_id: str | None  # None: saved before run ids existed
    save_index: int
    settings: dict | None
    state: dict


def read_checkpoint(path: Path) -> CheckpointInfo | None:
    """A complete checkpoint folder's record; None if `path` is not one."""
    try:
        state = json.loads((path / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return None
    step = int(state.get("global_step", 0))
    return CheckpointInfo(path, step, state.get("run_id"), int(state.get("save_index", step)), state.get("settings"),
                          state)


def list_checkpoints(output_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, in the order they were saved (a resumed run may save step 300 after step 500)."""
    if not output_dir.is_dir():
        return []
    found = [read_checkpoint(p) for p in output_dir.iterdir() if CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted((c for c in found if c is not None), key=lambda c: (c.save_index, c.step))


def next_save_index(output_dir: Path) -> int:
    return max((c.save_index for c in list_checkpoints(output_dir)), default=0) + 1


def rotate(output_dir: Path, total_limit: int | None, keep: Path) -> list[Path]:
    """Keeps the `total_limit` most recently saved checkpoints, `keep` (the one just written) always among them."""
    if total_limit is None:
        return []
    others = [c.path for c in list_checkpoints(output_dir) if c.path != keep]
    removed = others[:max(0, len(others) - (total_limit - 1))]
    for path in removed:
        shutil.rmtree(path)
    return removed


def is_partial_save(name: str) -> bool:
    """A save killed part-way: `checkpoint-N.tmp`, the final model's and the LoRA's scratch folders, or
    `.NAME.PID.tmp` from `formats.atomic` (anywhere in the run folder: samples/ and latent_cache/ too)."""
    return ((name.startswith("checkpoint-") and name.endswith(".tmp")) or name in SCRATCH_FOLDERS
            or bool(PARTIAL_FILE.match(name)))


def remove_partial_saves(output_dir: Path) -> None:
    """Nothing in a save killed part-way is trustworthy; it goes when the next run of the folder starts."""
    if not output_dir.is_dir():
        return
    for p in sorted(output_dir.rglob("*.tmp"), key=lambda p: len(p.parts)):
        if is_partial_save(p.name) and p.exists():  # gone already if inside one removed before
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- the folder


@dataclass
class FolderState:
    """What an output folder holds."""

    path: Path
    exists: bool
    run_id: str | None = None
    settings: dict | None = None
    is_run: bool = False
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    has_model: bool = False
    foreign: list[str] = field(default_factory=list)  # entries no run of this tool writes

    def describe(self) -> str:
        parts = []
        if self.run_id:
            parts.append(f"run {self.run_id}")
        if self.checkpoints:
            parts.append(f"{len(self.checkpoints)} checkpoint(s) up to step {max(c.step for c in self.checkpoints)}")
        if self.has_model:
            parts.append("a finished model")
        return ", ".join(parts) or "an earlier run that saved nothing"

    @property
    def has_results(self) -> bool:
        return bool(self.checkpoints) or self.has_model


def _is_run_entry(name: str, logging_dir: str) -> bool:
    return (name in MODEL_PARTS or name in RUN_FILES or name == logging_dir or name == LOCK_FILE
            or bool(CHECKPOINT.match(name)) or is_partial_save(name))


def inspect_folder(path: Path, logging_dir: str = "logs") -> FolderState:
    """Reads an output folder without changing it."""
    if not path.exists():
        return FolderState(path, exists=False)
    if not path.is_dir():
        raise UserError(f"output.output_dir: {path} is a file, not a folder; choose a folder for the run.")
    state = FolderState(path, exists=True)
    info_file = path / RUN_INFO
    if info_file.is_file():
        try:
            info = json.loads(info_file.read_text())
        except ValueError:
            info = {}
        state.is_run, state.run_id, state.settings = True, info.get("run_id"), info.get("settings")
    state.checkpoints = list_checkpoints(path)
    state.has_model = (path / "model_index.json").is_file() or (path / LORA_FILE).is_file()
    state.is_run = state.is_run or bool(state.checkpoints)
    if state.is_run and state.run_id is None and state.checkpoints:
        state.run_id = state.checkpoints[-1].run_id
    # Outside a run folder every file is the user's, even one named like a run's (a project's config.yaml, a
    # diffusers model's unet/): only a folder this tool marked as a run may hold what a run writes.
    state.foreign = sorted(p.name for p in path.iterdir()
                           if not p.name.startswith(".") and not (state.is_run and _is_run_entry(p.name, logging_dir)))
    return state


def legacy_settings(checkpoint: CheckpointInfo, identity_of) -> dict | None:
    """The settings of a checkpoint saved before they were recorded, from the config.yaml saved in it.

    Those versions recorded the base model as it was typed; a relative one was relative to the working directory
    of that run, which is taken to be this one's.
    """
    config = checkpoint.path / "config.yaml"
    if not config.is_file():
        return None
    base = checkpoint.state.get("base_model")
    overrides = {"model.pretrained_model": resolve_model_ref(str(base), Path.cwd())} if base else {}
    try:
        cfg = load_config(config, overrides)
    except UserError:
        return None
    return run_settings(cfg, identity_of(cfg))


@dataclass
class RunPlan:
    """How this run uses its output folder, decided in pre-flight; carried out by `claim` once it can start."""

    output_dir: Path
    run_id: str | None  # None: a new run, its id drawn when it starts
    settings: dict
    resume_from: CheckpointInfo | None = None
    replace: FolderState | None = None  # an earlier run whose files go when this one starts
    notes: list[str] = field(default_factory=list)

    def claim(self, logging_dir: str = "logs") -> None:
        """Removes the replaced run's files (only what a run writes) and leftovers of killed saves."""
        if self.replace is not None and self.replace.exists:
            for entry in sorted(self.output_dir.iterdir()):
                if entry.name == LOCK_FILE or not _is_run_entry(entry.name, logging_dir):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        remove_partial_saves(self.output_dir)


def resolve_checkpoint(output_dir: Path, resume: str) -> Path:
    """A checkpoint given as a path, or as a name in the output folder (diffusers' `checkpoint-400`)."""
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = output_dir / resume
    return path


def plan_run(cfg, identity_of) -> RunPlan:
    """Decides whether this run starts fresh, resumes a checkpoint, or replaces an earlier run; refuses the rest.

    `identity_of(cfg)` gives the base model's identity (dreambooth.models.base.model_identity).
    """
    out, o = cfg.output.output_dir, cfg.output
    settings = run_settings(cfg, identity_of(cfg))
    folder = inspect_folder(out, str(o.logging_dir))
    if folder.foreign:
        shown = ", ".join(folder.foreign[:5]) + (f" and {len(folder.foreign) - 5} more" if len(folder.foreign) > 5
                                                  else "")
        raise UserError(f"output.output_dir: {out} holds files that are not from a training run ({shown}); a run "
                        "writes its model, checkpoints and logs there and would mix with them. Choose a new or "
                        "empty folder.")
    plan = RunPlan(out, None, settings)
    resume = o.resume_from_checkpoint
    if resume:
        return _plan_resume(cfg, plan, folder, resume, identity_of)
    if folder.is_run and o.overwrite_output_dir:
        plan.replace = folder
        plan.notes.append(f"output_dir: {out} holds {folder.describe()}; it is replaced when this run starts "
                          "(--overwrite_output_dir)")
    elif folder.is_run and folder.has_results:
        raise UserError(f"output.output_dir: {out} holds another run ({folder.describe()}). Continue it with "
                        "--resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose another "
                        "--output_dir.")
    elif folder.is_run:
        plan.replace = folder
        plan.notes.append(f"output_dir: {out} holds an earlier run that saved no checkpoint and no model; its "
                          "leftovers are replaced when this run starts")
    return plan


def _plan_resume(cfg, plan: RunPlan, folder: FolderState, resume: str, identity_of) -> RunPlan:
    out = plan.output_dir
    if resume == "latest":
        if not folder.checkpoints:
            if folder.is_run and folder.has_results:
                raise UserError(f"output.resume_from_checkpoint: {out} holds {folder.describe()} but no checkpoint "
                                "to resume. Replace it with --overwrite_output_dir, or choose another --output_dir.")
            plan.notes.append(f"resume: no checkpoint in {out} yet; starting from the beginning")
            plan.replace = folder if folder.is_run else None
            return plan
        checkpoint = folder.checkpoints[-1]
    else:
        path = resolve_checkpoint(out, resume)
        checkpoint = read_checkpoint(path)
        if checkpoint is None:
            raise UserError(f"output.resume_from_checkpoint: {path} is not a complete checkpoint folder (no "
                            f"{CHECKPOINT_STATE}); pass a checkpoint-N folder from a run, or 'latest'.")
        if folder.is_run and folder.run_id and checkpoint.run_id and folder.run_id != checkpoint.run_id:
            raise UserError(f"output.resume_from_checkpoint: {path} belongs to run {checkpoint.run_id}, but "
                            f"output_dir {out} holds run {folder.run_id}. Resume it into its own folder or an empty "
                            "one.")
    theirs = checkpoint.settings or legacy_settings(checkpoint, identity_of)
    theirs = None if theirs is None else with_optimizer(theirs, plan.settings)
    if theirs is not None and theirs.get("base_model") != plan.settings["base_model"]:
        raise UserError(other_base_model(checkpoint, cfg.model.pretrained_model))
    if theirs is not None and theirs != plan.settings:
        raise UserError(f"output.resume_from_checkpoint: {checkpoint.path} was saved by a run with other settings "
                        f"({describe_difference(theirs, plan.settings)}). Resume with the same settings, or start a "
                        "new run in another --output_dir.")
    total = cfg.training.max_train_steps
    if total is not None and checkpoint.step > total:
        raise UserError(f"output.resume_from_checkpoint: {checkpoint.path} is at step {checkpoint.step}, past "
                        f"max_train_steps {total}. Raise --max_train_steps to train further, or use the checkpoint "
                        "as it is (`dreambooth generate --model` and `export` take it).")
    plan.resume_from, plan.run_id = checkpoint, checkpoint.run_id
    return plan


# --------------------------------------------------------------------------------------------- the lock


class RunLock:
    """`output_dir/.dreambooth.lock` while a run writes there: a second run into the same folder is refused.

    A lock whose process is gone (same host) is stale and taken over; one from another host is respected.
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise UserError(f"output.output_dir: another run is writing to {self.path.parent} (process "
                                    f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}). Wait "
                                    f"for it to end, or choose another --output_dir. If no run is alive, delete "
                                    f"{self.path}.") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return

    def _holder(self) -> dict | None:
        """The live process holding the lock, or None if the lock is stale."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if holder.get("host") != socket.gethostname():
            return holder
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except (ProcessLookupError, ValueError):
            return None
        except PermissionError:
            return holder
        return holder

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def claim_work_folder(out: Path, command: str, legacy: tuple[str, ...] = ()) -> None:
    """A folder a whole command owns (demo, experiment, compare): new, empty, or written by that command before,
    whose runs it then replaces. `legacy`: entries that mark a folder written before the marker existed."""
    marker = out / f".dreambooth-{command}"
    if marker.is_file():
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give `dreambooth {command}` a folder of its own.")
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.exists() else []
    if entries and not (legacy and all((out / name).exists() for name in legacy)):
        raise UserError(f"{out} holds files that `dreambooth {command}` did not write ({', '.join(entries[:5])}); it "
                        "writes its models and results there and would replace or mix with them. Choose a new or "
                        "empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, f"written by `dreambooth {command}`, which replaces its own runs here\n")
