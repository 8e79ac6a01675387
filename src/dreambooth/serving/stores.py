"""Where the image cache and the rate limits live: in this process (a folder, a dict) by default, or in one Redis that
several `serve` processes or Ray replicas share (`--redis-url`), so that a picture drawn by one replica is a hit for
every other and a caller's burst is spent once, not once per replica.

In Redis (a single server, not Redis Cluster: the scripts touch keys they compute):
  dreambooth:image:KEY     the PNG of cache key KEY (a sha256 hex digest, as on disk)
  dreambooth:images        sorted set of keys, scored by a use counter (dreambooth:image-clock): the LRU order
  dreambooth:image-sizes   hash of key -> PNG bytes; dreambooth:image-bytes their sum, what --cache-mb bounds
  dreambooth:rate:CALLER   hash of tokens, last, full_at: the token bucket of serving.auth.RateLimiter
Each get, put and take is one Lua script, so it is atomic against every other replica's.

Redis failing while serving fails no request: the cache answers a miss and keeps nothing; the limits fall back to
this process's own bucket (see RedisRateLimiter). Each is logged once per outage, and Redis is asked again after
`retry_s`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

from dreambooth.errors import UserError
from dreambooth.serving.auth import Limiter, RateLimiter, Refusal
from dreambooth.serving.cache import ImageCache, ImageStore

log = logging.getLogger("dreambooth.serve")

PREFIX = "dreambooth:"
CONNECT_TIMEOUT_S = 2.0  # start-up's refusal of an unreachable --redis-url, and the longest a request waits on Redis
RETRY_S = 5.0  # after a failure, how long Redis is left alone before it is asked again


class Outage:
    """Whether Redis is to be asked now: after a failure it is left alone for `retry_s` (each request would otherwise
    wait out the timeout), and the failure and the recovery are logged once each, not per request."""

    def __init__(self, what: str, meanwhile: str, retry_s: float):
        self.what, self.meanwhile, self.retry_s = what, meanwhile, retry_s
        self.until: float | None = None  # monotonic time before which Redis is not asked; None: Redis is up

    def ask(self) -> bool:
        return self.until is None or time.monotonic() >= self.until

    def failed(self, error: Exception) -> None:
        if self.until is None:
            log.warning("%s: Redis failed (%s); %s until it answers again", self.what, error, self.meanwhile)
        self.until = time.monotonic() + self.retry_s

    def answered(self) -> None:
        if self.until is not None:
            log.warning("%s: Redis answers again", self.what)
            self.until = None


# KEYS: image, lru, sizes, total, clock; ARGV: the cache key. A picture found moves to the LRU's newest end; one
# that Redis itself evicted (a maxmemory policy) leaves the index, so the bytes counted stay the bytes kept.
GET_SCRIPT = """
local png = redis.call('GET', KEYS[1])
if png then
  redis.call('ZADD', KEYS[2], 'XX', redis.call('INCR', KEYS[5]), ARGV[1])
  return png
end
local size = redis.call('HGET', KEYS[3], ARGV[1])
if size then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('DECRBY', KEYS[4], size)
end
return false
"""

# KEYS: image, lru, sizes, total, clock; ARGV: the cache key, the PNG, the limit in bytes, the images' key prefix.
# Past the limit, least recently used first down to 90% of it, as the disk cache trims.
PUT_SCRIPT = """
local old = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], #ARGV[2])
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[5]), ARGV[1])
local total = redis.call('INCRBY', KEYS[4], #ARGV[2] - old)
local limit = tonumber(ARGV[3])
if total > limit then
  while total > limit * 0.9 do
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
    if not oldest then break end
    local size = tonumber(redis.call('HGET', KEYS[3], oldest) or '0')
    redis.call('ZREM', KEYS[2], oldest)
    redis.call('HDEL', KEYS[3], oldest)
    redis.call('DEL', ARGV[4] .. oldest)
    total = redis.call('DECRBY', KEYS[4], size)
  end
end
return total
"""


class RedisImageCache:
    """serving.cache.ImageCache's interface over Redis: every replica's pictures in one LRU bounded by `max_bytes`
    of PNG (Redis's own overhead per key, about a hundred bytes, and the index's are not counted)."""

    def __init__(self, client, max_bytes: int, *, prefix: str = PREFIX, retry_s: float = RETRY_S):
        self.client, self.max_bytes, self.prefix = client, max_bytes, prefix
        names = ("images", "image-sizes", "image-bytes", "image-clock")
        self._index = [prefix + name for name in names]
        self._get, self._put = client.register_script(GET_SCRIPT), client.register_script(PUT_SCRIPT)
        self.outage = Outage("image cache", "every picture drawn, none kept,", retry_s)

    def _image(self, key: str) -> str:
        assert len(key) == 64 and all(c in "0123456789abcdef" for c in key), "cache keys are sha256 hex digests"
        return f"{self.prefix}image:{key}"

    def get(self, key: str) -> bytes | None:
        import redis

        if not self.outage.ask():
            return None
        try:
            png = self._get(keys=[self._image(key), *self._index], args=[key])
        except redis.RedisError as e:
            self.outage.failed(e)
            return None
        self.outage.answered()
        return png

    def put(self, key: str, png: bytes) -> None:
        import redis

        if not self.outage.ask():
            return
        try:
            self._put(keys=[self._image(key), *self._index], args=[key, png, self.max_bytes, self.prefix + "image:"])
        except redis.RedisError as e:
            self.outage.failed(e)
            return
        self.outage.answered()


# KEYS: the caller's bucket; ARGV: rate (tokens a second), burst, now (empty: the Redis server's clock). The same
# bucket and the same burst-or-rate reading as serving.auth.RateLimiter.take; numbers kept with 17 digits, so that
# a bucket read back is the bucket written. It expires once it would be full again: forgetting it changes nothing.
TAKE_SCRIPT = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'last', 'full_at')
local tokens = tonumber(bucket[1]) or burst
local last, full_at = tonumber(bucket[2]) or now, tonumber(bucket[3]) or now
tokens = tokens + (now - last) * rate
if tokens >= burst then
  tokens, full_at = burst, now
end
local answer = {0, 0, ''}
if tokens >= 1 then
  tokens = tokens - 1
else
  local limit = 'rate'
  if now - full_at < burst / rate then limit = 'burst' end
  answer = {1, math.max(1, math.ceil((1 - tokens) / rate)), limit}
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'last', string.format('%.17g', now),
           'full_at', string.format('%.17g', full_at))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return answer
"""


class RedisRateLimiter:
    """serving.auth.RateLimiter's token buckets kept in Redis, so that replicas share each caller's burst and rate.

    The time is the Redis server's (replicas' clocks may differ), or `clock()` where given (tests). With Redis gone,
    the limits are this process's own `RateLimiter` until it answers again: failing open would leave a replica
    unlimited, and a 503 would make a cache server's outage the service's; a per-process bucket still holds each
    caller to the burst and rate on this replica, only not summed over the replicas."""

    def __init__(self, client, per_minute: float, burst: int, *, prefix: str = PREFIX, retry_s: float = RETRY_S,
                 clock: Callable[[], float] | None = None):
        self.client, self.prefix, self.clock = client, prefix, clock
        self.rate, self.burst = per_minute / 60.0, burst
        self._take = client.register_script(TAKE_SCRIPT)
        self.local = RateLimiter(per_minute, burst)
        self.outage = Outage("rate limits", "this process's own limits", retry_s)

    def take(self, caller: str) -> Refusal | None:
        import redis

        if self.rate <= 0:
            return None
        if not self.outage.ask():
            return self.local.take(caller)
        now = "" if self.clock is None else repr(float(self.clock()))
        try:
            refused, seconds, limit = self._take(keys=[f"{self.prefix}rate:{caller}"],
                                                 args=[repr(self.rate), self.burst, now])
        except redis.RedisError as e:
            self.outage.failed(e)
            return self.local.take(caller)
        self.outage.answered()
        return Refusal(int(seconds), limit.decode()) if refused else None


class Stores(NamedTuple):
    cache: ImageStore
    limiter: Limiter


def shown(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:  # too malformed to split (an unclosed [): whatever stands before an @ may be a password
        return "***@" + url.rpartition("@")[2] if "@" in url else url
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rpartition("@")[2]))


def redis_client(url: str):
    """A client of `url`, asked once: a UserError naming --redis-url when the URL is malformed or Redis does not
    answer within CONNECT_TIMEOUT_S."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    example = "redis://HOST:6379/0"
    try:
        # one retry at once (a pooled connection that Redis closed, e.g. after a restart), never a growing back-off:
        # a request waits at most about twice the timeout on a Redis that is gone
        client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                      socket_timeout=CONNECT_TIMEOUT_S, retry=Retry(NoBackoff(), 1))
    except ValueError as e:
        raise UserError(f"--redis-url {shown(url)} is not a Redis URL ({e}): give one such as {example} "
                        "(rediss:// for TLS, unix:///PATH for a socket).") from None
    try:
        client.ping()
    except redis.AuthenticationError as e:
        raise UserError(f"Redis at --redis-url {shown(url)} refused the login ({e}): put the right user and "
                        "password in the URL (redis://USER:PASSWORD@HOST:6379/0).") from None
    except redis.RedisError as e:
        raise UserError(f"no Redis answered at --redis-url {shown(url)} within {CONNECT_TIMEOUT_S:g} s ({e}): start "
                        f"Redis there, or give the URL of one that runs ({example}), or leave --redis-url out to "
                        "keep the cache and the limits in this process.") from None
    return client


def stores(options, characters_file: Path) -> Stores:
    """The image cache and the rate limiter `serve` uses (`options`: a command_options.ServeOptions): on disk and in
    this process, or, with --redis-url, in that Redis (asked once here: a UserError before any model loads).
    --no-cache keeps no pictures either way; --cache-dir with --redis-url is refused, as the cache cannot be both."""
    per_minute, burst, max_bytes = options.rate_per_minute, options.burst, options.cache_mb * 1024 * 1024
    if options.redis_url is None:
        folder = None if options.no_cache else (options.cache_dir or Path(characters_file).parent / ".serve-cache")
        return Stores(ImageCache(folder, max_bytes), RateLimiter(per_minute, burst))
    if options.cache_dir is not None:
        raise UserError(f"--cache-dir {options.cache_dir} and --redis-url both say where the image cache is: drop "
                        "--cache-dir to share the cache in Redis, or drop --redis-url to keep it on this disk.")
    client = redis_client(options.redis_url)
    cache = ImageCache(None, 0) if options.no_cache else RedisImageCache(client, max_bytes)
    return Stores(cache, RedisRateLimiter(client, per_minute, burst))
