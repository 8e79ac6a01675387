"""A command's settings as a typed dataclass whose fields are its command-line options, each declared once.

A field's `option(...)` holds its flag, help, default, choices and range; its annotation gives the type (`Path`,
`int`, `float`, `str`, `bool` for a switch, `list[...]` for a repeatable option, `X | None` when it may be
unset). `add_options` turns the fields into argparse arguments, `settings_from` turns the parsed arguments
back into the dataclass and reports a value out of range as argparse reports a bad value (exit status 2, the
flag named). Torch-free, so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import difflib
import math
import typing
from dataclasses import MISSING, Field, field, fields
from typing import Any

from dreambooth.errors import UserError


def option(default: Any = MISSING, *, help: str, flags: tuple[str, ...] = (), minimum: float | None = None,
           below: str | None = None, choices: tuple[Any, ...] | None = None, positional: bool = False,
           metavar: str | None = None, one_of: str | None = None) -> Any:
    """A dataclass field that is also a command-line option.

    No default: a required option. `flags`: the option's flags [default: --field-name]. `minimum`: the least
    value (of each value, for a repeatable option); `below` says what is wrong with a smaller one, after the
    flag and the value. `one_of`: options with the same name form a group of which exactly one is given.
    """
    metadata = {"help": help, "flags": flags, "minimum": minimum, "below": below, "choices": choices,
                "positional": positional, "metavar": metavar, "one_of": one_of}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flags_of(f: Field) -> tuple[str, ...]:
    """The flags of a field; a positional argument is named by its field in capitals."""
    if f.metadata.get("positional"):
        return (f.name.upper(),)
    return f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)


def value_type(annotation: Any) -> tuple[type, bool]:
    """The type of one value and whether the option repeats: list[int] -> (int, True), Path | None -> (Path, False)."""
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return (args[0] if args else annotation), False


def whole_number(text: str) -> int:
    """argparse's type for an int option, whose error says what was expected."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def help_text(cls: type, f: Field) -> str:
    """The field's help with its default, unless the help already says it or there is none to show.

    A settings class may reword its options' help with a `help_for(name, text)` classmethod.
    """
    text = f.metadata["help"]
    default = default_of(f)
    unset = default is MISSING or default is None or default is False or default in ("", [])  # 0 is shown
    if "[default" not in text and not unset:
        shown = f" [default: {default}]"
        text = f"{text[:-1]}{shown}." if text.endswith(".") else text + shown
    reword = getattr(cls, "help_for", None)
    return reword(f.name, text) if reword else text


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse argument per field of the settings dataclass `cls`, as its `option` declares it."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in fields(cls):
        meta = f.metadata
        kind, repeated = value_type(hints[f.name])
        kw: dict[str, Any] = {"help": help_text(cls, f)}
        kw.update({k: meta[k] for k in ("choices", "metavar") if meta[k] is not None})
        if meta["positional"]:
            parser.add_argument(f.name, type=kind, **kw)
            continue
        if kind is bool:
            kw["action"] = "store_true"
        else:
            kw.update(type=whole_number if kind is int else kind, action="append" if repeated else "store")
            if "choices" not in kw:  # --seed SEED, not argparse's --seed SEEDS from the field's name
                kw.setdefault("metavar", flags_of(f)[0].lstrip("-").replace("-", "_").upper())
        target = parser
        if meta["one_of"]:
            if meta["one_of"] not in groups:
                groups[meta["one_of"]] = parser.add_mutually_exclusive_group(required=True)
            target = groups[meta["one_of"]]
        elif f.default is MISSING and f.default_factory is MISSING:
            kw["required"] = True
        target.add_argument(*flags_of(f), dest=f.name, **kw)


def problems(settings: Any) -> list[str]:
    """Each value outside its declared choices or range, named by its flag; empty when all are in."""
    found = []
    for f in fields(settings):
        value, meta = getattr(settings, f.name), f.metadata
        if "help" not in meta:  # a plain field, not an option
            continue
        flag = flags_of(f)[0]
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            if isinstance(v, float) and not math.isfinite(v):  # float() reads nan and inf, and nan passes `minimum`
                found.append(f"{flag} {v} is not a finite number")
                break
            if meta["choices"] is not None and v not in meta["choices"]:
                found.append(f"{flag} {v!r} is not one of {', '.join(map(str, meta['choices']))}")
                break
            if meta["minimum"] is not None and v < meta["minimum"]:
                found.append(f"{flag} {v}: {meta['below']}" if meta["below"] else
                             f"{flag} must be at least {meta['minimum']} (got {v})")
                break
    return found


def check_settings(settings: Any) -> Any:
    """The same checks for settings built in code (a notebook, `evaluate` handing `generate` its options) as for a
    command line: a value out of its declared range is a UserError naming the flag."""
    wrong = problems(settings)
    if wrong:
        raise UserError("; ".join(wrong) + ".")
    return settings


def settings_from(cls: type, args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The parsed arguments as `cls`, an option not given keeping its field's default; a value out of range ends
    the command as argparse ends it for a bad value: the message on stderr, exit status 2."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    settings = cls(**given)
    wrong = problems(settings)
    if wrong:
        parser.error("; ".join(wrong))
    return settings


def parse_settings(cls: type, argv: list[str] | None, prog: str) -> Any:
    """`cls` from a command line of its options alone (a script's); its docstring's first line heads --help."""
    parser = Parser(prog=prog, description=(cls.__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    add_options(parser, cls)
    parser.add_spellings()
    return settings_from(cls, parser.parse_args(argv), parser)


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
    without being shown. A sub-command whose defaults hold `forwarded` takes the arguments it does not know
    there, in order: a command that parses its own (a developer script's).
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
        if getattr(parsed, "forwarded", None) is not None:
            parsed.forwarded = extras
        elif extras:
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
