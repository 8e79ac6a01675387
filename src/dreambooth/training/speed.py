"""The fast path's switches, apart from the loop they speed up; each one's measurement is cited where it is made.

Every trick here keeps the numbers of the plain path (tests/test_wiring.py and tests/test_train_e2e.py check that
each is switched on, and that it trains the same weights), so the loop reads as if none existed:

- garbage collection paused while libraries import and models load, and skipped at exit (`collection_paused`,
  `freeze_alive_objects`);
- gradient clipping folded into torch's fused AdamW (`GradientClipping`);
- PyTorch's native CPU convolutions where they beat oneDNN's (`cpu_convolution`, `convolution_kernels`);
- channels-last layout and torch.compile of the UNet, TF32 on Ampere-or-newer GPUs (`speed_up`, `set_tf32`).

Importing torch, diffusers (with torch._dynamo and peft) and transformers creates about 700,000 Python objects
that live until the process ends. Python's collector walks all of them about six times as they arrive, again
at each later full collection, and once more when the interpreter exits. On the 2-core CPU machine, measured
in docs/bench.md ("Where a `tiny` run's time goes"), the walks during import cost about 0.5 s of a 6 s import,
each later one 0.2-0.3 s, and the one at exit 1.2 s. This module is torch-free at import, so that pausing the
collector can start before torch is imported; torch loads inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import gc
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from dreambooth.config import Config


@contextlib.contextmanager
def collection_paused():
    """No garbage collection inside the block; after it, the collector runs as before.

    For blocks that import libraries and load models: everything they create lives on, so collecting
    during them finds nothing. Garbage made meanwhile is collected after the block, nothing is frozen, so a
    long-lived process (a notebook, the test suite) does not keep it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def cpu_threading(environ: dict | None = None, cores: int | None = None) -> dict[str, str]:
    """OpenMP's settings for this process's CPU work, each unless the user (or a launcher) set it: threads that sleep
    at barriers (OMP_WAIT_POLICY=PASSIVE) and one thread fewer than the cores this process may run on
    (OMP_NUM_THREADS), so that another process computing on the same machine has a core. Returns what it set. Must
    run before torch is imported: libgomp and torch read these when they load.

    PyTorch's CPU kernels run on OpenMP threads that by default spin at every barrier. Beside another process that
    computes on the same cores, a spinning thread takes the core the thread it waits for needs, and each of a step's
    thousands of parallel regions waits for the scheduler: a demo beside a second torch process ran 9.5 s a step
    instead of 12 steps a second (issue 24). Measured with bench/busy_cpu.py on the 2-core machine (docs/bench.md,
    "A busy CPU"), `dreambooth demo --steps 150`: with libgomp's defaults 68 s alone and over 300 s beside a busy
    torch process or a second demo; with these settings 88 s alone (the free core's price), 122 s beside the busy
    process, 75 s beside a second demo. Two passive threads alone cost 1.85x: each small parallel region waits for a
    sleeping thread to wake, hence one thread fewer as well.
    """
    environ = os.environ if environ is None else environ
    changed = {}
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:  # either says how long threads spin
        changed["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OMP_NUM_THREADS" not in environ:
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        changed["OMP_NUM_THREADS"] = str(max(1, cores - 1))
    environ.update(changed)
    return changed


_process_ends_with_command = False


def process_ends_with_command() -> None:
    """Says that this process exits as soon as its command returns (the console script says so; a notebook, the
    tests, the demo's and experiment's several runs do not), so that a run may freeze what its start-up made."""
    global _process_ends_with_command
    _process_ends_with_command = True


def freeze_if_process_ends() -> None:
    """After a run's start-up (libraries and models): `freeze_alive_objects`, in a process that ends with the run."""
    if _process_ends_with_command:
        freeze_alive_objects()


def freeze_alive_objects() -> None:
    """Exempts every object alive now from all later collections, the one at exit included.

    Only for a process that ends with the work in hand: after a `dreambooth train` start-up (libraries and
    models), and before a command-line process exits. Frozen objects are never collected, so garbage in a
    reference cycle at this moment would stay: a process that goes on (a notebook, the tests, the demo's and
    the experiment's several runs) must not call it, and the large such garbage, the class-image pipeline, is
    collected before (class_images.prepare_class_images). Objects are still released by reference counting, and
    everything this tool writes is closed (and renamed into place) before a command returns.
    """
    gc.freeze()


class GradientClipping:
    """clip_grad_norm_, folded into torch's fused AdamW where that is exact, accelerate's otherwise.

    Clipping multiplies every gradient by min(1, max_norm / norm): one pass to measure and one to rewrite all
    of them. The fused AdamW kernel can divide each gradient by a `grad_scale` as it reads it, the protocol
    torch's GradScaler uses to unscale inside that kernel, so the rewrite pass is skipped: grad_scale =
    max(1, (norm + 1e-6) / max_norm), the same coefficient as clip_grad_norm_. On the 35 M-parameter `small`
    UNet (2-core CPU, median of 13) clipping plus the AdamW step took 83-88 ms, folded 69-72 ms. Only without a
    GradScaler (which owns grad_scale: fp16) and where gradients are complete after backward (one process or
    DDP; not DeepSpeed, FSDP or XLA, which clip their own way).
    """

    def __init__(self, accelerator, optimizer, params: list[torch.nn.Parameter], max_norm: float) -> None:
        import torch
        from accelerate.utils import DistributedType

        self.accelerator, self.params, self.max_norm = accelerator, params, max_norm
        inner = getattr(optimizer, "optimizer", optimizer)
        fusable = (isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and inner.defaults.get("fused")
                   and accelerator.scaler is None and accelerator.distributed_type in
                   (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU))
        self.fused_into = inner if fusable else None

    def __call__(self) -> None:
        """Before the optimizer step of a synchronised step."""
        if self.fused_into is None:
            self.accelerator.clip_grad_norm_(self.params, self.max_norm)
            return
        import torch

        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True).float()
        self.fused_into.grad_scale = torch.clamp((norm + 1e-6) / self.max_norm, min=1.0)

    def done(self) -> None:
        """After the optimizer step: nothing stays behind for a later step or a GradScaler."""
        if self.fused_into is not None:
            self.fused_into.__dict__.pop("grad_scale", None)


# PyTorch's native CPU convolutions against oneDNN's, one fp32 UNet training step (forward, backward, fused
# AdamW) on the 2-core CPU, `python bench/cpu_convolutions.py` (docs/bench.md): native 1.21x faster for `small`
# at 2 x 16x16 latents, 1.46x for the world model and 1.45x for `tiny` at 2 x 16x16; oneDNN 1.11x faster for
# `small` at 8 x 16x16; within noise at 2 x 32x32 and above. Hence the threshold, in images x latent pixels.
NATIVE_CONV_MAX_PIXELS = 1024


def cpu_convolution(cfg: Config, models, device) -> str | None:
    """The CPU convolution kernels to train with, "native" or "onednn"; None on other devices."""
    if device.type != "cpu":
        return None
    choice = cfg.training.cpu_convolution
    if choice != "auto":
        return choice
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    images = cfg.training.batch_size * (2 if cfg.dataset.with_prior_preservation else 1)
    pixels = images * (cfg.training.resolution // factor) ** 2
    return "native" if pixels <= NATIVE_CONV_MAX_PIXELS else "onednn"


@contextlib.contextmanager
def convolution_kernels(kind: str | None):
    """Selects the CPU convolution kernels for the block (forward and backward), then restores the setting."""
    import torch

    before = torch.backends.mkldnn.enabled
    if kind is not None:
        torch.backends.mkldnn.enabled = kind == "onednn"
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def speed_up(cfg: Config, models, accelerator) -> None:
    """Optional channels-last layout and torch.compile of the UNet.

    Only `forward` is compiled, so the module itself (its parameter names, checkpoints, the saved model) stays
    exactly as it is without compilation.
    """
    import torch

    unet = accelerator.unwrap_model(models.denoiser)
    if cfg.training.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.training.compile:
        compile_cache()
        unet.forward = torch.compile(unet.forward)


def compile_cache() -> str:
    """torch.compile's on-disk caches (inductor's FX graphs and kernels) in a folder that outlives the machine's
    /tmp cleaning, so that a second run of the same model skips most of the compile; $TORCHINDUCTOR_CACHE_DIR, when
    set, wins."""
    import os
    from pathlib import Path

    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dreambooth" / "torchinductor"
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default))


def set_tf32(cfg: Config) -> None:
    """TF32 matmuls and convolutions as configured, both ways: torch leaves cuDNN's on by default, so
    `--no-allow_tf32` has to switch it off, not merely leave it alone. No effect off Ampere-or-newer GPUs."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = cfg.training.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.training.allow_tf32
