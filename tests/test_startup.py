"""Start-up and exit: the collector is paused while libraries load and skipped at exit; class-image batches."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from dreambooth.class_images import default_batch_size
from dreambooth.startup import collection_paused


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


@pytest.mark.parametrize(("device", "resolution", "batch"), [
    ("cuda", 512, 16), ("cuda", 1024, 16), ("cpu", 64, 16), ("cpu", 256, 16), ("cpu", 512, 4), ("cpu", 768, 1),
    ("cpu", 2048, 1)])
def test_class_images_are_generated_in_batches_that_fit_the_device(device, resolution, batch):
    assert default_batch_size(device, resolution) == batch
