"""The one way this tool writes a file or folder that someone will read: complete or not at all.

Everything is written under a temporary name in the destination's folder (`.NAME.PID.tmp`), flushed to disk
(fsync of each file, then of the folder that holds the new name), given the permissions a plain `open()` would
give, and renamed into place. A reader sees the old version or the new one, never half of one; a crash or an
exception mid-write leaves the destination untouched and no temporary file behind (a killed process can leave
one, which `training.rundir` clears for a run folder). docs/design.md, "Atomic saves", lists who uses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dreambooth.errors import UserError


def default_file_mode() -> int:
    """The mode a plain `open()` would give a new file under the current umask (usually 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish(path: Path) -> None:
    """Flushes a file, or every file under a folder, to disk and gives it the usual permissions.

    safetensors and `tempfile.mkstemp` create files readable by their owner only (0600); a model another user or
    a web UI service must load would then fail to open.
    """
    mode = default_file_mode()
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    for file in files:
        os.chmod(file, mode)
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    """Makes a rename inside `folder` durable: the new name lives in the folder's own entry list."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform without directory handles: the rename is still atomic, only not yet durable
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """`.NAME.PID.tmp` beside `path`: hidden, unique to this process, on `path`'s file system (a rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path`, on any exception it is removed.

    ```
    with atomic_file(out) as tmp:
        save_file(tensors, tmp)
    ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _sync_folder(path.parent)


@contextlib.contextmanager
def temporary_folder(tmp: Path) -> Iterator[Path]:
    """An empty scratch folder, removed if the block fails; what the block leaves in it on success is the caller's.

    For a save that goes on after the block: a checkpoint that other processes write into, or a final model moved
    entry by entry into a run folder (`move_into`).
    """
    tmp = Path(tmp)
    _remove(tmp)  # a killed earlier save's leftovers
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise


def commit_folder(tmp: Path, path: Path) -> None:
    """Renames a finished temporary folder to `path`, replacing a folder already there (a checkpoint saved again).

    The old folder is renamed aside first and removed only after the new one is in place, so no moment has
    neither on disk, and the slow removal of gigabytes happens after the swap, not between its two renames.
    """
    publish(tmp)
    old = None
    if path.exists() or path.is_symlink():
        old = temporary_name(path.with_name(path.name + ".old"))
        _remove(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _sync_folder(path.parent)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_folder(path: Path, tmp: Path | None = None) -> Iterator[Path]:
    """Yields an empty temporary folder to fill; on success it becomes `path`, on any exception it is removed.

    `path` must not hold anything: callers check that first (an export never overwrites), and an empty folder is
    replaced. `tmp` names the temporary folder where a reader must recognise it.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder")
    with temporary_folder(tmp if tmp is not None else temporary_name(path)) as scratch:
        yield scratch
        commit_folder(scratch, path)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def save_safetensors_atomic(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file with `metadata` in its header (all values strings, as the format requires)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt", **(metadata or {})})
    return Path(path)


def move_into(src_dir: Path, dst_dir: Path, last: str | None = None) -> None:
    """Moves every entry of a finished temporary folder into `dst_dir`, replacing what is there, `last` moved last.

    For a folder that holds other things too (a run folder holds checkpoints beside the final model), so it cannot
    be swapped whole. Each rename is atomic; moving the marker file (`model_index.json`) last means a crash part-way
    leaves a folder that does not load, rather than one that loads a mix of old and new weights.
    """
    dst_dir.mkdir(parents=True, exist_ok=True)
    publish(src_dir)
    if last is not None:  # the old marker goes first: half a move must not load as the old model
        _remove(dst_dir / last)
        _sync_folder(dst_dir)
    entries = sorted(src_dir.iterdir(), key=lambda p: p.name == last)
    for entry in entries:
        target = dst_dir / entry.name
        _remove(target)
        os.replace(entry, target)
    src_dir.rmdir()
    _sync_folder(dst_dir)


def check_new_file(out: Path, suffix: str = ".safetensors") -> None:
    """An export's file must be a new path: nothing is ever overwritten."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / ('model' + suffix)}.")
    if out.suffix != suffix:
        raise UserError(f"--out {out} must end in {suffix} (this format is one {suffix.lstrip('.')} file).")
    if out.exists():
        raise UserError(f"--out {out} already exists; delete it or choose another name.")


def check_new_folder(out: Path) -> None:
    """An export's folder must be new or empty."""
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder; delete it or choose another "
                        "folder (export never overwrites a model).")
