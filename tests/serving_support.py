"""Helpers for the service's tests: a characters file on the tiny model, a service with a stand-in renderer, and
a real uvicorn server on loopback in a thread."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dreambooth.characters.character import load_characters


def characters_file(folder: Path, model: Path, entries: list[dict] | None = None) -> Path:
    """A characters.yaml beside `folder`; by default one character `dog` (sks dog, 64 px, 4 steps) on `model`."""
    entries = entries or [{"name": "dog", "model": str(model), "identifier": "sks", "class_word": "dog",
                           "width": 64, "height": 64, "steps": 4}]
    path = Path(folder) / "characters.yaml"
    path.write_text(yaml.safe_dump({"characters": entries}), encoding="utf-8")
    return path


class StandInRenderer:
    """A renderer without a model: tokens are words + 2, each picture a small PNG of its seed. `gate` (a
    threading.Event) holds every call until set; `batches` records the requests of each call."""

    def __init__(self, gate: threading.Event | None = None, seconds: float = 0.0):
        self.gate, self.seconds = gate, seconds
        self.batches: list[list] = []
        self.calls = 0

    def count_tokens(self, name):
        return lambda text: len(text.split()) + 2

    def max_tokens(self, name):
        return 77

    def model_hash(self, name):
        return "stand-in"

    def model_family(self, name):
        return "SD 1.x", 512

    def unusable(self, name):
        return []

    def render(self, requests):
        if self.gate is not None:
            self.gate.wait(timeout=30)
        time.sleep(self.seconds)
        self.calls += 1
        self.batches.append(list(requests))
        out = []
        for r in requests:
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (r.seed % 256, 0, 0)).save(buffer, format="PNG")
            out.append(buffer.getvalue())
        return out


def stand_in_service(tmp_path: Path, model: Path, renderer=None, cache=None, limiter=None, **limits):
    from dreambooth.serving.service import Limits, Service

    characters = load_characters(characters_file(tmp_path, model))
    return Service(characters, renderer or StandInRenderer(), limits=Limits(**limits), cache=cache, limiter=limiter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """The app served by uvicorn on a loopback port in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """A redis-server of our own on a free loopback port, keeping nothing on disk (no snapshots, no append-only
    file); `stop()` ends it while a test still runs, `start()` brings it back on the same port."""

    def __init__(self, folder: Path, *arguments: str):
        self.folder, self.arguments, self.port = Path(folder), arguments, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), *self.arguments], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.AuthenticationError:  # started with --requirepass: it answers
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@contextlib.contextmanager
def redis_server(folder: Path, *arguments: str):
    """A running RedisServer, stopped after. Skips without Debian's redis-server, unless DREAMBOOTH_REQUIRE_REDIS=1
    (CI), where it fails, as the page tests do without chromium."""
    if not Path(REDIS_SERVER).is_file():
        why = "the shared-store tests need Debian's redis-server (not found): apt-get install redis-server"
        if os.environ.get("DREAMBOOTH_REQUIRE_REDIS") == "1":
            pytest.fail(why + " (DREAMBOOTH_REQUIRE_REDIS=1)")
        pytest.skip(why)
    server = RedisServer(folder, *arguments)
    server.start()
    try:
        yield server
    finally:
        server.stop()
