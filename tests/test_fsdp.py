"""Sharded training (FSDP through accelerate's plugin) and what several processes share: the settings refused under
FSDP before any weights load, each with a suggestion that is then accepted; the seeds of a micro-batch's draws; what a
resume on another split of the global batch says.

FSDP itself runs only on GPUs here: accelerate 1.15 turns its FSDP plugin on only for accelerator process groups
(state.py sets DistributedType.FSDP for MULTI_GPU, MULTI_XPU, ... and never for MULTI_CPU), so `ACCELERATE_USE_FSDP`
on a gloo CPU launch trains as plain DDP, and wrapping torch's fully_shard by hand would test a path the tool does
not take. The FSDP training test is therefore gpu-marked (test_fsdp_trains_the_weights_of_one_process_and_resumes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.training import loop as train_module
from dreambooth.training.distributed import Layout, draw_seed, fsdp_problems, resume_note
from dreambooth.training.graph_step import graph_obstacles

FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def train_argv(model, instance_dir, out, *extra):
    return ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", "a photo of sks dog", "--resolution", "64", "--max_train_steps", "2",
            "--learning_rate", "1e-3", "--seed", "0", "--output_dir", str(out), "--report_to", "none", *extra]


class Reached(Exception):
    """Training got past pre-flight: the settings were accepted."""


def refused(capsys, monkeypatch, env, argv) -> str:
    """Runs `dreambooth train` under the launch's environment; its message, after checking it refused with exit 2
    before any weights loaded."""
    with monkeypatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        m.setattr(train_module, "setup", lambda *a, **k: pytest.fail("weights were loaded before the refusal"))
        assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def accepted(capsys, monkeypatch, env, argv) -> None:
    """Runs `dreambooth train` up to where it would load weights: pre-flight accepted it."""
    with monkeypatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        m.setattr(train_module, "setup", lambda *a, **k: (_ for _ in ()).throw(Reached()))
        with pytest.raises(Reached):
            main([str(a) for a in argv])
    capsys.readouterr()


def without(argv, *flags):
    """argv less each flag and, where it takes one, its value."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in flags:
            skip = i + 1 < len(argv) and not str(argv[i + 1]).startswith("--")
            continue
        out.append(a)
    return out


def test_fsdp_refusals_name_the_key_and_what_they_suggest_is_accepted(tiny_model, instance_dir, tmp_path, capsys,
                                                                      monkeypatch):
    """Each setting FSDP does not train with is named (its config key) with what to do, exit 2, before weights load;
    doing what the message says passes pre-flight under the same launch."""
    base = train_argv(tiny_model, instance_dir, tmp_path / "out")
    # accelerate's FSDP2 over a plain full fine-tune is accepted as it is
    accepted(capsys, monkeypatch, FSDP2, base)

    # FSDP1 (accelerate's default fsdp_version): set fsdp_version 2
    err = refused(capsys, monkeypatch, {"ACCELERATE_USE_FSDP": "true"}, base)
    assert "fsdp_config.fsdp_version 1 (the default) (FSDP_VERSION)" in err and "Set fsdp_version: 2" in err

    # several at once, each named; dropping the flags each names is accepted
    argv = [*base, "--use_ema", "--train_text_encoder", "--validation_prompt", "a photo of sks dog"]
    err = refused(capsys, monkeypatch, FSDP2, argv)
    assert "3 problem(s)" in err
    for key, flag in (("training.use_ema", "--use_ema"), ("model.train_text_encoder", "--train_text_encoder"),
                      ("validation.prompts", "--validation_prompt")):
        assert f"{key} under FSDP" in err and f"Drop {flag}" in err
    accepted(capsys, monkeypatch, FSDP2, without(argv, "--use_ema", "--train_text_encoder", "--validation_prompt"))

    # CPU offload of the parameters steps them with torch's AdamW only: --optimizer adamw is accepted
    offload = {**FSDP2, "FSDP_OFFLOAD_PARAMS": "true"}
    err = refused(capsys, monkeypatch, offload, [*base, "--optimizer", "lion"])
    assert "fsdp_config.fsdp_offload_params (FSDP_OFFLOAD_PARAMS) with training.optimizer lion" in err
    accepted(capsys, monkeypatch, offload, [*base, "--optimizer", "adamw"])
    accepted(capsys, monkeypatch, {**offload, "FSDP_OFFLOAD_PARAMS": "false"}, [*base, "--optimizer", "lion"])

    err = refused(capsys, monkeypatch, {**FSDP2, "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, base)
    assert "fsdp_config.fsdp_cpu_ram_efficient_loading (FSDP_CPU_RAM_EFFICIENT_LOADING)" in err

    # LoRA: launched without FSDP it is accepted
    lora = [*base, "--method", "lora"]
    err = refused(capsys, monkeypatch, FSDP2, lora)
    assert "model.method: lora under FSDP" in err and "without FSDP" in err
    accepted(capsys, monkeypatch, {}, lora)


def test_fsdp_refuses_a_new_token_and_8bit_adam_and_a_captured_step():
    """The refusals pre-flight cannot provoke on this machine: a new token (the tiny model's tokenizer would be
    read), 8-bit AdamW (bitsandbytes is not installed), a CUDA graph (no CUDA)."""
    from dreambooth.config_file import load_config

    cfg = load_config(None, {"model.pretrained_model": "m", "dataset.instance_dir": "d", "token.identifier": "<zq>",
                             "token.initializer": "dog", "token.class_word": "dog", "training.use_8bit_adam": True})
    found = fsdp_problems(cfg, FSDP2)
    assert any(p.startswith("token.initializer under FSDP") and "existing rare token" in p for p in found)
    assert any(p.startswith("training.use_8bit_adam under FSDP") and "Drop --use_8bit_adam" in p for p in found)
    assert fsdp_problems(cfg, {}) == []  # no FSDP, no refusal
    with pytest.MonkeyPatch.context() as m:
        for key, value in FSDP2.items():
            m.setenv(key, value)
        assert "FSDP's gathers and reshards of the weights are not captured" in graph_obstacles(cfg, "cuda", 1)
    assert not any("FSDP" in o for o in graph_obstacles(cfg, "cuda", 1))


def test_a_micro_batch_draws_from_its_place_in_the_global_batch():
    seeds = [draw_seed(3, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2 ** 63 for s in seeds)
    assert draw_seed(3, 7) == draw_seed(3, 7) and draw_seed(3, 7) != draw_seed(4, 7)
    # the seed's stream: neighbouring indices give unrelated noise
    a, b = (torch.randn(4096, generator=torch.Generator().manual_seed(draw_seed(0, i))) for i in (0, 1))
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.1


def test_a_resume_on_another_split_says_what_it_keeps():
    two = Layout(processes=2, batch_size=1, accumulation=2)
    assert two.global_batch == 4 and resume_note(two, two) is None and resume_note(None, two) is None
    same = resume_note(two, Layout(4, 1, 1))
    assert "the same global batch of 4" in same and "in float rounding" in same
    other = resume_note(two, Layout(4, 1, 2))
    assert "not an exact resume" in other and "(global batch 4)" in other and "(global batch 8)" in other


def test_the_gathered_denoiser_is_rebuilt_whole_on_the_main_process(tiny_model, monkeypatch):
    """What FSDP's checkpoints and final model save (outputs.whole_denoiser): the full state accelerate gathers, in a
    copy built on the meta device from the denoiser's config; no weight left on the meta device. The gathering itself
    (accelerate's get_state_dict across processes) needs FSDP, so a GPU: here it is the module's own state."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from dreambooth.training import outputs

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    main_process = SimpleNamespace(unwrap_model=lambda m: m, get_state_dict=lambda m: m.state_dict(),
                                   is_main_process=True)
    run = SimpleNamespace(accelerator=main_process, models=SimpleNamespace(denoiser=unet))
    monkeypatch.setattr(outputs, "sharded", lambda accelerator: True)
    whole = outputs.whole_denoiser(run)
    assert whole is not unet and type(whole) is type(unet)
    a, b = unet.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(t.is_meta for t in [*whole.parameters(), *whole.buffers()])
    other = SimpleNamespace(accelerator=SimpleNamespace(**{**vars(main_process), "is_main_process": False}),
                            models=run.models)
    assert outputs.whole_denoiser(other) is None  # the other processes only take part in the gathering


@pytest.mark.gpu
@pytest.mark.numerics
def test_fsdp_trains_the_weights_of_one_process_and_resumes(tiny_model, instance_dir, tmp_path):
    """On every GPU of the machine under accelerate's FSDP2: the weights of one process training the same global
    batch (accumulation), a checkpoint that resumes to the same weights, and a final model stock diffusers loads.
    Not run on the CPU: accelerate enables FSDP only for GPU process groups (see the module's docstring)."""
    if not torch.cuda.is_available():
        pytest.skip("FSDP through accelerate needs CUDA GPUs")
    gpus = torch.cuda.device_count()
    args = ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", "a photo of sks dog", "--resolution", "64", "--checkpointing_steps", "2", "--seed",
            "3", "--learning_rate", "1e-3", "--report_to", "none", "--max_train_steps", "4"]

    def launch(out, *extra, processes=gpus, fsdp=True):
        env = dict(os.environ, OMP_NUM_THREADS="1", **(FSDP2 if fsdp else {}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
               "-m", "dreambooth", "train", *args, *extra, "--output_dir", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    launch(tmp_path / "fsdp")
    launch(tmp_path / "one", "--gradient_accumulation_steps", str(gpus), processes=1, fsdp=False)
    unet = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "fsdp" / unet)), load_file(str(tmp_path / "one" / unet))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    ckpt = tmp_path / "fsdp" / "checkpoint-2"
    assert json.loads((ckpt / "trainer_state.json").read_text())["layout"]["processes"] == gpus
    assert (ckpt / unet).is_file()  # the gathered diffusers layout beside accelerate's shards

    launch(tmp_path / "resumed", "--max_train_steps", "2")
    launch(tmp_path / "resumed", "--resume_from_checkpoint", "latest")
    c = load_file(str(tmp_path / "resumed" / unet))
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-6

    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(tmp_path / "fsdp")
