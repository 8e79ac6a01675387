"""What makes a run folder explain itself: library versions, atomic writes of small files and folders."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("dreambooth", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "numpy", "Pillow")


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def default_file_mode() -> int:
    """The mode a plain `open()` would give a new file under the current umask (usually 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish(path: Path) -> None:
    """Gives files the usual permissions before they are renamed into place.

    safetensors and `tempfile.mkstemp` create files readable by their owner only (0600); a model another user or
    a web UI service must load would then fail to open.
    """
    mode = default_file_mode()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        os.chmod(file, mode)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes through a temporary file in the same folder and renames it, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def move_into(src_dir: Path, dst_dir: Path, last: str | None = None) -> None:
    """Moves every entry of `src_dir` into `dst_dir`, replacing what is there, `last` moved last.

    Each rename is atomic; moving the marker file (`model_index.json`) last means a crash part-way leaves a
    folder that does not load, rather than one that loads a mix of old and new weights.
    """
    dst_dir.mkdir(parents=True, exist_ok=True)
    publish(src_dir)
    entries = sorted(src_dir.iterdir(), key=lambda p: p.name == last)
    for entry in entries:
        target = dst_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(entry, target)
    src_dir.rmdir()
