"""The small process that owns one studio run: `python -m dreambooth.studio.runner RUN_DIR -- ARGV...`.

The studio starts this in a session of its own; it runs ARGV (the `dreambooth train` command) as its child and
outlives the studio, so that closing the browser or restarting the studio never ends a run, and how the run ended
is still known afterwards: when the child exits, RUN_DIR/exit.json says with what status. The child's pid and
start time go to RUN_DIR/trainer.json, so a studio can still watch the trainer if this process itself is killed.

The trainer runs in a process group of its own, and a SIGINT or SIGTERM sent to this process is passed to it once.
Were the trainer in this process's group, a signal to the group would reach it twice, and a second Ctrl-C aborts
training without the checkpoint the first one asked for (training.checkpoint.StopRequest).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dreambooth.formats.atomic import write_json_atomic

EXIT_FILE = "exit.json"
TRAINER_FILE = "trainer.json"


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22); None where it cannot be read.
    With the pid, it names one process: a pid reused by a later process has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name in parentheses may hold spaces
    return int(fields[19])


def run(run_dir: Path, argv: list[str]) -> int:
    """Runs `argv` to its end, forwarding stop signals; writes exit.json; returns the child's exit status."""
    forwarded: list[str] = []
    pending: list[int] = []  # asked before there was a child to pass it to
    child: subprocess.Popen | None = None

    def forward(signum, frame) -> None:
        forwarded.append(signal.Signals(signum).name)
        if child is None:
            pending.append(signum)
            return
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM):  # before the child starts: a stop sent at once is not lost
        signal.signal(sig, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal is no reason to end a run
    started = subprocess.Popen(argv, stdin=subprocess.DEVNULL, process_group=0)
    child = started
    for signum in pending:
        child.send_signal(signum)
    write_json_atomic(run_dir / TRAINER_FILE, {"pid": child.pid, "start": process_start_time(child.pid)})
    code = child.wait()
    ended = {"returncode": code, "signal": signal.Signals(-code).name if code < 0 else None,
             "forwarded": forwarded, "ended": time.time()}
    write_json_atomic(run_dir / EXIT_FILE, ended)
    return code if code >= 0 else 128 - code


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m dreambooth.studio.runner RUN_DIR -- COMMAND...", file=sys.stderr)
        return 2
    return run(Path(args[0]), args[2:])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main(sys.argv[1:]))
