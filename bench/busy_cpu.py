"""A busy CPU: `dreambooth demo` alone and beside other processes that compute with torch on the same cores, as the
tool ran before issue 24 (libgomp's defaults: OpenMP threads that spin at barriers, one per core) and now
(training.speed.cpu_threading: threads that sleep at barriers, one core left free).

    python bench/busy_cpu.py --out bench/results/cpu-busy [--steps 300] [--repeats 2] [--limit 900]

Each case is one `dreambooth demo --steps N` in a fresh folder, timed from start to exit (class images, training,
drawing the measures), `--repeats` times; the other process, when there is one, starts first and runs until the
demo ends. A case that runs past `--limit` seconds is stopped and reported as "over LIMIT s". Writes
OUT/results.json and prints a table of medians. Run it on an otherwise idle machine: it measures contention.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Another torch process: small convolutions forward and backward in a loop, as a training step or a service's draw
# does, on torch's default threads and libgomp's default wait policy unless the case says otherwise.
BUSY = """
import torch
x = torch.randn(4, 64, 32, 32)
conv = torch.nn.Conv2d(64, 64, 3, padding=1)
while True:
    conv(x).square().mean().backward()
"""

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# How the tool ran before issue 24: libgomp's defaults (an empty OMP_WAIT_POLICY is read as unset, and the tool leaves
# a set variable alone), on every core.
BEFORE = {"OMP_WAIT_POLICY": "", "OMP_NUM_THREADS": str(CORES)}
CASES = {
    # name: (the demo's environment, what runs beside it: None, a busy torch loop's environment (a list: several),
    # or a second demo: "demo-before" / "demo-now")
    "alone, before": (BEFORE, None),
    "alone, now": ({}, None),
    "beside a busy torch process, before": (BEFORE, {}),
    "beside a busy torch process, now": ({}, {}),
    "beside two busy torch processes, before": (BEFORE, [{}, {}]),
    "beside two busy torch processes, now": ({}, [{}, {}]),
    "beside a second demo, both before": (BEFORE, "demo-before"),
    "beside a second demo, both now": ({}, "demo-now"),
}


def environment(changes: dict) -> dict:
    """This process's environment with `changes`; an empty OMP_WAIT_POLICY is libgomp's default (spinning), and the
    tool leaves a set variable alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(changes)
    return env


def other_processes(kind, work: Path) -> list[subprocess.Popen]:
    """The processes a case runs beside the demo: busy torch loops (an environment each), or a second demo."""
    if kind is None:
        return []
    if isinstance(kind, (dict, list)):
        return [subprocess.Popen([sys.executable, "-c", BUSY], env=environment({**BEFORE, **each}),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for each in (kind if isinstance(kind, list) else [kind])]
    policy = BEFORE if kind == "demo-before" else {}  # "demo-now": the tool's own choice
    # a second demo, long enough to outlast the measured one
    log = (work / "other.log").open("w")
    return [subprocess.Popen([sys.executable, "-m", "dreambooth", "demo", "--out", str(work / "other"), "--steps",
                              "100000"], env=environment(policy), stdout=log, stderr=log)]


def time_demo(env: dict, steps: int, work: Path, limit: float) -> float | None:
    out = work / "demo"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "dreambooth", "demo", "--out", str(out), "--steps", str(steps)],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=limit)
    except subprocess.TimeoutExpired:
        return None
    return round(time.perf_counter() - start, 1)


def run_case(name: str, steps: int, repeats: int, limit: float) -> dict:
    demo_env, other = CASES[name]
    times = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for _ in range(repeats):
            busy = other_processes(other, work)
            try:
                if busy:
                    time.sleep(20 if isinstance(other, str) else 3)  # a second demo is past its start-up by then
                seconds = time_demo(environment(demo_env), steps, work, limit)
            finally:
                ended = [" ".join(str(a) for a in p.args[1:4]) for p in busy if p.poll() is not None]
                for process in busy:
                    process.kill()
                    process.wait()
            if ended:  # it would have measured the demo alone
                raise SystemExit(f"{name}: what ran beside the demo ended before it did ({', '.join(ended)})")
            times.append(seconds)
            print(f"{name}: {seconds if seconds is not None else f'over {limit:g}'} s", flush=True)
            if seconds is None:
                break  # another try would be over the limit too
    done = [t for t in times if t is not None]
    return {"case": name, "seconds": times, "median_s": statistics.median(done) if len(done) == len(times) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--limit", type=float, default=900.0)
    parser.add_argument("--case", action="append", choices=list(CASES), help="Only these cases (repeatable).")
    args = parser.parse_args()
    results = [run_case(name, args.steps, args.repeats, args.limit) for name in args.case or CASES]
    import torch

    record = {"steps": args.steps, "repeats": args.repeats, "limit_s": args.limit, "cpus": os.cpu_count(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()
              or platform.machine(), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    alone = next((r["median_s"] for r in results if r["case"] == "alone, before"), None)
    print(f"\n| case | median s (of {args.repeats}) | vs alone, before |\n|---|---|---|")
    for r in results:
        median = r["median_s"]
        shown = f"{median:.1f}" if median is not None else f"over {args.limit:g}"
        ratio = f"{median / alone:.2f}x" if median and alone else "-"
        print(f"| {r['case']} | {shown} | {ratio} |")


if __name__ == "__main__":
    main()
