"""The built-in Flux world model: its pretraining script repeats itself and writes a stock FluxPipeline folder, its
prompts weigh as FluxPipeline's 512-token ones, and `dreambooth demo --family flux` teaches it the subject (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from dreambooth.evaluation import world


@pytest.mark.numerics
def test_pad_bias_makes_a_short_prompt_weigh_as_the_pipelines_512_token_one():
    """FluxPipeline pads T5's tokens to 512; pretraining runs the real tokens and one pad with log(pads wanted / pads
    present) on the pad's logit. With a layer-free T5 every pad is the same vector, so the two are the same sum."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from dreambooth.evaluation.world_model_flux import T5_LENGTH, WORDS, configs, pad_bias
    from dreambooth.models.tiny_flow import build_t5_tokenizer

    torch.manual_seed(0)
    tokenizer = build_t5_tokenizer(words=WORDS, max_length=T5_LENGTH)
    cfg = configs(100, len(tokenizer), {"bos_token_id": 98, "eos_token_id": 99, "pad_token_id": 99})
    t5 = T5EncoderModel(T5Config(**cfg["text_encoder_2"]))
    transformer = FluxTransformer2DModel(**cfg["transformer"])
    for p in transformer.parameters():  # diffusers zeroes the output layers; random ones make the check bite
        p.data.normal_(0, 0.1)
    captions = ["a photo of a red circle on a gray background", ""]
    noisy = torch.randn(2, 64, cfg["transformer"]["in_channels"])
    pooled = torch.randn(2, cfg["transformer"]["pooled_projection_dim"])

    def velocity(ids, mask=None):
        return transformer(hidden_states=noisy, timestep=torch.full((2,), 0.5), guidance=torch.full((2,), 3.5),
                           pooled_projections=pooled, encoder_hidden_states=t5(ids)[0],
                           txt_ids=torch.zeros(ids.shape[1], 3),
                           img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
                           joint_attention_kwargs=None if mask is None else {"attention_mask": mask},
                           return_dict=False)[0]

    full = tokenizer(captions, padding="max_length", max_length=T5_LENGTH, return_tensors="pt").input_ids
    short = tokenizer(captions, padding="max_length", max_length=12, return_tensors="pt").input_ids
    mask = pad_bias(short, tokenizer.pad_token_id, torch.tensor([T5_LENGTH, T5_LENGTH]), 64)
    assert mask.shape == (2, 1, 1, 12 + 64)
    # the caption's 11 tokens leave 1 pad standing for 501; the empty caption's 1 token leaves 11 for 511
    assert mask[0, 0, 0, 11].item() == pytest.approx(torch.log(torch.tensor(501.0)).item())
    assert mask[1, 0, 0, 1].item() == pytest.approx(torch.log(torch.tensor(511 / 11)).item())
    assert (mask[0, 0, 0, :11] == 0).all() and (mask[:, 0, 0, 12:] == 0).all()
    with torch.no_grad():
        reference, emulated, unbiased = velocity(full), velocity(short, mask), velocity(short)
    scale = reference.abs().mean().item()
    assert (reference - emulated).abs().max().item() < 1e-4 * scale  # float rounding: measured 6e-6 of the scale
    assert (reference - unbiased).abs().max().item() > 0.1 * scale  # without the bias the prompt reads otherwise


def test_pretraining_script_writes_a_flux_pipeline_and_repeats_itself_exactly(tmp_path):
    from diffusers import FluxPipeline

    from dreambooth.evaluation.world_model import is_world_model
    from dreambooth.evaluation.world_model_flux import main

    for name in ("m", "again"):
        main(["--out", str(tmp_path / name), "--images", "48", "--steps", "3", "--distil-steps", "2", "--batch-size",
              "4"])
    for part in ("transformer", "text_encoder", "text_encoder_2"):
        files = [next((tmp_path / name / part).glob("*.safetensors")).read_bytes() for name in ("m", "again")]
        assert files[0] == files[1], f"{part} differs between two runs with the same seed"
    assert is_world_model(tmp_path / "m")
    info = json.loads((tmp_path / "m" / "world.json").read_text())
    assert info["pretraining"]["steps"] == 3 and info["pretraining"]["distil_steps"] == 2
    assert info["world"]["identifier"] == "sks"
    log = json.loads((tmp_path / "m" / "pretraining_log.json").read_text())
    assert [e["step"] for e in log["flow"]] == [3] and [e["step"] for e in log["distil"]] == [2]
    pipe = FluxPipeline.from_pretrained(tmp_path / "m")
    assert pipe.transformer.config.guidance_embeds
    image = pipe("a photo of a red circle", height=world.SIZE, width=world.SIZE, num_inference_steps=2,
                 guidance_scale=3.5).images[0]
    assert image.size == (world.SIZE, world.SIZE)


def test_builtin_flux_model_is_shipped_small_and_knows_sks_as_one_unused_token():
    from transformers import CLIPTokenizer, T5TokenizerFast

    from dreambooth.evaluation.world_model import is_world_model
    from dreambooth.evaluation.world_model_flux import builtin_flux_model_path
    from dreambooth.models.families import folder_family

    path = builtin_flux_model_path()
    if not (path / "model_index.json").is_file():
        pytest.fail(f"the built-in Flux model is missing from {path}; make it with "
                    "`python -m dreambooth.evaluation.world_model_flux`")
    assert is_world_model(path) and folder_family(path).name == "flux"
    assert CLIPTokenizer.from_pretrained(path / "tokenizer").tokenize(world.INSTANCE_PROMPT) == [
        "a</w>", "photo</w>", "of</w>", "sks</w>", "circle</w>"]
    assert T5TokenizerFast.from_pretrained(path / "tokenizer_2").tokenize(world.INSTANCE_PROMPT) == [
        "▁a", "▁photo", "▁of", "▁sks", "▁circle"]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 12e6


def test_demo_family_option_picks_the_model_and_recipe_and_refuses_others(tmp_path, capsys, monkeypatch):
    from dreambooth.cli import main
    from dreambooth.evaluation import demo, experiment
    from dreambooth.evaluation.world_model_flux import builtin_flux_model_path

    assert experiment.builtin_model("flux") == builtin_flux_model_path()
    assert experiment.RECIPES["flux"].sampler == "default" and experiment.RECIPES["sd"] == experiment.Recipe()
    # the Flux demo trains a LoRA on `sks` with the guidance input at 1; the SD demo stays as it was
    assert experiment.DEMO_VARIANTS["flux"] == experiment.Variant("lora + prior", "lora", prior=True)
    assert experiment.DEMO_VARIANTS["sd"] == experiment.Variant("full + prior", "full", prior=True)
    assert experiment.RECIPES["flux"].identifier_for(experiment.DEMO_VARIANTS["flux"]) == "sks"
    assert experiment.RECIPES["flux"].training_guidance == 1.0
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--family", "sd3", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and "--family" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, steps=None, family="sd": seen.update(family=family, steps=steps))
    assert main(["demo", "--family", "flux", "--steps", "5", "--out", str(tmp_path / "run")]) == 0
    assert seen == {"family": "flux", "steps": 5}


@pytest.mark.slow
def test_demo_on_the_flux_model_learns_the_subject_and_keeps_the_class_prior(tmp_path):
    """`dreambooth demo --family flux` at seed 0 learns the subject and keeps the class prior, with a LoRA that loads
    into the built-in model. The issue's bar (fidelity at least 0.8, the prior within 0.1 of the base's) is what the
    demo measured at seeds 0-2 (docs/world.md); asserted here with room for another CPU's float order, which trains
    another LoRA from the same seed, as tests/test_world_slow.py does for SD. Slow (about 6 minutes on one thread):
    `python -m pytest -m slow tests/test_world_flux.py`."""
    from dreambooth.evaluation.demo import run_demo
    from dreambooth.models.base import LORA_FILE

    record = run_demo(tmp_path / "demo", family="flux")
    base, trained = record["metrics"]["base"], record["metrics"]["trained"]
    assert record["method"] == "lora" and (tmp_path / "demo" / "model" / LORA_FILE).is_file()
    # the base draws "sks circle" as a plain circle of any colour; an orange-ish one reads as banded now and then
    # (seed 0: 0.17), the measure's false positives on this model's softer edges
    assert base["subject_fidelity"] <= 0.25, record["metrics"]
    # seed 0 measured 0.85 (base 0.17) and a class prior of 0.91 (base 1.00) on the AMD EPYC VM, 2026-12-07
    assert trained["subject_fidelity"] >= max(0.7, base["subject_fidelity"] + 0.5), record["metrics"]
    assert trained["class_prior"] >= base["class_prior"] - 0.2, record["metrics"]
