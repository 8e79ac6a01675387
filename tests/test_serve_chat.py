"""/v1/chat-render and serving.chat.ChatStates against a fake OpenAI-compatible server on loopback.

The fake derives the state from the user's message with a small keyword table, records every request, and
misbehaves on demand: the model name asked for picks how it answers (a real server picks its model the same way).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from serving_support import free_port, running, stand_in_service
from starlette.testclient import TestClient

from dreambooth.characters.character import Character
from dreambooth.characters.state import state_schema
from dreambooth.serving.app import create_app
from dreambooth.serving.chat import ChatStates
from dreambooth.serving.service import ApiError

KEYWORDS = {"happy": ("emotion", "happy"), "sad": ("emotion", "sad"), "tired": ("emotion", "tired"),
            "beach": ("location", "beach"), "forest": ("location", "forest"), "night": ("time_of_day", "night")}
SLOW_S = 1.0
DOG = Character(name="dog", model="unused", identifier="sks", class_word="dog", appearance=["red collar"])
HAPPY = {"emotion": "happy", "location": "beach"}


def state_of(message: str) -> dict:
    words = message.lower().replace(",", " ").split()
    return dict(KEYWORDS[w] for w in words if w in KEYWORDS)


class FakeLLM:
    """POST /v1/chat/completions. Models: `fake` calls the tool; `content` and `fenced` put the JSON in the content
    (plain, in a ```json fence); `written` writes the call itself out as JSON; `nulls` sends every other field as
    null; `invalid` an emotion outside the enum; `nan` a NaN intensity; `broken` arguments that are not JSON;
    `neither` prose; `http500` and `http401` fail; `slow` answers after SLOW_S."""

    def __init__(self):
        self.requests: list[dict] = []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.complete)

    async def complete(self, request: Request):
        body = await request.json()
        self.requests.append({**body, "authorization": request.headers.get("authorization")})
        mode, message = body["model"], body["messages"][-1]["content"]
        state = state_of(message)
        if mode == "http500":
            return JSONResponse({"error": {"message": "the model crashed", "type": "server_error"}}, 500)
        if mode == "http401":
            key = request.headers.get("authorization", "").partition(" ")[2]
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {key}"}}, 401)
        if mode == "slow":
            await asyncio.sleep(SLOW_S)
        if mode in ("content", "fenced", "written", "neither"):
            content = {"content": json.dumps(state), "fenced": f"```json\n{json.dumps(state)}\n```",
                       "written": json.dumps({"name": "set_character_state", "arguments": state}),
                       "neither": "I'd rather not say."}[mode]
            return completion(mode, {"role": "assistant", "content": content}, "stop")
        arguments = {"invalid": json.dumps({"emotion": "ecstatic"}), "broken": "{emotion: happy",
                     "nan": '{"emotion": "happy", "intensity": NaN}',
                     "nulls": json.dumps({**dict.fromkeys(state_schema()["properties"]), **state})
                     }.get(mode, json.dumps(state))
        call = {"id": "call_1", "type": "function", "function": {"name": "set_character_state",
                                                                 "arguments": arguments}}
        return completion(mode, {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls")


def completion(model: str, message: dict, finish_reason: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


@pytest.fixture(scope="module")
def llm():
    fake = FakeLLM()
    with running(fake.app) as url:
        fake.url = url + "/v1"
        yield fake


def ask(base_url: str, model: str, message: str = "she is happy at the beach", key: str | None = None,
        timeout_s: float = 5.0):
    async def go():
        chat = ChatStates(base_url, model, key, timeout_s=timeout_s)
        try:
            return await chat.state_for(DOG, message)
        finally:
            await chat.aclose()

    return asyncio.run(go())


def refused(base_url: str, model: str, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as caught:
        ask(base_url, model, **kwargs)
    return caught.value


# ------------------------------------------------------------------------------------------- ChatStates
def test_the_tool_call_becomes_the_state_and_the_request_forces_the_tool(llm):
    state = ask(llm.url, "fake")
    assert state.model_dump(exclude_defaults=True) == HAPPY
    sent = llm.requests[-1]
    assert sent["model"] == "fake" and sent["temperature"] == 0
    assert [t["function"]["name"] for t in sent["tools"]] == ["set_character_state"]
    assert sent["tools"][0]["type"] == "function"
    assert sent["tools"][0]["function"]["parameters"] == state_schema()
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "set_character_state"}}
    system, user = sent["messages"]
    assert system["role"] == "system" and "dog" in system["content"] and "red collar" in system["content"]
    assert user == {"role": "user", "content": "she is happy at the beach"}
    assert sent["authorization"] == "Bearer not-needed"  # local servers need no key; the client needs one


@pytest.mark.parametrize("mode", ["content", "fenced", "written", "nulls"])
def test_json_in_the_content_or_null_fields_are_accepted(llm, mode):
    state = ask(llm.url, mode, "tired in the forest at night")
    assert state.model_dump(exclude_defaults=True) == {"emotion": "tired", "location": "forest",
                                                       "time_of_day": "night"}


def test_an_invalid_state_names_the_key(llm):
    e = refused(llm.url, "invalid")
    assert (e.status, e.code) == (502, "llm_bad_state")
    assert "emotion: Input should be" in e.message and llm.url in e.message


def test_a_number_that_is_not_finite_is_a_bad_state_named_as_such(llm):
    """Python's json reads NaN; a NaN intensity passes no range check, so it is refused as not finite."""
    e = refused(llm.url, "nan")
    assert (e.status, e.code) == (502, "llm_bad_state")
    assert "intensity: nan is not a finite number" in e.message and "less than" not in e.message


def test_arguments_that_are_not_json_are_a_bad_state(llm):
    e = refused(llm.url, "broken")
    assert (e.status, e.code) == (502, "llm_bad_state") and "{emotion: happy" in e.message


def test_an_answer_without_a_state(llm):
    e = refused(llm.url, "neither")
    assert (e.status, e.code) == (502, "llm_no_state") and llm.url in e.message and "tool calling" in e.message


def test_an_http_error_names_the_status_and_the_servers_message(llm):
    e = refused(llm.url, "http500")
    assert (e.status, e.code) == (502, "llm_unavailable")
    assert "HTTP 500" in e.message and "the model crashed" in e.message and llm.url in e.message


def test_the_key_is_sent_but_never_shown(llm):
    e = refused(llm.url, "http401", key="sk-secret-7781")
    assert llm.requests[-1]["authorization"] == "Bearer sk-secret-7781"
    assert (e.status, e.code) == (502, "llm_unavailable") and "HTTP 401" in e.message
    assert "sk-secret-7781" not in e.message and "--llm-api-key-env" in e.message


def test_a_slow_model_times_out(llm):
    e = refused(llm.url, "slow", timeout_s=0.25)
    assert (e.status, e.code) == (504, "llm_timeout") and "0.25 s" in e.message and llm.url in e.message


def test_an_unreachable_endpoint_hides_credentials_in_the_url():
    port = free_port()
    e = refused(f"http://user:hunter2@127.0.0.1:{port}/v1", "fake")
    assert (e.status, e.code) == (502, "llm_unavailable")
    assert f"http://127.0.0.1:{port}/v1" in e.message and "hunter2" not in e.message


# ------------------------------------------------------------------------------------------- the endpoint
@pytest.fixture
def client_for(tmp_path, tiny_model):
    """A TestClient on the service (stand-in renderer) with chat through `model` at `base_url` (None: chat off)."""
    def make(base_url: str | None, model: str = "fake", timeout_s: float = 5.0):
        chat = None if base_url is None else ChatStates(base_url, model, None, timeout_s=timeout_s)
        return TestClient(create_app(stand_in_service(tmp_path, tiny_model), [], auth=False, chat=chat))

    return make


def test_chat_render_draws_the_state_the_model_gave(llm, client_for):
    with client_for(llm.url) as client:
        r = client.post("/v1/chat-render", json={"character": "dog", "message": "she is happy at the beach",
                                                 "format": "json"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["state"] == HAPPY
        assert "happy" in body["request"]["prompt"] and "beach" in body["request"]["prompt"]
        assert "sks dog" in body["request"]["prompt"] and len(body["images"]) == 1


def test_chat_off_is_501(client_for):
    with client_for(None) as client:
        r = client.post("/v1/chat-render", json={"character": "dog", "message": "happy"})
        assert r.status_code == 501 and r.json()["error"]["code"] == "chat_off"


def test_an_unknown_character_is_404_before_asking_the_model(llm, client_for):
    asked = len(llm.requests)
    with client_for(llm.url) as client:
        r = client.post("/v1/chat-render", json={"character": "cat", "message": "happy"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_character"
    assert len(llm.requests) == asked


@pytest.mark.parametrize("model, timeout_s, status, code", [
    ("invalid", 5.0, 502, "llm_bad_state"), ("neither", 5.0, 502, "llm_no_state"),
    ("http500", 5.0, 502, "llm_unavailable"), ("slow", 0.25, 504, "llm_timeout"), (None, 5.0, 502, "llm_unavailable")])
def test_model_failures_through_the_endpoint(llm, client_for, model, timeout_s, status, code):
    base_url = llm.url if model else f"http://127.0.0.1:{free_port()}/v1"  # None: nothing listens there
    with client_for(base_url, model or "fake", timeout_s) as client:
        r = client.post("/v1/chat-render", json={"character": "dog", "message": "she is happy at the beach"})
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code and base_url in r.json()["error"]["message"]


def test_a_key_with_a_line_ending_is_stripped_and_control_characters_are_refused():
    from dreambooth.errors import UserError
    from dreambooth.serving.chat import ChatStates

    chat = ChatStates("http://127.0.0.1:9/v1", "m", "sk-secret-7781\r\n")
    assert chat._key == "sk-secret-7781"
    with pytest.raises(UserError, match="control characters"):
        ChatStates("http://127.0.0.1:9/v1", "m", "sk-se\x01cret")


def test_answers_of_odd_shapes_are_read_or_refused_as_no_state():
    from types import SimpleNamespace as NS

    from dreambooth.serving.chat import _arguments

    call = NS(function=NS(name="set_character_state", arguments={"emotion": "happy"}))
    assert json.loads(_arguments(NS(choices=[NS(message=NS(tool_calls=[call], content=None))]))) == {
        "emotion": "happy"}
    assert _arguments(NS(choices=[NS(message=NS(tool_calls=None, content=[{"type": "text"}]))])) is None
