"""Everything checked before any weights load: model folder, images, identifier, prompts. One report."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth.config import Config
from dreambooth.data import ImageFolderReport, check_instance_folder, scan_image_folder
from dreambooth.errors import UserError
from dreambooth.generate import check_model_folder
from dreambooth.tokens import IdentifierPlan, plan_identifier, prompt_token_count, wants_new_token

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Preflight:
    """What training needs to know about its inputs, and the human report of it."""

    instance: ImageFolderReport
    classes: ImageFolderReport | None
    identifier: IdentifierPlan
    prediction_type: str
    warnings: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = ["pre-flight report", self.instance.format("instance images")]
        if self.classes is not None:
            lines.append(self.classes.format("class images (existing)"))
        lines.append(self.identifier.describe())
        lines.append(f"prediction type: {self.prediction_type}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def load_tokenizer(cfg: Config):
    """The tokenizer alone (no weights), to check prompts before a model loads."""
    from transformers import CLIPTokenizer

    source = cfg.model.tokenizer_name or cfg.model.pretrained_model
    sub = {} if cfg.model.tokenizer_name else {"subfolder": "tokenizer"}
    try:
        return CLIPTokenizer.from_pretrained(source, revision=cfg.model.revision, **sub)
    except (OSError, ValueError) as e:
        raise UserError(f"model.pretrained_model: could not load the tokenizer of {source}: {e}") from None


def check_base_model(cfg: Config) -> str:
    """The base model must be a diffusers folder (or a hub id); returns its scheduler's prediction type."""
    model = cfg.model.pretrained_model
    local = Path(model).expanduser()
    if not local.exists() and HUB_ID.match(model):
        return "epsilon"  # a hub id: the real value is read when the scheduler loads
    check_model_folder(local, what="model.pretrained_model")
    sched = local / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise UserError(f"model.pretrained_model: {local} has no scheduler/scheduler_config.json; it is not a "
                        "complete Stable Diffusion folder.")
    return json.loads(sched.read_text()).get("prediction_type", "epsilon")


def check_prompts(cfg: Config, tokenizer, plan: IdentifierPlan) -> list[str]:
    """Prompt lengths (an error past the token limit) and the identifier's presence (a warning)."""
    if plan.kind == "new" and plan.identifier not in tokenizer.get_vocab():
        tokenizer = _with_token(tokenizer, plan.identifier)
    limit = cfg.training.tokenizer_max_length or tokenizer.model_max_length
    prompts = {"dataset.instance_prompt": cfg.dataset.instance_prompt}
    if cfg.dataset.with_prior_preservation:
        prompts["dataset.class_prompt"] = cfg.dataset.class_prompt
    prompts.update({f"validation.prompts[{i}]": p for i, p in enumerate(cfg.validation.prompts)})
    for key, prompt in prompts.items():
        n = prompt_token_count(tokenizer, prompt)
        if n > limit:
            raise UserError(f"{key} is {n} tokens long, over the text encoder's limit of {limit}: \"{prompt}\". "
                            "Shorten it; the text encoder would silently cut off the end.")
    warnings = []
    ident = cfg.token.identifier
    if ident and ident not in cfg.dataset.instance_prompt:
        warnings.append(f"the instance prompt \"{cfg.dataset.instance_prompt}\" does not contain the identifier "
                        f"'{ident}'; the model will not learn to tie the subject to it.")
    if ident and cfg.dataset.class_prompt and ident in cfg.dataset.class_prompt:
        warnings.append(f"the class prompt contains the identifier '{ident}'; prior preservation would then train "
                        "the identifier on generic class images.")
    return warnings


def _with_token(tokenizer, token: str):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([token])
    return tok


def run_preflight(cfg: Config) -> Preflight:
    """Checks the inputs and prints the report; raises UserError on anything that stops training."""
    prediction_type = check_base_model(cfg)
    ds, res = cfg.dataset, cfg.training.resolution
    instance = scan_image_folder(ds.instance_dir, res)
    check_instance_folder(instance)
    classes = None
    if ds.with_prior_preservation and ds.class_dir is not None and ds.class_dir.is_dir():
        classes = scan_image_folder(ds.class_dir, res, check_duplicates=False)
    if ds.strict:
        bad = instance.rejected() + (classes.rejected() if classes else [])
        if bad:
            listed = "; ".join(f"{i.path}: {i.reason}" for i in bad)
            raise UserError(f"dataset.strict is on and {len(bad)} file(s) were rejected: {listed}. Remove or fix "
                            "them, or run without --strict to skip them.")
    tokenizer = load_tokenizer(cfg)
    plan = plan_identifier(tokenizer, cfg.token.identifier, cfg.token.initializer)
    warnings = check_prompts(cfg, tokenizer, plan)
    if cfg.token.identifier and not wants_new_token(cfg.token.identifier) and plan.kind == "split":
        warnings.append(f"identifier '{cfg.token.identifier}' is several tokens (see above).")
    report = Preflight(instance, classes, plan, prediction_type, warnings)
    if int(os.environ.get("RANK", "0")) == 0:  # launched processes all check; one reports
        print(report.format(), flush=True)
    return report
