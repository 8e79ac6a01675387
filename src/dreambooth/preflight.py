"""Everything checked before any weights load: model folder, images, identifier, prompts. One report."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth.config import Config, Subject
from dreambooth.data import ImageFolderReport, check_instance_folder, scan_image_folder
from dreambooth.errors import UserError
from dreambooth.generate import check_model_folder
from dreambooth.tokens import IdentifierPlan, plan_identifier, prompt_token_count, wants_new_token

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class SubjectReport:
    """One subject's inputs as checked: its photos, existing class images and identifier."""

    subject: Subject
    instance: ImageFolderReport
    classes: ImageFolderReport | None
    identifier: IdentifierPlan


@dataclass
class Preflight:
    """What training needs to know about its inputs, and the human report of it."""

    subjects: list[SubjectReport]
    prediction_type: str
    warnings: list[str] = field(default_factory=list)

    @property
    def plans(self) -> list[IdentifierPlan]:
        return [s.identifier for s in self.subjects]

    def format(self) -> str:
        lines = ["pre-flight report"]
        for i, s in enumerate(self.subjects):
            if len(self.subjects) > 1:
                lines.append(f"subject {i + 1}: \"{s.subject.instance_prompt}\"")
            lines.append(s.instance.format("instance images"))
            if s.classes is not None:
                lines.append(s.classes.format("class images (existing)"))
            lines.append(s.identifier.describe())
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


def check_prompts(cfg: Config, tokenizer, plans: list[IdentifierPlan]) -> list[str]:
    """Prompt lengths (an error past the token limit) and each identifier's presence (a warning)."""
    new = [p.identifier for p in plans if p.kind == "new" and p.identifier not in tokenizer.get_vocab()]
    if new:
        tokenizer = _with_tokens(tokenizer, new)
    limit = cfg.training.tokenizer_max_length or tokenizer.model_max_length
    subjects = cfg.subject_list()
    prompts = {}
    for i, s in enumerate(subjects):
        where = f"subjects[{i}]." if cfg.subjects else "dataset."
        prompts[where + "instance_prompt"] = s.instance_prompt
        if cfg.dataset.with_prior_preservation:
            prompts[where + "class_prompt"] = s.class_prompt
    prompts.update({f"validation.prompts[{i}]": p for i, p in enumerate(cfg.validation.prompts)})
    for key, prompt in prompts.items():
        n = prompt_token_count(tokenizer, prompt)
        if n > limit:
            raise UserError(f"{key} is {n} tokens long, over the text encoder's limit of {limit}: \"{prompt}\". "
                            "Shorten it; the text encoder would silently cut off the end.")
    return [w for s in subjects for w in _identifier_warnings(s)]


def _identifier_warnings(s: Subject) -> list[str]:
    warnings, ident = [], s.identifier
    if ident and ident not in s.instance_prompt:
        warnings.append(f"the instance prompt \"{s.instance_prompt}\" does not contain the identifier "
                        f"'{ident}'; the model will not learn to tie the subject to it.")
    if ident and s.class_prompt and ident in s.class_prompt:
        warnings.append(f"the class prompt contains the identifier '{ident}'; prior preservation would then train "
                        "the identifier on generic class images.")
    if ident and not wants_new_token(ident) and len(ident.split()) > 1:
        warnings.append(f"identifier '{ident}' is several words; a single rare token or a new <token> is cleaner.")
    return warnings


def _with_tokens(tokenizer, tokens: list[str]):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(tokens)
    return tok


def check_subject(cfg: Config, subject: Subject, tokenizer) -> SubjectReport:
    res = cfg.training.resolution
    instance = scan_image_folder(subject.instance_dir, res)
    check_instance_folder(instance)
    classes = None
    if cfg.dataset.with_prior_preservation and subject.class_dir is not None and subject.class_dir.is_dir():
        classes = scan_image_folder(subject.class_dir, res, check_duplicates=False)
    if cfg.dataset.strict:
        bad = instance.rejected() + (classes.rejected() if classes else [])
        if bad:
            listed = "; ".join(f"{i.path}: {i.reason}" for i in bad)
            raise UserError(f"dataset.strict is on and {len(bad)} file(s) were rejected: {listed}. Remove or fix "
                            "them, or run without --strict to skip them.")
    plan = plan_identifier(tokenizer, subject.identifier, subject.initializer)
    return SubjectReport(subject, instance, classes, plan)


def run_preflight(cfg: Config) -> Preflight:
    """Checks the inputs and prints the report; raises UserError on anything that stops training."""
    prediction_type = check_base_model(cfg)
    tokenizer = load_tokenizer(cfg)
    subjects = [check_subject(cfg, s, tokenizer) for s in cfg.subject_list()]
    warnings = check_prompts(cfg, tokenizer, [s.identifier for s in subjects])
    report = Preflight(subjects, prediction_type, warnings)
    if int(os.environ.get("RANK", "0")) == 0:  # launched processes all check; one reports
        print(report.format(), flush=True)
    return report
