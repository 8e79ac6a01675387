"""`dreambooth evaluate`: the class-prompt rule, the averaging, and DINO/CLIP scoring on tiny random CLIP and ViT."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import draw_subject
from PIL import Image

from dreambooth.cli import main
from dreambooth.evaluation import evaluate
from dreambooth.evaluation.evaluate import class_prompt_for, format_table, mean_cosine, score_images, summarize
from dreambooth.generate import save_images


@pytest.fixture(autouse=True)
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache of the test's own: a CLIP or DINO this machine has cached is never found by these tests."""
    folder = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    return folder


def cache_model(cache, repo_id, files_from=None, revision="0123456789abcdef0123456789abcdef01234567", main=True):
    """A model in the hub cache's layout (models--ORG--NAME/snapshots/HASH/, refs/main naming HASH), with the files of
    `files_from` (or only a config.json: a download that stopped)."""
    import shutil

    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    if files_from is not None:
        shutil.copytree(files_from, snapshot)
    else:
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {},
                                                          "vision_config": {}}))
    if main:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(revision)
    return snapshot


def write_generated(folder, prompts):
    """PNGs as `dreambooth generate` writes them (metadata included), one per prompt."""
    results = [(draw_subject(i % 4, size=40), {"prompt": p, "negative_prompt": "", "seed": i, "steps": 30,
                                               "guidance": 7.5, "scheduler": "dpm++", "width": 40, "height": 40})
               for i, p in enumerate(prompts)]
    return save_images(results, folder, "some/model")


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a scorer model or the pipeline loads before the inputs are checked."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(evaluate, "_load", refuse)
    monkeypatch.setattr(evaluate, "_generate", refuse)


def run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("prompt, identifier, class_word, expected", [
    ("a photo of sks dog on a beach", "sks", "dog", "a photo of dog on a beach"),
    ("a sks dog in the jungle", "sks", "dog", "a dog in the jungle"),
    ("an sks dog", "sks", "dog", "a dog"),
    ("A sks owl, watercolor", "sks", "owl", "An owl, watercolor"),
    ("<saya_token> girl with a hat", "<saya_token>", "girl", "girl with a hat"),
    ("portrait of <saya_token> on a beach", "<saya_token>", "girl", "portrait of girl on a beach"),
    ("two sks dogs and a sks dog", "sks", "dog", "two dogs and a dog"),
    ("a photo of sksx dog and asks", "sks", "dog", "a photo of sksx dog and asks"),  # whole words only
    ("a photo of a dog", "sks", "dog", "a photo of a dog"),
])
def test_class_prompt_rule(prompt, identifier, class_word, expected):
    assert class_prompt_for(prompt, identifier, class_word) == expected


def test_mean_cosine_by_hand():
    generated = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    real = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # row 0: cos 1 and 1/sqrt(2); row 1: cos 0 and 1/sqrt(2)
    expected = [(1 + 1 / math.sqrt(2)) / 2, (0 + 1 / math.sqrt(2)) / 2]
    assert mean_cosine(generated, real).tolist() == pytest.approx(expected)


def test_summarize_groups_by_prompt_and_weights_overall_by_images():
    metrics = summarize({"dino": [1.0, 2.0, 3.0, 6.0]}, ["b", "b", "b", "a"])
    assert list(metrics["per_prompt"]) == ["b", "a"]
    assert metrics["per_prompt"]["b"] == {"images": 3, "dino": 2.0}
    assert metrics["per_prompt"]["a"] == {"images": 1, "dino": 6.0}
    assert metrics["overall"] == {"images": 4, "prompts": 2, "dino": 3.0}  # (3 * 2 + 1 * 6) / 4, not (2 + 6) / 2


def test_table_is_aligned():
    table = format_table(summarize({"dino": [0.5, 0.25], "clip_t": [0.1, 0.2]}, ["a photo of sks dog", "x"]))
    lines = table.splitlines()
    assert lines[0].split() == ["prompt", "images", "DINO", "CLIP-T"]
    assert lines[2].split()[-2:] == ["0.500", "0.100"] and lines[-1].startswith("overall (2 prompts)")
    assert len({len(line) for line in lines}) == 1


# ---------------------------------------------------------------------------------------------- scoring


def test_identical_images_score_one(clip_dir, dino_dir):
    image = draw_subject(1, size=48)
    metrics = score_images([image, image.copy()], ["a photo of sks dog"] * 2, [image], identifier="sks",
                           class_word="dog", clip_dir=clip_dir, dino_dir=dino_dir, device="cpu")
    overall = metrics["overall"]
    assert overall["dino"] == pytest.approx(1.0, abs=1e-5)
    assert overall["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= overall["clip_t"] <= 1.0
    assert metrics["per_prompt"]["a photo of sks dog"]["class_prompt"] == "a photo of dog"


def test_different_images_score_below_one_and_dinov2_loads(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, intermediate_size=37)).save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    same = draw_subject(0, size=48)
    other = Image.new("RGB", (48, 48), (10, 200, 10))
    metrics = score_images([same, other], ["p", "q"], [same], identifier="sks", class_word="dog",
                           dino_dir=tmp_path, device="cpu")
    assert metrics["per_prompt"]["p"]["dino"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["per_prompt"]["q"]["dino"] < 0.999


def test_overall_is_image_weighted_mean_and_extra_scorers_add_columns(clip_dir, dino_dir):
    images = [draw_subject(i, size=48) for i in range(4)]
    prompts = ["a sks dog on a beach"] * 3 + ["a sks dog in snow"]

    def brightness(images, prompts):
        return {"brightness": [sum(image.convert("L").getdata()) / (48 * 48 * 255) for image in images]}

    metrics = score_images(images, prompts, [draw_subject(3, size=48)], identifier="sks", class_word="dog",
                           clip_dir=clip_dir, dino_dir=dino_dir, device="cpu", extra_scorers=[brightness])
    rows, overall = metrics["per_prompt"], metrics["overall"]
    assert [r["images"] for r in rows.values()] == [3, 1] and overall["images"] == 4
    for name in ("dino", "clip_i", "clip_t", "brightness"):
        weighted = sum(r["images"] * r[name] for r in rows.values()) / 4
        assert overall[name] == pytest.approx(weighted, abs=1e-6)
    assert rows["a sks dog in snow"]["dino"] == pytest.approx(1.0, abs=1e-5)  # the same drawing as the real one
    assert rows["a sks dog in snow"]["class_prompt"] == "a dog in snow"


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_scores_a_generate_folder(tmp_path, real_dir, clip_dir, dino_dir, capsys):
    prompts = ["a photo of sks dog", "a photo of sks dog", "a sks dog on a beach"]
    write_generated(tmp_path / "gen", prompts)
    out = tmp_path / "eval"
    code = main(["evaluate", "--real", str(real_dir), "--identifier", "sks", "--class-word", "dog",
                 "--images", str(tmp_path / "gen"), "--clip", str(clip_dir), "--dino", str(dino_dir),
                 "--out", str(out), "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inputs"]["real_images"] == 3 and metrics["inputs"]["generated_images"] == 3
    assert metrics["inputs"]["clip"] == str(clip_dir) and metrics["inputs"]["dino"] == str(dino_dir)
    assert {k: r["images"] for k, r in metrics["per_prompt"].items()} == {"a photo of sks dog": 2,
                                                                          "a sks dog on a beach": 1}
    assert set(metrics["overall"]) == {"images", "prompts", "dino", "clip_i", "clip_t"}
    assert "transformers" in metrics["versions"]
    for text in ("DINO", "CLIP-I", "CLIP-T", "a sks dog on a beach", "overall (2 prompts)"):
        assert text in stdout


def test_cli_generates_with_a_model_then_scores(tiny_model, tmp_path, real_dir, dino_dir, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--real", str(real_dir), "--identifier", "sks", "--class-word", "dog",
                 "--model", str(tiny_model), "--prompt", "a photo of sks dog", "--prompt", "sks dog on a beach",
                 "--num-images", "1", "--steps", "2", "--dino", str(dino_dir), "--out", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000-seed0.png", "0001-seed0.png", "grid.png",
                                                                   "settings.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inputs"]["model"] == str(tiny_model)
    assert metrics["overall"]["images"] == 2 and set(metrics["per_prompt"]) == {"a photo of sks dog",
                                                                                "sks dog on a beach"}


def test_cli_with_nothing_to_measure_says_which_folders_and_how_to_get_them(tmp_path, real_dir, hub_cache,
                                                                            capsys, no_load):
    write_generated(tmp_path / "gen", ["a photo of sks dog"])
    cache_model(hub_cache, "openai/clip-vit-large-patch14")  # a download that stopped after config.json
    err = run_error(capsys, ["evaluate", "--real", str(real_dir), "--identifier", "sks", "--class-word", "dog",
                             "--images", str(tmp_path / "gen")])
    assert f"the Hugging Face hub cache here ({hub_cache}, HF_HUB_CACHE) holds no complete CLIP or DINO model" in err
    for wanted in ("CLIPModel: both towers' weights, its tokenizer and its image processor", "save_pretrained",
                   "openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14", "a DINO ViT folder with its "
                   "image processor", "facebook/dino-vits16 (the paper's ViT-S/16)", "Dinov2",
                   "`hf download openai/clip-vit-base-patch32`", "`hf download facebook/dino-vits16`",
                   "~/.cache/huggingface/hub/models--ORG--NAME/snapshots/HASH/", "--clip DIR / --dino DIR"):
        assert wanted in err
    assert len(err.splitlines()) == 1


def test_cli_finds_and_uses_a_clip_and_a_dino_in_the_hub_cache(tmp_path, real_dir, clip_dir, dino_dir, hub_cache,
                                                               capsys):
    """Found: the first complete CLIP (refs/main's revision) and a ViT named DINO; a ViT not named DINO, an older
    revision and a download that stopped are passed over. The scores are those the same folders give as flags."""
    write_generated(tmp_path / "gen", ["a photo of sks dog", "a sks dog on a beach"])
    clip = cache_model(hub_cache, "openai/clip-vit-base-patch32", clip_dir)
    cache_model(hub_cache, "openai/clip-vit-base-patch32", dino_dir, revision="0" * 40, main=False)
    cache_model(hub_cache, "openai/clip-vit-large-patch14")
    cache_model(hub_cache, "google/vit-base-patch16-224", dino_dir)  # trained with labels: not a DINO
    dino = cache_model(hub_cache, "facebook/dino-vits16", dino_dir)
    args = ["evaluate", "--real", str(real_dir), "--identifier", "sks", "--class-word", "dog", "--images",
            str(tmp_path / "gen"), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "found")]) == 0
    out = capsys.readouterr().out
    assert f"CLIP: openai/clip-vit-base-patch32 in the hub cache, {clip} (pass --clip DIR to use another)" in out
    assert f"DINO: facebook/dino-vits16 in the hub cache, {dino} (pass --dino DIR to use another)" in out
    found = json.loads((tmp_path / "found" / "metrics.json").read_text())
    assert found["inputs"]["clip"] == str(clip) and found["inputs"]["dino"] == str(dino)
    assert found["inputs"]["clip_source"] == "openai/clip-vit-base-patch32 in the hub cache"
    assert main([*args, "--clip", str(clip_dir), "--dino", str(dino_dir), "--out", str(tmp_path / "given")]) == 0
    given = json.loads((tmp_path / "given" / "metrics.json").read_text())
    assert found["overall"] == given["overall"] and set(given["overall"]) >= {"dino", "clip_i", "clip_t"}
    assert given["inputs"]["clip_source"] == "--clip" and "in the hub cache" not in capsys.readouterr().out


def test_the_download_commands_the_messages_suggest_lead_to_the_folders_evaluate_finds(hub_cache, clip_dir,
                                                                                      dino_dir):
    """`hf download REPO` (here offline, from the cache) names the snapshot folder evaluate scores with."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from dreambooth.evaluation.scorers import find_in_hub_cache, missing_note, nothing_to_measure

    folders = {"openai/clip-vit-base-patch32": cache_model(hub_cache, "openai/clip-vit-base-patch32", clip_dir),
               "facebook/dino-vits16": cache_model(hub_cache, "facebook/dino-vits16", dino_dir)}
    assert {find_in_hub_cache("clip").folder, find_in_hub_cache("dino").folder} == set(folders.values())
    commands = set(re.findall(r"`(hf download [^`]+)`", nothing_to_measure() + missing_note("clip")
                              + missing_note("dino")))
    assert commands == {f"hf download {repo}" for repo in folders}
    hf = Path(sys.executable).parent / "hf"
    for command in commands:
        proc = subprocess.run([str(hf), *command.split()[1:]], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)})
        assert proc.returncode == 0 and str(folders[command.split()[-1]]) in proc.stdout, proc.stderr


def test_the_built_in_world_measures_as_before_with_a_clip_in_the_cache(tmp_path, real_dir, clip_dir, hub_cache,
                                                                        capsys):
    from dreambooth.evaluation.world_model import builtin_model_path

    cache_model(hub_cache, "openai/clip-vit-base-patch32", clip_dir)
    write_generated(tmp_path / "gen", ["a photo of sks dog"])
    (tmp_path / "gen" / "settings.json").write_text(json.dumps({"model": str(builtin_model_path())}))
    assert main(["evaluate", "--real", str(real_dir), "--identifier", "sks", "--class-word", "dog", "--images",
                 str(tmp_path / "gen"), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["inputs"]["clip"] is None and not {"clip_i", "clip_t", "dino"} & set(metrics["overall"])
    assert "world_subject" in metrics["overall"] and "hub cache" not in capsys.readouterr().out


@pytest.mark.parametrize("folder, says", [
    ("text_encoder", "holds a CLIPTextModel, a text encoder without CLIP's vision tower (a Stable Diffusion model's "
                     "text_encoder/ is one)"),
    ("", "is a diffusers pipeline (model_index.json), not a scorer: its text_encoder/ is CLIP's text tower alone"),
])
def test_cli_refuses_a_text_encoder_as_clip(folder, says, tiny_model, tmp_path, real_dir, capsys, no_load):
    write_generated(tmp_path / "gen", ["a photo of sks dog"])
    clip = tiny_model / folder if folder else tiny_model
    err = run_error(capsys, ["evaluate", "--real", str(real_dir), "--identifier", "sks", "--class-word", "dog",
                             "--images", str(tmp_path / "gen"), "--clip", str(clip)])
    assert err.startswith(f"error: --clip {clip} {says}") and "openai/clip-vit-" in err


@pytest.mark.parametrize("problem", ["missing", "no_processor", "clip_as_dino"])
def test_cli_refuses_a_bad_scorer_folder(problem, tmp_path, real_dir, clip_dir, dino_dir, capsys, no_load):
    import shutil

    write_generated(tmp_path / "gen", ["a photo of sks dog"])
    folder = {"missing": tmp_path / "nope", "no_processor": tmp_path / "dino", "clip_as_dino": clip_dir}[problem]
    if problem == "no_processor":
        shutil.copytree(dino_dir, folder)
        (folder / "preprocessor_config.json").unlink()
    err = run_error(capsys, ["evaluate", "--real", str(real_dir), "--identifier", "sks", "--class-word", "dog",
                             "--images", str(tmp_path / "gen"), "--dino", str(folder)])
    assert f"--dino {folder}" in err
    expected = {"missing": "does not exist", "no_processor": "preprocessor_config.json",
                "clip_as_dino": "Did you mean --clip"}[problem]
    assert expected in err


def test_cli_refuses_a_png_without_metadata(tmp_path, real_dir, dino_dir, capsys, no_load):
    write_generated(tmp_path / "gen", ["a photo of sks dog"])
    draw_subject(2).save(tmp_path / "gen" / "edited.png")
    err = run_error(capsys, ["evaluate", "--real", str(real_dir), "--identifier", "sks", "--class-word", "dog",
                             "--images", str(tmp_path / "gen"), "--dino", str(dino_dir)])
    assert "edited.png" in err and "dreambooth generate" in err


def test_cli_refuses_a_missing_real_folder(tmp_path, dino_dir, capsys, no_load):
    write_generated(tmp_path / "gen", ["a photo of sks dog"])
    err = run_error(capsys, ["evaluate", "--real", str(tmp_path / "photos"), "--identifier", "sks",
                             "--class-word", "dog", "--images", str(tmp_path / "gen"), "--dino", str(dino_dir)])
    assert f"--real {tmp_path / 'photos'} does not exist" in err
