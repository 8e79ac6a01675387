"""The flow-matching families (Flux.1, SD3) as first-class members: the family read once from model_index.json,
training (LoRA and full) that resumes bitwise, outputs stock diffusers loads, `generate`, every new option wired to
the computation it changes, and the refusals of settings and inputs that mean nothing for a family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import photo_folder
from PIL import Image
from safetensors.torch import load_file
from test_advice import cli_run, passes_preflight, train_argv

from dreambooth.cli import main
from dreambooth.models import families as families_module
from dreambooth.models.base import detect_family
from dreambooth.models.families import FAMILIES, folder_family
from dreambooth.models.tiny_families import build_model


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("flux") / "model", size="flux-tiny", seed=3)


@pytest.fixture(scope="module")
def schnell_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("schnell") / "model", size="flux-schnell-tiny", seed=4)


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("sd3") / "model", size="sd3-tiny", seed=5)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("flow-photos") / "instance", 3)


# ------------------------------------------------------------------------------------------- the family, read once
@pytest.mark.parametrize("size,family", [("tiny", "sd1"), ("sd2-tiny", "sd2"), ("sdxl-tiny", "sdxl"),
                                         ("flux-tiny", "flux"), ("flux-schnell-tiny", "flux"), ("sd3-tiny", "sd3")])
def test_the_family_is_read_from_the_folders_model_index(size, family, tmp_path):
    folder = build_model(tmp_path / size, size=size)
    assert folder_family(folder).name == family
    assert detect_family(folder).name == family


def hub_cache_entry(cache: Path, repo: str, files: dict[str, dict]) -> None:
    """A hub model in huggingface_hub's cache layout (refs/main -> snapshots/<commit>/...), as a download leaves it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, content in files.items():
        path = root / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))


def test_a_hub_ids_family_is_read_from_its_model_index(tmp_path, monkeypatch):
    """models.base.is_sdxl answered False for every hub id, so an SDXL model named by its hub id loaded as SD 1.x;
    the family now comes from the hub's model_index.json (the cache's copy here, offline)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    hub_cache_entry(cache, "org/xl", {"model_index.json": {"_class_name": "StableDiffusionXLPipeline"}})
    hub_cache_entry(cache, "org/flux", {"model_index.json": {"_class_name": "FluxPipeline"}})
    hub_cache_entry(cache, "org/sd2", {"model_index.json": {"_class_name": "StableDiffusionPipeline"},
                                       "text_encoder/config.json": {"hidden_act": "gelu"}})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert detect_family("org/xl").name == "sdxl"
    assert detect_family("org/flux").name == "flux"
    assert detect_family("org/sd2").name == "sd2"
    assert detect_family("org/unknown") is None


def test_no_module_outside_the_family_layer_tells_the_families_apart():
    """The families differ in one place: no module outside models/families tests a folder for a second text
    encoder, a conditioning for being a tuple, or a pipeline's class name for 'XL'."""
    package = Path(families_module.__file__).parents[2]
    smells = ("is_sdxl(", "isinstance(cond, tuple)", "text_encoder_2 is not None", "text_encoder_2 is None",
              "family_of(", '"XL" in')
    found = [f"{path.relative_to(package)}: {smell}" for path in package.rglob("*.py")
             if "families" not in path.parts for smell in smells if smell in path.read_text()]
    # the single-file format writes SDXL's layout when it is given SDXL's second encoder (formats.single_file)
    assert found == ["formats/single_file.py: text_encoder_2 is None"], found


# ------------------------------------------------------------------------------------------- train, resume, load
def flow_argv(model, photos, out, *extra, steps=4):
    return [*train_argv(model, photos, out, "--checkpointing_steps", "2", *extra, steps=steps)]


@pytest.mark.smoke  # .ci/run also runs it against the newest releases the dependency ranges allow
@pytest.mark.parametrize("kind", ["flux-lora", "sd3-full"])
def test_a_flow_run_resumes_to_the_same_weights_and_loads_in_stock_diffusers(kind, flux_model, sd3_model, photos,
                                                                              tmp_path, capsys):
    """Flux LoRA and SD3 full fine-tuning (with its CLIP encoders): stopped at step 2 and resumed, the result is
    bitwise the run that never stopped; the outputs load in stock FluxPipeline / StableDiffusion3Pipeline."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    model, extra = ((flux_model, ["--method", "lora", "--rank", "4"]) if kind == "flux-lora" else
                    (sd3_model, ["--train_text_encoder"]))
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([str(a) for a in flow_argv(model, photos, whole, *extra)]) == 0
    assert main([str(a) for a in flow_argv(model, photos, part, *extra, steps=2)]) == 0
    assert main([str(a) for a in flow_argv(model, photos, part, *extra, "--resume_from_checkpoint", "latest")]) == 0
    capsys.readouterr()
    if kind == "flux-lora":
        a, b = (load_file(str(out / "pytorch_lora_weights.safetensors")) for out in (whole, part))
        assert a.keys() == b.keys() and any(k.startswith("transformer.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a)
        pipe = FluxPipeline.from_pretrained(model)
        pipe.load_lora_weights(whole)
        lora = pipe.transformer
    else:
        for part_name in ("transformer", "text_encoder", "text_encoder_2"):
            a, b = (load_file(str(next((out / part_name).glob("*.safetensors")))) for out in (whole, part))
            assert all(torch.equal(a[k], b[k]) for k in a), part_name
        pipe = StableDiffusion3Pipeline.from_pretrained(whole)
        lora = None
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())
    if lora is not None:
        assert any("lora_A" in n for n, _ in lora.named_parameters())


def test_generate_draws_with_a_flux_lora_at_the_familys_defaults(flux_model, photos, tmp_path, capsys):
    """A Flux LoRA with CLIP's adapters and a new identifier token (its row trained in CLIP; T5 frozen, as in
    diffusers' scripts) draws through generate with the token, at Flux.1 dev's guidance and own sampler."""
    out = tmp_path / "run"
    printed = cli_run(capsys, *train_argv(flux_model, photos, out, "--method", "lora", "--train_text_encoder",
                                          "--identifier", "<zq_dog>", "--initializer", "dog", "--instance_prompt",
                                          "a photo of <zq_dog> dog", steps=1))
    parts = {k.split(".")[0] for k in load_file(str(out / "pytorch_lora_weights.safetensors"))}
    assert parts == {"transformer", "text_encoder"}
    assert json.loads((out / "run_info.json").read_text())["family"] == "flux"
    assert "model family: Flux.1 (FluxPipeline, read from model_index.json)" in printed
    assert list(load_file(str(out / "token_embeddings.safetensors"))) == ["<zq_dog>"]
    shots = tmp_path / "shots"
    cli_run(capsys, "generate", "--model", flux_model, "--lora", out, "--prompt", "a photo of <zq_dog> dog",
            "--height", "64", "--width", "64", "--steps", "2", "--out", shots)
    settings = json.loads((shots / "settings.json").read_text())
    assert settings["guidance"] == 3.5 and settings["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert len(list(shots.glob("0*.png"))) == 1


# ------------------------------------------------------------------------------------------- wiring of the options
@pytest.fixture
def spy(monkeypatch):
    """Records the arguments the flow behaviour hands to training.flow's functions, per call."""
    from dreambooth.models.families import flux, transformer

    calls: dict[str, list] = {}

    def wrap(module, name):
        real = getattr(module, name)

        def recorded(*args, **kwargs):
            calls.setdefault(name, []).append((args, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)

    for name in ("sample_sigmas", "loss_weighting", "prediction_and_target"):
        wrap(transformer, name)
    wrap(flux, "guidance_vector")
    return calls


def wired(probe, model, **overrides):
    return probe(model__pretrained_model=str(model), training__max_train_steps=1, **overrides)


def test_flux_defaults_are_diffusers_scripts(probe, spy, flux_model):
    wired(probe, flux_model)
    args, kwargs = spy["sample_sigmas"][0]
    assert args[0] == "none" and spy["loss_weighting"][0][0][0] == "none"
    assert spy["prediction_and_target"][0][1]["precondition_outputs"] is False
    assert spy["guidance_vector"][0][0][0] == 3.5


def test_sd3_defaults_are_diffusers_scripts(probe, spy, sd3_model):
    p = wired(probe, sd3_model)
    assert spy["sample_sigmas"][0][0][0] == "logit_normal"
    assert spy["prediction_and_target"][0][1]["precondition_outputs"] is True
    assert p.calls[0]["conditioning"]["embeds"].shape[1] == 77 + 77  # CLIP's 77, then T5's 77 (SD3's default)


def test_weighting_scheme_and_its_density_settings_reach_the_flow_maths(probe, spy, sd3_model):
    wired(probe, sd3_model, training__weighting_scheme="mode", training__mode_scale=0.5, training__logit_mean=0.3,
          training__logit_std=2.0)
    args, kwargs = spy["sample_sigmas"][0]
    assert args[0] == "mode" and spy["loss_weighting"][0][0][0] == "mode"
    assert (kwargs["mode_scale"], kwargs["logit_mean"], kwargs["logit_std"]) == (0.5, 0.3, 2.0)
    spy.clear()
    wired(probe, sd3_model, training__weighting_scheme="cosmap")
    assert spy["loss_weighting"][0][0][0] == "cosmap"


def test_timestep_sampling_and_its_settings_reach_the_flow_maths(probe, spy, flux_model):
    wired(probe, flux_model, training__timestep_sampling="shift", training__sigmoid_scale=1.5,
          training__discrete_flow_shift=2.0, training__weighting_scheme="sigma_sqrt")
    args, kwargs = spy["sample_sigmas"][0]
    assert args[0] == "shift" and (kwargs["sigmoid_scale"], kwargs["discrete_flow_shift"]) == (1.5, 2.0)
    assert spy["loss_weighting"][0][0][0] == "sigma_sqrt"  # the loss keeps --weighting_scheme's weights
    assert kwargs["image_seq_len"] == 16  # 64 px: 8x8 latents in 2x2 patches, for flux_shift


def test_precondition_outputs_and_guidance_scale_reach_the_step(probe, spy, flux_model, sd3_model):
    from dreambooth.cli import build_parser, config_overrides

    # diffusers spells it with a number: --precondition_outputs 0
    parsed = config_overrides(build_parser().parse_args(["train", "--precondition_outputs", "0"]))
    assert int(parsed["training.precondition_outputs"]) == 0  # read as the config validates it
    wired(probe, sd3_model, training__precondition_outputs=0)
    assert spy["prediction_and_target"][0][1]["precondition_outputs"] is False
    wired(probe, flux_model, training__guidance_scale=1.25, training__precondition_outputs=1)
    assert spy["guidance_vector"][-1][0][0] == 1.25
    assert spy["prediction_and_target"][-1][1]["precondition_outputs"] is True


def test_max_sequence_length_sets_t5s_length(probe, flux_model, sd3_model):
    assert wired(probe, flux_model, model__method="lora").calls[0]["conditioning"]["embeds"].shape[1] == 512
    assert wired(probe, flux_model).calls[0]["conditioning"]["embeds"].shape[1] == 77  # diffusers' full script's
    assert wired(probe, flux_model, training__max_sequence_length=24).calls[0]["conditioning"]["embeds"].shape[1] == 24
    assert wired(probe, sd3_model, training__max_sequence_length=30).calls[0]["conditioning"]["embeds"].shape[1] == 107


def adapted(probe_result, part="transformer") -> set[str]:
    return {n.split(".lora_A")[0] for n, _ in probe_result.run.models.modules()[part].named_parameters()
            if ".lora_A." in n}


def test_lora_layers_and_blocks_choose_the_adapted_modules(probe, flux_model, sd3_model):
    default = adapted(wired(probe, flux_model, model__method="lora"))
    assert {"transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.0.attn.to_q"} <= default
    only = adapted(wired(probe, flux_model, model__method="lora", lora__layers="attn.to_k, attn.to_v"))
    assert only == {f"{block}.{i}.attn.{m}" for block in ("transformer_blocks", "single_transformer_blocks")
                    for i in (0, 1) for m in ("to_k", "to_v")}
    blocks = adapted(wired(probe, sd3_model, model__method="lora", lora__blocks="1"))
    assert blocks and all(n.startswith("transformer_blocks.1.") for n in blocks)


# ------------------------------------------------------------------------------------------- refusals
def test_settings_of_another_objective_are_refused_and_dropping_them_works(flux_model, sd3_model, tiny_model, photos,
                                                                           tmp_path, capsys, monkeypatch):
    err = cli_run(capsys, *train_argv(sd3_model, photos, tmp_path / "a", "--snr_gamma", "5", "--offset_noise",
                                      "--resolution", "72"), code=2)
    assert "training.snr_gamma: Min-SNR-gamma" in err and "Drop --snr_gamma" in err
    assert "training.noise_offset: offset noise" in err
    assert "training.resolution: 72 is not a multiple of 16" in err and "2x2 patches" in err
    passes_preflight(capsys, monkeypatch, *train_argv(sd3_model, photos, tmp_path / "a"))
    err = cli_run(capsys, *train_argv(tiny_model, photos, tmp_path / "b", "--weighting_scheme", "cosmap",
                                      "--guidance_scale", "3"), code=2)
    assert "training.weighting_scheme: 'cosmap' is a setting of the flow-matching families" in err
    assert "training.guidance_scale: 3.0 is a setting of the flow-matching families" in err
    err = cli_run(capsys, *train_argv(sd3_model, photos, tmp_path / "c", "--guidance_scale", "3",
                                      "--tokenizer_max_length", "20"), code=2)
    assert "SD3's transformer has no guidance embedding" in err and "Drop --guidance_scale" in err
    assert "training.tokenizer_max_length: SD3's CLIPs read 77 tokens" in err
    err = cli_run(capsys, *train_argv(flux_model, photos, tmp_path / "d", "--tokenizer_max_length", "20"), code=2)
    assert "training.tokenizer_max_length: Flux's CLIP reads 77 tokens" in err
    passes_preflight(capsys, monkeypatch, *train_argv(flux_model, photos, tmp_path / "d", "--max_sequence_length",
                                                      "20"))


def test_a_schnell_run_with_guidance_is_refused(schnell_model, flux_model, photos, tmp_path, capsys, monkeypatch):
    err = cli_run(capsys, *train_argv(schnell_model, photos, tmp_path / "a", "--guidance_scale", "3.5"), code=2)
    assert "Flux.1 schnell-type model" in err and "Drop --guidance_scale, or train a Flux.1 dev model" in err
    passes_preflight(capsys, monkeypatch, *train_argv(schnell_model, photos, tmp_path / "a"))
    passes_preflight(capsys, monkeypatch, *train_argv(flux_model, photos, tmp_path / "b", "--guidance_scale", "3.5"))


def test_a_t5_prompt_past_max_sequence_length_is_refused(flux_model, photos, tmp_path, capsys, monkeypatch):
    long = "a photo of sks dog " + " ".join(["on a red square"] * 8)
    err = cli_run(capsys, *train_argv(flux_model, photos, tmp_path / "a", "--max_sequence_length", "16",
                                      "--validation_prompt", long), code=2)
    assert "training.max_sequence_length: Flux.1's T5 reads 16 tokens and would cut the validation prompt" in err
    assert "Shorten it, or raise --max_sequence_length" in err
    passes_preflight(capsys, monkeypatch, *train_argv(flux_model, photos, tmp_path / "a", "--max_sequence_length",
                                                      "64", "--validation_prompt", long))


def test_a_lora_of_another_family_is_refused_before_weights_load(flux_model, sd3_model, tiny_model, photos,
                                                                 tmp_path, capsys):
    flux_run, sd_run = tmp_path / "flux", tmp_path / "sd"
    cli_run(capsys, *flow_argv(flux_model, photos, flux_run, "--method", "lora", steps=1))
    cli_run(capsys, *train_argv(tiny_model, photos, sd_run, "--method", "lora", steps=1))
    for model, lora, what in ((sd3_model, flux_run, "a Flux.1 LoRA"), (tiny_model, flux_run, "a Flux.1 LoRA"),
                              (flux_model, sd_run, "a UNet LoRA (SD 1.x/2.x or SDXL)")):
        err = cli_run(capsys, "generate", "--model", model, "--lora", lora, "--prompt", "x", "--out",
                      tmp_path / "shots", code=2)
        assert f"is {what} and cannot be applied to {model}" in err
    err = cli_run(capsys, "generate", "--model", flux_model, "--lora", flux_run, "--prompt", "x", "--negative-prompt",
                  "blurry", "--height", "72", "--out", tmp_path / "shots", code=2)
    assert "--negative-prompt: Flux.1 is guidance-distilled" in err and "--height 72 is not a multiple of 16" in err
    cli_run(capsys, "generate", "--model", flux_model, "--lora", flux_run, "--prompt", "x", "--height", "64",
            "--width", "64", "--steps", "1", "--out", tmp_path / "shots")
    shutil.rmtree(tmp_path / "shots")
    err = cli_run(capsys, "generate", "--model", flux_model, "--scheduler", "dpm++", "--prompt", "x", "--out",
                  tmp_path / "shots", code=2)
    assert "Leave the scheduler unset for the model's own" in err


def test_every_family_is_a_known_family():
    assert set(FAMILIES) == {"sd1", "sd2", "sdxl", "flux", "sd3"}
    for family in FAMILIES.values():
        assert family.behaviour().family is family


# ------------------------------------------------------------------------------------------- a 4-bit frozen base
@pytest.mark.parametrize("how", ["quantize_base", "bnb_quantization_config_path"])
def test_a_quantized_base_loads_the_frozen_denoiser_in_4_bits(how, flux_model, tmp_path, monkeypatch):
    """--quantize_base nf4 (or diffusers' --bnb_quantization_config_path) reaches the denoiser's from_pretrained as
    a BitsAndBytesConfig computing in the run's precision, then peft's k-bit preparation. bitsandbytes needs CUDA, so
    the config class and the preparation are stood in for here; the GPU run is bench/gpu.sh's."""
    import diffusers
    import peft

    from dreambooth.config_file import load_config
    from dreambooth.training.components import load_models

    seen = {}

    class Recorded:
        def __init__(self, **kwargs):
            seen["config"] = kwargs

    real = diffusers.FluxTransformer2DModel.from_pretrained.__func__

    def from_pretrained(cls, *args, quantization_config=None, torch_dtype=None, **kwargs):
        seen["passed"], seen["dtype"] = quantization_config, torch_dtype
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers, "BitsAndBytesConfig", Recorded)
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training",
                        lambda model, **kw: seen.setdefault("prepared", kw) and model)
    settings = {"model.pretrained_model": str(flux_model), "model.method": "lora", "dataset.instance_prompt": "x"}
    if how == "quantize_base":
        settings["model.quantize_base"] = "nf4"
        want = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    else:
        want = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True}
        (tmp_path / "bnb.json").write_text(json.dumps(want))
        settings["model.bnb_quantization_config_path"] = str(tmp_path / "bnb.json")
    models = load_models(load_config(None, settings), [], torch.bfloat16)
    assert seen["config"] == {**want, "bnb_4bit_compute_dtype": torch.bfloat16}
    assert isinstance(seen["passed"], Recorded) and seen["dtype"] == torch.bfloat16
    assert seen["prepared"] == {"use_gradient_checkpointing": False}
    assert any("lora_A" in n for n, _ in models.denoiser.named_parameters())


def test_a_quantized_base_is_refused_where_it_cannot_run(flux_model, photos, tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.json").write_text("[1]")
    err = cli_run(capsys, *train_argv(flux_model, photos, tmp_path / "a", "--quantize_base", "nf4",
                                      "--bnb_quantization_config_path", tmp_path / "bad.json"), code=2)
    assert "give one of them" in err and "Use it with --method lora, or drop it" in err
    assert "does not read as a JSON object" in err and "needs a CUDA GPU" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    err = cli_run(capsys, *train_argv(flux_model, photos, tmp_path / "a", "--method", "lora", "--quantize_base",
                                      "nf4"), code=2)
    assert "needs bitsandbytes, which is not installed" in err
    monkeypatch.undo()
    passes_preflight(capsys, monkeypatch, *train_argv(flux_model, photos, tmp_path / "a", "--method", "lora"))


def test_compare_refuses_a_family_it_does_not_measure(flux_model, tmp_path, capsys):
    err = cli_run(capsys, "compare", "--model", flux_model, "--out", tmp_path / "c", code=2)
    assert "measures SD 1.x/2.x models" in err and "is Flux.1" in err


def test_evaluate_scores_every_checkpoint_of_a_flux_lora_run(flux_model, photos, real_dir, dino_dir, tmp_path,
                                                             capsys):
    """`evaluate --checkpoints all` draws each checkpoint of a Flux LoRA run with the family's pipeline and names
    the best in the run report."""
    out = tmp_path / "run"
    cli_run(capsys, *flow_argv(flux_model, photos, out, "--method", "lora", steps=2))
    cli_run(capsys, "evaluate", "--model", out, "--checkpoints", "all", "--real", real_dir, "--identifier", "sks",
            "--class-word", "dog", "--dino", dino_dir, "--prompt", "a photo of sks dog", "--steps", "2",
            "--num-images", "1", "--height", "64", "--width", "64", "--out", tmp_path / "eval")
    record = json.loads((out / "checkpoint_metrics.json").read_text())
    assert [e["name"] for e in record["checkpoints"]] == ["checkpoint-2", "final"]
    assert record["best"] in ("checkpoint-2", "final") and (out / "report.html").is_file()
    drawn = [Image.open(png).size for png in (tmp_path / "eval").rglob("images/0*.png")]
    assert drawn and set(drawn) == {(64, 64)}  # evaluate's --height and --width reach the drawing


def test_a_kohya_flux_file_from_elsewhere_is_read_as_flux(flux_model, sd3_model, photos, tmp_path, capsys):
    """A kohya-layout Flux LoRA without this tool's metadata (from ComfyUI or sd-scripts) is known as Flux by its
    keys: refused on an SD3 model; on this narrow tiny Flux, diffusers' converter (which asserts FLUX.1's widths)
    fails, and that failure is one message, not a traceback."""
    from safetensors.torch import save_file

    from dreambooth.formats.lora_fit import transformer_lora_family

    assert transformer_lora_family(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], {}).name == "flux"
    run = tmp_path / "run"
    cli_run(capsys, *flow_argv(flux_model, photos, run, "--method", "lora", steps=1))
    cli_run(capsys, "export", run, "--format", "kohya", "--out", tmp_path / "k.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(tmp_path / "k.safetensors")), str(bare))  # no metadata
    err = cli_run(capsys, "generate", "--model", sd3_model, "--lora", bare, "--prompt", "x", "--out",
                  tmp_path / "a", code=2)
    assert "is a Flux.1 LoRA and cannot be applied to" in err
    err = cli_run(capsys, "generate", "--model", flux_model, "--lora", bare, "--prompt", "x", "--height", "64",
                  "--width", "64", "--steps", "1", "--out", tmp_path / "b", code=2)
    assert "kohya Flux reader could not convert it" in err
