"""Per-photo captions: `NAME.txt` beside `NAME.png` (kohya's convention; `dataset.caption_extension`), or a
`metadata.jsonl` column (the `datasets` library's imagefolder layout, which diffusers' `--dataset_name` and
`--caption_column` read). Captions are read and checked at pre-flight; a photo without one is trained on the
instance prompt, and `dataset.caption_dropout` trains a share of the instance examples on an empty caption.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

METADATA_FILE = "metadata.jsonl"  # the imagefolder layout's captions file (datasets' ImageFolder builder)
IMAGEFOLDER_FILE_KEY = "file_name"  # its column naming the image, relative to the folder


@dataclass
class Captions:
    """The captions of one subject's photos, as training reads them: {photo: caption, placeholders filled}."""

    by_photo: dict[Path, str] = field(default_factory=dict)
    source: str = ""  # "caption files (*.txt)" or "metadata.jsonl, column 'text'"; "" when there are none
    problems: list[str] = field(default_factory=list)
    unread: list[Path] = field(default_factory=list)  # caption files with no usable photo of their name

    def prompt_for(self, photo: Path, instance_prompt: str) -> str:
        return self.by_photo.get(photo, instance_prompt)

    def describe(self, photos: int, longest: tuple[int, str] | None) -> str:
        unread = (f"; not read, no usable photo of their name: {', '.join(p.name for p in self.unread)}"
                  if self.unread else "")
        if not self.by_photo:
            return f"captions: none; every photo is trained on the instance prompt{unread}"
        line = f"captions: {len(self.by_photo)} of {photos} photos, from {self.source}"
        if len(self.by_photo) < photos:
            line += "; the others are trained on the instance prompt"
        if longest:
            line += f"; the longest is {longest[0]} tokens ({longest[1]})"
        return line + unread


def caption_file(photo: Path, extension: str) -> Path:
    """`dog-1.png` -> `dog-1.txt`: the caption file kohya's scripts read beside a photo."""
    return photo.with_suffix(extension)


def is_companion(path: Path, extension: str) -> bool:
    """A file in an instance folder that holds captions, not a photo (the image scan leaves it alone): one with the
    caption extension, or metadata.jsonl."""
    return path.suffix.lower() == extension.lower() or path.name == METADATA_FILE


def fill_placeholders(text: str, identifier: str | None, class_word: str | None) -> str:
    """{identifier}, {class_word} and {class} in a caption, as in the prompts."""
    for key, value in (("{identifier}", identifier), ("{class_word}", class_word), ("{class}", class_word)):
        if value is not None:
            text = text.replace(key, value)
    return text


def read_captions(folder: Path, photos: list[Path], *, extension: str, caption_column: str | None,
                  identifier: str | None, class_word: str | None) -> Captions:
    """The captions of `photos`: from metadata.jsonl's `caption_column` when one is named, else from caption files.
    Every problem (a file that is not UTF-8, an empty caption, one without the identifier, a bad metadata line) is
    collected, with the file it is in."""
    if caption_column:
        found = _from_metadata(folder, photos, caption_column)
    else:
        found = _from_caption_files(photos, extension)
    result = Captions(source=found.source, problems=found.problems)
    if not caption_column and folder.is_dir():
        # a caption file whose photo is missing or was rejected is said, not silently dropped
        stems = {photo.stem for photo in photos}
        result.unread = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                               and p.suffix.lower() == extension.lower() and p.stem not in stems)
    for photo, text in found.by_photo.items():
        text = fill_placeholders(text.strip(), identifier, class_word)
        where = found.source_of(photo)
        if not text:
            result.problems.append(f"{where}: the caption is empty; write one or delete the file (the photo is then "
                                   "trained on the instance prompt)")
        elif identifier and identifier not in text:
            result.problems.append(f"{where}: the caption \"{text}\" does not contain the identifier '{identifier}', "
                                   "so this photo would not teach it; add the identifier (or the {identifier} "
                                   "placeholder) to the caption")
        else:
            result.by_photo[photo] = text
    return result


@dataclass
class _Found:
    by_photo: dict[Path, str] = field(default_factory=dict)
    source: str = ""
    problems: list[str] = field(default_factory=list)
    files: dict[Path, str] = field(default_factory=dict)  # where each caption was read, for messages

    def source_of(self, photo: Path) -> str:
        return self.files.get(photo, str(photo))


def _from_caption_files(photos: list[Path], extension: str) -> _Found:
    found = _Found(source=f"caption files (*{extension})")
    for photo in photos:
        path = caption_file(photo, extension)
        if not path.is_file():
            continue
        try:
            found.by_photo[photo] = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as error:
            found.problems.append(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8")
            continue
        except OSError as error:
            found.problems.append(f"{path}: cannot be read ({error.strerror})")
            continue
        found.files[photo] = str(path)
    return found


def _from_metadata(folder: Path, photos: list[Path], column: str) -> _Found:
    path = folder / METADATA_FILE
    found = _Found(source=f"{METADATA_FILE}, column '{column}'")
    if not path.is_file():
        found.problems.append(f"dataset.caption_column: '{column}' names a column of {path}, which does not exist; "
                              f"write it (one JSON object per line with \"{IMAGEFOLDER_FILE_KEY}\" and \"{column}\", "
                              "the imagefolder layout), or drop --caption_column to read caption files")
        return found
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        found.problems.append(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8")
        return found
    by_name = {photo.name: photo for photo in photos}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            found.problems.append(f"{where}: not JSON ({error.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get(IMAGEFOLDER_FILE_KEY), str):
            found.problems.append(f"{where}: needs a \"{IMAGEFOLDER_FILE_KEY}\" naming the photo")
            continue
        if not isinstance(row.get(column), str):
            found.problems.append(f"{where}: has no text column '{column}' (it has {', '.join(map(str, row))}); "
                                  "name the caption column with --caption_column")
            continue
        name = row[IMAGEFOLDER_FILE_KEY]
        photo = by_name.get(name)
        if photo is None:
            found.problems.append(f"{where}: \"{name}\" is not a usable photo in {folder} (photos in subfolders are "
                                  "not read); fix the name or the line")
            continue
        found.by_photo[photo] = row[column]
        found.files[photo] = where
    return found


def drop_caption(seed: int, epoch: int, index: int, rate: float) -> bool:
    """Whether this instance example trains on an empty caption this epoch: a draw that depends only on (seed, epoch,
    index), so a resumed run drops the same ones."""
    if rate <= 0:
        return False
    return random.Random(f"caption-dropout/{seed}/{epoch}/{index}").random() < rate
