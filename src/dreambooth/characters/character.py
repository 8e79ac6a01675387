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

import copy
import functools
import string
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from dreambooth.characters.state import CharacterState, problem_text
from dreambooth.config_file import read_text, resolve_model_ref
from dreambooth.errors import UserError
from dreambooth.models.base import SCHEDULERS, native_side

MAX_SEED = 2**53 - 1  # seeds travel through JSON, whose numbers are exact up to 2**53
MAX_GUIDANCE = 30.0  # a character's and a request's alike, so that a character's own guidance is always one to ask for
SLOTS = ("appearance", "emotion", "expression", "gaze", "action", "outfit", "shot", "location", "time_of_day",
         "lighting", "style", "extra")
CLOSED = ("emotion", "gaze", "shot", "time_of_day", "lighting")  # the state's enums


class SlotSpec(BaseModel):
    """A slot of the vocabulary: how late it is dropped, and whether the emotion's intensity weights it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    priority: int | None = None
    emphasis: bool | None = None


class Vocabulary(BaseModel):
    """slots: {slot: SlotSpec}; words: {slot: {value: words}}; joiner: the text between fragments. A character's is
    merged over the shipped one."""

    model_config = ConfigDict(extra="forbid")

    joiner: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=8)] | None = None

    slots: dict[Literal[SLOTS], SlotSpec] = Field(default_factory=dict)  # type: ignore[valid-type]
    words: dict[Literal[SLOTS], dict[str, Annotated[str, StringConstraints(strict=True)]]] = Field(  # type: ignore
        default_factory=dict)

    @field_validator("words")
    @classmethod
    def _closed_slots_name_their_values(cls, words: dict) -> dict:
        for slot, entries in words.items():
            if slot not in CLOSED:
                continue
            allowed = set(typing.get_args(typing.get_args(CharacterState.model_fields[slot].annotation)[0]))
            unknown = sorted(set(entries) - allowed)
            if unknown:
                raise ValueError(f"words.{slot}: {', '.join(unknown)} is not a value of {slot} (one of "
                                 f"{', '.join(sorted(allowed))})")
        return words


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN weight draws noise

    file: Path
    weight: float = 1.0


class Character(BaseModel):
    """One character: how to draw it, and the defaults of every picture of it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # YAML's .nan and .inf are numbers to it

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    model: str
    loras: list[LoraRef] = Field(default_factory=list)
    identifier: str
    class_word: str
    prompt_template: str = "a photo of {identifier} {class_word}"
    appearance: list[str] = Field(default_factory=list)
    style: str | None = None
    negative_prompt: str | None = ""
    # None: the side its model was made for (SD 1.x 512, SD 2.x 768, SDXL, Flux and SD3 1024), filled in by
    # load_characters
    width: int | None = Field(None, ge=8, le=2048)
    height: int | None = Field(None, ge=8, le=2048)
    # None: its model's family's, as `dreambooth generate` takes them (SD 30 steps at 7.5, Flux.1 dev 28 at 3.5,
    # Flux.1 schnell 4 without guidance, SD3 28 at 7.0; dpm++, or a flow-matching model's own sampler), filled in by
    # load_characters
    steps: int | None = Field(None, ge=1, le=150)
    guidance: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE)
    scheduler: str | None = None
    seed_policy: Literal["state", "fixed"] = "state"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    vocabulary: Vocabulary = Field(default_factory=Vocabulary)

    @field_validator("identifier", "class_word")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty: the identity is what draws the character")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (the VAE needs sides divisible by 8)")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        if value is not None and value not in SCHEDULERS and not value.endswith("Scheduler"):
            raise ValueError(f"unknown scheduler {value!r}; use one of {', '.join(SCHEDULERS)} or a diffusers "
                             "scheduler class name")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _template_holds_the_identity(cls, value: str) -> str:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as e:
            raise ValueError(f"{e} (write a literal brace as {{{{ or }}}})") from None
        other = sorted(set(names) - {"identifier", "class_word"})
        if other:
            raise ValueError(f"{{{other[0]}}} is not a field it can hold; only {{identifier}} and {{class_word}}")
        missing = [f"{{{k}}}" for k in ("identifier", "class_word") if k not in names]
        if missing:
            raise ValueError(f"must contain {' and '.join(missing)}: the identity is what draws the character")
        return value


def shipped_vocabulary() -> dict:
    """The vocabulary that ships with the tool (vocabulary.yaml beside this module); a copy of it, parsed once (a
    parse took 11 ms, nearly all of a compile, which the service runs for every request)."""
    return copy.deepcopy(_parsed_vocabulary())


@functools.lru_cache(maxsize=1)
def _parsed_vocabulary() -> dict:
    text = resources.files("dreambooth.characters").joinpath("vocabulary.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def merged_vocabulary(character: Character, base: dict | None = None) -> dict:
    """The shipped vocabulary with the character's own merged over it, slot by slot, in the shipped order."""
    base = base if base is not None else shipped_vocabulary()
    own = character.vocabulary.model_dump(exclude_none=True)
    merged = {part: {slot: {**(base.get(part, {}).get(slot) or {}), **(own.get(part, {}).get(slot) or {})}
                     for slot in dict.fromkeys([*base.get(part, {}), *own.get(part, {})])}
              for part in ("slots", "words")}
    merged["joiner"] = own.get("joiner", base.get("joiner", ", "))
    return merged


def _lora_path(file: Path, base: Path) -> Path:
    file = Path(file).expanduser()
    return file if file.is_absolute() else (base / file).resolve()


def _missing_files(entry: dict, base: Path, where: str) -> list[str]:
    """The model folder and LoRA files a character names that are not there, read from the entry as written (as
    `_resolved` resolves them), so that they are reported beside its other problems."""
    problems = []
    model = entry.get("model")
    if isinstance(model, str) and model:
        resolved = Path(resolve_model_ref(model, base))
        if resolved.is_absolute() and not resolved.exists():  # a hub id stays relative
            problems.append(f"{where}.model: {resolved} does not exist")
    for i, lora in enumerate(entry.get("loras") or []):
        file = lora.get("file") if isinstance(lora, dict) else None
        if isinstance(file, str) and not _lora_path(file, base).exists():
            problems.append(f"{where}.loras[{i}].file: {_lora_path(file, base)} does not exist")
    return problems


def load_characters(path: Path) -> dict[str, Character]:
    """Every character of a characters.yaml by name; a UserError listing every problem of the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(read_text(path, "characters file", " `dreambooth init DIR` writes one.")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"characters file {path} is not valid YAML: {e}") from None
    entries = data.get("characters") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"characters file {path} must hold `characters:`, a list of at least one character.")
    characters, problems, names = {}, [], []
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"characters[{i}]" + (f" ({name})" if name else "")
        if name is not None and name in names:
            problems.append(f"{where}.name: {name} is the name of an earlier character too")
        names.append(name)
        if isinstance(entry, dict):
            problems += _missing_files(entry, path.parent, where)
        try:
            character = _resolved(Character.model_validate(entry), path.parent)
        except ValidationError as e:
            problems += [f"{where}.{'.'.join(map(str, err['loc'])) or 'entry'}: {problem_text(err)}"
                         for err in e.errors()]
            continue
        characters.setdefault(character.name, with_family_defaults(sized(character)))
    if problems:
        raise UserError(f"{path} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return characters


def sized(character: Character, side: int | None = None) -> Character:
    """The character with a width or height it does not give set to `side`, the side its model was made for (SD
    1.x 512, SD 2.x 768, SDXL 1024: an SDXL model drawn at SD's 512 px draws badly), by default read from the model's
    config files; unchanged when they are not on this machine (a hub id not in the cache: the service fills it in
    once the model has loaded)."""
    if character.width is not None and character.height is not None:
        return character
    side = side or native_side(character.model)
    if side is None:
        return character
    return character.model_copy(update={"width": character.width or side, "height": character.height or side})


def _resolved(character: Character, base: Path) -> Character:
    """Relative model and LoRA paths made absolute against the file's folder; a hub id stays one."""
    loras = [LoraRef(file=_lora_path(lora.file, base), weight=lora.weight) for lora in character.loras]
    return character.model_copy(update={"model": resolve_model_ref(character.model, base), "loras": loras})


def family_defaults(family, pipe) -> dict:
    """What a drawing of `family` takes when it is not told: its `Behaviour.draw_defaults` steps and guidance, as
    `dreambooth generate` takes them, and the sampler `models.loading.make_scheduler` picks for no name (dpm++ for the
    diffusion objective, the model's own flow-matching sampler for Flux and SD3). `pipe`: the loaded pipeline, or
    what of it draw_defaults reads (its denoiser's config)."""
    from dreambooth.models.loading import FLOW_SCHEDULER

    defaults = family.behaviour().draw_defaults(pipe)
    return {"steps": defaults["steps"], "guidance": defaults["guidance"],
            "scheduler": FLOW_SCHEDULER if family.objective == "flow" else "dpm++"}


def folder_defaults(model: str) -> dict | None:
    """`family_defaults` of a model from its config files alone (draw_defaults reads the pipeline's denoiser config:
    Flux.1 schnell's transformer has no guidance embedding, and draws without guidance); None when they are not on
    this machine."""
    from types import SimpleNamespace

    from dreambooth.models.base import config_folder
    from dreambooth.models.families import folder_family, read_json

    folder = config_folder(model)
    family = folder_family(folder) if folder is not None else None
    if family is None:
        return None
    config = read_json(folder / family.denoiser / "config.json") or {}
    denoiser = SimpleNamespace(config=SimpleNamespace(**config))
    return family_defaults(family, SimpleNamespace(**{family.denoiser: denoiser}))


def with_family_defaults(character: Character, defaults: dict | None = None) -> Character:
    """The character with the steps, guidance and sampler it does not give set to its model's family's
    (`family_defaults`), by default read from the model's config files; unchanged when they are not on this machine
    (a hub id not in the cache: the service fills them in once the model has loaded)."""
    unset = [key for key in ("steps", "guidance", "scheduler") if getattr(character, key) is None]
    if not unset:
        return character
    defaults = defaults or folder_defaults(character.model)
    if defaults is None:
        return character
    return character.model_copy(update={key: defaults[key] for key in unset})
