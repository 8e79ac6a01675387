"""The run report (OUTPUT_DIR/report.html): built during tiny runs (full with prior and a rejected file, LoRA,
interrupted and resumed), rebuilt by `dreambooth report` for a run made before it existed, extended by
`evaluate --checkpoints all`, and opened in a real headless Chromium (skipped without one unless
DREAMBOOTH_REQUIRE_BROWSER=1, as in test_serve_page.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import base_overrides, headless_chromium, interrupt_after, photo_folder

from dreambooth.cli import main
from dreambooth.config_file import load_config
from dreambooth.errors import TrainingStopped
from dreambooth.training import loop as train_module
from dreambooth.training import report_page
from dreambooth.training.loop import train
from dreambooth.training.report import best_checkpoint, ema, gather, read_log

CLASS_PROMPT = "a photo of dog <b>&amp;"  # markup in a prompt is the user's text, shown as written


def page_of(out: Path) -> str:
    return (out / "report.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def full_run(tiny_model, tmp_path_factory):
    """6 steps, full fine-tune with prior preservation, a file pre-flight rejects, validation every 3 steps with an
    identifier prompt and a class prompt, a checkpoint every 3 steps."""
    tmp = tmp_path_factory.mktemp("full_run")
    instance = photo_folder(tmp / "instance", 3)
    (instance / "notes.png").write_text("not a picture")
    out = tmp / "out"
    train(load_config(None, base_overrides(
        tiny_model, instance, tmp / "class", out, **{
            "training.max_train_steps": 6, "validation.prompts": ["a photo of sks dog", CLASS_PROMPT],
            "validation.steps": 3, "validation.num_images": 2, "validation.num_inference_steps": 2})))
    return out


def test_log_reader_keeps_the_resumed_tail_and_one_point_per_step(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)] + [{"step": s, "loss": 10.0 + s} for s in (3, 4, 5)]
    log.write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"step\": 6, \"lo")  # the last line cut short
    records = read_log(log)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [1.0, 2.0, 13.0, 14.0, 15.0]  # the run resumed at 2 continued from there
    assert read_log(tmp_path / "missing.jsonl") == []
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no ramp up from 0
    assert ema([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10 * 0.5 / 0.75])


def test_best_checkpoint_rule():
    def entry(name, step, **metrics):
        return {"name": name, "step": step, "metrics": metrics}

    world = [entry("checkpoint-2", 2, world_subject=0.5, world_colour=0.9, dino=0.9),
             entry("checkpoint-4", 4, world_subject=0.75, world_colour=0.2, dino=0.1),
             entry("final", 6, world_subject=0.75, world_colour=0.5, dino=0.1)]
    assert best_checkpoint(world)[0] == "final"  # world_subject first, the class prior breaks the tie
    paper = [entry("checkpoint-2", 2, dino=0.4, clip_i=0.9), entry("checkpoint-4", 4, dino=0.4, clip_i=0.7),
             entry("final", 6, dino=0.3, clip_i=0.99)]
    name, why = best_checkpoint(paper)
    assert name == "checkpoint-2" and "dino" in why
    assert best_checkpoint([entry("a", 2, clip_i=0.5), entry("b", 4, clip_i=0.5)])[0] == "a"  # the earlier step
    assert best_checkpoint([entry("a", 2, clip_t=0.5)])[0] is None


def test_report_of_a_full_run_with_prior_and_a_rejected_file(full_run):
    out = full_run
    page = page_of(out)
    facts = gather(out)
    assert facts.status == "finished"
    assert [r["step"] for r in facts.log] == [1, 2, 3, 4, 5, 6]
    # the run: base model with hash, identifier and its tokens, method, config, versions, device and time
    info = json.loads((out / "run_info.json").read_text())
    for text in (info["base_model_hash"], "sks&lt;/w&gt;", "full, with prior preservation", "resolved config",
                 "torch ", "device</th><td>cpu", "steps/s"):
        assert text in page, text
    assert "wall time</th><td>not recorded" not in page and "peak memory</th><td>not recorded" not in page
    # pre-flight: the photos used, the rejected file and why, a strip of class images
    assert len(list((out / "report" / "instance").glob("*.png"))) == 3
    assert "notes.png</code>: not an image" in page
    assert len(list((out / "report" / "class").glob("*.png"))) == 4
    # curves, drawn with the prior loss since it is on
    assert (out / "report" / "curves.png").stat().st_size > 10_000 and 'id=curves-image' in page
    # samples: per step, the identifier prompt's row and the class prompt's, the step and seed under each image
    assert page.count("class=sample-row data-step=3 ") == 2 and page.count("class=sample-row data-step=6 ") == 2
    assert page.index('data-kind="identifier prompt"') < page.index('data-kind="class prompt"')
    assert "step 6 · seed 0" in page
    assert len(list((out / "report" / "samples").glob("step-000006-*.png"))) == 4
    # every string from the run is escaped: the prompt's markup shows as text
    assert "a photo of dog &lt;b&gt;&amp;amp;" in page and "<b>" not in page
    # checkpoints and the final model with their sizes; nothing measured yet
    assert [c.name for c in facts.checkpoints] == ["checkpoint-3", "checkpoint-6", "final"]
    assert all(c.size_bytes > 0 for c in facts.checkpoints) and "Not measured" in page
    # and no half-written file was ever left behind
    assert not list(out.rglob("*.tmp"))


def test_evaluate_all_checkpoints_names_the_best_in_the_report(full_run, real_dir, dino_dir, tmp_path, capsys):
    argv = ["evaluate", "--model", str(full_run), "--checkpoints", "all", "--real", str(real_dir), "--identifier",
            "sks", "--class-word", "dog", "--dino", str(dino_dir), "--prompt", "a photo of sks dog", "--steps", "2",
            "--num-images", "1", "--out", str(tmp_path / "eval")]
    assert main(argv) == 0
    record = json.loads((full_run / "checkpoint_metrics.json").read_text())
    assert [e["name"] for e in record["checkpoints"]] == ["checkpoint-3", "checkpoint-6", "final"]
    assert [e["step"] for e in record["checkpoints"]] == [3, 6, 6]
    dino = {e["name"]: e["metrics"]["dino"] for e in record["checkpoints"]}
    best = max(record["checkpoints"], key=lambda e: (e["metrics"]["dino"], -e["step"]))["name"]  # first of ties
    assert record["best"] == best and "dino" in record["why"]
    for name in dino:  # each checkpoint scored as `evaluate --model` would, in a folder of its own
        assert json.loads((tmp_path / "eval" / name / "metrics.json").read_text())["overall"]["dino"] == dino[name]
    printed = capsys.readouterr().out
    assert f"best: {best}" in printed and "run report:" in printed
    page = page_of(full_run)
    assert f'<tr class="checkpoint best"><td>{best} <strong class=best>best</strong>' in page
    assert f"{dino[best]:.3f}" in page and (full_run / "report" / "checkpoints.png").is_file()
    assert main(argv) == 2  # the per-checkpoint results are not overwritten without --overwrite


def test_report_of_a_lora_run_and_its_checkpoints_evaluated_on_the_base(probe, tiny_model, real_dir, dino_dir,
                                                                        tmp_path):
    run = probe(model__method="lora", training__learning_rate=1e-2, training__max_train_steps=2,
                output__checkpointing_steps=1, validation__prompts=["a photo of sks dog"], validation__steps=2,
                validation__num_images=1, validation__num_inference_steps=2)
    out = run.out
    page = page_of(out)
    assert "lora, without prior preservation" in page
    assert "No class images: trained without prior preservation" in page
    assert page.count("class=sample-row") == 1
    facts = gather(out)
    assert [c.name for c in facts.checkpoints] == ["checkpoint-1", "checkpoint-2", "final"]
    final = facts.checkpoints[-1]
    assert final.size_bytes == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert main(["evaluate", "--model", str(out), "--checkpoints", "all", "--real", str(real_dir), "--identifier",
                 "sks", "--class-word", "dog", "--dino", str(dino_dir), "--prompt", "a photo of sks dog", "--steps",
                 "1", "--num-images", "1", "--out", str(tmp_path / "eval")]) == 0
    for name, lora in (("checkpoint-1", out / "checkpoint-1"), ("final", out)):
        inputs = json.loads((tmp_path / "eval" / name / "metrics.json").read_text())["inputs"]
        assert inputs["model"] == str(tiny_model) and inputs["loras"] == [str(lora)]  # adapters on their base
    assert json.loads((out / "checkpoint_metrics.json").read_text())["best"] in {"checkpoint-1", "checkpoint-2",
                                                                                    "final"}


def test_interrupted_and_resumed_run_has_one_curve_point_per_step(tiny_model, instance_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    values = {"model.pretrained_model": str(tiny_model), "dataset.instance_dir": str(instance_dir),
              "dataset.instance_prompt": "a photo of sks dog", "training.resolution": 64, "training.seed": 0,
              "training.max_train_steps": 5, "training.learning_rate": 1e-3, "output.output_dir": str(out),
              "output.logging_steps": 1, "output.checkpointing_steps": 2, "output.report_to": "none"}
    interrupt_after(monkeypatch, calls=3)
    with pytest.raises(TrainingStopped, match="stopped at step 3"):
        train(load_config(None, values))
    monkeypatch.undo()
    assert "stopped at step 3" in gather(out).status
    assert "stopped at step 3" in page_of(out)  # the stopping process's own last word, not "running"
    # As if the process had been killed after step 3 was logged but before its checkpoint: resume from step 2,
    # which logs step 3 again.
    shutil.rmtree(out / "checkpoint-3")
    train(load_config(None, {**values, "output.resume_from_checkpoint": "latest"}))
    raw = [json.loads(line)["step"] for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert raw == [1, 2, 3, 3, 4, 5]
    facts = gather(out)
    assert [r["step"] for r in facts.log] == [1, 2, 3, 4, 5]
    resumed = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()][3]
    assert facts.log[2] == resumed  # step 3 as the resumed run computed it
    sessions = facts.progress["sessions"]
    assert len(sessions) == 2 and [s["step"] for s in sessions] == [3, 5]
    assert "over 2 sessions" in page_of(out) and facts.status == "finished"


def test_report_command_rebuilds_an_old_run_and_refuses_a_folder_that_is_no_run(full_run, tmp_path, monkeypatch,
                                                                                capsys):
    old = tmp_path / "old"
    shutil.copytree(full_run, old, ignore=shutil.ignore_patterns("report", "report.html", "checkpoint_metrics.json"))
    info = json.loads((old / "run_info.json").read_text())
    for subject in info["subjects"]:  # what run_info.json held before the report existed
        del subject["rejected"], subject["image_notes"]
    del info["warnings"]
    (old / "run_info.json").write_text(json.dumps(info))
    opened = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    assert main(["report", str(old), "--open"]) == 0
    page = page_of(old)
    assert opened == [(old / "report.html").resolve().as_uri()]
    assert "Rejected files were not recorded by this run" in page and "wall time</th><td>not recorded" in page
    assert page.count("class=sample-row") == 4 and (old / "report" / "curves.png").is_file()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a training run's output folder" in capsys.readouterr().err
    assert main(["report", str(photo_folder(tmp_path / "photos", 1))]) == 2


def test_a_report_that_fails_does_not_end_the_run(probe, monkeypatch, capsys):
    def broken(out, status=None):
        raise OSError("disk full")

    monkeypatch.setattr(report_page, "write_report", broken)
    run = probe()
    assert (run.out / "model_index.json").is_file() and not (run.out / "report.html").exists()
    assert "warning: the run report was not written (OSError: disk full); the run goes on" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# The page in a real browser


@pytest.fixture
def browser(tmp_path):
    with headless_chromium(tmp_path / "chromium", "1200,2400") as driver:
        yield driver


def test_the_page_in_headless_chromium(full_run, browser, tmp_path):
    browser.get((full_run / "report.html").resolve().as_uri())
    images = browser.execute_script("return [...document.images].map(i => [i.getAttribute('src'), i.complete, "
                                    "i.naturalWidth])")
    assert len(images) >= 3 + 4 + 1 + 8  # photos, class strip, curves, sample cells
    # lazy images below the fold load when scrolled to; scroll through, then every image must have loaded
    browser.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 20).until(lambda d: d.execute_script(
        "return [...document.images].every(i => i.complete)"), "images to finish loading")
    broken = browser.execute_script("return [...document.images].filter(i => i.naturalWidth === 0)"
                                    ".map(i => i.getAttribute('src'))")
    assert broken == []
    width = browser.execute_script("return document.getElementById('curves-image').naturalWidth")
    assert width == 1000  # 10 in at 100 dpi: the matplotlib figure
    rows = browser.execute_script("return [...document.querySelectorAll('tr.sample-row')].map(r => "
                                  "[r.dataset.step, r.dataset.kind, r.querySelectorAll('img').length])")
    assert rows == [["3", "identifier prompt", 2], ["3", "class prompt", 2], ["6", "identifier prompt", 2],
                    ["6", "class prompt", 2]]
    assert not any("http" in (src or "") for src, _, _ in images)  # nothing from the network
    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_a_sparse_log_and_an_extended_run_give_the_true_step_and_status(tiny_model, instance_dir, tmp_path,
                                                                        monkeypatch):
    """The log has every logging_steps-th step, so a stop is placed by its checkpoint; a finished LoRA run extended
    to more steps is "running" while it trains, and its final row keeps the step its LoRA was saved at."""
    out = tmp_path / "out"
    values = {"model.pretrained_model": str(tiny_model), "dataset.instance_dir": str(instance_dir),
              "dataset.instance_prompt": "a photo of sks dog", "training.resolution": 64, "training.seed": 0,
              "training.max_train_steps": 2, "training.learning_rate": 1e-3, "output.output_dir": str(out),
              "output.logging_steps": 10, "output.checkpointing_steps": 2, "output.report_to": "none",
              "model.method": "lora"}
    train(load_config(None, values))
    assert gather(out).status == "finished"
    seen = []
    real = train_module.checkpoint

    def watched(run):
        path = real(run)
        facts = gather(out)
        seen.append((run.global_step, facts.status, [(c.name, c.step) for c in facts.checkpoints if c.name == "final"]))
        return path

    monkeypatch.setattr(train_module, "checkpoint", watched)
    interrupt_after(monkeypatch, calls=2)  # the resumed run's second step: step 4
    with pytest.raises(TrainingStopped):
        train(load_config(None, {**values, "training.max_train_steps": 6, "output.resume_from_checkpoint": "latest"}))
    assert seen == [(4, "running at step 4", [("final", 2)])]  # the log's last record is step 2's
    assert "stopped at step 4 (no final model from this run)" in page_of(out)
    assert gather(out).status == "stopped at step 4 (the final model in the folder is from step 2)"


def test_thumbnails_follow_the_photos_a_resumed_run_uses(tiny_model, tmp_path):
    from PIL import Image

    first, second = tmp_path / "first", tmp_path / "second"
    for folder, colour in ((first, (200, 30, 30)), (second, (30, 30, 200))):
        folder.mkdir()
        for i in range(2):
            Image.new("RGB", (64, 64), colour).save(folder / f"p{i}.png")
    out = tmp_path / "out"
    values = {"model.pretrained_model": str(tiny_model), "dataset.instance_dir": str(first),
              "dataset.instance_prompt": "a photo of sks dog", "training.resolution": 64, "training.seed": 0,
              "training.max_train_steps": 1, "training.learning_rate": 1e-3, "output.output_dir": str(out),
              "output.checkpointing_steps": 1, "output.report_to": "none"}
    train(load_config(None, values))
    train(load_config(None, {**values, "dataset.instance_dir": str(second), "training.max_train_steps": 2,
                             "output.resume_from_checkpoint": "latest"}))
    page = page_of(out)
    shown = [out / m for m in re.findall(r'src="(report/instance/[^"]+)"', page)]
    assert len(shown) == 2
    for thumb in shown:
        assert Image.open(thumb).convert("RGB").getpixel((5, 5)) == (30, 30, 200)
