"""A config file and the flags given over it, read into the typed `config.Config`, and written back.

`load_config` merges the YAML and the flags, makes every path absolute once (paths in the file are relative to
the file's folder, flags' to the working directory), fills prompts from files and defaults, and validates
everything before any weights load, reporting every problem at once, each under its dotted key.
"""

from __future__ import annotations

import difflib
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dreambooth.config import (
    DEFAULT_MAX_TRAIN_STEPS,
    RENAMED_KEYS,
    SECTION_TYPES,
    Config,
    all_keys,
    cross_check,
    optimizer_problems,
)
from dreambooth.errors import UserError
from dreambooth.models.base import HUB_ID


def read_text(path: Path, what: str, missing: str = "") -> str:
    """A text file the user names, or a UserError saying why it cannot be read (`missing`: what to do then)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist.{missing}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder; give the file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read as UTF-8 text: {e}") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """Reads a config file; a missing or unreadable file or broken YAML is the user's to fix."""
    text = read_text(path, "config file", " Create one with `dreambooth init DIR`, or pass the options as flags.")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping with sections {', '.join(SECTION_TYPES)}.")
    return data


PATH_KEYS = {("dataset", "instance_dir"), ("dataset", "class_dir"), ("output", "output_dir")}
MODEL_KEYS = {("model", "pretrained_model"), ("model", "tokenizer_name"), ("model", "pretrained_vae")}


def resolve_model_ref(value: str, base: Path) -> str:
    """A model given as a folder or a hub id: a folder is made absolute against `base`; an 'org/name' that is no
    folder there stays a hub id. `./name` and `../name` are always folders."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = base / path
    if candidate.exists() or not HUB_ID.match(value) or value.startswith((".", "~")):
        return os.path.abspath(candidate)
    return value


def _resolve_value(section: str, key: str, value: Any, base: Path) -> Any:
    """One config value with its path made absolute against `base`, so that every later use reads the same path."""
    if not isinstance(value, str | Path):
        return value
    if (section, key) in PATH_KEYS:
        return os.path.abspath(base / Path(value).expanduser())
    if (section, key) in MODEL_KEYS:
        return resolve_model_ref(str(value), base)
    if (section, key) == ("output", "resume_from_checkpoint") and value != "latest":
        # A bare name such as `checkpoint-400` means that folder in output_dir (diffusers' meaning), unless it
        # names a folder here.
        if (base / value).exists() or os.sep in str(value) or "/" in str(value):
            return os.path.abspath(base / Path(value).expanduser())
    return value


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Paths written in a config file are relative to that file's folder, not to where the command runs; paths of
    defaults and flags are relative to the working directory. Each is made absolute once, here."""
    for section, key in PATH_KEYS:
        values = data.setdefault(section, {})
        if isinstance(values, dict) and key not in values:
            values[key] = str(SECTION_TYPES[section].model_fields[key].default)
    for section, values in data.items():
        if section in SECTION_TYPES and isinstance(values, dict):
            for key, value in values.items():
                values[key] = _resolve_value(section, key, value, base)
    for subject in data.get("subjects") or []:
        for key in ("instance_dir", "class_dir"):
            if isinstance(subject, dict) and isinstance(subject.get(key), str):
                subject[key] = os.path.abspath(base / Path(subject[key]).expanduser())


def _prior_preservation(data: dict[str, Any], file_data: dict[str, Any], from_flags: set[str]) -> str | None:
    """Fills an unset dataset.with_prior_preservation; returns the sentence that tells the user why.

    The config file's schema has no switch (docs/design.md): a config file that names a class folder describes a
    run with prior preservation. diffusers' flags keep their meaning: off unless --with_prior_preservation.
    """
    ds = data.setdefault("dataset", {})
    if not isinstance(ds, dict) or ds.get("with_prior_preservation") is not None:
        return None
    file_ds = file_data.get("dataset") if isinstance(file_data.get("dataset"), dict) else {}
    named_in_file = file_ds.get("class_dir") is not None or any(
        isinstance(s, dict) and s.get("class_dir") for s in file_data.get("subjects") or [])
    ds["with_prior_preservation"] = named_in_file
    if named_in_file:
        return ("prior preservation: on, because the config file names a class folder (dataset.class_dir); set "
                "dataset.with_prior_preservation: false to train without class images")
    if "dataset.class_dir" in from_flags:
        return ("prior preservation: off, as in diffusers' script: --class_data_dir is given without "
                "--with_prior_preservation, which turns it on")
    return None


def _read_prompt_file(path: Path) -> str | None:
    """First non-empty, non-comment line of a prompts file."""
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    return None


def _default_prompts(values: dict[str, Any], ident: Any, word: Any) -> None:
    """Missing prompts from the identifier and class word; {identifier}/{class_word} filled in every prompt."""
    if not values.get("instance_prompt") and ident and word:
        values["instance_prompt"] = "a photo of {identifier} {class_word}"
    if not values.get("class_prompt") and word:
        values["class_prompt"] = "a photo of a {class_word}"
    for key in ("instance_prompt", "class_prompt"):
        if isinstance(values.get(key), str):
            values[key] = values[key].replace("{identifier}", str(ident or "")).replace("{class_word}",
                                                                                       str(word or ""))


def _fill_subject_prompts(subject: dict[str, Any]) -> None:
    """A listed subject's prompts and initializer default from its own identifier and class word."""
    _default_prompts(subject, subject.get("identifier"), subject.get("class_word"))
    if not subject.get("initializer") and subject.get("class_word"):
        subject["initializer"] = subject["class_word"]


def _fill_prompts(data: dict[str, Any], base: Path | None) -> None:
    """Default prompts: prompts/*.txt beside the config, else built from the identifier and class word."""
    ds, tok = data.setdefault("dataset", {}), data.get("token") or {}
    for key, filename in (("instance_prompt", "instance.txt"), ("class_prompt", "class.txt")):
        if not ds.get(key) and base is not None:
            ds[key] = _read_prompt_file(base / "prompts" / filename)
    _default_prompts(ds, tok.get("identifier"), tok.get("class_word"))


def _dataset_folder(data: dict[str, Any], file_data: dict[str, Any], overrides: dict[str, Any],
                    base: Path | None) -> list[str]:
    """diffusers' --dataset_name as this tool reads it: a local folder in the imagefolder layout becomes the instance
    folder (a relative name is read from the config file's folder, or the working folder for a flag)."""
    ds = data.get("dataset")
    if not isinstance(ds, dict) or not ds.get("dataset_name"):
        return []
    name = str(ds["dataset_name"])
    folder = Path(name).expanduser()
    if not folder.is_absolute():
        folder = (Path.cwd() if "dataset.dataset_name" in overrides or base is None else base) / folder
    if not folder.is_dir():
        return [f"dataset.dataset_name: '{name}' is not a folder here. It is read as a local folder in the `datasets` "
                "imagefolder layout (the photos and a metadata.jsonl naming each file_name with its caption); "
                "datasets on the Hugging Face hub are not downloaded. Put the photos in a folder and pass it as "
                "--instance_data_dir (or as --dataset_name, with a metadata.jsonl of their captions)"]
    given = "dataset.instance_dir" in overrides or "instance_dir" in (file_data.get("dataset") or {})
    if given and Path(ds.get("instance_dir", "")).resolve() != folder.resolve():
        return [f"dataset.dataset_name: {folder} and dataset.instance_dir {ds.get('instance_dir')} both name the "
                "subject's photos; pass one of them"]
    ds["instance_dir"] = folder
    return []


def _format_error(err: dict[str, Any]) -> list[str]:
    """One pydantic error as lines naming the dotted key, with the closest valid key for a typo."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        candidates = list(SECTION_TYPES) if len(loc) == 1 else [
            k.split(".", 1)[1] for k in all_keys() if k.startswith(loc[0] + ".")]
        close = difflib.get_close_matches(loc[-1], candidates, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(loc[:-1] + close)}'?" if close else ""
        return [f"{key}: unknown key{hint}"]
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    if err["type"] == "finite_number":  # worded as the flags and the service word it
        return [f"{key}: {got!r} is not a finite number"]
    return [f"{key}: {err['msg'][0].lower() + err['msg'][1:]}{shown}"]


@dataclass
class ConfigReading:
    """A config read as far as it goes. `config` holds every key that has a problem at its default, and `broken`
    names those keys, so that pre-flight can run every check that reads none of them in the same pass: one run of
    the command reports every problem, whatever else failed."""

    config: Config
    problems: list[str]
    broken: set[str]
    where: str  # " in PATH" for a config file, "" for flags alone


def _key_of(problem: str) -> str:
    """The dotted key a problem line starts with ('training.learning_rate: ...'); a subject's is 'subjects'."""
    return "subjects" if problem.startswith("subjects") else problem.split(":", 1)[0].split(" ", 1)[0]


def _drop(data: dict[str, Any], loc: tuple) -> None:
    """Removes the value at a pydantic error's location, so that the key takes its default on the next pass."""
    parent, *rest = loc
    if not rest or parent not in SECTION_TYPES and parent != "subjects":
        data.pop(parent, None)
    elif parent == "subjects" and isinstance(data.get("subjects"), list) and isinstance(rest[0], int):
        data["subjects"][rest[0]] = None  # kept in place so that later indices still match; dropped below
    elif isinstance(data.get(parent), dict):
        data[parent].pop(rest[0], None)


def _validate_what_holds(data: dict[str, Any]) -> tuple[Config, list[str]]:
    """The config of every value that validates, and one line per value that does not (its key then at the
    default). pydantic reports every field of one pass, so a second pass only confirms the rest holds."""
    lines = []
    for _ in range(3):
        try:
            return Config.model_validate(data), lines
        except ValidationError as e:
            for err in e.errors():
                lines += [line for line in _format_error(err) if line not in lines]
                _drop(data, tuple(err["loc"]))
            if isinstance(data.get("subjects"), list):
                data["subjects"] = [s for s in data["subjects"] if s is not None]
    return Config(), lines


def _renamed_keys(data: dict[str, Any]) -> list[str]:
    """A config file's keys under their old names (config.RENAMED_KEYS) moved to the new ones; a problem where both
    are given."""
    problems = []
    for old, new in RENAMED_KEYS.items():
        section, old_key = old.split(".")
        values = data.get(section)
        if not isinstance(values, dict) or old_key not in values:
            continue
        new_key = new.split(".")[1]
        if new_key in values:
            problems.append(f"{new}: the file gives both {old} (its old name) and {new}; keep {new} alone")
            values.pop(old_key)
            continue
        values[new_key] = values.pop(old_key)
    return problems


def read_config(path: Path | None = None, overrides: dict[str, Any] | None = None,
                unrecognized: list[str] | None = None) -> ConfigReading:
    """Config from an optional YAML file plus `{"section.key": value}` overrides, validated in full, as a
    ConfigReading: every problem (with `unrecognized`, the command line's unknown flags) and what still holds.

    A config file that cannot be read at all (missing, not YAML, not a mapping) raises UserError at once.
    """
    import copy

    data = read_yaml(path) if path is not None else {}
    for section, values in list(data.items()):
        if section in SECTION_TYPES and values is None:
            data[section] = {}
        elif section in SECTION_TYPES and not isinstance(values, dict):
            raise UserError(f"config file {path}: section '{section}' must be a mapping of keys to values, "
                            f"not {type(values).__name__}.")
    renamed = _renamed_keys(data)
    file_data = copy.deepcopy(data)
    base = path.resolve().parent if path is not None else None
    _resolve_paths(data, base or Path.cwd())
    overrides = overrides or {}
    for dotted, value in overrides.items():
        dotted = RENAMED_KEYS.get(dotted, dotted)
        if "." not in dotted:  # a whole top-level entry, such as `subjects`
            data[dotted] = value
            if dotted == "subjects" and isinstance(value, list):
                _resolve_paths({"subjects": value}, Path.cwd())
            continue
        section, key = dotted.split(".", 1)
        if not isinstance(data.get(section), dict):
            data[section] = {}
        data[section][key] = _resolve_value(section, key, value, Path.cwd())
    notes = [note] if (note := _prior_preservation(data, file_data, set(overrides))) else []
    dataset_problems = _dataset_folder(data, file_data, overrides, base)
    _fill_prompts(data, base)
    for subject in data.get("subjects") or []:
        if isinstance(subject, dict):
            _fill_subject_prompts(subject)
    checked = cross_check(data)
    cfg, lines = _validate_what_holds(data)
    lines = list(unrecognized or []) + renamed + lines + checked + dataset_problems
    cfg = resolve_defaults(cfg)
    cfg.notes = notes
    lines += [line for line in identifier_problems(cfg) if line not in lines]
    lines += optimizer_problems(cfg.training, {RENAMED_KEYS.get(k, k) for k in overrides}, {_key_of(x) for x in lines})
    return ConfigReading(cfg, lines, {_key_of(line) for line in lines},
                         f" in {path}" if path is not None else "")


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Config from an optional YAML file plus `{"section.key": value}` overrides, validated in full.

    Raises UserError listing every problem at once.
    """
    reading = read_config(path, overrides)
    if reading.problems:
        raise UserError(f"the training config{reading.where} has {len(reading.problems)} problem(s):\n  - "
                        + "\n  - ".join(reading.problems) + "\nFix these keys (in the YAML or as --flags) and run "
                        "again.") from None
    return reading.config


def resolve_defaults(cfg: Config) -> Config:
    """Fills the values that depend on others, so the recorded config is exactly what ran."""
    t = cfg.training
    if t.seed is None:
        t.seed = random.SystemRandom().randrange(2**31)
    if t.max_train_steps is None and t.num_train_epochs is None:
        t.max_train_steps = DEFAULT_MAX_TRAIN_STEPS
    if t.text_encoder_lr is None:
        t.text_encoder_lr = t.learning_rate
    if cfg.dataset.with_prior_preservation is None:
        cfg.dataset.with_prior_preservation = False
    if cfg.token.identifier is None and not cfg.subjects:
        cfg.token.identifier = infer_identifier(cfg.dataset.instance_prompt, cfg.dataset.class_prompt)
    if cfg.token.initializer is None and cfg.token.class_word:
        cfg.token.initializer = cfg.token.class_word
    return cfg


# A new token is written in angle brackets (training.tokens.wants_new_token): '<zq>' in "a photo of <zq> dog".
NEW_TOKEN = re.compile(r"<[^<>\s]+>")


def new_tokens_in(instance_prompt: str, class_prompt: str | None) -> list[str]:
    """The new tokens an instance prompt writes that its class prompt lacks, each once, in order."""
    return [t for t in dict.fromkeys(NEW_TOKEN.findall(instance_prompt)) if t not in (class_prompt or "")]


def infer_identifier(instance_prompt: str | None, class_prompt: str | None) -> str | None:
    """The identifier when none is given: the one new token the instance prompt writes in angle brackets ('<zq>' in
    'a photo of <zq> dog'), else the instance prompt's words that the class prompt lacks ('sks' for 'a photo of sks
    dog' / 'a photo of dog'). None when neither tells (no class prompt, or several new tokens: a problem)."""
    if not instance_prompt:
        return None
    new = new_tokens_in(instance_prompt, class_prompt)
    if new:
        return new[0] if len(new) == 1 else None
    if not class_prompt:
        return None
    class_words = set(class_prompt.lower().split())
    extra = [w for w in instance_prompt.split() if w.lower() not in class_words]
    return " ".join(extra) or None


def identifier_problems(cfg: Config) -> list[str]:
    """An identifier that cannot be inferred because the instance prompt writes several new tokens."""
    prompt = cfg.dataset.instance_prompt
    if cfg.subjects or cfg.token.identifier or not prompt:
        return []
    new = new_tokens_in(prompt, cfg.dataset.class_prompt)
    if len(new) < 2:
        return []
    return [f"token.identifier: the instance prompt \"{prompt}\" writes {len(new)} new tokens ({', '.join(new)}), "
            "so which is the subject's is not clear; name it with --identifier (token.identifier)"]


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, loadable again by `dreambooth train --config`."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
