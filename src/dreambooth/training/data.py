"""The training data: images cropped and flipped into tensors, the dataset of instance and class examples, and
the batching that keeps subjects in balance. The files were checked by `training.images`.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dreambooth.training.captions import drop_caption
from dreambooth.training.images import load_image
from dreambooth.training.masks import load_mask

# ---------------------------------------------------------------------------------------------- pixels


def crop_origin(size: tuple[int, int], resolution: int, *, center_crop: bool,
                crop_rng: random.Random | None) -> tuple[int, int]:
    """Top-left corner of the crop of an image already resized to short side == resolution."""
    width, height = size
    if center_crop:
        return (width - resolution) // 2, (height - resolution) // 2
    if crop_rng is None:
        raise ValueError("prepare_image needs crop_rng for a random crop (or center_crop=True)")
    return crop_rng.randint(0, width - resolution), crop_rng.randint(0, height - resolution)


def prepare_image(
    image: Image.Image, resolution: int, *, center_crop: bool, flip: bool, crop_rng: random.Random | None,
    origin: tuple[int, int] | None = None,
) -> torch.Tensor:
    """RGB image -> float32 [3, resolution, resolution] in [-1, 1]: short side resized, cropped, maybe mirrored.

    The crop is at `origin` when given, else centred if `center_crop`, else at an offset drawn from `crop_rng`.
    `flip` mirrors left-right; the caller draws it, so this function is deterministic given its arguments.
    """
    if image.mode != "RGB":
        raise ValueError(f"prepare_image expects an RGB image (use load_image), got mode {image.mode}")
    image = _resize_short_side(image, resolution)
    left, top = origin or crop_origin(image.size, resolution, center_crop=center_crop, crop_rng=crop_rng)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def prepare_mask(mask: Image.Image | None, resolution: int, origin: tuple[int, int], flip: bool) -> torch.Tensor:
    """A loss mask (8-bit grayscale, already resized as its photo) cropped at the photo's `origin` and mirrored with
    it: float32 [1, resolution, resolution] in [0, 1]. None, a photo without a mask: ones, learned everywhere."""
    if mask is None:
        return torch.ones(1, resolution, resolution)
    left, top = origin
    mask = mask.crop((left, top, left + resolution, top + resolution))
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def crop_geometry(original: tuple[int, int], resized: tuple[int, int], origin: tuple[int, int], flip: bool,
                  resolution: int) -> torch.Tensor:
    """Where a training image came from: its original height and width, the crop's top-left corner (y, x) in the
    resized image, and the target height and width. SDXL conditions on exactly these six numbers (its
    `add_time_ids`, Podell et al. 2023, "size and crop conditioning"); the other families ignore them.

    A mirrored crop is described in the mirrored image, as diffusers' SDXL script does (it flips before it crops):
    its left edge is the resized width minus the crop's right edge.
    """
    left, top = origin
    if flip:
        left = resized[0] - left - resolution
    return torch.tensor([original[1], original[0], top, left, resolution, resolution], dtype=torch.float32)


def _load_resized(paths: list[Path], resolution: int) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    """Images decoded and resized (short side = resolution), with their original (width, height)."""
    images, sizes = [], []
    for path in paths:
        image = load_image(path)
        sizes.append(image.size)
        images.append(_resize_short_side(image, resolution))
    return images, sizes


def _load_masks(paths: list[Path], images: list[Image.Image]) -> list[Image.Image | None]:
    """Each photo's loss mask (training.masks), resized to its resized photo (`images`), so that one crop box and
    one flip place both. Bilinear, not the photo's Lanczos: the same pixel grid, without Lanczos' ringing, so a
    hard edge stays in [0, 255] and a soft one stays soft."""
    masks = []
    for path, image in zip(paths, images):
        found = load_mask(path)
        mask = None if found is None else found[0]
        if mask is not None and mask.size != image.size:
            mask = mask.resize(image.size, Image.Resampling.BILINEAR)
        masks.append(mask)
    return masks


def _resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    if min(width, height) == resolution:
        return image
    scale = resolution / min(width, height)
    # max() keeps the long side from rounding below the crop size.
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


# ---------------------------------------------------------------------------------------------- dataset


def _item_rng(*key: object) -> random.Random:
    """A generator that depends only on `key`: sha256 of its repr, since hash() of a str changes per process."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class DreamBoothDataset(Dataset):
    """Instance examples, each paired with a class (prior-preservation) example when class images are given.

    Images are decoded once in __init__ and kept in memory already resized (short side = resolution), so
    an item only crops and flips. Augmentation is a pure function of (seed, epoch, index): call set_epoch
    before iterating each epoch, and resuming mid-epoch reproduces exactly the same pixels. With `masked_loss`,
    each photo's mask (training.masks) is kept beside it and cropped and flipped with it (`instance_mask`).
    """

    def __init__(
        self,
        instance_images: list[Path],
        instance_prompt: str,
        resolution: int,
        *,
        class_images: list[Path] | None = None,
        class_prompt: str | None = None,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        captions: list[str | None] | None = None,
        caption_dropout: float = 0.0,
        masked_loss: bool = False,
    ):
        if not instance_images:
            raise ValueError("DreamBoothDataset needs at least one instance image")
        if class_images is not None and (not class_images or class_prompt is None):
            raise ValueError("class_images must be non-empty and come with a class_prompt")
        self.instance_prompt = instance_prompt
        # each photo's own caption (training.captions), else the instance prompt
        self.captions = [c or instance_prompt for c in (captions or [None] * len(instance_images))]
        if len(self.captions) != len(instance_images):
            raise ValueError("captions must give one entry (or None) per instance image")
        self.caption_dropout = caption_dropout
        self.class_prompt = class_prompt
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        # a file's modification time is part of its cache key, so an edited photo is encoded again
        self._paths = {role: [f"{p}@{Path(p).stat().st_mtime_ns}" for p in paths]
                       for role, paths in (("instance", instance_images), ("class", class_images or []))}
        self._instance, self._instance_sizes = _load_resized(instance_images, resolution)
        self._class, self._class_sizes = _load_resized(class_images or [], resolution)
        self._masks = _load_masks(instance_images, self._instance) if masked_loss else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self._instance), len(self._class))

    def __getitem__(self, index: int) -> dict:
        i, origin, flip = self._placement(index, "instance")
        pixels, key, geometry = self._view("instance", i, origin, flip)
        example = {"instance_pixels": pixels, "instance_prompt": self._caption(index), "instance_key": key,
                   "instance_geometry": geometry}
        if self._masks is not None:  # the photo's own crop and flip: the mask weighs the pixels it covers
            example["instance_mask"] = prepare_mask(self._masks[i], self.resolution, origin, flip)
        if self._class:
            pixels, key, geometry = self._view("class", *self._placement(index, "class"))
            example.update(class_pixels=pixels, class_prompt=self.class_prompt, class_key=key,
                           class_geometry=geometry)
        return example

    def _caption(self, index: int) -> str:
        """The photo's caption, or "" when caption dropout draws this example this epoch (a draw of its own, so
        the crops and flips are the same with dropout on or off)."""
        if drop_caption(self.seed, self.epoch, index, self.caption_dropout):
            return ""
        return self.captions[index % len(self.captions)]

    def _placement(self, index: int, role: str) -> tuple[int, tuple[int, int], bool]:
        """Which image of `role` item `index` shows this epoch, where it is cropped and whether it is mirrored: a
        draw that depends only on (seed, epoch, index, role)."""
        images = self._instance if role == "instance" else self._class
        image = images[index % len(images)]
        rng = _item_rng(self.seed, self.epoch, index, role)
        flip = self.random_flip and rng.random() < 0.5
        origin = crop_origin(image.size, self.resolution, center_crop=self.center_crop,
                             crop_rng=None if self.center_crop else rng)
        return index % len(images), origin, flip

    def _view(self, role: str, i: int, origin: tuple[int, int], flip: bool) -> tuple[torch.Tensor, str, torch.Tensor]:
        """Image `i` of `role` cropped at `origin`, maybe mirrored: its pixels, a key naming exactly them (image file,
        crop corner, flip), and its size conditioning (`crop_geometry`).

        The key is what a latent cache may be indexed by; it never depends on step or batch position. The
        conditioning follows from the key (the file's original size, the crop, the flip), so cached latents and
        their conditioning always agree. A loss mask is not in the latents, so it needs no part in the key.
        """
        image = (self._instance if role == "instance" else self._class)[i]
        size = (self._instance_sizes if role == "instance" else self._class_sizes)[i]
        pixels = prepare_image(image, self.resolution, center_crop=self.center_crop, flip=flip, crop_rng=None,
                               origin=origin)
        key = f"{self._paths[role][i]}|{self.resolution}|{origin[0]},{origin[1]}|{int(flip)}"
        return pixels, key, crop_geometry(size, image.size, origin, flip, self.resolution)

    def view_count(self) -> int | None:
        """How many (pixels, cache key) views a batch can ever hold, when augmentation leaves few: one crop per image
        (centre crop, or an image already square at the resolution) and each flip `random_flip` allows. None when
        random crops make them too many to list; then latents are cached as they come."""
        images = self._instance + self._class
        if not self.center_crop and any(image.size != (self.resolution, self.resolution) for image in images):
            return None
        return len(images) * (2 if self.random_flip else 1)

    def views(self):
        """Each of the `view_count()` views as (pixels, cache key), made one at a time."""
        for role, images in (("instance", self._instance), ("class", self._class)):
            for i, image in enumerate(images):
                origin = crop_origin(image.size, self.resolution, center_crop=True, crop_rng=None)
                for flip in (False, True) if self.random_flip else (False,):
                    pixels, key, _ = self._view(role, i, origin, flip)
                    yield pixels, key

    def prompts(self) -> list[str]:
        """The prompts its batches carry (every one, so that they can all be encoded before the text encoders leave
        the device)."""
        prompts = list(dict.fromkeys(self.captions)) + ([""] if self.caption_dropout > 0 else [])
        return prompts + ([self.class_prompt] if self._class else [])


def collate_examples(examples: list[dict]) -> dict:
    """Batches examples: instance rows first, then class rows, so pixel_values[is_prior] is the prior half."""
    with_class = [example for example in examples if "class_pixels" in example]
    if with_class and len(with_class) != len(examples):
        raise ValueError("either every example in a batch has a class image or none does")
    pixels = [example["instance_pixels"] for example in examples]
    prompts = [example["instance_prompt"] for example in examples]
    keys = [example["instance_key"] for example in examples]
    pixels += [example["class_pixels"] for example in with_class]
    prompts += [example["class_prompt"] for example in with_class]
    keys += [example["class_key"] for example in with_class]
    geometry = [example["instance_geometry"] for example in examples]
    geometry += [example["class_geometry"] for example in with_class]
    is_prior = torch.tensor([False] * len(examples) + [True] * len(with_class))
    pixel_values = torch.stack(pixels).to(dtype=torch.float32, memory_format=torch.contiguous_format)
    batch = {"pixel_values": pixel_values, "prompts": prompts, "is_prior": is_prior, "cache_keys": keys,
             "geometry": torch.stack(geometry)}
    if "instance_mask" in examples[0]:  # class images carry no mask: learned everywhere
        masks = [example["instance_mask"] for example in examples]
        masks += [torch.ones_like(masks[0]) for _ in with_class]
        batch["loss_mask"] = torch.stack(masks)
    return batch


class MultiSubjectDataset(Dataset):
    """Several subjects sampled in balance: item i is subject i % n, so every batch window sees them equally.

    Its length is n x the longest subject's, so a subject with fewer photos repeats them rather than being
    seen less often.
    """

    def __init__(self, subjects: list[DreamBoothDataset]) -> None:
        if not subjects:
            raise ValueError("at least one subject is needed")
        self.subjects = subjects

    def set_epoch(self, epoch: int) -> None:
        for subject in self.subjects:
            subject.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.subjects) * max(len(s) for s in self.subjects)

    def __getitem__(self, index: int) -> dict:
        subject = self.subjects[index % len(self.subjects)]
        return subject[(index // len(self.subjects)) % len(subject)]

    def view_count(self) -> int | None:
        counts = [subject.view_count() for subject in self.subjects]
        return None if None in counts else sum(counts)

    def views(self):
        for subject in self.subjects:
            yield from subject.views()

    def prompts(self) -> list[str]:
        return list(dict.fromkeys(p for subject in self.subjects for p in subject.prompts()))
