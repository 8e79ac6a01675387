"""The one atomic writer (dreambooth.formats.atomic) and every save that goes through it: a failure mid-write leaves
the destination as it was and no temporary file behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.formats import atomic
from dreambooth.formats.atomic import (
    atomic_file,
    atomic_folder,
    default_file_mode,
    save_safetensors_atomic,
    temporary_folder,
    write_json_atomic,
)
from dreambooth.models.families import FAMILIES
from dreambooth.training.rundir import is_partial_save, remove_partial_saves


class Boom(Exception):
    pass


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_file_replaces_the_old_one_only_when_complete(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})
    with pytest.raises(Boom), atomic_file(target) as tmp:
        tmp.write_text('{"step": 2, "half of it')
        raise Boom
    assert target.read_text() == '{\n  "step": 1\n}\n'
    assert listing(tmp_path) == ["state.json"]
    write_json_atomic(target, {"step": 2})
    assert '"step": 2' in target.read_text() and listing(tmp_path) == ["state.json"]
    assert stat.S_IMODE(os.stat(target).st_mode) == default_file_mode()


def test_a_failed_safetensors_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors_atomic({"x": torch.zeros(2)}, tmp_path / "lora.safetensors")
    assert listing(tmp_path) == []


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(Boom), atomic_folder(out) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "weights").write_bytes(b"partial")
        raise Boom
    assert listing(tmp_path) == []
    with atomic_folder(out) as tmp:
        (tmp / "model_index.json").write_text("{}")
    assert listing(tmp_path) == ["model", "model/model_index.json"]
    with pytest.raises(FileExistsError), atomic_folder(out):
        pass  # a folder with content is never replaced
    assert listing(tmp_path) == ["model", "model/model_index.json"]


def test_a_scratch_folder_goes_when_its_block_fails(tmp_path):
    scratch = tmp_path / ".final-model.tmp"
    scratch.mkdir()
    (scratch / "left-by-a-killed-run").write_text("x")
    with pytest.raises(Boom), temporary_folder(scratch) as tmp:
        assert listing(tmp) == []  # a killed earlier save's leftovers are cleared first
        (tmp / "unet").mkdir()
        raise Boom
    assert not scratch.exists()


def test_a_temporary_name_left_by_a_killed_process_is_a_partial_save(tmp_path):
    name = atomic.temporary_name(tmp_path / "run_info.json").name
    assert is_partial_save(name) and is_partial_save("checkpoint-40.tmp") and is_partial_save(".lora.tmp")
    assert not is_partial_save("run_info.json") and not is_partial_save("photos.tmp")
    (tmp_path / name).write_text("half")
    for folder in ("checkpoint-40.tmp", ".final-model.tmp/unet", "checkpoint-20", "samples"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "samples" / "step-000010.png").write_bytes(b"png")
    (tmp_path / "samples" / atomic.temporary_name(tmp_path / "step-000020.png").name).write_bytes(b"half a png")
    remove_partial_saves(tmp_path)
    assert listing(tmp_path) == ["checkpoint-20", "samples", "samples/step-000010.png"]


def test_a_folder_saved_again_replaces_the_old_one_whole(tmp_path):
    final = tmp_path / "checkpoint-10"
    for content in ("old", "new"):
        scratch = tmp_path / "checkpoint-10.tmp"
        scratch.mkdir()
        (scratch / "weights").write_text(content)
        atomic.commit_folder(scratch, final)
    assert listing(tmp_path) == ["checkpoint-10", "checkpoint-10/weights"]
    assert (final / "weights").read_text() == "new"


def test_a_model_moved_in_part_way_does_not_load_as_the_old_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for part in ("unet", "text_encoder"):
        (run / part).mkdir(parents=True)
        (run / part / "w").write_text("old")
    (run / "model_index.json").write_text("{}")
    new = tmp_path / "new"
    for part in ("unet", "text_encoder"):
        (new / part).mkdir(parents=True)
        (new / part / "w").write_text("new")
    (new / "model_index.json").write_text("{}")
    real, moved = os.replace, []

    def killed_after_one(src, dst):
        if moved:
            raise KeyboardInterrupt
        moved.append(dst)
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        atomic.move_into(new, run, last="model_index.json")
    assert not (run / "model_index.json").exists()  # a mix of old and new parts: no loader takes it for a model


def test_a_failed_lora_save_leaves_neither_file_nor_scratch_folder(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from dreambooth.formats import lora

    def fails_midway(folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "pytorch_lora_weights.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lora, "lora_layers", lambda module, *args: {})
    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", fails_midway)
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(OSError, match="disk full"):
        lora.save_lora(tmp_path, FAMILIES["sd1"], {"unet": torch.nn.Linear(1, 1), "text_encoder": None}, {},
                       {"dreambooth.steps": "10"})
    assert listing(tmp_path) == ["checkpoint-10"]


def test_a_lora_save_writes_our_metadata_in_fp32(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dreambooth.formats import lora

    def writes(folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({"unet.x.lora_A.weight": torch.ones(2, dtype=torch.float16)},
                  str(Path(folder) / "pytorch_lora_weights.safetensors"), metadata={"format": "pt", "theirs": "1"})

    monkeypatch.setattr(lora, "lora_layers", lambda module, *args: {})
    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", writes)
    path = lora.save_lora(tmp_path, FAMILIES["sd1"], {"unet": torch.nn.Linear(1, 1), "text_encoder": None}, {},
                          {"dreambooth.steps": "10"})
    assert listing(tmp_path) == ["pytorch_lora_weights.safetensors"]
    assert load_file(str(path))["unet.x.lora_A.weight"].dtype == torch.float32
    with safe_open(str(path), "pt") as f:
        assert {"theirs": "1", "dreambooth.steps": "10"}.items() <= f.metadata().items()
    assert stat.S_IMODE(os.stat(path).st_mode) == default_file_mode()


def test_nothing_in_the_package_renames_a_file_into_place_by_itself():
    """Every save goes through formats.atomic; a hand-rolled temp-and-rename differs in fsync, mode and clean-up.

    Renames that move the user's own files aside (class images) are moves, not saves, and are listed here."""
    package = Path(__file__).resolve().parents[1] / "src" / "dreambooth"
    # stale class images aside, staged ones in; the studio's removed photos and crop originals into the project's
    # trash (and back when the crop's save fails): the user's files move
    moves = {"training/class_images.py": 3, "studio/projects.py": 2}
    found = {}
    for path in package.rglob("*.py"):
        rel = str(path.relative_to(package))
        if rel == "formats/atomic.py":
            continue
        text = path.read_text(encoding="utf-8")
        count = text.count("os.replace(") + text.count(".rename(") + text.count("mkstemp(")
        if count:
            found[rel] = count
    assert found == moves


class OneProcess:
    """What save_checkpoint asks of accelerate's Accelerator, for one process; save_state writes a weights file."""

    is_main_process, process_index = True, 0

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"weights")


def test_a_checkpoint_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    from dreambooth.training import checkpoint

    saved = checkpoint.save_checkpoint(OneProcess(), tmp_path, 10, {"run_id": "r"}, None, {"config.yaml": "a"})
    assert sorted(p.name for p in saved.iterdir()) == ["config.yaml", "model.safetensors", "trainer_state.json"]

    def fails(tmp, final):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "commit_folder", fails)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(OneProcess(), tmp_path, 20, {"run_id": "r"}, None)
    assert listing(tmp_path) == ["checkpoint-10", *(f"checkpoint-10/{n}" for n in ("config.yaml", "model.safetensors",
                                 "trainer_state.json"))]
