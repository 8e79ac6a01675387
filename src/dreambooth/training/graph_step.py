"""The training step over fixed buffers, so that a CUDA graph can capture it once and replay it.

Why: on a GPU a DreamBooth step is small (two 64x64 latents at 512 px), and launching its ~3,000 kernels one by one
from Python costs more than running them. On an H200 the whole step (forward, backward, clipping, fused AdamW)
captured as a CUDA graph and replayed took 59 ms against 178 ms eager for SD 1.5 full fine-tuning, 39 against 155
ms for LoRA (a standalone probe; ../measurements in the issue, docs/bench.md).

What a graph needs, and how the step gives it:
- every tensor the step reads lives at a fixed address: a batch is copied into static buffers (`stage`);
- no host reads inside: losses are summed on the device; clipping computes its coefficient on the device;
- the learning rate is a device tensor that the LR schedule fills in place (torch's schedulers `fill_` a tensor
  lr), read by a capturable AdamW;
- gradients are zeroed in place (`zero_grad(set_to_none=False)`), so their buffers stay;
- noise and timesteps are drawn inside from the run's generator, which the loop seeds before each micro-step
  (loop.seed_draws; CUDA's generator is graph-safe: a replay starts from the generator's seed and offset as they are,
  so it draws what an eager micro-step would).
Two graphs: one micro-step (forward and backward, gradients accumulating), replayed `gradient_accumulation_steps`
times, and one optimizer step (clip, AdamW, zero). Validation, checkpoints and a stop request happen between
replays, as in the eager loop, and so does the EMA update of --use_ema (training.ema): it reads the weights the
optimizer graph has just written, in place at their fixed addresses, and is a few foreach launches (or, in CPU
memory, copies that a graph could not capture), so it stays outside the graphs and needs no fall-back.

On the CPU (and wherever capture is off or fails) the same object runs the same code eagerly, which is how the tests
check that it trains the same weights as the eager loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dreambooth.models.families.common import Conditioning
from dreambooth.training.distributed import fsdp_env
from dreambooth.training.loss import LossParts, latent_mask

WARMUP_STEPS = 3  # eager optimizer steps before capture: cuDNN/cuBLAS pick their kernels, AdamW creates its state
# Why each optimizer but torch's AdamW (whose fused kernel has a capturable mode) steps eagerly.
UNCAPTURED_OPTIMIZERS = {
    "adamw8bit": "8-bit AdamW (bitsandbytes) has no capturable step",
    "prodigy": "Prodigy reads its step-size estimate on the host each step",
    "lion": "Lion (lion-pytorch) reads its learning rate as a host number, which a graph would freeze",
}


def graph_obstacles(cfg, device_type: str, num_processes: int) -> list[str]:
    """What keeps this run's step from being captured as a CUDA graph; empty when nothing does."""
    t, found = cfg.training, []
    if device_type != "cuda":
        found.append(f"the device is {device_type}, not CUDA")
    if num_processes > 1:
        found.append("several processes (DDP) are not captured yet")
    if fsdp_env() is not None:
        found.append("FSDP's gathers and reshards of the weights are not captured")
    if t.mixed_precision == "fp16":
        found.append("fp16's GradScaler reads the host every step (bf16 needs none)")
    if t.optimizer_kind != "adamw":
        found.append(UNCAPTURED_OPTIMIZERS[t.optimizer_kind])
    if t.compile:
        found.append("--torch_compile is on (compiled code and a hand-made graph do not mix)")
    if t.latent_cache == "disk":
        found.append("the disk latent cache reads files on the host each step")
    if cfg.dataset.enable_bucket:
        found.append("aspect buckets change the batch's shape from step to step (a graph replays one shape)")
    family = known_family(cfg)
    if family is not None and not family.graph_step:
        found.append(f"{family.title}'s step is not captured yet (SD 1.x and 2.x's is)")
    if t.gradient_checkpointing and cfg.model.method == "lora" and cfg.lora.dropout > 0:
        # Recomputation restores the RNG by its host offset, which captured kernels do not read: the recomputed
        # dropout masks would differ from the forward's.
        found.append("gradient checkpointing with LoRA dropout draws other dropout masks when recomputed in a graph")
    return found


def known_family(cfg):
    """The run's model family, or None where its files do not tell (pre-flight reports that)."""
    from dreambooth.errors import UserError

    try:
        return cfg.family()
    except UserError:
        return None


def graph_plan(cfg, device_type: str, num_processes: int) -> tuple[bool, str]:
    """Whether the run steps through CUDA graphs, and the reason in one line."""
    if cfg.training.cuda_graph == "off":
        return False, "CUDA graph off: training.cuda_graph is off"
    found = graph_obstacles(cfg, device_type, num_processes)
    if found:
        return False, "CUDA graph off: " + "; ".join(found)
    return True, "CUDA graph on: the whole training step is captured once and replayed"


@dataclass
class Staged:
    """The static inputs of a micro-step."""

    latents: torch.Tensor
    cond: torch.Tensor  # prompt embeddings (text side frozen) or token ids (text side trains)
    mask: torch.Tensor | None
    is_prior: torch.Tensor
    geometry: torch.Tensor  # each image's size and crop (training.data.crop_geometry)
    loss_mask: torch.Tensor | None = None  # on the latent grid (dataset.masked_loss): one more buffer, a view's own


class StaticStep:
    """A micro-step and an optimizer step over fixed buffers; eager, or captured and replayed (`capture=True`)."""

    def __init__(self, run, encode, latent_cache, clip, step_loss, *, capture: bool):
        self.run, self.encode, self.latent_cache, self.clip, self.step_loss = run, encode, latent_cache, clip, step_loss
        self.optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper skips when unsynced
        self.accumulation = run.cfg.training.gradient_accumulation_steps
        self.staged: Staged | None = None
        self.parts: LossParts | None = None
        self.capture = capture
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.eager_steps = 0
        self.fallback_reason: str | None = None
        cfg = run.cfg
        self.full_rows = cfg.training.batch_size * (2 if cfg.dataset.with_prior_preservation else 1)
        # Warm-up and capture on one side stream: cuBLAS keeps a workspace per stream, so one first made during
        # capture would be pinned in the graph's pool (PyTorch's recipe warms up on the capture stream).
        self.stream = torch.cuda.Stream() if capture else None

    # ------------------------------------------------------------------------------------------- inputs
    def stage(self, batch: dict) -> bool:
        """Copies a batch into the static buffers; False when its shapes differ from theirs (a short last batch),
        for which the step then runs eagerly on fresh tensors."""
        run = self.run
        latents = self.latent_cache.scaled_sample(batch["pixel_values"], batch["cache_keys"], run.generator)
        cond, mask = self.encode.conditioning(batch["prompts"])
        is_prior = batch["is_prior"].to(latents.device)
        fresh = Staged(latents, cond, mask, is_prior, batch["geometry"].to(latents.device),
                       latent_mask(batch.get("loss_mask"), latents))
        if self.staged is None and latents.shape[0] != self.full_rows:
            self._eager_inputs = fresh  # buffers take a full batch's shape, not a short last one's
            return False
        if self.staged is None:
            self.staged = Staged(*(t.clone() if t is not None else None for t in vars(fresh).values()))
            return True
        if any((a is None) != (b is None) or (a is not None and a.shape != b.shape)
               for a, b in zip(vars(self.staged).values(), vars(fresh).values())):
            self._eager_inputs = fresh
            return False
        for static, value in zip(vars(self.staged).values(), vars(fresh).values()):
            if static is not None:
                static.copy_(value)
        return True

    # ------------------------------------------------------------------------------------------- the step's body
    def _micro(self, staged: Staged) -> LossParts:
        cond = self.encode.embed(staged.cond, staged.mask) if self.encode.trains else \
            Conditioning({"embeds": staged.cond})
        parts = self.step_loss(staged.latents, cond, staged.is_prior, staged.geometry, staged.loss_mask)
        (parts.loss / self.accumulation).backward()
        return parts

    def _optimizer_step(self) -> None:
        self.clip()
        self.optimizer.step()
        self.clip.done()
        self.optimizer.zero_grad(set_to_none=False)

    # ------------------------------------------------------------------------------------------- running it
    def micro_step(self, batch: dict) -> LossParts:
        """Forward and backward of one batch, gradients accumulating; returns its loss parts (device tensors)."""
        if not self.stage(batch):
            with self._side_stream():
                return self._micro(self._eager_inputs)
        if "micro" in self.graphs:
            self.graphs["micro"].replay()
            return self.parts
        with self._side_stream():
            self.parts = self._micro(self.staged)
        return self.parts

    def optimizer_step(self) -> None:
        """Clip, AdamW and zero the gradients; then captures both graphs once the warm-up steps are done."""
        if "optimizer" in self.graphs:
            self.graphs["optimizer"].replay()
            return
        with self._side_stream():
            self._optimizer_step()
        self.eager_steps += 1
        if self.capture and self.eager_steps >= WARMUP_STEPS and self.fallback_reason is None:
            self._try_capture()

    def _side_stream(self):
        """The capture stream for the eager steps before and beside the graphs (nothing on the CPU)."""
        return contextlib.nullcontext() if self.stream is None else on_stream(self.stream)

    def _try_capture(self) -> None:
        """Records both graphs (recording runs nothing, so no step is taken twice); on any failure the run goes on
        eagerly with one line saying why."""
        saved = _generator_states(self.run)
        try:
            _learning_rates_on(self.optimizer, self.run.accelerator.device)
            self.graphs = capture_graphs(self)
        except Exception as e:  # noqa: BLE001 - every capture failure means: go on eagerly, and say so
            self.graphs = {}
            self.fallback_reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            _restore_generators(self.run, saved)
            print(f"note: CUDA graph capture failed ({self.fallback_reason}); training goes on without it, with the "
                  "same numbers, slower. Pass --cuda_graph off to skip the attempt.")


@contextlib.contextmanager
def on_stream(stream):
    """Work on a side stream, ordered after what the current stream has queued and before what it queues next."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def _learning_rates_on(optimizer, device: torch.device) -> None:
    """Each group's learning rate as a tensor on the device, where the captured fused AdamW reads it each replay.

    accelerate loads a checkpoint's optimizer state onto the CPU, and torch's load_state_dict takes the saved
    groups as they are: a resumed run's lr is a CPU tensor, whose value the CUDA kernel would read once, at
    capture, freezing the schedule. The schedule finds the new tensor through the group dict and fills it in place.
    """
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            value = group.get(key)
            if isinstance(value, torch.Tensor) and value.device != device:
                group[key] = value.to(device)


def _generator_states(run) -> dict:
    states = {"run": run.generator.get_state()}
    if run.accelerator.device.type == "cuda":
        states["default"] = torch.cuda.get_rng_state(run.accelerator.device)
    return states


def _restore_generators(run, states: dict) -> None:
    """A capture that fails part-way leaves the generators it registered marked as capturing, so the next eager
    draw would fail: the run gets a fresh generator in the same state, and the device's default generator a fresh
    state object (where torch has the API)."""
    device = run.accelerator.device
    fresh = torch.Generator(device=device)
    fresh.set_state(states["run"])
    run.generator = fresh
    if "default" in states:
        replacement = torch.Generator(device=device)
        replacement.set_state(states["default"])
        default = torch.cuda.default_generators[device.index or 0]
        if hasattr(default, "graphsafe_set_state"):
            default.graphsafe_set_state(replacement.graphsafe_get_state())


def capture_graphs(step: StaticStep) -> dict:
    """The micro-step and the optimizer step as CUDA graphs over the step's static buffers.

    Gradients are zero when this runs (right after an optimizer step), and the recording does not execute, so the
    next replay is the next real step.
    """
    graphs = {"micro": torch.cuda.CUDAGraph(), "optimizer": torch.cuda.CUDAGraph()}
    # The run's own generator (not the default one) draws the noise and timesteps: registered, each replay reads
    # its seed and offset as the loop left them (seeded per micro-step) and advances the offset as an eager step would.
    register = getattr(graphs["micro"], "register_generator_state", None)  # torch >= 2.4 on CUDA builds
    if register is not None:
        register(step.run.generator)
    with on_stream(step.stream):  # the stream the warm-up ran on (StaticStep.__init__)
        with torch.cuda.graph(graphs["micro"], stream=step.stream):
            step.parts = step._micro(step.staged)
        with torch.cuda.graph(graphs["optimizer"], stream=step.stream):
            step._optimizer_step()
    return graphs
