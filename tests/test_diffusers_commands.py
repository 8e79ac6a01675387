"""diffusers' own DreamBooth example commands for Flux.1 and SD3 run against `dreambooth train`, with tiny models
standing in for the hub's.

Each command is recorded below as diffusers' examples/dreambooth/README_flux.md and README_sd3.md print it
(diffusers 58eb52c), its `export` lines included. It runs in a fresh folder that holds what those lines name: a tiny
model at the hub id's path (a folder there is taken before the hub, `config_file.resolve_model_ref`), the photos at
`dog`, the output folder beside them. `accelerate launch train_dreambooth[_lora]_X.py` becomes `dreambooth train`
(with `--method lora` for a LoRA script, whose name chose that there); every other word is the README's.

Where the tool refuses a command as written, the test asserts that the refusal names the change and makes exactly
that change (PREFLIGHT below: a hub dataset everywhere; the wandb tracker and fp16 where the machine
lacks them), then runs the result through pre-flight, and for real for 2 steps at 64 px. Their Prodigy (with
`--learning_rate=1.`) runs as written. The two FLUX.1 Kontext commands of README_flux.md are for a pipeline this tool
does not train; they are refused, and say so.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import photo_folder
from safetensors.torch import load_file
from test_advice import cli_run, passes_preflight

from dreambooth.cli import ONLY_VALUE_FLAGS, REFUSED_FLAGS, build_parser, config_overrides
from dreambooth.errors import UserError
from dreambooth.models.tiny_families import build_model
from dreambooth.training import loop as train_module

# ------------------------------------------------------------------------------------ the commands, as printed

# README_flux.md, "Dog toy example": full fine-tuning of FLUX.1 [dev].
FLUX_FULL = """\
export MODEL_NAME="black-forest-labs/FLUX.1-dev"
export INSTANCE_DIR="dog"
export OUTPUT_DIR="trained-flux"

accelerate launch train_dreambooth_flux.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --mixed_precision="bf16" \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=1024 \\
  --train_batch_size=1 \\
  --guidance_scale=1 \\
  --gradient_accumulation_steps=4 \\
  --optimizer="prodigy" \\
  --learning_rate=1. \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=500 \\
  --validation_prompt="A photo of sks dog in a bucket" \\
  --validation_epochs=25 \\
  --seed="0" \\
  --push_to_hub
"""

# README_flux.md, "LoRA + DreamBooth".
FLUX_LORA = """\
export MODEL_NAME="black-forest-labs/FLUX.1-dev"
export INSTANCE_DIR="dog"
export OUTPUT_DIR="trained-flux-lora"

accelerate launch train_dreambooth_lora_flux.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --mixed_precision="bf16" \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --guidance_scale=1 \\
  --gradient_accumulation_steps=4 \\
  --optimizer="prodigy" \\
  --learning_rate=1. \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=500 \\
  --validation_prompt="A photo of sks dog in a bucket" \\
  --validation_epochs=25 \\
  --seed="0" \\
  --push_to_hub
"""

# README_flux.md, "Text Encoder Training" (its INSTANCE_DIR is the one exported above it: "dog").
FLUX_LORA_TEXT_ENCODER = """\
export MODEL_NAME="black-forest-labs/FLUX.1-dev"
export OUTPUT_DIR="trained-flux-dev-dreambooth-lora"

accelerate launch train_dreambooth_lora_flux.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --mixed_precision="bf16" \\
  --train_text_encoder\\
  --instance_prompt="a photo of sks dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --guidance_scale=1 \\
  --gradient_accumulation_steps=4 \\
  --optimizer="prodigy" \\
  --learning_rate=1. \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=500 \\
  --validation_prompt="A photo of sks dog in a bucket" \\
  --seed="0" \\
  --push_to_hub
"""

# README_sd3.md, "Dog toy example": full fine-tuning of SD3.
SD3_FULL = """\
export MODEL_NAME="stabilityai/stable-diffusion-3-medium-diffusers"
export INSTANCE_DIR="dog"
export OUTPUT_DIR="trained-sd3"

accelerate launch train_dreambooth_sd3.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --mixed_precision="fp16" \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=1024 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --learning_rate=1e-4 \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=500 \\
  --validation_prompt="A photo of sks dog in a bucket" \\
  --validation_epochs=25 \\
  --seed="0" \\
  --push_to_hub
"""

# README_sd3.md, "LoRA + DreamBooth".
SD3_LORA = """\
export MODEL_NAME="stabilityai/stable-diffusion-3-medium-diffusers"
export INSTANCE_DIR="dog"
export OUTPUT_DIR="trained-sd3-lora"

accelerate launch train_dreambooth_lora_sd3.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --mixed_precision="fp16" \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --learning_rate=4e-4 \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=500 \\
  --validation_prompt="A photo of sks dog in a bucket" \\
  --validation_epochs=25 \\
  --seed="0" \\
  --push_to_hub
"""

# README_sd3.md, "Text Encoder Training" (LoRA on both CLIP encoders, a hub dataset, Prodigy).
SD3_LORA_TEXT_ENCODER = """\
export MODEL_NAME="stabilityai/stable-diffusion-3-medium-diffusers"
export OUTPUT_DIR="trained-sd3-lora"

accelerate launch train_dreambooth_lora_sd3.py \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --output_dir=$OUTPUT_DIR \\
  --dataset_name="Norod78/Yarn-art-style" \\
  --instance_prompt="a photo of TOK yarn art dog" \\
  --resolution=1024 \\
  --train_batch_size=1 \\
  --train_text_encoder\\
  --gradient_accumulation_steps=1 \\
  --optimizer="prodigy"\\
  --learning_rate=1.0 \\
  --text_encoder_lr=1.0 \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=1500 \\
  --rank=32 \\
  --seed="0" \\
  --push_to_hub
"""

# README_flux.md, "Training Kontext": FLUX.1 Kontext [dev], an image-conditioned pipeline this tool does not train.
KONTEXT_T2I = """\
accelerate launch train_dreambooth_lora_flux_kontext.py \\
  --pretrained_model_name_or_path=black-forest-labs/FLUX.1-Kontext-dev  \\
  --instance_data_dir="dog" \\
  --output_dir="kontext-dog" \\
  --mixed_precision="bf16" \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=1024 \\
  --train_batch_size=1 \\
  --guidance_scale=1 \\
  --gradient_accumulation_steps=4 \\
  --gradient_checkpointing \\
  --optimizer="adamw" \\
  --use_8bit_adam \\
  --cache_latents \\
  --learning_rate=1e-4 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=500 \\
  --seed="0" \n"""

KONTEXT_I2I = """\
accelerate launch train_dreambooth_lora_flux_kontext.py \\
  --pretrained_model_name_or_path=black-forest-labs/FLUX.1-Kontext-dev  \\
  --output_dir="kontext-i2i" \\
  --dataset_name="kontext-community/relighting" \\
  --image_column="output" --cond_image_column="file_name" --caption_column="instruction" \\
  --mixed_precision="bf16" \\
  --resolution=1024 \\
  --train_batch_size=1 \\
  --guidance_scale=1 \\
  --gradient_accumulation_steps=4 \\
  --gradient_checkpointing \\
  --optimizer="adamw" \\
  --use_8bit_adam \\
  --cache_latents \\
  --learning_rate=1e-4 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=200 \\
  --max_train_steps=1000 \\
  --rank=16\\
  --seed="0" \n"""


@dataclass(frozen=True)
class Example:
    block: str
    size: str  # the tiny model that stands in for the hub's
    lora_parts: tuple[str, ...] = ()  # what a LoRA run's file adapts; () for a full fine-tune

    @property
    def method(self) -> str:
        return "lora" if self.lora_parts else "full"


EXAMPLES = {
    "flux-full": Example(FLUX_FULL, "flux-tiny"),
    "flux-lora": Example(FLUX_LORA, "flux-tiny", ("transformer",)),
    "flux-lora-text-encoder": Example(FLUX_LORA_TEXT_ENCODER, "flux-tiny", ("transformer", "text_encoder")),
    "sd3-full": Example(SD3_FULL, "sd3-tiny"),
    "sd3-lora": Example(SD3_LORA, "sd3-tiny", ("transformer",)),
    # both CLIP encoders get adapters, T5 none (as README_sd3.md says)
    "sd3-lora-text-encoder": Example(SD3_LORA_TEXT_ENCODER, "sd3-tiny", ("transformer", "text_encoder",
                                                                         "text_encoder_2")),
}
# README_flux.md exports INSTANCE_DIR once, in its first block; its text-encoder block uses it as it stands.
README_ENVIRONMENT = {"INSTANCE_DIR": "dog"}


def shell_words(block: str) -> list[str]:
    """The words a POSIX shell runs for a README block: its `export` lines set variables, backslash-newlines join the
    command's lines, `$NAME` expands (no value here holds a space, so nothing is split further)."""
    env, words = dict(README_ENVIRONMENT), None
    for line in block.replace("\\\n", "").splitlines():
        if line.startswith("export "):
            name, value = shlex.split(line[len("export "):])[0].split("=", 1)
            env[name] = value
        elif line.strip():
            assert words is None, "one command a block"
            words = [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], word) for word in shlex.split(line)]
    return words


def dreambooth_argv(block: str) -> list[str]:
    """`accelerate launch train_dreambooth[_lora]_X.py ARGS` as `dreambooth train [--method lora] ARGS`."""
    launcher, script, *args = shell_words(block)[1:]
    assert launcher == "launch" and re.fullmatch(r"train_dreambooth_(lora_)?\w+\.py", script), script
    return ["train", *(["--method", "lora"] if script.startswith("train_dreambooth_lora_") else []), *args]


def value_of(argv: list[str], flag: str) -> str | None:
    return next((w.split("=", 1)[1] for w in argv if w.startswith(f"{flag}=")), None)


def without(argv: list[str], flag: str) -> list[str]:
    return [w for w in argv if w != flag and not w.startswith(f"{flag}=")]


def with_value(argv: list[str], flag: str, value: str) -> list[str]:
    return [f"{flag}={value}" if w.startswith(f"{flag}=") else w for w in argv]


# ------------------------------------------------------------------------------------- what a refusal asks for

@dataclass(frozen=True)
class Advice:
    """A refusal this command meets as written, the words of it that say what to do, and that change."""

    applies: object  # argv -> bool
    says: str
    change: object  # argv -> argv


def photos_folder(argv: list[str]) -> list[str]:
    """A hub dataset refused: its photos in a folder, passed as --instance_data_dir."""
    return [*without(argv, "--dataset_name"), "--instance_data_dir=dog"]


# Refused by pre-flight, all in one report. Only these two depend on the machine: wandb is not installed where the
# suite runs (and installing a tracker for a test is not wanted), and accelerate's fp16 needs a CUDA device. On a
# machine with both, the commands pass pre-flight with --report_to wandb and --mixed_precision fp16 as printed.
PREFLIGHT = (
    Advice(lambda a: value_of(a, "--dataset_name") is not None,
           "Put the photos in a folder and pass it as --instance_data_dir", photos_folder),
    Advice(lambda a: value_of(a, "--report_to") == "wandb" and importlib.util.find_spec("wandb") is None,
           "wandb is not installed. Install it (`pip install wandb`, and log in if it needs an account), or pass "
           "--report_to none", lambda a: with_value(a, "--report_to", "none")),
    Advice(lambda a: value_of(a, "--mixed_precision") == "fp16" and not torch.cuda.is_available(),
           "fp16 needs a CUDA GPU and none is available; use bf16 or no",
           lambda a: with_value(a, "--mixed_precision", "bf16")),
)


def refusal(capsys, monkeypatch, argv: list[str]) -> str:
    """What `dreambooth ARGV` says when it refuses; a command that gets past pre-flight fails here, before weights
    load (a README command trains 500 steps at 1024 px)."""
    with monkeypatch.context() as m:
        m.setattr(train_module, "setup", lambda *args, **kwargs: pytest.fail(f"accepted: {argv}"))
        return cli_run(capsys, *argv, code=2)


def follow_refusals(capsys, monkeypatch, argv: list[str]) -> list[str]:
    """Runs the command as written; each round of refusals must name every change ADVICE makes for it, which is
    then made. Returns the command that is left (the README's, where nothing was refused)."""
    for advice in (PREFLIGHT,):
        due = [a for a in advice if a.applies(argv)]
        if due:
            err = refusal(capsys, monkeypatch, argv)
            for a in due:
                assert a.says in err, (a.says, err)
                argv = a.change(argv)
    return argv


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    built = {}

    def model(size: str) -> Path:
        if size not in built:
            built[size] = build_model(tmp_path_factory.mktemp(size) / "model", size=size, seed=1)
        return built[size]
    return model


@pytest.fixture
def readme_folder(tmp_path, monkeypatch, tiny_models):
    """A fresh working folder holding what a README block names: `dog` (5 photos, as diffusers' dog example) and a
    tiny model at the hub id's path."""
    monkeypatch.chdir(tmp_path)
    photo_folder(tmp_path / "dog", 5)

    def stand_in(argv: list[str], size: str) -> None:
        hub_id = value_of(argv, "--pretrained_model_name_or_path")
        (tmp_path / hub_id).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / hub_id).symlink_to(tiny_models(size), target_is_directory=True)
    return stand_in


@pytest.fixture
def hub(monkeypatch):
    """A hub that answers `--push_to_hub`'s check and records the upload (the tests run offline)."""
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, token=None, **kw: {"name": "me"})
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    return calls


# --------------------------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("name", EXAMPLES)
def test_a_readme_command_passes_preflight_after_the_changes_its_refusals_name(name, readme_folder, hub, capsys,
                                                                              monkeypatch):
    example = EXAMPLES[name]
    argv = dreambooth_argv(example.block)
    readme_folder(argv, example.size)
    accepted = follow_refusals(capsys, monkeypatch, argv)
    passes_preflight(capsys, monkeypatch, *accepted)
    # the hub dataset and the machine's two settings: nothing else changed (Prodigy and its rates run as written)
    changed = {w.split("=", 1)[0] for w in set(argv) ^ set(accepted)}
    assert changed <= {"--dataset_name", "--instance_data_dir", "--report_to", "--mixed_precision"}, changed


@pytest.mark.parametrize("name", EXAMPLES)
def test_a_readme_command_trains_end_to_end_on_the_tiny_model(name, readme_folder, hub, capsys, monkeypatch):
    example = EXAMPLES[name]
    argv = dreambooth_argv(example.block)
    readme_folder(argv, example.size)
    accepted = follow_refusals(capsys, monkeypatch, argv)
    # 2 steps at 64 px, for time: the only change to the command pre-flight accepted.
    cli_run(capsys, *accepted, "--max_train_steps", "2", "--resolution", "64")
    out = Path(value_of(argv, "--output_dir")).resolve()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["method"] == example.method
    assert cfg["model"]["train_text_encoder"] == ("--train_text_encoder" in argv)
    assert cfg["training"]["gradient_accumulation_steps"] == int(value_of(argv, "--gradient_accumulation_steps"))
    assert cfg["training"]["learning_rate"] == float(value_of(argv, "--learning_rate"))
    assert cfg["training"]["optimizer"] == (value_of(argv, "--optimizer") or "adamw").lower()
    info = json.loads((out / "run_info.json").read_text())
    assert info["optimizer"] == cfg["training"]["optimizer"]
    assert cfg["training"]["guidance_scale"] == (1.0 if "--guidance_scale=1" in argv else None)
    assert cfg["validation"]["epochs"] == (25 if "--validation_epochs=25" in argv else None)
    # validation at the last step, where the command asks for it
    assert (out / "samples" / "step-000002.png").is_file() == (value_of(argv, "--validation_prompt") is not None)
    if example.lora_parts:
        weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
        assert {key.split(".", 1)[0] for key in weights} == set(example.lora_parts)
        assert {v.dtype for v in weights.values()} == {torch.float32}  # --save_precision's default
    else:
        assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert hub["repo"] == f"me/{out.name}" and hub["upload"]["folder_path"] == str(out)


@pytest.mark.parametrize("block,says", [
    (KONTEXT_T2I, "is a FluxKontextPipeline model; this tool trains and draws Stable Diffusion 1.x, 2.x, SDXL, "
                  "Flux.1 and SD3"),
    (KONTEXT_I2I, "--image_column output is not supported: a --dataset_name folder's photos are the files its "
                  "metadata.jsonl names"),
])
def test_kontext_commands_are_refused_with_the_reason(block, says, tmp_path, monkeypatch, tiny_models, capsys):
    """FLUX.1 Kontext is an image-conditioned pipeline (FluxKontextPipeline) this tool does not train: its README
    commands, run as printed against a tiny Flux labelled as Kontext at the hub id's path, are refused before any
    weights load."""
    monkeypatch.chdir(tmp_path)
    photo_folder(tmp_path / "dog", 5)
    kontext = tmp_path / "black-forest-labs" / "FLUX.1-Kontext-dev"
    shutil.copytree(tiny_models("flux-tiny"), kontext)
    index = json.loads((kontext / "model_index.json").read_text())
    (kontext / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    assert says in refusal(capsys, monkeypatch, dreambooth_argv(block))
    assert not (tmp_path / "kontext-dog").exists() and not (tmp_path / "kontext-i2i").exists()


# The flags of diffusers' Flux and SD3 DreamBooth scripts (examples/dreambooth, diffusers 58eb52c).
FLUX_FLAGS = """adam_beta1 adam_beta2 adam_epsilon adam_weight_decay adam_weight_decay_text_encoder allow_tf32 cache_dir
    caption_column center_crop checkpointing_steps checkpoints_total_limit class_data_dir class_prompt
    dataloader_num_workers dataset_config_name dataset_name enable_npu_flash_attention gradient_accumulation_steps
    gradient_checkpointing guidance_scale hub_model_id hub_token image_column instance_data_dir instance_prompt
    learning_rate local_rank logging_dir logit_mean logit_std lr_num_cycles lr_power lr_scheduler lr_warmup_steps
    max_grad_norm max_sequence_length max_train_steps mixed_precision mode_scale num_class_images num_train_epochs
    num_validation_images optimizer output_dir pretrained_model_name_or_path prior_generation_precision
    prior_loss_weight prodigy_beta3 prodigy_decouple prodigy_safeguard_warmup prodigy_use_bias_correction push_to_hub
    random_flip repeats report_to resolution resume_from_checkpoint revision sample_batch_size scale_lr seed
    text_encoder_lr train_batch_size train_text_encoder use_8bit_adam validation_epochs validation_prompt variant
    weighting_scheme with_prior_preservation""".split()
SCRIPT_FLAGS = {
    "train_dreambooth_flux.py": [*FLUX_FLAGS, "image_interpolation_mode"],
    "train_dreambooth_lora_flux.py": [*FLUX_FLAGS, "cache_latents", "lora_alpha", "lora_dropout", "lora_layers", "rank",
                                      "upcast_before_saving"],
    "train_dreambooth_sd3.py": [*(f for f in FLUX_FLAGS if f not in ("enable_npu_flash_attention", "guidance_scale")),
                                "precondition_outputs"],
    "train_dreambooth_lora_sd3.py": [*(f for f in FLUX_FLAGS if f not in ("enable_npu_flash_attention",
                                                                          "guidance_scale")),
                                     "precondition_outputs", "cache_latents", "lora_blocks", "lora_dropout",
                                     "lora_layers", "rank", "upcast_before_saving"],
}


@pytest.mark.parametrize("script", SCRIPT_FLAGS)
def test_every_flag_of_diffusers_flux_and_sd3_scripts_is_accepted_or_refused_with_a_reason(script):
    """A command copied from these scripts never meets "unrecognized arguments": each flag means what it means there,
    or is refused with what to do instead (hub datasets, --repeats, NPU attention)."""
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    known = {s for a in train._actions for s in a.option_strings}
    assert [f for f in SCRIPT_FLAGS[script] if f"--{f}" not in known] == []
    refused = {f for f in SCRIPT_FLAGS[script] if f"--{f}" in REFUSED_FLAGS or f"--{f}" in ONLY_VALUE_FLAGS}
    assert refused <= {"cache_dir", "caption_column", "dataset_config_name", "dataset_name", "image_column",
                       "enable_npu_flash_attention", "repeats", "image_interpolation_mode"}


def plain_argv(model: Path, tmp_path: Path) -> list[str]:
    """A short `dreambooth train` of `model` on 3 photos, to which a test adds the flag it is about."""
    photos = photo_folder(tmp_path / "dog", 3)
    return ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(photos),
            "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
            "--resolution", "64"]


def overrides(*argv: str) -> dict:
    return config_overrides(build_parser().parse_args(["train", *argv]))


def test_upcast_before_saving_is_fp32_and_refused_beside_another_save_precision(tiny_models, tmp_path, capsys,
                                                                                 monkeypatch):
    """diffusers' LoRA scripts save in the training precision unless --upcast_before_saving; here fp32 is already
    --save_precision's default, so the flag is that, and asking for both fp32 and another precision is refused."""
    assert overrides("--upcast_before_saving") == {"output.save_precision": "fp32"}
    assert overrides("--upcast_before_saving", "--save_precision", "fp32") == {"output.save_precision": "fp32"}
    with pytest.raises(UserError, match="--upcast_before_saving saves in fp32, and --save_precision bf16 asks for "
                                        "another precision; pass one of them"):
        overrides("--upcast_before_saving", "--save_precision", "bf16")
    # a config file's save_precision gives way to the flag
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output": {"save_precision": "bf16"}}))
    from dreambooth.config_file import load_config

    assert load_config(config, overrides("--upcast_before_saving", "--pretrained_model_name_or_path", "m",
                                         "--instance_prompt", "a photo of sks dog")).output.save_precision == "fp32"
    # each of the two alone is what the refusal asks for
    argv = [*plain_argv(tiny_models("sd3-tiny"), tmp_path), "--method", "lora"]
    cli_run(capsys, *argv, "--upcast_before_saving", "--save_precision", "bf16", code=2)
    passes_preflight(capsys, monkeypatch, *argv, "--upcast_before_saving")
    passes_preflight(capsys, monkeypatch, *argv, "--save_precision", "bf16")


def test_npu_attention_is_refused_and_the_command_without_it_passes(tiny_models, tmp_path, capsys, monkeypatch):
    argv = plain_argv(tiny_models("flux-tiny"), tmp_path)
    err = cli_run(capsys, *argv, "--enable_npu_flash_attention", code=2)
    assert "--enable_npu_flash_attention is not supported: Ascend NPUs are not supported; drop the flag" in err
    passes_preflight(capsys, monkeypatch, *argv)
