"""Adapter kinds beyond LoRA (`--adapter dora|lokr|loha`), end to end on the tiny models, each read back by a reader
that is not ours: DoRA by stock diffusers' `load_lora_weights` (SD 1.x, Flux, SD3), LoKr and LoHa by lycoris-lora
(LyCORIS' reference implementation, the layout A1111 and ComfyUI read; SD 1.x and SDXL). Each reader's model must
compute what the trained model computes; a checkpoint resumes bit for bit; `export --merge-lora` bakes each in; the
formats that cannot hold one refuse it, naming what works, and what they suggest runs.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_picture, photo_folder
from safetensors import safe_open
from safetensors.torch import load_file
from test_advice import as_argv, cli_run, passes_preflight, suggested, train_argv

from dreambooth.config_file import load_config
from dreambooth.models.base import LORA_FILE
from dreambooth.models.tiny_families import build_model
from dreambooth.training import loop as train_module

PROMPT = "a photo of sks dog"
# rank 2 and alpha 3: a scale of 1.5 that every reader must apply; at rank 2 the tiny UNet's 16-wide LoKr layers keep
# both factors whole (LyCORIS then reads no alpha: the scale is folded in) and its 32-wide ones split the second
LORA = {"model.method": "lora", "lora.rank": 2, "lora.alpha": 3, "model.train_text_encoder": True}


def trained(values: dict):
    """Trains with the dotted config `values`; returns the run (its models as training left them)."""
    seen = {}
    real = train_module.loop

    def loop(run, start, stop):
        seen["run"] = run
        return real(run, start, stop)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "loop", loop)
        train_module.train(load_config(None, values))
    return seen["run"]


def run_values(model, photos, out, **extra) -> dict:
    return {"model.pretrained_model": str(model), "dataset.instance_dir": str(photos),
            "dataset.instance_prompt": PROMPT, "training.resolution": 64, "training.max_train_steps": 3,
            "training.learning_rate": 2e-2,
            "training.seed": 0, "output.output_dir": str(out), "output.report_to": "none",
            "output.checkpointing_steps": 100, **LORA, **extra}


def parts(run) -> dict[str, torch.nn.Module]:
    """The trained denoiser and text encoders by component name, as training left them."""
    from dreambooth.training.outputs import unwrapped

    return {name: module.eval() for name, module in unwrapped(run).items() if name != "text_encoder_3"}


def adapted_layers(module) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def computes_as_trained(ours: dict[str, torch.nn.Module], theirs: dict[str, torch.nn.Module]) -> float:
    """Each adapted layer of the trained modules (by component) against the layer of that path in a reader's modules,
    on one random input; returns the largest change the adapters make, so that a caller can check they matter."""
    generator, biggest = torch.Generator().manual_seed(0), 0.0
    for name, module in ours.items():
        found = dict(theirs[name].named_modules())
        for path, layer in adapted_layers(module).items():
            base = layer.get_base_layer()
            x = torch.randn(3, base.in_features, generator=generator)
            with torch.no_grad():
                want = layer(x)
                torch.testing.assert_close(found[path](x), want, rtol=1e-5, atol=1e-5, msg=f"{name}.{path}")
                biggest = max(biggest, float((want - base(x)).abs().max()))
    return biggest


def unet_output(unet, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 7, width, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, text).sample


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("photos") / "instance", 2)


@pytest.fixture(scope="module", params=["dora", "lokr", "loha"])
def adapter_run(request, tiny_model, photos, tmp_path_factory):
    """A finished run of each adapter kind on SD 1.x, UNet and text encoder, with its trained modules."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    run = trained(run_values(tiny_model, photos, out, **{"lora.adapter": request.param}))
    return request.param, out, run


def lycoris_client(file, unet, encoders: list):
    """LyCORIS' own kohya-style loader (what sd-scripts and A1111's LyCORIS extension use) putting `file`'s layers on
    `unet` and the text encoders, matching layers by name alone; returns how many it placed. Its default preset would
    first put modules of its own on the model; emptied, it builds only what the file holds. An encoder is reached
    from `text_model`, the root A1111 names CLIP by (transformers 5's CLIPTextModel dropped it; its
    CLIPTextModelWithProjection keeps it).

    Its forward path is the reference (what LyCORIS trains and draws with); lycoris-lora 4.1.3's `merge_to` applies a
    LoKr layer's alpha / rank twice (`get_diff_weight` scales what `get_weight` scaled already), which A1111 and
    ComfyUI do not."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
    from lycoris.logging import logger

    class Rooted(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.text_model = encoder

    with pytest.MonkeyPatch.context() as mp:
        # its logger writes to the stdout it found at import, which the test that imported it has closed since
        mp.setattr(logger, "disabled", True)
        for name in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
                     "TEXT_ENCODER_TARGET_REPLACE_NAME"):
            mp.setattr(LycorisNetworkKohya, name, [])
        rooted = [e if hasattr(e, "text_model") else Rooted(e) for e in encoders]
        weights = load_file(str(file)) if not isinstance(file, dict) else file
        network, _ = create_network_from_weights(1.0, None, None, rooted if len(rooted) > 1 else rooted[0], unet,
                                                 weights_sd=weights)
        network.apply_to(rooted, unet, apply_text_encoder=True, apply_unet=True)
    return len(network.unet_loras) + len(network.text_encoder_loras)


# ----------------------------------------------------------------------------------- SD 1.x: each kind's reader


@pytest.mark.numerics
def test_each_kind_is_read_by_its_users_reader_as_it_was_trained(adapter_run, tiny_model):
    from diffusers import StableDiffusionPipeline

    kind, out, run = adapter_run
    ours = parts(run)
    count = {name: len(adapted_layers(m)) for name, m in ours.items()}
    with safe_open(str(out / LORA_FILE), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["dreambooth.adapter"] == kind
    assert json.loads((out / "run_info.json").read_text())["adapter"] == kind
    assert f"# DreamBooth {dict(dora='DoRA', lokr='LoKr', loha='LoHa')[kind]}:" in (out / "README.md").read_text()
    fresh = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    if kind == "dora":
        assert any(k.startswith("unet.") and k.endswith("lora_magnitude_vector") for k in keys)
        fresh.load_lora_weights(out)  # stock diffusers
    else:
        suffix = "lokr_w1" if kind == "lokr" else "hada_w1_a"
        assert f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.{suffix}" in keys
        assert f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{suffix}" in keys
        if kind == "lokr":  # both forms: whole factors (alpha folded in) and a split second factor
            assert {"lokr_w2", "lokr_w2_a"} <= {k.rpartition(".")[2] for k in keys}
        assert lycoris_client(out / LORA_FILE, fresh.unet, [fresh.text_encoder]) == sum(count.values())
    assert computes_as_trained(ours, {"unet": fresh.unet, "text_encoder": fresh.text_encoder}) > 1e-3
    torch.testing.assert_close(unet_output(fresh.unet, 32), unet_output(ours["unet"], 32), rtol=1e-5, atol=1e-5)


@pytest.mark.numerics
def test_each_kind_merges_into_a_plain_model_that_computes_what_it_trained(adapter_run, tiny_model, tmp_path,
                                                                           capsys):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    kind, out, run = adapter_run
    ours = parts(run)
    merged = tmp_path / "merged"
    cli_run(capsys, "export", tiny_model, "--merge-lora", out, "--format", "diffusers", "--out", merged)
    unet = UNet2DConditionModel.from_pretrained(merged / "unet")
    encoder = CLIPTextModel.from_pretrained(merged / "text_encoder")
    assert not any("lora_" in k or "lokr_" in k or "hada_" in k for k in unet.state_dict())
    torch.testing.assert_close(unet_output(unet, 32), unet_output(ours["unet"], 32), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[49406, 320, 1125, 539, 49407]]) % encoder.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids)[0], ours["text_encoder"](ids)[0], rtol=1e-5, atol=1e-5)
    # `generate --lora` draws with the adapter what the merged model draws
    for model, loras, folder in ((tiny_model, ["--lora", out], "with-lora"), (merged, [], "merged-shots")):
        cli_run(capsys, "generate", "--model", model, *loras, "--prompt", PROMPT, "--steps", "2", "--out",
                tmp_path / folder)
    from PIL import Image

    shots = [Image.open(next((tmp_path / f).glob("0000-*.png"))) for f in ("with-lora", "merged-shots")]
    assert_same_picture(*shots)


def test_a_lycoris_file_goes_to_kohya_as_it_is_and_has_no_diffusers_form(adapter_run, tiny_model, tmp_path, capsys):
    kind, out, _ = adapter_run
    target = tmp_path / "k.safetensors"
    if kind == "dora":
        err = cli_run(capsys, "export", out, "--format", "kohya", "--out", target, code=2)
        assert "uses DoRA, which the kohya/A1111 LoRA format cannot express" in err and not target.exists()
        cli_run(capsys, "export", out, "--format", "diffusers", "--out", tmp_path / "d.safetensors")
        return
    cli_run(capsys, "export", out, "--format", "kohya", "--out", target)
    want, got = load_file(str(out / LORA_FILE)), load_file(str(target))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    err = cli_run(capsys, "export", out, "--format", "diffusers", "--out", tmp_path / "d", code=2)
    assert "which diffusers' LoRA format cannot hold" in err and not (tmp_path / "d").exists()
    (command,) = suggested(err)
    cli_run(capsys, *as_argv(command, BASE_MODEL=str(tiny_model), DIR=str(tmp_path / "baked")))
    assert (tmp_path / "baked" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_the_model_card_of_a_lycoris_run_names_commands_that_run(adapter_run, tiny_model, tmp_path, capsys):
    kind, out, _ = adapter_run
    card = (out / "README.md").read_text()
    if kind == "dora":
        assert "pipe.load_lora_weights" in card
        return
    assert "LyCORIS' layout" in card and "load_lora_weights does not read it" in card
    generate, export = suggested(card)
    fill = {"BASE": str(tiny_model), "PATH_TO_THIS_FOLDER": str(out), "PROMPT": "sks", "DIR": str(tmp_path / "m")}
    cli_run(capsys, *as_argv(generate.replace("--prompt PROMPT", "--prompt PROMPT --steps 1 --out OUT"), OUT=str(
        tmp_path / "shots"), **fill))
    cli_run(capsys, *as_argv(export, **fill))
    assert (tmp_path / "m" / "model_index.json").is_file()


# ------------------------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_each_kind_resumes_bit_for_bit(kind, tiny_model, photos, tmp_path, monkeypatch):
    from conftest import interrupt_after

    from dreambooth.errors import TrainingStopped

    extra = {"lora.adapter": kind, "training.max_train_steps": 4, "dataset.random_flip": True}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_module.train(load_config(None, run_values(tiny_model, photos, straight, **extra)))
    interrupt_after(monkeypatch, calls=2)
    with pytest.raises(TrainingStopped, match="stopped at step 2"):
        train_module.train(load_config(None, run_values(tiny_model, photos, stopped, **extra)))
    monkeypatch.undo()
    train_module.train(load_config(None, run_values(tiny_model, photos, stopped, **extra,
                                                    **{"output.resume_from_checkpoint": "latest"})))
    a, b = load_file(str(straight / LORA_FILE)), load_file(str(stopped / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (stopped / "checkpoint-2" / "adapter_state.safetensors").is_file() == (kind != "dora")


def test_a_checkpoint_of_another_adapter_kind_is_refused(tiny_model, photos, tmp_path):
    from dreambooth.errors import UserError

    out = tmp_path / "run"
    values = run_values(tiny_model, photos, out, **{"lora.adapter": "lokr", "training.max_train_steps": 2,
                                                    "output.checkpointing_steps": 2})
    train_module.train(load_config(None, values))
    values.update({"lora.adapter": "loha", "training.max_train_steps": 3, "output.resume_from_checkpoint": "latest"})
    with pytest.raises(UserError, match="adapter"):
        train_module.train(load_config(None, values))


# ------------------------------------------------------------------------------------------------------ SDXL


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("xl") / "model", size="sdxl-tiny", seed=2)


def diffusers_unet_names(weights: dict, unet_config) -> dict:
    """A LyCORIS SDXL file's keys with the UNet's SGM names turned into diffusers' module names by diffusers' own kohya
    reader (its SGM block map, its kohya key converter, its old-to-peft names), so that LyCORIS' loader finds them in
    a diffusers UNet: a reading of the names that is not ours."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = _maybe_map_sgm_blocks_to_diffusers({k: v for k, v in weights.items() if k.startswith("lora_unet_")},
                                              unet_config)
    renamed = {}
    for key, value in unet.items():
        layer, _, tensor = key.partition(".")
        (module,) = convert_unet_state_dict_to_peft({_convert_unet_lora_key(f"{layer}.lora_down.weight"): None})
        renamed[f"lora_unet_{module.removesuffix('.lora_A.weight').replace('.', '_')}.{tensor}"] = value
    return {**renamed, **{k: v for k, v in weights.items() if not k.startswith("lora_unet_")}}


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_sdxl_lycoris_files_name_sgm_blocks_and_both_encoders_and_read_as_trained(kind, xl_model, photos, tmp_path,
                                                                                  capsys):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    run = trained(run_values(xl_model, photos, out, **{"lora.adapter": kind}))
    ours = parts(run)
    keys = list(load_file(str(out / LORA_FILE)))
    layers = {k.partition(".")[0] for k in keys}
    assert any(n.startswith("lora_unet_input_blocks_") for n in layers) and \
        any(n.startswith("lora_unet_output_blocks_") for n in layers)
    assert any(n.startswith("lora_te1_text_model_") for n in layers)
    assert any(n.startswith("lora_te2_text_model_") for n in layers)
    fresh = StableDiffusionXLPipeline.from_pretrained(xl_model)
    weights = diffusers_unet_names(load_file(str(out / LORA_FILE)), fresh.unet.config)
    total = sum(len(adapted_layers(m)) for m in ours.values())
    assert lycoris_client(weights, fresh.unet, [fresh.text_encoder, fresh.text_encoder_2]) == total
    assert computes_as_trained(ours, {name: getattr(fresh, name) for name in ours}) > 1e-3
    # our own reader (generate, serve, merge) reads the SGM names back
    merged = tmp_path / "merged"
    cli_run(capsys, "export", xl_model, "--merge-lora", out, "--format", "diffusers", "--out", merged)
    baked = StableDiffusionXLPipeline.from_pretrained(merged)
    computes_as_trained(ours, {name: getattr(baked, name) for name in ours})


# ----------------------------------------------------------------------------------------------- Flux and SD3


@pytest.mark.numerics
@pytest.mark.parametrize("size", ["flux-tiny", "sd3-tiny"])
def test_flow_dora_is_read_by_stock_diffusers_as_trained(size, photos, tmp_path):
    import diffusers

    model = build_model(tmp_path / "model", size=size, seed=3)
    out = tmp_path / "run"
    run = trained(run_values(model, photos, out, **{"lora.adapter": "dora", "training.max_train_steps": 2}))
    ours = parts(run)
    pipeline = getattr(diffusers, run.models.family.pipeline)
    pipe = pipeline.from_pretrained(model)
    pipe.load_lora_weights(out)  # stock diffusers
    keys = list(load_file(str(out / LORA_FILE)))
    assert any(k.startswith("transformer.") and k.endswith("lora_magnitude_vector") for k in keys)
    ours = {name: module for name, module in ours.items() if adapted_layers(module)}
    assert computes_as_trained(ours, {name: getattr(pipe, name) for name in ours}) > 1e-4


def test_lycoris_kinds_on_flux_are_refused_at_preflight_naming_what_works(photos, tmp_path, capsys, monkeypatch):
    model = build_model(tmp_path / "model", size="flux-tiny", seed=3)
    argv = [*train_argv(model, photos, tmp_path / "out"), "--method", "lora", "--adapter", "lokr"]
    err = cli_run(capsys, *argv, code=2)
    assert "use --adapter lora or --adapter dora" in err and not (tmp_path / "out").exists()
    passes_preflight(capsys, monkeypatch, *argv[:-1], "dora")


def test_a_flux_dora_is_refused_by_the_kohya_export_and_copied_by_the_diffusers_one(photos, tmp_path, capsys):
    model = build_model(tmp_path / "model", size="flux-tiny", seed=3)
    out = tmp_path / "run"
    cli_run(capsys, *train_argv(model, photos, out, "--method", "lora", "--use_dora", steps=1))
    err = cli_run(capsys, "export", out, "--format", "kohya", "--out", tmp_path / "k.safetensors", code=2)
    assert "uses DoRA, which the kohya format cannot express. Export it with --format diffusers" in err
    cli_run(capsys, "export", out, "--format", "diffusers", "--out", tmp_path / "d.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(str(tmp_path / "d.safetensors")))
    # and merged into the transformer's single file (ComfyUI's Load Diffusion Model), as a LoRA is
    merged, plain = tmp_path / "merged.safetensors", tmp_path / "plain.safetensors"
    cli_run(capsys, "export", model, "--merge-lora", out, "--format", "single-file", "--out", merged)
    cli_run(capsys, "export", model, "--format", "single-file", "--out", plain)
    merged, plain = load_file(str(merged)), load_file(str(plain))
    changed = {k for k in plain if not torch.equal(plain[k], merged[k])}
    assert merged.keys() == plain.keys() and changed and all(k.endswith(".weight") for k in changed)


# ------------------------------------------------------------------------------------------- settings refused


def test_adapter_settings_that_mean_nothing_are_refused_and_the_named_flags_work(tiny_model, photos, tmp_path, capsys,
                                                                                 monkeypatch):
    cases = [  # (flags given, what the refusal says, the flags that then pass)
        (["--adapter", "lokr"], "pass --method lora with it, or drop --adapter", ["--method", "lora", "--adapter",
                                                                               "lokr"]),
        (["--method", "lora", "--adapter", "loha", "--lokr_factor", "4"], "drop --lokr_factor, or pass --adapter lokr",
         ["--method", "lora", "--adapter", "lokr", "--lokr_factor", "4"]),
        (["--method", "lora", "--adapter", "loha", "--lora_dropout", "0.1"], "drop --lora_dropout",
         ["--method", "lora", "--adapter", "loha"]),
        (["--method", "lora", "--use_dora", "--adapter", "lokr"], "--use_dora asks for DoRA adapters, and --adapter "
         "lokr for another kind; pass one of them", ["--method", "lora", "--use_dora"]),
        (["--method", "lora", "--adapter", "lokr", "--lora_target", "proj_in"], "use --adapter lora for "
         "convolutions", ["--method", "lora", "--lora_target", "proj_in"]),
    ]
    for i, (given, says, works) in enumerate(cases):
        out = tmp_path / f"out{i}"
        base = train_argv(tiny_model, photos, out)
        err = cli_run(capsys, *base, *given, code=2)
        assert says in err, err
        assert not out.exists()  # refused before anything was written
        passes_preflight(capsys, monkeypatch, *base, *works)


# ------------------------------------------------------------------------------------------- mixing with LoRAs


@pytest.mark.numerics
def test_a_lokr_and_a_lora_mix_in_one_pipeline_at_their_weights(tiny_model, photos, tmp_path):
    """The service keeps several characters' adapters on one pipeline and switches their weights per batch: a LoKr
    loaded beside a LoRA (peft wraps the layer twice) draws at weight 0 for the LoRA what it draws alone."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from dreambooth.formats.lora_loading import load_loras

    runs = {}
    for kind in ("lora", "lokr"):
        runs[kind] = tmp_path / kind
        values = run_values(tiny_model, photos, runs[kind], **{"lora.adapter": kind, "training.max_train_steps": 2})
        train_module.train(load_config(None, values))

    def draw(loras):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        load_loras(pipe, loras)
        return pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    alone = draw([(runs["lokr"], 1.0)])
    for order in ((("lora", 0.0), ("lokr", 1.0)), (("lokr", 1.0), ("lora", 0.0))):  # either wraps the other
        np.testing.assert_allclose(draw([(runs[kind], weight) for kind, weight in order]), alone, atol=1e-5)
    assert np.abs(draw([(runs["lora"], 1.0), (runs["lokr"], 1.0)]) - alone).max() > 1e-3
