"""`dreambooth bench` (or `python bench/bench.py`): training speed and memory of this tool, and of diffusers'
DreamBooth script beside it (for SDXL, Flux.1 and SD3, that family's script). Developer tooling: it lives in the
repository, not in the installed package. One file of about 750 lines on purpose: a benchmark's numbers are trusted
by reading, in one place, how both programs are set up, started, timed and compared.

Both programs run as subprocesses with the same diffusers-style flag list (Flux.1 and SD3 add their own, FLOW_FLAGS),
the same data (5 instance photos and the same pre-filled class folder, so neither generates class images in the timed
part), the same thread count and OpenMP wait policy. Neither program is changed: a `sitecustomize.py` on the child's
PYTHONPATH registers a global optimizer step hook (timer/sitecustomize.py) that records the clock after every
optimizer step, so both are timed by the same clock with the same definition of a step. Reported per program:

- s/step: median of consecutive step-end differences after `warmup` steps (start-up, model loading and
  saving excluded); samples/s = images per step (instance + class) / s/step. CPU s/step: the same median of the
  process's CPU time, which other work on a shared CPU delays but does not add to.
- peak memory: GPU, torch's max allocated memory up to the last step; CPU, the process's peak RSS up to the
  last step (the final save is excluded from both; the whole-process peak is kept beside it).
- MFU (GPU only): model FLOPs of one training step (VAE encode + UNet or transformer forward and backward, counted
  by FlopCounterMode on the meta device with plain attention, so the same number for both programs) per second,
  over the device's dense bf16 peak.
- wall time of the training process, from launch to exit. With `fresh_class_images` each run starts with an
  empty class folder, so that wall time includes making the class images, each program its own way (this
  tool: 30 denoising steps, batched; diffusers' script: its pipeline's default 50 steps, batches of 4).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.options import option, parse_settings, problems

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
TIMES_ENV = "DREAMBOOTH_BENCH_TIMES"
BUILT_MODELS = ("tiny", "small", "sd15", "flux-tiny", "flux-schnell-tiny", "sd3-tiny")
BUILT_FAMILY = {"tiny": "sd1", "small": "sd1", "sd15": "sd1", "flux-tiny": "flux", "flux-schnell-tiny": "flux",
                "sd3-tiny": "sd3"}
# diffusers' DreamBooth script for each family: the file name's part after train_dreambooth[_lora]
PEER_SUFFIX = {"sd1": "", "sd2": "", "sdxl": "_sdxl", "flux": "_flux", "sd3": "_sd3"}
# The flow families' flags in diffusers' names, given to both programs with the value both default to, so that a
# reader sees them and neither program's default can drift: T5's token length, the timestep density, and (Flux.1 dev
# only, whose transformer embeds it) the guidance the transformer reads in training.
FLOW_FLAGS = {"flux": {"max_sequence_length": 512, "weighting_scheme": "none", "guidance_scale": 3.5},
              "sd3": {"max_sequence_length": 77, "weighting_scheme": "logit_normal"}}
INSTANCE_PROMPT = "a photo of sks toy"
CLASS_PROMPT = "a photo of a toy"
INSTANCE_IMAGES = 5
# Dense bf16 tensor-core peaks from the vendor's spec sheets (half the "with sparsity" figure); the first name
# found in torch.cuda.get_device_name() wins, so the longer names come first.
BF16_DENSE_PEAK = (("H100 PCIe", "h100-pcie", 756e12), ("H200", "h200", 989e12), ("H100", "h100", 989e12),
                   ("A100", "a100", 312e12))
TABLE_START, TABLE_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"

TIMER_DIR = HERE / "timer"  # sitecustomize.py: the step timer each training process runs at start-up


@dataclass(kw_only=True)
class BenchSettings:
    """Measure training speed and memory of `dreambooth train`, optionally beside diffusers' train_dreambooth.py.

    The options of `dreambooth bench` and `python bench/bench.py`.
    """

    model: str = option("tiny", help="tiny, small, sd15, flux-tiny, flux-schnell-tiny or sd3-tiny (random weights, "
                        "built under --out) or a diffusers model folder of SD 1.x/2.x, SDXL, Flux.1 or SD3.")
    method: str = option("full", choices=("full", "lora"), help="Full fine-tuning or LoRA.")
    resolution: int | None = option(None, minimum=8, help="[default: the model's]")
    precision: str | None = option(None, choices=("no", "fp16", "bf16"), help="--mixed_precision of both programs "
                                   "[default: bf16 on a GPU, no on the CPU].")
    steps: int = option(50, minimum=1, help="Optimizer steps per run.")
    warmup: int = option(5, minimum=1, help="Steps left out of the median.")
    num_class_images: int = option(10, minimum=1, help="Class images (prior preservation).")
    rank: int = option(4, minimum=1, help="LoRA rank.")
    repeats: int = option(1, minimum=1, help="Runs per program, in alternating order; figures are their medians.")
    peer: Path | None = option(None, metavar="SCRIPT", help="diffusers' examples/dreambooth/train_dreambooth.py "
                               "(train_dreambooth_lora.py for --method lora; the _sdxl, _flux and _sd3 scripts for "
                               "those families), run with the same flags beside this tool.")
    tv_shim: Path | None = option(None, help="A torchvision stand-in for the peer's process only [default: "
                                  "../shared/peer-tools/tv_shim when torchvision is missing].")
    out: Path = option(Path("runs/bench"), help="Working folder: models, data, runs.")
    results: Path = option(HERE / "results", help="Where the JSON and logs go [default: bench/results of the "
                           "repository].")
    keep_outputs: bool = option(False, help="Keep the trained models (deleted by default).")
    fresh_class_images: bool = option(False, help="Start every run with an empty class folder, so that each program "
                                      "generates its class images inside the timed run [default: both get the same "
                                      "class images, made beforehand].")
    lean_memory: bool = option(False, help="Both programs with --use_8bit_adam --gradient_checkpointing (needs CUDA "
                               "and bitsandbytes).")
    ours_arg: list[str] = option([], metavar="FLAG", help="An extra flag for this tool's run only (repeatable; "
                                 "e.g. --ours-arg=--cuda_graph=off), to measure one of its switches.")
    both_arg: list[str] = option([], metavar="FLAG", help="An extra flag for both programs (repeatable; e.g. "
                                 "--both-arg=--train_text_encoder), a setting both have under the same name.")
    tag: str = option("", help="A suffix for the result's name, telling runs with other --ours-arg or --both-arg "
                      "apart.")
    table: bool = option(False, help="Measure nothing: rewrite the table in --doc from --results/*.json.")
    doc: Path = option(REPOSITORY / "docs" / "bench.md", help="[default: docs/bench.md of the repository]")


def check_settings(s: BenchSettings, cuda: bool) -> None:
    """Every problem with the settings, before anything is built."""
    found = problems(s)  # the declared choices and ranges, for settings made in code
    if s.precision == "fp16" and not cuda:
        found.append("--precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    if s.steps < s.warmup + 2:
        found.append(f"--steps ({s.steps}) must exceed --warmup ({s.warmup}) by 2 or more, so that the median has "
                     "at least two step times")
    if s.lean_memory and not cuda:
        found.append("--lean-memory needs a CUDA GPU: bitsandbytes' 8-bit AdamW runs only there")
    elif s.lean_memory and importlib.util.find_spec("bitsandbytes") is None:
        found.append("--lean-memory needs bitsandbytes for 8-bit AdamW: `pip install bitsandbytes`")
    family = model_family(s.model)
    if family is None:
        found.append(f"--model {s.model!r} is neither one of {', '.join(BUILT_MODELS)} nor a diffusers model folder "
                     "of a family this tool trains (no model_index.json there, or one naming another pipeline)")
    elif s.resolution is not None and s.resolution % side_multiple(family):
        found.append(f"--resolution {s.resolution} must be a multiple of {side_multiple(family)} for a "
                     f"{family_title(family)} model")
    if s.peer is not None:
        family = family or "sd1"
        want = peer_script(family, s.method)
        if not s.peer.is_file():
            found.append(f"--peer {s.peer}: no such file; take examples/dreambooth/ from a diffusers clone")
        elif ("lora" in s.peer.name) != (s.method == "lora") or peer_family(s.peer.name) != PEER_SUFFIX[family]:
            found.append(f"--peer {s.peer.name} does not match --method {s.method} on a {family_title(family)} "
                         f"model; give {want}")
    if found:
        raise UserError("bench settings:\n  " + "\n  ".join(found))


def model_family(model: str) -> str | None:
    """The family name (dreambooth.models.families) of a built size or a model folder; None when unknown."""
    if model in BUILT_FAMILY:
        return BUILT_FAMILY[model]
    from dreambooth.models.families import folder_family

    family = folder_family(model)
    return family and family.name


def family_title(family: str) -> str:
    from dreambooth.models.families import TITLES

    return TITLES.get(family, family)


def side_multiple(family: str) -> int:
    from dreambooth.models.families import FAMILIES

    return FAMILIES[family].side_multiple


def peer_script(family: str, method: str) -> str:
    """The name of diffusers' DreamBooth script for a family and method: train_dreambooth_lora_flux.py, ..."""
    return f"train_dreambooth{'_lora' if method == 'lora' else ''}{PEER_SUFFIX[family]}.py"


def peer_family(script: str) -> str:
    """The family part of a diffusers script's name: "_flux" for train_dreambooth_lora_flux.py, "" for SD 1.x/2.x's
    train_dreambooth[_lora].py."""
    return script.removesuffix(".py").replace("train_dreambooth", "", 1).replace("_lora", "", 1)


def device_info() -> dict:
    """The device both programs train on, its short name for file names, and its dense bf16 peak (GPU only)."""
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "device_key": "cpu", "bf16_peak_flops": None}
    name = torch.cuda.get_device_name()
    for fragment, key, peak in BF16_DENSE_PEAK:
        if fragment.lower() in name.lower():
            return {"device": name, "device_key": key, "bf16_peak_flops": peak}
    key = "".join(c if c.isalnum() else "-" for c in name.lower().replace("nvidia", "")).strip("-")
    return {"device": name, "device_key": key, "bf16_peak_flops": None}


def machine_facts(threads: int) -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cpu_threads_used": threads, "cpu_count": os.cpu_count(), "platform": platform.platform()}


def prepare_model(s: BenchSettings) -> tuple[Path, int]:
    """The model folder and resolution. A built size is cached under the bench folder by size and resolution."""
    if s.model not in BUILT_MODELS:
        model = Path(s.model).resolve()
        return model, s.resolution or default_resolution(model)
    from dreambooth.models.tiny import DEFAULT_RESOLUTION
    from dreambooth.models.tiny_families import build_model
    from dreambooth.models.tiny_flow import DEFAULT_RESOLUTION as FLOW_RESOLUTION

    resolution = s.resolution or {**DEFAULT_RESOLUTION, **FLOW_RESOLUTION}[s.model]
    folder = (s.out / "models" / f"{s.model}-{resolution}px").resolve()
    if not (folder / "model_index.json").is_file():
        t0 = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)
        build_model(folder, size=s.model, resolution=resolution, seed=0)
        print(f"bench: built the {s.model} model in {time.perf_counter() - t0:.1f} s: {folder}")
    return folder, resolution


def default_resolution(model: Path) -> int:
    """The resolution a model folder was made for: a UNet's sample size times the VAE's downscaling; a transformer
    model's (Flux, SD3) VAE sample size, which diffusers' configs of those models set to the native side."""
    vae = json.loads((model / "vae" / "config.json").read_text())
    if not (model / "unet" / "config.json").is_file():
        return int(vae["sample_size"])
    unet = json.loads((model / "unet" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def prepare_data(s: BenchSettings, model: Path, resolution: int, work: Path) -> tuple[Path, Path, Path, float]:
    """Instance photos, class images generated once by this tool, and a copy of them for the peer.

    The copy holds the images only: diffusers' script opens every file of the class folder as an image, and
    ours keeps its manifest there. Returns (instance dir, our class dir, the peer's class dir, seconds spent).
    With `fresh_class_images`, the class folders are in `work`, emptied before every run (see `measure`).
    """
    from dreambooth.models.tiny import synthetic_photo

    data = (s.out / "data").resolve()
    instance = data / f"instance-{resolution}px"
    instance.mkdir(parents=True, exist_ok=True)
    for i in range(INSTANCE_IMAGES):
        if not (instance / f"subject-{i}.png").is_file():
            synthetic_photo(i, size=max(80, resolution)).save(instance / f"subject-{i}.png")
    if s.fresh_class_images:
        return instance, work / "ours-class", work / "peer-class", 0.0
    tag = model.name if model.name.endswith(f"-{resolution}px") else f"{model.name}-{resolution}px"
    class_dir = data / f"class-{tag}"
    t0 = time.perf_counter()
    images = generate_class_images(class_dir, model, resolution, s.num_class_images)
    seconds = time.perf_counter() - t0
    peer_class = data / f"class-{tag}-images-only"
    shutil.rmtree(peer_class, ignore_errors=True)
    peer_class.mkdir()
    for image in images:
        shutil.copy2(image, peer_class / image.name)
    return instance, class_dir, peer_class, seconds


def generate_class_images(class_dir: Path, model: Path, resolution: int, count: int) -> list[Path]:
    """The class images our training would generate: same prompt, model string, seeds, steps and precision.

    Each image has its own seed, so the batch size changes only the speed of this one-off step.
    """
    import torch

    from dreambooth.config import SECTION_TYPES
    from dreambooth.models.base import model_identity
    from dreambooth.models.loading import load_pipeline, pick_device, pick_dtype
    from dreambooth.training.class_images import default_batch_size, ensure_class_images

    device = pick_device()
    # The identity training compares (a hash of the weights): without it, this tool's first run found the images
    # made by another recipe and generated them again inside its timed run.
    images = ensure_class_images(
        class_dir, prompt=CLASS_PROMPT, model=str(model), resolution=resolution, num_images=count, seed=0,
        model_identity=model_identity(model),
        load_pipe=lambda: load_pipeline(model, device=device, dtype=pick_dtype(None, device), safety_checker=False),
        batch_size=default_batch_size(device.type, resolution),
        steps=SECTION_TYPES["dataset"].model_fields["class_inference_steps"].default)
    gc.collect()  # the pipeline sits in reference cycles (see train.prepare_class_images)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return images


def train_flags(s: BenchSettings, model: Path, instance: Path, class_dir: Path, output: Path, resolution: int,
                precision: str, tracker: str = "tensorboard") -> list[str]:
    """diffusers' train_dreambooth.py flags (and its Flux and SD3 scripts' for those families, `family_flags`); this
    tool takes the same list with the same meaning."""
    flags = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance),
             "--instance_prompt", INSTANCE_PROMPT, "--with_prior_preservation", "--class_data_dir", str(class_dir),
             "--class_prompt", CLASS_PROMPT, "--num_class_images", str(s.num_class_images),
             "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps", str(s.steps),
             "--checkpointing_steps", "100000", "--learning_rate", "1e-5", "--seed", "0",
             "--output_dir", str(output), "--mixed_precision", precision,
             # diffusers' script refuses "none" and skips an uninstalled tracker with a warning; this tool refuses an
             # uninstalled tracker, so it gets "none" where TensorBoard is missing: neither program logs to it then.
             "--report_to", tracker]
    lean = ["--use_8bit_adam", "--gradient_checkpointing"] if s.lean_memory else []
    return flags + family_flags(model, s.method) + lean + (["--rank", str(s.rank)] if s.method == "lora" else [])


def family_flags(model: Path, method: str) -> list[str]:
    """The flow families' own flags (FLOW_FLAGS), and for LoRA `--cache_latents`: diffusers' Flux and SD3 LoRA
    scripts encode every image with the VAE at every step unless given it, which this tool never does (it caches
    latents by default and takes the flag as a no-op), so without it the comparison would measure a setting, not the
    programs. Their full fine-tuning scripts have no such flag: they encode at every step."""
    family = model_family(str(model))
    if family not in FLOW_FLAGS:
        return []
    flags = ["--cache_latents"] if method == "lora" else []
    for name, value in FLOW_FLAGS[family].items():
        if name == "guidance_scale" and not guidance_embedded(model):
            continue  # Flux.1 schnell: no guidance embedding; this tool refuses the flag, diffusers' ignores it
        flags += [f"--{name}", str(value)]
    return flags


def guidance_embedded(model: Path) -> bool:
    """Whether a Flux folder's transformer embeds the guidance scale (Flux.1 dev: yes; schnell: no)."""
    config = json.loads((model / "transformer" / "config.json").read_text())
    return bool(config.get("guidance_embeds"))


def tv_shim_path(given: Path | None) -> Path | None:
    """diffusers' script imports torchvision; where it is missing, the stand-in from shared/peer-tools."""
    if given is not None:
        if not given.is_dir():
            raise UserError(f"--tv-shim {given}: no such folder")
        return given.resolve()
    if importlib.util.find_spec("torchvision") is not None:
        return None
    for root in (REPOSITORY.parent, REPOSITORY, Path.cwd().parent, Path.cwd()):
        shim = root / "shared" / "peer-tools" / "tv_shim"
        if shim.is_dir():
            return shim
    raise UserError("diffusers' script imports torchvision, which is not installed; install it, or pass "
                    "--tv-shim FOLDER with a stand-in (shared/peer-tools/tv_shim next to the repository)")


# What diffusers' SDXL, Flux and SD3 scripts take from torchvision beyond the SD scripts' transforms, which the shared
# stand-in has: their random-crop path calls `RandomCrop.get_params` and `transforms.functional.crop`. Added to a copy
# of the stand-in (`peer_tv_shim`), with torchvision's meaning for PIL images; each module's marker says it is there.
TV_SHIM_ADDITIONS = {
    ("transforms", "functional.py"): ("def crop", """

def crop(img, top, left, height, width):
    return img.crop((left, top, left + width, top + height))
"""),
    ("transforms", "__init__.py"): ("get_params", """

def _random_crop_params(img, output_size):
    w, h = img.size
    th, tw = output_size
    if h < th or w < tw:
        raise ValueError(f"Required crop size {(th, tw)} is larger than input image size {(h, w)}")
    if (w, h) == (tw, th):
        return 0, 0, h, w
    i = torch.randint(0, h - th + 1, size=(1,)).item()
    j = torch.randint(0, w - tw + 1, size=(1,)).item()
    return i, j, th, tw


RandomCrop.get_params = staticmethod(_random_crop_params)
"""),
}


def peer_tv_shim(shim: Path | None, folder: Path) -> Path | None:
    """A copy of the torchvision stand-in in `folder`, with what TV_SHIM_ADDITIONS adds where it is missing."""
    if shim is None:
        return None
    copy = folder / "tv_shim"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(shim, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for parts, (marker, code) in TV_SHIM_ADDITIONS.items():
        module = copy.joinpath("torchvision", *parts)
        if module.is_file() and marker not in module.read_text():
            module.write_text(module.read_text() + code)
    return copy


def child_env(timer_dir: Path, times: Path, threads: int, extra_path: list[Path]) -> dict[str, str]:
    """The same environment for both programs, except for extra PYTHONPATH entries (the peer's shim).

    OpenMP's wait policy is set for both (PASSIVE, unless this process's environment says otherwise): this tool
    picks passive waiting itself where nobody set it (training.speed.cpu_threading), diffusers' script keeps
    libgomp's spinning threads, and on a CPU shared with other work spinning threads wait for the scheduler at
    every parallel region (docs/bench.md, "A busy CPU"): the programs would be measured under different settings.
    """
    env = dict(os.environ)
    paths = [str(p) for p in extra_path] + [str(timer_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update({"PYTHONPATH": os.pathsep.join(paths), TIMES_ENV: str(times), "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"})
    if "GOMP_SPINCOUNT" not in env:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def machine_busy_s() -> float | None:
    """CPU seconds all processes of the machine have used since boot (Linux /proc/stat); None elsewhere."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(cmd: list[str], env: dict, log: Path, times: Path, label: str) -> dict:
    """Runs one training process; returns its timer record with its wall time, or raises with its log's tail.

    Also returns the share of the machine's CPU time that other processes used meanwhile (steal time included:
    in a VM, the host ran other VMs on our cores): a run with a large share was disturbed and is worth repeating.
    """
    times.unlink(missing_ok=True)
    busy0, own0, t0 = machine_busy_s(), children_cpu_s(), time.perf_counter()
    with log.open("a", encoding="utf-8") as f:
        f.write(f"### {label}: {subprocess.list2cmdline(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    busy1, own1 = machine_busy_s(), children_cpu_s()
    others = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))
    if proc.returncode != 0 or not times.is_file():
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        why = f"exit status {proc.returncode}" if proc.returncode else "no optimizer step was recorded"
        raise UserError(f"bench: the {label} run failed ({why}); log {log}:\n{tail}")
    record = json.loads(times.read_text())
    record.update(wall_s=wall, other_cpu_share=others)
    if others is not None and others > 0.1:
        print(f"bench: warning: other processes (or, in a VM, other VMs: steal time) used {others:.0%} of the CPUs "
              f"during the {label} run; its timings may be disturbed (run again, or with --repeats 3)")
    return record


def figures(record: dict, warmup: int, samples_per_step: int, flops: float | None, peak: float | None) -> dict:
    """s/step, throughput, memory and MFU of one run from its timer record."""
    t = record["times"]
    steps = [b - a for a, b in zip(t[warmup - 1:], t[warmup:])]
    s = statistics.median(steps)
    q1, _, q3 = statistics.quantiles(steps, n=4) if len(steps) > 1 else (s, s, s)
    # CPU seconds of the process per step (all its threads; OpenMP threads wait passively, see child_env): the work
    # a step took, which other processes on a shared CPU delay but do not add to, unlike the clock.
    cpu = record.get("cpu_times") or []
    cpu_s = statistics.median(b - a for a, b in zip(cpu[warmup - 1:], cpu[warmup:])) if len(cpu) > warmup else None
    gpu = bool(record["cuda_allocated"])
    peak_mem = (record["cuda_allocated"][-1] / 2**20) if gpu else record["rss_kb"][-1] / 1024
    whole = (record.get("cuda_allocated_exit", 0) / 2**20) if gpu else record["rss_kb_exit"] / 1024
    return {"s_per_step_median": s, "s_per_step_q1": q1, "s_per_step_q3": q3, "cpu_s_per_step_median": cpu_s,
            "samples_per_s": samples_per_step / s, "peak_mem_mb": round(peak_mem, 1),
            "peak_mem_kind": "cuda max allocated" if gpu else "peak RSS", "peak_mem_whole_run_mb": round(whole, 1),
            "tflops_per_s": flops / s / 1e12 if flops else None,
            "mfu": flops / s / peak if flops and peak and gpu else None,
            "wall_s": round(record["wall_s"], 2), "timed_steps": len(t),
            "other_cpu_share": record["other_cpu_share"]}


def median_of_runs(runs: list[dict]) -> dict:
    """Each number is the median over the repeats; the rest is taken from the first."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        numbers = [r[key] for r in runs if isinstance(r[key], (int, float)) and not isinstance(r[key], bool)]
        if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(numbers)
    return out


def step_flops(model: Path, method: str, resolution: int, rank: int, batch: int = 2) -> float | None:
    """Model FLOPs of one training step: VAE encode and UNet forward + backward of `batch` images.

    Counted on the meta device (no memory, no compute): attention runs as plain matmuls there, so the count is
    the textbook one, without any kernel's recomputation, and the same for both programs. The text encoder
    (cached by this tool, re-run by diffusers' script; under 1% of the UNet's cost) is left out.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    if model_family(str(model)) in FLOW_FLAGS:
        return flow_step_flops(model, method, resolution, rank, batch)
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model, subfolder="unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model, subfolder="vae"))
            vae.requires_grad_(False)
            if method == "lora":
                from peft import LoraConfig

                unet.requires_grad_(False)
                unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            pixels = torch.randn(batch, 3, resolution, resolution)
            context = torch.randn(batch, 77, unet.config.cross_attention_dim)
            with FlopCounterMode(display=False) as counter:
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample()
                pred = unet(latents, torch.zeros(batch, dtype=torch.long), context).sample
                pred.float().pow(2).mean().backward()
        return float(counter.get_total_flops())
    except Exception as e:  # a model this counter cannot trace on meta still gets its timings
        print(f"bench: could not count FLOPs ({type(e).__name__}: {e}); MFU left out")
        return None


def flow_step_flops(model: Path, method: str, resolution: int, rank: int, batch: int = 2) -> float | None:
    """`step_flops` of a Flux or SD3 model: VAE encode and the transformer's forward and backward of `batch` images
    with T5's prompt at the length both programs are given (FLOW_FLAGS; SD3 puts CLIP's 77 tokens before it)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from dreambooth.models.families import FAMILIES

    family = model_family(str(model))
    seq = FLOW_FLAGS[family]["max_sequence_length"]
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    try:
        with torch.device("meta"):
            transformer = cls.from_config(cls.load_config(model, subfolder="transformer"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model, subfolder="vae"))
            vae.requires_grad_(False)
            if method == "lora":
                from peft import LoraConfig

                transformer.requires_grad_(False)
                transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                   target_modules=list(FAMILIES[family].denoiser_lora_targets)))
            c = transformer.config
            pixels = torch.randn(batch, 3, resolution, resolution)
            side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)  # the latent side
            t = torch.full((batch,), 0.5)
            with FlopCounterMode(display=False) as counter:
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample()
                if family == "flux":
                    tokens = (side // 2) ** 2  # 2x2 latent patches, packed
                    pred = transformer(
                        hidden_states=torch.randn(batch, tokens, c.in_channels), timestep=t,
                        guidance=t if c.guidance_embeds else None,
                        pooled_projections=torch.randn(batch, c.pooled_projection_dim),
                        encoder_hidden_states=torch.randn(batch, seq, c.joint_attention_dim),
                        txt_ids=torch.zeros(seq, 3), img_ids=torch.zeros(tokens, 3), return_dict=False)[0]
                else:
                    pred = transformer(
                        hidden_states=latents, timestep=t * 1000,
                        encoder_hidden_states=torch.randn(batch, 77 + seq, c.joint_attention_dim),
                        pooled_projections=torch.randn(batch, c.pooled_projection_dim), return_dict=False)[0]
                pred.float().pow(2).mean().backward()
        return float(counter.get_total_flops())
    except Exception as e:  # a model this counter cannot trace on meta still gets its timings
        print(f"bench: could not count FLOPs ({type(e).__name__}: {e}); MFU left out")
        return None


def commands(s: BenchSettings, model: Path, data: tuple[Path, Path, Path], work: Path, resolution: int,
             precision: str, cuda: bool, threads: int) -> dict[str, list[str]]:
    """Both command lines: the same flags, except each program's class folder and output folder."""
    instance, class_dir, peer_class = data
    from accelerate.utils import is_tensorboard_available

    ours = train_flags(s, model, instance, class_dir, work / "ours", resolution, precision,
                       "tensorboard" if is_tensorboard_available() else "none")
    out = {"ours": [sys.executable, "-m", "dreambooth", "train", *ours, "--method", s.method, *s.both_arg,
                    *s.ours_arg]}
    if s.peer:
        peer = train_flags(s, model, instance, peer_class, work / "peer", resolution, precision)
        launch = [sys.executable, "-m", "accelerate.commands.launch", *([] if cuda else ["--cpu"]),
                  "--num_processes", "1", "--num_machines", "1", "--num_cpu_threads_per_process", str(threads),
                  "--mixed_precision", precision, "--dynamo_backend", "no"]
        out["peer"] = [*launch, str(s.peer.resolve()), *peer, *s.both_arg]
    return out


def measure(s: BenchSettings, cmds: dict[str, list[str]], envs: dict[str, dict], logs: dict[str, Path], work: Path,
            flops: float | None, peak: float | None) -> dict[str, list[dict]]:
    """Runs each program `s.repeats` times, alternating which goes first so that drift hits both alike."""
    runs: dict[str, list[dict]] = {who: [] for who in cmds}
    for log in logs.values():
        log.write_text("")
    for r in range(s.repeats):
        for who in list(cmds) if r % 2 == 0 else list(cmds)[::-1]:
            shutil.rmtree(work / who, ignore_errors=True)
            shutil.rmtree(work / f"{who}-class", ignore_errors=True)  # with fresh_class_images
            times = Path(envs[who][TIMES_ENV])
            record = run_timed(cmds[who], envs[who], logs[who], times, f"{who} repeat {r + 1}")
            runs[who].append(figures(record, s.warmup, 2, flops, peak))
            if not s.keep_outputs:
                shutil.rmtree(work / who, ignore_errors=True)
            f = runs[who][-1]
            cpu = f" ({f['cpu_s_per_step_median']:.4f} CPU s)" if f["cpu_s_per_step_median"] is not None else ""
            print(f"bench: {who} repeat {r + 1}: {f['s_per_step_median']:.4f} s/step{cpu}, {f['peak_mem_mb']:.0f} MB, "
                  f"{f['wall_s']:.1f} s")
    return runs


def run_bench(s: BenchSettings) -> dict:
    """Measures this tool (and the peer script when given); writes the JSON and logs under `s.results`."""
    import torch

    started = time.perf_counter()
    dev = device_info()
    cuda = dev["device"] != "cpu"
    check_settings(s, cuda)
    shim = peer_tv_shim(tv_shim_path(s.tv_shim), s.out.resolve()) if s.peer else None
    precision = s.precision or ("bf16" if cuda else "no")
    name = s.model if s.model in BUILT_MODELS else Path(s.model).name
    model, resolution = prepare_model(s)
    tags = ("-lean" if s.lean_memory else "") + ("-fresh" if s.fresh_class_images else "") + \
        (f"-{s.tag}" if s.tag else "")
    stem = f"{dev['device_key']}-{name}-{s.method}-{resolution}-{precision}{tags}"
    work = (s.out / "runs" / stem).resolve()
    *data, class_s = prepare_data(s, model, resolution, work)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    flops = step_flops(model, s.method, resolution, s.rank)
    cmds = commands(s, model, tuple(data), work, resolution, precision, cuda, threads)
    envs = {who: child_env(TIMER_DIR, work / f"{who}-times.json", threads,
                           [shim] if who == "peer" and shim else []) for who in cmds}
    s.results.mkdir(parents=True, exist_ok=True)
    runs = measure(s, cmds, envs, {who: s.results / f"{stem}.{who}.log" for who in cmds}, work, flops,
                   dev["bf16_peak_flops"])
    ours = median_of_runs(runs["ours"])
    peer = median_of_runs(runs["peer"]) if s.peer else None
    result = {
        "device": dev["device"], "device_key": dev["device_key"], "torch": torch.__version__, "model": name,
        "family": model_family(str(model)), "method": s.method, "resolution": resolution, "precision": precision,
        "steps": s.steps, **ours,
        "peer": peer and {"script": s.peer.name, "script_sha256": sha256(s.peer), "tv_shim": shim and str(shim),
                          **peer},
        "speedup": peer and peer["s_per_step_median"] / ours["s_per_step_median"],
        "cpu_time_ratio": peer and ours["cpu_s_per_step_median"] and peer["cpu_s_per_step_median"]
        and peer["cpu_s_per_step_median"] / ours["cpu_s_per_step_median"],
        "memory_ratio": peer and ours["peak_mem_mb"] / peer["peak_mem_mb"],
        "warmup": s.warmup, "repeats": s.repeats, "samples_per_step": 2, "num_class_images": s.num_class_images,
        "rank": s.rank if s.method == "lora" else None, "flops_per_step": flops,
        "bf16_peak_flops": dev["bf16_peak_flops"], "class_images_s": round(class_s, 2),
        "class_images_in_run": s.fresh_class_images, "lean_memory": s.lean_memory, "tag": s.tag,
        "ours_args": s.ours_arg, "both_args": s.both_arg,
        "openmp": {k: envs["ours"].get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "bench_wall_s": round(time.perf_counter() - started, 2),
        "runs": runs,
        "commands": cmds,
        "machine": machine_facts(threads), "versions": versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings_record(s),
    }
    path = s.results / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "commands", "versions")}, indent=2))
    print(f"bench: wrote {path}")
    return result


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict:
    from dreambooth.versions import library_versions

    return library_versions()


def settings_record(s: BenchSettings) -> dict:
    """The settings of a measuring run, as JSON (--table and --doc say not to measure, so they are left out)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items() if k not in ("table", "doc")}


def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def format_table(results: list[dict]) -> str:
    """A markdown table, one row per result, this tool's figures beside diffusers' script's."""
    rows = ["| device | family | model | method | px | precision | steps | s/step ours | s/step diffusers | speedup | "
            "peak MB ours | peak MB diffusers | memory ours/diffusers | class images | run s ours | run s diffusers | "
            "run ours/diffusers | MFU ours | MFU diffusers |", "|" + "---|" * 19]
    size = {m: i for i, m in enumerate(BUILT_MODELS)}
    order = {f: i for i, f in enumerate(PEER_SUFFIX)}
    for r in sorted(results, key=lambda r: (r["device"], order.get(result_family(r), len(order)),
                                            size.get(r["model"], len(size)), r["model"], r["resolution"],
                                            r["method"], r["precision"], r.get("lean_memory", False),
                                            r.get("class_images_in_run", False))):
        p = r.get("peer") or {}
        method = f"LoRA r{r['rank']}" if r["method"] == "lora" and r.get("rank") else r["method"]
        method += ", 8-bit AdamW + checkpointing" if r.get("lean_memory") else ""
        method += f" ({' '.join(r['ours_args'])})" if r.get("ours_args") else ""
        method += f" (both: {' '.join(r['both_args'])})" if r.get("both_args") else ""
        made = "in the run" if r.get("class_images_in_run") else "beforehand"
        run_ratio = p.get("wall_s") and r["wall_s"] / p["wall_s"]
        rows.append(
            f"| {r['device']} | {family_title(result_family(r))} | {r['model']} | {method} | {r['resolution']} | "
            f"{r['precision']} | {r['steps']} | "
            f"{r['s_per_step_median']:.3f} | {_num(p.get('s_per_step_median'), '.3f')} | "
            f"{_num(r.get('speedup'), '.2f')}x | {r['peak_mem_mb']:.0f} | {_num(p.get('peak_mem_mb'), '.0f')} | "
            f"{_num(r.get('memory_ratio'), '.2f')} | {made} | {r['wall_s']:.1f} | {_num(p.get('wall_s'), '.1f')} | "
            f"{_num(run_ratio, '.2f')} | "
            f"{_num(r.get('mfu'), '.1%')} | {_num(p.get('mfu'), '.1%')} |")
    return "\n".join(rows).replace("| -x |", "| - |")


def result_family(r: dict) -> str:
    """A result's family; results from before families were recorded are SD 1.x's, or SDXL's by their model name."""
    return r.get("family") or BUILT_FAMILY.get(r["model"]) or ("sdxl" if "sdxl" in r["model"] else "sd1")


def read_results(results_dir: Path) -> list[dict]:
    """The `bench` results in a folder; other JSON files there (bench/cpu_convolutions.py's) are left out."""
    results = [json.loads(f.read_text()) for f in sorted(Path(results_dir).glob("*.json"))]
    results = [r for r in results if isinstance(r, dict) and {"device", "s_per_step_median"} <= r.keys()]
    if not results:
        raise UserError(f"no results in {results_dir}; run `dreambooth bench` first")
    return results


def write_table(doc: Path, results_dir: Path) -> str:
    """Replaces the table between the bench-table markers of `doc` (appending it when absent); returns it."""
    table = format_table(read_results(results_dir))
    block = f"{TABLE_START}\n{table}\n{TABLE_END}"
    text = doc.read_text() if doc.is_file() else "# Benchmark\n"
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return table


def bench_command(s: BenchSettings) -> dict | None:
    """`dreambooth bench`: measure, or with --table only rewrite the table of --doc."""
    if s.table:
        print(write_table(s.doc, s.results))
        return None
    return run_bench(s)


if __name__ == "__main__":
    try:
        bench_command(parse_settings(BenchSettings, sys.argv[1:], prog="python bench/bench.py"))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
