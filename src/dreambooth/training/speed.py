"""Garbage collection around a command's start-up and exit, which it slows down on a CPU.

Importing torch, diffusers (with torch._dynamo and peft) and transformers creates about 700,000 Python objects
that live until the process ends. Python's collector walks all of them about six times as they arrive, again
at each later full collection, and once more when the interpreter exits. On the 2-core CPU machine, measured
in docs/bench.md ("Where a `tiny` run's time goes"), the walks during import cost about 0.5 s of a 6 s import,
each later one 0.2-0.3 s, and the one at exit 1.2 s. This module is torch-free, so that pausing the collector
can start before torch is imported.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def collection_paused():
    """No garbage collection inside the block; after it, the collector runs as before.

    For blocks that import libraries and load models: everything they create lives on, so collecting
    during them finds nothing. Garbage made meanwhile is collected after the block, nothing is frozen, so a
    long-lived process (a notebook, the test suite) does not keep it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def freeze_alive_objects() -> None:
    """Exempts every object alive now from all later collections, the one at exit included.

    Only for a process that ends with the work in hand: after a `dreambooth train` start-up (libraries and
    models), and before a command-line process exits. Frozen objects are never collected, so garbage in a
    reference cycle at this moment would stay: a process that goes on (a notebook, the tests, the demo's and
    the experiment's several runs) must not call it, and the large such garbage, the class-image pipeline, is
    collected before (train.prepare_class_images). Objects are still released by reference counting, and
    everything this tool writes is closed (and renamed into place) before a command returns.
    """
    gc.freeze()
