"""The one typed training config: its sections, every key's type, default, range and CLI flag, and the checks
across keys.

Every option is declared once, as a field below. Its CLI flag is `--<field name>` unless the field's
`flags` extra names others (the names diffusers' `train_dreambooth.py` uses come first). Reading a config file
and the flags into it is `config_file.load_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# accelerate's trackers (accelerate.utils.LoggerType); "all" means every one that is installed.
TRACKERS = ("tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab", "aim", "all",
            "none")
DEFAULT_MAX_TRAIN_STEPS = 800
# training.optimizer's kinds; what builds each is training.components.OPTIMIZERS.
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "lion")
# Prodigy's own lr is a multiplier of the step size it estimates, best left at 1.0 (its README). Its README tunes
# that estimate with d_coef between 0.1 and 10, so a multiplier outside the same band is taken for what it almost
# always is: an AdamW rate (1e-4 .. 1e-6) carried over, with which Prodigy would barely move the weights.
PRODIGY_LR_BAND = (0.1, 10.0)


def opt(default: Any, help: str, *flags: str, valued: bool = False, **kw: Any) -> Any:
    """A config field with its help text and, when they differ from `--<name>`, its CLI flags.

    `valued`: a switch that also takes a value (`--flag=True`, `--flag false`), as diffusers' `type=bool` flags are
    written in their commands.
    """
    extra = {"flags": list(flags)} if flags else {}
    if valued:
        extra["valued"] = True
    return Field(default, description=help, json_schema_extra=extra or None, **kw)


class Section(BaseModel):
    # allow_inf_nan=False: NaN compares false with every bound, so `gt=0` alone would let `learning_rate: .nan`
    # through; a non-finite value is refused as "not a finite number" instead.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(Section):
    pretrained_model: str | None = opt(
        None, "Base model: a local diffusers folder (or a hub id on a connected machine): SD 1.x, SD 2.x (epsilon or "
        "v-prediction) or SDXL, told apart by the folder (SDXL's has text_encoder_2).",
        "--pretrained_model_name_or_path", "--pretrained_model")
    revision: str | None = opt(None, "Hub revision of the base model.")
    variant: str | None = opt(None, "Weight variant of the base model files, e.g. fp16.")
    tokenizer_name: str | None = opt(None, "A tokenizer folder to use instead of the model's own.")
    pretrained_vae: str | None = opt(
        None, "A VAE folder (or hub id) to use instead of the base model's, e.g. an fp16-safe SDXL VAE; class images, "
        "training, validation and the saved model all use it.", "--pretrained_vae_model_name_or_path")
    method: Literal["full", "lora"] = opt(
        "full", "'full' fine-tunes the UNet weights (strongest identity); 'lora' trains low-rank adapters (light "
        "files, less memory, many subjects).")
    train_denoiser: bool = opt(
        True, "Train the denoiser: the UNet (SD, SDXL) or the transformer (Flux, SD3); off trains only the text side. "
        "Was model.train_unet, which config files may still say.", "--train_denoiser", "--train_unet")
    train_text_encoder: bool = opt(
        False, "Also train the text encoder (the whole of it, or LoRA adapters on it with method lora), at "
        "training.text_encoder_lr; for SDXL, both text encoders.")
    enable_xformers_memory_efficient_attention: bool = opt(
        False, "Use xformers attention (must be installed); PyTorch SDPA is used otherwise.")
    quantize_base: Literal["nf4"] | None = opt(
        None, "LoRA: keep the frozen denoiser in 4 bits (NF4, bitsandbytes; CUDA only), computing in the run's "
        "precision, as QLoRA; the adapters train in fp32. Saves most of a large transformer's memory (Flux's 12 B).")
    bnb_quantization_config_path: Path | None = opt(
        None, "LoRA: a JSON file of bitsandbytes settings for the frozen denoiser (diffusers' BitsAndBytesConfig "
        "arguments, e.g. {\"load_in_4bit\": true, \"bnb_4bit_quant_type\": \"nf4\"}), as diffusers' Flux script reads "
        "it; the compute dtype is the run's precision. Instead of --quantize_base.")


# The adapter kinds `--method lora` trains, all through peft (README, "Adapters"): plain LoRA; DoRA (LoRA with a
# learned magnitude per output, Liu et al. 2024), saved in diffusers' LoRA file; LoKr (a Kronecker product of two
# factors) and LoHa (a Hadamard product of two low-rank products, FedPara), saved in LyCORIS' layout.
ADAPTERS = ("lora", "dora", "lokr", "loha")


class LoraSection(Section):
    adapter: Literal[ADAPTERS] = opt(  # type: ignore[valid-type]
        "lora", "Adapter kind with --method lora: lora; dora (diffusers' --use_dora: LoRA plus a learned magnitude per "
        "output; diffusers' LoRA file); lokr or loha (LyCORIS' LoKr and LoHa, saved in LyCORIS' layout, which A1111, "
        "Forge and ComfyUI read; SD 1.x, 2.x and SDXL).")
    lokr_factor: int = opt(
        -1, "LoKr: the size of the Kronecker product's first factor (peft's decompose_factor, LyCORIS' factor); -1 "
        "splits each layer as near a square as it allows.", ge=-1)
    rank: int = opt(4, "LoRA rank.", "--rank", "--lora_rank", ge=1)
    alpha: float | None = opt(None, "LoRA alpha (default: the rank, a scale of 1).", "--lora_alpha", gt=0)
    dropout: float = opt(0.0, "Dropout on the LoRA path.", "--lora_dropout", ge=0, lt=1)
    denoiser_target_modules: list[str] | None = opt(
        None, "The denoiser's (UNet's or transformer's) modules that get adapters (repeatable flag; default: the "
        "family's: to_q, to_k, to_v, to_out.0 for SD and SDXL, diffusers' script's for Flux and SD3). Was "
        "lora.unet_target_modules, which config files may still say.", "--lora_target", "--lora_unet_target")
    layers: str | None = opt(
        None, "The denoiser's modules that get adapters, comma-separated, as diffusers' --lora_layers (e.g. "
        "'attn.to_k,attn.to_q,attn.to_v,attn.to_out.0'); replaces denoiser_target_modules.", "--lora_layers")
    blocks: str | None = opt(
        None, "SD3: only these transformer blocks get adapters, comma-separated indices, as diffusers' "
        "--lora_blocks (e.g. '12,13,14').", "--lora_blocks")
    text_encoder_target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "out_proj"], "Text-encoder modules that get adapters with "
        "--train_text_encoder (repeatable flag).", "--lora_text_encoder_target")

    @field_validator("lokr_factor")
    @classmethod
    def _a_factor_or_minus_one(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 is no factor; give -1 (each layer split as near a square as it allows) or a size >= 1")
        return v


class TokenSection(Section):
    identifier: str | None = opt(
        None, "The subject's identifier: a new token such as '<saya_token>' (added and trained; for SDXL in both "
        "tokenizers and encoders) or an existing rare token such as 'sks'. Unset: the word(s) of the instance prompt "
        "that the class prompt lacks.")
    initializer: str | None = opt(
        None, "Word whose embedding initialises a new identifier token (default: the class word).")
    class_word: str | None = opt(None, "The class word, e.g. 'dog' or 'girl'; fills {class_word} in prompts.")
    t5_new_token: bool = opt(
        False, "Flux and SD3: add a new identifier token to T5 too (its row initialised from the initializer and "
        "trained, as in the CLIP encoders); otherwise T5 reads the identifier as its pieces. Costs T5's forward and "
        "backward every step (its prompts are no longer cached).", "--t5_new_token", "--enable_t5_ti")


class DatasetSection(Section):
    instance_dir: Path = opt(Path("data/instance"), "Folder of 3-10 photos of the subject.", "--instance_data_dir")
    class_dir: Path | None = opt(Path("data/class"), "Folder of class images for prior preservation.",
                                 "--class_data_dir")
    instance_prompt: str | None = opt(
        None, "Prompt for the subject's photos; default prompts/instance.txt or "
        "'a photo of {identifier} {class_word}'.")
    class_prompt: str | None = opt(
        None, "Prompt for class images; default prompts/class.txt or 'a photo of a {class_word}'.")
    with_prior_preservation: bool | None = opt(
        None, "Train on class images too, to keep the class prior. Unset: on when the config file names "
        "dataset.class_dir, off otherwise (with flags alone, as in diffusers' script).")
    num_class_images: int = opt(100, "Class images wanted; missing ones are generated by the base model.", ge=1)
    sample_batch_size: int | None = opt(None, "Batch size for generating class images (default: 16 on a GPU; on "
                                        "the CPU 16 up to 256 px, 4 at 512 px).", ge=1)
    class_inference_steps: int = opt(30, "Denoising steps per generated class image.", ge=1)
    prior_generation_precision: Literal["fp32", "fp16", "bf16"] | None = opt(
        None, "Precision for class-image generation (default: fp16 on GPU, fp32 on CPU).")
    center_crop: bool = opt(False, "Center-crop images to the resolution (default: random crop).")
    random_flip: bool = opt(False, "Randomly flip images horizontally.")
    strict: bool = opt(False, "Refuse to train when any image in the folders is rejected.")
    caption_extension: str = opt(
        ".txt", "A photo's own caption is the file of this extension beside it (NAME.txt for NAME.png, kohya's "
        "convention); it must contain the identifier ({identifier} and {class} are filled in). Photos without one "
        "train on the instance prompt.", pattern=r"^\.[A-Za-z0-9_-]+$")
    dataset_name: str | None = opt(
        None, "As diffusers' --dataset_name: a local folder in the `datasets` imagefolder layout (photos and a "
        "metadata.jsonl with file_name and a caption column); it is the instance folder. Hub datasets are not read.")
    caption_column: str | None = opt(
        None, "The metadata.jsonl column holding each photo's caption (diffusers' --caption_column); unset: caption "
        "files, else the instance prompt.")
    caption_dropout: float = opt(
        0.0, "Share of instance examples trained on an empty caption (kohya's --caption_dropout_rate), drawn per "
        "example and epoch.", "--caption_dropout", "--caption_dropout_rate", ge=0, lt=1)
    enable_bucket: bool = opt(
        False, "Aspect-ratio buckets: each photo keeps its shape, cropped to the bucket nearest its aspect ratio "
        "(about the square resolution's pixel count); a batch comes from one bucket (kohya's --enable_bucket).")
    min_bucket_reso: int | None = opt(None, "Least bucket side in pixels (default: half the resolution).", ge=8)
    max_bucket_reso: int | None = opt(None, "Most bucket side in pixels (default: twice the resolution).", ge=8)
    bucket_reso_steps: int = opt(64, "Bucket sides are multiples of this (kohya's default 64; a multiple of 8, of 16 "
                                 "for Flux and SD3).", ge=8)

    def bucket_range(self, resolution: int) -> tuple[int, int]:
        """The least and most bucket side: as set, else half and twice the resolution."""
        return self.min_bucket_reso or resolution // 2, self.max_bucket_reso or resolution * 2
    masked_loss: bool = opt(
        False, "Weight each photo's loss by its mask, so that what is black in it (a background) is not learned: "
        "NAME.mask.png beside NAME.png (white learn, black ignore), else the photo's alpha channel; photos without "
        "either, and class images, are learned everywhere. kohya's --masked_loss and --alpha_mask both turn it on.",
        "--masked_loss", "--alpha_mask")

    @field_validator("prior_generation_precision", mode="before")
    @classmethod
    def _no_means_fp32(cls, v: Any) -> Any:
        return "fp32" if v == "no" else v


class TrainingSection(Section):
    resolution: int = opt(512, "Training resolution in pixels (images are resized and cropped to it).", ge=8)
    batch_size: int = opt(1, "Instance images per step (as many class images are added).",
                          "--train_batch_size", "--batch_size", ge=1)
    gradient_accumulation_steps: int = opt(1, "Batches accumulated per optimizer step.", ge=1)
    learning_rate: float = opt(5e-6, "Learning rate of the UNet.", gt=0)
    text_encoder_lr: float | None = opt(None, "Learning rate of the text side: the text encoder(s) and a new token's "
                                        "embedding rows, SDXL's two included (default: learning_rate).", gt=0)
    scale_lr: bool = opt(False, "Multiply learning rates by accumulation x batch size x processes.")
    max_train_steps: int | None = opt(None, f"Optimizer steps (default {DEFAULT_MAX_TRAIN_STEPS} unless "
                                      "num_train_epochs is set).", gt=0)
    num_train_epochs: int | None = opt(None, "Epochs to train when max_train_steps is not set.", gt=0)
    prior_loss_weight: float = opt(1.0, "Weight of the class (prior) loss.", ge=0)
    lr_scheduler: Literal[LR_SCHEDULERS] = opt("constant", "Learning-rate schedule.")  # type: ignore[valid-type]
    lr_warmup_steps: int = opt(0, "Warm-up steps of the schedule.", ge=0)
    lr_num_cycles: int = opt(1, "Hard restarts of cosine_with_restarts.", ge=1)
    lr_power: float = opt(1.0, "Power of the polynomial schedule.", gt=0)
    optimizer: Literal[OPTIMIZERS] = opt(  # type: ignore[valid-type]
        "adamw", "adamw: torch's AdamW (fused kernel); adamw8bit: bitsandbytes' 8-bit AdamW (must be installed); "
        "prodigy: Prodigy (prodigyopt), which estimates its own step size: keep learning_rate at 1.0; lion: Lion "
        "(lion-pytorch), sign updates with betas adam_beta1/adam_beta2 (its paper uses 0.9/0.99): users typically "
        "take a learning rate 3-10x below AdamW's and a weight decay as much above. Any case, as diffusers' "
        "--optimizer AdamW.")
    use_8bit_adam: bool = opt(False, "8-bit AdamW from bitsandbytes (must be installed): --optimizer adamw8bit, as "
                              "diffusers' flag.")
    adam_beta1: float = opt(0.9, "AdamW beta1 (Prodigy's and Lion's beta1 too).", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW beta2 (Prodigy's and Lion's beta2 too).", ge=0, lt=1)
    adam_weight_decay: float = opt(1e-2, "Weight decay of every optimizer (never applied to a new token's "
                                   "embedding).", ge=0)
    adam_weight_decay_text_encoder: float | None = opt(
        None, "Weight decay of the text side (default: adam_weight_decay).", ge=0)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon (Prodigy's too).", gt=0)
    # Prodigy's settings, with the names and defaults of diffusers' DreamBooth scripts (which differ from
    # prodigyopt's own: bias correction and the warm-up safeguard are on there, as diffusers advises for diffusion).
    prodigy_beta3: float | None = opt(
        None, "Prodigy: coefficient of the running averages of its step-size estimate (default: sqrt(adam_beta2)).",
        ge=0, lt=1)
    prodigy_decouple: bool = opt(True, "Prodigy: AdamW-style decoupled weight decay (default: on, as in diffusers).",
                                 valued=True)
    prodigy_use_bias_correction: bool = opt(
        True, "Prodigy: Adam's bias correction (default: on, as in diffusers' DreamBooth scripts).", valued=True)
    prodigy_safeguard_warmup: bool = opt(
        True, "Prodigy: leave the learning rate out of the step-size estimate's denominator, against trouble in a "
        "warm-up (default: on, as in diffusers' DreamBooth scripts).", valued=True)
    prodigy_d_coef: float = opt(
        1.0, "Prodigy: multiplies its step-size estimate; Prodigy's README tunes this instead of the learning rate "
        "(2 or 10 for larger steps, 0.5 or 0.1 for smaller).", gt=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.", gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = opt(
        "no", "Mixed precision: trainable weights stay fp32, frozen modules run in this precision.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    allow_tf32: bool = opt(True, "TF32 matmuls and convolutions on Ampere and newer GPUs (--no-allow_tf32: off).")
    snr_gamma: float | None = opt(None, "Min-SNR-gamma loss weighting (5.0 is the paper's value).", gt=0)
    noise_offset: float = opt(0.0, "Offset-noise strength (--offset_noise sets 0.1).", ge=0)
    seed: int | None = opt(None, "Random seed (default: drawn and recorded in the run folder).", ge=0, lt=2**32)
    dataloader_num_workers: int = opt(0, "Data-loading worker processes.", ge=0)
    latent_cache: Literal["memory", "disk", "off"] = opt(
        "memory", "Encode each augmented image once and reuse its VAE latents: in device memory, on disk "
        "(output_dir/latent_cache, for large class sets), or off.")
    compile: bool = opt(False, "torch.compile the UNet's forward; GPU only, pays off on long runs.",
                        "--torch_compile")
    channels_last: bool = opt(False, "Run the UNet in channels-last memory format (faster on some GPUs).")
    cuda_graph: Literal["auto", "on", "off"] = opt(
        "auto", "Capture the whole training step (forward, backward, clipping, AdamW) as a CUDA graph and replay it, "
        "so that Python's kernel launches stop costing time. auto: on where valid (one CUDA process, bf16 or fp32, "
        "torch AdamW, no --torch_compile), with one line saying why not otherwise; on: refuse to start where it is "
        "not valid.")
    offload_frozen: Literal["auto", "on", "off"] = opt(
        "auto", "Move frozen modules off the GPU once their outputs are cached, to save its memory: the text encoders "
        "after the prompts are encoded (when the text side is frozen), the VAE after every view a batch can hold is "
        "encoded (latent cache on, and a centre crop or photos square at the resolution). They come back for "
        "validation. auto: on CUDA; on: also pre-encode on a CPU; off: keep them resident.")
    cpu_convolution: Literal["auto", "onednn", "native"] = opt(
        "auto", "Convolution kernels when training on a CPU: oneDNN's, or PyTorch's native ones (im2col + GEMM), "
        "which are faster for few, small latents. auto: native when images per step x latent pixels <= 1024 "
        "(e.g. 1 instance + 1 class image at 128 px with SD's VAE), oneDNN otherwise. No effect on a GPU.")
    tokenizer_max_length: int | None = opt(None, "Token length of prompts (default: the tokenizer's, 77).", ge=2)
    max_sequence_length: int | None = opt(
        None, "Flux and SD3: token length of the T5 prompt (default, as diffusers' scripts: Flux 512 with LoRA and 77 "
        "fully fine-tuned, SD3 77; CLIP reads 77 whatever this is).", ge=1, le=512)
    # The flow-matching objective (Flux, SD3; training.flow), with diffusers' flag names and meanings. Unset: the
    # family's default as diffusers' DreamBooth scripts have it.
    weighting_scheme: Literal["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"] | None = opt(
        None, "Flux and SD3: how timesteps are drawn (logit_normal, mode: their densities; others uniform) and the "
        "loss weighted (sigma_sqrt, cosmap), as diffusers' --weighting_scheme (default: none for Flux, logit_normal "
        "for SD3).")
    logit_mean: float = opt(0.0, "Mean of the logit_normal timestep density.")
    logit_std: float = opt(1.0, "Standard deviation of the logit_normal timestep density.", gt=0)
    mode_scale: float = opt(1.29, "Scale of the mode timestep density.")
    timestep_sampling: Literal["uniform", "sigmoid", "shift", "flux_shift"] | None = opt(
        None, "Flux and SD3: kohya's timestep sampling instead of --weighting_scheme's density: uniform, sigmoid "
        "(of a normal draw times --sigmoid_scale), shift (sigmoid, then --discrete_flow_shift), flux_shift (shifted by "
        "the image's token count, as Flux's scheduler at inference).")
    sigmoid_scale: float = opt(1.0, "Scale of the normal draw of --timestep_sampling sigmoid and shift.", gt=0)
    discrete_flow_shift: float = opt(3.0, "Shift of --timestep_sampling shift.", gt=0)
    precondition_outputs: int | None = opt(
        None, "SD3: 1 trains on the prediction turned into x0 (model_pred * -sigma + noisy) against the latents, 0 on "
        "the velocity, as diffusers' --precondition_outputs (default: 1 for SD3, 0 for Flux).", ge=0, le=1)
    guidance_scale: float | None = opt(
        None, "Flux.1 dev: the guidance the transformer's guidance embedding reads during training (default 3.5, as "
        "diffusers' scripts). Flux.1 schnell has no guidance embedding.", ge=0)
    # An exponential moving average (EMA) of the trained weights (training.ema), with the schedule of diffusers'
    # EMAModel: the decay ramps up as (1 + t) / (10 + t) and ema_decay caps it. 0.999 rather than EMAModel's 0.9999:
    # a DreamBooth run is a few hundred to a few thousand steps, where the ramp decides either way (it reaches 0.999
    # only after ~9,000 steps), and past that a 1,000-step horizon fits the run where 0.9999's 10,000 would be most of
    # it. A constant 0.9999 from step 1 would leave 92% of the average on the first step's weights after 800 steps.
    use_ema: bool = opt(
        False, "Keep an exponential moving average (EMA) of the trained weights (the whole trained model, or the LoRA "
        "adapters, and a new token's rows), updated after each optimizer step; validation, checkpoints and the final "
        "model or LoRA hold the EMA weights.")
    ema_decay: float = opt(
        0.999, "The EMA's largest decay: each update's is min(ema_decay, (1 + t) / (10 + t)), t the updates before it, "
        "as in diffusers' EMAModel, so a short run averages over about its last ninth.", gt=0, lt=1)
    ema_on_cpu: bool = opt(
        False, "Keep the EMA in CPU memory instead of beside the weights on the GPU; each update then moves it to "
        "the GPU and back one tensor at a time.", "--ema_on_cpu", "--offload_ema")
    ema_update_after_step: int = opt(
        0, "Optimizer steps before the EMA starts averaging; until then it follows the trained weights.", ge=0)
    ema_warmup: bool = opt(
        False, "The EMA's decay ramps up as 1 - (1 + t)^(-2/3) instead (diffusers' use_ema_warmup, inv_gamma 1, "
        "power 2/3), still at most ema_decay.")
    text_encoder_use_attention_mask: bool = opt(False, "Pass the attention mask to the text encoder.")
    set_grads_to_none: bool = opt(True, "Free gradients instead of zeroing them (always on; accepted for diffusers).")
    pre_compute_text_embeddings: bool = opt(False, "Accepted for diffusers compatibility.")

    @field_validator("optimizer", mode="before")
    @classmethod
    def _any_case(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v  # diffusers' commands say AdamW, adamW or prodigy

    @property
    def optimizer_kind(self) -> str:
        """The optimizer that trains: training.optimizer, or adamw8bit where diffusers' --use_8bit_adam asks for it
        beside adamw (the default)."""
        return "adamw8bit" if self.use_8bit_adam and self.optimizer == "adamw" else self.optimizer


class ValidationSection(Section):
    prompts: list[str] = opt([], "Prompts sampled every validation.steps (repeatable flag).", "--validation_prompt")
    steps: int = opt(100, "Sample (and score the validation loss) every N optimizer steps.", "--validation_steps",
                     ge=1)
    loss: bool = opt(
        False, "Score the validation loss every validation.steps: the training loss of fixed noise and timestep draws "
        "on each instance photo (and as many class images), logged beside the training loss and drawn in the run "
        "report; the over-fitting signal. Does not change training.", "--validation_loss")
    loss_draws: int = opt(4, "Noise and timestep draws per image of the validation loss.", "--validation_loss_draws",
                          ge=1)
    num_images: int = opt(4, "Images per validation prompt.", "--num_validation_images", ge=1)
    negative_prompt: str = opt("", "Negative prompt for validation images.", "--validation_negative_prompt")
    num_inference_steps: int = opt(25, "Denoising steps of validation images.", "--validation_inference_steps", ge=1)
    guidance_scale: float | None = opt(
        None, "Guidance of validation images (default: the family's, as `dreambooth generate`: 7.5 for SD 1.x/2.x and "
        "SDXL, 3.5 for Flux.1 dev, 7.0 for SD3).", "--validation_guidance", ge=0)
    scheduler: str | None = opt(None, "Sampler of validation images (default: DPM-Solver++ for SD 1.x/2.x and SDXL, "
                                "the model's own flow-matching sampler for Flux and SD3).", "--validation_scheduler")
    seed: int = opt(0, "Seed of validation images, so that steps compare.", "--validation_seed", ge=0)
    width: int | None = opt(None, "Width of validation images (default: the training resolution).",
                            "--validation_width", ge=8)
    height: int | None = opt(None, "Height of validation images (default: the training resolution).",
                             "--validation_height", ge=8)
    epochs: int | None = opt(
        None, "Sample every N epochs instead, as diffusers' --validation_epochs (an epoch: one pass over the photos, "
        "as --num_train_epochs counts it); replaces validation.steps.", "--validation_epochs", ge=1)

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_prompt_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class OutputSection(Section):
    output_dir: Path = opt(Path("output"), "Run folder: final model, checkpoints, samples, logs.")
    checkpointing_steps: int = opt(500, "Save a resumable checkpoint every N optimizer steps.", ge=1)
    checkpoints_total_limit: int | None = opt(None, "Keep at most this many checkpoints (the newest).", ge=1)
    resume_from_checkpoint: str | None = opt(None, "Resume from a checkpoint folder, or 'latest'.")
    overwrite_output_dir: bool = opt(
        False, "Replace an earlier run in output_dir (its checkpoints, model and logs; nothing else) once this run "
        "is known to start. Without it, a folder holding another run is refused.")
    logging_dir: Path = opt(Path("logs"), "Log folder, relative to output_dir.")
    report_to: Literal[TRACKERS] | None = opt(  # type: ignore[valid-type]
        None, "Experiment tracker, as in accelerate: tensorboard, wandb, comet_ml, mlflow, ... (must be installed), "
        "all, or none. Unset: TensorBoard when installed. The JSON-lines log is always written.")
    logging_steps: int = opt(10, "Log loss every N optimizer steps (reading the loss syncs the device).", ge=1)
    save_precision: Literal["fp32", "fp16", "bf16"] = opt("fp32", "Precision of the saved final model.")
    skip_save_text_encoder: bool = opt(False, "Do not save the text encoder with the final model.")
    push_to_hub: bool = opt(False, "Upload the output folder (model or LoRA, model card, samples) to the Hugging Face "
                            "hub when training ends; the connection and token are checked before training starts.")
    hub_model_id: str | None = opt(None, "Hub repository to upload to, 'user/name' (default: the output folder's name "
                                   "under your account).")
    # exclude: a token is never written into config.yaml, checkpoints or run_info.json.
    hub_token: str | None = opt(None, "Hub token (default: HF_TOKEN or the token saved by `hf auth login`).",
                                exclude=True, repr=False)


class Subject(Section):
    """One subject of a multi-subject run (config key `subjects`); a single-subject run has one, from token/dataset."""

    identifier: str | None = None
    class_word: str | None = None
    initializer: str | None = None
    instance_dir: Path
    class_dir: Path | None = None
    instance_prompt: str | None = None
    class_prompt: str | None = None


class Config(BaseModel):
    """The resolved training config: the sections model/token/training/dataset of docs/design.md ("The config
    file"), plus lora, validation, output and subjects."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    # How loading resolved what the user left unset, for the pre-flight report ("prior preservation: on, because
    # ..."); not part of the recorded config.
    _notes: list[str] = PrivateAttr(default_factory=list)
    # The base model's family (models.families), read once from its model_index.json at pre-flight.
    _family: Any = PrivateAttr(default=None)

    def family(self):
        """The base model's models.families.Family: as pre-flight read it, else read now (a UserError when the
        model's files do not tell)."""
        if self._family is None:
            from dreambooth.models.base import detect_family

            found = detect_family(self.model.pretrained_model, self.model.revision, self.output.hub_token)
            if found is None:
                from dreambooth.errors import UserError

                raise UserError(f"model.pretrained_model: cannot tell the model family of {self.model.pretrained_model}"
                                " (no readable model_index.json, or a pipeline this tool does not train). Pass a "
                                "diffusers folder of SD 1.x/2.x, SDXL, Flux.1 or SD3.")
            self._family = found
        return self._family

    def set_family(self, family) -> None:
        self._family = family

    @property
    def notes(self) -> list[str]:
        """What reading the config decided for the user (e.g. prior preservation on, and why), for the report."""
        return self._notes

    @notes.setter
    def notes(self, notes: list[str]) -> None:
        self._notes = list(notes)
    model: ModelSection = ModelSection()
    token: TokenSection = TokenSection()
    training: TrainingSection = TrainingSection()
    dataset: DatasetSection = DatasetSection()
    lora: LoraSection = LoraSection()
    validation: ValidationSection = ValidationSection()
    output: OutputSection = OutputSection()
    subjects: list[Subject] = Field([], description="Several subjects trained in one run, sampled in balance.")

    def subject_list(self) -> list[Subject]:
        """The subjects to train: the `subjects` list, or the one that token/dataset describe."""
        if self.subjects:
            return self.subjects
        t, d = self.token, self.dataset
        return [Subject(identifier=t.identifier, class_word=t.class_word, initializer=t.initializer,
                        instance_dir=d.instance_dir, class_dir=d.class_dir, instance_prompt=d.instance_prompt,
                        class_prompt=d.class_prompt)]


SECTION_TYPES: dict[str, type[Section]] = {
    name: field.annotation for name, field in Config.model_fields.items()  # type: ignore[misc]
    if isinstance(field.annotation, type) and issubclass(field.annotation, Section)
}


# Keys renamed when the families beyond the UNet came (the denoiser may be a transformer), by their old dotted names:
# a config file or checkpoint written before still reads.
RENAMED_KEYS = {"model.train_unet": "model.train_denoiser", "lora.unet_target_modules": "lora.denoiser_target_modules"}


def field_flags(section: str, name: str) -> list[str]:
    """The CLI flags of one config field."""
    extra = SECTION_TYPES[section].model_fields[name].json_schema_extra or {}
    return list(extra.get("flags", [])) or [f"--{name}"]


def all_keys() -> list[str]:
    return [f"{s}.{f}" for s, t in SECTION_TYPES.items() for f in t.model_fields]


def _truthy(value: Any) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on") if isinstance(value, str) else bool(value)


def _check_subjects(subjects: list, prior: bool) -> list[str]:
    """Each listed subject needs its photos and prompts; subjects sharing a class folder share its prompt."""
    problems, class_prompts, identifiers = [], {}, set()
    for i, s in enumerate(subjects):
        key = f"subjects[{i}]"
        if not isinstance(s, dict):
            continue  # reported by validation
        if not s.get("instance_prompt"):
            problems.append(f"{key}.instance_prompt: no instance prompt; set it, or identifier and class_word")
        if prior and not s.get("class_dir"):
            problems.append(f"{key}.class_dir: prior preservation is on but this subject has no class folder")
        if prior and not s.get("class_prompt"):
            problems.append(f"{key}.class_prompt: prior preservation is on but this subject has no class prompt; "
                            "set it or class_word")
        folder, prompt = s.get("class_dir"), s.get("class_prompt")
        if prior and folder and class_prompts.setdefault(folder, prompt) != prompt:
            problems.append(f"{key}.class_dir: {folder} is shared with another subject whose class prompt differs; "
                            "give each class prompt its own folder")
        if s.get("identifier") in identifiers:
            problems.append(f"{key}.identifier: '{s['identifier']}' names two subjects; give each its own")
        identifiers.add(s.get("identifier"))
    return problems


def cross_check(data: dict[str, Any]) -> list[str]:
    """Problems between keys, found on the merged raw values so that they are reported with the type errors."""
    model, ds, tok = (data.get(k) or {} for k in ("model", "dataset", "token"))
    problems = []
    if not model.get("pretrained_model"):
        problems.append("model.pretrained_model: no base model given; set it in config.yaml or pass "
                        "--pretrained_model_name_or_path PATH (a diffusers folder)")
    prior = _truthy(ds.get("with_prior_preservation", False))
    subjects = data.get("subjects") or []
    if subjects:
        problems += _check_subjects(subjects, prior)
    else:
        if prior and ds.get("class_dir", "data/class") is None:
            problems.append("dataset.class_dir: prior preservation is on but no class folder is set")
        if prior and not ds.get("class_prompt"):
            problems.append("dataset.class_prompt: prior preservation is on but no class prompt is set; pass "
                            "--class_prompt 'a photo of a dog', write prompts/class.txt or set token.class_word")
        if not ds.get("instance_prompt"):
            problems.append("dataset.instance_prompt: no instance prompt; pass --instance_prompt 'a photo of sks "
                            "dog', write prompts/instance.txt or set token.identifier and token.class_word")
    if prior and not subjects and ds.get("class_dir") and ds.get("class_dir") == ds.get("instance_dir"):
        problems.append(f"dataset.class_dir: {ds['class_dir']} is also the instance folder; generated class images "
                        "would be trained as photos of the subject. Give class images a folder of their own")
    ident, out = tok.get("identifier"), data.get("output") or {}
    if out.get("resume_from_checkpoint") and _truthy(out.get("overwrite_output_dir", False)):
        problems.append("output.overwrite_output_dir: it replaces the earlier run in output_dir, while "
                        "output.resume_from_checkpoint continues it; pass one of them")
    if _truthy(out.get("skip_save_text_encoder", False)) and isinstance(ident, str) and ident.startswith("<"):
        problems.append(f"output.skip_save_text_encoder: the new token '{ident}' lives in the text encoder's "
                        "embedding; skipping the text encoder would lose it")
    if not (_truthy(model.get("train_denoiser", True)) or _truthy(model.get("train_text_encoder", False))):
        problems.append("model.train_denoiser: nothing would train (denoiser and text encoder both off)")
    return problems + _check_ema(data.get("training") or {}) + _check_adapter(model, data.get("lora") or {})


EMA_SETTINGS = ("ema_decay", "ema_on_cpu", "ema_update_after_step", "ema_warmup")


def _differs(value: Any, default: Any) -> bool:
    """Whether a raw value (YAML's, or a flag's string) asks for something other than the default."""
    if isinstance(default, bool):
        return _truthy(value) != default
    try:
        return float(value) != float(default)
    except (TypeError, ValueError):
        return False  # not a number: validation reports it


def _check_ema(training: dict[str, Any]) -> list[str]:
    """A setting of the EMA without the EMA would be silently ignored."""
    if not isinstance(training, dict) or _truthy(training.get("use_ema", False)):
        return []
    fields = TrainingSection.model_fields
    return [f"training.{key}: it is a setting of the EMA of the weights, but training.use_ema is off, so no EMA is "
            f"kept; pass --use_ema too, or drop {field_flags('training', key)[0]}"
            for key in EMA_SETTINGS if key in training and _differs(training[key], fields[key].default)]


PRODIGY_KEYS = ("prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup",
                "prodigy_d_coef")


def optimizer_problems(t: TrainingSection, given: set[str], broken: set[str]) -> list[str]:
    """Optimizer settings that contradict each other or would be silently ignored. `given`: the dotted keys set on
    the command line; `broken`: keys with a problem of their own, whose value is only the default standing in."""
    kind, problems = t.optimizer_kind, []
    if "training.optimizer" in broken:
        return problems
    if t.use_8bit_adam and kind not in ("adamw", "adamw8bit"):
        # diffusers warns and trains with its --optimizer; here the two are a contradiction to settle
        problems.append(f"training.use_8bit_adam: --use_8bit_adam asks for 8-bit AdamW and training.optimizer is "
                        f"{kind}. Drop --use_8bit_adam to train with {kind}, or pass --optimizer adamw8bit for 8-bit "
                        "AdamW.")
    ignored = [k for k in PRODIGY_KEYS if f"training.{k}" in given
               or getattr(t, k) != TrainingSection.model_fields[k].default]
    if kind != "prodigy" and ignored:
        flags, one = ", ".join(f"--{k}" for k in ignored), len(ignored) == 1
        problems.append(f"training.{ignored[0]}: {flags} {'sets' if one else 'set'} Prodigy, and training.optimizer "
                        f"is {kind}, which would train without {'it' if one else 'them'}. Drop {flags}, or pass "
                        "--optimizer prodigy (with --learning_rate 1.0).")
    if kind == "prodigy":
        problems += _prodigy_rates(t, broken)
    return problems


def _prodigy_rates(t: TrainingSection, broken: set[str]) -> list[str]:
    """Prodigy's learning rate multiplies the step size it estimates: near 1.0, and one for every group."""
    low, high = PRODIGY_LR_BAND
    problems = []
    if "training.learning_rate" not in broken and not low <= t.learning_rate <= high:
        problems.append(f"training.learning_rate: {t.learning_rate:g} with --optimizer prodigy. Prodigy estimates its "
                        "own step size and multiplies it by the learning rate, which its authors advise to leave at "
                        f"1.0; {t.learning_rate:g} looks like an AdamW rate and would "
                        f"{'barely move the weights' if t.learning_rate < low else 'make every step far too large'}. "
                        "Pass --learning_rate 1.0 (to tune Prodigy's step, --prodigy_d_coef, e.g. 0.5 or 2).")
    if not {"training.learning_rate", "training.text_encoder_lr"} & broken and t.text_encoder_lr != t.learning_rate:
        # diffusers sets the text side's rate to learning_rate with a warning; prodigyopt itself refuses groups with
        # different rates (at the first step, after the weights loaded)
        problems.append(f"training.text_encoder_lr: {t.text_encoder_lr:g} differs from training.learning_rate "
                        f"{t.learning_rate:g}, and Prodigy steps every parameter group with one learning rate. Drop "
                        "--text_encoder_lr (it then follows --learning_rate).")
    return problems


def _check_adapter(model: dict, lora: dict) -> list[str]:
    """Adapter settings that would mean nothing: an adapter kind on a full fine-tune, LoKr's factor on another kind,
    a dropout LoKr and LoHa do not have."""
    adapter, problems = lora.get("adapter", "lora"), []
    if adapter != "lora" and model.get("method", "full") != "lora":
        problems.append(f"lora.adapter: {adapter} is an adapter that --method lora trains, and model.method is "
                        f"{model.get('method', 'full')} (the whole weights train); pass --method lora with it, or "
                        "drop --adapter")
    if str(lora.get("lokr_factor", -1)) != "-1" and adapter != "lokr":
        problems.append(f"lora.lokr_factor: it sizes LoKr's factors, and lora.adapter is {adapter}; drop "
                        "--lokr_factor, or pass --adapter lokr")
    try:
        dropout = float(lora.get("dropout", 0) or 0)
    except (TypeError, ValueError):
        dropout = 0.0  # reported by validation
    if adapter in ("lokr", "loha") and dropout > 0:
        problems.append(f"lora.dropout: {adapter} has no dropout on its path as LoRA has (peft's rank and module "
                        "dropout are other things); drop --lora_dropout")
    return problems


def lora_denoiser_targets(cfg: Config) -> list[str]:
    """The denoiser's LoRA target modules: --lora_layers, else lora.denoiser_target_modules, else the family's; with
    SD3's --lora_blocks, each only in those transformer blocks (as diffusers' SD3 script builds them)."""
    if cfg.lora.layers:
        targets = [t.strip() for t in cfg.lora.layers.split(",") if t.strip()]
    elif cfg.lora.denoiser_target_modules:
        targets = list(cfg.lora.denoiser_target_modules)
    else:
        targets = list(cfg.family().denoiser_lora_targets)
    if cfg.lora.blocks:
        blocks = [b.strip() for b in cfg.lora.blocks.split(",") if b.strip()]
        targets = [f"transformer_blocks.{block}.{t}" for block in blocks for t in targets]
    return targets
