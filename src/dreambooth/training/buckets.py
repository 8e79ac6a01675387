"""Aspect-ratio buckets: photos keep their shape instead of a square crop (kohya's `--enable_bucket`).

A bucket is a (width, height) whose sides are multiples of `step`, each between the least and the most side, with
about the pixel count of the square training resolution (never more, so memory per step stays the square's). Each
photo goes to the bucket nearest its aspect ratio, is resized to cover it and cropped to it; a batch is drawn from
one bucket, since a batch is one tensor. Pure functions and a sampler; torch only for the shuffle, so that the order
is the same on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator


def make_buckets(resolution: int, min_side: int, max_side: int, step: int) -> list[tuple[int, int]]:
    """Every (width, height) with sides in [min_side, max_side], multiples of `step`, whose area is at most
    resolution**2 and as large as the step allows for its width (the widest height that fits), both orientations;
    the square itself when its side is a multiple of the step. Sorted by aspect ratio, wide last."""
    area = resolution * resolution
    buckets = set()
    for width in range(_round_up(min_side, step), max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets.update({(width, height), (height, width)})
    if resolution % step == 0 and min_side <= resolution <= max_side:
        buckets.add((resolution, resolution))
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def _round_up(value: int, step: int) -> int:
    return math.ceil(value / step) * step


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log space, so 2:1 and 1:2 are as far from 1:1); of
    equally near ones, the larger."""
    width, height = size
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The size an image is resized to so that it covers `target` with the least scaling (then cropped to it)."""
    width, height = size
    scale = max(target[0] / width, target[1] / height)
    return max(target[0], round(width * scale)), max(target[1], round(height * scale))


class BucketBatchSampler:
    """Batches of dataset indices, each from one bucket: every epoch the indices of each bucket are shuffled and cut
    into batches (the last of a bucket may be smaller), and the batches shuffled. The order depends only on (seed,
    epoch), so a resumed run sees the same batches. `set_epoch` also sets the dataset's (its augmentation)."""

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int, dataset=None) -> None:
        self.buckets, self.batch_size, self.seed, self.dataset, self.epoch = buckets, batch_size, seed, dataset, 0
        self.sampler = self  # where accelerate looks for set_epoch on a batch sampler it wraps for several processes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def groups(self) -> dict[tuple[int, int], list[int]]:
        found: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            found.setdefault(bucket, []).append(index)
        return found

    def __len__(self) -> int:
        return sum(math.ceil(len(indices) / self.batch_size) for indices in self.groups().values())

    def __iter__(self) -> Iterator[list[int]]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        batches = []
        for bucket in sorted(self.groups()):
            indices = self.groups()[bucket]
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return iter([batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()])


def describe_buckets(assigned: list[tuple[int, int]], resolution: int, min_side: int, max_side: int,
                     step: int) -> str:
    """The pre-flight report's line: the buckets in use and how many photos each holds."""
    counts: dict[tuple[int, int], int] = {}
    for bucket in assigned:
        counts[bucket] = counts.get(bucket, 0) + 1
    listed = ", ".join(f"{w}x{h}: {n} photo{'s' if n != 1 else ''}"
                       for (w, h), n in sorted(counts.items(), key=lambda kv: kv[0][0] / kv[0][1]))
    return (f"aspect buckets (at most {resolution}x{resolution} pixels, sides {min_side}-{max_side} in steps of "
            f"{step}): {listed}")
