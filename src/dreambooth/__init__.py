"""DreamBooth fine-tuning of Stable Diffusion: train, generate, measure."""

__version__ = "0.1.0"
