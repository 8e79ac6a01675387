"""The studio's run manager (studio.runs) on the tiny model: real `dreambooth train` processes started, watched,
stopped, resumed, extended, queued, and found again by a new manager after the studio that started them died."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import photo_folder

from dreambooth.errors import UserError
from dreambooth.project import init_project
from dreambooth.studio.runs import RunManager, alive, outcome


def make_project(root: Path, name: str, model: Path, *, photos: int = 4, **settings) -> Path:
    """A project as `dreambooth init` makes it, on the tiny model at 64 px, without prior preservation."""
    folder = root / name
    init_project(folder, identifier="sks", class_word="dog", model=str(model))
    (folder / "data" / "instance").rmdir()
    photo_folder(folder / "data" / "instance", photos) if photos else (folder / "data" / "instance").mkdir()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["training"].update(resolution=64, learning_rate=1e-3, max_train_steps=settings.get("steps", 4))
    config["dataset"]["with_prior_preservation"] = False
    config["validation"].update(steps=settings.get("validation_steps", 1000), num_inference_steps=1)
    config["output"].update(checkpointing_steps=settings.get("checkpointing_steps", 1000), logging_steps=1,
                            report_to="none")
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def wait_for(check, timeout: float = 90, what: str = "the run"):
    """Polls `check()` until it returns something true; returns that."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen in {timeout} s")


def ended(manager: RunManager, run_id: str, timeout: float = 90):
    return wait_for(lambda: (run := manager.get(run_id)).ended and run, timeout, f"the end of run {run_id}")


@pytest.fixture
def root(tmp_path):
    return tmp_path / "projects"


def test_a_run_steps_draws_stops_with_a_checkpoint_resumes_and_extends_with_live_events(tiny_model, root):
    project = make_project(root, "dog", tiny_model, steps=400, validation_steps=2)
    manager = RunManager(root / ".studio")
    run = manager.start(project)
    assert run.state == "running" and run.total_steps == 400
    seen = wait_for(lambda: (p := manager.progress(run.id)).step and p.step >= 2 and p.sample and p, what="a sample")
    assert Path(seen.sample).is_file() and seen.loss is not None and seen.total_steps == 400
    assert seen.eta_s is not None and seen.eta_s > 0
    with pytest.raises(UserError, match=f"project {project} already has run {run.id}"):
        manager.start(project, "resume")

    manager.stop(run.id)
    with pytest.raises(UserError, match="already stopping"):
        manager.stop(run.id)
    stopped = ended(manager, run.id)
    assert stopped.state == "stopped" and stopped.returncode == 0, stopped.message
    checkpoint = Path(stopped.checkpoint)
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    assert checkpoint.is_dir() and checkpoint.parent == project / "output" and 2 <= step < 400
    assert stopped.message.startswith(f"stopped at step {step} as asked")
    assert manager.progress(run.id).checkpoint == str(checkpoint)
    with pytest.raises(UserError, match=f"run {run.id} .* was stopped; its checkpoint is {checkpoint}"):
        manager.stop(run.id)

    resumed = ended(manager, manager.start(project, "resume", steps=step + 2).id)
    assert resumed.state == "finished", resumed.message
    assert manager.progress(resumed.id).step == step + 2 and (project / "output" / "model_index.json").is_file()
    assert any(f"resumed from {checkpoint} at step {step}" in line for line in manager.progress(resumed.id).log_tail)
    with pytest.raises(UserError, match=f"it finished; its model, samples and checkpoints are in {project / 'output'}"):
        manager.stop(resumed.id)

    extended = manager.start(project, "extend", steps=2)
    assert extended.total_steps == step + 4 and extended.argv[-2:] == ["--max_train_steps", str(step + 4)]

    async def follow():  # what a page's event stream is sent, to the run's end
        return [event async for event in manager.follow(extended.id, interval=0.2)]

    events = asyncio.run(asyncio.wait_for(follow(), 120))
    extended = manager.get(extended.id)
    assert extended.state == "finished", extended.message
    done = manager.progress(extended.id)
    assert (done.step, done.total_steps) == (step + 4, step + 4)
    assert events[-1] == {"kind": "state", "state": "finished", "stopping": False, "message": extended.message,
                          "checkpoint": str(checkpoint)}
    steps = [e["step"] for e in events if e["kind"] == "step"]
    assert steps == sorted(steps) and steps[-1] == step + 4
    assert [e["path"] for e in events if e["kind"] == "sample"][-1] == str(
        project / "output" / "samples" / f"step-{step + 4:06d}.png")
    text = "\n".join(line for e in events if e["kind"] == "log" for line in e["lines"])
    assert f"resumed from {checkpoint} at step {step}" in text and "done: model in" in text
    again, cursor = manager.events(extended.id)  # from the start: everything; from its cursor: nothing new
    assert again[-1]["kind"] == "state" and manager.events(extended.id, cursor)[0] == []
    assert [r.state for r in manager.runs()] == ["stopped", "finished", "finished"]


def test_a_pre_flight_refusal_ends_the_run_failed_with_the_command_lines_message(tiny_model, root, capsys,
                                                                                monkeypatch):
    from dreambooth.cli import main

    project = make_project(root, "empty", tiny_model, photos=0)
    manager = RunManager(root / ".studio")
    run = ended(manager, manager.start(project).id)
    monkeypatch.chdir(project)
    assert main(["train", "--config", str(project / "config.yaml")]) == 2
    said = capsys.readouterr().err.strip()
    assert run.state == "failed" and run.returncode == 2
    assert said.startswith("error: ") and run.message == said.removeprefix("error: ")
    assert "data/instance" in run.message
    with pytest.raises(UserError, match=f"run {run.id} of project {project} has already ended: it failed"):
        manager.stop(run.id)


def test_bad_requests_are_refused_naming_what_to_do(tiny_model, root, tmp_path):
    manager = RunManager(root / ".studio")
    with pytest.raises(UserError, match="has no config.yaml: it is not a project folder"):
        manager.start(tmp_path)
    project = make_project(root, "dog", tiny_model)
    with pytest.raises(UserError, match="extend continues the latest checkpoint in .*and there is none"):
        manager.start(project, "extend", steps=5)
    with pytest.raises(UserError, match="extend needs the number of steps"):
        manager.start(project, "extend")
    with pytest.raises(UserError, match="one of train, resume, extend"):
        manager.start(project, "retrain")
    with pytest.raises(UserError, match="'cpu' or 'cuda:N'"):
        manager.start(project, device="gpu")
    with pytest.raises(UserError, match="there is no run nope"):
        manager.stop("nope")
    assert manager.runs() == []


def test_runs_on_one_device_queue_and_the_queue_survives_the_studio_being_killed(tiny_model, root):
    """A studio process that owns the manager starts two runs (the second queued) and is killed with SIGKILL: the
    first run goes on, and a new manager on the same state folder watches it to its end and starts the second."""
    first = make_project(root, "first", tiny_model, steps=30)
    second = make_project(root, "second", tiny_model, steps=2)
    studio = textwrap.dedent(f"""
        import json, sys, time
        from dreambooth.studio.runs import RunManager
        manager = RunManager({str(root / ".studio")!r})
        a, b = manager.start({str(first)!r}), manager.start({str(second)!r})
        print(json.dumps([a.to_dict(), b.to_dict()]), flush=True)
        while (manager.progress(a.id).step or 0) < 1:
            time.sleep(0.1)
        print("stepping", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", studio], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        a, b = json.loads(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "stepping"
    finally:
        proc.kill()
        proc.wait()
    assert (a["state"], b["state"]) == ("running", "queued") and a["device"] == b["device"] == "cpu"
    assert alive(a["pid"], a["pid_start"]), "the run ended with the studio that started it"

    manager = RunManager(root / ".studio")  # the studio started again
    runs = {r.id: r for r in manager.runs()}
    assert (runs[a["id"]].state, runs[b["id"]].state) == ("running", "queued")
    assert manager.progress(a["id"]).step >= 1
    with pytest.raises(UserError, match=f"already has run {b['id']} \\(train\\) queued"):
        manager.start(second)
    done = ended(manager, a["id"], timeout=120)
    assert done.state == "finished", done.message
    later = ended(manager, b["id"])
    assert later.state == "finished" and later.started_at >= done.ended_at - 1, later.message


def test_a_run_whose_process_vanished_without_an_exit_record_is_lost_and_a_reused_pid_is_not_it(tmp_path):
    state = tmp_path / ".studio"
    state.mkdir()
    me = os.getpid()
    entry = {"id": "r1", "project": str(tmp_path), "kind": "train", "device": "cpu", "argv": [], "output": None,
             "total_steps": 4, "state": "running", "pid": me, "pid_start": 1}  # this pid, another start time
    (state / "queue.json").write_text(json.dumps({"version": 1, "runs": [entry]}))
    run = RunManager(state).get("r1")
    assert run.state == "lost" and "how it ended is unknown; it left no checkpoint" in run.message


def test_outcome_reads_the_trainers_exit():
    stop = "stopped at step 5 as asked: the checkpoint is /p/output/checkpoint-5. Continue where it stopped with `x`."
    assert outcome({"returncode": 0}, ["training: 5/9", stop]) == ("stopped", stop)
    assert outcome({"returncode": 0}, ["done: model in /p/output"]) == ("finished", "done: model in /p/output")
    assert outcome({"returncode": 2}, ["note", "error: two problems:", "  - a", "  - b"]) == (
        "failed", "two problems:\n  - a\n  - b")
    assert outcome({"returncode": -9, "signal": "SIGKILL"}, []) == (
        "failed", "the training process was killed by SIGKILL")


def test_the_runner_forwards_a_stop_once_and_records_the_exit(tmp_path):
    """A trainer stand-in that counts SIGINTs: the runner gets one, the trainer one, and exit.json says how it ended."""
    script = ("import signal, sys, time\nn = []\nsignal.signal(signal.SIGINT, lambda *a: n.append(1))\n"
              "print('ready', flush=True)\nwhile not n: time.sleep(0.05)\ntime.sleep(0.3)\nsys.exit(len(n) + 10)\n")
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth.studio.runner", str(tmp_path), "--", sys.executable,
                             "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signal.SIGINT)  # the whole group the studio started: the trainer is not in it
    assert proc.wait(30) == 11
    record = json.loads((tmp_path / "exit.json").read_text())
    assert record["returncode"] == 11 and record["forwarded"] == ["SIGINT"]


def test_watch_reaps_runs_in_the_background(tiny_model, root):
    """The app's alternative to calling tick itself: a thread that does, until close."""
    project = make_project(root, "dog", tiny_model)
    manager = RunManager(root / ".studio", trainer=[sys.executable, "-c", "print('done: stand-in')"])
    run = manager.start(project)
    manager.watch(interval=0.1)
    try:
        wait_for(lambda: json.loads((root / ".studio" / "queue.json").read_text())["runs"][0]["state"] == "finished",
                 timeout=30, what="the background tick")
    finally:
        manager.close()
    assert manager.get(run.id).message == "done: stand-in"
