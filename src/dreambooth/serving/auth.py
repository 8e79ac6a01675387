"""Who may call the service: API keys (bearer tokens) and a request rate per key.

Keys come from a file (`--api-keys FILE`) or the environment (`DREAMBOOTH_API_KEYS`), one a line (or comma-separated
in the environment) as `NAME ROLE TOKEN`: ROLE `user` renders states; `operator` may also send raw prompts. A token is
compared with every key in constant time (on sha256 digests, so neither its content nor its length shows in the
timing). No token: 401; a token that is no key: 403.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dreambooth.config_file import read_text
from dreambooth.errors import UserError

ROLES = ("user", "operator")
MIN_TOKEN_LENGTH = 16
ENVIRONMENT = "DREAMBOOTH_API_KEYS"


@dataclass(frozen=True)
class Key:
    name: str
    role: str
    digest: bytes  # sha256 of the token; the token itself is not kept

    @property
    def operator(self) -> bool:
        return self.role == "operator"


LOCAL = Key("local", "operator", b"")  # the caller when no keys are configured (loopback only)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_keys(text: str, where: str) -> list[Key]:
    keys, problems = [], []
    for number, line in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            problems.append(f"entry {number}: expected `NAME ROLE TOKEN`, got {len(parts)} word(s)")
            continue
        name, role, token = parts
        if role not in ROLES:
            problems.append(f"entry {number} ({name}): role {role!r} is not one of {', '.join(ROLES)}")
        elif len(token) < MIN_TOKEN_LENGTH:
            problems.append(f"entry {number} ({name}): the token is {len(token)} characters; use at least "
                            f"{MIN_TOKEN_LENGTH} (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
        elif any(key.name == name for key in keys):
            problems.append(f"entry {number}: the name {name} is used twice")
        else:
            keys.append(Key(name, role, _digest(token)))
    if problems:
        raise UserError(f"API keys in {where}: " + "; ".join(problems) + ".")
    return keys


def load_keys(file: Path | None) -> list[Key]:
    """The keys of `file` and of the environment variable, together."""
    keys = []
    if file is not None:
        keys += parse_keys(read_text(Path(file), "--api-keys file"), str(file))
    if os.environ.get(ENVIRONMENT, "").strip():
        keys += parse_keys(os.environ[ENVIRONMENT], f"${ENVIRONMENT}")
    names = [key.name for key in keys]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"API key name(s) {', '.join(twice)} given in both --api-keys and ${ENVIRONMENT}.")
    return keys


def host_name(header: str) -> str:
    """The name of a Host header, without its port ('[::1]:7860' -> '::1'), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def local_names(host: str) -> tuple[str, ...]:
    """The names a keyless server on loopback answers to: a page of another site that points its own name at
    127.0.0.1 (DNS rebinding) is, to the browser, that server's own origin, and could otherwise use it; its requests
    are addressed (Host header) to the site's name."""
    return tuple(dict.fromkeys(["localhost", "127.0.0.1", "::1", host_name(host)]))


def find_key(keys: list[Key], token: str) -> Key | None:
    """The key whose token this is; every key is compared, so the time taken says nothing about which matched."""
    digest, found = _digest(token), None
    for key in keys:
        if hmac.compare_digest(digest, key.digest):
            found = key
    return found


@dataclass(frozen=True)
class Refusal:
    """A request over its caller's limit: the seconds until it may go on (Retry-After), and which limit it hit:
    `burst` (more requests in a row than the bucket holds) or `rate` (more than the rate, kept up)."""

    seconds: int
    limit: str


class Limiter(Protocol):
    """A caller's rate limit: kept by this process (`RateLimiter`) or in a Redis shared by replicas (serving.stores)."""

    def take(self, caller: str) -> Refusal | None: ...


class RateLimiter:
    """A token bucket per caller: `per_minute` requests a minute on average, bursts of up to `burst`."""

    def __init__(self, per_minute: float, burst: int):
        self.per_minute, self.burst = per_minute, burst
        self.rate = per_minute / 60.0
        # caller -> (tokens, when they were counted, when the bucket was last full)
        self._buckets: dict[str, tuple[float, float, float]] = {}
        self._lock = threading.Lock()

    MAX_CALLERS = 10_000  # keyless callers are addresses: buckets of idle ones are dropped past this many

    def take(self, caller: str) -> Refusal | None:
        """None if the caller may go on; otherwise how long to wait and which limit was hit."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) >= self.MAX_CALLERS and caller not in self._buckets:
                self._evict_full(now)
            tokens, last, full_at = self._buckets.get(caller, (float(self.burst), now, now))
            tokens = tokens + (now - last) * self.rate
            if tokens >= self.burst:
                tokens, full_at = float(self.burst), now
            if tokens >= 1.0:
                self._buckets[caller] = (tokens - 1.0, now, full_at)
                return None
            self._buckets[caller] = (tokens, now, full_at)
            seconds = max(1, math.ceil((1.0 - tokens) / self.rate))
            # Emptied sooner than the rate refills a whole bucket: the requests came as a burst larger than the
            # bucket. Emptied later: they came faster than the rate for longer than that, so the rate was hit.
            return Refusal(seconds, "burst" if now - full_at < self.burst / self.rate else "rate")

    def _evict_full(self, now: float) -> None:
        """Forgets callers whose bucket has refilled: forgetting them changes nothing they may do."""
        refill = self.burst / self.rate
        self._buckets = {c: bucket for c, bucket in self._buckets.items() if now - bucket[1] < refill}
