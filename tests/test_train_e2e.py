"""End-to-end training runs on the tiny model, on CPU: the issue's command, resume equivalence, new tokens."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import UNET_FILE, base_overrides, interrupt_after, remember_class_dir
from safetensors.torch import load_file, save_file

from dreambooth.cli import main
from dreambooth.config_file import load_config
from dreambooth.errors import TrainingStopped, UserError
from dreambooth.training.class_images import MANIFEST
from dreambooth.training.loop import train


@pytest.mark.smoke
def test_issue_command_end_to_end(tiny_model, instance_dir, class_dir, class_dir_cache, tmp_path, capsys):
    out = tmp_path / "OUT"
    argv = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", "a photo of sks dog", "--with_prior_preservation", "--class_data_dir", str(class_dir),
            "--class_prompt", "a photo of dog", "--num_class_images", "4", "--class_inference_steps", "2",
            "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "6", "--checkpointing_steps", "2",
            "--checkpoints_total_limit", "2", "--output_dir", str(out), "--validation_prompt", "a photo of sks dog",
            "--validation_steps", "3", "--num_validation_images", "2", "--validation_inference_steps", "2",
            "--seed", "0", "--report_to", "none", "--logging_steps", "1"]
    assert main(argv) == 0
    remember_class_dir(class_dir, class_dir_cache)
    printed = capsys.readouterr().out
    assert "pre-flight report" in printed and "identifier 'sks': an existing single token" in printed

    # class images generated and recorded
    manifest = json.loads((class_dir / MANIFEST).read_text())
    assert manifest["prompt"] == "a photo of dog" and len(manifest["images"]) == 4
    # checkpoint rotation keeps the newest two
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    # validation grids, logs, run record
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all(r["prior_loss"] > 0 for r in log)
    info = json.loads((out / "run_info.json").read_text())
    assert info["base_model"] == str(tiny_model) and "torch" in info["versions"]
    assert load_config(out / "config.yaml").training.max_train_steps == 6

    # the output loads in stock diffusers, everything in fp32, and the UNet changed
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float32}
    before = load_file(str(tiny_model / UNET_FILE))
    after = load_file(str(out / UNET_FILE))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the VAE never trains
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(tiny_model / vae)).values(),
                                                  load_file(str(out / vae)).values()))

    # and `dreambooth generate` draws from it
    gen = tmp_path / "gen"
    assert main(["generate", "--model", str(out), "--prompt", "a photo of sks dog", "--seed", "1", "--seed", "2",
                 "--steps", "2", "--out", str(gen)]) == 0
    pngs = sorted(gen.glob("0*.png"))
    assert len(pngs) == 2 and (gen / "grid.png").is_file()
    from PIL import Image

    meta = json.loads(Image.open(pngs[0]).text["dreambooth"])
    assert meta["prompt"] == "a photo of sks dog" and meta["seed"] == 1 and meta["steps"] == 2


def unet_weights(out):
    return load_file(str(out / UNET_FILE))


def test_resume_gives_the_same_weights_as_not_stopping(tiny_model, instance_dir, class_dir, class_dir_cache,
                                                       tmp_path, monkeypatch):
    # A new token, random flips, gradient accumulation and Min-SNR: every piece of state that resume must restore.
    extra = {"token.identifier": "<zq>", "token.initializer": "dog", "dataset.instance_prompt": "a photo of <zq> dog",
             "dataset.random_flip": True, "training.gradient_accumulation_steps": 2, "training.snr_gamma": 5.0,
             "training.max_train_steps": 6, "training.lr_scheduler": "cosine", "training.lr_warmup_steps": 1,
             "output.checkpointing_steps": 100}
    straight = tmp_path / "straight"
    train(load_config(None, base_overrides(tiny_model, instance_dir, class_dir, straight, **extra)))
    remember_class_dir(class_dir, class_dir_cache)

    stopped = tmp_path / "stopped"
    interrupt_after(monkeypatch, calls=5)  # during step 3 (2 batches a step)
    with pytest.raises(TrainingStopped, match="stopped at step 3"):
        train(load_config(None, base_overrides(tiny_model, instance_dir, class_dir, stopped, **extra)))
    monkeypatch.undo()
    assert [p.name for p in stopped.glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (stopped / "model_index.json").exists()
    legacy = make_legacy_copy(stopped, tmp_path / "legacy", tiny_model)
    damaged = make_legacy_copy(stopped, tmp_path / "damaged", tiny_model)
    unet_file = damaged / "checkpoint-3" / "trainable_0.safetensors"
    tensors = load_file(str(unet_file))
    save_file({k: v for k, v in tensors.items() if k != sorted(tensors)[0]}, str(unet_file))

    resumed = dict(extra, **{"output.resume_from_checkpoint": "latest"})
    te = "text_encoder/model.safetensors"
    for folder in (stopped, legacy):  # and a checkpoint saved by the layout before this one's, still resumable
        train(load_config(None, base_overrides(tiny_model, instance_dir, class_dir, folder, **resumed)))
        a, b = unet_weights(straight), unet_weights(folder)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"resumed run {folder.name} differs from the uninterrupted one"
        ta, tb = load_file(str(straight / te)), load_file(str(folder / te))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(UserError, match=re.escape(f"{unet_file} does not match this run's trainable weights (was it "
                                                  "saved with another method or LoRA settings?)")):
        train(load_config(None, base_overrides(tiny_model, instance_dir, class_dir, damaged, **resumed)))


def make_legacy_copy(run_dir, dest, base_model):
    """`run_dir` as the previous version wrote it: trainable_<i>.safetensors per trained module in each checkpoint
    (the UNet, then the text encoder's whole embedding matrix), no run id or settings recorded anywhere."""
    import shutil

    from transformers import CLIPTextModel

    shutil.copytree(run_dir, dest)
    info = json.loads((dest / "run_info.json").read_text())
    (dest / "run_info.json").write_text(json.dumps({k: v for k, v in info.items() if k not in ("run_id", "settings")}))
    for ckpt in dest.glob("checkpoint-*"):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items()
                                                             if k not in ("run_id", "settings", "save_index")}))
        save_file(load_file(str(ckpt / UNET_FILE)), str(ckpt / "trainable_0.safetensors"))
        shutil.rmtree(ckpt / "unet")
        embedding = CLIPTextModel.from_pretrained(base_model / "text_encoder").get_input_embeddings().weight.detach()
        rows = load_file(str(ckpt / "token_embeddings.safetensors"))
        save_file({"embeddings.token_embedding.weight": torch.cat([embedding, rows["<zq>"][None]]).contiguous()},
                  str(ckpt / "trainable_1.safetensors"))
        (ckpt / "token_embeddings.safetensors").unlink()
    return dest


def test_new_token_trains_only_its_row_and_is_saved(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "out"
    cfg = load_config(None, {
        "model.pretrained_model": str(tiny_model), "token.identifier": "<saya_token>", "token.initializer": "girl",
        "dataset.instance_dir": str(instance_dir), "dataset.instance_prompt": "a photo of <saya_token> girl",
        "training.resolution": 64, "training.learning_rate": 1e-2, "training.max_train_steps": 3,
        "training.seed": 0, "output.output_dir": str(out), "output.report_to": "none"})
    train(cfg)
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    new_id = tok.convert_tokens_to_ids("<saya_token>")
    assert tok.tokenize("a photo of <saya_token> girl")[3] == "<saya_token>"
    base_te = CLIPTextModel.from_pretrained(tiny_model / "text_encoder")
    te = CLIPTextModel.from_pretrained(out / "text_encoder")
    old, new = base_te.get_input_embeddings().weight, te.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + 1
    assert torch.equal(new[:-1], old), "rows other than the new token changed"
    girl = tok.convert_tokens_to_ids(tok.tokenize("girl"))[0]
    assert not torch.equal(new[new_id], old[girl]), "the new token's embedding did not train"
    # everything but the embedding is frozen
    sd_old, sd_new = base_te.state_dict(), te.state_dict()
    assert all(torch.equal(sd_old[k], sd_new[k]) for k in sd_old if "token_embedding" not in k)


def test_v_prediction_and_text_encoder_training(tiny_model_v, instance_dir, tmp_path):
    out = tmp_path / "out"
    cfg = load_config(None, {
        "model.pretrained_model": str(tiny_model_v), "model.train_text_encoder": True,
        "training.text_encoder_lr": 1e-3, "training.snr_gamma": 5.0, "training.noise_offset": 0.05,
        "dataset.instance_dir": str(instance_dir), "dataset.instance_prompt": "a photo of sks dog",
        "training.resolution": 64, "training.learning_rate": 1e-3, "training.max_train_steps": 2,
        "training.seed": 0, "output.output_dir": str(out), "output.report_to": "none",
        "training.mixed_precision": "bf16"})
    train(cfg)
    te = load_file(str(out / "text_encoder/model.safetensors"))
    base = load_file(str(tiny_model_v / "text_encoder/model.safetensors"))
    changed = [k for k in base if not torch.equal(base[k], te[k])]
    assert any("layers" in k for k in changed), "the text encoder's layers did not train"
    assert all(v.dtype == torch.float32 for v in te.values())
    log = (out / "logs" / "train_log.jsonl").read_text().splitlines()
    assert all(json.loads(r)["prior_loss"] == 0.0 for r in log)


def trained_unet(p) -> torch.nn.Module:
    """The UNet a probed run trained, as the loop left it (unwrapped from accelerate)."""
    return p.run.accelerator.unwrap_model(p.run.models.unet)


@pytest.mark.numerics
def test_gradient_checkpointing_gives_the_same_step(probe):
    """Recomputing activations must not change the result, only what the forward keeps for backward."""
    plain = probe(count_saved=True)
    recomputed = probe(count_saved=True, training__gradient_checkpointing=True)
    a, b = unet_weights(plain.out), unet_weights(recomputed.out)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # Checkpointed blocks keep only their inputs for backward; the tiny UNet then saves about a fifth of the bytes.
    kept, full = [c["saved_bytes"] for c in recomputed.calls], [c["saved_bytes"] for c in plain.calls]
    assert max(kept) < 0.5 * min(full), f"bytes saved for backward per step: {kept} checkpointed, {full} not"


def spatial_kernel_layouts(unet: torch.nn.Module) -> set[tuple[bool, bool]]:
    """(channels-last, NCHW-contiguous) of the UNet's k x k convolution kernels, k > 1 (a 1 x 1 kernel is both)."""
    return {(w.is_contiguous(memory_format=torch.channels_last), w.is_contiguous())
            for w in unet.parameters() if w.dim() == 4 and w.shape[-1] > 1}


@pytest.mark.numerics
def test_channels_last_trains_the_same(probe):
    """The same gradients in another memory layout. The gradient norms are compared, not only the weights: after
    AdamW's first steps a weight moves by about the learning rate whatever the size of its gradient, so weights
    alone would hide wrong gradients (torch.compile's CPU code gave 126 of the 208 parameters none, and the weights
    still agreed to 1e-4; hence preflight refuses compile without a GPU, and tests/test_gpu.py checks it there)."""
    unclipped = {"training__max_grad_norm": 1e9}  # the probe's norm is the clipped one otherwise: 1.0 for both
    plain = probe(**unclipped)
    fast = probe(training__channels_last=True, **unclipped)
    a, b = unet_weights(plain.out), unet_weights(fast.out)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    norms = [[u["grad_norm"] for u in p.updates] for p in (plain, fast)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    # Every spatial kernel is laid out channels-last, and so no longer NCHW, after the optimizer's updates too.
    assert spatial_kernel_layouts(trained_unet(fast)) == {(True, False)}
    assert spatial_kernel_layouts(trained_unet(plain)) == {(False, True)}
