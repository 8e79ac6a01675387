"""`dreambooth studio` killed mid-run and started again, all through its HTTP API: the run goes on without it, the new
studio shows it running and stops it with a checkpoint, and the run queued behind it starts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from test_studio_app import png

from dreambooth.studio.app import CSRF_HEADER
from dreambooth.studio.runs import alive
from dreambooth.training.rundir import read_checkpoint


class Studio:
    """The studio's HTTP API as a script calls it: JSON in and out, the page's CSRF token on every request."""

    def __init__(self, url: str):
        self.url, self.token = url, ""
        self.token = re.search(r'<meta name="studio-csrf" content="([^"]+)">', self.call("GET", "", raw=True)).group(1)

    def call(self, method: str, path: str, body=None, *, raw: bool = False, status: int = 200):
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path.lstrip("/"), data=data, method=method,
                                         headers={CSRF_HEADER: self.token, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                code, text = answer.status, answer.read().decode()
        except urllib.error.HTTPError as e:
            code, text = e.code, e.read().decode()
        assert code == status, f"{method} {path}: {code} {text}"
        return text if raw else json.loads(text)

    def get(self, path: str):
        return self.call("GET", path)

    def post(self, path: str, body=None):
        return self.call("POST", path, body if body is not None else {})


def start_studio(root: Path) -> tuple[subprocess.Popen, Studio]:
    """`python -m dreambooth studio --projects ROOT --port 0`, and its API with its page's CSRF token."""
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth", "studio", "--projects", str(root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    line = proc.stdout.readline()
    found = re.search(r"studio at (http://\S+/)", line)
    assert found, f"the studio did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
    return proc, Studio(found.group(1))


def new_project(studio: Studio, name: str, model: Path, steps: int) -> None:
    studio.post("/api/projects", {"name": name, "identifier": "sks", "class_word": "dog", "model": str(model)})
    for i in range(3):
        studio.call("PUT", f"/api/projects/{name}/photos/p{i}.png", png(i))
    recipe = {"training": {"resolution": 64, "learning_rate": 1e-3, "max_train_steps": steps},
              "dataset": {"with_prior_preservation": False},
              "validation": {"steps": 100_000, "num_inference_steps": 1},
              "output": {"checkpointing_steps": 100_000, "logging_steps": 1, "report_to": "none"}}
    studio.call("PUT", f"/api/projects/{name}/config", {"values": recipe})


def wait_for(check, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if found := check():
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen in {timeout} s")


def logged_step(project: Path) -> int:
    """The last step the trainer wrote to its log, read from the run folder (no studio asked)."""
    log = project / "output" / "logs" / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


def test_the_studio_killed_mid_run_and_started_again_finds_its_run_and_queue(tmp_path, tiny_model):
    root = tmp_path / "projects"
    studios = []
    try:
        proc, studio = start_studio(root)
        studios.append(proc)
        new_project(studio, "first", tiny_model, steps=20_000)  # stopped long before its end
        new_project(studio, "second", tiny_model, steps=2)
        first = studio.post("/api/projects/first/runs", {"kind": "train"})
        second = studio.post("/api/projects/second/runs", {"kind": "train"})
        assert (first["state"], second["state"]) == ("running", "queued"), (first, second)
        wait_for(lambda: (studio.get(f"/api/runs/{first['id']}")["progress"]["step"] or 0) >= 1, 120,
                 "the first run's first step")

        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert alive(first["pid"], first["pid_start"]), "the run ended with the studio that started it"
        reached = logged_step(root / "first")
        wait_for(lambda: logged_step(root / "first") > reached + 2, 60, "the run stepping on without a studio")

        killed_token = studio.token
        proc, studio = start_studio(root)  # a new studio: its own process and CSRF token, the same projects
        studios.append(proc)
        assert studio.token != killed_token
        runs = {run["id"]: run for run in studio.get("/api/runs")["runs"]}
        assert (runs[first["id"]]["state"], runs[second["id"]]["state"]) == ("running", "queued")
        shown = studio.get(f"/api/runs/{first['id']}")["progress"]
        assert shown["step"] > reached and shown["total_steps"] == 20_000

        assert studio.post(f"/api/runs/{first['id']}/stop")["stopping"]
        stopped = wait_for(lambda: (run := studio.get(f"/api/runs/{first['id']}")["run"])["state"] !=
                           "running" and run, 120, "the stop")
        assert stopped["state"] == "stopped", stopped["message"]
        checkpoint = Path(stopped["checkpoint"])
        assert checkpoint.parent == root / "first" / "output" and read_checkpoint(checkpoint) is not None
        assert stopped["message"].startswith(f"stopped at step {checkpoint.name.removeprefix('checkpoint-')} as asked")

        later = wait_for(lambda: (run := studio.get(f"/api/runs/{second['id']}")["run"])["state"] != "queued"
                         and run, 60, "the queued run's start")
        assert later["started_at"] >= stopped["ended_at"] - 1
        done = wait_for(lambda: (run := studio.get(f"/api/runs/{second['id']}")["run"])["state"] !=
                        "running" and run, 120, "the second run's end")
        assert done["state"] == "finished", done["message"]
        assert (root / "second" / "output" / "model_index.json").is_file()
    finally:
        for proc in studios:
            proc.kill()
            proc.wait()
        stop_runs(root / ".studio")


def stop_runs(state: Path) -> None:
    """Whatever runs a failed test left going end with it."""
    queue = state / "queue.json"
    for run in json.loads(queue.read_text())["runs"] if queue.is_file() else []:
        trainer = state / "runs" / run["id"] / "trainer.json"
        pids = [(run.get("pid"), run.get("pid_start"))]
        if trainer.is_file():
            record = json.loads(trainer.read_text())
            pids.append((record.get("pid"), record.get("start")))
        for pid, start in pids:
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)
