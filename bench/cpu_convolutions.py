"""oneDNN's against PyTorch's native CPU convolutions, for one fp32 training step of a UNet.

The measurement behind `training.cpu_convolution=auto` (`cpu_convolution` in dreambooth/training/speed.py).
Each case runs in its own process, the two kernel choices alternating, `--repeats` times: UNet forward, MSE
loss, backward and a fused AdamW step on random latents, median step time after the warm-up steps. Models:
`small` and `tiny` as built by `dreambooth bench` (built here when missing) and the built-in world model.

    python bench/cpu_convolutions.py --out bench/results/cpu-convolutions.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# (model, images per step, latent side, steps timed): 2 images = 1 instance + 1 class image
CASES = [("small", 2, 16, 20), ("small", 8, 16, 10), ("small", 2, 32, 10), ("small", 4, 32, 6),
         ("small", 2, 64, 4), ("world", 2, 16, 20), ("world", 8, 16, 20), ("tiny", 2, 16, 20)]
WARMUP = 3

CHILD = """
import statistics, sys, time, torch
from diffusers import UNet2DConditionModel
kernels, path, images, side, steps, warmup = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
torch.backends.mkldnn.enabled = kernels == "onednn"
torch.manual_seed(0)
unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").train()
optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
c = unet.config
x = torch.randn(images, c.in_channels, side, side)
text = torch.randn(images, 77, c.cross_attention_dim)
t = torch.randint(0, 1000, (images,))
times = []
for i in range(warmup + steps):
    t0 = time.perf_counter()
    torch.nn.functional.mse_loss(unet(x, t, text).sample, x).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
print(statistics.median(times[warmup:]))
"""


def model_path(name: str) -> Path:
    """The world model, or `tiny`/`small` from `dreambooth bench`'s model folder (built there when missing)."""
    if name == "world":
        from dreambooth.evaluation.world_model import builtin_model_path

        return builtin_model_path()
    from bench import BenchSettings, prepare_model

    return prepare_model(BenchSettings(model=name))[0]


def measure(kernels: str, path: Path, images: int, side: int, steps: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    args = [sys.executable, "-c", CHILD, kernels, str(path), str(images), str(side), str(steps), str(WARMUP)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu-convolutions.json"))
    parser.add_argument("--only", nargs="*", metavar="MODEL:IMAGES:SIDE", help="e.g. small:2:16 (default: all)")
    a = parser.parse_args()
    import torch

    rows = []
    for model, images, side, steps in CASES:
        if a.only and f"{model}:{images}:{side}" not in a.only:
            continue
        path = model_path(model)
        runs: dict[str, list[float]] = {"onednn": [], "native": []}
        for r in range(a.repeats):
            for kernels in (("onednn", "native") if r % 2 == 0 else ("native", "onednn")):
                runs[kernels].append(measure(kernels, path, images, side, steps, a.threads))
        row = {"model": model, "images": images, "latent_side": side, "latent_pixels": images * side * side,
               "steps_timed": steps, "s_per_step_onednn": statistics.median(runs["onednn"]),
               "s_per_step_native": statistics.median(runs["native"]), "runs": runs}
        row["native_speedup"] = row["s_per_step_onednn"] / row["s_per_step_native"]
        rows.append(row)
        print(f"{model:6} {images} x {side}x{side} ({row['latent_pixels']:5} latent px): oneDNN "
              f"{row['s_per_step_onednn']:.4f} s, native {row['s_per_step_native']:.4f} s, native "
              f"{row['native_speedup']:.2f}x", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
                                 "threads": a.threads, "warmup": WARMUP, "repeats": a.repeats, "cases": rows},
                                indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
