"""Images already drawn, on disk: the key is a hash of the compiled render request and the model's identity, so a
repeated request is answered without drawing, and a changed model or request never meets an old picture.

File names are the key's hex digest only: nothing a request says reaches the file system. The folder is kept under
`max_bytes` by removing the least recently used images.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from dreambooth.formats.atomic import atomic_file


def cache_key(request: dict, model_hash: str) -> str:
    """The hash of everything that decides the picture (prompt fragments with weights, seed, size, steps, ...)."""
    deciding = {k: v for k, v in request.items() if k not in ("tokens", "dropped")}
    text = json.dumps({"request": deciding, "model": model_hash}, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


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
        except FileNotFoundError:
            return None
        os.utime(path)  # most recently used
        return data

    def put(self, key: str, png: bytes) -> None:
        if self.folder is None:
            return
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        with atomic_file(path) as tmp:
            Path(tmp).write_bytes(png)
        with self._lock:
            self._total += len(png)
            if self._total > self.max_bytes:
                self._trim()

    def _trim(self) -> None:
        """Oldest-used first, down to the limit; a full scan, only when the limit is passed."""
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.folder.glob("??/*.png")]
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
        self._total = total
