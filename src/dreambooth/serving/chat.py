"""Free text to a character's state, for /v1/chat-render: a language model behind an OpenAI-compatible endpoint
(llama.cpp's server, vLLM, Ollama, OpenAI itself) is asked to call one tool, `set_character_state`, whose parameters
are the state's JSON Schema.

The model only fills in the typed state; the prompt is still compiled from it by the same code as /v1/render, so a
model cannot write prompts, and its enums (emotion, gaze, ...) cannot leave the vocabulary. Every way the endpoint
can fail is an ApiError that names the endpoint and what to do about it, never the key.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit, urlunsplit

import openai
from pydantic import ValidationError

from dreambooth.characters.character import Character
from dreambooth.characters.state import CharacterState, problem_text, state_schema
from dreambooth.errors import UserError
from dreambooth.serving.service import ApiError

TOOL = "set_character_state"
FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


class ChatStates:
    """The state of a character a message describes, from the language model at `base_url`."""

    def __init__(self, base_url: str, model: str, api_key: str | None, *, timeout_s: float = 60.0):
        # A key read from a file with a CRLF ending carries "\r": the HTTP client then fails with the key quoted
        # (escaped, so no exact match hides it). Keys are stripped, and one with control characters is refused.
        api_key = api_key.strip() if api_key else api_key
        if api_key and any(ord(c) < 32 or ord(c) == 127 for c in api_key):
            raise UserError("the language model's API key (--llm-api-key-env) holds control characters; set it "
                            "to the key alone.")
        self.model, self.timeout_s, self._key = model, timeout_s, api_key
        self.where = _without_credentials(base_url)
        # Local servers take any key, or none; the client insists on one. No retries: a caller's wait is bounded
        # by timeout_s, and the caller can retry itself.
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout_s,
                                         max_retries=0)
        self.tool = {"type": "function", "function": {
            "name": TOOL, "description": "Set the character's visual state for the next picture.",
            "parameters": state_schema()}}

    async def aclose(self) -> None:
        await self.client.close()

    async def state_for(self, character: Character, message: str) -> CharacterState:
        looks = ", ".join([*character.appearance, *([character.style] if character.style else [])])
        system = (f"You set the visual state of the character {character.name}, a {character.class_word}"
                  f"{f' ({looks})' if looks else ''}, for a picture. Call {TOOL} with only what the user's message "
                  "states or clearly implies; leave every other field out.")
        try:
            response = await self.client.chat.completions.create(
                model=self.model, temperature=0, tools=[self.tool],
                tool_choice={"type": "function", "function": {"name": TOOL}},
                messages=[{"role": "system", "content": system}, {"role": "user", "content": message}])
        except openai.APITimeoutError:
            raise ApiError(504, "llm_timeout", f"the language model at {self.where} did not answer within "
                           f"{self.timeout_s:g} s; retry, or give the server a faster model or a longer "
                           "--llm-timeout-s.") from None
        except openai.APIConnectionError as e:
            raise ApiError(502, "llm_unavailable", f"could not reach the language model at {self.where} "
                           f"({self._hide(str(e.__cause__ or '') or str(e))}); check that it is running and that "
                           "--llm-base-url is right.") from None
        except openai.APIStatusError as e:
            raise ApiError(502, "llm_unavailable", f"the language model at {self.where} answered HTTP "
                           f"{e.status_code} ({self._hide(_detail(e))}); {_advice(e.status_code)}") from None
        except openai.APIError as e:
            raise ApiError(502, "llm_unavailable", f"the language model at {self.where} gave an answer that is not "
                           f"a chat completion ({self._hide(str(e))[:200]}); check --llm-base-url.") from None
        try:
            arguments = _arguments(response)
        except (AttributeError, TypeError, IndexError, KeyError):  # an answer of an unexpected shape
            arguments = None
        return self._state(arguments)

    def _state(self, arguments: str | None) -> CharacterState:
        if arguments is None:
            raise ApiError(502, "llm_no_state", f"the language model at {self.where} answered without calling "
                           f"{TOOL} or giving a JSON state; use a model with tool calling (llama.cpp needs "
                           "--jinja), or reword the message.")
        try:
            values = json.loads(arguments)
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, dict):
            raise ApiError(502, "llm_bad_state", f"the language model at {self.where} called {TOOL} with "
                           f"arguments that are not a JSON object: {arguments[:200]!r}; retry, or use a model "
                           "that follows tool schemas.")
        # Small models tend to send every field, the unsaid ones as null; null means "not said", the default.
        values = {k: v for k, v in values.items() if v is not None}
        try:
            return CharacterState.model_validate(values)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'state'}: {problem_text(err)}"
                                 for err in e.errors())
            raise ApiError(502, "llm_bad_state", f"the language model at {self.where} gave a state that does not "
                           f"fit the schema ({problems}); retry, or use a model that follows tool schemas "
                           "(GET /v1/state-schema).") from None

    def _hide(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _arguments(response) -> str | None:
    """The state's JSON text: the tool call's arguments, or else a JSON object in the content (servers that ignore
    tool_choice, or models that write the call out as text)."""
    choices = getattr(response, "choices", None) or []
    message = choices[0].message if choices else None
    if message is None:
        return None
    calls = [c for c in message.tool_calls or [] if getattr(c, "function", None) is not None]
    if calls:
        call = next((c for c in calls if c.function.name == TOOL), calls[0])
        arguments = call.function.arguments or "{}"
        return arguments if isinstance(arguments, str) else json.dumps(arguments)  # some servers send an object
    content = message.content
    text = content.strip() if isinstance(content, str) else ""
    fenced = FENCE.match(text)
    text = fenced.group(1) if fenced else text
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(values, dict):
        return None
    # Some models write the call itself out: {"name": "set_character_state", "arguments": {...}}.
    if values.get("name") == TOOL and isinstance(values.get("arguments", values.get("parameters")), dict):
        values = values.get("arguments", values.get("parameters"))
    return json.dumps(values)


def _detail(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        body = body.get("error", body)
        body = (body.get("message") or body.get("detail") or body) if isinstance(body, dict) else body
    return str(body or error.message)[:200]


def _advice(status: int) -> str:
    if status in (401, 403):
        return "check the key in the environment variable --llm-api-key-env names."
    if status == 404:
        return "check --llm-base-url (it usually ends in /v1) and that the server has --llm-model."
    return "see the server's log (a server without tool calling fails here: llama.cpp needs --jinja)."


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
