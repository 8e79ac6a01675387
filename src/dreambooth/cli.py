"""The `dreambooth` command: a thin layer over the config and the library.

`COMMANDS` is the one table of commands: each names its options (train's are the typed Config's fields, the
others' a dataclass in dreambooth.command_options) and the function that runs it, imported only then, so that
`--help` and config errors answer at once without torch and diffusers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dreambooth
from dreambooth import __version__
from dreambooth.command_options import (
    CompareOptions,
    CompilePromptOptions,
    DemoOptions,
    EvaluateOptions,
    ExperimentOptions,
    ExportOptions,
    GenerateOptions,
    InitOptions,
    ReportOptions,
    ServeOptions,
    StudioOptions,
    TinyModelOptions,
)
from dreambooth.config import SECTION_TYPES, field_flags
from dreambooth.errors import TrainingStopped, UserError, command_line
from dreambooth.options import Parser, add_options, parse_settings, settings_from

# diffusers' train_dreambooth.py flags that mean nothing here, with what to do instead.
HUB_DATASET = ("datasets from the Hugging Face hub are not read; put the photos in a folder and pass it as "
               "--instance_data_dir, or as --dataset_name with a metadata.jsonl holding their captions")
REFUSED_FLAGS = {
    "--validation_images": "it is for DeepFloyd IF upscalers only; this tool trains Stable Diffusion 1/2",
    "--class_labels_conditioning": "it is for DeepFloyd IF only; this tool trains Stable Diffusion 1/2",
    # diffusers' SDXL DreamBooth LoRA script's flags for what this tool does another way, or not at all:
    "--dataset_config_name": HUB_DATASET, "--cache_dir": HUB_DATASET,
    "--repeats": "every photo is seen once an epoch; train longer with --max_train_steps or --num_train_epochs",
    "--do_edm_style_training": "EDM-style training (Playground v2.5) is not supported",
    "--output_kohya_format": "export after training: `dreambooth export OUTPUT_DIR/pytorch_lora_weights.safetensors "
                             "--format kohya --out FILE` (SD 1.x, 2.x and SDXL)",
    # diffusers' Flux and SD3 DreamBooth scripts:
    "--enable_npu_flash_attention": "Ascend NPUs are not supported; drop the flag: attention is PyTorch's SDPA (or "
                                    "xformers', with --enable_xformers_memory_efficient_attention)",
}
# Flags of diffusers' scripts whose only value this tool has: accepted with it, refused with another.
ONLY_VALUE_FLAGS = {
    "--image_column": ("image", "a --dataset_name folder's photos are the files its metadata.jsonl names under "
                                "file_name, the column the imagefolder layout calls 'image'"),
    "--image_interpolation_mode": ("lanczos", "images are resized with Lanczos filtering, the default of diffusers' "
                                              "scripts; other filters are not supported"),
}


def _is_bool(annotation: Any) -> bool:
    """bool, or bool | None (a switch whose unset value the config resolves)."""
    return annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list
                                                        for a in typing.get_args(annotation))


class Switch(argparse.BooleanOptionalAction):
    """`--flag` / `--no-flag`, in either spelling: argparse's own action ignores a spelling it was not built with."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))


class ValuedSwitch(Switch):
    """A switch that also takes a value, as diffusers' `type=bool` flags need one: `--prodigy_decouple=True`,
    `--prodigy_decouple false`, or alone for on. The value is read by the config (true/false, yes/no, 1/0); unlike
    diffusers' `bool("False")`, false means off."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nargs, self.metavar = "?", "BOOL"

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                raise argparse.ArgumentError(self, f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        else:
            setattr(namespace, self.dest, True if values is None else values)


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
                kw["action"] = ValuedSwitch if (field.json_schema_extra or {}).get("valued") else Switch
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
    compat.add_argument("--use_dora", action="store_true", default=argparse.SUPPRESS,
                        help="DoRA adapters, as in diffusers' LoRA scripts (same as --adapter dora).")
    compat.add_argument("--upcast_before_saving", action="store_true", default=argparse.SUPPRESS,
                        help="Save in fp32, as in diffusers' Flux and SD3 LoRA scripts: --save_precision fp32, the "
                        "default here.")
    for flag in REFUSED_FLAGS:
        compat.add_argument(flag, nargs="?", const=True, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for flag, (value, _) in ONLY_VALUE_FLAGS.items():
        compat.add_argument(flag, default=argparse.SUPPRESS, metavar=value.upper(),
                            help=f"Accepted from diffusers' scripts with the value {value} only.")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `section.key` values given on the command line; every refused flag of diffusers' scripts in one UserError."""
    given = vars(args)
    flags_for: dict[str, list[str]] = {}  # a hub dataset's --dataset_name, --image_column, ... share one reason
    for flag, why in REFUSED_FLAGS.items():
        if flag[2:] in given:
            flags_for.setdefault(why, []).append(flag)
    refused = [f"{', '.join(flags)} {'is' if len(flags) == 1 else 'are'} not supported: {why}."
               for why, flags in flags_for.items()]
    refused += [f"{flag} {given[flag[2:]]} is not supported: {why}." for flag, (value, why) in ONLY_VALUE_FLAGS.items()
                if flag[2:] in given and str(given[flag[2:]]).lower() != value]
    if given.get("upcast_before_saving") and given.get("output.save_precision", "fp32") != "fp32":
        refused.append(f"--upcast_before_saving saves in fp32, and --save_precision {given['output.save_precision']} "
                       "asks for another precision; pass one of them.")
    if given.get("use_dora") and given.get("lora.adapter", "dora") != "dora":
        refused.append(f"--use_dora asks for DoRA adapters, and --adapter {given['lora.adapter']} for another kind; "
                       "pass one of them.")
    if refused:  # every one at once, as a command copied from diffusers' examples may hold several
        raise UserError("\n".join(refused))
    overrides = {k: v for k, v in given.items() if "." in k}
    if given.get("upcast_before_saving"):
        overrides["output.save_precision"] = "fp32"
    if given.get("use_dora"):
        overrides["lora.adapter"] = "dora"
    if given.get("cache_latents") and "training.latent_cache" not in overrides:
        overrides["training.latent_cache"] = "memory"
    if given.get("offset_noise") and "training.noise_offset" not in overrides:
        overrides["training.noise_offset"] = 0.1
    return overrides


@dataclass
class TrainRun:
    """What `dreambooth train` runs: the YAML config and the flags given over it."""

    config: Path | None
    overrides: dict[str, Any]
    unrecognized: list[str] = dataclasses.field(default_factory=list)  # unknown flags, as problem lines
    argv: list[str] = dataclasses.field(default_factory=list)  # the words after `train`, as typed


@dataclass(frozen=True)
class Command:
    """One `dreambooth` command: its line in --help, its options, and the function that runs it."""

    name: str
    help: str
    # "module:function", imported only when the command runs, or "path.py:function" in a script of the
    # repository (developer tooling, not installed); the function takes the command's options.
    function: str
    # Its options dataclass (dreambooth.command_options); TrainRun for train, whose flags are Config's fields;
    # "path.py:Class" for a script's own, which reads the command's arguments itself (its --help too).
    options: type | str
    heavy: bool = False  # imports torch and diffusers: the collector paused meanwhile, their nested bars off


COMMANDS = {command.name: command for command in (
    Command("init", "Scaffold a project folder: data/, prompts/, config.yaml, characters.yaml, README.",
            "dreambooth.project:init_command", InitOptions),
    Command("train", "Fine-tune a model on a subject (diffusers' train_dreambooth.py flags work).",
            "dreambooth.cli:train_command", TrainRun),
    Command("generate", "Generate images with a trained model.",
            "dreambooth.generate:generate_command", GenerateOptions, heavy=True),
    Command("evaluate", "Score a trained subject with the DreamBooth paper's metrics: DINO, CLIP-I, CLIP-T.",
            "dreambooth.evaluation.evaluate:evaluate_command", EvaluateOptions, heavy=True),
    Command("report", "Rebuild a run's report.html (curves, samples, checkpoints) from its folder.",
            "dreambooth.training.report_page:report_command", ReportOptions),
    Command("export", "Convert a result (SD 1.x, 2.x or SDXL): LoRA to kohya/A1111, full model to one .safetensors, "
            "merge LoRAs.",
            "dreambooth.export:export_command", ExportOptions, heavy=True),
    Command("tiny-model", "Build a random-weight Stable Diffusion model offline (tests, demo, benchmarks).",
            "dreambooth.models.tiny_families:tiny_model_command", TinyModelOptions),
    Command("compare", "Train full DreamBooth and LoRA on the same data and print a table of both.",
            "dreambooth.evaluation.compare:compare_command", CompareOptions, heavy=True),
    Command("bench", "Measure training speed and memory, optionally beside diffusers' train_dreambooth.py "
            "(bench/bench.py of the repository).",
            "bench/bench.py:bench_command", "bench/bench.py:BenchSettings", heavy=True),
    Command("compile-prompt", "A character's prompt, seed and settings for a state (characters.yaml), as JSON.",
            "dreambooth.characters.commands:compile_prompt_command", CompilePromptOptions),
    Command("serve", "Draw characters on demand over HTTP: states in, pictures out; batched, queued, cached, "
            "with API keys, limits and metrics.", "dreambooth.serving.command:serve_command", ServeOptions, heavy=True),
    Command("studio", "The whole job in a browser: projects, photos with a live pre-flight, runs, trying, exporting "
            "and serving the result.", "dreambooth.studio.command:studio_command", StudioOptions),
    Command("demo", "Train the built-in subject into the built-in model on a CPU; measure before and after.",
            "dreambooth.evaluation.demo:demo_command", DemoOptions, heavy=True),
    Command("experiment", "The DreamBooth paper's experiment on the built-in world: base vs full/LoRA, with and "
            "without prior preservation, over seeds.",
            "dreambooth.evaluation.experiment:experiment_command", ExperimentOptions, heavy=True),
)}


def build_parser() -> Parser:
    parser = Parser(prog="dreambooth", description="DreamBooth fine-tuning of Stable Diffusion.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"dreambooth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        own_parser = isinstance(command.options, str)
        p = sub.add_parser(command.name, help=command.help, allow_abbrev=False, add_help=not own_parser)
        if command.options is TrainRun:
            p.add_argument("--config", type=Path, help="YAML config (sections model, token, training, dataset, ...).")
            add_config_flags(p)
        elif own_parser:
            p.set_defaults(forwarded=[])  # every argument, --help included, goes to the script's own parser
        else:
            add_options(p, command.options)
    parser.add_spellings()
    return parser


def quiet_libraries() -> None:
    """Our own report says what matters; the libraries' load bars and import notices bury it."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_progress_bars() -> contextlib.AbstractContextManager:
    """`models.loading.quiet_progress_bars()`, imported with the collector paused: it brings torch and diffusers."""
    from dreambooth.training.speed import collection_paused

    with collection_paused():
        from dreambooth.models.loading import quiet_progress_bars as quiet
    return quiet()


def run(parser: Parser, args: argparse.Namespace) -> None:
    """The command's options (a value out of range ends the command here, as argparse's errors do), then its
    function."""
    quiet_libraries()
    command = COMMANDS[args.command]
    options = command_options(command, args, parser.subcommand(command.name))
    with quiet_progress_bars() if command.heavy else contextlib.nullcontext():
        load(command.function, command.name)(options)


def command_options(command: Command, args: argparse.Namespace, parser: Parser) -> Any:
    """The typed options the command's function takes."""
    if command.options is TrainRun:
        argv = args.argv[args.argv.index(command.name) + 1:] if command.name in args.argv else []
        return TrainRun(args.config, config_overrides(args), parser.unrecognized(args.unrecognized), argv)
    if isinstance(command.options, str):
        return parse_settings(load(command.options, command.name), args.forwarded, prog=parser.prog)
    return settings_from(command.options, args, parser)


def train_command(request: TrainRun) -> None:
    """`dreambooth train`: the config is checked in full before torch is imported. A config with problems still
    goes through every pre-flight check that does not read a key with a problem, so that one run reports them all."""
    from dreambooth.config_file import read_config
    from dreambooth.training.speed import collection_paused

    reading = read_config(request.config, request.overrides, request.unrecognized)
    if reading.problems:
        with collection_paused():
            from dreambooth.preflight import run_preflight
        run_preflight(reading.config, reading)  # raises, listing the config's problems with its own
    with collection_paused():  # torch's import
        from dreambooth.training.loop import train
    with quiet_progress_bars():
        try:
            train(reading.config)
        except TrainingStopped as stop:
            raise stop.continued_by(resume_command(request.argv, reading.config.output.overwrite_output_dir)) from None


def resume_command(argv: list[str], overwrite: bool) -> str:
    """The command line that continues a stopped `train`: the same words with `--resume_from_checkpoint latest`.
    An earlier --resume_from_checkpoint gives way to it, and --overwrite_output_dir, which would replace the run it
    continues, goes (turned off with --no-overwrite_output_dir where it may come from the config file)."""
    words, skip = [], False
    for word in argv:
        name = word.split("=", 1)[0].replace("-", "_")
        if skip or name == "__overwrite_output_dir":
            skip = False
            continue
        if name == "__resume_from_checkpoint":
            skip = "=" not in word  # its value is the next word
            continue
        words.append(word)
    words += ["--no-overwrite_output_dir"] if overwrite else []
    launcher = ["accelerate", "launch", "-m"] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else []
    return command_line(*launcher, "dreambooth", "train", *words, "--resume_from_checkpoint", "latest")


def repository() -> Path:
    """The source checkout the package runs from, in the src layout (src/dreambooth/__init__.py)."""
    return Path(dreambooth.__file__).resolve().parents[2]


def load(target: str, command: str) -> Any:
    """`module:name`, or `path.py:name` from a script of the repository (its developer tooling)."""
    where, name = target.split(":")
    module = load_script(where, command) if where.endswith(".py") else importlib.import_module(where)
    return getattr(module, name)


def load_script(path: str, command: str) -> types.ModuleType:
    """A script of the repository as a module; loaded once, so that its dataclasses are the same on each call."""
    script = repository() / path
    if not script.is_file():
        raise UserError(f"`dreambooth {command}` is a developer tool that lives in the repository's "
                        f"{Path(path).parent}/ folder ({path}), which is not installed with the package (looked for "
                        f"{script}). Run it from a clone of the repository installed with `pip install -e .`, as "
                        f"`dreambooth {command} ...` or `python {path} ...`.")
    loaded = sys.modules.get(script.stem)
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "-").resolve() == script:
        return loaded
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing.get_type_hints look a class's module up there
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(parser, args)
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
    from dreambooth.training.speed import cpu_threading, freeze_alive_objects, process_ends_with_command

    cpu_threading()  # before anything imports torch
    process_ends_with_command()
    code = main()
    freeze_alive_objects()
    return code
