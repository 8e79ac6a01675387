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
import sys
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
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


@dataclass(frozen=True)
class Refused:
    """A value that did not read as its option's type; kept, so that every problem of a command line is reported
    in one message instead of argparse stopping at the first."""

    text: str
    why: str


def whole_number(text: str) -> int | Refused:
    """argparse's type for an int option."""
    try:
        return int(text)
    except ValueError:
        return Refused(text, "is not a whole number")


def finite_number(text: str) -> float | Refused:
    """argparse's type for a float option: NaN and infinity are refused, since no limit or range check can hold
    for them (NaN compares false with everything, so it would pass every one)."""
    try:
        value = float(text)
    except ValueError:
        return Refused(text, "is not a number")
    return value if math.isfinite(value) else Refused(text, "is not a finite number")


VALUE_TYPES = {int: whole_number, float: finite_number}


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


def is_required(f: Field) -> bool:
    """An option without a default must be given (a `one_of` group is checked as a group)."""
    return f.default is MISSING and f.default_factory is MISSING and not f.metadata.get("one_of")


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse argument per field of the settings dataclass `cls`, as its `option` declares it.

    argparse is told neither the types' failures, nor the choices, nor what is required: it would stop at the first
    such problem, and `settings_from` reports them all at once, with the unknown flags, in one message.
    """
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata
        kind, repeated = value_type(hints[f.name])
        kw: dict[str, Any] = {"help": help_text(cls, f) + (" (required)" if is_required(f) else "")}
        if meta["choices"] is not None:
            kw["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
        if meta["metavar"] is not None:
            kw["metavar"] = meta["metavar"]
        if meta["positional"]:
            parser.add_argument(f.name, type=VALUE_TYPES.get(kind, kind), nargs="?", **kw)
            continue
        if kind is bool:
            kw["action"] = "store_true"
        else:
            kw.update(type=VALUE_TYPES.get(kind, kind), action="append" if repeated else "store")
            # --seed SEED, not argparse's --seed SEEDS from the field's name
            kw.setdefault("metavar", flags_of(f)[0].lstrip("-").replace("-", "_").upper())
        parser.add_argument(*flags_of(f), dest=f.name, **kw)


def value_problems(cls: type, values: dict[str, Any]) -> list[str]:
    """Each value that did not read as its type, or is outside its declared choices or range, or not finite, named
    by its flag; every required option missing; a `one_of` group given none or several times. Empty when all hold."""
    found, groups = [], {}
    for f in fields(cls):
        meta = f.metadata
        if "help" not in meta:  # a plain field, not an option
            continue
        flag, value = flags_of(f)[0], values.get(f.name)
        if meta["one_of"]:
            groups.setdefault(meta["one_of"], []).append((flag, value))
        if value is None and is_required(f):
            found.append(f"{flag} is required" + (f" (one of {', '.join(map(str, meta['choices']))})"
                                                  if meta["choices"] else ""))
        for v in value if isinstance(value, list) else [value]:
            problem = _value_problem(flag, meta, v)
            if problem:
                found.append(problem)
                break
    for flag_values in groups.values():
        given = [flag for flag, value in flag_values if value is not None]
        if len(given) != 1:
            flags = " or ".join(flag for flag, _ in flag_values)
            found.append(f"give one of {flags}" + (f", not {len(given)} ({', '.join(given)})" if given else ""))
    return found


def _value_problem(flag: str, meta: dict, v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, Refused):
        return f"{flag} {v.text!r} {v.why}"
    if isinstance(v, float) and not math.isfinite(v):
        return f"{flag} {v} is not a finite number"
    if meta["choices"] is not None and v not in meta["choices"]:
        close = difflib.get_close_matches(str(v), list(map(str, meta["choices"])), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{flag} {v!r} is not one of {', '.join(map(str, meta['choices']))}{hint}"
    if meta["minimum"] is not None and v < meta["minimum"]:
        return (f"{flag} {v}: {meta['below']}" if meta["below"] else
                f"{flag} must be at least {meta['minimum']} (got {v})")
    return None


def problems(settings: Any) -> list[str]:
    """`value_problems` of a settings object."""
    return value_problems(type(settings), {f.name: getattr(settings, f.name) for f in fields(settings)})


def check_settings(settings: Any) -> Any:
    """The same checks for settings built in code (a notebook, `evaluate` handing `generate` its options) as for a
    command line: a value out of its declared range is a UserError naming the flag."""
    wrong = problems(settings)
    if wrong:
        raise UserError("; ".join(wrong) + ".")
    return settings


def settings_from(cls: type, args: argparse.Namespace, parser: Parser) -> Any:
    """The parsed arguments as `cls`, an option not given keeping its field's default. Every problem of the command
    line (unknown flags, values that are not their type, out of range or not among the choices, required options
    missing) ends the command in one message, as argparse ends it for a bad value: on stderr, exit status 2."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    wrong = parser.unrecognized(getattr(args, "unrecognized", [])) + value_problems(cls, given)
    if wrong:
        parser.error("; ".join(wrong))
    return cls(**given)


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
        """Unknown arguments are kept in `unrecognized` (or handed on whole as `forwarded`, to a command that parses
        its own): `settings_from` reports them with every other problem of the command line."""
        argv = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(argv, namespace)
        parsed.argv = argv  # as typed: a message that says how to continue repeats it
        if getattr(parsed, "forwarded", None) is not None:
            parsed.forwarded = extras
        else:
            parsed.unrecognized = extras
        return parsed

    def subcommand(self, name: str | None) -> Parser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return self

    def unrecognized(self, extras: list[str]) -> list[str]:
        """The problem of arguments this parser does not know, with a "did you mean" for each close flag; [] for
        none."""
        if not extras:
            return []
        known = {f.replace("-", "_"): f for a in self._actions for f in a.option_strings if f.startswith("--")}
        hints = []
        for word in extras:
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=", 1)[0].replace("-", "_"), known, n=1, cutoff=0.75)
                hints += [f"{word} -> {known[close[0]]}"] if close else []
        hint = f" (did you mean: {'; '.join(hints)}?)" if hints else ""
        return [f"unrecognized arguments: {' '.join(extras)}{hint}"]

    def error(self, message: str):
        """The message and where to read about the options; the `train` usage line alone runs to pages."""
        self.exit(2, f"{self.prog}: error: {message}\nSee `{self.prog} --help` for its options.\n")
