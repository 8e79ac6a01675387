"""What a run writes to explain itself and what it leaves: run_info.json, the log, the model card, and the final
model (a full diffusers folder, or a LoRA file with its tokens)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dreambooth import __version__
from dreambooth.config import lora_denoiser_targets
from dreambooth.config_file import dump_config
from dreambooth.formats.atomic import move_into, temporary_folder, write_json_atomic, write_text_atomic
from dreambooth.formats.kohya import save_lycoris
from dreambooth.formats.lora import save_lora, save_token_embeddings
from dreambooth.formats.lycoris import LYCORIS, TITLES
from dreambooth.models.base import model_fingerprint
from dreambooth.models.loading import DTYPES
from dreambooth.training.ema import weights_label
from dreambooth.versions import library_versions


def sharded(accelerator) -> bool:
    """Whether the trained weights are split across the processes (accelerate's FSDP plugin)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def whole_denoiser(run) -> torch.nn.Module | None:
    """The trained denoiser, whole, on the main process (None on the others); every process must call it.

    Without FSDP that is the unwrapped module. Under FSDP each process holds a shard: accelerate's get_state_dict
    gathers the full weights onto the main process (all processes take part), where they fill a copy built on the
    meta device from the denoiser's config, so no second set of weights is ever allocated before they arrive."""
    acc = run.accelerator
    module = acc.unwrap_model(run.models.denoiser)
    if not sharded(acc):
        return module
    state = acc.get_state_dict(run.models.denoiser)
    if not acc.is_main_process:
        return None
    with torch.device("meta"):
        whole = type(module).from_config(module.config)
    whole.load_state_dict(state, assign=True)
    for name, buffer in list(whole.named_buffers()):  # non-persistent buffers are in no state dict; FSDP leaves
        if buffer.is_meta:                             # buffers whole on every process, so the local one is it
            owner, _, leaf = name.rpartition(".")
            whole.get_submodule(owner).register_buffer(leaf, module.get_buffer(name).detach().cpu(), persistent=False)
    return whole


def save_full_model(run, denoiser: torch.nn.Module | None = None) -> None:
    """The trained pipeline in diffusers format at the output dir, loadable by stock from_pretrained.

    Frozen parts are read again from the base model rather than saved from their low-precision training
    copies, so nothing is silently saved in fp16 beside an fp32 UNet; everything is then cast to the
    requested save precision together.
    """
    from dreambooth.models.loading import pipeline_class

    acc, cfg, m = run.accelerator, run.cfg, run.models
    parts = {m.family.denoiser: denoiser if denoiser is not None else acc.unwrap_model(m.denoiser)}
    for name, tokenizer, encoder, _ in m.text_sides():
        parts[name.replace("text_encoder", "tokenizer")] = tokenizer  # with any new token
        if any(p.requires_grad for p in encoder.parameters()):
            parts[name] = acc.unwrap_model(encoder)
        if cfg.output.skip_save_text_encoder:
            parts[name] = None
    if cfg.model.pretrained_vae:  # the saved model draws with the VAE it trained with, read again at full precision
        from dreambooth.training.components import load_vae

        parts["vae"] = load_vae(cfg)
    pipe = pipeline_class(m.family).from_pretrained(
        cfg.model.pretrained_model, revision=cfg.model.revision, variant=cfg.model.variant, **parts)
    pipe.to(dtype=DTYPES[cfg.output.save_precision])
    # Beside checkpoints in the run folder, so it cannot be swapped in whole: its entries move in one by one.
    with temporary_folder(run.out / ".final-model.tmp") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        move_into(tmp, run.out, last="model_index.json")


def _adapter_config(module) -> dict | None:
    config = getattr(module, "peft_config", {}).get("default")
    if config is None:
        return None
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def lora_metadata(run) -> dict[str, str]:
    """What made the LoRA, as safetensors metadata (strings): base model, its hash and family, subjects, LoRA
    settings."""
    cfg, m = run.cfg, run.models
    subjects = cfg.subject_list()
    return {
        "dreambooth.version": __version__,
        "dreambooth.base_model": str(cfg.model.pretrained_model),
        "dreambooth.base_model_hash": model_fingerprint(cfg.model.pretrained_model),
        # the family tells where the LoRA applies even once the base model is gone (formats.lora_fit reads it)
        "dreambooth.base_family": m.family.name,
        "dreambooth.identifiers": json.dumps([s.identifier for s in subjects]),
        "dreambooth.instance_prompts": json.dumps([s.instance_prompt for s in subjects]),
        "dreambooth.class_prompts": json.dumps([s.class_prompt for s in subjects]),
        "dreambooth.new_tokens": json.dumps(m.tokenizer.convert_ids_to_tokens(m.first_token_ids)),
        "dreambooth.adapter": cfg.lora.adapter,
        "dreambooth.rank": str(cfg.lora.rank),
        "dreambooth.alpha": f"{cfg.lora.alpha or cfg.lora.rank:g}",
        # the denoiser's targets, under the key LoRA files of this tool have always carried
        "dreambooth.unet_target_modules": json.dumps(lora_denoiser_targets(cfg) if cfg.model.train_denoiser else []),
        "dreambooth.text_encoder_target_modules": json.dumps(
            cfg.lora.text_encoder_target_modules if cfg.model.train_text_encoder else []),
        "dreambooth.steps": str(run.global_step),
        "dreambooth.weights": weights_label(cfg, run.global_step),
        "dreambooth.resolution": str(cfg.training.resolution),
        "dreambooth.run_id": run.run_id,
    }


def save_lora_output(run, folder: Path | None = None) -> None:
    """`pytorch_lora_weights.safetensors` and any new tokens' embeddings, in the output folder or in a checkpoint
    being written: a LoRA or DoRA in diffusers' layout (stock `load_lora_weights` reads it), LoKr or LoHa in
    LyCORIS' (A1111, Forge and ComfyUI read it; `formats.lycoris`)."""
    folder = folder or run.out
    model = run.cfg.model
    family, parts = run.models.family, unwrapped(run)
    # the parts that can carry adapters (the denoiser, the CLIP encoders; never T5), as the family's pipeline names
    # them in save_lora_weights
    modules = {name: parts[name] if (model.train_denoiser if name == family.denoiser else model.train_text_encoder)
               else None for name in family.trained_parts}
    adapter = run.cfg.lora.adapter
    if adapter in LYCORIS:  # LyCORIS' layout, which diffusers' save_lora_weights does not write
        save_lycoris(folder, family, modules, adapter, lora_metadata(run))
    else:
        configs = {name: _adapter_config(module) if module else None for name, module in modules.items()}
        save_lora(folder, family, modules, configs, lora_metadata(run))
    save_token_embeddings(folder, token_sides(run))


def unwrapped(run) -> dict[str, torch.nn.Module]:
    """The denoiser and the text encoders by component name ("unet" or "transformer", "text_encoder", ...),
    unwrapped from what accelerate prepared."""
    acc, m = run.accelerator, run.models
    return {m.family.denoiser: acc.unwrap_model(m.denoiser),
            **{name: acc.unwrap_model(encoder) for name, _, encoder, _ in m.text_sides()}}


def token_sides(run) -> list[tuple]:
    """(token key, tokenizer, unwrapped text encoder, new token ids) per text encoder, for the token file."""
    modules, family = unwrapped(run), run.models.family
    return [(family.text_encoder(name).token_key, tokenizer, modules[name], ids)
            for name, tokenizer, _, ids in run.models.text_sides()]


def save_outputs(run) -> None:
    acc = run.accelerator
    acc.wait_for_everyone()
    full = run.cfg.model.method != "lora"
    denoiser = whole_denoiser(run) if full else None  # gathered by every process under FSDP
    if not acc.is_main_process:
        return
    if full:
        save_full_model(run, denoiser)
    else:
        save_lora_output(run)


def model_card(run) -> str:
    """README.md for the output folder, with the YAML header the Hugging Face hub reads (base model, tags, the
    instance prompt as the trigger, sample images as widgets)."""
    import yaml

    cfg, out = run.cfg, run.out
    subjects = cfg.subject_list()
    lora = cfg.model.method == "lora"
    samples = sorted((out / "samples").glob("step-*.png")) if (out / "samples").is_dir() else []
    header = {
        "base_model": str(cfg.model.pretrained_model),
        "library_name": "diffusers",
        "license": "other",
        "tags": ["text-to-image", "diffusers", "stable-diffusion", "dreambooth", "dreambooth-tool"]
        + (["lora"] if lora else []) + ([cfg.lora.adapter] if lora and cfg.lora.adapter != "lora" else [])
        + (["lycoris"] if lora and cfg.lora.adapter in LYCORIS else []),
        "instance_prompt": subjects[0].instance_prompt,
        "inference": True,
    }
    if samples:
        shown = cfg.validation.prompts[0] if cfg.validation.prompts else subjects[0].instance_prompt
        header["widget"] = [{"text": shown, "output": {"url": f"samples/{samples[-1].name}"}}]
    identifiers = ", ".join(f"`{s.identifier}`" for s in subjects if s.identifier)
    what = TITLES[cfg.lora.adapter] if lora else "model"
    lines = [f"---\n{yaml.safe_dump(header, sort_keys=False)}---", "",
             f"# DreamBooth {what}: {identifiers or subjects[0].instance_prompt}", "",
             f"Trained by `dreambooth` {__version__} (run {run.run_id}) from `{cfg.model.pretrained_model}`, "
             f"{run.global_step} steps at {cfg.training.resolution} px, "
             f"{'with' if cfg.dataset.with_prior_preservation else 'without'} prior preservation.", "",
             f"Weights: {weights_label(cfg, run.global_step)}.", "",
             "Prompts: " + "; ".join(f"\"{s.instance_prompt}\"" for s in subjects) + ".", "",
             "## Use", "", usage(cfg), ""]
    if any(s.identifier and s.identifier.startswith("<") for s in subjects):
        lines += ["The identifier is a new token; its trained embedding is in `token_embeddings.safetensors` "
                  "(LoRA) or in the saved tokenizer and text encoder (full model).", ""]
    if samples:
        lines += ["## Samples", "", *(f"![step {p.stem[5:]}](samples/{p.name})" for p in samples[-3:]), ""]
    lines += ["Everything that made this model is in `config.yaml` and `run_info.json` beside this card."]
    return "\n".join(lines) + "\n"


def usage(cfg) -> str:
    """How the result loads: stock diffusers for a model, a LoRA or a DoRA; a LoKr or LoHa file, which diffusers' SD
    pipelines do not read, in A1111/ComfyUI or through this tool."""
    cls = cfg.family().pipeline
    if cfg.model.method == "lora" and cfg.lora.adapter in LYCORIS:
        key = "lokr_w1" if cfg.lora.adapter == "lokr" else "hada_w1_a"
        return (f"A {TITLES[cfg.lora.adapter]} adapter in LyCORIS' layout (`lora_unet_....{key}` keys): put "
                "`pytorch_lora_weights.safetensors` in the LoRA folder of A1111, Forge or ComfyUI. diffusers' "
                f"{cls}.load_lora_weights does not read it; `dreambooth generate --model BASE --lora "
                "PATH_TO_THIS_FOLDER --prompt PROMPT` draws with it, and `dreambooth export BASE --merge-lora "
                "PATH_TO_THIS_FOLDER --format diffusers --out DIR` bakes it into a model stock diffusers loads.")
    load = (f'{cls}.from_pretrained("{cfg.model.pretrained_model}")\n'
            'pipe.load_lora_weights("PATH_TO_THIS_FOLDER")' if cfg.model.method == "lora"
            else f'{cls}.from_pretrained("PATH_TO_THIS_FOLDER")')
    return f"```python\nfrom diffusers import {cls}\n\npipe = {load}\n```"


def write_model_card(run) -> None:
    write_text_atomic(run.out / "README.md", model_card(run))


def write_run_info(run) -> None:
    """run_info.json and config.yaml: what this run is, in data a program can read back."""
    cfg, report, models = run.cfg, run.report, run.models
    write_text_atomic(run.out / "config.yaml", dump_config(cfg))
    trainable = sum(p.numel() for m in (models.denoiser, *models.encoders()) for p in m.parameters() if p.requires_grad)
    subjects = []
    for s in report.subjects:
        plan, subject = s.identifier, s.subject
        subjects.append({
            "identifier": plan.identifier, "identifier_kind": plan.kind, "identifier_tokens": plan.pieces,
            "initializer": plan.initializer, "class_word": cfg.token.class_word if not cfg.subjects else
            subject.class_word, "instance_prompt": subject.instance_prompt,
            "class_prompt": subject.class_prompt if cfg.dataset.with_prior_preservation else None,
            "instance_images": [str(p) for p in s.instance.usable], "instance_dir": str(s.instance.folder),
            # what pre-flight set aside, for the run report (training.report)
            "rejected": [{"file": str(i.path), "reason": i.reason} for i in s.instance.rejected()]
            + [{"file": f"{sub}/", "reason": f"a subfolder ({n} image file(s)): subfolders are not searched"}
               for sub, n in s.instance.subfolders],
            "image_notes": [{"file": str(i.path), "reason": i.reason} for i in s.instance.notes()],
            "class_dir": str(subject.class_dir) if cfg.dataset.with_prior_preservation else None})
    write_json_atomic(run.out / "run_info.json", {
        "run_id": run.run_id, "settings": report.run_plan.settings, "base_model": cfg.model.pretrained_model,
        "base_model_hash": model_fingerprint(cfg.model.pretrained_model), "base_model_identity": report.base_identity,
        "method": cfg.model.method, "adapter": cfg.lora.adapter if cfg.model.method == "lora" else None,
        "optimizer": cfg.training.optimizer_kind, "trainable_parameters": trainable,
        "prediction_type": report.prediction_type,
        "family": models.family.name,
        "prior_preservation": cfg.dataset.with_prior_preservation,
        # what the final model, the checkpoints' layout and the validation samples hold (training.ema)
        "weights": weights_label(cfg, run.total_steps),
        "ema": {"decay": cfg.training.ema_decay, "update_after_step": cfg.training.ema_update_after_step,
                "warmup": cfg.training.ema_warmup, "on_cpu": cfg.training.ema_on_cpu} if cfg.training.use_ema else None,
        "resumed_from": str(report.run_plan.resume_from.path) if report.run_plan.resume_from else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "subjects": subjects, "warnings": report.warnings,
        "versions": library_versions()})


class MetricsLog:
    """Loss, LR and step time to a JSON-lines file (always) and TensorBoard (when installed).

    Losses are summed on the device and read only every `logging_steps`, so the loop has no per-step host sync.
    """

    def __init__(self, run) -> None:
        self.run = run
        self.path = run.out / run.cfg.output.logging_dir / "train_log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sums: torch.Tensor | None = None
        self.count = 0
        self.t0 = time.perf_counter()
        self.steps_at_t0 = run.global_step

    def add(self, parts) -> None:
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
                  "lr": float(self.run.lr_scheduler.get_last_lr()[0]), "step_time_s": (now - self.t0) / max(steps, 1)}
        if self.run.cfg.training.optimizer_kind == "prodigy":  # its step-size estimate, which lr multiplies
            inner = getattr(self.run.optimizer, "optimizer", self.run.optimizer)
            record["prodigy_d"] = float(inner.param_groups[0]["d"])
        self.sums, self.count, self.t0, self.steps_at_t0 = None, 0, now, self.run.global_step
        if self.run.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self.run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        return {"loss": f"{loss:.4f}", "lr": f"{record['lr']:.2e}"}
