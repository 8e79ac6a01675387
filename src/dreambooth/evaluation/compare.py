"""`dreambooth compare`: full DreamBooth and LoRA trained on the same data, measured side by side.

Each method trains in its own process (so its peak memory is its own) with identical data, seed, steps and
prior preservation. Reported per method: trainable parameters, median step time after warm-up, peak memory
(CPU RSS of the training process; GPU: torch's max allocated), output size, and two quality measures that
need no reference model:

- subject fit: denoising MSE of the trained model on the subject's photos under the instance prompt, at
  fixed noise and timesteps (lower = the subject is learned better), next to the base model's;
- prior drift: how much the denoising MSE on class images under the class prompt moved from the base
  model's (closer to 0 = the class prior is kept).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from dreambooth.errors import UserError
from dreambooth.evaluation.experiment import save_results
from dreambooth.training.rundir import final_model_size

METHODS = ("full", "lora")


@torch.no_grad()
def denoising_mse(pipe, images: list[Path], prompt: str, resolution: int, seeds=(0, 1),
                  timesteps=(100, 300, 500, 700, 900)) -> float:
    """Mean noise-prediction error over images x seeds x timesteps, with noise fixed by seed."""
    from dreambooth.training.data import prepare_image
    from dreambooth.training.images import load_image
    from dreambooth.training.loss import diffusion_target

    device = pipe.device
    embeds = pipe.encode_prompt(prompt, device, 1, False)[0]
    errors = []
    for path in images:
        pixels = prepare_image(load_image(path), resolution, center_crop=True, flip=False, crop_rng=None)
        dist = pipe.vae.encode(pixels[None].to(device, pipe.vae.dtype)).latent_dist
        latents = dist.mean.float() * pipe.vae.config.scaling_factor
        for seed in seeds:
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(device)
            for t in timesteps:
                tt = torch.tensor([t], device=device)
                noisy = pipe.scheduler.add_noise(latents, noise, tt)
                target = diffusion_target(pipe.scheduler, latents, noise, tt)
                pred = pipe.unet(noisy.to(pipe.unet.dtype), tt, embeds.to(pipe.unet.dtype)).sample.float()
                errors.append(torch.mean((pred - target) ** 2).item())
    return float(sum(errors) / len(errors))


def quality(model: str, lora_dir: Path | None, run_info: dict, cfg) -> dict:
    """Subject fit and prior drift of a trained model (a full output folder, or base + LoRA) against the base."""
    from diffusers import DDPMScheduler

    from dreambooth.formats.lora_loading import load_loras
    from dreambooth.models.loading import load_pipeline, pick_device

    device = pick_device()
    subject = run_info["subjects"][0]
    instance = [Path(p) for p in subject["instance_images"]]
    class_images = sorted(Path(cfg["dataset"]["class_dir"]).glob("class-*.png"))[:8]
    res = cfg["training"]["resolution"]
    scores = {}
    for name, path, loras in (("base", model, []), ("trained", model if lora_dir else run_info["out"],
                                                      [(lora_dir, 1.0)] if lora_dir else [])):
        pipe = load_pipeline(path, device=device, dtype=torch.float32, safety_checker=False)
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        load_loras(pipe, loras)
        scores[name] = {"instance": denoising_mse(pipe, instance, subject["instance_prompt"], res),
                        "class": denoising_mse(pipe, class_images, cfg["dataset"]["class_prompt"], res)}
    return {"subject_mse_base": scores["base"]["instance"], "subject_mse": scores["trained"]["instance"],
            "prior_drift": scores["trained"]["class"] - scores["base"]["class"]}


def measure_child(args_json: str) -> None:
    """Runs in the child process: trains one method, then prints one JSON line of measurements."""
    from dreambooth.config_file import load_config
    from dreambooth.training.loop import train

    spec = json.loads(args_json)
    cfg = load_config(None, spec["overrides"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = train(cfg)
    peak_cpu = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in log[2:]] or [r["step_time_s"] for r in log]
    info = json.loads((out / "run_info.json").read_text())
    info["out"] = str(out)
    method = cfg.model.method
    result = {"method": method, "trainable_parameters": info["trainable_parameters"],
              "s_per_step_median": statistics.median(times), "peak_rss_mb": round(peak_cpu, 1),
              "peak_gpu_mb": peak_gpu, "output_bytes": final_model_size(out),
              **quality(cfg.model.pretrained_model, out if method == "lora" else None, info,
                        cfg.model_dump(mode="json"))}
    print("MEASURED " + json.dumps(result), flush=True)


def run_compare(out: Path, *, model: Path | None, instance_dir: Path | None, steps: int, resolution: int,
                rank: int, learning_rates: dict[str, float]) -> list[dict]:
    """Trains each method in its own process on the same data; writes results.json and table.md under `out`."""
    from dreambooth.models.tiny import build_tiny_model, synthetic_photo
    from dreambooth.training.rundir import claim_work_folder

    claim_work_folder(out, "compare", legacy=("results.json",))
    if model is None:
        model = build_tiny_model(out / "tiny-model", seed=0)
    if instance_dir is None:
        instance_dir = out / "instance"
        instance_dir.mkdir(exist_ok=True)
        for i in range(5):
            synthetic_photo(i).save(instance_dir / f"subject-{i}.png")
    results = []
    for method in METHODS:
        overrides = {
            "model.pretrained_model": str(model), "model.method": method, "token.identifier": "sks",
            "token.class_word": "toy", "dataset.instance_dir": str(instance_dir),
            "dataset.class_dir": str(out / "class"), "dataset.with_prior_preservation": True,
            "dataset.num_class_images": 8, "training.resolution": resolution, "training.max_train_steps": steps,
            "training.learning_rate": learning_rates[method], "training.seed": 0, "lora.rank": rank,
            "output.output_dir": str(out / method), "output.logging_steps": 1, "output.report_to": "none",
            "output.checkpointing_steps": steps + 1, "output.overwrite_output_dir": True,  # compare's own folder
        }
        child = "import sys; from dreambooth.evaluation.compare import measure_child; measure_child(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", child, json.dumps({"overrides": overrides})],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEASURED ")]
        if proc.returncode != 0 or not lines:
            raise UserError(f"the {method} run failed:\n{proc.stderr[-2000:]}")
        results.append(json.loads(lines[-1][len("MEASURED "):]))
    save_results(out, results, format_table(results))
    return results


def compare_command(options) -> list[dict]:
    """`dreambooth compare`: `options` is a command_options.CompareOptions."""
    from dreambooth.models.base import detect_family

    family = detect_family(options.model) if options.model else None
    if family is not None and family.name not in ("sd1", "sd2"):
        # its quality columns are SD's UNet called on one text embedding at fixed DDPM timesteps
        raise UserError(f"`dreambooth compare` measures SD 1.x/2.x models; {options.model} is {family.title}. Train "
                        "each method with dreambooth train (--method full, then --method lora) and score both with "
                        "dreambooth evaluate.")
    return run_compare(options.out, model=options.model, instance_dir=options.instance_dir, steps=options.steps,
                       resolution=options.resolution, rank=options.rank,
                       learning_rates={"full": options.full_lr, "lora": options.lora_lr})


def format_table(results: list[dict]) -> str:
    rows = ["| method | trainable params | s/step (median) | peak RSS MB | peak GPU MB | output size | "
            "subject MSE (base -> trained) | prior drift |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] else "-"
        rows.append(f"| {r['method']} | {r['trainable_parameters']:,} | {r['s_per_step_median']:.3f} | "
                    f"{r['peak_rss_mb']:.0f} | {gpu} | {r['output_bytes'] / 1e6:.2f} MB | "
                    f"{r['subject_mse_base']:.4f} -> {r['subject_mse']:.4f} | {r['prior_drift']:+.4f} |")
    return "\n".join(rows)
