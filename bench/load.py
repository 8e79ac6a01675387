"""Load test of `dreambooth serve` on loopback: throughput, latency, batching, load shedding and memory.

Developer tooling, not a unit test and not part of the installed package. It starts the server itself as a
subprocess (`python -m dreambooth serve --demo ...`, or `--characters FILE`), on a free loopback port, with an image
cache in a fresh temporary folder (so every new seed is a miss) and the rate limit off (`--rate-per-minute 0`: every
client here is the same caller, 127.0.0.1). Clients are asyncio tasks sharing one httpx2 AsyncClient; each sends a
`POST /v1/render` (one PNG) and waits for the answer before sending the next. Phases:

1. steady: `--clients` clients for `--seconds` seconds, each request with a new seed (a cache miss): requests/s,
   images/s (images drawn, from /metrics), p50/p90/p99 latency, statuses, and the server's batch-size histogram
   over the phase (the difference of two /metrics scrapes), which shows whether requests were drawn together.
2. overload: a second server with a small queue (`--max-queue 4 --max-batch 4`) and `--overload-clients` clients
   for `--overload-seconds` s that retry `--overload-pause` s after a 429, sooner than its Retry-After says, so that
   the queue stays full: every answer must be 200 or 429 `queue_full`, and every 429 must carry Retry-After.
3. soak: `--soak-requests` requests through `--soak-clients` clients on the first server, a quarter of them
   repeating an earlier seed (cache hits). The server's RSS (/proc/PID/status VmRSS; VmHWM for the peak) is
   sampled every 0.5 s throughout every phase; for the soak: RSS after its warm-up (`--soak-warmup` requests), at
   the end, the peak, and the slope of a least-squares line through the samples after warm-up, against requests
   done, in MB per 100 requests. Memory that stays flat has a slope near 0.
4. cache: one client, `--cache-repeats` times a new seed (a miss) and then the same request again (a hit): the
   latency of each; and GET /healthz on the client's kept-alive connection against a new connection each time,
   which shows what HTTP alone costs.

`--ray` runs only the steady phase, on three servers in turn: the one-process service, then `serve --ray` with 1
replica and with 2 (each replica a process of a local Ray cluster the server starts, `--cpus-per-replica 1`), every
client drawing each character the server lists in turn, so that multiplexing has characters to place. Images/s are
read from the gateway's /metrics (the replicas' figures summed). RSS is the serving command's process only (with Ray
the replicas are other processes). On a 2-core machine this shows the mechanics (routing, batching per replica,
the gateway's cost), not a speed-up: two replicas share the same two cores.

Run from the repository root (about 4 minutes with the defaults on a 2-core CPU):

    .venv/bin/python bench/load.py --demo-dir demo-run --out docs/results/serve-load.json
    .venv/bin/python bench/load.py --characters characters.yaml --character dog --quick --out /tmp/load.json
    .venv/bin/python bench/load.py --demo-dir demo-run --ray --seconds 60 --out docs/results/serve-load-ray.json

`--quick` runs a few seconds a phase (the test). It writes the JSON (`--out`), the servers' logs into `--log-dir`
(default: a folder named as the JSON, beside it) and prints a summary table. The exit status is 1 when any phase
saw an answer it should not (anything but 200 in steady, soak and cache; anything but 200 and 429 queue_full in
overload; a 200 that is not a PNG; a transport error), a 429 without Retry-After, or a server that died; 2 when a
server did not start. The load generator runs on the same machine as the server and takes some of its CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx2

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# --ray: the servers whose steady phases are compared (the one-process service, then Ray Serve with 1 and 2 replicas)
RAY_SERVERS = [("one-process", []), ("ray-1-replica", ["--ray", "--replicas", "1"]),
               ("ray-2-replicas", ["--ray", "--replicas", "2"])]
READY = re.compile(r"serving (\d+) character\(s\) \(([^)]*)\) at (http://[^\s/]+)/")
PHASES = ("steady", "overload", "soak", "cache")
FULL = {"clients": 4, "seconds": 60.0, "overload_clients": 32, "overload_seconds": 20.0, "soak_requests": 600,
        "soak_clients": 4, "soak_warmup": 60, "cache_repeats": 10}
QUICK = {"clients": 2, "seconds": 3.0, "overload_clients": 16, "overload_seconds": 3.0, "soak_requests": 24,
         "soak_clients": 2, "soak_warmup": 6, "cache_repeats": 2}
SAMPLE_S = 0.5
MB = 1024.0  # /proc reports kB


class ServerFailed(Exception):
    """The server did not start (exit status 2)."""


# ------------------------------------------------------------------------------------------------ small helpers
def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the two nearest ranks, as numpy's default."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": sum(values) / len(values), "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99), "max": max(values)}


def least_squares_slope(points: list[tuple[float, float]]) -> float | None:
    """The slope of the least-squares line through (x, y) points; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx


def read_memory(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in kB, or None when it is gone (or not Linux)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.MULTILINE))
    if "VmRSS" not in found:
        return None
    return int(found["VmRSS"]), int(found.get("VmHWM", found["VmRSS"]))


def read_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (/proc/PID/stat), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_load() -> float | None:
    """The machine's 1-minute load average: other work on the machine slows the server, and shows here."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def machine_during(samples: list[dict], phase: str) -> dict:
    """The machine while a phase ran: the load average (mean, max) and the server's CPU use (100% = one core)."""
    mine = [s for s in samples if s["phase"] == phase]
    loads = [s["load1"] for s in mine if s.get("load1") is not None]
    cpu = [(s["t"], s["cpu_s"]) for s in mine if s.get("cpu_s") is not None]
    busy = (cpu[-1][1] - cpu[0][1]) / (cpu[-1][0] - cpu[0][0]) * 100 if len(cpu) > 1 and cpu[-1][0] > cpu[0][0] \
        else None
    return {"load1_mean": round(sum(loads) / len(loads), 2) if loads else None,
            "load1_max": max(loads) if loads else None, "server_cpu_percent": round(busy, 1) if busy else None,
            "cpu_count": os.cpu_count()}


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus' text format as {(name, ((label, value), ...)): value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
        if not match:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or "")))
        # serve --ray's gateway labels each replica's figures with `replica`: summed here, as one server's
        labels = tuple(pair for pair in labels if pair[0] != "replica")
        out[(match.group(1), labels)] = out.get((match.group(1), labels), 0.0) + float(match.group(4))
    return out


def metrics_delta(before: dict, after: dict) -> dict:
    """What the phase between two scrapes did: render outcomes, batch sizes, images drawn, cache lookups."""

    def diff(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    outcomes = {dict(labels)["outcome"]: int(diff((name, labels))) for name, labels in after
                if name == "dreambooth_requests_total" and dict(labels).get("endpoint") == "/v1/render"}
    cumulative = sorted(((float(dict(labels)["le"]), int(diff((name, labels)))) for name, labels in after
                         if name == "dreambooth_batch_size_bucket"), key=lambda pair: pair[0])
    sizes, below = {}, 0
    for le, count in cumulative:
        if count - below:
            sizes["more" if le == float("inf") else str(int(le))] = count - below
        below = count
    batches = int(diff(("dreambooth_batch_size_count", ())))
    images = int(diff(("dreambooth_images_total", ())))
    cache = {dict(labels)["result"]: int(diff((name, labels))) for name, labels in after
             if name == "dreambooth_cache_lookups_total"}
    return {"render_outcomes": {k: v for k, v in outcomes.items() if v}, "batch_sizes": sizes, "batches": batches,
            "images_drawn": images, "mean_batch": images / batches if batches else None, "cache_lookups": cache}


def to_json(value, indent: int = 0) -> str:
    """JSON with one line per key, but a row (a list of plain values) or a sample (a dict of plain values) on one
    line, so that thousands of requests and samples stay readable."""
    plain = (str, int, float, bool, type(None))
    if isinstance(value, list) and value and not all(isinstance(v, plain) for v in value):
        inner = ",\n".join(" " * (indent + 1) + to_json(v, indent + 1) for v in value)
        return "[\n" + inner + "\n" + " " * indent + "]"
    if isinstance(value, dict) and value and not all(isinstance(v, plain) for v in value.values()):
        inner = ",\n".join(" " * (indent + 1) + json.dumps(str(k)) + ": " + to_json(v, indent + 1)
                            for k, v in value.items())
        return "{\n" + inner + "\n" + " " * indent + "}"
    return json.dumps(value)


def machine() -> dict:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    versions = {}
    for package in ("torch", "diffusers", "transformers", "fastapi", "uvicorn", "httpx2"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        memory_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    except (OSError, AttributeError):
        memory_kb = None
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "memory_gb": round(memory_kb / MB / MB, 1) if memory_kb else None, "python": platform.python_version(),
            "versions": versions, "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--", "src", "bench/load.py"))}


def _git(*args) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# ------------------------------------------------------------------------------------------------ the server
class Progress:
    """What the RSS sampler labels each sample with: the phase running and the render requests it has finished."""

    def __init__(self):
        self.phase = "start"
        self.done = 0


class Server:
    """`dreambooth serve` as a subprocess, its output in a log file, its memory sampled on a thread."""

    def __init__(self, name: str, target: list[str], flags: list[str], log_dir: Path, start_timeout: float):
        self.name, self.target, self.flags, self.start_timeout = name, target, flags, start_timeout
        self.log_path = log_dir / f"{name}-server.log"
        self.cache_dir = Path(tempfile.mkdtemp(prefix="serve-load-cache-"))
        self.command = [sys.executable, "-m", "dreambooth", "serve", *target, "--port", "0", "--host", "127.0.0.1",
                        "--cache-dir", str(self.cache_dir), *flags]
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.characters: list[str] = []
        self.progress = Progress()
        self.samples: list[dict] = []
        self.startup_s = None
        self.exit_code = None
        self.died = False
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        started = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._sampler = threading.Thread(target=self._sample, name=f"rss-{self.name}", daemon=True)
        self._sampler.start()
        while True:
            match = READY.search(self.log_path.read_text(errors="replace"))
            if match:
                self.url = match.group(3)
                self.characters = [name.strip() for name in match.group(2).split(",") if name.strip()]
                break
            if self.process.poll() is not None:
                raise ServerFailed(f"the {self.name} server exited ({self.process.returncode}) before listening:\n"
                                   + self.log_tail())
            if time.monotonic() - started > self.start_timeout:
                self.stop()
                raise ServerFailed(f"the {self.name} server did not listen within {self.start_timeout:g} s:\n"
                                   + self.log_tail())
            time.sleep(0.1)
        while True:  # the line is printed just before uvicorn listens and starts the batcher
            try:
                if httpx2.get(self.url + "/healthz", timeout=5, trust_env=False).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() - started > self.start_timeout:
                self.stop()
                raise ServerFailed(f"the {self.name} server printed its address but /healthz never answered:\n"
                                   + self.log_tail())
            time.sleep(0.1)
        self.startup_s = time.monotonic() - started

    def _sample(self) -> None:
        self._sampling_started = time.monotonic()
        while self.sample_now() and not self._stop.wait(SAMPLE_S):
            pass

    def sample_now(self) -> bool:
        """One RSS sample (False when the server is gone); the sampler thread calls it every SAMPLE_S."""
        memory = read_memory(self.process.pid)
        if memory is None or self.process.poll() is not None:
            return False
        cpu = read_cpu_seconds(self.process.pid)
        started = getattr(self, "_sampling_started", time.monotonic())
        self.samples.append({"t": round(time.monotonic() - started, 2), "phase": self.progress.phase,
                             "done": self.progress.done, "rss_mb": round(memory[0] / MB, 2),
                             "hwm_mb": round(memory[1] / MB, 2), "load1": read_load(),
                             "cpu_s": round(cpu, 2) if cpu is not None else None})
        return True

    def memory_now(self) -> tuple[float, float] | None:
        memory = read_memory(self.process.pid) if self.process else None
        return (memory[0] / MB, memory[1] / MB) if memory else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful stop), then SIGKILL after 20 s; the cache folder removed."""
        self._stop.set()
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            else:
                self.died = self.startup_s is not None  # it listened, then exited before it was stopped
            self.exit_code = self.process.returncode
        if self._sampler is not None:
            self._sampler.join(timeout=5)
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_errors(self) -> int:
        """Tracebacks and error lines in the server's output (a 500 logs one)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return 0
        return len(re.findall(r"^(Traceback|ERROR|error:)", text, re.MULTILINE))

    def report(self) -> dict:
        rss = [s["rss_mb"] for s in self.samples]
        return {"command": self.command, "flags": self.flags, "startup_s": self.startup_s,
                "rss_mb_after_start": next((s["rss_mb"] for s in self.samples if s["phase"] != "start"), None),
                "rss_mb_max_sampled": max(rss) if rss else None,
                "hwm_mb": self.samples[-1]["hwm_mb"] if self.samples else None, "exit_code": self.exit_code,
                "died_during_run": self.died, "log": str(self.log_path), "log_error_lines": self.log_errors(),
                "samples": len(self.samples)}


# ------------------------------------------------------------------------------------------------ the clients
class Tally:
    """Every answer of a phase: statuses (`200`, `429 queue_full`, `error ReadTimeout`...), latencies, problems."""

    def __init__(self, allowed: set[str]):
        self.allowed = allowed
        self.statuses: Counter[str] = Counter()
        self.latencies: dict[str, list[float]] = {}
        self.retry_after: Counter[str] = Counter()
        self.retry_after_missing = 0
        self.cache: Counter[str] = Counter()
        self.by_cache: dict[str, list[float]] = {}  # 200s' latencies by X-Cache
        self.problems: list[str] = []
        self.started = time.perf_counter()
        self.log: list[list] = []  # [sent at (s after the tally began), latency s, status, X-Cache]

    def add(self, status: str, seconds: float, x_cache: str | None = None) -> None:
        self.log.append([round(time.perf_counter() - seconds - self.started, 4), round(seconds, 5), status, x_cache])
        self.statuses[status] += 1
        self.latencies.setdefault(status, []).append(seconds)
        if status not in self.allowed:
            self.problem(f"unexpected answer {status}")

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)

    def unexpected(self) -> int:
        return sum(n for status, n in self.statuses.items() if status not in self.allowed) + self.retry_after_missing

    def report(self) -> dict:
        return {"statuses": dict(self.statuses), "unexpected": self.unexpected(),
                "retry_after_missing": self.retry_after_missing, "problems": self.problems,
                "latency_s": {status: latency_summary(values) for status, values in self.latencies.items()},
                "requests_log": self.log}


class Load:
    """One server's clients: render requests, each answer checked and tallied."""

    def __init__(self, server: Server, character: str | list[str], state: dict, seeds):
        """`character`: one, or a list drawn in turn (request by request)."""
        self.server, self.state, self.seeds = server, state, seeds
        self.characters = [character] if isinstance(character, str) else list(character)
        self.sent = 0
        self.client: httpx2.AsyncClient | None = None

    async def __aenter__(self):
        self.client = httpx2.AsyncClient(base_url=self.server.url, timeout=httpx2.Timeout(600.0), trust_env=False,
                                         limits=httpx2.Limits(max_connections=256, max_keepalive_connections=256))
        return self

    async def __aexit__(self, *exc):
        await self.client.aclose()

    async def metrics(self) -> dict:
        answer = await self.client.get("/metrics")
        answer.raise_for_status()
        return parse_metrics(answer.text)

    async def render(self, tally: Tally, seed: int) -> tuple[str, httpx2.Response | None]:
        """One request; its status key (`200`, `429 queue_full`, `error ConnectError`) and the answer."""
        character = self.characters[self.sent % len(self.characters)]
        self.sent += 1
        body = {"character": character, "state": self.state, "format": "png", "seed": seed}
        started = time.perf_counter()
        try:
            answer = await self.client.post("/v1/render", json=body)
        except httpx2.HTTPError as e:
            tally.add(f"error {type(e).__name__}", time.perf_counter() - started)
            return f"error {type(e).__name__}", None
        seconds = time.perf_counter() - started
        x_cache = answer.headers.get("x-cache")
        if answer.status_code == 200:
            status = "200"
            if not answer.content.startswith(PNG_SIGNATURE):
                status = "200 not_png"
            tally.cache[answer.headers.get("x-cache", "none")] += 1
            tally.by_cache.setdefault(answer.headers.get("x-cache", "none"), []).append(seconds)
        else:
            try:
                code = answer.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "no_json_error"
            status = f"{answer.status_code} {code}"
            if answer.status_code == 429:
                after = answer.headers.get("retry-after")
                if after is None:
                    tally.retry_after_missing += 1
                    tally.problem(f"429 {code} without Retry-After")
                else:
                    tally.retry_after[after] += 1
        tally.add(status, seconds, x_cache)
        self.server.progress.done += 1
        return status, answer


def new_seeds(start: int = 1_000_000):
    seed = start
    while True:
        yield seed
        seed += 1


async def steady(load: Load, clients: int, seconds: float) -> dict:
    """`clients` closed-loop clients for `seconds`, every request a new seed."""
    warm = Tally({"200"})
    await asyncio.gather(*(load.render(warm, next(load.seeds)) for _ in range(clients)))  # first calls, untimed
    before = await load.metrics()
    tally = Tally({"200"})
    load.server.progress.phase, load.server.progress.done = "steady", 0
    started = time.perf_counter()
    end = started + seconds

    async def client():
        while time.perf_counter() < end:
            await load.render(tally, next(load.seeds))

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    server = metrics_delta(before, await load.metrics())
    ok = tally.statuses["200"]
    problems = warm.problems + tally.problems
    return {"clients": clients, "seconds": seconds, "wall_s": wall, "requests": sum(tally.statuses.values()),
            "requests_per_s": sum(tally.statuses.values()) / wall, "ok_per_s": ok / wall,
            "images_per_s": server["images_drawn"] / wall, "warmup": warm.report(), **tally.report(),
            "unexpected": tally.unexpected() + warm.unexpected(), "problems": problems, "server": server}


async def overload(load: Load, clients: int, seconds: float, pause: float) -> dict:
    """Many clients against a small queue; after a 429 a client waits `pause` s (not the Retry-After)."""
    before = await load.metrics()
    tally = Tally({"200", "429 queue_full"})
    load.server.progress.phase, load.server.progress.done = "overload", 0
    started = time.perf_counter()
    end = started + seconds

    async def client():
        while time.perf_counter() < end:
            status, _ = await load.render(tally, next(load.seeds))
            if status.startswith("429"):
                await asyncio.sleep(pause)

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    server = metrics_delta(before, await load.metrics())
    return {"clients": clients, "seconds": seconds, "retry_pause_s": pause, "wall_s": wall,
            "requests": sum(tally.statuses.values()), "requests_per_s": sum(tally.statuses.values()) / wall,
            "ok_per_s": tally.statuses["200"] / wall, "images_per_s": server["images_drawn"] / wall,
            "retry_after_s": dict(sorted(tally.retry_after.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit()
                                         else 0)),
            **tally.report(), "server": server}


async def soak(load: Load, requests: int, clients: int, warmup: int, repeat_every: int = 4) -> dict:
    """`requests` requests through `clients` clients; every `repeat_every`-th repeats a seed already drawn."""
    server = load.server
    before = await load.metrics()
    tally = Tally({"200"})
    server.progress.phase, server.progress.done = "soak", 0
    first_sample = len(server.samples)
    rng = random.Random(0)
    drawn: list[int] = []
    issued = 0
    started = time.perf_counter()

    async def client():
        nonlocal issued
        while issued < requests:
            index = issued
            issued += 1
            repeat = index % repeat_every == repeat_every - 1 and drawn
            seed = rng.choice(drawn) if repeat else next(load.seeds)
            status, answer = await load.render(tally, seed)
            if status == "200" and not repeat:
                drawn.append(seed)
            if server.progress.done == warmup:  # one sample exactly at the warm-up's end, whatever the pace
                server.sample_now()

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    server.sample_now()  # and one at the end: a fast soak may fall between the periodic samples
    end_memory = server.memory_now()
    delta = metrics_delta(before, await load.metrics())
    samples = [s for s in server.samples[first_sample:] if s["phase"] == "soak"]
    after_warmup = [s for s in samples if s["done"] >= warmup]
    slope = least_squares_slope([(s["done"], s["rss_mb"]) for s in after_warmup])
    slope_t = least_squares_slope([(s["t"], s["rss_mb"]) for s in after_warmup])
    rss = {"start_after_warmup": after_warmup[0]["rss_mb"] if after_warmup else None,
           "end": round(end_memory[0], 2) if end_memory else (samples[-1]["rss_mb"] if samples else None),
           "peak_sampled": max((s["rss_mb"] for s in samples), default=None),
           "hwm_at_end": round(end_memory[1], 2) if end_memory else None,
           "slope_mb_per_100_requests": slope * 100 if slope is not None else None,
           "slope_mb_per_minute": slope_t * 60 if slope_t is not None else None,
           "samples_after_warmup": len(after_warmup), "warmup_requests": warmup}
    if rss["start_after_warmup"] is not None and rss["end"] is not None:
        rss["growth_mb"] = round(rss["end"] - rss["start_after_warmup"], 2)
    ok = tally.statuses["200"]
    return {"requests": sum(tally.statuses.values()), "clients": clients, "repeat_every": repeat_every,
            "wall_s": wall, "requests_per_s": sum(tally.statuses.values()) / wall, "ok_per_s": ok / wall,
            "images_per_s": delta["images_drawn"] / wall, "x_cache": dict(tally.cache),
            "latency_s_by_x_cache": {k: latency_summary(v) for k, v in tally.by_cache.items()}, **tally.report(),
            "rss_mb": rss, "server": delta}


async def cache(load: Load, repeats: int) -> dict:
    """One client: a new seed (a miss), then the same request again (a hit), `repeats` times; and GET /healthz on
    the client's kept-alive connection against a new connection each time (what HTTP alone costs)."""
    miss, hit = Tally({"200"}), Tally({"200"})
    load.server.progress.phase, load.server.progress.done = "cache", 0
    warnings = []
    for _ in range(repeats):
        seed = next(load.seeds)
        for tally, expected in ((miss, "miss"), (hit, "hit")):
            status, answer = await load.render(tally, seed)
            if status == "200" and answer.headers.get("x-cache") != expected:
                warnings.append(f"seed {seed}: X-Cache {answer.headers.get('x-cache')}, expected {expected}")
    connections = {}
    for name, headers in (("keep_alive", {}), ("new_connection", {"connection": "close"})):
        times = []
        for _ in range(max(5, repeats)):
            started = time.perf_counter()
            (await load.client.get("/healthz", headers=headers)).raise_for_status()
            times.append(time.perf_counter() - started)
        connections[name] = latency_summary(times)
    miss_s, hit_s = miss.latencies.get("200", []), hit.latencies.get("200", [])
    p50_miss, p50_hit = percentile(miss_s, 50), percentile(hit_s, 50)
    return {"repeats": repeats, "miss": miss.report(), "hit": hit.report(), "miss_p50_s": p50_miss,
            "hit_p50_s": p50_hit, "speedup_p50": p50_miss / p50_hit if p50_miss and p50_hit else None,
            "healthz_s": connections, "x_cache_warnings": warnings[:20],
            "unexpected": miss.unexpected() + hit.unexpected(), "problems": miss.problems + hit.problems}


# ------------------------------------------------------------------------------------------------ the run
def options(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--demo-dir", type=Path, help="Serve `--demo` from this `dreambooth demo` folder (trained "
                        "first when it has no model) [default: demo-run].")
    target.add_argument("--characters", type=Path, help="Serve this characters file instead of --demo.")
    parser.add_argument("--character", help="The character to draw [default: sks with --demo, else the first "
                        "the server lists].")
    parser.add_argument("--state", type=json.loads, default={"location": "night"},
                        help="The state sent, as JSON [default: {\"location\": \"night\"}].")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"Phases to run [default: {','.join(PHASES)}].")
    parser.add_argument("--clients", type=int, help="steady: concurrent clients [default: 4; --quick 2].")
    parser.add_argument("--seconds", type=float, help="steady: seconds [default: 60; --quick 3].")
    parser.add_argument("--overload-clients", type=int, help="overload: clients [default: 32; --quick 16].")
    parser.add_argument("--overload-seconds", type=float, help="overload: seconds [default: 20; --quick 3].")
    parser.add_argument("--overload-pause", type=float, default=0.2, help="overload: seconds a client waits after "
                        "a 429 before it sends again [default: 0.2].")
    parser.add_argument("--overload-queue", type=int, default=4, help="overload: the server's --max-queue "
                        "[default: 4].")
    parser.add_argument("--overload-batch", type=int, default=4, help="overload: the server's --max-batch "
                        "[default: 4].")
    parser.add_argument("--soak-requests", type=int, help="soak: requests [default: 600; --quick 24].")
    parser.add_argument("--soak-clients", type=int, help="soak: clients [default: 4; --quick 2].")
    parser.add_argument("--soak-warmup", type=int, help="soak: requests before RSS counts [default: 60; --quick 6].")
    parser.add_argument("--cache-repeats", type=int, help="cache: miss/hit pairs [default: 10; --quick 2].")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="FLAG",
                        help="A further flag for both servers, e.g. --serve-arg=--device=cpu (repeatable).")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="Seconds a server may take to listen "
                        "(serve --demo trains the subject first when missing) [default: 900].")
    parser.add_argument("--out", type=Path, default=Path("serve-load.json"), help="The JSON results "
                        "[default: serve-load.json].")
    parser.add_argument("--log-dir", type=Path, help="The servers' logs [default: beside --out, named as it].")
    parser.add_argument("--quick", action="store_true", help="A few seconds a phase (for the test).")
    parser.add_argument("--ray", action="store_true", help="Steady only, on three servers one after another: the "
                        "one-process service, then `serve --ray` with 1 and with 2 replicas, each drawing every "
                        "character the server lists in turn (multiplexing sends each character to its own "
                        "replica); images/s side by side.")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if args.characters is None and args.demo_dir is None:
        args.demo_dir = Path("demo-run")
    if args.log_dir is None:
        args.log_dir = args.out.with_suffix("")
    return args


async def run_on(server: Server, args, character: str, seeds, phases: list[str]) -> dict:
    results = {}
    async with Load(server, character, args.state, seeds) as load:
        for phase in phases:
            print(f"[{server.name}] {phase} ...", flush=True)
            if phase == "steady":
                results[phase] = await steady(load, args.clients, args.seconds)
            elif phase == "overload":
                results[phase] = await overload(load, args.overload_clients, args.overload_seconds,
                                                args.overload_pause)
            elif phase == "soak":
                results[phase] = await soak(load, args.soak_requests, args.soak_clients, args.soak_warmup)
            elif phase == "cache":
                results[phase] = await cache(load, args.cache_repeats)
            results[phase]["server_name"] = server.name
            results[phase]["machine"] = machine_during(server.samples, phase)
            print(f"[{server.name}] {phase}: {one_line(phase, results[phase])}", flush=True)
    server.progress.phase = "end"
    return results


def one_line(phase: str, r: dict) -> str:
    if phase == "cache":
        return f"miss p50 {fmt(r['miss_p50_s'])} s, hit p50 {fmt(r['hit_p50_s'], 4)} s"
    latency = r["latency_s"].get("200", {})
    return (f"{r['requests']} requests, {r['requests_per_s']:.2f}/s, images {r['images_per_s']:.2f}/s, p50 "
            f"{fmt(latency.get('p50'))} s, statuses {dict(r['statuses'])}")


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ray_summary(result: dict) -> str:
    """`--ray`: the steady phase of each server, side by side."""
    lines = ["| server | clients | requests | images/s | p50 s | p90 s | batch sizes (count) | statuses | "
             "start-up s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, _ in RAY_SERVERS:
        r = result["phases"].get(f"steady {name}")
        if r is None:
            continue
        latency = r["latency_s"].get("200", {})
        sizes = ", ".join(f"{k}: {v}" for k, v in r["server"]["batch_sizes"].items()) or "-"
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        lines.append(f"| {name} | {r['clients']} | {r['requests']} | {r['images_per_s']:.2f} | "
                     f"{fmt(latency.get('p50'))} | {fmt(latency.get('p90'))} | {sizes} | {statuses} | "
                     f"{fmt(result['servers'][name]['startup_s'], 1)} |")
    return "\n".join(lines)


def summary(result: dict) -> str:
    """The results as a markdown table, and the verdict."""
    phases = result["phases"]
    if result["settings"].get("ray"):
        return ray_summary(result) + "\nverdict: " + ("OK" if result["ok"] else "FAILED: "
                                                      + "; ".join(result["problems"]))
    lines = ["| phase | clients | requests | req/s | images/s | p50 s | p90 s | p99 s | batch sizes (count) | "
             "statuses | server CPU % | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("steady", "overload", "soak"):
        if name not in phases:
            continue
        r = phases[name]
        latency = r["latency_s"].get("200", {})
        sizes = ", ".join(f"{k}: {v}" for k, v in r["server"]["batch_sizes"].items()) or "-"
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        lines.append(f"| {name} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                     f"{r['images_per_s']:.2f} | {fmt(latency.get('p50'))} | {fmt(latency.get('p90'))} | "
                     f"{fmt(latency.get('p99'))} | {sizes} | {statuses} | "
                     f"{fmt(r['machine']['server_cpu_percent'], 0)} | {fmt(r['machine']['load1_mean'], 1)} |")
    out = ["\n".join(lines)]
    if "overload" in phases:
        r = phases["overload"]
        refused = r["latency_s"].get("429 queue_full", {})
        out.append(f"overload: 429 answered in p50 {fmt(refused.get('p50'), 4)} s; Retry-After values "
                   f"{r['retry_after_s']}; 429s without Retry-After: {r['retry_after_missing']}.")
    if "soak" in phases:
        rss = phases["soak"]["rss_mb"]
        out.append(f"soak RSS (MB): after warm-up {fmt(rss['start_after_warmup'], 1)}, end {fmt(rss['end'], 1)}, "
                   f"peak sampled {fmt(rss['peak_sampled'], 1)} (VmHWM {fmt(rss['hwm_at_end'], 1)}), slope "
                   f"{fmt(rss['slope_mb_per_100_requests'], 2)} MB per 100 requests "
                   f"({fmt(rss['slope_mb_per_minute'], 2)} MB/min); X-Cache {phases['soak']['x_cache']}.")
    if "cache" in phases:
        r = phases["cache"]
        out.append(f"cache: miss p50 {fmt(r['miss_p50_s'])} s, hit p50 {fmt(r['hit_p50_s'], 4)} s "
                   f"({fmt(r['speedup_p50'], 0)}x); GET /healthz p50 {fmt(r['healthz_s']['keep_alive']['p50'], 4)} s "
                   f"on a kept-alive connection, {fmt(r['healthz_s']['new_connection']['p50'], 4)} s on a new one.")
    out.append("verdict: " + ("OK" if result["ok"] else "FAILED: " + "; ".join(result["problems"])))
    return "\n".join(out)


def main(argv=None) -> int:
    args = options(argv)
    target = (["--characters", str(args.characters)] if args.characters
              else ["--demo", "--demo-dir", str(args.demo_dir)])
    args.log_dir.mkdir(parents=True, exist_ok=True)
    result = {"tool": "bench/load.py", "argv": sys.argv[1:] if argv is None else list(argv),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in vars(args).items()},
              "phases": {}, "servers": {}, "rss_samples": {}, "problems": []}
    seeds = new_seeds()
    plan = [("main", ["--rate-per-minute", "0"], [p for p in ("steady", "soak", "cache") if p in args.phases]),
            ("overload", ["--rate-per-minute", "0", "--max-queue", str(args.overload_queue), "--max-batch",
                          str(args.overload_batch)], ["overload"] if "overload" in args.phases else [])]
    if args.ray:
        steady_only = ["steady"] if "steady" in args.phases else []
        plan = [(name, ["--rate-per-minute", "0", *ray], steady_only) for name, ray in RAY_SERVERS]
    status = 0
    for name, flags, phases in plan:
        if not phases:
            continue
        server = Server(name, target, flags + args.serve_arg, args.log_dir, args.start_timeout)
        try:
            print(f"starting the {name} server: {' '.join(server.command)}", flush=True)
            server.start()
            character = args.character or ("sks" if args.characters is None else server.characters[0])
            if args.ray:
                character = [args.character] if args.character else server.characters
            result["character"] = character
            print(f"  listening at {server.url} after {server.startup_s:.1f} s; drawing {character!r}", flush=True)
            done = asyncio.run(run_on(server, args, character, seeds, phases))
            result["phases"].update({f"{phase} {name}": r for phase, r in done.items()} if args.ray else done)
        except ServerFailed as e:
            result["problems"].append(str(e).splitlines()[0])
            print(e, file=sys.stderr)
            status = 2
        except (httpx2.HTTPError, OSError) as e:  # /metrics failed: the server went away
            result["problems"].append(f"{name} server: {type(e).__name__}: {e}")
        finally:
            server.stop()
            result["servers"][name] = server.report()
            result["rss_samples"][name] = server.samples
        if server.died:
            result["problems"].append(f"the {name} server died during the run (exit {server.exit_code}); see "
                                      f"{server.log_path}")
        if status:
            break
    for name, phase in result["phases"].items():
        if phase.get("unexpected"):
            result["problems"].append(f"{name}: {phase['unexpected']} unexpected answer(s): "
                                      + "; ".join(dict.fromkeys(phase["problems"])))
    if "overload" in result["phases"] and not result["phases"]["overload"]["statuses"].get("429 queue_full"):
        result["notes"] = ["overload saw no 429: the queue never filled (more --overload-clients?)"]
    ran = {name.split(" ")[0] for name in result["phases"]}  # --ray: "steady one-process", ...
    missing = [p for p in (["steady"] if args.ray else args.phases) if p not in ran]
    if missing and not status:
        result["problems"].append(f"phase(s) not run: {', '.join(missing)}")
    result["ok"] = not result["problems"]
    result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(result) + "\n", encoding="utf-8")
    text = summary(result) if result["phases"] else "no phase ran: " + "; ".join(result["problems"])
    print("\n" + text + f"\n\nresults: {args.out}; server logs: {args.log_dir}", flush=True)
    return status or (0 if result["ok"] else 1)


if __name__ == "__main__":
    raise SystemExit(main())
