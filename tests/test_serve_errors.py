"""docs/serving.md's error table against a real app: every row (status, code) is provoked, each answer has the
documented shape and headers, and no provoked refusal carries a code the table lacks. The table is read from the doc
itself, so the test fails when the doc and the code drift apart.

The apps run on uvicorn on loopback with a stand-in renderer (tests/serving_support.py) and, for chat-render, the
fake OpenAI-compatible server of tests/test_serve_chat.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from serving_support import StandInRenderer, characters_file, free_port, running
from test_serve_chat import FakeLLM

from dreambooth.characters.character import load_characters
from dreambooth.serving.app import create_app
from dreambooth.serving.auth import local_names, parse_keys
from dreambooth.serving.chat import ChatStates
from dreambooth.serving.service import Limits, Service

DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
USER, OPERATOR = "u" * 24, "o" * 24
KEYS = parse_keys(f"alice user {USER}\nroot operator {OPERATOR}", "test")


def documented_errors() -> dict[tuple[int, str], dict[str, str | None]]:
    """(status, code) -> {header: value, or None for any value} of each row of the doc's "## Errors" table."""
    section = DOC.read_text(encoding="utf-8").split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    assert rows[0][:3] == ["status", "code", "headers"], rows[0]
    table = {}
    for cells in rows[2:]:
        headers = {}
        for header in re.findall(r"`([^`]+)`", cells[2]):
            name, _, value = header.partition(":")
            headers[name.strip().lower()] = value.strip() or None
        codes = re.findall(r"`([a-z_]+)`", cells[1])
        assert codes, f"a row without a code: {cells}"
        for code in codes:
            assert (int(cells[0]), code) not in table, f"{cells[0]} {code} is in the table twice"
            table[(int(cells[0]), code)] = headers
    return table


@dataclass
class Seen:
    what: str  # the probe, for the failure message
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def code(self) -> str | None:
        try:
            return json.loads(self.body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None


def seen(what: str, response) -> Seen:
    return Seen(what, response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)


class Recorder:
    """Keeps every answer the app sends, also one that no client is left to read (499)."""

    def __init__(self, app):
        self.app, self.sent = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        answer = {"path": scope["path"], "body": b""}

        async def record(message):
            if message["type"] == "http.response.start":
                answer.update(status=message["status"], headers={k.decode().lower(): v.decode()
                                                                 for k, v in message.get("headers", [])})
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    self.sent.append(answer)
            await send(message)

        await self.app(scope, receive, record)


def service(tmp_path: Path, model: Path, renderer=None, **limits) -> Service:
    """The stand-in service with `dog` and `wordy`, whose template alone is over the stand-in's 77 tokens (a
    service built in code is not checked as `serve` checks its characters at start-up)."""
    base = {"model": str(model), "identifier": "sks", "class_word": "dog", "width": 64, "height": 64, "steps": 4}
    entries = [{**base, "name": "dog"}, {**base, "name": "wordy", "prompt_template": "{identifier} {class_word}"
                                                                                      + " very" * 80}]
    folder = tmp_path / f"app{len(list(tmp_path.glob('app*')))}"
    folder.mkdir()
    characters = load_characters(characters_file(folder, model, entries))
    return Service(characters, renderer or StandInRenderer(), limits=Limits(**limits))


def post(url: str, path: str, body=None, token: str | None = None, headers: dict | None = None, **kwargs):
    headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    if isinstance(body, bytes):
        kwargs.update(content=body, headers={**headers, "content-type": "application/json"})
    else:
        kwargs.update(json=body, headers=headers)
    return httpx2.post(url + path, timeout=30, **kwargs)


def keyed_probes(url: str) -> list[Seen]:
    """Keys, bodies, paths, fields and limits, on a server with API keys and no chat."""
    dog = {"character": "dog"}
    probes = [
        ("bad JSON", post(url, "/v1/render", b"{not json", USER)),
        ("a JSON array", post(url, "/v1/render", b"[1, 2]", USER)),
        ("JSON null", post(url, "/v1/render", b"null", USER)),
        ("a JSON string", post(url, "/v1/compile", b'"dog"', USER)),
        ("an empty body", post(url, "/v1/render", b"", USER)),
        ("bytes that are not UTF-8", post(url, "/v1/render", b'{"character": "\xff\xfe"}', USER)),
        ("an array nested 30,000 deep", post(url, "/v1/render", b"[" * 30_000 + b"]" * 30_000, USER)),
        ("an object nested 30,000 deep", post(url, "/v1/compile", b'{"a":' * 30_000 + b"1" + b"}" * 30_000,
                                              USER)),
        ("a body sent as text/plain", httpx2.post(url + "/v1/render", content=json.dumps(dog), timeout=30, headers={
            "Authorization": f"Bearer {USER}", "content-type": "text/plain"})),
        ("no key", post(url, "/v1/render", dog)),
        ("no key, bad JSON", post(url, "/v1/render", b"[" * 30_000)),
        ("no key for the metrics", httpx2.get(url + "/metrics")),
        ("a Basic key", httpx2.get(url + "/v1/characters", headers={"Authorization": "Basic abc"})),
        ("a token that is no key", post(url, "/v1/render", dog, "x" * 24)),
        ("a raw prompt from a user key", post(url, "/v1/render", {**dog, "prompt": "a dog"}, USER)),
        ("an unknown character", post(url, "/v1/render", {"character": "cat"}, USER)),
        ("an unknown path", httpx2.get(url + "/v2/render")),
        ("an unknown docs file", httpx2.get(url + "/docs-assets/../app.py")),
        ("GET on a POST path", httpx2.get(url + "/v1/render", headers={"Authorization": f"Bearer {USER}"})),
        ("PUT on a POST path", httpx2.put(url + "/v1/compile", json=dog, timeout=30)),
        ("a body over the limit", post(url, "/v1/render", {**dog, "prompt": "x" * 70_000}, OPERATOR)),
        ("a chunked body over the limit", httpx2.post(url + "/v1/render", content=iter([b"{" + b" " * 40_000] * 2),
                                                      headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=30)),
        ("an unknown state key", post(url, "/v1/render", {**dog, "state": {"mood": "happy"}}, USER)),
        ("an unknown field", post(url, "/v1/render", {**dog, "path": "/etc/passwd"}, USER)),
        ("a NaN guidance", post(url, "/v1/render", b'{"character": "dog", "guidance": NaN}', USER)),
        ("an infinite intensity", post(url, "/v1/compile", b'{"character": "dog", "state": {"intensity": 1e999}}',
                                       USER)),
        ("a state that is a list", post(url, "/v1/render", {**dog, "state": ["happy"]}, USER)),
        ("state and prompt", post(url, "/v1/compile", {**dog, "state": {}, "prompt": "a dog"}, OPERATOR)),
        ("n of 0", post(url, "/v1/render", {**dog, "n": 0}, USER)),
        ("a gif", post(url, "/v1/render", {**dog, "format": "gif"}, USER)),
        ("steps over the limit", post(url, "/v1/render", {**dog, "steps": 51}, USER)),
        ("a size not a multiple of 8", post(url, "/v1/render", {**dog, "width": 60}, USER)),
        ("pixels over the limit", post(url, "/v1/render", {**dog, "width": 2048, "height": 2048}, USER)),
        ("two images as PNG", post(url, "/v1/render", {**dog, "n": 2}, USER)),
        ("a deadline over the server's", post(url, "/v1/render", {**dog, "deadline_s": 10_000}, USER)),
        ("a raw prompt over the tokens", post(url, "/v1/compile", {**dog, "prompt": "dog " * 90}, OPERATOR)),
        ("a negative prompt over the tokens", post(url, "/v1/compile", {**dog, "negative_prompt": "dog " * 90},
                                                   OPERATOR)),
        ("a character whose template is over the tokens", post(url, "/v1/render", {"character": "wordy"}, USER)),
        ("chat-render without a language model", post(url, "/v1/chat-render", {**dog, "message": "happy"}, USER)),
        ("chat-render without a message", post(url, "/v1/chat-render", dog, USER)),
    ]
    return [seen(what, response) for what, response in probes]


def rate_probes(url: str) -> list[Seen]:
    first = post(url, "/v1/compile", {"character": "dog"}, USER)
    assert first.status_code == 200, first.text
    return [seen("a second request in a burst of 1", post(url, "/v1/compile", {"character": "dog"}, USER))]


def queue_probes(url: str, service: Service, gate: threading.Event, recorder: Recorder) -> list[Seen]:
    """One image drawing (held), one queued until its deadline, one that does not fit, one whose client leaves."""
    out: dict[str, object] = {}

    def send(name, body):
        out[name] = post(url, "/v1/render", body)

    def until(condition, what):
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    holder = threading.Thread(target=send, args=("held", {"character": "dog", "seed": 1}))
    holder.start()
    until(lambda: service.batcher.running == 1, "the first image drawing")
    late = threading.Thread(target=send, args=("late", {"character": "dog", "seed": 2, "deadline_s": 0.5}))
    late.start()
    until(lambda: service.batcher.depth == 1, "the second image queued")
    full = post(url, "/v1/render", {"character": "dog", "seed": 3})
    late.join(30)
    body = json.dumps({"character": "dog", "seed": 4}).encode()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/render HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        until(lambda: service.batcher.depth == 1, "the leaving client's image queued")
    until(lambda: any(a["status"] == 499 for a in recorder.sent), "the answer to the client that left")
    gate.set()
    holder.join(30)
    assert out["held"].status_code == 200
    left = next(a for a in recorder.sent if a["status"] == 499)
    return [seen("a request the queue cannot fit", full), seen("a deadline that passed in the queue", out["late"]),
            Seen("a client that left", left["status"], left["headers"], left["body"])]


class Failing(StandInRenderer):
    def render(self, requests):
        raise FileNotFoundError("No such file: '/srv/models/secret/unet.safetensors'")


def chat_probes(url_of_app, llm_url: str) -> list[Seen]:
    """One app per way the language model fails: each ChatStates asks for one model of the fake server."""
    found = []
    for what, base_url, model, timeout_s in [
            ("a model that answers in prose", llm_url, "neither", 5.0),
            ("a model whose state has an unknown emotion", llm_url, "invalid", 5.0),
            ("a model whose state is not JSON", llm_url, "broken", 5.0),
            ("a model whose state has a NaN", llm_url, "nan", 5.0),
            ("a model that fails with HTTP 500", llm_url, "http500", 5.0),
            ("a model nothing listens for", f"http://127.0.0.1:{free_port()}/v1", "fake", 5.0),
            ("a model slower than the timeout", llm_url, "slow", 0.25)]:
        with url_of_app(ChatStates(base_url, model, None, timeout_s=timeout_s)) as url:
            found.append(seen(what, post(url, "/v1/chat-render", {"character": "dog", "message": "happy at the "
                                                                                               "beach"})))
    return found


def test_every_documented_error_is_answered_as_documented_and_no_other(tmp_path):
    documented = documented_errors()
    tiny_model = tmp_path / "model"  # the stand-in renderer loads nothing: the folder only has to be there
    tiny_model.mkdir()
    answers: list[Seen] = []
    with running(create_app(service(tmp_path, tiny_model, rate_per_minute=0), KEYS)) as url:
        answers += keyed_probes(url)
    with running(create_app(service(tmp_path, tiny_model, burst=1, rate_per_minute=1), KEYS)) as url:
        answers += rate_probes(url)
    gate = threading.Event()
    queued = service(tmp_path, tiny_model, StandInRenderer(gate), max_queue=1, max_batch=1, batch_window_ms=0)
    recorder = Recorder(create_app(queued, [], auth=False))
    try:
        with running(recorder) as url:
            answers += queue_probes(url, queued, gate, recorder)
    finally:
        gate.set()
    with running(create_app(service(tmp_path, tiny_model, Failing()), [], auth=False)) as url:
        answers.append(seen("a draw that fails", post(url, "/v1/render", {"character": "dog"})))
    with running(create_app(service(tmp_path, tiny_model), [], auth=False, hosts=local_names("127.0.0.1"))) as url:
        answers.append(seen("keyless, addressed to another site's name", post(
            url, "/v1/render", {"character": "dog"}, headers={"Host": "rebound.example"})))

    @contextlib.contextmanager
    def with_chat(chat):
        with running(create_app(service(tmp_path, tiny_model), [], auth=False, chat=chat)) as url:
            yield url

    fake = FakeLLM()
    with running(fake.app) as llm_url:
        answers += chat_probes(with_chat, llm_url + "/v1")

    assert [(a.what, a.status) for a in answers if a.status < 400] == [], "every probe is a refusal"
    refusals = answers
    for answer in refusals:
        assert (answer.status, answer.code) in documented, \
            f"{answer.what}: {answer.status} {answer.code} is not in docs/serving.md's error table ({answer.body!r})"
        body = json.loads(answer.body)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, (answer.what, body)
        assert isinstance(body["error"]["message"], str) and len(body["error"]["message"]) > 10, (answer.what, body)
        assert answer.headers.get("x-error-code") == answer.code, answer.what
        for name, value in documented[(answer.status, answer.code)].items():
            assert answer.headers.get(name), f"{answer.what}: no {name} header"
            assert value is None or answer.headers[name] == value, (answer.what, name, answer.headers[name])
        if "retry-after" in documented[(answer.status, answer.code)]:
            assert int(answer.headers["retry-after"]) >= 1, answer.what
    provoked = {(a.status, a.code) for a in refusals}
    assert sorted(set(documented) - provoked) == [], "documented rows no probe provoked"


def test_the_error_table_is_read_from_the_doc():
    """The parser itself: every row, the headers with and without values (a table the parser misread would make the
    test above check less than the doc says)."""
    table = documented_errors()
    assert table[(401, "unauthorized")] == {"www-authenticate": "Bearer"}
    assert table[(429, "rate_limited")] == table[(429, "queue_full")] == {"retry-after": None}
    assert table[(400, "bad_json")] == {} and (499, "client_closed") in table
    rows = DOC.read_text(encoding="utf-8").split("\n## Errors\n", 1)[1].split("\n## ", 1)[0].count("\n| ")
    assert len(table) == rows - 1  # every line but the header's names one code


@pytest.mark.parametrize("bad", ["| 4xx | `x` | | y |", "| 400 | no code | | y |"])
def test_a_malformed_row_fails_the_reading(tmp_path, monkeypatch, bad):
    doc = tmp_path / "serving.md"
    doc.write_text("# serve\n\n## Errors\n\n| status | code | headers | when |\n|---|---|---|---|\n" + bad + "\n")
    monkeypatch.setattr(f"{__name__}.DOC", doc)
    with pytest.raises((AssertionError, ValueError)):
        documented_errors()
