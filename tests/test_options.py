"""Options declared once on typed dataclasses: parsed in both spellings, range-checked as argparse checks a value,
and delivered to the command's function as its settings object. CPU-only, no model loaded."""

from __future__ import annotations

import argparse
import contextlib
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import pytest

from dreambooth import cli
from dreambooth.command_options import EvaluateOptions, GenerateOptions, SamplingOptions
from dreambooth.errors import UserError
from dreambooth.options import add_options, check_settings, flags_of, option, parse_settings, problems, value_type

EVALUATE = ["evaluate", "--real", "r", "--identifier", "sks", "--class-word", "dog"]


def options_of(argv: list[str]):
    """The typed options the command of `argv` would run with."""
    parser = cli.build_parser()
    args = parser.parse_args(argv)
    command = cli.COMMANDS[args.command]
    return cli.command_options(command, args, parser.subcommand(command.name))


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "m", "--steps", "0"], "--steps must be at least 1 (got 0)"),
    (["generate", "--model", "m", "--num-images", "0"], "--num-images must be at least 1 (got 0)"),
    (["generate", "--model", "m", "--seed", "2", "--seed", "-1"], "--seed -1: seeds are 0 or more"),
    ([*EVALUATE, "--model", "m", "--steps", "-3"], "--steps must be at least 1 (got -3)"),
    ([*EVALUATE, "--model", "m", "--num_images", "0"], "--num-images must be at least 1 (got 0)"),
    ([*EVALUATE, "--model", "m", "--seed", "-1"], "--seed -1: seeds are 0 or more"),
    (["experiment", "--images-per-prompt", "0"], "--images-per-prompt must be at least 1 (got 0)"),
    (["demo", "--steps", "0"], "--steps must be at least 1 (got 0)"),
])
def test_a_value_out_of_range_exits_2_naming_the_flag(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load", lambda *a: pytest.fail("the command ran with a value out of range"))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"dreambooth {argv[0]}: error: {message}" in err and "Traceback" not in err


def test_both_spellings_of_every_option_work():
    dashes = options_of(["generate", "--model", "m", "--prompts-file", "p.txt", "--num-images", "3",
                         "--negative-prompt", "blurry"])
    underscores = options_of(["generate", "--model", "m", "--prompts_file", "p.txt", "--num_images", "3",
                              "--negative_prompt", "blurry"])
    assert dashes == underscores
    assert (dashes.prompts_file, dashes.num_images, dashes.negative_prompt) == (Path("p.txt"), 3, "blurry")
    assert options_of([*EVALUATE[:-2], "--class_word", "cat", "--images", "i"]).class_word == "cat"
    assert options_of(["export", "s", "--format", "kohya", "--out", "o", "--merge_lora", "a:0.5"]).merge_lora == [
        "a:0.5"]


def test_declared_options_reach_the_command_function(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "quiet_progress_bars", contextlib.nullcontext)  # the function is faked: no torch import
    monkeypatch.setattr(cli, "load", lambda target, command: seen.append((target, command)) or seen.append)
    assert cli.main(["generate", "--model", "m", "--prompt", "a", "--prompt", "b", "--seed", "3", "--seed", "8",
                     "--steps", "4", "--guidance", "5", "--precision", "bf16", "--height", "48"]) == 0
    (target, command), options = seen
    assert (target, command) == ("dreambooth.generate:generate_command", "generate")
    assert options == GenerateOptions(model=Path("m"), prompt=["a", "b"], seeds=[3, 8], steps=4, guidance=5.0,
                                      precision="bf16", height=48)
    assert (options.num_images, options.scheduler, options.out, options.lora) == (1, None, Path("generated"), [])


def test_evaluate_keeps_its_own_defaults_and_hands_generate_the_shared_options():
    options = options_of([*EVALUATE, "--model", "m", "--prompt", "a", "--seed", "2", "--lora", "x:0.5",
                          "--steps", "3", "--scheduler", "ddim", "--device", "cpu", "--out", "ev", "--overwrite"])
    assert options.num_images == 4 and GenerateOptions(model=Path("m")).num_images == 1
    job = options.generate_options()
    assert {f.name: getattr(job, f.name) for f in fields(SamplingOptions)} == {
        f.name: getattr(options, f.name) for f in fields(SamplingOptions)}
    assert (job.model, job.out, job.overwrite) == (Path("m"), Path("ev") / "images", True)


def test_evaluate_takes_exactly_one_of_images_and_model(capsys):
    for extra in ([], ["--images", "i", "--model", "m"]):
        with pytest.raises(SystemExit) as e:
            options_of([*EVALUATE, *extra])
        assert e.value.code == 2
    assert "--images" in capsys.readouterr().err
    assert options_of([*EVALUATE, "--images", "i"]).model is None


def test_help_says_which_evaluate_options_apply_with_model_only():
    def helps(command: str) -> dict[str, str]:
        sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return {a.dest: a.help for a in sub.choices[command]._actions}

    evaluate, generate = helps("evaluate"), helps("generate")
    assert evaluate["steps"].startswith("With --model: denoising steps [default: the family's: 30 for SD 1.x/2.x")
    assert evaluate["num_images"] == "With --model: images per prompt and seed [default: 4, as in the paper]."
    assert generate["steps"].startswith("Denoising steps [default: the family's: 30 for SD")
    assert generate["num_images"].endswith("[default: 1].")
    assert evaluate["device"] == generate["device"]  # --device also runs the scorers


def test_settings_made_in_code_are_checked_against_the_same_declarations():
    assert problems(EvaluateOptions(real=Path("r"), identifier="s", class_word="d", images=Path("i"))) == []
    assert problems(GenerateOptions(model=Path("m"), steps=0, precision="fp8", seeds=[1, -2])) == [
        "--seed -2: seeds are 0 or more (A1111's -1 for a random seed is not one here); omit --seed for seed 0, or "
        "give the seeds to draw.", "--steps must be at least 1 (got 0)",
        "--precision 'fp8' is not one of fp32, fp16, bf16"]


def test_commands_called_from_code_refuse_what_their_flags_would(tmp_path, monkeypatch):
    """evaluate hands generate options it built itself; a notebook may too: the declarations still hold."""
    from dreambooth.errors import UserError
    from dreambooth.evaluation.evaluate import evaluate_command
    from dreambooth.generate import generate_command
    from dreambooth.models import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(UserError, match=r"--steps must be at least 1 \(got 0\)"):
        generate_command(GenerateOptions(model=tmp_path, prompt=["a dog"], steps=0, out=tmp_path / "out"))
    with pytest.raises(UserError, match="--seed -1: seeds are 0 or more"):
        evaluate_command(EvaluateOptions(real=tmp_path, identifier="sks", class_word="dog", model=tmp_path,
                                         seeds=[-1], clip=tmp_path, out=tmp_path / "eval"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval").exists()


def test_types_come_from_the_annotations():
    @dataclass(kw_only=True)
    class Example:
        """An example."""

        where: Path = option(positional=True, help="A folder.")
        count: int = option(2, minimum=0, help="How many.")
        scale: float | None = option(None, help="A scale.")
        tags: list[str] = option([], flags=("--tag", "-t"), help="A tag (repeatable).")
        fast: bool = option(False, help="Go fast.")

    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    args = parser.parse_args(["here", "--count", "3", "--scale", "0.5", "-t", "a", "--tag", "b", "--fast"])
    assert (args.where, args.count, args.scale, args.tags, args.fast) == (Path("here"), 3, 0.5, ["a", "b"], True)
    assert vars(parser.parse_args(["here"])) == {"where": Path("here"), "count": None, "scale": None, "tags": None,
                                                 "fast": False}


# ------------------------------------------------------------------------ one parser behaviour for every command


def fails_with(capsys, argv: list[str]) -> str:
    """The one error message of a command line that must not run."""
    with pytest.raises(SystemExit) as e:
        options_of(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    return err


def test_a_mistyped_flag_gets_a_suggestion_in_every_command(capsys):
    """`export --formt` got argparse's "required: --format" and no hint, while train and generate gave one."""
    err = fails_with(capsys, ["export", "src", "--formt", "kohya", "--out", "o"])
    assert "unrecognized arguments: --formt" in err and "--formt -> --format" in err
    assert "--format is required (one of kohya, single-file, diffusers)" in err
    err = fails_with(capsys, ["generate", "--modle", "m"])
    assert "--modle -> --model" in err and "--model is required" in err


def test_every_problem_of_a_command_line_is_reported_at_once(capsys):
    err = fails_with(capsys, ["generate", "--model", "m", "--steps", "abc", "--guidance", "nan", "--num-images", "0",
                              "--precision", "bf1", "--bogus-flag"])
    for part in ("unrecognized arguments: --bogus-flag", "--steps 'abc' is not a whole number",
                 "--guidance 'nan' is not a finite number", "--num-images must be at least 1 (got 0)",
                 "--precision 'bf1' is not one of fp32, fp16, bf16 (did you mean bf16?)"):
        assert part in err, part
    err = fails_with(capsys, [*EVALUATE, "--images", "i", "--model", "m"])
    assert "give one of --images or --model, not 2 (--images, --model)" in err
    assert "give one of --images or --model" in fails_with(capsys, EVALUATE)


def _argv_with(command: str, cls, name: str, value: str) -> list[str]:
    """`command`'s required options filled in, and option `name` set to `value`."""
    argv, groups = [command], set()
    for f in fields(cls):
        meta = f.metadata
        required = f.default is MISSING and f.default_factory is MISSING
        if f.name == name or not (required or meta["one_of"] and meta["one_of"] not in groups):
            continue
        groups.add(meta["one_of"])
        filler = str(meta["choices"][0]) if meta["choices"] else "x"
        argv += [filler] if meta["positional"] else [flags_of(f)[0], filler]
    f = next(f for f in fields(cls) if f.name == name)
    return argv + ([value] if f.metadata["positional"] else [f"{flags_of(f)[0]}={value}"])  # `=`: -inf is no flag


def _float_options():
    bench = cli.load(cli.COMMANDS["bench"].options, "bench")
    tables = [(c.name, c.options) for c in cli.COMMANDS.values() if isinstance(c.options, type)
              and c.options is not cli.TrainRun]
    for command, cls in tables:
        for f in fields(cls):
            if value_type(typing.get_type_hints(cls)[f.name])[0] is float:
                yield command, cls, f.name
    for f in fields(bench):
        if value_type(typing.get_type_hints(bench)[f.name])[0] is float:
            yield "bench", bench, f.name


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_every_float_option_of_every_command_refuses_non_finite_numbers(value, capsys):
    """NaN compares false with every bound, so `--guidance nan` passed every range check and reached the sampler."""
    seen = []
    for command, cls, name in _float_options():
        if command == "bench":
            with pytest.raises(SystemExit):
                parse_settings(cls, _argv_with(command, cls, name, value)[1:], prog="bench")
            err = capsys.readouterr().err
        else:
            err = fails_with(capsys, _argv_with(command, cls, name, value))
        assert f"'{value}' is not a finite number" in err, (command, name)
        seen.append(f"{command} {name}")
    assert {"generate guidance", "serve rate_per_minute", "compare full_lr"} <= set(seen)
    # and settings made in code
    with pytest.raises(UserError, match="--guidance nan is not a finite number"):
        check_settings(GenerateOptions(model=Path("m"), guidance=float("nan")))


def test_generate_export_and_evaluate_report_every_input_problem_at_once(tiny_model, tmp_path, capsys):
    """Each stopped at its first problem: a wrong --model, then (next run) a missing LoRA, then the seeds..."""
    (tmp_path / "file").write_text("x")
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere"), "--lora", str(tmp_path / "missing.safetensors"),
                     "--prompt", "a dog", "--height", "60", "--seed", "1", "--seed", "1", "--scheduler", "fastest",
                     "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "`dreambooth generate` has 6 problems; nothing was loaded or written" in err
    for part in ("--height 60 is not a multiple of 8", "--seed 1 is given more than once", "unknown scheduler",
                 f"--model {tmp_path / 'nowhere'} does not exist", "missing.safetensors does not exist", "--out",
                 "is a file"):
        assert part in err, part
    assert cli.main(["export", str(tmp_path / "nowhere"), "--format", "kohya", "--out", str(tmp_path / "k"),
                     "--merge-lora", f"{tiny_model}:abc"]) == 2
    err = capsys.readouterr().err
    assert "`dreambooth export` has 2 problems" in err and "the weight 'abc'" in err and "nowhere" in err
    assert cli.main(["evaluate", "--real", str(tmp_path / "nowhere"), "--images", str(tmp_path / "none"),
                     "--identifier", "sks", "--class-word", "dog", "--clip", str(tiny_model / "text_encoder"),
                     "--seed", "2"]) == 2
    err = capsys.readouterr().err
    assert "`dreambooth evaluate` has 4 problems" in err
    for part in ("--real", "--images", "a text encoder without CLIP's vision tower", "Drop them, or use --model"):
        assert part in err, part
