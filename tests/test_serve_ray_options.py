"""`serve --ray`'s settings and refusals, without a Ray cluster: what the deployments are given, which options
contradict each other, Ray missing, an address that does not answer, more replicas than the cluster holds, the
builder's args, and the gateway's pieces (routing by character, the replicas' /metrics joined)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest
from serving_support import characters_file

from dreambooth.cli import main
from dreambooth.command_options import ServeOptions
from dreambooth.errors import UserError
from dreambooth.serving import ray_app


def refused(capsys, *argv) -> str:
    assert main(["serve", *map(str, argv)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_ray_options_without_ray_are_refused_and_what_the_message_says_works(tiny_model, tmp_path, capsys):
    path = characters_file(tmp_path, tiny_model)
    err = refused(capsys, "--characters", path, "--replicas", "2", "--ray-address", "127.0.0.1:1")
    assert "--ray-address, --replicas describe(s) a Ray deployment: add --ray" in err
    # "add --ray": nothing left to refuse; "or leave them out": neither
    assert ray_app.option_problems(ServeOptions(characters=path, replicas=2, ray_address="x:1", ray=True)) == []
    assert ray_app.option_problems(ServeOptions(characters=path)) == []

    err = refused(capsys, "--characters", path, "--ray", "--min-replicas", "1")
    assert "--min-replicas is an autoscaling bound: give --max-replicas too" in err
    assert ray_app.option_problems(ServeOptions(ray=True, min_replicas=1, max_replicas=3)) == []
    assert ray_app.option_problems(ServeOptions(ray=True, replicas=3)) == []  # "or --replicas N"
    err = refused(capsys, "--characters", path, "--ray", "--replicas", "3", "--max-replicas", "2")
    assert "--max-replicas 2 is fewer than the 3 replicas it starts from" in err


def test_serve_ray_without_ray_names_the_extra(tiny_model, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as when it is not installed
    err = refused(capsys, "--characters", characters_file(tmp_path, tiny_model), "--ray")
    assert "`dreambooth serve --ray` needs Ray Serve: install the ray extra, `pip install 'dreambooth[ray]'`" in err


def test_a_ray_address_that_does_not_answer_is_one_message_within_the_timeout(tiny_model, tmp_path, capsys,
                                                                              monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started although the address was refused")

    monkeypatch.setattr(ray_app, "probe_cluster", no_ray)
    path = characters_file(tmp_path, tiny_model)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    started = time.monotonic()
    err = refused(capsys, "--characters", path, "--ray", "--ray-address", f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    assert f"--ray-address 127.0.0.1:{port}: nothing answered there within 5 s" in err
    assert "or leave --ray-address out to start a local Ray" in err
    assert "expected HOST:PORT of the Ray head" in refused(capsys, "--characters", path, "--ray", "--ray-address",
                                                           "nowhere")
    ray_app.check_address("auto")  # ray's own "find the cluster on this machine" is passed on as it is


def test_more_replicas_than_the_cluster_holds_are_refused():
    gpu = ServeOptions(ray=True, replicas=2, device="cuda")
    with pytest.raises(UserError, match=r"2 replica\(s\) x 1 GPU need 2 GPUs; the Ray cluster has 1\. Lower"):
        ray_app.check_resources(gpu, {"CPU": 16, "GPU": 1})
    ray_app.check_resources(ServeOptions(ray=True, replicas=1, device="cuda"), {"CPU": 16, "GPU": 1})
    ray_app.check_resources(ServeOptions(ray=True, replicas=2, device="cuda", gpus_per_replica=0.5),
                            {"CPU": 16, "GPU": 1})  # "a fraction shares a GPU"
    autoscaled = ServeOptions(ray=True, replicas=1, max_replicas=4, device="cuda")
    with pytest.raises(UserError, match="4 replica"):  # the most it may scale to counts
        ray_app.check_resources(autoscaled, {"CPU": 16, "GPU": 2})
    with pytest.raises(UserError, match=r"3 replica\(s\) x 1 CPU need 3 CPUs; the Ray cluster has 2"):
        ray_app.check_resources(ServeOptions(ray=True, replicas=3, device="cpu"), {"CPU": 2})


def test_the_deployments_get_the_replicas_and_resources_the_options_say():
    fixed = ray_app.deployment_settings(ServeOptions(ray=True, replicas=3, device="cpu", cpus_per_replica=2,
                                                     max_queue=10, max_batch=2))
    assert fixed == {"ray_actor_options": {"num_cpus": 2, "num_gpus": 0.0}, "max_ongoing_requests": 12,
                     "num_replicas": 3}
    scaled = ray_app.deployment_settings(ServeOptions(ray=True, replicas=2, max_replicas=6, device="cuda",
                                                      target_ongoing_requests=3))
    assert scaled["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 6,
                                            "target_ongoing_requests": 3}
    assert scaled["ray_actor_options"]["num_gpus"] == 1.0 and "num_replicas" not in scaled
    to_zero = ray_app.deployment_settings(ServeOptions(ray=True, min_replicas=0, max_replicas=2, device="cpu"))
    assert to_zero["autoscaling_config"]["min_replicas"] == 0 and to_zero["autoscaling_config"]["initial_replicas"] == 1


def test_builder_args_are_the_serve_options_by_name(tmp_path):
    options = ray_app.options_from_args({"characters": str(tmp_path / "c.yaml"), "max-batch": "3", "ray": "true",
                                         "replicas": 2, "redis_url": None})
    assert options.characters == tmp_path / "c.yaml" and options.max_batch == 3 and options.ray is True
    assert options.replicas == 2
    with pytest.raises(UserError, match="Ray Serve args characterz: not options of `dreambooth serve`"):
        ray_app.options_from_args({"characterz": "c.yaml"})
    assert ray_app.options_from_args({"characters": "c.yaml"}).characters.name == "c.yaml"  # the spelling it names
    for key, value in (("max_batch", "many"), ("max_batch", 3.5), ("max_batch", True), ("ray", "flase"),
                       ("ray", 2), ("characters", ["a.yaml"]), ("max_batch", "3.0")):
        with pytest.raises(UserError, match=f"Ray Serve arg {key}: .* is not a"):  # refused, not guessed
            ray_app.options_from_args({key: value})
    # what `dreambooth serve --help` says of --max-batch: a whole number
    assert "--max-batch" in subprocess.run([sys.executable, "-m", "dreambooth", "serve", "--help"], capture_output=True,
                                           text=True).stdout
    assert ray_app.options_from_args({"max_batch": 3.0, "ray": "no", "target_ongoing_requests": "1.5"}) == \
        ServeOptions(max_batch=3, ray=False, target_ongoing_requests=1.5)
    with pytest.raises(UserError, match="--max-batch"):  # checked as the command line checks it
        ray_app.options_from_args({"max_batch": 0})
    # what the command hands the replicas comes back as the same options
    given = ServeOptions(characters=tmp_path / "c.yaml", replicas=2, ray=True, max_batch=3, device="cpu")
    assert ray_app.options_from_args(ray_app.args_from_options(given)) == given


def test_the_gateway_routes_by_the_character_a_body_names():
    names = {"a", "b"}
    assert ray_app.character_of("/v1/render", b'{"character": "a", "seed": 1}', names) == "a"
    assert ray_app.character_of("/v1/chat-render", b'{"character": "b"}', names) == "b"
    assert ray_app.character_of("/v1/render", b'{"character": "zzz"}', names) == ""  # the replica answers 404
    assert ray_app.character_of("/v1/render", b'{"character": ["a"]}', names) == ""
    assert ray_app.character_of("/v1/render", b"not json", names) == ""
    assert ray_app.character_of("/v1/render", b"[1]", names) == ""
    assert ray_app.character_of("/healthz", b'{"character": "a"}', names) == ""


def test_the_replicas_metrics_are_joined_with_a_replica_label():
    from prometheus_client.parser import text_string_to_metric_families

    from dreambooth.serving.metrics import Metrics

    one, two = Metrics(4), Metrics(4)
    one.lora_switches.inc(2)
    two.lora_switches.inc(5)
    two.record_batch(3, 0.5)
    text = ray_app.labelled({"r1": one.render(0).decode(), "r2": two.render(1).decode()}).decode()
    assert len(re.findall(r"^# TYPE dreambooth_lora_switches(_total)? counter$", text, re.MULTILINE)) == 1
    values = {(s.name, s.labels.get("replica")): s.value for f in text_string_to_metric_families(text)
              for s in f.samples if not s.labels.get("le")}
    assert values[("dreambooth_lora_switches_total", "r1")] == 2
    assert values[("dreambooth_lora_switches_total", "r2")] == 5
    assert values[("dreambooth_images_total", "r2")] == 3 and values[("dreambooth_images_total", "r1")] == 0
    assert values[("dreambooth_queue_depth", "r2")] == 1


def test_a_lora_switch_is_counted_when_a_pipeline_changes_characters(lora_characters):
    """The renderer's count, as the service's /metrics reports it: a then a is one switch (to a), a then b two."""
    from dreambooth.serving.renderer import Renderer

    characters = lora_characters
    service, render = drawing(characters, Renderer(characters, device="cpu"))
    render([("a", 1), ("a", 2)])
    assert service.metrics.lora_switches._value.get() == 1
    render([("b", 3), ("a", 4)])
    assert service.metrics.lora_switches._value.get() == 3
    assert b"dreambooth_lora_switches_total 3.0" in service.metrics_page()


def test_a_lazy_renderer_loads_loras_when_drawn_and_draws_what_the_eager_one_draws(lora_characters):
    """serve --ray's replicas: no LoRA loaded at start, a character's on its first draw (or `hold`), unloaded by
    `release` and loaded again when drawn; every picture the one the renderer that loads all at start draws."""
    from dreambooth.serving.renderer import Renderer

    characters = lora_characters
    _, eager = drawing(characters, Renderer(characters, device="cpu"))
    lazy_renderer = Renderer(characters, device="cpu", lazy_loras=True)
    service, lazy = drawing(characters, lazy_renderer)
    assert lazy_renderer.loras_loaded == 0
    assert lazy([("a", 5)]) == eager([("a", 5)])
    assert lazy_renderer.loras_loaded == 1
    lazy_renderer.hold("b")
    assert lazy_renderer.loras_loaded == 2 and b"dreambooth_lora_characters_loaded 2.0" in service.metrics_page()
    lazy_renderer.release("a")
    assert lazy_renderer.loras_loaded == 1
    assert lazy([("b", 6), ("a", 7), ("a", 5)]) == eager([("b", 6), ("a", 7), ("a", 5)])
    assert lazy_renderer.loras_loaded == 2


@pytest.fixture
def lora_characters(tiny_model, tmp_path):
    from test_export import make_lora, unet_config

    from dreambooth.characters.character import load_characters

    files = [make_lora(tiny_model, tmp_path / f"lora{i}", seed=i + 1, unet_config=unet_config()) for i in range(2)]
    entries = [{"name": name, "model": str(tiny_model), "loras": [{"file": str(file)}], "identifier": "sks",
                "class_word": "dog", "width": 64, "height": 64, "steps": 1} for name, file in zip("ab", files)]
    return load_characters(characters_file(tmp_path, tiny_model, entries))


def drawing(characters, renderer):
    """A service over `renderer`, and `render([(character, seed), ...])`: each drawn in turn, their PNGs."""
    import asyncio

    from dreambooth.serving.batcher import Batcher
    from dreambooth.serving.service import RenderBody, Service

    service = Service(characters, renderer)

    async def go(renders):
        service.batcher = Batcher(service._draw, max_queue=4, max_batch=1, window_s=0)  # a new worker thread each
        service.batcher.start()
        try:
            return [(await service.render(RenderBody(character=name, seed=seed), False)).images[0][1]
                    for name, seed in renders]
        finally:
            await service.batcher.stop()

    return service, lambda renders: asyncio.run(go(renders))


def test_an_address_that_answers_but_is_no_ray_head_is_one_message_within_the_timeout():
    """A listener that never speaks Ray's protocol: the join is tried in a child process and given up after the
    timeout, with one message (the command's own process would be ended by Ray's client)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        ray_app.check_address(address)  # the port answers
        started = time.monotonic()
        with pytest.raises(UserError, match=rf"--ray-address {address}: Ray did not connect within 6 s\. Check"):
            ray_app.probe_cluster(address, timeout_s=6)
        assert time.monotonic() - started < 20


# ------------------------------------------------------------------------- the gateway, without Ray's processes
class Replica:
    """Stands in for the Characters deployment's handle: each `forward` answered by the one app in this process
    (what a replica does), after `deaths` failures as of a replica that died; the routing ids it was given."""

    def __init__(self, app, deaths: int = 0):
        self.app, self.deaths, self.ids, self.calls = app, deaths, [], 0
        self.forward = self

    def options(self, multiplexed_model_id: str):
        self.ids.append(multiplexed_model_id)
        return self

    async def remote(self, request: dict) -> dict:
        from ray.exceptions import ActorDiedError

        self.calls += 1
        if self.deaths:
            self.deaths -= 1
            raise ActorDiedError()
        return await ray_app.call_asgi(self.app, request)


def through_gateway(gateway, replica, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, headers, body) of one request through `gateway`, the replica's app started as a replica starts it."""
    import asyncio

    from starlette.requests import Request

    async def go():
        await ray_app.Lifespan(replica.app).start()
        raw = [(k.lower().encode(), v.encode()) for k, v in {"content-length": str(len(body)),
                                                             "content-type": "application/json",
                                                             **(headers or {})}.items()]
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": raw, "client": ("203.0.113.9", 5000), "server": ("test", 80), "scheme": "http",
                 "root_path": "", "http_version": "1.1"}
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        response = await gateway(Request(scope, receive))
        return response.status_code, {k.decode(): v.decode() for k, v in response.raw_headers}, response.body

    return asyncio.run(go())


@pytest.fixture
def gateway_and_replica(tiny_model, tmp_path, monkeypatch):
    from serving_support import stand_in_service

    from dreambooth.serving.app import create_app
    from dreambooth.serving.auth import parse_keys

    async def no_wait(seconds):
        return None

    monkeypatch.setattr(ray_app.asyncio, "sleep", no_wait)  # the gateway's back-off between retries
    service = stand_in_service(tmp_path, tiny_model)
    app = create_app(service, parse_keys("alice user " + "u" * 24, "test"))
    path = tmp_path / "characters.yaml"

    def make(deaths: int = 0):
        replica = Replica(app, deaths)
        return ray_app.Gateway(replica, {"characters": str(path), "max_body_kb": 1}), replica

    return make


def test_the_gateway_forwards_the_whole_request_routed_by_its_character(gateway_and_replica):
    gateway, replica = gateway_and_replica()
    key = {"authorization": "Bearer " + "u" * 24}
    status, headers, body = through_gateway(gateway, replica, "POST", "/v1/render",
                                            b'{"character": "dog", "seed": 7}', key)
    assert status == 200 and body.startswith(b"\x89PNG") and headers["x-seed"] == "7"
    assert replica.ids == ["dog"]  # Ray's multiplexed model id: the character
    status, headers, body = through_gateway(gateway, replica, "POST", "/v1/render", b'{"character": "dog"}')
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"  # the replica's keys, as sent
    status, _, body = through_gateway(gateway, replica, "POST", "/v1/compile", b'{"character": "cat"}', key)
    assert status == 404 and replica.ids[-1] == ""  # a name no character has: any replica answers the 404
    status, _, body = through_gateway(gateway, replica, "GET", "/healthz")
    assert status == 200 and json.loads(body)["characters"] == ["dog"] and replica.ids[-1] == ""
    calls = replica.calls
    status, _, body = through_gateway(gateway, replica, "POST", "/v1/render", b"x" * 1025, key)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large" and replica.calls == calls


def test_a_replica_that_dies_under_a_request_is_retried_then_answered_503(gateway_and_replica):
    key = {"authorization": "Bearer " + "u" * 24}
    gateway, replica = gateway_and_replica(deaths=2)
    status, _, body = through_gateway(gateway, replica, "POST", "/v1/render", b'{"character": "dog"}', key)
    assert status == 200 and body.startswith(b"\x89PNG") and replica.calls == 3
    assert gateway.forwarded == {"ok": 1, "retried": 2, "unavailable": 0}
    gateway, replica = gateway_and_replica(deaths=ray_app.RETRIES + 1)
    status, headers, body = through_gateway(gateway, replica, "POST", "/v1/render", b'{"character": "dog"}', key)
    assert status == 503 and headers["retry-after"] == str(ray_app.RETRY_AFTER_S)
    assert json.loads(body)["error"]["code"] == "unavailable" and replica.calls == ray_app.RETRIES + 1
    assert gateway.forwarded == {"ok": 0, "retried": ray_app.RETRIES, "unavailable": 1}


def test_the_store_is_checked_before_ray_starts(tiny_model, tmp_path, capsys, monkeypatch):
    """--redis-url is asked, and its clash with --cache-dir refused, by the command itself: found by a replica, the
    same mistake was a traceback after Ray had started."""
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started although the store was refused")

    monkeypatch.setattr(ray_app, "start", no_ray)
    path = characters_file(tmp_path, tiny_model)
    err = refused(capsys, "--characters", path, "--ray", "--redis-url", "redis://127.0.0.1:1/0", "--cache-dir",
                  tmp_path / "cache")
    assert "--cache-dir" in err and "both say where the image cache is" in err
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert f"no Redis answered at --redis-url redis://127.0.0.1:{port}/0" in refused(
        capsys, "--characters", path, "--ray", "--redis-url", f"redis://127.0.0.1:{port}/0")
