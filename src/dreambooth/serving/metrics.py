"""What `GET /metrics` says, in Prometheus' text format: requests by endpoint and outcome, latency, queue depth,
batch sizes, images drawn and images per second, cache hits, and GPU memory where there is a GPU.

Each service has its own registry, so two services in one process (tests) count apart.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dreambooth_requests", "HTTP requests by endpoint and outcome.",
                                ["endpoint", "outcome"], registry=r)
        self.latency = Histogram("dreambooth_request_seconds", "Time from request to response.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("dreambooth_queue_depth", "Images waiting to be drawn.", registry=r)
        self.batch_size = Histogram("dreambooth_batch_size", "Images per pipeline call.",
                                    buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.batch_seconds = Histogram("dreambooth_batch_seconds", "Time of one pipeline call.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("dreambooth_images", "Images drawn (not from the cache).", registry=r)
        self.images_per_second = Gauge("dreambooth_images_per_second", "Images drawn per second over the last minute.",
                                       registry=r)
        self.cache = Counter("dreambooth_cache_lookups", "Image cache lookups by result.", ["result"], registry=r)
        self.lora_switches = Counter("dreambooth_lora_switches", "Batches drawn with other LoRAs than the one before "
                                     "on the same pipeline.", registry=r)
        self.loras_loaded = Gauge("dreambooth_lora_characters_loaded", "LoRA characters whose adapters are in a "
                                  "pipeline of this process now.", registry=r)
        self.gpu_memory = Gauge("dreambooth_gpu_memory_bytes", "GPU memory of this process.", ["kind"], registry=r)
        self._drawn: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def record_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)
        with self._lock:
            self._drawn.append((time.monotonic(), size))

    def render(self, queue_depth: int, loras_loaded: int | None = None) -> bytes:
        """The text of /metrics, with the gauges read now."""
        self.queue_depth.set(queue_depth)
        if loras_loaded is not None:
            self.loras_loaded.set(loras_loaded)
        now = time.monotonic()
        with self._lock:
            while self._drawn and self._drawn[0][0] < now - 60:
                self._drawn.popleft()
            self.images_per_second.set(sum(size for _, size in self._drawn) / 60.0)
        self._gpu_memory()
        return generate_latest(self.registry)

    def _gpu_memory(self) -> None:
        import sys

        torch = sys.modules.get("torch")  # read only when the renderer brought torch in
        if torch is not None and torch.cuda.is_available():
            self.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated())
            self.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved())
            self.gpu_memory.labels("peak").set(torch.cuda.max_memory_allocated())
