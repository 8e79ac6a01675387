"""`dreambooth serve`: every endpoint's answers and refusals, the queue (batching, back-pressure, deadlines, clients
that leave), the cache, API keys and limits, the renderer on real tiny models (the same pictures as `generate`,
LoRA adapters switched per batch), and the command."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from serving_support import StandInRenderer, characters_file, running, stand_in_service
from starlette.testclient import TestClient

from dreambooth.characters.character import load_characters
from dreambooth.characters.compiler import compile_prompt, token_counter
from dreambooth.characters.state import CharacterState, state_schema
from dreambooth.command_options import ServeOptions
from dreambooth.errors import UserError
from dreambooth.serving.app import create_app
from dreambooth.serving.auth import RateLimiter, find_key, load_keys, parse_keys
from dreambooth.serving.batcher import Batcher, QueueFull
from dreambooth.serving.cache import ImageCache, cache_key
from dreambooth.serving.command import build_service
from dreambooth.serving.service import RenderBody, image_seeds

USER = "u" * 24
OPERATOR = "o" * 24
KEYS = f"alice user {USER}\nroot operator {OPERATOR}"


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------------------------------------- a real tiny model

@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """The real service (tiny model, one character `dog`) with API keys, and its client."""
    folder = tmp_path_factory.mktemp("served")
    path = characters_file(folder, tiny_model)
    service = build_service(path, ServeOptions(characters=path, cache_dir=folder / "cache", batch_window_ms=1,
                                                rate_per_minute=0))
    with TestClient(create_app(service, parse_keys(KEYS, "test"))) as client:
        yield service, client


def test_every_read_endpoint_answers(served):
    service, client = served
    health = client.get("/healthz").json()
    assert health == {"status": "ok", "characters": ["dog"], "queue": 0, "auth": True, "chat": False}
    listed = client.get("/v1/characters", headers=bearer(USER)).json()["characters"]
    assert [c["name"] for c in listed] == ["dog"] and listed[0]["kind"] == "full"
    assert "model" not in listed[0] and "/" not in json.dumps(listed)  # no server paths
    assert client.get("/v1/state-schema", headers=bearer(USER)).json() == state_schema()
    assert "/v1/render" in client.get("/openapi.json").json()["paths"]
    assert client.get("/").headers["content-type"].startswith("text/html")
    docs = client.get("/docs").text  # script, style and icon from the server (in a browser: test_serve_page)
    assert sorted(re.findall(r'(?:src|href)="([^"]+)"', docs)) == [
        "/docs-assets/favicon.png", "/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"]
    assert client.get("/docs-assets/swagger-ui-bundle.js").content.startswith(b"/*! For license information")


def test_compile_is_the_compilers_request(served, tiny_model):
    service, client = served
    state = {"emotion": "happy", "intensity": 0.9, "location": "beach"}
    got = client.post("/v1/compile", json={"character": "dog", "state": state}, headers=bearer(USER)).json()
    character = load_characters(characters_file(tiny_model.parent, tiny_model))["dog"]
    from transformers import CLIPTokenizer

    want = compile_prompt(character, CharacterState(**state),
                          count_tokens=token_counter(CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")))
    assert got["request"] == dataclasses.asdict(want)
    assert got["request"]["fragments"][1] == {"slot": "emotion", "text": "happy, smiling", "weight": 1.24}


def test_a_render_is_the_picture_generate_draws_for_its_prompt_and_seed(served, tiny_model):
    """A state without weights goes through the same pipeline call as `dreambooth generate`: same pixels."""
    from dreambooth.generate import GenerationSettings, generate_images
    from dreambooth.models.loading import load_pipeline

    service, client = served
    answer = client.post("/v1/render", json={"character": "dog", "state": {"location": "forest"}, "format": "json"},
                         headers=bearer(USER)).json()
    request = answer["request"]
    pipe = load_pipeline(tiny_model, device=torch.device("cpu"), dtype=torch.float32, scheduler="dpm++")
    image, meta = generate_images(pipe, GenerationSettings(prompts=[request["prompt"]], seeds=[request["seed"]],
                                                           steps=4, height=64, width=64))[0]
    served_pixels = png_pixels(base64.b64decode(answer["images"][0]["png_base64"]))
    assert np.abs(served_pixels - np.asarray(image, dtype=np.int16)).max() <= 1
    info = Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["png_base64"]))).info
    recorded = json.loads(info["dreambooth"])
    assert recorded["prompt"] == request["prompt"] and recorded["seed"] == request["seed"]
    assert str(tiny_model) not in info["parameters"]  # the model by character and hash, not the server's path


def test_intensity_weights_the_emotion_and_the_weights_change_the_picture(served):
    service, client = served

    def picture(intensity):
        body = {"character": "dog", "state": {"emotion": "angry", "intensity": intensity}, "seed": 5}
        response = client.post("/v1/render", json=body, headers=bearer(USER))
        assert response.status_code == 200, response.text
        return png_pixels(response.content)

    faint, plain, strong = picture(0.0), picture(0.5), picture(1.0)
    assert np.abs(strong - plain).max() > 0 and np.abs(faint - plain).max() > 0
    assert np.array_equal(picture(1.0), strong)  # weighted embeddings are deterministic too


def test_an_sdxl_character_renders_weighted_states_as_its_pipeline_encodes_prompts(tmp_path):
    """SDXL's weighted path: both encoders' hidden states and the pooled embedding. With every weight 1.0 it draws
    what the plain prompt draws; an emotion's intensity changes the picture."""
    import dataclasses

    from dreambooth.models.tiny_families import build_model
    from dreambooth.serving.renderer import Renderer

    model = build_model(tmp_path / "xl", size="sdxl-tiny", seed=2)
    characters = load_characters(characters_file(tmp_path, model))
    renderer = Renderer(characters, device="cpu", precision="fp32")
    character = characters["dog"]
    count = token_counter(renderer.drawn["dog"].slot.pipe.tokenizer)
    weighted = compile_prompt(character, CharacterState(emotion="angry", intensity=1.0), count_tokens=count)
    assert any(part["weight"] != 1.0 for part in weighted.fragments)
    unit = dataclasses.replace(weighted, fragments=[{**part, "weight": 1.0} for part in weighted.fragments])
    forced = dataclasses.replace(unit, fragments=[*unit.fragments[:-1], {**unit.fragments[-1], "weight": 1.0 + 1e-9}])
    plain, through_compel, strong = (png_pixels(renderer.render([r])[0]) for r in (unit, forced, weighted))
    assert np.abs(plain - through_compel).max() <= 2  # the weighted path, at weight 1, is the plain prompt
    assert np.abs(strong - plain).max() > 0


def test_png_and_json_answers_seeds_and_the_cache(served):
    service, client = served
    body = {"character": "dog", "state": {"action": "running"}, "format": "json", "n": 3}
    calls = service.renderer.calls
    first = client.post("/v1/render", json=body, headers=bearer(USER)).json()
    seeds = [image["seed"] for image in first["images"]]
    assert seeds == image_seeds(first["request"]["seed"], 3) and all(s < 2**53 for s in seeds)
    assert not any(image["cached"] for image in first["images"]) and service.renderer.calls == calls + 1
    again = client.post("/v1/render", json=body, headers=bearer(USER)).json()
    assert all(image["cached"] for image in again["images"]) and service.renderer.calls == calls + 1
    assert [i["png_base64"] for i in again["images"]] == [i["png_base64"] for i in first["images"]]
    # The second image's seed, asked for alone, draws that image again (as `generate --seed` would).
    alone = client.post("/v1/render", json={**body, "n": 1, "format": "png", "seed": seeds[1]},
                        headers=bearer(USER))
    assert alone.headers["x-seed"] == str(seeds[1])
    assert np.abs(png_pixels(alone.content) - png_pixels(base64.b64decode(first["images"][1]["png_base64"]))).max() <= 1


def test_raw_prompts_are_for_operators(served):
    service, client = served
    body = {"character": "dog", "prompt": "a photo of sks dog in space"}
    refused = client.post("/v1/render", json=body, headers=bearer(USER))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "operator_only"
    answer = client.post("/v1/compile", json=body, headers=bearer(OPERATOR)).json()["request"]
    assert answer["prompt"] == "a photo of sks dog in space" and answer["fragments"][0]["slot"] == "prompt"
    long = client.post("/v1/compile", json={"character": "dog", "prompt": "dog " * 90}, headers=bearer(OPERATOR))
    assert long.status_code == 422 and long.json()["error"]["code"] == "prompt_too_long"
    both = client.post("/v1/compile", json={**body, "state": {}}, headers=bearer(OPERATOR))
    assert both.status_code == 422


@pytest.mark.parametrize("headers, status, code", [
    ({}, 401, "unauthorized"),
    ({"Authorization": "Basic abc"}, 401, "unauthorized"),
    (bearer("x" * 24), 403, "forbidden"),
    (bearer(USER[:-1]), 403, "forbidden"),
])
def test_api_keys(served, headers, status, code):
    service, client = served
    for method, path in (("get", "/v1/characters"), ("post", "/v1/render"), ("get", "/metrics")):
        response = getattr(client, method)(path, headers=headers, **({"json": {"character": "dog"}}
                                                                     if method == "post" else {}))
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), path
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/healthz").status_code == 200  # open, for load balancers


@pytest.mark.parametrize("body, status, code, says", [
    (b"{not json", 400, "bad_json", "not valid JSON"),
    (b"[1, 2]", 400, "bad_json", "JSON object"),
    ({"character": "cat"}, 404, "unknown_character", "GET /v1/characters"),
    ({"character": "dog", "state": {"mood": "happy"}}, 422, "invalid_request", "state.mood"),
    ({"character": "dog", "state": {"emotion": "ecstatic"}}, 422, "invalid_request", "state.emotion"),
    ({"character": "dog", "state": {"intensity": 2}}, 422, "invalid_request", "state.intensity"),
    ({"character": "dog", "steps": 51}, 422, "over_limit", "steps 51 is more than this server's 50 (--max-steps)"),
    ({"character": "dog", "width": 2048, "height": 2048}, 422, "over_limit",
     f"2048x2048 is 4194304 pixels, more than this server's {ServeOptions.max_pixels} (--max-pixels)"),
    ({"character": "dog", "width": 100}, 422, "over_limit", "multiple of 8"),
    ({"character": "dog", "n": 5, "format": "json"}, 422, "over_limit", "n 5 is more images than this server's 4 a "
     "request (--max-images)"),
    ({"character": "dog", "deadline_s": 301}, 422, "over_limit", "deadline_s 301 is longer than this server's 300 s "
     "(--deadline-s)"),
    # Python's json reads NaN and Infinity; each number refuses them by name, not as out of its range.
    (b'{"character": "dog", "guidance": NaN}', 422, "invalid_request", "guidance: nan is not a finite number"),
    (b'{"character": "dog", "state": {"intensity": NaN}}', 422, "invalid_request",
     "state.intensity: nan is not a finite number"),
    (b'{"character": "dog", "steps": Infinity}', 422, "invalid_request", "steps: inf is not a finite number"),
    (b'{"character": "dog", "n": -Infinity}', 422, "invalid_request", "n: -inf is not a finite number"),
    (b'{"character": "dog", "seed": NaN}', 422, "invalid_request", "seed: nan is not a finite number"),
    (b'{"character": "dog", "width": Infinity}', 422, "invalid_request", "width: inf is not a finite number"),
    (b'{"character": "dog", "deadline_s": NaN}', 422, "invalid_request", "deadline_s: nan is not a finite number"),
    ({"character": "dog", "n": 2}, 422, "over_limit", "format"),
    ({"character": "dog", "seed": 2**53}, 422, "invalid_request", "seed"),
    ({"character": "dog", "path": "/etc/passwd"}, 422, "invalid_request", "path"),
])
def test_bad_requests_are_refused_with_what_is_wrong(served, body, status, code, says):
    service, client = served
    kwargs = {"content": body, "headers": {**bearer(USER), "content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body, "headers": bearer(USER)}
    response = client.post("/v1/render", **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and says in response.json()["error"]["message"], response.text
    if "not a finite number" in says:  # named as such, not as out of its range
        assert "less than" not in response.text and "greater than" not in response.text


def test_a_body_over_the_limit_is_refused_whether_or_not_it_says_its_length(served):
    service, client = served
    big = json.dumps({"character": "dog", "prompt": "x" * 70_000}).encode()
    said = client.post("/v1/render", content=big, headers={**bearer(OPERATOR), "content-type": "application/json"})
    assert said.status_code == 413 and said.json()["error"]["code"] == "body_too_large"
    assert "limit of 64 KiB (65536 bytes, --max-body-kb)" in said.json()["error"]["message"]
    chunked = client.post("/v1/render", content=iter([big[:40_000], big[40_000:]]),
                          headers={**bearer(OPERATOR), "content-type": "application/json"})
    assert chunked.status_code == 413


def test_a_content_length_that_is_no_number_is_counted_not_called_over_the_limit():
    """BodyLimit refused a Content-Length that is no number as a body over the limit; it now counts the body."""
    from dreambooth.serving.app import BodyLimit

    async def scenario(body: bytes):
        reached, sent = [], []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def app(scope, receive, send):
            reached.append((await receive())["body"])

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        await BodyLimit(app, 10)({"type": "http", "headers": [(b"content-length", b"2x")]}, receive, send)
        return reached, [m.get("status") for m in sent if m["type"] == "http.response.start"]

    assert async_test(scenario(b"{}")) == ([b"{}"], [])
    assert async_test(scenario(b"{" + b" " * 20 + b"}")) == ([], [413])


def test_metrics_count_outcomes_batches_and_the_cache(served):
    service, client = served
    for _ in range(2):  # drawn, then from the cache
        assert client.post("/v1/render", json={"character": "dog", "seed": 77}, headers=bearer(USER)).status_code == 200
    client.post("/v1/render", json={"character": "cat"}, headers=bearer(USER))
    text = client.get("/metrics", headers=bearer(USER)).text
    assert 'dreambooth_requests_total{endpoint="/v1/render",outcome="unknown_character"}' in text
    assert 'dreambooth_requests_total{endpoint="/v1/render",outcome="ok"}' in text
    for name in ("dreambooth_request_seconds_bucket", "dreambooth_queue_depth", "dreambooth_batch_size_bucket",
                 "dreambooth_images_total", "dreambooth_images_per_second", 'dreambooth_cache_lookups_total{'
                 'result="hit"}'):
        assert name in text, name


# ---------------------------------------------------------------------------------------------- limits and keys

def test_the_rate_limit_answers_429_with_retry_after_and_names_the_limit_hit(tmp_path, tiny_model, monkeypatch):
    """Three requests at once against a burst of 2 hit the burst, not the rate; requests kept up faster than the rate
    for longer than a bucket lasts hit the rate. Each message names its own limit with its value."""
    clock = [1000.0]
    monkeypatch.setattr("dreambooth.serving.auth.time.monotonic", lambda: clock[0])
    service = stand_in_service(tmp_path, tiny_model, rate_per_minute=6, burst=2)
    with TestClient(create_app(service, parse_keys(KEYS, "test"))) as client:
        answers = [client.post("/v1/compile", json={"character": "dog"}, headers=bearer(USER)) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert answers[2].json()["error"]["code"] == "rate_limited" and answers[2].headers["retry-after"] == "10"
        message = answers[2].json()["error"]["message"]
        assert "more than 2 request(s) in a row for this key, this server's burst (--burst 2)" in message, message
        assert "more than 6 requests a minute" not in message
        assert client.post("/v1/compile", json={"character": "dog"}, headers=bearer(OPERATOR)).status_code == 200
        # One every 8 s, against a refill of one every 10 s, from a full bucket: the bucket (2) lasts past the 20 s
        # it takes to refill, and the rate is what is hit.
        statuses = []
        for _ in range(12):
            clock[0] += 8.0
            answer = client.post("/v1/compile", json={"character": "dog"}, headers=bearer(OPERATOR))
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                break
        assert statuses[:-1] == [200] * (len(statuses) - 1) and statuses[-1] == 429 and len(statuses) > 3
        message = answer.json()["error"]["message"]
        assert "more than 6 requests a minute for this key, kept up past a burst of 2: this server's rate " \
            "(--rate-per-minute 6)" in message, message


def test_rate_limiter_refills(monkeypatch):
    clock = [50.0]
    monkeypatch.setattr("dreambooth.serving.auth.time.monotonic", lambda: clock[0])
    limiter = RateLimiter(per_minute=60, burst=1)
    assert limiter.take("a") is None and limiter.take("a").seconds == 1 and limiter.take("b") is None
    clock[0] += 1.01
    assert limiter.take("a") is None


def test_keys_come_from_a_file_and_the_environment_and_are_checked(tmp_path, monkeypatch):
    file = tmp_path / "keys"
    file.write_text(f"# comment\nalice user {USER}\n")
    monkeypatch.setenv("DREAMBOOTH_API_KEYS", f"root operator {OPERATOR}")
    keys = load_keys(file)
    assert [(k.name, k.role) for k in keys] == [("alice", "user"), ("root", "operator")]
    assert find_key(keys, OPERATOR).name == "root" and find_key(keys, USER + "x") is None
    assert USER not in repr(keys)  # only digests are kept
    with pytest.raises(UserError) as e:
        parse_keys("a admin " + "t" * 20 + "\nb user short\nc user\n" + f"d user {USER}\nd user {OPERATOR}", "keys")
    for says in ("role 'admin'", "at least 16", "NAME ROLE TOKEN", "used twice"):
        assert says in str(e.value)
    monkeypatch.setenv("DREAMBOOTH_API_KEYS", f"alice operator {OPERATOR}")
    with pytest.raises(UserError, match="alice"):
        load_keys(file)
    with pytest.raises(UserError, match="does not exist"):
        load_keys(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- the queue

def async_test(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=60))


def test_same_key_jobs_are_drawn_in_one_call_and_others_apart():
    calls = []

    async def scenario():
        batcher = Batcher(lambda items: (calls.append(list(items)), items)[1], max_queue=16, max_batch=4,
                          window_s=0.2)
        batcher.start()
        far = time.monotonic() + 30
        jobs = batcher.submit("a", [1, 2], far) + batcher.submit("b", [3], far) + batcher.submit("a", [4, 5, 6], far)
        results = await asyncio.gather(*(job.future for job in jobs))
        await batcher.stop()
        return results

    assert async_test(scenario()) == [1, 2, 3, 4, 5, 6]
    assert calls == [[1, 2, 4, 5], [3], [6]]  # up to max_batch of the oldest key first, in order


def test_a_full_queue_refuses_the_whole_request_and_expired_jobs_are_not_drawn():
    gate, drawn = threading.Event(), []

    def render(items):
        gate.wait(10)
        drawn.extend(items)
        return items

    async def scenario():
        batcher = Batcher(render, max_queue=3, max_batch=1, window_s=0)
        batcher.start()
        soon, far = time.monotonic() + 0.3, time.monotonic() + 30
        first = batcher.submit("a", ["first"], far)
        await asyncio.sleep(0.05)  # drawing now, out of the queue
        late = batcher.submit("a", ["late"], soon)
        kept = batcher.submit("a", ["kept", "too"], far)
        with pytest.raises(QueueFull) as full:
            batcher.submit("a", ["refused"], far)
        assert full.value.retry_after >= 1 and batcher.depth == 3
        await asyncio.sleep(0.4)
        gate.set()
        await asyncio.gather(*(job.future for job in first + kept))
        with pytest.raises(Exception) as e:
            await late[0].future
        await batcher.stop()
        return type(e.value).__name__

    assert async_test(scenario()) == "DeadlineExceeded"
    assert drawn == ["first", "kept", "too"]


def test_a_render_error_reaches_its_requests_and_the_worker_goes_on():
    results = iter([RuntimeError("out of memory"), None])

    def render(items):
        error = next(results)
        if error:
            raise error
        return items

    async def scenario():
        batcher = Batcher(render, max_queue=4, max_batch=4, window_s=0)
        batcher.start()
        bad = batcher.submit("a", [1], time.monotonic() + 30)
        with pytest.raises(RuntimeError):
            await bad[0].future
        good = batcher.submit("a", [2], time.monotonic() + 30)
        value = await good[0].future
        await batcher.stop()
        return value

    assert async_test(scenario()) == 2


def concurrently(count, send):
    answers = [None] * count

    def one(i):
        answers[i] = send(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def test_queue_full_and_deadline_over_http(tmp_path, tiny_model):
    gate = threading.Event()
    renderer = StandInRenderer(gate)
    service = stand_in_service(tmp_path, tiny_model, renderer, cache=ImageCache(tmp_path / "cache", 10**6),
                               max_queue=2, max_batch=1, batch_window_ms=0)
    import httpx2

    with running(create_app(service, [], auth=False)) as url:
        def send(i):
            return httpx2.post(f"{url}/v1/render", json={"character": "dog", "seed": i, "deadline_s": 1.5},
                               timeout=30)

        answers = concurrently(5, send)  # one drawing (held), two queued, two refused
        statuses = sorted(a.status_code for a in answers)
        gate.set()
        refused = [a for a in answers if a.status_code == 429]
        assert statuses == [429, 429, 504, 504, 504], statuses
        assert all(a.json()["error"]["code"] == "queue_full" and int(a.headers["retry-after"]) >= 1
                   for a in refused)
        assert "queues at most 2 (--max-queue)." in refused[0].json()["error"]["message"]
        assert all(a.json()["error"]["code"] == "deadline" for a in answers if a.status_code == 504)
        deadline_over = time.monotonic() + 10
        while renderer.calls < 1 and time.monotonic() < deadline_over:
            time.sleep(0.05)
        time.sleep(0.3)
        assert service.batcher.depth == 0 and renderer.calls == 1  # the expired ones were never drawn
        # The held picture was cached after all: its retry is answered at once.
        held = renderer.batches[0][0]
        again = httpx2.post(f"{url}/v1/render", json={"character": "dog", "seed": held.seed}, timeout=30)
        assert again.status_code == 200 and again.headers["x-cache"] == "hit"
        text = httpx2.get(f"{url}/metrics").text
        assert 'outcome="queue_full"' in text and 'outcome="deadline"' in text


def test_a_client_that_leaves_leaves_the_queue(tmp_path, tiny_model):
    gate = threading.Event()
    renderer = StandInRenderer(gate)
    service = stand_in_service(tmp_path, tiny_model, renderer, max_batch=1, batch_window_ms=0)
    import httpx2

    with running(create_app(service, [], auth=False)) as url:
        holder = threading.Thread(target=lambda: httpx2.post(f"{url}/v1/render", json={"character": "dog", "seed": 1},
                                                              timeout=30))
        holder.start()
        time.sleep(0.3)  # seed 1 is drawing (held)
        body = json.dumps({"character": "dog", "seed": 2}).encode()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/render HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 5
            while service.batcher.depth < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert service.batcher.depth == 1
        deadline = time.monotonic() + 5
        while service.batcher.depth > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.batcher.depth == 0  # gone before it was drawn
        gate.set()
        holder.join(30)
        time.sleep(0.3)
        assert [r.seed for batch in renderer.batches for r in batch] == [1]
        assert 'outcome="client_closed"' in httpx2.get(f"{url}/metrics").text


def test_concurrent_requests_for_one_character_are_one_pipeline_call(tiny_model, tmp_path):
    """On the real tiny model: four clients at once, one call of the pipeline with a batch of four; another size
    is another call."""
    path = characters_file(tmp_path, tiny_model)
    service = build_service(path, ServeOptions(characters=path, no_cache=True, batch_window_ms=400))
    pipe = service.renderer.drawn["dog"].slot.pipe
    sizes = []
    original = type(pipe).__call__

    def counted(self, *args, **kwargs):
        sizes.append(len(kwargs["generator"]))
        return original(self, *args, **kwargs)

    import httpx2

    with running(create_app(service, [], auth=False)) as url:
        type(pipe).__call__ = counted
        try:
            answers = concurrently(5, lambda i: httpx2.post(f"{url}/v1/render", json={
                "character": "dog", "seed": i, **({"width": 56} if i == 4 else {})}, timeout=60))
        finally:
            type(pipe).__call__ = original
    assert [a.status_code for a in answers] == [200] * 5
    assert sorted(sizes) == [1, 4]
    one = service.renderer.render([service.compile(RenderBody(character="dog", seed=2), False)])[0]
    assert np.abs(png_pixels(one) - png_pixels(answers[2].content)).max() <= 1  # a batch draws what one draws


def test_counting_tokens_while_the_worker_draws_never_touches_the_pipelines_tokenizers(tiny_model, tmp_path):
    """Issue 24: /v1/compile counted tokens with the pipeline's own tokenizer, whose every call sets padding and
    truncation on its backend; a count between the worker's setting them and its encoding left the worker's text
    unpadded, and the negative and the prompt came out at different lengths: a 500 ("Expected size 2 but got size
    7" in torch.cat). The interleaving is forced, not hoped for: each time the worker's pipeline sets max-length
    padding, it waits until a /v1/compile has been answered."""
    import queue

    from dreambooth.formats.lora_loading import text_sides

    path = characters_file(tmp_path, tiny_model)
    service = build_service(path, ServeOptions(characters=path, no_cache=True, batch_window_ms=0))
    pipe = service.renderer.drawn["dog"].slot.pipe
    counting = service.renderer.count_tokens("dog")
    assert {id(t) for t in getattr(counting, "tokenizers", [])}.isdisjoint({id(t) for _, t, _ in text_sides(pipe)})
    alone = service.renderer.render([service.compile(RenderBody(character="dog", seed=4), False)])[0]

    entered, resumed = queue.Queue(), queue.Queue()
    tokenizer, set_state = pipe.tokenizer, pipe.tokenizer.set_truncation_and_padding

    def held(padding_strategy, *args, **kwargs):
        set_state(padding_strategy, *args, **kwargs)
        if threading.current_thread().name.startswith("render") and padding_strategy.value == "max_length":
            entered.put(True)
            resumed.get(timeout=30)

    tokenizer.set_truncation_and_padding = held
    import httpx2

    with running(create_app(service, [], auth=False)) as url:
        drawn = {}
        worker = threading.Thread(target=lambda: drawn.update(answer=httpx2.post(
            f"{url}/v1/render", json={"character": "dog", "seed": 4}, timeout=60)))
        worker.start()
        compiles = []
        while worker.is_alive() or not entered.empty():
            try:
                entered.get(timeout=0.05)
            except queue.Empty:
                continue
            compiles.append(httpx2.post(f"{url}/v1/compile", json={"character": "dog", "state": {
                "location": "beach"}}, timeout=30).status_code)
            resumed.put(True)
        worker.join(60)
    assert compiles == [200, 200], "the prompt's and the negative prompt's encoding each waited for a count"
    assert drawn["answer"].status_code == 200, drawn["answer"].text
    assert np.abs(png_pixels(drawn["answer"].content) - png_pixels(alone)).max() <= 1


def test_the_counting_tokenizers_take_turns_between_request_threads():
    """The copies are shared by the request threads (sync endpoints run in a thread pool): two counts never run at
    once. A count waits up to 0.5 s for a second one to arrive inside the tokenizer; with the lock none can."""
    from types import SimpleNamespace

    from dreambooth.serving.renderer import TokenCounter

    meeting, met = threading.Barrier(2, timeout=0.5), []

    class Meeting:
        model_max_length = 77

        def __call__(self, text, truncation=False):
            try:
                meeting.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                meeting.reset()
            return SimpleNamespace(input_ids=text.split())

    counter = TokenCounter([Meeting()])
    counts = concurrently(2, lambda i: counter("a photo of sks dog"))
    assert counts == [5, 5] and met == []


# ---------------------------------------------------------------------------------------------- the cache

def test_cache_keys_follow_the_request_and_the_model(tmp_path):
    request = {"prompt": "a", "seed": 1, "fragments": [{"slot": "identity", "text": "a", "weight": 1.0}],
               "tokens": 3, "dropped": []}
    key = cache_key(request, "m1")
    assert key == cache_key({**request, "tokens": 4, "dropped": [{"slot": "x", "text": "y"}]}, "m1")
    assert key != cache_key(request, "m2") and key != cache_key({**request, "seed": 2}, "m1")
    assert key != cache_key({**request, "fragments": [{"slot": "identity", "text": "a", "weight": 1.1}]}, "m1")
    cache = ImageCache(tmp_path / "c", max_bytes=250)
    for i in range(3):
        cache.put(cache_key({**request, "seed": i}, "m1"), bytes(100))
        time.sleep(0.01)
    assert cache.get(cache_key({**request, "seed": 0}, "m1")) is None  # least recently used went first
    assert cache.get(cache_key({**request, "seed": 2}, "m1")) == bytes(100)
    assert sum(p.stat().st_size for p in (tmp_path / "c").rglob("*.png")) <= 250
    with pytest.raises(AssertionError):
        cache.get("../../etc/passwd")


def test_a_model_saved_again_is_a_cache_miss(tiny_model, tmp_path):
    from dreambooth.serving.renderer import character_model_hash

    copy = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_model, copy)
    character = load_characters(characters_file(tmp_path, copy))["dog"]
    before = character_model_hash(character)
    assert character_model_hash(character) == before
    weights = next((copy / "unet").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert character_model_hash(character) != before


# ---------------------------------------------------------------------------------------------- LoRA characters

@pytest.fixture(scope="module")
def lora_characters(tiny_model, tmp_path_factory):
    """Two LoRA characters and a full one on the tiny model, and a fourth whose LoRA brings the same new token."""
    from test_export import make_lora, unet_config

    folder = tmp_path_factory.mktemp("loras")
    files = [make_lora(tiny_model, folder / f"lora{i}", seed=i + 1, unet_config=unet_config()) for i in range(2)]
    entries = [{"name": "a", "model": str(tiny_model), "loras": [{"file": str(files[0]), "weight": 1.0}]},
               {"name": "b", "model": str(tiny_model), "loras": [{"file": str(files[0]), "weight": 0.5},
                                                                 {"file": str(files[1]), "weight": 0.8}]},
               {"name": "plain", "model": str(tiny_model)}]
    for entry in entries:
        entry.update(identifier="sks", class_word="dog", width=64, height=64, steps=3)
    return characters_file(folder, tiny_model, entries), files


def test_lora_characters_share_one_base_and_switching_draws_what_a_fresh_pipeline_draws(lora_characters,
                                                                                        tiny_model):
    from dreambooth.formats.lora_loading import load_loras
    from dreambooth.generate import GenerationSettings, generate_images
    from dreambooth.models.loading import load_pipeline

    path, files = lora_characters
    service = build_service(path, ServeOptions(characters=path, no_cache=True))
    renderer = service.renderer
    assert len(renderer.slots) == 1  # one copy of the base for all three

    def served(name):
        request = service.compile(RenderBody(character=name, seed=3), False)
        return png_pixels(renderer.render([request])[0]), request.prompt

    order = ["a", "b", "plain", "a", "b"]
    pictures = [served(name) for name in order]
    loras = {"a": [(files[0], 1.0)], "b": [(files[0], 0.5), (files[1], 0.8)], "plain": []}
    for name, (pixels, prompt) in zip(order, pictures):
        pipe = load_pipeline(tiny_model, device=torch.device("cpu"), dtype=torch.float32, scheduler="dpm++")
        load_loras(pipe, loras[name])
        fresh, _ = generate_images(pipe, GenerationSettings(prompts=[prompt], seeds=[3], steps=3, height=64,
                                                            width=64))[0]
        assert np.abs(pixels - np.asarray(fresh, dtype=np.int16)).max() <= 1, name
    assert np.abs(pictures[0][0] - pictures[1][0]).max() > 0 and np.abs(pictures[0][0] - pictures[2][0]).max() > 0


def test_two_loras_with_the_same_new_token_get_their_own_copies(tiny_model, instance_dir, tmp_path, capsys):
    """Two subjects trained as `<sks>`: one tokenizer cannot hold both embeddings, so the second gets its own base
    copy, and each draws with its own."""
    from test_lora import lora_cfg

    from dreambooth.training.loop import train

    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        train(lora_cfg(tiny_model, instance_dir, out, **{"training.max_train_steps": 1, "training.seed": i,
                                                          "token.identifier": "<sks>", "token.initializer": "dog",
                                                          "dataset.instance_prompt": "a photo of <sks> dog",
                                                          "model.train_text_encoder": True}))
        outs.append(out)
    entries = [{"name": f"s{i}", "model": str(tiny_model), "loras": [{"file": str(out)}], "identifier": "<sks>",
                "class_word": "dog", "width": 64, "height": 64, "steps": 2} for i, out in enumerate(outs)]
    path = characters_file(tmp_path, tiny_model, entries)
    service = build_service(path, ServeOptions(characters=path, no_cache=True))
    assert len(service.renderer.slots) == 2 and "own copy" in capsys.readouterr().out
    assert service.compile(RenderBody(character="s0"), False).tokens == \
        service.compile(RenderBody(character="s1"), False).tokens


# ---------------------------------------------------------------------------------------------- the command

def test_serve_refuses_an_open_host_without_keys_and_reports_the_characters_file(tmp_path, tiny_model, capsys):
    from dreambooth.cli import main

    path = characters_file(tmp_path, tiny_model)
    assert main(["serve", "--characters", str(path), "--host", "0.0.0.0"]) == 2
    assert "--api-keys" in capsys.readouterr().err
    bad = characters_file(tmp_path, tiny_model, [{"name": "x y", "model": "missing", "identifier": "",
                                                  "class_word": "dog"}])
    assert main(["serve", "--characters", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--rate-per-minute", "--deadline-s", "--batch-window-ms", "--llm-timeout-s"])
def test_serve_refuses_option_numbers_that_are_not_finite(flag, capsys):
    """float() reads nan and inf, and a NaN passes a minimum: `--deadline-s nan` made every wait endless."""
    from dreambooth.cli import main

    for value in ("nan", "inf", "-inf"):
        with pytest.raises(SystemExit) as e:
            main(["serve", f"{flag}={value}"])
        assert e.value.code == 2 and f"{flag} '{value}' is not a finite number" in capsys.readouterr().err


def test_serve_refuses_at_start_up_the_characters_its_limits_would_refuse(tmp_path, tiny_model, capsys):
    """Issue 24: --max-pixels was 768x768, so an SDXL character at its native 1024x1024 got 422 on every render, and
    nothing said so at start-up. The default now admits SDXL's size; and one message names every character whose own
    settings the limits refuse, with what to raise, before the server listens."""
    from dreambooth.cli import main
    from dreambooth.models.tiny_families import build_model

    xl = build_model(tmp_path / "xl", size="sdxl-tiny", seed=2)
    base = {"identifier": "sks", "class_word": "dog", "width": 64, "height": 64}
    entries = [{**base, "name": "xl", "model": str(xl), "width": 1024, "height": 1024},
               {**base, "name": "fine", "model": str(tiny_model)}]
    path = characters_file(tmp_path, tiny_model, entries)
    service = build_service(path, ServeOptions(characters=path, no_cache=True))
    request = service.compile(RenderBody(character="xl"), False)  # no over_limit
    assert (request.width, request.height) == (1024, 1024)

    entries += [{**base, "name": "slow", "model": str(tiny_model), "steps": 80},
                {**base, "name": "wordy", "model": str(tiny_model),
                 "prompt_template": "{identifier} {class_word} " + "very " * 80},
                {**base, "name": "grumpy", "model": str(tiny_model), "negative_prompt": "blurry " * 90},
                {**base, "name": "odd", "model": str(tiny_model), "scheduler": "NoSuchScheduler"}]
    path = characters_file(tmp_path, tiny_model, entries)
    capsys.readouterr()
    assert main(["serve", "--characters", str(path), "--port", "0", "--max-pixels", str(768 * 768)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 5 character(s) of") and err.count("error:") == 1 and "Traceback" not in err
    lines = {line.split(":")[0].strip(): line for line in err.splitlines()[1:]}
    assert sorted(lines) == ["grumpy", "odd", "slow", "wordy", "xl"], err
    assert "its scheduler: unknown scheduler 'NoSuchScheduler'; use one of dpm++" in lines["odd"]
    assert "1048576 pixels, more than --max-pixels 589824 (its model is SDXL, made for 64x64): raise --max-pixels " \
        "to at least 1048576" in lines["xl"]
    assert "steps 80 are more than --max-steps 50: raise --max-steps to at least 80" in lines["slow"]
    assert "its prompt_template makes" in lines["wordy"] and "shorten prompt_template" in lines["wordy"]
    assert "its negative_prompt makes" in lines["grumpy"] and "more than its text encoder's 77" in lines["grumpy"]
    assert ServeOptions.max_pixels == 1024 * 1024


def test_keyless_serve_answers_only_requests_addressed_to_this_machine(tmp_path, tiny_model):
    """`serve` without keys (loopback): a page of another site that rebinds its name to 127.0.0.1 is refused by the
    Host it sends; with keys, or --allow-no-auth on another --host (an open service, by choice), any name is."""
    from dreambooth.serving.command import build_app

    path = characters_file(tmp_path, tiny_model)
    app, _ = build_app(ServeOptions(characters=path, no_cache=True))
    with TestClient(app, base_url="http://127.0.0.1:7861") as client:
        for host in ("127.0.0.1:7861", "localhost", "[::1]:7861"):
            assert client.get("/healthz", headers={"host": host}).status_code == 200, host
        rebound = client.post("/v1/render", json={"character": "dog"}, headers={"host": "rebound.example:7861"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host"
        assert "'rebound.example'" in rebound.json()["error"]["message"]
    keys = tmp_path / "keys"
    keys.write_text(f"alice user {USER}\n")
    for options in (ServeOptions(characters=path, no_cache=True, api_keys=keys),
                    ServeOptions(characters=path, no_cache=True, host="0.0.0.0", allow_no_auth=True)):
        app, _ = build_app(options)
        with TestClient(app, base_url="http://serve.example") as client:
            assert client.get("/healthz").status_code == 200


def test_serve_runs_and_answers_on_its_port(tmp_path, tiny_model):
    path = characters_file(tmp_path, tiny_model)
    keys = tmp_path / "keys"
    keys.write_text(f"alice user {USER}\n")
    env = {**os.environ, "DREAMBOOTH_API_KEYS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth", "serve", "--characters", str(path), "--port", "0",
                             "--api-keys", str(keys)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "serve exited"
        url = line.split(" at ")[1].split()[0].rstrip("/")
        import httpx2

        assert httpx2.get(f"{url}/healthz").json()["auth"] is True
        answer = httpx2.post(f"{url}/v1/render", json={"character": "dog"}, headers=bearer(USER), timeout=60)
        assert answer.status_code == 200 and answer.content[:4] == b"\x89PNG"
        assert (tmp_path / ".serve-cache").is_dir()  # the cache's default place: beside the characters file
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_demo_maps_states_onto_what_the_world_draws(tmp_path, monkeypatch):
    """The demo's vocabulary: the location becomes a background, the plain circle's mood its colour; read back
    from the pixels. (The demo's trained model is stood in for by the built-in one, so no training runs.)"""
    import shutil

    from dreambooth.evaluation import world
    from dreambooth.evaluation.world_model import builtin_model_path
    from dreambooth.serving.command import demo_characters_file

    shutil.copytree(builtin_model_path(), tmp_path / "demo" / "model")
    path = demo_characters_file(tmp_path / "demo")
    assert str(builtin_model_path()) in path.read_text()
    service = build_service(path, ServeOptions(characters=path, no_cache=True))
    assert sorted(service.characters) == ["mood-circle", "sks"]
    cases = [("sad", "night", "blue", "black"), ("happy", "dusk", "yellow", "purple"),
             ("angry", "snow", "red", "white")]
    for emotion, location, colour, background in cases:
        requests = [service.compile(RenderBody(character="mood-circle", seed=seed, state=CharacterState(
            emotion=emotion, location=location)), False) for seed in range(6)]
        assert requests[0].prompt.startswith("a photo of a circle")
        readings = [world.read_image(Image.open(io.BytesIO(png))) for png in service.renderer.render(requests)]
        assert sum(r.colour == colour for r in readings) >= 4, (emotion, [r.colour for r in readings])
        assert sum(r.background == background for r in readings) >= 4, (location, [r.background for r in readings])
    sks = service.compile(RenderBody(character="sks", state=CharacterState(emotion="sad", gaze="away",
                                                                           location="city")), False)
    assert sks.prompt == "a photo of sks circle on a gray background"  # what the world cannot draw adds nothing


def test_every_serve_option_reaches_the_service(tiny_model, tmp_path):
    """Wiring: each limit, cache and precision option given on the command line is the one the service uses."""
    from dreambooth.cli import COMMANDS, build_parser, command_options

    path = characters_file(tmp_path, tiny_model)
    argv = ["serve", "--characters", str(path), "--max-steps", "7", "--max-pixels", "4096", "--max-images", "3",
            "--max-body-kb", "5", "--rate-per-minute", "9", "--burst", "2", "--max-queue", "11", "--max-batch", "6",
            "--batch-window-ms", "13", "--deadline-s", "17", "--cache-dir", str(tmp_path / "c"), "--cache-mb", "2",
            "--precision", "bf16"]
    parser = build_parser()
    options = command_options(COMMANDS["serve"], parser.parse_args(argv), parser.subcommand("serve"))
    service = build_service(path, options)
    limits = service.limits
    assert (limits.max_steps, limits.max_pixels, limits.max_images, limits.max_body_bytes, limits.rate_per_minute,
            limits.burst, limits.max_queue, limits.max_batch, limits.batch_window_ms, limits.deadline_s) == \
        (7, 4096, 3, 5 * 1024, 9.0, 2, 11, 6, 13.0, 17.0)
    assert (service.batcher.max_queue, service.batcher.max_batch, service.batcher.window_s) == (11, 6, 0.013)
    assert service.cache.folder == tmp_path / "c" and service.cache.max_bytes == 2 * 1024 * 1024
    assert service.renderer.drawn["dog"].slot.pipe.unet.dtype == torch.bfloat16
    no_cache = command_options(COMMANDS["serve"], parser.parse_args(["serve", "--no-cache"]),
                               parser.subcommand("serve"))
    assert build_service(path, no_cache).cache.folder is None


def test_served_connections_send_at_once_and_a_taken_port_is_refused():
    """TCP_NODELAY on accepted connections: without it a kept-alive client's second request waited ~40 ms for
    the first's ACK (Nagle), which split batches in the load test (docs/serve-load.md)."""
    from dreambooth.serving.command import listening_socket

    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]

    async def accepted_nodelay():
        seen = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            option = writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            seen.set_result(option)
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        option = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        return option

    assert async_test(accepted_nodelay()) != 0
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with pytest.raises(UserError, match="--port"):
        listening_socket("127.0.0.1", taken.getsockname()[1])
    taken.close()


# ---------------------------------------------------------------------------------------------- found in review

def test_a_failed_draw_is_a_500_counted_as_internal_that_names_no_server_path(tmp_path, tiny_model):
    class Failing(StandInRenderer):
        def render(self, requests):
            raise FileNotFoundError(f"No such file: '{tmp_path}/secret/unet.safetensors'")

    service = stand_in_service(tmp_path, tiny_model, Failing())
    with TestClient(create_app(service, [], auth=False), raise_server_exceptions=False) as client:
        answer = client.post("/v1/render", json={"character": "dog"})
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal"
        assert str(tmp_path) not in answer.text and "FileNotFoundError" not in answer.text
        text = client.get("/metrics").text
    assert 'dreambooth_requests_total{endpoint="/v1/render",outcome="internal"} 1.0' in text
    assert 'endpoint="/v1/render",outcome="ok"' not in text


def test_a_cache_that_cannot_store_costs_only_the_cache_entry(tmp_path, tiny_model):
    import shutil

    cache = ImageCache(tmp_path / "cache", 10**6)
    service = stand_in_service(tmp_path, tiny_model, cache=cache)
    with TestClient(create_app(service, [], auth=False)) as client:
        assert client.post("/v1/render", json={"character": "dog", "seed": 1}).status_code == 200
        shutil.rmtree(tmp_path / "cache")  # removed while serving: made again
        assert client.post("/v1/render", json={"character": "dog", "seed": 2}).status_code == 200
        assert client.post("/v1/render", json={"character": "dog", "seed": 2}).headers["x-cache"] == "hit"
        (tmp_path / "cache").chmod(0o500)
        try:
            if os.access(tmp_path / "cache", os.W_OK):  # root writes anyway: make the folder a file instead
                shutil.rmtree(tmp_path / "cache")
                (tmp_path / "cache").write_text("not a folder")
            assert client.post("/v1/render", json={"character": "dog", "seed": 3}).status_code == 200
        finally:
            (tmp_path / "cache").chmod(0o700)


def test_a_full_cache_trims_below_its_limit_so_the_next_writes_do_not_scan(tmp_path):
    cache = ImageCache(tmp_path / "c", max_bytes=1000)
    scans = []
    real = cache._trim
    cache._trim = lambda: (scans.append(1), real())
    for i in range(40):
        cache.put(cache_key({"seed": i}, "m"), bytes(100))
    assert sum(p.stat().st_size for p in (tmp_path / "c").rglob("*.png")) <= 1000
    assert len(scans) <= 40 // 2  # 10% headroom: at most every other write passes the limit again


def test_unknown_paths_methods_and_keyless_bad_bodies_answer_in_the_error_shape(served):
    service, client = served
    missing = client.get("/v2/render")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = client.get("/v1/render", headers=bearer(USER))
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    keyless = client.post("/v1/render", content=b"{bad", headers={"content-type": "application/json"})
    assert keyless.status_code == 401  # the key is checked before the body's validity is told


def test_requests_that_could_never_fit_are_refused_as_such(tmp_path, tiny_model):
    service = stand_in_service(tmp_path, tiny_model, max_queue=2, max_images=4)
    with TestClient(create_app(service, [], auth=False)) as client:
        answer = client.post("/v1/render", json={"character": "dog", "n": 3, "format": "json"})
        assert answer.status_code == 422 and "queue holds (2, --max-queue)" in answer.json()["error"]["message"]
        long = client.post("/v1/compile", json={"character": "dog", "negative_prompt": "blurry " * 90})
        assert long.status_code == 422 and long.json()["error"]["code"] == "prompt_too_long"


def test_retry_after_is_the_wait_for_the_places_a_request_needs():
    batcher = Batcher(lambda items: items, max_queue=8, max_batch=4, window_s=0)
    batcher.batch_seconds = 2.0
    batcher.pending = [object()] * 8
    assert batcher.retry_after(1) == 2 and batcher.retry_after(8) == 4  # one batch frees 4 places, two free 8


def test_keyless_callers_do_not_grow_the_rate_limiter_without_bound(monkeypatch):
    limiter = RateLimiter(per_minute=6000, burst=1)
    monkeypatch.setattr(RateLimiter, "MAX_CALLERS", 100)
    for i in range(1000):
        limiter._buckets[f"10.0.{i}"] = (1.0, time.monotonic() - 60, 0.0)  # idle long enough to be full again
    limiter.take("new caller")
    assert len(limiter._buckets) == 1


def test_a_lora_named_by_its_user_hashes_its_own_token_file(tiny_model, tmp_path):
    """A LoRA saved as NAME.safetensors keeps its new tokens in NAME.tokens.safetensors (formats.lora.token_file_for):
    a retrained token file is a new model for the cache."""
    from safetensors.torch import save_file

    from dreambooth.serving.renderer import character_model_hash

    lora = tmp_path / "saya.safetensors"
    save_file({"unet.a.lora_A.weight": torch.zeros(1)}, str(lora))
    save_file({"<saya>": torch.zeros(4)}, str(tmp_path / "saya.tokens.safetensors"))
    character = load_characters(characters_file(tmp_path, tiny_model, [
        {"name": "saya", "model": str(tiny_model), "loras": [{"file": str(lora)}], "identifier": "<saya>",
         "class_word": "girl"}]))["saya"]
    before = character_model_hash(character)
    save_file({"<saya>": torch.ones(4)}, str(tmp_path / "saya.tokens.safetensors"))
    assert character_model_hash(character) != before
