"""The CUDA paths, opt-in (`pytest -m gpu` on a machine with a GPU; skipped without one).

Mixed precision, fused and 8-bit AdamW, TF32, fp16 generation and class images, LoRA: each a few steps of the tiny
model, watched from the inside by conftest's `probe` (training) and `pipeline_calls` (generation).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def inner_optimizer(p) -> torch.optim.Optimizer:
    return getattr(p.run.optimizer, "optimizer", p.run.optimizer)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_keeps_trained_weights_fp32_on_cuda(probe, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    # fp16's GradScaler starts at 2**16 and skips a step whose gradients overflow: a few steps, so some update.
    p = probe(training__mixed_precision=precision, training__max_train_steps=4)
    m = p.run.models
    assert (p.run.accelerator.scaler is not None) == (precision == "fp16")  # fp16 only: loss scaling
    assert p.before["autocast"] == HALF[precision]  # the UNet's forward
    assert m.vae.dtype == HALF[precision] and m.text_encoder.dtype == HALF[precision]
    trained = p.trainable("unet")
    assert trained and all(q.dtype == torch.float32 and q.is_cuda for q in trained.values())
    assert all(math.isfinite(c["loss"]) for c in p.calls), [c["loss"] for c in p.calls]
    assert p.changed("unet"), "no step updated the UNet"
    assert all(torch.isfinite(q).all() for q in trained.values())


@pytest.mark.numerics
def test_fused_adamw_with_clipping_folded_in_on_cuda(probe):
    p = probe(training__max_grad_norm=1e-3)  # so small that every step clips
    optimizer = inner_optimizer(p)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    assert all(q.is_cuda for g in optimizer.param_groups for q in g["params"])
    assert len(p.updates) == 2 and all(u["grad_norm"] <= 1e-3 * 1.001 for u in p.updates)
    assert p.changed("unet")


@pytest.mark.parametrize("allow", [True, False])
def test_tf32_follows_allow_tf32_on_cuda(probe, allow):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not allow
        probe(training__allow_tf32=allow)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (allow, allow)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_generate_draws_in_fp16_on_cuda_by_default(tiny_model, tmp_path, pipeline_calls):
    from dreambooth.models.loading import pick_dtype

    calls, devices = pipeline_calls
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_model), "--prompt", "a photo of sks dog", "--steps", "2",
                 "--out", str(out)]) == 0
    assert devices == [None]  # neither --device nor --precision: the code picks both
    assert pick_dtype(None, torch.device("cuda")) == torch.float16
    assert [(c["device"].type, c["dtype"]) for c in calls] == [("cuda", torch.float16)]
    assert len(list(out.glob("0*.png"))) == 1


def test_class_images_generate_in_fp16_in_one_batch_on_cuda(probe, tmp_path, pipeline_calls):
    calls, _ = pipeline_calls
    p = probe(dataset__with_prior_preservation=True, dataset__class_dir=str(tmp_path / "class"),
              dataset__class_prompt="a photo of dog", dataset__num_class_images=3, dataset__class_inference_steps=2)
    # default_batch_size: 16 a batch on a GPU; pick_dtype: fp16 there
    assert [(len(c["prompt"]), c["device"].type, c["dtype"]) for c in calls] == [(3, "cuda", torch.float16)]
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 3
    assert all(c["is_prior"].tolist() == [False, True] for c in p.calls)


def test_8bit_adam_trains_on_cuda(probe):
    bnb = pytest.importorskip("bitsandbytes")
    p = probe(training__use_8bit_adam=True)
    optimizer = inner_optimizer(p)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    # bitsandbytes keeps 8-bit moments for tensors of 4096 elements or more, fp32 ones below
    assert any(s.get("state1") is not None and s["state1"].dtype == torch.uint8 for s in optimizer.state.values())
    assert all(math.isfinite(c["loss"]) for c in p.calls)
    assert p.changed("unet")


def test_lora_trains_fp32_adapters_on_a_half_unet_on_cuda(probe):
    p = probe(model__method="lora", training__mixed_precision="fp16", training__learning_rate=1e-2,
              training__max_train_steps=4)
    unet = p.run.accelerator.unwrap_model(p.run.models.unet)
    adapters = p.trainable("unet")
    assert adapters and all("lora_" in n and q.dtype == torch.float32 and q.is_cuda for n, q in adapters.items())
    assert {q.dtype for q in unet.parameters() if not q.requires_grad} == {torch.float16}
    changed = p.changed("unet")
    assert changed and changed <= set(adapters), "only the LoRA adapters may train"
    assert all(math.isfinite(c["loss"]) for c in p.calls)
    saved = load_file(str(p.out / "pytorch_lora_weights.safetensors"))
    assert saved and all(torch.isfinite(v).all() for v in saved.values())


@pytest.mark.parametrize("layout", [{}, {"training__channels_last": True}], ids=["compiled", "compiled-channels-last"])
def test_compile_trains_with_the_same_gradients_on_cuda(probe, layout):
    """On a CPU, torch.compile's code computed wrong gradients (preflight refuses it there); on a GPU it must not."""
    exact = {"training__max_grad_norm": 1e9, "training__allow_tf32": False}  # the raw norm, no TF32 rounding
    plain = probe(**exact)
    compiled = probe(training__compile=True, **layout, **exact)
    unet = compiled.run.accelerator.unwrap_model(compiled.run.models.unet)
    assert getattr(unet.forward, "_torchdynamo_orig_callable", None) is not None
    norms = [[u["grad_norm"] for u in p.updates] for p in (plain, compiled)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-3)


# ---------------------------------------------------------------------------------------------- the CUDA graph step

def graph_run(tiny_model, instance_dir, out, **extra):
    from dreambooth.config_file import load_config
    from dreambooth.training.loop import train

    values = {"model.pretrained_model": str(tiny_model), "dataset.instance_dir": str(instance_dir),
              "dataset.instance_prompt": "a photo of sks dog", "training.resolution": 64,
              "training.max_train_steps": 8, "training.learning_rate": 1e-3, "training.seed": 0,
              "training.mixed_precision": "bf16", "output.output_dir": str(out), "output.report_to": "none",
              "output.checkpointing_steps": 1000, **extra}
    train(load_config(None, values))
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("extra", [{}, {"training.gradient_accumulation_steps": 2, "training.snr_gamma": 5.0,
                                        "training.lr_scheduler": "cosine"},
                                   {"model.train_text_encoder": True}])
def test_the_captured_step_trains_what_the_eager_step_trains_on_cuda(tiny_model, instance_dir, tmp_path, extra,
                                                                     monkeypatch, capsys):
    from dreambooth.training import graph_step

    replays = {"n": 0}
    real = graph_step.capture_graphs

    def counted(step):
        graphs = real(step)
        for graph in graphs.values():
            original = graph.replay

            def replay(original=original):
                replays["n"] += 1
                return original()

            graph.replay = replay
        return graphs

    monkeypatch.setattr(graph_step, "capture_graphs", counted)
    graphed = graph_run(tiny_model, instance_dir, tmp_path / "graph", **{"training.cuda_graph": "on", **extra})
    assert "CUDA graph on" in capsys.readouterr().out
    assert replays["n"] > 0, "no replay: the run never captured"
    eager = graph_run(tiny_model, instance_dir, tmp_path / "eager", **{"training.cuda_graph": "off", **extra})
    worst = max((graphed[k].float() - eager[k].float()).abs().max().item() for k in eager)
    assert worst < 2e-2, worst  # bf16 autocast: kernels may differ between captured and eager launches


def test_resume_through_a_graph_run_is_exact_on_cuda(tiny_model, instance_dir, tmp_path):
    """Stopped at step 5 and resumed to 12 with a cosine schedule: the resumed run captures after its warm-up and
    replays, with the learning rate still following the schedule (a resumed lr tensor loads on the CPU)."""
    settings = {"training.cuda_graph": "on", "training.max_train_steps": 12, "training.lr_scheduler": "cosine",
                "training.lr_warmup_steps": 2}
    straight = graph_run(tiny_model, instance_dir, tmp_path / "straight", **settings)
    graph_run(tiny_model, instance_dir, tmp_path / "resumed", **{**settings, "training.max_train_steps": 5,
                                                                 "output.checkpointing_steps": 5})
    resumed = graph_run(tiny_model, instance_dir, tmp_path / "resumed", **{
        **settings, "output.resume_from_checkpoint": "latest"})
    worst = max((straight[k].float() - resumed[k].float()).abs().max().item() for k in straight)
    assert worst < 2e-2, worst


def test_a_capture_that_fails_goes_on_eagerly_on_cuda(tiny_model, instance_dir, tmp_path, monkeypatch, capsys):
    """A host read inside the step makes the capture fail; the run finishes eagerly, its generators usable."""
    from dreambooth.training import loop

    real = loop.step_loss

    def syncing(*args, **kwargs):
        parts = real(*args, **kwargs)
        parts.loss.item()  # not allowed while capturing
        return parts

    monkeypatch.setattr(loop, "step_loss", syncing)
    weights = graph_run(tiny_model, instance_dir, tmp_path / "out", **{"training.cuda_graph": "on"})
    assert "CUDA graph capture failed" in capsys.readouterr().out
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_the_ema_in_cpu_memory_follows_the_captured_step_on_cuda(tiny_model, instance_dir, tmp_path, monkeypatch,
                                                                 capsys):
    """--ema_on_cpu beside CUDA weights: the average stays in pinned CPU memory, is updated after each replay of the
    captured step (outside the graphs), and comes out as the average kept on the GPU does."""
    from dreambooth.training import loop

    made, real = [], loop.make_average
    monkeypatch.setattr(loop, "make_average", lambda *args: made.append(real(*args)) or made[-1])
    ema = {"training.cuda_graph": "on", "training.use_ema": True}
    on_cpu = graph_run(tiny_model, instance_dir, tmp_path / "cpu", **ema, **{"training.ema_on_cpu": True})
    assert "CUDA graph on" in capsys.readouterr().out
    assert all(slot.param.is_cuda for slot in made[-1].slots)
    assert all(held.device.type == "cpu" and held.is_pinned() for held in made[-1].shadow)
    assert made[-1].updates == 8
    on_gpu = graph_run(tiny_model, instance_dir, tmp_path / "gpu", **ema)
    assert all(held.is_cuda for held in made[-1].shadow)
    worst = max((on_cpu[k].float() - on_gpu[k].float()).abs().max().item() for k in on_gpu)
    assert worst < 2e-2, worst  # two bf16 runs on the GPU, as the captured-against-eager test allows


# ---------------------------------------------------------------------------------------------- frozen modules off

def test_frozen_modules_leave_the_gpu_and_the_lora_trains_the_same_on_cuda(tiny_model, instance_dir, tmp_path,
                                                                           monkeypatch, capsys):
    """offload_frozen auto on CUDA: every step runs with the VAE and the text encoder on the CPU, and the LoRA equals
    the one a run that keeps them resident trains (the same cached latents and embeddings)."""
    from dreambooth.training import loop as loop_module

    where = []
    real = loop_module.step_loss

    def watched(cfg, models, *args, **kwargs):
        where.append({next(models.vae.parameters()).device.type, next(models.text_encoder.parameters()).device.type})
        return real(cfg, models, *args, **kwargs)

    monkeypatch.setattr(loop_module, "step_loss", watched)
    lora = {"model.method": "lora", "dataset.center_crop": True, "training.cuda_graph": "off"}
    from dreambooth.config_file import load_config
    from dreambooth.training.loop import train

    def run(out, setting):
        values = {"model.pretrained_model": str(tiny_model), "dataset.instance_dir": str(instance_dir),
                  "dataset.instance_prompt": "a photo of sks dog", "training.resolution": 64,
                  "training.max_train_steps": 6, "training.learning_rate": 1e-3, "training.seed": 0,
                  "training.mixed_precision": "bf16", "output.output_dir": str(out), "output.report_to": "none",
                  "training.offload_frozen": setting, **lora}
        train(load_config(None, values))
        return load_file(str(out / "pytorch_lora_weights.safetensors"))

    moved = run(tmp_path / "moved", "auto")
    assert "off the device once cached: text_encoder, vae" in capsys.readouterr().out
    assert where and all(w == {"cpu"} for w in where)
    where.clear()
    kept = run(tmp_path / "kept", "off")
    assert all(w == {"cuda"} for w in where)
    assert all(torch.equal(moved[k], kept[k]) for k in kept)
