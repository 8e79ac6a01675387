"""A busy CPU: `dreambooth demo` alone and beside another process that computes with torch on the same cores, with
OpenMP's threads spinning at barriers (libgomp's default) or sleeping there (PASSIVE, the tool's default since
issue 24), and at a thread count that leaves a core to the other process.

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

CASES = {
    # name: (the demo's environment, the other process: None, its environment, or a second demo's)
    "alone, spinning (libgomp's default)": ({"OMP_WAIT_POLICY": ""}, None),
    "alone, passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "alone, spin count 20000": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "20000"}, None),
    "alone, 1 thread": ({"OMP_NUM_THREADS": "1"}, None),
    "alone, the tool's default": ({}, None),
    "beside busy torch, spinning": ({"OMP_WAIT_POLICY": ""}, {}),
    "beside busy torch, passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, {}),
    "beside busy torch, spin count 20000": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "20000"}, {}),
    "beside busy torch, 1 thread": ({"OMP_NUM_THREADS": "1"}, {}),
    "beside busy torch, the tool's default": ({}, {}),
    "beside a second demo, both spinning": ({"OMP_WAIT_POLICY": ""}, "demo-spinning"),
    "beside a second demo, both the tool's default": ({}, "demo-default"),
}


def environment(changes: dict) -> dict:
    """This process's environment with `changes`; an empty OMP_WAIT_POLICY is libgomp's default (spinning), and the
    tool leaves a set variable alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(changes)
    return env


def other_process(kind, work: Path) -> subprocess.Popen | None:
    if kind is None:
        return None
    if isinstance(kind, dict):
        return subprocess.Popen([sys.executable, "-c", BUSY], env=environment({"OMP_WAIT_POLICY": "", **kind}),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    policy = {"OMP_WAIT_POLICY": ""} if kind == "demo-spinning" else {}  # "demo-default": the tool's own choice
    # a second demo, long enough to outlast the measured one
    return subprocess.Popen([sys.executable, "-m", "dreambooth", "demo", "--out", str(work / "other"), "--steps",
                             "100000"], env=environment(policy), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
            busy = other_process(other, work)
            try:
                if busy is not None:
                    time.sleep(20 if isinstance(other, str) else 3)  # a second demo is past its start-up by then
                seconds = time_demo(environment(demo_env), steps, work, limit)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
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
    alone = next(r["median_s"] for r in results if r["case"].startswith("alone, spinning")) \
        if any(r["case"].startswith("alone, spinning") for r in results) else None
    print(f"\n| case | median s (of {args.repeats}) | vs alone, spinning |\n|---|---|---|")
    for r in results:
        median = r["median_s"]
        shown = f"{median:.1f}" if median is not None else f"over {args.limit:g}"
        ratio = f"{median / alone:.2f}x" if median and alone else "-"
        print(f"| {r['case']} | {shown} | {ratio} |")


if __name__ == "__main__":
    main()
