"""Two processes on the CPU (gloo DDP through accelerate): training, checkpoints and resume still agree, with the EMA
of the weights on."""

from __future__ import annotations

import os
import subprocess
import sys

from safetensors.torch import load_file


def torchrun(args, out, cwd):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "dreambooth", "train", *args, "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_train_checkpoint_and_resume(tiny_model, instance_dir, tmp_path):
    args = ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", "a photo of sks dog", "--with_prior_preservation", "--class_data_dir",
            str(tmp_path / "class"), "--class_prompt", "a photo of dog", "--num_class_images", "2",
            "--class_inference_steps", "2", "--resolution", "64", "--checkpointing_steps", "2", "--seed", "3",
            "--learning_rate", "1e-3", "--report_to", "none", "--use_ema"]
    torchrun([*args, "--max_train_steps", "4"], tmp_path / "straight", tmp_path)
    ckpt = tmp_path / "straight" / "checkpoint-4"
    # every process saved its own noise generator and RNG state
    assert (ckpt / "noise_generator_0.safetensors").is_file() and (ckpt / "noise_generator_1.safetensors").is_file()
    assert (ckpt / "random_states_1.pkl").is_file()

    torchrun([*args, "--max_train_steps", "2"], tmp_path / "resumed", tmp_path)
    proc = torchrun([*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"], tmp_path / "resumed",
                    tmp_path)
    assert proc.stdout.count("resumed from") == 1  # one process reports
    a = load_file(str(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)  # the EMA of the weights (--use_ema), each process keeping one
    # and the trained weights it averages, which training continues from
    raw_a, raw_b = (load_file(str(tmp_path / run / "checkpoint-4" / "raw_weights.safetensors"))
                    for run in ("straight", "resumed"))
    assert raw_a.keys() == {f"unet.{k}" for k in a} and all((raw_a[k] == raw_b[k]).all() for k in raw_a)
    assert any((raw_a[f"unet.{k}"] != a[k]).any() for k in a)
