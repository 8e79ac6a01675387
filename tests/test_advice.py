"""Every command the tool suggests, in any message, runs and does what the message says (issue 24).

`suggestion_sites` reads the package's source and finds every message that tells the user to run a command or pass
a flag. `SITES` names, for each, the test below that provokes the message, runs what it suggests and checks the
result, or the reason it cannot run here. A new suggestion with neither fails `test_every_suggestion_site_is_run`;
a flag or a `dreambooth` command that does not exist fails the two tests after it, wherever it is written.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from conftest import interrupt_after, photo_folder
from PIL import Image

from dreambooth import cli
from dreambooth.cli import main
from dreambooth.options import flags_of, spellings

PACKAGE = Path(cli.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")
QUOTED = re.compile(r"`([^`]+)`")

IMPERATIVE = re.compile(
    r"\b(pass|use|give|run|rerun|add|drop|set|continue|resume|raise|install|omit|remove|replace|choose|wait|delete|"
    r"log in|convert|generate|export|retry|train|upload|start|leave|score|put|write|fix|try|call|send|reword|"
    r"shorten)\b", re.IGNORECASE)
# Calls whose string arguments are help text, not messages.
HELP_CALLS = {"option", "opt", "Field", "add_argument", "add_argument_group", "add_parser"}
# Flags of other programs that messages name.
OTHER_PROGRAMS = {"--jinja": "llama.cpp's llama-server", "--no-index": "pip", "--head": "ray start",
                  "--fsdp_version": "accelerate launch"}
# Words that stand for a flag in prose ("--flags", "--no-flag").
PROSE = {"--flag", "--flags", "--no-flag", "--no", "--field-name"}
# Placeholders in suggested commands, and what a test puts in their place.
PLACEHOLDERS = ("DIR", "FILE", "PATH", "N", "NAME", "REPO", "OUTPUT_DIR", "BASE_MODEL", "BASE_MODEL_FOLDER",
                "CHECKPOINT", "MODEL_DIR", "WORD", "FILE.safetensors", "BASE", "TOKEN")


def _docstrings(tree: ast.AST) -> set[int]:
    kinds = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {id(node.body[0].value) for node in ast.walk(tree) if isinstance(node, kinds) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _text(node: ast.AST) -> str | None:
    """A string expression as written, `{...}` where a value is filled in; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                       for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        return None if left is None and right is None else (left or "{...}") + (right or "{...}")
    return None


def package_strings() -> list[tuple[str, int, str, bool]]:
    """Every string expression of the package: (module, line, text, whether it is a docstring or help text)."""
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(file.read_text())
        quiet = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in HELP_CALLS:
                quiet |= {id(n) for arg in [*node.args, *(k.value for k in node.keywords)] for n in ast.walk(arg)}
        seen: set[int] = set()
        for node in ast.walk(tree):
            if id(node) in seen or (text := _text(node)) is None:
                continue
            seen |= {id(n) for n in ast.walk(node)}
            found.append((str(file.relative_to(PACKAGE)), node.lineno, text, id(node) in quiet))
    return found


def names_command(text: str) -> bool:
    """A quoted command has words after its name (`dreambooth report DIR`); `dreambooth` alone is a name."""
    return any(" " in quoted for quoted in QUOTED.findall(text))


def suggestion_sites() -> list[tuple[str, int, str]]:
    """Every message (not a docstring or help text) that names a flag or a quoted command and tells the user to do
    something, and every command built in code for a message (`errors.command_line(...)`, as written)."""
    sites = [(module, line, text) for module, line, text, quiet in package_strings()
             if not quiet and (FLAG.search(text) or names_command(text)) and IMPERATIVE.search(text)]
    for file in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "command_line":
                sites.append((str(file.relative_to(PACKAGE)), node.lineno, ast.unparse(node)))
    return sites


def all_flags() -> dict[str, set[str]]:
    """Every flag of every `dreambooth` command, both spellings, by command."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = {name: set(p._option_string_actions) for name, p in sub.choices.items()}
    found[""] = set(parser._option_string_actions)  # --version, --help
    bench = cli.load(cli.COMMANDS["bench"].options, "bench")
    found["bench"] = {s for f in fields(bench) for flag in flags_of(f) for s in (flag, *spellings(flag))}
    return found


# ------------------------------------------------------------------------------------------------ the sites

# A fragment of each suggestion's source text -> the test that runs it, or why it cannot run here.
FLOW = "tests/test_flow_families.py::"
EXPORT = "tests/test_export_flow.py::"
COMMANDS = "tests/test_diffusers_commands.py::"
ADAPTERS = "tests/test_adapters.py::"
REDIS = "tests/test_serve_redis.py::"
RAY = "tests/test_serve_ray_options.py::"
FSDP_REFUSALS = "tests/test_fsdp.py::test_fsdp_refusals_name_the_key_and_what_they_suggest_is_accepted"
ADAPTER_SETTINGS = ADAPTERS + "test_adapter_settings_that_mean_nothing_are_refused_and_the_named_flags_work"
SITES = {
    # training: the run folder
    "holds another run ({folder.describe()}). Continue it with": "test_a_folder_holding_a_run_offers_three_ways_on",
    "but no checkpoint to resume. Replace it with": "test_a_folder_holding_a_run_offers_three_ways_on",
    "Raise --max_train_steps to train further": "test_a_checkpoint_past_the_end_can_be_trained_further_or_used",
    "Resume with the same settings, or start a new run in another": "test_a_folder_holding_a_run_offers_three_ways_on",
    "it is replaced when this run starts (--overwrite_output_dir)": "reason: a note of what a flag the user gave "
                                                                    "does, not a suggestion",
    "Wait for it to end, or choose another --output_dir. If no run is alive":
        "test_a_locked_output_folder_is_free_once_its_lock_is_deleted",
    "give `dreambooth {command}` a folder of its own": "test_a_work_folder_of_the_user_is_refused_and_a_new_one_works",
    "did not write ({', '.join(entries[:5])})": "test_a_work_folder_of_the_user_is_refused_and_a_new_one_works",
    # training: stopping and continuing
    "command_line(*launcher, 'dreambooth', 'train'": "test_a_stopped_train_continues_with_the_command_it_names",
    "command_line('dreambooth', 'demo'": "test_a_stopped_demo_continues_with_the_command_it_names",
    "command_line('dreambooth', 'experiment'": "reason: the same continuation as the demo's (both go through "
                                               "experiment.continue_or_replace, run by the demo's test); a stopped "
                                               "experiment would retrain its finished variants for minutes",
    "command_line('dreambooth', 'train', '--config', checkpoint": "test_a_checkpoint_as_the_base_model_names_how_"
                                                                  "to_continue_it",
    # training: FSDP's refusals (the launch's accelerate settings)
    "this tool trains under FSDP2. Set fsdp_version: 2": FSDP_REFUSALS,
    "model.train_text_encoder under FSDP": FSDP_REFUSALS,
    "training.use_ema under FSDP": FSDP_REFUSALS,
    "fsdp_config.fsdp_offload_params (FSDP_OFFLOAD_PARAMS)": FSDP_REFUSALS,
    "validation.prompts under FSDP": FSDP_REFUSALS,
    # training: the config
    "no base model given; set it in config.yaml or pass": "test_missing_config_keys_name_the_flags_that_fill_them",
    "no class prompt is set; pass --class_prompt": "test_missing_config_keys_name_the_flags_that_fill_them",
    "no instance prompt; pass --instance_prompt": "test_missing_config_keys_name_the_flags_that_fill_them",
    "needs an initializer word whose embedding": "test_missing_config_keys_name_the_flags_that_fill_them",
    "Create one with `dreambooth init DIR`": "test_a_missing_config_file_is_made_by_init",
    "pass --use_ema too, or drop": "test_an_ema_setting_without_use_ema_is_refused_and_both_ways_on_run",
    "Fix these keys (in the YAML or as --flags)": "reason: names no command; each key it lists carries its own "
                                                  "advice, tested with it",
    "Fix these (in the YAML or as --flags)": "reason: names no command; each problem it lists carries its own "
                                             "advice, tested with it",
    "datasets from the Hugging Face hub are not read": "test_refused_diffusers_flags_name_what_works_instead",
    "train longer with --max_train_steps or --num_train_epochs": "test_refused_diffusers_flags_name_what_works_instead",
    "export after training: `dreambooth export OUTPUT_DIR": "test_refused_diffusers_flags_name_what_works_instead",
    "or run without --strict to skip them": "test_runtime_refusals_name_the_flag_to_drop",
    "Drop --torch_compile": "test_runtime_refusals_name_the_flag_to_drop",
    "`pip install bitsandbytes` (needs a CUDA GPU) or drop": "test_runtime_refusals_name_the_flag_to_drop",
    "`pip install xformers` or drop the flag": "test_runtime_refusals_name_the_flag_to_drop",
    "or pass --report_to none": "test_runtime_refusals_name_the_flag_to_drop",
    "Use --cuda_graph auto (on where it is valid) or off": "test_runtime_refusals_name_the_flag_to_drop",
    # training: the optimizer
    "asks for 8-bit AdamW and training.optimizer is": "test_optimizer_refusals_name_what_works",
    "Prodigy, and training.optimizer is": "test_optimizer_refusals_name_what_works",
    "Prodigy estimates its own step size and multiplies it": "test_optimizer_refusals_name_what_works",
    "and Prodigy steps every parameter group with one learning rate": "test_optimizer_refusals_name_what_works",
    "package, which is not installed; reinstall dreambooth with": "reason: installs from a package registry; "
                                                                  "prodigyopt and lion-pytorch are dependencies of "
                                                                  "this package, there wherever it installed whole",
    "Pass --cuda_graph off to skip the attempt": "reason: a capture that fails needs CUDA; --cuda_graph off itself "
                                                 "is run by test_runtime_refusals_name_the_flag_to_drop",
    "ran out of memory with one image at a time": "reason: needs a GPU to run out of memory on; "
                                                  "--prior_generation_precision fp16 needs CUDA too",
    # the hub
    "HF_HUB_OFFLINE is set, so nothing can be uploaded": "test_an_upload_that_cannot_happen_leaves_training_possible",
    "no hub token. Pass --hub_token": "reason: needs the hub (not reachable here); training without --push_to_hub "
                                      "is run by test_an_upload_that_cannot_happen_leaves_training_possible",
    "the hub cannot be reached": "reason: as 'no hub token'",
    "the hub refused the token": "reason: needs the hub",
    "but the upload to {repo_id} failed": "reason: needs the hub (`hf upload`)",
    "HF_HUB_OFFLINE is set, so it cannot be fetched": "reason: `hf download` needs the hub; a local folder is what "
                                                      "every other test passes",
    "it is gated: accept its licence": "reason: needs the hub",
    "there is no such repository (or it is private": "reason: needs the hub",
    "the hub refused it ({status}): it is private or gated": "reason: needs the hub",
    # models named wrongly
    "does not exist. Pass a diffusers model folder (e.g. a training output":
        "test_a_missing_model_can_be_made_by_the_command_named",
    "is a training checkpoint, not a model folder": "test_a_checkpoint_as_the_base_model_names_how_to_continue_it",
    "To train this LoRA further, continue its run": "test_a_lora_as_the_base_model_names_how_to_continue_it",
    "Pass the base model as {flag} and the LoRA as --lora": "test_a_lora_as_the_model_of_generate_names_the_base",
    "in a layout only training reads": "test_an_old_layout_checkpoint_is_saved_again_by_the_command_named",
    "`StableDiffusionPipeline.from_single_file(FILE, ": "test_a_single_file_converts_as_the_message_says",
    "is a full model folder, not a LoRA; pass it as the model": "test_a_model_given_as_a_lora_is_taken_as_the_model",
    "is a full single-file Stable Diffusion checkpoint, not a LoRA": "test_a_single_file_converts_as_the_message_says",
    "is a checkpoint of a full fine-tune, not a LoRA": "test_a_model_given_as_a_lora_is_taken_as_the_model",
    # generate
    "no prompt given: pass --prompt": "test_generate_refusals_name_what_works",
    "is a file; give a folder for the images": "test_generate_refusals_name_what_works",
    "did not write ({shown}); images written there would mix": "test_generate_refusals_name_what_works",
    "of an earlier `dreambooth generate` run": "test_generate_refusals_name_what_works",
    "is given more than once; a seed draws": "test_generate_refusals_name_what_works",
    "omit --seed for seed 0": "test_generate_refusals_name_what_works",
    # export
    "--merge-lora merges LoRAs into a full model, but SRC": "test_export_refusals_name_what_works",
    "to bake it into a full model use `dreambooth export BASE_MODEL": "test_export_refusals_name_what_works",
    "the kohya format is for LoRA files. Use --format single-file": "test_export_refusals_name_what_works",
    "give a file name such as": "test_export_refusals_name_what_works",
    "already exists; delete it or choose another name": "test_export_refusals_name_what_works",
    "already exists and is not an empty folder": "test_export_refusals_name_what_works",
    "which the kohya/A1111 LoRA format cannot express": "test_export_refusals_name_what_works",
    "have no name in SDXL's original layout": "reason: --format diffusers for a LoRA, as run by "
                                              "test_export_refusals_name_what_works; no SDXL layer without an SGM "
                                              "name is built by this tool",
    "has no 'ResNet, attention, ResNet' middle block": "reason: --format diffusers for a model, as run by "
                                                       "test_export_refusals_name_what_works; a UNet of this shape is "
                                                       "not one this tool builds",
    "has tensors with no place in the original Stable Diffusion layout": "reason: as the middle block's",
    "neither OpenAI's CLIP (SD 1.x": "reason: as the middle block's",
    "has tensors with no place in OpenCLIP's original layout": "reason: as the middle block's",
    "this one is {found} where {family} belongs": "reason: as the middle block's",
    "two tokenizers have different new tokens": "reason: as the middle block's",
    "is SDXL-shaped but its text encoders are": "reason: as the middle block's",
    "is a pickle file ({path.suffix}); this tool reads safetensors only":
        "test_a_pickle_lora_converts_as_the_message_says",
    # init and the project
    "already exists; pass --force to overwrite it": "test_init_advice_runs",
    "Give a diffusers model folder (relative to where you run the command": "test_init_advice_runs",
    "then `dreambooth train --config {config}`": "test_init_advice_runs",
    "3. Train: `dreambooth train --config config.yaml`": "test_init_advice_runs",
    # the report
    "Pass the --output_dir of a `dreambooth train` run": "test_report_of_a_folder_that_is_no_run_names_what_to_pass",
    # developer tools
    "is a developer tool that lives in the repository": "reason: needs the package installed without its "
                                                        "repository; `python bench/bench.py` is run by test_bench",
    # LoRAs, checkpoints and bases
    "It was trained on {base}; pass that model (or a fine-tune of it) as --model": "reason: a load failure the "
        "header check lets through (an adapter type diffusers cannot read); its advice is fit_error's, run by "
        "test_a_lora_for_another_family_names_the_model_it_was_trained_on",
    "Resume with --pretrained_model_name_or_path {base or": "test_a_checkpoint_resumed_on_another_base_names_the_"
                                                            "flag_that_resumes_it",
    # evaluate
    "nothing to measure: pass --clip DIR (CLIP-I and CLIP-T) and/or --dino DIR (DINO).": "reason: score_images' own, "
        "for library callers; the command's says more (scorers.nothing_to_measure) and passing --dino is run by "
        "test_evaluate_refusals_name_what_works",
    "{state}. Pass the folder of the subject's real photos": "test_evaluate_refusals_name_what_works",
    "holds no usable image{": "test_evaluate_refusals_name_what_works",
    "Pass a folder written by `dreambooth generate`, or use --model": "test_evaluate_refusals_name_what_works",
    "Generate some with `dreambooth generate --out {folder} ...`": "test_evaluate_refusals_name_what_works",
    "Generate the images with `dreambooth generate`, or use --model": "test_evaluate_refusals_name_what_works",
    "Drop them, or use --model": "test_evaluate_refusals_name_what_works",
    "holds the results of an earlier evaluation": "test_evaluate_refusals_name_what_works",
    "--checkpoints all scores the checkpoints of a run: pass": "test_evaluating_checkpoints_names_the_folder_and_"
                                                              "command_it_needs",
    "holds no checkpoint-N folder and no final model yet; nothing to score": "reason: says why there is nothing to "
                                                                            "score; suggests nothing to run",
    "score each checkpoint with `dreambooth evaluate --model BASE --lora CHECKPOINT`":
        "test_evaluating_checkpoints_names_the_folder_and_command_it_needs",
    "`dreambooth report {run_dir}` retries": "test_report_of_a_folder_that_is_no_run_names_what_to_pass",
    "holds no complete CLIP or DINO model. evaluate needs": "tests/test_evaluate.py::test_the_download_commands_the_"
                                                            "messages_suggest_lead_to_the_folders_evaluate_finds",
    "holds no {k.label} model; it needs {k.needs}": "tests/test_evaluate.py::test_the_download_commands_the_messages_"
                                                    "suggest_lead_to_the_folders_evaluate_finds",
    "a text encoder without CLIP's vision tower": "test_a_scorer_folder_of_the_wrong_kind_names_the_model_it_needs",
    "CLIP's vision tower alone; CLIP-T also needs its text tower": "test_a_scorer_folder_of_the_wrong_kind_names_the_"
                                                                  "model_it_needs",
    # serve
    "give --api-keys FILE (or $DREAMBOOTH_API_KEYS), or --allow-no-auth": "test_serve_start_up_refusals_name_the_"
                                                                          "options_that_start_it",
    "use at least {MIN_TOKEN_LENGTH} (e.g. `python -c": "test_serve_start_up_refusals_name_the_options_that_start_it",
    "Choose another --port (0 takes a free one)": "test_serve_start_up_refusals_name_the_options_that_start_it",
    "raise --max-pixels to at least {pixels}": "test_serve_start_up_refusals_name_the_options_that_start_it",
    "raise --max-steps to at least {character.steps}": "test_serve_start_up_refusals_name_the_options_that_start_it",
    "`dreambooth serve` needs {": "reason: installs from a package registry; the extra is what .ci/run installs",
    "send an API key as `Authorization: Bearer TOKEN`": "test_serve_request_refusals_name_what_is_answered",
    "with a longer deadline_s up to the server's": "test_serve_request_refusals_name_what_is_answered",
    "start `dreambooth serve` with --llm-base-url": "test_chat_advice_names_the_options_that_make_it_answer",
    # the studio (tests/test_studio_app.py)
    "log in with one of the studio's API keys (the page asks for it)": "tests/test_studio_app.py::test_with_keys_a_"
                                                                       "caller_logs_in_once_and_the_cookie_holds_no_key",
    "`dreambooth studio` needs {": "reason: installs from a package registry; the extra is what .ci/run installs",
    "is reachable from other machines, and the studio runs training": "tests/test_studio_app.py::test_the_studio_"
                                                                      "command_refuses_another_host_without_keys",
    "is a file, not a folder: give the folder that holds (or will": "tests/test_studio_app.py::test_the_studio_"
                                                                     "command_refuses_another_host_without_keys",
    "or start it with --api-keys to reach it under another name": "tests/test_serve.py::test_keyless_serve_answers_"
                                                                   "only_requests_addressed_to_this_machine",
    "or give it --api-keys to reach it under another name": "tests/test_studio_app.py::test_without_keys_the_studio_"
                                                            "answers_only_requests_addressed_to_this_machine",
    "save it smaller (JPEG at quality 90-95) and upload it again": "tests/test_studio_app.py::test_an_upload_over_"
                                                                   "the_limit_is_refused_before_it_is_read_whole",
    "is a secret, and the studio never writes one into config.yaml": "tests/test_studio_app.py::test_pushing_to_the_"
                                                                     "hub_is_refused_with_the_trainers_message_or_"
                                                                     "uploads_the_output",
    # serve --ray (tests/test_serve_ray_options.py)
    "not options of `dreambooth serve` (its --help lists them": RAY + "test_builder_args_are_the_serve_options_by_name",
    "is not a {kind.__name__} (`dreambooth serve --help` says what": RAY + "test_builder_args_are_the_serve_options_"
                                                                        "by_name",
    "describe(s) a Ray deployment: add --ray, or leave them out": RAY + "test_ray_options_without_ray_are_refused_and_"
                                                                  "what_the_message_says_works",
    "--min-replicas is an autoscaling bound: give --max-replicas": RAY + "test_ray_options_without_ray_are_refused_"
                                                                   "and_what_the_message_says_works",
    "`dreambooth serve --ray` needs Ray Serve: install the ray": "reason: installs from a package registry; the extra "
                                                                "is what .ci/run installs",
    "nothing answered there within {timeout_s} s ({e}). Start the": "reason: starts a Ray head (another program); "
                                                                      "tests/test_serve_ray.py starts a local Ray, "
                                                                      "the message's other way",
    "is not a Redis URL ({e}): give one such as": REDIS + "test_a_redis_url_that_does_not_answer_is_refused_before_any_"
                                                  "model_loads",
    "no Redis answered at --redis-url {shown(url)} within": REDIS + "test_a_redis_url_that_does_not_answer_is_"
                                                                    "refused_before_any_model_loads",
    "both say where the image cache is: drop --cache-dir": REDIS + "test_a_redis_url_that_does_not_answer_is_refused_"
                                                               "before_any_model_loads",
    "refused the login ({e}): put the right user": REDIS + "test_a_redis_that_refuses_the_login_names_the_password_"
                                                       "in_the_url",
    "holds control characters; set it to the key alone": "test_chat_advice_names_the_options_that_make_it_answer",
    "a faster model or a longer --llm-timeout-s": "test_chat_advice_names_the_options_that_make_it_answer",
    "use a model with tool calling (llama.cpp needs --jinja)": "reason: names another program's model and flag",
    # the flow-matching families (tests/test_flow_families.py)
    "is a Flux.1 schnell-type model (its": "tests/test_flow_families.py::test_a_schnell_run_with_guidance_is_refused",
    "Flux's CLIP reads 77 tokens as its pipeline does": FLOW + "test_settings_of_another_objective_are_refused_and_"
                                                        "dropping_them_works",
    "Flux.1 is guidance-distilled and its pipeline draws": FLOW + "test_a_lora_of_another_family_is_refused_before_"
                                                            "weights_load",
    "SD3's transformer has no guidance embedding": FLOW + "test_settings_of_another_objective_are_refused_and_"
                                                   "dropping_them_works",
    "Min-SNR-gamma weights the epsilon and v-prediction": FLOW + "test_settings_of_another_objective_are_refused_"
                                                          "and_dropping_them_works",
    "T5 reads {limit} tokens and would cut": FLOW + "test_a_t5_prompt_past_max_sequence_length_is_refused",
    "is not a folder here. It is read as a local folder": "test_refused_diffusers_flags_name_what_works_instead",
    "names a column of {path}, which does not exist; write it": "tests/test_captions.py::test_dataset_name_reads_a_"
                                                                  "local_imagefolder",
    "has both sides between {low} and {high} in steps of {step}": "tests/test_buckets.py::test_the_report_lists_the_"
                                                                   "buckets_and_bad_ranges_are_refused",
    "so it would change nothing; add NAME.mask.png files or photos": "tests/test_masks.py::test_a_bad_mask_or_none_"
                                                                     "at_all_stops_the_run_before_anything_is_written",
    "found, unused; pass --masked_loss to learn only": "tests/test_masks.py::test_mask_files_are_not_photos_and_the_"
                                                       "report_says_what_masked_loss_would_do",
    "reads prompts through CLIP alone and has no T5": "tests/test_t5_token.py::test_t5_new_token_is_refused_where_it_"
                                                      "means_nothing",
    "no subject's identifier is a new token": "tests/test_t5_token.py::test_t5_new_token_is_refused_where_it_means_"
                                              "nothing",
    "keeps the frozen denoiser in 4 bits, and a full fine-tune": FLOW + "test_a_quantized_base_is_refused_where_it_"
                                                                  "cannot_run",
    "needs bitsandbytes, which is not installed; `pip install bitsandbytes`": "reason: installs from a package "
                                                                               "registry (and needs CUDA)",
    "measures SD 1.x/2.x models; {options.model} is": "reason: train and evaluate, which it names, are run for the "
                                                      "flow families in tests/test_flow_families.py",
    # the flow families' exports (tests/test_export_flow.py)
    "the kohya export writes SD 1.x/2.x, SDXL and Flux.1 LoRAs": EXPORT + "test_a_kohya_export_of_an_sd3_lora_is_"
                                                                   "refused_naming_the_format_that_works",
    "adapts transformer layer(s) with no place in": EXPORT + "test_a_flux_lora_layer_with_no_kohya_name_is_refused",
    "It is not a plain {'Flux.1' if family": "reason: a transformer with tensors outside its family's layout (an odd "
                                             "variant) that no model here makes; --format diffusers copies it",
    "has keys the kohya export of a Flux LoRA cannot convert": "reason: a file with keys of another kind than "
                                                               "LoRA layers, which no run here writes",
    "which the kohya format cannot e": ADAPTERS + "test_a_flux_dora_is_refused_by_the_kohya_export_and_copied_by_the_"
                                       "diffusers_one",
    "lacks {counts[target] - len(pieces)} of its": "reason: a transformer missing part of a fused layer is a "
                                                   "damaged file no model here makes; --format diffusers copies it",
    "but the single file holds the transformer alone": EXPORT + "test_a_text_encoder_lora_is_not_merged_into_a_file_"
                                                       "without_a_text_encoder",
    # diffusers' Flux and SD3 example commands (tests/test_diffusers_commands.py)
    "Ascend NPUs are not supported; drop the flag": COMMANDS + "test_npu_attention_is_refused_and_the_command_without_"
                                                    "it_passes",
    "--upcast_before_saving saves in fp32, and --save_precision": COMMANDS + "test_upcast_before_saving_is_fp32_and_"
                                                                  "refused_beside_another_save_precision",
    # adapter kinds (tests/test_adapters.py)
    "--use_dora asks for DoRA adapters, and --adapter": ADAPTER_SETTINGS,
    "is an adapter that --method lora trains, and model.method is": ADAPTER_SETTINGS,
    "it sizes LoKr's factors, and lora.adapter is": ADAPTER_SETTINGS,
    "has no dropout on its path as LoRA has": ADAPTER_SETTINGS,
    "are convolution layers of this model's": ADAPTER_SETTINGS,
    "which names {title}'s original fused layers": ADAPTERS + "test_lycoris_kinds_on_flux_are_refused_at_preflight_"
                                                   "naming_what_works",
    "which diffusers' LoRA format cannot hold and its SD pipelines": ADAPTERS + "test_a_lycoris_file_goes_to_kohya_as_"
                                                                    "it_is_and_has_no_diffusers_form",
    "adapter in LyCORIS' layout (`lora_unet_....{key}` keys): put": ADAPTERS + "test_the_model_card_of_a_lycoris_run_"
                                                                   "names_commands_that_run",
}


def test_every_suggestion_site_is_run_or_has_a_reason():
    """A suggestion the tool can print is either run by a test here or has a stated reason it cannot be."""
    sites = suggestion_sites()
    unmatched = [f"{m}:{line}: {text[:120]!r}" for m, line, text in sites
                 if sum(fragment in text for fragment in SITES) != 1]
    assert not unmatched, "suggestions with no entry (or several) in SITES:\n" + "\n".join(unmatched)
    stale = [fragment for fragment in SITES if not any(fragment in text for _, _, text in sites)]
    assert not stale, f"SITES entries that match no message any more: {stale}"
    here = sys.modules[__name__]
    missing = set()
    for how in SITES.values():
        if how.startswith("reason: "):
            continue
        module, _, name = how.rpartition("::")
        exists = (f"def {name}(" in (PACKAGE.parents[1] / module).read_text()) if module else hasattr(here, name)
        missing |= set() if exists else {how}
    assert not missing, f"SITES names tests that do not exist: {missing}"


def test_every_flag_a_message_or_docstring_names_exists():
    """`--resume_from_checkpoint` in `demo`'s message was no flag of `demo`; here, at least of some command."""
    known = set().union(*all_flags().values()) | set(OTHER_PROGRAMS) | PROSE
    from dreambooth.evaluation import background, world_model

    known |= {flag for f in fields(world_model.PretrainOptions) for flag in flags_of(f)}
    known |= {flag for f in fields(background.BackgroundOptions) for flag in flags_of(f)}
    unknown = sorted({f"{flag} ({m}:{line})" for m, line, text, _ in package_strings() for flag in FLAG.findall(text)
                      if flag not in known})
    assert not unknown, f"flags no command has: {unknown}"


def test_every_dreambooth_command_in_a_message_parses_with_that_commands_flags():
    flags = all_flags()
    wrong = []
    for module, line, text, _ in package_strings():
        for quoted in QUOTED.findall(text):
            words = quoted.split()
            if len(words) < 2 or words[0] != "dreambooth" or "{" in words[1]:
                continue
            command = words[1]
            if command not in flags and not command.startswith("-"):
                wrong.append(f"{module}:{line}: no command {command!r} in {quoted!r}")
                continue
            wrong += [f"{module}:{line}: {flag} is no flag of `dreambooth {command}` in {quoted!r}"
                      for flag in FLAG.findall(quoted) if command in flags and flag not in flags[command]]
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------------------------- helpers


def cli_run(capsys, *argv: str, code: int = 0) -> str:
    """Runs `dreambooth ARGV` in this process; its stdout and stderr together, after checking its exit status."""
    try:
        got = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's refusals
        got = e.code
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert got == code, text
    assert "Traceback" not in text
    return text


class Reached(Exception):
    """Training got past pre-flight: the command was accepted."""


def passes_preflight(capsys, monkeypatch, *argv: str) -> str:
    """Runs `dreambooth train ARGV` up to the point where it would load weights: the refusal is gone. Cheaper than
    training, where the suggestion's effect is only that the command is accepted."""
    from dreambooth.training import loop as train_module

    def reached(*args, **kwargs):
        raise Reached

    with monkeypatch.context() as m:
        m.setattr(train_module, "setup", reached)
        with pytest.raises(Reached):
            main([str(a) for a in argv])
    return capsys.readouterr().out


def suggested(message: str, start: str = "dreambooth ") -> list[str]:
    """The commands a message quotes (`dreambooth ...`), in order."""
    return [q for q in QUOTED.findall(message) if q.startswith(start)]


def as_argv(command: str, **fill: str) -> list[str]:
    """A quoted command's words after `dreambooth`, with its placeholders (`DIR`, `N`, ...) filled in."""
    words = shlex.split(command)
    assert words[0] == "dreambooth", command
    unknown = [w for w in words if w in PLACEHOLDERS and w not in fill]
    assert not unknown, f"fill in {unknown} of {command!r}"
    return [fill.get(w, w) for w in words[1:]]


def train_argv(model, instance_dir, out, *extra, steps=2):
    return ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", "a photo of sks dog", "--resolution", "64", "--max_train_steps", str(steps),
            "--learning_rate", "1e-3", "--seed", "0", "--output_dir", str(out), "--report_to", "none", *extra]


def run_info(out: Path) -> dict:
    return json.loads((out / "run_info.json").read_text())


def step_of(out: Path) -> int:
    """The last step a run logged."""
    lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
    return max(json.loads(line).get("step", 0) for line in lines)


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """A finished full fine-tune of 2 steps with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("runs") / "full"
    instance = photo_folder(tmp_path_factory.mktemp("photos") / "instance", 3)
    assert main(train_argv(tiny_model, instance, out, "--checkpointing_steps", "1")) == 0
    return out, instance


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    """A finished LoRA run of 2 steps with a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    instance = photo_folder(tmp_path_factory.mktemp("photos") / "instance", 3)
    assert main(train_argv(tiny_model, instance, out, "--method", "lora", "--checkpointing_steps", "2")) == 0
    return out, instance


# ------------------------------------------------------------------------------------ training: the run folder


def test_a_folder_holding_a_run_offers_three_ways_on(finished_run, tiny_model, tmp_path, capsys):
    out, instance = finished_run
    first = run_info(out)["run_id"]
    err = cli_run(capsys, *train_argv(tiny_model, instance, out, steps=3), code=2)
    assert "Continue it with --resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose " \
           "another --output_dir" in err
    copy = tmp_path / "copy"  # each way on, on its own copy of the run
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    cli_run(capsys, *train_argv(tiny_model, instance, copy, "--resume_from_checkpoint", "latest", steps=3))
    assert run_info(copy)["run_id"] == first and step_of(copy) == 3  # continued: same run, one more step
    replaced = tmp_path / "replaced"
    subprocess.run(["cp", "-r", str(out), str(replaced)], check=True)
    cli_run(capsys, *train_argv(tiny_model, instance, replaced, "--overwrite_output_dir", steps=1))
    assert run_info(replaced)["run_id"] != first and not (replaced / "checkpoint-2").exists()
    cli_run(capsys, *train_argv(tiny_model, instance, tmp_path / "another", steps=1))
    # a run that kept no checkpoint: "replace it with --overwrite_output_dir"
    bare = tmp_path / "bare"
    cli_run(capsys, *train_argv(tiny_model, instance, bare, "--checkpointing_steps", "50", steps=1))
    err = cli_run(capsys, *train_argv(tiny_model, instance, bare, "--resume_from_checkpoint", "latest"), code=2)
    assert "no checkpoint to resume. Replace it with --overwrite_output_dir" in err
    cli_run(capsys, *train_argv(tiny_model, instance, bare, "--overwrite_output_dir", steps=1))
    # a checkpoint of other settings: "start a new run in another --output_dir"
    err = cli_run(capsys, *train_argv(tiny_model, instance, copy, "--resume_from_checkpoint", "latest",
                                      "--resolution", "32", steps=4), code=2)
    assert "Resume with the same settings, or start a new run in another --output_dir" in err
    cli_run(capsys, *train_argv(tiny_model, instance, tmp_path / "new", "--resolution", "32", steps=1))


def test_a_checkpoint_past_the_end_can_be_trained_further_or_used(finished_run, tiny_model, tmp_path, capsys):
    out, instance = finished_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    err = cli_run(capsys, *train_argv(tiny_model, instance, copy, "--resume_from_checkpoint", "checkpoint-2",
                                      steps=1), code=2)
    assert "Raise --max_train_steps to train further" in err
    assert "(`dreambooth generate --model` and `export` take it)" in err
    cli_run(capsys, *train_argv(tiny_model, instance, copy, "--resume_from_checkpoint", "checkpoint-2", steps=3))
    assert step_of(copy) == 3
    cli_run(capsys, "generate", "--model", copy / "checkpoint-2", "--prompt", "a photo of sks dog", "--steps", "2",
            "--out", tmp_path / "shots")
    assert len(list((tmp_path / "shots").glob("0*.png"))) == 1
    cli_run(capsys, "export", copy / "checkpoint-2", "--format", "diffusers", "--out", tmp_path / "model")
    assert (tmp_path / "model" / "model_index.json").is_file()


def test_a_locked_output_folder_is_free_once_its_lock_is_deleted(tiny_model, instance_dir, tmp_path, capsys,
                                                                 monkeypatch):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".dreambooth.lock").write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(),
                                                         "since": "2026-12-07T00:00:00"}))
        err = cli_run(capsys, *train_argv(tiny_model, instance_dir, out, steps=1), code=2)
        assert "Wait for it to end, or choose another --output_dir. If no run is alive, delete" in err
        lock = Path(re.search(r"If no run is alive, delete (\S+)\.$", err.strip()).group(1))
        passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, instance_dir, tmp_path / "another"))
        lock.unlink()
        passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, instance_dir, out))
    finally:
        alive.kill()


def test_a_work_folder_of_the_user_is_refused_and_a_new_one_works(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    err = cli_run(capsys, "tiny-model", tmp_path / "mine", code=2)
    assert "Choose a new or empty folder" in err
    (tmp_path / "file").write_text("x")
    assert "a folder of its own" in cli_run(capsys, "tiny-model", tmp_path / "file", code=2)
    cli_run(capsys, "tiny-model", tmp_path / "new")
    assert (tmp_path / "new" / "model_index.json").is_file() and (tmp_path / "mine" / "notes.txt").is_file()


# --------------------------------------------------------------------------- training: stopping and continuing


def test_a_stopped_train_continues_with_the_command_it_names(tiny_model, instance_dir, tmp_path, capsys,
                                                             monkeypatch):
    """The message said "the same command and --resume_from_checkpoint latest", which a config that replaces its run
    refuses; it now names the whole command, and that command continues the run."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output": {"overwrite_output_dir": True}}))
    argv = train_argv(tiny_model, instance_dir, tmp_path / "out", "--config", config, "--checkpointing_steps", "50",
                      steps=4)
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        text = cli_run(capsys, *argv)
    assert "stopped at step 2 as asked" in text
    (command,) = suggested(text)
    assert command.endswith("--no-overwrite_output_dir --resume_from_checkpoint latest")
    first = run_info(tmp_path / "out")["run_id"]
    cli_run(capsys, *as_argv(command))
    assert run_info(tmp_path / "out")["run_id"] == first and step_of(tmp_path / "out") == 4
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_a_stopped_demo_continues_with_the_command_it_names(tmp_path, capsys, monkeypatch):
    """`dreambooth demo` has no --resume_from_checkpoint, and a plain rerun threw the checkpoint away."""
    import dataclasses

    from dreambooth.evaluation import experiment

    # the demo's recipe, with fewer class images and measuring images and lighter validation drawings (8 images of
    # 20 sampler steps after every step, at 4 steps): what is tested is how it continues
    light = dataclasses.replace(experiment.RECIPES["sd"], num_class_images=4, images_per_prompt=1, sample_steps=2)
    monkeypatch.setitem(experiment.RECIPES, "sd", light)
    train_variant = experiment.train_variant

    def lighter(*args, extra, **kwargs):
        return train_variant(*args, extra={**extra, "validation.num_images": 1, "validation.num_inference_steps": 2},
                             **kwargs)

    monkeypatch.setattr(experiment, "train_variant", lighter)
    out = tmp_path / "demo"
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        text = cli_run(capsys, "demo", "--out", out, "--steps", "4")
    (command,) = suggested(text)
    assert command == shlex.join(["dreambooth", "demo", "--out", str(out), "--steps", "4"])
    first = run_info(out / "model")["run_id"]
    assert (out / "model" / "checkpoint-2").is_dir()
    text = cli_run(capsys, *as_argv(command))
    assert "demo finished" in text and "resume" in text  # pre-flight says it resumes
    assert run_info(out / "model")["run_id"] == first and step_of(out / "model") == 4
    # finished, it trains again from the start when run again
    cli_run(capsys, *as_argv(command))
    assert run_info(out / "model")["run_id"] != first


# ------------------------------------------------------------------------------------------ training: the config


def test_missing_config_keys_name_the_flags_that_fill_them(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    err = cli_run(capsys, "train", "--instance_data_dir", instance_dir, "--with_prior_preservation", "--class_data_dir",
                  tmp_path / "class", "--resolution", "64", "--output_dir", out, code=2)
    fills = []
    for key, pattern in (("model", r"pass (--pretrained_model_name_or_path) PATH"),
                         ("class", r"pass (--class_prompt) '([^']+)'"),
                         ("instance", r"pass (--instance_prompt) '([^']+)'")):
        match = re.search(pattern, err)
        assert match, key
        fills += [match.group(1), str(tiny_model) if key == "model" else match.group(2)]
    err = cli_run(capsys, "train", "--instance_data_dir", instance_dir, "--with_prior_preservation", "--class_data_dir",
                  tmp_path / "class", "--resolution", "64", "--output_dir", out, *fills, "--num_class_images", "2",
                  "--class_inference_steps", "1", "--max_train_steps", "1", "--report_to", "none")
    assert (out / "model_index.json").is_file()
    # a new token needs its initializer: the flags named fill it
    argv = train_argv(tiny_model, instance_dir, tmp_path / "token", steps=1)
    argv[argv.index("--instance_prompt") + 1] = "a photo of <zq> dog"
    err = cli_run(capsys, *argv, code=2)
    flag = re.search(r"set token.initializer \((--initializer) WORD\)", err).group(1)
    cli_run(capsys, *argv, flag, "dog")
    assert run_info(tmp_path / "token")["subjects"][0]["identifier"] == "<zq>"
    # several new tokens: --identifier names the subject's
    argv[argv.index("--instance_prompt") + 1] = "a photo of <zq> <yy> dog"
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "two")
    err = cli_run(capsys, *argv, "--initializer", "dog", code=2)
    assert "name it with --identifier" in err
    cli_run(capsys, *argv, "--initializer", "dog", "--identifier", "<yy>")


def test_an_ema_setting_without_use_ema_is_refused_and_both_ways_on_run(tiny_model, instance_dir, tmp_path, capsys,
                                                                        monkeypatch):
    argv = train_argv(tiny_model, instance_dir, tmp_path / "out", "--ema_on_cpu", steps=1)
    err = cli_run(capsys, *argv, code=2)
    advice = re.search(r"training.ema_on_cpu: .*; pass (--use_ema) too, or drop (--ema_on_cpu)", err)
    assert advice, err
    cli_run(capsys, *argv, advice.group(1))
    assert run_info(tmp_path / "out")["ema"]["on_cpu"] is True
    dropped = train_argv(tiny_model, instance_dir, tmp_path / "dropped", "--ema_on_cpu", steps=1)
    passes_preflight(capsys, monkeypatch, *[a for a in dropped if a != advice.group(2)])


def test_a_missing_config_file_is_made_by_init(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = cli_run(capsys, "train", "--config", "project/config.yaml", code=2)
    (command,) = suggested(err)
    cli_run(capsys, *as_argv(command, DIR="project"))
    err = cli_run(capsys, "train", "--config", "project/config.yaml", code=2)
    assert "does not exist. Create one" not in err and "model.pretrained_model" in err


def test_refused_diffusers_flags_name_what_works_instead(tiny_model, instance_dir, lora_run, tmp_path, capsys,
                                                         monkeypatch):
    base = train_argv(tiny_model, instance_dir, tmp_path / "a", steps=1)
    err = cli_run(capsys, *base, "--dataset_name", "user/dogs", code=2)
    assert "pass it as --instance_data_dir" in err
    passes_preflight(capsys, monkeypatch, *base)  # the photos in a folder, as --instance_data_dir says
    err = cli_run(capsys, *train_argv(tiny_model, instance_dir, tmp_path / "b"), "--repeats", "3", code=2)
    assert "train longer with --max_train_steps or --num_train_epochs" in err
    argv = train_argv(tiny_model, instance_dir, tmp_path / "b")
    del argv[argv.index("--max_train_steps"):argv.index("--max_train_steps") + 2]
    cli_run(capsys, *argv, "--num_train_epochs", "1")
    assert step_of(tmp_path / "b") == 4  # 4 photos, batch 1
    err = cli_run(capsys, *train_argv(tiny_model, instance_dir, tmp_path / "d"), "--output_kohya_format", code=2)
    (command,) = suggested(err)
    lora_out, _ = lora_run
    cli_run(capsys, *as_argv(command, OUTPUT_DIR=str(lora_out), FILE=str(tmp_path / "kohya.safetensors"))
            if "OUTPUT_DIR/" not in command else
            as_argv(command.replace("OUTPUT_DIR/", f"{lora_out}/"), FILE=str(tmp_path / "kohya.safetensors")))
    assert (tmp_path / "kohya.safetensors").is_file()


def test_runtime_refusals_name_the_flag_to_drop(tiny_model, instance_dir, tmp_path, capsys, monkeypatch):
    """Each refusal names a flag; the same command without it (or with the value named) trains."""
    (instance_dir / "notes.md").write_text("not a photo")  # not .txt: that is a photo's caption (training.captions)
    cases = [(["--strict"], "run without --strict", []),
             (["--torch_compile"], "Drop --torch_compile", []),
             (["--report_to", "wandb"], "pass --report_to none", ["--report_to", "none"]),
             (["--cuda_graph", "on"], "Use --cuda_graph auto", ["--cuda_graph", "auto"]),
             (["--cuda_graph", "on"], "or off", ["--cuda_graph", "off"])]
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        cases.append((["--use_8bit_adam"], "or drop --use_8bit_adam", []))
        cases.append((["--optimizer", "adamw8bit"], "or drop --optimizer adamw8bit", []))
    if importlib.util.find_spec("xformers") is None:
        cases.append((["--enable_xformers_memory_efficient_attention"], "or drop the flag", []))
    for i, (refused, advice, instead) in enumerate(cases):
        err = cli_run(capsys, *train_argv(tiny_model, instance_dir, tmp_path / f"r{i}", *refused, steps=1), code=2)
        assert advice in err, (refused, err)
        passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, instance_dir, tmp_path / f"r{i}", *instead))


def test_optimizer_refusals_name_what_works(tiny_model, instance_dir, tmp_path, capsys, monkeypatch):
    """Prodigy's learning rates, its settings given to another optimizer, 8-bit AdamW asked for beside Prodigy: each
    refusal names the change, and the command with it passes pre-flight (train_argv's --learning_rate is 1e-3)."""
    import importlib.util

    prodigy = ["--optimizer", "prodigy", "--learning_rate", "1.0"]
    cases = [(["--optimizer", "prodigy"], "Pass --learning_rate 1.0", [prodigy]),
             (["--optimizer", "prodigy"], "--prodigy_d_coef, e.g. 0.5 or 2", [[*prodigy, "--prodigy_d_coef", "2"]]),
             ([*prodigy, "--text_encoder_lr", "5e-6"], "Drop --text_encoder_lr (it then follows --learning_rate)",
              [prodigy]),
             ([*prodigy, "--use_8bit_adam"], "Drop --use_8bit_adam to train with prodigy, or pass --optimizer "
              "adamw8bit", [prodigy, ["--optimizer", "adamw8bit"]]),
             (["--prodigy_beta3", "0.9", "--prodigy_safeguard_warmup=False"], "Drop --prodigy_beta3, "
              "--prodigy_safeguard_warmup, or pass --optimizer prodigy (with --learning_rate 1.0)",
              [[], ["--prodigy_beta3", "0.9", "--prodigy_safeguard_warmup=False", *prodigy]])]
    for i, (refused, advice, instead) in enumerate(cases):
        out = tmp_path / f"o{i}"
        err = cli_run(capsys, *train_argv(tiny_model, instance_dir, out, *refused, steps=1), code=2)
        assert advice in err and err.count("\n  - ") == 1, (refused, err)  # the one problem, the one advice
        for flags in instead:
            if flags == ["--optimizer", "adamw8bit"] and importlib.util.find_spec("bitsandbytes") is None:
                # its own refusal, whose advice test_runtime_refusals_name_the_flag_to_drop runs
                err = cli_run(capsys, *train_argv(tiny_model, instance_dir, out, *flags), code=2)
                assert "bitsandbytes, which is not installed" in err
                continue
            passes_preflight(capsys, monkeypatch, *train_argv(tiny_model, instance_dir, out, *flags))


def test_an_upload_that_cannot_happen_leaves_training_possible(tiny_model, instance_dir, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = train_argv(tiny_model, instance_dir, tmp_path / "out", steps=1)
    err = cli_run(capsys, *argv, "--push_to_hub", code=2)
    assert "train without --push_to_hub" in err
    passes_preflight(capsys, monkeypatch, *argv)


# ---------------------------------------------------------------------------------------- models named wrongly


def test_a_missing_model_can_be_made_by_the_command_named(tmp_path, capsys):
    err = cli_run(capsys, "generate", "--model", tmp_path / "nowhere", "--prompt", "a dog", code=2)
    (command,) = suggested(err)
    cli_run(capsys, *as_argv(command, DIR=str(tmp_path / "nowhere")))
    cli_run(capsys, "generate", "--model", tmp_path / "nowhere", "--prompt", "a dog", "--steps", "1",
            "--out", tmp_path / "shots")


def test_a_checkpoint_as_the_base_model_names_how_to_continue_it(finished_run, tiny_model, tmp_path, capsys):
    out, instance = finished_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    checkpoint = copy / "checkpoint-1"
    err = cli_run(capsys, *train_argv(checkpoint, instance, tmp_path / "new"), code=2)
    (resume,), (export,) = ([c for c in suggested(err) if c.startswith(f"dreambooth {kind} ")]
                            for kind in ("train", "export"))
    cli_run(capsys, *as_argv(resume))  # continues the run from step 1 to its end, step 2
    assert step_of(copy) == 2 and run_info(copy)["run_id"] == run_info(out)["run_id"]
    cli_run(capsys, *as_argv(export, DIR=str(tmp_path / "model")))
    cli_run(capsys, *train_argv(tmp_path / "model", instance, tmp_path / "from-export", steps=1))


def test_a_lora_as_the_base_model_names_how_to_continue_it(lora_run, tiny_model, tmp_path, capsys):
    out, instance = lora_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    err = cli_run(capsys, *train_argv(copy, instance, tmp_path / "new"), code=2)
    assert f"Train from its base model (model.pretrained_model: {tiny_model})" in err
    (resume,) = suggested(err)
    cli_run(capsys, *as_argv(resume, N="3"))
    assert step_of(copy) == 3 and (copy / "pytorch_lora_weights.safetensors").is_file()
    cli_run(capsys, *train_argv(tiny_model, instance, tmp_path / "from-base", "--method", "lora", steps=1))
    # a LoRA run that kept no checkpoint says it cannot be continued, and names no command
    bare = tmp_path / "bare"
    cli_run(capsys, *train_argv(tiny_model, instance, bare, "--method", "lora", steps=1))
    err = cli_run(capsys, *train_argv(bare, instance, tmp_path / "n2"), code=2)
    assert "kept no checkpoint" in err and not suggested(err)


def test_a_lora_as_the_model_of_generate_names_the_base(lora_run, tmp_path, capsys):
    out, _ = lora_run
    err = cli_run(capsys, "generate", "--model", out, "--prompt", "a photo of sks dog", code=2)
    (command,) = QUOTED.findall(err.split("Pass the base model")[1])
    cli_run(capsys, "generate", *shlex.split(command), "--prompt", "a photo of sks dog", "--steps", "1", "--out",
            tmp_path / "shots")


def test_an_old_layout_checkpoint_is_saved_again_by_the_command_named(tiny_model, instance_dir, tmp_path, capsys):
    from test_train_e2e import make_legacy_copy

    argv = train_argv(tiny_model, instance_dir, tmp_path / "run", "--checkpointing_steps", "1", "--initializer", "dog")
    argv[argv.index("--instance_prompt") + 1] = "a photo of <zq> dog"
    cli_run(capsys, *argv)
    legacy = make_legacy_copy(tmp_path / "run", tmp_path / "legacy", tiny_model)
    err = cli_run(capsys, "generate", "--model", legacy / "checkpoint-1", "--prompt", "a <zq>", code=2)
    (command,) = suggested(err)
    cli_run(capsys, *as_argv(command))  # one step further, into the legacy run's own folder
    assert step_of(legacy) == 2
    cli_run(capsys, "generate", "--model", legacy / "checkpoint-2", "--prompt", "a <zq>", "--steps", "1",
            "--out", tmp_path / "shots")


def test_a_single_file_converts_as_the_message_says(tiny_model, tmp_path, capsys):
    """The advice said `from_single_file(FILE)`, which fetches configs from the hub; offline it needs `config=`."""
    file = tmp_path / "model.safetensors"
    cli_run(capsys, "export", tiny_model, "--format", "single-file", "--out", file)
    messages = [cli_run(capsys, "generate", "--model", file, "--prompt", "a dog", code=2),
                cli_run(capsys, "export", file, "--format", "kohya", "--out", tmp_path / "k.safetensors", code=2),
                cli_run(capsys, "generate", "--model", tiny_model, "--lora", file, "--prompt", "a dog", code=2)]
    code = None
    for message in messages:
        (snippet,) = [q for q in QUOTED.findall(message) if "from_single_file" in q]
        code = code or snippet
        assert snippet == code
    script = (f"from diffusers import StableDiffusionPipeline\nFILE, MODEL_DIR, DIR = {str(file)!r}, "
              f"{str(tiny_model)!r}, {str(tmp_path / 'folder')!r}\n{code}\n")
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    cli_run(capsys, "generate", "--model", tmp_path / "folder", "--prompt", "a dog", "--steps", "1", "--out",
            tmp_path / "shots")


def test_a_model_given_as_a_lora_is_taken_as_the_model(finished_run, tiny_model, tmp_path, capsys):
    out, _ = finished_run
    for i, model in enumerate((tiny_model, out / "checkpoint-1")):
        err = cli_run(capsys, "generate", "--model", tiny_model, "--lora", model, "--prompt", "a dog", code=2)
        assert "pass it as the model (--model" in err
        cli_run(capsys, "generate", "--model", model, "--prompt", "a dog", "--steps", "1", "--out", tmp_path / f"s{i}")


# ---------------------------------------------------------------------------------------------------- generate


def test_generate_refusals_name_what_works(tiny_model, tmp_path, capsys):
    base = ["generate", "--model", tiny_model, "--steps", "1"]
    err = cli_run(capsys, *base, "--out", tmp_path / "a", code=2)
    assert "pass --prompt 'a photo of sks dog' (repeatable) or --prompts-file FILE" in err
    cli_run(capsys, *base, "--prompt", "a photo of sks dog", "--out", tmp_path / "a")
    (tmp_path / "prompts.txt").write_text("a photo of sks dog\n")
    cli_run(capsys, *base, "--prompts-file", tmp_path / "prompts.txt", "--out", tmp_path / "b")
    (tmp_path / "file").write_text("x")
    assert "give a folder for the images" in cli_run(capsys, *base, "--prompt", "a", "--out", tmp_path / "file",
                                                     code=2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"x")
    assert "Choose a new or empty folder" in cli_run(capsys, *base, "--prompt", "a", "--out", tmp_path / "mine",
                                                     code=2)
    err = cli_run(capsys, *base, "--prompt", "b", "--out", tmp_path / "a", code=2)
    assert "choose another --out, or pass --overwrite" in err.replace("Choose", "choose")
    cli_run(capsys, *base, "--prompt", "b", "--out", tmp_path / "a", "--overwrite")
    cli_run(capsys, *base, "--prompt", "b", "--out", tmp_path / "c")
    err = cli_run(capsys, *base, "--prompt", "b", "--seed", "1", "--seed", "1", "--out", tmp_path / "d", code=2)
    assert "Give each seed once (--num-images draws more images per seed)" in err
    cli_run(capsys, *base, "--prompt", "b", "--seed", "1", "--num-images", "2", "--out", tmp_path / "d")
    assert len(list((tmp_path / "d").glob("0*.png"))) == 2
    err = cli_run(capsys, *base, "--prompt", "b", "--seed", "-1", "--out", tmp_path / "e", code=2)
    assert "omit --seed for seed 0" in err
    cli_run(capsys, *base, "--prompt", "b", "--out", tmp_path / "e")
    png = next((tmp_path / "e").glob("0*.png"))
    assert json.loads(Image.open(png).text["dreambooth"])["seed"] == 0


# ------------------------------------------------------------------------------------------------------ export


def test_export_refusals_name_what_works(lora_run, tiny_model, tmp_path, capsys):
    from dreambooth.formats.lora import find_lora_file

    out, _ = lora_run
    lora = find_lora_file(out)
    err = cli_run(capsys, "export", lora, "--format", "single-file", "--merge-lora", lora, "--out",
                  tmp_path / "x.safetensors", code=2)
    assert "Pass the base model folder as SRC, and this LoRA as --merge-lora" in err
    err = cli_run(capsys, "export", lora, "--format", "single-file", "--out", tmp_path / "x.safetensors", code=2)
    (command,) = suggested(err)
    cli_run(capsys, *as_argv(command, BASE_MODEL=str(tiny_model),
                             **{"FILE.safetensors": str(tmp_path / "m.safetensors")}))
    err = cli_run(capsys, "export", tiny_model, "--format", "kohya", "--out", tmp_path / "k.safetensors", code=2)
    assert "Use --format single-file for a full model (A1111/ComfyUI), or --format diffusers" in err
    cli_run(capsys, "export", tiny_model, "--format", "single-file", "--out", tmp_path / "s.safetensors")
    cli_run(capsys, "export", tiny_model, "--format", "diffusers", "--out", tmp_path / "d")
    # --out: a folder where a file goes, a file that exists, a folder that is not empty
    (tmp_path / "folder").mkdir()
    err = cli_run(capsys, "export", lora, "--format", "kohya", "--out", tmp_path / "folder", code=2)
    name = re.search(r"give a file name such as (\S+)\.$", err.strip()).group(1)
    cli_run(capsys, "export", lora, "--format", "kohya", "--out", name)
    err = cli_run(capsys, "export", lora, "--format", "kohya", "--out", name, code=2)
    assert "delete it or choose another name" in err
    Path(name).unlink()
    cli_run(capsys, "export", lora, "--format", "kohya", "--out", name)
    err = cli_run(capsys, "export", tiny_model, "--format", "diffusers", "--out", tmp_path / "d", code=2)
    assert "delete it or choose another folder" in err
    cli_run(capsys, "export", tiny_model, "--format", "diffusers", "--out", tmp_path / "d2")
    # an adapter kohya cannot express (DoRA, by its adapter config): --format diffusers copies it
    from dreambooth.formats.atomic import save_safetensors_atomic
    from dreambooth.formats.lora import ADAPTER_METADATA_KEY, read_safetensors

    tensors, metadata = read_safetensors(lora)
    config = json.loads(metadata[ADAPTER_METADATA_KEY])
    config.update({k.replace(".r", ".use_dora"): True for k in list(config) if k.endswith(".r")})
    dora = tmp_path / "dora.safetensors"
    save_safetensors_atomic(tensors, dora, {**metadata, ADAPTER_METADATA_KEY: json.dumps(config)})
    err = cli_run(capsys, "export", dora, "--format", "kohya", "--out", tmp_path / "dk.safetensors", code=2)
    assert "Export it with --format diffusers" in err
    cli_run(capsys, "export", dora, "--format", "diffusers", "--out", tmp_path / "dd.safetensors")


def test_a_pickle_lora_converts_as_the_message_says(lora_run, tiny_model, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from dreambooth.formats.lora import find_lora_file

    out, _ = lora_run
    pickle = tmp_path / "lora.bin"
    torch.save(load_file(find_lora_file(out)), pickle)
    err = cli_run(capsys, "generate", "--model", tiny_model, "--lora", pickle, "--prompt", "a", code=2)
    (snippet,) = [q for q in QUOTED.findall(err) if "save_file" in q]
    script = f"import torch, safetensors.torch\nFILE = {str(pickle)!r}\n{snippet}\n"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    cli_run(capsys, "generate", "--model", tiny_model, "--lora", tmp_path / "out.safetensors", "--prompt", "a",
            "--steps", "1", "--out", tmp_path / "shots")


# ---------------------------------------------------------------------------------------- init and the project


def test_init_advice_runs(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = cli_run(capsys, "init", "p")
    assert "set model.pretrained_model in p/config.yaml" in text
    (command,) = suggested(text)
    readme = (tmp_path / "p" / "README.md").read_text()
    assert "Set `model.pretrained_model` in `config.yaml`" in readme and "dreambooth compile-prompt" in readme
    err = cli_run(capsys, "init", "p", code=2)
    assert "pass --force to overwrite it" in err
    cli_run(capsys, "init", "p", "--force", "--model", str(tiny_model))
    photo_folder(tmp_path / "photos", 3)
    for photo in (tmp_path / "photos").iterdir():
        photo.rename(tmp_path / "p" / "data" / "instance" / photo.name)
    config = yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())
    assert config["model"]["pretrained_model"] == str(tiny_model)
    # the command init names trains, on the tiny model at its size (its README's steps 3 and 4)
    cli_run(capsys, *as_argv(command), "--resolution", "64", "--max_train_steps", "1", "--num_class_images", "2",
            "--class_inference_steps", "1", "--validation_steps", "50", "--report_to", "none")
    readme = (tmp_path / "p" / "README.md").read_text()
    assert "3. Train: `dreambooth train --config config.yaml`" in readme
    (generate,) = suggested(readme, "dreambooth generate ")
    (compile_prompt,) = [c for c in suggested(readme, "dreambooth compile-prompt ")]
    monkeypatch.chdir(tmp_path / "p")
    cli_run(capsys, *as_argv(generate), "--steps", "1", "--out", "shots")
    (tmp_path / "state.json").write_text(json.dumps({"emotion": "happy"}))
    words = as_argv(compile_prompt, NAME="sks")
    words[words.index("--state") + 1] = str(tmp_path / "state.json")
    assert "sks" in json.loads(cli_run(capsys, *words))["prompt"]
    err = cli_run(capsys, "init", "q", "--model", "./nowhere", code=2)
    assert "or leave --model out" in err
    cli_run(capsys, "init", "q")


def test_compile_prompt_needs_a_local_model_as_it_says(tiny_model, tmp_path, capsys):
    characters = tmp_path / "characters.yaml"
    character = {"name": "rex", "model": "org/model", "identifier": "sks", "class_word": "dog"}
    characters.write_text(yaml.safe_dump({"characters": [character]}))
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"emotion": "happy"}))
    argv = ["compile-prompt", "--characters", characters, "--character", "rex", "--state", state]
    err = cli_run(capsys, *argv, code=2)
    assert "Give a local diffusers model folder as `model`" in err
    characters.write_text(yaml.safe_dump({"characters": [{**character, "model": str(tiny_model)}]}))
    assert json.loads(cli_run(capsys, *argv))["prompt"]


def test_report_of_a_folder_that_is_no_run_names_what_to_pass(finished_run, tmp_path, capsys):
    out, _ = finished_run
    err = cli_run(capsys, "report", tmp_path, code=2)
    assert "Pass the --output_dir of a `dreambooth train` run" in err
    cli_run(capsys, "report", out)
    assert (out / "report.html").is_file()


# --------------------------------------------------------------------------------------- the README's table


def troubleshooting_rows() -> list[str]:
    """The messages the README's troubleshooting table quotes (its first column), as written there."""
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [quoted for row in rows for quoted in QUOTED.findall(row.split(" | ")[0])
            if quoted not in cli.COMMANDS]  # "(`init`)" says which command prints it


WILD = None  # a word that stands for whatever a message fills in
README_PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z_]*|org/name|'[^']*'[,.]?)$")


def _words(text: str, placeholder) -> list:
    """A text's words, punctuation at their ends left out; a placeholder word is WILD."""
    words = []
    for word in re.findall(r"\{[^{}]*\}\S*|\S+", text):
        bare = word.strip(".,;:()'\"`")
        words.append(WILD if placeholder(word, bare) else bare)
    return [w for w in words if w != ""]


def _fits(quote: list, template: list) -> bool:
    """Whether the quote's words are a run of some message the template makes: a WILD (in either) stands for up to
    a dozen words, and at least half of the quote's own words meet the same word in the template (the rest are
    example values where the template fills something in)."""
    import functools

    most = 12
    literal = sum(w is not WILD for w in quote)
    impossible = -1000

    @functools.cache
    def best(i: int, j: int, run: int) -> int:
        """The most quote words met by template words, matching quote[i:] from template[j:] (`run`: words the
        template's WILD at j has taken so far)."""
        if i == len(quote):
            return 0
        if j == len(template):
            return 0 if all(w is WILD for w in quote[i:]) else impossible
        q, t = quote[i], template[j]
        if q is WILD:
            return max(best(i + 1, j, 0), best(i, j + 1, 0), best(i + 1, j + 1, 0))
        if t is WILD:
            taken = best(i + 1, j, run + 1) if run < most else impossible
            return max(taken, best(i, j + 1, 0), best(i + 1, j + 1, 0))
        return best(i + 1, j + 1, 0) + 1 if q == t else impossible

    need = max(1, -(-literal // 2))
    return any(best(0, j, 0) >= need for j in range(len(template)))


def test_the_readme_troubleshooting_table_quotes_what_the_tool_prints():
    """Each message the table quotes is a run of words some message of the package makes (its capitals, X, N, ...,
    'quoted' example values, and what a message fills in, {...}, standing for any words; a first word that is a key
    or a flag may be one the code passes in): a message reworded in the code fails here until the README follows."""
    templates = [_words(text, lambda word, bare: "{" in word) for _, _, text, quiet in package_strings() if not quiet]
    rows = troubleshooting_rows()
    assert len(rows) >= 25
    missing = []
    for row in rows:
        quote = _words(row, lambda word, bare: bool(README_PLACEHOLDER.match(bare) or README_PLACEHOLDER.match(word)))
        key_like = quote and quote[0] is not WILD and ("." in quote[0] or quote[0].startswith("--"))
        if not any(_fits(quote[skip:], t) for skip in range(1 + key_like) for t in templates
                   if any(w in t for w in quote[skip:] if w is not WILD and len(w) >= 3)):
            missing.append(row)
    assert not missing, "the README quotes messages the package does not make:\n" + "\n".join(missing)


# --------------------------------------------------------------------------------- LoRAs, checkpoints and bases


def test_a_lora_for_another_family_names_the_model_it_was_trained_on(lora_run, tiny_model, tmp_path, capsys):
    from dreambooth.models.tiny_families import build_model

    out, _ = lora_run
    xl = build_model(tmp_path / "xl", size="sdxl-tiny", seed=2)
    err = cli_run(capsys, "generate", "--model", xl, "--lora", out, "--prompt", "a dog", code=2)
    model = re.search(r"Apply it to the model it was trained on, or a fine-tune of it \(--model (\S+)\)", err).group(1)
    assert model == str(tiny_model)
    cli_run(capsys, "generate", "--model", model, "--lora", out, "--prompt", "a dog", "--steps", "1", "--out",
            tmp_path / "shots")


def test_a_checkpoint_resumed_on_another_base_names_the_flag_that_resumes_it(finished_run, tmp_path, capsys):
    from dreambooth.models.tiny import build_tiny_model

    out, instance = finished_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    other = build_tiny_model(tmp_path / "other", seed=5)  # the same shape, other weights
    err = cli_run(capsys, *train_argv(other, instance, copy, "--resume_from_checkpoint", "latest", steps=3), code=2)
    model = re.search(r"Resume with --pretrained_model_name_or_path (\S+) ", err).group(1)
    cli_run(capsys, *train_argv(model, instance, copy, "--resume_from_checkpoint", "latest", steps=3))
    assert step_of(copy) == 3
    cli_run(capsys, *train_argv(other, instance, tmp_path / "new", steps=1))  # "or start a new run ... elsewhere"


# ---------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_refusals_name_what_works(tiny_model, real_dir, dino_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    base = ["evaluate", "--identifier", "sks", "--class-word", "dog", "--dino", dino_dir, "--device", "cpu"]
    err = cli_run(capsys, *base, "--real", tmp_path / "nowhere", "--images", tmp_path / "gen", code=2)
    assert "Pass the folder of the subject's real photos" in err
    (tmp_path / "empty").mkdir()
    assert "Pass the folder of the subject's real photos" in cli_run(
        capsys, *base, "--real", tmp_path / "empty", "--images", tmp_path / "gen", code=2)
    base += ["--real", real_dir]
    err = cli_run(capsys, *base, "--images", tmp_path / "gen", code=2)
    assert "Pass a folder written by `dreambooth generate`, or use --model" in err
    (tmp_path / "gen").mkdir()
    err = cli_run(capsys, *base, "--images", tmp_path / "gen", code=2)
    (command,) = suggested(err)
    words = as_argv(command.replace(" ...", ""))
    cli_run(capsys, *words, "--model", tiny_model, "--prompt", "a photo of sks dog", "--steps", "1")
    cli_run(capsys, *base, "--images", tmp_path / "gen", "--out", tmp_path / "e1")
    cli_run(capsys, *base, "--model", tiny_model, "--prompt", "a photo of sks dog", "--steps", "1",
            "--num-images", "1", "--out", tmp_path / "e2")  # "or use --model to generate them here"
    # a PNG without the metadata generate writes
    (tmp_path / "plain").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "plain" / "a.png")
    err = cli_run(capsys, *base, "--images", tmp_path / "plain", code=2)
    assert "Generate the images with `dreambooth generate`, or use --model" in err
    # generation options with --images: "Drop them, or use --model"
    err = cli_run(capsys, *base, "--images", tmp_path / "gen", "--seed", "3", "--out", tmp_path / "e3", code=2)
    assert "Drop them, or use --model" in err
    cli_run(capsys, *base, "--images", tmp_path / "gen", "--out", tmp_path / "e3")
    # an earlier evaluation in --out
    err = cli_run(capsys, *base, "--images", tmp_path / "gen", "--out", tmp_path / "e3", code=2)
    assert "choose another --out, or pass --overwrite to replace them" in err
    cli_run(capsys, *base, "--images", tmp_path / "gen", "--out", tmp_path / "e3", "--overwrite")
    cli_run(capsys, *base, "--images", tmp_path / "gen", "--out", tmp_path / "e4")


def test_evaluating_checkpoints_names_the_folder_and_command_it_needs(lora_run, finished_run, tiny_model, real_dir,
                                                                     dino_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    base = ["evaluate", "--identifier", "sks", "--class-word", "dog", "--dino", dino_dir, "--device", "cpu", "--real",
            real_dir, "--prompt", "a photo of sks dog", "--steps", "1", "--num-images", "1"]
    out, _ = finished_run
    err = cli_run(capsys, *base, "--images", tmp_path / "gen", "--checkpoints", "all", code=2)
    assert "pass its output folder as --model" in err
    lora_out, _ = lora_run
    copy = tmp_path / "lora-run"
    subprocess.run(["cp", "-r", str(lora_out), str(copy)], check=True)
    (copy / "run_info.json").unlink()
    err = cli_run(capsys, *base, "--model", copy, "--checkpoints", "all", "--out", tmp_path / "e1", code=2)
    (command,) = suggested(err)
    cli_run(capsys, *as_argv(command, BASE=str(tiny_model), CHECKPOINT=str(copy / "checkpoint-2")), *base[1:],
            "--out", tmp_path / "e2")
    assert (tmp_path / "e2" / "metrics.json").is_file()
    cli_run(capsys, *base, "--model", out, "--checkpoints", "all", "--out", tmp_path / "e3")


def test_a_scorer_folder_of_the_wrong_kind_names_the_model_it_needs(tiny_model, real_dir, clip_dir, tmp_path, capsys,
                                                                    monkeypatch):
    from transformers import CLIPVisionModel

    from dreambooth.generate import save_images

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    meta = {"prompt": "a photo of sks dog", "negative_prompt": "", "seed": 0, "steps": 1, "guidance": 7.5,
            "scheduler": "dpm++", "width": 32, "height": 32}
    save_images([(image, meta)], tmp_path / "gen", "model-a")
    base = ["evaluate", "--identifier", "sks", "--class-word", "dog", "--device", "cpu", "--real", real_dir,
            "--images", tmp_path / "gen"]
    err = cli_run(capsys, *base, "--clip", tiny_model / "text_encoder", "--out", tmp_path / "e1", code=2)
    assert "need the whole CLIP model, both towers (CLIPModel)" in err
    CLIPVisionModel.from_pretrained(clip_dir).save_pretrained(tmp_path / "vision")
    err = cli_run(capsys, *base, "--clip", tmp_path / "vision", "--out", tmp_path / "e2", code=2)
    assert "Pass the whole CLIP model (CLIPModel, with its tokenizer and image processor) as --clip" in err
    cli_run(capsys, *base, "--clip", clip_dir, "--out", tmp_path / "e3")


# ------------------------------------------------------------------------------------------------------- serve


def test_serve_start_up_refusals_name_the_options_that_start_it(tiny_model, tmp_path):
    import socket

    from serving_support import characters_file

    from dreambooth.command_options import ServeOptions
    from dreambooth.errors import UserError
    from dreambooth.serving.auth import parse_keys
    from dreambooth.serving.command import build_app, listening_socket

    path = characters_file(tmp_path, tiny_model)
    with pytest.raises(UserError) as refused:
        build_app(ServeOptions(characters=path, host="0.0.0.0", no_cache=True))
    assert "give --api-keys FILE (or $DREAMBOOTH_API_KEYS), or --allow-no-auth on a trusted network" in str(
        refused.value)
    with pytest.raises(UserError) as short:  # a key file whose token is too short: the snippet makes one
        parse_keys("web user abc", "keys")
    (snippet,) = [q for q in QUOTED.findall(str(short.value)) if q.startswith("python -c")]
    words = shlex.split(snippet)
    token = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "keys").write_text(f"web user {token}\n")
    build_app(ServeOptions(characters=path, host="0.0.0.0", api_keys=tmp_path / "keys", no_cache=True))
    build_app(ServeOptions(characters=path, host="0.0.0.0", allow_no_auth=True, no_cache=True))
    # a port that is taken: "Choose another --port (0 takes a free one)"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(UserError, match=r"Choose another --port \(0 takes a free one\)"):
            listening_socket("127.0.0.1", taken.getsockname()[1])
        listening_socket("127.0.0.1", 0).close()
    finally:
        taken.close()
    # a character its limits refuse: raise what the message names
    big = characters_file(tmp_path, tiny_model, [{"name": "big", "model": str(tiny_model), "identifier": "sks",
                                                  "class_word": "dog", "width": 1024, "height": 1024, "steps": 80}])
    with pytest.raises(UserError) as limits:
        build_app(ServeOptions(characters=big, no_cache=True, max_pixels=512 * 512))
    raised = re.findall(r"raise (--max-[a-z]+) to at least (\d+)", str(limits.value))
    assert {flag for flag, _ in raised} == {"--max-pixels", "--max-steps"}
    options = {flag[2:].replace("-", "_"): int(value) for flag, value in raised}
    build_app(ServeOptions(characters=big, no_cache=True, **options))


def test_serve_request_refusals_name_what_is_answered(tiny_model, tmp_path):
    import threading

    from serving_support import StandInRenderer, stand_in_service
    from starlette.testclient import TestClient

    from dreambooth.serving.app import create_app
    from dreambooth.serving.auth import parse_keys

    user = "u" * 24
    keys = parse_keys(f"web user {user}\nops operator {'o' * 24}", "test")
    gate = threading.Event()
    service = stand_in_service(tmp_path, tiny_model, renderer=StandInRenderer(gate=gate), deadline_s=30.0)
    with TestClient(create_app(service, keys)) as client:
        refused = client.post("/v1/compile", json={"character": "dog"})
        assert refused.status_code == 401
        header = re.search(r"`(Authorization: Bearer TOKEN)`", refused.json()["error"]["message"]).group(1)
        name, value = header.replace("TOKEN", user).split(": ")
        assert client.post("/v1/compile", json={"character": "dog"}, headers={name: value}).status_code == 200
        refused = client.post("/v1/compile", json={"character": "dog", "prompt": "a dog"}, headers={name: value})
        assert refused.status_code == 403 and "send a `state` instead" in refused.json()["error"]["message"]
        assert client.post("/v1/compile", json={"character": "dog", "state": {"emotion": "happy"}},
                           headers={name: value}).status_code == 200
        # a deadline that passes: "retry later, or with a longer deadline_s up to the server's"
        late = client.post("/v1/render", json={"character": "dog", "deadline_s": 0.2}, headers={name: value})
        assert late.status_code == 504 and "with a longer deadline_s" in late.json()["error"]["message"]
        gate.set()
        again = client.post("/v1/render", json={"character": "dog", "deadline_s": 30}, headers={name: value})
        assert again.status_code == 200 and again.headers["content-type"] == "image/png"


def test_chat_advice_names_the_options_that_make_it_answer(tiny_model, tmp_path):
    from serving_support import running, stand_in_service
    from starlette.testclient import TestClient
    from test_serve_chat import SLOW_S, FakeLLM

    from dreambooth.errors import UserError
    from dreambooth.serving.app import create_app
    from dreambooth.serving.chat import ChatStates

    body = {"character": "dog", "message": "happy at the beach", "format": "json"}
    with TestClient(create_app(stand_in_service(tmp_path, tiny_model), [], auth=False)) as client:
        off = client.post("/v1/chat-render", json=body)
        assert off.status_code == 501
        assert "start `dreambooth serve` with --llm-base-url" in off.json()["error"]["message"]
    fake = FakeLLM()
    with running(fake.app) as url:
        with pytest.raises(UserError, match="set it to the key alone"):
            ChatStates(url + "/v1", "fake", "sk-\x01key")
        for model, timeout_s, status in (("fake", 5.0, 200), ("slow", SLOW_S / 4, 504), ("slow", SLOW_S * 10, 200)):
            chat = ChatStates(url + "/v1", model, "sk-key", timeout_s=timeout_s)
            with TestClient(create_app(stand_in_service(tmp_path, tiny_model), [], auth=False, chat=chat)) as client:
                answer = client.post("/v1/chat-render", json=body)
                assert answer.status_code == status, answer.text
                if status == 504:
                    assert "a longer --llm-timeout-s" in answer.json()["error"]["message"]
