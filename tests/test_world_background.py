"""The masked-loss experiment's parts (evaluation.background): photos on one shared background with masks of the
subject, read back by the world's own reader, and the measure of the background leaking into other prompts."""

from __future__ import annotations

import numpy as np
from PIL import Image
from test_advice import passes_preflight, train_argv

from dreambooth.evaluation import background, world


def test_the_photos_share_one_background_and_each_mask_covers_its_circle(tmp_path):
    folder = background.write_photos(tmp_path / "photos")
    photos = sorted(folder.glob("subject-?.png"))
    assert len(photos) == 5 and len(list(folder.glob("*.mask.png"))) == 5
    for photo in photos:
        image = Image.open(photo).convert("RGB")
        reading = world.read_image(image)
        assert reading.background == background.SHARED and reading.is_subject
        mask = np.asarray(Image.open(photo.with_name(photo.stem + ".mask.png"))) > 127
        assert 0.1 < mask.mean() < 0.6
        centre = (round(reading.y), round(reading.x))
        assert mask[centre]  # the circle's centre is learned
        assert not mask[0, 0] and not mask[-1, -1]  # the corners, background, are not


def test_the_leak_is_the_share_of_other_backgrounds_drawn_as_the_shared_one():
    prompts = [p for p, bg in world.subject_prompts() if bg and bg != background.SHARED]
    on = {bg: world.draw(world.Scene("circle", None, bg, 16, 16, 8, pattern=True)) for bg in world.BACKGROUNDS}
    asked = {p: [on[bg]] for p, bg in world.subject_prompts() if bg}
    assert background.background_leak(asked) == 0.0
    leaked = {p: [on[background.SHARED]] for p, _ in world.subject_prompts()}
    assert background.background_leak(leaked) == 1.0
    half = {p: [on[background.SHARED]] if i % 2 else [on[p.rsplit(" ", 2)[-2]]] for i, p in enumerate(prompts)}
    assert background.background_leak(half) == sum(i % 2 for i in range(len(prompts))) / len(prompts)


def test_its_masks_pass_pre_flight(tiny_model, tmp_path, capsys, monkeypatch):
    folder = background.write_photos(tmp_path / "photos")
    out = passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, folder, tmp_path / "run", "--masked_loss",
                                                            "--resolution", "32"))
    assert "masks: 5 of 5 photos (5 from NAME.mask.png" in out
