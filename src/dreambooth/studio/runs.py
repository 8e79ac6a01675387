"""The studio's runs: training as separate processes, one at a time per device, the others queued; no HTTP.

A run is `python -m dreambooth train --config PROJECT/config.yaml` (with `--resume_from_checkpoint latest` and
`--max_train_steps N` to resume or extend it), or `python -m dreambooth evaluate --checkpoints all` of the project's
run folder (studio.evaluating), run in the project folder by `studio.runner` in a session of its
own: the browser closing or the studio restarting never ends it, and the runner records how it ended
(RUN_DIR/exit.json). Everything the studio knows about its runs lives under its state folder, so a studio killed
and started again finds them as they were:

    STATE/queue.json          every run, queued, running or ended (written whole, atomically, under STATE/queue.lock)
    STATE/runs/ID/output.log  the run's stdout and stderr, as the command line would show them
    STATE/runs/ID/exit.json   its exit status, written by the runner when the trainer ends

`RunManager` is the whole interface: `start`, `stop`, `runs`, `get`, `progress`, `events` / `follow`, and `tick`,
which the app calls every second or so (or `watch` does) to reap ended runs and start the next queued one. Every
refusal is a `UserError` naming the run or project and what to do; a run whose pre-flight fails ends 'failed' with
the pre-flight's message exactly as `dreambooth train` prints it.

Torch-free: the studio imports it at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dreambooth.errors import NotFound, UserError
from dreambooth.formats.atomic import write_json_atomic
from dreambooth.studio.runner import EXIT_FILE, TRAINER_FILE, process_start_time
from dreambooth.training.report import PROGRESS_FILE, REPORT_DIR, read_json, read_log
from dreambooth.training.rundir import list_checkpoints

KINDS = ("train", "resume", "extend")  # what `start` trains; `evaluate` queues the fourth kind, 'evaluate'
WAITING, RUNNING = "queued", "running"
ENDED = ("finished", "failed", "stopped", "lost", "cancelled")
LOG_FILE = "output.log"
DEVICE = re.compile(r"^(cpu|cuda:\d+)$")
# tqdm's bar in the log, "training:  50%|#####     | 3/6 [...]": the step and the run's total steps
BAR = re.compile(r"training:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
STOPPED_LINE = re.compile(r"^stopped at step (\d+) as asked: the checkpoint is (.+?)\.(?: Continue|$)")


@dataclass
class Run:
    """One run as the queue holds it: what was asked, where it runs, and how it stands."""

    id: str
    project: str  # the project folder, absolute
    kind: str  # train, resume, extend or evaluate
    device: str  # 'cpu' or 'cuda:N': one run at a time on each
    argv: list[str]  # the command it runs, in the project folder
    output: str | None  # the run folder its config names (None where config.yaml cannot be read); an evaluation's
    # folder, PROJECT/evaluations/ID, for an evaluation
    total_steps: int | None  # what it trains to, as far as known before it starts (the log's bar says later)
    state: str = WAITING  # queued, running, then finished, failed, stopped, lost or cancelled
    steps: int | None = None  # as asked: max_train_steps for train and resume, the steps added for extend
    queued_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    pid: int | None = None  # the runner's
    pid_start: int | None = None  # its start time (/proc/PID/stat), so a reused pid is not taken for it
    stopping: bool = False  # a stop was sent; the trainer saves a checkpoint and ends
    returncode: int | None = None
    message: str | None = None  # how it ended, in the trainer's words (the pre-flight's refusal, the stop, ...)
    checkpoint: str | None = None  # the checkpoint it left, to resume from
    log_start: int = 0  # the size of the run folder's train_log.jsonl when it started: its records come after

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Progress:
    """What a run's folder and log say now: for the page's progress bar, sample and log panes."""

    run: str
    state: str
    step: int | None
    total_steps: int | None
    loss: float | None
    eta_s: float | None  # remaining steps at the rate of the recent ones
    sample: str | None  # the newest validation grid
    checkpoint: str | None  # the newest complete checkpoint
    log_tail: list[str] = field(default_factory=list)
    message: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- processes


def alive(pid: int | None, start: int | None) -> bool:
    """Whether the process `pid` that started at `start` still runs (a zombie has ended; another process that was
    given the same pid later has another start time)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0] not in ("Z", "X") and (start is None or int(fields[19]) == start)


def log_lines(path: Path, limit_bytes: int = 65536) -> list[str]:
    """The last lines of a log, as a terminal shows them."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [drawn(line) for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def drawn(line: str) -> str:
    """A line as a terminal shows it: a progress bar redrawn with carriage returns is its last drawing."""
    parts = [part for part in line.split("\r") if part.strip()]
    return parts[-1].rstrip() if parts else ""


def read_log_from(path: Path, offset: int) -> tuple[int, list[str], str | None]:
    """(offset after the last whole line, the whole lines from `offset`, the line still being drawn or None)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset, [], None
    whole, newline, rest = data.rpartition(b"\n")
    lines = [drawn(line) for line in whole.decode("utf-8", errors="replace").split("\n")] if newline else []
    partial = drawn(rest.decode("utf-8", errors="replace")) or None
    return offset + len(whole) + len(newline), lines, partial


def outcome(exit: dict, lines: list[str], kind: str = "train") -> tuple[str, str | None]:
    """(state, message) of an ended run from its exit status and its log's last lines.

    `dreambooth train` exits 0 when done and when a stop it was asked for saved its checkpoint, 2 with 'error: ' and
    the refusal (pre-flight's, the run folder's, a resume's) on its last lines, 130 when a second Ctrl-C aborted.
    `dreambooth evaluate` exits 0 with 'best: ' naming the checkpoint it picked, 130 on the first Ctrl-C."""
    code = exit.get("returncode")
    if code == 0:
        stop = next((line for line in reversed(lines) if STOPPED_LINE.match(line)), None)
        if stop is not None:
            return "stopped", stop
        done = next((line for line in reversed(lines) if line.startswith(("done: ", "best: "))), None)
        return "finished", done
    if code == 130 and kind == "evaluate":
        return "stopped", "stopped before every checkpoint was scored; the scores so far are in its folder"
    if code == 2:
        first = max((i for i, line in enumerate(lines) if line.startswith("error: ")), default=None)
        if first is not None:
            return "failed", "\n".join([lines[first][len("error: "):], *lines[first + 1:]])
    if code == 130:
        return "stopped", "aborted by a second stop before its checkpoint was saved"
    if exit.get("signal"):
        return "failed", f"the training process was killed by {exit['signal']}"
    return "failed", "\n".join(lines[-30:]) or f"the training process exited with status {code}"


# ---------------------------------------------------------------------------------------------- projects


def project_output(project: Path) -> tuple[Path | None, Path, int | None]:
    """(run folder, logging folder name, max_train_steps) as the project's config.yaml names them; paths in the
    file are relative to its folder, as `dreambooth train` reads them (config_file). A config that cannot be read
    gives what the trainer would default to; the trainer says what is wrong with it when the run starts."""
    try:
        data = yaml.safe_load((project / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None, Path("logs"), None
    output = data.get("output") if isinstance(data.get("output"), dict) else {}
    training = data.get("training") if isinstance(data.get("training"), dict) else {}
    out = project / str(output.get("output_dir") or "output")
    steps = training.get("max_train_steps")
    return out, Path(str(output.get("logging_dir") or "logs")), steps if isinstance(steps, int) else None


def train_log(run: Run) -> Path | None:
    _, logging_dir, _ = project_output(Path(run.project))
    return Path(run.output) / logging_dir / "train_log.jsonl" if run.output else None


def records_since(path: Path | None, offset: int) -> list[dict]:
    """The JSON-lines log's records written from byte `offset` on (this run's, in a log earlier runs of the folder
    began); from the start if the file is shorter (a run that replaced the folder began a new log)."""
    if path is None or not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(offset if f.seek(0, os.SEEK_END) >= offset else 0)
        text = f.read().decode("utf-8", errors="replace")
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            record = json.loads(line)
            record["step"] = int(record["step"])
            records.append(record)
    return records


def latest_checkpoint(out: Path | None):
    """The newest complete checkpoint in a run folder (rundir.CheckpointInfo), or None."""
    found = list_checkpoints(out) if out is not None else []
    return found[-1] if found else None


def newest_sample(out: Path) -> Path | None:
    samples = sorted((out / "samples").glob("step-*.png")) if (out / "samples").is_dir() else []
    return samples[-1] if samples else None


def reached_step(out: Path, logging_dir: Path) -> int | None:
    """The step a run folder has got to: its final model's, its last logged step or its newest checkpoint's."""
    progress = read_json(out / REPORT_DIR / PROGRESS_FILE) or {}
    log = read_log(out / logging_dir / "train_log.jsonl")
    latest = latest_checkpoint(out)
    found = [s for s in (progress.get("final_step"), log[-1]["step"] if log else None, latest and latest.step)
             if isinstance(s, int)]
    return max(found) if found else None


# ---------------------------------------------------------------------------------------------- the manager


class RunManager:
    """The studio's runs under `state` (usually PROJECTS_ROOT/.studio), shared by every studio process and thread
    that opens the same folder: each call reads queue.json under the lock, changes it and writes it back whole.

    Built on a folder that a killed studio left, it watches the runs still going, marks those that ended while no
    studio watched (by their exit.json: finished, failed with the trainer's message, stopped with their checkpoint;
    'lost' without one), and starts what is queued when its device is free.

    `trainer` is the command line before `train` (this Python's `-m dreambooth` unless a test gives another),
    `default_device` the device of a run started without one, `env` what the runs' environment adds to this
    process's (each run sees only its own GPU, through CUDA_VISIBLE_DEVICES), and `clip` and `dino` the scorer
    folders evaluations pass as `evaluate --clip/--dino` (None: the command's own search of the hub cache).
    """

    def __init__(self, state: Path, *, default_device: str = "cpu", trainer: list[str] | None = None,
                 env: dict[str, str] | None = None, clip: Path | None = None, dino: Path | None = None) -> None:
        self.state = Path(state)
        self.clip, self.dino = clip, dino
        self.default_device = check_device(default_device)
        self.trainer = trainer or [sys.executable, "-m", "dreambooth"]
        self.env = env
        self.state.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._children: dict[int, subprocess.Popen] = {}  # runners this object started: reaped, not left zombies
        self._watcher: threading.Thread | None = None
        self._closing = threading.Event()
        self.tick()

    # -- the queue file

    @property
    def queue_file(self) -> Path:
        return self.state / "queue.json"

    def run_dir(self, run_id: str) -> Path:
        return self.state / "runs" / run_id

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads and other studio processes, one at a time (a thread lock, then flock)."""
        with self._thread_lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with open(self.state / "queue.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> list[Run]:
        data = read_json(self.queue_file)
        if data is None:
            if self.queue_file.exists():
                raise UserError(f"the studio's run queue {self.queue_file} cannot be read; nothing was changed. Move "
                                "it aside to start with an empty queue (the runs' folders and outputs are kept).")
            return []
        names = {f.name for f in dataclasses.fields(Run)}
        return [Run(**{k: v for k, v in entry.items() if k in names}) for entry in data.get("runs", [])]

    def _save(self, runs: list[Run]) -> None:
        write_json_atomic(self.queue_file, {"version": 1, "runs": [r.to_dict() for r in runs]})

    # -- asking

    def runs(self) -> list[Run]:
        """Every run, oldest first, as it stands now."""
        with self._locked():
            self.tick()
            return self._load()

    def get(self, run_id: str) -> Run:
        with self._locked():
            self.tick()
            return self._find(self._load(), run_id)

    def _find(self, runs: list[Run], run_id: str) -> Run:
        for run in runs:
            if run.id == run_id:
                return run
        known = ", ".join(r.id for r in runs[-5:]) or "none yet"
        raise NotFound(f"there is no run {run_id} in the studio's queue ({self.queue_file}); its latest runs: "
                        f"{known}.")

    # -- starting and stopping

    def start(self, project: Path | str, kind: str = "train", steps: int | None = None,
              device: str | None = None, check: Callable[[dict[str, Any]], None] | None = None) -> Run:
        """Queues a run of the project folder and starts it if its device is free.

        kind 'train' runs the config as it is, 'resume' continues from the latest checkpoint, 'extend' continues from
        it up to `steps` more steps than the run folder has reached (its final model's step; steps after the latest
        checkpoint are trained again); `steps` for train and resume is max_train_steps. The trainer's own checks
        (pre-flight, the run folder, the checkpoint) run in the process: a refusal ends the run 'failed' with its
        message. `check`, given the config overrides the run's arguments make, runs that pre-flight first
        (studio.projects.Project.check_run), so that a run it would refuse is refused here, nothing queued."""
        project = Path(project).resolve()
        device = check_device(device or self.default_device)
        if kind not in KINDS:
            raise UserError(f"project {project}: a run is one of {', '.join(KINDS)}, not {kind!r}.")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise UserError(f"project {project}: steps must be a whole number of at least 1, not {steps!r}.")
        if kind == "extend" and steps is None:
            raise UserError(f"project {project}: extend needs the number of steps to add.")
        config = project / "config.yaml"
        if not config.is_file():
            raise UserError(f"project {project} has no config.yaml: it is not a project folder. Create one with "
                            "`dreambooth init` (or the studio's new project), or open the folder that holds it.")
        out, logging_dir, config_steps = project_output(project)
        argv = [*self.trainer, "train", "--config", str(config)]
        total = steps if steps is not None else config_steps
        if kind in ("resume", "extend"):
            argv += ["--resume_from_checkpoint", "latest"]
        if kind == "extend":
            reached = reached_step(out, logging_dir) if latest_checkpoint(out) is not None else None
            if reached is None:
                raise UserError(f"project {project}: extend continues the latest checkpoint in {out}, and there is "
                                "none. Train the project first, or resume it if it stopped before its first "
                                "checkpoint.")
            total = reached + steps
        if total is not None and (steps is not None or kind == "extend"):
            argv += ["--max_train_steps", str(total)]
        if check is not None:  # the flags above, as config keys; a busy project first, as _queue refuses it
            with self._locked():
                refuse_if_busy(self._load(), str(project))
            check({**({"output.resume_from_checkpoint": "latest"} if kind in ("resume", "extend") else {}),
                   **({"training.max_train_steps": total} if "--max_train_steps" in argv else {})})
        return self._queue(Run(id=new_run_id(), project=str(project), kind=kind, device=device, argv=argv,
                               output=str(out) if out else None, total_steps=total, steps=steps))

    def evaluate(self, project: Path | str, *, prompts: list[str] | None = None, num_images: int | None = None,
                 steps: int | None = None, seeds: list[int] | None = None, device: str | None = None) -> Run:
        """Queues `dreambooth evaluate --checkpoints all` of the project's run folder (studio.evaluating) into
        PROJECT/evaluations/ID, as a run of kind 'evaluate': the same queue, one run at a time per device and per
        project. Missing scorers are refused here with the command's message; the rest it checks when it starts."""
        from dreambooth.studio.evaluating import EVALUATIONS, evaluate_argv

        project = Path(project).resolve()
        device = check_device(device or self.default_device)
        if not (project / "config.yaml").is_file():
            raise UserError(f"project {project} has no config.yaml: it is not a project folder, and evaluate scores "
                            "the run its config.yaml names.")
        run_id = new_run_id()
        out = project / EVALUATIONS / run_id
        argv = [*self.trainer, *evaluate_argv(project, out, clip=self.clip, dino=self.dino, prompts=prompts,
                                              num_images=num_images, steps=steps, seeds=seeds)]
        return self._queue(Run(id=run_id, project=str(project), kind="evaluate", device=device, argv=argv,
                               output=str(out), total_steps=None))

    def _queue(self, run: Run) -> Run:
        """Adds `run` to the queue, one run of a project at a time, and starts it if its device is free."""
        with self._locked():
            runs = self._load()
            refuse_if_busy(runs, run.project)
            run.queued_at = time.time()
            self._save([*runs, run])
            self.tick()
            return self._find(self._load(), run.id)

    def stop(self, run_id: str) -> Run:
        """A running run saves a checkpoint and ends, as on Ctrl-C (the trainer's stop); a queued one leaves the
        queue. An ended run is refused, saying how it ended and where its output is."""
        with self._locked():
            self.tick()
            runs = self._load()
            run = self._find(runs, run_id)
            if run.ended:
                raise UserError(ended_refusal(run))
            if run.state == WAITING:
                run.state, run.ended_at, run.message = "cancelled", time.time(), "taken off the queue before it started"
            elif run.stopping:
                raise UserError(f"run {run.id} of project {run.project} is already stopping: it saves a checkpoint "
                                "after the step it is on, then ends.")
            else:
                self._signal(run, signal.SIGINT)
                run.stopping = True
            self._save(runs)
            return run

    def _signal(self, run: Run, signum: int) -> None:
        """To the runner, which passes it to the trainer once; to the trainer itself if the runner is gone."""
        trainer = read_json(self.run_dir(run.id) / TRAINER_FILE) or {}
        for pid, start in ((run.pid, run.pid_start), (trainer.get("pid"), trainer.get("start"))):
            if alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
                    return

    # -- the loop the app drives

    def tick(self) -> list[Run]:
        """Marks ended runs by their exit.json and starts the first queued run of each free device; returns the runs
        whose state changed. Cheap: the app may call it every second."""
        with self._locked():
            runs = self._load()
            changed = [run for run in runs if run.state == RUNNING and self._reap(run)]
            busy = {run.device for run in runs if run.state == RUNNING}
            for run in runs:
                if run.state == WAITING and run.device not in busy:
                    self._launch(run)
                    busy.add(run.device)
                    changed.append(run)
            if changed:
                self._save(runs)
            return changed

    def _running(self, run: Run) -> bool:
        child = self._children.get(run.pid or 0)
        if child is not None and child.poll() is not None:  # reaped, so that it does not linger as a zombie
            del self._children[run.pid]
        elif alive(run.pid, run.pid_start):
            return True
        trainer = read_json(self.run_dir(run.id) / TRAINER_FILE) or {}
        return alive(trainer.get("pid"), trainer.get("start"))  # the runner was killed, the trainer goes on

    def _reap(self, run: Run) -> bool:
        """Whether `run` has ended; if so, it is marked as its exit.json says."""
        if self._running(run):
            return False
        exit = read_json(self.run_dir(run.id) / EXIT_FILE)
        out = Path(run.output) if run.output and run.kind != "evaluate" else None  # an evaluation saves no checkpoint
        latest = latest_checkpoint(out)
        if exit is None:
            run.state, run.ended_at = "lost", time.time()
            left = f"its latest checkpoint is {latest.path}: resume the project to continue" if latest else \
                "it left no checkpoint"
            run.message = (f"the run's process ended while no runner watched it (the machine restarted, or it was "
                           f"killed), so how it ended is unknown; {left}. Its log is "
                           f"{self.run_dir(run.id) / LOG_FILE}.")
        else:
            run.state, run.message = outcome(exit, log_lines(self.run_dir(run.id) / LOG_FILE), run.kind)
            run.returncode, run.ended_at = exit.get("returncode"), exit.get("ended") or time.time()
        said = STOPPED_LINE.match(run.message or "")
        run.checkpoint = said.group(2) if said else (str(latest.path) if latest else None)
        return True

    def _launch(self, run: Run) -> None:
        folder = self.run_dir(run.id)
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        # the run sees its one device as the only one; an empty list keeps a CPU run off every GPU
        env["CUDA_VISIBLE_DEVICES"] = run.device.split(":")[1] if run.device.startswith("cuda:") else ""
        command = [sys.executable, "-m", "dreambooth.studio.runner", str(folder), "--", *run.argv]
        log = train_log(run)
        run.log_start = log.stat().st_size if log is not None and log.is_file() else 0
        try:
            with (folder / LOG_FILE).open("ab") as log:
                child = subprocess.Popen(command, cwd=run.project, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            run.state, run.ended_at = "failed", time.time()
            run.message = f"the run could not be started in {run.project}: {e}"
            return
        self._children[child.pid] = child
        run.state, run.started_at, run.pid = RUNNING, time.time(), child.pid
        run.pid_start = process_start_time(child.pid)

    def watch(self, interval: float = 1.0) -> threading.Thread:
        """A daemon thread that calls `tick` every `interval` seconds until `close`; for an app with no loop of its
        own to drive it."""
        if self._watcher is None or not self._watcher.is_alive():
            def loop() -> None:
                while not self._closing.wait(interval):
                    with contextlib.suppress(UserError):
                        self.tick()

            self._closing.clear()
            self._watcher = threading.Thread(target=loop, name="studio-runs", daemon=True)
            self._watcher.start()
        return self._watcher

    def close(self) -> None:
        """Stops the `watch` thread. The runs go on: they are not this object's to end."""
        self._closing.set()
        if self._watcher is not None:
            self._watcher.join()

    # -- progress

    def progress(self, run_id: str) -> Progress:
        """Step, total, loss, ETA, newest sample and checkpoint, and the end of the log, read from the run's folder
        and its log now."""
        return self._progress(self.get(run_id))

    def _progress(self, run: Run) -> Progress:
        lines = log_lines(self.run_dir(run.id) / LOG_FILE)
        out = Path(run.output) if run.output else None
        records = records_since(train_log(run), run.log_start) if run.started_at else []
        bars = [BAR.findall(line) for line in lines]
        bar = next((found[-1] for found in reversed(bars) if found), None)
        step = records[-1]["step"] if records else None
        total = run.total_steps
        if bar is not None:  # the trainer's own count: finer than a log written every N steps, and its total
            step, total = max(step or 0, int(bar[0])), int(bar[1])
        times = [r["step_time_s"] for r in records[-20:] if isinstance(r.get("step_time_s"), (int, float))]
        eta = None
        if run.state == RUNNING and times and step is not None and total is not None:
            eta = max(0, total - step) * sum(times) / len(times)
        sample = newest_sample(out) if out is not None and run.started_at else None
        latest = latest_checkpoint(out) if run.started_at else None
        return Progress(run=run.id, state=run.state, step=step, total_steps=total,
                        loss=records[-1].get("loss") if records else None, eta_s=eta,
                        sample=str(sample) if sample else None, checkpoint=str(latest.path) if latest else None,
                        log_tail=lines[-40:], message=run.message)

    def events(self, run_id: str, cursor: dict | None = None) -> tuple[list[dict], dict]:
        """What changed since `cursor` (None: everything so far), and the cursor to pass next time.

        Each event is a dict with a `kind`: 'step' (step, total_steps, loss, eta_s), 'sample' (path), 'checkpoint'
        (path), 'log' (lines: the new whole lines; partial: the line being drawn, a progress bar, or None) and, last,
        'state' (state, stopping, message, checkpoint). The cursor is plain JSON, so a server-sent event's id can
        carry it."""
        seen = dict(cursor or {})
        run = self.get(run_id)
        now = self._progress(run)
        events = []
        if now.step is not None and (now.step, now.loss) != (seen.get("step"), seen.get("loss")):
            events.append({"kind": "step", "step": now.step, "total_steps": now.total_steps, "loss": now.loss,
                           "eta_s": now.eta_s})
        if now.sample and now.sample != seen.get("sample"):
            events.append({"kind": "sample", "path": now.sample})
        if now.checkpoint and now.checkpoint != seen.get("checkpoint"):
            events.append({"kind": "checkpoint", "path": now.checkpoint})
        offset, lines, partial = read_log_from(self.run_dir(run.id) / LOG_FILE, seen.get("log_offset", 0))
        if lines or partial != seen.get("log_partial"):
            events.append({"kind": "log", "lines": lines, "partial": partial})
        if (run.state, run.stopping) != (seen.get("state"), seen.get("stopping")):  # last: the page's final word
            events.append({"kind": "state", "state": run.state, "stopping": run.stopping, "message": run.message,
                           "checkpoint": run.checkpoint})
        return events, {"state": run.state, "stopping": run.stopping, "step": now.step, "loss": now.loss,
                        "sample": now.sample, "checkpoint": now.checkpoint, "log_offset": offset,
                        "log_partial": partial}

    async def follow(self, run_id: str, interval: float = 1.0) -> AsyncIterator[dict]:
        """`events` as they happen, until the run has ended and its last events are out: for a server-sent event
        stream (`async for event in manager.follow(id)`)."""
        cursor = None
        while True:
            events, cursor = await asyncio.to_thread(self.events, run_id, cursor)
            for event in events:
                yield event
            if cursor["state"] in ENDED:
                return
            await asyncio.sleep(interval)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def check_device(device: str) -> str:
    if not isinstance(device, str) or not DEVICE.match(device):
        raise UserError(f"device {device!r}: a run's device is 'cpu' or 'cuda:N' (N the GPU's index).")
    return device


def refuse_if_busy(runs: list[Run], project: str) -> None:
    """One run of a project at a time: a UserError naming the run that has not ended."""
    busy = next((r for r in runs if r.project == project and not r.ended), None)
    if busy is not None:
        raise UserError(f"project {project} already has run {busy.id} ({busy.kind}) {busy.state}"
                        f"{' on ' + busy.device if busy.state == RUNNING else ''}; one run of a project at a "
                        f"time. Wait for it to end, or stop it first.")


def ended_refusal(run: Run) -> str:
    """Why a stop of an ended run is refused, with where its output is."""
    out = run.output or f"{run.project}'s output folder"
    said = {
        "finished": f"it finished; its {'scores' if run.kind == 'evaluate' else 'model, samples and checkpoints'} are "
                    f"in {out}",
        "stopped": f"it was stopped; its checkpoint is {run.checkpoint or 'in ' + out}; resume it to continue",
        "failed": f"it failed ({(run.message or 'see its log').splitlines()[0]}); nothing is running to stop",
        "lost": f"its process ended while no studio watched it; what it saved is in {out}",
        "cancelled": "it was taken off the queue before it started",
    }[run.state]
    return f"run {run.id} of project {run.project} has already ended: {said}."
