"""The CPU fast path: which convolution kernels a run picks, and that the choice changes no result."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import draw_subject, unet_after_two_steps

from dreambooth.config_file import load_config
from dreambooth.training import loop as train_module
from dreambooth.training.cache import LatentCache
from dreambooth.training.data import prepare_image
from dreambooth.training.images import load_image
from dreambooth.training.speed import convolution_kernels, cpu_convolution


def kernels_for(resolution, batch_size=1, prior=True, choice="auto", vae_levels=4, device="cpu"):
    cfg = load_config(None, {"model.pretrained_model": "m", "dataset.instance_dir": "i",
                             "dataset.instance_prompt": "a photo of sks dog", "output.output_dir": "o",
                             "dataset.with_prior_preservation": prior, "dataset.class_dir": "c",
                             "dataset.class_prompt": "a dog", "training.resolution": resolution,
                             "training.batch_size": batch_size, "training.cpu_convolution": choice})
    models = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[1] * vae_levels)))
    return cpu_convolution(cfg, models, torch.device(device))


def test_auto_picks_native_kernels_only_for_few_small_latents():
    assert kernels_for(128) == "native"  # SD's VAE (factor 8): 1 + 1 images of 16x16 = 512 latent pixels
    assert kernels_for(128, prior=False, batch_size=4) == "native"  # 4 x 256 = 1024, the threshold itself
    assert kernels_for(128, batch_size=3) == "onednn"  # 6 x 256
    assert kernels_for(256) == "onednn"  # 2 x 32x32
    assert kernels_for(512) == "onednn"
    assert kernels_for(32, vae_levels=2) == "native"  # the world model: factor 2, 2 x 16x16


def test_an_explicit_choice_is_kept_and_a_gpu_gets_none():
    assert kernels_for(512, choice="native") == "native"
    assert kernels_for(128, choice="onednn") == "onednn"
    assert kernels_for(128, device="meta") is None


def test_kernel_choice_is_restored_after_the_block_even_on_error():
    before = torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError), convolution_kernels("native"):
        assert torch.backends.mkldnn.enabled is False
        raise RuntimeError("boom")
    assert torch.backends.mkldnn.enabled == before
    with convolution_kernels(None):
        assert torch.backends.mkldnn.enabled == before


@pytest.mark.numerics
def test_native_kernels_compute_the_same_convolutions():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    results = []
    for kind in ("onednn", "native"):
        with convolution_kernels(kind):
            conv.zero_grad()
            x.grad = None
            y = conv(x)
            y.square().sum().backward()
            results.append((y.detach(), x.grad.clone(), conv.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.numerics
def test_training_with_either_kernels_gives_the_same_weights(tiny_model, instance_dir, tmp_path, monkeypatch):
    seen = []
    real_loop = train_module.loop

    def spy(run, start, stop):
        seen.append(torch.backends.mkldnn.enabled)
        real_loop(run, start, stop)

    monkeypatch.setattr(train_module, "loop", spy)
    a = unet_after_two_steps(tiny_model, instance_dir, tmp_path / "a", cpu_convolution="onednn")
    b = unet_after_two_steps(tiny_model, instance_dir, tmp_path / "b", cpu_convolution="native")
    assert seen == [True, False], "the loop did not run with the chosen kernels"
    assert torch.backends.mkldnn.enabled, "the run left the process on native kernels"
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_the_latent_cache_encodes_with_the_default_kernels_whatever_the_loop_uses(tiny_model, tmp_path):
    """Entries are exactly the VAE's latents under torch's default kernels, also inside a native-kernel loop."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model / "vae")
    path = tmp_path / "photo.png"
    draw_subject(0).save(path)
    pixels = prepare_image(load_image(path), 64, center_crop=True, flip=False, crop_rng=None)
    cache = LatentCache(vae, "memory")
    with convolution_kernels("native"):
        cache.sample(pixels[None], ["k"], torch.Generator().manual_seed(0))
        assert torch.backends.mkldnn.enabled is False, "encoding must not leave the loop's choice changed"
    with torch.no_grad():
        truth = vae.encode(pixels[None]).latent_dist
    assert torch.equal(cache.memory["k"][0], truth.mean[0]) and torch.equal(cache.memory["k"][1], truth.std[0])


@pytest.mark.numerics
def test_clipping_folded_into_fused_adamw_gives_accelerates_weights(tiny_model, instance_dir, tmp_path, monkeypatch):
    """A tiny max_grad_norm so every step clips; then the same weights as accelerate's clip_grad_norm_."""
    scales = []
    real_call = train_module.GradientClipping.__call__

    def spy(self):
        real_call(self)
        scales.append(None if self.fused_into is None else float(self.fused_into.grad_scale))

    monkeypatch.setattr(train_module.GradientClipping, "__call__", spy)
    a = unet_after_two_steps(tiny_model, instance_dir, tmp_path / "a", max_grad_norm=1e-3)
    real_init = train_module.GradientClipping.__init__

    def unfused(self, *args):
        real_init(self, *args)
        self.fused_into = None

    monkeypatch.setattr(train_module.GradientClipping, "__init__", unfused)
    b = unet_after_two_steps(tiny_model, instance_dir, tmp_path / "b", max_grad_norm=1e-3)
    assert len(scales) == 4 and all(s > 1 for s in scales[:2]), f"the fused path did not clip: {scales}"
    assert scales[2:] == [None, None]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
