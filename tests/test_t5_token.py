"""A new identifier token in T5 as well as CLIP (token.t5_new_token, Flux and SD3): only its row trains, the prompts
are encoded every step, the token file carries a `t5` row, resume is bitwise, and every drawing path (generate, a
checkpoint, a merged export) puts the trained row back into T5. Also the refusals, and SD3's new tokens drawing at
all (its pipeline has no textual-inversion loader)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import photo_folder
from safetensors import safe_open
from safetensors.torch import load_file
from test_advice import cli_run, passes_preflight, train_argv

from dreambooth.cli import main
from dreambooth.errors import UserError
from dreambooth.models.tiny_families import build_model

TOKEN = "<zq_dog>"


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("flux") / "model", size="flux-tiny", seed=3)


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("sd3") / "model", size="sd3-tiny", seed=5)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("t5-photos") / "instance", 3)


def token_argv(model, photos, out, *extra, steps=2):
    return train_argv(model, photos, out, "--identifier", TOKEN, "--initializer", "dog", "--instance_prompt",
                      f"a photo of {TOKEN} dog", "--max_sequence_length", "16", "--text_encoder_lr", "1e-2", *extra,
                      steps=steps)


def t5_rows(model, t5_dir="text_encoder_2"):
    """The base model's T5 embedding and the initializer's starting row (the mean over 'dog''s T5 pieces)."""
    from transformers import AutoTokenizer, T5EncoderModel

    weight = T5EncoderModel.from_pretrained(model / t5_dir).get_input_embeddings().weight.detach()
    pieces = AutoTokenizer.from_pretrained(model / t5_dir.replace("text_encoder", "tokenizer"))(
        "dog", add_special_tokens=False).input_ids
    return weight, weight[pieces].mean(dim=0)


def drawn_t5(pipe, t5="text_encoder_2"):
    """The id the pipeline's T5 tokenizer gives the token (one piece, or a failure) and its T5 embedding."""
    tokenizer = getattr(pipe, t5.replace("text_encoder", "tokenizer"))
    ids = tokenizer(TOKEN, add_special_tokens=False).input_ids
    assert len(ids) == 1, ids
    return ids[0], getattr(pipe, t5).get_input_embeddings().weight.detach()


def test_a_t5_token_trains_its_row_alone_and_every_drawing_path_uses_it(flux_model, photos, tmp_path, capsys):
    """Flux LoRA with --t5_new_token: the token file holds a `clip_l` and a `t5` row; the t5 row moved off its
    initializer (so T5 ran inside the step, with its gradient); generate, the checkpoint and export --merge-lora
    all draw with that row in T5 under the token's one id, every other T5 row as the base's."""
    from dreambooth.formats.lora_loading import load_loras
    from dreambooth.models.loading import load_pipeline

    out = tmp_path / "run"
    printed = cli_run(capsys, *token_argv(flux_model, photos, out, "--method", "lora", "--t5_new_token",
                                          "--checkpointing_steps", "2"))
    assert f"T5: '{TOKEN}' is added there too (token.t5_new_token)" in printed
    file = out / "token_embeddings.safetensors"
    rows = load_file(str(file))
    assert set(rows) == {"clip_l", "t5"}
    with safe_open(str(file), "pt") as f:
        assert json.loads(f.metadata()["dreambooth.tokens"]) == [TOKEN]
    base, start = t5_rows(flux_model)
    trained = rows["t5"][0]
    assert trained.shape == start.shape and (trained - start).abs().max() > 1e-4  # the row learned

    pipe = load_pipeline(flux_model, device=torch.device("cpu"), dtype=torch.float32)
    load_loras(pipe, [(out / "pytorch_lora_weights.safetensors", 1.0)])
    token_id, weight = drawn_t5(pipe)
    assert torch.equal(weight[token_id], trained)
    others = [i for i in range(base.shape[0]) if i != token_id]
    assert torch.equal(weight[others], base[others])

    checkpoint = load_pipeline(out / "checkpoint-2", device=torch.device("cpu"), dtype=torch.float32)
    token_id, weight = drawn_t5(checkpoint)
    assert torch.equal(weight[token_id], trained)

    merged = tmp_path / "merged"
    cli_run(capsys, "export", flux_model, "--format", "diffusers", "--merge-lora", out, "--out", merged)
    from diffusers import FluxPipeline

    token_id, weight = drawn_t5(FluxPipeline.from_pretrained(merged))
    assert torch.equal(weight[token_id], trained)

    shots = tmp_path / "shots"
    cli_run(capsys, "generate", "--model", flux_model, "--lora", out, "--prompt", f"a photo of {TOKEN} dog",
            "--height", "64", "--width", "64", "--steps", "2", "--out", shots)
    assert len(list(shots.glob("0*.png"))) == 1


def test_without_the_option_t5_reads_the_token_as_pieces(flux_model, photos, tmp_path, capsys, monkeypatch):
    printed = passes_preflight(capsys, monkeypatch, *token_argv(flux_model, photos, tmp_path / "a", "--method",
                                                                "lora"))
    assert f"T5: reads '{TOKEN}' as the pieces" in printed and "--t5_new_token adds it to T5 too" in printed


def test_a_t5_token_run_resumes_bitwise(flux_model, photos, tmp_path):
    """Stopped at step 2 and resumed to 4, the LoRA and both token rows equal the run that never stopped."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    argv = ["--method", "lora", "--rank", "4", "--t5_new_token", "--checkpointing_steps", "2"]
    assert main([str(a) for a in token_argv(flux_model, photos, whole, *argv, steps=4)]) == 0
    assert main([str(a) for a in token_argv(flux_model, photos, part, *argv, steps=2)]) == 0
    assert main([str(a) for a in token_argv(flux_model, photos, part, *argv, "--resume_from_checkpoint", "latest",
                                            steps=4)]) == 0
    for name in ("pytorch_lora_weights.safetensors", "token_embeddings.safetensors"):
        a, b = (load_file(str(out / name)) for out in (whole, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_sd3_full_fine_tuning_saves_t5_with_the_token(sd3_model, photos, tmp_path, capsys):
    """A full SD3 run: its saved T5 (text_encoder_3) holds the trained row under the token's id in tokenizer_3 and
    every other row as the base's; stock StableDiffusion3Pipeline loads the folder."""
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "run"
    cli_run(capsys, *token_argv(sd3_model, photos, out, "--t5_new_token"))
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    base, start = t5_rows(sd3_model, "text_encoder_3")
    token_id, weight = drawn_t5(pipe, "text_encoder_3")
    assert (weight[token_id] - start).abs().max() > 1e-4
    others = [i for i in range(base.shape[0]) if i != token_id]
    assert torch.equal(weight[others], base[others])


def test_an_sd3_lora_with_a_new_token_draws(sd3_model, photos, tmp_path, capsys):
    """SD3's pipeline has no textual-inversion loader; a new token trained into its two CLIP encoders (not T5) still
    joins both for drawing."""
    out = tmp_path / "run"
    cli_run(capsys, *token_argv(sd3_model, photos, out, "--method", "lora"))
    rows = load_file(str(out / "token_embeddings.safetensors"))
    assert set(rows) == {"clip_l", "clip_g"}
    shots = tmp_path / "shots"
    cli_run(capsys, "generate", "--model", sd3_model, "--lora", out, "--prompt", f"a photo of {TOKEN} dog",
            "--height", "64", "--width", "64", "--steps", "2", "--out", shots)
    assert len(list(shots.glob("0*.png"))) == 1


def test_a_token_file_for_another_set_of_encoders_is_refused(flux_model, sd3_model):
    """A Flux token with a T5 row cannot go into SD3 (two CLIP encoders), nor a token trained with T5 into a
    pipeline without one."""
    from dreambooth.formats.lora_loading import load_token_vectors
    from dreambooth.models.loading import load_pipeline

    pipe = load_pipeline(sd3_model, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(UserError, match="trained for a model with 1 CLIP text encoder.s. and T5 .clip_l, t5.; this "
                                        "model has 2 and T5"):
        load_token_vectors(pipe, {TOKEN: {"clip_l": torch.zeros(32), "t5": torch.zeros(96)}})
    flux = load_pipeline(flux_model, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(UserError, match="is 7 wide and this model's T5EncoderModel takes"):
        load_token_vectors(flux, {TOKEN: {"clip_l": torch.zeros(32), "t5": torch.zeros(7)}})


def test_t5_new_token_is_refused_where_it_means_nothing(tiny_model, flux_model, photos, tmp_path, capsys,
                                                       monkeypatch):
    """On a family without T5, and with an identifier that is not a new token: exit 2 at pre-flight, nothing
    written; what each message suggests passes."""
    err = cli_run(capsys, *token_argv(tiny_model, photos, tmp_path / "a", "--t5_new_token"), code=2)
    assert "token.t5_new_token: SD 1.x reads prompts through CLIP alone" in err and "Drop --t5_new_token" in err
    err = cli_run(capsys, *train_argv(flux_model, photos, tmp_path / "b", "--enable_t5_ti"), code=2)
    assert "no subject's identifier is a new token" in err
    assert "--identifier '<zq_dog>' --initializer dog" in err and "drop --t5_new_token" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    passes_preflight(capsys, monkeypatch, *token_argv(tiny_model, photos, tmp_path / "a"))
    passes_preflight(capsys, monkeypatch, *train_argv(flux_model, photos, tmp_path / "b", "--enable_t5_ti",
                                                      "--identifier", "<zq_dog>", "--initializer", "dog",
                                                      "--instance_prompt", "a photo of <zq_dog> dog"))
    passes_preflight(capsys, monkeypatch, *train_argv(flux_model, photos, tmp_path / "b"))
