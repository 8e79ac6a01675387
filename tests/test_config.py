"""The config: the YAML of docs/design.md as written, diffusers' flags, and every problem reported at once by key."""

import textwrap
import typing
from pathlib import Path

import pytest

from dreambooth.cli import build_parser, config_overrides
from dreambooth.config import SECTION_TYPES, Config, all_keys, field_flags
from dreambooth.config_file import dump_config, load_config
from dreambooth.errors import UserError

DESIGN_YAML = """\
model:    {pretrained_model: stabilityai/stable-diffusion-2-1-base, train_unet: true, train_text_encoder: false}
token:    {identifier: "<saya_token>", initializer: "girl"}
training: {resolution: 512, batch_size: 1, gradient_accumulation_steps: 4, learning_rate: 5e-6,
           max_train_steps: 800, prior_loss_weight: 1.0}
dataset:  {instance_dir: data/instance, class_dir: data/class}
"""


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def overrides(argv):
    return config_overrides(build_parser().parse_args(["train", *argv]))


def test_design_yaml_loads_as_written(tmp_path):
    path = write(tmp_path, DESIGN_YAML)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "instance.txt").write_text("# comment\na photo of {identifier} girl\n")
    (tmp_path / "prompts" / "class.txt").write_text("a photo of a girl\n")
    cfg = load_config(path)
    assert cfg.training.learning_rate == 5e-6  # YAML reads 5e-6 as a string
    assert cfg.training.gradient_accumulation_steps == 4
    assert cfg.token.identifier == "<saya_token>"
    assert cfg.dataset.instance_prompt == "a photo of <saya_token> girl"
    # paths in a config file are relative to the file's folder
    assert cfg.dataset.instance_dir == tmp_path / "data" / "instance"
    assert cfg.model.pretrained_model == "stabilityai/stable-diffusion-2-1-base"
    # The config file's schema has no prior-preservation switch (docs/design.md): a class folder means it is on
    assert cfg.dataset.with_prior_preservation is True
    assert cfg.dataset.class_prompt == "a photo of a girl"
    assert any("prior preservation: on" in note for note in cfg.notes)
    assert cfg.model.train_denoiser is True  # `train_unet`, the key's old name, still reads


def test_renamed_keys_read_under_their_old_names_and_not_both(tmp_path):
    """model.train_unet and lora.unet_target_modules became train_denoiser and denoiser_target_modules (the
    denoiser may be a transformer); files and flags with the old names still read, and giving both is a problem."""
    path = write(tmp_path, """\
        model: {pretrained_model: m, train_unet: false, train_text_encoder: true}
        lora: {unet_target_modules: [to_q]}
        dataset: {instance_prompt: x}
        """)
    cfg = load_config(path)
    assert (cfg.model.train_denoiser, cfg.lora.denoiser_target_modules) == (False, ["to_q"])
    assert "train_unet" not in dump_config(cfg) and "train_denoiser: false" in dump_config(cfg)
    assert load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "x",
                              **overrides(["--no-train_unet", "--train_text_encoder", "--lora_unet_target",
                                           "to_k"])}).lora.denoiser_target_modules == ["to_k"]
    both = write(tmp_path, """\
        model: {pretrained_model: m, train_unet: false, train_denoiser: true}
        dataset: {instance_prompt: x}
        """, "both.yaml")
    with pytest.raises(UserError, match="gives both model.train_unet .its old name. and model.train_denoiser"):
        load_config(both)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, DESIGN_YAML), {"dataset.instance_prompt": "a photo of <saya_token> girl",
                                                     "dataset.class_prompt": "a photo of a girl"})
    again = load_config(write(tmp_path, dump_config(cfg), "resolved.yaml"))
    assert again.model_dump() == cfg.model_dump()


def test_issue_command_line_maps_onto_the_config():
    argv = ("--pretrained_model_name_or_path M --instance_data_dir D --instance_prompt", "a photo of sks dog",
            "--with_prior_preservation --class_data_dir C --class_prompt", "a photo of dog",
            "--num_class_images 10 --resolution 64 --train_batch_size 1 --max_train_steps 6 --checkpointing_steps 2 "
            "--checkpoints_total_limit 2 --output_dir OUT")
    args = []
    for chunk in argv:
        args += [chunk] if chunk.startswith("a photo") else chunk.split()
    cfg = load_config(None, overrides(args))
    # paths on the command line are relative to the working directory, made absolute once
    assert cfg.model.pretrained_model == str(Path("M").resolve())
    assert cfg.dataset.instance_dir == Path("D").resolve() and cfg.dataset.class_dir == Path("C").resolve()
    assert cfg.dataset.with_prior_preservation and cfg.dataset.num_class_images == 10
    assert cfg.training.resolution == 64 and cfg.training.batch_size == 1 and cfg.training.max_train_steps == 6
    assert cfg.output.checkpointing_steps == 2 and cfg.output.checkpoints_total_limit == 2
    assert cfg.output.output_dir == Path("OUT").resolve()
    assert cfg.token.identifier == "sks"  # inferred: the word the class prompt lacks


def test_every_diffusers_flag_is_accepted():
    sd_flags = """pretrained_model_name_or_path revision variant tokenizer_name instance_data_dir class_data_dir
    instance_prompt class_prompt with_prior_preservation prior_loss_weight num_class_images output_dir seed resolution
    center_crop train_text_encoder train_batch_size sample_batch_size num_train_epochs max_train_steps
    checkpointing_steps checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps
    gradient_checkpointing learning_rate scale_lr lr_scheduler lr_warmup_steps lr_num_cycles lr_power use_8bit_adam
    dataloader_num_workers adam_beta1 adam_beta2 adam_weight_decay adam_epsilon max_grad_norm logging_dir
    allow_tf32 report_to validation_prompt num_validation_images validation_steps mixed_precision
    prior_generation_precision local_rank enable_xformers_memory_efficient_attention set_grads_to_none offset_noise
    snr_gamma pre_compute_text_embeddings tokenizer_max_length text_encoder_use_attention_mask skip_save_text_encoder
    validation_scheduler random_flip text_encoder_lr""".split()
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    known = {s for a in train._actions for s in a.option_strings}
    missing = [f for f in sd_flags if f"--{f}" not in known]
    assert missing == []


SDXL_LORA_FLAGS = """pretrained_model_name_or_path pretrained_vae_model_name_or_path revision variant dataset_name
    dataset_config_name instance_data_dir cache_dir image_column caption_column repeats class_data_dir instance_prompt
    class_prompt validation_prompt num_validation_images validation_epochs do_edm_style_training
    with_prior_preservation prior_loss_weight num_class_images output_dir output_kohya_format seed resolution
    center_crop random_flip train_text_encoder train_batch_size sample_batch_size num_train_epochs max_train_steps
    checkpointing_steps checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps
    gradient_checkpointing learning_rate text_encoder_lr scale_lr lr_scheduler snr_gamma lr_warmup_steps
    lr_num_cycles lr_power dataloader_num_workers optimizer use_8bit_adam adam_beta1 adam_beta2 prodigy_beta3
    prodigy_decouple adam_weight_decay adam_weight_decay_text_encoder adam_epsilon prodigy_use_bias_correction
    prodigy_safeguard_warmup max_grad_norm push_to_hub hub_token hub_model_id logging_dir allow_tf32 report_to
    mixed_precision prior_generation_precision local_rank enable_xformers_memory_efficient_attention rank
    lora_dropout use_dora image_interpolation_mode""".split()  # diffusers' train_dreambooth_lora_sdxl.py (58eb52c)


def test_every_flag_of_diffusers_sdxl_lora_script_is_accepted_or_refused_with_a_reason(capsys):
    """A command copied from diffusers' SDXL DreamBooth LoRA script never meets "unrecognized arguments": each flag
    either means what it means there, or is refused with what to do instead."""
    from dreambooth.cli import ONLY_VALUE_FLAGS, REFUSED_FLAGS

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    known = {s for a in train._actions for s in a.option_strings}
    assert [f for f in SDXL_LORA_FLAGS if f"--{f}" not in known] == []
    for flag in REFUSED_FLAGS:
        with pytest.raises(UserError, match=f"{flag} is not supported"):
            overrides([flag, "x"])
    for flag, (value, _) in ONLY_VALUE_FLAGS.items():
        overrides([flag, value.upper()])  # accepted: no error
        with pytest.raises(UserError, match="not supported"):
            overrides([flag, "other"])


def training_from(*argv: str):
    given = {"model.pretrained_model": "m", "dataset.instance_prompt": "x", **overrides(argv)}
    return load_config(None, given).training


def test_optimizer_and_prodigy_flags_read_as_diffusers_commands_write_them(tmp_path):
    """--optimizer in any case (diffusers' scripts say AdamW and prodigy); their `type=bool` Prodigy flags with a
    value (`--prodigy_safeguard_warmup=True`), where false means off (diffusers' bool("False") is True), or alone;
    --use_8bit_adam is 8-bit AdamW. A recorded config.yaml, which holds every Prodigy key, reads back the same, also
    for AdamW (its Prodigy keys at their defaults are no Prodigy settings given to another optimizer)."""
    t = training_from("--optimizer=Prodigy", "--learning_rate=1.", "--prodigy_safeguard_warmup=False",
                      "--prodigy_use_bias_correction", "true", "--prodigy_decouple", "--prodigy_beta3", "0.99")
    assert (t.optimizer, t.prodigy_safeguard_warmup, t.prodigy_use_bias_correction, t.prodigy_decouple,
            t.prodigy_beta3) == ("prodigy", False, True, True, 0.99)
    assert training_from("--optimizer", "prodigy", "--learning_rate", "1", "--no-prodigy_decouple").prodigy_decouple \
        is False
    assert training_from("--optimizer", "AdamW", "--use_8bit_adam").optimizer_kind == "adamw8bit"
    assert training_from("--optimizer", "LION").optimizer_kind == "lion"
    with pytest.raises(UserError, match="training.optimizer: input should be 'adamw', 'adamw8bit', 'prodigy' or "
                                        "'lion'"):
        training_from("--optimizer", "sgd")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--no-prodigy_decouple=true"])
    for argv in (["--optimizer", "prodigy", "--learning_rate", "1", "--prodigy_d_coef", "2"], []):
        cfg = load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "x", **overrides(argv)})
        recorded = tmp_path / "config.yaml"
        recorded.write_text(dump_config(cfg))
        assert load_config(recorded).training == cfg.training


def test_flags_are_unique():
    flags = [f for key in all_keys() for f in field_flags(*key.split("."))]
    assert len(flags) == len(set(flags))


def test_offset_noise_flag_means_point_one():
    assert overrides(["--offset_noise"])["training.noise_offset"] == 0.1


def test_hub_flags_map_onto_the_config_and_the_token_is_never_recorded():
    given = overrides(["--push_to_hub", "--hub_model_id", "me/dog", "--hub_token", "hf_secret"])
    assert given == {"output.push_to_hub": True, "output.hub_model_id": "me/dog", "output.hub_token": "hf_secret"}
    cfg = load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "x", **given})
    assert cfg.output.hub_token == "hf_secret" and "hf_secret" not in dump_config(cfg)


def test_deepfloyd_only_flags_are_refused_clearly():
    with pytest.raises(UserError, match="DeepFloyd"):
        overrides(["--validation_images", "a.png"])


def test_all_problems_reported_at_once_by_key(tmp_path):
    path = write(tmp_path, """\
        model: {pretrained_model: m}
        training: {max_train_steps: 0, learning_rate: -1e-5, learning_rat: 1}
        dataset: {instance_prompt: a photo of sks dog, with_prior_preservation: true}
        """)
    with pytest.raises(UserError) as e:
        load_config(path)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "training.max_train_steps: input should be greater than 0" in msg
    assert "training.learning_rate: input should be greater than 0" in msg
    assert "training.learning_rat: unknown key; did you mean 'training.learning_rate'?" in msg
    assert "dataset.class_prompt: prior preservation is on but no class prompt" in msg
    assert str(path) in msg


def test_unknown_section_suggests_the_closest():
    with pytest.raises(UserError, match="trainng: unknown key; did you mean 'training'"):
        load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "x", "trainng.seed": 1})


def test_missing_model_and_prompt_are_named():
    with pytest.raises(UserError) as e:
        load_config(None, {})
    assert "model.pretrained_model" in str(e.value) and "dataset.instance_prompt" in str(e.value)


def test_broken_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "model: {pretrained_model: [\n"))
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is a folder; give the file"):
        load_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("model: {pretrained_model: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(UserError, match="cannot be read as UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")


def test_defaults_resolved_and_recorded():
    cfg = load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "a photo of sks dog"})
    assert isinstance(cfg.training.seed, int)
    assert cfg.training.max_train_steps == 800
    assert cfg.training.text_encoder_lr == cfg.training.learning_rate
    cfg2 = load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "x",
                              "training.num_train_epochs": 3})
    assert cfg2.training.max_train_steps is None


def test_prompts_from_identifier_and_class_word():
    cfg = load_config(None, {"model.pretrained_model": "m", "token.identifier": "<zz>", "token.class_word": "cat",
                             "dataset.with_prior_preservation": True})
    assert cfg.dataset.instance_prompt == "a photo of <zz> cat"
    assert cfg.dataset.class_prompt == "a photo of a cat"
    assert cfg.token.initializer == "cat"


def test_config_type_is_the_design_sections():
    assert list(Config.model_fields)[:4] == ["model", "token", "training", "dataset"]


def test_section_that_is_not_a_mapping(tmp_path):
    with pytest.raises(UserError, match="section 'training' must be a mapping"):
        load_config(write(tmp_path, "training: 5\n"))


def test_skipping_the_text_encoder_would_lose_a_new_token():
    with pytest.raises(UserError, match="output.skip_save_text_encoder"):
        load_config(None, {"model.pretrained_model": "m", "token.identifier": "<zz>", "token.class_word": "cat",
                           "output.skip_save_text_encoder": True})


def test_ema_settings_without_use_ema_are_refused_by_key_and_a_recorded_config_reads_again(tmp_path):
    """--ema_on_cpu (or another EMA setting) without --use_ema would change nothing; a config.yaml a run without EMA
    recorded holds every EMA key at its default, which is no problem."""
    base = {"model.pretrained_model": "m", "dataset.instance_prompt": "a photo of sks dog"}
    with pytest.raises(UserError) as e:
        load_config(None, {**base, **overrides(["--ema_on_cpu", "--ema_decay", "0.99", "--ema_warmup"])})
    message = str(e.value)
    for key, flag in (("ema_on_cpu", "--ema_on_cpu"), ("ema_decay", "--ema_decay"), ("ema_warmup", "--ema_warmup")):
        assert f"training.{key}: it is a setting of the EMA of the weights, but training.use_ema is off" in message
        assert f"pass --use_ema too, or drop {flag}" in message
    assert "ema_update_after_step" not in message  # not given
    cfg = load_config(None, {**base, **overrides(["--use_ema", "--offload_ema", "--ema_decay", "0.99"])})
    assert (cfg.training.use_ema, cfg.training.ema_on_cpu, cfg.training.ema_decay) == (True, True, 0.99)
    recorded = load_config(write(tmp_path, dump_config(load_config(None, {**base, "training.ema_decay": "0.999"}))))
    assert not recorded.training.use_ema and recorded.training.ema_decay == 0.999
    with pytest.raises(UserError, match=r"training.ema_decay: input should be less than 1 \(got 1.0\)"):
        load_config(None, {**base, "training.use_ema": True, "training.ema_decay": 1.0})


# ---------------------------------------------------------------------------------------- every problem at once


def test_a_bad_config_still_gets_every_check_that_needs_no_weights(tiny_model, instance_dir, tmp_path, capsys,
                                                                    no_model_load):
    """`learning_rate: fast`, a misspelt key and `resolution: 100` gave two problems, and the resolution's came only on
    the next run: pre-flight's checks run in the same pass, each skipped only where it reads a broken key."""
    from dreambooth.cli import main

    config = write(tmp_path, f"""\
        model: {{pretrained_model: {tiny_model}}}
        token: {{identifier: sks, class_word: dog}}
        training: {{learning_rate: fast, max_train_step: 3, resolution: 100}}
        dataset: {{instance_dir: {instance_dir}, class_dir: {tmp_path / 'class'}}}
        validation: {{prompts: [a photo of sks dog], scheduler: fastest}}
        output: {{output_dir: {tmp_path / 'out'}, report_to: none}}
        """)
    assert main(["train", "--config", str(config), "--learning_rat", "1"]) == 2
    err = capsys.readouterr().err
    assert "5 problem(s)" in err and "nothing was loaded or changed" in err and str(config) in err
    for part in ("unrecognized arguments: --learning_rat 1 (did you mean: --learning_rat -> --learning_rate?)",
                 "training.learning_rate: input should be a valid number", "training.max_train_step: unknown key",
                 "training.resolution: 100 is not a multiple of 8", "validation.scheduler: unknown scheduler"):
        assert part in err, part
    assert not (tmp_path / "out").exists() and not (tmp_path / "class").exists()


def test_a_check_that_reads_a_broken_key_is_skipped_not_run_on_its_default(tiny_model, tmp_path, capsys,
                                                                           no_model_load):
    """A refused instance_dir stands at its default (data/instance): checking that folder would report a problem the
    user does not have."""
    from dreambooth.cli import main

    config = write(tmp_path, f"""\
        model: {{pretrained_model: {tiny_model}}}
        dataset: {{instance_dir: [a, b], instance_prompt: a photo of sks dog}}
        training: {{resolution: 100}}
        output: {{output_dir: {tmp_path / 'out'}, report_to: none}}
        """)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "dataset.instance_dir" in err and "is not a multiple of 8" in err
    assert "data/instance" not in err


def _float_keys():
    return [(section, name) for section, model in SECTION_TYPES.items() for name, field in model.model_fields.items()
            if float in (field.annotation, *typing.get_args(field.annotation))]


@pytest.mark.parametrize("value", [float("nan"), "inf", "-inf", "nan", "1e999"])
def test_every_float_key_refuses_non_finite_numbers(value):
    """`learning_rate: .nan` passed `gt=0` (NaN compares false with every bound); infinity passed too."""
    keys = _float_keys()
    assert {("training", "learning_rate"), ("training", "snr_gamma"), ("lora", "alpha")} <= set(keys)
    for section, name in keys:
        with pytest.raises(UserError, match=rf"{section}\.{name}: .* is not a finite number"):
            load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "a photo of sks dog",
                               f"{section}.{name}": value})


def test_yaml_nan_is_refused_in_a_config_file(tmp_path):
    with pytest.raises(UserError, match=r"training.learning_rate: nan is not a finite number"):
        load_config(write(tmp_path, "model: {pretrained_model: m}\ndataset: {instance_prompt: x}\n"
                                    "training: {learning_rate: .nan}\n"))


# --------------------------------------------------------------------------------------------------- identifier


@pytest.mark.parametrize(("instance", "klass", "identifier"), [
    ("a photo of <zq> dog", None, "<zq>"),  # diffusers' flags without --class_prompt: the README's rule
    ("a photo of <zq> dog", "a photo of dog", "<zq>"),
    ("a photo of sks dog", "a photo of dog", "sks"),
    ("a photo of sks dog", None, None),  # nothing tells: the whole prompt names the subject
    ("a <zq>, sitting", None, "<zq>"),
])
def test_the_identifier_is_inferred_from_the_prompts(instance, klass, identifier):
    values = {"model.pretrained_model": "m", "dataset.instance_prompt": instance}
    if klass:
        values.update({"dataset.class_prompt": klass, "dataset.with_prior_preservation": True})
    assert load_config(None, values).token.identifier == identifier


def test_several_new_tokens_in_the_prompt_are_a_problem_not_a_guess():
    with pytest.raises(UserError, match=r"writes 2 new tokens \(<a>, <b>\).*--identifier"):
        load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "a photo of <a> <b> dog"})
    assert load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "a photo of <a> <b> dog",
                              "token.identifier": "<a>"}).token.identifier == "<a>"
