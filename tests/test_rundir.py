"""The output folder's bookkeeping, without a model: which run it holds, refusals, rotation, the lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dreambooth.config_file import load_config
from dreambooth.errors import UserError
from dreambooth.models.base import CHECKPOINT_STATE
from dreambooth.training.rundir import (
    RUN_INFO,
    RunLock,
    inspect_folder,
    list_checkpoints,
    plan_run,
    remove_partial_saves,
    rotate,
    run_settings,
)


def cfg_for(out, **extra):
    values = {"model.pretrained_model": "org/model", "dataset.instance_prompt": "a photo of sks dog",
              "output.output_dir": str(out), "training.max_train_steps": 10, **extra}
    return load_config(None, values)


def identity(cfg):
    return "sha256:test"


def make_ckpt(out, step, *, run_id="r1", save_index=None, settings=None, complete=True):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / CHECKPOINT_STATE).write_text(json.dumps({"global_step": step, "run_id": run_id, "settings": settings,
                                                   "save_index": save_index if save_index is not None else step}))
    return path


def write_run(out, run_id="r1", settings=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_INFO).write_text(json.dumps({"run_id": run_id, "settings": settings}))


def test_latest_is_the_last_saved_and_partial_saves_are_ignored(tmp_path):
    make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 10, save_index=10)
    make_ckpt(tmp_path, 6, save_index=11)  # resumed from an earlier checkpoint: saved after step 10
    make_ckpt(tmp_path, 12, complete=False)  # killed before its state file was written
    (tmp_path / "checkpoint-14.tmp").mkdir()  # killed before the rename
    assert [c.path.name for c in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10", "checkpoint-6"]
    remove_partial_saves(tmp_path)
    assert not (tmp_path / "checkpoint-14.tmp").exists()


def test_rotation_keeps_the_newest_and_never_the_one_just_written(tmp_path):
    for step in (2, 4, 6, 8):
        make_ckpt(tmp_path, step)
    rotate(tmp_path, 2, keep=tmp_path / "checkpoint-8")
    assert [c.path.name for c in list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8"]
    # an older run's higher step numbers do not make the new checkpoint the one to go
    just_written = make_ckpt(tmp_path, 1, save_index=100)
    rotate(tmp_path, 1, keep=just_written)
    assert [c.path.name for c in list_checkpoints(tmp_path)] == ["checkpoint-1"]


def test_a_new_or_empty_folder_starts_a_new_run(tmp_path):
    assert plan_run(cfg_for(tmp_path / "new"), identity).resume_from is None
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("")
    plan = plan_run(cfg_for(tmp_path / "empty"), identity)
    assert plan.resume_from is None and plan.replace is None


def test_a_folder_holding_another_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "out"
    settings = run_settings(cfg_for(out), "sha256:test")
    write_run(out, settings=settings)
    make_ckpt(out, 4, settings=settings)
    with pytest.raises(UserError, match="holds another run .*resume_from_checkpoint latest.*overwrite_output_dir"):
        plan_run(cfg_for(out), identity)
    plan = plan_run(cfg_for(out, **{"output.overwrite_output_dir": True}), identity)
    assert plan.replace is not None and (out / "checkpoint-4").exists()  # nothing removed before the run starts
    plan.claim()
    assert not (out / "checkpoint-4").exists() and not (out / RUN_INFO).exists()
    resumed = plan_run(cfg_for(tmp_path / "again"), identity)
    assert resumed.resume_from is None


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    out = tmp_path / "out"
    write_run(out)
    for name in ("logs", "samples", "unet"):
        (out / name).mkdir()
    (out / "model_index.json").write_text("{}")
    (out / ".dreambooth.lock").write_text("{}")
    plan = plan_run(cfg_for(out, **{"output.overwrite_output_dir": True}), identity)
    plan.claim()
    assert sorted(p.name for p in out.iterdir()) == [".dreambooth.lock"]


def test_a_folder_of_other_files_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.yaml").write_text("model: {}")  # a run's name, but no run here: the user's own file
    with pytest.raises(UserError, match="not from a training run .*config.yaml"):
        plan_run(cfg_for(out, **{"output.overwrite_output_dir": True}), identity)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        plan_run(cfg_for(tmp_path / "file"), identity)


def test_a_diffusers_model_folder_is_never_an_output(tmp_path):
    out = tmp_path / "sd15"
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    (out / "unet").mkdir()
    with pytest.raises(UserError, match="not from a training run"):
        plan_run(cfg_for(out, **{"output.overwrite_output_dir": True}), identity)


def test_an_earlier_run_that_saved_nothing_is_replaced_with_a_note(tmp_path):
    out = tmp_path / "out"
    write_run(out)
    (out / "logs").mkdir()
    plan = plan_run(cfg_for(out), identity)
    assert plan.replace is not None and "saved no checkpoint" in plan.notes[0]


def model_folder(path, pipeline, hidden_act):
    """The config files that tell a model's family, and nothing else."""
    (path / "text_encoder").mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (path / "text_encoder" / "config.json").write_text(json.dumps({"hidden_act": hidden_act}))
    return path


def test_a_checkpoint_of_another_base_model_names_it_and_both_families(tmp_path):
    """The settings hold the base model by the hash of its weights; the refusal names the models instead."""
    xl = model_folder(tmp_path / "xl", "StableDiffusionXLPipeline", "quick_gelu")
    sd1 = model_folder(tmp_path / "sd1", "StableDiffusionPipeline", "quick_gelu")
    settings = run_settings(cfg_for(tmp_path / "out", **{"model.pretrained_model": str(xl)}), "sha256:xl")
    ckpt = make_ckpt(tmp_path / "xl-run", 2, settings=settings)
    state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
    (ckpt / CHECKPOINT_STATE).write_text(json.dumps({**state, "base_model": str(xl)}))
    cfg = cfg_for(tmp_path / "out", **{"model.pretrained_model": str(sd1), "output.resume_from_checkpoint": str(ckpt)})
    with pytest.raises(UserError) as refused:
        plan_run(cfg, lambda cfg: "sha256:sd1")
    said = str(refused.value)
    assert f"{ckpt} was trained on {xl} (an SDXL model), and this run's base model is {sd1} (an SD 1.x model)" in said
    assert f"Resume with --pretrained_model_name_or_path {xl}" in said and "sha256" not in said


def test_resume_checks_the_run_and_its_settings(tmp_path):
    out = tmp_path / "out"
    settings = run_settings(cfg_for(out), "sha256:test")
    write_run(out, "r1", settings)
    make_ckpt(out, 4, settings=settings)
    plan = plan_run(cfg_for(out, **{"output.resume_from_checkpoint": "latest"}), identity)
    assert plan.resume_from.step == 4 and plan.run_id == "r1"
    # another resolution: the saved weights mean something else
    with pytest.raises(UserError, match="other settings .*resolution: 512 there, 256 now"):
        plan_run(cfg_for(out, **{"output.resume_from_checkpoint": "latest", "training.resolution": 256}), identity)
    # a checkpoint of another run into this folder
    other = tmp_path / "other"
    foreign = make_ckpt(other, 2, run_id="r2", settings=settings)
    with pytest.raises(UserError, match="belongs to run r2, but output_dir .* holds run r1"):
        plan_run(cfg_for(out, **{"output.resume_from_checkpoint": str(foreign)}), identity)
    # continuing it in a new folder is fine
    plan = plan_run(cfg_for(tmp_path / "fresh", **{"output.resume_from_checkpoint": str(foreign)}), identity)
    assert plan.run_id == "r2"
    # past max_train_steps
    with pytest.raises(UserError, match="at step 4, past max_train_steps 3"):
        plan_run(cfg_for(out, **{"output.resume_from_checkpoint": "latest", "training.max_train_steps": 3}), identity)
    # a bare name means that checkpoint in output_dir (diffusers' meaning)
    plan = plan_run(cfg_for(out, **{"output.resume_from_checkpoint": "checkpoint-4"}), identity)
    assert plan.resume_from.path == out / "checkpoint-4"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        plan_run(cfg_for(out, **{"output.resume_from_checkpoint": "checkpoint-9"}), identity)


def test_resume_latest_with_nothing_to_resume(tmp_path):
    assert plan_run(cfg_for(tmp_path / "new", **{"output.resume_from_checkpoint": "latest"}), identity).notes
    out = tmp_path / "finished"
    write_run(out)
    (out / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="no checkpoint to resume"):
        plan_run(cfg_for(out, **{"output.resume_from_checkpoint": "latest"}), identity)


def test_resume_and_overwrite_together_are_a_config_error(tmp_path):
    with pytest.raises(UserError, match="output.overwrite_output_dir: .* pass one of them"):
        cfg_for(tmp_path, **{"output.resume_from_checkpoint": "latest", "output.overwrite_output_dir": True})


def test_inspect_reads_a_finished_lora_run(tmp_path):
    write_run(tmp_path, "r9")
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    state = inspect_folder(tmp_path)
    assert state.is_run and state.has_model and state.run_id == "r9" and state.foreign == []


def test_the_lock_refuses_a_second_live_run_and_takes_over_a_stale_one(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(UserError, match="another run is writing"):
        RunLock(tmp_path).acquire()
    first.release()
    # a lock left by a process that is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / ".dreambooth.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    second = RunLock(tmp_path)
    second.acquire()
    assert json.loads((tmp_path / ".dreambooth.lock").read_text())["pid"] == os.getpid()
    second.release()
    assert not (tmp_path / ".dreambooth.lock").exists()
