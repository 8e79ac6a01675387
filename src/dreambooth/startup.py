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

_ends_with_its_run = False


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


def process_ends_with_its_run() -> None:
    """Marks this process as one that ends when its one training run does (`dreambooth train`)."""
    global _ends_with_its_run
    _ends_with_its_run = True


def start_up_done() -> None:
    """In a process that ends with its run, exempts everything alive now (libraries, models) from collection.

    Frozen objects are never collected, so this is left out where the process goes on after the run (a
    notebook, the tests, the demo's and the experiment's several runs): garbage in a reference cycle at this
    moment would stay. The large such garbage, the class-image pipeline, is collected before (see
    train.prepare_class_images).
    """
    if _ends_with_its_run:
        gc.freeze()


def skip_final_collection() -> None:
    """Spares a process that is about to exit the collector's last walk over every object.

    Only for the end of a command-line process: frozen objects are never collected again. Objects are still
    released by reference counting as the interpreter shuts down, and everything this tool writes is closed
    (and renamed into place) before a command returns.
    """
    gc.freeze()
