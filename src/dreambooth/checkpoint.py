"""Resumable checkpoints: atomic `checkpoint-N/` folders, rotation, `latest`, and a clean stop on Ctrl-C/SIGTERM.

A checkpoint is written into `checkpoint-N.tmp/` and renamed when complete, so a killed save never leaves a
folder that `resume_from_checkpoint latest` would pick up. Old checkpoints are removed only after the new
one is in place (diffusers removes them before saving, which loses them if the save then fails).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dreambooth.errors import UserError
from dreambooth.runinfo import publish, write_json_atomic

STATE_FILE = "trainer_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def remove_partial_saves(output_dir: Path) -> None:
    """A `.tmp` folder is a save that was killed part-way: nothing in it is trustworthy."""
    if output_dir.is_dir():
        for p in output_dir.glob("checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from: a path, 'latest' (None if there is none yet), or nothing."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            print(f"resume: no checkpoint in {output_dir} yet; starting from the beginning")
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir() and (output_dir / resume).is_dir():
        path = output_dir / resume
    if not (path / STATE_FILE).is_file():
        raise UserError(f"output.resume_from_checkpoint: {resume} is not a complete checkpoint folder "
                        f"(no {STATE_FILE}); "
                        f"pass a checkpoint-N folder from a run, or 'latest'.")
    return path


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, generator: torch.Generator,
                    total_limit: int | None, extra_files: dict[str, str] | None = None) -> Path:
    """Saves models, optimizer, LR schedule, RNG and our trainer state as `checkpoint-<step>/`, atomically."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # every process has its own noise generator; all must be written before the folder is renamed
    save_file({"noise_generator": generator.get_state()},
              str(tmp / f"noise_generator_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        write_json_atomic(tmp / STATE_FILE, {**state, "global_step": step})
        if final.exists():
            shutil.rmtree(final)
        publish(tmp)
        os.replace(tmp, final)
        rotate(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate(output_dir: Path, total_limit: int | None) -> None:
    """Keeps the newest `total_limit` checkpoints."""
    if total_limit is None:
        return
    for old in list_checkpoints(output_dir)[:-total_limit]:
        shutil.rmtree(old)


def load_checkpoint(accelerator, path: Path, generator: torch.Generator) -> dict:
    """Restores what `save_checkpoint` saved; returns the trainer state (with `global_step`)."""
    accelerator.load_state(str(path))
    rng_file = path / f"noise_generator_{accelerator.process_index}.safetensors"
    if not rng_file.is_file():
        raise UserError(f"output.resume_from_checkpoint: {path} was saved by fewer processes than this run has "
                        f"(no {rng_file.name}); resume with the same number of processes.")
    rng = load_file(str(rng_file))["noise_generator"]
    generator.set_state(rng)
    return json.loads((path / STATE_FILE).read_text())


class StopRequest:
    """Turns the first Ctrl-C or SIGTERM into a request to save and stop at the next step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
              "(press Ctrl-C again to abort without saving)", flush=True)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def save_trainable_only(accelerator) -> None:
    """Checkpoints hold only the weights that train (a full UNet, LoRA adapters, a token's embedding).

    accelerate would save every weight of every prepared model, frozen base weights included: for LoRA that is
    the whole UNet per checkpoint instead of a few MB. These hooks replace its model saving and loading.
    """

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                params = accelerator.unwrap_model(model).named_parameters()
                state = {name: p.detach().contiguous() for name, p in params if p.requires_grad}
                save_file(state, os.path.join(output_dir, f"trainable_{i}.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            path = os.path.join(input_dir, f"trainable_{i}.safetensors")
            module = accelerator.unwrap_model(model)
            result = module.load_state_dict(load_file(path), strict=False)  # copied onto the module's device
            trainable = {n for n, p in module.named_parameters() if p.requires_grad}
            if result.unexpected_keys or trainable & set(result.missing_keys):
                raise UserError(f"output.resume_from_checkpoint: {path} does not match this run's trainable weights "
                                "(was it saved with another method or LoRA settings?); resume with the same config.")
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
