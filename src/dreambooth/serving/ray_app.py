"""`dreambooth serve --ray`: the same service on Ray Serve, as two deployments.

`Characters` replicas each run the one FastAPI app of `serving.app` (keys, limits, errors, page, batcher) over their
own renderer; nothing of the API is written twice. `Gateway` is Ray's HTTP ingress and only forwards: it reads a
request's `character` and sends the request to the Characters deployment with that name as Ray Serve's multiplexed
model id, so a character's requests go to a replica that already drew it (its LoRAs active, its requests batched
together) and LoRA switches stay rare as replicas grow. A replica that dies under a request is retried on another
(renders are deterministic, so a retry draws the same picture); when none answers, the client gets 503 with
Retry-After. /metrics joins every replica's own figures, each labelled with its replica.

`serving.command.ray_application(args)` is the application builder for Ray's own tools (`serve run
dreambooth.serving.command:ray_application`, KubeRay's RayService `import_path`), its args the options of
`dreambooth serve` by name. Ray is imported in functions only: the module imports without the ray extra, so that the
command can say which extra is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
import typing
from pathlib import Path

from dreambooth.command_options import ServeOptions
from dreambooth.errors import UserError
from dreambooth.options import check_settings, value_type

GATEWAY, CHARACTERS = "Gateway", "Characters"
APPLICATION = "dreambooth"
BOARD = "dreambooth-metrics-board"  # the named actor replicas leave their /metrics text with
ROUTED = ("/v1/render", "/v1/compile", "/v1/chat-render")  # the endpoints whose body names a character
RETRIES = 3
QUIET = {"log_level": "WARNING", "enable_access_log": False}
RETRY_AFTER_S = 5
BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
# The Gateway only forwards: no CPU of its own to reserve, and no queue (each replica's own answers 429).
GATEWAY_SETTINGS = {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 10_000}


# ------------------------------------------------------------------------------------------------- the options
def options_from_args(args: dict) -> ServeOptions:
    """A builder's args (RayService's `args`, `serve run ... key=value`) as the serve options of the same names,
    checked as the command line checks them; an unknown key is named."""
    fields = {f.name: f for f in dataclasses.fields(ServeOptions)}
    unknown = sorted(k for k in args if k.replace("-", "_") not in fields)
    if unknown:
        raise UserError(f"Ray Serve args {', '.join(unknown)}: not options of `dreambooth serve` (its --help lists "
                        "them; write them with underscores, e.g. max_batch).")
    hints = typing.get_type_hints(ServeOptions)
    values = {key.replace("-", "_"): arg_value(key, value, value_type(hints[key.replace("-", "_")])[0])
              for key, value in args.items()}
    return check_settings(ServeOptions(**values))


def arg_value(key: str, value, kind: type):
    """One builder arg as its option's type (YAML gives numbers and booleans, `serve run` strings); a value that is
    not plainly one of that type is refused, never guessed (`"flase"` is no boolean, 3.5 no whole number)."""
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in BOOLEANS:
            return BOOLEANS[str(value).lower()]
    elif not isinstance(value, (bool, dict, list)) and not (kind is int and isinstance(value, float)
                                                             and not value.is_integer()):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    raise UserError(f"Ray Serve arg {key}: {value!r} is not a {kind.__name__} (`dreambooth serve --help` says what "
                    f"--{key.replace('_', '-')} takes).")


def args_from_options(options: ServeOptions) -> dict:
    """The options as a builder's args (what the replicas rebuild them from), only those not at their defaults."""
    defaults = ServeOptions()
    return {f.name: (str(v) if isinstance(v, Path) else v) for f in dataclasses.fields(ServeOptions)
            if (v := getattr(options, f.name)) != getattr(defaults, f.name)}


def gpus_per_replica(options: ServeOptions) -> float:
    if options.gpus_per_replica is not None:
        return options.gpus_per_replica
    if options.device is not None:
        return 1.0 if options.device.startswith("cuda") else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def deployment_settings(options: ServeOptions) -> dict:
    """The Characters deployment's Ray Serve settings: a fixed number of replicas or autoscaling bounds, and each
    replica's resources. Its queue is the service's own (--max-queue answers 429), so Ray passes requests on."""
    settings = {"ray_actor_options": {"num_cpus": options.cpus_per_replica, "num_gpus": gpus_per_replica(options)},
                "max_ongoing_requests": options.max_queue + options.max_batch}
    if options.max_replicas is not None:
        low = options.replicas if options.min_replicas is None else options.min_replicas
        settings["autoscaling_config"] = {"min_replicas": low, "initial_replicas": max(low, 1),
                                          "max_replicas": options.max_replicas,
                                          "target_ongoing_requests": options.target_ongoing_requests}
    else:
        settings["num_replicas"] = options.replicas
    return settings


def option_problems(options: ServeOptions) -> list[str]:
    """What of the Ray options contradicts itself, before Ray starts."""
    problems = []
    ray_only = [flag for flag, given in (("--ray-address", options.ray_address is not None),
                                         ("--min-replicas", options.min_replicas is not None),
                                         ("--max-replicas", options.max_replicas is not None),
                                         ("--replicas", options.replicas != 1),
                                         ("--gpus-per-replica", options.gpus_per_replica is not None)) if given]
    if ray_only and not options.ray:
        problems.append(f"{', '.join(ray_only)} describe(s) a Ray deployment: add --ray, or leave them out for the "
                        "one-process service")
    if options.min_replicas is not None and options.max_replicas is None:
        problems.append("--min-replicas is an autoscaling bound: give --max-replicas too (or --replicas N for a "
                        "fixed number)")
    if options.max_replicas is not None:
        low = options.replicas if options.min_replicas is None else options.min_replicas
        if options.max_replicas < low:
            problems.append(f"--max-replicas {options.max_replicas} is fewer than the {low} replicas it starts from "
                            "(--min-replicas, else --replicas)")
    return problems


# --------------------------------------------------------------------------------------------- one ASGI request
async def call_asgi(app, request: dict) -> dict:
    """One forwarded HTTP request through an ASGI app in this process: status, headers and body of its answer."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request["method"],
             "scheme": "http", "path": request["path"], "raw_path": request["path"].encode(),
             "query_string": request["query"].encode(), "root_path": "",
             "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"]],
             "client": tuple(request["client"]) if request.get("client") else None, "server": None, "state": {}}
    body, sent, answer = request["body"], asyncio.Event(), {"status": 500, "headers": [], "body": b""}

    async def receive():
        nonlocal body
        if body is not None:
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message
        await sent.wait()  # the client stays connected until the answer is sent
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")
            if not message.get("more_body", False):
                sent.set()

    await app(scope, receive, send)
    return answer


class Lifespan:
    """The app's lifespan (its batcher started, its chat client closed) run in the replica's event loop."""

    def __init__(self, app):
        self.app, self.inbox, self.started = app, asyncio.Queue(), asyncio.Event()
        self.task = None

    async def start(self) -> None:
        async def send(message):
            if message["type"].startswith("lifespan.startup"):
                self.started.set()

        self.task = asyncio.get_running_loop().create_task(
            self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, self.inbox.get, send))
        await self.inbox.put({"type": "lifespan.startup"})
        await self.started.wait()


# ---------------------------------------------------------------------------------------------- the deployments
def character_of(path: str, body: bytes, names: set[str]) -> str:
    """The character a request's body names, when it names one of this service's (else "": any replica)."""
    if path not in ROUTED:
        return ""
    try:
        name = json.loads(body).get("character")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return name if isinstance(name, str) and name in names else ""


def labelled(texts: dict[str, str]) -> bytes:
    """Each replica's /metrics text, its samples labelled `replica`, as one Prometheus text page."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]

    class Joined:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Joined())
    return generate_latest(registry)


def replica_class(max_loras: int):
    """The Characters deployment's class; made here because `serve.multiplexed` takes its bound when applied."""
    from ray import serve

    class CharacterReplica:
        def __init__(self, args: dict, build_app):
            """`build_app(options) -> (app, service)`: serving.command's, the one-process service's own."""
            options = options_from_args(args)
            if options.cpus_per_replica >= 1 and gpus_per_replica(options) == 0:
                import torch

                torch.set_num_threads(int(options.cpus_per_replica))  # the CPUs Ray gave this replica, not all
            self.app, self.service = build_app(options)
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.lifespan = None
            self.board = None
            self.ray_figures = RayFigures()

        @serve.multiplexed(max_num_models_per_replica=max_loras)
        async def hold(self, name: str):
            """Ray's multiplexed loader: the character's LoRAs loaded into this replica's pipeline (its base model is
            loaded at start), after which the router sends `name`'s requests here; past --max-loras-per-replica the
            least recently drawn is let go (Held.__del__)."""
            renderer = self.service.renderer
            await asyncio.get_running_loop().run_in_executor(None, renderer.hold, name)
            return Held(name, renderer)

        async def forward(self, request: dict) -> dict:
            if self.lifespan is None:  # the first request starts the app (its batcher) in Ray's event loop
                self.lifespan = Lifespan(self.app)
                await self.lifespan.start()
            else:  # requests that came while it starts wait for it
                await self.lifespan.started.wait()
            name = serve.get_multiplexed_model_id()
            if name:
                await self.hold(name)
            answer = await call_asgi(self.app, request)
            answer["headers"].append(("x-replica", self.replica))
            self._post_metrics()
            self.ray_figures.update(self.service)
            return answer

        def _post_metrics(self) -> None:
            """This replica's /metrics text, left with the board (fire and forget) for the gateway's /metrics."""
            import ray

            if self.board is None:
                self.board = ray.get_actor(BOARD, namespace=APPLICATION)
            self.board.put.remote(self.replica, self.service.metrics_page().decode())

    return CharacterReplica


class RayFigures:
    """The replica's own figures in Ray's metrics too (ray.serve.metrics tags each with its deployment, replica and
    application), for an operator who scrapes Ray's metrics port rather than the service's /metrics."""

    def __init__(self):
        from ray.serve import metrics

        self.images = metrics.Counter("dreambooth_replica_images", description="Images this replica drew.")
        self.switches = metrics.Counter("dreambooth_replica_lora_switches", description="Batches this replica drew "
                                        "with other LoRAs than the one before on the same pipeline.")
        self.loaded = metrics.Gauge("dreambooth_replica_lora_characters_loaded",
                                    description="LoRA characters whose adapters this replica holds.")
        self.seen = {"images": 0.0, "switches": 0.0}

    def update(self, service) -> None:
        now = {"images": service.metrics.images._value.get(), "switches": service.metrics.lora_switches._value.get()}
        for name, counter in (("images", self.images), ("switches", self.switches)):
            if now[name] > self.seen[name]:
                counter.inc(now[name] - self.seen[name])
        self.seen = now
        self.loaded.set(getattr(service.renderer, "loras_loaded", 0))


class Held:
    """A character a replica holds: Ray's multiplexing calls `__del__` when it lets the character go (least recently
    drawn, past --max-loras-per-replica), which unloads its LoRAs; once only, as Python calls it again on collection
    (by then the character may be held again, by a new Held)."""

    def __init__(self, name: str, renderer):
        self.name, self.renderer, self.released = name, renderer, False

    def __del__(self):
        if not self.released:
            self.released = True
            self.renderer.release(self.name)


class Board:
    """Each replica's latest /metrics text (an actor: replicas post, the gateway reads); a replica silent for
    `FORGET_S` is dropped, so a dead one leaves the page."""

    FORGET_S = 300.0

    def __init__(self):
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def all(self) -> dict[str, str]:
        now = time.monotonic()
        self.texts = {r: (t, text) for r, (t, text) in self.texts.items() if now - t < self.FORGET_S}
        return {r: text for r, (_, text) in self.texts.items()}


class Gateway:
    """Ray Serve's HTTP ingress: each request forwarded whole to a Characters replica, routed by its character."""

    def __init__(self, characters, args: dict):
        from dreambooth.characters.character import load_characters

        options = options_from_args(args)
        self.characters = characters
        self.names = set(load_characters(options.characters))
        self.max_body = options.max_body_kb * 1024
        self.forwarded = {"ok": 0, "retried": 0, "unavailable": 0}

    async def __call__(self, request):
        from starlette.responses import Response

        from dreambooth.serving.app import body_too_large, error_response

        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return body_too_large(self.max_body)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                return body_too_large(self.max_body)
        forwarded = {"method": request.method, "path": request.url.path, "query": request.url.query,
                     "headers": list(request.headers.items()), "body": body,
                     "client": [request.client.host, request.client.port] if request.client else None}
        answer = await self._forward(forwarded, character_of(request.url.path, body, self.names))
        if answer is None:
            return error_response(503, "unavailable", "no replica of the service answered (one may be restarting); "
                                  f"retry in {RETRY_AFTER_S} s.", {"Retry-After": str(RETRY_AFTER_S)})
        if request.url.path == "/metrics" and answer["status"] == 200:
            answer["body"] = await self._metrics()
        headers = [(k, v) for k, v in answer["headers"] if k.lower() != "content-length"]
        response = Response(answer["body"], status_code=answer["status"])
        response.raw_headers = [(b"content-length", str(len(answer["body"])).encode())] + [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        return response

    async def _forward(self, request: dict, name: str) -> dict | None:
        """The replica's answer; a replica that died under the request is retried on another, up to RETRIES
        times (the router learns of the death and stops choosing it)."""
        from ray import exceptions

        handle = self.characters.options(multiplexed_model_id=name)
        for attempt in range(RETRIES + 1):
            try:
                answer = await handle.forward.remote(request)
                self.forwarded["ok"] += 1
                return answer
            except (exceptions.RayActorError, exceptions.ActorUnavailableError):
                if attempt == RETRIES:
                    break
                self.forwarded["retried"] += 1
                await asyncio.sleep(0.5 * (attempt + 1))
        self.forwarded["unavailable"] += 1
        return None

    async def _metrics(self) -> bytes:
        import ray

        board = ray.get_actor(BOARD, namespace=APPLICATION)
        texts = await board.all.remote()
        own = "".join(f'dreambooth_gateway_forwarded_total{{outcome="{k}"}} {v}\n'
                      for k, v in self.forwarded.items())
        head = "# HELP dreambooth_gateway_forwarded_total Requests the gateway forwarded, by outcome.\n" \
               "# TYPE dreambooth_gateway_forwarded_total counter\n"
        return labelled(texts) + (head + own).encode()


def application(options: ServeOptions, build_app):
    """The Ray Serve application of the options: the Characters replicas (each app made by `build_app`) behind the
    Gateway."""
    import ray
    from ray import serve

    board = ray.remote(num_cpus=0)(Board).options(name=BOARD, namespace=APPLICATION, get_if_exists=True,
                                                   lifetime="detached")
    board.remote()
    args = args_from_options(options)
    characters = serve.deployment(replica_class(options.max_loras_per_replica), name=CHARACTERS,
                                  logging_config=QUIET, **deployment_settings(options)).bind(args, build_app)
    gateway = serve.deployment(Gateway, name=GATEWAY, logging_config=QUIET, **GATEWAY_SETTINGS)
    return gateway.bind(characters, args)


def build(args: dict, build_app):
    """The application of a builder's args (serving.command.ray_application, the import path of Ray's tools)."""
    options = options_from_args(args)
    problems = option_problems(dataclasses.replace(options, ray=True))
    if problems:
        raise UserError("; ".join(problems) + ".")
    return application(options, build_app)


# ------------------------------------------------------------------------------------------------- the command
def check_ray_installed() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise UserError("`dreambooth serve --ray` needs Ray Serve: install the ray extra, `pip install "
                        "'dreambooth[ray]'` (or `pip install -e '.[ray]'` in a clone).") from None


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """A --ray-address that does not answer, said at once rather than after Ray's own long retries."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address}: expected HOST:PORT of the Ray head (its GCS port, 6379 by "
                        "default), ray://HOST:PORT for Ray Client, or auto.")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(f"--ray-address {address}: nothing answered there within {timeout_s:g} s ({e}). Start the "
                        "cluster's head (`ray start --head`) and give its address, or leave --ray-address out to "
                        "start a local Ray.") from None


def probe_cluster(address: str, timeout_s: float = 60.0) -> None:
    """A --ray-address whose port answers but that Ray cannot join, said in one message: joined first from a child
    process, since a failed join ends the process that tries (Ray's client aborts after 60 s without a word of
    ours) and ray.init only runs on the main thread."""
    import subprocess
    import sys

    code = ("import ray, sys; ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False); "
            "ray.shutdown()")
    try:
        done = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        why = f"Ray did not connect within {timeout_s:g} s"
    else:
        if done.returncode == 0:
            return
        lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
        why = f"Ray could not connect: {lines[-1][:300] if lines else f'exit status {done.returncode}'}"
    raise UserError(f"--ray-address {address}: {why}. Check that it is the Ray head's address (its GCS port, 6379 "
                    "by default: `ray status` on the head prints it) and that this machine's Ray and Python versions "
                    "match the cluster's.")


def check_resources(options: ServeOptions, resources: dict) -> None:
    """More replicas than the cluster can place would wait for ever: refused, with what the cluster has."""
    most = options.max_replicas or options.replicas
    problems = []
    gpus = gpus_per_replica(options)
    if gpus > 0 and most * gpus > resources.get("GPU", 0):
        problems.append(f"{most} replica(s) x {gpus:g} GPU need {most * gpus:g} GPUs; the Ray cluster has "
                        f"{resources.get('GPU', 0):g}. Lower --replicas/--max-replicas, or --gpus-per-replica (a "
                        "fraction shares a GPU)")
    cpus = options.cpus_per_replica
    if cpus > 0 and most * cpus > resources.get("CPU", 0):
        problems.append(f"{most} replica(s) x {cpus:g} CPU need {most * cpus:g} CPUs; the Ray cluster has "
                        f"{resources.get('CPU', 0):g}. Lower --replicas/--max-replicas or --cpus-per-replica")
    if problems:
        raise UserError("; ".join(problems) + ".")


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(options: ServeOptions, build_app) -> str:
    """Ray joined (or started), the application deployed and answering; its URL. Every check before Ray starts."""
    check_ray_installed()
    problems = option_problems(options)
    if problems:
        raise UserError("; ".join(problems) + ".")
    if options.ray_address:
        check_address(options.ray_address)
        probe_cluster(options.ray_address)
    import ray
    from ray import serve

    ray.init(address=options.ray_address, namespace=APPLICATION, include_dashboard=False, log_to_driver=True,
             ignore_reinit_error=True)
    check_resources(options, ray.cluster_resources())
    port = options.port or free_port(options.host)
    # warnings and errors only: Ray's access log repeats every request, which /metrics counts
    serve.start(http_options={"host": options.host, "port": port}, logging_config=QUIET)
    serve.run(application(options, build_app), name=APPLICATION, route_prefix="/", blocking=False)
    return f"http://{options.host}:{port}/"


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def serve_on_ray(options: ServeOptions, build_app) -> None:
    """`dreambooth serve --ray`: deploy, say where, and keep serving until Ctrl-C."""
    from dreambooth.characters.character import load_characters

    names = sorted(load_characters(options.characters))
    url = start(options, build_app)
    how = (f"{options.min_replicas if options.min_replicas is not None else options.replicas}-"
           f"{options.max_replicas} replicas, autoscaled" if options.max_replicas else f"{options.replicas} replica(s)")
    print(f"serving {len(names)} character(s) ({', '.join(names)}) at {url} (the page; the API's OpenAPI page is "
          f"/docs) on Ray Serve, {how}. Ctrl-C stops.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()

