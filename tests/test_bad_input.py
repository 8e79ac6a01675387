"""Bad input: a clear message naming the file or key, a non-zero exit, no traceback, and no model loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from dreambooth.cli import main


def train_args(model, instance_dir, out, *extra):
    return ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", "a photo of sks dog", "--resolution", "64", "--max_train_steps", "1",
            "--output_dir", str(out), "--report_to", "none", *extra]


def run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_missing_instance_folder(tiny_model, tmp_path, capsys, no_model_load):
    err = run_error(capsys, train_args(tiny_model, tmp_path / "nope", tmp_path / "out"))
    assert str(tmp_path / "nope") in err


def test_empty_instance_folder(tiny_model, tmp_path, capsys, no_model_load):
    (tmp_path / "empty").mkdir()
    err = run_error(capsys, train_args(tiny_model, tmp_path / "empty", tmp_path / "out"))
    assert "empty" in err and "photos" in err


def test_only_non_images(tiny_model, tmp_path, capsys, no_model_load):
    folder = tmp_path / "inst"
    folder.mkdir()
    (folder / "notes.md").write_text("hello")  # not .txt: that is a photo's caption (training.captions)
    (folder / "fake.png").write_text("not really a png")
    err = run_error(capsys, train_args(tiny_model, folder, tmp_path / "out"))
    assert "fake.png" in err and "notes.md" in err


def test_bad_files_are_skipped_and_named_or_refused_when_strict(tiny_model, instance_dir, tmp_path, capsys,
                                                                 no_model_load):
    (instance_dir / "empty.jpg").write_bytes(b"")
    good = (instance_dir / "photo-0.png").read_bytes()
    (instance_dir / "truncated.png").write_bytes(good[: len(good) // 2])
    (instance_dir / "text.png").write_text("I am text")
    Image.new("RGB", (32, 32), "red").save(instance_dir / "small.png")
    Image.new("CMYK", (80, 80), (0, 200, 200, 0)).save(instance_dir / "cmyk.jpg")
    err = run_error(capsys, train_args(tiny_model, instance_dir, tmp_path / "out", "--strict"))
    for name in ("empty.jpg", "truncated.png", "text.png"):
        assert name in err
    # without --strict the same folder passes pre-flight (the report names each file) and goes on to load
    with pytest.raises(AssertionError, match="weights were loaded"):
        main(train_args(tiny_model, instance_dir, tmp_path / "out"))
    report = capsys.readouterr().out
    assert "6 usable, 3 rejected" in report
    for name in ("empty.jpg", "truncated.png", "text.png", "small.png", "cmyk.jpg"):
        assert name in report


def test_prompt_over_77_tokens_names_the_prompt(tiny_model, instance_dir, tmp_path, capsys, no_model_load):
    long_prompt = "a photo of sks dog " + "with a red ball " * 20
    argv = train_args(tiny_model, instance_dir, tmp_path / "out")
    argv[argv.index("--instance_prompt") + 1] = long_prompt
    err = run_error(capsys, argv)
    assert "dataset.instance_prompt" in err and "77" in err


def test_prompt_without_identifier_warns(tiny_model, instance_dir, tmp_path, capsys, no_model_load):
    argv = train_args(tiny_model, instance_dir, tmp_path / "out", "--identifier", "sks")
    argv[argv.index("--instance_prompt") + 1] = "a photo of a dog"
    with pytest.raises(AssertionError, match="weights were loaded"):
        main(argv)
    assert "does not contain the identifier 'sks'" in capsys.readouterr().out


def test_model_path_not_a_diffusers_folder(tmp_path, instance_dir, capsys, no_model_load):
    (tmp_path / "somefolder").mkdir()
    err = run_error(capsys, train_args(tmp_path / "somefolder", instance_dir, tmp_path / "out"))
    assert "model_index.json" in err and "diffusers" in err
    (tmp_path / "model.safetensors").write_bytes(b"x")
    err = run_error(capsys, train_args(tmp_path / "model.safetensors", instance_dir, tmp_path / "out"))
    assert "single-file" in err


def test_fp16_on_cpu_is_refused_before_loading(tiny_model, instance_dir, tmp_path, capsys, no_model_load):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    err = run_error(capsys, train_args(tiny_model, instance_dir, tmp_path / "out", "--mixed_precision", "fp16"))
    assert "training.mixed_precision" in err


def test_resume_from_a_missing_checkpoint(tiny_model, instance_dir, tmp_path, capsys, no_model_load):
    err = run_error(capsys, train_args(tiny_model, instance_dir, tmp_path / "out",
                                       "--resume_from_checkpoint", str(tmp_path / "checkpoint-9")))
    assert "checkpoint-9" in err


def test_config_errors_exit_cleanly_from_the_shell(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("model: {pretrained_model: m}\ntraining: {max_train_steps: 0, learning_rate: -1}\n"
                   "dataset: {instance_prompt: a photo of sks dog}\n")
    proc = subprocess.run([sys.executable, "-m", "dreambooth", "train", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "training.max_train_steps" in proc.stderr and "training.learning_rate" in proc.stderr
