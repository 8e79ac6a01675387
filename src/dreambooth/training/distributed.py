"""Training on several processes: where a micro-batch's random draws come from, what a change of process count on
resume means, and which of accelerate's FSDP settings a run can use. Torch-free, so pre-flight can ask.

accelerate does the distributed work (DDP, FSDP); `accelerate launch` passes its config to the processes as
environment variables (ACCELERATE_USE_FSDP, FSDP_*), which accelerate's Accelerator reads. Pre-flight reads the
same variables, before any weights load, to refuse what this tool does not support under FSDP.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass


def draw_seed(seed: int, index: int) -> int:
    """The seed of the noise, timesteps and latent samples of global micro-batch `index` of a run seeded `seed`.

    A micro-batch's draws depend on its place in the global batch, not on the process that computes it: one process
    accumulating 2 micro-batches draws what 2 processes draw for one each, so both train the same weights, and a
    checkpoint resumes on another process count with the same draws (`index` is (step x accumulation + micro-batch)
    x processes + rank). Hashed, so neighbouring seeds and indices give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # below 2**63: torch's seeds are signed 64-bit on some devices


@dataclass(frozen=True)
class Layout:
    """How a run's global batch is split: per-process batch x processes x accumulation."""

    processes: int
    batch_size: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.processes * self.batch_size * self.accumulation

    def record(self) -> dict:
        return {"processes": self.processes, "batch_size": self.batch_size,
                "gradient_accumulation_steps": self.accumulation}

    @classmethod
    def from_record(cls, record: Mapping | None) -> Layout | None:
        if not record:
            return None
        return cls(int(record["processes"]), int(record["batch_size"]), int(record["gradient_accumulation_steps"]))


def resume_note(saved: Layout | None, now: Layout) -> str | None:
    """What a resume on another layout means, for the log; None when the layout is the one saved (an exact resume).

    With the same global batch a step sees the same photos and the same draws (`draw_seed`), so the run continues as
    it would have: only the order of the sums differs (float rounding). With another global batch the step count
    carries on, but a step now covers another number of photos: a different run from there on, not a resume of the
    one saved."""
    if saved is None or saved == now:
        return None
    was = (f"{saved.processes} process(es) x batch {saved.batch_size} x accumulation {saved.accumulation}")
    is_ = f"{now.processes} x {now.batch_size} x {now.accumulation}"
    if saved.global_batch == now.global_batch:
        return (f"note: resuming a checkpoint saved by {was} on {is_}: the same global batch of {now.global_batch}, so "
                "the same photos and noise per step; the gradients are summed in another order, so the weights "
                "can differ from an uninterrupted run in float rounding")
    return (f"note: resuming a checkpoint saved by {was} (global batch {saved.global_batch}) on {is_} (global batch "
            f"{now.global_batch}): not an exact resume; the steps from here cover {now.global_batch} photos each, and "
            "the data order continues from the same step count, not the same photo. Keep "
            "processes x batch_size x gradient_accumulation_steps for the same run.")


# ------------------------------------------------------------------------------------------------ FSDP

def fsdp_env(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """accelerate's FSDP settings of this launch (the FSDP_* variables `accelerate launch` sets from its config file),
    or None when FSDP is off."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    return {k: v for k, v in env.items() if k.startswith("FSDP_")}


def _on(settings: dict[str, str], name: str) -> bool:
    return settings.get(name, "false").lower() == "true"


def fsdp_problems(cfg, environ: Mapping[str, str] | None = None) -> list[str]:
    """Settings this tool does not train under FSDP, each as one message naming the key and what to do.

    FSDP is here for what does not fit one GPU: the full fine-tune of a large denoiser (SDXL, Flux.1). It shards the
    denoiser alone; everything that would need a whole copy of its weights on one process, or a second sharded model
    sharing one optimizer, is refused rather than half-supported."""
    settings = fsdp_env(environ)
    if settings is None:
        return []
    t, m = cfg.training, cfg.model
    ddp = "or launch without FSDP (accelerate's DDP: distributed_type MULTI_GPU in the accelerate config)"
    if m.method == "lora":
        # the rest is about a full fine-tune
        return ["model.method: lora under FSDP (distributed_type FSDP in the accelerate config, ACCELERATE_USE_FSDP): "
                "a LoRA run fits one GPU and its adapters are small; FSDP here shards a full fine-tune. Launch it "
                "without FSDP (accelerate's DDP: distributed_type MULTI_GPU), which trains LoRA on every GPU."]
    found = []
    if settings.get("FSDP_VERSION", "1") != "2":
        # accelerate's FSDP2 path takes the model and the optimizer made before it together and swaps the optimizer's
        # parameters for the shards; the loop is written for that (training.loop.setup), and FSDP1 is being retired
        found.append(f"fsdp_config.fsdp_version {settings.get('FSDP_VERSION', '1 (the default)')} (FSDP_VERSION): "
                     "this tool trains under FSDP2. Set fsdp_version: 2 in the accelerate config (or "
                     "--fsdp_version 2 on accelerate launch).")
    if m.train_text_encoder:
        found.append("model.train_text_encoder under FSDP: FSDP shards the denoiser only (accelerate saves one "
                     "optimizer with one sharded model). Drop --train_text_encoder (train_text_encoder: false) for the "
                     f"FSDP run, {ddp}.")
    if any(s.initializer for s in cfg.subject_list()):
        found.append("token.initializer under FSDP: a new identifier token trains rows of the text encoder beside the "
                     "sharded denoiser. Make the identifier an existing rare token (token.identifier: sks, no "
                     f"token.initializer) for the FSDP run, {ddp}.")
    if t.use_ema:
        found.append("training.use_ema under FSDP: the EMA keeps a whole copy of the trained weights on every "
                     f"process, which is what FSDP avoids. Drop --use_ema for the FSDP run, {ddp}.")
    if t.optimizer_kind == "adamw8bit":
        flag = "--use_8bit_adam" if t.use_8bit_adam else "--optimizer adamw8bit"
        found.append(f"training.{'use_8bit_adam' if t.use_8bit_adam else 'optimizer'} under FSDP: bitsandbytes' 8-bit "
                     f"states are not sharded by FSDP. Drop {flag}: FSDP already splits AdamW's states across the "
                     "GPUs.")
    if _on(settings, "FSDP_OFFLOAD_PARAMS") and t.optimizer_kind != "adamw":
        found.append("fsdp_config.fsdp_offload_params (FSDP_OFFLOAD_PARAMS) with training.optimizer "
                     f"{t.optimizer_kind}: parameters offloaded to the CPU are stepped there, which only torch's "
                     "AdamW does here. Use --optimizer adamw, or set fsdp_offload_params: false in the accelerate "
                     "config.")
    if _on(settings, "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        found.append("fsdp_config.fsdp_cpu_ram_efficient_loading (FSDP_CPU_RAM_EFFICIENT_LOADING): that loading is "
                     "for transformers' models; diffusers' denoisers load whole on each process. Set "
                     "fsdp_cpu_ram_efficient_loading: false in the accelerate config.")
    if cfg.validation.prompts:
        found.append("validation.prompts under FSDP: sampling runs on one process, and a sharded denoiser draws only "
                     "with all of them. Drop --validation_prompt for the FSDP run and draw from its checkpoints "
                     "(dreambooth generate --model OUTPUT_DIR/checkpoint-N).")
    return found
