"""The training step against values computed here, independently, from the papers' formulas.

`training_step` wires the models, the latent cache, the noise, the timesteps, the target, Min-SNR and prior
preservation together. Each combination below is recomputed in this file from first principles (the noise
schedule from its config, DDPM's forward process, the v-prediction target, Min-SNR-gamma's weights) with the same
random draws, so a slip in the wiring (the epsilon target for a v-prediction model, weights that never reach the
loss, a prior weight ignored, offset noise dropped) changes the step's loss and fails here.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dreambooth.config_file import load_config
from dreambooth.training.cache import LatentCache
from dreambooth.training.components import PromptEncoder, load_models
from dreambooth.training.loop import training_step

INSTANCE, CLASS = "a photo of sks dog", "a photo of dog"


def alphas_cumprod_from_config(config) -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule: betas evenly spaced in sqrt, then squared (Rombach et al. 2022)."""
    assert config.beta_schedule == "scaled_linear"
    betas = torch.linspace(math.sqrt(config.beta_start), math.sqrt(config.beta_end), config.num_train_timesteps,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def by_hand(models, pixels, prompts, is_prior, seed, *, offset, gamma, prior_weight):
    """The loss of one DreamBooth step, with the draws in training_step's order: latent sample, noise, its offset,
    timesteps."""
    g = torch.Generator().manual_seed(seed)
    vae, unet = models.vae, models.unet
    with torch.no_grad():
        dists = [vae.encode(pixels[i:i + 1]).latent_dist for i in range(len(pixels))]
        mean = torch.cat([d.mean for d in dists])
        std = torch.cat([d.std for d in dists])
        x0 = (mean + std * torch.randn(mean.shape, generator=g)) * vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=g)
        if offset:
            noise = noise + offset * torch.randn(x0.shape[:2] + (1, 1), generator=g)
        t = torch.randint(0, unet.config.get("num_train_timesteps", 1000), (len(x0),), generator=g)
        acp = alphas_cumprod_from_config(models.noise_scheduler.config)[t].float().view(-1, 1, 1, 1)
        noisy = acp.sqrt() * x0 + (1 - acp).sqrt() * noise
        v_pred = models.noise_scheduler.config.prediction_type == "v_prediction"
        target = acp.sqrt() * noise - (1 - acp).sqrt() * x0 if v_pred else noise
        ids = models.tokenizer(prompts, padding="max_length", max_length=models.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
        pred = unet(noisy, t, models.text_encoder(ids)[0]).sample
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = (acp / (1 - acp)).flatten()
        per_sample = per_sample * torch.minimum(snr, torch.tensor(gamma)) / (snr + 1 if v_pred else snr)
    instance = per_sample[~is_prior].mean()
    prior = per_sample[is_prior].mean() if is_prior.any() else torch.tensor(0.0)
    return instance + prior_weight * prior, instance, prior


_MODELS: dict = {}


def loaded_models(cfg, prediction):
    """One load per model: the options varied here change the step, not what the models are."""
    if prediction not in _MODELS:
        _MODELS[prediction] = load_models(cfg, [], torch.float32)
    return _MODELS[prediction]


@pytest.fixture(scope="module")
def pixels():
    g = torch.Generator().manual_seed(0)
    return torch.rand((2, 3, 64, 64), generator=g) * 2 - 1


@pytest.mark.parametrize("prediction, gamma, prior, offset",
                         list(itertools.product(["epsilon", "v_prediction"], [None, 5.0], [False, True], [0.0, 0.1])))
def test_the_step_computes_the_papers_loss(request, pixels, prediction, gamma, prior, offset):
    model = request.getfixturevalue("tiny_model" if prediction == "epsilon" else "tiny_model_v")
    cfg = load_config(None, {"model.pretrained_model": str(model), "dataset.instance_prompt": INSTANCE,
                             "dataset.class_prompt": CLASS, "dataset.with_prior_preservation": prior,
                             "training.snr_gamma": gamma, "training.noise_offset": offset,
                             "training.prior_loss_weight": 0.7, "training.resolution": 64})
    models = loaded_models(cfg, prediction)
    rows = 2 if prior else 1
    batch = {"pixel_values": pixels[:rows], "prompts": [INSTANCE, CLASS][:rows],
             "is_prior": torch.tensor([False, True][:rows]), "cache_keys": [f"k{i}" for i in range(rows)]}
    got = training_step(cfg, models, batch, PromptEncoder(cfg, models, torch.device("cpu")),
                        LatentCache(models.vae, "memory"), torch.Generator().manual_seed(11))
    want = by_hand(models, batch["pixel_values"], batch["prompts"], batch["is_prior"], 11, offset=offset,
                   gamma=gamma, prior_weight=0.7 if prior else 0.0)
    for name, value, expected in zip(("loss", "instance_loss", "prior_loss"), (got.loss, got.instance_loss,
                                                                             got.prior_loss), want):
        assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7), name
