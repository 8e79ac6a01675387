"""`--push_to_hub`: the connection and token are checked in pre-flight, the folder is uploaded when training ends.

diffusers' script finds a missing token or a dead connection only after training, when it creates the repo;
here the run does not start unless the upload can happen. The upload is the output folder without what is
only for resuming or for this machine: checkpoints, the latent cache, the lock.
"""

from __future__ import annotations

from pathlib import Path

from dreambooth.errors import UserError

NOT_UPLOADED = ["checkpoint-*", "checkpoint-*/**", "latent_cache/**", ".*", "**/.*"]


def _token(cfg) -> str | None:
    from huggingface_hub import get_token

    return cfg.output.hub_token or get_token()


def check_upload(cfg) -> str:
    """The repo id the run will upload to; a UserError now if there is no token, no connection or a bad token."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise UserError("output.push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded. Unset it, or train "
                        "without --push_to_hub and upload the folder later with `hf upload REPO OUTPUT_DIR`.")
    token = _token(cfg)
    if not token:
        raise UserError("output.push_to_hub: no hub token. Pass --hub_token, set HF_TOKEN, or log in once with "
                        "`hf auth login`; or train without --push_to_hub and upload later with `hf upload`.")
    try:
        user = HfApi().whoami(token=token)["name"]
    except Exception as e:  # noqa: BLE001 - a bad token and a dead connection both stop the upload
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise UserError("output.push_to_hub: the hub refused the token (401 Unauthorized). Pass a valid "
                            "write token with --hub_token or HF_TOKEN.") from None
        raise UserError(f"output.push_to_hub: the hub cannot be reached ({type(e).__name__}: {str(e)[:160]}), so "
                        "the upload would fail after training. Train without --push_to_hub and upload the folder "
                        "later with `hf upload REPO OUTPUT_DIR`.") from None
    return cfg.output.hub_model_id or f"{user}/{Path(cfg.output.output_dir).name}"


def upload_run(cfg, repo_id: str) -> str:
    """Creates the repo if needed and uploads the output folder (model or LoRA, model card, samples, logs)."""
    from huggingface_hub import HfApi

    api = HfApi(token=_token(cfg))
    try:
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(cfg.output.output_dir),
                                 commit_message="DreamBooth training output (dreambooth)",
                                 ignore_patterns=NOT_UPLOADED)
    except Exception as e:  # noqa: BLE001 - the run is saved; only the upload failed
        raise UserError(f"output.push_to_hub: training finished and everything is saved in {cfg.output.output_dir}, "
                        f"but the upload to {repo_id} failed ({type(e).__name__}: {str(e)[:200]}). Upload it with "
                        f"`hf upload {repo_id} {cfg.output.output_dir}`.") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
