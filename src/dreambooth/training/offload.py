"""Frozen modules off the GPU once their outputs are cached: the text encoders after the run's few prompts are
encoded, the VAE after every view a batch can hold is encoded.

Why: a LoRA run trains adapters of a few MB, yet keeps the whole frozen pipeline on the GPU. SD 1.5's text encoder
and VAE are 0.25 and 0.17 GB in bf16 (SDXL's two text encoders 1.6 GB), while the issue's goal for a LoRA run is
4 GiB at 512 px, and the run measured 4.38 GB with them resident (docs/bench.md). Nothing is lost: a DreamBooth run
has two prompts per subject, and with a centre crop (or photos already square at the resolution) each image has
one or two views (the flip), so everything they would compute is in the prompt and latent caches before step one.
Validation draws with the whole pipeline: the modules come back for it and leave again.

What stays: a text encoder that trains (its output changes every step), and the VAE when random crops make the
views too many to list (the latent cache then fills as batches come, and needs the VAE).
"""

from __future__ import annotations

import contextlib

import torch


def offload_plan(cfg, models, dataset, device_type: str) -> tuple[list[str], str]:
    """Which frozen modules leave the device once cached ("text_encoder", "text_encoder_2", "vae"), and why, in one
    line. `training.offload_frozen`: auto does it on CUDA only (on a CPU there is nowhere else to put them), on also
    pre-encodes on a CPU (the modules stay where they are), off never."""
    setting = cfg.training.offload_frozen
    if setting == "off" or (setting == "auto" and device_type != "cuda"):
        return [], f"frozen modules stay on the {device_type}: training.offload_frozen is {setting}"
    names, kept = [], []
    if models.text_trains:
        kept.append("the text encoder trains")
    else:
        names += [name for name, *_ in models.text_sides()]
    if cfg.training.latent_cache == "off":
        kept.append("the VAE encodes every step (training.latent_cache is off)")
    elif dataset.view_count() is None:
        kept.append("the VAE is needed for random crops (dataset.center_crop, or photos square at the resolution, "
                    "lets it go)")
    else:
        names.append("vae")
    why = f"off the device once cached: {', '.join(names) or 'nothing'}"
    return names, why + (f" (kept: {'; '.join(kept)})" if kept else "")


class FrozenOffload:
    """Fills the prompt and latent caches, then moves the planned modules to the CPU; `resident()` brings them back
    for a block (validation)."""

    def __init__(self, models, names: list[str], device: torch.device) -> None:
        self.models, self.names, self.device = models, names, device

    def modules(self) -> list[torch.nn.Module]:
        return [getattr(self.models, name) for name in self.names]

    def prepare(self, dataset, encode, latent_cache, generator: torch.Generator) -> None:
        """Encodes every prompt and view of `dataset`, then sends the modules away."""
        if not self.names:
            return
        if "vae" in self.names:
            # the cache keeps each view's distribution; the sample drawn here is thrown away, from a generator of its
            # own, so the run's generator (and with it every later number) is untouched
            scratch = torch.Generator(device=generator.device).manual_seed(0)
            for pixels, key in dataset.views():
                latent_cache.sample(pixels[None], [key], scratch)
        if any(name != "vae" for name in self.names):
            encode(dataset.prompts())
        self._move(torch.device("cpu"))

    def _move(self, device: torch.device) -> None:
        for module in self.modules():
            module.to(device)
        if device.type == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def resident(self):
        """The modules on the device for the block (a validation draws with the whole pipeline)."""
        if not self.names:
            yield
            return
        self._move(self.device)
        try:
            yield
        finally:
            self._move(torch.device("cpu"))
