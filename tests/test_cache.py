"""The latent cache: keyed by image and augmentation, so shuffled batches always get their own images' latents."""

from __future__ import annotations

import pytest
import torch
from conftest import draw_subject
from torch.utils.data import DataLoader

from dreambooth.config_file import load_config
from dreambooth.training.cache import LatentCache
from dreambooth.training.components import EpochSampler
from dreambooth.training.data import DreamBoothDataset, collate_examples, prepare_image
from dreambooth.training.images import load_image
from dreambooth.training.loop import train


def vae_of(model):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model / "vae")


def photo_set(tmp_path, name, count, offset):
    folder = tmp_path / name
    folder.mkdir()
    for i in range(count):
        draw_subject(i + offset).save(folder / f"{i}.png")
    return sorted(folder.iterdir())


def test_cached_latents_are_the_vae_latents_of_that_very_image_and_flip(tiny_model, tmp_path):
    instance, classes = photo_set(tmp_path, "inst", 3, 0), photo_set(tmp_path, "cls", 2, 5)
    data = DreamBoothDataset(instance, "a photo of sks dog", 64, class_images=classes, class_prompt="a dog",
                             center_crop=True, random_flip=True, seed=3)
    sampler = EpochSampler(len(data), seed=3)
    loader = DataLoader(data, batch_size=2, sampler=sampler, collate_fn=collate_examples)
    vae = vae_of(tiny_model)
    cache = LatentCache(vae, "memory")
    generator = torch.Generator().manual_seed(0)
    orders = []
    for epoch in range(6):  # shuffled differently every epoch
        sampler.set_epoch(epoch)
        data.set_epoch(epoch)
        orders.append(list(sampler))
        for batch in loader:
            cache.sample(batch["pixel_values"], batch["cache_keys"], generator)
    assert len({tuple(o) for o in orders}) > 1, "the order never changed: the test would prove nothing"
    assert len(cache) == 2 * (3 + 2), "every image, flipped and not, has exactly one entry"
    assert cache.hits > 0
    with torch.no_grad():
        for key, (mean, std) in cache.memory.items():
            path, _, _, flip = key.split("|")
            image = load_image(path.rsplit("@", 1)[0])
            pixels = prepare_image(image, 64, center_crop=True, flip=flip == "1", crop_rng=None)
            truth = vae.encode(pixels[None]).latent_dist
            assert torch.equal(mean, truth.mean[0]) and torch.equal(std, truth.std[0]), key


def test_a_cached_sample_is_what_the_vae_would_sample(tiny_model, tmp_path):
    """Same generator state in, same latents out: caching changes no number of a run."""
    vae = vae_of(tiny_model)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        direct = torch.cat([vae.encode(pixels[i:i + 1]).latent_dist.sample(torch.Generator().manual_seed(i))
                            for i in range(2)])
    cache = LatentCache(vae, "memory")
    cache.sample(pixels, ["a", "b"], torch.Generator())  # fills the cache
    again = torch.cat([cache.sample(pixels[i:i + 1], [k], torch.Generator().manual_seed(i))
                       for i, k in enumerate("ab")])
    assert torch.equal(direct, again)


def test_disk_cache_survives_a_new_process(tiny_model, tmp_path):
    vae = vae_of(tiny_model)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    first = LatentCache(vae, "disk", tmp_path / "lc", salt="m")
    a = first.sample(pixels, ["x", "y"], torch.Generator().manual_seed(1))
    second = LatentCache(vae, "disk", tmp_path / "lc", salt="m")
    b = second.sample(pixels, ["x", "y"], torch.Generator().manual_seed(1))
    assert second.misses == 0 and second.hits == 2 and torch.equal(a, b)
    other_model = LatentCache(vae, "disk", tmp_path / "lc", salt="another model")
    other_model.sample(pixels, ["x"], torch.Generator())
    assert other_model.misses == 1


@pytest.mark.numerics
def test_training_with_and_without_the_cache_agrees(tiny_model, instance_dir, tmp_path):
    from safetensors.torch import load_file

    weights = {}
    for mode in ("memory", "off"):
        out = tmp_path / mode
        train(load_config(None, {
            "model.pretrained_model": str(tiny_model), "dataset.instance_dir": str(instance_dir),
            "dataset.instance_prompt": "a photo of sks dog", "dataset.random_flip": True,
            "training.resolution": 64, "training.max_train_steps": 6, "training.learning_rate": 1e-3,
            "training.seed": 0, "training.latent_cache": mode, "output.output_dir": str(out),
            "output.report_to": "none"}))
        weights[mode] = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(weights["memory"][k], weights["off"][k], atol=1e-5) for k in weights["off"])
