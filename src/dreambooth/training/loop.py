"""The training run: pre-flight, class images, setup, the loop (step, checkpoint, validate, log), final save."""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dreambooth.config import Config, dump_config
from dreambooth.errors import TrainingStopped, UserError
from dreambooth.formats.atomic import atomic_file, write_json_atomic, write_text_atomic
from dreambooth.preflight import Preflight, run_preflight
from dreambooth.training.cache import LatentCache
from dreambooth.training.checkpoint import CheckpointFiles, StopRequest, load_checkpoint, save_checkpoint
from dreambooth.training.components import (
    DTYPES,
    Models,
    PromptEncoder,
    convolution_kernels,
    load_models,
    make_dataloader,
    make_lr_scheduler,
    make_optimizer,
    param_groups,
)
from dreambooth.training.loss import LossParts, dreambooth_loss, min_snr_weights, noise_with_offset, snr_from_alphas
from dreambooth.training.outputs import save_outputs
from dreambooth.training.rundir import RunLock, new_run_id
from dreambooth.training.speed import collection_paused, freeze_alive_objects
from dreambooth.versions import library_versions


def training_step(cfg: Config, models: Models, batch: dict, encode: PromptEncoder, latent_cache: LatentCache,
                  generator: torch.Generator) -> LossParts:
    """One forward pass: latents of the images, noise at per-sample timesteps, prediction, and the loss."""
    vae, unet, sched = models.vae, models.unet, models.noise_scheduler
    latents = latent_cache.sample(batch["pixel_values"], batch["cache_keys"], generator)
    latents = latents.float() * vae.config.scaling_factor
    noise = noise_with_offset(latents, cfg.training.noise_offset, generator)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=latents.device)
    noisy = sched.add_noise(latents, noise, timesteps)
    prediction_type = sched.config.prediction_type
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encode(batch["prompts"])).sample
    weights = None
    if cfg.training.snr_gamma is not None:
        snr = snr_from_alphas(sched.alphas_cumprod, timesteps)
        weights = min_snr_weights(snr, cfg.training.snr_gamma, prediction_type)
    return dreambooth_loss(pred, target, batch["is_prior"].to(latents.device), cfg.training.prior_loss_weight,
                           weights)


@dataclass
class Run:
    """The live objects of one run, passed between the loop's parts."""

    cfg: Config
    accelerator: object
    models: Models
    optimizer: object
    lr_scheduler: object
    loader: object
    generator: torch.Generator
    weight_dtype: torch.dtype
    out: Path
    total_steps: int
    report: Preflight
    run_id: str = ""
    global_step: int = 0


def batch_stream(run: Run, batches_done: int):
    """Batches forever, epoch after epoch, starting `batches_done` batches in (for resuming mid-epoch)."""
    per_epoch = len(run.loader)
    epoch, skip = divmod(batches_done, per_epoch)
    while True:
        run.loader.set_epoch(epoch)
        it = run.accelerator.skip_first_batches(run.loader, skip) if skip else run.loader
        yield from it
        epoch, skip = epoch + 1, 0


def trained_modules(run: Run) -> list[torch.nn.Module]:
    return [m for m in (run.models.unet, run.models.text_encoder) if any(p.requires_grad for p in m.parameters())]


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
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True).float()
        self.fused_into.grad_scale = torch.clamp((norm + 1e-6) / self.max_norm, min=1.0)

    def done(self) -> None:
        """After the optimizer step: nothing stays behind for a later step or a GradScaler."""
        if self.fused_into is not None:
            self.fused_into.__dict__.pop("grad_scale", None)


def loop(run: Run, start_step: int, stop: StopRequest) -> None:
    """Steps until total_steps; checkpoints, validates and logs on their intervals; stops cleanly on request."""
    cfg, acc = run.cfg, run.accelerator
    encode = PromptEncoder(cfg, run.models, acc.device)
    salt = f"{run.report.base_identity}|"
    latent_cache = LatentCache(run.models.vae, cfg.training.latent_cache, run.out / "latent_cache", salt)
    modules = trained_modules(run)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    clip = GradientClipping(acc, run.optimizer, params, cfg.training.max_grad_norm)
    logger = MetricsLog(run)
    bar = tqdm(total=run.total_steps, initial=start_step, desc="training", unit="step",
               disable=not acc.is_local_main_process)
    batches = batch_stream(run, start_step * cfg.training.gradient_accumulation_steps)
    run.global_step = start_step
    while run.global_step < run.total_steps:
        with acc.accumulate(*modules):
            parts = training_step(cfg, run.models, next(batches), encode, latent_cache, run.generator)
            acc.backward(parts.loss)
            if acc.sync_gradients:
                clip()
            run.optimizer.step()
            clip.done()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        logger.add(parts)
        if not acc.sync_gradients:
            continue
        run.global_step += 1
        bar.update(1)
        if logger.due():
            bar.set_postfix(logger.flush(), refresh=False)
        if run.global_step % cfg.output.checkpointing_steps == 0 or stop.requested:
            path = checkpoint(run)
        if stop.requested:
            bar.close()
            raise TrainingStopped(f"stopped at step {run.global_step} as asked: the checkpoint is {path}. Continue "
                                  "with the same command and --resume_from_checkpoint latest.")
        if cfg.validation.prompts and (run.global_step % cfg.validation.steps == 0
                                       or run.global_step == run.total_steps):
            validate(run)
    bar.close()


class MetricsLog:
    """Loss, LR and step time to a JSON-lines file (always) and TensorBoard (when installed).

    Losses are summed on the device and read only every `logging_steps`, so the loop has no per-step host sync.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.path = run.out / run.cfg.output.logging_dir / "train_log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sums: torch.Tensor | None = None
        self.count = 0
        self.t0 = time.perf_counter()
        self.steps_at_t0 = run.global_step

    def add(self, parts: LossParts) -> None:
        values = torch.stack([parts.loss.detach(), parts.instance_loss.detach(), parts.prior_loss.detach()])
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def due(self) -> bool:
        step = self.run.global_step
        return step % self.run.cfg.output.logging_steps == 0 or step == self.run.total_steps or step == 1

    def flush(self) -> dict:
        loss, inst, prior = (self.sums / max(self.count, 1)).tolist()
        now, steps = time.perf_counter(), self.run.global_step - self.steps_at_t0
        record = {"step": self.run.global_step, "loss": loss, "instance_loss": inst, "prior_loss": prior,
                  "lr": self.run.lr_scheduler.get_last_lr()[0], "step_time_s": (now - self.t0) / max(steps, 1)}
        self.sums, self.count, self.t0, self.steps_at_t0 = None, 0, now, self.run.global_step
        if self.run.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self.run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        return {"loss": f"{loss:.4f}", "lr": f"{record['lr']:.2e}"}


def checkpoint(run: Run) -> Path:
    """A resumable checkpoint that names its run, and one line saying where it went."""
    cfg = run.cfg
    state = {"run_id": run.run_id, "settings": run.report.run_plan.settings, "base_model": cfg.model.pretrained_model,
             "method": cfg.model.method, "total_steps": run.total_steps, "versions": library_versions()}
    extra = {"config.yaml": dump_config(run.cfg)}
    path = save_checkpoint(run.accelerator, run.out, run.global_step, state, run.generator,
                           run.cfg.output.checkpoints_total_limit, extra)
    if run.accelerator.is_main_process:
        tqdm.write(f"checkpoint saved: {path}")
    return path


def validate(run: Run) -> None:
    """Samples the validation prompts with the same code as `dreambooth generate`; saves a grid per step."""
    from diffusers import StableDiffusionPipeline

    from dreambooth.generate import GenerationSettings, generate_images, grid_info, make_grid
    from dreambooth.models.loading import make_scheduler

    acc, v, m = run.accelerator, run.cfg.validation, run.models
    if not acc.is_main_process:
        return
    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=acc.unwrap_model(m.text_encoder), tokenizer=m.tokenizer,
        unet=acc.unwrap_model(m.unet), scheduler=make_scheduler(v.scheduler, m.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    res = run.cfg.training.resolution
    settings = GenerationSettings(prompts=v.prompts, negative_prompt=v.negative_prompt, steps=v.num_inference_steps,
                                  guidance=v.guidance_scale, seeds=[v.seed], num_images=v.num_images,
                                  scheduler=v.scheduler, height=res, width=res)
    with torch.no_grad(), acc.autocast():
        results = generate_images(pipe, settings)
    grid = make_grid([img for img, _ in results], cols=v.num_images)
    path = run.out / "samples" / f"step-{run.global_step:06d}.png"
    source = f"{run.cfg.model.pretrained_model} + run {run.run_id} at step {run.global_step}"
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=grid_info([meta for _, meta in results], source,
                                                       {"step": run.global_step, "run_id": run.run_id}))
    tqdm.write(f"samples saved: {path}")


def trackers(cfg: Config) -> list[str]:
    """accelerate trackers for `output.report_to`: unset means TensorBoard when it is installed."""
    from accelerate.utils import imports

    name = cfg.output.report_to
    if name is None:
        return ["tensorboard"] if imports.is_tensorboard_available() else []
    return [] if name == "none" else [name]


def make_accelerator(cfg: Config, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    # sync_with_dataloader=False: an optimizer step is always exactly gradient_accumulation_steps batches, also
    # across epoch ends, so a step count maps to a batch count and resuming lands on the same batch.
    plugin = GradientAccumulationPlugin(num_steps=cfg.training.gradient_accumulation_steps,
                                        sync_with_dataloader=False)
    return Accelerator(gradient_accumulation_plugin=plugin, mixed_precision=cfg.training.mixed_precision,
                       log_with=trackers(cfg) or None,
                       project_config=ProjectConfiguration(project_dir=str(out),
                                                           logging_dir=str(out / cfg.output.logging_dir)))


def write_run_info(run: Run) -> None:
    """run_info.json and config.yaml: what this run is, in data a program can read back."""
    cfg, report, models = run.cfg, run.report, run.models
    from dreambooth.models.base import model_fingerprint

    write_text_atomic(run.out / "config.yaml", dump_config(cfg))
    trainable = sum(p.numel() for m in (models.unet, models.text_encoder) for p in m.parameters() if p.requires_grad)
    subjects = []
    for s in report.subjects:
        plan, subject = s.identifier, s.subject
        subjects.append({
            "identifier": plan.identifier, "identifier_kind": plan.kind, "identifier_tokens": plan.pieces,
            "initializer": plan.initializer, "class_word": cfg.token.class_word if not cfg.subjects else
            subject.class_word, "instance_prompt": subject.instance_prompt,
            "class_prompt": subject.class_prompt if cfg.dataset.with_prior_preservation else None,
            "instance_images": [str(p) for p in s.instance.usable],
            "class_dir": str(subject.class_dir) if cfg.dataset.with_prior_preservation else None})
    write_json_atomic(run.out / "run_info.json", {
        "run_id": run.run_id, "settings": report.run_plan.settings, "base_model": cfg.model.pretrained_model,
        "base_model_hash": model_fingerprint(cfg.model.pretrained_model), "base_model_identity": report.base_identity,
        "method": cfg.model.method, "trainable_parameters": trainable, "prediction_type": report.prediction_type,
        "prior_preservation": cfg.dataset.with_prior_preservation,
        "resumed_from": str(report.run_plan.resume_from.path) if report.run_plan.resume_from else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "subjects": subjects, "versions": library_versions()})


def prepare_class_images(cfg: Config, accelerator, report: Preflight) -> list[list[Path]] | None:
    """Each subject's class images, generating the missing ones (into the staging folder) on the main process.

    Nothing in the class folder itself changes here: `start_run` commits the plans once the run can start.
    """
    if not cfg.dataset.with_prior_preservation:
        return None
    from dreambooth.models.loading import load_pipeline, pick_dtype
    from dreambooth.training.class_images import default_batch_size, generate_missing, plan_class_images

    ds = cfg.dataset
    pipe = None

    def load_once():  # subjects share one pipeline
        nonlocal pipe
        pipe = pipe or load_pipeline(cfg.model.pretrained_model, device=accelerator.device,
                                     dtype=pick_dtype(ds.prior_generation_precision, accelerator.device),
                                     safety_checker=False, revision=cfg.model.revision, variant=cfg.model.variant)
        return pipe

    batch_size = ds.sample_batch_size or default_batch_size(accelerator.device.type, cfg.training.resolution)
    for folder, plan in report.class_plans.items():
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                generate_missing(plan, seed=cfg.training.seed, load_pipe=load_once, batch_size=batch_size,
                                 steps=ds.class_inference_steps)
            else:  # the main process has generated them by now
                report.class_plans[folder] = plan_class_images(folder, plan.recipe, plan.wanted)
    if pipe is not None:
        # The pipeline sits in reference cycles, so deleting it frees nothing until the collector's next full
        # pass, which may come long after the training models have loaded beside it (on a GPU: its fp16
        # weights on top of the training peak). Collect it now.
        del pipe
        gc.collect()
        if accelerator.device.type == "cuda":
            torch.cuda.empty_cache()
    per_subject = []
    for s in cfg.subject_list():
        images = report.class_plans[Path(s.class_dir)].images()
        if not images:
            raise UserError(f"dataset.class_dir: {s.class_dir} holds no usable class image after generation.")
        per_subject.append(images)
    return per_subject


# PyTorch's native CPU convolutions against oneDNN's, one fp32 UNet training step (forward, backward, fused
# AdamW) on the 2-core CPU, `python bench/cpu_convolutions.py` (docs/bench.md): native 1.21x faster for `small`
# at 2 x 16x16 latents, 1.46x for the world model and 1.45x for `tiny` at 2 x 16x16; oneDNN 1.11x faster for
# `small` at 8 x 16x16; within noise at 2 x 32x32 and above. Hence the threshold, in images x latent pixels.
NATIVE_CONV_MAX_PIXELS = 1024


def cpu_convolution(cfg: Config, models: Models, device: torch.device) -> str | None:
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


def speed_up(cfg: Config, models: Models, accelerator) -> None:
    """Optional channels-last layout and torch.compile of the UNet.

    Only `forward` is compiled, so the module itself (its parameter names, checkpoints, the saved model) stays
    exactly as it is without compilation.
    """
    unet = accelerator.unwrap_model(models.unet)
    if cfg.training.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.training.compile:
        unet.forward = torch.compile(unet.forward)


def set_tf32(cfg: Config) -> None:
    """TF32 matmuls and convolutions as configured, both ways: torch leaves cuDNN's on by default, so
    `--no-allow_tf32` has to switch it off, not merely leave it alone. No effect off Ampere-or-newer GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.training.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.training.allow_tf32


def setup(cfg: Config, report: Preflight) -> Run:
    """Accelerator, class images, models, data, optimizer, ready to step; nothing of the user's has changed yet."""
    from accelerate.utils import set_seed

    out = cfg.output.output_dir
    accelerator = make_accelerator(cfg, out)
    set_seed(cfg.training.seed)
    set_tf32(cfg)
    classes = prepare_class_images(cfg, accelerator, report)
    weight_dtype = DTYPES[cfg.training.mixed_precision]
    with collection_paused():  # diffusers' import and the weights live on (dreambooth.training.speed)
        models = load_models(cfg, report.plans, weight_dtype)
    loader = make_dataloader(cfg, cfg.subject_list(), [s.instance.usable for s in report.subjects], classes)
    t = cfg.training
    scale = t.gradient_accumulation_steps * t.batch_size * accelerator.num_processes if t.scale_lr else 1.0
    optimizer = make_optimizer(cfg, param_groups(cfg, models, scale), accelerator.device)
    loader = accelerator.prepare(loader)
    total = t.max_train_steps or t.num_train_epochs * math.ceil(len(loader) / t.gradient_accumulation_steps)
    lr_scheduler = make_lr_scheduler(cfg, optimizer, accelerator.num_processes, total)
    trained = [m for m in (models.unet, models.text_encoder) if any(p.requires_grad for p in m.parameters())]
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    for module, wrapped in zip(trained, prepared):
        setattr(models, "unet" if module is models.unet else "text_encoder", wrapped)
    optimizer, lr_scheduler = prepared[-2:]
    speed_up(cfg, models, accelerator)
    for module in (models.vae, models.unet, models.text_encoder):
        module.to(accelerator.device)
    generator = torch.Generator(device=accelerator.device).manual_seed(t.seed + accelerator.process_index)
    run = Run(cfg, accelerator, models, optimizer, lr_scheduler, loader, generator, weight_dtype, out, total, report)
    CheckpointFiles(run).register()
    return run


def resume(run: Run) -> int:
    """Loads the planned checkpoint into the run; returns the step to continue from."""
    checkpoint = run.report.run_plan.resume_from
    if checkpoint is None:
        return 0
    if checkpoint.step > run.total_steps:
        raise UserError(f"output.resume_from_checkpoint: {checkpoint.path} is at step {checkpoint.step}, past this "
                        f"run's {run.total_steps} steps. Train for more epochs or steps to continue it.")
    state = load_checkpoint(run.accelerator, checkpoint.path, run.generator)
    step = int(state["global_step"])
    if run.accelerator.is_main_process:
        print(f"resumed from {checkpoint.path} at step {step}")
        if step == run.total_steps:
            print(f"it is already at max_train_steps ({step}): nothing left to train; saving the final outputs from it")
    return step


def start_run(run: Run) -> None:
    """The run can start: its id is settled, the output folder and class folders are changed as planned."""
    from accelerate.utils import broadcast_object_list

    from dreambooth.training.class_images import commit

    acc, plan = run.accelerator, run.report.run_plan
    run.run_id = broadcast_object_list([plan.run_id or new_run_id()])[0] if acc.num_processes > 1 else \
        plan.run_id or new_run_id()
    if acc.is_main_process:
        plan.claim(str(run.cfg.output.logging_dir))
        for class_plan in run.report.class_plans.values():
            commit(class_plan)
        write_run_info(run)
    acc.wait_for_everyone()
    if acc.is_main_process and acc.log_with:
        acc.init_trackers("dreambooth", config={"run_id": run.run_id})


def train(cfg: Config, config_path: Path | None = None, ends_process: bool = False) -> Path:
    """Runs a whole DreamBooth training job; returns the output folder.

    Order matters for the user's folders: pre-flight checks everything and changes nothing; setup loads and
    generates (into a staging folder); only when the run can step does `start_run` replace an earlier run or
    move class images. `ends_process`: the process exits after this run (`dreambooth train`), so what start-up
    made is frozen and later full collections skip it (dreambooth.training.speed).
    """
    report = run_preflight(cfg)
    out = cfg.output.output_dir
    existed = out.exists()
    lock = RunLock(out)
    if int(os.environ.get("RANK", "0")) == 0:
        lock.acquire()
    run = None
    try:
        run = setup(cfg, report)
        if ends_process:
            freeze_alive_objects()
        start = resume(run)
        start_run(run)
        kernels = cpu_convolution(cfg, run.models, run.accelerator.device)
        with StopRequest() as stop, convolution_kernels(kernels):
            loop(run, start, stop)
        finish(run)
    finally:
        if run is not None:
            release(run.accelerator)
        lock.release()
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before it started leaves no empty folder behind
    return out


def finish(run: Run) -> None:
    """The final outputs, the model card, the upload; one line saying where they are."""
    from dreambooth.training.outputs import write_model_card

    save_outputs(run)
    cfg, out = run.cfg, run.out
    if not run.accelerator.is_main_process:
        return
    write_model_card(run)
    what = (f"LoRA in {out / 'pytorch_lora_weights.safetensors'} (pipe.load_lora_weights)"
            if cfg.model.method == "lora" else f"model in {out} (StableDiffusionPipeline.from_pretrained)")
    print(f"done: {what}; checkpoints, samples/ and {cfg.output.logging_dir}/ beside it")
    if cfg.output.push_to_hub:
        from dreambooth.training.hub import upload_run

        print(f"uploaded to {upload_run(cfg, run.report.hub_repo)}")


def release(accelerator) -> None:
    """Lets a later run in the same process (the demo, tests, a notebook) set up its own accelerator.

    accelerate keeps its state in a process-wide singleton that refuses a second, different mixed-precision
    setting; a single-process run resets it when done. A multi-process job ends with the process anyway.
    """
    from accelerate.state import AcceleratorState

    accelerator.end_training()  # closes the trackers (and, in a multi-process job, the process group)
    if accelerator.num_processes == 1:
        accelerator.free_memory()
        AcceleratorState._reset_state(reset_partial_state=True)
