"""Masked loss (issue 26): NAME.mask.png beside NAME.png or the photo's alpha channel, checked at pre-flight (a mask of
another size, an empty one, a stray one, none at all: exit 2, nothing written); the mask follows its photo's crop and
flip; mask files are never trained as photos; every family takes it on its latent grid (Flux and SD3 unpacked); the
graph-ready step carries it as one more buffer; a masked run resumes bitwise. The loss formula is pinned in
tests/test_loss.py, its wiring in tests/test_wiring.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import UNET_FILE, photo_folder
from PIL import Image
from safetensors.torch import load_file
from test_advice import cli_run, passes_preflight, train_argv

from dreambooth.cli import main
from dreambooth.training.data import DreamBoothDataset, collate_examples
from dreambooth.training.masks import read_masks


@pytest.fixture
def photos(tmp_path):
    return photo_folder(tmp_path / "photos", 3)


def names(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".png" and not p.name.endswith(".mask.png"))


def left_black(photo, width=None, height=None, *, mode="L"):
    """A mask beside `photo`: black over the left half (ignore), white elsewhere (learn)."""
    w, h = Image.open(photo).size
    w, h = width or w, height or h
    mask = np.full((h, w), 255, dtype=np.uint8)
    mask[:, : w // 2] = 0
    path = photo.with_name(photo.stem + ".mask.png")
    Image.fromarray(mask).convert(mode).save(path)
    return path


def with_alpha(photo, transparent_rows: int):
    """The photo with its top rows fully transparent."""
    image = Image.open(photo).convert("RGBA")
    alpha = np.full(image.size[::-1], 255, dtype=np.uint8)
    alpha[:transparent_rows] = 0
    image.putalpha(Image.fromarray(alpha))
    image.save(photo)


# --------------------------------------------------------------------------------------------------- reading them
def test_a_mask_file_or_the_alpha_channel_is_the_mask(photos):
    first, second, _ = names(photos)
    left_black(first, mode="RGB")  # any mode is read as grayscale
    with_alpha(second, transparent_rows=24)  # 48 of 72 rows learned: 2/3
    masks = read_masks(photos, names(photos), masked_loss=True, rejected=[])
    assert masks.problems == [] and masks.by_photo == {first: "file", second: "alpha"}
    assert masks.coverage == pytest.approx({first: 0.5, second: 2 / 3})
    assert masks.describe(3) == ("masks: 2 of 3 photos (1 from NAME.mask.png, 1 from alpha); mean coverage 58%; the "
                                 "others are learned everywhere")
    # a mask file wins over the alpha channel: it was drawn for the purpose
    left_black(second)
    assert read_masks(photos, names(photos), masked_loss=True, rejected=[]).by_photo[second] == "file"
    off = read_masks(photos, names(photos), masked_loss=False, rejected=[])
    assert off.by_photo == {} and len(off.unused) == 2
    assert off.describe(3).startswith("masks: 2 mask file(s) (NAME.mask.png) found, unused; pass --masked_loss")


def test_every_bad_mask_is_named_with_what_to_do(photos, tmp_path):
    first, second, third = shown = names(photos)
    left_black(first, width=50)  # another size than its 72x72 photo
    Image.new("L", (72, 72), 0).save(second.with_name(second.stem + ".mask.png"))  # nothing to learn
    with_alpha(third, transparent_rows=72)  # transparent everywhere
    Image.new("L", (72, 72), 255).save(photos / "nobody.mask.png")  # no photo of that name
    (photos / "broken.png").write_text("not an image")  # rejected by the scan: its mask is no stray
    Image.new("L", (72, 72), 255).save(photos / "broken.mask.png")
    problems = read_masks(photos, shown, masked_loss=True, rejected=[photos / "broken.png"]).problems
    assert problems == [
        f"{photos / 'nobody.mask.png'}: no photo of that name beside it, so it masks nothing; name it after its photo "
        "(dog-1.mask.png for dog-1.jpg) or delete it",
        f"{first.with_name(first.stem + '.mask.png')}: the mask is 50x72 but its photo {first.name} is 72x72; resize "
        "the mask to 72x72 or delete it",
        f"{second.with_name(second.stem + '.mask.png')}: the mask is black everywhere, so nothing of {second.name} "
        "would be learned; paint what should be learned white, or delete the mask",
        f"{third}: transparent everywhere, and its alpha channel is its mask, so nothing of it would be learned; give "
        f"it a {third.stem}.mask.png or take it out of the folder"]


def test_a_mask_drawn_on_a_photo_before_its_exif_turn_is_named_so(tmp_path):
    folder = tmp_path / "turned"
    folder.mkdir()
    photo = folder / "cat.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees: upright it is 60 wide and 80 high
    Image.new("RGB", (80, 60), (120, 80, 40)).save(photo, exif=exif)
    left_black(photo)  # drawn on the 80x60 pixels as stored
    problem, = read_masks(folder, [photo], masked_loss=True, rejected=[]).problems
    assert "the mask is 80x60 but its photo cat.jpg is 60x80 (it is the photo's size turned by 90 degrees" in problem


# --------------------------------------------------------------------------------------------------- in the data
def test_the_mask_follows_its_photos_crop_and_flip(tmp_path):
    """A photo whose red channel is its mask (random noise, so any misplaced crop or flip shows): across epochs of
    random crops and flips, each example's mask is exactly the red channel of its pixels. A photo without a mask is
    learned everywhere, and so is a class image; without masked loss no batch carries a mask."""
    folder = tmp_path / "noise"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (64, 96), dtype=np.uint8)
    rgb = np.stack([noise, np.full_like(noise, 90), np.full_like(noise, 30)], axis=-1)
    Image.fromarray(rgb).save(folder / "a.png")
    Image.fromarray(noise).save(folder / "a.mask.png")
    Image.fromarray(rgb[:, ::-1].copy()).save(folder / "b.png")  # no mask
    Image.fromarray(rgb).save(folder / "class.png")
    dataset = DreamBoothDataset([folder / "a.png", folder / "b.png"], "a photo of sks dog", 64, random_flip=True,
                                class_images=[folder / "class.png"], class_prompt="a photo of a dog", seed=3,
                                masked_loss=True)
    views = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        example = dataset[0]
        red = torch.round((example["instance_pixels"][0] + 1) * 127.5) / 255
        assert torch.equal(example["instance_mask"][0], red)
        views.add(example["instance_key"].split("|", 2)[2])  # "left,top|flip"
        assert torch.equal(dataset[1]["instance_mask"], torch.ones(1, 64, 64))
    assert len(views) > 4 and {v[-1] for v in views} == {"0", "1"}  # several crops, flipped and not
    batch = collate_examples([dataset[0], dataset[1]])
    assert batch["loss_mask"].shape == (4, 1, 64, 64) and batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["loss_mask"][2:].eq(1).all()
    plain = DreamBoothDataset([folder / "a.png"], "a photo of sks dog", 64, random_flip=True)
    assert "loss_mask" not in collate_examples([plain[0]])


# --------------------------------------------------------------------------------------------------- pre-flight
def test_mask_files_are_not_photos_and_the_report_says_what_masked_loss_would_do(tiny_model, photos, tmp_path, capsys,
                                                                                  monkeypatch):
    first, second, _ = names(photos)
    left_black(first)
    with_alpha(second, transparent_rows=36)
    out = passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, photos, tmp_path / "a"))
    assert "3 usable, 0 rejected" in out
    assert "masks: 1 mask file(s) (NAME.mask.png) found, unused; pass --masked_loss to learn only their white" in out
    out = passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, photos, tmp_path / "a", "--masked_loss"))
    assert "3 usable, 0 rejected" in out
    assert "masks: 2 of 3 photos (1 from NAME.mask.png, 1 from alpha); mean coverage 50%; the others are learned " \
        "everywhere" in out
    # kohya's --alpha_mask is the same switch
    out = passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, photos, tmp_path / "a", "--alpha_mask"))
    assert "masks: 2 of 3 photos" in out


def test_a_bad_mask_or_none_at_all_stops_the_run_before_anything_is_written(tiny_model, photos, tmp_path, capsys,
                                                                            monkeypatch):
    out = tmp_path / "run"
    err = cli_run(capsys, *train_argv(tiny_model, photos, out, "--masked_loss"), code=2)
    assert f"dataset.masked_loss: no photo in {photos} has a mask" in err and "or drop --masked_loss" in err
    assert not out.exists()
    passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, photos, out))  # the suggestion: without it
    mask = left_black(names(photos)[0], width=64, height=70)
    err = cli_run(capsys, *train_argv(tiny_model, photos, out, "--masked_loss"), code=2)
    assert f"{mask}: the mask is 64x70 but its photo {names(photos)[0].name} is 72x72; resize the mask to 72x72" in err
    assert "no photo in" not in err  # a mask is there, only a bad one
    assert not out.exists() and sorted(p.name for p in photos.iterdir()) == sorted(
        [p.name for p in names(photos)] + [mask.name])
    left_black(names(photos)[0])  # resized to its photo's 72x72, as the message says: the run is accepted
    assert "masks: 1 of 3 photos (1 from NAME.mask.png)" in passes_preflight(
        capsys, monkeypatch, *train_argv(tiny_model, photos, out, "--masked_loss"))


# --------------------------------------------------------------------------------------------------- training
def test_a_masked_run_resumes_bitwise(tiny_model, photos, tmp_path):
    first, second, _ = names(photos)
    left_black(first)
    with_alpha(second, transparent_rows=30)
    whole, part = tmp_path / "whole", tmp_path / "part"
    extra = ["--masked_loss", "--checkpointing_steps", "2", "--random_flip"]
    assert main(train_argv(tiny_model, photos, whole, *extra, steps=4)) == 0
    assert main(train_argv(tiny_model, photos, part, *extra, steps=2)) == 0
    assert main(train_argv(tiny_model, photos, part, *extra, "--resume_from_checkpoint", "latest", steps=4)) == 0
    a, b = (load_file(str(out / UNET_FILE)) for out in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("size", ["sdxl-tiny", "flux-tiny", "sd3-tiny"])
def test_every_family_takes_the_mask_on_its_latent_grid(size, tmp_path, monkeypatch):
    """SDXL through SD's loss, Flux and SD3 through the flow families' loss on the unpacked latents [B, C, h, w]: the
    mask arrives on that grid, black on its left half, and a LoRA run with it trains."""
    from dreambooth.models.families import sd, transformer
    from dreambooth.models.tiny_families import build_model

    model = build_model(tmp_path / size, size=size, seed=3)
    photos = photo_folder(tmp_path / "photos", 2, size=64)
    for photo in names(photos):
        left_black(photo)
    seen = []
    for module in (sd, transformer):
        def spy(pred, target, is_prior, prior_loss_weight, weights=None, mask=None, real=module.dreambooth_loss):
            seen.append((pred.shape, mask))
            return real(pred, target, is_prior, prior_loss_weight, weights, mask)

        monkeypatch.setattr(module, "dreambooth_loss", spy)
    out = tmp_path / "run"
    assert main(train_argv(model, photos, out, "--masked_loss", "--method", "lora", "--center_crop")) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file() and len(seen) == 2
    for shape, mask in seen:
        b, _, h, w = shape
        assert mask.shape == (b, 1, h, w)
        assert mask[..., : w // 2].eq(0).all() and mask[..., w // 2:].eq(1).all()


@pytest.mark.numerics
def test_the_graph_ready_step_carries_the_mask_as_a_buffer(tiny_model, photos, tmp_path, monkeypatch):
    """The step the CUDA graph captures (eager over its static buffers on the CPU) stages the mask beside the latents
    and trains what the eager loop trains with it."""
    from dreambooth.training import graph_step
    from dreambooth.training import loop as train_module

    for photo in names(photos):
        left_black(photo)
    staged, real = [], graph_step.StaticStep._micro

    def watched(self, inputs):
        staged.append(inputs.loss_mask)
        return real(self, inputs)

    extra = ["--masked_loss", "--random_flip", "--gradient_accumulation_steps", "2"]
    with monkeypatch.context() as m:
        m.setattr(train_module, "graph_plan", lambda cfg, device, processes: (True, "forced by the test"))
        m.setattr(graph_step.StaticStep, "_micro", watched)
        assert main(train_argv(tiny_model, photos, tmp_path / "static", *extra, steps=3)) == 0
    assert len(staged) == 6 and all(mask is not None and mask.shape == (1, 1, 16, 16) for mask in staged)
    assert main(train_argv(tiny_model, photos, tmp_path / "eager", *extra, "--cuda_graph", "off", steps=3)) == 0
    a, b = (load_file(str(tmp_path / out / UNET_FILE)) for out in ("static", "eager"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
