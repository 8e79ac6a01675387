"""A LoRA made for another model is refused before any weights load, in one paragraph: its family (from its
metadata, or from its layers), the model's, and every adapted layer that does not fit counted once; in every
command that applies a LoRA, in diffusers', peft's and kohya's spellings alike. A LoRA of the model's family
trained on another model of the same shape still loads, with a note."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dreambooth.cli import main
from dreambooth.errors import UserError
from dreambooth.formats.kohya import lora_to_kohya
from dreambooth.formats.lora_fit import AdaptedLayers, compare, fit_error, read_adapted_layers
from dreambooth.models.base import model_fingerprint
from dreambooth.models.layout import Layout, config_layout
from dreambooth.models.tiny_families import build_model

TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".q_proj", ".k_proj", ".v_proj", ".out_proj")


def write_lora(model, out, *, parts=("unet", "text_encoder", "text_encoder_2"), base=True, seed=0):
    """A rank-2 LoRA on every attention projection of `model`'s parts, in peft's names as diffusers saves it, with
    the metadata our training records (`base=False`: none, as a LoRA from elsewhere)."""
    layout, gen, tensors = config_layout(model, "m"), torch.Generator().manual_seed(seed), {}
    for part in parts:
        for module, shape in layout.shapes.get(part, {}).items():
            if module.endswith(TARGETS):
                tensors[f"{part}.{module}.lora_A.weight"] = torch.randn(2, shape[1], generator=gen) * 0.1
                tensors[f"{part}.{module}.lora_B.weight"] = torch.randn(shape[0], 2, generator=gen) * 0.1
    metadata = {"dreambooth.base_model": str(model), "dreambooth.base_model_hash": model_fingerprint(model)}
    save_file(tensors, str(out), metadata=metadata if base else None)
    return out


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("xl") / "model", size="sdxl-tiny", seed=2)


@pytest.fixture(scope="module")
def xl_lora(xl_model, tmp_path_factory):
    return write_lora(xl_model, tmp_path_factory.mktemp("xl_lora") / "subject.safetensors")


def error_of(lora, model, flag="--model") -> str:
    error = fit_error(read_adapted_layers(lora), config_layout(model, str(model)), flag)
    return "" if error is None else str(error)


def test_the_count_is_one_per_adapted_layer_whatever_its_tensors():
    """By hand: of 4 adapted layers, one fits, one reads 80 inputs where the model's reads 6, one names a layer the
    model lacks, one sits in a second text encoder the model lacks: 3 do not fit, each counted once although each
    has two tensors (peft's page counted size mismatches per tensor and never the missing ones)."""
    layout = Layout("M", "sd1", {"unet": {"a.to_q": (8, 4), "a.to_k": (8, 6)},
                                 "text_encoder": {"encoder.layers.0.q_proj": (4, 4)}}, {})
    lora = AdaptedLayers("L.safetensors", {("unet", "a.to_q"): {"down": (2, 4), "up": (8, 2)},
                                           ("unet", "a.to_k"): {"down": (2, 80), "up": (8, 2)},
                                           ("unet", "b.to_q"): {"down": (2, 4), "up": (8, 2)},
                                           ("text_encoder_2", "encoder.layers.0.q_proj"): {"down": (2, 4),
                                                                                           "up": (4, 2)}}, {})
    fit = compare(lora, layout)
    assert (fit.adapted, len(fit.missing), len(fit.reshaped)) == (4, 2, 1)
    message = str(fit_error(lora, layout))
    assert "is an SDXL LoRA (it adapts a second text encoder, which only SDXL has)" in message
    assert "cannot be applied to M, an SD 1.x model: 3 of its 4 adapted layers do not fit" in message
    assert "2 adapt a layer M does not have, 1 of them in a second text encoder" in message
    assert "1 have another shape (e.g. the UNet's a.to_k: 80->8 in the LoRA, 6->8 in M" in message
    assert "counted once" in message and "use a LoRA trained on an SD 1.x model" in message


def test_an_sdxl_lora_on_an_sd1_model_prints_our_paragraph_alone(tiny_model, xl_model, xl_lora, tmp_path):
    """The real command in a process of its own: not one line of peft or diffusers before our message."""
    proc = subprocess.run([sys.executable, "-m", "dreambooth", "generate", "--model", str(tiny_model), "--lora",
                           str(xl_lora), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "g")],
                          capture_output=True, text=True, timeout=300)
    expected = error_of(xl_lora, tiny_model)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {expected}\n")
    # SDXL-tiny's UNet has 64 adapted projections (8 a transformer block: its down level 1 has 1 attention of 2
    # blocks, the middle 2 blocks, the first up level 2 attentions of 2 blocks), each encoder 8 (2 layers of 4).
    # SD 1.x-tiny has neither attention on those levels nor a second block in the middle (16 + 32 + 8 missing)
    # nor a second encoder (8 missing); in the middle's first block attn2.to_k and to_v read SDXL's 80-wide text,
    # not SD 1.x's 32 (2 reshaped).
    assert f"is an SDXL LoRA (trained on {xl_model}) and" in expected and f"(--model {xl_model})" in expected
    assert f"cannot be applied to {tiny_model}, an SD 1.x model: 66 of its 80 adapted layers do not fit" in expected
    assert "64 adapt a layer" in expected and "8 of them in a second text encoder" in expected
    assert "2 have another shape" in expected and "80->32 in the LoRA" in expected


def test_the_kohya_spelling_counts_the_same_and_export_refuses_it_alone(tiny_model, xl_model, xl_lora, tmp_path):
    kohya = lora_to_kohya(xl_lora, tmp_path / "kohya.safetensors")  # lora_te1_/lora_te2_, the UNet by SGM names
    assert error_of(kohya, xl_model) == "" and error_of(xl_lora, xl_model) == ""
    assert error_of(kohya, tiny_model).split(" is ", 1)[1] == error_of(xl_lora, tiny_model).split(" is ", 1)[1]
    proc = subprocess.run([sys.executable, "-m", "dreambooth", "export", str(tiny_model), "--merge-lora", str(kohya),
                           "--format", "diffusers", "--out", str(tmp_path / "merged")],
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {error_of(kohya, tiny_model, 'SRC')}\n")
    assert f"(SRC {xl_model})" in proc.stderr and not (tmp_path / "merged").exists()


def test_the_family_shows_in_the_layers_when_no_metadata_says(tiny_model, xl_model, tmp_path):
    unet_only = write_lora(xl_model, tmp_path / "unet.safetensors", parts=("unet",), base=False)
    message = error_of(unet_only, tiny_model)
    assert "is an SDXL LoRA (it adapts attention in the UNet's first up block, which only SDXL's has)" in message
    assert "58 of its 64 adapted layers do not fit (56 adapt a layer" in message  # the encoders' 16 left out
    assert "Apply it to an SDXL model of its shape" in message
    sd1 = write_lora(tiny_model, tmp_path / "sd1.safetensors", parts=("unet", "text_encoder"), base=False)
    message = error_of(sd1, xl_model)
    assert "is a LoRA whose family neither its metadata nor its layers show" in message  # 32 wide: no SD's
    assert f"cannot be applied to {xl_model}, an SDXL model: 26 of its 40 adapted layers do not fit" in message


def test_an_sd2_lora_of_the_same_shapes_is_refused_on_sd1_by_its_family(tiny_model, tmp_path):
    """sd2-tiny's adapted layers have sd1-tiny's shapes; its recorded base tells the family."""
    sd2 = build_model(tmp_path / "sd2", size="sd2-tiny", seed=0)
    lora = write_lora(sd2, tmp_path / "sd2.safetensors")
    message = error_of(lora, tiny_model)
    assert f"is an SD 2.x LoRA (trained on {sd2}) and cannot be applied to {tiny_model}, an SD 1.x model" in message
    assert f"its 40 adapted layers have {tiny_model}'s shapes, but" in message and f"(--model {sd2})" in message


def test_an_sdxl_model_with_the_second_encoder_alone_is_sdxl(xl_model, tmp_path):
    """A refiner's layout: one text encoder, OpenCLIP's, which alone would read as SD 2.x."""
    import json
    import shutil

    refiner = tmp_path / "refiner"
    shutil.copytree(xl_model, refiner, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None],
                                                          "tokenizer": [None, None]}))
    layout = config_layout(refiner, "refiner")
    assert layout.family == "sdxl" and set(layout.shapes) == {"unet", "text_encoder_2"}


def test_the_recorded_family_tells_once_the_base_model_is_gone(tiny_model, xl_model, tmp_path):
    """Training records the base's family (tests/test_lora.py); a LoRA whose base is not on this machine any more
    is still named by it, here with layers whose shapes alone say nothing."""
    from safetensors.torch import load_file

    lora = write_lora(tiny_model, tmp_path / "sd1.safetensors", parts=("unet", "text_encoder"))
    save_file(load_file(str(lora)), str(lora), metadata={"dreambooth.base_model": str(tmp_path / "gone"),
                                                         "dreambooth.base_family": "sd1"})
    message = error_of(lora, xl_model)
    assert f"is an SD 1.x LoRA (trained on {tmp_path / 'gone'}) and cannot be applied to {xl_model}, an SDXL" in message
    assert "for " + str(xl_model) + ", use a LoRA trained on an SDXL model" in message


def test_a_lora_of_the_family_on_another_model_of_its_shape_loads_with_a_note(tiny_model, tmp_path, capsys):
    lora = write_lora(tiny_model, tmp_path / "sd1.safetensors")
    kohya = lora_to_kohya(lora, tmp_path / "sd1-kohya.safetensors")
    other = build_model(tmp_path / "other", size="tiny", seed=5)
    for i, file in enumerate((lora, kohya)):
        assert main(["generate", "--model", str(other), "--lora", str(file), "--prompt", "a photo of sks dog",
                     "--steps", "1", "--height", "64", "--width", "64", "--out", str(tmp_path / f"g{i}")]) == 0
        out = capsys.readouterr().out
        assert f"note: LoRA {file} was trained on {tiny_model}" in out and "It loads" in out
        assert (tmp_path / f"g{i}" / "grid.png").is_file()


def test_evaluate_and_the_service_refuse_before_any_model_loads(tiny_model, xl_lora, real_dir, dino_dir, tmp_path,
                                                                monkeypatch, capfd):
    from dreambooth.characters.character import load_characters
    from dreambooth.evaluation import evaluate
    from dreambooth.serving import renderer

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the LoRA was checked")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # no CLIP of this machine's is found
    monkeypatch.setattr(renderer, "load_pipeline", refuse)
    monkeypatch.setattr(evaluate, "load_real_images", refuse)
    expected = error_of(xl_lora, tiny_model)
    assert main(["evaluate", "--model", str(tiny_model), "--lora", str(xl_lora), "--real", str(real_dir), "--dino",
                 str(dino_dir), "--identifier", "sks", "--class-word", "dog", "--out", str(tmp_path / "e")]) == 2
    assert capfd.readouterr() == ("", f"error: {expected}\n")
    from serving_support import characters_file

    entry = {"name": "saya", "model": str(tiny_model), "identifier": "sks", "class_word": "dog", "width": 64,
             "height": 64, "loras": [{"file": str(xl_lora), "weight": 1.0}]}
    characters = load_characters(characters_file(tmp_path, tiny_model, [entry]))
    with pytest.raises(UserError) as refused:
        renderer.Renderer(characters, device="cpu", precision="fp32")
    assert str(refused.value) == error_of(xl_lora, tiny_model, "character saya's model:")


def test_a_loaded_pipeline_refuses_it_too_without_library_output(tiny_model, xl_lora, capfd):
    """Where the model's config files are not on this machine (a hub id), the loader asks the loaded pipeline."""
    from dreambooth.formats.lora_loading import load_lora_adapter
    from dreambooth.models.loading import load_pipeline

    pipe = load_pipeline(tiny_model, device=torch.device("cpu"), dtype=torch.float32)
    capfd.readouterr()
    with pytest.raises(UserError) as refused:
        load_lora_adapter(pipe, xl_lora, "a", model="org/sd1")
    assert "cannot be applied to org/sd1, an SD 1.x model: 66 of its 80 adapted layers do not fit" in str(refused.value)
    assert capfd.readouterr() == ("", "") and not getattr(pipe.unet, "peft_config", None)


@pytest.mark.numerics
def test_a_lora_checkpoint_as_the_model_keeps_its_own_lora_beside_another(tiny_model, tmp_path):
    """`generate --model checkpoint-N --lora X`: the checkpoint's LoRA loads as an adapter first, so X takes a name
    of its own (it was refused as 'Adapter name lora0 already in use') and both draw, the checkpoint's at 1.0."""
    import json

    import numpy as np

    from dreambooth.formats.lora_loading import load_loras
    from dreambooth.models.base import CHECKPOINT_STATE, LORA_FILE
    from dreambooth.models.loading import load_pipeline

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / CHECKPOINT_STATE).write_text(json.dumps({"base_model": str(tiny_model), "global_step": 2}))
    write_lora(tiny_model, ckpt / LORA_FILE, parts=("unet",))
    other = write_lora(tiny_model, tmp_path / "other.safetensors", parts=("unet",), seed=1)

    def image(model, loras):
        pipe = load_pipeline(model, device=torch.device("cpu"), dtype=torch.float32)
        load_loras(pipe, loras)
        out = pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="np", height=64, width=64)
        return out.images[0]

    both = image(ckpt, [(other, 0.5)])
    assert np.abs(both - image(tiny_model, [(ckpt / LORA_FILE, 1.0), (other, 0.5)])).max() < 1e-5
    assert np.abs(both - image(ckpt, [])).max() > 1e-3
