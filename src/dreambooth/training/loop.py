"""The training run: pre-flight, class images, setup, the loop (step, checkpoint, validate, log), final save."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dreambooth.config import Config
from dreambooth.config_file import dump_config
from dreambooth.errors import TrainingStopped, UserError
from dreambooth.formats.atomic import atomic_file
from dreambooth.formats.lycoris import LYCORIS, TITLES
from dreambooth.models.families.common import Conditioning
from dreambooth.models.loading import DTYPES, make_scheduler, pipeline_class
from dreambooth.preflight import Preflight, run_preflight
from dreambooth.training.cache import LatentCache
from dreambooth.training.checkpoint import CheckpointFiles, StopRequest, load_checkpoint, save_checkpoint
from dreambooth.training.class_images import commit, prepare_class_images
from dreambooth.training.components import (
    Models,
    PromptEncoder,
    load_models,
    make_dataloader,
    make_lr_scheduler,
    make_optimizer,
    param_groups,
)
from dreambooth.training.distributed import Layout, draw_seed, resume_note
from dreambooth.training.ema import describe, ema_weights, make_average
from dreambooth.training.graph_step import StaticStep, graph_plan
from dreambooth.training.loss import LossParts, latent_mask
from dreambooth.training.offload import FrozenOffload, offload_plan
from dreambooth.training.outputs import MetricsLog, save_outputs, write_model_card, write_run_info
from dreambooth.training.report_page import refresh_report
from dreambooth.training.rundir import RunLock, new_run_id
from dreambooth.training.speed import (
    GradientClipping,
    collection_paused,
    convolution_kernels,
    cpu_convolution,
    freeze_if_process_ends,
    set_tf32,
    speed_up,
)
from dreambooth.training.validation_loss import ValidationLoss, log_score
from dreambooth.versions import library_versions


def training_step(cfg: Config, models: Models, batch: dict, encode: PromptEncoder, latent_cache: LatentCache,
                  generator: torch.Generator) -> LossParts:
    """One forward pass: latents of the images, the prompts' conditioning, and the family's loss."""
    latents = latent_cache.scaled_sample(batch["pixel_values"], batch["cache_keys"], generator)
    geometry = batch.get("geometry")
    return step_loss(cfg, models, latents, encode(batch["prompts"]), batch["is_prior"].to(latents.device), generator,
                     None if geometry is None else geometry.to(latents.device),
                     latent_mask(batch.get("loss_mask"), latents))


def step_loss(cfg: Config, models: Models, latents: torch.Tensor, cond: Conditioning, is_prior: torch.Tensor,
              generator: torch.Generator, geometry: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> LossParts:
    """The family's loss of a batch (noise, the denoiser's prediction, the target, prior preservation): the part of
    a step a CUDA graph captures (training.graph_step), so it reads only its arguments and draws only from
    `generator`. `geometry`: each image's size and crop (training.data.crop_geometry), which SDXL conditions on;
    `mask`: the loss mask on the latent grid (dataset.masked_loss), None without it."""
    return models.family.behaviour().loss(cfg, models, latents, cond, geometry, is_prior, generator, mask)


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
    out: Path
    total_steps: int
    report: Preflight
    run_id: str = ""
    global_step: int = 0
    graph: bool = False  # the step runs through training.graph_step (captured as a CUDA graph on CUDA)
    ema: object = None  # training.ema.WeightAverage with --use_ema


def steps_per_epoch(cfg: Config, loader) -> int:
    """Optimizer steps in one pass over the loader's batches, as --num_train_epochs and --validation_epochs count an
    epoch (diffusers' num_update_steps_per_epoch)."""
    return math.ceil(len(loader) / cfg.training.gradient_accumulation_steps)


def validation_every(run: Run) -> int:
    """Optimizer steps between validations: validation.steps, or validation.epochs epochs' worth of them."""
    epochs = run.cfg.validation.epochs
    return run.cfg.validation.steps if epochs is None else epochs * steps_per_epoch(run.cfg, run.loader)


def batch_stream(run: Run, batches_done: int):
    """Batches forever, epoch after epoch, starting `batches_done` batches in (for resuming mid-epoch)."""
    per_epoch = len(run.loader)
    epoch, skip = divmod(batches_done, per_epoch)
    while True:
        run.loader.set_epoch(epoch)
        it = run.accelerator.skip_first_batches(run.loader, skip) if skip else run.loader
        yield from it
        epoch, skip = epoch + 1, 0


def loop(run: Run, start_step: int, stop: StopRequest) -> None:
    """Steps until total_steps; checkpoints, validates and logs on their intervals; stops cleanly on request."""
    cfg, acc = run.cfg, run.accelerator
    encode = PromptEncoder(cfg, run.models, acc.device)
    salt = f"{run.report.base_identity}|"
    latent_cache = LatentCache(run.models.vae, cfg.training.latent_cache, run.out / "latent_cache", salt)
    modules = run.models.trained()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    clip = GradientClipping(acc, run.optimizer, params, cfg.training.max_grad_norm)
    logger = MetricsLog(run)
    bar = tqdm(total=run.total_steps, initial=start_step, desc="training", unit="step",
               disable=not acc.is_local_main_process)
    batches = batch_stream(run, start_step * cfg.training.gradient_accumulation_steps)
    held_out = ValidationLoss.prepare(run, latent_cache) if cfg.validation.loss else None
    offload = frozen_offload(run, encode, latent_cache)
    if held_out is not None and start_step == 0:
        log_score(run, held_out.score(run, encode))  # the base model's, where the curve starts
    static = None
    if run.graph:
        def loss_of(latents, cond, is_prior, geometry, mask):
            return step_loss(cfg, run.models, latents, cond, is_prior, run.generator, geometry, mask)

        static = StaticStep(run, encode, latent_cache, clip, loss_of, capture=acc.device.type == "cuda")
    run.global_step, validate_every = start_step, validation_every(run)
    while run.global_step < run.total_steps:
        if static is None:
            eager_update(run, batches, encode, latent_cache, clip, modules, logger)
        else:
            static_update(run, batches, static, logger)
        if run.ema is not None:  # after the whole optimizer step, outside any captured graph
            run.ema.update()
        run.global_step += 1
        bar.update(1)
        if logger.due():
            bar.set_postfix(logger.flush(), refresh=False)
        if run.global_step % cfg.output.checkpointing_steps == 0 or stop.requested:
            path = checkpoint(run)
        if stop.requested:
            bar.close()
            raise TrainingStopped(run.global_step, path)
        due = run.global_step % validate_every == 0 or run.global_step == run.total_steps
        if held_out is not None and due:
            with ema_weights(run):  # the weights that are validated and saved: the EMA's, with --use_ema
                log_score(run, held_out.score(run, encode))
        if cfg.validation.prompts and due:
            with offload.resident():
                validate(run)
    bar.close()


def frozen_offload(run: Run, encode: PromptEncoder, latent_cache: LatentCache) -> FrozenOffload:
    """The prompt and latent caches filled up front and the frozen modules they make idle sent off the GPU
    (training.offload), with one line saying what moved."""
    acc, dataset = run.accelerator, run.loader.dataset
    names, why = offload_plan(run.cfg, run.models, dataset, acc.device.type)
    if acc.device.type == "cuda" and acc.is_main_process:
        print(why)
    offload = FrozenOffload(run.models, names, acc.device)
    offload.prepare(dataset, encode, latent_cache, run.generator)
    return offload


def seed_draws(run: Run, micro: int) -> None:
    """Seeds the run's generator for micro-batch `micro` of this step from its place in the global batch
    (training.distributed.draw_seed), so the draws do not depend on how many processes share the batch."""
    acc, accumulation = run.accelerator, run.cfg.training.gradient_accumulation_steps
    index = (run.global_step * accumulation + micro) * acc.num_processes + acc.process_index
    run.generator.manual_seed(draw_seed(run.cfg.training.seed, index))


def eager_update(run: Run, batches, encode, latent_cache, clip, modules, logger) -> None:
    """One optimizer step the plain way: gradient_accumulation_steps batches through accelerate, then AdamW."""
    acc = run.accelerator
    micro = 0
    while True:
        seed_draws(run, micro)
        micro += 1
        with acc.accumulate(*modules):
            parts = training_step(run.cfg, run.models, next(batches), encode, latent_cache, run.generator)
            acc.backward(parts.loss)
            if acc.sync_gradients:
                clip()
            run.optimizer.step()
            clip.done()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        logger.add(parts)
        if acc.sync_gradients:
            return


def static_update(run: Run, batches, static: StaticStep, logger) -> None:
    """One optimizer step over static buffers (training.graph_step): the micro-steps, then clip, AdamW, zero."""
    for micro in range(run.cfg.training.gradient_accumulation_steps):
        seed_draws(run, micro)
        logger.add(static.micro_step(next(batches)))
    static.optimizer_step()
    # The schedule itself: accelerate's wrapper steps it only on steps it saw synchronised, and this path does not
    # go through accelerate's accumulate(). One process only (graph_step.graph_obstacles), so one step.
    getattr(run.lr_scheduler, "scheduler", run.lr_scheduler).step()


def checkpoint(run: Run) -> Path:
    """A resumable checkpoint that names its run, and one line saying where it went."""
    cfg = run.cfg
    state = {"run_id": run.run_id, "settings": run.report.run_plan.settings, "base_model": cfg.model.pretrained_model,
             "method": cfg.model.method, "total_steps": run.total_steps, "layout": layout(run).record(),
             "versions": library_versions()}
    if run.ema is not None:  # what the layout's weights are; raw_weights.safetensors holds the trained ones
        state["ema"] = run.ema.record()
    extra = {"config.yaml": dump_config(run.cfg)}
    path = save_checkpoint(run.accelerator, run.out, run.global_step, state, run.cfg.output.checkpoints_total_limit,
                           extra)
    if run.accelerator.is_main_process:
        tqdm.write(f"checkpoint saved: {path}")
    refresh_report(run)
    return path


def validate(run: Run) -> None:
    """Samples the validation prompts with the same code as `dreambooth generate`; saves a grid per step."""
    from dreambooth.generate import GenerationSettings, generate_images, grid_info, make_grid

    acc, v, m = run.accelerator, run.cfg.validation, run.models
    if not acc.is_main_process:
        return
    parts = {name: acc.unwrap_model(module) for name, module in m.modules().items()}
    parts.update({name.replace("text_encoder", "tokenizer"): tokenizer for name, tokenizer, _, _ in m.text_sides()})
    parts["scheduler"] = make_scheduler(v.scheduler, m.noise_scheduler.config)  # None: the family's default
    pipe = m.family.behaviour().pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    res = run.cfg.training.resolution
    guidance = v.guidance_scale
    if guidance is None:
        guidance = m.family.behaviour().draw_defaults(pipe)["guidance"]
    settings = GenerationSettings(prompts=v.prompts, negative_prompt=v.negative_prompt, steps=v.num_inference_steps,
                                  guidance=guidance, seeds=[v.seed], num_images=v.num_images,
                                  scheduler=type(parts["scheduler"]).__name__, height=v.height or res,
                                  width=v.width or res)
    with torch.no_grad(), acc.autocast(), ema_weights(run):
        results = generate_images(pipe, settings)
    grid = make_grid([img for img, _ in results], cols=v.num_images)
    path = run.out / "samples" / f"step-{run.global_step:06d}.png"
    source = f"{run.cfg.model.pretrained_model} + run {run.run_id} at step {run.global_step}" + \
        (" (EMA weights)" if run.ema is not None else "")
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=grid_info([meta for _, meta in results], source,
                                                       {"step": run.global_step, "run_id": run.run_id}))
    tqdm.write(f"samples saved: {path}")
    refresh_report(run)


def trackers(cfg: Config) -> list[str]:
    """accelerate trackers for `output.report_to`: unset means TensorBoard when it is installed."""
    from accelerate.utils import imports

    name = cfg.output.report_to
    if name is None:
        return ["tensorboard"] if imports.is_tensorboard_available() else []
    return [] if name == "none" else [name]


def make_accelerator(cfg: Config, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs, GradientAccumulationPlugin, ProjectConfiguration

    # sync_with_dataloader=False: an optimizer step is always exactly gradient_accumulation_steps batches, also
    # across epoch ends, so a step count maps to a batch count and resuming lands on the same batch.
    plugin = GradientAccumulationPlugin(num_steps=cfg.training.gradient_accumulation_steps,
                                        sync_with_dataloader=False)
    # A captured step must not use autocast's cache of cast weights: the cache is freed when autocast exits, under
    # the graph's feet. Without a cache each cast runs again, inside the graph, where it costs no launch.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    graph, _ = graph_plan(cfg, device, int(os.environ.get("WORLD_SIZE", "1")))
    handlers = [AutocastKwargs(cache_enabled=False)] if graph else []
    return Accelerator(gradient_accumulation_plugin=plugin, mixed_precision=cfg.training.mixed_precision,
                       log_with=trackers(cfg) or None, kwargs_handlers=handlers,
                       project_config=ProjectConfiguration(project_dir=str(out),
                                                           logging_dir=str(out / cfg.output.logging_dir)))


def setup(cfg: Config, report: Preflight) -> Run:
    """Accelerator, class images, models, data, optimizer, ready to step; nothing of the user's has changed yet."""
    from accelerate.utils import set_seed

    out = cfg.output.output_dir
    accelerator = make_accelerator(cfg, out)
    set_seed(cfg.training.seed)
    set_tf32(cfg)
    classes = prepare_class_images(cfg, accelerator, report)
    with collection_paused():  # diffusers' import and the weights live on (dreambooth.training.speed)
        models = load_models(cfg, report.plans, DTYPES[cfg.training.mixed_precision])
    loader = make_dataloader(cfg, cfg.subject_list(), [s.instance.usable for s in report.subjects], classes,
                             [s.captions.by_photo for s in report.subjects],
                             [s.buckets for s in report.subjects] if cfg.dataset.enable_bucket else None)
    t = cfg.training
    scale = t.gradient_accumulation_steps * t.batch_size * accelerator.num_processes if t.scale_lr else 1.0
    graph, why = graph_plan(cfg, accelerator.device.type, accelerator.num_processes)
    if accelerator.device.type == "cuda" and accelerator.is_main_process:
        print(why)
    optimizer = make_optimizer(cfg, param_groups(cfg, models, scale), accelerator.device, graph=graph)
    loader = accelerator.prepare(loader)
    total = t.max_train_steps or t.num_train_epochs * steps_per_epoch(cfg, loader)
    lr_scheduler = make_lr_scheduler(cfg, optimizer, accelerator.num_processes, total)
    trained = models.trained()
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    names = {id(module): name for name, module in models.modules().items()}
    for module, wrapped in zip(trained, prepared):
        models.set_part(names[id(module)], wrapped)
    optimizer, lr_scheduler = prepared[-2:]
    speed_up(cfg, models, accelerator)
    for module in models.modules().values():
        module.to(accelerator.device)
    generator = torch.Generator(device=accelerator.device).manual_seed(t.seed + accelerator.process_index)
    ema = make_average(cfg, models, accelerator)
    if ema is not None and accelerator.is_main_process:
        print(describe(cfg, total))
    run = Run(cfg, accelerator, models, optimizer, lr_scheduler, loader, generator, out, total, report, graph=graph,
              ema=ema)
    CheckpointFiles(run).register()
    return run


def layout(run: Run) -> Layout:
    t = run.cfg.training
    return Layout(run.accelerator.num_processes, t.batch_size, t.gradient_accumulation_steps)


def schedule_at(lr_scheduler, count: int) -> None:
    """Puts the LR schedule at `count` of its steps. accelerate steps the schedule once per process per optimizer step
    (components.make_lr_scheduler counts so), so a checkpoint saved by another process count holds another count
    for the same optimizer step. diffusers' schedules are closed-form in their step (LambdaLR)."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
    inner.last_epoch = count - 1
    inner.step()


def resume(run: Run) -> int:
    """Loads the planned checkpoint into the run; returns the step to continue from."""
    checkpoint = run.report.run_plan.resume_from
    if checkpoint is None:
        return 0
    if checkpoint.step > run.total_steps:
        raise UserError(f"output.resume_from_checkpoint: {checkpoint.path} is at step {checkpoint.step}, past this "
                        f"run's {run.total_steps} steps. Train for more epochs or steps to continue it.")
    state = load_checkpoint(run.accelerator, checkpoint.path)
    step = int(state["global_step"])
    saved = Layout.from_record(state.get("layout"))
    if saved is not None and saved.processes != run.accelerator.num_processes:
        schedule_at(run.lr_scheduler, step * run.accelerator.num_processes)
    if run.accelerator.is_main_process:
        note = resume_note(saved, layout(run))
        if note:
            print(note)
        print(f"resumed from {checkpoint.path} at step {step}")
        if step == run.total_steps:
            print(f"it is already at max_train_steps ({step}): nothing left to train; saving the final outputs from it")
    return step


def start_run(run: Run) -> None:
    """The run can start: its id is settled, the output folder and class folders are changed as planned."""
    from accelerate.utils import broadcast_object_list

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


def train(cfg: Config) -> Path:
    """Runs a whole DreamBooth training job; returns the output folder.

    Order matters for the user's folders: pre-flight checks everything and changes nothing; setup loads and
    generates (into a staging folder); only when the run can step does `start_run` replace an earlier run or
    move class images. In a process that ends with the run (`dreambooth train`), what start-up made is frozen
    and later full collections skip it (`speed.freeze_if_process_ends`).
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
        freeze_if_process_ends()
        start = resume(run)
        start_run(run)
        kernels = cpu_convolution(cfg, run.models, run.accelerator.device)
        with StopRequest() as stop, convolution_kernels(kernels):
            loop(run, start, stop)
        finish(run)
    except BaseException:
        if run is not None and run.run_id:  # the page says so rather than "running" at its last refresh
            refresh_report(run, status=f"stopped at step {run.global_step} (no final model from this run)")
        raise
    finally:
        if run is not None:
            release(run.accelerator)
        lock.release()
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before it started leaves no empty folder behind
    return out


def finish(run: Run) -> None:
    """The final outputs (with --use_ema, the EMA weights), the model card, the upload; one line saying where they
    are."""
    with ema_weights(run):
        save_outputs(run)
    cfg, out = run.cfg, run.out
    if not run.accelerator.is_main_process:
        return
    write_model_card(run)
    if cfg.model.method == "lora":
        reader = "LyCORIS' layout: A1111, Forge, ComfyUI" if cfg.lora.adapter in LYCORIS else "pipe.load_lora_weights"
        what = f"{TITLES[cfg.lora.adapter]} in {out / 'pytorch_lora_weights.safetensors'} ({reader})"
    else:
        what = f"model in {out} ({pipeline_class(out).__name__}.from_pretrained)"
    ema = ", the EMA weights" if run.ema is not None else ""
    print(f"done: {what}{ema}; checkpoints, samples/ and {cfg.output.logging_dir}/ beside it")
    refresh_report(run, final=True)
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
