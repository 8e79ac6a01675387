"""Aspect-ratio buckets (issue 26): the buckets and each photo's by hand-checkable numbers, batches of one bucket in
an order fixed by (seed, epoch), class images cropped to their photo's bucket, SDXL's size conditioning and Flux's
packed latents per bucket, the report's list, the refusals, and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHAPED_SIZES, shaped_folder
from PIL import Image
from safetensors.torch import load_file
from test_advice import cli_run, passes_preflight, train_argv

from dreambooth.cli import main
from dreambooth.models.tiny_families import build_model
from dreambooth.training.buckets import BucketBatchSampler, assign_bucket, make_buckets
from dreambooth.training.data import DreamBoothDataset, crop_geometry

SIZES = SHAPED_SIZES


@pytest.fixture
def shaped(tmp_path):
    return shaped_folder(tmp_path / "shaped")


def test_the_buckets_of_a_resolution():
    """64 px, sides 32-128 in steps of 16: for each width the tallest height that keeps 64 x 64 = 4096 pixels or
    fewer (32 -> 128, 48 -> 80, 64 -> 64, 80 -> 48, 96 -> 32 ...), both ways round; sorted by aspect ratio."""
    buckets = make_buckets(64, 32, 128, 16)
    assert set(buckets) == {(32, 128), (32, 112), (32, 96), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32),
                            (128, 32)}
    assert buckets[0] == (32, 128) and buckets[-1] == (128, 32) and buckets[4] == (64, 64)
    assert all(w * h <= 64 * 64 and w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert make_buckets(64, 80, 128, 16) == []  # no side of 80 or more fits 4096 pixels both ways


def test_each_photo_goes_to_the_bucket_nearest_its_aspect():
    buckets = make_buckets(64, 32, 128, 16)
    assert [assign_bucket(size, buckets) for size in SIZES] == [(80, 48), (48, 80), (64, 64), (80, 48)]
    assert assign_bucket((1000, 10), buckets) == (128, 32)


def test_batches_hold_one_bucket_each_in_an_order_fixed_by_seed_and_epoch():
    buckets = [(64, 64), (80, 48), (64, 64), (80, 48), (48, 80), (64, 64), (80, 48)]
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 + 2 + 1
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)
    assert batches == list(BucketBatchSampler(buckets, batch_size=2, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_a_class_image_is_cropped_to_its_photos_bucket_and_sdxl_reads_the_bucket(shaped, tmp_path):
    photos = sorted(shaped.iterdir())
    classes = photo_files(tmp_path / "class", 2)
    buckets = [(80, 48), (48, 80), (64, 64), (80, 48)]
    data = DreamBoothDataset(photos, "a photo of sks dog", 64, class_images=classes, class_prompt="a dog",
                             buckets=buckets, seed=1)
    for index, bucket in enumerate(buckets):
        item = data[index]
        assert item["instance_pixels"].shape == item["class_pixels"].shape == (3, bucket[1], bucket[0])
        assert item["instance_geometry"][4:].tolist() == [bucket[1], bucket[0]]  # SDXL's target size (h, w)
    assert crop_geometry((120, 64), (90, 48), (5, 0), True, (80, 48)).tolist() == [64, 120, 0, 5, 48, 80]


def photo_files(folder, count):
    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.full((64, 64, 3), 40 * i, dtype="uint8")).save(folder / f"class-{i}.png")
    return sorted(folder.iterdir())


def test_buckets_reach_the_step(probe, shaped):
    """--enable_bucket: the step's batches are the photos' own shapes, one shape a batch; without it, squares."""
    bucketed = probe(dataset__instance_dir=str(shaped), dataset__enable_bucket=True, dataset__bucket_reso_steps=16,
                     training__batch_size=2, training__max_train_steps=4)
    shapes = [tuple(call["pixels"].shape[-2:]) for call in bucketed.calls]
    assert set(shapes) <= {(48, 80), (80, 48), (64, 64)} and len(set(shapes)) > 1
    square = probe(dataset__instance_dir=str(shaped), training__batch_size=2, training__max_train_steps=2)
    assert {tuple(call["pixels"].shape[-2:]) for call in square.calls} == {(64, 64)}


def test_the_bucket_range_and_step_reach_the_buckets(probe, shaped):
    """--min_bucket_reso / --max_bucket_reso / --bucket_reso_steps choose the buckets: sides of exactly 64 leave the
    square alone; steps of 32 give sides that are multiples of 32."""
    only_square = probe(dataset__instance_dir=str(shaped), dataset__enable_bucket=True, dataset__min_bucket_reso=64,
                        dataset__max_bucket_reso=64, dataset__bucket_reso_steps=16, training__max_train_steps=2)
    assert {tuple(call["pixels"].shape[-2:]) for call in only_square.calls} == {(64, 64)}
    coarse = probe(dataset__instance_dir=str(shaped), dataset__enable_bucket=True, dataset__bucket_reso_steps=32,
                   training__max_train_steps=4)
    assert all(h % 32 == 0 and w % 32 == 0 for call in coarse.calls for h, w in [call["pixels"].shape[-2:]])


def test_a_bucketed_run_resumes_bitwise_and_draws_validation_at_a_chosen_size(tiny_model, shaped, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    extra = ["--enable_bucket", "--bucket_reso_steps", "16", "--train_batch_size", "2", "--checkpointing_steps", "2",
             "--random_flip", "--caption_dropout", "0.2"]
    assert main(train_argv(tiny_model, shaped, whole, *extra, steps=4)) == 0
    assert main(train_argv(tiny_model, shaped, part, *extra, steps=2)) == 0
    assert main(train_argv(tiny_model, shaped, part, *extra, "--resume_from_checkpoint", "latest", steps=4)) == 0
    a, b = (load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")) for out in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    drawn = tmp_path / "drawn"
    assert main(train_argv(tiny_model, shaped, drawn, "--validation_prompt", "a photo of sks dog",
                           "--validation_width", "96", "--validation_height", "48", "--num_validation_images", "1",
                           "--validation_inference_steps", "1", steps=1)) == 0
    assert Image.open(drawn / "samples" / "step-000001.png").size == (96, 48)


def test_a_flux_lora_trains_on_buckets(tmp_path, shaped):
    """Flux's packed latents per bucket: sides of 16 px steps are whole 2x2 patches of latents."""
    model = build_model(tmp_path / "flux", size="flux-tiny", seed=3)
    out = tmp_path / "run"
    assert main(train_argv(model, shaped, out, "--method", "lora", "--enable_bucket", "--bucket_reso_steps", "16",
                           "--max_sequence_length", "16", steps=3)) == 0


def test_the_report_lists_the_buckets_and_bad_ranges_are_refused(tiny_model, shaped, tmp_path, capsys, monkeypatch):
    out = passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, shaped, tmp_path / "a", "--enable_bucket",
                                                            "--bucket_reso_steps", "16"))
    assert "aspect buckets (at most 64x64 pixels, sides 32-128 in steps of 16): 48x80: 1 photo, 64x64: 1 photo, " \
           "80x48: 2 photos" in out
    err = cli_run(capsys, *train_argv(tiny_model, shaped, tmp_path / "a", "--enable_bucket", "--bucket_reso_steps",
                                      "16", "--min_bucket_reso", "80"), code=2)
    assert "no bucket of at most 64x64 pixels has both sides between 80 and 128" in err
    assert "Lower --min_bucket_reso (at most 64)" in err and not (tmp_path / "a").exists()
    passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, shaped, tmp_path / "a", "--enable_bucket",
                                                      "--bucket_reso_steps", "16", "--min_bucket_reso", "64"))
    err = cli_run(capsys, *train_argv(tiny_model, shaped, tmp_path / "a", "--enable_bucket", "--bucket_reso_steps",
                                      "20"), code=2)
    assert "dataset.bucket_reso_steps: 20 is not a multiple of 8" in err and "Use 16 or 24" in err
    passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, shaped, tmp_path / "a", "--enable_bucket",
                                                      "--bucket_reso_steps", "24"))
    flux = build_model(tmp_path / "flux", size="flux-tiny", seed=3)
    err = cli_run(capsys, *train_argv(flux, shaped, tmp_path / "f", "--enable_bucket", "--bucket_reso_steps", "24"),
                  code=2)
    assert "24 is not a multiple of 16" in err and "Use 16 or 32" in err
