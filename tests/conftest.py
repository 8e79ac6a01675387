"""Shared fixtures: one tiny model per session, synthetic subject photos, and a CLI runner."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from PIL import Image, ImageDraw

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from dreambooth.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory):
    from dreambooth.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_v") / "model", prediction_type="v_prediction", seed=1)


def draw_subject(i: int, size: int = 72) -> Image.Image:
    image = Image.new("RGB", (size, size), (30 + 40 * i, 120, 200 - 30 * i))
    draw = ImageDraw.Draw(image)
    draw.rectangle([8 + 4 * i, 10, 40 + 4 * i, 50 - 2 * i], fill=(220, 30, 30))
    draw.ellipse([40 - 3 * i, 30, 66 - 3 * i, 60], fill=(250, 220, 40))
    return image


@pytest.fixture
def instance_dir(tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    for i in range(4):
        draw_subject(i).save(folder / f"photo-{i}.png")
    return folder


@pytest.fixture(scope="session")
def class_dir_cache(tmp_path_factory):
    """Class images generated once per session; tests copy the folder (manifest included) to reuse them."""
    return tmp_path_factory.mktemp("class_cache") / "class"


@pytest.fixture
def class_dir(tmp_path, class_dir_cache):
    folder = tmp_path / "class"
    if class_dir_cache.exists():
        shutil.copytree(class_dir_cache, folder)
    return folder


def remember_class_dir(folder, cache):
    if not cache.exists():
        shutil.copytree(folder, cache)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if training gets as far as loading weights (or setting up a run at all)."""
    from dreambooth.training import components
    from dreambooth.training import loop as train_module

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(components, "load_models", refuse)
    monkeypatch.setattr(train_module, "load_models", refuse)
    monkeypatch.setattr(train_module, "setup", refuse)
