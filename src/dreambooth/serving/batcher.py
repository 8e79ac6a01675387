"""The queue between HTTP requests and the one worker that owns the model: bounded, batching, with deadlines.

Each image asked for is a job. The worker takes the oldest job, lets a batch of jobs with the same batch key
(character, size, steps, guidance, sampler: what one pipeline call shares) fill for `window_s`, and draws them in one
call on its own thread, so the event loop keeps answering. A full queue refuses at once (`QueueFull`, HTTP 429 with
Retry-After); a job whose deadline passed, or whose client went away, is dropped before it is drawn.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    def __init__(self, waiting: int, asked: int, retry_after: int):
        super().__init__(f"the render queue holds {waiting} image(s) waiting, and {asked} more would not fit; "
                         f"retry in {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The job's deadline passed before it was drawn."""


@dataclass(eq=False)
class Job:
    key: Hashable
    item: Any
    deadline: float  # time.monotonic()
    future: asyncio.Future = field(repr=False)


class Batcher:
    """`render(items) -> results` (one result per item, same order) runs on one worker thread, a batch at a time."""

    def __init__(self, render: Callable[[list], list], *, max_queue: int, max_batch: int, window_s: float,
                 on_batch: Callable[[int, float], None] | None = None):
        self.render, self.max_queue, self.max_batch, self.window_s = render, max_queue, max_batch, window_s
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.pending: list[Job] = []
        self.running = 0
        self.batch_seconds = 0.0  # a moving average, for Retry-After
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")

    @property
    def depth(self) -> int:
        """Jobs waiting, not yet drawing."""
        return len(self.pending)

    def retry_after(self, n: int = 1) -> int:
        """Seconds until `n` more images would fit: the batches to draw before that many places are free."""
        over = len(self.pending) + n - self.max_queue
        batches = max(1, math.ceil(over / self.max_batch))
        return max(1, math.ceil(batches * (self.batch_seconds or 1.0)))

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="render-worker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self.pending:
            if not job.future.done():
                job.future.cancel()
        self.pending.clear()
        self._executor.shutdown(wait=True)

    def submit(self, key: Hashable, items: list, deadline: float) -> list[Job]:
        """Queues every item or none of them: a request's images are refused together when they do not fit."""
        if len(self.pending) + len(items) > self.max_queue:
            raise QueueFull(len(self.pending), len(items), self.retry_after(len(items)))
        loop = asyncio.get_running_loop()
        jobs = [Job(key, item, deadline, loop.create_future()) for item in items]
        self.pending.extend(jobs)
        self._wakeup.set()
        return jobs

    def cancel(self, jobs: list[Job]) -> None:
        """Takes jobs out of the queue (a client that left, a deadline that passed); drawing ones finish unseen."""
        for job in jobs:
            if not job.future.done():
                job.future.cancel()
        gone = set(map(id, jobs))
        self.pending = [job for job in self.pending if id(job) not in gone]

    def _take_batch(self) -> list[Job]:
        """The oldest live job and the live jobs with its key behind it, up to max_batch; expired ones fail."""
        now, batch, rest = time.monotonic(), [], []
        for job in self.pending:
            if job.future.done():
                continue
            if job.deadline <= now:
                job.future.set_exception(DeadlineExceeded())
                continue
            if len(batch) < self.max_batch and (not batch or job.key == batch[0].key):
                batch.append(job)
            else:
                rest.append(job)
        self.pending = rest
        return batch

    def _same_key_waiting(self) -> int:
        first = self.pending[0]
        return sum(1 for job in self.pending if job.key == first.key and not job.future.done())

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            fill_until = time.monotonic() + self.window_s
            while self.pending and self._same_key_waiting() < self.max_batch and time.monotonic() < fill_until:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.0, fill_until - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            if not batch:
                continue
            self.running = len(batch)
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self.render, [job.item for job in batch])
            except Exception as e:  # the batch's requests get the error; the worker goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            finally:
                self.running = 0
            seconds = time.monotonic() - started
            self.batch_seconds = seconds if not self.batch_seconds else 0.8 * self.batch_seconds + 0.2 * seconds
            self.on_batch(len(batch), seconds)
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
