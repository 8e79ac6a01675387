"""The studio's projects and photos, without HTTP: what the web app calls.

A project is a folder under the projects root, as `dreambooth init` makes it (`project.init_project`); its photos are
the files of its instance folder, checked by the pre-flight's own scan (`training.images.scan_image_folder`); its
recipe is its `config.yaml`, validated by the code `dreambooth train --config` reads it with (`config_file`); its live
report is `preflight.run_preflight` on that file. Nothing here checks anything a second way.

Every name and path a caller gives is confined to the root: a project is named from a small character set, a photo
by a name listed in its folder, and whatever resolves outside (`..`, an absolute path, a symlink) is refused. Nothing
of the user's is deleted: a removed photo, a cropped photo's original and a cleared caption go to the project's
`trash/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

import yaml
from PIL import Image

from dreambooth.config import SECTION_TYPES, Config
from dreambooth.config_file import load_config, read_config
from dreambooth.errors import NotFound, UserError
from dreambooth.formats.atomic import atomic_file, write_text_atomic
from dreambooth.project import init_project, model_for_config
from dreambooth.training.captions import caption_file, is_companion
from dreambooth.training.images import load_image, scan_image_folder, upright_size
from dreambooth.training.masks import MASK_SUFFIX, is_mask_file

PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_UPLOAD_BYTES = 20 * 2**20
# Pillow's own bomb limit (about 89 megapixels) is where it only warns; here it refuses, before decoding a pixel.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
UPLOAD_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}  # what `init`'s README asks for
READ_CHUNK = 2**20
TRASH = "trash"
# The sections of docs/design.md a recipe form shows (`subjects`, several subjects in one run, is the YAML's alone).
RECIPE_SECTIONS = ("model", "token", "training", "dataset", "lora", "validation", "output")
# A secret is never written into config.yaml (the config leaves it out of every file): the form does not offer it.
NOT_IN_FORM = {("output", "hub_token")}
# Folders a recipe may point at: where training reads and writes, so it must stay inside the project.
PROJECT_PATH_KEYS = (("dataset", "instance_dir"), ("dataset", "class_dir"), ("output", "output_dir"))

# run_preflight and init print their reports; the studio keeps them off its console. Redirecting stdout is
# process-wide, so one redirect at a time.
_QUIET = threading.Lock()


@contextlib.contextmanager
def _quiet():
    with _QUIET, contextlib.redirect_stdout(io.StringIO()):
        yield


def _refuse_path(what: str, given: str, why: str) -> UserError:
    return UserError(f"{what} '{given}' is refused: {why}. Give a name inside the projects folder (letters, digits, "
                     "'_', '-' and '.'), with no '..', no absolute path and no link that leads outside it.")


def confined(base: Path, relative: str, what: str) -> Path:
    """`base / relative`, refused unless it is a relative path without '..' that resolves (links followed) inside
    `base`."""
    if not isinstance(relative, str) or not relative.strip() or "\x00" in relative or "\\" in relative:
        raise _refuse_path(what, str(relative), "it is empty or holds a character a path may not")
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or relative.startswith("~"):
        raise _refuse_path(what, relative, "it is an absolute path")
    if ".." in PurePosixPath(relative).parts:
        raise _refuse_path(what, relative, "it climbs out with '..'")
    path = base / relative
    if not path.resolve().is_relative_to(base.resolve()):
        raise _refuse_path(what, relative, f"it resolves to {path.resolve()}, outside {base}")
    return path


def safe_stem(filename: str) -> str:
    """A stored photo's name from the client's file name: its last component's stem in [A-Za-z0-9_-], at most 40
    characters, never empty ('photo')."""
    last = re.split(r"[\\/]", str(filename or ""))[-1]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", last.rsplit(".", 1)[0] if "." in last else last).strip("_-")
    return stem[:40] or "photo"


def _read_limited(upload: bytes | bytearray | BinaryIO, limit: int, filename: str) -> bytes:
    """The upload's bytes, read once and in chunks, refused as soon as they pass `limit`."""
    too_big = UserError(f"{filename} is over the upload limit of {limit / 2**20:g} MB; it was not added. Photos for "
                        "DreamBooth need no more than a few megapixels: save it smaller (JPEG at quality 90-95) and "
                        "upload it again.")
    if isinstance(upload, bytes | bytearray | memoryview):
        if len(upload) > limit:
            raise too_big
        return bytes(upload)
    data = bytearray()
    while chunk := upload.read(READ_CHUNK):
        data += chunk
        if len(data) > limit:
            raise too_big
    return bytes(data)


def _check_header(data: bytes, filename: str, max_pixels: int) -> str | None:
    """The format's extension of an image Pillow recognises, after its size is checked from the header and its
    structure verified (no pixel decoded yet); None when Pillow does not read it (the pre-flight's scan words why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                fmt, (width, height) = opened.format, opened.size
                if width * height > max_pixels:
                    raise Image.DecompressionBombError
                opened.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{filename} is refused: its header declares more pixels than the limit of "
                        f"{max_pixels / 1e6:.0f} megapixels (a decompression bomb, or a scan far larger than a photo "
                        "needs); it was not added. Upload a photo of a few megapixels.") from None
    except Exception:  # noqa: BLE001 - not an image, or a broken one: the pre-flight's scan says which
        return None
    if fmt not in UPLOAD_FORMATS:
        raise UserError(f"{filename} is a {fmt} image; uploads take {', '.join(UPLOAD_FORMATS)} (JPEG, PNG or WebP). "
                        "Convert it and upload it again.")
    return UPLOAD_FORMATS[fmt]


def _preflight_verdict(data: bytes, filename: str, resolution: int) -> list[str]:
    """What the pre-flight's scan says of these bytes: a UserError with its reason when it would reject them, else
    its notes (converted from CMYK, rotated per EXIF, smaller than the resolution, ...)."""
    suffix = re.sub(r"[^A-Za-z0-9]", "", Path(re.split(r"[\\/]", filename)[-1]).suffix)[:8]
    with tempfile.TemporaryDirectory(prefix="dreambooth-upload-") as scratch:
        staged = Path(scratch) / f"upload.{suffix}" if suffix else Path(scratch) / "upload"
        staged.write_bytes(data)  # scratch for the scan, removed with its folder: not a save anyone reads
        found = scan_image_folder(Path(scratch), resolution, check_duplicates=False)
    if found.rejected():
        raise UserError(f"{filename} is not a usable photo: {found.rejected()[0].reason}; it was not added.")
    return [issue.reason for issue in found.notes()]


def _move_aside(src: Path, trash: Path) -> Path:
    """Moves one of the user's files into the trash under a time-stamped name; returns where it went. A move, not a
    save: nothing is written, the file keeps its bytes."""
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / f"{time.strftime('%Y%m%d-%H%M%S')}-{src.name}"
    n = 1
    while target.exists():
        n += 1
        target = trash / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}-{src.name}"
    os.replace(src, target)
    return target


class Project:
    """One project folder: its photos, captions, recipe (config.yaml) and pre-flight report."""

    def __init__(self, path: Path, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS):
        self.path = Path(path)
        self.name = self.path.name
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def config_values(self) -> dict[str, Any]:
        """config.yaml as written (relative paths, unset keys absent); {} when it does not read as a mapping."""
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    def _value(self, section: str, key: str) -> Any:
        values = self.config_values().get(section)
        return values.get(key) if isinstance(values, dict) else None

    def _folder(self, section: str, key: str) -> Path:
        """A folder the recipe names, inside the project (its default where the recipe's points elsewhere)."""
        value = self._value(section, key)
        default = str(SECTION_TYPES[section].model_fields[key].default)
        try:
            return confined(self.path, str(value), f"{section}.{key}") if value else confined(self.path, default, key)
        except UserError:
            return confined(self.path, default, f"{section}.{key}")  # its default, if that stays inside

    @property
    def photo_dir(self) -> Path:
        return self._folder("dataset", "instance_dir")

    @property
    def trash(self) -> Path:
        return self.path / TRASH

    def _caption_extension(self) -> str:
        ext = self._value("dataset", "caption_extension")
        return ext if isinstance(ext, str) and re.fullmatch(r"\.[A-Za-z0-9_-]+", ext) else ".txt"

    def _resolution(self) -> int:
        value = self._value("training", "resolution")
        return value if isinstance(value, int) and value > 0 else 512

    # ------------------------------------------------------------------------------------------ summary

    def summary(self) -> dict[str, Any]:
        """What the project list shows: name, identifier, class word, base model, photo count, a trained output."""
        out = self._folder("output", "output_dir")
        return {"name": self.name, "identifier": self._value("token", "identifier"),
                "class_word": self._value("token", "class_word"), "model": self._value("model", "pretrained_model"),
                "photos": len(self._photo_files()),
                "has_output": (out / "model_index.json").is_file()
                or (out / "pytorch_lora_weights.safetensors").is_file()}

    def _photo_files(self) -> list[Path]:
        """The files the pre-flight's scan reads as photos (not yet decoded): visible, not captions or masks."""
        if not self.photo_dir.is_dir():
            return []
        ext = self._caption_extension()
        return sorted(p for p in self.photo_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                      and not is_companion(p, ext) and not is_mask_file(p))

    # ------------------------------------------------------------------------------------------ photos

    def photo(self, name: str) -> Path:
        """The photo file of that name, listed in the photo folder and inside it; a UserError otherwise."""
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..") or name.startswith("."):
            raise _refuse_path("photo", str(name), "a photo is named by its file name alone")
        path = confined(self.photo_dir, name, "photo")
        if path not in self._photo_files() or path.is_symlink():
            raise NotFound(f"photo '{name}' is not in project {self.name}'s {self.photo_dir.name}/ folder; list the "
                            "photos to see their names.")
        return path

    def add_photo(self, upload: bytes | BinaryIO, filename: str) -> dict[str, Any]:
        """Stores an uploaded photo (its bytes, or a file object read in chunks) under a new safe name; returns its
        name and the pre-flight's notes on it. Refused, and nothing written: over the size limit, over the pixel
        limit, not JPEG/PNG/WebP, or what the pre-flight would reject (with its reason)."""
        filename = re.split(r"[\\/]", str(filename or "upload"))[-1] or "upload"
        data = _read_limited(upload, self.max_upload_bytes, filename)
        suffix = _check_header(data, filename, self.max_pixels)
        notes = _preflight_verdict(data, filename, self._resolution())
        if suffix is None:  # the scan read what Pillow's header check did not: never stored unverified
            raise UserError(f"{filename} is not a usable photo: not a JPEG, PNG or WebP image; it was not added.")
        digest = hashlib.sha256(data).hexdigest()[:8]
        same = [p.name for p in self._photo_files() if p.stem.endswith(f"-{digest}")]
        if same:  # the same bytes under any client name: a second copy would only weigh the photo twice
            raise UserError(f"{filename} is already in project {self.name} as {same[0]}; it was not added again.")
        name = f"{safe_stem(filename)}-{digest}{suffix}"
        target = self.photo_dir / name
        with atomic_file(target) as tmp:
            tmp.write_bytes(data)
        return {"name": name, "notes": notes}

    def photos(self) -> list[dict[str, Any]]:
        """Every file of the photo folder with the pre-flight scan's verdict: usable or rejected and why, its notes,
        small (below the training resolution), its near duplicates and its caption."""
        resolution, ext = self._resolution(), self._caption_extension()
        scan = scan_image_folder(self.photo_dir, resolution,
                                 companion=lambda p: is_companion(p, ext) or is_mask_file(p))
        return _photo_rows(scan, resolution, ext)

    def remove_photo(self, name: str) -> str:
        """Moves a photo, its caption and its mask into the project's trash; returns the photo's name there."""
        photo = self.photo(name)
        for companion in (caption_file(photo, self._caption_extension()), photo.with_name(photo.stem + MASK_SUFFIX)):
            if companion.is_file():
                _move_aside(companion, self.trash)
        return str(_move_aside(photo, self.trash).relative_to(self.path))

    def crop_photo(self, name: str, box: tuple[int, int, int, int]) -> str:
        """Crops a photo to `box` (left, top, right, bottom in pixels of the upright photo, as the pre-flight reads
        it); saved as PNG under the same stem (its caption still applies), the original kept in trash/originals/."""
        photo = self.photo(name)
        image = load_image(photo)
        try:
            left, top, right, bottom = (int(v) for v in box)
        except (TypeError, ValueError):
            raise UserError(f"crop box {box!r}: give four whole numbers, left, top, right, bottom.") from None
        width, height = image.size
        if not (0 <= left < right <= width and 0 <= top < bottom <= height) or min(right - left, bottom - top) < 8:
            raise UserError(f"crop box {left},{top},{right},{bottom} does not fit photo {name} ({width}x{height}): "
                            "left < right <= width, top < bottom <= height, each side at least 8 pixels.")
        cropped = image.crop((left, top, right, bottom))
        target = photo.with_suffix(".png")
        if target != photo and target.exists():
            raise UserError(f"{target.name} already exists beside {name}; crop would replace it. Remove one first.")
        kept = _move_aside(photo, self.trash / "originals")
        try:
            with atomic_file(target) as tmp:
                cropped.save(tmp, format="PNG")
        except BaseException:
            _move_aside_back(kept, photo)
            raise
        return target.name

    def caption(self, name: str) -> str | None:
        """The photo's own caption (NAME.txt beside it, training.captions' convention), or None."""
        path = caption_file(self.photo(name), self._caption_extension())
        return path.read_text(encoding="utf-8").strip() if path.is_file() else None

    def set_caption(self, name: str, text: str | None) -> None:
        """Writes the photo's caption; empty text moves the caption file to the trash (the instance prompt applies)."""
        path = caption_file(self.photo(name), self._caption_extension())
        text = (text or "").strip()
        if len(text) > 2000:
            raise UserError(f"the caption of {name} is {len(text)} characters; a caption is one prompt (at most 77 "
                            "tokens are read), keep it under 2000 characters.")
        if not text:
            if path.is_file():
                _move_aside(path, self.trash)
            return
        write_text_atomic(path, text + "\n")

    # ------------------------------------------------------------------------------------------ report

    def report(self) -> dict[str, Any]:
        """The live pre-flight report as plain data: whether `train` would start, its problems verbatim, and the
        photos, captions, buckets and identifier's tokens as the pre-flight sees them. Loads tokenizers, no weights."""
        try:
            reading = read_config(self.config_path)
        except UserError as e:
            return {"ok": False, "problems": [str(e)], "message": str(e), "photos": self.photos(),
                    "identifier": None, "buckets": None, "warnings": [], "notes": [], "family": None, "text": None}
        cfg = reading.config.model_copy(deep=True)
        result: dict[str, Any] = {"ok": True, "problems": [], "message": None, "warnings": [], "notes": [],
                                  "family": None, "prediction_type": None, "text": None}
        from dreambooth.preflight import run_preflight

        try:
            with _quiet():
                found = run_preflight(cfg, reading)
        except UserError as e:
            result.update(ok=False, message=str(e), problems=_problem_lines(str(e)))
        else:
            result.update(warnings=found.warnings, notes=found.notes, family=found.family,
                          prediction_type=found.prediction_type, text=found.format())
        result.update(_inputs(reading, self._caption_extension()))
        return result

    def check_run(self, overrides: dict[str, Any]) -> None:
        """`dreambooth train --config config.yaml` with `overrides` (a resume's, an extend's steps) up to its
        pre-flight: a UserError with the message `train` would end with, else nothing. Loads tokenizers, no weights."""
        from dreambooth.preflight import run_preflight

        reading = read_config(self.config_path, overrides)
        with _quiet():
            run_preflight(reading.config.model_copy(deep=True), reading)

    # ------------------------------------------------------------------------------------------ recipe

    def save_config(self, values: dict[str, Any]) -> dict[str, Any]:
        """Sets the recipe's sections (`{"training": {"learning_rate": 1e-4}, ...}`, over what config.yaml holds) and
        writes config.yaml atomically, after `dreambooth train --config` would read it without a problem; refused
        with that command's message otherwise, and the file left as it was. Returns the values written."""
        if not isinstance(values, dict):
            raise UserError("the recipe is a mapping of sections (model, token, training, ...) to their keys.")
        for section, key in NOT_IN_FORM:
            if isinstance(values.get(section), dict) and values[section].get(key) is not None:
                raise UserError(f"{section}.{key} is a secret, and the studio never writes one into config.yaml (a "
                                "file that travels with the project and its runs); nothing was saved. Set HF_TOKEN, "
                                "or log in once with `hf auth login`.")
        merged = self.config_values()
        for section, keys in values.items():
            if isinstance(keys, dict) and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **keys}
            else:
                merged[section] = keys
        for section, key in PROJECT_PATH_KEYS:
            given = (merged.get(section) or {}).get(key) if isinstance(merged.get(section), dict) else None
            if given is not None:
                confined(self.path, str(given), f"{section}.{key}")
        output = merged.get("output") if isinstance(merged.get("output"), dict) else {}
        if output.get("logging_dir") is not None:  # relative to the run folder, and written by the run as it is
            confined(self.path / str(output.get("output_dir") or "output"), str(output["logging_dir"]),
                     "output.logging_dir")
        order = [*SECTION_TYPES, "subjects"]
        merged = {k: merged[k] for k in sorted(merged, key=lambda k: order.index(k) if k in order else len(order))}
        text = yaml.safe_dump(merged, sort_keys=False)
        with atomic_file(self.config_path) as tmp:
            tmp.write_text(text, encoding="utf-8")
            try:  # read beside the real file, so that relative paths mean what they will mean there
                load_config(tmp)
            except UserError as e:
                raise UserError(str(e).replace(str(tmp), str(self.config_path))) from None
        return merged


def _move_aside_back(kept: Path, original: Path) -> None:
    """Undoes `_move_aside` after a failed save, so that the photo is where it was."""
    os.replace(kept, original)


def _problem_lines(message: str) -> list[str]:
    """The problems of pre-flight's message, one per entry, as `train` lists them ("  - " items)."""
    lines = message.split("\n  - ")
    if len(lines) == 1:
        return [message]
    last = lines[-1].split("\nFix these")[0]
    return [line.replace("\n    ", "\n") for line in [*lines[1:-1], last]]


def _photo_rows(scan, resolution: int, ext: str) -> list[dict[str, Any]]:
    rows = {}
    for path in scan.usable:
        try:
            width, height = upright_size(path)
        except OSError:
            width = height = 0
        rows[path] = {"name": path.name, "status": "usable", "reason": None, "notes": [], "width": width,
                      "height": height, "small": min(width, height) < resolution, "near_duplicates": [],
                      "caption": None}
    for issue in scan.issues:
        row = rows.setdefault(issue.path, {"name": issue.path.name, "status": "rejected", "reason": issue.reason,
                                           "notes": [], "width": None, "height": None, "small": False,
                                           "near_duplicates": [], "caption": None})
        if not issue.fatal:
            row["notes"].append(issue.reason)
    for a, b in scan.near_duplicates:
        rows[a]["near_duplicates"].append(b.name)
        rows[b]["near_duplicates"].append(a.name)
    for path, row in rows.items():
        caption = caption_file(path, ext)
        if caption.is_file():
            with contextlib.suppress(OSError, UnicodeDecodeError):
                row["caption"] = caption.read_text(encoding="utf-8").strip()
    return [rows[p] for p in sorted(rows)]


def _inputs(reading, ext: str) -> dict[str, Any]:
    """The subject's photos, captions, buckets and identifier as the pre-flight's own functions read them, whether or
    not the pre-flight passed (a problem elsewhere must not hide the photos' verdicts)."""
    from dreambooth.preflight import check_bucket_settings
    from dreambooth.training.buckets import assign_bucket, describe_buckets
    from dreambooth.training.captions import read_captions
    from dreambooth.training.tokens import load_tokenizer, plan_identifier

    cfg: Config = reading.config
    subject = cfg.subject_list()[0]
    resolution = cfg.training.resolution
    scan = scan_image_folder(subject.instance_dir, resolution, companion=lambda p: is_companion(p, ext)
                             or is_mask_file(p))
    rows = _photo_rows(scan, resolution, ext)
    captions = read_captions(subject.instance_dir, scan.usable, extension=cfg.dataset.caption_extension,
                             caption_column=cfg.dataset.caption_column, identifier=subject.identifier,
                             class_word=subject.class_word)
    for row in rows:
        filled = captions.by_photo.get(Path(subject.instance_dir) / row["name"])
        row["trains_on"] = None if row["status"] == "rejected" else filled or subject.instance_prompt
    identifier, family = None, None
    if cfg.model.pretrained_model and "model.pretrained_model" not in reading.broken:
        from dreambooth.models.families import folder_family

        family = folder_family(cfg.model.pretrained_model)
        with contextlib.suppress(UserError):
            plan = plan_identifier(load_tokenizer(cfg), subject.identifier, subject.initializer)
            identifier = {"identifier": plan.identifier, "kind": plan.kind, "pieces": plan.pieces,
                          "initializer": plan.initializer, "text": plan.describe()}
    buckets = None
    if cfg.dataset.enable_bucket:
        with contextlib.suppress(UserError):
            allowed = check_bucket_settings(cfg, bool(family and family.side_multiple > 8))
            assigned = [assign_bucket(upright_size(p), allowed) for p in scan.usable]
            for path, bucket in zip(scan.usable, assigned, strict=True):
                next(r for r in rows if r["name"] == path.name)["bucket"] = list(bucket)
            buckets = describe_buckets(assigned, resolution, *cfg.dataset.bucket_range(resolution),
                                       cfg.dataset.bucket_reso_steps)
    return {"photos": rows, "usable": len(scan.usable), "rejected": len(scan.rejected()),
            "captions": captions.describe(len(scan.usable), None), "caption_problems": captions.problems,
            "identifier": identifier, "buckets": buckets, "instance_prompt": subject.instance_prompt,
            "skipped_subfolders": [p.name for p, _ in scan.subfolders]}


class Projects:
    """The projects root: list, create and open the project folders under it."""

    def __init__(self, root: Path | str, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels}

    def _path(self, name: str) -> Path:
        if not isinstance(name, str) or not PROJECT_NAME.match(name) or name.endswith(".tmp"):
            raise _refuse_path("project", str(name), "a project name is 1-64 letters, digits, '_', '-' or '.', "
                               "starting with a letter or digit")
        return confined(self.root, name, "project")

    def list(self) -> list[dict[str, Any]]:
        """Every project folder under the root (one with a config.yaml), by name, as `Project.summary` describes it."""
        found = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not PROJECT_NAME.match(path.name) or not path.is_dir():
                continue
            if not path.resolve().is_relative_to(self.root.resolve()) or not (path / "config.yaml").is_file():
                continue
            try:
                found.append(Project(path, **self.limits).summary())
            except UserError as e:  # a folder of it leads outside: listed with why it cannot be opened
                found.append({"name": path.name, "problem": str(e)})
        return found

    def create(self, name: str, *, identifier: str, class_word: str, model: str | None = None) -> Project:
        """A new project folder, as `dreambooth init` makes it; `model`: a model folder (absolute) or hub id."""
        path = self._path(name)
        if path.exists():
            raise UserError(f"a project named {name} already exists in {self.root}; open it, or choose another name.")
        written = model_for_config(model, path) if model else None
        try:
            with _quiet():
                init_project(path, identifier=identifier, class_word=class_word, model=written)
        except UserError:
            shutil.rmtree(path, ignore_errors=True)  # nothing of the user's was in it: it did not exist
            raise
        return Project(path, **self.limits)

    def open(self, name: str) -> Project:
        """An existing project folder by name."""
        path = self._path(name)
        if not (path / "config.yaml").is_file():
            raise NotFound(f"there is no project named {name} in {self.root} (no {name}/config.yaml); create it, or "
                            "list the projects to see their names.")
        return Project(path, **self.limits)


# ------------------------------------------------------------------------------------------ recipe form


def recipe_schema() -> dict[str, Any]:
    """The JSON schema of the recipe form: `Config`'s own, its sections of RECIPE_SECTIONS, each field with its
    type, default, range, choices, help and CLI flags, so that the form offers only what the trainer reads."""
    schema = Config.model_json_schema()
    properties = {name: schema["properties"][name] for name in RECIPE_SECTIONS}
    defs = {}
    for name in RECIPE_SECTIONS:
        ref = properties[name]["$ref"].rsplit("/", 1)[-1]
        defs[ref] = schema["$defs"][ref]
        for section, key in NOT_IN_FORM:
            if section == name:
                defs[ref]["properties"].pop(key, None)
                if isinstance(properties[name].get("default"), dict):
                    properties[name]["default"].pop(key, None)
    return {**{k: v for k, v in schema.items() if k not in ("properties", "$defs")}, "properties": properties,
            "$defs": defs}


def save_config(project: Project, values: dict[str, Any]) -> dict[str, Any]:
    """`project.save_config(values)`: the recipe written as config.yaml, validated as `train --config` reads it."""
    return project.save_config(values)


def family_defaults(model_path: str | Path) -> dict[str, Any] | None:
    """What the library knows of a base model's family from its config files alone: its name, the side it was made
    for (the training resolution to start from), the side multiple, its LoRA targets and its drawing defaults
    (steps, guidance, sampler). None when the folder's files do not tell."""
    from dreambooth.characters.character import folder_defaults
    from dreambooth.models.base import native_side
    from dreambooth.models.families import folder_family

    family = folder_family(model_path)
    if family is None:
        return None
    return {"family": family.name, "title": family.title, "pipeline": family.pipeline,
            "resolution": native_side(model_path) or family.native_side, "side_multiple": family.side_multiple,
            "denoiser_lora_targets": list(family.denoiser_lora_targets), "drawing": folder_defaults(str(model_path))}


def find_models(models_dir: str | Path, depth: int = 4) -> list[dict[str, Any]]:
    """Local diffusers model folders (with model_index.json) under `models_dir`, `depth` levels down at most (the
    hub cache's `models--org--name/snapshots/REV/` is three); not searched inside a model."""
    from dreambooth.models.families import folder_family

    root, found = Path(models_dir), []

    def visit(folder: Path, level: int) -> None:
        if (folder / "model_index.json").is_file():
            family = folder_family(folder)
            found.append({"name": str(folder.relative_to(root)), "path": str(folder.resolve()),
                          "family": family.name if family else None, "title": family.title if family else None})
            return
        if level >= depth:
            return
        with contextlib.suppress(OSError):
            for sub in sorted(folder.iterdir()):
                if sub.is_dir() and not sub.name.startswith("."):
                    visit(sub, level + 1)

    if root.is_dir():
        visit(root, 0)
    return found
