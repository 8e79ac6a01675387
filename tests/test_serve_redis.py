"""The shared store (`serve --redis-url`, serving/stores.py) on a real redis-server: a picture one replica draws is a
hit for another, the size bound trims the least recently used, replicas share a caller's burst and read burst and
rate as the local limiter does, Redis stopped while serving fails no render, and the option reaches the service.

Without Debian's redis-server the tests skip, unless DREAMBOOTH_REQUIRE_REDIS=1 (CI), where they fail."""

from __future__ import annotations

import logging
import random
import socket
import time

import pytest
import redis
from serving_support import StandInRenderer, characters_file, redis_server, stand_in_service
from starlette.testclient import TestClient

from dreambooth.cli import COMMANDS, build_parser, command_options, main
from dreambooth.command_options import ServeOptions
from dreambooth.errors import UserError
from dreambooth.serving import stores as stores_module
from dreambooth.serving.app import create_app
from dreambooth.serving.auth import RateLimiter
from dreambooth.serving.cache import ImageCache
from dreambooth.serving.command import build_service
from dreambooth.serving.stores import RedisImageCache, RedisRateLimiter, redis_client, stores

BODY = {"character": "dog", "state": {"action": "running"}, "format": "png"}


@pytest.fixture
def server(tmp_path):
    with redis_server(tmp_path) as running:
        yield running


def client_of(server) -> redis.Redis:
    """A client as `serve` makes one (its timeouts and its single retry)."""
    return redis_client(server.url)


def key(n: int) -> str:
    return f"{n:064x}"


def serve_options(*argv) -> ServeOptions:
    parser = build_parser()
    return command_options(COMMANDS["serve"], parser.parse_args(["serve", *map(str, argv)]),
                           parser.subcommand("serve"))


# ---------------------------------------------------------------------------------------------- the image cache

def test_a_picture_one_replica_draws_is_a_hit_for_another(server, tmp_path, tiny_model):
    first, second = StandInRenderer(), StandInRenderer()
    services = [stand_in_service(tmp_path, tiny_model, renderer=renderer, rate_per_minute=0,
                                 cache=RedisImageCache(client_of(server), 1 << 20)) for renderer in (first, second)]
    with TestClient(create_app(services[0], [], auth=False)) as one, \
            TestClient(create_app(services[1], [], auth=False)) as other:
        drawn = one.post("/v1/render", json=BODY)
        assert drawn.headers["x-cache"] == "miss" and first.calls == 1
        shared = other.post("/v1/render", json=BODY)
        assert shared.status_code == 200 and shared.headers["x-cache"] == "hit"
        assert second.calls == 0 and shared.content == drawn.content


def test_the_shared_cache_trims_the_least_recently_used_past_its_bound(server):
    cache, other = RedisImageCache(client_of(server), 1000), RedisImageCache(client_of(server), 1000)
    png = {n: bytes([n]) * 400 for n in range(4)}
    cache.put(key(0), png[0])
    other.put(key(1), png[1])
    assert cache.get(key(0)) == png[0]  # 0 is now used more recently than 1
    other.put(key(2), png[2])  # 1200 bytes > 1000: trimmed to at most 900, least recently used first
    assert (cache.get(key(1)), cache.get(key(0)), cache.get(key(2))) == (None, png[0], png[2])
    client = client_of(server)
    assert int(client.get("dreambooth:image-bytes")) == 800 and client.zcard("dreambooth:images") == 2
    # a picture Redis dropped by itself (its maxmemory policy) is a miss, and leaves the count
    client.delete(f"dreambooth:image:{key(0)}")
    assert cache.get(key(0)) is None and int(client.get("dreambooth:image-bytes")) == 400
    cache.put(key(2), png[3][:100])  # stored again smaller: counted once, at its new size
    assert int(client.get("dreambooth:image-bytes")) == 100 and cache.get(key(2)) == png[3][:100]


# ---------------------------------------------------------------------------------------------- the rate limits

def test_two_limiters_on_one_redis_share_a_callers_burst(server):
    clock = [1000.0]
    one, two = (RedisRateLimiter(client_of(server), 6, 3, clock=lambda: clock[0]) for _ in range(2))
    assert [one.take("alice") for _ in range(3)] == [None] * 3
    refused = two.take("alice")
    assert refused is not None and refused.limit == "burst" and refused.seconds == 10
    assert two.take("bob") is None  # each caller has a bucket of its own
    clock[0] += 10.0  # one token back, for whichever replica asks first
    assert two.take("alice") is None and one.take("alice") is not None


def test_the_shared_limiter_reads_burst_and_rate_as_the_local_one(server, monkeypatch):
    """The same calls at the same times get the same answers (refusal, seconds, burst or rate) from both."""
    clock = [5000.0]
    monkeypatch.setattr("dreambooth.serving.auth.time.monotonic", lambda: clock[0])
    local = RateLimiter(per_minute=6, burst=2)
    shared = RedisRateLimiter(client_of(server), 6, 2, clock=lambda: clock[0])
    draw = random.Random(0)
    steps = [(0.0, "a")] * 3 + [(8.0, "a")] * 12 + [(draw.choice([0.0, 0.5, 3.0, 8.0, 25.0]), draw.choice("ab"))
                                                    for _ in range(80)]
    answers = []
    for wait, caller in steps:
        clock[0] += wait
        answers.append((local.take(caller), shared.take(caller)))
    assert all(mine == theirs for mine, theirs in answers), answers
    kinds = {mine.limit for mine, _ in answers if mine is not None}
    assert kinds == {"burst", "rate"}  # the sequence reaches both readings


# ---------------------------------------------------------------------------------------------- Redis gone

def test_redis_stopped_while_serving_fails_no_render_and_the_limits_fall_back_to_this_process(
        server, tmp_path, tiny_model, caplog):
    renderer = StandInRenderer()
    client = client_of(server)
    service = stand_in_service(tmp_path, tiny_model, renderer=renderer, rate_per_minute=6, burst=3,
                               cache=RedisImageCache(client, 1 << 20, retry_s=0),
                               limiter=RedisRateLimiter(client, 6, 3, retry_s=0))
    with TestClient(create_app(service, [], auth=False)) as app:
        assert app.post("/v1/render", json=BODY).headers["x-cache"] == "miss"
        server.stop()
        with caplog.at_level(logging.WARNING, logger="dreambooth.serve"):
            again = app.post("/v1/render", json=BODY)
            assert again.status_code == 200 and again.headers["x-cache"] == "miss" and renderer.calls == 2
            # this process's own bucket, full: the burst (3) less the render above, then refused as a burst
            statuses = [app.post("/v1/compile", json={"character": "dog"}).status_code for _ in range(3)]
            assert statuses == [200, 200, 429]
        failures = [r.getMessage() for r in caplog.records if "Redis failed" in r.getMessage()]
        assert len(failures) == 2, failures  # once for the cache, once for the limits: not once per request
        server.start()
        assert app.post("/v1/render", json={**BODY, "seed": 7}).headers["x-cache"] == "miss"
        assert client.exists("dreambooth:rate:testclient") and client.zcard("dreambooth:images") == 1


# ---------------------------------------------------------------------------------------------- the option

def test_redis_url_reaches_the_service(server, tmp_path, tiny_model):
    """Wiring: `serve --redis-url` keeps the pictures and the callers' buckets in that Redis, bounded by --cache-mb."""
    path = characters_file(tmp_path, tiny_model)
    service = build_service(path, serve_options("--characters", path, "--redis-url", server.url, "--cache-mb", 3,
                                                "--rate-per-minute", 6, "--burst", 1, "--batch-window-ms", 0))
    assert service.cache.max_bytes == 3 * 1024 * 1024
    with TestClient(create_app(service, [], auth=False)) as app:
        assert app.post("/v1/render", json=BODY).headers["x-cache"] == "miss"
        refused = app.post("/v1/compile", json={"character": "dog"})
        assert refused.status_code == 429 and "--burst 1" in refused.json()["error"]["message"]
    client = client_of(server)
    (stored,) = client.keys("dreambooth:image:*")
    assert client.get(stored).startswith(b"\x89PNG") and client.exists("dreambooth:rate:testclient")
    assert not (tmp_path / ".serve-cache").exists()


def test_no_cache_with_redis_url_keeps_only_the_limits_there_and_cache_dir_is_refused(server, tmp_path):
    path = tmp_path / "characters.yaml"
    cache, limiter = stores(ServeOptions(redis_url=server.url, no_cache=True), path)
    assert isinstance(cache, ImageCache) and cache.folder is None and isinstance(limiter, RedisRateLimiter)
    with pytest.raises(UserError, match="--cache-dir .* and --redis-url both say where the image cache is"):
        stores(ServeOptions(redis_url=server.url, cache_dir=tmp_path / "c"), path)


def test_a_redis_url_that_does_not_answer_is_refused_before_any_model_loads(server, tmp_path, tiny_model, capsys,
                                                                            monkeypatch):
    """Every --redis-url message, provoked through `dreambooth serve`, and what each says to do, done."""
    def no_models(*args, **kwargs):
        raise AssertionError("a model loaded before --redis-url was checked")

    monkeypatch.setattr("dreambooth.serving.renderer.Renderer", no_models)
    monkeypatch.setattr(stores_module, "CONNECT_TIMEOUT_S", 0.5)
    path = characters_file(tmp_path, tiny_model)

    def refused(*argv) -> str:
        started = time.monotonic()
        assert main(["serve", "--characters", str(path), "--port", "0", *map(str, argv)]) == 2
        assert time.monotonic() - started < 5
        return capsys.readouterr().err

    assert "--redis-url http://x:1 is not a Redis URL" in refused("--redis-url", "http://x:1")
    # "give one such as redis://HOST:6379/0"
    assert isinstance(stores(ServeOptions(redis_url=server.url), path).cache, RedisImageCache)
    # nothing listening, and a listener that never answers: both refused within the timeout
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    err = refused("--redis-url", f"redis://127.0.0.1:{port}/0")
    assert f"no Redis answered at --redis-url redis://127.0.0.1:{port}/0" in err and "start Redis there" in err
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        assert "no Redis answered" in refused("--redis-url", f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
    # "start Redis there": the same URL once a Redis runs on it
    server.stop()
    server.port, server.url = port, f"redis://127.0.0.1:{port}/0"
    server.start()
    assert isinstance(stores(ServeOptions(redis_url=server.url), path).limiter, RedisRateLimiter)
    # "leave --redis-url out": this process's stores
    assert isinstance(stores(ServeOptions(), path).limiter, RateLimiter)
    # --cache-dir beside it: "drop --cache-dir" or "drop --redis-url", each of which starts
    assert "drop --cache-dir to share the cache in Redis" in refused("--redis-url", server.url,
                                                                     "--cache-dir", tmp_path / "c")
    assert isinstance(stores(ServeOptions(redis_url=server.url), path).cache, RedisImageCache)
    assert stores(ServeOptions(cache_dir=tmp_path / "c"), path).cache.folder == tmp_path / "c"


def test_a_redis_that_refuses_the_login_names_the_password_in_the_url(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setattr("dreambooth.serving.renderer.Renderer", None)  # any model load fails the test
    path = characters_file(tmp_path, tiny_model)
    with redis_server(tmp_path, "--requirepass", "s3cret-pass") as locked:
        wrong = locked.url.replace("redis://", "redis://:wrong@")
        assert main(["serve", "--characters", str(path), "--port", "0", "--redis-url", wrong]) == 2
        err = capsys.readouterr().err
        assert "refused the login" in err and "put the right user and password in the URL" in err
        assert "wrong" not in err  # the password is never printed
        # "put the right user and password in the URL"
        right = locked.url.replace("redis://", "redis://:s3cret-pass@")
        assert isinstance(stores(ServeOptions(redis_url=right), path).cache, RedisImageCache)
