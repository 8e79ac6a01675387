"""The versions of Python and the libraries a result was made with, recorded in every run folder and export."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

LIBRARIES = ("dreambooth", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "numpy", "Pillow")


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
