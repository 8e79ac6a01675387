"""The prompt compiler: (character, state) -> render request. A pure function: no model, no randomness, no clock.

The prompt is the character's identity (its `prompt_template`, which holds the identifier and class word), then
one fragment per state slot in the vocabulary's order, joined by the vocabulary's `joiner` (a comma and a space
unless a vocabulary says otherwise). When it would exceed the tokens its model reads (below), the fragment of the
lowest priority is dropped first, repeatedly, and the request says what was dropped; the identity is never dropped.
The emotion's intensity weights its words: each kept fragment comes with its weight (`fragments`), for a renderer
to build weighted embeddings from (compel's `FlattenedPrompt` takes such (text, weight) pairs as they are, so free
text needs no escaping of a prompt syntax). The seed is the character's own (`seed_policy: fixed`) or a hash of the
character and the state's values (`state`), so the same state always draws the same picture; seeds stay below
2**53, exact in JSON.

What fits is the family's (`Budget`, `family_budget`). SD 1.x/2.x and SDXL read a prompt through CLIP alone: 77
positions, start and end tokens included, so the whole prompt must fit 77 (SDXL: as both its CLIPs count it).
Flux.1 and SD3 read it through T5 as well, up to the `max_sequence_length` their pipeline is called with: diffusers'
own default (FluxPipeline 512, StableDiffusion3Pipeline 256), never more than the T5 tokenizer's `model_max_length`
(Flux.1 schnell's is 256, the length diffusers' documentation draws it with). T5 carries every fragment to the
transformer, so the whole prompt must fit T5's length; CLIP reads only the prompt's first 77 tokens (Flux: for its
pooled embedding alone; SD3: its pooled embeddings and its conditioning's first 77 positions). The identity opens
every prompt, so it must fit CLIP's 77; the fragments after it that CLIP does not reach are read by T5 alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from dreambooth.characters.character import Character, merged_vocabulary
from dreambooth.characters.state import CharacterState
from dreambooth.errors import UserError

SLOTS_IN_STATE = ("expression", "gaze", "action", "outfit", "shot", "location", "time_of_day", "lighting", "style")
EMPHASIS_RANGE = (0.7, 1.3)  # the weight at intensity 0 and at 1; 1.0 (no weight) at 0.5


@dataclass(frozen=True)
class Fragment:
    slot: str
    text: str
    priority: int
    weight: float = 1.0


@dataclass(frozen=True)
class RenderRequest:
    """Everything that decides a picture of a character, and how the prompt was made."""

    character: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    seed: int
    tokens: int
    fragments: list[dict] = field(default_factory=list)  # {slot, text, weight} of the prompt, in order
    dropped: list[dict] = field(default_factory=list)  # {slot, text}, in the order they went
    joiner: str = ", "  # the text between fragments: the prompt is joiner.join(fragment texts)


def _emphasis(intensity: float) -> float:
    low, high = EMPHASIS_RANGE
    return round(low + (high - low) * intensity, 2)


def fragments(character: Character, state: CharacterState, vocabulary: dict) -> list[Fragment]:
    """The state's fragments in prompt order (the identity not included), each with its priority and weight."""
    slots, words = vocabulary["slots"], vocabulary["words"]
    values: dict[str, list[str]] = {"appearance": [", ".join(character.appearance)] if character.appearance else [],
                                    "emotion": [state.emotion] if state.emotion else []}
    for slot in SLOTS_IN_STATE:
        value = getattr(state, slot)
        if slot == "style" and value is None:
            value = character.style
        values[slot] = [value] if value else []
    values["extra"] = [word for word in state.extra if word.strip()]
    found = []
    for slot, settings in slots.items():  # the vocabulary's order is the prompt's
        weight = _emphasis(state.intensity) if settings.get("emphasis") else 1.0
        for value in values.get(slot, []):
            text = str(words.get(slot, {}).get(value, value)).strip()
            if text:
                found.append(Fragment(slot, text, int(settings.get("priority", 0)), weight))
    return found


def render_text(identity: str, parts: list[Fragment], joiner: str = ", ") -> str:
    return joiner.join([identity, *(part.text for part in parts)])


def state_seed(character: Character, state: CharacterState) -> int:
    """The seed a state draws with: the character's own, or a hash of the character and the state."""
    if character.seed_policy == "fixed":
        return character.seed
    digest = hashlib.sha256(f"{character.name}|{character.seed}|{state.canonical()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 11  # 53 bits


def compile_prompt(character: Character, state: CharacterState, *, count_tokens: Callable[[str], int],
                   max_tokens: int = 77, vocabulary: dict | None = None,
                   identity_tokens: Callable[[str], int] | None = None,
                   max_identity_tokens: int | None = None) -> RenderRequest:
    """The render request of a state: the prompt within `max_tokens` (start and end tokens included, as
    `count_tokens` counts them), the character's defaults, and the seed.

    `identity_tokens` and `max_identity_tokens`, where the encoder that reads the whole prompt is not the one with
    the shortest reach (Flux and SD3: T5 reads the prompt, CLIP its first 77 tokens; `family_budget`), hold the
    identity to the shorter one; by default the identity is held to `count_tokens` and `max_tokens` alone."""
    vocabulary = vocabulary if vocabulary is not None else merged_vocabulary(character)
    identity = character.prompt_template.format(identifier=character.identifier, class_word=character.class_word)
    if count_tokens(identity) > max_tokens:
        raise UserError(f"character {character.name}: its prompt_template alone takes {count_tokens(identity)} "
                        f"tokens, more than the text encoder's {max_tokens}; shorten it.")
    if identity_tokens is not None and identity_tokens(identity) > max_identity_tokens:
        raise UserError(f"character {character.name}: its prompt_template alone takes {identity_tokens(identity)} "
                        f"CLIP tokens, more than the {max_identity_tokens} CLIP reads (the identity must reach "
                        "every text encoder); shorten it.")
    kept, dropped = fragments(character, state, vocabulary), []
    joiner = vocabulary.get("joiner", ", ")
    while kept and count_tokens(render_text(identity, kept, joiner)) > max_tokens:
        lowest = min(range(len(kept)), key=lambda i: (kept[i].priority, -i))  # the later one on a tie
        gone = kept.pop(lowest)
        dropped.append({"slot": gone.slot, "text": gone.text})
    prompt = render_text(identity, kept, joiner)
    weighted = [{"slot": "identity", "text": identity, "weight": 1.0},
                *({"slot": f.slot, "text": f.text, "weight": f.weight} for f in kept)]
    return RenderRequest(
        character=character.name, prompt=prompt, negative_prompt=character.negative_prompt or "",
        width=character.width, height=character.height, steps=character.steps, guidance=character.guidance,
        scheduler=character.scheduler, seed=state_seed(character, state), tokens=count_tokens(prompt),
        fragments=weighted, dropped=dropped, joiner=joiner)


def token_counter(tokenizer) -> Callable[[str], int]:
    """A tokenizer's count of a prompt's tokens, start and end tokens included (CLIP's two, T5's end token)."""
    return lambda text: len(tokenizer(text, truncation=False).input_ids)


def token_limit(tokenizer) -> int:
    """The most tokens a prompt may take with this tokenizer: its own length, never more than CLIP's 77 positions."""
    return min(tokenizer.model_max_length, 77)


# ------------------------------------------------------------------------------------------------ what a model reads
@dataclass(frozen=True)
class Budget:
    """The tokenizers that count a prompt, and the most tokens each count may reach."""

    prompt: tuple  # count the whole prompt (the most of them), up to `limit`
    limit: int
    encoder: str  # which encoder's length the whole prompt keeps ("CLIP" or "T5"), for messages
    # where the prompt's tokenizers are not those that read least of it (T5 beside CLIP): CLIP's, which count the
    # identity, up to `identity_limit`; empty when the prompt's count holds the identity too (SD, SDXL)
    identity: tuple = ()
    identity_limit: int | None = None
    sequence_length: int | None = None  # T5's max_sequence_length to call the pipeline with; None without T5


def sequence_length(family, tokenizer) -> int:
    """T5's length for a family's pipeline: its `__call__`'s default max_sequence_length, at most the tokenizer's own
    model_max_length."""
    import inspect

    import diffusers

    default = inspect.signature(getattr(diffusers, family.pipeline).__call__).parameters["max_sequence_length"].default
    return min(int(default), int(tokenizer.model_max_length))


def family_budget(family, tokenizers: dict) -> Budget:
    """The budget of a model of `family` whose tokenizers are `tokenizers` (by component name: "tokenizer",
    "tokenizer_2", ...; a T5 tokenizer that is absent, as in an SD3 pipeline loaded without T5, counts nothing)."""
    kinds = {"clip": [], "t5": []}
    for encoder in family.text_encoders:
        if tokenizers.get(encoder.tokenizer) is not None:
            kinds[encoder.kind].append(tokenizers[encoder.tokenizer])
    clip = tuple(kinds["clip"])
    clip_limit = min(token_limit(tokenizer) for tokenizer in clip)
    if not kinds["t5"]:
        return Budget(clip, clip_limit, "CLIP")
    t5 = kinds["t5"][0]
    length = sequence_length(family, t5)
    return Budget((t5,), length, "T5", identity=clip, identity_limit=clip_limit, sequence_length=length)
