"""A character's state: what an application, or a language model through tool calling, says about the moment to
draw. Its JSON Schema (`state_schema`) is usable as-is as a tool's parameters.

Slots with a closed vocabulary are enums, so a language model's structured output cannot leave them; the others
are short free text, used as written unless the vocabulary has words for them.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

EMOTIONS = ("neutral", "happy", "joyful", "sad", "angry", "afraid", "surprised", "disgusted", "calm", "shy",
            "confident", "tired", "excited", "curious", "proud", "embarrassed", "bored", "loving")
GAZES = ("at_viewer", "away", "down", "up", "sideways", "eyes_closed")
SHOTS = ("close_up", "portrait", "upper_body", "cowboy_shot", "full_body", "wide")
TIMES_OF_DAY = ("dawn", "morning", "noon", "afternoon", "sunset", "evening", "night")
LIGHTING = ("natural", "soft", "studio", "dramatic", "backlit", "neon", "candlelight")


class CharacterState(BaseModel):
    """The character's state for one picture: emotion and how strongly, expression, action, gaze, outfit, place,
    time of day, lighting, camera shot, style, and extra words."""

    # NaN and Infinity (JSON from Python's json, YAML's .nan) are refused: a NaN intensity compares false with
    # both bounds, so without this it was reported as "should be <= 1", and it would hash to a seed of its own.
    model_config = ConfigDict(extra="forbid", title="CharacterState", allow_inf_nan=False)

    emotion: Literal[EMOTIONS] | None = Field(None, description="What the character feels.")  # type: ignore[valid-type]
    intensity: float = Field(0.5, ge=0.0, le=1.0, description="How strongly the emotion shows: 0 faint, 1 "
                             "overwhelming.")
    expression: str | None = Field(None, max_length=80, description="Facial expression, e.g. 'raised eyebrow'.")
    action: str | None = Field(None, max_length=80, description="What the character does, e.g. 'reading a book'.")
    gaze: Literal[GAZES] | None = Field(None, description="Where the character looks.")  # type: ignore[valid-type]
    outfit: str | None = Field(None, max_length=80, description="What the character wears.")
    location: str | None = Field(None, max_length=80, description="Where, e.g. 'beach', 'a rainy street'.")
    time_of_day: Literal[TIMES_OF_DAY] | None = Field(None, description="Time of day.")  # type: ignore[valid-type]
    lighting: Literal[LIGHTING] | None = Field(None, description="Light.")  # type: ignore[valid-type]
    shot: Literal[SHOTS] | None = Field(None, description="Camera framing.")  # type: ignore[valid-type]
    style: str | None = Field(None, max_length=80, description="Style over the character's own, e.g. 'watercolor'.")
    extra: list[Annotated[str, StringConstraints(max_length=80)]] = Field(
        default_factory=list, max_length=8, description="Extra words, least important last.")

    @field_validator("intensity")
    @classmethod
    def _no_negative_zero(cls, value: float) -> float:
        return value + 0.0  # -0.0 and 0.0 are one intensity, and must be one seed

    def canonical(self) -> str:
        """The state as one deterministic string, what a seed derived from the state hashes: only the values set
        (so a slot added to the schema later changes no stored state's seed), keys sorted."""
        return json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True, ensure_ascii=True)


def problem_text(error: dict) -> str:
    """What is wrong with one value, from one of pydantic's errors: its own message, except for a number that is not
    finite (NaN, Infinity, where a number was due), which is named as such whatever check it failed first."""
    value = error.get("input")
    not_finite = isinstance(value, float) and not math.isfinite(value)
    if error.get("type") == "finite_number" or not_finite:
        return f"{value!r} is not a finite number (NaN and Infinity are refused)"
    return error["msg"]


def state_schema() -> dict:
    """The JSON Schema of the state, for a language model's tool or structured output."""
    return CharacterState.model_json_schema()
