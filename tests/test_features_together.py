"""Issue 26's features on at once: captions with dropout, aspect buckets, masked loss, the EMA, the validation loss
and each optimizer; stopped and resumed, the run ends bitwise where the unstopped one does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHAPED_SIZES, shaped_folder
from PIL import Image
from safetensors.torch import load_file
from test_advice import train_argv

from dreambooth.cli import main


@pytest.fixture
def captioned(tmp_path):
    """Photos of four shapes, each with its own caption; two with a loss mask (the left half black)."""
    folder = shaped_folder(tmp_path / "photos")
    for i, (w, h) in enumerate(SHAPED_SIZES):
        (folder / f"photo-{i}.txt").write_text(f"a photo of sks dog, view {i}")
        if i % 2 == 0:
            mask = np.full((h, w), 255, dtype="uint8")
            mask[:, : w // 2] = 0
            Image.fromarray(mask).save(folder / f"photo-{i}.mask.png")
    return folder


@pytest.mark.parametrize("optimizer,lr", [("adamw", "1e-3"), ("prodigy", "1.0"), ("lion", "1e-4")])
def test_everything_on_resumes_bitwise(optimizer, lr, tiny_model, captioned, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    extra = ["--optimizer", optimizer, "--learning_rate", lr, "--caption_dropout", "0.3", "--enable_bucket",
             "--bucket_reso_steps", "16", "--train_batch_size", "2", "--random_flip", "--use_ema", "--masked_loss",
             "--validation_loss", "--validation_steps", "2", "--checkpointing_steps", "2",
             "--identifier", "<zq_dog>", "--initializer", "dog", "--instance_prompt", "a photo of <zq_dog> dog"]
    for photo in captioned.glob("*.txt"):
        photo.write_text(photo.read_text().replace("sks", "<zq_dog>"))
    assert main(train_argv(tiny_model, captioned, whole, *extra, steps=4)) == 0
    assert main(train_argv(tiny_model, captioned, part, *extra, steps=2)) == 0
    assert main(train_argv(tiny_model, captioned, part, *extra, "--resume_from_checkpoint", "latest", steps=4)) == 0
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = (load_file(str(out / name)) for out in (whole, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logs = [(out / "logs" / "validation_loss.jsonl").read_text() for out in (whole, part)]
    assert logs[0] == logs[1]
