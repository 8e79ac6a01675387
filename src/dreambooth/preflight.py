"""Everything checked before any weights load: model, images, identifier, prompts, output folder, class images,
validation sampler, tracker and upload. Every problem is collected and reported at once, then one report."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth import errors
from dreambooth.config import Config, Subject, lora_denoiser_targets
from dreambooth.config_file import ConfigReading
from dreambooth.errors import UserError
from dreambooth.formats.lycoris import LYCORIS
from dreambooth.models.base import (
    check_model_folder,
    is_hub_id,
    resolve_hub_model,
    weights_identity,
)
from dreambooth.training.buckets import assign_bucket, describe_buckets, make_buckets
from dreambooth.training.captions import Captions, is_companion, read_captions
from dreambooth.training.class_images import ClassImagePlan, plan_class_images, recipe
from dreambooth.training.distributed import fsdp_problems
from dreambooth.training.images import ImageFolderReport, check_instance_folder, load_image, scan_image_folder
from dreambooth.training.masks import MASK_SUFFIX, Masks, is_mask_file, read_masks
from dreambooth.training.rundir import RunPlan, plan_run
from dreambooth.training.tokens import (
    IdentifierPlan,
    load_tokenizer,
    plan_identifier,
    prompt_token_count,
    wants_new_token,
)

# The optimizers' packages: (module, pip name).
OPTIMIZER_PACKAGES = {"prodigy": ("prodigyopt", "prodigyopt"), "lion": ("lion_pytorch", "lion-pytorch")}
# pip names of accelerate's trackers, for the message when one is missing
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "comet_ml": "comet-ml",
                    "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "aim": "aim"}


@dataclass
class SubjectReport:
    """One subject's inputs as checked: its photos and identifier."""

    subject: Subject
    instance: ImageFolderReport
    identifier: IdentifierPlan
    captions: Captions = field(default_factory=Captions)
    masks: Masks = field(default_factory=Masks)
    longest_caption: tuple[int, str] | None = None  # (CLIP tokens, caption)
    buckets: list[tuple[int, int]] = field(default_factory=list)  # each usable photo's (width, height) bucket
    bucket_line: str = ""  # the report's line on them


@dataclass
class Preflight:
    """What training needs to know about its inputs, and the human report of it."""

    subjects: list[SubjectReport]
    prediction_type: str
    base_identity: str
    run_plan: RunPlan
    class_plans: dict[Path, ClassImagePlan] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hub_repo: str | None = None
    family: str | None = None  # models.families: how the model's model_index.json named it

    @property
    def plans(self) -> list[IdentifierPlan]:
        return [s.identifier for s in self.subjects]

    def format(self) -> str:
        lines = ["pre-flight report"]
        for i, s in enumerate(self.subjects):
            if len(self.subjects) > 1:
                lines.append(f"subject {i + 1}: \"{s.subject.instance_prompt}\"")
            lines.append(s.instance.format("instance images"))
            lines.append(s.captions.describe(len(s.instance.usable), s.longest_caption))
            if s.bucket_line:
                lines.append(s.bucket_line)
            masks = s.masks.describe(len(s.instance.usable))
            lines += [masks] if masks else []
            lines.append(s.identifier.describe())
        lines += [plan.describe() for plan in self.class_plans.values()]
        if self.family:
            lines.append(f"model family: {self.family}")
        lines.append(f"prediction type: {self.prediction_type}")
        lines += self.notes
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class Problems(errors.Problems):
    """Every problem found before any weights load, so that one run of the command reports them all: the config's
    own (with the keys they make `broken`) and pre-flight's. A check that reads a broken key is skipped, since its
    value is only the default standing in for what the user wrote."""

    def __init__(self, config: ConfigReading | None = None) -> None:
        super().__init__()
        self.found = list(config.problems) if config else []
        self.broken: set[str] = set(config.broken) if config else set()
        self.where = config.where if config else ""

    def blocked(self, needs: tuple[str, ...]) -> bool:
        """Whether a check that reads these keys ('output.' for a whole section) must wait for them to be fixed."""
        return any(n in self.broken or (n.endswith(".") and any(b.startswith(n) for b in self.broken))
                   for n in needs)

    def check(self, fn: Callable, *args, needs: tuple[str, ...] = (), **kwargs):
        """`fn(*args)`, or None with its UserError recorded; None without calling it when it needs a broken key."""
        return None if self.blocked(needs) else super().check(fn, *args, **kwargs)

    def raise_if_any(self) -> None:
        if not self.found:
            return
        listed = "\n  - ".join(p.replace("\n", "\n    ") for p in self.found)
        if not self.broken:
            raise UserError(f"pre-flight found {len(self.found)} problem(s); nothing was loaded or changed:\n  - "
                            f"{listed}")
        raise UserError(f"the training config{self.where} and its inputs have {len(self.found)} problem(s); nothing "
                        f"was loaded or changed:\n  - {listed}\nFix these (in the YAML or as --flags) and run again.")


def check_runtime(cfg: Config) -> None:
    """Settings the machine or the installed packages cannot honour, found before any weights load."""
    import importlib.util

    import torch

    t = cfg.training
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("training.mixed_precision: fp16 needs a CUDA GPU and none is available; use bf16 or no.")
    if t.compile and not torch.cuda.is_available():
        # Measured with torch 2.13.0+cpu on the tiny UNet: compiled with channels-last, a training step's gradient
        # norm was 1.90 instead of 2.29; compiled alone, one forward and backward left 126 of its 208 parameters
        # without a gradient (torch.compile's "eager" and "aot_eager" backends gave the right ones, so inductor's
        # CPU code is at fault). A run would train silently wrong, and it was slower than eager too (docs/bench.md).
        raise UserError("training.compile (--torch_compile) needs a CUDA GPU and none is available: on a CPU, "
                        "torch.compile's code for the UNet's backward pass computes wrong gradients (measured with "
                        "torch 2.13) and runs slower than without it. Drop --torch_compile.")
    if t.cuda_graph == "on":
        from dreambooth.training.graph_step import graph_obstacles

        device = "cuda" if torch.cuda.is_available() else "cpu"
        found = graph_obstacles(cfg, device, int(os.environ.get("WORLD_SIZE", "1")))
        if found:
            raise UserError("training.cuda_graph is on, but this run's step cannot be captured: " + "; ".join(found)
                            + ". Use --cuda_graph auto (on where it is valid) or off.")
    if t.optimizer_kind == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        flag = "--use_8bit_adam" if t.use_8bit_adam else "--optimizer adamw8bit"
        raise UserError(f"training.{'use_8bit_adam' if t.use_8bit_adam else 'optimizer'}: 8-bit AdamW comes from "
                        f"bitsandbytes, which is not installed; `pip install bitsandbytes` (needs a CUDA GPU) or drop "
                        f"{flag}.")
    package = OPTIMIZER_PACKAGES.get(t.optimizer_kind)
    if package and importlib.util.find_spec(package[0]) is None:  # dependencies of this package: a broken install
        raise UserError(f"training.optimizer: {t.optimizer_kind} needs the {package[1]} package, which is not "
                        f"installed; reinstall dreambooth with its dependencies, or `pip install {package[1]}`.")
    if cfg.model.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise UserError("model.enable_xformers_memory_efficient_attention: xformers is not installed; "
                        "`pip install xformers` or drop the flag (PyTorch SDPA attention is used by default).")


def check_quantization(cfg: Config) -> None:
    """A 4-bit frozen denoiser (--quantize_base, --bnb_quantization_config_path): LoRA only, on CUDA, with
    bitsandbytes, from a readable settings file; every problem at once."""
    import importlib.util

    import torch

    m = cfg.model
    flag = "--quantize_base" if m.quantize_base else "--bnb_quantization_config_path"
    if not (m.quantize_base or m.bnb_quantization_config_path):
        return
    found = []
    if m.quantize_base and m.bnb_quantization_config_path:
        found.append("model.quantize_base and model.bnb_quantization_config_path both say how to quantize the base; "
                     "give one of them.")
    if m.method != "lora":
        found.append(f"model.quantize_base: {flag} keeps the frozen denoiser in 4 bits, and a full fine-tune trains "
                     "the denoiser's own weights. Use it with --method lora, or drop it.")
    if m.bnb_quantization_config_path:
        path = Path(m.bnb_quantization_config_path)
        try:
            settings = json.loads(path.read_text())
            if not isinstance(settings, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            found.append(f"model.bnb_quantization_config_path: {path} does not read as a JSON object of "
                         f"BitsAndBytesConfig arguments ({e}); write e.g. {{\"load_in_4bit\": true, "
                         "\"bnb_4bit_quant_type\": \"nf4\"}.")
    if not torch.cuda.is_available():
        found.append(f"model.quantize_base: {flag} needs a CUDA GPU (bitsandbytes' 4-bit kernels) and none is "
                     "available. Drop it on this machine.")
    elif importlib.util.find_spec("bitsandbytes") is None:
        found.append(f"model.quantize_base: {flag} needs bitsandbytes, which is not installed; `pip install "
                     "bitsandbytes`, or drop it.")
    if found:
        raise UserError("\n".join(found))


def check_base_model(cfg: Config) -> str:
    """The base model must be a diffusers folder or a hub id the hub answers for; returns its prediction type.

    A hub id that the hub cannot serve but the local cache holds is replaced by the cached folder, so that the
    run loads exactly that copy and no library retries the network for it.
    """
    model = cfg.model.pretrained_model
    if is_hub_id(model):
        cfg.model.pretrained_model = resolve_hub_model(model, cfg.model.revision, token=cfg.output.hub_token)
        if cfg.model.pretrained_model == model:
            cfg.family()  # read from the hub's model_index.json, once, before any weights load
            return "epsilon" if cfg.family().objective == "diffusion" else "flow"  # read again with the scheduler
    local = Path(cfg.model.pretrained_model)
    check_model_folder(local, what="model.pretrained_model")
    sched = local / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise UserError(f"model.pretrained_model: {local} has no scheduler/scheduler_config.json; it is not a "
                        "complete diffusers pipeline folder.")
    if cfg.family().objective == "flow":
        return "flow"
    return json.loads(sched.read_text()).get("prediction_type", "epsilon")


def check_family_settings(cfg: Config) -> None:
    """Settings that mean nothing, or something wrong, for the model's family (models.families)."""
    found = cfg.family().behaviour().check_config(cfg)
    if found:
        raise UserError("\n".join(found))


def vae_scale_factor(model: str) -> int:
    """How much the VAE shrinks an image: 2 ** (levels - 1), 8 for every Stable Diffusion VAE."""
    config = Path(model) / "vae" / "config.json"
    if not config.is_file():
        return 8
    return 2 ** (len(json.loads(config.read_text()).get("block_out_channels", [0] * 4)) - 1)


def check_resolution(resolution: int, factor: int, key: str = "training.resolution", packed: bool = False) -> None:
    """diffusers' pipelines need sides divisible by 8, latents need whole pixels, and the flow families' 2x2 latent
    patches (`packed`) whole patches."""
    step = max(8, factor * (2 if packed else 1))
    if resolution % step:
        low, high = resolution // step * step, (resolution // step + 1) * step
        why = (f"the VAE shrinks images {factor}x and the transformer reads 2x2 patches of latents" if packed else
               f"the VAE shrinks images {factor}x and diffusers' pipelines need sides divisible by 8")
        raise UserError(f"{key}: {resolution} is not a multiple of {step}; {why}. Use {low or high} or {high} (SD "
                        "1.x: 512, SD 2.x: 512 or 768, SDXL, Flux and SD3: 1024).")


def check_prompts(cfg: Config, tokenizer, reports: list[SubjectReport], problems: Problems) -> list[str]:
    """Prompt and caption lengths (a problem past the token limit; each subject's longest caption noted for the
    report) and each identifier's presence (a warning)."""
    plans = [s.identifier for s in reports]
    new = [p.identifier for p in plans if p.kind == "new" and p.identifier not in tokenizer.get_vocab()]
    if new:
        tokenizer = _with_tokens(tokenizer, new)
    for report in reports:
        lengths = [(prompt_token_count(tokenizer, c), c) for c in report.captions.by_photo.values()]
        report.longest_caption = max(lengths, default=None, key=lambda pair: pair[0])
    limit = cfg.training.tokenizer_max_length or tokenizer.model_max_length
    subjects = cfg.subject_list()
    prompts = {}
    for i, s in enumerate(subjects):
        where = f"subjects[{i}]." if cfg.subjects else "dataset."
        prompts[where + "instance_prompt"] = s.instance_prompt
        if cfg.dataset.with_prior_preservation:
            prompts[where + "class_prompt"] = s.class_prompt
    prompts.update({f"validation.prompts[{i}]": p for i, p in enumerate(cfg.validation.prompts)})
    prompts.update(caption_prompts(reports))
    for key, prompt in prompts.items():
        n = prompt_token_count(tokenizer, prompt)
        if n > limit:
            problems.found.append(f"{key} is {n} tokens long, over the text encoder's limit of {limit}: \"{prompt}\". "
                                  "Shorten it; the text encoder would silently cut off the end.")
    return [w for s in subjects for w in _identifier_warnings(s)]


def caption_prompts(subjects: list[SubjectReport]) -> dict[str, str]:
    """Each photo's caption under the name of the photo it describes (messages about lengths name it)."""
    return {f"the caption of {photo}": text for report in subjects for photo, text in report.captions.by_photo.items()}


def _identifier_warnings(s: Subject) -> list[str]:
    warnings, ident = [], s.identifier
    if ident and ident not in s.instance_prompt:
        warnings.append(f"the instance prompt \"{s.instance_prompt}\" does not contain the identifier "
                        f"'{ident}'; the model will not learn to tie the subject to it.")
    if ident and s.class_prompt and ident in s.class_prompt:
        warnings.append(f"the class prompt contains the identifier '{ident}'; prior preservation would then train "
                        "the identifier on generic class images.")
    if ident and not wants_new_token(ident) and len(ident.split()) > 1:
        warnings.append(f"identifier '{ident}' is several words; a single rare token or a new <token> is cleaner.")
    return warnings


def _with_tokens(tokenizer, tokens: list[str]):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(tokens)
    return tok


def check_instance_photos(cfg: Config, subject: Subject) -> ImageFolderReport:
    extension = cfg.dataset.caption_extension
    instance = scan_image_folder(subject.instance_dir, cfg.training.resolution,
                                 companion=lambda path: is_companion(path, extension) or is_mask_file(path))
    check_instance_folder(instance)
    if cfg.dataset.strict and instance.rejected():
        _refuse_strict(instance)
    return instance


def check_bucket_settings(cfg: Config, packed: bool) -> list[tuple[int, int]]:
    """The aspect buckets the settings allow; a problem when they allow none or sides the model cannot take."""
    ds, resolution = cfg.dataset, cfg.training.resolution
    low, high = ds.bucket_range(resolution)
    step = ds.bucket_reso_steps
    factor = 16 if packed else 8
    if step % factor:
        raise UserError(f"dataset.bucket_reso_steps: {step} is not a multiple of {factor}; bucket sides must be "
                        f"{'whole 2x2 patches of latents (Flux, SD3)' if packed else 'divisible by 8'}. Use "
                        f"{max(factor, step // factor * factor)} or {(step // factor + 1) * factor}.")
    buckets = make_buckets(resolution, low, high, step)
    if not buckets:
        raise UserError(f"dataset.min_bucket_reso / max_bucket_reso: no bucket of at most {resolution}x{resolution} "
                        f"pixels has both sides between {low} and {high} in steps of {step}, so no photo fits one. "
                        f"Lower --min_bucket_reso (at most {resolution}) or raise --max_bucket_reso (at least "
                        f"{resolution}).")
    return buckets


def assign_photo_buckets(cfg: Config, report: SubjectReport, buckets: list[tuple[int, int]]) -> None:
    """Each usable photo's bucket, by its upright size, and the report's line listing them."""
    ds, resolution = cfg.dataset, cfg.training.resolution
    report.buckets = [assign_bucket(load_image(path).size, buckets) for path in report.instance.usable]
    report.bucket_line = describe_buckets(report.buckets, resolution, *ds.bucket_range(resolution),
                                          ds.bucket_reso_steps)


def check_captions(cfg: Config, subject: Subject, instance: ImageFolderReport, problems: Problems) -> Captions:
    """The photos' own captions (training.captions); each problem with them is one of pre-flight's."""
    captions = read_captions(subject.instance_dir, instance.usable, extension=cfg.dataset.caption_extension,
                             caption_column=cfg.dataset.caption_column, identifier=subject.identifier,
                             class_word=subject.class_word)
    problems.found += captions.problems
    return captions


def check_masks(cfg: Config, subject: Subject, instance: ImageFolderReport, problems: Problems) -> Masks:
    """The photos' loss masks (training.masks) under dataset.masked_loss; each problem with them is one of
    pre-flight's. With it off, only the mask files there, for the report's line."""
    masks = read_masks(subject.instance_dir, instance.usable, masked_loss=cfg.dataset.masked_loss,
                       rejected=[issue.path for issue in instance.rejected()])
    problems.found += masks.problems
    return masks


def check_some_mask(cfg: Config, subjects: list[SubjectReport]) -> None:
    """dataset.masked_loss with no mask anywhere would train exactly as without it: refused, rather than let the user
    believe the backgrounds are left out."""
    if not cfg.dataset.masked_loss or any(s.masks.by_photo or s.masks.problems for s in subjects):
        return
    folders = ", ".join(str(s.subject.instance_dir) for s in subjects)
    raise UserError(f"dataset.masked_loss: no photo in {folders} has a mask (a NAME{MASK_SUFFIX} beside NAME.png, or "
                    "an alpha channel), so it would change nothing; add NAME.mask.png files or photos with alpha, or "
                    "drop --masked_loss")


def _refuse_strict(report: ImageFolderReport) -> None:
    bad = report.rejected()
    listed = "; ".join(f"{i.path}: {i.reason}" for i in bad)
    raise UserError(f"dataset.strict is on and {len(bad)} file(s) in {report.folder} were rejected: {listed}. Remove "
                    "or fix them, or run without --strict to skip them.")


def plan_all_class_images(cfg: Config, identity: str) -> dict[Path, ClassImagePlan]:
    """One plan per class folder (subjects may share one; config validation made their prompts agree)."""
    plans = {}
    for s in cfg.subject_list():
        folder = Path(s.class_dir)
        if folder in plans:
            continue
        if folder.exists() and not folder.is_dir():
            raise UserError(f"dataset.class_dir: {folder} is a file, not a folder; class images need a folder.")
        wanted = recipe(s.class_prompt, str(cfg.model.pretrained_model), cfg.training.resolution, identity)
        plan = plan_class_images(folder, wanted, cfg.dataset.num_class_images)
        if cfg.dataset.strict:
            report = scan_image_folder(folder, cfg.training.resolution, check_duplicates=False)
            if report.rejected():
                _refuse_strict(report)
        plans[folder] = plan
    return plans


def _module_names(model: str, part: str, cls_name: str, library: str) -> dict[str, str]:
    """The modules of one part of a local model ({name: class name}), built from its config on the meta device."""
    import importlib

    from accelerate import init_empty_weights

    cls = getattr(importlib.import_module(library), cls_name)
    with init_empty_weights():
        if library == "diffusers":
            module = cls.from_config(cls.load_config(Path(model) / part))
        else:
            module = cls(cls.config_class.from_pretrained(Path(model) / part))
    return {name: type(m).__name__ for name, m in module.named_modules()}


def check_lora_targets(cfg: Config) -> None:
    """Every LoRA target module name must match a module (as peft matches: the name or its last parts); peft
    would otherwise fail after class images were generated and the weights loaded."""
    family = cfg.family()
    key = "lora.layers" if cfg.lora.layers else "lora.denoiser_target_modules"
    parts = [(family.denoiser, family.denoiser_cls, "diffusers", key, lora_denoiser_targets(cfg))] \
        if cfg.model.train_denoiser else []
    if cfg.model.train_text_encoder:
        parts += [(t.component, t.cls, "transformers", "lora.text_encoder_target_modules",
                   cfg.lora.text_encoder_target_modules) for t in family.text_encoders if t.trains]
    for part, cls_name, library, key, targets in parts:
        names = _module_names(cfg.model.pretrained_model, part, cls_name, library)
        if part == family.denoiser and cfg.lora.blocks:
            # SD3's --lora_blocks: every named block must exist; within one, a module only some blocks have (the
            # last block's context projections) is skipped, as diffusers' script and peft do
            blocks = sorted({t.split(".")[1] for t in targets})
            missing = [b for b in blocks if not any(n.startswith(f"transformer_blocks.{b}.") for n in names)]
            if missing:
                count = len({n.split(".")[1] for n in names if n.startswith("transformer_blocks.")})
                raise UserError(f"lora.blocks: block(s) {', '.join(missing)} do not exist; this model's transformer "
                                f"has blocks 0 to {count - 1}.")
            targets = sorted({t.split(".", 2)[2] for t in targets})
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, kind in names.items()
                             if kind in ("Linear", "Conv2d") and not n.rsplit(".", 1)[-1].isdigit()})
            raise UserError(f"{key}: {', '.join(unmatched)} match no module of this model's {part}; adapters go on "
                            f"modules named like {', '.join(leaves)} (or a dotted path such as to_out.0).")
        if cfg.lora.adapter in LYCORIS:
            check_linear_targets(cfg.lora.adapter, key, part, targets, names)


def check_linear_targets(adapter: str, key: str, part: str, targets: list[str], names: dict[str, str]) -> None:
    """LoKr and LoHa train linear layers here: peft and LyCORIS lay a convolution's factors out differently (Tucker
    cores, kernel placement), and no reader of such a file was checked against peft's."""
    convolutions = sorted({t for t in targets for n, kind in names.items()
                           if (n == t or n.endswith("." + t)) and kind != "Linear"})
    if convolutions:
        raise UserError(f"{key}: {', '.join(convolutions)} are convolution layers of this model's {part}; {adapter} "
                        "adapters train linear layers only (the attention projections, feed-forward layers). Target "
                        "linear modules, or use --adapter lora for convolutions.")


def check_token_length(cfg: Config) -> None:
    """training.tokenizer_max_length cannot exceed the text encoder's positions."""
    config = Path(cfg.model.pretrained_model) / "text_encoder" / "config.json"
    wanted = cfg.training.tokenizer_max_length
    if wanted and config.is_file():
        limit = json.loads(config.read_text()).get("max_position_embeddings", 77)
        if wanted > limit:
            raise UserError(f"training.tokenizer_max_length: {wanted} is more than the text encoder's {limit} "
                            "positions; leave it unset (the tokenizer's own length) or lower it.")


def t5_tokenizer(cfg: Config):
    """The base model's T5 tokenizer alone (no weights), for the checks of what T5 reads."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.pretrained_model, subfolder=cfg.family().t5.tokenizer,
                                         revision=cfg.model.revision)


def check_sequence_length(cfg: Config, captions: dict[str, str]) -> None:
    """Flux and SD3 read the whole prompt through T5, up to training.max_sequence_length tokens; a longer prompt
    would be cut there, silently, so it is refused."""
    family = cfg.family()
    if family.t5 is None:
        return
    limit = family.behaviour().sequence_length(cfg)
    tokenizer = t5_tokenizer(cfg)
    prompts = [(f"subject {s.identifier or i} instance prompt", s.instance_prompt) for i, s in
               enumerate(cfg.subject_list())]
    if cfg.dataset.with_prior_preservation:
        prompts += [(f"subject {s.identifier or i} class prompt", s.class_prompt) for i, s in
                    enumerate(cfg.subject_list())]
    prompts += [("validation prompt", p) for p in cfg.validation.prompts]
    prompts += list(captions.items())
    long = [(what, prompt, n) for what, prompt in prompts if prompt
            and (n := len(tokenizer(prompt, truncation=False).input_ids)) > limit]
    if long:
        listed = "; ".join(f"the {what} ({n} tokens): {prompt!r}" for what, prompt, n in long)
        raise UserError(f"training.max_sequence_length: {family.title}'s T5 reads {limit} tokens and would cut "
                        f"{listed}. Shorten it, or raise --max_sequence_length (at most 512).")


def check_t5_token(cfg: Config, plans: list[IdentifierPlan]) -> list[str]:
    """token.t5_new_token needs a family with T5 and a new identifier token; returns how T5 reads each new token
    (a note for the report)."""
    family, new = cfg.family(), [p for p in plans if p.kind == "new"]
    t5 = family.t5
    if t5 is None:
        if cfg.token.t5_new_token:
            raise UserError(f"token.t5_new_token: {family.title} reads prompts through CLIP alone and has no T5 to add "
                            "the identifier to (Flux.1 and SD3 have). Drop --t5_new_token; the new token goes into "
                            "the CLIP encoder(s) as it is.")
        return []
    if cfg.token.t5_new_token and not new:
        raise UserError("token.t5_new_token: it adds a new identifier token to T5 as well as to CLIP, but no subject's "
                        "identifier is a new token (an existing word such as 'sks' is T5's own). Write the identifier "
                        "in angle brackets with an initializer (--identifier '<zq_dog>' --initializer dog), or drop "
                        "--t5_new_token.")
    if not new:
        return []
    tokenizer = t5_tokenizer(cfg)
    notes = []
    for plan in new:
        if cfg.token.t5_new_token:
            if not tokenizer(plan.initializer, add_special_tokens=False).input_ids:
                raise UserError(f"token.initializer '{plan.initializer}' is nothing to T5's tokenizer, so the new "
                                f"token '{plan.identifier}' has no T5 row to start from; pick a plain word.")
            notes.append(f"T5: '{plan.identifier}' is added there too (token.t5_new_token), its row initialised from "
                         f"'{plan.initializer}' and trained; T5 runs every step")
        else:
            notes.append(f"T5: reads '{plan.identifier}' as the pieces {tokenizer.tokenize(plan.identifier)}, frozen "
                         "(the new token is CLIP's; --t5_new_token adds it to T5 too)")
    return notes


def check_scheduler_name(name: str | None, key: str, base_config: dict | None = None) -> None:
    from dreambooth.models.loading import make_scheduler

    try:
        make_scheduler(name, base_config or {})
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def check_tracker(name: str | None) -> None:
    """The experiment tracker asked for must be installed; accelerate would fail on it at the first log."""
    if name in (None, "none", "all"):
        return
    from accelerate.utils import imports

    if not getattr(imports, f"is_{name}_available")():
        raise UserError(f"output.report_to: {name} is not installed. Install it (`pip install "
                        f"{TRACKER_PACKAGES[name]}`, and log in if it needs an account), or pass --report_to none; "
                        f"the loss log logs/train_log.jsonl is written either way.")


def check_vae_folder(folder: str) -> None:
    """--pretrained_vae_model_name_or_path: a VAE folder as diffusers saves one (config.json and weights), or a model
    folder with a vae/ inside, which is a mistake worth naming."""
    path = Path(folder)
    if (path / "config.json").is_file():
        return
    hint = f" It is a whole model: pass {path / 'vae'}." if (path / "vae" / "config.json").is_file() else ""
    raise UserError(f"model.pretrained_vae: {path} is not a VAE folder (no config.json).{hint}")


MODEL = ("model.pretrained_model", "model.revision", "model.variant", "model.pretrained_vae")
SUBJECTS = ("subjects", "dataset.instance_dir", "dataset.instance_prompt", "token.")
CAPTIONS = ("dataset.caption_extension", "dataset.caption_column", "dataset.dataset_name")
MASKS = ("dataset.masked_loss",)


def run_preflight(cfg: Config, config: ConfigReading | None = None) -> Preflight:
    """Checks the inputs and prints the report; raises one UserError listing every problem that stops training.

    `config`: how the config read, when it has problems of its own: they are reported with pre-flight's, and the
    checks that read a key with a problem are skipped.
    """
    problems = Problems(config)
    problems.check(check_runtime, cfg)
    if not problems.blocked(("model.", "token.", "training.", "validation.")):
        problems.found += fsdp_problems(cfg)  # accelerate's FSDP settings of this launch, before any weights load
    problems.check(check_quantization, cfg, needs=("model.", "model.method"))
    prediction_type = problems.check(check_base_model, cfg, needs=MODEL)
    model_ok = prediction_type is not None
    model = cfg.model.pretrained_model
    resolution = ("training.resolution",)
    packed = model_ok and cfg.family().side_multiple > 8  # Flux's and SD3's 2x2 latent patches
    if model_ok:
        problems.check(check_family_settings, cfg, needs=("training.", "lora."))
    if model_ok and not is_hub_id(model):
        problems.check(check_resolution, cfg.training.resolution, vae_scale_factor(model), needs=resolution,
                       packed=packed)
    elif cfg.training.resolution % (16 if packed else 8):
        problems.check(check_resolution, cfg.training.resolution, 8, needs=resolution, packed=packed)
    for key in ("width", "height"):
        if getattr(cfg.validation, key):
            problems.check(check_resolution, getattr(cfg.validation, key), 8, f"validation.{key}", packed=packed,
                           needs=(f"validation.{key}",))
    if model_ok and not is_hub_id(model):
        problems.check(check_token_length, cfg, needs=("training.tokenizer_max_length",))
        if cfg.model.method == "lora":
            problems.check(check_lora_targets, cfg, needs=("model.method", "model.train_denoiser", "lora."))
    identity = None if problems.blocked(MODEL) else weights_identity(model, cfg.model.revision, cfg.model.variant,
                                                                     cfg.model.pretrained_vae)
    if cfg.model.pretrained_vae and not is_hub_id(cfg.model.pretrained_vae):
        problems.check(check_vae_folder, cfg.model.pretrained_vae, needs=MODEL)
    subjects, warnings = [], []
    tokenizer = problems.check(load_tokenizer, cfg, needs=("model.tokenizer_name",)) \
        if model_ok or cfg.model.tokenizer_name else None
    for s in cfg.subject_list():
        instance = problems.check(check_instance_photos, cfg, s, needs=SUBJECTS[:2] + ("dataset.strict",
                                                                                      "dataset.caption_extension"))
        captions = problems.check(check_captions, cfg, s, instance, problems, needs=SUBJECTS + CAPTIONS) \
            if instance is not None else None
        masks = problems.check(check_masks, cfg, s, instance, problems, needs=SUBJECTS[:2] + MASKS) \
            if instance is not None else None
        plan = problems.check(plan_identifier, tokenizer, s.identifier, s.initializer, needs=SUBJECTS) \
            if tokenizer else None
        if instance is not None and plan is not None and captions is not None and masks is not None:
            subjects.append(SubjectReport(s, instance, plan, captions, masks))
    if len(subjects) == len(cfg.subject_list()):
        problems.check(check_some_mask, cfg, subjects, needs=MASKS)
    if tokenizer is not None and not problems.blocked(SUBJECTS + ("dataset.class_prompt", "validation.prompts")):
        warnings = check_prompts(cfg, tokenizer, subjects, problems)
    if cfg.dataset.enable_bucket:
        buckets = problems.check(check_bucket_settings, cfg, packed, needs=("dataset.", "training.resolution"))
        for report in subjects if buckets else []:
            assign_photo_buckets(cfg, report, buckets)
    if model_ok and not is_hub_id(model):
        problems.check(check_sequence_length, cfg, caption_prompts(subjects),
                       needs=SUBJECTS + ("training.max_sequence_length", "validation.prompts", "dataset."))
    t5_notes = []
    if model_ok:
        t5_notes = problems.check(check_t5_token, cfg, [s.identifier for s in subjects],
                                  needs=SUBJECTS + ("token.",)) or []
    class_plans = {}
    if cfg.dataset.with_prior_preservation and identity is not None:
        class_plans = problems.check(plan_all_class_images, cfg, identity,
                                     needs=("subjects", "dataset.", "training.resolution")) or {}
    run_plan = problems.check(plan_run, cfg, lambda c: weights_identity(c.model.pretrained_model, c.model.revision,
                                                                        c.model.variant, c.model.pretrained_vae),
                              needs=MODEL + ("output.",))
    if cfg.validation.prompts:
        base = {"_class_name": cfg.family().train_scheduler} if model_ok else {}
        problems.check(check_scheduler_name, cfg.validation.scheduler, "validation.scheduler", base,
                       needs=("validation.scheduler",))
    problems.check(check_tracker, cfg.output.report_to, needs=("output.report_to",))
    hub_repo = None
    if cfg.output.push_to_hub:
        from dreambooth.training.hub import check_upload

        hub_repo = problems.check(check_upload, cfg, needs=("output.",))
    problems.raise_if_any()
    family = cfg.family()
    report = Preflight(subjects, prediction_type, identity, run_plan, class_plans, warnings,
                       notes=cfg.notes + t5_notes + run_plan.notes, hub_repo=hub_repo,
                       family=f"{family.title} ({family.pipeline}, read from model_index.json)")
    if int(os.environ.get("RANK", "0")) == 0:  # launched processes all check; one reports
        print(report.format(), flush=True)
    return report
