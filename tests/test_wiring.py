"""Every option that changes numbers is proven to reach the computation it should change.

The options are listed from the typed config itself (`all_keys()`) and from the parsers of `generate`, `evaluate`
and `export`. Each is either wired (a test here, registered with `@wires`, that fails if the option is ignored),
tested for its wiring in another file (`ELSEWHERE`, the test named), or changes no number (`NO_NUMBERS`, with
the reason). `test_every_option_is_accounted_for` fails, naming the option, when a new one is in none of them.

The training tests run the real `train()` on the tiny model and watch it from the inside (conftest's `probe`
fixture; generation is watched by its `pipeline_calls`): `training_step`'s
batches and losses, the optimizer's groups at each update, the models before the first step. They assert what
the option must do (a group's rate, a dtype, a batch's pixels), not only that something changed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth.cli import build_parser, main
from dreambooth.config import all_keys
from dreambooth.config_file import load_config
from dreambooth.errors import UserError
from dreambooth.training import loop as train_module

WIRED: dict[str, str] = {}


def wires(*keys: str):
    """Registers the decorated test as the wiring test of `keys`."""
    def register(test):
        for key in keys:
            WIRED.setdefault(key, test.__name__)
        return test
    return register


FLOW = "test_flow_families.py::"
# Options whose wiring another file tests; the meta-test checks that each named test exists.
ELSEWHERE = {
    "training.cuda_graph": "test_graph_step.py::test_the_cuda_graph_setting_reaches_the_loop",
    "training.offload_frozen": "test_offload.py::test_offload_setting_reaches_the_loop",
    "output.resume_from_checkpoint": "test_train_e2e.py::test_resume_gives_the_same_weights_as_not_stopping",
    "output.overwrite_output_dir": "test_trust.py::test_a_second_run_is_refused_until_resumed_or_overwritten",
    "output.report_to": "test_trust.py::test_report_to_uses_an_installed_tracker",
    "output.push_to_hub": "test_trust.py::test_push_to_hub_uploads_the_run_without_checkpoints",
    "output.hub_model_id": "test_trust.py::test_push_to_hub_uploads_the_run_without_checkpoints",
    "output.hub_token": "test_config.py::test_hub_flags_map_onto_the_config_and_the_token_is_never_recorded",
    "dataset.strict": "test_bad_input.py::test_bad_files_are_skipped_and_named_or_refused_when_strict",
    "subjects": "test_lora.py::test_two_subjects_in_one_run",
    "generate.overwrite": "test_trust.py::test_generate_gives_every_image_its_own_noise_and_never_mixes_folders",
    "evaluate.real": "test_evaluate.py::test_cli_scores_a_generate_folder",
    "evaluate.identifier": "test_evaluate.py::test_class_prompt_rule",
    "evaluate.class_word": "test_evaluate.py::test_class_prompt_rule",
    "evaluate.images": "test_evaluate.py::test_cli_scores_a_generate_folder",
    "evaluate.clip": "test_evaluate.py::test_overall_is_image_weighted_mean_and_extra_scorers_add_columns",
    "evaluate.dino": "test_evaluate.py::test_cli_scores_a_generate_folder",
    "evaluate.overwrite": "test_trust.py::test_evaluate_refuses_images_of_two_models",
    "evaluate.checkpoints": "test_report.py::test_evaluate_all_checkpoints_names_the_best_in_the_report",
    # the flow-matching families' options, on the tiny Flux and SD3 models
    "training.max_sequence_length": FLOW + "test_max_sequence_length_sets_t5s_length",
    "validation.loss": "test_validation_loss.py::test_the_score_is_logged_and_training_is_unchanged",
    "validation.loss_draws": "test_validation_loss.py::test_draws_and_class_images_change_the_score",
    "dataset.enable_bucket": "test_buckets.py::test_buckets_reach_the_step",
    "dataset.min_bucket_reso": "test_buckets.py::test_the_bucket_range_and_step_reach_the_buckets",
    "dataset.max_bucket_reso": "test_buckets.py::test_the_bucket_range_and_step_reach_the_buckets",
    "dataset.bucket_reso_steps": "test_buckets.py::test_the_bucket_range_and_step_reach_the_buckets",
    "validation.width": "test_buckets.py::test_a_bucketed_run_resumes_bitwise_and_draws_validation_at_a_chosen_size",
    "validation.height": "test_buckets.py::test_a_bucketed_run_resumes_bitwise_and_draws_validation_at_a_chosen_size",
    "dataset.caption_extension": "test_captions.py::test_caption_extension_picks_the_files",
    "dataset.dataset_name": "test_captions.py::test_dataset_name_reads_a_local_imagefolder",
    "dataset.caption_column": "test_captions.py::test_dataset_name_reads_a_local_imagefolder",
    "dataset.caption_dropout": "test_captions.py::test_captions_and_caption_dropout_reach_the_step",
    "token.t5_new_token": "test_t5_token.py::test_a_t5_token_trains_its_row_alone_and_every_drawing_path_uses_it",
    "training.weighting_scheme": FLOW + "test_weighting_scheme_and_its_density_settings_reach_the_flow_maths",
    "training.logit_mean": FLOW + "test_weighting_scheme_and_its_density_settings_reach_the_flow_maths",
    "training.logit_std": FLOW + "test_weighting_scheme_and_its_density_settings_reach_the_flow_maths",
    "training.mode_scale": FLOW + "test_weighting_scheme_and_its_density_settings_reach_the_flow_maths",
    "training.timestep_sampling": FLOW + "test_timestep_sampling_and_its_settings_reach_the_flow_maths",
    "training.sigmoid_scale": FLOW + "test_timestep_sampling_and_its_settings_reach_the_flow_maths",
    "training.discrete_flow_shift": FLOW + "test_timestep_sampling_and_its_settings_reach_the_flow_maths",
    "training.precondition_outputs": FLOW + "test_precondition_outputs_and_guidance_scale_reach_the_step",
    "training.guidance_scale": FLOW + "test_precondition_outputs_and_guidance_scale_reach_the_step",
    "lora.layers": FLOW + "test_lora_layers_and_blocks_choose_the_adapted_modules",
    "lora.blocks": FLOW + "test_lora_layers_and_blocks_choose_the_adapted_modules",
    "evaluate.height": FLOW + "test_evaluate_scores_every_checkpoint_of_a_flux_lora_run",
    "evaluate.width": FLOW + "test_evaluate_scores_every_checkpoint_of_a_flux_lora_run",
    "model.quantize_base": FLOW + "test_a_quantized_base_loads_the_frozen_denoiser_in_4_bits",
    "model.bnb_quantization_config_path": FLOW + "test_a_quantized_base_loads_the_frozen_denoiser_in_4_bits",
}

# Options that change no number of the result, and why.
NO_NUMBERS = {
    "output.output_dir": "where the run is written",
    "output.logging_dir": "where the logs are written",
    "training.set_grads_to_none": "accepted for diffusers' flag; gradients are always freed (zero_grad(set_to_none))",
    "training.pre_compute_text_embeddings": "accepted for diffusers' flag; frozen prompt embeddings are always "
                                            "computed once per prompt (PromptEncoder)",
    "generate.out": "where the images are written",
    "evaluate.out": "where the metrics are written",
    "export.out": "where the export is written",
}

CLI_COMMANDS = ("generate", "evaluate", "export")


def cli_options(command: str) -> list[str]:
    """`command.dest` for every option of a subcommand's parser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [f"{command}.{a.dest}" for a in sub.choices[command]._actions
            if not isinstance(a, argparse._HelpAction)]


def test_every_option_is_accounted_for():
    options = all_keys() + ["subjects"] + [o for c in CLI_COMMANDS for o in cli_options(c)]
    unaccounted = [o for o in options if o not in WIRED and o not in ELSEWHERE and o not in NO_NUMBERS]
    assert not unaccounted, ("options with no wiring test (add one with @wires, or name the test in ELSEWHERE, or "
                             f"say in NO_NUMBERS why no number depends on them): {unaccounted}")
    twice = (set(WIRED) & set(NO_NUMBERS)) | (set(ELSEWHERE) & set(NO_NUMBERS))
    assert not twice, f"listed as wired and as changing no number: {sorted(twice)}"
    stale = sorted((set(WIRED) | set(ELSEWHERE) | set(NO_NUMBERS)) - set(options))
    assert not stale, f"listed, but no such option: {stale}"
    for key, node in ELSEWHERE.items():
        module, name = node.split("::")
        assert hasattr(importlib.import_module(module.removesuffix(".py")), name), f"{key}: no test {node}"


# ---------------------------------------------------------------------------------------------------------------
# Training runs are watched by conftest's `probe` fixture; the helpers below build their inputs.


def solid_folder(folder: Path, colors: list[tuple[int, int, int]], size=(64, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate(colors):
        Image.new("RGB", size, color).save(folder / f"img-{i}.png")
    return folder


def as_pixels(rgb) -> torch.Tensor:
    """An RGB colour as the model sees it: [-1, 1] per channel."""
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1


# ---------------------------------------------------------------------------------------------------------------
# model.*


@wires("model.pretrained_model")
def test_the_named_model_is_the_one_trained(probe, tiny_model_v):
    p = probe(model__pretrained_model=str(tiny_model_v))
    on_disk = load_file(str(tiny_model_v / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(p.before["unet"][k], on_disk[k]) for k in on_disk)
    assert p.run.models.noise_scheduler.config.prediction_type == "v_prediction"


@wires("model.variant")
def test_variant_loads_the_variant_files(probe, tiny_model, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    model = tmp_path / "with-variant"
    shutil.copytree(tiny_model, model)
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        module = cls.from_pretrained(model / sub)
        with torch.no_grad():
            for param in module.parameters():
                param.mul_(1.5)
        module.save_pretrained(model / sub, variant="alt")
    p = probe(model__pretrained_model=str(model), model__variant="alt")
    alt = load_file(str(model / "unet/diffusion_pytorch_model.alt.safetensors"))
    assert all(torch.equal(p.before["unet"][k], alt[k]) for k in alt)


@wires("model.pretrained_vae")
def test_a_separate_vae_encodes_draws_class_images_and_is_saved(probe, tiny_model, tmp_path):
    """--pretrained_vae_model_name_or_path: the VAE training encodes with, the one class images are drawn with
    (their recipe names it, so images of the base VAE are not reused), and the one the saved model carries."""
    import json

    from diffusers import AutoencoderKL

    from dreambooth.errors import UserError

    vae_dir = tmp_path / "vae"
    vae = AutoencoderKL.from_pretrained(tiny_model / "vae")
    with torch.no_grad():
        for param in vae.parameters():
            param.mul_(1.5)
    vae.save_pretrained(vae_dir)
    want = load_file(str(vae_dir / "diffusion_pytorch_model.safetensors"))
    class_dir = tmp_path / "class"
    p = probe(model__pretrained_vae=str(vae_dir), dataset__with_prior_preservation=True,
              dataset__class_dir=str(class_dir), dataset__class_prompt="a photo of dog", dataset__num_class_images=2,
              dataset__class_inference_steps=2)
    used = p.run.models.vae.state_dict()
    assert all(torch.equal(used[k].cpu(), want[k]) for k in want)
    saved = load_file(str(p.out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[k], want[k]) for k in want)
    manifest = json.loads((class_dir / "dreambooth_class_images.json").read_text())
    assert "+vae:" in manifest["model_identity"]
    with pytest.raises(UserError, match="pass .*vae"):
        probe(model__pretrained_vae=str(tiny_model))


@wires("model.revision")
def test_revision_reaches_every_weight_load(probe, monkeypatch):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    seen, depth = [], [0]
    for cls in (AutoencoderKL, DDPMScheduler, UNet2DConditionModel, CLIPTextModel, StableDiffusionPipeline):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            if not depth[0]:  # our calls, not the pipeline's own loading of its parts
                seen.append((klass.__name__, kwargs.get("revision")))
            depth[0] += 1
            try:
                return _real(klass, *args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    probe(model__revision="v1.0")  # a local folder has no revisions: the libraries ignore it there
    loaded = {name for name, _ in seen}
    assert {"UNet2DConditionModel", "CLIPTextModel", "AutoencoderKL", "DDPMScheduler"} <= loaded
    assert all(revision == "v1.0" for _, revision in seen), seen


@wires("model.tokenizer_name", "training.tokenizer_max_length")
def test_tokenizer_folder_and_token_length(probe, tiny_model, tmp_path):
    from transformers import CLIPTokenizer

    folder = tmp_path / "tokenizer"
    tok = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    tok.model_max_length = 12
    tok.save_pretrained(folder)
    assert probe(model__tokenizer_name=str(folder)).calls[0]["embeddings"].shape[1] == 12
    assert probe(training__tokenizer_max_length=10).calls[0]["embeddings"].shape[1] == 10
    own = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer").model_max_length
    assert probe().calls[0]["embeddings"].shape[1] == own


@wires("model.method", "model.train_denoiser", "model.train_text_encoder")
@pytest.mark.parametrize("method,unet,text", [("full", True, False), ("full", False, True), ("full", True, True),
                                               ("lora", True, False), ("lora", False, True)])
def test_what_trains_is_what_is_asked(probe, method, unet, text):
    p = probe(model__method=method, model__train_denoiser=unet, model__train_text_encoder=text,
              training__learning_rate=1e-2)
    for module, wanted in (("unet", unet), ("text_encoder", text)):
        changed = p.changed(module)
        adapters = {n for n in changed if "lora_" in n}
        if not wanted:
            assert not changed, f"{module} changed though it should not train"
        elif method == "lora":
            assert adapters and adapters == changed, f"{module}: only its LoRA adapters should change"
        else:
            assert changed and not adapters
    assert not any(p.requires_grad for p in p.run.models.vae.parameters())


@wires("model.enable_xformers_memory_efficient_attention")
def test_xformers_attention_is_switched_on(probe, monkeypatch):
    from diffusers import UNet2DConditionModel

    calls, real = [], importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "xformers" else real(name, *a))
    monkeypatch.setattr(UNet2DConditionModel, "enable_xformers_memory_efficient_attention",
                        lambda self: calls.append(self))
    probe(model__enable_xformers_memory_efficient_attention=True)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------------
# token.*


@wires("token.identifier", "token.initializer", "token.class_word")
def test_new_identifier_starts_as_its_initializer_and_only_its_row_learns(probe):
    p = probe(token__identifier="<zwx>", token__initializer="cat", token__class_word="dog",
              dataset__instance_prompt=None)
    assert {c["prompts"][0] for c in p.calls} == {"a photo of <zwx> dog"}
    tok = p.run.models.tokenizer
    new, cat, dog = (tok.convert_tokens_to_ids(t) for t in ("<zwx>", "cat</w>", "dog</w>"))
    embedding = p.run.models.text_encoder.get_input_embeddings().weight
    key = next(n for n, q in p.run.models.text_encoder.named_parameters() if q is embedding)
    before = p.before["text_encoder"][key]
    assert torch.equal(before[new], before[cat]) and not torch.equal(before[new], before[dog])
    after = embedding.detach()
    assert p.changed("text_encoder") == {key}
    assert [i for i in range(len(after)) if not torch.equal(after[i], before[i])] == [new]


# ---------------------------------------------------------------------------------------------------------------
# training.*: what reaches the optimizer


@wires("training.learning_rate", "training.text_encoder_lr", "training.adam_weight_decay")
@pytest.mark.parametrize("method", ["full", "lora"])
def test_each_optimizer_group_gets_its_rate_and_decay(probe, method):
    p = probe(model__method=method, model__train_text_encoder=True, token__identifier="<zwx>",
              token__class_word="dog", dataset__instance_prompt=None, training__learning_rate=3e-3,
              training__text_encoder_lr=7e-4, training__adam_weight_decay=0.05)
    embedding = p.run.models.text_encoder.get_input_embeddings().weight
    unet, text = p.trainable("unet"), p.trainable("text_encoder")
    assert unet and len(text) > 1
    if method == "lora":
        assert all("lora_" in n for n in unet) and all("lora_" in n or p_ is embedding for n, p_ in text.items())
    for param in unet.values():
        assert (p.group_of(param)["lr"], p.group_of(param)["weight_decay"]) == (3e-3, 0.05)
    for param in text.values():
        group = p.group_of(param)
        # A lone new-token row gets no decay (it would shrink the frozen rows); a wholly trained encoder does.
        decay = 0.0 if param is embedding and method == "lora" else 0.05
        assert (group["lr"], group["weight_decay"]) == (7e-4, decay)
    assert sum(len(g["params"]) for g in p.groups()) == len(unet) + len(text)
    assert p.updates[0]["lrs"] == [g["lr"] for g in p.groups()]


@wires("training.adam_weight_decay_text_encoder")
def test_the_text_side_can_have_its_own_weight_decay(probe):
    p = probe(model__train_text_encoder=True, training__adam_weight_decay=0.05,
              training__adam_weight_decay_text_encoder=0.3)
    assert {p.group_of(q)["weight_decay"] for q in p.trainable("text_encoder").values()} == {0.3}
    assert {p.group_of(q)["weight_decay"] for q in p.trainable("unet").values()} == {0.05}


@wires("training.scale_lr")
def test_scale_lr_multiplies_by_batch_and_accumulation(probe):
    p = probe(training__scale_lr=True, training__batch_size=2, training__gradient_accumulation_steps=2,
              training__learning_rate=1e-3)
    assert [u["lrs"] for u in p.updates] == [[pytest.approx(4e-3)]] * 2


@wires("training.adam_beta1", "training.adam_beta2", "training.adam_epsilon")
def test_adam_settings_reach_the_optimizer(probe):
    p = probe(training__adam_beta1=0.8, training__adam_beta2=0.95, training__adam_epsilon=1e-6)
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in p.groups())


@wires("training.use_8bit_adam")
@pytest.mark.parametrize("asked", [{"training__use_8bit_adam": True}, {"training__optimizer": "adamw8bit"}],
                         ids=["use_8bit_adam", "optimizer"])
def test_8bit_adam_is_the_optimizer(probe, monkeypatch, asked):
    made = []

    class AdamW8bit(torch.optim.AdamW):  # bitsandbytes needs CUDA; this stand-in records that it was chosen
        def __init__(self, params, **kwargs):
            made.append(kwargs)
            super().__init__(params, **kwargs)

    fake = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=AdamW8bit))
    real = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    p = probe(training__adam_beta1=0.7, **asked)
    assert isinstance(getattr(p.run.optimizer, "optimizer", p.run.optimizer), AdamW8bit)
    assert made == [{"betas": (0.7, 0.999), "eps": 1e-8}]
    assert json.loads((p.out / "run_info.json").read_text())["optimizer"] == "adamw8bit"


# What each optimizer keeps per parameter: the proof that its own step ran on the weights.
OPTIMIZER_STATE = {"Prodigy": {"step", "s", "p0", "exp_avg", "exp_avg_sq"}, "Lion": {"exp_avg"}}


@wires("training.optimizer")
@pytest.mark.parametrize("name,cls,lr", [("Prodigy", "Prodigy", 1.0), ("lion", "Lion", 1e-4)])
def test_the_chosen_optimizer_steps_the_weights(probe, name, cls, lr):
    """--optimizer (any case, as diffusers' commands write it) builds that optimizer, and its step is the one that
    moves the weights: every trained tensor holds its kind of state, no other; the run records its name."""
    p = probe(training__optimizer=name, training__learning_rate=lr)
    inner = p.run.optimizer.optimizer
    assert type(inner).__name__ == cls and len(p.updates) == 2  # the probe counts calls of this object's step
    trained = list(p.trainable("unet").values())
    assert trained and all(set(inner.state[q]) == OPTIMIZER_STATE[cls] for q in trained)
    assert p.changed("unet") == set(p.trainable("unet"))
    assert json.loads((p.out / "run_info.json").read_text())["optimizer"] == name.lower()
    assert f"<tr><th>optimizer</th><td>{name.lower()}</td></tr>" in (p.out / "report.html").read_text()


@wires("training.prodigy_beta3", "training.prodigy_decouple", "training.prodigy_use_bias_correction",
       "training.prodigy_safeguard_warmup", "training.prodigy_d_coef")
def test_prodigy_settings_reach_its_groups(probe):
    """Each --prodigy_* setting, and AdamW's betas, epsilon and weight decay (as diffusers passes them), in every
    group of the Prodigy that stepped, with a new token's group beside the UNet's (Prodigy needs one learning rate
    for both); its step-size estimate is logged."""
    p = probe(training__optimizer="prodigy", training__learning_rate=2.0, token__identifier="<zwx>",
              token__class_word="dog", dataset__instance_prompt=None, training__prodigy_beta3=0.95,
              training__prodigy_decouple=False, training__prodigy_use_bias_correction=False,
              training__prodigy_safeguard_warmup=False, training__prodigy_d_coef=3.0, training__adam_beta1=0.8,
              training__adam_beta2=0.99, training__adam_epsilon=1e-6, training__adam_weight_decay=0.05)
    groups = p.groups()
    assert len(groups) == 2 and type(p.run.optimizer.optimizer).__name__ == "Prodigy"
    assert all((g["beta3"], g["decouple"], g["use_bias_correction"], g["safeguard_warmup"], g["d_coef"], g["betas"],
                g["eps"], g["lr"]) == (0.95, False, False, False, 3.0, (0.8, 0.99), 1e-6, 2.0) for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # none on the new token's rows
    assert p.log[-1]["prodigy_d"] == groups[0]["d"]


@wires("training.adam_beta1", "training.adam_beta2", "training.adam_weight_decay")
def test_lion_takes_adams_betas_and_the_weight_decay(probe):
    p = probe(training__optimizer="lion", training__learning_rate=1e-4, training__adam_beta1=0.95,
              training__adam_beta2=0.98, training__adam_weight_decay=0.1)
    assert [(g["betas"], g["weight_decay"]) for g in p.groups()] == [((0.95, 0.98), 0.1)]


@pytest.mark.numerics
@wires("training.max_grad_norm")
def test_gradients_are_clipped_to_max_grad_norm(probe):
    unclipped = probe(training__max_grad_norm=1e6).updates
    clipped = probe(training__max_grad_norm=1e-3).updates
    assert all(u["grad_norm"] > 1e-2 for u in unclipped)
    assert all(u["grad_norm"] <= 1e-3 * 1.001 for u in clipped)


@wires("training.max_train_steps", "training.gradient_accumulation_steps")
def test_accumulation_steps_the_optimizer_every_n_batches(probe):
    p = probe(training__max_train_steps=3, training__gradient_accumulation_steps=2, output__checkpointing_steps=3)
    assert len(p.calls) == 6 and len(p.updates) == 3
    state = json.loads((p.out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


@wires("training.num_train_epochs")
def test_epochs_set_the_step_count(probe):
    # 4 photos, 1 a batch, 2 batches an optimizer step: 2 steps an epoch.
    p = probe(training__max_train_steps=None, training__num_train_epochs=2, training__gradient_accumulation_steps=2)
    assert len(p.calls) == 8 and len(p.updates) == 4


@wires("training.batch_size", "training.resolution")
def test_batch_size_and_resolution_shape_the_batch(probe):
    p = probe(training__batch_size=2, training__resolution=32)
    assert {tuple(c["pixels"].shape) for c in p.calls} == {(2, 3, 32, 32)}


def schedule(name: str, k: int, total: int, warmup: int, cycles: int, power: float, lr: float) -> float:
    """diffusers' schedules, written out from their definitions (the learning rate of update k, from 0)."""
    if name == "constant":
        return lr
    if k < warmup:
        return lr * k / warmup
    progress = (k - warmup) / (total - warmup)
    if name == "constant_with_warmup":
        return lr
    if name == "linear":
        return lr * max(0.0, (total - k) / (total - warmup))
    if name == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "cosine_with_restarts":
        return lr * 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    end = 1e-7  # polynomial decays to diffusers' lr_end
    return (lr - end) * (1 - progress) ** power + end


@wires("training.lr_scheduler", "training.lr_warmup_steps", "training.lr_num_cycles", "training.lr_power")
@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
def test_learning_rate_follows_the_schedule(probe, name):
    p = probe(training__lr_scheduler=name, training__lr_warmup_steps=2, training__lr_num_cycles=2,
              training__lr_power=2.0, training__max_train_steps=6, training__learning_rate=1e-3)
    want = [schedule(name, k, 6, 2, 2, 2.0, 1e-3) for k in range(6)]
    assert [u["lrs"][0] for u in p.updates] == pytest.approx(want, abs=1e-12)


@wires("training.mixed_precision")
def test_mixed_precision_runs_frozen_parts_in_half_and_keeps_trained_weights_fp32(probe):
    p = probe(training__mixed_precision="bf16")
    m = p.run.models
    assert p.before["autocast"] == torch.bfloat16  # the UNet's forward
    assert m.vae.dtype == torch.bfloat16 and m.text_encoder.dtype == torch.bfloat16
    assert all(q.dtype == torch.float32 for q in p.trainable("unet").values())


@wires("training.gradient_checkpointing")
def test_gradient_checkpointing_is_switched_on(probe):
    p = probe(training__gradient_checkpointing=True, model__train_text_encoder=True)
    assert p.run.models.unet.is_gradient_checkpointing
    assert p.run.models.text_encoder.is_gradient_checkpointing


@wires("training.allow_tf32")
def test_tf32_follows_the_setting_both_ways():
    from dreambooth.training.speed import set_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for value in (False, True, False):
            set_tf32(load_config(None, {"training.allow_tf32": value, "model.pretrained_model": "m",
                                        "dataset.instance_prompt": "a photo of sks dog"}))
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (value, value)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@wires("training.snr_gamma", "training.noise_offset", "training.seed", "training.text_encoder_use_attention_mask")
def test_loss_options_change_the_first_step(probe):
    """Their formulas are checked in test_step_known_answers.py; here, that each reaches the step of a real run."""
    base = probe().calls[0]["loss"]
    for option, value in (("training__snr_gamma", 1e-4), ("training__noise_offset", 0.5), ("training__seed", 1),
                          ("training__text_encoder_use_attention_mask", True)):
        assert probe(**{option: value}).calls[0]["loss"] != pytest.approx(base, rel=1e-6), option
    assert probe().calls[0]["loss"] == base


@wires("training.dataloader_num_workers")
def test_data_loader_gets_its_workers(instance_dir):
    from dreambooth.training.components import make_dataloader

    cfg = load_config(None, {"model.pretrained_model": "m", "dataset.instance_dir": str(instance_dir),
                             "dataset.instance_prompt": "a photo of sks dog", "training.seed": 0,
                             "training.dataloader_num_workers": 2})
    assert make_dataloader(cfg, cfg.subject_list(), [sorted(instance_dir.iterdir())], None).num_workers == 2


@wires("training.latent_cache")
def test_latent_cache_mode_reaches_the_cache(probe, monkeypatch):
    modes = []
    real = train_module.LatentCache

    def spy(vae, mode, *args, **kwargs):
        modes.append(mode)
        return real(vae, mode, *args, **kwargs)

    monkeypatch.setattr(train_module, "LatentCache", spy)
    probe(training__latent_cache="off")
    disk = probe(training__latent_cache="disk")
    assert modes == ["off", "disk"]
    assert list((disk.out / "latent_cache").glob("*.safetensors"))


@wires("training.channels_last")
def test_channels_last_reaches_the_unet(probe):
    unet = probe(training__channels_last=True).run.models.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@wires("training.compile")
def test_compile_reaches_the_unet_forward(tiny_model, monkeypatch):
    """The step runs what speed_up leaves in unet.forward (on a GPU: tests/test_gpu.py trains with it)."""
    from diffusers import UNet2DConditionModel

    from dreambooth.training.speed import speed_up

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(fn) or (lambda *a, **k: "compiled"))
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    own = unet.forward
    cfg = load_config(None, {"model.pretrained_model": str(tiny_model), "dataset.instance_prompt": "a sks dog",
                             "training.compile": True})
    speed_up(cfg, SimpleNamespace(denoiser=unet), SimpleNamespace(unwrap_model=lambda m: m))
    assert compiled == [own] and unet(None) == "compiled"


@wires("training.compile")
def test_compile_is_refused_without_a_gpu(probe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"training.compile \(--torch_compile\) needs a CUDA GPU"):
        probe(training__compile=True)


@wires("training.cpu_convolution")
def test_cpu_convolution_choice_holds_during_the_steps(probe):
    assert {c["onednn"] for c in probe(training__cpu_convolution="native").calls} == {False}
    assert {c["onednn"] for c in probe(training__cpu_convolution="onednn").calls} == {True}


# ---------------------------------------------------------------------------------------------------------------
# training.*: the EMA of the weights (its update formula by hand: test_ema.py)


def watch_ema(monkeypatch) -> list[dict]:
    """Each EMA update's input: the trained weights by slot name, and the decay it used."""
    from dreambooth.training import ema

    seen, real = [], ema.WeightAverage.update

    def update(self):
        weights = {slot.name: slot.read().clone() for slot in self.slots}
        real(self)
        seen.append({"weights": weights, "decay": self.schedule.cur_decay_value})

    monkeypatch.setattr(ema.WeightAverage, "update", update)
    return seen


def ema_by_hand(start: dict, updates: list[dict]) -> dict:
    """The EMA of the per-step weights, from `start`: s -= (1 - decay) * (s - w) after each step."""
    average = {k: v.clone() for k, v in start.items()}
    for u in updates:
        for k, s in average.items():
            s.sub_(s - u["weights"][k], alpha=1 - u["decay"])
    return average


@wires("training.use_ema", "training.ema_decay", "training.ema_update_after_step")
def test_ema_is_what_validation_draws_and_what_is_saved(probe, monkeypatch, pipeline_calls):
    """With --use_ema the saved UNet is the EMA of the weights each step left (not the last step's), with the
    decays diffusers' schedule gives: none until ema_update_after_step, then (1 + t) / (10 + t), at most ema_decay;
    validation draws with it, and training goes on from the trained weights."""
    calls, _ = pipeline_calls
    updates = watch_ema(monkeypatch)
    p = probe(training__use_ema=True, training__ema_decay=0.2, training__ema_update_after_step=1,
              training__max_train_steps=4, validation__prompts=["a photo of sks dog"], validation__steps=2,
              validation__num_images=1, validation__num_inference_steps=1)
    assert [u["decay"] for u in updates] == [0.0, 0.0, 2 / 11, 0.2]  # the 4th: (1 + 2) / (10 + 2) capped at 0.2
    start = {f"unet.{k}": v for k, v in p.before["unet"].items()}
    saved = load_file(str(p.out / "unet/diffusion_pytorch_model.safetensors"))
    want = ema_by_hand(start, updates)
    assert all(torch.equal(saved[k], want[f"unet.{k}"]) for k in saved)
    live = dict(p.run.models.unet.named_parameters())  # the last step's weights, which training goes on from
    assert any(not torch.equal(saved[k], live[k].detach()) for k in saved)
    assert all(torch.equal(live[k].detach(), updates[-1]["weights"][f"unet.{k}"]) for k in saved)
    drawn = [c["unet"] for c in calls]
    assert len(drawn) == 2  # steps 2 and 4
    for unet, step in zip(drawn, (2, 4)):
        at_step = ema_by_hand(start, updates[:step])
        assert all(torch.equal(unet[k], at_step[f"unet.{k}"]) for k in saved)


@wires("training.ema_warmup")
def test_ema_warmup_uses_diffusers_warmup_decay(probe, monkeypatch):
    updates = watch_ema(monkeypatch)
    probe(training__use_ema=True, training__ema_warmup=True, training__max_train_steps=3)
    # 1 - (1 + t)^(-2/3) after t updates (EMAModel's inv_gamma 1, power 2/3)
    assert [u["decay"] for u in updates] == [0.0, 1 - 2 ** (-2 / 3), 1 - 3 ** (-2 / 3)]


@wires("training.ema_on_cpu")
def test_ema_on_cpu_holds_the_average_apart_and_gives_the_same_numbers(probe, monkeypatch):
    """On this CPU-only machine the weights are in CPU memory too, so what can be checked is that the average is
    held apart from them and updated through the path that visits the weights' device one tensor at a time
    (tests/test_gpu.py checks it stays in CPU memory beside CUDA weights)."""
    from dreambooth.training import ema

    moved, real_to, real_update = [], torch.Tensor.to, ema.WeightAverage.update

    def update(self):  # each tensor the update sends to a device, and where
        def to(tensor, *args, **kwargs):
            moved.append(str(args[0]))
            return real_to(tensor, *args, **kwargs)

        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch.Tensor, "to", to)
            real_update(self)

    monkeypatch.setattr(ema.WeightAverage, "update", update)
    on_device = probe(training__use_ema=True, training__max_train_steps=3)
    assert moved == []  # the average beside the weights: updated where it is
    on_cpu = probe(training__use_ema=True, training__ema_on_cpu=True, training__max_train_steps=3)
    average = on_cpu.run.ema
    assert average.on_cpu and not on_device.run.ema.on_cpu
    assert all(held.device.type == "cpu" and held.data_ptr() != slot.param.data_ptr()
               for held, slot in zip(average.shadow, average.slots))
    assert moved == ["cpu"] * (3 * len(average.slots))  # to the weights' device (here the CPU), every update
    a, b = (load_file(str(run.out / "unet/diffusion_pytorch_model.safetensors")) for run in (on_device, on_cpu))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# dataset.*


RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 230)


@pytest.mark.numerics
@wires("dataset.instance_dir", "dataset.instance_prompt", "dataset.class_dir", "dataset.class_prompt",
       "dataset.with_prior_preservation", "training.prior_loss_weight")
def test_prior_preservation_pairs_each_photo_with_a_class_image(probe, tmp_path):
    photos = solid_folder(tmp_path / "red", [RED] * 3)
    classes = solid_folder(tmp_path / "blue", [BLUE] * 4)
    p = probe(dataset__instance_dir=str(photos), dataset__class_dir=str(classes), dataset__with_prior_preservation=True,
              dataset__instance_prompt="a photo of sks toy", dataset__class_prompt="a photo of a toy",
              dataset__num_class_images=4, training__prior_loss_weight=0.25)
    for c in p.calls:
        assert c["is_prior"].tolist() == [False, True]
        assert c["prompts"] == ["a photo of sks toy", "a photo of a toy"]
        assert torch.allclose(c["pixels"][0], as_pixels(RED).expand(3, 64, 64), atol=1e-6)
        assert torch.allclose(c["pixels"][1], as_pixels(BLUE).expand(3, 64, 64), atol=1e-6)
        assert c["loss"] == pytest.approx(c["instance_loss"] + 0.25 * c["prior_loss"], rel=1e-5)
        assert c["prior_loss"] > 0
    without = probe(dataset__instance_dir=str(photos), dataset__class_dir=str(classes),
                    dataset__with_prior_preservation=False)
    assert all(c["is_prior"].tolist() == [False] and c["prior_loss"] == 0 for c in without.calls)


@wires("dataset.num_class_images", "dataset.sample_batch_size", "dataset.class_inference_steps",
       "dataset.prior_generation_precision")
def test_class_image_generation_settings(probe, tmp_path, pipeline_calls):
    calls, _ = pipeline_calls
    p = probe(dataset__with_prior_preservation=True, dataset__class_dir=str(tmp_path / "class"),
              dataset__class_prompt="a photo of dog", dataset__num_class_images=3, dataset__sample_batch_size=2,
              dataset__class_inference_steps=2, dataset__prior_generation_precision="bf16")
    assert [(len(c["prompt"]), c["num_inference_steps"], c["dtype"]) for c in calls] == [
        (2, 2, torch.bfloat16), (1, 2, torch.bfloat16)]
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 3
    assert all(c["is_prior"].tolist() == [False, True] for c in p.calls)


def stripes(path: Path, colors, size=(64, 96), vertical=False) -> None:
    """Bands of colour: across the height (top to bottom), or across the width with vertical=True."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    n = len(colors)
    for i, color in enumerate(colors):
        if vertical:
            a[:, i * w // n:(i + 1) * w // n] = color
        else:
            a[i * h // n:(i + 1) * h // n] = color
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


@pytest.mark.numerics
@wires("dataset.center_crop")
def test_center_crop_takes_the_middle(probe, tmp_path):
    stripes(tmp_path / "tall" / "a.png", [RED, GREEN, BLUE])  # 64 x 96: the middle 64 rows are 16 red, 32 green...
    middle = np.asarray(Image.open(tmp_path / "tall" / "a.png"))[16:80]
    want = torch.from_numpy(middle).permute(2, 0, 1).float() / 127.5 - 1
    crops = [c["pixels"][0] for c in probe(dataset__instance_dir=str(tmp_path / "tall"), dataset__center_crop=True,
                                           training__max_train_steps=4).calls]
    assert all(torch.allclose(x, want, atol=1e-6) for x in crops)
    randomly = [c["pixels"][0] for c in probe(dataset__instance_dir=str(tmp_path / "tall"),
                                              training__max_train_steps=6).calls]
    assert not all(torch.allclose(x, want, atol=1e-6) for x in randomly)


@wires("dataset.random_flip")
def test_random_flip_mirrors_some_batches(probe, tmp_path):
    stripes(tmp_path / "halves" / "a.png", [RED, BLUE], size=(64, 64), vertical=True)

    def left_is_red(flip: bool) -> set[bool]:
        p = probe(dataset__instance_dir=str(tmp_path / "halves"), dataset__random_flip=flip,
                  training__max_train_steps=8)
        return {bool(c["pixels"][0, 0, 0, 0] > 0) for c in p.calls}

    assert left_is_red(False) == {True}
    assert left_is_red(True) == {True, False}


@wires("dataset.masked_loss")
def test_masked_loss_leaves_what_the_mask_hides_untrained(probe, tmp_path, monkeypatch):
    """Each 64 px photo's NAME.mask.png is black over its left half: the left 8 of the 16 latent columns. With
    --masked_loss the loss there adds nothing, so the gradient reaching the denoiser's prediction is exactly zero on
    them and not on the others; without it, the same first step (same seed, same noise) has another loss and a
    gradient everywhere."""
    from conftest import photo_folder

    from dreambooth.models.families import sd

    photos = photo_folder(tmp_path / "masked", 2, size=64)
    for photo in sorted(photos.glob("*.png")):
        mask = np.full((64, 64), 255, dtype=np.uint8)
        mask[:, :32] = 0
        Image.fromarray(mask).save(photo.with_name(photo.stem + ".mask.png"))
    seen, real = [], sd.dreambooth_loss

    def spy(pred, target, is_prior, prior_loss_weight, weights=None, mask=None):
        seen.append({"mask": mask})
        pred.register_hook(lambda grad, row=seen[-1]: row.update(grad=grad.detach().clone()))
        return real(pred, target, is_prior, prior_loss_weight, weights, mask)

    monkeypatch.setattr(sd, "dreambooth_loss", spy)
    masked = probe(dataset__instance_dir=str(photos), dataset__masked_loss=True)
    with_mask, seen[:] = list(seen), []
    plain = probe(dataset__instance_dir=str(photos))
    assert masked.calls[0]["loss"] != plain.calls[0]["loss"]
    assert all(row["mask"] is None for row in seen)
    for row in with_mask:
        grad, mask = row["grad"], row["mask"]
        assert mask.shape == (1, 1, 16, 16) and mask[..., :8].eq(0).all() and mask[..., 8:].eq(1).all()
        assert grad[..., :8].eq(0).all() and grad[..., 8:].ne(0).any()
    assert all(row["grad"][..., :8].ne(0).any() for row in seen)


# ---------------------------------------------------------------------------------------------------------------
# lora.*


@wires("lora.rank", "lora.alpha", "lora.dropout", "lora.denoiser_target_modules", "lora.text_encoder_target_modules")
def test_lora_shape_scale_dropout_and_targets(probe):
    p = probe(model__method="lora", model__train_text_encoder=True, lora__rank=3, lora__alpha=6.0,
              lora__dropout=0.1, lora__denoiser_target_modules=["to_q", "to_v"],
              lora__text_encoder_target_modules=["q_proj"])
    for module, targets in (("unet", {"to_q", "to_v"}), ("text_encoder", {"q_proj"})):
        layers = {n: m for n, m in getattr(p.run.models, module).named_modules() if hasattr(m, "lora_A")}
        assert layers and {n.rsplit(".", 1)[-1] for n in layers} == targets
        for layer in layers.values():
            assert layer.lora_A["default"].weight.shape[0] == 3
            assert layer.scaling["default"] == 2.0
            assert layer.lora_dropout["default"].p == 0.1


@wires("lora.adapter", "lora.lokr_factor")
def test_the_adapter_kind_and_lokr_factor_shape_what_trains(probe):
    """Each kind puts its own peft layers on the UNet and text encoder, and they are what the optimizer moves; LoKr's
    factor sizes its first factor (a 16-wide projection splits 4 x 4 by default, 2 x 8 with factor 2)."""
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer
    from peft.tuners.lora.layer import LoraLayer

    kinds = {"dora": (LoraLayer, "lora_magnitude_vector"), "lokr": (LoKrLayer, "lokr_w1"),
             "loha": (LoHaLayer, "hada_w1_a")}
    for kind, (cls, parameter) in kinds.items():
        p = probe(model__method="lora", model__train_text_encoder=True, lora__adapter=kind, lora__rank=2)
        for module in ("unet", "text_encoder"):
            layers = [m for m in getattr(p.run.models, module).modules() if isinstance(m, cls)]
            assert layers and all("default" in getattr(m, parameter) for m in layers)
            assert not any(isinstance(m, tuple(c for c, _ in kinds.values() if c is not cls))
                           for m in getattr(p.run.models, module).modules())
            assert any(parameter in name for name in p.changed(module)), f"{kind}: no {parameter} trained"
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    for factor, shape in ((-1, (4, 4)), (2, (2, 2))):
        p = probe(model__method="lora", lora__adapter="lokr", lora__rank=2, lora__lokr_factor=factor)
        layer = dict(p.run.models.unet.named_modules())[to_q]
        assert tuple(layer.lokr_w1["default"].shape) == shape


# ---------------------------------------------------------------------------------------------------------------
# validation.* and output.*


@wires("validation.prompts", "validation.steps", "validation.num_images", "validation.negative_prompt",
       "validation.num_inference_steps", "validation.guidance_scale", "validation.scheduler", "validation.seed")
def test_validation_settings_reach_the_sampler(probe, monkeypatch):
    from dreambooth import generate

    seen, real = [], generate.generate_images

    def spy(pipe, settings, **kwargs):
        seen.append((type(pipe.scheduler).__name__, settings))
        return real(pipe, settings, **kwargs)

    monkeypatch.setattr(generate, "generate_images", spy)
    p = probe(validation__prompts=["a photo of sks dog", "a dog"], validation__steps=2, validation__num_images=2,
              validation__negative_prompt="blurry", validation__num_inference_steps=3,
              validation__guidance_scale=4.0, validation__scheduler="euler", validation__seed=5,
              training__max_train_steps=4)
    assert len(seen) == 2 and {name for name, _ in seen} == {"EulerDiscreteScheduler"}
    s = seen[0][1]
    assert (s.prompts, s.num_images, s.negative_prompt, s.steps, s.guidance, s.seeds) == (
        ["a photo of sks dog", "a dog"], 2, "blurry", 3, 4.0, [5])
    assert sorted(x.name for x in (p.out / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert Image.open(p.out / "samples" / "step-000002.png").size == (2 * 64, 2 * 64)


@wires("validation.epochs")
def test_validation_epochs_count_passes_over_the_photos(probe):
    # 4 photos, 1 a batch, 2 batches an optimizer step: an epoch is 2 steps, 2 epochs are 4; validation.steps gives
    # way. Then the last step, as with validation.steps.
    p = probe(validation__prompts=["a photo of sks dog"], validation__epochs=2, validation__steps=1,
              validation__num_images=1, validation__num_inference_steps=1, training__gradient_accumulation_steps=2,
              training__max_train_steps=5)
    assert sorted(x.name for x in (p.out / "samples").iterdir()) == ["step-000004.png", "step-000005.png"]


@wires("output.checkpointing_steps", "output.checkpoints_total_limit")
def test_checkpoints_every_n_steps_and_only_the_newest_kept(probe):
    p = probe(training__max_train_steps=5, output__checkpointing_steps=2, output__checkpoints_total_limit=1)
    assert [x.name for x in p.out.glob("checkpoint-*")] == ["checkpoint-4"]
    unlimited = probe(training__max_train_steps=5, output__checkpointing_steps=2)
    assert sorted(x.name for x in unlimited.out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@wires("output.logging_steps")
def test_loss_is_logged_every_n_steps(probe):
    p = probe(training__max_train_steps=5, output__logging_steps=2)
    assert [r["step"] for r in p.log] == [1, 2, 4, 5]


@wires("output.save_precision", "output.skip_save_text_encoder")
def test_saved_model_precision_and_text_encoder(probe):
    half = probe(output__save_precision="fp16")
    unet = load_file(str(half.out / "unet/diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in unet.values()} == {torch.float16}
    assert (half.out / "text_encoder").is_dir()
    skipped = probe(output__skip_save_text_encoder=True)
    assert not (skipped.out / "text_encoder").exists()
    assert json.loads((skipped.out / "model_index.json").read_text())["text_encoder"] == [None, None]


# ---------------------------------------------------------------------------------------------------------------
# generate and evaluate: the command's options reach the pipeline call


@wires(*(f"generate.{o}" for o in ("model", "prompt", "prompts_file", "negative_prompt", "steps", "guidance",
                                   "seeds", "num_images", "scheduler", "height", "width", "precision", "device")))
def test_generate_options_reach_the_pipeline(tiny_model_v, tmp_path, pipeline_calls):
    from dreambooth.generate import image_seed

    calls, devices = pipeline_calls
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on the beach\n")
    assert main(["generate", "--model", str(tiny_model_v), "--prompt", "a photo of sks dog", "--prompts-file",
                 str(prompts), "--negative-prompt", "blurry", "--steps", "3", "--guidance", "4.5", "--seed", "3",
                 "--seed", "8", "--num-images", "2", "--scheduler", "euler", "--height", "48", "--width", "32",
                 "--precision", "bf16", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert devices == ["cpu"]
    drawn = [(prompt, seed) for c in calls for prompt, seed in zip(c["prompt"], c["seeds"])]
    assert sorted(drawn) == sorted((p, image_seed(s, k)) for p in ("a photo of sks dog", "a cat on the beach")
                                   for s in (3, 8) for k in range(2))
    on_disk = load_file(str(tiny_model_v / "unet/diffusion_pytorch_model.safetensors"))
    for c in calls:
        assert c["negative_prompt"] == ["blurry"] * len(c["prompt"])
        assert (c["num_inference_steps"], c["guidance_scale"], c["height"], c["width"]) == (3, 4.5, 48, 32)
        assert (c["scheduler"], c["dtype"]) == ("EulerDiscreteScheduler", torch.bfloat16)
        assert all(torch.equal(c["unet"][k], on_disk[k].to(torch.bfloat16)) for k in on_disk)


@wires(*(f"evaluate.{o}" for o in ("model", "prompt", "prompts_file", "seeds", "num_images", "steps", "guidance",
                                   "scheduler", "device")))
def test_evaluate_generation_options_reach_the_pipeline(tiny_model, tmp_path, real_dir, dino_dir, pipeline_calls):
    from dreambooth.generate import image_seed

    calls, devices = pipeline_calls
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog on a beach\n")
    assert main(["evaluate", "--real", str(real_dir), "--identifier", "sks", "--class-word", "dog", "--model",
                 str(tiny_model), "--prompt", "a photo of sks dog", "--prompts-file", str(prompts), "--seed", "2",
                 "--num-images", "2", "--steps", "3", "--guidance", "5.0", "--scheduler", "ddim", "--dino",
                 str(dino_dir), "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert devices[0] == "cpu"
    drawn = [(prompt, seed) for c in calls for prompt, seed in zip(c["prompt"], c["seeds"])]
    assert sorted(drawn) == sorted((p, image_seed(2, k)) for p in ("a photo of sks dog", "sks dog on a beach")
                                   for k in range(2))
    on_disk = load_file(str(tiny_model / "unet/diffusion_pytorch_model.safetensors"))
    for c in calls:
        assert (c["num_inference_steps"], c["guidance_scale"], c["scheduler"]) == (3, 5.0, "DDIMScheduler")
        assert all(torch.equal(c["unet"][k], on_disk[k]) for k in on_disk)


@pytest.mark.numerics
@wires("generate.lora", "evaluate.lora", "export.src", "export.format", "export.half", "export.merge_lora")
def test_lora_options_reach_generation_and_export(probe, tiny_model, tmp_path, real_dir, dino_dir, pipeline_calls):
    calls, _ = pipeline_calls
    lora = probe(model__method="lora", training__learning_rate=1e-2).out
    common = ["--model", str(tiny_model), "--prompt", "a photo of sks dog", "--steps", "2"]
    assert main(["generate", *common, "--lora", f"{lora}:0.5", "--out", str(tmp_path / "gen")]) == 0
    assert main(["evaluate", *common, "--lora", f"{lora}:0.25", "--num-images", "1", "--real", str(real_dir),
                 "--identifier", "sks", "--class-word", "dog", "--dino", str(dino_dir), "--out",
                 str(tmp_path / "eval")]) == 0
    assert [c["lora_scales"] for c in calls] == [{0.5}, {0.25}]  # weight x alpha / rank, alpha = rank

    assert main(["export", str(lora), "--format", "kohya", "--half", "--out", str(tmp_path / "k.safetensors")]) == 0
    kohya = load_file(str(tmp_path / "k.safetensors"))
    assert any(k.startswith("lora_unet_") for k in kohya)
    assert {v.dtype for k, v in kohya.items() if not k.endswith(".alpha")} == {torch.float16}
    assert main(["export", str(tiny_model), "--format", "diffusers", "--merge-lora", f"{lora}:0.5", "--out",
                 str(tmp_path / "merged")]) == 0
    base = load_file(str(tiny_model / "unet/diffusion_pytorch_model.safetensors"))
    merged = load_file(str(tmp_path / "merged/unet/diffusion_pytorch_model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".to_" in k for k in changed)  # the adapted attention projections, nothing else
    assert main(["export", str(tiny_model), "--format", "diffusers", "--merge-lora", str(lora), "--out",
                 str(tmp_path / "whole")]) == 0
    whole = load_file(str(tmp_path / "whole/unet/diffusion_pytorch_model.safetensors"))
    for k in changed:  # at weight 0.5, half the change
        assert torch.allclose(merged[k] - base[k], 0.5 * (whole[k] - base[k]), atol=1e-6)
