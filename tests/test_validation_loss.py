"""The validation loss (issue 26): fixed draws on the photos scored at step 0, every validation interval and the last
step, logged beside the training loss and drawn in the report, without changing what trains."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from test_advice import train_argv

from dreambooth.cli import main
from dreambooth.models.tiny_families import build_model
from dreambooth.training.report import gather


def scorings(out):
    return [json.loads(line) for line in (out / "logs" / "validation_loss.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def test_the_score_is_logged_and_training_is_unchanged(tiny_model, instance_dir, tmp_path):
    """With --validation_loss the run trains the same weights bitwise (the score draws from a generator of its own,
    in eval mode, under no_grad) and logs scorings at 0, every --validation_steps and the last step; the same run
    twice scores the same numbers (fixed draws)."""
    plain, scored, again = tmp_path / "plain", tmp_path / "scored", tmp_path / "again"
    flags = ["--validation_loss", "--validation_steps", "2"]
    assert main(train_argv(tiny_model, instance_dir, plain, steps=5)) == 0
    assert main(train_argv(tiny_model, instance_dir, scored, *flags, steps=5)) == 0
    assert main(train_argv(tiny_model, instance_dir, again, *flags, steps=5)) == 0
    a, b = weights(plain), weights(scored)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (plain / "logs" / "validation_loss.jsonl").exists()
    records = scorings(scored)
    assert [r["step"] for r in records] == [0, 2, 4, 5]
    assert records == scorings(again)
    assert records[-1]["val_loss"] < records[0]["val_loss"]  # learning the photos at lr 1e-3
    assert set(records[0]) == {"step", "val_loss", "val_instance_loss"}  # no class images, no prior part
    assert gather(scored).val_log == records


def test_draws_and_class_images_change_the_score(tiny_model, instance_dir, class_dir, tmp_path):
    """--validation_loss_draws sets how many draws each image is scored on (another count, another base score);
    with prior preservation the class images are scored too and the total weighs them as training does."""
    one, four = tmp_path / "one", tmp_path / "four"
    assert main(train_argv(tiny_model, instance_dir, one, "--validation_loss", "--validation_loss_draws", "1",
                           steps=1)) == 0
    assert main(train_argv(tiny_model, instance_dir, four, "--validation_loss", steps=1)) == 0
    assert scorings(one)[0]["val_loss"] != scorings(four)[0]["val_loss"]
    prior = tmp_path / "prior"
    assert main(train_argv(tiny_model, instance_dir, prior, "--validation_loss", "--with_prior_preservation",
                           "--class_data_dir", str(class_dir), "--class_prompt", "a photo of dog",
                           "--num_class_images", "4", "--class_inference_steps", "2", "--prior_loss_weight", "0.5",
                           steps=1)) == 0
    first = scorings(prior)[0]
    assert first["val_loss"] == first["val_instance_loss"] + 0.5 * first["val_prior_loss"]


def test_a_resumed_run_scores_on_from_where_it_stopped(tiny_model, instance_dir, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    flags = ["--validation_loss", "--validation_steps", "2", "--checkpointing_steps", "2"]
    assert main(train_argv(tiny_model, instance_dir, whole, *flags, steps=4)) == 0
    assert main(train_argv(tiny_model, instance_dir, part, *flags, steps=2)) == 0
    assert main(train_argv(tiny_model, instance_dir, part, *flags, "--resume_from_checkpoint", "latest", steps=4)) == 0
    assert scorings(part) == scorings(whole)  # the resumed session does not score the base again
    a, b = weights(whole), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_flux_lora_is_scored(tmp_path, instance_dir):
    model = build_model(tmp_path / "flux", size="flux-tiny", seed=3)
    out = tmp_path / "run"
    assert main(train_argv(model, instance_dir, out, "--method", "lora", "--validation_loss", "--validation_steps",
                           "1", "--max_sequence_length", "16", steps=2)) == 0
    assert [r["step"] for r in scorings(out)] == [0, 1, 2]
