"""SDXL exports on tiny SDXL-shaped models: the kohya LoRA (`lora_te1_`, `lora_te2_`, the UNet by its original SGM
blocks) loaded by stock diffusers with the same images, the single file in SGM's layout loaded back by stock
`from_single_file` to the same weights, and LoRAs with both text encoders merged as stock diffusers fuses them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import rounding_bound
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_export import args, load, load_problems
from test_export import image as picture

from dreambooth.errors import UserError
from dreambooth.export import export_command
from dreambooth.formats import kohya
from dreambooth.formats.kohya import lora_to_kohya
from dreambooth.formats.lora import read_lora
from dreambooth.formats.merge import merge_lora
from dreambooth.formats.single_file import to_single_file
from dreambooth.models import tiny_families
from dreambooth.models.base import LORA_FILE

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ENCODERS = ("text_encoder", "text_encoder_2")
PARTS = ("unet", "vae", *ENCODERS)
TE2_WIDTH, TE2_PROJECTION = 48, 40  # sdxl-tiny's second encoder, wider than the first (32) as SDXL's is


def build_xl(path, seed):
    return tiny_families.build_model(path, size="sdxl-tiny", seed=seed)


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory):
    return build_xl(tmp_path_factory.mktemp("xl") / "model", seed=2)


@pytest.fixture(scope="module")
def xl_config_model(tmp_path_factory):
    """Same shape as `xl_model`, other weights: the configs `from_single_file` reads, and nothing else."""
    return build_xl(tmp_path_factory.mktemp("xl_config") / "model", seed=3)


def load_xl(model_dir) -> StableDiffusionXLPipeline:
    return load(model_dir, StableDiffusionXLPipeline)


def make_xl_lora(model_dir, out_dir, *, seed, encoders=ENCODERS, metadata=None):
    """An SDXL LoRA as training writes it: peft adapters on the UNet's attention and both encoders' q/k/v/out,
    random non-zero lora_B, saved by stock StableDiffusionXLPipeline.save_lora_weights with adapter metadata.

    The scales differ by part (UNet 8/4 = 2, first encoder 4/4 = 1, second 3/sqrt(4) = 1.5 with rsLoRA), so a
    kohya file that lost a part's alpha gives other images.
    """
    pipe = load_xl(model_dir)
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights="gaussian"),
               "text_encoder": LoraConfig(r=4, lora_alpha=4, target_modules=TE_TARGETS, init_lora_weights="gaussian"),
               "text_encoder_2": LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=TE_TARGETS,
                                            init_lora_weights="gaussian")}
    parts = ("unet", *encoders)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft draws lora_A from the global generator
        pipe.unet.add_adapter(configs["unet"])
        for name in encoders:
            inject_adapter_in_model(configs[name], getattr(pipe, name), adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    for name in parts:
        for param_name, param in getattr(pipe, name).named_parameters():
            if "lora_B" in param_name:
                param.data = torch.randn(param.shape, generator=gen) * 0.5
    layers = {}
    for name in parts:
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, name))
        layers[f"{name}_lora_adapter_metadata"] = configs[name].to_dict()
    StableDiffusionXLPipeline.save_lora_weights(out_dir, **layers)
    if metadata:  # what our training adds to the header (dreambooth.base_model, ...)
        file = out_dir / LORA_FILE
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata()
        save_file(load_file(file), file, metadata={**header, **metadata})
    return out_dir


@pytest.fixture(scope="module")
def xl_lora(xl_model, tmp_path_factory):
    return make_xl_lora(xl_model, tmp_path_factory.mktemp("xl_lora") / "lora", seed=1)


@pytest.fixture(scope="module")
def xl_kohya(xl_lora, tmp_path_factory):
    return lora_to_kohya(xl_lora, tmp_path_factory.mktemp("xl_kohya") / "subject.safetensors")


def adapted_layers(pipe) -> dict[str, int]:
    return {name: sum(n.endswith("lora_A") for n, _ in getattr(pipe, name).named_modules())
            for name in ("unet", *ENCODERS)}


# --- reading and kohya ------------------------------------------------------------------------------------------


def test_an_sdxl_lora_is_read_with_both_text_encoders(xl_lora):
    lora = read_lora(xl_lora)
    # UNet: transformer blocks 2 down (one attention, 2 deep), 4 up (two attentions), 2 in the middle, each with
    # attn1 and attn2 of 4 projections: 8 x 2 x 4; each encoder: 2 layers x 4 projections.
    assert {c: len(m) for c, m in lora.layers.items()} == {"unet": 64, "text_encoder": 8, "text_encoder_2": 8}
    assert lora.adapter_config["text_encoder_2"]["use_rslora"] is True


@pytest.mark.numerics
def test_sdxl_kohya_lora_gives_the_same_images_as_the_diffusers_lora(xl_model, xl_lora, xl_kohya):
    keys = load_file(xl_kohya).keys()
    prefixes = {k.split(".")[0].split("_")[1] for k in keys}
    assert prefixes == {"unet", "te1", "te2"}  # SDXL's names; never SD 1.x's lora_te_
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_unet_output_blocks_1_1_transformer_blocks_1_attn2_to_k.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight" in keys
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in keys)

    with load_problems() as problems:
        from_diffusers, from_kohya = load_xl(xl_model), load_xl(xl_model)
        from_diffusers.load_lora_weights(str(xl_lora))
        from_kohya.load_lora_weights(str(xl_kohya))
    assert not problems, [str(getattr(p, "msg", p)) for p in problems]
    file_layers = sum(k.endswith(".lora_down.weight") for k in keys)
    assert adapted_layers(from_kohya) == adapted_layers(from_diffusers) == {"unet": 64, "text_encoder": 8,
                                                                            "text_encoder_2": 8}
    assert sum(adapted_layers(from_kohya).values()) == file_layers  # every layer of the file found its module
    with_lora, bound = picture(from_diffusers), rounding_bound(from_kohya, steps=2, guidance=7.5)
    assert np.abs(picture(from_kohya) - with_lora).max() < bound
    assert np.abs(with_lora - picture(load_xl(xl_model))).max() > 5 * bound  # the LoRA changes the picture

    for pipe in (from_diffusers, from_kohya):
        pipe.fuse_lora(components=["unet", *ENCODERS])
    for name in ("unet", *ENCODERS):
        want, got = getattr(from_diffusers, name).state_dict(), getattr(from_kohya, name).state_dict()
        assert max((want[k] - got[k]).abs().max().item() for k in want if "lora" not in k) < 1e-6, name


def sdxl_attention_modules(config) -> list[str]:
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    return [name for name, _ in unet.named_modules() if name.endswith(tuple("." + t for t in UNET_TARGETS))]


def test_sdxl_kohya_names_follow_the_unet_not_one_table():
    """SDXL 1.0's real UNet (on the meta device) gets the names kohya's sd-scripts and A1111 use; the numbering comes
    from the config, and a LoRA with no base model on this machine gets the same names from its own layers."""
    config = tiny_families.family_configs("sdxl")["unet"]
    modules = sdxl_attention_modules(config)
    names = kohya.sdxl_unet_names(config, modules, "x")
    assert names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert names["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0"] == \
        "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0"
    assert names["mid_block.attentions.0.transformer_blocks.9.attn1.to_k"] == \
        "middle_block.1.transformer_blocks.9.attn1.to_k"
    assert names["up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_v"] == \
        "output_blocks.2.1.transformer_blocks.0.attn1.to_v"
    assert names["up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_q"] == \
        "output_blocks.5.1.transformer_blocks.1.attn2.to_q"
    assert {n.split(".")[1] for n in names.values() if n.startswith("input_blocks")} == {"4", "5", "7", "8"}
    assert {n.split(".")[1] for n in names.values() if n.startswith("output_blocks")} == {str(i) for i in range(6)}
    assert kohya.sdxl_unet_names(kohya._unet_config_from_layers(modules), modules, "x") == names
    tiny = tiny_families.family_configs("sdxl-tiny")["unet"]  # one layer a level: other numbers from the same rules
    tiny_modules = sdxl_attention_modules(tiny)
    tiny_names = kohya.sdxl_unet_names(tiny, tiny_modules, "x")
    assert tiny_names["down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"] == \
        "input_blocks.3.1.transformer_blocks.1.attn1.to_q"
    assert kohya.sdxl_unet_names(kohya._unet_config_from_layers(tiny_modules), tiny_modules, "x") == tiny_names


def test_a_unet_only_sdxl_lora_is_named_from_its_recorded_base_model(xl_model, tmp_path):
    """Training records the base model; without a second encoder's layers that is what says the LoRA is SDXL's."""
    recorded = make_xl_lora(xl_model, tmp_path / "recorded", seed=4, encoders=(),
                            metadata={"dreambooth.base_model": str(xl_model)})
    keys = load_file(lora_to_kohya(recorded, tmp_path / "recorded.safetensors")).keys()
    assert any(k.startswith("lora_unet_input_blocks_3_1_") for k in keys)
    pipe = load_xl(xl_model)
    pipe.load_lora_weights(str(tmp_path / "recorded.safetensors"))
    assert adapted_layers(pipe)["unet"] == sum(k.endswith(".lora_down.weight") for k in keys) == 64

    # A first encoder's layers in an SDXL LoRA are lora_te1_
    both = make_xl_lora(xl_model, tmp_path / "te1", seed=5, encoders=("text_encoder",),
                        metadata={"dreambooth.base_model": str(xl_model)})
    keys = load_file(lora_to_kohya(both, tmp_path / "te1.safetensors")).keys()
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
    assert not any(k.startswith("lora_te_") for k in keys)


def test_sdxl_kohya_export_stops_at_a_layer_with_no_original_name(xl_lora, tmp_path):
    tensors = load_file(xl_lora / LORA_FILE)
    with safe_open(str(xl_lora / LORA_FILE), framework="pt") as f:
        header = f.metadata()
    tensors["unet.add_time_proj.lora_A.weight"] = torch.ones(4, 8)  # a module with no weights in SGM's UNet
    tensors["unet.add_time_proj.lora_B.weight"] = torch.ones(8, 4)
    save_file(tensors, tmp_path / "odd.safetensors", metadata=header)
    with pytest.raises(UserError, match="add_time_proj.*no name in SDXL's original layout"):
        lora_to_kohya(tmp_path / "odd.safetensors", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# --- single file ------------------------------------------------------------------------------------------------


def assert_same_xl_models(loaded, source):
    for name in PARTS:
        got, want = getattr(loaded, name).state_dict(), getattr(source, name).state_dict()
        assert got.keys() == want.keys(), name
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}.{key}"


def xl_from_single_file(file, config_dir, **kw):
    """Stock diffusers, offline: the configs and tokenizers from a local SDXL folder, every weight from the file."""
    pipe = StableDiffusionXLPipeline.from_single_file(str(file), config=str(config_dir), local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_single_file_has_sgm_names_and_loads_back_in_stock_diffusers(xl_model, xl_config_model, tmp_path):
    file = to_single_file(xl_model, tmp_path / "xl.safetensors")
    tensors = load_file(file)
    time_embedding = 4 * 16  # four times the first level's channels
    assert tensors["model.diffusion_model.label_emb.0.0.weight"].shape == (time_embedding, TE2_PROJECTION + 6 * 8)
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in tensors
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in tensors
    openclip = "conditioner.embedders.1.model."
    assert tensors[openclip + "text_projection"].shape == (TE2_WIDTH, TE2_PROJECTION)  # OpenCLIP's, transposed
    assert tensors[openclip + "transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * TE2_WIDTH, TE2_WIDTH)
    assert openclip + "positional_embedding" in tensors and openclip + "ln_final.bias" in tensors
    assert not any(k.startswith("cond_stage_model.") for k in tensors)

    loaded, source, config_model = (xl_from_single_file(file, xl_config_model), load_xl(xl_model),
                                    load_xl(xl_config_model))
    assert_same_xl_models(loaded, source)
    for name in PARTS:
        other = getattr(config_model, name).state_dict()
        assert any(not torch.equal(v, other[k]) for k, v in getattr(loaded, name).state_dict().items()), name
    assert np.array_equal(picture(loaded), picture(source))

    half = export_command(args(xl_model, "single-file", tmp_path / "half.safetensors", half=True))
    assert all(v.dtype == torch.float16 for v in load_file(half).values())
    loaded = xl_from_single_file(half, xl_config_model, torch_dtype=torch.float16)
    for name in PARTS:
        want = getattr(source, name).state_dict()
        assert all(torch.equal(v, want[k].half()) for k, v in getattr(loaded, name).state_dict().items()), name


def test_sdxl_single_file_with_a_merged_lora_equals_the_merged_folder(xl_model, xl_config_model, xl_lora, tmp_path,
                                                                      capsys):
    spec = f"{xl_lora / LORA_FILE}:0.6"
    direct = export_command(args(xl_model, "single-file", tmp_path / "direct.safetensors", spec))
    assert "wrote single-file checkpoint" in capsys.readouterr().out
    folder = export_command(args(xl_model, "diffusers", tmp_path / "merged", spec))
    loaded, merged, base = xl_from_single_file(direct, xl_config_model), load_xl(folder), load_xl(xl_model)
    assert_same_xl_models(loaded, merged)
    for name in ("unet", *ENCODERS):  # the LoRA reached every part it adapts, the second encoder included
        q = {"unet": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"}.get(
            name, "text_model.encoder.layers.0.self_attn.q_proj" if name == "text_encoder_2"
            else "encoder.layers.0.self_attn.q_proj")
        assert not torch.equal(getattr(loaded, name).get_submodule(q).weight,
                               getattr(base, name).get_submodule(q).weight), name


@pytest.mark.parametrize("change, says", [
    ("no_first_encoder", "missing and openclip"),
    ("first_encoder_openclip", "openclip and openclip"),
])
def test_sdxl_single_file_refuses_encoders_it_has_no_place_for(xl_model, tmp_path, monkeypatch, change, says):
    from dreambooth.formats import single_file

    other = tmp_path / "other"
    shutil.copytree(xl_model, other)
    if change == "no_first_encoder":  # an SDXL refiner has only the OpenCLIP encoder
        shutil.rmtree(other / "text_encoder")
    else:
        config = json.loads((other / "text_encoder" / "config.json").read_text())
        (other / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    monkeypatch.setattr(single_file, "source_pipeline", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(UserError, match=says):
        to_single_file(other, tmp_path / "other.safetensors")


def xl_prompt_embeds(pipe, prompt="a photo of <zq> dog"):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0]


@pytest.mark.numerics
def test_sdxl_new_tokens_go_with_the_single_file_and_kohya_exports(xl_model, xl_config_model, xl_lora, tmp_path,
                                                                   capsys):
    """A LoRA trained with a new token (its rows for both encoders in a clip_l/clip_g token file): the single file
    gets an embedding file beside it in that layout, the kohya file bundles it as `bundle_emb.<zq>.clip_l/clip_g`,
    and both give the prompt the merged model gives it."""
    from dreambooth.formats.lora_loading import load_loras

    lora = tmp_path / "token_lora"
    shutil.copytree(xl_lora, lora)
    with safe_open(str(lora / LORA_FILE), framework="pt") as f:
        header = f.metadata()
    save_file(load_file(lora / LORA_FILE), lora / LORA_FILE, metadata={**header, "dreambooth.new_tokens": '["<zq>"]'})
    rows = {"clip_l": torch.randn(1, 32, generator=torch.Generator().manual_seed(4)),
            "clip_g": torch.randn(1, TE2_WIDTH, generator=torch.Generator().manual_seed(5))}
    save_file(rows, lora / "token_embeddings.safetensors", metadata={"dreambooth.tokens": '["<zq>"]'})
    merged = load_xl(merge_lora(xl_model, [(lora, 1.0)], tmp_path / "merged"))
    for tokenizer, encoder, key in ((merged.tokenizer, merged.text_encoder, "clip_l"),
                                    (merged.tokenizer_2, merged.text_encoder_2, "clip_g")):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<zq>")]
        assert torch.equal(row, rows[key][0])
    want = xl_prompt_embeds(merged)

    single = export_command(args(xl_model, "single-file", tmp_path / "m.safetensors", str(lora / LORA_FILE)))
    assert "clip_g" in capsys.readouterr().out  # the note says how stock diffusers loads both rows
    embedding = load_file(tmp_path / "m.zq.safetensors")
    assert embedding.keys() == rows.keys() and all(torch.equal(embedding[k], rows[k]) for k in rows)
    stock = xl_from_single_file(single, xl_config_model)
    stock.load_textual_inversion(embedding["clip_l"], token="<zq>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(embedding["clip_g"], token="<zq>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    assert torch.allclose(xl_prompt_embeds(stock), want, atol=1e-5)

    kohya_file = export_command(args(lora, "kohya", tmp_path / "k.safetensors"))
    bundled = load_file(kohya_file)
    assert all(torch.equal(bundled[f"bundle_emb.<zq>.{k}"], rows[k]) for k in rows)
    ours = load_xl(xl_model)
    load_loras(ours, [(kohya_file, 1.0)])
    ours.fuse_lora()
    assert torch.allclose(xl_prompt_embeds(ours), want, atol=1e-4)


# --- merging ----------------------------------------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters on one model: the point
def test_merged_sdxl_model_equals_fusing_in_stock_diffusers(xl_model, xl_lora, xl_kohya, tmp_path):
    second = make_xl_lora(xl_model, tmp_path / "second", seed=6)
    merged = load_xl(merge_lora(xl_model, [(xl_lora, 0.7), (lora_to_kohya(second, tmp_path / "k.safetensors"),
                                                             -0.4)], tmp_path / "merged"))
    reference = load_xl(xl_model)
    reference.load_lora_weights(str(xl_lora), adapter_name="first")
    reference.load_lora_weights(str(second), adapter_name="second")
    reference.set_adapters(["first", "second"], [0.7, -0.4])
    reference.fuse_lora(components=["unet", *ENCODERS], adapter_names=["first", "second"])
    reference.unload_lora_weights()
    base = load_xl(xl_model)
    for name in ("unet", *ENCODERS):
        want, got, before = (getattr(p, name).state_dict() for p in (reference, merged, base))
        assert got.keys() == want.keys(), name
        assert max((want[k] - got[k]).abs().max().item() for k in want) < 1e-6, name
        assert max((got[k] - before[k]).abs().max().item() for k in got) > 1e-3, name  # the LoRA is in it


def test_an_sdxl_unet_lora_gets_sgm_names_wherever_its_base_model_is(xl_model, tmp_path):
    """A UNet-only LoRA recording a base model that is not on this machine is still told to be SDXL's by its own
    layers (SDXL's first up block has attention), so the export does not depend on where it runs."""
    lora = make_xl_lora(xl_model, tmp_path / "unet_only", seed=8, encoders=(),
                        metadata={"dreambooth.base_model": str(tmp_path / "gone" / "sdxl-base")})
    keys = list(load_file(lora_to_kohya(lora, tmp_path / "k.safetensors")))
    assert any(k.startswith("lora_unet_output_blocks_") for k in keys)
    assert not any("up_blocks" in k or "down_blocks" in k for k in keys)


def test_a_one_encoder_token_file_is_refused_by_an_sdxl_pipeline(xl_model, tmp_path):
    from dreambooth.formats.lora_loading import load_token_vectors

    with pytest.raises(UserError, match="one CLIP text encoder"):
        load_token_vectors(load_xl(xl_model), {"<zq>": torch.zeros(32)})
