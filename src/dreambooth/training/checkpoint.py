"""Resumable checkpoints: atomic `checkpoint-N/` folders in diffusers' layout, rotation, and a clean stop.

A checkpoint holds what trains in the layout diffusers users already load intermediate checkpoints from:
the denoiser's folder (`unet/`, or `transformer/` for Flux and SD3) and the CLIP text encoders' (`text_encoder/`,
SDXL's and SD3's `text_encoder_2/`; save_pretrained folders) when they train whole,
`pytorch_lora_weights.safetensors` for LoRA (with `adapter_state.safetensors`, peft's own state, for LoKr and LoHa),
and `token_embeddings.safetensors` with `tokenizer/` (and
`tokenizer_2/`) for new identifier tokens; beside them
accelerate's optimizer, schedule and RNG state, the resolved `config.yaml`, and
`trainer_state.json` (step, run id, the run's settings). So a checkpoint is usable on its own: `generate`,
`evaluate` and `export` take it, and `UNet2DConditionModel.from_pretrained("checkpoint-400/unet")` loads it.

With --use_ema that layout holds the EMA weights (training.ema), so whatever draws or exports a checkpoint gets what
validation drew and what the final output would have been; the trained weights that training continues from are
in `raw_weights.safetensors` beside it, with the EMA's count of updates. Resuming loads the layout into the EMA and
the raw file into the model.

It is written into `checkpoint-N.tmp/` and renamed when complete, so a killed save never leaves a folder that
`resume_from_checkpoint latest` would pick up. Old checkpoints are removed only after the new one is in place
(diffusers removes them before saving, which loses them if the save then fails), and never the one just
written.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dreambooth.errors import UserError
from dreambooth.formats.atomic import commit_folder
from dreambooth.formats.lora import TOKEN_FILE, lora_state_for_peft, read_token_file, save_token_embeddings
from dreambooth.formats.lycoris import ADAPTER_PARAMETERS, LYCORIS, TITLES
from dreambooth.models.base import CHECKPOINT_STATE, LORA_FILE
from dreambooth.training.ema import RAW_WEIGHTS, ema_weights, load_raw_weights, save_raw_weights, trained_slots
from dreambooth.training.outputs import save_lora_output, sharded, token_sides, unwrapped, whole_denoiser
from dreambooth.training.rundir import next_save_index, rotate

# A LoKr or LoHa run's adapters in a checkpoint as peft holds them, for an exact resume.
ADAPTER_STATE = "adapter_state.safetensors"


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, total_limit: int | None,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Saves models (through the hooks of `CheckpointFiles`), optimizer, LR schedule, RNG and our trainer state as
    `checkpoint-<step>/`, atomically."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"  # the name training.rundir clears as a killed save
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's RNG state is written before the folder is renamed
    if accelerator.is_main_process:
        try:
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
            (tmp / CHECKPOINT_STATE).write_text(json.dumps(
                {**state, "global_step": step, "save_index": next_save_index(output_dir)}, indent=2, default=str))
            commit_folder(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        rotate(output_dir, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restores what `save_checkpoint` saved; returns the trainer state (with `global_step`).

    The noise generator needs no state: each micro-batch seeds it from its place in the global batch (loop.seed_draws).
    Checkpoints from before that hold `noise_generator_N.safetensors`, which is not read."""
    accelerator.load_state(str(path))
    return json.loads((path / CHECKPOINT_STATE).read_text())


def _load_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder (one file, or the shards a large model is split into)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"output.resume_from_checkpoint: {folder} holds no .safetensors weights.")
    weights = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


class CheckpointFiles:
    """Writes a run's trained modules into a checkpoint in diffusers' layout and reads them back exactly.

    Replaces accelerate's own model saving, which would write every weight of every prepared model (for LoRA,
    the frozen UNet in every checkpoint) in a layout only accelerate reads.
    """

    def __init__(self, run) -> None:
        self.run = run

    def register(self) -> None:
        acc = self.run.accelerator

        def save_hook(models, weights, output_dir):
            denoiser = whole_denoiser(self.run) if self.run.cfg.model.method == "full" else None
            if acc.is_main_process:
                self.save(Path(output_dir), denoiser)
            weights.clear()

        def load_hook(models, input_dir):
            # Under FSDP accelerate has already loaded the denoiser's shards (and the optimizer's) from its own files
            # in the checkpoint, resharded to this run's process count; the denoiser is all that trains there
            # (training.distributed.fsdp_problems), so the diffusers layout beside them is for drawing only.
            if not sharded(acc):
                self.load(Path(input_dir))
            models.clear()

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    def save(self, folder: Path, denoiser: torch.nn.Module | None = None) -> None:
        """`denoiser`: the whole trained denoiser (outputs.whole_denoiser), where it is not the unwrapped module."""
        with ema_weights(self.run):
            self._save_layout(folder, denoiser)
        if self.run.ema is not None:
            save_raw_weights(self.run.ema, folder / RAW_WEIGHTS)

    def _save_layout(self, folder: Path, denoiser: torch.nn.Module | None) -> None:
        cfg, m = self.run.cfg, self.run.models
        modules = unwrapped(self.run)
        if denoiser is not None:
            modules[m.family.denoiser] = denoiser
        if cfg.model.method == "lora":
            save_lora_output(self.run, folder)  # adapters and new tokens, as in the final output
            if cfg.lora.adapter in LYCORIS:
                self._save_adapter_state(folder, modules)
        else:
            if cfg.model.train_denoiser:
                denoiser = m.family.denoiser
                modules[denoiser].save_pretrained(folder / denoiser, safe_serialization=True)
            if cfg.model.train_text_encoder:
                for name, _, _, _ in m.text_sides(trainable_only=True):
                    modules[name].save_pretrained(folder / name, safe_serialization=True)
            else:
                save_token_embeddings(folder, token_sides(self.run))
        for name, tokenizer, _, token_ids in m.text_sides():
            if token_ids:
                tokenizer.save_pretrained(folder / name.replace("text_encoder", "tokenizer"))

    def load(self, folder: Path) -> None:
        self._load_layout(folder)
        self._load_average(folder)

    def _load_average(self, folder: Path) -> None:
        """After the layout: with a raw file, the layout held the EMA (kept, if this run has one) and the raw file
        holds the weights to continue from. A checkpoint without one starts this run's EMA at its weights."""
        run, raw = self.run, folder / RAW_WEIGHTS
        if raw.is_file():
            if run.ema is not None:
                run.ema.restart()
            slots = run.ema.slots if run.ema is not None else trained_slots(run.cfg, run.models, unwrapped(run))
            record = load_raw_weights(raw, slots)
            if run.ema is not None:
                run.ema.schedule.optimization_step = int(record.get("updates", 0))
        elif run.ema is not None:
            run.ema.restart()
            if run.accelerator.is_main_process:
                print(f"note: {folder} was saved without an EMA; the EMA starts from its weights")

    def _load_layout(self, folder: Path) -> None:
        cfg, m = self.run.cfg, self.run.models
        modules = unwrapped(self.run)
        if any(folder.glob("trainable_*.safetensors")):
            self._load_legacy(folder)  # every trainable weight, token rows included
            return
        if cfg.model.method == "lora":
            self._load_lora(folder, modules)
        else:
            if cfg.model.train_denoiser:
                self._load_whole(folder / m.family.denoiser, modules[m.family.denoiser])
            if cfg.model.train_text_encoder:
                for name, _, _, _ in m.text_sides(trainable_only=True):
                    self._load_whole(folder / name, modules[name])
        if m.first_token_ids and not (cfg.model.method == "full" and cfg.model.train_text_encoder):
            self._load_token_rows(folder, modules)

    def _load_whole(self, folder: Path, module: torch.nn.Module) -> None:
        weights = _load_folder_weights(folder)
        _check_loaded(folder, module, module.load_state_dict(weights, strict=False))

    @staticmethod
    def _save_adapter_state(folder: Path, modules: dict[str, torch.nn.Module]) -> None:
        """peft's own state of LoKr and LoHa adapters, `{component}.{peft name}`: what resuming reads, exactly. The
        LyCORIS file beside it is for drawing; a LoKr layer of two whole factors has its scale folded in there,
        which dividing out again would not give back bit for bit."""
        from peft.utils import get_peft_model_state_dict

        state = {f"{component}.{key}": value.detach().cpu().contiguous() for component, module in modules.items()
                 if getattr(module, "peft_config", None)
                 for key, value in get_peft_model_state_dict(module, adapter_name="default").items()}
        save_file(state, str(folder / ADAPTER_STATE))

    def _load_lora(self, folder: Path, modules: dict[str, torch.nn.Module]) -> None:
        from peft import set_peft_model_state_dict

        lycoris = self.run.cfg.lora.adapter in LYCORIS
        file = folder / (ADAPTER_STATE if lycoris else LORA_FILE)
        if not file.is_file():
            raise UserError(f"output.resume_from_checkpoint: {folder} has no {file.name}; it was not saved by a "
                            f"{TITLES[self.run.cfg.lora.adapter]} run. Resume with the method and adapter it was "
                            "trained with.")
        tensors = load_file(str(file))
        for component, module in modules.items():
            if not getattr(module, "peft_config", None):
                continue
            state = ({k[len(component) + 1:]: v for k, v in tensors.items() if k.startswith(component + ".")}
                     if lycoris else lora_state_for_peft(component, tensors))
            result = set_peft_model_state_dict(module, state, adapter_name="default")
            _check_loaded(file, module, result, only_lora=True)

    def _load_token_rows(self, folder: Path, modules: dict[str, torch.nn.Module]) -> None:
        file = folder / TOKEN_FILE
        if not file.is_file():
            raise UserError(f"output.resume_from_checkpoint: {folder} has no {TOKEN_FILE} for the new identifier "
                            "token(s) of this run; resume with the identifier it was trained with.")
        family = self.run.models.family
        # the encoders with new tokens, by their key in the token file
        sides = {family.text_encoder(name).token_key: (name, tokenizer)
                 for name, tokenizer, _, ids in self.run.models.text_sides() if ids}
        with torch.no_grad():
            for token, vector in read_token_file(file).items():
                rows = vector if isinstance(vector, dict) else {next(iter(sides)): vector}
                if set(rows) != set(sides):
                    raise UserError(f"output.resume_from_checkpoint: {file} holds rows of token {token} for the text "
                                    f"encoder(s) {sorted(rows)}, this run trains it in {sorted(sides)}; resume with "
                                    "the base model and token settings (token.t5_new_token) it was made with.")
                for key, row in rows.items():
                    name, tokenizer = sides[key]
                    weight = modules[name].get_input_embeddings().weight
                    weight[tokenizer.convert_tokens_to_ids(token)] = row.to(weight.device, weight.dtype)

    def _load_legacy(self, folder: Path) -> None:
        """Checkpoints saved before the diffusers layout: trainable_<i>.safetensors per prepared module."""
        acc = self.run.accelerator
        for i, model in enumerate(self.run.models.trained()):
            path = folder / f"trainable_{i}.safetensors"
            module = acc.unwrap_model(model)
            result = module.load_state_dict(load_file(str(path)), strict=False)
            trainable = {n for n, p in module.named_parameters() if p.requires_grad}
            if result.unexpected_keys or trainable & set(result.missing_keys):
                raise UserError(f"output.resume_from_checkpoint: {path} does not match this run's trainable weights "
                                "(was it saved with another method or LoRA settings?); resume with the same config.")


def _check_loaded(source: Path, module: torch.nn.Module, result, only_lora: bool = False) -> None:
    """Every trainable weight must have come from the checkpoint, and nothing else."""
    missing = set(getattr(result, "missing_keys", []) or [])
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    trainable = {n for n, p in module.named_parameters()
                 if p.requires_grad and (not only_lora or any(mark in n for mark in ADAPTER_PARAMETERS))}
    lost = sorted(n for n in trainable if n in missing)
    if unexpected or lost:
        shown = ", ".join((unexpected + lost)[:3])
        raise UserError(f"output.resume_from_checkpoint: {source} does not match this run's trainable weights ({shown}"
                        "); was it saved with another method, LoRA settings or base model? Resume with the same "
                        "config.")


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
