"""The VAE latent cache: each augmented training image is encoded once, then reused for every later step.

Entries are keyed by what the image IS (file, resolution, crop corner, flip: the key `data.DreamBoothDataset`
gives each item), never by step or batch position: diffusers' `--cache_latents` encoded the first epoch's
batches in order and replayed them, pairing latents with the wrong captions once shuffling changed the order
(#14430).

What is stored is the encoder's distribution (mean and std), not a sample: each step still draws its own
sample with the run's generator, exactly as `latent_dist.sample(generator)` does, so a cached run computes the
same numbers as an uncached one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from dreambooth.formats.atomic import save_safetensors_atomic
from dreambooth.training.speed import convolution_kernels


class LatentCache:
    """Latent distributions per cache key, in device memory or, for large class sets, in files on disk."""

    def __init__(self, vae: torch.nn.Module, mode: str, disk_dir: Path | None = None, salt: str = "") -> None:
        self.vae, self.mode, self.disk_dir, self.salt = vae, mode, disk_dir, salt
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0
        if mode == "disk":
            disk_dir.mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def sample(self, pixels: torch.Tensor, keys: list[str], generator: torch.Generator) -> torch.Tensor:
        """Latents (before the VAE scaling factor) for a batch: cached distributions, fresh noise."""
        from diffusers.utils.torch_utils import randn_tensor

        if self.mode == "off":
            return self._encode(pixels).sample(generator)
        found = [self._get(k, generator.device) for k in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        for i in missing:
            # one image at a time: an entry must not depend on which images shared its batch (kernels may round
            # differently per batch size), or a resumed run, whose cache starts empty, would drift
            dist = self._encode(pixels[i:i + 1])
            found[i] = (dist.mean[0].to(generator.device), dist.std[0].to(generator.device))
            self._put(keys[i], found[i])
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        mean = torch.stack([m for m, _ in found])
        std = torch.stack([s for _, s in found])
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    def scaled_sample(self, pixels: torch.Tensor, keys: list[str], generator: torch.Generator) -> torch.Tensor:
        """`sample` in fp32, shifted and scaled as the VAE's config says: the latents the denoiser trains on (SD's VAEs
        have a scaling factor only; Flux's and SD3's a shift too, as their pipelines undo when decoding)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (self.sample(pixels, keys, generator).float() - shift) * self.vae.config.scaling_factor

    def _encode(self, pixels: torch.Tensor):
        # On the VAE's device, which is the CPU once training.offload moved it there (a miss after that is slow,
        # not wrong). Always oneDNN's convolutions on a CPU: the VAE sees whole images, where they are the faster
        # ones, while the training loop may have switched to PyTorch's native kernels for the UNet's small latents
        # (training.cpu_convolution). One choice also keeps every entry computed the same way.
        with convolution_kernels("onednn"):
            return self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist

    def _file(self, key: str) -> Path:
        return self.disk_dir / (hashlib.sha256((self.salt + key).encode()).hexdigest()[:32] + ".safetensors")

    def _get(self, key: str, device: torch.device):
        if self.mode == "memory":
            return self.memory.get(key)
        file = self._file(key)
        if not file.is_file():
            return None
        data = load_file(str(file), device=str(device) if device.type != "cpu" else "cpu")
        return data["mean"], data["std"]

    def _put(self, key: str, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.mode == "memory":
            self.memory[key] = (entry[0].detach(), entry[1].detach())
        elif self.mode == "disk":
            save_safetensors_atomic({"mean": entry[0].cpu(), "std": entry[1].cpu()}, self._file(key))

    def __len__(self) -> int:
        return len(self.memory)
