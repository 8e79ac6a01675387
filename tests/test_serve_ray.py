"""`dreambooth serve --ray` on a local Ray cluster started here (a head, the gateway and two replicas, each its own
process) on the tiny model: concurrent renders, characters routed to the replica that holds them, a replica killed
under a burst, the image cache shared between replicas, and the same API as the one-process service.

Marked `ray` (a cluster takes ~30 s to start on 2 cores and the module about two minutes): `.ci/run` runs it as its
own step, `pytest -m ray tests/test_serve_ray.py` here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import re
import time
import urllib.error
import urllib.request

import pytest
from serving_support import characters_file, redis_server

pytestmark = pytest.mark.ray


def call(url: str, body: dict | None = None, method: str | None = None, raw: bytes | None = None):
    """(status, headers, body) of one request; an HTTP error status is an answer, not an exception."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def render(url: str, character: str, seed: int):
    return call(url + "v1/render", {"character": character, "seed": seed})


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    """Two LoRA characters and a plain one on the tiny model, served by 2 replicas sharing a Redis; yields its URL and
    the Redis."""
    pytest.importorskip("ray.serve")
    from test_export import make_lora, unet_config

    from dreambooth.command_options import ServeOptions
    from dreambooth.serving.command import build_app
    from dreambooth.serving.ray_app import start, stop

    folder = tmp_path_factory.mktemp("ray")
    files = [make_lora(tiny_model, folder / f"lora{i}", seed=i + 1, unet_config=unet_config()) for i in range(2)]
    entries = [{"name": "a", "model": str(tiny_model), "loras": [{"file": str(files[0]), "weight": 1.0}]},
               {"name": "b", "model": str(tiny_model), "loras": [{"file": str(files[1]), "weight": 1.0}]},
               {"name": "plain", "model": str(tiny_model)}]
    for entry in entries:
        entry.update(identifier="sks", class_word="dog", width=64, height=64, steps=2)
    path = characters_file(folder, tiny_model, entries)
    # every client here is 127.0.0.1: the rate limit off, as bench/load.py runs; the image cache in Redis, as for
    # replicas on several machines
    with redis_server(folder) as redis:
        url = start(ServeOptions(characters=path, ray=True, replicas=2, port=0, rate_per_minute=0,
                                 redis_url=redis.url, max_queue=64), build_app)
        try:
            yield url, redis
        finally:
            stop()


def metric(text: str, name: str) -> dict[str, float]:
    """A metric's value per replica, from the gateway's /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and "replica" in sample.labels:
                values[sample.labels["replica"]] = values.get(sample.labels["replica"], 0) + sample.value
    return values


def test_the_same_api_answers_through_the_gateway(cluster):
    cluster, _ = cluster
    status, headers, body = call(cluster + "healthz")
    assert status == 200 and json.loads(body)["characters"] == ["a", "b", "plain"]
    status, headers, body = call(cluster)
    assert status == 200 and b"<html" in body.lower()
    status, headers, body = call(cluster + "v1/render", {"character": "nobody"})
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_character"
    status, headers, body = call(cluster + "v1/render", raw=b"{" * 10)
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_json"
    status, headers, body = call(cluster + "v1/render", raw=b"x" * (64 * 1024 + 1))
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"  # refused by the gateway


def test_a_characters_requests_go_to_the_replica_that_holds_it(cluster):
    """Alternating a and b: each character stays on one replica, whose LoRAs then never switch. The first render
    of each (a, then b once the router knows where a is) goes to a replica holding the fewest characters."""
    cluster, _ = cluster
    before = metric(call(cluster + "metrics")[2].decode(), "dreambooth_lora_switches_total")
    replicas = {"a": set(), "b": set()}
    for i in range(12):
        if i in (1, 2):
            time.sleep(2)  # the replicas' held characters reach the router
        name = "ab"[i % 2]
        status, headers, _ = render(cluster, name, 2000 + i)
        assert status == 200
        replicas[name].add(headers["X-Replica"])
    assert len(replicas["a"]) == 1 and len(replicas["b"]) == 1, replicas
    time.sleep(1)
    after = metric(call(cluster + "metrics")[2].decode(), "dreambooth_lora_switches_total")
    switches = sum(after.get(r, 0) - before.get(r, 0) for r in after)
    # one replica drawing a and b in turn would switch 12 times; routed, each switches at most once (to its own)
    assert switches <= 2, (before, after)
    # each replica loaded the LoRAs of the character routed to it, and only those
    loaded = metric(call(cluster + "metrics")[2].decode(), "dreambooth_lora_characters_loaded")
    assert {loaded[next(iter(replicas[name]))] for name in "ab"} == {1.0}, loaded


def test_each_replicas_figures_reach_rays_own_metrics(cluster):
    """Ray's metrics port (what an operator's Prometheus scrapes on each node) has the replicas' LoRA switches and
    images, tagged by replica, after the routing test drew on both. Ray exports every few seconds."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, replicas = time.monotonic() + 60, set()
    while time.monotonic() < deadline and len(replicas) < 2:
        time.sleep(2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        replicas = {re.search(r'replica="([^"]+)"', line).group(1) for line in text.splitlines()
                    if line.startswith("ray_dreambooth_replica_images_total{") and 'replica="' in line}
    assert len(replicas) == 2, replicas


def test_two_replicas_answer_forty_concurrent_renders(cluster):
    cluster, _ = cluster
    names = ["plain", "a", "b"]
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda i: render(cluster, names[i % 3], 1000 + i), range(40)))
    statuses = [status for status, _, _ in answers]
    assert statuses == [200] * 40, statuses
    assert all(body.startswith(b"\x89PNG") for _, _, body in answers)
    assert [headers["X-Seed"] for _, headers, _ in answers] == [str(1000 + i) for i in range(40)]
    assert len({headers["X-Replica"] for _, headers, _ in answers}) == 2  # both replicas drew


def test_a_replica_killed_under_a_burst_loses_no_request_and_its_pictures_stay_in_the_shared_cache(cluster):
    import ray
    import redis

    cluster, server = cluster
    stored = len(redis.Redis.from_url(server.url).keys("dreambooth:image:*"))

    status, headers, first = render(cluster, "a", 3000)
    assert status == 200 and headers["X-Cache"] == "miss"
    victim = headers["X-Replica"]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        burst = [pool.submit(render, cluster, "a", 3100 + i) for i in range(20)]
        time.sleep(0.5)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::dreambooth#Characters#{victim}", namespace="serve"))
        answers = [f.result() for f in burst]
    print("statuses under the kill:", collections.Counter(status for status, _, _ in answers))
    for status, headers, body in answers:  # drawn elsewhere, or a clear 503 to retry
        assert status == 200 or (status == 503 and headers.get("Retry-After")), (status, body[:200])
        if status == 503:
            assert json.loads(body)["error"]["code"] == "unavailable"
    assert sum(status == 200 for status, _, _ in answers) >= 1
    status, headers, again = render(cluster, "a", 3000)  # now on a replica that never drew it
    assert status == 200 and headers["X-Replica"] != victim
    assert headers["X-Cache"] == "hit" and again == first
    assert len(redis.Redis.from_url(server.url).keys("dreambooth:image:*")) >= stored + 21  # the burst's, in Redis
