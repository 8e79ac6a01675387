"""Fast unit tests: identifier tokens, checkpoint bookkeeping, class-image manifest, init, generation helpers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from dreambooth.config_file import load_config
from dreambooth.errors import UserError
from dreambooth.generate import make_grid, read_prompts
from dreambooth.models.loading import make_scheduler
from dreambooth.project import init_project
from dreambooth.training.class_images import MANIFEST, ensure_class_images
from dreambooth.training.tokens import add_identifier_token, plan_identifier, train_only_rows


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")


# ----------------------------------------------------------------------------------------------- identifier


def test_identifier_kinds(tokenizer):
    assert plan_identifier(tokenizer, "sks", None).kind == "existing"
    split = plan_identifier(tokenizer, "zqxwv", None)
    assert split.kind == "split" and len(split.pieces) > 1 and "splits into" in split.describe()
    new = plan_identifier(tokenizer, "<saya_token>", "girl")
    assert new.kind == "new" and "initialised from 'girl'" in new.describe()
    assert plan_identifier(tokenizer, None, None).kind == "none"
    with pytest.raises(UserError, match="token.initializer"):
        plan_identifier(tokenizer, "<saya_token>", None)


def test_new_token_starts_at_the_initializer(tiny_model):
    import copy

    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    te = CLIPTextModel.from_pretrained(tiny_model / "text_encoder")
    old = copy.deepcopy(te.get_input_embeddings().weight.detach())
    ids = add_identifier_token(tok, te, plan_identifier(tok, "<saya_token>", "girl"))
    weight = te.get_input_embeddings().weight
    girl = tok("girl", add_special_tokens=False).input_ids
    assert ids == [len(tok) - 1] and weight.shape[0] == old.shape[0] + 1
    assert torch.equal(weight[ids[0]], old[girl].mean(0))
    assert tok.tokenize("a photo of <saya_token> girl") == ["a</w>", "photo</w>", "of</w>", "<saya_token>",
                                                              "girl</w>"]


def test_only_the_new_row_moves_under_adamw():
    emb = torch.nn.Embedding(6, 3)
    before = emb.weight.detach().clone()
    emb.requires_grad_(False)
    train_only_rows(emb, [4])
    opt = torch.optim.AdamW([{"params": [emb.weight], "weight_decay": 0.0}], lr=0.1)
    for _ in range(3):
        emb(torch.tensor([0, 1, 4, 5])).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    changed = (emb.weight.detach() != before).any(dim=1).tolist()
    assert changed == [False, False, False, False, True, False]


# ----------------------------------------------------------------------------------------------- class images


class FakePipe:
    """Stands in for a pipeline: records calls, draws a plain image whose colour encodes the seed."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = 0

    def __call__(self, prompt, generator, height, width, **kw):
        self.calls += 1
        from types import SimpleNamespace

        images = [Image.new("RGB", (width, height), (g.initial_seed() % 256, 0, 0)) for g in generator]
        return SimpleNamespace(images=images)


def test_class_images_are_generated_then_reused_then_regenerated(tmp_path):
    folder = tmp_path / "class"
    pipes = []

    def load():
        pipes.append(FakePipe())
        return pipes[-1]

    kw = dict(model="m", resolution=16, num_images=5, seed=3, load_pipe=load, batch_size=2, steps=2)
    images = ensure_class_images(folder, prompt="a photo of a dog", **kw)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert len(images) == 5 and pipes[0].calls == 3  # batches of 2, 2, 1
    assert [e["seed"] for e in manifest["images"]] == [3, 4, 5, 6, 7]
    assert manifest["prompt"] == "a photo of a dog" and manifest["model"] == "m" and manifest["resolution"] == 16

    # same recipe: nothing generated
    assert len(ensure_class_images(folder, prompt="a photo of a dog", **kw)) == 5 and len(pipes) == 1

    # a user's own image counts, so one fewer is generated after raising the count
    Image.new("RGB", (16, 16), "blue").save(folder / "mine.png")
    assert len(ensure_class_images(folder, prompt="a photo of a dog", **{**kw, "num_images": 7})) == 7
    assert pipes[-1].calls == 1 and len(pipes) == 2

    # a changed prompt moves old generated images aside (never deleted) and regenerates; the user's image stays
    images = ensure_class_images(folder, prompt="a photo of a cat", **kw)
    assert len(images) == 5 and (folder / "mine.png").exists()
    aside = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("replaced-")]
    assert len(aside) == 1 and len(list(aside[0].glob("class-*.png"))) == 6
    assert json.loads((folder / MANIFEST).read_text())["prompt"] == "a photo of a cat"


def test_class_images_moved_aside_twice_in_one_second_keep_both_sets(tmp_path, monkeypatch):
    from dreambooth.training import class_images

    monkeypatch.setattr(class_images.time, "strftime", lambda fmt: "20261130-120000")  # every change in one second
    folder = tmp_path / "class"
    kw = dict(model="m", resolution=16, num_images=2, seed=3, load_pipe=FakePipe, batch_size=2, steps=2)
    for prompt in ("a photo of a dog", "a photo of a cat", "a photo of a fox"):
        ensure_class_images(folder, prompt=prompt, **kw)
    aside = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert aside == ["replaced-20261130-120000", "replaced-20261130-120000-2"]
    assert all(len(list((folder / name).glob("class-*.png"))) == 2 for name in aside)


def test_a_generated_image_never_replaces_a_file_of_the_name_it_falls_back_to(tmp_path):
    from dreambooth.training.class_images import unused_path

    (tmp_path / "class-000003-120000.png").write_bytes(b"mine")
    assert unused_path(tmp_path, "class-000003-120000", ".png") == tmp_path / "class-000003-120000-2.png"
    assert unused_path(tmp_path, "replaced-x") == tmp_path / "replaced-x"


# ----------------------------------------------------------------------------------------------- init, generate


def test_init_scaffolds_a_project_that_loads(tmp_path):
    init_project(tmp_path / "proj", identifier="<saya_token>", class_word="girl", model="../model")
    proj = tmp_path / "proj"
    for sub in ("data/instance", "data/class", "prompts/instance.txt", "prompts/class.txt", "config.yaml",
                "README.md"):
        assert (proj / sub).exists(), sub
    cfg = load_config(proj / "config.yaml")
    assert cfg.dataset.instance_prompt == "a photo of <saya_token> girl"
    assert cfg.dataset.class_prompt == "a photo of a girl"
    assert cfg.dataset.with_prior_preservation and cfg.dataset.instance_dir == proj / "data" / "instance"
    assert cfg.token.initializer == "girl"
    with pytest.raises(UserError, match="already exists"):
        init_project(proj, identifier="sks", class_word="dog", model="m")


def test_scheduler_names():
    assert type(make_scheduler("dpm++", {})).__name__ == "DPMSolverMultistepScheduler"
    assert type(make_scheduler("euler_a", {})).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(make_scheduler("DDIMScheduler", {})).__name__ == "DDIMScheduler"
    with pytest.raises(UserError, match="unknown scheduler"):
        make_scheduler("fastest", {})


def test_grid_layout():
    grid = make_grid([Image.new("RGB", (8, 4), c) for c in ("red", "green", "blue")], cols=2)
    assert grid.size == (16, 8)
    assert grid.getpixel((12, 1)) == (0, 128, 0) and grid.getpixel((1, 5)) == (0, 0, 255)


def test_prompts_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\na photo of sks dog\n\na painting of sks dog\n")
    assert read_prompts(["x"], f) == ["x", "a photo of sks dog", "a painting of sks dog"]
    with pytest.raises(UserError, match="no prompt"):
        read_prompts([], None)


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from safetensors.torch import save_file

    from dreambooth.formats.atomic import default_file_mode, move_into, write_text_atomic

    write_text_atomic(tmp_path / "a.json", "{}")
    src = tmp_path / "src"
    src.mkdir()
    save_file({"x": torch.zeros(1)}, str(src / "w.safetensors"))  # safetensors creates 0600 files
    move_into(src, tmp_path / "dst")
    for path in (tmp_path / "a.json", tmp_path / "dst" / "w.safetensors"):
        assert stat.S_IMODE(os.stat(path).st_mode) == default_file_mode()


def test_the_manifest_is_not_reported_as_a_rejected_image(tmp_path):
    from dreambooth.training.images import scan_image_folder

    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "a.png")
    (folder / MANIFEST).write_text("{}")
    report = scan_image_folder(folder, 16)
    assert [p.name for p in report.usable] == ["a.png"] and report.rejected() == []


def test_init_reads_model_relative_to_where_it_runs_like_every_path_argument(tmp_path, monkeypatch, capsys):
    """`init --model ./tiny` was written as it was typed and read relative to the project folder, and init then asked
    to set the model it had been given."""
    from dreambooth.cli import main

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "model_index.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "models")
    assert main(["init", "../proj", "--model", "./tiny"]) == 0
    out = capsys.readouterr().out
    assert "set model.pretrained_model" not in out
    cfg = load_config(tmp_path / "proj" / "config.yaml", {"dataset.instance_prompt": "x"})
    assert cfg.model.pretrained_model == str(tmp_path / "models" / "tiny")
    assert "The base model is" in (tmp_path / "proj" / "README.md").read_text()
    # a model inside the project is written relative to it, so the two move together
    (tmp_path / "proj2" / "base").mkdir(parents=True)
    (tmp_path / "proj2" / "base" / "model_index.json").write_text("{}")
    assert main(["init", str(tmp_path / "proj2"), "--model", str(tmp_path / "proj2" / "base")]) == 0
    assert yaml.safe_load((tmp_path / "proj2" / "config.yaml").read_text())["model"]["pretrained_model"] == "base"
    # a hub id stays one; a missing folder is refused before anything is written; no --model leaves it to set
    assert main(["init", "../hub", "--model", "org/name"]) == 0
    assert yaml.safe_load((tmp_path / "hub" / "config.yaml").read_text())["model"]["pretrained_model"] == "org/name"
    capsys.readouterr()
    assert main(["init", "../missing", "--model", "./nowhere"]) == 2
    assert f"{tmp_path / 'models' / 'nowhere'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
    assert main(["init", "../later"]) == 0
    assert "set model.pretrained_model in" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "later" / "config.yaml").read_text())["model"]["pretrained_model"] is None

