"""An exponential moving average (EMA) of the trained weights (--use_ema): what validation draws with, what
checkpoints and the final model or LoRA hold.

What is averaged is exactly what trains, in fp32: the whole denoiser or text encoder of a full fine-tune, the LoRA
adapters of a LoRA run, and a new identifier token's embedding rows (not the rest of the vocabulary, which never
changes). It is updated once per optimizer step (not per accumulated batch), on every process from the weights that
DDP keeps equal, so every process holds the same average.

The decay schedule is diffusers' `EMAModel.get_decay`, so --ema_decay, --ema_update_after_step and --ema_warmup mean
what they mean there: the update after t earlier ones (past ema_update_after_step) uses
min(ema_decay, (1 + t) / (10 + t)), or with warm-up min(ema_decay, 1 - (1 + t)^(-2/3)); the first uses 0, so the
average starts at the first step's weights and the base model's do not linger in it. The weight update is EMAModel's
formula, shadow -= (1 - decay) * (shadow - weight), written here rather than called through `EMAModel.step`, which
averages whole parameters only (a new token's rows are a slice of a 49,408-row embedding, and step copies a tensor
that does not require grad instead of averaging it) and cannot update an average in CPU memory from weights on the
GPU (diffusers' scripts move the whole average to the GPU for each update, which --ema_on_cpu is there to avoid).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreambooth.errors import UserError

# The weights training continues from, beside a checkpoint's usual layout, which holds the EMA weights
# (training.checkpoint).
RAW_WEIGHTS = "raw_weights.safetensors"


@dataclass
class Slot:
    """One averaged tensor: a trained parameter, or the trained rows of a text encoder's token embedding."""

    name: str  # the component and the parameter's name in it: "unet.conv_in.weight"
    param: torch.nn.Parameter
    rows: torch.Tensor | None = None  # the new tokens' row ids (on the parameter's device); None: all of it

    def read(self) -> torch.Tensor:
        weight = self.param.detach()
        return weight if self.rows is None else weight.index_select(0, self.rows)

    @torch.no_grad()
    def write(self, value: torch.Tensor) -> None:
        value = value.to(self.param.device, self.param.dtype)
        if self.rows is None:
            self.param.copy_(value)
        else:
            self.param.index_copy_(0, self.rows, value)


def trained_slots(cfg, models, modules: dict[str, torch.nn.Module]) -> list[Slot]:
    """Every trained tensor of `modules` (by component name, unwrapped), in a fixed order."""
    from dreambooth.training.components import token_rows_only

    rows = token_rows_only(cfg, models)
    slots = []
    for component, module in modules.items():
        embedding = module.get_input_embeddings().weight if component in rows else None
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            ids = torch.tensor(rows[component], device=param.device) if param is embedding else None
            slots.append(Slot(f"{component}.{name}", param, ids))
    return slots


def make_schedule(cfg):
    """diffusers' EMAModel, holding no weights, for its decay schedule and its count of updates."""
    from diffusers.training_utils import EMAModel

    t = cfg.training
    return EMAModel([], decay=t.ema_decay, update_after_step=t.ema_update_after_step, use_ema_warmup=t.ema_warmup)


class WeightAverage:
    """The EMA of a run's trained tensors, beside them on their device or in CPU memory (`on_cpu`)."""

    def __init__(self, slots: list[Slot], schedule, on_cpu: bool = False) -> None:
        self.slots, self.schedule, self.on_cpu = slots, schedule, on_cpu
        self.restart()

    def _held(self, value: torch.Tensor) -> torch.Tensor:
        """An fp32 copy of `value` where the average lives; in CPU memory pinned when it comes from a GPU, so that the
        copies of each update run beside the device's work."""
        if not self.on_cpu:
            return value.to(torch.float32, copy=True)
        held = torch.empty(value.shape, dtype=torch.float32, pin_memory=value.is_cuda)
        held.copy_(value)
        return held

    def restart(self, updates: int = 0) -> None:
        """The average becomes the trained tensors as they are now, `updates` updates into its schedule."""
        self.shadow = [self._held(slot.read()) for slot in self.slots]
        self.schedule.optimization_step = updates

    @property
    def updates(self) -> int:
        return self.schedule.optimization_step

    @torch.no_grad()
    def update(self) -> None:
        """One EMA update, after an optimizer step: shadow -= (1 - decay) * (shadow - weight)."""
        self.schedule.optimization_step += 1
        decay = self.schedule.cur_decay_value = self.schedule.get_decay(self.schedule.optimization_step)
        live = [slot.read() for slot in self.slots]
        if not self.on_cpu:
            torch._foreach_sub_(self.shadow, torch._foreach_sub(self.shadow, live), alpha=1 - decay)
            return
        # One tensor at a time on the weights' device, so that the device never holds a second copy of the model.
        # (On a CPU-only machine `to` returns the tensor itself and this is the same sum, in place.)
        for held, weight in zip(self.shadow, live):
            near = held.to(weight.device, non_blocking=True)
            near.sub_(near - weight, alpha=1 - decay)
            held.copy_(near, non_blocking=True)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The EMA by slot name; the host waits for the device's copies into it first."""
        if self.on_cpu and torch.cuda.is_available():
            torch.cuda.synchronize()
        return {slot.name: held for slot, held in zip(self.slots, self.shadow)}

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA weights in the trained parameters for the block (validation, saving), the trained ones back
        after, bit for bit. Those wait in CPU memory meanwhile, as EMAModel.store keeps them: drawing and saving
        need the device's memory more than they need the copy to be fast."""
        kept = [slot.read().to("cpu", copy=True) for slot in self.slots]
        try:
            for slot, held in zip(self.slots, self.shadow):
                slot.write(held)
            yield
        finally:
            for slot, value in zip(self.slots, kept):
                slot.write(value)

    def record(self) -> dict:
        """The EMA's state beside its weights in a checkpoint: the settings it ran with and its count of updates."""
        s = self.schedule
        return {"decay": s.decay, "update_after_step": s.update_after_step, "warmup": s.use_ema_warmup,
                "updates": s.optimization_step}


def ema_weights(run):
    """The run's EMA weights in its model for a `with` block; nothing changes without --use_ema."""
    return contextlib.nullcontext() if run.ema is None else run.ema.swapped_in()


def make_average(cfg, models, accelerator) -> WeightAverage | None:
    """The run's EMA, started from the weights as loaded (None without --use_ema)."""
    if not cfg.training.use_ema:
        return None
    modules = {name: accelerator.unwrap_model(module) for name, module in models.modules().items()}
    return WeightAverage(trained_slots(cfg, models, modules), make_schedule(cfg), cfg.training.ema_on_cpu)


# ------------------------------------------------------------------------------------------- what it means, in words
def decay_at_end(cfg, total_steps: int) -> float:
    """The decay of the last update of a run of `total_steps` optimizer steps."""
    return make_schedule(cfg).get_decay(total_steps)


def describe(cfg, total_steps: int) -> str:
    """One line for the start of a run: the schedule, where the EMA lives, how long it averages over by the end."""
    t = cfg.training
    ramp = "1 - (1 + t)^(-2/3)" if t.ema_warmup else "(1 + t) / (10 + t)"
    where = "in CPU memory" if t.ema_on_cpu else "beside the weights"
    decay = decay_at_end(cfg, total_steps)
    if decay == 0:
        end = f"it is the trained weights at step {total_steps} (ema_update_after_step is {t.ema_update_after_step})"
    else:
        end = f"at step {total_steps} the decay is {decay:.4g}, an average over about the last {steps(horizon(decay))}"
    return (f"EMA of the trained weights ({where}): its decay grows as {ramp} after t updates, up to "
            f"{t.ema_decay:g}; {end}. Validation, checkpoints and the final output hold the EMA weights.")


def horizon(decay: float) -> int:
    """The steps an EMA of this decay averages over, roughly: 1 / (1 - decay)."""
    return round(1 / (1 - decay))


def steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def weights_label(cfg, total_steps: int) -> str:
    """What the saved weights are, for run_info.json, the model card and the run report."""
    if not cfg.training.use_ema:
        return "the trained weights at the last step"
    decay = decay_at_end(cfg, total_steps)
    return (f"EMA weights (decay at most {cfg.training.ema_decay:g}, {decay:.4g} at step {total_steps}: about the "
            f"last {steps(horizon(decay))})")


# ------------------------------------------------------------------------------------------- in checkpoints
def save_raw_weights(average: WeightAverage, file: Path) -> None:
    """The trained (not averaged) tensors, which training continues from, with the EMA's count of updates."""
    tensors = {slot.name: slot.read().to("cpu", copy=True).contiguous() for slot in average.slots}
    save_file(tensors, str(file), metadata={"dreambooth.ema": json.dumps(average.record())})


def load_raw_weights(file: Path, slots: list[Slot]) -> dict:
    """Puts the trained tensors of `file` into `slots`; returns the EMA's record saved with them."""
    with safe_open(str(file), framework="pt") as f:
        names, record = set(f.keys()), json.loads((f.metadata() or {}).get("dreambooth.ema", "{}"))
        wanted = {slot.name for slot in slots}
        odd = sorted(names ^ wanted)
        if odd:
            raise UserError(f"output.resume_from_checkpoint: {file} does not match this run's trainable weights "
                            f"({', '.join(odd[:3])}); was it saved with another method, LoRA settings or base model? "
                            "Resume with the same config.")
        for slot in slots:
            slot.write(f.get_tensor(slot.name))
    return record
