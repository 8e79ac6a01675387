"""Never lose or mix a run, catch mistakes before any work, and every output says where it came from (issue 11).

End to end on the tiny model: each test runs the commands a user runs, including the mistakes people make.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import assert_same_picture, remember_class_dir
from PIL import Image
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.training import components
from dreambooth.training import loop as train_module
from dreambooth.training.class_images import MANIFEST, STAGING

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def train_argv(model, instance_dir, out, *extra, steps=2):
    return ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", "a photo of sks dog", "--resolution", "64", "--max_train_steps", str(steps),
            "--learning_rate", "1e-3", "--seed", "0", "--output_dir", str(out), "--report_to", "none",
            "--logging_steps", "1", *extra]


def run(capsys, argv, code=0):
    got = main(argv)
    captured = capsys.readouterr()
    assert got == code, captured.err
    assert "Traceback" not in captured.err
    return captured


# --------------------------------------------------------------------------------------------- runs lost or mixed


def test_a_second_run_is_refused_until_resumed_or_overwritten(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run(capsys, train_argv(tiny_model, instance_dir, out, "--checkpointing_steps", "1"))
    first = json.loads((out / "run_info.json").read_text())
    model_bytes = (out / UNET_FILE).read_bytes()
    err = run(capsys, train_argv(tiny_model, instance_dir, out), code=2).err
    assert "holds another run" in err and "--overwrite_output_dir" in err and "--resume_from_checkpoint latest" in err
    assert (out / UNET_FILE).read_bytes() == model_bytes  # nothing touched
    # every checkpoint names its run
    for ckpt in ("checkpoint-1", "checkpoint-2"):
        assert json.loads((out / ckpt / "trainer_state.json").read_text())["run_id"] == first["run_id"]
    # replacing it is explicit, and leaves nothing of the old run behind
    run(capsys, train_argv(tiny_model, instance_dir, out, "--overwrite_output_dir", "--checkpointing_steps", "5",
                           "--seed", "1"))
    second = json.loads((out / "run_info.json").read_text())
    assert second["run_id"] != first["run_id"]
    assert not list(out.glob("checkpoint-*")) and (out / UNET_FILE).read_bytes() != model_bytes


def test_ctrl_c_saves_a_complete_checkpoint_exits_0_and_resumes_this_run(tiny_model, instance_dir, tmp_path, capsys,
                                                                        monkeypatch):
    out = tmp_path / "out"
    real, calls = train_module.training_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), __import__("signal").SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", step)
    captured = run(capsys, train_argv(tiny_model, instance_dir, out, "--checkpointing_steps", "100", steps=4))
    monkeypatch.undo()
    assert "error:" not in captured.err and "stopped at step 2 as asked" in captured.err
    ckpt = out / "checkpoint-2"
    assert {p.name for p in ckpt.iterdir()} >= {"unet", "trainer_state.json", "config.yaml", "optimizer.bin"}
    run_id = json.loads((out / "run_info.json").read_text())["run_id"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["run_id"] == run_id
    # the checkpoint is usable on its own, in the layout diffusers users load
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(ckpt / "unet")
    captured = run(capsys, train_argv(tiny_model, instance_dir, out, "--resume_from_checkpoint", "latest", steps=4))
    assert f"resumed from {ckpt} at step 2" in captured.out
    assert json.loads((out / "run_info.json").read_text())["run_id"] == run_id
    # resuming a finished run past its steps says so, and changes nothing
    err = run(capsys, train_argv(tiny_model, instance_dir, out, "--resume_from_checkpoint", "latest",
                                 "--checkpointing_steps", "1", steps=1), code=2).err
    assert "past max_train_steps 1" in err


def make_stale_class_folder(folder, model):
    """Class images generated earlier from another prompt, and a photo the user put there."""
    folder.mkdir(parents=True)
    entries = []
    for seed in range(3):
        name = f"class-{seed:06d}.png"
        Image.new("RGB", (64, 64), (seed * 40, 80, 120)).save(folder / name)
        entries.append({"file": name, "seed": seed})
    Image.new("RGB", (64, 64), "white").save(folder / "mine.png")
    (folder / MANIFEST).write_text(json.dumps({"prompt": "a photo of a cat", "model": str(model),
                                               "model_identity": "sha256:other", "resolution": 64,
                                               "images": entries}))
    return sorted(p.name for p in folder.iterdir())


def test_class_images_do_not_move_until_the_run_can_start(tiny_model, instance_dir, tmp_path, capsys, monkeypatch):
    classes = tmp_path / "class"
    before = make_stale_class_folder(classes, tiny_model)
    argv = train_argv(tiny_model, instance_dir, tmp_path / "out", "--with_prior_preservation", "--class_data_dir",
                      str(classes), "--class_prompt", "a photo of dog", "--num_class_images", "4",
                      "--class_inference_steps", "2", steps=1)

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train_module, "load_models", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(argv)
    monkeypatch.undo()
    report = capsys.readouterr().out
    assert "3 generated from another prompt" in report
    assert sorted(p.name for p in classes.iterdir()) == sorted(before + [STAGING])  # only our staging folder added
    assert not (tmp_path / "out").exists()  # and no empty output folder left behind
    run(capsys, argv)
    aside = [p for p in classes.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["class-000000.png", "class-000001.png",
                                                                             "class-000002.png", MANIFEST]
    assert (classes / "mine.png").exists() and not (classes / STAGING).exists()
    manifest = json.loads((classes / MANIFEST).read_text())
    assert manifest["prompt"] == "a photo of dog" and len(manifest["images"]) == 3  # 3 generated + mine.png = 4


# --------------------------------------------------------------------------------------------- generate


@pytest.mark.numerics
def test_generate_gives_every_image_its_own_noise_and_never_mixes_folders(tiny_model, tmp_path, capsys):
    out = tmp_path / "shots"
    argv = ["generate", "--model", str(tiny_model), "--prompt", "a photo of sks dog", "--steps", "2",
            "--seed", "0", "--seed", "1", "--num-images", "2", "--out", str(out)]
    run(capsys, argv)
    pngs = sorted(out.glob("0*.png"))
    pixels = [Image.open(p).tobytes() for p in pngs]
    assert len(pngs) == 4 and len(set(pixels)) == 4
    seeds = [json.loads(Image.open(p).text["dreambooth"])["seed"] for p in pngs]
    assert seeds[0] == 0 and seeds[2] == 1 and len(set(seeds)) == 4
    # each image's recorded seed draws it again
    again = tmp_path / "again"
    run(capsys, ["generate", "--model", str(tiny_model), "--prompt", "a photo of sks dog", "--steps", "2",
                 "--seed", str(seeds[3]), "--out", str(again)])
    assert_same_picture(Image.open(next(again.glob("0*.png"))), Image.open(pngs[3]))  # drawn alone, not in a batch
    # the same folder again: refused, nothing changed; --overwrite replaces it whole
    err = run(capsys, argv[:-1] + [str(out)], code=2).err
    assert "earlier `dreambooth generate` run" in err and "--overwrite" in err
    assert [Image.open(p).tobytes() for p in sorted(out.glob("0*.png"))] == pixels
    run(capsys, ["generate", "--model", str(tiny_model), "--prompt", "another", "--steps", "2", "--out", str(out),
                 "--overwrite"])
    assert len(list(out.glob("0*.png"))) == 1
    # a folder of the user's own files is never written into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"x")
    assert "did not write" in run(capsys, argv[:-1] + [str(tmp_path / "mine"), "--overwrite"], code=2).err
    # a seed given twice would draw the same images twice; a negative one is A1111's "random", not a seed
    assert "given more than once" in run(capsys, argv[:-1] + [str(tmp_path / "x"), "--seed", "0"], code=2).err
    with pytest.raises(SystemExit) as e:  # out of --seed's declared range: refused as argparse refuses a bad value
        main(argv[:-1] + [str(tmp_path / "x"), "--seed", "-1"])
    assert e.value.code == 2 and "--seed -1: seeds are 0 or more" in capsys.readouterr().err
    from dreambooth.config_file import load_config
    from dreambooth.errors import UserError

    with pytest.raises(UserError, match="training.seed: input should be less than 4294967296"):
        load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "x", "training.seed": 2**32})


def test_evaluate_refuses_images_of_two_models(tmp_path):
    from dreambooth.errors import UserError
    from dreambooth.evaluation.evaluate import read_generated
    from dreambooth.generate import save_images

    image = Image.new("RGB", (8, 8))
    meta = {"prompt": "a photo of sks dog", "negative_prompt": "", "seed": 0, "steps": 2, "guidance": 7.5,
            "scheduler": "dpm++", "width": 8, "height": 8}
    one = save_images([(image, meta), (image, {**meta, "seed": 1})], tmp_path / "a", "model-a")
    assert read_generated(one)[1] == ["a photo of sks dog"] * 2
    other = save_images([(image, meta)], tmp_path / "b", "model-a", loras=[("dog.safetensors", 0.8)])
    with pytest.raises(UserError, match="come from 2 different models or LoRA sets"):
        read_generated(one + other)


# --------------------------------------------------------------------------------------------- mistakes caught early


def test_every_mistake_is_reported_at_once_before_any_work(tiny_model, instance_dir, tmp_path, capsys,
                                                           no_model_load):
    (tmp_path / "a-file").write_text("x")
    err = run(capsys, train_argv(tiny_model, instance_dir, tmp_path / "a-file", "--resolution", "100",
                                 "--validation_prompt", "a photo of sks dog", "--validation_scheduler", "foo",
                                 "--report_to", "wandb"), code=2).err
    assert "4 problem(s)" in err
    assert "training.resolution: 100 is not a multiple of 8" in err and "96 or 104" in err
    assert "is a file, not a folder" in err and str(tmp_path / "a-file") in err
    assert "validation.scheduler: unknown scheduler 'foo'" in err
    assert "output.report_to: wandb is not installed" in err and "pip install wandb" in err


def test_a_mistyped_flag_gets_a_suggestion_and_both_spellings_work(tiny_model, instance_dir, tmp_path, capsys,
                                                                   no_model_load):
    # listed with the other problems of the run, which pre-flight still checks
    err = run(capsys, train_argv(tiny_model, instance_dir, tmp_path / "o", "--learning_rat", "1e-4",
                                 "--resolution", "100"), code=2).err
    assert "unrecognized arguments: --learning_rat 1e-4" in err and "--learning_rat -> --learning_rate" in err
    assert "2 problem(s)" in err and "training.resolution: 100 is not a multiple of 8" in err
    assert "usage:" not in err  # the train usage line alone runs to pages
    from dreambooth.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["init", "p", "--class_word", "cat"]).class_word == "cat"
    assert parser.parse_args(["init", "p", "--class-word", "cat"]).class_word == "cat"
    assert vars(parser.parse_args(["train", "--max-train-steps", "3"]))["training.max_train_steps"] == "3"
    assert vars(parser.parse_args(["train", "--no-train-text-encoder"]))["model.train_text_encoder"] is False
    args = parser.parse_args(["evaluate", "--real", "r", "--identifier", "sks", "--class_word", "dog", "--images", "i"])
    assert args.class_word == "dog"


def test_model_and_lora_mixups_say_what_to_pass(tiny_model, instance_dir, tmp_path, capsys):
    lora_out = tmp_path / "lora"
    run(capsys, train_argv(tiny_model, instance_dir, lora_out, "--method", "lora", steps=1))
    lora_file = lora_out / "pytorch_lora_weights.safetensors"
    gen = ["generate", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "g")]
    err = run(capsys, gen + ["--model", str(lora_file)], code=2).err
    assert "is a LoRA" in err and f"--model {tiny_model} --lora {lora_file}" in err
    err = run(capsys, gen + ["--model", str(lora_out)], code=2).err
    assert "LoRA training output" in err and str(tiny_model) in err
    err = run(capsys, gen + ["--model", str(tiny_model), "--lora", str(tiny_model)], code=2).err
    assert "is a full model folder, not a LoRA" in err
    from dreambooth.export import to_single_file

    single = to_single_file(tiny_model, tmp_path / "full.safetensors")
    err = run(capsys, gen + ["--model", str(tiny_model), "--lora", str(single)], code=2).err
    assert "full single-file Stable Diffusion checkpoint, not a LoRA" in err
    # a LoRA on a model of its family but another size: one line, the count, and the base it was trained on
    from dreambooth.models.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "small", size="small")
    err = run(capsys, gen + ["--model", str(other), "--lora", str(lora_file)], code=2).err
    assert f"is an SD 1.x LoRA (trained on {tiny_model}) and cannot be applied to {other}, an SD 1.x model" in err
    assert "32 of its 32 adapted layers do not fit (32 have another shape" in err and f"(--model {tiny_model})" in err
    assert len(err.splitlines()) == 1


def hub_env(endpoint, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_TOKEN", None)
    return env


def serve(status):
    """A local server answering every request with `status`, as a proxy or a dead hub would."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("status, says", [(503, "cannot be reached"), (404, "no such repository")])
def test_a_hub_id_that_cannot_be_fetched_fails_at_once(instance_dir, tmp_path, status, says):
    server = serve(status)
    try:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dreambooth", *train_argv("someone/no-such-model", instance_dir,
                                                                                tmp_path / "out")],
                              env=hub_env(f"http://127.0.0.1:{server.server_address[1]}", tmp_path),
                              capture_output=True, text=True, timeout=120)
        took = time.perf_counter() - start
    finally:
        server.shutdown()
    assert proc.returncode == 2, proc.stderr
    assert "someone/no-such-model is not a local folder" in proc.stderr and says in proc.stderr
    assert "Retrying" not in proc.stderr and took < 30


def test_push_to_hub_is_checked_before_training(tiny_model, instance_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dreambooth", *train_argv(tiny_model, instance_dir, tmp_path / "o",
                                                                           "--push_to_hub")],
                          env=hub_env("http://127.0.0.1:9", tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "output.push_to_hub: no hub token" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dreambooth", *train_argv(tiny_model, instance_dir, tmp_path / "o",
                                                                           "--push_to_hub", "--hub_token", "hf_x")],
                          env=hub_env("http://127.0.0.1:9", tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "the hub cannot be reached" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_push_to_hub_uploads_the_run_without_checkpoints(tiny_model, instance_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests run offline
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, token=None, **kw: {"name": "me"})
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo",
                                                                                                           repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    out = tmp_path / "my-dog"
    captured = run(capsys, train_argv(tiny_model, instance_dir, out, "--push_to_hub", "--hub_token", "hf_secret",
                                      "--checkpointing_steps", "1"))
    assert calls["repo"] == "me/my-dog" and calls["upload"]["folder_path"] == str(out)
    assert "checkpoint-*" in calls["upload"]["ignore_patterns"] and "uploaded to" in captured.out
    # the token is never written down
    assert not any("hf_secret" in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file()
                   and p.suffix in (".json", ".yaml", ".md", ".txt", ".jsonl"))


# --------------------------------------------------------------------------------------------- seed 000 and outputs


def test_seed_000_config_means_prior_preservation(tiny_model, instance_dir, tmp_path, capsys, no_model_load):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "class.txt").write_text("a photo of a dog\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"pretrained_model": os.path.relpath(tiny_model, tmp_path), "train_unet": True,
                  "train_text_encoder": False},
        "token": {"identifier": "sks", "initializer": "dog"},
        "training": {"resolution": 64, "batch_size": 1, "learning_rate": "5e-6", "max_train_steps": 2,
                     "prior_loss_weight": 1.0},
        "dataset": {"instance_dir": os.path.relpath(instance_dir, tmp_path), "class_dir": "data/class",
                    "instance_prompt": "a photo of sks dog"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)  # every relative path in the file is the file's folder's, not the working directory's
    try:
        with pytest.raises(AssertionError, match="weights were loaded"):
            main(["train", "--config", str(config), "--report_to", "none"])
    finally:
        os.chdir(cwd)
    report = capsys.readouterr().out
    assert "prior preservation: on, because the config file names a class folder" in report
    assert f"class images ({tmp_path / 'data' / 'class'})" in report
    config.write_text(config.read_text().replace("class_dir: data/class", "class_dir: data/class\n  "
                                                 "with_prior_preservation: false"))
    with pytest.raises(AssertionError, match="weights were loaded"):
        main(["train", "--config", str(config), "--report_to", "none"])
    assert "class images (" not in capsys.readouterr().out


@pytest.mark.smoke
def test_every_output_says_where_it_came_from(tiny_model, instance_dir, class_dir, class_dir_cache, tmp_path, capsys):
    out = tmp_path / "out"
    run(capsys, train_argv(tiny_model, instance_dir, out, "--with_prior_preservation", "--class_data_dir",
                           str(class_dir), "--class_prompt", "a photo of dog", "--num_class_images", "4",
                           "--class_inference_steps", "2", "--validation_prompt", "a photo of sks dog",
                           "--validation_steps", "2", "--num_validation_images", "2",
                           "--validation_inference_steps", "2"))
    remember_class_dir(class_dir, class_dir_cache)
    info = json.loads((out / "run_info.json").read_text())
    subject = info["subjects"][0]
    assert subject["identifier"] == "sks" and subject["identifier_kind"] == "existing"
    assert subject["class_prompt"] == "a photo of dog" and info["prior_preservation"] is True
    assert len(info["base_model_hash"]) == 16 and info["run_id"]
    grid = json.loads(Image.open(out / "samples" / "step-000002.png").text["dreambooth"])
    assert grid["step"] == 2 and grid["run_id"] == info["run_id"] and len(grid["images"]) == 2
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == str(tiny_model) and header["instance_prompt"] == "a photo of sks dog"
    assert "dreambooth" in header["tags"] and header["widget"][0]["output"]["url"] == "samples/step-000002.png"
    # a LoRA's name and weight in each generated PNG
    lora_out = tmp_path / "lora"
    run(capsys, train_argv(tiny_model, instance_dir, lora_out, "--method", "lora", steps=1))
    gen = tmp_path / "gen"
    run(capsys, ["generate", "--model", str(tiny_model), "--lora", f"{lora_out}:0.7", "--prompt", "x", "--steps", "1",
                 "--out", str(gen)])
    png = Image.open(next(gen.glob("0*.png")))
    assert json.loads(png.text["dreambooth"])["loras"] == [[str(lora_out), 0.7]]
    assert "Lora: lora:0.7" in png.text["parameters"]


@pytest.mark.smoke
def test_checkpoints_are_usable_on_their_own(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run(capsys, train_argv(tiny_model, instance_dir, out, "--identifier", "<zq>", "--initializer", "dog",
                           "--instance_prompt", "a photo of <zq> dog", "--checkpointing_steps", "2"))
    ckpt = out / "checkpoint-2"  # the last step: the same weights as the final model
    shots = {}
    for name, model in (("final", out), ("checkpoint", ckpt)):
        run(capsys, ["generate", "--model", str(model), "--prompt", "a photo of <zq> dog", "--steps", "2",
                     "--out", str(tmp_path / name)])
        shots[name] = Image.open(next((tmp_path / name).glob("0*.png"))).tobytes()
    assert shots["final"] == shots["checkpoint"]
    single = tmp_path / "ckpt.safetensors"
    run(capsys, ["export", str(ckpt), "--format", "single-file", "--out", str(single)])
    assert (tmp_path / "ckpt.zq.safetensors").is_file()
    a = load_file(single)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(a[key], load_file(str(ckpt / "unet" / "diffusion_pytorch_model.safetensors"))[
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])


def test_the_cli_prints_one_line_per_save_and_no_library_bars(tiny_model, instance_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dreambooth", *train_argv(
        tiny_model, instance_dir, tmp_path / "out", "--checkpointing_steps", "1", "--validation_prompt", "x",
        "--validation_steps", "2", "--num_validation_images", "1", "--validation_inference_steps", "1")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout + proc.stderr
    for noise in ("Loading weights", "Writing model shards", "Loading pipeline components", "\x1b[A"):
        assert noise not in printed, noise
    assert printed.count("checkpoint saved: ") == 2 and printed.count("samples saved: ") == 1


def test_work_folders_of_whole_commands_are_their_own(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"x")
    err = run(capsys, ["tiny-model", str(tmp_path / "photos")], code=2).err
    assert "did not write" in err and (tmp_path / "photos" / "me.jpg").read_bytes() == b"x"
    run(capsys, ["tiny-model", str(tmp_path / "m")])
    run(capsys, ["tiny-model", str(tmp_path / "m")])  # its own folder: rebuilt in place


def test_relative_paths_and_a_changed_spelling_reuse_class_images(tiny_model, instance_dir, class_dir, class_dir_cache,
                                                                 tmp_path, capsys, monkeypatch):
    args = ["--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a photo of dog",
            "--num_class_images", "4", "--class_inference_steps", "2"]
    run(capsys, train_argv(tiny_model, instance_dir, tmp_path / "a", *args, steps=1))
    remember_class_dir(class_dir, class_dir_cache)
    # the same model spelled another way (relative, through ..): its class images are reused, not regenerated
    monkeypatch.chdir(tiny_model.parent)
    spelled = os.path.join("..", tiny_model.parent.name, tiny_model.name)
    captured = run(capsys, train_argv(spelled, instance_dir, tmp_path / "b", *args, steps=1))
    assert "0 to generate" in captured.out and "replaced" not in captured.out
    assert not [p for p in class_dir.iterdir() if p.name.startswith("replaced-")]
    assert json.loads((tmp_path / "b" / "run_info.json").read_text())["base_model"] == str(tiny_model)


def test_a_missing_folder_is_named_by_its_resolved_path(tmp_path, capsys, no_model_load):
    config = tmp_path / "proj" / "config.yaml"
    config.parent.mkdir()
    config.write_text("model: {pretrained_model: ../models/sd15}\ndataset: {instance_prompt: a photo of sks dog}\n")
    err = run(capsys, ["train", "--config", str(config)], code=2).err
    assert str(tmp_path / "models" / "sd15") in err and "does not exist" in err


def test_the_demo_folder_can_be_rerun(tmp_path, capsys, monkeypatch):
    """A second `dreambooth demo` into its own folder replaces its run instead of being refused (README's command)."""
    from dreambooth.evaluation import demo, experiment
    from dreambooth.training.rundir import claim_work_folder

    claim_work_folder(tmp_path / "demo", "demo")
    claim_work_folder(tmp_path / "demo", "demo")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    monkeypatch.setattr(experiment, "train_variant", lambda *a, **k: pytest.fail("trained into a foreign folder"))
    from dreambooth.errors import UserError

    with pytest.raises(UserError, match="did not write"):
        demo.run_demo(tmp_path / "other", steps=1)


@pytest.mark.smoke
def test_newest_dependencies_add_text_encoder_adapters_with_peft_directly(tiny_model):
    """transformers' own add_adapter refuses peft releases older than it wants (5.24 asks for a peft 0.22 that does
    not exist); the text encoder's adapters are added with peft, which every release of the range supports."""
    from dreambooth.config_file import load_config
    from dreambooth.training.components import add_lora_adapters

    cfg = load_config(None, {"model.pretrained_model": str(tiny_model), "model.method": "lora",
                             "model.train_text_encoder": True, "dataset.instance_prompt": "x"})
    from transformers import CLIPTextModel

    from dreambooth.models.families import FAMILIES

    models = components.Models(FAMILIES["sd1"], {"text_encoder": CLIPTextModel.from_pretrained(
        tiny_model / "text_encoder"), "tokenizer": None, "vae": None, "unet": torch.nn.Linear(1, 1)}, None)
    models.unet.add_adapter = lambda config: None
    add_lora_adapters(cfg, models)
    assert "default" in models.text_encoder.peft_config
    assert any("lora_A" in n for n, _ in models.text_encoder.named_parameters())


WANDB_STUB = '''
import json, os
config = type("Config", (), {"update": lambda self, values, **kw: _record("config", values)})()


def _record(kind, payload):
    with open(os.environ["WANDB_STUB_LOG"], "a") as f:
        f.write(json.dumps({"kind": kind, "payload": payload}, default=str) + "\\n")


class Run:
    def log(self, values, step=None, **kw):
        _record("log", {"step": step, **values})

    def finish(self):
        _record("finish", {})


def init(project=None, **kw):
    _record("init", {"project": project})
    return Run()
'''


def test_report_to_uses_an_installed_tracker(tiny_model, instance_dir, tmp_path):
    """--report_to wandb reaches accelerate's tracker when the package is there (a stand-in here: no account)."""
    site = tmp_path / "site"
    (site / "wandb").mkdir(parents=True)
    (site / "wandb" / "__init__.py").write_text(WANDB_STUB)
    (site / "wandb-0.0.0.dist-info").mkdir()
    (site / "wandb-0.0.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: wandb\nVersion: 0.0.0\n")
    log = tmp_path / "wandb.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "WANDB_STUB_LOG": str(log)}
    argv = [a if a != "none" else "wandb" for a in train_argv(tiny_model, instance_dir, tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", "dreambooth", *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0] == {"kind": "init", "payload": {"project": "dreambooth"}}
    steps = [r["payload"]["step"] for r in records if r["kind"] == "log"]
    assert steps == [1, 2] and records[-1]["kind"] == "finish"


def test_lora_targets_and_token_length_are_checked_before_any_work(tiny_model, instance_dir, tmp_path, capsys,
                                                                   no_model_load):
    err = run(capsys, train_argv(tiny_model, instance_dir, tmp_path / "o", "--method", "lora", "--lora_unet_target",
                                 "to_q", "--lora_unet_target", "attn_qkv", "--tokenizer_max_length", "500"),
              code=2).err
    assert "lora.denoiser_target_modules: attn_qkv match no module" in err and "to_k" in err
    assert "training.tokenizer_max_length: 500 is more than" in err


def test_what_a_model_argument_is_is_said_for_every_command(tiny_model, tmp_path, capsys):
    from dreambooth.errors import UserError
    from dreambooth.models.base import check_model_folder

    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    with pytest.raises(UserError, match="is a KandinskyV22Pipeline model"):
        check_model_folder(other)
    lora = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"unet.a.lora_A.weight": torch.zeros(1)}, str(lora), metadata={"dreambooth.base_model": "/m/sd15"})
    with pytest.raises(UserError, match=r"is a LoRA .* Train from its base model \(model.pretrained_model: /m/sd15\)"):
        check_model_folder(lora, what="model.pretrained_model")
    err = run(capsys, ["export", str(tiny_model), "--format", "diffusers", "--out", str(tmp_path / "x"),
                       "--merge-lora", str(tiny_model)], code=2).err
    assert "--merge-lora" in err and "is a full model folder, not a LoRA" in err
