"""Start-up and exit: the collector is paused while libraries load and skipped at exit; class-image batches."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
from conftest import base_overrides

from dreambooth.config_file import load_config
from dreambooth.models import loading
from dreambooth.training import loop as train_module
from dreambooth.training.class_images import default_batch_size
from dreambooth.training.speed import collection_paused


def test_collection_is_paused_inside_and_restored_after_even_on_error():
    assert gc.isenabled()
    with collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collection_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_switched_off_by_the_caller_stays_off():
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_command_freezes_the_heap_before_exit_and_main_does_not(tmp_path):
    probe = ("import gc, sys; from dreambooth.cli import entry, main; "
             f"code = main(['init', {str(tmp_path / 'a')!r}]); frozen_by_main = gc.get_freeze_count(); "
             f"sys.argv = ['dreambooth', 'init', {str(tmp_path / 'b')!r}]; code += entry(); "
             "print(code, frozen_by_main, gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split()[-3:] == ["0", "0", "True"]
    assert (tmp_path / "b" / "config.yaml").is_file()


def test_a_run_freezes_its_start_up_only_in_a_process_that_ends_with_it(tiny_model, instance_dir, tmp_path):
    """main() in a notebook or the tests goes on after the run: nothing frozen. The console script (entry) ends
    with its command: the run freezes what its start-up made, before the first step."""
    probe = ("import gc, sys; from dreambooth.cli import entry, main; from dreambooth.training import loop; "
             "real = loop.loop; loop.loop = lambda *a: print('FROZEN', gc.get_freeze_count() > 0) or real(*a); "
             "args = sys.argv[1:]; main(args); sys.argv = ['dreambooth', *args[:-1], args[-1] + '2']; entry()")
    argv = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", "a photo of sks dog", "--resolution", "64", "--max_train_steps", "1",
            "--report_to", "none", "--output_dir", str(tmp_path / "out")]
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True).stdout
    assert [line for line in out.splitlines() if line.startswith("FROZEN")] == ["FROZEN False", "FROZEN True"]


def test_the_class_image_pipeline_is_gone_before_the_training_models_load(tiny_model, instance_dir, tmp_path,
                                                                           monkeypatch):
    pipes, alive_at_load = [], []
    real_pipeline, real_models = loading.load_pipeline, train_module.load_models

    def load_pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        # A pipeline's first load in a process leaves it in reference cycles (seen with diffusers 0.42); this one
        # makes sure of it.
        pipe.__dict__["_cycle"] = pipe
        pipes.append(weakref.ref(pipe))
        return pipe

    def load_models(*args, **kwargs):
        alive_at_load.append(pipes[0]() is not None)
        return real_models(*args, **kwargs)

    monkeypatch.setattr(loading, "load_pipeline", load_pipeline)
    monkeypatch.setattr(train_module, "load_models", load_models)
    cfg = load_config(None, base_overrides(tiny_model, instance_dir, tmp_path / "class", tmp_path / "out",
                                           **{"training.max_train_steps": 1, "dataset.num_class_images": 1}))
    gc.disable()  # only an explicit collection frees the pipeline's reference cycles
    try:
        train_module.train(cfg)
    finally:
        gc.enable()
    assert len(pipes) == 1 and alive_at_load == [False]
    assert gc.get_freeze_count() == 0  # a run whose process goes on freezes nothing


@pytest.mark.parametrize(("device", "resolution", "batch"), [
    ("cuda", 512, 16), ("cuda", 1024, 16), ("cpu", 64, 16), ("cpu", 256, 16), ("cpu", 512, 4), ("cpu", 768, 1),
    ("cpu", 2048, 1)])
def test_class_images_are_generated_in_batches_that_fit_the_device(device, resolution, batch):
    assert default_batch_size(device, resolution) == batch


@pytest.mark.parametrize(("resolution", "free_gib", "batch"), [(512, 100, 64), (512, 10, 20), (1024, 10, 5),
                                                               (512, 0.1, 1)])
def test_a_gpu_batch_follows_the_free_memory(resolution, free_gib, batch):
    assert default_batch_size("cuda", resolution, int(free_gib * 2**30)) == batch


def test_a_class_image_batch_that_runs_out_of_memory_is_halved_and_draws_the_same_images(tmp_path):
    """Each image has its own seed: after 16 -> 8 -> 4 the images are those a batch of 4 draws from the start."""
    import numpy as np
    import torch
    from PIL import Image

    from dreambooth.training.class_images import generate_missing, plan_class_images, recipe

    class Pipe:  # a stand-in pipeline that holds at most 4 images; each image is its seed's noise
        device = torch.device("cpu")

        def __init__(self):
            self.batches = []

        def __call__(self, prompt, generator, height, width, **kwargs):
            if len(prompt) > 4:
                raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
            self.batches.append(len(prompt))
            images = [Image.fromarray((torch.rand(height, width, 3, generator=g).numpy() * 255).astype(np.uint8))
                      for g in generator]
            return type("Out", (), {"images": images})()

    drawn = {}
    for start, folder in ((16, "halved"), (4, "fits")):
        pipe = Pipe()
        plan = plan_class_images(tmp_path / folder, recipe("a photo of dog", "m", 8), 10)
        generate_missing(plan, seed=3, load_pipe=lambda pipe=pipe: pipe, batch_size=start, steps=1)
        assert pipe.batches == [4, 4, 2]
        drawn[folder] = {p.name: np.asarray(Image.open(p)) for p in plan.staged}
    assert drawn["halved"].keys() == drawn["fits"].keys() and len(drawn["fits"]) == 10
    assert all(np.array_equal(drawn["halved"][k], drawn["fits"][k]) for k in drawn["fits"])


@pytest.mark.parametrize(("given", "seen"), [
    ({}, {"GOMP_SPINCOUNT": "0", "OMP_NUM_THREADS": "1"}),
    ({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}, {"GOMP_SPINCOUNT": "30000000000", "OMP_NUM_THREADS": "2"}),
    ({"GOMP_SPINCOUNT": "300000"}, {"GOMP_SPINCOUNT": "300000", "OMP_NUM_THREADS": "1"}),
])
def test_the_command_makes_openmp_threads_sleep_and_leave_a_core_unless_the_user_chose(given, seen):
    """Beside another torch process on the same cores, OpenMP threads spinning at barriers made the demo about 100
    times slower (issue 24). libgomp reads its settings when torch loads; OMP_DISPLAY_ENV=VERBOSE makes it print what
    it read. The spin count tells the policies apart (300000 unset, 0 passive: the policy line says PASSIVE for
    both). The process here may run on 2 cores (taskset), so it leaves 1 thread."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update({"OMP_DISPLAY_ENV": "VERBOSE", **given})
    # the console script's entry (here answering --help, which loads no torch), then torch, as a command loads it
    script = ("import os, sys; os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2]); "
              "from dreambooth.cli import entry; sys.argv = ['dreambooth', '--help']\n"
              "try:\n    entry()\nexcept SystemExit:\n    pass\n"
              "assert 'torch' not in sys.modules\nimport torch\ntorch.ones(64, 64).sum()")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name, value in seen.items():
        assert f"{name} = '{value}'" in proc.stderr, name


def test_the_thread_count_leaves_a_core_and_what_the_user_set_stays():
    from dreambooth.training.speed import cpu_threading

    assert cpu_threading({}, cores=16) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "15"}
    assert cpu_threading({}, cores=1) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    mine = {"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "ACTIVE"}
    assert cpu_threading(mine, cores=16) == {} and mine == {"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "ACTIVE"}
    assert cpu_threading({"GOMP_SPINCOUNT": "1000"}, cores=4) == {"OMP_NUM_THREADS": "3"}
