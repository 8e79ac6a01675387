"""Images already drawn, on disk: the key is a hash of the compiled render request and the model's identity, so a
repeated request is answered without drawing, and a changed model or request never meets an old picture.

File names are the key's hex digest only: nothing a request says reaches the file system. The folder is kept under
`max_bytes` by removing the least recently used images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

from dreambooth.formats.atomic import atomic_file

log = logging.getLogger("dreambooth.serve")


def cache_key(request: dict, model_hash: str) -> str:
    """The hash of everything that decides the picture (prompt fragments with weights, seed, size, steps, ...)."""
    deciding = {k: v for k, v in request.items() if k not in ("tokens", "dropped")}
    text = json.dumps({"request": deciding, "model": model_hash}, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


class ImageStore(Protocol):
    """Where drawn pictures are kept: this folder (`ImageCache`) or a Redis shared by replicas (serving.stores).
    Neither method raises for a store gone wrong: a picture not found is a miss, one not kept costs only its entry."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, png: bytes) -> None: ...


class ImageCache:
    def __init__(self, folder: Path | None, max_bytes: int):
        self.folder, self.max_bytes = (Path(folder) if folder else None), max_bytes
        self._lock = threading.Lock()
        self._total = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._total = sum(p.stat().st_size for p in self.folder.glob("??/*.png"))

    def _path(self, key: str) -> Path:
        assert len(key) == 64 and all(c in "0123456789abcdef" for c in key), "cache keys are sha256 hex digests"
        return self.folder / key[:2] / f"{key}.png"

    def get(self, key: str) -> bytes | None:
        if self.folder is None:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # most recently used
        except FileNotFoundError:  # never written, or trimmed meanwhile by the worker thread
            return None
        except OSError as e:  # a cache folder gone wrong is a miss, never a failed request
            log.warning("image cache: could not read %s (%s)", path.name, e)
            return None
        return data

    def put(self, key: str, png: bytes) -> None:
        """Stores a picture; a disk that refuses only costs the cache entry (logged), never the picture drawn."""
        if self.folder is None:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # the folder may have been removed while serving
            with atomic_file(path) as tmp:
                Path(tmp).write_bytes(png)
        except OSError as e:
            log.warning("image cache: could not store %s (%s)", path.name, e)
            return
        with self._lock:
            self._total += len(png)
            if self._total > self.max_bytes:
                self._trim()

    def _trim(self) -> None:
        """Oldest-used first, down to 90% of the limit (so that the next writes do not scan again); a full scan,
        only when the limit is passed."""
        files = []
        for p in self.folder.glob("??/*.png"):
            try:
                stat = p.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime, stat.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes * 0.9:
                break
            path.unlink(missing_ok=True)
            total -= size
        self._total = total
