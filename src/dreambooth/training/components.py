"""Building what training needs from the config: models, what trains, optimizer, schedule, data order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from dreambooth.config import Config, Subject
from dreambooth.models.base import is_sdxl
from dreambooth.training.data import DreamBoothDataset, MultiSubjectDataset, collate_examples
from dreambooth.training.tokens import IdentifierPlan, add_identifier_token, load_tokenizer, train_only_rows


@dataclass
class Models:
    """The pipeline parts training touches, and which of them learn."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    new_token_ids: list[int] = field(default_factory=list)
    # SDXL's second text encoder (OpenCLIP with a projection, whose pooled output also conditions the UNet) and its
    # tokenizer, with the ids of the new tokens added to it; None for SD 1.x and 2.x. It trains as the first does.
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    new_token_ids_2: list[int] = field(default_factory=list)

    def text_sides(self) -> list[tuple[str, object, torch.nn.Module, list[int]]]:
        """(component name, tokenizer, text encoder, new token ids) of each text encoder: one, or SDXL's two. The
        one place the families' text sides differ; everything that trains or saves the text side walks this."""
        sides = [("text_encoder", self.tokenizer, self.text_encoder, self.new_token_ids)]
        if self.text_encoder_2 is not None:
            sides.append(("text_encoder_2", self.tokenizer_2, self.text_encoder_2, self.new_token_ids_2))
        return sides

    def encoders(self) -> list[torch.nn.Module]:
        return [encoder for _, _, encoder, _ in self.text_sides()]

    def trained(self) -> list[torch.nn.Module]:
        """The UNet and the text encoders, each if any of its parameters trains (LoRA adapters, a new token's row)."""
        return [m for m in (self.unet, *self.encoders()) if any(p.requires_grad for p in m.parameters())]

    @property
    def text_trains(self) -> bool:
        return any(p.requires_grad for encoder in self.encoders() for p in encoder.parameters())


def load_models(cfg: Config, plans: list[IdentifierPlan], weight_dtype: torch.dtype) -> Models:
    """Loads the base model's parts; frozen weights go to `weight_dtype`, trainable ones stay fp32."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    src = {"revision": cfg.model.revision}
    base = cfg.model.pretrained_model
    tokenizer = load_tokenizer(cfg)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", variant=cfg.model.variant, **src)
    vae = load_vae(cfg)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=cfg.model.variant, **src)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **src)
    models = Models(tokenizer, text_encoder, vae, unet, noise_scheduler)
    if is_sdxl(base):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        models.tokenizer_2 = AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2", **src)
        models.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            base, subfolder="text_encoder_2", variant=cfg.model.variant, **src).requires_grad_(False).eval()
    models.new_token_ids = [i for plan in plans for i in add_identifier_token(tokenizer, text_encoder, plan)]
    if models.text_encoder_2 is not None:  # SDXL: the same new tokens in its second tokenizer and encoder
        models.new_token_ids_2 = [i for plan in plans
                                  for i in add_identifier_token(models.tokenizer_2, models.text_encoder_2, plan)]
    for module in (unet, text_encoder, vae, models.text_encoder_2):
        if module is not None and module.dtype != weight_dtype:
            module.to(dtype=weight_dtype)
    if weight_dtype == torch.float16 and vae.config.get("force_upcast", False):
        # SDXL's VAE overflows in fp16 (its config says so with force_upcast): it encodes in fp32.
        vae.to(dtype=torch.float32)
        print("note: this model's VAE is marked as overflowing in fp16 (force_upcast); it encodes in fp32, the rest "
              "trains in fp16")
    set_trainable(cfg, models)
    # Trainable weights (full UNet, LoRA adapters, a token's embedding) are fp32 whatever the precision of the
    # checkpoint or of the run: the optimizer's small updates vanish in fp16/bf16. A text encoder with anything
    # trainable stays fp32 as a whole: an fp32 embedding feeding half-precision LayerNorms fails outside CUDA
    # autocast, and CLIP's 123 M parameters are cheap next to the UNet.
    for encoder in models.encoders():
        if any(p.requires_grad for p in encoder.parameters()):
            encoder.to(dtype=torch.float32)
    for param in unet.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if cfg.training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.model.train_text_encoder:
            for encoder in models.encoders():
                encoder.gradient_checkpointing_enable()
    if cfg.model.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    return models


def load_vae(cfg: Config, dtype: torch.dtype | None = None):
    """The base model's VAE, or the one --pretrained_vae_model_name_or_path names (a VAE folder of its own)."""
    from diffusers import AutoencoderKL

    extra = {"torch_dtype": dtype} if dtype is not None else {}
    if cfg.model.pretrained_vae:
        return AutoencoderKL.from_pretrained(cfg.model.pretrained_vae, **extra)
    return AutoencoderKL.from_pretrained(cfg.model.pretrained_model, subfolder="vae", variant=cfg.model.variant,
                                         revision=cfg.model.revision, **extra)


def set_trainable(cfg: Config, models: Models) -> None:
    """UNet and text encoders as configured (whole, or LoRA adapters); a new token's rows always; the VAE never."""
    lora = cfg.model.method == "lora"
    whole_text = cfg.model.train_text_encoder and not lora
    models.vae.requires_grad_(False)
    models.unet.requires_grad_(cfg.model.train_unet and not lora)
    for encoder in models.encoders():
        encoder.requires_grad_(whole_text)
    if lora:
        add_lora_adapters(cfg, models)
    for _, _, encoder, token_ids in models.text_sides():
        if token_ids and not whole_text:
            train_only_rows(encoder.get_input_embeddings(), token_ids)
        encoder.train(any(p.requires_grad for p in encoder.parameters()))
    models.unet.train(cfg.model.train_unet)


def lora_config(cfg: Config, target_modules: list[str]):
    from peft import LoraConfig

    lc = cfg.lora
    return LoraConfig(r=lc.rank, lora_alpha=lc.alpha or lc.rank, lora_dropout=lc.dropout,
                      init_lora_weights="gaussian", target_modules=target_modules)


def add_lora_adapters(cfg: Config, models: Models) -> None:
    """peft LoRA adapters on the UNet's attention projections (and the text encoders', when they train).

    The text encoder's come from peft directly, not through transformers' `add_adapter`: transformers 5.24 refuses
    every peft release that exists (it asks for peft >= 0.22), while peft itself, like diffusers' loader, works
    with all of them. `peft_config` is what transformers would set, and what saving reads.
    """
    from peft import inject_adapter_in_model

    if cfg.model.train_unet:
        models.unet.add_adapter(lora_config(cfg, cfg.lora.unet_target_modules))
    if cfg.model.train_text_encoder:
        for encoder in models.encoders():
            config = lora_config(cfg, cfg.lora.text_encoder_target_modules)
            inject_adapter_in_model(config, encoder, adapter_name="default")
            encoder.peft_config = {"default": config}


def param_groups(cfg: Config, models: Models, lr_scale: float) -> list[dict]:
    """Optimizer groups: UNet at learning_rate, the text side at text_encoder_lr.

    A lone token embedding gets no weight decay: decay would shrink the frozen rows of the vocabulary, whose
    gradients are zero, so only without it do they stay exactly as pretrained.
    """
    t = cfg.training
    groups = []
    unet_params = [p for p in models.unet.parameters() if p.requires_grad]
    if unet_params:
        groups.append({"params": unet_params, "lr": t.learning_rate * lr_scale, "weight_decay": t.adam_weight_decay})
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
    """AdamW: 8-bit from bitsandbytes when asked, else torch's fused kernel (foreach where there is none).

    `graph`: for a step captured as a CUDA graph (training.graph_step): each group's learning rate is a device
    tensor that the LR schedule fills in place, and the step is capturable (its step counts on the device).
    """
    t = cfg.training
    kw = {"betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_epsilon}
    if graph:
        groups = [{**group, "lr": torch.tensor(float(group["lr"]), device=device)} for group in groups]
        return torch.optim.AdamW(groups, **kw, fused=True, capturable=device.type == "cuda")
    if t.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    # The fused kernel (one pass over all parameters) exists for CUDA and, in recent torch, the CPU, where it
    # measured 4x faster than foreach on the 35 M-parameter `small` UNet (docs/bench.md) and needs no temporaries.
    try:
        return torch.optim.AdamW(groups, **kw, fused=True)
    except (RuntimeError, ValueError):  # a device or torch without the fused kernel
        return torch.optim.AdamW(groups, **kw, foreach=True)


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
                    classes: list[list[Path]] | None) -> DataLoader:
    """One dataset per subject (instance photos paired with that subject's class images), sampled in balance."""
    ds = cfg.dataset
    parts = [DreamBoothDataset(
        photos, s.instance_prompt, cfg.training.resolution,
        class_images=classes[i] if classes else None, class_prompt=s.class_prompt if classes else None,
        center_crop=ds.center_crop, random_flip=ds.random_flip, seed=cfg.training.seed + 7919 * i)
        for i, (s, photos) in enumerate(zip(subjects, instance))]
    dataset = parts[0] if len(parts) == 1 else MultiSubjectDataset(parts)
    sampler = EpochSampler(len(dataset), cfg.training.seed)
    return DataLoader(dataset, batch_size=cfg.training.batch_size, sampler=sampler,
                      collate_fn=collate_examples, num_workers=cfg.training.dataloader_num_workers)


class PromptEncoder:
    """Prompt embeddings; cached per prompt while the text side is frozen (DreamBooth has two prompts)."""

    def __init__(self, cfg: Config, models: Models, device: torch.device) -> None:
        self.models, self.device = models, device
        self.max_length = cfg.training.tokenizer_max_length or models.tokenizer.model_max_length
        self.use_mask = cfg.training.text_encoder_use_attention_mask
        self.cache: dict[str, torch.Tensor] | None = None if models.text_trains else {}

    @property
    def trains(self) -> bool:
        """Whether the text side trains (then prompts are encoded inside every step)."""
        return self.cache is None

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tok = self.models.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                    return_tensors="pt")
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device) if self.use_mask else None

    def embed(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.models.text_encoder(ids, attention_mask=mask)[0]

    def _encode_sdxl(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's conditioning, as its pipeline builds it: the penultimate hidden states of both encoders side by
        side, and the second encoder's pooled, projected embedding."""
        states, pooled = [], None
        for tokenizer, encoder in ((self.models.tokenizer, self.models.text_encoder),
                                   (self.models.tokenizer_2, self.models.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(_device_of(encoder))
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].to(self.device))
            pooled = out[0].to(self.device)
        return torch.cat(states, dim=-1), pooled

    def _encode(self, prompts: list[str]):
        if self.models.text_encoder_2 is not None:
            return self._encode_sdxl(prompts)
        ids, mask = self.tokens(prompts)
        # a frozen encoder may live on the CPU (training.offload): it reads and answers there
        device = _device_of(self.models.text_encoder)
        return self.embed(ids.to(device), None if mask is None else mask.to(device)).to(self.device)

    def conditioning(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a step needs of its prompts: token ids (and mask) when the text side trains, else embeddings."""
        return self.tokens(prompts) if self.trains else (self(prompts), None)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.cache is None:
            return self._encode(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with torch.no_grad():
                encoded = self._encode(missing)
                parts = encoded if isinstance(encoded, tuple) else (encoded,)
                for i, p in enumerate(missing):
                    self.cache[p] = tuple(part[i] for part in parts)
        stacked = tuple(torch.stack([self.cache[p][k] for p in prompts]) for k in range(len(self.cache[prompts[0]])))
        return stacked if len(stacked) > 1 else stacked[0]


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
