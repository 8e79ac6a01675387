"""LoRA DreamBooth and several subjects per run, end to end on the tiny model."""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import draw_subject, interrupt_after, rounding_bound
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.config_file import load_config
from dreambooth.errors import TrainingStopped, UserError
from dreambooth.formats.lora import LORA_FILE, TOKEN_FILE
from dreambooth.training.data import DreamBoothDataset, MultiSubjectDataset
from dreambooth.training.loop import train


def lora_cfg(model, instance_dir, out, **extra):
    values = {
        "model.pretrained_model": str(model), "model.method": "lora", "dataset.instance_dir": str(instance_dir),
        "dataset.instance_prompt": "a photo of sks dog", "token.identifier": "sks", "training.resolution": 64,
        "training.learning_rate": 1e-2,
        "training.max_train_steps": 4, "training.seed": 0, "output.output_dir": str(out),
        "output.report_to": "none", "output.checkpointing_steps": 2, "lora.rank": 4, "lora.alpha": 8,
    }
    values.update(extra)
    return load_config(None, values)


def image_of(pipe, prompt="a photo of sks dog", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=3, generator=gen, output_type="np", height=64, width=64).images[0]


@pytest.mark.smoke
def test_lora_run_writes_a_file_stock_diffusers_loads(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "out"
    train(lora_cfg(tiny_model, instance_dir, out))
    assert (out / LORA_FILE).is_file() and not (out / "model_index.json").exists()
    with safe_open(str(out / LORA_FILE), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["dreambooth.base_model"] == str(tiny_model) and len(meta["dreambooth.base_model_hash"]) == 16
    assert meta["dreambooth.base_family"] == "sd1"
    assert json.loads(meta["dreambooth.identifiers"]) == ["sks"]
    assert json.loads(meta["dreambooth.instance_prompts"]) == ["a photo of sks dog"]
    assert meta["dreambooth.rank"] == "4" and meta["dreambooth.alpha"] == "8" and meta["dreambooth.steps"] == "4"
    assert json.loads(meta["dreambooth.unet_target_modules"]) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert keys and all(k.startswith("unet.") for k in keys)
    # checkpoints hold the adapters only, not the frozen UNet, in the file stock diffusers loads
    ckpt = load_file(str(out / "checkpoint-4" / LORA_FILE))
    assert ckpt.keys() == load_file(str(out / LORA_FILE)).keys()
    assert not (out / "checkpoint-4" / "unet").exists()

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    base = image_of(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(image_of(pipe) - base).max() > 1e-3, "the LoRA changes nothing"


@pytest.mark.smoke
def test_lora_with_text_encoder_new_token_and_bf16(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    train(lora_cfg(tiny_model, instance_dir, out, **{
        "model.train_text_encoder": True, "token.identifier": "<zq>", "token.initializer": "dog",
        "dataset.instance_prompt": "a photo of <zq> dog", "training.mixed_precision": "bf16",
        "validation.prompts": ["a photo of <zq> dog"], "validation.steps": 2, "validation.num_images": 1,
        "validation.num_inference_steps": 2}))
    tensors = load_file(str(out / LORA_FILE))
    assert any(k.startswith("text_encoder.") for k in tensors) and any(k.startswith("unet.") for k in tensors)
    assert all(v.dtype == torch.float32 for v in tensors.values()), "adapters must stay fp32 under bf16"
    assert (out / "samples" / "step-000002.png").is_file()
    tokens = load_file(str(out / TOKEN_FILE))
    assert list(tokens) == ["<zq>"]
    with safe_open(str(out / LORA_FILE), "pt") as f:
        assert json.loads(f.metadata()["dreambooth.new_tokens"]) == ["<zq>"]

    # `dreambooth generate` with the base model and the LoRA (its token comes along)
    gen = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_model), "--lora", f"{out}:0.8", "--prompt", "a photo of <zq> dog",
                 "--steps", "2", "--out", str(gen)]) == 0
    assert json.loads((gen / "settings.json").read_text())["loras"] == [[str(out), 0.8]]
    # the token file is needed: without it the LoRA is refused clearly
    os.remove(out / TOKEN_FILE)
    assert main(["generate", "--model", str(tiny_model), "--lora", str(out), "--prompt", "x", "--steps", "2",
                 "--out", str(tmp_path / "gen2")]) == 2
    assert TOKEN_FILE in capsys.readouterr().err


# (False, ...): the text encoder's adapters alone; <zq>: a new token's row trains beside the adapters
@pytest.mark.parametrize("train_unet, identifier", [(True, "sks"), (False, "sks"), (True, "<zq>")])
def test_lora_resume_gives_the_same_adapters(tiny_model, instance_dir, tmp_path, monkeypatch, train_unet, identifier):
    extra = {"model.train_text_encoder": True, "training.max_train_steps": 4, "output.checkpointing_steps": 100,
             "dataset.random_flip": True, "model.train_denoiser": train_unet, "token.identifier": identifier,
             "token.initializer": "dog", "dataset.instance_prompt": f"a photo of {identifier} dog"}
    straight = tmp_path / "straight"
    train(lora_cfg(tiny_model, instance_dir, straight, **extra))

    stopped = tmp_path / "stopped"
    interrupt_after(monkeypatch, calls=2)
    with pytest.raises(TrainingStopped, match="stopped at step 2"):
        train(lora_cfg(tiny_model, instance_dir, stopped, **extra))
    monkeypatch.undo()
    train(lora_cfg(tiny_model, instance_dir, stopped, **extra, **{"output.resume_from_checkpoint": "latest"}))
    a, b = load_file(str(straight / LORA_FILE)), load_file(str(stopped / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_subjects_are_sampled_in_balance(tmp_path):
    folders = []
    for name, count in (("a", 1), ("b", 3)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(count):
            draw_subject(i).save(folder / f"{i}.png")
        folders.append(sorted(folder.iterdir()))
    parts = [DreamBoothDataset(folders[0], "a photo of <a> dog", 32),
             DreamBoothDataset(folders[1], "a photo of <b> cat", 32)]
    data = MultiSubjectDataset(parts)
    prompts = [data[i]["instance_prompt"] for i in range(len(data))]
    assert len(data) == 6
    assert prompts.count("a photo of <a> dog") == prompts.count("a photo of <b> cat") == 3


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_subjects_in_one_run(tiny_model, tmp_path, method):
    folders = []
    for name, offset in (("saya", 0), ("rex", 2)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(2):
            draw_subject(i + offset).save(folder / f"{i}.png")
        folders.append(folder)
    config = tmp_path / "config.yaml"
    config.write_text(f"""
model: {{pretrained_model: {tiny_model}, method: {method}}}
training: {{resolution: 64, max_train_steps: 3, learning_rate: 1.0e-3, seed: 0}}
dataset: {{with_prior_preservation: true, num_class_images: 2, class_inference_steps: 2}}
output: {{output_dir: out, report_to: none, checkpointing_steps: 100}}
subjects:
  - {{identifier: "<saya>", class_word: girl, instance_dir: saya, class_dir: class_girl}}
  - {{identifier: "<rex>", class_word: dog, instance_dir: rex, class_dir: class_dog}}
""")
    cfg = load_config(config)
    assert [s.instance_prompt for s in cfg.subject_list()] == ["a photo of <saya> girl", "a photo of <rex> dog"]
    train(cfg)
    out = tmp_path / "out"
    assert len(list((tmp_path / "class_girl").glob("class-*.png"))) == 2
    assert json.loads((tmp_path / "class_dog" / "dreambooth_class_images.json").read_text())["prompt"] == \
        "a photo of a dog"
    if method == "lora":
        assert sorted(load_file(str(out / TOKEN_FILE))) == ["<rex>", "<saya>"]
    else:
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
        assert {"<saya>", "<rex>"} <= set(tok.get_vocab())


def test_subject_config_errors():
    with pytest.raises(UserError) as e:
        load_config(None, {"model.pretrained_model": "m", "dataset.with_prior_preservation": True,
                           "subjects": [{"identifier": "<a>", "instance_dir": "a"},
                                        {"identifier": "<a>", "class_word": "dog", "instance_dir": "b",
                                         "class_dir": "c"}]})
    msg = str(e.value)
    assert "subjects[0].instance_prompt" in msg and "subjects[0].class_dir" in msg
    assert "subjects[1].identifier: '<a>' names two subjects" in msg


@pytest.mark.numerics
def test_several_loras_mix_at_their_weights(tiny_model, instance_dir, tmp_path):
    """Two copies of one LoRA at 0.5 each must draw what the LoRA draws at 1.0: adapters add linearly."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from dreambooth.formats.lora_loading import load_loras

    out = tmp_path / "out"
    train(lora_cfg(tiny_model, instance_dir, out, **{"training.max_train_steps": 2}))
    copy = tmp_path / "copy.safetensors"
    shutil.copy(out / LORA_FILE, copy)
    images = []
    for loras in ([(out, 1.0)], [(out, 0.5), (copy, 0.5)], [(out, 0.5)]):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_loras(pipe, loras)
        assert [str(w.message) for w in caught] == []  # not peft's "Already found a `peft_config`" for the second
        images.append(image_of(pipe))
    bound = rounding_bound(pipe, steps=3, guidance=7.5)
    assert np.abs(images[0] - images[1]).max() < bound
    assert np.abs(images[0] - images[2]).max() > 5 * bound  # and the weights do matter


@pytest.mark.parametrize("damage, says", [
    ("drop_adapter_key", "{ckpt}/pytorch_lora_weights.safetensors does not match this run's trainable weights"),
    ("drop_token_file", "{ckpt} has no {token_file} for the new identifier token(s) of this run; resume with the "
                        "identifier it was trained with."),
    ("drop_lora_file", "{ckpt} has no pytorch_lora_weights.safetensors; it was not saved by a LoRA run. Resume with "
                       "the method and adapter it was trained with."),
])
def test_resuming_from_a_damaged_lora_checkpoint_is_refused(tiny_model, instance_dir, tmp_path, damage, says):
    from safetensors.torch import save_file

    from dreambooth.errors import UserError
    from dreambooth.formats.lora import TOKEN_FILE

    extra = {"token.identifier": "<zwx>", "token.initializer": "dog", "dataset.instance_prompt": "a photo of <zwx> dog",
             "training.max_train_steps": 2}
    out = tmp_path / "out"
    train(lora_cfg(tiny_model, instance_dir, out, **extra))
    ckpt = out / "checkpoint-2"
    if damage == "drop_adapter_key":
        tensors = load_file(str(ckpt / LORA_FILE))
        del tensors[next(k for k in sorted(tensors) if k.startswith("unet.") and "lora" in k)]
        save_file(tensors, str(ckpt / LORA_FILE))
    else:
        (ckpt / (TOKEN_FILE if damage == "drop_token_file" else LORA_FILE)).unlink()
    with pytest.raises(UserError, match=re.escape(says.format(ckpt=ckpt, token_file=TOKEN_FILE))):
        train(lora_cfg(tiny_model, instance_dir, out, **{**extra, "training.max_train_steps": 4,
                                                           "output.resume_from_checkpoint": "latest"}))
