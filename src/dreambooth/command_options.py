"""The options of every `dreambooth` command but `train` (whose flags come from the typed Config), one dataclass
a command. Each field declares its option once (dreambooth.options); the command's function takes the instance.

Torch-free: `dreambooth --help` and `dreambooth generate --help` read these and answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from dreambooth.options import option

LORA_SPEC = "FILE[:WEIGHT]"
SEED_BELOW = ("seeds are 0 or more (A1111's -1 for a random seed is not one here); omit --seed for seed 0, or give "
              "the seeds to draw.")


@dataclass(kw_only=True)
class InitOptions:
    """`dreambooth init`: a project folder with data/, prompts/, config.yaml and a README."""

    dir: Path = option(help="The project folder to write.", positional=True)
    identifier: str = option("sks", help="Identifier of the subject, e.g. sks or '<saya_token>'.")
    class_word: str = option("dog", help="Class word of the subject, e.g. dog, girl, person.")
    model: str | None = option(None, help="Base model written into config.yaml: a diffusers folder (relative to "
                               "where the command runs, as every path argument) or a hub id [default: none; set "
                               "model.pretrained_model in config.yaml later].")
    force: bool = option(False, help="Overwrite an existing config.yaml.")


@dataclass(kw_only=True)
class SamplingOptions:
    """How images are drawn: the options `generate` and `evaluate --model` share."""

    lora: list[str] = option([], metavar=LORA_SPEC, help="A LoRA (.safetensors in diffusers or kohya format, a LoRA "
                             "training output folder, or a LoRA run's checkpoint-N folder) at a weight [default "
                             "1.0]; repeatable to mix several subjects.")
    prompt: list[str] = option([], help="A prompt (repeatable).")
    prompts_file: Path | None = option(None, help="A text file with one prompt a line.")
    seeds: list[int] = option([], flags=("--seed",), minimum=0, below=SEED_BELOW,
                              help="Seed (repeatable) [default: 0].")
    num_images: int = option(1, minimum=1, help="Images per prompt and seed.")
    steps: int | None = option(None, minimum=1, help="Denoising steps [default: the family's: 30 for SD 1.x/2.x and "
                               "SDXL, 28 for Flux.1 dev and SD3, 4 for Flux.1 schnell].")
    guidance: float | None = option(None, help="Guidance scale: classifier-free, or Flux.1 dev's guidance embedding "
                                    "[default: 7.5 for SD 1.x/2.x and SDXL, 3.5 for Flux.1 dev, 7.0 for SD3; Flux.1 "
                                    "schnell takes none].")
    scheduler: str | None = option(None, help="Sampler: dpm++, ddim, euler, euler_a, pndm, unipc, ddpm, lms, heun, or "
                                   "a diffusers scheduler class name [default: dpm++; Flux and SD3: the model's own "
                                   "flow-matching sampler].")
    height: int | None = option(None, help="Image height [default: the model's].")
    width: int | None = option(None, help="Image width [default: the model's].")
    device: str | None = option(None, help="cuda, cpu, ... [default: cuda when available]")


@dataclass(kw_only=True)
class GenerateOptions(SamplingOptions):
    """`dreambooth generate`: images from a trained model, with their settings in each PNG and in settings.json."""

    model: Path = option(help="A diffusers model folder (a full fine-tune's output, or the base model of --lora "
                         "files), or a training checkpoint-N folder.")
    negative_prompt: str = option("", help="Negative prompt.")
    precision: str | None = option(None, choices=("fp32", "fp16", "bf16"),
                                   help="Weights' precision [default: fp16 on GPU, fp32 on CPU].")
    out: Path = option(Path("generated"), help="Output folder, new or empty.")
    overwrite: bool = option(False, help="Replace the images of an earlier `generate` run in --out (nothing else "
                             "is deleted).")


# The sampling options that only say what `evaluate --model` generates; --device also runs the scorers.
_GENERATION_ONLY = {f.name for f in fields(SamplingOptions)} - {"device"}


@dataclass(kw_only=True)
class EvaluateOptions(SamplingOptions):
    """`dreambooth evaluate`: the DreamBooth paper's DINO, CLIP-I and CLIP-T of generated images."""

    real: Path = option(help="The subject's real photos (the instance images).")
    identifier: str = option(help="The subject's identifier in the prompts, e.g. sks.")
    class_word: str = option(help="Its class word, e.g. dog; CLIP-T reads prompts with the identifier replaced by "
                             "it.")
    images: Path | None = option(None, one_of="source", help="Score the images of a `dreambooth generate` output "
                                 "folder (prompts read from their metadata).")
    model: Path | None = option(None, one_of="source", help="Generate the images with this diffusers model folder "
                                "into OUT/images, then score them.")
    num_images: int = option(4, minimum=1, help="Images per prompt and seed [default: 4, as in the paper].")
    clip: Path | None = option(None, help="Local CLIP model folder (CLIPModel, tokenizer, image processor): enables "
                               "CLIP-I and CLIP-T [default: a complete one in the Hugging Face hub cache, e.g. "
                               "openai/clip-vit-base-patch32].")
    dino: Path | None = option(None, help="Local DINO ViT folder (e.g. facebook/dino-vits16 saved with "
                               "save_pretrained, image processor included): enables DINO [default: a complete one in "
                               "the Hugging Face hub cache].")
    checkpoints: str | None = option(None, choices=("all",), help="all: --model is a training run's folder; "
                                     "score each checkpoint-N and the final model (LoRA runs: on their base model), "
                                     "each into OUT/NAME/, name the best, and add the table to the run's report.")
    out: Path = option(Path("evaluation"), help="Output folder: metrics.json, and images/ with --model.")
    overwrite: bool = option(False, help="Replace an earlier evaluation's metrics.json and images in --out.")

    @classmethod
    def help_for(cls, name: str, text: str) -> str:
        """The sampling options apply with --model only, and their help says so."""
        return f"With --model: {text[0].lower()}{text[1:]}" if name in _GENERATION_ONLY else text

    def generate_options(self) -> GenerateOptions:
        """What `generate` is asked for with --model: the shared sampling options, the images in OUT/images."""
        shared = {f.name: getattr(self, f.name) for f in fields(SamplingOptions)}
        return GenerateOptions(**shared, model=self.model, out=self.out / "images", overwrite=self.overwrite)


@dataclass(kw_only=True)
class ReportOptions:
    """`dreambooth report`: a run folder's report.html, rebuilt from what the folder holds."""

    output_dir: Path = option(positional=True, help="A training run's output folder (finished, stopped or "
                              "running).")
    open: bool = option(False, help="Open the page in the default web browser.")


@dataclass(kw_only=True)
class ExportOptions:
    """`dreambooth export`: a LoRA to kohya/A1111, a full model to one .safetensors, LoRAs merged into a model."""

    src: Path = option(positional=True, help="A training output folder, a checkpoint-N folder, a diffusers model "
                       "folder, or a LoRA file.")
    format: str = option(choices=("kohya", "single-file", "diffusers"), help="kohya: LoRA for A1111/Forge/ComfyUI "
                         "(SDXL's: lora_te1_/lora_te2_ and the UNet's original block names); single-file: the "
                         "original checkpoint layout (SDXL's: both text encoders, OpenCLIP's included); diffusers: a "
                         "model folder (with --merge-lora).")
    out: Path = option(help="The file or folder to write.")
    half: bool = option(False, help="Save in fp16.")
    merge_lora: list[str] = option([], metavar=LORA_SPEC,
                                   help="Bake a LoRA into the model at a weight [default 1.0]; repeatable.")


@dataclass(kw_only=True)
class TinyModelOptions:
    """`dreambooth tiny-model`: a random-weight Stable Diffusion model, built offline."""

    dir: Path = option(positional=True, help="The folder to write the model to (new or empty).")
    size: str = option("tiny", choices=("tiny", "small", "sd15", "sd2-tiny", "sdxl-tiny", "sdxl", "flux-tiny",
                                        "flux-schnell-tiny", "sd3-tiny", "flux", "sd3"),
                       help="tiny: 0.2 M UNet, 64 px (tests); small: 35 M UNet, 128 px (CPU benchmarks); sd15: "
                       "Stable Diffusion 1.5's exact architecture, 512 px, ~4 GB on disk; sd2-tiny and sdxl-tiny: SD "
                       "2.x and SDXL shapes at the tiny size, 64 px; sdxl: SDXL 1.0's exact architecture, 1024 px, "
                       "~13 GB; flux-tiny, flux-schnell-tiny and sd3-tiny: FLUX.1-dev, FLUX.1-schnell and SD3.5 "
                       "shapes at the tiny size, 64 px; flux and sd3: FLUX.1-dev's and SD3.5-large's exact "
                       "architectures, 1024 px, bfloat16, ~34 and ~27 GB.")
    resolution: int | None = option(None, minimum=8,
                                    help="Image side the model is configured for [default: the size's].")
    prediction_type: str | None = option(None, choices=("epsilon", "v_prediction"),
                                         help="What the UNet learns to predict (its scheduler's prediction_type) "
                                         "[default: v_prediction for sd2-tiny, epsilon otherwise; the flow-"
                                         "matching sizes (flux*, sd3*) take none].")
    seed: int = option(0, minimum=0, help="Seed of the random weights.")


@dataclass(kw_only=True)
class CompareOptions:
    """`dreambooth compare`: full DreamBooth and LoRA trained on the same data, in one table."""

    out: Path = option(Path("compare-run"), help="Folder for everything.")
    model: Path | None = option(None, help="Base model folder [default: a tiny random model built here].")
    instance_dir: Path | None = option(None, help="Subject photos [default: a synthetic subject].")
    steps: int = option(60, minimum=1, help="Training steps per method.")
    resolution: int = option(64, minimum=8, help="Training resolution.")
    rank: int = option(4, minimum=1, help="LoRA rank.")
    full_lr: float = option(1e-4, help="Learning rate of full fine-tuning [default: 1e-4].")
    lora_lr: float = option(1e-3, help="Learning rate of LoRA [default: 1e-3].")


@dataclass(kw_only=True)
class CompilePromptOptions:
    """`dreambooth compile-prompt`: a character's render request for a state (prompt, seed, settings), as JSON."""

    characters: Path = option(Path("characters.yaml"), help="The characters file.")
    character: str | None = option(None, help="The character's name in the file.")
    state: Path | None = option(None, help="A JSON file with the character's state.")
    schema: bool = option(False, help="Print the state's JSON Schema (a language model's tool parameters) instead.")


@dataclass(kw_only=True)
class DemoOptions:
    """`dreambooth demo`: the built-in subject trained into the built-in model on a CPU, measured before and after."""

    out: Path = option(Path("demo-run"), help="Folder for everything.")
    steps: int | None = option(None, minimum=1, help="Training steps [default: the family's recipe, 900 for sd].")
    family: str = option("sd", choices=("sd", "flux"), help="The built-in model: sd (Stable Diffusion's architecture) "
                         "or flux (Flux.1's, guidance-distilled as FLUX.1-dev).")


@dataclass(kw_only=True)
class ExperimentOptions:
    """`dreambooth experiment`: the DreamBooth paper's experiment on the built-in world, over seeds."""

    out: Path = option(Path("experiment-run"), help="Folder for everything.")
    seeds: list[int] = option([], flags=("--seed",), minimum=0, below=SEED_BELOW,
                              help="Seed (repeatable) [default: 0 1 2].")
    steps: int = option(900, minimum=1, help="Training steps per run.")
    images_per_prompt: int = option(8, minimum=1, help="Images drawn per prompt for the measures.")


@dataclass(kw_only=True)
class ServeOptions:
    """`dreambooth serve`: the characters of a characters.yaml drawn on demand over HTTP."""

    characters: Path = option(Path("characters.yaml"), help="The characters file.")
    demo: bool = option(False, help="Serve the built-in model's characters instead: the subject `dreambooth demo` "
                        "trains (trained first, into --demo-dir, when missing) and a plain circle; no downloads.")
    demo_dir: Path = option(Path("demo-run"), help="The `dreambooth demo` folder --demo uses.")
    host: str = option("127.0.0.1", help="Address to listen on; anything but loopback needs API keys.")
    port: int = option(8000, minimum=0, help="Port to listen on (0: any free port, printed).")
    api_keys: Path | None = option(None, help="A file of API keys, one `NAME ROLE TOKEN` a line (ROLE: user or "
                                   "operator); $DREAMBOOTH_API_KEYS may hold more, comma-separated.")
    allow_no_auth: bool = option(False, help="Serve without API keys on a non-loopback --host (trusted networks only).")
    device: str | None = option(None, help="Device to draw on [default: cuda if available, else cpu].")
    precision: str | None = option(None, choices=("fp32", "fp16", "bf16"),
                                   help="Weights' precision [default: fp16 on a GPU, fp32 on the CPU].")
    cache_dir: Path | None = option(None, help="Folder of the image cache [default: .serve-cache beside the "
                                    "characters file].")
    no_cache: bool = option(False, help="Draw every request, keep no image cache.")
    cache_mb: int = option(1024, minimum=1, help="Largest size of the image cache; least recently used go first.")
    redis_url: str | None = option(None, help="A Redis (redis://HOST:6379/0) that keeps the image cache and the rate "
                                   "limits instead of this process, shared by every `serve` and replica given it; "
                                   "--cache-mb bounds it.")
    max_steps: int = option(50, minimum=1, help="Most sampling steps a request may ask for.")
    max_pixels: int = option(1024 * 1024, minimum=64, help="Most pixels (width x height) a request may ask for "
                             "[default: 1048576, SDXL's native 1024x1024; SD 1.x's is 512x512, SD 2.x's "
                             "768x768]. A character whose own size is over it is refused at start-up.")
    max_images: int = option(4, minimum=1, help="Most images in one request.")
    max_body_kb: int = option(64, minimum=1, help="Largest request body, in KiB.")
    rate_per_minute: float = option(120.0, minimum=0, help="Requests a minute per API key (0: no limit).")
    burst: int = option(20, minimum=1, help="Requests a key may send at once before the rate applies.")
    max_queue: int = option(64, minimum=1, help="Images waiting to be drawn before requests get 429.")
    max_batch: int = option(4, minimum=1, help="Most images drawn in one pipeline call.")
    batch_window_ms: float = option(25.0, minimum=0, help="How long a batch waits to fill before it is drawn.")
    deadline_s: float = option(300.0, minimum=0.1, help="Longest a request waits for its images (then 504).")
    llm_base_url: str | None = option(None, help="An OpenAI-compatible endpoint (llama.cpp, vLLM, Ollama, ...) that "
                                      "turns /v1/chat-render's text into a state by tool calling; off when unset.")
    llm_model: str = option("default", help="The model name to ask the --llm-base-url endpoint for.")
    llm_api_key_env: str = option("OPENAI_API_KEY", help="The environment variable holding the endpoint's key "
                                  "(a key is never a command-line argument).")
    llm_timeout_s: float = option(60.0, minimum=1, help="Longest wait for the language model.")
    ray: bool = option(False, help="Serve on Ray Serve (the ray extra: `pip install 'dreambooth[ray]'`): replicas of "
                       "the service behind Ray's HTTP proxy, each character's requests routed to a replica that has "
                       "drawn it (model multiplexing). A local Ray is started unless --ray-address is given.")
    ray_address: str | None = option(None, help="The Ray cluster to join (HOST:PORT of its head, or ray://HOST:PORT); "
                                     "with --ray only [default: start a local one].")
    replicas: int = option(1, minimum=1, help="Replicas of the service (with --ray); each loads every character's "
                           "model and batches its own requests.")
    min_replicas: int | None = option(None, minimum=0, help="Autoscaling's fewest replicas (with --ray and "
                                      "--max-replicas) [default: --replicas].")
    max_replicas: int | None = option(None, minimum=1, help="Autoscale up to this many replicas (with --ray); unset: "
                                      "a fixed --replicas.")
    target_ongoing_requests: float = option(2.0, minimum=0.1, help="Autoscaling's target of requests in flight per "
                                            "replica (with --max-replicas).")
    gpus_per_replica: float | None = option(None, minimum=0, help="GPUs each replica takes (with --ray) [default: 1 "
                                            "when drawing on cuda, else 0].")
    cpus_per_replica: float = option(1.0, minimum=0, help="CPUs each replica takes (with --ray).")
    max_loras_per_replica: int = option(8, minimum=1, help="Characters a replica is routed as holding at once (with "
                                        "--ray; least recently drawn let go first).")


@dataclass(kw_only=True)
class StudioOptions:
    """`dreambooth studio`: the whole job in a browser (projects, photos, runs, trying, exporting, serving)."""

    projects: Path = option(Path("studio-projects"), help="The folder of the studio's projects (made when missing); "
                            "nothing outside it is read or written for a request.")
    models_dir: Path | None = option(None, help="A folder whose model folders (with model_index.json) the recipe "
                                     "offers as base models.")
    host: str = option("127.0.0.1", help="Address to listen on; anything but loopback needs API keys.")
    port: int = option(7860, minimum=0, help="Port to listen on (0: any free port, printed).")
    api_keys: Path | None = option(None, help="A file of API keys, one `NAME ROLE TOKEN` a line, as `serve` reads "
                                   "them; $DREAMBOOTH_API_KEYS may hold more.")
    max_upload_mb: float = option(20.0, minimum=0.1, help="Largest photo a browser may upload, in MB.")
    clip: Path | None = option(None, help="Local CLIP model folder its evaluations score with, as `evaluate --clip` "
                               "[default: evaluate's own search of the Hugging Face hub cache].")
    dino: Path | None = option(None, help="Local DINO ViT folder its evaluations score with, as `evaluate --dino` "
                               "[default: evaluate's own search of the Hugging Face hub cache].")

