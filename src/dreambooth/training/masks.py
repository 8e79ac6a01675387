"""Loss masks per photo (`dataset.masked_loss`): what of each photo the loss learns, so that a background the user
wants forgotten is not learned with the subject. A mask is `NAME.mask.png` beside `NAME.png` (grayscale: white
learn, black ignore, grey in between), else the photo's own alpha channel. Read and checked at pre-flight, torch-free;
the dataset (training.data) crops and flips each with its photo, and the loss (training.loss) weights by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth.errors import UserError
from dreambooth.training.images import load_alpha, load_grayscale, upright_size

MASK_SUFFIX = ".mask.png"
FROM = {"file": f"NAME{MASK_SUFFIX}", "alpha": "alpha"}  # how the report names where a mask came from


def mask_file(photo: Path) -> Path:
    """`dog-1.jpg` -> `dog-1.mask.png`: the mask beside a photo."""
    return photo.with_name(photo.stem + MASK_SUFFIX)


def is_mask_file(path: Path) -> bool:
    """A file in an instance folder that is a photo's mask, not a photo (the image scan leaves it alone, whether
    masked loss is on or not). Any case: `dog.MASK.PNG` is not trained as a photo either; pre-flight names it."""
    return path.name.lower().endswith(MASK_SUFFIX)


def load_mask(photo: Path) -> tuple[Image.Image, str] | None:
    """The photo's loss mask as 8-bit grayscale, upright as the photo is, and where it came from ("file" or
    "alpha"); None when it has neither. A mask file wins over an alpha channel: it was drawn for this purpose."""
    file = mask_file(photo)
    if file.is_file():
        return load_grayscale(file), "file"
    alpha = load_alpha(photo)
    return None if alpha is None else (alpha, "alpha")


@dataclass
class Masks:
    """The masks of one subject's photos, as pre-flight found them."""

    by_photo: dict[Path, str] = field(default_factory=dict)  # photo -> "file" or "alpha"
    coverage: dict[Path, float] = field(default_factory=dict)  # share of the photo that is learned, 0..1
    problems: list[str] = field(default_factory=list)
    unused: list[Path] = field(default_factory=list)  # mask files found while masked loss is off

    def describe(self, photos: int) -> str | None:
        """The report's line; None when masked loss is off and no mask file is there."""
        if self.unused:
            return (f"masks: {len(self.unused)} mask file(s) (NAME{MASK_SUFFIX}) found, unused; pass --masked_loss to "
                    "learn only their white areas (they are never trained as photos)")
        if not self.by_photo:
            return None
        sources = [self.by_photo[p] for p in self.by_photo]
        counted = ", ".join(f"{sources.count(s)} from {FROM[s]}" for s in FROM if s in sources)
        mean = sum(self.coverage.values()) / len(self.coverage)
        line = f"masks: {len(self.by_photo)} of {photos} photos ({counted}); mean coverage {round(100 * mean)}%"
        return line + ("; the others are learned everywhere" if len(self.by_photo) < photos else "")


def mask_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if is_mask_file(p) and not p.name.startswith(".") and p.is_file())
    except OSError:
        return []  # the image scan reports an unreadable folder


def read_masks(folder: Path, photos: list[Path], *, masked_loss: bool, rejected: list[Path]) -> Masks:
    """The masks of `photos` when masked loss is on, each checked (its size is the photo's, it leaves something to
    learn, it reads); with it off, only the mask files there, for the report. `rejected`: files of the folder the scan
    refused, whose masks are not strays."""
    files = mask_files(folder)
    if not masked_loss:
        return Masks(unused=files)
    result = Masks()
    owned = {mask_file(p) for p in [*photos, *rejected]}
    result.problems += [f"{file}: no photo of that name beside it, so it masks nothing; name it after its photo "
                        f"(dog-1{MASK_SUFFIX} for dog-1.jpg) or delete it" for file in files if file not in owned]
    for photo in photos:
        try:
            found = load_mask(photo)
        except UserError as error:
            result.problems.append(str(error))
            continue
        if found is None:
            continue
        mask, source = found
        problem = _mask_problem(photo, mask, source)
        if problem:
            result.problems.append(problem)
            continue
        result.by_photo[photo] = source
        result.coverage[photo] = float(np.asarray(mask, dtype=np.float64).mean()) / 255
    return result


def _mask_problem(photo: Path, mask: Image.Image, source: str) -> str | None:
    """Why a mask cannot be used: another size than its photo (which pixel would it weigh?), or nothing to learn."""
    if source == "file":
        file, size = mask_file(photo), upright_size(photo)
        if mask.size != size:
            (mw, mh), (pw, ph) = mask.size, size
            turned = " (it is the photo's size turned by 90 degrees: the photo is turned upright by its EXIF tag; " \
                "draw the mask on the upright photo)" if (mh, mw) == size else ""
            return (f"{file}: the mask is {mw}x{mh} but its photo {photo.name} is {pw}x{ph}{turned}; resize the mask "
                    f"to {pw}x{ph} or delete it")
        if mask.getextrema()[1] == 0:
            return (f"{file}: the mask is black everywhere, so nothing of {photo.name} would be learned; paint what "
                    "should be learned white, or delete the mask")
    elif mask.getextrema()[1] == 0:
        return (f"{photo}: transparent everywhere, and its alpha channel is its mask, so nothing of it would be "
                f"learned; give it a {mask_file(photo).name} or take it out of the folder")
    return None
