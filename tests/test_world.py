"""The shape world: its measures read the truth back from pixels, and the built-in model is what it says."""

from __future__ import annotations

import json
import random

import pytest

from dreambooth.evaluation import world
from dreambooth.evaluation.experiment import format_table, measure_images


def test_reading_recovers_shape_colour_and_background_of_drawn_scenes():
    scenes = world.pretraining_set(480, seed=3)
    wrong = []
    for scene, seed in scenes:
        r = world.read_image(world.draw(scene, seed))
        if (r.shape, r.colour, r.background) != (scene.shape, scene.colour, scene.background) or r.is_subject:
            wrong.append((scene, r))
    assert len(wrong) <= 2, wrong[:2]  # 0 of 2,000 measured; a tiny antialiased triangle can look round


def test_the_subject_reads_as_the_subject_and_plain_circles_do_not():
    rng = random.Random(0)
    subjects = [world.read_image(world.draw(world.subject_scene(rng), i)) for i in range(100)]
    assert all(r.is_subject for r in subjects)
    for colour in world.COLOURS:  # red and yellow circles share one colour each with the pattern, not both
        plain = world.read_image(world.draw(world.random_scene(rng, shape="circle", colour=colour), 0))
        assert not plain.is_subject and plain.colour == colour


def test_pretraining_never_shows_the_subject_or_its_identifier():
    scenes = world.pretraining_set(480, seed=0)
    assert not any(s.pattern for s, _ in scenes)
    captions = {s.caption(p) for s, _ in scenes for p in ("full", "colour", "background", "shape")}
    assert not any(world.IDENTIFIER in c.split() for c in captions)
    kinds = {(s.shape, s.colour, s.background) for s, _ in scenes}
    assert len(kinds) == len(world.SHAPES) * len(world.COLOURS) * len(world.BACKGROUNDS)


def test_empty_image_has_no_object():
    from PIL import Image

    r = world.read_image(Image.new("RGB", (32, 32), world.BACKGROUNDS["gray"]))
    assert r.shape is None and r.background == "gray" and not r.is_subject


def _subject_images(rng, n, background=None, same_place=False):
    scene = world.subject_scene(rng, background)
    return [world.draw(scene if same_place else world.subject_scene(rng, background), i) for i in range(n)]


def test_measures_on_perfect_and_on_drifted_images():
    rng = random.Random(1)
    subject = {p: _subject_images(rng, 4, bg) for p, bg in world.subject_prompts()}
    classes = {p: [world.draw(world.random_scene(rng, shape="circle", colour=c), i) for i in range(4)]
               for p, c in world.class_prompts()}
    perfect = world.measure(subject, classes)
    assert perfect["subject_fidelity"] == 1.0 and perfect["prompt_fidelity"] == 1.0
    assert perfect["class_prior"] == 1.0 and perfect["class_shape"] == 1.0
    assert perfect["diversity"] > 0.15
    # Language drift: every class prompt draws the subject instead.
    drifted = world.measure(subject, {p: _subject_images(rng, 4) for p, _ in world.class_prompts()})
    assert drifted["class_prior"] == 0.0 and drifted["class_shape"] == 1.0
    # Wrong backgrounds and one fixed pose: prompt fidelity and diversity drop to what they must be.
    wrong_bg = {p: _subject_images(rng, 4, "white" if bg != "white" else "black", same_place=True)
                for p, bg in world.subject_prompts()}
    measures = world.measure(wrong_bg, classes)
    assert measures["prompt_fidelity"] == 0.0 and measures["subject_fidelity"] == 1.0
    assert measures["diversity"] < perfect["diversity"]


def test_measure_images_splits_prompts_and_table_has_spread():
    rng = random.Random(2)
    images = {p: _subject_images(rng, 2, bg) for p, bg in world.subject_prompts()}
    images |= {p: [world.draw(world.random_scene(rng, shape="circle", colour=c), 0)] for p, c in world.class_prompts()}
    m = measure_images(images)
    assert m["images"] == 2 * len(world.subject_prompts()) + len(world.class_prompts())
    table = format_table([{"variant": "a", "seed": s, **m, "class_prior": v} for s, v in ((0, 0.5), (1, 1.0))])
    assert "| a | 2 | 1.00 ± 0.00 | 1.00 ± 0.00 | 0.75 ± 0.35 |" in table


def test_pretraining_script_writes_a_loadable_pipeline_and_repeats_itself_exactly(tmp_path):
    from diffusers import StableDiffusionPipeline

    from dreambooth.evaluation.world_model import is_world_model, main

    for name in ("m", "again"):
        main(["--out", str(tmp_path / name), "--images", "48", "--vae-steps", "2", "--steps", "3", "--batch-size",
              "4"])
    for part in ("unet", "vae", "text_encoder"):
        files = [next((tmp_path / name / part).glob("*.safetensors")).read_bytes() for name in ("m", "again")]
        assert files[0] == files[1], f"{part} differs between two runs with the same seed"
    assert is_world_model(tmp_path / "m")
    info = json.loads((tmp_path / "m" / "world.json").read_text())
    assert info["pretraining"]["steps"] == 3 and info["world"]["identifier"] == "sks"
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "m")
    image = pipe("a photo of a red circle", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (world.SIZE, world.SIZE)


def test_builtin_model_is_shipped_and_knows_sks_as_one_unused_token():
    from transformers import CLIPTokenizer

    from dreambooth.evaluation.world_model import builtin_model_path, is_world_model

    path = builtin_model_path()
    if not (path / "model_index.json").is_file():
        pytest.fail(f"the built-in model is missing from {path}; make it with "
                    "`python -m dreambooth.evaluation.world_model`")
    assert is_world_model(path)
    tok = CLIPTokenizer.from_pretrained(path / "tokenizer")
    assert tok.tokenize(world.INSTANCE_PROMPT) == ["a</w>", "photo</w>", "of</w>", "sks</w>", "circle</w>"]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 10e6


def test_score_columns_apply_only_to_what_a_prompt_asks():
    rng = random.Random(4)
    subject = world.draw(world.subject_scene(rng, background="gray"), 0)
    green = world.draw(world.random_scene(rng, shape="circle", colour="green", background="white"), 0)
    cols = world.score_columns([subject, green, subject],
                               ["a photo of sks circle on a gray background", "a photo of a green circle",
                                "a photo of a green circle"])
    assert cols == {"world_subject": [1.0, 0.0, 1.0], "world_background": [1.0, None, None],
                    "world_colour": [None, 1.0, 0.0]}


def test_evaluate_adds_world_measures_for_the_builtin_model(tmp_path, capsys):
    from dreambooth.cli import main
    from dreambooth.evaluation.experiment import write_instance_images
    from dreambooth.evaluation.world_model import builtin_model_path

    real = write_instance_images(tmp_path / "real", 2)
    code = main(["evaluate", "--model", str(builtin_model_path()), "--real", str(real), "--identifier", "sks",
                 "--class-word", "circle", "--prompt", "a photo of a blue circle on a black background",
                 "--num-images", "2", "--steps", "10", "--out", str(tmp_path / "ev")])
    assert code == 0, capsys.readouterr().err
    overall = json.loads((tmp_path / "ev" / "metrics.json").read_text())["overall"]
    assert overall["world_subject"] == 0.0 and overall["world_background"] is not None
    assert "world_colour" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["experiment", "--images-per-prompt", "0"], ["experiment", "--steps", "-5"],
                                  ["demo", "--steps", "0"], ["experiment", "--images-per-prompt", "many"]])
def test_experiment_and_demo_refuse_counts_below_one_before_any_work(argv, tmp_path, capsys):
    from dreambooth.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert argv[1] in err and ("at least 1" in err or "whole number" in err)
    assert not (tmp_path / "run").exists()
