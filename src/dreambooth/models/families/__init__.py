"""The model families this tool trains and draws, as data: one `Family` per family, read once from a model's
`model_index.json` (a hub id's too) and recorded in the run.

What differs between families lives here and in each family's own module (`families.sd`, `.sdxl`, `.flux`,
`.sd3`): the denoiser and pipeline classes, the text encoders with their tokenizers and token limits, the training
objective, the latent geometry, the LoRA targets and export prefixes. Callers ask the family; they never test a
folder for `text_encoder_2` or a conditioning for being a tuple.

Torch-free, so that pre-flight can detect a family before anything heavy loads. The behaviour that needs torch
(encoding prompts, the loss, building a pipeline) is `Family.behaviour()`, imported on first use.

Adding a family (docs/design.md, "Adding a model family"): a `Family` entry below, a module beside this one with
its `Behaviour`, and its tiny model in `models.tiny_flow` (or `tiny_families`); the contract test
(tests/test_families.py) then runs it through train, resume, save and a stock pipeline's load.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family and its tokenizer."""

    component: str  # the pipeline's component name: "text_encoder", "text_encoder_2", ...
    tokenizer: str  # its tokenizer's component name
    cls: str  # transformers class
    kind: str  # "clip" (77 tokens, takes new identifier tokens) or "t5" (long prompts; new tokens when asked)
    trains: bool = True  # whether --train_text_encoder trains it (T5 stays frozen, as in diffusers' scripts)
    token_key: str = "clip_l"  # its row's key in a token file of several encoders (A1111's clip_l / clip_g, t5)


@dataclass(frozen=True)
class Family:
    """What a model family is, by name; `behaviour()` is what it does."""

    name: str  # the short name records use: "sd1", "sdxl", "flux", ...
    title: str  # how messages name it: "SD 1.x"
    pipeline: str  # diffusers' text-to-image pipeline class
    denoiser: str  # the denoiser's component name: "unet" or "transformer"
    denoiser_cls: str  # its diffusers class
    text_encoders: tuple[TextEncoder, ...]
    objective: str  # "diffusion" (epsilon or v from the scheduler config) or "flow" (rectified flow)
    train_scheduler: str  # the noise scheduler class training reads the schedule from
    module: str  # the module under dreambooth.models.families holding its Behaviour
    side_multiple: int = 8  # image sides must be multiples of this (VAE factor, times 2 for packed latents)
    denoiser_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    text_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    guidance_embedding: bool = False  # the denoiser takes the guidance scale as an input (Flux.1 dev)
    graph_step: bool = False  # its training step can be captured as a CUDA graph (training.graph_step)
    native_side: int = 512

    @property
    def components(self) -> tuple[str, ...]:
        """Every model part a pipeline folder of this family holds (weights and tokenizers)."""
        return (self.denoiser, "vae", *(t.component for t in self.text_encoders),
                *(t.tokenizer for t in self.text_encoders), "scheduler")

    @property
    def trained_parts(self) -> tuple[str, ...]:
        """The parts that can train: the denoiser and the text encoders `--train_text_encoder` trains."""
        return (self.denoiser, *(t.component for t in self.text_encoders if t.trains))

    def text_encoder(self, component: str) -> TextEncoder:
        """The text encoder of this family with the given component name."""
        return next(t for t in self.text_encoders if t.component == component)

    @property
    def t5(self) -> TextEncoder | None:
        """The family's T5 encoder (Flux, SD3), which reads the whole prompt; None where it has none."""
        return next((t for t in self.text_encoders if t.kind == "t5"), None)

    def behaviour(self):
        """The family's torch side (`Behaviour` of its module), imported on first use; one per family."""
        if self.name not in _BEHAVIOURS:
            module = importlib.import_module(f"dreambooth.models.families.{self.module}")
            _BEHAVIOURS[self.name] = module.Behaviour(self)
        return _BEHAVIOURS[self.name]


_BEHAVIOURS: dict[str, object] = {}


_CLIP = TextEncoder("text_encoder", "tokenizer", "CLIPTextModel", "clip")
_CLIP_2 = TextEncoder("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "clip", token_key="clip_g")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd1", "SD 1.x", "StableDiffusionPipeline", "unet", "UNet2DConditionModel", (_CLIP,), "diffusion",
           "DDPMScheduler", "sd", graph_step=True),
    Family("sd2", "SD 2.x", "StableDiffusionPipeline", "unet", "UNet2DConditionModel", (_CLIP,), "diffusion",
           "DDPMScheduler", "sd", graph_step=True, native_side=768),
    Family("sdxl", "SDXL", "StableDiffusionXLPipeline", "unet", "UNet2DConditionModel", (_CLIP, _CLIP_2),
           "diffusion", "DDPMScheduler", "sdxl", native_side=1024),
    Family("flux", "Flux.1", "FluxPipeline", "transformer", "FluxTransformer2DModel",
           (_CLIP, TextEncoder("text_encoder_2", "tokenizer_2", "T5EncoderModel", "t5", trains=False,
                              token_key="t5")), "flow",
           "FlowMatchEulerDiscreteScheduler", "flux", side_multiple=16, guidance_embedding=True, native_side=1024,
           # diffusers' Flux LoRA script's default targets: attention of both block kinds, and the single blocks'
           # projections
           denoiser_lora_targets=("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                                  "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                                  "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")),
    Family("sd3", "SD3", "StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel",
           (TextEncoder("text_encoder", "tokenizer", "CLIPTextModelWithProjection", "clip"), _CLIP_2,
            TextEncoder("text_encoder_3", "tokenizer_3", "T5EncoderModel", "t5", trains=False,
                        token_key="t5")), "flow",
           "FlowMatchEulerDiscreteScheduler", "sd3", side_multiple=16, native_side=1024,
           denoiser_lora_targets=("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                                  "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")),
)}

# model_index.json's _class_name of the pipelines each family's folders are saved as (img2img and inpaint folders
# share the layout of text-to-image ones and are saved under their own names by some tools).
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
}
SUPPORTED_PIPELINES = tuple(PIPELINE_FAMILIES)
TITLES = {name: family.title for name, family in FAMILIES.items()}


def sd_generation(text_encoder_config: dict | None) -> str:
    """SD 1.x or 2.x from the text encoder's config: 2.x's is OpenCLIP (GELU), 1.x's OpenAI's CLIP (quick GELU)."""
    return "sd2" if (text_encoder_config or {}).get("hidden_act") == "gelu" else "sd1"


def family_from_index(index: dict, text_encoder_config: dict | None = None) -> Family | None:
    """The family of a pipeline from its model_index.json (and, for SD, its text encoder's config); None when this
    tool does not know the pipeline."""
    kind = PIPELINE_FAMILIES.get(str(index.get("_class_name", "")))
    if kind == "sd":
        return FAMILIES[sd_generation(text_encoder_config)]
    return FAMILIES.get(kind) if kind else None


def pipeline_family(pipe) -> Family | None:
    """The family of a loaded diffusers pipeline, by its class (SD 1.x and 2.x, which behave alike, read as SD 1.x's
    unless the text encoder says otherwise)."""
    kind = PIPELINE_FAMILIES.get(type(pipe).__name__)
    if kind == "sd":
        encoder = getattr(pipe, "text_encoder", None)
        return FAMILIES[sd_generation({"hidden_act": getattr(getattr(encoder, "config", None), "hidden_act", None)})]
    return FAMILIES.get(kind) if kind else None


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_family(folder: Path | str) -> Family | None:
    """The family of a local diffusers folder, from its config files alone; None when they do not say."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    if index is None:
        return None
    return family_from_index(index, read_json(folder / "text_encoder" / "config.json"))
