"""Frozen modules off the GPU once cached (training.offload): the plan, the caches filled up front so that no step
calls the VAE or a frozen text encoder, the same weights as a run that keeps them, and validation drawing with
them back. On the CPU `on` pre-encodes (there is nowhere to move them); the memory it saves is a GPU figure
(tests/test_gpu.py, bench/gpu.sh)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import draw_subject
from safetensors.torch import load_file

from dreambooth.config_file import load_config
from dreambooth.training import offload as offload_module
from dreambooth.training.data import DreamBoothDataset
from dreambooth.training.loop import train
from dreambooth.training.offload import offload_plan

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def values(model, photos, out, **extra):
    return {"model.pretrained_model": str(model), "dataset.instance_dir": str(photos),
            "dataset.instance_prompt": "a photo of sks dog", "training.resolution": 64, "training.seed": 0,
            "training.max_train_steps": 4, "training.learning_rate": 1e-3, "dataset.center_crop": True,
            "dataset.random_flip": True, "output.output_dir": str(out), "output.report_to": "none", **extra}


def wide_photos(folder):
    folder.mkdir()
    for i in range(2):
        draw_subject(i).resize((96, 72)).save(folder / f"wide-{i}.png")
    return folder


def plan(tiny_model, instance_dir, device="cuda", trains_text=False, **extra):
    cfg = load_config(None, values(tiny_model, instance_dir, "o", **extra))
    models = SimpleNamespace(text_trains=trains_text, text_sides=lambda: [("text_encoder",)])
    dataset = DreamBoothDataset(sorted(instance_dir.iterdir()), "a photo of sks dog", 64,
                                center_crop=cfg.dataset.center_crop, random_flip=cfg.dataset.random_flip)
    return offload_plan(cfg, models, dataset, device)


def test_the_plan_moves_what_its_caches_make_idle_and_says_why_the_rest_stays(tiny_model, instance_dir):
    assert plan(tiny_model, instance_dir)[0] == ["text_encoder", "vae"]
    assert plan(tiny_model, instance_dir, device="cpu")[0] == []  # auto: CUDA only
    assert plan(tiny_model, instance_dir, device="cpu", **{"training.offload_frozen": "on"})[0] == [
        "text_encoder", "vae"]
    assert plan(tiny_model, instance_dir, **{"training.offload_frozen": "off"})[0] == []
    names, why = plan(tiny_model, instance_dir, trains_text=True)
    assert names == ["vae"] and "the text encoder trains" in why
    names, why = plan(tiny_model, instance_dir, **{"training.latent_cache": "off"})
    assert names == ["text_encoder"] and "latent_cache is off" in why
    # square photos have one crop at any size; random crops of wide ones are too many to list: the VAE stays
    assert plan(tiny_model, instance_dir, **{"dataset.center_crop": False})[0] == ["text_encoder", "vae"]
    names, why = plan(tiny_model, wide_photos(instance_dir.parent / "wide"), **{"dataset.center_crop": False})
    assert names == ["text_encoder"] and "random crops" in why


def test_views_are_every_crop_and_flip_a_batch_can_hold(instance_dir):
    photos = sorted(instance_dir.iterdir())
    flipping = DreamBoothDataset(photos, "p", 64, center_crop=True, random_flip=True)
    flipped = list(flipping.views())
    assert flipping.view_count() == len(flipped) == 2 * len(photos)
    assert len({key for _, key in flipped}) == 2 * len(photos)
    by_key = dict((key, pixels) for pixels, key in flipped)
    dataset = DreamBoothDataset(photos, "p", 64, center_crop=True, random_flip=True, seed=3)
    for epoch in range(6):  # every item a batch gets is one of the views, pixel for pixel
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            assert torch.equal(by_key[item["instance_key"]], item["instance_pixels"])
    assert DreamBoothDataset(photos, "p", 64, center_crop=False).view_count() == len(photos)  # square: one crop
    wide = sorted(wide_photos(instance_dir.parent / "wide").iterdir())
    assert DreamBoothDataset(wide, "p", 64, center_crop=False).view_count() is None
    assert len(list(DreamBoothDataset(wide, "p", 64, center_crop=True).views())) == len(wide)


@pytest.mark.parametrize("extra", [{}, {"model.method": "lora", "token.identifier": "<zq>",
                                         "token.initializer": "dog", "dataset.instance_prompt": "a photo of <zq> dog"}])
def test_offloaded_run_trains_the_same_weights_without_calling_the_frozen_modules(tiny_model, instance_dir, tmp_path,
                                                                                  monkeypatch, extra):
    """After the caches are filled, a step that called the VAE or the frozen text encoder would fail here."""
    kept = tmp_path / "kept"
    train(load_config(None, values(tiny_model, instance_dir, kept, **extra, **{"training.offload_frozen": "off"})))
    moved_to = []
    prepare = offload_module.FrozenOffload.prepare

    def prepare_then_forbid(self, dataset, encode, latent_cache, generator):
        prepare(self, dataset, encode, latent_cache, generator)
        moved_to.append(list(self.names))

        def refuse(*args, **kwargs):
            raise AssertionError("a frozen module was called after its outputs were cached")
        for name in self.names:
            module = getattr(self.models, name)
            monkeypatch.setattr(module, "encode" if name == "vae" else "forward", refuse)

    monkeypatch.setattr(offload_module.FrozenOffload, "prepare", prepare_then_forbid)
    moved = tmp_path / "moved"
    train(load_config(None, values(tiny_model, instance_dir, moved, **extra, **{"training.offload_frozen": "on"})))
    assert moved_to == [["vae"]] if extra else [["text_encoder", "vae"]]  # a new token trains the text side
    if extra:
        a, b = (load_file(str(p / "pytorch_lora_weights.safetensors")) for p in (kept, moved))
    else:
        a, b = (load_file(str(p / UNET_FILE)) for p in (kept, moved))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_draws_with_the_modules_back_and_they_leave_again(tiny_model, instance_dir, tmp_path, monkeypatch):
    from dreambooth.training import loop as loop_module

    events = []
    real_move, real_validate = offload_module.FrozenOffload._move, loop_module.validate
    monkeypatch.setattr(offload_module.FrozenOffload, "_move", lambda self, device: events.append(
        "home" if device is self.device else "away") or real_move(self, device))
    monkeypatch.setattr(loop_module, "validate", lambda run: events.append("validate") or real_validate(run))
    out = tmp_path / "run"
    train(load_config(None, values(tiny_model, instance_dir, out, **{
        "training.offload_frozen": "on", "validation.prompts": ["a photo of sks dog"], "validation.steps": 2,
        "validation.num_images": 1, "validation.num_inference_steps": 2})))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert events == ["away", "home", "validate", "away", "home", "validate", "away"]


def test_offload_setting_reaches_the_loop(tiny_model, instance_dir, tmp_path, monkeypatch):
    seen = []
    real = offload_module.offload_plan

    def watch(cfg, models, dataset, device_type):
        names, why = real(cfg, models, dataset, device_type)
        seen.append(names)
        return names, why

    monkeypatch.setattr("dreambooth.training.loop.offload_plan", watch)
    for setting in ("on", "off", "auto"):
        train(load_config(None, values(tiny_model, instance_dir, tmp_path / setting, **{
            "training.offload_frozen": setting, "training.max_train_steps": 1})))
    assert seen == [["text_encoder", "vae"], [], []]  # auto on a CPU: nothing to move to
