"""Shared fixtures and helpers: one tiny model per session, synthetic subject photos, the settings of short runs,
and `probe`, which watches a real training run from the inside."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth.training.speed import cpu_threading

# Before torch loads (libgomp reads its environment then): the tool's own CPU threading (threads that sleep at
# barriers, one core left free), so that the servers and training processes the tests start share the cores. Under
# pytest-xdist (`pytest -n auto`, the README's command) each worker takes its share of the cores instead: on the
# 2-core machines one thread each, as one process has alone (one fewer than the cores).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpu_threading(cores=max(2, _cores // _workers + 1))
else:
    cpu_threading()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

# OMP_NUM_THREADS, the tool's choice unless set: .ci/run runs the suite a second time at another thread count on the
# plainest kernels (ATEN_CPU_CAPABILITY=default), so that a bound that holds only for this machine's summation
# order fails there.
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def assert_same_picture(a, b) -> None:
    """Two 8-bit pictures of one computation run in another order (another batch size, thread count or CPU's vector
    width, each of which changes the order of float32 sums): rounding moves a value by about 1e-6 of its range, which
    changes its 8-bit level only where it lies that close to the edge between two levels. So: one level at most, at
    under 1% of the values (2 of 12,288 seen); another seed or prompt changes nearly all of them by many levels."""
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"{(diff > 0).sum()} values differ, by up to {diff.max()}"


def rounding_bound(pipe, *, steps: int, guidance: float) -> float:
    """How far two 0..1 pictures of `pipe` may differ when the same maths runs in another order (another CPU's vector
    width or thread count, a LoRA folded into its weights or kept beside them, one converter's multiplication order
    against another's), from the size of the computation rather than from one machine's result.

    A float32 sum of n terms in another order moves by about sqrt(n) * eps of its size (rounding errors add like a
    random walk; Higham, Accuracy and Stability of Numerical Algorithms, ch. 3-4). A network of L such layers, its
    widest reducing over n, moves its output by about sqrt(L * n) * eps, each layer's error adding in quadrature.
    The UNet and text encoders run at every sampler step, and classifier-free guidance scales a difference in the
    noise prediction by up to 2g - 1; the VAE decodes once. Four times that, to stay clear of the tail: for the tiny
    SD model at 2 steps and guidance 7.5 about 2e-3 of the pixel range, where a LoRA changes a picture by 0.02-0.1.
    """
    import math

    def spread(model) -> float:
        layers, widest = 0, 1
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                layers, widest = layers + 1, max(widest, m.in_features)
            elif isinstance(m, torch.nn.Conv2d):
                taps = m.kernel_size[0] * m.kernel_size[1]
                layers, widest = layers + 1, max(widest, m.in_channels * taps // m.groups)
        return math.sqrt(layers * widest) * torch.finfo(torch.float32).eps

    encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
                if e is not None]
    per_step = math.sqrt(spread(pipe.unet) ** 2 + sum(spread(e) ** 2 for e in encoders))
    amplified = max(1.0, 2 * guidance - 1) * math.sqrt(steps) * per_step
    return 4 * (amplified + spread(pipe.vae.decoder))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from dreambooth.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory):
    from dreambooth.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_v") / "model", prediction_type="v_prediction", seed=1)


def draw_subject(i: int, size: int = 72) -> Image.Image:
    image = Image.new("RGB", (size, size), (30 + 40 * i, 120, 200 - 30 * i))
    draw = ImageDraw.Draw(image)
    draw.rectangle([8 + 4 * i, 10, 40 + 4 * i, 50 - 2 * i], fill=(220, 30, 30))
    draw.ellipse([40 - 3 * i, 30, 66 - 3 * i, 60], fill=(250, 220, 40))
    return image


SHAPED_SIZES = [(96, 64), (64, 96), (80, 80), (120, 64)]  # landscape, portrait, square, wide


def shaped_folder(folder: Path) -> Path:
    """Photos of noise in the SHAPED_SIZES, other shapes than square (aspect buckets), in a new folder."""
    folder.mkdir()
    for i, (w, h) in enumerate(SHAPED_SIZES):
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / f"photo-{i}.png")
    return folder


def photo_folder(folder: Path, count: int, size: int = 72) -> Path:
    """`count` photos of the synthetic subject in a new folder."""
    folder.mkdir()
    for i in range(count):
        draw_subject(i, size=size).save(folder / f"photo-{i}.png")
    return folder


@pytest.fixture
def instance_dir(tmp_path):
    return photo_folder(tmp_path / "instance", 4)


@pytest.fixture(scope="session")
def class_dir_cache(tmp_path_factory):
    """Class images generated once per session; tests copy the folder (manifest included) to reuse them."""
    return tmp_path_factory.mktemp("class_cache") / "class"


@pytest.fixture
def class_dir(tmp_path, class_dir_cache):
    folder = tmp_path / "class"
    if class_dir_cache.exists():
        shutil.copytree(class_dir_cache, folder)
    return folder


def remember_class_dir(folder, cache):
    if not cache.exists():
        shutil.copytree(folder, cache)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if training gets as far as loading weights (or setting up a run at all)."""
    from dreambooth.training import components
    from dreambooth.training import loop as train_module

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(components, "load_models", refuse)
    monkeypatch.setattr(train_module, "load_models", refuse)
    monkeypatch.setattr(train_module, "setup", refuse)


UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def base_overrides(model, instance_dir, class_dir, out, **extra):
    """Dotted config values of a short prior-preservation run on `model` (4 class images, 64 px), plus `extra`."""
    values = {
        "model.pretrained_model": str(model), "dataset.instance_dir": str(instance_dir),
        "dataset.class_dir": str(class_dir), "dataset.instance_prompt": "a photo of sks dog",
        "dataset.class_prompt": "a photo of dog", "dataset.with_prior_preservation": True,
        "dataset.num_class_images": 4, "dataset.class_inference_steps": 2, "training.resolution": 64,
        "training.learning_rate": 1e-3, "training.seed": 7, "output.output_dir": str(out),
        "output.checkpointing_steps": 3, "output.logging_steps": 1, "output.report_to": "none",
    }
    values.update(extra)
    return values


def unet_after_two_steps(tiny_model, instance_dir, out, **training):
    """UNet weights after 2 steps of a plain run with the given `training.*` settings."""
    from safetensors.torch import load_file

    from dreambooth.config_file import load_config
    from dreambooth.training.loop import train

    values = {
        "model.pretrained_model": str(tiny_model), "dataset.instance_dir": str(instance_dir),
        "dataset.instance_prompt": "a photo of sks dog", "training.resolution": 64, "training.max_train_steps": 2,
        "training.learning_rate": 1e-3, "training.seed": 0, "output.output_dir": str(out), "output.report_to": "none"}
    train(load_config(None, {**values, **{f"training.{k}": v for k, v in training.items()}}))
    return load_file(str(out / UNET_FILE))


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A random 2-layer CLIPModel (32 px, patch 8) with the tiny CLIP tokenizer and a CLIP image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dreambooth.models.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("clip") / "clip"
    tokenizer = build_tokenizer(folder)
    tokenizer.save_pretrained(folder)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dino_dir(tmp_path_factory):
    """A random 2-layer ViTModel (32 px, patch 8, hidden 32), as DINO ViT-S/16 is saved, with its processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("dino") / "dino"
    torch.manual_seed(1)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def real_dir(tmp_path):
    """Three photos of the subject, as `evaluate --real` reads them."""
    return photo_folder(tmp_path / "real", 3, size=48)


# ---------------------------------------------------------------------------------------------------------------
# Watching a training run from the inside


@dataclass
class Probe:
    """What one training run did: each training_step call, each optimizer update, the models before step 1."""

    out: Path
    run: object = None
    calls: list[dict] = field(default_factory=list)
    updates: list[dict] = field(default_factory=list)
    before: dict = field(default_factory=dict)
    count_saved: bool = False

    @property
    def log(self) -> list[dict]:
        path = self.out / self.run.cfg.output.logging_dir / "train_log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def groups(self) -> list[dict]:
        inner = getattr(self.run.optimizer, "optimizer", self.run.optimizer)
        return inner.param_groups

    def group_of(self, param: torch.nn.Parameter) -> dict:
        return next(g for g in self.groups() if any(p is param for p in g["params"]))

    def trainable(self, module: str) -> dict[str, torch.nn.Parameter]:
        m = getattr(self.run.models, module)
        return {n: p for n, p in m.named_parameters() if p.requires_grad}

    def changed(self, module: str) -> set[str]:
        """Parameter names of `module` whose values differ from before the first step."""
        now = dict(getattr(self.run.models, module).named_parameters())
        return {n for n, v in self.before[module].items() if not torch.equal(v, now[n].detach())}


def snapshot(run) -> dict:
    """Every parameter of the denoiser and the text encoders, by component name, before the first step."""
    return {name: {n: p.detach().clone() for n, p in module.named_parameters()}
            for name, module in run.models.modules().items() if name != "vae"}


def watch(probe: Probe, mp: pytest.MonkeyPatch) -> None:
    from dreambooth.training import loop as train_module

    real_loop, real_step = train_module.loop, train_module.training_step

    def loop(run, start, stop):
        probe.run, probe.before = run, snapshot(run)

        def autocast_dtype(module, args):
            if "autocast" not in probe.before:
                on = torch.is_autocast_enabled(run.accelerator.device.type)
                probe.before["autocast"] = torch.get_autocast_dtype(run.accelerator.device.type) if on else None

        # a layer inside the denoiser's forward (accelerate wraps forward itself in autocast)
        denoiser = run.accelerator.unwrap_model(run.models.denoiser)
        first = next(m for m in denoiser.modules() if not list(m.children()) and list(m.parameters()))
        first.register_forward_pre_hook(autocast_dtype)
        inner = getattr(run.optimizer, "optimizer", run.optimizer)
        step = inner.step

        def watched_step(*args, **kwargs):
            grads = [p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            scale = getattr(inner, "grad_scale", None)  # clipping folded into fused AdamW (GradientClipping)
            probe.updates.append({"lrs": [g["lr"] for g in inner.param_groups],
                                  "grad_norm": float(norm / (scale if scale is not None else 1.0))})
            return step(*args, **kwargs)

        inner.step = watched_step
        return real_loop(run, start, stop)

    def training_step(cfg, models, batch, encode, cache, generator):
        seen = {}

        def watched_encode(prompts):
            seen["embeddings"] = encode(prompts)
            return seen["embeddings"]

        saved = []

        def pack(tensor):
            saved.append(tensor.nbytes)
            return tensor

        # Opt-in: torch.compile guards on the active hooks, so a run that compiles would trace them each step.
        counting = (torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor) if probe.count_saved
                    else contextlib.nullcontext())
        with counting:
            parts = real_step(cfg, models, batch, watched_encode, cache, generator)
        probe.calls.append({"prompts": list(batch["prompts"]), "pixels": batch["pixel_values"].detach().clone(),
                            "is_prior": batch["is_prior"].clone(), "loss": parts.loss.item(),
                            "instance_loss": parts.instance_loss.item(), "prior_loss": parts.prior_loss.item(),
                            "embeddings": seen["embeddings"]["embeds"].detach().clone(),
                            "conditioning": {k: v.detach().clone() for k, v in seen["embeddings"].parts.items()},
                            "onednn": torch.backends.mkldnn.enabled,
                            "saved_bytes": sum(saved) if probe.count_saved else None})
        return parts

    mp.setattr(train_module, "loop", loop)
    mp.setattr(train_module, "training_step", training_step)


@pytest.fixture
def probe(tiny_model, instance_dir, tmp_path):
    """probe(**overrides) runs train() on the tiny model (2 steps, no prior, seed 0) with the dotted overrides.

    count_saved=True records, in each call's "saved_bytes", the bytes autograd keeps for backward during the step.
    """
    from dreambooth.config_file import load_config
    from dreambooth.training.loop import train

    count = [0]

    def run(count_saved: bool = False, **overrides) -> Probe:
        count[0] += 1
        out = tmp_path / f"run{count[0]}"
        values = {
            "model.pretrained_model": str(tiny_model), "dataset.instance_dir": str(instance_dir),
            "dataset.instance_prompt": "a photo of sks dog", "dataset.with_prior_preservation": False,
            "training.resolution": 64, "training.max_train_steps": 2, "training.learning_rate": 1e-3,
            "training.seed": 0, "output.output_dir": str(out), "output.logging_steps": 1,
            "output.checkpointing_steps": 1000, "output.report_to": "none",
            # The probe watches the eager step from the inside; the graph-ready step has its own tests.
            "training.cuda_graph": "off"}
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        result = Probe(out, count_saved=count_saved)
        with pytest.MonkeyPatch.context() as mp:
            watch(result, mp)
            train(load_config(None, values))
        return result

    return run


@pytest.fixture
def pipeline_calls(monkeypatch):
    """Each StableDiffusionPipeline call's arguments, scheduler, dtype, device and UNet, and the device asked for."""
    from diffusers import StableDiffusionPipeline

    from dreambooth import generate

    calls, devices = [], []
    real_call, real_device = StableDiffusionPipeline.__call__, generate.pick_device

    def spy(self, *args, **kwargs):
        lora_scales = {v for m in self.unet.modules() for v in getattr(m, "scaling", {}).values()}
        calls.append({**kwargs, "scheduler": type(self.scheduler).__name__, "dtype": self.unet.dtype,
                      "device": self.device, "lora_scales": lora_scales,
                      "unet": {k: v.detach().clone() for k, v in self.unet.state_dict().items()},
                      "seeds": [g.initial_seed() for g in kwargs["generator"]]})
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    monkeypatch.setattr(generate, "pick_device", lambda device=None: devices.append(device) or real_device(device))
    return calls, devices


def interrupt_after(monkeypatch, calls: int) -> None:
    """Sends this process SIGTERM during the `calls`-th training step, as a user's Ctrl-C or a scheduler would."""
    import signal

    from dreambooth.training import loop as train_module

    real, count = train_module.training_step, {"n": 0}

    def step(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", step)


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@contextlib.contextmanager
def headless_chromium(profile: Path, window: str, offline: bool = False):
    """Debian's chromium through selenium, headless, with a fresh profile and the browser's console log kept.

    Skips without the binaries, unless DREAMBOOTH_REQUIRE_BROWSER=1 (CI), where it fails. Selenium Manager is never
    asked for a browser: the binaries are given, and nothing goes to the network. `offline`: every host but localhost
    and 127.0.0.1 fails to resolve (IP addresses included), so a page reaches nothing else, and the DevTools log of
    every request is kept (`requested_urls`).
    """
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        why = (f"the page tests need Debian's chromium and chromium-driver ({', '.join(missing)} missing): "
               "apt-get install chromium chromium-driver")
        if os.environ.get("DREAMBOOTH_REQUIRE_BROWSER") == "1":
            pytest.fail(why + " (DREAMBOOTH_REQUIRE_BROWSER=1)")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--window-size={window}", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    if offline:
        options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", **({"performance": "ALL"} if offline else {})})
    driver = webdriver.Chrome(service=DriverService(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver) -> list[str]:
    """Every URL the browser asked for since the last call (DevTools' Network.requestWillBeSent), failed ones too;
    needs headless_chromium(..., offline=True)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
