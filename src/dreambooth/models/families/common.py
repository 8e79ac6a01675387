"""What every family's behaviour shares: the prompts' conditioning as named tensors, and the `Behaviour` base whose
methods the training step, validation and saving call instead of branching on the family."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dreambooth.models.families import Family


@dataclass
class Conditioning:
    """A batch of prompts as the denoiser reads them: named tensors, batch first (SD: `embeds`; SDXL and the flow
    families add `pooled`). The family's `Behaviour.denoiser_kwargs` turns them into the denoiser's arguments."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self) -> list[dict[str, torch.Tensor]]:
        """One dict per prompt, for a per-prompt cache."""
        size = next(iter(self.parts.values())).shape[0]
        return [{k: v[i] for k, v in self.parts.items()} for i in range(size)]

    @classmethod
    def stack(cls, rows: list[dict[str, torch.Tensor]]) -> Conditioning:
        return cls({k: torch.stack([row[k] for row in rows]) for k in rows[0]})

    def to(self, device: torch.device) -> Conditioning:
        return Conditioning({k: v.to(device) for k, v in self.parts.items()})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.parts[name]


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class Behaviour:
    """A family's torch side. Subclasses override what their family does differently."""

    def __init__(self, family: Family) -> None:
        self.family = family

    # ------------------------------------------------------------------------------------------- prompts
    def encode(self, models, prompts: list[str], max_length: int | None = None, sequence_length: int | None = None,
               mask: bool = False) -> Conditioning:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- training
    def loss(self, cfg, models, latents: torch.Tensor, cond: Conditioning, geometry: torch.Tensor | None,
             is_prior: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None):
        """The step's loss parts (training.loss.LossParts) for a batch of scaled latents and its conditioning;
        `geometry` holds each image's (original h, w, crop top, left, target h, w), which SDXL conditions on; `mask`
        the loss mask on the latent grid, [B, 1, h, w] (dataset.masked_loss), for `training.loss.dreambooth_loss`."""
        raise NotImplementedError

    def sequence_length(self, cfg) -> int | None:
        """T5's token length for this run (the flow families); None where the family has no T5."""
        return None

    def check_config(self, cfg) -> list[str]:
        """Settings that mean nothing, or something wrong, for this family: one message each (pre-flight)."""
        return []

    # ------------------------------------------------------------------------------------------- drawing
    def pipeline(self, parts: dict):
        """The family's diffusers pipeline around the given components (validation during training)."""
        import diffusers

        return getattr(diffusers, self.family.pipeline)(**parts)

    def pipeline_extras(self, safety_checker: bool) -> dict:
        """Extra from_pretrained arguments of the family's pipeline (SD's safety checker)."""
        return {}

    def draw_defaults(self, pipe) -> dict:
        """Steps and guidance a drawing uses when the user gives none (generate, validation)."""
        return {"steps": 30, "guidance": 7.5}

    def check_drawing(self, settings) -> None:
        """A UserError for generation settings this family cannot honour (generate.GenerationSettings)."""
