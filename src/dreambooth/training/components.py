"""Building what training needs from the config: models, what trains, optimizer, schedule, data order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from dreambooth.config import Config, Subject, lora_denoiser_targets
from dreambooth.models.families import Family
from dreambooth.models.families.common import Conditioning
from dreambooth.training.buckets import BucketBatchSampler
from dreambooth.training.data import DreamBoothDataset, MultiSubjectDataset, collate_examples
from dreambooth.training.tokens import IdentifierPlan, add_identifier_token, load_tokenizer, train_only_rows


@dataclass
class Models:
    """The pipeline parts training touches, by component name, and which of them learn.

    `parts` holds the denoiser ("unet" or "transformer"), "vae" and each text encoder and tokenizer under the
    family's component names; `new_token_ids` the ids of new identifier tokens per text encoder.
    """

    family: Family
    parts: dict[str, object]
    noise_scheduler: object
    new_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_pipeline(cls, pipe, family: Family) -> Models:
        """The parts of a loaded pipeline of `family` (tests, and callers that hold a pipeline already)."""
        names = [family.denoiser, "vae"] + [n for t in family.text_encoders for n in (t.component, t.tokenizer)]
        return cls(family, {name: getattr(pipe, name) for name in names}, pipe.scheduler)

    def __getattr__(self, name: str):
        # component names read as attributes (models.vae, models.text_encoder_2), as on a diffusers pipeline
        parts = self.__dict__.get("parts") or {}
        if name in parts:
            return parts[name]
        raise AttributeError(name)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.parts[self.family.denoiser]

    @property
    def first_token_ids(self) -> list[int]:
        """The new tokens' ids in the first tokenizer (the one the report and the LoRA metadata name them by)."""
        return self.new_token_ids.get(self.family.text_encoders[0].component, [])

    def set_part(self, name: str, module) -> None:
        self.parts[name] = module

    def text_sides(self, trainable_only: bool = False) -> list[tuple[str, object, torch.nn.Module, list[int]]]:
        """(component name, tokenizer, text encoder, new token ids) of each text encoder of the family; with
        `trainable_only`, those --train_text_encoder trains (not T5). Everything that trains or saves the text side
        walks this."""
        return [(t.component, self.parts[t.tokenizer], self.parts[t.component], self.new_token_ids.get(t.component, []))
                for t in self.family.text_encoders if t.trains or not trainable_only]

    def encoders(self) -> list[torch.nn.Module]:
        return [encoder for _, _, encoder, _ in self.text_sides()]

    def modules(self) -> dict[str, torch.nn.Module]:
        """The denoiser, the VAE and the text encoders by component name."""
        return {self.family.denoiser: self.denoiser, "vae": self.parts["vae"],
                **{name: encoder for name, _, encoder, _ in self.text_sides()}}

    def trained(self) -> list[torch.nn.Module]:
        """The denoiser and the text encoders, each if any of its parameters trains (adapters, a new token's row)."""
        return [m for m in (self.denoiser, *self.encoders()) if any(p.requires_grad for p in m.parameters())]

    @property
    def text_trains(self) -> bool:
        return any(p.requires_grad for encoder in self.encoders() for p in encoder.parameters())


def _class(library: str, name: str):
    import importlib

    return getattr(importlib.import_module(library), name)


def load_models(cfg: Config, plans: list[IdentifierPlan], weight_dtype: torch.dtype) -> Models:
    """Loads the base model's parts as its family names them; frozen weights go to `weight_dtype`, trainable ones
    stay fp32."""
    src = {"revision": cfg.model.revision}
    base = cfg.model.pretrained_model
    family = cfg.family()
    parts: dict[str, object] = {}
    for t in family.text_encoders:
        parts[t.tokenizer] = load_tokenizer(cfg) if t == family.text_encoders[0] else \
            _class("transformers", "AutoTokenizer").from_pretrained(base, subfolder=t.tokenizer, **src)
        parts[t.component] = _class("transformers", t.cls).from_pretrained(
            base, subfolder=t.component, variant=cfg.model.variant, **src).requires_grad_(False).eval()
    parts["vae"] = load_vae(cfg)
    quantized = quantization_config(cfg, weight_dtype)
    extra = {"quantization_config": quantized, "torch_dtype": weight_dtype} if quantized is not None else {}
    parts[family.denoiser] = _class("diffusers", family.denoiser_cls).from_pretrained(
        base, subfolder=family.denoiser, variant=cfg.model.variant, **src, **extra)
    if quantized is not None:
        from peft import prepare_model_for_kbit_training

        # the frozen 4-bit weights stay as they are; norms and the like go to fp32 for stable LoRA training (QLoRA)
        parts[family.denoiser] = prepare_model_for_kbit_training(parts[family.denoiser],
                                                                 use_gradient_checkpointing=False)
    noise_scheduler = _class("diffusers", family.train_scheduler).from_pretrained(base, subfolder="scheduler", **src)
    models = Models(family, parts, noise_scheduler)
    # a new identifier token goes into every CLIP tokenizer and encoder of the family (SDXL's two, Flux's one); T5
    # reads the identifier as its own pieces unless token.t5_new_token adds it there too
    for t in family.text_encoders:
        if t.kind == "clip" or cfg.token.t5_new_token:
            models.new_token_ids[t.component] = [i for plan in plans for i in add_identifier_token(
                parts[t.tokenizer], parts[t.component], plan)]
    for name, module in models.modules().items():
        if module.dtype != weight_dtype and not (quantized is not None and name == family.denoiser):
            module.to(dtype=weight_dtype)
    vae = parts["vae"]
    if weight_dtype == torch.float16 and vae.config.get("force_upcast", False):
        # SDXL's VAE overflows in fp16 (its config says so with force_upcast): it encodes in fp32.
        vae.to(dtype=torch.float32)
        print("note: this model's VAE is marked as overflowing in fp16 (force_upcast); it encodes in fp32, the rest "
              "trains in fp16")
    set_trainable(cfg, models)
    # Trainable weights (the whole denoiser, LoRA adapters, a token's embedding) are fp32 whatever the precision of
    # the checkpoint or of the run: the optimizer's small updates vanish in fp16/bf16. A text encoder with anything
    # trainable stays fp32 as a whole: an fp32 embedding feeding half-precision LayerNorms fails outside CUDA
    # autocast, and CLIP's 123 M parameters are cheap next to the denoiser.
    for name, _, encoder, _ in models.text_sides():
        if not any(p.requires_grad for p in encoder.parameters()):
            continue
        if family.text_encoder(name).kind == "t5":
            # Only a new token's rows train in T5 (never adapters or the whole): its embedding alone goes to fp32.
            # T5's layer norms cast their input to the weights' dtype, so fp32 rows feed a half-precision T5 outside
            # autocast too, and T5-XXL (4.7 B parameters) stays at half its fp32 size.
            encoder.get_input_embeddings().to(dtype=torch.float32)
        else:
            encoder.to(dtype=torch.float32)
    for param in models.denoiser.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if cfg.training.gradient_checkpointing:
        models.denoiser.enable_gradient_checkpointing()
        if cfg.model.train_text_encoder:
            for _, _, encoder, _ in models.text_sides(trainable_only=True):
                encoder.gradient_checkpointing_enable()
    if cfg.model.enable_xformers_memory_efficient_attention:
        models.denoiser.enable_xformers_memory_efficient_attention()
    return models


def quantization_settings(cfg: Config) -> dict | None:
    """The bitsandbytes settings of a quantized frozen denoiser (--quantize_base nf4, or the JSON of
    --bnb_quantization_config_path); None when the denoiser loads as it is."""
    import json

    if cfg.model.bnb_quantization_config_path is not None:
        return json.loads(Path(cfg.model.bnb_quantization_config_path).read_text())
    if cfg.model.quantize_base == "nf4":
        return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    return None


def quantization_config(cfg: Config, compute_dtype: torch.dtype):
    """diffusers' BitsAndBytesConfig of the frozen denoiser, computing in the run's precision, or None."""
    settings = quantization_settings(cfg)
    if settings is None:
        return None
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(**{**settings, "bnb_4bit_compute_dtype": compute_dtype})


def load_vae(cfg: Config, dtype: torch.dtype | None = None):
    """The base model's VAE, or the one --pretrained_vae_model_name_or_path names (a VAE folder of its own)."""
    from diffusers import AutoencoderKL

    extra = {"torch_dtype": dtype} if dtype is not None else {}
    if cfg.model.pretrained_vae:
        return AutoencoderKL.from_pretrained(cfg.model.pretrained_vae, **extra)
    return AutoencoderKL.from_pretrained(cfg.model.pretrained_model, subfolder="vae", variant=cfg.model.variant,
                                         revision=cfg.model.revision, **extra)


def set_trainable(cfg: Config, models: Models) -> None:
    """Denoiser and text encoders as configured (whole, or LoRA adapters; T5 never, as in diffusers' scripts); a new
    token's rows always; the VAE never."""
    lora = cfg.model.method == "lora"
    whole = wholly_trained_encoders(cfg, models)
    models.vae.requires_grad_(False)
    models.denoiser.requires_grad_(cfg.model.train_denoiser and not lora)
    for name, _, encoder, _ in models.text_sides():
        encoder.requires_grad_(name in whole)
    if lora:
        add_lora_adapters(cfg, models)
    rows = token_rows_only(cfg, models)
    for name, _, encoder, _ in models.text_sides():
        if name in rows:
            train_only_rows(encoder.get_input_embeddings(), rows[name])
        # T5 learns a new token's rows at most; the rest of it is frozen and stays in eval mode, so its dropout
        # (T5 v1.1's 0.1) does not blur every prompt in training while drawing sees them sharp
        encoder.train(any(p.requires_grad for p in encoder.parameters())
                      and models.family.text_encoder(name).kind != "t5")
    models.denoiser.train(cfg.model.train_denoiser)


def wholly_trained_encoders(cfg: Config, models: Models) -> set[str]:
    """The text encoders that train whole (full fine-tuning with --train_text_encoder; never T5)."""
    if not cfg.model.train_text_encoder or cfg.model.method == "lora":
        return set()
    return {name for name, _, _, _ in models.text_sides(trainable_only=True)}


def token_rows_only(cfg: Config, models: Models) -> dict[str, list[int]]:
    """The text encoders whose embedding trains only in the new tokens' rows (train_only_rows), with those rows."""
    whole = wholly_trained_encoders(cfg, models)
    return {name: ids for name, _, _, ids in models.text_sides() if ids and name not in whole}


def lora_config(cfg: Config, target_modules: list[str]):
    """peft's config of the adapter kind lora.adapter names, at its rank and alpha; each starts as no change (LoRA's
    and DoRA's up matrix, LoKr's first factor, LoHa's second pair's up matrix are zeros), so step 0 is the base."""
    import peft

    lc = cfg.lora
    alpha = lc.alpha or lc.rank
    if lc.adapter == "lokr":
        return peft.LoKrConfig(r=lc.rank, alpha=alpha, decompose_factor=lc.lokr_factor, target_modules=target_modules)
    if lc.adapter == "loha":
        return peft.LoHaConfig(r=lc.rank, alpha=alpha, target_modules=target_modules)
    return peft.LoraConfig(r=lc.rank, lora_alpha=alpha, lora_dropout=lc.dropout, init_lora_weights="gaussian",
                           use_dora=lc.adapter == "dora", target_modules=target_modules)


def add_lora_adapters(cfg: Config, models: Models) -> None:
    """peft adapters of lora.adapter's kind on the denoiser's attention projections (and the CLIP text encoders', when
    they train).

    The text encoder's come from peft directly, not through transformers' `add_adapter`: transformers 5.24 refuses
    every peft release that exists (it asks for peft >= 0.22), while peft itself, like diffusers' loader, works
    with all of them. `peft_config` is what transformers would set, and what saving reads.
    """
    from peft import inject_adapter_in_model

    if cfg.model.train_denoiser:
        models.denoiser.add_adapter(lora_config(cfg, lora_denoiser_targets(cfg)))
    if cfg.model.train_text_encoder:
        for _, _, encoder, _ in models.text_sides(trainable_only=True):
            config = lora_config(cfg, cfg.lora.text_encoder_target_modules)
            inject_adapter_in_model(config, encoder, adapter_name="default")
            encoder.peft_config = {"default": config}


def param_groups(cfg: Config, models: Models, lr_scale: float) -> list[dict]:
    """Optimizer groups: the denoiser at learning_rate, the text side at text_encoder_lr.

    A lone token embedding gets no weight decay: decay would shrink the frozen rows of the vocabulary, whose
    gradients are zero, so only without it do they stay exactly as pretrained.
    """
    t = cfg.training
    groups = []
    denoiser_params = [p for p in models.denoiser.parameters() if p.requires_grad]
    if denoiser_params:
        groups.append({"params": denoiser_params, "lr": t.learning_rate * lr_scale,
                       "weight_decay": t.adam_weight_decay})
    embeddings = [e.get_input_embeddings().weight for e in models.encoders()]
    text_params = [p for e in models.encoders() for p in e.parameters()
                   if p.requires_grad and not any(p is w for w in embeddings)]
    text_decay = t.adam_weight_decay if t.adam_weight_decay_text_encoder is None else t.adam_weight_decay_text_encoder
    if text_params:
        groups.append({"params": text_params, "lr": t.text_encoder_lr * lr_scale, "weight_decay": text_decay})
    trained_rows = [w for w in embeddings if w.requires_grad]
    if trained_rows:
        whole = cfg.model.train_text_encoder and cfg.model.method == "full"
        groups.append({"params": trained_rows, "lr": t.text_encoder_lr * lr_scale,
                       "weight_decay": text_decay if whole else 0.0})
    return groups


def make_optimizer(cfg: Config, groups: list[dict], device: torch.device, *,
                   graph: bool = False) -> torch.optim.Optimizer:
    """The optimizer training.optimizer names (OPTIMIZERS), over `param_groups`' groups, each keeping its learning
    rate and weight decay.

    `graph`: for a step captured as a CUDA graph (training.graph_step, torch's AdamW only): each group's learning rate
    is a device tensor that the LR schedule fills in place, and the step is capturable (its step counts on the device).
    """
    t = cfg.training
    if graph:
        groups = [{**group, "lr": torch.tensor(float(group["lr"]), device=device)} for group in groups]
        return torch.optim.AdamW(groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, fused=True,
                                 capturable=device.type == "cuda")
    return OPTIMIZERS[t.optimizer_kind](t, groups)


def adamw(t, groups: list[dict]) -> torch.optim.Optimizer:
    """torch's AdamW, fused (foreach where there is no fused kernel)."""
    kw = {"betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_epsilon}
    # The fused kernel (one pass over all parameters) exists for CUDA and, in recent torch, the CPU, where it
    # measured 4x faster than foreach on the 35 M-parameter `small` UNet (docs/bench.md) and needs no temporaries.
    try:
        return torch.optim.AdamW(groups, **kw, fused=True)
    except (RuntimeError, ValueError):  # a device or torch without the fused kernel
        return torch.optim.AdamW(groups, **kw, foreach=True)


def adamw8bit(t, groups: list[dict]) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW: a quarter of AdamW's moment memory."""
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)


def prodigy(t, groups: list[dict]) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023, arXiv:2306.06101): Adam whose step size it estimates itself, which the
    learning rate multiplies. Built as diffusers' DreamBooth scripts build it: AdamW's betas, epsilon and weight
    decay, and the training.prodigy_* settings."""
    from prodigyopt import Prodigy

    return Prodigy(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), beta3=t.prodigy_beta3,
                   eps=t.adam_epsilon, weight_decay=t.adam_weight_decay, decouple=t.prodigy_decouple,
                   use_bias_correction=t.prodigy_use_bias_correction, safeguard_warmup=t.prodigy_safeguard_warmup,
                   d_coef=t.prodigy_d_coef)


def lion(t, groups: list[dict]) -> torch.optim.Optimizer:
    """Lion (Chen et al. 2023, arXiv:2302.06675): the sign of an interpolated momentum, so every weight moves by
    exactly the learning rate; one moment (half of AdamW's state). lion-pytorch, as kohya's sd-scripts use."""
    from lion_pytorch import Lion

    return Lion(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay)


# training.optimizer's kinds (config.OPTIMIZERS) and what builds each from the training section and the groups.
OPTIMIZERS = {"adamw": adamw, "adamw8bit": adamw8bit, "prodigy": prodigy, "lion": lion}


def make_lr_scheduler(cfg: Config, optimizer, num_processes: int, total_steps: int):
    """diffusers' schedules; counts are multiplied by the process count because accelerate steps the
    scheduler once per process."""
    from diffusers.optimization import get_scheduler

    t = cfg.training
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps * num_processes,
                         num_training_steps=total_steps * num_processes, num_cycles=t.lr_num_cycles,
                         power=t.lr_power)


class EpochSampler(Sampler):
    """A shuffled order that depends only on (seed, epoch), so a resumed run sees the same batches."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())


def make_dataloader(cfg: Config, subjects: list[Subject], instance: list[list[Path]],
                    classes: list[list[Path]] | None, captions: list[dict[Path, str]] | None = None,
                    buckets: list[list[tuple[int, int]]] | None = None) -> DataLoader:
    """One dataset per subject (instance photos, each with its caption or the instance prompt and its aspect bucket,
    paired with that subject's class images), sampled in balance; with buckets, each batch from one bucket."""
    ds, t = cfg.dataset, cfg.training
    captions = captions or [{} for _ in subjects]
    parts = [DreamBoothDataset(
        photos, s.instance_prompt, t.resolution,
        class_images=classes[i] if classes else None, class_prompt=s.class_prompt if classes else None,
        center_crop=ds.center_crop, random_flip=ds.random_flip, seed=t.seed + 7919 * i,
        captions=[captions[i].get(photo) for photo in photos], caption_dropout=ds.caption_dropout,
        buckets=buckets[i] if buckets else None, masked_loss=ds.masked_loss)
        for i, (s, photos) in enumerate(zip(subjects, instance))]
    dataset = parts[0] if len(parts) == 1 else MultiSubjectDataset(parts)
    common = {"collate_fn": collate_examples, "num_workers": t.dataloader_num_workers}
    if buckets:
        sampler = BucketBatchSampler([dataset.bucket_of(i) for i in range(len(dataset))], t.batch_size, t.seed,
                                     dataset)
        return DataLoader(dataset, batch_sampler=sampler, **common)
    return DataLoader(dataset, batch_size=t.batch_size, sampler=EpochSampler(len(dataset), t.seed), **common)


class PromptEncoder:
    """Prompt conditioning as the family builds it (models.families); cached per prompt while the text side is
    frozen (DreamBooth has two prompts)."""

    def __init__(self, cfg: Config, models: Models, device: torch.device) -> None:
        self.models, self.device = models, device
        self.behaviour = models.family.behaviour()
        self.max_length = cfg.training.tokenizer_max_length
        self.sequence_length = self.behaviour.sequence_length(cfg)
        self.use_mask = cfg.training.text_encoder_use_attention_mask
        self.cache: dict[str, dict[str, torch.Tensor]] | None = None if models.text_trains else {}

    @property
    def trains(self) -> bool:
        """Whether the text side trains (then prompts are encoded inside every step)."""
        return self.cache is None

    # token ids and their embedding as two steps: a CUDA-graph step (training.graph_step, SD 1.x/2.x only)
    # captures the embedding but not the tokenizer
    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokenizer = self.models.tokenizer
        tok = tokenizer(prompts, padding="max_length", max_length=self.max_length or tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device) if self.use_mask else None

    def embed(self, ids: torch.Tensor, mask: torch.Tensor | None) -> Conditioning:
        return Conditioning({"embeds": self.models.text_encoder(ids, attention_mask=mask)[0]})

    def conditioning(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a captured step needs of its prompts: token ids (and mask) when the text side trains, else the
        embedding (SD's one tensor)."""
        return self.tokens(prompts) if self.trains else (self(prompts)["embeds"], None)

    def _encode(self, prompts: list[str]) -> Conditioning:
        return self.behaviour.encode(self.models, prompts, max_length=self.max_length,
                                     sequence_length=self.sequence_length, mask=self.use_mask).to(self.device)

    def __call__(self, prompts: list[str]) -> Conditioning:
        if self.cache is None:
            return self._encode(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with torch.no_grad():
                for p, row in zip(missing, self._encode(missing).rows()):
                    self.cache[p] = row
        return Conditioning.stack([self.cache[p] for p in prompts])
