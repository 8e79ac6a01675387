"""A model as the user names it: a local diffusers folder or a hub id, what else it might be, and its identity.

Torch-free, so that pre-flight can check every model argument before anything heavy loads:

- `check_model_folder` says what a path is when it is not a diffusers folder (a LoRA file or LoRA output, a
  training checkpoint, a single-file checkpoint) and what to pass instead.
- `resolve_hub_model` asks the hub once, without retries, before any library tries: huggingface_hub retries
  a failing download for about half a minute per file (`Retrying in 8s`), two minutes and more before a
  pipeline gives up, when a proxy answers 5xx or the network is half there.
- `model_identity` names a model by its weights, not by the spelling of its path, for the caches that depend
  on it (class images, latents).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

from dreambooth.errors import UserError, command_line
from dreambooth.models.families import (
    PIPELINE_FAMILIES,
    SUPPORTED_PIPELINES,
    Family,
    family_from_index,
    folder_family,
    read_json,
)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
LORA_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINT_STATE = "trainer_state.json"
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


# Short sampler names as users type them, and the diffusers classes (with config tweaks) they mean.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}



# How a single-file checkpoint becomes the diffusers folder this tool reads. `config=` keeps it offline: without it,
# diffusers fetches the original configs from the hub.
SINGLE_FILE_TO_FOLDER = ("convert it once with diffusers, `StableDiffusionPipeline.from_single_file(FILE, "
                         "config=MODEL_DIR).save_pretrained(DIR)` (StableDiffusionXLPipeline for SDXL; MODEL_DIR: any "
                         "diffusers folder of the same family, such as the model it was fine-tuned from), and pass DIR")


def safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]] | None:
    """The tensor shapes (by name) and metadata of a safetensors file, from its header alone; None if it is not one."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", None) or {}
    shapes = {k: tuple(v.get("shape") or ()) if isinstance(v, dict) else () for k, v in header.items()}
    return shapes, {k: str(v) for k, v in metadata.items()}


def safetensors_metadata(path: Path) -> tuple[list[str], dict[str, str]] | None:
    """The tensor names and metadata of a safetensors file, from its header alone; None if it is not one."""
    read = safetensors_header(path)
    return (list(read[0]), read[1]) if read else None


def file_kind(path: Path) -> str:
    """'lora', 'single-file' or 'other' for a .safetensors file, read from its tensor names."""
    read = safetensors_metadata(path)
    if read is None:
        return "other"
    keys, _ = read
    if any(k.startswith(SINGLE_FILE_PREFIXES) for k in keys):
        return "single-file"
    if keys and all("lora" in k or k.endswith(".alpha") or k.startswith("bundle_emb.") for k in keys):
        return "lora"
    return "other"


def lora_base_model(path: Path) -> str | None:
    """The base model a LoRA of this tool records (`dreambooth.base_model`), if any."""
    read = safetensors_metadata(path)
    return read[1].get("dreambooth.base_model") if read else None


def resume_command(checkpoint: Path) -> str:
    """The command that continues a checkpoint's run from it: the run's own config.yaml (saved in every checkpoint,
    its paths absolute), the checkpoint, and the folder the checkpoint is in as the output folder, which is the run's
    even when it was moved since; --no-overwrite_output_dir where the config would replace the run."""
    import yaml

    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        saved = {}
    replaces = bool((saved.get("output") or {}).get("overwrite_output_dir"))
    return command_line("dreambooth", "train", "--config", checkpoint / "config.yaml", "--output_dir",
                        checkpoint.parent, *(["--no-overwrite_output_dir"] if replaces else []),
                        "--resume_from_checkpoint", checkpoint)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint-N folder of a run folder with the highest step (a complete one: its state file written)."""
    found = [(int(p.name.split("-")[1]), p) for p in run_dir.glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / CHECKPOINT_STATE).is_file()]
    return max(found)[1] if found else None


def _lora_advice(lora: Path, flag: str) -> str:
    base = lora_base_model(lora if lora.is_file() else lora / LORA_FILE)
    model = base or "BASE_MODEL_FOLDER"
    where = f" It was trained on {base}." if base else ""
    if not flag.startswith("model."):
        return f"{where} Pass the base model as {flag} and the LoRA as --lora: `{flag} {model} --lora {lora}`."
    # training: a LoRA is no base model; its own run continues only from a checkpoint of it
    run_dir = lora if lora.is_dir() else lora.parent
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        further = (f" To train this LoRA further, continue its run from its latest checkpoint: "
                   f"`{resume_command(checkpoint)} --max_train_steps N` (N past its step).")
    elif (run_dir / "run_info.json").is_file():
        further = (" Its run kept no checkpoint (optimizer state), so it cannot be continued; a new run from the base "
                   "model starts over.")
    else:
        further = ""
    return f"{where} Train from its base model ({flag}: {model}).{further}"


def check_model_folder(path: Path | str, what: str = "--model") -> None:
    """A diffusers pipeline folder has model_index.json; otherwise say what `path` is and what to pass instead."""
    p = Path(path)
    if (p / "model_index.json").is_file():
        try:
            pipeline = json.loads((p / "model_index.json").read_text()).get("_class_name", "")
        except ValueError:
            pipeline = ""
        if pipeline and pipeline not in SUPPORTED_PIPELINES:
            raise UserError(f"{what} {p} is a {pipeline} model; this tool trains and draws Stable Diffusion 1.x, "
                            "2.x, SDXL, Flux.1 and SD3 (StableDiffusionPipeline, StableDiffusionXLPipeline, "
                            "FluxPipeline and StableDiffusion3Pipeline folders). Pass such a model.")
        return
    if p.is_file() and p.suffix == ".safetensors":
        kind = file_kind(p)
        if kind == "lora":
            raise UserError(f"{what} {p} is a LoRA (adapter weights only), not a model.{_lora_advice(p, what)}")
        maybe = "" if kind == "single-file" else " (or not a model at all)"
        raise UserError(f"{what} {p} is a single-file checkpoint{maybe}; this command needs a diffusers folder: "
                        f"{SINGLE_FILE_TO_FOLDER}.")
    if p.is_file() and p.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(f"{what} {p} is a pickle checkpoint ({p.suffix}); this tool reads diffusers folders with "
                        f"safetensors weights. Where you trust the file, {SINGLE_FILE_TO_FOLDER}.")
    if p.is_file():
        raise UserError(f"{what} {p} is a file; pass a diffusers model folder (model_index.json, unet/, vae/, "
                        "text_encoder/, tokenizer/, scheduler/).")
    if p.is_dir() and (p / CHECKPOINT_STATE).is_file():
        raise UserError(f"{what} {p} is a training checkpoint, not a model folder. `dreambooth generate`, "
                        f"`evaluate` and `export` take it as it is; to train it further, continue its run: "
                        f"`{resume_command(p)}` (add --max_train_steps N to go past the run's last step), or make a "
                        f"model of it with `dreambooth export {p} --format diffusers --out DIR`.")
    if p.is_dir() and (p / LORA_FILE).is_file():
        raise UserError(f"{what} {p} is a LoRA training output, not a full model.{_lora_advice(p, what)}")
    if p.is_dir():
        raise UserError(f"{what} {p} is not a diffusers model folder: it has no model_index.json. Expected a "
                        "folder as written by StableDiffusionPipeline.save_pretrained (model_index.json, unet/, "
                        "vae/, text_encoder/, tokenizer/, scheduler/).")
    raise UserError(f"{what} {p} does not exist. Pass a diffusers model folder (e.g. a training output "
                    "folder, or one made by `dreambooth tiny-model DIR`).")


def is_hub_id(model: str) -> bool:
    """An 'org/name' that is not a path on this machine."""
    return bool(HUB_ID.match(model)) and not Path(model).expanduser().exists() and not model.startswith((".", "~"))


def hub_timeout() -> float:
    """Seconds to wait for the hub's answer: $DREAMBOOTH_HUB_TIMEOUT, 10 unset."""
    text = os.environ.get("DREAMBOOTH_HUB_TIMEOUT", "10")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"$DREAMBOOTH_HUB_TIMEOUT is {text!r}: it must be a finite number of seconds over 0 (e.g. 10); "
                        "unset it for 10.")
    return seconds


def cached_snapshot(repo_id: str, revision: str | None) -> str | None:
    """The local copy of a hub model already downloaded to this machine (a whole pipeline), never fetching."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if (Path(path) / "model_index.json").is_file() else None


def resolve_hub_model(repo_id: str, revision: str | None = None, what: str = "model.pretrained_model",
                      token: str | None = None) -> str:
    """The hub model to load: `repo_id` when the hub answers, else its cached copy; a UserError at once otherwise.

    One request with a timeout and no retries decides. Offline (HF_HUB_OFFLINE=1, or no answer) a complete
    cached copy is used, returned as its local folder, so that no library retries the network for it.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cached = cached_snapshot(repo_id, revision)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return cached
        raise UserError(f"{what} {repo_id} is not a local folder, and HF_HUB_OFFLINE is set, so it cannot be "
                        "fetched from the hub (nor is it in the local hub cache). Pass a local diffusers folder, or "
                        "download it on a connected machine first (`hf download " + repo_id + "`).")
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=hub_timeout(), token=token)
        return repo_id
    except GatedRepoError:
        reason = "it is gated: accept its licence on the hub and log in (`hf auth login`) or pass a token"
    except RevisionNotFoundError:
        reason = f"it has no revision '{revision}'"
    except RepositoryNotFoundError:
        reason = "there is no such repository (or it is private: log in with `hf auth login`)"
    except Exception as e:  # noqa: BLE001 - any transport failure means the hub cannot be reached
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 404:
            reason = "there is no such repository (or it is private: log in with `hf auth login`)"
            raise UserError(f"{what} {repo_id} is not a local folder, and it cannot be fetched from the hub: "
                            f"{reason}. Pass a local diffusers folder (e.g. one saved with "
                            "StableDiffusionPipeline.save_pretrained).") from None
        if status in (401, 403):
            raise UserError(f"{what} {repo_id} is not a local folder, and the hub refused it ({status}): it is "
                            "private or gated. Log in with `hf auth login` (accept its licence on the hub first), "
                            "or pass a local diffusers folder.") from None
        if cached:
            print(f"note: the hub did not answer ({type(e).__name__}); using the cached copy of {repo_id} at {cached}")
            return cached
        reason = f"the hub cannot be reached ({type(e).__name__}: {str(e)[:160]}): this machine is offline or behind " \
                 "a proxy"
    raise UserError(f"{what} {repo_id} is not a local folder, and it cannot be fetched from the hub: {reason}. "
                    "Pass a local diffusers folder (e.g. one saved with StableDiffusionPipeline.save_pretrained).")


def checkpoint_base(ckpt: Path) -> tuple[str, dict]:
    """The base model a training checkpoint was trained from, and its saved config's model section."""
    import yaml

    state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
    config = {}
    if (ckpt / "config.yaml").is_file():
        config = (yaml.safe_load((ckpt / "config.yaml").read_text()) or {}).get("model") or {}
    base = state.get("base_model") or config.get("pretrained_model")
    if any(ckpt.glob("trainable_*.safetensors")):
        step = state.get("global_step", 0) + 1
        raise UserError(f"{ckpt} was saved by an earlier version of this tool in a layout only training reads. "
                        f"Train its run one step further, which saves a checkpoint (and the model) in diffusers' "
                        f"layout: `{resume_command(ckpt)} --max_train_steps {step} --checkpointing_steps {step}`.")
    if not base or not (Path(base).exists() or is_hub_id(str(base))):
        raise UserError(f"{ckpt} was trained from the base model {base}, which is not there any more. A checkpoint "
                        "holds only what trained; put the base model back at that path.")
    return str(base), config


def config_folder(model: Path | str) -> Path | None:
    """The local diffusers folder whose config files describe `model`: the folder itself, a training checkpoint's
    base model, or a hub id's copy in the hub cache; None when none is on this machine."""
    if (Path(model) / CHECKPOINT_STATE).is_file():
        model = checkpoint_base(Path(model))[0]
    if (Path(model) / "model_index.json").is_file():
        return Path(model)
    cached = cached_snapshot(str(model), None) if is_hub_id(str(model)) else None
    return Path(cached) if cached else None


def native_side(model: Path | str) -> int | None:
    """The side in pixels a model's denoiser was made for (SD 1.x 512, SD 2.x 768, SDXL, Flux and SD3 1024), from
    its config files alone (the denoiser's sample size times the VAE's downscaling); None when they are not on this
    machine."""
    folder = config_folder(model)
    if folder is None:
        return None
    try:
        family = folder_family(folder)
        if family is None:
            return None
        denoiser = json.loads((folder / family.denoiser / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        sample = denoiser.get("sample_size")
        if sample is None:  # Flux's transformer has no sample size: FluxPipeline draws at 1024 unless told
            return family.native_side
        sample = sample[0] if isinstance(sample, list) else sample
        return int(sample) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _first_weights(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return files[0] if files else None


def model_fingerprint(model: str | Path) -> str:
    """A short hash of the base model's UNet weights file, to tell base models apart; '' for a hub id.

    The header and first MiB of the file, and its size: enough to tell models apart, fast for 3 GB files.
    LoRA files record it as `dreambooth.base_model_hash`, so its definition stays as it is.
    """
    family = folder_family(model)
    return weights_fingerprint(Path(model) / (family.denoiser if family else "unet"))


def weights_fingerprint(folder: Path) -> str:
    """A short hash of a module folder's weights file (its header, first MiB and size); '' when it has none."""
    file = _first_weights(folder)
    if file is None:
        return ""
    digest = hashlib.sha256()
    with file.open("rb") as f:
        digest.update(f.read(1 << 20))
    digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()[:16]


def weights_identity(model: str | Path, revision: str | None = None, variant: str | None = None,
                     vae: str | Path | None = None) -> str:
    """The identity of what a run draws and encodes with: the base model's, and a separate VAE's when one is given
    (--pretrained_vae_model_name_or_path), so that class images and cached latents made with another VAE are not
    taken for this one's."""
    identity = model_identity(model, revision, variant)
    if vae is None:
        return identity
    return f"{identity}+vae:{weights_fingerprint(Path(vae)) or f'hub:{vae}'}"


def model_identity(model: str | Path, revision: str | None = None, variant: str | None = None) -> str:
    """What a model is, for caches that depend on it: a hash over its UNet, text encoder(s) and VAE weight files
    (header, first MiB and size of each), so two spellings of one folder agree and two models differ; a hub
    id with its revision when it is not on disk. SDXL's second text encoder counts too (its class images depend
    on it); a folder without one hashes as it always did."""
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        return f"hub:{model}@{revision or 'main'}"
    digest = hashlib.sha256()
    family = folder_family(folder)
    denoiser = family.denoiser if family else "unet"
    encoders = [t.component for t in family.text_encoders] if family else ["text_encoder", "text_encoder_2"]
    for part in (denoiser, encoders[0], "vae", *encoders[1:]):
        file = _first_weights(folder / part)
        if variant and file is not None:
            file = next((f for f in sorted((folder / part).glob(f"*.{variant}.safetensors"))), file)
        if file is None:
            continue
        with file.open("rb") as f:
            digest.update(f.read(1 << 20))
        digest.update(f"{part}:{file.stat().st_size}".encode())
    return "sha256:" + digest.hexdigest()[:24]


def hub_family(repo_id: str, revision: str | None = None, token: str | None = None) -> Family | None:
    """The family of a hub model, from its model_index.json (and text encoder config for SD) as cached or fetched;
    None when neither the cache nor the hub has them."""
    from huggingface_hub import hf_hub_download

    def fetch(name: str) -> dict | None:
        for local_only in (True, False):
            try:
                path = hf_hub_download(repo_id, name, revision=revision, token=token, local_files_only=local_only,
                                       etag_timeout=hub_timeout())
            except Exception:  # noqa: BLE001 - not cached, or the hub cannot say: try the next way, then give up
                continue
            return read_json(Path(path))
        return None

    index = fetch("model_index.json")
    if index is None:
        return None
    text = fetch("text_encoder/config.json") if PIPELINE_FAMILIES.get(index.get("_class_name", "")) == "sd" else None
    return family_from_index(index, text)


def detect_family(model: Path | str, revision: str | None = None, token: str | None = None) -> Family | None:
    """A model's family: a local folder's from its files, a training checkpoint's from its base model, a hub id's
    from the hub (cache first). The one way the families are told apart."""
    if (Path(model) / CHECKPOINT_STATE).is_file():
        model = checkpoint_base(Path(model))[0]
    if (Path(model) / "model_index.json").is_file():
        return folder_family(model)
    if is_hub_id(str(model)):
        return hub_family(str(model), revision, token)
    return None
