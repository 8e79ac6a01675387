"""The graph-ready training step (training.graph_step): on the CPU it runs eagerly over its static buffers, and it
must train what the eager loop trains, resume exactly, and step aside when it cannot capture. The capture itself
is a GPU test (tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import UNET_FILE, base_overrides, remember_class_dir
from safetensors.torch import load_file

from dreambooth.config_file import load_config
from dreambooth.errors import TrainingStopped
from dreambooth.training import graph_step
from dreambooth.training import loop as train_module
from dreambooth.training.loop import train

TE_FILE = "text_encoder/model.safetensors"


@pytest.fixture
def static_path(monkeypatch):
    """The run takes the graph-ready path on the CPU (eagerly: capture needs CUDA); counts its micro-steps."""
    calls = {"micro": 0, "optimizer": 0}
    micro, step = graph_step.StaticStep.micro_step, graph_step.StaticStep.optimizer_step

    def counted_micro(self, batch):
        calls["micro"] += 1
        return micro(self, batch)

    def counted_step(self):
        calls["optimizer"] += 1
        return step(self)

    monkeypatch.setattr(train_module, "graph_plan", lambda cfg, device, processes: (True, "forced by the test"))
    monkeypatch.setattr(graph_step.StaticStep, "micro_step", counted_micro)
    monkeypatch.setattr(graph_step.StaticStep, "optimizer_step", counted_step)
    return calls


def weights(out, *files):
    return {f: load_file(str(out / f)) for f in files}


def assert_close(a, b, atol):
    for file in a:
        worst = max((a[file][k].float() - b[file][k].float()).abs().max().item() for k in a[file])
        assert worst <= atol, f"{file}: {worst}"


CASES = {
    "full, prior, min-snr, accumulation, cosine": {
        "training.gradient_accumulation_steps": 2, "training.snr_gamma": 5.0, "training.lr_scheduler": "cosine",
        "training.lr_warmup_steps": 1, "training.max_train_steps": 4},
    "new token, text encoder, offset noise": {
        "token.identifier": "<zq>", "token.initializer": "dog", "dataset.instance_prompt": "a photo of <zq> dog",
        "model.train_text_encoder": True, "training.noise_offset": 0.1, "training.max_train_steps": 3},
    "lora with text encoder": {
        "model.method": "lora", "model.train_text_encoder": True, "training.learning_rate": 1e-2,
        "training.max_train_steps": 3, "lora.rank": 4},
    # the EMA is updated after the optimizer step's replay, outside the graphs (training.graph_step)
    "full, EMA in CPU memory": {"training.use_ema": True, "training.ema_on_cpu": True, "training.max_train_steps": 3},
}


@pytest.mark.numerics
@pytest.mark.parametrize("case", CASES)
def test_the_static_step_trains_what_the_eager_loop_trains(case, tiny_model, instance_dir, class_dir,
                                                           class_dir_cache, tmp_path, monkeypatch, static_path):
    extra = CASES[case]
    files = ["pytorch_lora_weights.safetensors"] if extra.get("model.method") == "lora" else \
        [UNET_FILE] + ([TE_FILE] if extra.get("model.train_text_encoder") else [])
    static_out = tmp_path / "static"
    train(load_config(None, base_overrides(tiny_model, instance_dir, class_dir, static_out, **extra)))
    remember_class_dir(class_dir, class_dir_cache)
    steps = extra["training.max_train_steps"]
    accumulation = extra.get("training.gradient_accumulation_steps", 1)
    assert static_path == {"micro": steps * accumulation, "optimizer": steps}
    monkeypatch.undo()
    eager_out = tmp_path / "eager"
    train(load_config(None, base_overrides(tiny_model, instance_dir, class_dir, eager_out, **extra)))
    # Clipping folded into AdamW both ways, the same draws from the generator in the same order: equal to float
    # rounding (tensor LRs filled by the schedule instead of Python floats, in-place zeroed gradients).
    assert_close(weights(static_out, *files), weights(eager_out, *files), atol=1e-5)
    before = load_file(str(tiny_model / UNET_FILE))
    if "lora" not in case:
        assert max((before[k] - load_file(str(eager_out / UNET_FILE))[k]).abs().max().item() for k in before) > 1e-4
    logs = [(static_out / "logs" / "train_log.jsonl").read_text().splitlines(),
            (eager_out / "logs" / "train_log.jsonl").read_text().splitlines()]
    import json

    for a, b in zip(*logs):
        a, b = json.loads(a), json.loads(b)
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5
        assert abs(a["lr"] - b["lr"]) <= 1e-7 * b["lr"]  # a float32 tensor against a Python float


def test_a_short_last_batch_runs_eagerly_beside_the_static_buffers(tiny_model, tmp_path, static_path):
    """3 photos in batches of 2: every other batch has 1 image, a shape the buffers do not have."""
    from conftest import photo_folder

    photos = photo_folder(tmp_path / "photos", 3)
    values = {"model.pretrained_model": str(tiny_model), "dataset.instance_dir": str(photos),
              "dataset.instance_prompt": "a photo of sks dog", "training.resolution": 64,
              "training.batch_size": 2, "training.max_train_steps": 4, "training.seed": 0,
              "output.output_dir": str(tmp_path / "static"), "output.report_to": "none"}
    eager = []
    real = graph_step.StaticStep._micro

    def watched(self, staged):
        eager.append(staged is not self.staged)
        return real(self, staged)

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(graph_step.StaticStep, "_micro", watched)
        train(load_config(None, values))
    assert eager.count(True) == 2 and eager.count(False) == 2


@pytest.mark.numerics
def test_resume_through_the_static_step_gives_the_same_weights(tiny_model, instance_dir, class_dir, class_dir_cache,
                                                               tmp_path, monkeypatch, static_path):
    import os
    import signal

    extra = {"training.gradient_accumulation_steps": 2, "training.snr_gamma": 5.0, "training.max_train_steps": 4,
             "training.lr_scheduler": "cosine", "output.checkpointing_steps": 100, "dataset.random_flip": True}
    straight = tmp_path / "straight"
    train(load_config(None, base_overrides(tiny_model, instance_dir, class_dir, straight, **extra)))
    remember_class_dir(class_dir, class_dir_cache)
    stopped = tmp_path / "stopped"
    real = graph_step.StaticStep.micro_step
    count = {"n": 0}

    def interrupting(self, batch):
        count["n"] += 1
        if count["n"] == 5:  # during step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch)

    monkeypatch.setattr(graph_step.StaticStep, "micro_step", interrupting)
    with pytest.raises(TrainingStopped, match="stopped at step 3"):
        train(load_config(None, base_overrides(tiny_model, instance_dir, class_dir, stopped, **extra)))
    monkeypatch.setattr(graph_step.StaticStep, "micro_step", real)
    train(load_config(None, base_overrides(tiny_model, instance_dir, class_dir, stopped,
                                           **{**extra, "output.resume_from_checkpoint": "latest"})))
    assert_close(weights(straight, UNET_FILE), weights(stopped, UNET_FILE), atol=0)


def test_a_failed_capture_goes_on_eagerly_and_says_why(tiny_model, instance_dir, class_dir, tmp_path, monkeypatch,
                                                       static_path, capsys):
    """Capture needs CUDA; here it is made to run and fail after the warm-up steps, as it would on a GPU."""
    monkeypatch.setattr(graph_step.StaticStep, "__init__", _capturing_init(graph_step.StaticStep.__init__))

    def failing(step):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(graph_step, "capture_graphs", failing)
    extra = {"training.max_train_steps": graph_step.WARMUP_STEPS + 2}
    out = tmp_path / "out"
    train(load_config(None, base_overrides(tiny_model, instance_dir, class_dir, out, **extra)))
    printed = capsys.readouterr().out
    assert printed.count("CUDA graph capture failed (RuntimeError: operation not permitted when stream is "
                         "capturing)") == 1
    assert static_path["optimizer"] == graph_step.WARMUP_STEPS + 2 and (out / UNET_FILE).is_file()


def _capturing_init(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.capture = True

    return patched


def test_graph_plan_says_why_not():
    cfg = load_config(None, {"model.pretrained_model": "m", "dataset.instance_dir": "d",
                             "dataset.instance_prompt": "a photo of sks dog"})
    assert graph_step.graph_plan(cfg, "cuda", 1) == (
        True, "CUDA graph on: the whole training step is captured once and replayed")
    on_cpu = graph_step.graph_plan(cfg, "cpu", 1)
    assert on_cpu[0] is False and "the device is cpu" in on_cpu[1]
    cfg.training.mixed_precision, cfg.training.use_8bit_adam = "fp16", True
    enabled, why = graph_step.graph_plan(cfg, "cuda", 2)
    assert not enabled and all(s in why for s in ("DDP", "GradScaler", "8-bit"))
    cfg.training.mixed_precision, cfg.training.use_8bit_adam = "bf16", False
    for optimizer, named in (("adamw8bit", "8-bit AdamW"), ("prodigy", "Prodigy"), ("lion", "Lion")):
        cfg.training.optimizer = optimizer  # steps eagerly, saying why
        why = graph_step.UNCAPTURED_OPTIMIZERS[optimizer]
        assert graph_step.graph_plan(cfg, "cuda", 1) == (False, f"CUDA graph off: {why}") and named in why
    cfg.training.cuda_graph = "off"
    assert graph_step.graph_plan(cfg, "cuda", 1)[0] is False


def test_cuda_graph_on_is_refused_where_it_cannot_run(tiny_model, instance_dir, tmp_path, capsys):
    from dreambooth.cli import main

    code = main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir",
                 str(instance_dir), "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "o"),
                 "--resolution", "64", "--max_train_steps", "1", "--cuda_graph", "on"])
    assert code == 2
    err = capsys.readouterr().err
    assert "training.cuda_graph is on" in err and "not CUDA" in err and "Traceback" not in err


@pytest.mark.numerics
def test_tensor_learning_rates_follow_the_schedule():
    """The graph's optimizer reads its learning rate from a tensor that the schedule fills in place."""
    from diffusers.optimization import get_scheduler

    from dreambooth.training.components import make_optimizer

    cfg = load_config(None, {"model.pretrained_model": "m", "dataset.instance_dir": "d",
                             "dataset.instance_prompt": "a photo of sks dog"})
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = make_optimizer(cfg, [{"params": params, "lr": 0.1}], torch.device("cpu"), graph=True)
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=4)
    for want in (0.075, 0.05):
        params[0].grad = torch.ones(3)
        optimizer.step()
        schedule.step()
        assert optimizer.param_groups[0]["lr"] is lr and abs(lr.item() - want) < 1e-7


def test_compile_caches_live_in_a_lasting_folder(monkeypatch, tmp_path):
    from dreambooth.training.speed import compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache() == str(tmp_path / "dreambooth" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    assert compile_cache() == "/elsewhere"


@pytest.mark.parametrize("setting, static", [("auto", True), ("off", False)])
def test_the_cuda_graph_setting_reaches_the_loop(tiny_model, instance_dir, tmp_path, monkeypatch, setting, static):
    """Wiring: with the device taken for CUDA, `auto` sends the run through the graph-ready step and `off` does not
    (the capture itself stays off: this machine has no CUDA)."""
    real = graph_step.graph_plan
    monkeypatch.setattr(train_module, "graph_plan", lambda cfg, device, processes: real(cfg, "cuda", processes))
    used = []
    monkeypatch.setattr(graph_step.StaticStep, "micro_step", lambda self, batch, real=graph_step.StaticStep.micro_step:
                        used.append(1) or real(self, batch))
    values = {"model.pretrained_model": str(tiny_model), "dataset.instance_dir": str(instance_dir),
              "dataset.instance_prompt": "a photo of sks dog", "training.resolution": 64,
              "training.max_train_steps": 2, "training.seed": 0, "training.cuda_graph": setting,
              "output.output_dir": str(tmp_path / "o"), "output.report_to": "none"}
    train(load_config(None, values))
    assert bool(used) == static
