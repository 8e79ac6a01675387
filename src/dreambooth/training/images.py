"""Reading the user's image folders: checking every file and decoding it to RGB. Torch-free, for pre-flight.

Everything a user can get wrong with a folder of photos (empty folder, a text file named .png, a truncated
download, CMYK, 16-bit, alpha, EXIF rotation, tiny images, the same photo twice) is found here, by content,
before any model loads, and reported with the file's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dreambooth.errors import UserError

# Only used to word messages: files are recognised by their content, whatever their name.
# Files this tool writes into image folders (the class-image manifest): skipped, not reported as rejects.
TOOL_FILES = frozenset({"dreambooth_class_images.json"})
TOOL_FOLDER_PREFIXES = ("replaced-",)  # class images moved aside (training.class_images.commit)
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_NEAR_DUPLICATE_BITS = 5  # of 64: re-encoding or resizing flips 0-2 bits; unrelated images differ in about 32
_EXIF_ORIENTATION = 0x0112
_PHOTOS_HINT = "Put 3-10 photos of your subject (JPEG/PNG/WebP) there."


@dataclass(frozen=True)
class ImageIssue:
    """One problem with one file: fatal means the file is rejected, otherwise it is used as noted."""

    path: Path
    reason: str
    fatal: bool


@dataclass
class ImageFolderReport:
    """What scan_image_folder found in one folder."""

    folder: Path
    usable: list[Path] = field(default_factory=list)
    issues: list[ImageIssue] = field(default_factory=list)
    near_duplicates: list[tuple[Path, Path]] = field(default_factory=list)
    # Subfolders (not searched), with the image files each holds by name: said in the report, never silently left.
    subfolders: list[tuple[Path, int]] = field(default_factory=list)

    def rejected(self) -> list[ImageIssue]:
        return [issue for issue in self.issues if issue.fatal]

    def notes(self) -> list[ImageIssue]:
        return [issue for issue in self.issues if not issue.fatal]

    def format(self, label: str) -> str:
        """Multi-line report for the console, e.g. 'instance images (data/x): 5 usable, 1 rejected' + details."""
        if not self.folder.is_dir():
            problem = "not a folder" if self.folder.exists() else "folder does not exist"
            return f"{label} ({self.folder}): {problem}"
        lines = [f"{label} ({self.folder}): {len(self.usable)} usable, {len(self.rejected())} rejected"]
        lines += [f"  rejected  {issue.path.name}: {issue.reason}" for issue in self.rejected()]
        lines += [f"  note      {issue.path.name}: {issue.reason}" for issue in self.notes()]
        lines += [
            f"  note      {a.name} and {b.name} look like near-duplicates (the same photo twice adds nothing)"
            for a, b in self.near_duplicates
        ]
        lines += [f"  skipped   {sub.name}/: a subfolder{f' with {n} image file(s)' if n else ''}; only the files of "
                  f"{self.folder.name}/ itself are used (move them up to train on them)" for sub, n in self.subfolders]
        return "\n".join(lines)


class _Unreadable(Exception):
    """A file that cannot be used; the message is the short reason shown to the user."""


class _Fingerprint(NamedTuple):
    bits: int  # difference hash
    brightness: float  # mean of the thumbnail, 0..255: tells apart flat images whose hashes are all equal


# ---------------------------------------------------------------------------------------------- decoding


def load_image(path: Path) -> Image.Image:
    """Decodes one file to 8-bit RGB, upright per EXIF; raises UserError naming the file if it is unusable."""
    try:
        image, _notes = _decode_rgb(Path(path))
    except _Unreadable as error:
        raise UserError(f"Cannot use image {path}: {error}. Replace or remove this file.") from None
    return image


def load_alpha(path: Path) -> Image.Image | None:
    """A photo's transparency as 8-bit grayscale (255 opaque), upright as `load_image` turns the photo; None when it
    has no alpha channel or is opaque everywhere (training.masks reads it as the photo's loss mask)."""
    try:
        with Image.open(path) as opened:  # the header alone: most photos have no alpha, and need no second decode
            if opened.mode not in _ALPHA_MODES and "transparency" not in opened.info:
                return None
        image, _notes = _decode(Path(path))
    except (_Unreadable, OSError) as error:
        raise UserError(f"Cannot use image {path}: {error}. Replace or remove this file.") from None
    alpha = image.convert("RGBA").getchannel("A")
    return None if alpha.getextrema()[0] == 255 else alpha


def load_grayscale(path: Path) -> Image.Image:
    """Any image file as 8-bit grayscale ("L"), upright per EXIF, for a mask: 16-bit and float scaled as photos are,
    transparent areas black (nothing drawn there is nothing to learn). Raises UserError naming the file."""
    try:
        image, _notes = _decode(Path(path))
    except _Unreadable as error:
        raise UserError(f"Cannot use mask {path}: {error}. Save it again as a grayscale PNG, or delete it.") from None
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image.convert("L")


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as `load_image` returns it (turned per EXIF), from its header alone."""
    with Image.open(path) as opened:
        width, height = opened.size
        turned = opened.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # transposed or rotated by 90 degrees
    return (height, width) if turned else (width, height)


def _decode_rgb(path: Path) -> tuple[Image.Image, list[str]]:
    """Fully decodes a file and converts it to RGB; returns the image and notes on what was converted."""
    image, notes = _decode(path)
    image, mode_notes = _to_rgb(image)
    return image, notes + mode_notes


def _decode(path: Path) -> tuple[Image.Image, list[str]]:
    """Opens and fully loads a file (so truncation is found now, not mid-training), then applies EXIF rotation."""
    try:
        size = path.stat().st_size
    except OSError as error:
        raise _Unreadable(f"cannot read ({error.strerror})") from None
    if size == 0:
        raise _Unreadable("empty file (0 bytes)")
    notes = []
    try:
        with Image.open(path) as opened:
            opened.load()
            if getattr(opened, "n_frames", 1) > 1:
                notes.append("animated or multi-page: only the first frame is used")
            orientation = opened.getexif().get(_EXIF_ORIENTATION, 1)
            image = ImageOps.exif_transpose(opened)
    except UnidentifiedImageError:
        raise _Unreadable(_not_an_image_reason(path)) from None
    except PermissionError:
        raise _Unreadable("cannot read (permission denied)") from None
    except Image.DecompressionBombError:
        raise _Unreadable("image too large (over Pillow's decompression-bomb limit)") from None
    except Exception:  # noqa: BLE001 - decoders raise many types (OSError, SyntaxError, struct.error...) on bad bytes
        raise _Unreadable("truncated or corrupt image") from None
    if orientation in range(2, 9):
        notes.append(f"rotated upright per its EXIF orientation tag ({orientation})")
    return image, notes


def _not_an_image_reason(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in {".heic", ".heif", ".avif"}:
        return f"{suffix[1:].upper()} is not readable by this Pillow build: convert it to JPEG or PNG"
    with path.open("rb") as file:
        head = file.read(1024)
    try:
        is_text = b"\0" not in head and bool(head.decode("utf-8").strip())
    except UnicodeDecodeError:
        is_text = False
    kind = "text file" if is_text else "unrecognised content"
    if suffix in IMAGE_EXTENSIONS:
        return f"not an image ({kind} named {suffix})"
    return "not an image" if is_text else f"not an image ({kind})"


def _to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """Converts any Pillow mode to 8-bit RGB; transparency is composited onto white, the usual photo background."""
    notes = []
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        image = _high_depth_to_l(image)
        notes.append(f"{'32-bit' if mode in ('I', 'F') else '16-bit'} grayscale ({mode}) scaled to 8-bit")
    elif mode == "CMYK":
        notes.append("converted from CMYK to RGB (colours may shift slightly)")
    elif mode == "P":
        notes.append("palette image converted to RGB")
    elif mode in ("L", "1"):
        notes.append("grayscale image: the model will learn it without colour")

    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append("transparent areas flattened onto white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), notes
    try:
        return image.convert("RGB"), notes
    except ValueError:
        raise _Unreadable(f"unsupported colour mode {mode}") from None


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scales 16-bit, 32-bit integer or float grayscale to 8 bits (Pillow's convert('L') would clip at 255)."""
    values = np.asarray(image).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0  # 65535 / 255: full 16-bit range onto full 8-bit range
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:  # out-of-range data (HDR floats, negative ints): stretch what is there
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.rint(scaled).astype(np.uint8))  # 8-bit, one channel: "L"; each branch is in [0, 255]


# ---------------------------------------------------------------------------------------------- scanning


def scan_image_folder(folder: Path, resolution: int, *, check_duplicates: bool = True,
                      companion: Callable[[Path], bool] | None = None) -> ImageFolderReport:
    """Checks every visible file directly in `folder` by decoding it; never raises for a missing or empty folder.

    Hidden files (name starting with '.') are skipped silently, and so are `companion` files (a photo's caption,
    training.captions, read on their own), subfolders with a line in the report (what class images leave behind,
    `replaced-<time>/`, silently). Any other file whose content is not a usable image is rejected with a reason;
    usable files may carry non-fatal notes.
    """
    folder = Path(folder)
    report = ImageFolderReport(folder=folder)
    if not folder.is_dir():
        return report
    try:
        entries = sorted(path for path in folder.iterdir()
                         if not path.name.startswith(".") and path.name not in TOOL_FILES)
    except OSError as error:
        raise UserError(f"Cannot list the image folder {folder}: {error.strerror}.") from None
    fingerprints = {}
    for path in entries:
        if path.is_dir():
            if not path.name.startswith(TOOL_FOLDER_PREFIXES):
                report.subfolders.append((path, _image_files_in(path)))
            continue
        if companion is not None and companion(path):
            continue
        if not path.is_file():
            report.issues.append(ImageIssue(path, "not a regular file (broken link or special file)", True))
            continue
        try:
            image, notes = _decode_rgb(path)
        except _Unreadable as error:
            report.issues.append(ImageIssue(path, str(error), True))
            continue
        if min(image.size) < resolution:
            width, height = image.size
            notes.append(f"smaller than the training resolution ({width}x{height} < {resolution}): upscaled")
        report.issues += [ImageIssue(path, note, False) for note in notes]
        report.usable.append(path)
        if check_duplicates:
            fingerprints[path] = _fingerprint(image)
    report.near_duplicates = _similar_pairs(fingerprints, _NEAR_DUPLICATE_BITS)
    return report


def _image_files_in(folder: Path) -> int:
    """Files under `folder` named as images (by name only: they are not read)."""
    try:
        return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    except OSError:
        return 0


def check_instance_folder(report: ImageFolderReport, *, min_images: int = 1) -> None:
    """Raises UserError, in one paragraph naming the folder and the rejected files, unless enough images are usable."""
    folder = report.folder
    if not folder.exists():
        raise UserError(f"The instance image folder {folder} does not exist. Create it. {_PHOTOS_HINT}")
    if not folder.is_dir():
        raise UserError(f"The instance image folder {folder} is a file, not a folder. {_PHOTOS_HINT}")
    if len(report.usable) >= min_images:
        return
    rejected = report.rejected()
    if not rejected and not report.usable:
        where = " (subfolders are not searched: move the images into the folder itself)" if report.subfolders else ""
        raise UserError(f"The instance image folder {folder} holds no image files{where}. {_PHOTOS_HINT}")
    listed = ", ".join(f"{issue.path.name} ({issue.reason})" for issue in rejected[:10])
    if len(rejected) > 10:
        listed += f", and {len(rejected) - 10} more"
    total = len(report.usable) + len(rejected)
    if not report.usable:
        found = f"holds {total} files but none is a usable image: {listed}."
    else:
        found = f"holds only {len(report.usable)} usable image(s), {min_images} needed."
        found += f" Rejected: {listed}." if rejected else ""
    raise UserError(f"The instance image folder {folder} {found} {_PHOTOS_HINT}")


# ---------------------------------------------------------------------------------------------- near-duplicates


def find_near_duplicates(
    paths: list[Path], hash_size: int = 8, threshold: int = _NEAR_DUPLICATE_BITS
) -> list[tuple[Path, Path]]:
    """Pairs of images whose difference hashes (hash_size**2 bits) differ in at most `threshold` bits.

    dHash (Krawetz, "Kind of like that", 2013): a grayscale thumbnail, one bit per pair of neighbouring
    pixels saying which is brighter. It survives re-encoding and resizing, not cropping. Raises UserError
    for an unreadable file.
    """
    fingerprints = {Path(path): _fingerprint(load_image(path), hash_size) for path in paths}
    return _similar_pairs(fingerprints, threshold)


def _fingerprint(image: Image.Image, hash_size: int = 8) -> _Fingerprint:
    thumbnail = image.convert("L").resize((hash_size + 1, hash_size), Image.Resampling.BOX)
    pixels = np.asarray(thumbnail, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return _Fingerprint(int("".join("1" if bit else "0" for bit in bits), 2), float(pixels.mean()))


def _similar_pairs(fingerprints: dict[Path, _Fingerprint], threshold: int) -> list[tuple[Path, Path]]:
    items = list(fingerprints.items())
    pairs = []
    for i, (path_a, a) in enumerate(items):
        for path_b, b in items[i + 1 :]:
            # Flat or smooth images all hash to nearly the same bits; brightness keeps a white and a black one apart.
            if bin(a.bits ^ b.bits).count("1") <= threshold and abs(a.brightness - b.brightness) <= 16:
                pairs.append((path_a, path_b))
    return pairs
