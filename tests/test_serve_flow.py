"""`dreambooth serve` and `compile-prompt` with Flux.1 and SD3 characters, on the tiny flow models: LoRA characters
drawn as `generate` draws them, the family's defaults (Flux.1 schnell: 4 steps, no guidance), the token rule (the whole
prompt within T5's length, the identity within CLIP's 77), weighted fragments applied to T5 (and SD3's CLIPs) with
compel's maths on the pipeline's own tokens, and the refusals: a Flux.1 negative prompt, sides off the 16-pixel grid,
an identity CLIP cannot read whole, a LoRA of another family."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import photo_folder
from PIL import Image
from serving_support import characters_file
from starlette.testclient import TestClient
from test_advice import cli_run, train_argv

from dreambooth.characters.state import CharacterState
from dreambooth.command_options import ServeOptions
from dreambooth.errors import UserError
from dreambooth.models.tiny_families import build_model
from dreambooth.serving.app import create_app
from dreambooth.serving.command import build_service
from dreambooth.serving.renderer import flux_embeddings, sd3_embeddings
from dreambooth.serving.service import RenderBody

# Words the tiny T5 tokenizer has no piece for are spelled a letter a token (75 for this), the tiny CLIP tokenizer's
# in some fewer (60): "a photo of sks dog, on a beach" and two of these are 162 T5 tokens and 133 CLIP ones.
LONG_WORD = "zqxv wkjh pfgt " * 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-serve")
    return {size: build_model(root / size, size=size, seed=i) for i, size in
            enumerate(("flux-tiny", "flux-schnell-tiny", "sd3-tiny"))}


@pytest.fixture(scope="module")
def loras(models, tiny_model, tmp_path_factory):
    """A LoRA of each family, two steps at a learning rate that makes them show (up to 16 levels on Flux)."""
    from dreambooth.cli import main

    root = tmp_path_factory.mktemp("flow-loras")
    photos = photo_folder(root / "photos", 3)
    for name, model in (("flux", models["flux-tiny"]), ("sd3", models["sd3-tiny"]), ("sd", tiny_model)):
        argv = train_argv(model, photos, root / name, "--method", "lora", "--learning_rate", "1e-2", steps=2)
        assert main(argv) == 0
    return {name: root / name for name in ("flux", "sd3", "sd")}


def character(name, model, **fields):
    return {"name": name, "model": str(model), "identifier": "sks", "class_word": "dog", "width": 64, "height": 64,
            **fields}


@pytest.fixture(scope="module")
def served(models, loras, tmp_path_factory):
    """One service: a Flux.1 dev LoRA character and a plain one on the same model, an SD3 LoRA character with a
    negative prompt, and a Flux.1 schnell character at its family's defaults; keyless, so every caller is an
    operator. On the CPU in fp32 wherever the suite runs, as `generate` draws the pictures compared with its."""
    folder = tmp_path_factory.mktemp("flow-served")
    flux, sd3, schnell = models["flux-tiny"], models["sd3-tiny"], models["flux-schnell-tiny"]
    entries = [character("rex", flux, loras=[{"file": str(loras["flux"])}], steps=2),
               character("plain", flux, steps=2),
               character("ada", sd3, loras=[{"file": str(loras["sd3"])}], steps=2, negative_prompt="blurry"),
               character("quick", schnell)]
    path = characters_file(folder, flux, entries)
    service = build_service(path, ServeOptions(characters=path, no_cache=True, batch_window_ms=1,
                                                rate_per_minute=0, device="cpu", precision="fp32"))
    with TestClient(create_app(service, [], auth=False)) as client:
        yield service, client


def rendered(client, body) -> tuple[dict, Image.Image]:
    answer = client.post("/v1/render", json={**body, "format": "json"})
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    return answer, Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["png_base64"])))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------------------ drawing
def test_flux_and_sd3_lora_characters_render_with_their_character_and_model_hash(served):
    service, client = served
    for name, lora in (("rex", "flux"), ("ada", "sd3")):
        answer, image = rendered(client, {"character": name, "state": {"location": "beach"}, "seed": 3})
        assert image.size == (64, 64)
        recorded = json.loads(image.info["dreambooth"])
        assert recorded["character"] == name and recorded["prompt"] == "a photo of sks dog, on a beach"
        assert f"Model: {name} ({service.renderer.model_hash(name)})" in image.info["parameters"]
        assert image.info["parameters"].endswith(f"Lora: {lora}:1")
    assert recorded["negative_prompt"] == "blurry"  # SD3 takes one
    listed = {c["name"]: c for c in client.get("/v1/characters").json()["characters"]}
    assert (listed["rex"]["guidance"], listed["rex"]["scheduler"]) == (3.5, "FlowMatchEulerDiscreteScheduler")
    assert listed["ada"]["guidance"] == 7.0


def test_a_flux_lora_character_draws_what_generate_draws_and_its_lora_shows(served, models, loras):
    """A state without weights is the pipeline call `dreambooth generate` makes (Flux.1 dev: T5 at 512, as
    FluxPipeline's default); the same model without the LoRA (a character on the same pipeline) draws otherwise."""
    from pathlib import Path

    from dreambooth.formats.lora_loading import load_loras
    from dreambooth.generate import GenerationSettings, generate_images
    from dreambooth.models.loading import load_pipeline

    service, client = served
    answer, image = rendered(client, {"character": "rex", "state": {"location": "forest"}, "seed": 5})
    _, without = rendered(client, {"character": "plain", "state": {"location": "forest"}, "seed": 5})
    pipe = load_pipeline(models["flux-tiny"], device=torch.device("cpu"), dtype=torch.float32)
    load_loras(pipe, [(Path(loras["flux"]), 1.0)], model=models["flux-tiny"])
    request = answer["request"]
    fresh, _ = generate_images(pipe, GenerationSettings(prompts=[request["prompt"]], seeds=[5], steps=2,
                                                        height=64, width=64))[0]
    assert np.abs(pixels(image) - pixels(fresh)).max() <= 1
    assert np.abs(pixels(image) - pixels(without)).max() > 2


def test_unset_steps_guidance_and_sampler_are_the_familys(served, models, tmp_path):
    """Flux.1 schnell draws in 4 steps without guidance, dev at 28 and 3.5, SD3 at 28 and 7.0 (Behaviour.
    draw_defaults, as `generate`), with the model's own sampler; what a character sets is kept."""
    from dreambooth.characters.character import load_characters

    entries = [character("dev", models["flux-tiny"]), character("fast", models["flux-schnell-tiny"]),
               character("three", models["sd3-tiny"]), character("own", models["flux-schnell-tiny"], steps=6)]
    loaded = load_characters(characters_file(tmp_path, models["flux-tiny"], entries))
    got = {name: (c.steps, c.guidance, c.scheduler) for name, c in loaded.items()}
    own = "FlowMatchEulerDiscreteScheduler"
    assert got == {"dev": (28, 3.5, own), "fast": (4, 0.0, own), "three": (28, 7.0, own), "own": (6, 0.0, own)}
    service, client = served
    assert service.renderer.draw_defaults("quick") == {"steps": 4, "guidance": 0.0,
                                                       "scheduler": "FlowMatchEulerDiscreteScheduler"}
    answer, image = rendered(client, {"character": "quick", "state": {}})
    recorded = json.loads(image.info["dreambooth"])
    assert (recorded["steps"], recorded["guidance"]) == (4, 0.0) and answer["request"]["steps"] == 4


# ------------------------------------------------------------------------------------------------ weighting
def emotion_positions(tokenizer, request, start: int) -> list[int]:
    """Where the last fragment (the emotion) sits in the encoder's tokens: after the identity's `start` tokens, up
    to the end token."""
    return list(range(start, len(tokenizer(request.prompt).input_ids) - 1))


@pytest.mark.numerics
@pytest.mark.parametrize("intensity", [1.0, 0.0])
def test_flux_weights_t5s_hidden_states_as_compel_weights_clips(served, intensity):
    """An emotion's weight w (1.3 at intensity 1, 0.7 at 0) moves its T5 tokens' states from the empty prompt's,
    `empty + (z - empty) * w`, and leaves every other token's; under 1 the prompt is also blended, by tan((1 - w) *
    pi / 2), with itself encoded with the fragment masked out of attention (and weighted so). With weights of 1.0 the
    states are the pipeline's own, bit for bit (the same tokens; a mask of ones adds zeros to T5's position bias);
    the pooled CLIP embedding is the plain prompt's."""
    service, _ = served
    slot = service.renderer.drawn["rex"].slot
    pipe, length = slot.pipe, slot.budget.sequence_length
    request = service.compile(RenderBody(character="rex", state=CharacterState(emotion="angry",
                                                                              intensity=intensity)), False)
    weight = request.fragments[-1]["weight"]
    assert weight == (1.3 if intensity else 0.7) and length == 512
    unit = dataclasses.replace(request, fragments=[{**part, "weight": 1.0} for part in request.fragments])
    with torch.inference_mode():
        plain, pooled, _ = pipe.encode_prompt(prompt=[request.prompt], prompt_2=None, max_sequence_length=length)
        assert torch.equal(flux_embeddings(pipe, [unit], {}, "cpu", length)["prompt_embeds"], plain)
        got = flux_embeddings(pipe, [request], {}, "cpu", length)
        ids = pipe.tokenizer_2(request.prompt, padding="max_length", max_length=length, return_tensors="pt").input_ids
        z = pipe.text_encoder_2(ids)[0]
        assert torch.equal(z, plain)
        identity = len(pipe.tokenizer_2("a photo of sks dog").input_ids) - 1  # its end token not counted
        fragment = emotion_positions(pipe.tokenizer_2, request, identity)
        empty = pipe.text_encoder_2(pipe.tokenizer_2("", padding="max_length", max_length=length,
                                                     return_tensors="pt").input_ids)[0]

        def weighted(states):
            states = states.clone()
            states[:, fragment] = empty[:, fragment] + (states[:, fragment] - empty[:, fragment]) * weight
            return states

        want = weighted(z)
        if weight < 1:
            mask = torch.ones_like(ids)
            mask[:, fragment] = 0
            blend = math.tan((1 - weight) * math.pi / 2)
            want = (want + blend * weighted(pipe.text_encoder_2(ids, attention_mask=mask)[0])) / (1 + blend)
    assert torch.allclose(got["prompt_embeds"], want, atol=1e-5)
    assert torch.equal(got["pooled_prompt_embeds"], pooled)
    changed = ((got["prompt_embeds"] - plain).abs().amax(-1)[0] > 1e-4).nonzero().flatten().tolist()
    assert changed == fragment if weight > 1 else len(changed) > len(fragment)


@pytest.mark.numerics
def test_sd3_weights_both_clips_and_t5_where_the_fragment_is(served):
    """SD3's conditioning is both CLIPs' states (77 positions) then T5's: an emotion at 1.3 changes its own tokens in
    each part and nothing else; at 1.0 it is the pipeline's own encoding (CLIP given a mask of ones may take another
    attention kernel than CLIP given none: equal up to rounding)."""
    service, _ = served
    slot = service.renderer.drawn["ada"].slot
    pipe, length = slot.pipe, slot.budget.sequence_length
    request = service.compile(RenderBody(character="ada", state=CharacterState(emotion="angry", intensity=1.0)),
                              False)
    unit = dataclasses.replace(request, fragments=[{**part, "weight": 1.0} for part in request.fragments])
    with torch.inference_mode():
        plain = pipe.encode_prompt(prompt=[request.prompt], prompt_2=None, prompt_3=None, negative_prompt=["blurry"],
                                   do_classifier_free_guidance=True, max_sequence_length=length)
        same = sd3_embeddings(pipe, [unit], {}, "cpu", length)["prompt_embeds"]
        assert torch.allclose(same, plain[0], atol=1e-6)
        got = sd3_embeddings(pipe, [request], {}, "cpu", length)
    identity = "a photo of sks dog"
    clip = emotion_positions(pipe.tokenizer, request, len(pipe.tokenizer(identity).input_ids) - 1)
    t5 = emotion_positions(pipe.tokenizer_3, request, len(pipe.tokenizer_3(identity).input_ids) - 1)
    changed = ((got["prompt_embeds"] - plain[0]).abs().amax(-1)[0] > 1e-4).nonzero().flatten().tolist()
    assert length == 256 and changed == clip + [77 + i for i in t5]
    for key, index in (("negative_prompt_embeds", 1), ("pooled_prompt_embeds", 2),
                       ("negative_pooled_prompt_embeds", 3)):
        assert torch.equal(got[key], plain[index]), key


@pytest.mark.parametrize("name", ["rex", "ada"])
def test_a_weighted_state_changes_the_picture_and_weights_of_one_draw_the_plain_prompt(served, name):
    service, _ = served
    weighted = service.compile(RenderBody(character=name, state={"emotion": "angry", "intensity": 1.0}, seed=2),
                               False)
    unit = dataclasses.replace(weighted, fragments=[{**p, "weight": 1.0} for p in weighted.fragments])
    forced = dataclasses.replace(unit, fragments=[*unit.fragments[:-1], {**unit.fragments[-1], "weight": 1 + 1e-9}])
    plain, through_weighting, strong = (pixels(Image.open(io.BytesIO(service.renderer.render([r])[0])))
                                        for r in (unit, forced, weighted))
    assert np.abs(plain - through_weighting).max() <= 1
    assert np.abs(strong - plain).max() > 0


# ------------------------------------------------------------------------------------------------ token limits
def test_the_prompt_keeps_t5s_length_and_the_identity_clips(served, tiny_model):
    """Flux.1 dev keeps a prompt of 162 T5 tokens (133 CLIP ones: SD would drop fragments) whole and draws it;
    schnell's T5 reads 256, so a longer state loses its lowest fragments; a raw prompt is refused past T5's length,
    naming it, and taken past CLIP's."""
    from transformers import CLIPTokenizer

    from dreambooth.characters.compiler import compile_prompt, token_counter

    service, client = served
    state = {"location": "beach", "extra": [LONG_WORD, LONG_WORD]}
    dev = client.post("/v1/compile", json={"character": "plain", "state": state}).json()["request"]
    t5, clip = (getattr(service.renderer.drawn["plain"].slot.pipe, name) for name in ("tokenizer_2", "tokenizer"))
    assert dev["dropped"] == [] and dev["tokens"] == len(t5(dev["prompt"]).input_ids) == 162
    assert len(clip(dev["prompt"]).input_ids) == 133  # CLIP reads its first 77
    sd_character = service.characters["plain"].model_copy(update={"model": str(tiny_model)})
    count = token_counter(CLIPTokenizer.from_pretrained(tiny_model / "tokenizer"))
    assert compile_prompt(sd_character, CharacterState(**state), count_tokens=count).dropped  # SD: 77 at most
    answer, image = rendered(client, {"character": "plain", "state": state})
    assert json.loads(image.info["dreambooth"])["prompt"] == dev["prompt"]

    many = {**state, "extra": [LONG_WORD] * 4}
    quick = client.post("/v1/compile", json={"character": "quick", "state": many}).json()["request"]
    assert quick["dropped"] and quick["tokens"] <= 256 and quick["prompt"].startswith("a photo of sks dog, on a beach")

    taken = client.post("/v1/compile", json={"character": "plain", "prompt": "a photo of sks dog " * 20})
    assert taken.status_code == 200 and taken.json()["request"]["tokens"] == 101
    long = client.post("/v1/compile", json={"character": "plain", "prompt": "a photo of sks dog " + LONG_WORD * 8})
    assert long.status_code == 422 and long.json()["error"]["code"] == "prompt_too_long"
    tokens = re.search(r"`prompt` is (\d+) tokens; its T5 text encoder reads 512", long.json()["error"]["message"])
    assert int(tokens.group(1)) > 512


def test_compile_prompt_counts_a_flux_prompt_with_t5_and_its_identity_with_clip(models, tmp_path, capsys):
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"location": "beach", "extra": [LONG_WORD, LONG_WORD]}))
    wordy = "{identifier} {class_word} " + LONG_WORD * 2
    path = characters_file(tmp_path, models["flux-tiny"], [character("rex", models["flux-tiny"]),
                                                           character("wordy", models["flux-tiny"],
                                                                     prompt_template=wordy)])
    out = cli_run(capsys, "compile-prompt", "--characters", path, "--character", "rex", "--state", state)
    record = json.loads(out)
    assert record["dropped"] == [] and record["tokens"] == 162 and record["steps"] == 28
    err = cli_run(capsys, "compile-prompt", "--characters", path, "--character", "wordy", "--state", state, code=2)
    assert "character wordy: its prompt_template alone takes" in err and "more than the 77 CLIP reads" in err


# ------------------------------------------------------------------------------------------------ refusals
def test_serve_refuses_flux_characters_it_would_draw_otherwise_than_written(models, loras, tmp_path, capsys):
    """At start-up, in one message: a Flux.1 negative prompt (its pipeline would ignore it), a side off the
    16-pixel grid, an identity longer than CLIP's 77 (T5 would read it whole, CLIP's pooled embedding not)."""
    from dreambooth.cli import main

    flux, lora = models["flux-tiny"], [{"file": str(loras["flux"])}]
    entries = [character("grumpy", flux, loras=lora, negative_prompt="blurry, lowres"),
               character("wide", flux, loras=lora, width=72),
               character("wordy", flux, prompt_template="{identifier} {class_word} " + LONG_WORD * 2),
               character("fine", flux, loras=lora, negative_prompt=None)]
    path = characters_file(tmp_path, flux, entries)
    capsys.readouterr()
    assert main(["serve", "--characters", str(path), "--port", "0", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 character(s) of") and "Traceback" not in err
    lines = {line.split(":")[0].strip(): line for line in err.splitlines()[1:]}
    assert sorted(lines) == ["grumpy", "wide", "wordy"], err
    assert "its negative_prompt: Flux.1 draws without a negative prompt (its pipeline would ignore it, not use it): " \
        "remove negative_prompt" in lines["grumpy"]
    assert "its width 72 is not a multiple of 16" in lines["wide"] and "set its width to 64 or 80" in lines["wide"]
    assert "its prompt_template makes" in lines["wordy"] and "more than its text encoder's 77 (CLIP)" in lines["wordy"]


def test_requests_a_flux_model_cannot_draw_as_asked_are_refused(served):
    service, client = served
    negative = client.post("/v1/compile", json={"character": "rex", "negative_prompt": "blurry"})
    assert negative.status_code == 422 and negative.json()["error"]["code"] == "invalid_request"
    assert "Flux.1 draws without a negative prompt" in negative.json()["error"]["message"]
    assert client.post("/v1/compile", json={"character": "ada", "negative_prompt": "blurry"}).status_code == 200
    odd = client.post("/v1/compile", json={"character": "rex", "width": 72})
    assert odd.status_code == 422 and "width 72 is not a multiple of 16" in odd.json()["error"]["message"]
    assert client.post("/v1/compile", json={"character": "rex", "width": 80}).status_code == 200


@pytest.mark.parametrize("model, lora, what", [
    ("flux-tiny", "sd", "a UNet LoRA (SD 1.x/2.x or SDXL)"),
    ("tiny", "flux", "a Flux.1 LoRA"),
    ("sd3-tiny", "flux", "a Flux.1 LoRA"),
    ("flux-tiny", "sd3", "an SD3 LoRA"),
])
def test_a_lora_character_of_another_family_is_refused_before_any_model_loads(models, loras, tiny_model, model,
                                                                              lora, what, tmp_path, monkeypatch):
    from dreambooth.serving import renderer

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the LoRA was checked")

    monkeypatch.setattr(renderer, "load_pipeline", no_loading)
    base = tiny_model if model == "tiny" else models[model]
    path = characters_file(tmp_path, base, [character("mixed", base, loras=[{"file": str(loras[lora])}])])
    with pytest.raises(UserError) as refused:
        build_service(path, ServeOptions(characters=path, no_cache=True))
    assert f"is {what} and cannot be applied to {base}" in str(refused.value)
    assert "character mixed's model" in str(refused.value)


def test_init_for_a_flux_model_writes_a_character_its_family_draws(models, tmp_path, capsys, monkeypatch):
    """`dreambooth init --model FLUX` leaves steps, guidance and sampler to the family and writes no negative prompt
    (Flux's pipeline draws without one), so compile-prompt takes its character as written."""
    import yaml

    monkeypatch.chdir(tmp_path)
    cli_run(capsys, "init", "p", "--model", models["flux-tiny"], "--identifier", "sks", "--class-word", "dog")
    written = yaml.safe_load((tmp_path / "p" / "characters.yaml").read_text())["characters"][0]
    assert written["negative_prompt"] is None and written["steps"] is None and written["scheduler"] is None
    written["model"] = str(models["flux-tiny"])  # the run's output folder stands in: the base model
    (tmp_path / "p" / "characters.yaml").write_text(yaml.safe_dump({"characters": [written]}))
    state = tmp_path / "state.json"
    state.write_text("{}")
    record = json.loads(cli_run(capsys, "compile-prompt", "--characters", tmp_path / "p" / "characters.yaml",
                                "--character", "sks", "--state", state))
    assert record["steps"] == 28 and record["negative_prompt"] in ("", None)
