"""The step timer of bench/bench.py, which puts this folder on its training processes' PYTHONPATH: Python runs
a sitecustomize module at start-up.

When torch.optim.optimizer is first imported, a global optimizer-step post-hook is registered. torch calls it
after the step of every torch optimizer (AdamW for-loop, foreach or fused, bitsandbytes' 8-bit ones, and through
accelerate's AcceleratedOptimizer, which forwards only real steps). It records the clock (after a CUDA
synchronize, so the step has finished), the CPU time the process has used (all its threads), the peak RSS so far and
the peak CUDA memory so far. At exit a process
that stepped writes them to the JSON file named by DREAMBOOTH_BENCH_TIMES; a launcher that did not step writes
nothing. Importing nothing heavy here keeps the program's own import order as it is.
"""
import atexit
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import resource
import sys
import time

_OUT = os.environ.get("DREAMBOOTH_BENCH_TIMES")
_HERE = os.path.dirname(os.path.abspath(__file__))
_REC = {"pid": os.getpid(), "argv": sys.argv, "times": [], "cpu_times": [], "rss_kb": [], "cuda_allocated": [],
        "cuda_reserved": []}


def _on_step(optimizer, args, kwargs):
    torch = sys.modules["torch"]
    cuda = torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    _REC["times"].append(time.perf_counter())
    _REC["cpu_times"].append(time.process_time())
    _REC["rss_kb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if cuda:
        _REC["cuda_allocated"].append(torch.cuda.max_memory_allocated())
        _REC["cuda_reserved"].append(torch.cuda.max_memory_reserved())


class _HookOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.optim.optimizer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            module.register_optimizer_step_post_hook(_on_step)

        spec.loader.exec_module = exec_module
        return spec


def _write():
    if not _REC["times"]:
        return
    _REC["rss_kb_exit"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        _REC["cuda_allocated_exit"] = torch.cuda.max_memory_allocated()
    tmp = f"{_OUT}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_REC, f)
    os.replace(tmp, _OUT)


if _OUT:
    sys.meta_path.insert(0, _HookOnImport())
    atexit.register(_write)

# Shadowing another sitecustomize (some distributions ship one) must not drop it: run it too.
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
