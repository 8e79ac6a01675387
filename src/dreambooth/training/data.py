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

from dreambooth.training.buckets import cover_size
from dreambooth.training.captions import drop_caption
from dreambooth.training.images import load_image
from dreambooth.training.masks import load_mask

# ---------------------------------------------------------------------------------------------- pixels


Target = int | tuple[int, int]  # the crop: a square side (the training resolution), or an aspect bucket's (w, h)


def target_size(target: Target) -> tuple[int, int]:
    return (target, target) if isinstance(target, int) else target


def crop_origin(size: tuple[int, int], target: Target, *, center_crop: bool,
                crop_rng: random.Random | None) -> tuple[int, int]:
    """Top-left corner of the crop of an image already resized to cover the target (short side == resolution for
    a square)."""
    width, height = size
    tw, th = target_size(target)
    if center_crop:
        return (width - tw) // 2, (height - th) // 2
    if crop_rng is None:
        raise ValueError("prepare_image needs crop_rng for a random crop (or center_crop=True)")
    return crop_rng.randint(0, width - tw), crop_rng.randint(0, height - th)


def prepare_image(
    image: Image.Image, resolution: Target, *, center_crop: bool, flip: bool, crop_rng: random.Random | None,
    origin: tuple[int, int] | None = None,
) -> torch.Tensor:
    """RGB image -> float32 [3, height, width] in [-1, 1] (a square of side `resolution`, or an aspect bucket's
    (width, height)): resized to cover it, cropped, maybe mirrored.

    The crop is at `origin` when given, else centred if `center_crop`, else at an offset drawn from `crop_rng`.
    `flip` mirrors left-right; the caller draws it, so this function is deterministic given its arguments.
    """
    if image.mode != "RGB":
        raise ValueError(f"prepare_image expects an RGB image (use load_image), got mode {image.mode}")
    image = _resize_to_cover(image, resolution)
    tw, th = target_size(resolution)
    left, top = origin or crop_origin(image.size, resolution, center_crop=center_crop, crop_rng=crop_rng)
    image = image.crop((left, top, left + tw, top + th))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def prepare_mask(mask: Image.Image | None, resolution: Target, origin: tuple[int, int], flip: bool) -> torch.Tensor:
    """A loss mask (8-bit grayscale, already resized as its photo) cropped at the photo's `origin` and mirrored with
    it: float32 [1, height, width] in [0, 1]. None, a photo without a mask: ones, learned everywhere."""
    tw, th = target_size(resolution)
    if mask is None:
        return torch.ones(1, th, tw)
    left, top = origin
    mask = mask.crop((left, top, left + tw, top + th))
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def crop_geometry(original: tuple[int, int], resized: tuple[int, int], origin: tuple[int, int], flip: bool,
                  resolution: Target) -> torch.Tensor:
    """Where a training image came from: its original height and width, the crop's top-left corner (y, x) in the
    resized image, and the target height and width. SDXL conditions on exactly these six numbers (its
    `add_time_ids`, Podell et al. 2023, "size and crop conditioning"); the other families ignore them.

    A mirrored crop is described in the mirrored image, as diffusers' SDXL script does (it flips before it crops):
    its left edge is the resized width minus the crop's right edge.
    """
    left, top = origin
    tw, th = target_size(resolution)
    if flip:
        left = resized[0] - left - tw
    return torch.tensor([original[1], original[0], top, left, th, tw], dtype=torch.float32)


def _load_resized(paths: list[Path], targets: list[Target]) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    """Images decoded and resized to cover their targets (short side = resolution for a square), with their original
    (width, height)."""
    images, sizes = [], []
    for path, target in zip(paths, targets):
        image = load_image(path)
        sizes.append(image.size)
        images.append(_resize_to_cover(image, target))
    return images, sizes


def _resize_to_cover(image: Image.Image, target: Target) -> Image.Image:
    """The image scaled (aspect kept) to the least size that covers the target; for a square, short side = side."""
    size = cover_size(image.size, target_size(target))
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


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


# ---------------------------------------------------------------------------------------------- dataset


def _item_rng(*key: object) -> random.Random:
    """A generator that depends only on `key`: sha256 of its repr, since hash() of a str changes per process."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class DreamBoothDataset(Dataset):
    """Instance examples, each paired with a class (prior-preservation) example when class images are given.

    Images are decoded once in __init__ and kept in memory already resized to cover their crop (short side =
    resolution; with aspect buckets, the photo's bucket, and a class image is cropped to the bucket of the photo it
    is paired with), so an item only crops and flips. Augmentation is a pure function of (seed, epoch, index): call
    set_epoch before iterating each epoch, and resuming mid-epoch reproduces exactly the same pixels. With
    `masked_loss`, each photo's mask (training.masks) is kept beside it and cropped and flipped with it
    (`instance_mask`).
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
        buckets: list[tuple[int, int]] | None = None,
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
        self._files = {"instance": list(instance_images), "class": list(class_images or [])}
        # each photo's crop: its aspect bucket (training.buckets), else the square
        self._targets: list[Target] = list(buckets) if buckets else [resolution] * len(instance_images)
        if len(self._targets) != len(instance_images):
            raise ValueError("buckets must give one (width, height) per instance image")
        self._instance, self._instance_sizes = _load_resized(instance_images, self._targets)
        self._class, self._class_sizes = _load_resized(class_images or [], [resolution] * len(class_images or []))
        self._covered: dict[tuple[str, int, Target], Image.Image] = {}  # other crops' resized copies, made on use
        self._masks = _load_masks(instance_images, self._instance) if masked_loss else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self._instance), len(self._class))

    def __getitem__(self, index: int) -> dict:
        i, origin, flip, target = self._placement(index, "instance")
        pixels, key, geometry = self._view("instance", i, origin, flip, target)
        example = {"instance_pixels": pixels, "instance_prompt": self._caption(index), "instance_key": key,
                   "instance_geometry": geometry}
        if self._masks is not None:  # the photo's own crop and flip: the mask weighs the pixels it covers
            example["instance_mask"] = prepare_mask(self._masks[i], target, origin, flip)
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

    def _placement(self, index: int, role: str) -> tuple[int, tuple[int, int], bool, Target]:
        """Which image of `role` item `index` shows this epoch, where it is cropped, whether it is mirrored, and its
        crop (the photo's bucket, which the class image paired with it takes too): a draw that depends only on
        (seed, epoch, index, role)."""
        i = index % len(self._instance if role == "instance" else self._class)
        target = self.bucket_of(index)
        image = self._image(role, i, target)
        rng = _item_rng(self.seed, self.epoch, index, role)
        flip = self.random_flip and rng.random() < 0.5
        origin = crop_origin(image.size, target, center_crop=self.center_crop,
                             crop_rng=None if self.center_crop else rng)
        return i, origin, flip, target

    def bucket_of(self, index: int) -> Target:
        """The crop of item `index`: its photo's bucket (the class image paired with it takes the same), or the
        square."""
        return self._targets[index % len(self._instance)]

    def _image(self, role: str, i: int, target: Target) -> Image.Image:
        """Image `i` of `role` resized to cover `target`: the copy made at load time, or one made on first use (a
        class image for a bucket, a photo for the square of the validation loss)."""
        preloaded = self._targets[i] if role == "instance" else self.resolution
        if target == preloaded:
            return (self._instance if role == "instance" else self._class)[i]
        key = (role, i, target)
        if key not in self._covered:
            self._covered[key] = _resize_to_cover(load_image(self._files[role][i]), target)
        return self._covered[key]

    def _view(self, role: str, i: int, origin: tuple[int, int], flip: bool,
              target: Target | None = None) -> tuple[torch.Tensor, str, torch.Tensor]:
        """Image `i` of `role` cropped to `target` (default: the square) at `origin`, maybe mirrored: its pixels, a
        key naming exactly them (image file, crop, corner, flip), and its size conditioning (`crop_geometry`).

        The key is what a latent cache may be indexed by; it never depends on step or batch position. The
        conditioning follows from the key (the file's original size, the crop, the flip), so cached latents and
        their conditioning always agree. A loss mask is not in the latents, so it needs no part in the key.
        """
        target = self.resolution if target is None else target
        image = self._image(role, i, target)
        size = (self._instance_sizes if role == "instance" else self._class_sizes)[i]
        pixels = prepare_image(image, target, center_crop=self.center_crop, flip=flip, crop_rng=None, origin=origin)
        crop = str(target) if isinstance(target, int) else f"{target[0]}x{target[1]}"
        key = f"{self._paths[role][i]}|{crop}|{origin[0]},{origin[1]}|{int(flip)}"
        return pixels, key, crop_geometry(size, image.size, origin, flip, target)

    def _all_views(self) -> list[tuple[str, int, Target]]:
        """(role, image, crop) of every image a batch can show: each photo at its crop, each class image at every
        crop a photo has."""
        crops = list(dict.fromkeys(self._targets))
        return ([("instance", i, t) for i, t in enumerate(self._targets)]
                + [("class", i, t) for i in range(len(self._class)) for t in crops])

    def view_count(self) -> int | None:
        """How many (pixels, cache key) views a batch can ever hold, when augmentation leaves few: one crop per image
        (centre crop, or an image already square at the resolution) and each flip `random_flip` allows. None when
        random crops make them too many to list; then latents are cached as they come."""
        views = self._all_views()
        if not self.center_crop and any(self._image(role, i, t).size != target_size(t) for role, i, t in views):
            return None
        return len(views) * (2 if self.random_flip else 1)

    def views(self):
        """Each of the `view_count()` views as (pixels, cache key), made one at a time."""
        for role, i, target in self._all_views():
            origin = crop_origin(self._image(role, i, target).size, target, center_crop=True, crop_rng=None)
            for flip in (False, True) if self.random_flip else (False,):
                pixels, key, _ = self._view(role, i, origin, flip, target)
                yield pixels, key

    def fixed_views(self):
        """The validation loss's set (training.validation_loss): each instance photo's centre view, unflipped, with
        its caption, then as many class images with the class prompt; as (pixels, key, geometry, prompt, is_prior).
        Square at the resolution, with or without buckets, so that the set is one batch of one shape."""
        for role, images in (("instance", self._instance), ("class", self._class[:len(self._instance)])):
            for i in range(len(images)):
                image = self._image(role, i, self.resolution)
                origin = crop_origin(image.size, self.resolution, center_crop=True, crop_rng=None)
                pixels, key, geometry = self._view(role, i, origin, False)
                prompt = self.captions[i] if role == "instance" else self.class_prompt
                yield pixels, key, geometry, prompt, role == "class"

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

    def bucket_of(self, index: int):
        subject = self.subjects[index % len(self.subjects)]
        return subject.bucket_of((index // len(self.subjects)) % len(subject))

    def fixed_views(self):
        for subject in self.subjects:
            yield from subject.fixed_views()

    def prompts(self) -> list[str]:
        return list(dict.fromkeys(p for subject in self.subjects for p in subject.prompts()))
