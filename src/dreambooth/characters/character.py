"""The character file, `characters.yaml`: each character's model, identity, look, defaults and seed policy,
validated in full at start-up with every problem reported at once, like the training config.

```yaml
characters:
  - name: saya
    model: output                      # a full model folder, or the base model of `loras`
    loras: [{file: saya.safetensors, weight: 0.9}]
    identifier: "<saya>"
    class_word: girl
    appearance: [long black hair, red scarf]
    style: anime illustration
    negative_prompt: blurry, extra fingers
    seed_policy: state                 # `state`: the same state draws the same picture; `fixed`: always `seed`
```

Paths are relative to the file's folder. `vocabulary:` overrides the shipped words (vocabulary.yaml) for one
character.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dreambooth.errors import UserError
from dreambooth.models.base import SCHEDULERS


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: Path
    weight: float = 1.0


class Character(BaseModel):
    """One character: how to draw it, and the defaults of every picture of it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    model: str
    loras: list[LoraRef] = Field(default_factory=list)
    identifier: str = Field(min_length=1)
    class_word: str = Field(min_length=1)
    prompt_template: str = "a photo of {identifier} {class_word}"
    appearance: list[str] = Field(default_factory=list)
    style: str | None = None
    negative_prompt: str = ""
    width: int = Field(512, ge=64, le=2048)
    height: int = Field(512, ge=64, le=2048)
    steps: int = Field(30, ge=1, le=150)
    guidance: float = Field(7.5, ge=0.0, le=30.0)
    scheduler: str = "dpm++"
    seed_policy: Literal["state", "fixed"] = "state"
    seed: int = Field(0, ge=0)
    vocabulary: dict[str, Any] = Field(default_factory=dict)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (the VAE needs sides divisible by 8)")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in SCHEDULERS and not value.endswith("Scheduler"):
            raise ValueError(f"unknown scheduler {value!r}; use one of {', '.join(SCHEDULERS)} or a diffusers "
                             "scheduler class name")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _template_holds_the_identity(cls, value: str) -> str:
        missing = [k for k in ("{identifier}", "{class_word}") if k not in value]
        if missing:
            raise ValueError(f"must contain {' and '.join(missing)}: the identity is what draws the character")
        return value


def shipped_vocabulary() -> dict:
    """The vocabulary that ships with the tool (vocabulary.yaml beside this module)."""
    text = resources.files("dreambooth.characters").joinpath("vocabulary.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def merged_vocabulary(character: Character, base: dict | None = None) -> dict:
    """The shipped vocabulary with the character's own `vocabulary:` merged over it, slot by slot."""
    base = base if base is not None else shipped_vocabulary()
    own = character.vocabulary
    return {part: {slot: {**(base.get(part, {}).get(slot) or {}), **(own.get(part, {}).get(slot) or {})}
                   for slot in dict.fromkeys([*base.get(part, {}), *own.get(part, {})])}  # the file's order
            for part in ("slots", "words")}


def _vocabulary_problems(character: Character, where: str, slots: dict) -> list[str]:
    problems = []
    for part, entries in character.vocabulary.items():
        if part not in ("slots", "words") or not isinstance(entries, dict):
            problems.append(f"{where}.vocabulary.{part}: expected the sections slots and words")
            continue
        for slot, value in entries.items():
            if slot not in slots:
                close = difflib.get_close_matches(slot, slots, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{where}.vocabulary.{part}.{slot}: no such slot{hint}")
            elif not isinstance(value, dict):
                problems.append(f"{where}.vocabulary.{part}.{slot}: expected a mapping")
    return problems


def load_characters(path: Path) -> dict[str, Character]:
    """Every character of a characters.yaml by name; a UserError listing every problem of the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"characters file {path} does not exist; `dreambooth init DIR` writes one.") from None
    except yaml.YAMLError as e:
        raise UserError(f"characters file {path} is not valid YAML: {e}") from None
    entries = data.get("characters") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"characters file {path} must hold `characters:`, a list of at least one character.")
    slots = shipped_vocabulary()["slots"]
    characters, problems = {}, []
    for i, entry in enumerate(entries):
        named = isinstance(entry, dict) and entry.get("name")
        where = f"characters[{i}]" + (f" ({entry['name']})" if named else "")
        try:
            character = Character.model_validate(entry)
        except ValidationError as e:
            problems += [f"{where}.{'.'.join(map(str, err['loc'])) or 'entry'}: {err['msg']}" for err in e.errors()]
            continue
        problems += _vocabulary_problems(character, where, slots)
        if character.name in characters:
            problems.append(f"{where}.name: {character.name} is the name of an earlier character too")
        characters[character.name] = _resolved(character, path.parent)
    if problems:
        raise UserError(f"{path} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return characters


def _resolved(character: Character, base: Path) -> Character:
    """Relative model and LoRA paths made absolute against the file's folder; a hub id stays one."""
    from dreambooth.config_file import resolve_model_ref

    loras = [LoraRef(file=lora.file if lora.file.is_absolute() else (base / lora.file).resolve(), weight=lora.weight)
             for lora in character.loras]
    return character.model_copy(update={"model": resolve_model_ref(character.model, base), "loras": loras})
