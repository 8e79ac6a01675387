"""The validation loss: the training loss of fixed draws, scored every validation interval, the over-fitting signal.

The set is each instance photo (its centre view, unflipped, with its caption) and as many class images, each with
`validation.loss_draws` draws of noise and timestep. The draws come from a generator of their own, seeded the same
at every scoring, so the score moves only because the weights did; the training generator and torch's global one
are never touched (the models are scored in eval mode, under no_grad), so a run with the score on trains exactly as
one without. The images' latents are drawn once, before the frozen modules leave the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with training; the report reads LOG_FILE's name without it
    import torch

LOG_FILE = "validation_loss.jsonl"  # beside train_log.jsonl: one record per scoring
SEED_OFFSET = 7_777_777  # the draws' own seed, the run's seed moved away from the training generator's


@dataclass
class ValidationLoss:
    """The fixed set (latents, prompts, geometry, which rows are class images) and how to score it."""

    latents: torch.Tensor
    prompts: list[str]
    geometry: torch.Tensor
    is_prior: torch.Tensor
    seed: int
    chunk: int

    @classmethod
    def prepare(cls, run, latent_cache) -> ValidationLoss:
        """The fixed views of the run's data, their latents drawn once from their own generator."""
        import torch

        cfg, device = run.cfg, run.accelerator.device
        views = list(run.loader.dataset.fixed_views())
        draws = cfg.validation.loss_draws
        pixels = torch.stack([v[0] for v in views])
        generator = torch.Generator(device=device).manual_seed(cfg.training.seed + SEED_OFFSET)
        with torch.no_grad():
            latents = torch.cat([latent_cache.scaled_sample(pixels[i:i + 8].to(device), [v[1] for v in views[i:i + 8]],
                                                            generator) for i in range(0, len(views), 8)])
        return cls(latents=latents.repeat_interleave(draws, dim=0),
                   prompts=[v[3] for v in views for _ in range(draws)],
                   geometry=torch.stack([v[2] for v in views]).repeat_interleave(draws, dim=0).to(device),
                   is_prior=torch.tensor([v[4] for v in views], device=device).repeat_interleave(draws),
                   seed=cfg.training.seed + SEED_OFFSET + 1, chunk=max(2 * cfg.training.batch_size, 4))

    def score(self, run, encode) -> dict[str, float]:
        """The mean loss of the instance rows and of the class rows (and their total, weighted as in training), with
        the same draws as every earlier scoring."""
        import torch

        cfg, models = run.cfg, run.models
        behaviour = models.family.behaviour()
        generator = torch.Generator(device=self.latents.device).manual_seed(self.seed)
        modules = [models.denoiser, *models.encoders()]
        modes = [m.training for m in modules]
        sums = torch.zeros(2, dtype=torch.float64)
        try:
            for m in modules:
                m.eval()  # adapters' dropout off: a score of the weights, not of a dropout draw
            with torch.no_grad(), run.accelerator.autocast():
                for start in range(0, len(self.prompts), self.chunk):
                    part = slice(start, start + self.chunk)
                    cond = encode(self.prompts[part])
                    is_prior = self.is_prior[part]
                    parts = behaviour.loss(cfg, models, self.latents[part], cond, self.geometry[part], is_prior,
                                           generator)
                    counts = torch.stack([(~is_prior).sum(), is_prior.sum()]).double().cpu()
                    sums += torch.stack([parts.instance_loss, parts.prior_loss]).double().cpu() * counts
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        counts = torch.stack([(~self.is_prior).sum(), self.is_prior.sum()]).double().cpu().clamp(min=1)
        instance, prior = (sums / counts).tolist()
        has_prior = bool(self.is_prior.any())
        total = instance + cfg.training.prior_loss_weight * prior if has_prior else instance
        record = {"step": run.global_step, "val_loss": total, "val_instance_loss": instance}
        if has_prior:
            record["val_prior_loss"] = prior
        return record


def log_score(run, record: dict) -> None:
    """One scoring to logs/validation_loss.jsonl and the trackers (main process only)."""
    if not run.accelerator.is_main_process:
        return
    path = Path(run.out) / run.cfg.output.logging_dir / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
