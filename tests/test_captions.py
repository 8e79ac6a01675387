"""Per-photo captions (issue 26): NAME.txt beside NAME.png or a metadata.jsonl column, placeholders filled, the
identifier required, every problem named at pre-flight; captions reach the step, caption dropout trains a share of
examples on "", and a run with both resumes bitwise."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import photo_folder
from test_advice import cli_run, passes_preflight, train_argv

from dreambooth.cli import main
from dreambooth.training.captions import drop_caption, read_captions
from dreambooth.training.images import scan_image_folder


@pytest.fixture
def photos(tmp_path):
    return photo_folder(tmp_path / "photos", 3)


def names(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".png")


# --------------------------------------------------------------------------------------------------- reading them
def test_caption_files_are_read_with_placeholders_filled(photos):
    first, second, _ = names(photos)
    first.with_suffix(".txt").write_text("a photo of {identifier} {class} on grass\n")
    second.with_suffix(".txt").write_text("\ufeffsks dog asleep")  # a BOM, as Windows' Notepad writes
    captions = read_captions(photos, names(photos), extension=".txt", caption_column=None, identifier="sks",
                             class_word="dog")
    assert captions.problems == []
    assert captions.by_photo == {first: "a photo of sks dog on grass", second: "sks dog asleep"}
    assert captions.prompt_for(names(photos)[2], "a photo of sks dog") == "a photo of sks dog"
    assert captions.describe(3, (9, "a photo of sks dog on grass")) == (
        "captions: 2 of 3 photos, from caption files (*.txt); the others are trained on the instance prompt; the "
        "longest is 9 tokens (a photo of sks dog on grass)")


def test_every_bad_caption_is_named_with_its_file(photos):
    first, second, third = names(photos)
    first.with_suffix(".txt").write_bytes(b"\xff\xfea photo")
    second.with_suffix(".txt").write_text("a photo of a dog")
    third.with_suffix(".txt").write_text("  \n")
    problems = read_captions(photos, names(photos), extension=".txt", caption_column=None, identifier="sks",
                             class_word="dog").problems
    assert len(problems) == 3
    assert problems[0].startswith(f"{first.with_suffix('.txt')}: not UTF-8 text")
    assert problems[1].startswith(f"{second.with_suffix('.txt')}: the caption \"a photo of a dog\" does not contain "
                                  "the identifier 'sks'")
    assert problems[2].startswith(f"{third.with_suffix('.txt')}: the caption is empty")


def test_a_metadata_column_gives_the_captions_and_its_bad_lines_are_named(photos):
    first, second, third = names(photos)
    lines = [json.dumps({"file_name": first.name, "text": "sks dog running"}), "",
             json.dumps({"file_name": second.name, "prompt": "x"}), "{not json",
             json.dumps({"file_name": "gone.png", "text": "sks dog"})]
    (photos / "metadata.jsonl").write_text("\n".join(lines))
    captions = read_captions(photos, names(photos), extension=".txt", caption_column="text", identifier="sks",
                             class_word="dog")
    assert captions.by_photo == {first: "sks dog running"} and captions.source == "metadata.jsonl, column 'text'"
    where = photos / "metadata.jsonl"
    assert [p.split(": ", 1)[0] for p in captions.problems] == [f"{where}, line {n}" for n in (3, 4, 5)]
    assert "has no text column 'text' (it has file_name, prompt)" in captions.problems[0]
    missing = read_captions(photos / "none", [], extension=".txt", caption_column="text", identifier=None,
                            class_word=None)
    assert "dataset.caption_column: 'text' names a column of" in missing.problems[0]


def test_a_caption_file_without_its_photo_is_named_not_read(photos):
    (photos / "notes.txt").write_text("my notes")
    captions = read_captions(photos, names(photos), extension=".txt", caption_column=None, identifier="sks",
                             class_word="dog")
    assert captions.by_photo == {} and captions.problems == [] and captions.unread == [photos / "notes.txt"]
    assert captions.describe(3, None).endswith("; not read, no usable photo of their name: notes.txt")


def test_caption_files_are_not_rejected_as_images(photos):
    names(photos)[0].with_suffix(".txt").write_text("sks dog")
    (photos / "metadata.jsonl").write_text("")
    assert len(scan_image_folder(photos, 64).rejected()) == 2  # without the caption rule: rejected
    report = scan_image_folder(photos, 64, companion=lambda p: p.suffix == ".txt" or p.name == "metadata.jsonl")
    assert report.rejected() == [] and len(report.usable) == 3


def test_caption_dropout_is_a_fixed_draw_per_example_and_epoch():
    draws = [drop_caption(0, epoch, index, 0.25) for epoch in range(20) for index in range(20)]
    assert draws == [drop_caption(0, epoch, index, 0.25) for epoch in range(20) for index in range(20)]
    assert 0.15 < sum(draws) / len(draws) < 0.35
    assert not any(drop_caption(0, e, i, 0.0) for e in range(5) for i in range(5))


# --------------------------------------------------------------------------------------------------- in training
def test_captions_and_caption_dropout_reach_the_step(probe, instance_dir, tmp_path):
    """Each photo's caption is the prompt its example is trained on (encoded as such); with caption_dropout some
    instance examples train on "" and the rest keep their captions; without captions the instance prompt."""
    photos = tmp_path / "captioned"
    shutil.copytree(instance_dir, photos)
    files = names(photos)
    for i, photo in enumerate(files):
        photo.with_suffix(".txt").write_text(f"a photo of sks dog, number {i}")
    wanted = {f"a photo of sks dog, number {i}" for i in range(len(files))}
    captioned = probe(dataset__instance_dir=str(photos), training__max_train_steps=6)
    seen = {p for call in captioned.calls for p in call["prompts"]}
    assert seen and seen <= wanted
    plain = probe(training__max_train_steps=2)
    assert {p for call in plain.calls for p in call["prompts"]} == {"a photo of sks dog"}
    dropped = probe(dataset__instance_dir=str(photos), dataset__caption_dropout=0.5, training__max_train_steps=12)
    prompts = [p for call in dropped.calls for p in call["prompts"]]
    assert "" in prompts and set(prompts) - {""} <= wanted and set(prompts) - {""}
    empty = [call["embeddings"][i] for call in dropped.calls for i, p in enumerate(call["prompts"]) if p == ""]
    assert all(torch.equal(e, empty[0]) for e in empty)  # "" is encoded as the empty prompt, not skipped


def test_a_captioned_run_with_dropout_resumes_bitwise(tiny_model, photos, tmp_path):
    for i, photo in enumerate(names(photos)):
        photo.with_suffix(".txt").write_text(f"sks dog, view {i}")
    whole, part = tmp_path / "whole", tmp_path / "part"
    extra = ["--caption_dropout", "0.3", "--checkpointing_steps", "2", "--random_flip"]
    assert main(train_argv(tiny_model, photos, whole, *extra, steps=4)) == 0
    assert main(train_argv(tiny_model, photos, part, *extra, steps=2)) == 0
    assert main(train_argv(tiny_model, photos, part, *extra, "--resume_from_checkpoint", "latest", steps=4)) == 0
    from safetensors.torch import load_file

    a, b = (load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")) for out in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------- pre-flight
def test_the_report_counts_captions_and_problems_stop_the_run(tiny_model, photos, tmp_path, capsys, monkeypatch):
    first, second, _ = names(photos)
    first.with_suffix(".txt").write_text("a photo of sks dog " + "on a red square " * 20)
    second.with_suffix(".txt").write_text("a photo of a dog")
    err = cli_run(capsys, *train_argv(tiny_model, photos, tmp_path / "a", "--identifier", "sks"), code=2)
    assert "does not contain the identifier 'sks'" in err and str(second.with_suffix(".txt")) in err
    assert f"the caption of {first} is " in err and "tokens long, over the text encoder's limit of 77" in err
    assert not (tmp_path / "a").exists()
    first.with_suffix(".txt").write_text("a photo of sks dog on grass")
    second.with_suffix(".txt").write_text("{identifier} dog asleep")
    out = passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, photos, tmp_path / "a", "--identifier",
                                                            "sks"))
    assert "captions: 2 of 3 photos, from caption files (*.txt)" in out and "; the longest is " in out


def test_caption_extension_picks_the_files(tiny_model, photos, tmp_path, capsys, monkeypatch):
    names(photos)[0].with_suffix(".caption").write_text("a photo of sks dog, kohya style")
    out = passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, photos, tmp_path / "a",
                                                            "--caption_extension", ".caption"))
    assert "captions: 1 of 3 photos, from caption files (*.caption)" in out
    out = passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, photos, tmp_path / "a"))
    assert "captions: none" in out and "rejected" in out  # the .caption file is not a photo either


def test_dataset_name_reads_a_local_imagefolder(tiny_model, photos, tmp_path, capsys, monkeypatch):
    """diffusers' --dataset_name / --caption_column / --image_column on a local imagefolder; a hub id, or a folder
    given twice, refused at pre-flight."""
    rows = [{"file_name": p.name, "text": f"sks dog number {i}"} for i, p in enumerate(names(photos))]
    (photos / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    argv = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--dataset_name", str(photos),
            "--caption_column", "text", "--image_column", "image", "--instance_prompt", "a photo of sks dog",
            "--resolution", "64", "--output_dir", str(tmp_path / "a")]
    out = passes_preflight(capsys, monkeypatch, *argv)
    assert f"instance images ({photos})" in out and "captions: 3 of 3 photos, from metadata.jsonl, column 'text'" in out
    err = cli_run(capsys, *[a if a != str(photos) else "someone/dog-example" for a in argv], code=2)
    assert "dataset.dataset_name: 'someone/dog-example' is not a folder here" in err
    err = cli_run(capsys, *argv, "--instance_data_dir", str(tmp_path), code=2)
    assert "both name the subject's photos; pass one of them" in err
    err = cli_run(capsys, *[a if a != "image" else "img" for a in argv], code=2)
    assert "--image_column img is not supported" in err
