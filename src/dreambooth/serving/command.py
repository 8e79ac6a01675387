"""`dreambooth serve`: load the characters and their models, then answer HTTP until stopped.

Without API keys the service listens on loopback only (every local caller is an operator); another --host needs
keys, or --allow-no-auth for a trusted network. `--demo` serves the built-in world's characters (demo_characters.yaml
beside this module), training the demo's subject first when it is missing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from importlib import resources
from pathlib import Path

from dreambooth.characters.character import load_characters, sized, with_family_defaults
from dreambooth.errors import UserError
from dreambooth.formats.atomic import write_text_atomic

DEMO_CHARACTERS = "characters.yaml"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_installed() -> None:
    missing = []
    for module in ("fastapi", "fastapi_offline", "uvicorn", "prometheus_client", "compel"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"`dreambooth serve` needs {', '.join(missing)}: install the serve extra, "
                        "`pip install 'dreambooth[serve]'` (or `pip install -e '.[serve]'` in a clone).")


def demo_characters_file(demo_dir: Path) -> Path:
    """The demo's characters file, written once (the built-in model's path filled in); the demo's subject trained
    first when `demo_dir` has no model yet."""
    from dreambooth.evaluation.world_model import builtin_model_path

    demo_dir = Path(demo_dir)
    if not (demo_dir / "model" / "model_index.json").is_file():
        print(f"serve --demo: no trained subject in {demo_dir}/model yet; running `dreambooth demo` first (about a "
              "minute on a CPU).")
        from dreambooth.evaluation.demo import run_demo

        run_demo(demo_dir)
    file = demo_dir / DEMO_CHARACTERS
    if not file.is_file():
        text = resources.files("dreambooth.serving").joinpath("demo_characters.yaml").read_text(encoding="utf-8")
        write_text_atomic(file, text.replace("{builtin}", str(builtin_model_path())))
    return file


def build_service(characters_file: Path, options):
    """The service of a characters file with the options' limits, cache and device (models loaded); a UserError
    naming every character the limits leave undrawable."""
    from dreambooth.serving.renderer import Renderer
    from dreambooth.serving.service import Limits, Service
    from dreambooth.serving.stores import stores

    characters = load_characters(characters_file)
    limits = Limits(max_body_bytes=options.max_body_kb * 1024, max_steps=options.max_steps,
                    max_pixels=options.max_pixels, max_images=options.max_images,
                    rate_per_minute=options.rate_per_minute, burst=options.burst, max_queue=options.max_queue,
                    max_batch=options.max_batch, batch_window_ms=options.batch_window_ms,
                    deadline_s=options.deadline_s)
    cache, limiter = stores(options, characters_file)  # a Redis that does not answer is refused before models load
    # serve --ray's replicas load a LoRA character's adapters when they are routed it (ray_app, model multiplexing)
    renderer = Renderer(characters, device=options.device, precision=options.precision, lazy_loras=options.ray)
    # a character without width and height, steps, guidance or sampler whose model's configs were not here before it
    # loaded (a hub id fetched now): its model's side and its family's defaults, as the loaded pipeline says
    characters = {name: with_family_defaults(sized(character, renderer.model_family(name)[1]),
                                             renderer.draw_defaults(name))
                  for name, character in characters.items()}
    service = Service(characters, renderer, limits=limits, cache=cache, limiter=limiter)
    never = service.never_drawn()  # after the models load: the tokens are their tokenizers', the family their own
    if never:
        raise UserError(f"{len(never)} character(s) of {characters_file} cannot be drawn as the file describes "
                        "them within this server's limits (every request that keeps their settings would be "
                        "refused):\n  " + "\n  ".join(never))
    return service


def checked_keys(options) -> list:
    """The API keys; refused when there are none and --host is reachable from other machines."""
    from dreambooth.serving.auth import load_keys

    keys = load_keys(options.api_keys)
    if not keys and not is_loopback(options.host) and not options.allow_no_auth:
        raise UserError(f"--host {options.host} is reachable from other machines, and no API keys are set: give "
                        "--api-keys FILE (or $DREAMBOOTH_API_KEYS), or --allow-no-auth on a trusted network.")
    return keys


def checked_for_ray(options):
    """The options Ray's replicas are built from, checked here first (keys, host, the characters file, the image
    cache and rate limits' store) so that a mistake is one message from the command rather than a replica failing;
    --demo's characters file written (its subject trained) once, here, not in each replica."""
    from dreambooth.serving.stores import stores

    checked_keys(options)
    if options.demo:
        options = dataclasses.replace(options, demo=False, characters=demo_characters_file(options.demo_dir))
    load_characters(options.characters)
    stores(options, options.characters)  # --redis-url answers, and does not contradict --cache-dir
    return options


def build_app(options):
    """The app `serve` runs: keys and host checked before any model loads."""
    from dreambooth.serving.app import create_app
    from dreambooth.serving.auth import local_names

    keys = checked_keys(options)
    characters_file = demo_characters_file(options.demo_dir) if options.demo else options.characters
    load_characters(characters_file)  # every problem of the file, before any model loads
    chat = None
    if options.llm_base_url:
        from dreambooth.serving.chat import ChatStates

        chat = ChatStates(options.llm_base_url, options.llm_model, os.environ.get(options.llm_api_key_env),
                          timeout_s=options.llm_timeout_s)
    service = build_service(characters_file, options)
    # keyless on loopback: only requests addressed to this machine (app.LocalOnly); --allow-no-auth on another
    # --host is the operator's choice of an open service
    hosts = local_names(options.host) if not keys and is_loopback(options.host) else ()
    return create_app(service, keys, auth=bool(keys), chat=chat, hosts=hosts), service


def listening_socket(host: str, port: int):
    """The socket `serve` listens on, bound before the models load so that a taken port fails at once."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only for a listener made so, and without
    # it each request after the first on a kept-alive connection waited ~40 ms (Nagle against delayed ACKs),
    # enough to split batches (docs/serve-load.md).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}. Choose another --port (0 takes a free "
                        "one).") from None
    return sock


def serve_command(options) -> None:
    """`dreambooth serve`: `options` is a command_options.ServeOptions."""
    check_installed()
    from dreambooth.serving.ray_app import check_ray_installed, option_problems, serve_on_ray

    problems = option_problems(options)
    if problems:
        raise UserError("; ".join(problems) + ".")
    if options.ray:
        check_ray_installed()
        return serve_on_ray(checked_for_ray(options), build_app)
    import uvicorn

    sock = listening_socket(options.host, options.port)
    try:
        app, service = build_app(options)
    except BaseException:
        sock.close()  # the port is free again at once, for the corrected command
        raise
    port = sock.getsockname()[1]
    # listening before the line below says so: a client that reads it and connects before uvicorn's own listen()
    # was refused (seen on a loaded machine); the kernel now queues it
    sock.listen(2048)
    names = ", ".join(sorted(service.characters))
    print(f"serving {len(service.characters)} character(s) ({names}) at http://{options.host}:{port}/ (the page; "
          "the API's OpenAPI page is /docs). Ctrl-C stops.", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def ray_application(args: dict):
    """The Ray Serve application builder (`import_path: dreambooth.serving.command:ray_application` in a RayService,
    `serve run dreambooth.serving.command:ray_application characters=...`): args are `serve`'s options by name."""
    from dreambooth.serving.ray_app import build

    return build(args, build_app)
