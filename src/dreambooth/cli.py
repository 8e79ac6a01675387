"""The `dreambooth` command: a thin layer over the config and the library.

Heavy modules (torch, diffusers) are imported inside the subcommands, so that `--help` and config errors
answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import typing
from pathlib import Path
from typing import Any

from dreambooth import __version__
from dreambooth.config import SECTION_TYPES, field_flags
from dreambooth.errors import TrainingStopped, UserError

# diffusers' train_dreambooth.py flags that mean nothing here, with what to do instead.
REFUSED_FLAGS = {
    "--validation_images": "it is for DeepFloyd IF upscalers only; this tool trains Stable Diffusion 1/2",
    "--class_labels_conditioning": "it is for DeepFloyd IF only; this tool trains Stable Diffusion 1/2",
}


def spellings(flag: str) -> list[str]:
    """The other spellings of a long flag: `--class-word` for `--class_word` and back.

    A `--no-` prefix (argparse's BooleanOptionalAction) is kept as it is, since that action reads it.
    """
    if not flag.startswith("--"):
        return []
    prefix = "--no-" if flag.startswith("--no-") else "--"
    rest = flag[len(prefix):]
    return [v for v in (prefix + rest.replace("_", "-"), prefix + rest.replace("-", "_")) if v != flag]


class Parser(argparse.ArgumentParser):
    """argparse, with both spellings of every long flag and a "did you mean" for a mistyped one.

    A command's help would double in length if it listed both spellings, so the other spelling is accepted
    without being shown.
    """

    def add_spellings(self) -> None:
        """Registers the other spelling of every flag of this parser and of its sub-commands."""
        for action in self._actions:
            for flag in list(action.option_strings):
                for other in spellings(flag):
                    self._option_string_actions.setdefault(other, action)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    sub.add_spellings()

    def parse_args(self, args=None, namespace=None):  # noqa: D102 - argparse's signature
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.subcommand(getattr(parsed, "command", None))
            command.error("unrecognized arguments: " + " ".join(extras) + command.suggest(extras))
        return parsed

    def subcommand(self, name: str | None) -> Parser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return self

    def suggest(self, extras: list[str]) -> str:
        """'; did you mean --learning_rate?' for each unknown flag with a close known one."""
        known = {f.replace("-", "_"): f for a in self._actions for f in a.option_strings if f.startswith("--")}
        hints = []
        for word in extras:
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=", 1)[0].replace("-", "_"), known, n=1, cutoff=0.75)
                hints += [f"{word} -> {known[close[0]]}"] if close else []
        return f" (did you mean: {'; '.join(hints)}?)" if hints else ""

    def error(self, message: str):
        """The message and where to read about the options; the `train` usage line alone runs to pages."""
        self.exit(2, f"{self.prog}: error: {message}\nSee `{self.prog} --help` for its options.\n")


def _is_bool(annotation: Any) -> bool:
    """bool, or bool | None (a switch whose unset value the config resolves)."""
    return annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


class Switch(argparse.BooleanOptionalAction):
    """`--flag` / `--no-flag`, in either spelling: argparse's own action ignores a spelling it was not built with."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))


def _help_text(field: Any) -> str:
    default = field.default
    shown = "" if default in (None, [], "") or isinstance(default, bool) else f" [default: {default}]"
    return (field.description or "") + shown


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, named as diffusers' scripts name it; values are validated by the config."""
    for section, model in SECTION_TYPES.items():
        group = parser.add_argument_group(f"{section} (config section '{section}')")
        for name, field in model.model_fields.items():
            flags = field_flags(section, name)
            kw: dict[str, Any] = {"dest": f"{section}.{name}", "default": argparse.SUPPRESS, "help": _help_text(field)}
            if _is_bool(field.annotation):
                kw["action"] = Switch
            elif _is_list(field.annotation):
                kw.update(action="append", metavar="TEXT")
            else:
                kw["metavar"] = name.upper()
            group.add_argument(*flags, **kw)
    compat = parser.add_argument_group("diffusers compatibility")
    compat.add_argument("--offset_noise", action="store_true", default=argparse.SUPPRESS,
                        help="Offset noise of strength 0.1, as in diffusers (same as --noise_offset 0.1).")
    compat.add_argument("--local_rank", type=int, default=argparse.SUPPRESS, help="Set by launchers; ignored.")
    compat.add_argument("--cache_latents", action="store_true", default=argparse.SUPPRESS,
                        help="Accepted from diffusers' scripts: latents are cached by default (--latent_cache).")
    for flag in REFUSED_FLAGS:
        compat.add_argument(flag, nargs="?", const=True, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `section.key` values given on the command line."""
    given = vars(args)
    for flag, why in REFUSED_FLAGS.items():
        if flag[2:] in given:
            raise UserError(f"{flag} is not supported: {why}.")
    overrides = {k: v for k, v in given.items() if "." in k}
    if given.get("cache_latents") and "training.latent_cache" not in overrides:
        overrides["training.latent_cache"] = "memory"
    if given.get("offset_noise") and "training.noise_offset" not in overrides:
        overrides["training.noise_offset"] = 0.1
    return overrides


def positive_int(text: str) -> int:
    """An argparse type for counts that must be at least 1 (steps, images): argparse reports the bad value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dreambooth", description="DreamBooth fine-tuning of Stable Diffusion.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"dreambooth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", allow_abbrev=False,
                       help="Scaffold a project folder: data/, prompts/, config.yaml, README.")
    p.add_argument("dir", type=Path)
    p.add_argument("--identifier", default="sks", help="Identifier of the subject, e.g. sks or '<saya_token>'.")
    p.add_argument("--class-word", default="dog", help="Class word of the subject, e.g. dog, girl, person.")
    p.add_argument("--model", default="stable-diffusion-v1-5",
                   help="Base model written into config.yaml: a diffusers folder (relative to the project folder) or "
                   "a hub id.")
    p.add_argument("--force", action="store_true", help="Overwrite an existing config.yaml.")

    p = sub.add_parser("train", allow_abbrev=False,
                       help="Fine-tune a model on a subject (diffusers' train_dreambooth.py flags work).")
    p.add_argument("--config", type=Path, help="YAML config (sections model, token, training, dataset, ...).")
    add_config_flags(p)

    p = sub.add_parser("generate", allow_abbrev=False,
                       help="Generate images with a trained model.")
    p.add_argument("--model", required=True, type=Path,
                   help="A diffusers model folder (a full fine-tune's output, or the base model of --lora files), or a "
                   "training checkpoint-N folder.")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="A LoRA (.safetensors in diffusers or kohya format, a LoRA training output folder, or a LoRA "
                   "run's checkpoint-N folder) at a weight [default 1.0]; repeatable to mix several subjects.")
    p.add_argument("--prompt", action="append", default=[], help="A prompt (repeatable).")
    p.add_argument("--prompts-file", type=Path, help="A text file with one prompt a line.")
    p.add_argument("--negative-prompt", default="", help="Negative prompt.")
    p.add_argument("--steps", type=int, default=30, help="Denoising steps [default: 30].")
    p.add_argument("--guidance", type=float, default=7.5, help="Classifier-free guidance scale [default: 7.5].")
    p.add_argument("--seed", type=int, action="append", dest="seeds", help="Seed (repeatable) [default: 0].")
    p.add_argument("--num-images", type=int, default=1, help="Images per prompt and seed [default: 1].")
    p.add_argument("--scheduler", default="dpm++", help="Sampler: dpm++, ddim, euler, euler_a, pndm, unipc, ddpm, "
                   "lms, heun, or a diffusers scheduler class name [default: dpm++].")
    p.add_argument("--height", type=int, help="Image height [default: the model's].")
    p.add_argument("--width", type=int, help="Image width [default: the model's].")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="[default: fp16 on GPU, fp32 on CPU]")
    p.add_argument("--device", help="cuda, cpu, ... [default: cuda when available]")
    p.add_argument("--out", type=Path, default=Path("generated"),
                   help="Output folder, new or empty [default: generated].")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace the images of an earlier `generate` run in --out (nothing else is deleted).")

    p = sub.add_parser("evaluate", allow_abbrev=False,
                       help="Score a trained subject with the DreamBooth paper's metrics: DINO, CLIP-I, CLIP-T.")
    p.add_argument("--real", required=True, type=Path, help="The subject's real photos (the instance images).")
    p.add_argument("--identifier", required=True, help="The subject's identifier in the prompts, e.g. sks.")
    p.add_argument("--class-word", required=True, help="Its class word, e.g. dog; CLIP-T reads prompts with the "
                   "identifier replaced by it.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="Score the images of a `dreambooth generate` output folder "
                        "(prompts read from their metadata).")
    source.add_argument("--model", type=Path, help="Generate the images with this diffusers model folder into "
                        "OUT/images, then score them.")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="With --model: a LoRA at a weight [default 1.0]; repeatable.")
    p.add_argument("--prompt", action="append", default=[], help="With --model: a prompt (repeatable).")
    p.add_argument("--prompts-file", type=Path, help="With --model: a text file with one prompt a line.")
    p.add_argument("--seed", type=int, action="append", dest="seeds", help="With --model: seed (repeatable) "
                   "[default: 0].")
    p.add_argument("--num-images", type=int, default=4, help="With --model: images per prompt and seed "
                   "[default: 4, as in the paper].")
    p.add_argument("--steps", type=int, default=30, help="With --model: denoising steps [default: 30].")
    p.add_argument("--guidance", type=float, default=7.5, help="With --model: guidance scale [default: 7.5].")
    p.add_argument("--scheduler", default="dpm++", help="With --model: sampler, as in generate [default: dpm++].")
    p.add_argument("--clip", type=Path, help="Local CLIP model folder (CLIPModel, tokenizer, image processor): "
                   "enables CLIP-I and CLIP-T.")
    p.add_argument("--dino", type=Path, help="Local DINO ViT folder (e.g. facebook/dino-vits16 saved with "
                   "save_pretrained, image processor included): enables DINO.")
    p.add_argument("--out", type=Path, default=Path("evaluation"),
                   help="Output folder: metrics.json, and images/ with --model [default: evaluation].")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace an earlier evaluation's metrics.json and images in --out.")
    p.add_argument("--device", help="cuda, cpu, ... [default: cuda when available]")

    p = sub.add_parser("export", allow_abbrev=False,
                       help="Convert a result: LoRA to kohya/A1111, full model to one .safetensors, merge LoRAs.")
    p.add_argument("src", type=Path, help="A training output folder, a checkpoint-N folder, a diffusers model "
                   "folder, or a LoRA file.")
    p.add_argument("--format", required=True, choices=["kohya", "single-file", "diffusers"],
                   help="kohya: LoRA for A1111/Forge/ComfyUI; single-file: original SD checkpoint layout; "
                   "diffusers: a model folder (with --merge-lora).")
    p.add_argument("--out", required=True, type=Path, help="The file or folder to write.")
    p.add_argument("--half", action="store_true", help="Save in fp16.")
    p.add_argument("--merge-lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="Bake a LoRA into the model at a weight [default 1.0]; repeatable.")

    p = sub.add_parser("tiny-model", allow_abbrev=False,
                       help="Build a random-weight Stable Diffusion model offline (tests, demo, benchmarks).")
    p.add_argument("dir", type=Path)
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "sd15"],
                   help="tiny: 0.2 M UNet, 64 px (tests); small: 35 M UNet, 128 px (CPU benchmarks); sd15: Stable "
                   "Diffusion 1.5's exact architecture, 512 px, ~4 GB on disk [default: tiny].")
    p.add_argument("--resolution", type=int, help="Image side the model is configured for [default: the size's].")
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("compare", allow_abbrev=False,
                       help="Train full DreamBooth and LoRA on the same data and print a table of both.")
    p.add_argument("--out", type=Path, default=Path("compare-run"),
                   help="Folder for everything [default: compare-run].")
    p.add_argument("--model", type=Path, help="Base model folder [default: a tiny random model built here].")
    p.add_argument("--instance-dir", type=Path, help="Subject photos [default: a synthetic subject].")
    p.add_argument("--steps", type=int, default=60, help="Training steps per method [default: 60].")
    p.add_argument("--resolution", type=int, default=64, help="[default: 64]")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank [default: 4].")
    p.add_argument("--full-lr", type=float, default=1e-4, help="Learning rate of full fine-tuning [default: 1e-4].")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="Learning rate of LoRA [default: 1e-3].")

    p = sub.add_parser("bench", allow_abbrev=False,
                       help="Measure training speed and memory, optionally beside diffusers' train_dreambooth.py.")
    p.add_argument("--model", default="tiny",
                   help="tiny, small or sd15 (random weights, built under --out) or a diffusers model folder "
                   "[default: tiny].")
    p.add_argument("--method", default="full", choices=["full", "lora"], help="[default: full]")
    p.add_argument("--resolution", type=int, help="[default: the model's]")
    p.add_argument("--precision", choices=["no", "fp16", "bf16"], help="--mixed_precision of both programs "
                   "[default: bf16 on a GPU, no on the CPU].")
    p.add_argument("--steps", type=int, default=50, help="Optimizer steps per run [default: 50].")
    p.add_argument("--warmup", type=int, default=5, help="Steps left out of the median [default: 5].")
    p.add_argument("--num-class-images", type=int, default=10, help="[default: 10]")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank [default: 4].")
    p.add_argument("--repeats", type=int, default=1,
                   help="Runs per program, in alternating order; figures are their medians [default: 1].")
    p.add_argument("--peer", type=Path, metavar="SCRIPT",
                   help="diffusers' examples/dreambooth/train_dreambooth.py (train_dreambooth_lora.py for --method "
                   "lora), run with the same flags beside this tool.")
    p.add_argument("--tv-shim", type=Path, help="A torchvision stand-in for the peer's process only [default: "
                   "../shared/peer-tools/tv_shim when torchvision is missing].")
    p.add_argument("--out", type=Path, default=Path("runs/bench"),
                   help="Working folder: models, data, runs [default: runs/bench].")
    p.add_argument("--results", type=Path, default=Path("bench/results"),
                   help="Where the JSON and logs go [default: bench/results].")
    p.add_argument("--keep-outputs", action="store_true", help="Keep the trained models (deleted by default).")
    p.add_argument("--fresh-class-images", action="store_true",
                   help="Start every run with an empty class folder, so that each program generates its class images "
                   "inside the timed run [default: both get the same class images, made beforehand].")
    p.add_argument("--lean-memory", action="store_true",
                   help="Both programs with --use_8bit_adam --gradient_checkpointing (needs CUDA and bitsandbytes).")
    p.add_argument("--table", action="store_true",
                   help="Measure nothing: rewrite the table in --doc from --results/*.json.")
    p.add_argument("--doc", type=Path, default=Path("docs/bench.md"), help="[default: docs/bench.md]")

    p = sub.add_parser("demo", allow_abbrev=False,
                       help="Train the built-in subject into the built-in model on a CPU; measure before and after.")
    p.add_argument("--out", type=Path, default=Path("demo-run"), help="Folder for everything [default: demo-run].")
    p.add_argument("--steps", type=positive_int, help="Training steps [default: 900, the experiment's].")

    p = sub.add_parser("experiment", allow_abbrev=False,
                       help="The DreamBooth paper's experiment on the built-in world: base vs full/LoRA, with and "
                       "without prior preservation, over seeds.")
    p.add_argument("--out", type=Path, default=Path("experiment-run"),
                   help="Folder for everything [default: experiment-run].")
    p.add_argument("--seed", type=int, action="append", dest="seeds", help="Seed (repeatable) [default: 0 1 2].")
    p.add_argument("--steps", type=positive_int, default=900, help="Training steps per run [default: 900].")
    p.add_argument("--images-per-prompt", type=positive_int, default=8, help="[default: 8]")
    parser.add_spellings()
    return parser


def quiet_libraries() -> None:
    """Our own report says what matters; the libraries' load bars and import notices bury it."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_library_bars() -> None:
    """Off: transformers' "Loading weights" and "Writing model shards" bars and diffusers' "Loading pipeline
    components" bar, nested bars whose cursor-up escape codes litter a log; this tool prints one line per thing
    saved instead. Kept: the hub's download bars, which show that a first run is fetching gigabytes, not hanging."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # which turns the hub's bars off too
    enable_progress_bars()


HEAVY_COMMANDS = ("generate", "evaluate", "export", "compare", "bench", "demo", "experiment")


def run(args: argparse.Namespace, ends_process: bool = False) -> None:
    quiet_libraries()
    if args.command in HEAVY_COMMANDS:
        from dreambooth.training.speed import collection_paused

        with collection_paused():
            quiet_library_bars()
    if args.command == "init":
        from dreambooth.project import init_project

        init_project(args.dir, identifier=args.identifier, class_word=args.class_word, model=args.model,
                     force=args.force)
    elif args.command == "train":
        from dreambooth.config import load_config

        cfg = load_config(args.config, config_overrides(args))
        from dreambooth.training.speed import collection_paused

        with collection_paused():  # torch's import
            from dreambooth.training.loop import train

            quiet_library_bars()
        train(cfg, config_path=args.config, ends_process=ends_process)
    elif args.command == "generate":
        from dreambooth.generate import generate_command

        generate_command(args)
    elif args.command == "evaluate":
        from dreambooth.evaluation.evaluate import evaluate_command

        evaluate_command(args)
    elif args.command == "export":
        from dreambooth.export import export_command

        export_command(args)
    elif args.command == "tiny-model":
        from dreambooth.models.tiny import build_tiny_model
        from dreambooth.training.rundir import claim_work_folder

        claim_work_folder(args.dir, "tiny-model")  # never writes random weights over someone's model
        path = build_tiny_model(args.dir, prediction_type=args.prediction_type, seed=args.seed,
                                resolution=args.resolution, size=args.size)
        print(f"{args.size} random-weight model written to {path}")
    elif args.command == "compare":
        from dreambooth.evaluation.compare import run_compare

        run_compare(args.out, model=args.model, instance_dir=args.instance_dir, steps=args.steps,
                    resolution=args.resolution, rank=args.rank,
                    learning_rates={"full": args.full_lr, "lora": args.lora_lr})
    elif args.command == "bench":
        from dreambooth import bench

        if args.table:
            print(bench.write_table(args.doc, args.results))
            return
        bench.run_bench(bench.BenchSettings(
            model=args.model, method=args.method, resolution=args.resolution, precision=args.precision,
            steps=args.steps, warmup=args.warmup, num_class_images=args.num_class_images, rank=args.rank,
            repeats=args.repeats, peer=args.peer, tv_shim=args.tv_shim, out=args.out, results=args.results,
            keep_outputs=args.keep_outputs, fresh_class_images=args.fresh_class_images,
            lean_memory=args.lean_memory))
    elif args.command == "demo":
        from dreambooth.evaluation.demo import run_demo

        run_demo(args.out, steps=args.steps)
    elif args.command == "experiment":
        from dreambooth.evaluation.experiment import Recipe, run_experiment

        run_experiment(args.out, seeds=args.seeds or [0, 1, 2],
                       recipe=Recipe(steps=args.steps, images_per_prompt=args.images_per_prompt))


def main(argv: list[str] | None = None, ends_process: bool = False) -> int:
    """Runs one command; `ends_process` when the process exits right after (the console script)."""
    args = build_parser().parse_args(argv)
    try:
        run(args, ends_process)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> int:
    """The `dreambooth` command and `python -m dreambooth`: main(), then an exit without the last collection."""
    from dreambooth.training.speed import freeze_alive_objects

    code = main(ends_process=True)
    freeze_alive_objects()
    return code
