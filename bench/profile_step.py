"""A profile of one training step of `dreambooth train`: where the step's time goes, operator by operator.

Runs the bench's job (same model, data and flags as `dreambooth bench`) in this process under torch.profiler,
which records exactly one optimizer step: the profiler's schedule advances on torch's global optimizer-step
hook, so the recorded window runs from the end of step `--step` - 1 to the end of step `--step` (data,
forward, backward, clipping, optimizer). Writes the operator table (sorted by GPU time on a GPU, CPU time
otherwise) as text and a Chrome trace (open it in https://ui.perfetto.dev).

    python bench/profile_step.py --model sd15 --method full --out bench/results/profile-sd15-full
    python bench/profile_step.py --model small --method lora -- --gradient_checkpointing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import BUILT_MODELS, BenchSettings, check_settings, device_info, prepare_data, prepare_model, train_flags


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", help="a size bench builds (tiny, small, sd15, flux-tiny, sd3-tiny, ...) "
                   "or a diffusers model folder [small]")
    p.add_argument("--method", default="full", choices=["full", "lora"])
    p.add_argument("--precision", choices=["no", "fp16", "bf16"], help="[bf16 on a GPU, no on the CPU]")
    p.add_argument("--step", type=int, default=10, help="The step recorded (at least 2); earlier ones warm up [10].")
    p.add_argument("--rows", type=int, default=40, help="Operators in the table [40].")
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="Models and data, as bench's --out.")
    p.add_argument("--out", type=Path, help="Folder for the table and trace [bench/results/profile-MODEL-METHOD].")
    args, extra = p.parse_known_args()
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return args, extra


def main() -> int:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from dreambooth.cli import main as dreambooth

    args, extra = parse_args()
    if args.step < 2:
        print("profile_step: --step must be at least 2", file=sys.stderr)
        return 2
    dev = device_info()
    cuda = dev["device"] != "cpu"
    precision = args.precision or ("bf16" if cuda else "no")
    s = BenchSettings(model=args.model, method=args.method, precision=precision, steps=args.step + 2,
                      warmup=1, out=args.work)
    check_settings(s, cuda)
    model, resolution = prepare_model(s)
    name = args.model if args.model in BUILT_MODELS else model.name
    out = args.out or Path("bench/results") / f"profile-{dev['device_key']}-{name}-{args.method}-{precision}"
    out.mkdir(parents=True, exist_ok=True)
    run_dir = (args.work / "runs" / f"profile-{name}-{args.method}").resolve()
    instance, class_dir, _, _ = prepare_data(s, model, resolution, run_dir)
    # No tracker in a profile; a rerun replaces the previous profile's run folder.
    flags = train_flags(s, model, instance, class_dir, run_dir / "out", resolution, precision, tracker="none")
    flags.append("--overwrite_output_dir")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # Profiler periods end at each optimizer step: period k runs from the end of step k to the end of step k + 1.
    prof = profile(activities=activities, schedule=schedule(wait=args.step - 2, warmup=1, active=1, repeat=1),
                   record_shapes=True)
    ends = []

    def on_step(optimizer, *_):
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        prof.step()

    hook = register_optimizer_step_post_hook(on_step)
    prof.start()
    try:
        code = dreambooth(["train", *flags, "--method", args.method, *extra])
    finally:
        prof.stop()
        hook.remove()
    if code:
        return code
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60)
    step_s = ends[args.step - 1] - ends[args.step - 2]
    events = prof.key_averages()
    summary = {"device": dev["device"], "model": name, "method": args.method, "resolution": resolution,
               "precision": precision, "step": args.step, "extra_flags": extra, "step_s": round(step_s, 4),
               "cpu_self_s": round(sum(e.self_cpu_time_total for e in events) / 1e6, 4),
               "gpu_self_s": round(sum(e.self_device_time_total for e in events) / 1e6, 4) if cuda else None,
               "optimizer_steps_recorded": sum(e.count for e in events if e.key.startswith("Optimizer.step#")),
               "torch": torch.__version__}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "operators.txt").write_text(f"{json.dumps(summary)}\n\n{table}\n")
    prof.export_chrome_trace(str(out / "trace.json"))
    print(table)
    print(json.dumps(summary, indent=2))
    print(f"profile: wrote {out}/operators.txt, summary.json and trace.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
