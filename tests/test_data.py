"""Image folder checks, decoding of awkward files, cropping, and the deterministic training dataset."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import draw_subject
from PIL import Image

from dreambooth.errors import UserError
from dreambooth.training.data import DreamBoothDataset, collate_examples, prepare_image
from dreambooth.training.images import check_instance_folder, find_near_duplicates, load_image, scan_image_folder


def photo(seed: int, size=(96, 80)) -> Image.Image:
    """A smooth random RGB image: structure at every scale, like a photo, and different for each seed."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def reasons(report, fatal):
    return {issue.path.name: issue.reason for issue in report.issues if issue.fatal == fatal}


# ---------------------------------------------------------------------------------------------- scanning


def test_scan_accepts_normal_jpeg_and_png_in_sorted_order(tmp_path):
    photo(1).save(tmp_path / "b.png")
    photo(2).save(tmp_path / "a.jpg", quality=95)

    report = scan_image_folder(tmp_path, resolution=64)

    assert report.usable == [tmp_path / "a.jpg", tmp_path / "b.png"]
    assert report.issues == []
    assert report.near_duplicates == []


def test_scan_skips_hidden_files_silently_and_says_which_subfolders_it_did_not_search(tmp_path):
    """A subfolder of photos was skipped without a word: its images are not used, and the report now says so."""
    photo(1).save(tmp_path / "subject.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1binary junk")
    photo(2).save(tmp_path / ".hidden.png")
    (tmp_path / "nested").mkdir()
    photo(3).save(tmp_path / "nested" / "other.png")
    photo(4).save(tmp_path / "nested" / "more.jpg")
    (tmp_path / "replaced-20261207-010101").mkdir()  # class images moved aside by the tool itself

    report = scan_image_folder(tmp_path, resolution=64)

    assert report.usable == [tmp_path / "subject.png"]
    assert report.issues == [] and report.subfolders == [(tmp_path / "nested", 2)]
    assert "skipped   nested/: a subfolder with 2 image file(s)" in report.format("instance images")
    assert "replaced-" not in report.format("instance images")


def test_scan_rejects_empty_truncated_and_text_files_with_reasons(tmp_path):
    photo(1).save(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    noisy.save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_text("this is a caption, not a picture\n")
    (tmp_path / "readme.txt").write_text("hello\n")

    report = scan_image_folder(tmp_path, resolution=64)

    assert report.usable == [tmp_path / "good.png"]
    assert reasons(report, fatal=True) == {
        "empty.jpg": "empty file (0 bytes)",
        "half.jpg": "truncated or corrupt image",
        "notes.png": "not an image (text file named .png)",
        "readme.txt": "not an image",
    }


def test_scan_accepts_image_content_whatever_the_extension(tmp_path):
    photo(1).save(tmp_path / "really_a_png.jpg", format="PNG")
    photo(2).save(tmp_path / "no_extension", format="PNG")

    report = scan_image_folder(tmp_path, resolution=64)

    assert report.usable == [tmp_path / "no_extension", tmp_path / "really_a_png.jpg"]
    assert report.rejected() == []


def test_image_smaller_than_resolution_is_usable_with_a_note(tmp_path):
    photo(1, size=(100, 80)).save(tmp_path / "tiny.png")

    report = scan_image_folder(tmp_path, resolution=128)

    assert report.usable == [tmp_path / "tiny.png"]
    assert "smaller than the training resolution (100x80 < 128)" in reasons(report, fatal=False)["tiny.png"]


def test_report_format_names_label_counts_and_files(tmp_path):
    photo(1).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("nope")

    text = scan_image_folder(tmp_path, resolution=64).format("instance images")

    assert text.splitlines()[0] == f"instance images ({tmp_path}): 1 usable, 1 rejected"
    assert "bad.png: not an image (text file named .png)" in text
    assert "folder does not exist" in scan_image_folder(tmp_path / "gone", 64).format("class images")


# ---------------------------------------------------------------------------------------------- decoding


def test_cmyk_jpeg_becomes_rgb_with_a_note(tmp_path):
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=95)

    report = scan_image_folder(tmp_path, resolution=64)
    image = load_image(tmp_path / "print.jpg")

    assert report.usable == [tmp_path / "print.jpg"]
    assert "CMYK" in reasons(report, fatal=False)["print.jpg"]
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((32, 32))
    assert red > 230 and green < 25 and blue < 25


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535]] * 64, dtype=np.uint16).repeat(22, axis=1)
    Image.fromarray(values).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"

    report = scan_image_folder(tmp_path, resolution=64)
    pixels = np.asarray(load_image(tmp_path / "depth.png"))

    assert "16-bit" in reasons(report, fatal=False)["depth.png"]
    assert pixels.shape == (64, 66, 3)
    assert tuple(pixels[0, [0, 22, 44], 0]) == (0, 128, 255)


def test_palette_transparency_is_composited_on_white(tmp_path):
    palette_image = Image.new("P", (64, 64), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_image.paste(1, (0, 0, 32, 64))  # left half red, right half index 0 = transparent black
    palette_image.save(tmp_path / "logo.png", transparency=0)

    report = scan_image_folder(tmp_path, resolution=64)
    image = load_image(tmp_path / "logo.png")

    assert "flattened onto white" in reasons(report, fatal=False)["logo.png"]
    assert image.getpixel((10, 10)) == (255, 0, 0)
    assert image.getpixel((50, 10)) == (255, 255, 255)


def test_rgba_is_composited_on_white_and_opaque_alpha_needs_no_note(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 128))
    rgba.paste((200, 0, 0, 0), (0, 0, 32, 64))
    rgba.save(tmp_path / "cutout.png")
    Image.new("RGBA", (64, 64), (10, 20, 30, 255)).save(tmp_path / "opaque.png")

    report = scan_image_folder(tmp_path, resolution=64)
    image = load_image(tmp_path / "cutout.png")

    assert image.getpixel((10, 10)) == (255, 255, 255)  # fully transparent: white, not its hidden red
    assert all(abs(channel - 127) <= 1 for channel in image.getpixel((50, 10)))  # half black over white
    assert set(reasons(report, fatal=False)) == {"cutout.png"}
    assert load_image(tmp_path / "opaque.png").getpixel((0, 0)) == (10, 20, 30)


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display needs a 90 degree clockwise turn
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)

    report = scan_image_folder(tmp_path, resolution=16)
    upright = load_image(tmp_path / "phone.jpg")

    assert upright.size == (20, 40)
    red, _, blue = upright.getpixel((10, 5))  # the left half is now on top
    assert red > 200 and blue < 50
    assert "EXIF" in reasons(report, fatal=False)["phone.jpg"]


def test_load_image_raises_user_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_text("not an image")

    with pytest.raises(UserError, match="broken.png.*not an image"):
        load_image(path)


# ---------------------------------------------------------------------------------------------- near-duplicates


def test_near_duplicates_found_for_reencoded_copy_not_for_different_images(tmp_path):
    photo(1, size=(200, 160)).save(tmp_path / "a.png")
    photo(1, size=(200, 160)).resize((150, 120)).save(tmp_path / "a_copy.jpg", quality=60)
    photo(2, size=(200, 160)).save(tmp_path / "b.png")
    photo(3, size=(200, 160)).save(tmp_path / "c.png")

    report = scan_image_folder(tmp_path, resolution=64)
    paths = [tmp_path / name for name in ("a.png", "b.png", "c.png", "a_copy.jpg")]

    assert report.near_duplicates == [(tmp_path / "a.png", tmp_path / "a_copy.jpg")]
    assert find_near_duplicates(paths) == [(tmp_path / "a.png", tmp_path / "a_copy.jpg")]
    assert "a.png and a_copy.jpg look like near-duplicates" in report.format("instance images")


def test_the_hash_size_sets_how_fine_a_difference_counts(tmp_path):
    """Columns darkened in a 2-pixel stripe vanish in an 8 x 8 hash (each cell averages 14 columns) and show in a
    64 x 64 one: a duplicate at the default size, two images at the finer one."""
    ramp = np.tile(np.linspace(0, 255, 128), (128, 1))
    striped = ramp.copy()
    striped[:, 0:64:2] -= 40
    for name, values in (("ramp.png", ramp), ("striped.png", striped)):
        Image.fromarray(values.clip(0, 255).astype(np.uint8)).convert("RGB").save(tmp_path / name)
    paths = [tmp_path / "ramp.png", tmp_path / "striped.png"]
    assert find_near_duplicates(paths) == [tuple(paths)]
    assert find_near_duplicates(paths, hash_size=64) == []


def test_flat_images_of_different_brightness_are_not_duplicates(tmp_path):
    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "white.png")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "black.png")

    assert find_near_duplicates([tmp_path / "white.png", tmp_path / "black.png"]) == []


# ---------------------------------------------------------------------------------------------- folder checks


def test_check_instance_folder_missing(tmp_path):
    folder = tmp_path / "instance"

    with pytest.raises(UserError, match=f"{folder} does not exist.*photos of your subject"):
        check_instance_folder(scan_image_folder(folder, resolution=64))


def test_check_instance_folder_empty_mentions_subfolders(tmp_path):
    (tmp_path / ".keep").write_text("")
    with pytest.raises(UserError, match=f"{tmp_path} holds no image files\\. Put 3-10 photos"):
        check_instance_folder(scan_image_folder(tmp_path, resolution=64))

    (tmp_path / "photos").mkdir()
    photo(1).save(tmp_path / "photos" / "x.png")
    with pytest.raises(UserError, match="subfolders are not searched"):
        check_instance_folder(scan_image_folder(tmp_path, resolution=64))


def test_check_instance_folder_with_only_non_images_names_each_file(tmp_path):
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "b.png").write_text("oops")
    (tmp_path / "c.jpg").write_bytes(b"")

    with pytest.raises(UserError) as raised:
        check_instance_folder(scan_image_folder(tmp_path, resolution=64))

    message = str(raised.value)
    assert f"{tmp_path} holds 3 files but none is a usable image" in message
    assert "a.txt (not an image), b.png (not an image (text file named .png)), c.jpg (empty file (0 bytes))" in message
    assert message.endswith("Put 3-10 photos of your subject (JPEG/PNG/WebP) there.")


def test_check_instance_folder_min_images(tmp_path):
    photo(1).save(tmp_path / "one.png")
    report = scan_image_folder(tmp_path, resolution=64)

    check_instance_folder(report)
    with pytest.raises(UserError, match="holds only 1 usable image\\(s\\), 3 needed"):
        check_instance_folder(report, min_images=3)


# ---------------------------------------------------------------------------------------------- pixels


def test_prepare_image_shape_dtype_and_range():
    tensor = prepare_image(photo(1, size=(300, 200)), 64, center_crop=False, flip=False, crop_rng=random.Random(0))

    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert tensor.min() < -0.5 and tensor.max() > 0.5  # really spans the range, not squeezed into [0, 1]


@pytest.mark.numerics
def test_prepare_image_center_crop_takes_the_middle_columns():
    columns = np.arange(8, dtype=np.uint8) * 30  # column x has value 30x; short side 4 = resolution: no resize
    image = Image.fromarray(np.stack([np.tile(columns, (4, 1))] * 3, axis=-1))

    tensor = prepare_image(image, 4, center_crop=True, flip=False, crop_rng=None)

    expected = torch.tensor([60, 90, 120, 150], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(tensor, expected.expand(3, 4, 4))


def test_prepare_image_resizes_short_side_and_flip_mirrors():
    image = photo(4, size=(120, 240))  # short side 120 -> 60, then a 60x60 centre crop of 60x120

    plain = prepare_image(image, 60, center_crop=True, flip=False, crop_rng=None)
    flipped = prepare_image(image, 60, center_crop=True, flip=True, crop_rng=None)

    assert torch.equal(flipped, plain.flip(dims=[2]))
    assert not torch.equal(flipped, plain)


def test_prepare_image_random_crop_needs_a_generator_and_uses_it():
    image = photo(5, size=(200, 64))
    with pytest.raises(ValueError, match="crop_rng"):
        prepare_image(image, 64, center_crop=False, flip=False, crop_rng=None)

    crops = {prepare_image(image, 64, center_crop=False, flip=False, crop_rng=random.Random(s)).sum().item()
             for s in range(5)}
    assert len(crops) > 1


# ---------------------------------------------------------------------------------------------- dataset


@pytest.fixture
def image_sets(tmp_path):
    instance = [tmp_path / f"instance_{i}.png" for i in range(2)]
    classes = [tmp_path / f"class_{i}.png" for i in range(5)]
    for seed, path in enumerate(instance + classes):
        photo(seed, size=(96, 64)).save(path)
    return instance, classes


def test_dataset_pairs_instance_with_class_examples(image_sets):
    instance, classes = image_sets
    dataset = DreamBoothDataset(instance, "a sks dog", 32, class_images=classes, class_prompt="a dog", center_crop=True)

    assert len(dataset) == 5
    example = dataset[3]
    assert example["instance_prompt"] == "a sks dog" and example["class_prompt"] == "a dog"
    assert torch.equal(example["instance_pixels"], dataset[1]["instance_pixels"])  # 3 % 2 instance images
    assert example["class_pixels"].shape == (3, 32, 32)

    alone = DreamBoothDataset(instance, "a sks dog", 32, center_crop=True)
    assert len(alone) == 2 and set(alone[0]) == {"instance_pixels", "instance_prompt", "instance_key",
                                                 "instance_geometry"}


def test_dataset_augmentation_depends_only_on_seed_epoch_and_index(image_sets):
    instance, classes = image_sets
    options = dict(class_images=classes, class_prompt="a dog", random_flip=True, seed=7)
    first = DreamBoothDataset(instance, "a sks dog", 32, **options)
    second = DreamBoothDataset(instance, "a sks dog", 32, **options)

    first.set_epoch(3)
    second.set_epoch(3)
    for index in (4, 0, 2):  # any order: resuming mid-epoch must not depend on what was drawn before
        assert torch.equal(first[index]["instance_pixels"], second[index]["instance_pixels"])
        assert torch.equal(first[index]["class_pixels"], second[index]["class_pixels"])

    per_epoch = []
    for epoch in range(6):
        first.set_epoch(epoch)
        per_epoch.append(first[0]["instance_pixels"])
    assert any(not torch.equal(per_epoch[0], other) for other in per_epoch[1:])


def test_dataset_augmentation_is_the_same_in_another_process(image_sets):
    """hash() of a str is salted per process; the item seed must not use it, or a resumed run differs."""
    instance, _ = image_sets
    code = (
        "import sys; from pathlib import Path; from dreambooth.training.data import DreamBoothDataset\n"
        "d = DreamBoothDataset([Path(p) for p in sys.argv[1:]], 'x', 32, random_flip=True, seed=3)\n"
        "for epoch in range(4):\n"
        "    d.set_epoch(epoch); print(*(float(d[i]['instance_pixels'].double().sum()) for i in range(2)))\n"
    )
    here = DreamBoothDataset(instance, "x", 32, random_flip=True, seed=3)
    expected = []
    for epoch in range(4):
        here.set_epoch(epoch)
        expected += [float(here[i]["instance_pixels"].double().sum()) for i in range(2)]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code, *map(str, instance)], env=env, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert [float(value) for value in result.stdout.split()] == expected


def test_collate_puts_instance_rows_first_then_class_rows():
    def example(value):
        return {
            "instance_pixels": torch.full((3, 4, 4), value),
            "instance_prompt": f"instance {value}",
            "instance_key": f"i{value}",
            "instance_geometry": torch.full((6,), value),
            "class_pixels": torch.full((3, 4, 4), -value),
            "class_prompt": f"class {value}",
            "class_key": f"c{value}",
            "class_geometry": torch.full((6,), -value),
        }

    batch = collate_examples([example(0.25), example(0.5)])

    assert batch["pixel_values"].shape == (4, 3, 4, 4) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].is_contiguous()
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.25, 0.5, -0.25, -0.5]
    assert batch["prompts"] == ["instance 0.25", "instance 0.5", "class 0.25", "class 0.5"]
    assert batch["cache_keys"] == ["i0.25", "i0.5", "c0.25", "c0.5"]
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["geometry"][:, 0].tolist() == [0.25, 0.5, -0.25, -0.5]

    alone = collate_examples([{"instance_pixels": torch.zeros(3, 4, 4), "instance_prompt": "x", "instance_key": "k",
                               "instance_geometry": torch.zeros(6)}])
    assert alone["pixel_values"].shape == (1, 3, 4, 4) and alone["is_prior"].tolist() == [False]


@pytest.mark.parametrize("mode, values, want", [
    ("I;16", [0, 257 * 100, 257 * 200], [0, 100, 200]),  # 16-bit: the whole range onto 8 bits, not stretched
    ("I", [0, 257 * 100, 257 * 200], [0, 100, 200]),     # 32-bit integer holding 16-bit values: the same
    ("I", [1000, 65535], [4, 255]),                      # ... up to 65535 exactly
    ("I", [1000, 65536], [0, 255]),                      # beyond: what is there, stretched
    ("I", [-100, 0, 300], [0, 64, 255]),                 # negative: stretched
    ("F", [0.25, 0.5], [64, 128]),                       # float in [0, 1]: times 255, not stretched
    ("F", [0.0, 0.5], [0, 128]),
    ("F", [0.5, 1.0], [128, 255]),                       # ... up to 1 exactly
    ("F", [1.5, 2.0], [0, 255]),                         # a range narrower than 1, stretched
    ("F", [0.0, 0.75, 1.5], [0, 128, 255]),              # float beyond 1 (HDR): stretched
])
def test_high_depth_grayscale_scales_by_its_mode(mode, values, want):
    from dreambooth.training.images import _high_depth_to_l

    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(np.array([values], dtype=dtype))
    assert image.mode == mode
    gray = _high_depth_to_l(image)
    assert gray.mode == "L" and np.asarray(gray).tolist() == [want]


@pytest.mark.parametrize("name, content, says", [
    ("a.heic", b"\0\0\0 ftypheic", "HEIC is not readable by this Pillow build"),
    ("a.heif", b"\0\0\0 ftypheif", "HEIF is not readable by this Pillow build"),
    ("a.avif", b"\0\0\0 ftypavif", "AVIF is not readable by this Pillow build"),
    ("notes.png", b"just some words\n", "not an image (text file named .png)"),
    ("blob.png", b"abc\0def", "not an image (unrecognised content named .png)"),  # UTF-8, but a NUL: not text
    ("blank.png", b"   \n", "not an image (unrecognised content named .png)"),
    ("latin.png", "café".encode("latin-1"), "not an image (unrecognised content named .png)"),
    ("notes.txt", b"just some words\n", "not an image"),
    ("long.png", b"word " * 300 + b"\0", "not an image (text file named .png)"),  # judged by its first 1 KB
    ("blob.bin", b"abc\0def", "not an image (unrecognised content)"),
])
def test_what_a_file_that_is_not_an_image_is_called(tmp_path, name, content, says):
    from dreambooth.training.images import _not_an_image_reason

    (tmp_path / name).write_bytes(content)
    reason = _not_an_image_reason(tmp_path / name)
    assert reason == says or (says.endswith("Pillow build") and reason.startswith(says))


def test_several_subjects_move_to_the_next_epoch_together(tmp_path):
    from dreambooth.training.data import MultiSubjectDataset

    photos = []
    for i in range(2):
        draw_subject(i).save(tmp_path / f"p{i}.png")
        photos.append(tmp_path / f"p{i}.png")
    parts = [DreamBoothDataset([p], "a photo of sks dog", 64, random_flip=True, seed=i) for i, p in enumerate(photos)]
    both = MultiSubjectDataset(parts)
    both.set_epoch(5)
    assert [part.epoch for part in parts] == [5, 5]
    with pytest.raises(ValueError, match="^at least one subject is needed$"):
        MultiSubjectDataset([])
