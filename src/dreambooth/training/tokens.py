"""The subject's identifier: how it tokenizes, adding it as a new token, and training only its embedding row."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dreambooth.errors import UserError

if TYPE_CHECKING:  # torch loads when a token is added, not when pre-flight plans one
    import torch

    from dreambooth.config import Config


@dataclass
class IdentifierPlan:
    """How the identifier will be represented: a new token, an existing single token, or several pieces."""

    identifier: str | None
    kind: str  # "new", "existing", "split" or "none"
    pieces: list[str] = field(default_factory=list)
    initializer: str | None = None

    def describe(self) -> str:
        if self.kind == "none":
            return "identifier: none given or inferred; the whole instance prompt names the subject"
        if self.kind == "new":
            return (f"identifier '{self.identifier}': a new token, added to the tokenizer, its embedding "
                    f"initialised from '{self.initializer}' and trained")
        if self.kind == "existing":
            return f"identifier '{self.identifier}': an existing single token, used as is"
        return (f"identifier '{self.identifier}': splits into {len(self.pieces)} tokens {self.pieces}; the model "
                "learns the subject through these pieces, which also carry their own meanings. A rare single token "
                "(e.g. 'sks') or a new token written in angle brackets (e.g. '<my_dog>') is cleaner.")


def wants_new_token(identifier: str) -> bool:
    """A new token is written in angle brackets, as textual inversion does: '<saya_token>'."""
    return identifier.startswith("<") and identifier.endswith(">") and len(identifier) > 2 and " " not in identifier


def plan_identifier(tokenizer, identifier: str | None, initializer: str | None) -> IdentifierPlan:
    """Decides how the identifier is handled, before any weights load (needs only the tokenizer)."""
    if not identifier:
        return IdentifierPlan(None, "none")
    if wants_new_token(identifier) and identifier not in tokenizer.get_vocab():
        if not initializer:
            raise UserError(f"token.initializer: the new token '{identifier}' needs an initializer word whose "
                            "embedding it starts from; set token.initializer (--initializer WORD) or token.class_word "
                            "(--class_word WORD), e.g. 'girl'.")
        if not tokenizer(initializer, add_special_tokens=False).input_ids:
            raise UserError(f"token.initializer '{initializer}' tokenizes to nothing; pick a plain word.")
        return IdentifierPlan(identifier, "new", [identifier], initializer)
    pieces = tokenizer.tokenize(identifier)
    return IdentifierPlan(identifier, "existing" if len(pieces) == 1 else "split", pieces)


def add_identifier_token(tokenizer, text_encoder, plan: IdentifierPlan) -> list[int]:
    """Adds a new identifier token and starts its embedding at the initializer's (mean over its pieces).

    Returns the ids of the added tokens ([] when nothing was added).
    """
    if plan.kind != "new":
        return []
    init_ids = tokenizer(plan.initializer, add_special_tokens=False).input_ids
    if not init_ids:
        raise UserError(f"token.initializer '{plan.initializer}' tokenizes to nothing; pick a plain word.")
    weight = text_encoder.get_input_embeddings().weight
    return [set_token_row(tokenizer, text_encoder, plan.identifier, weight[init_ids].detach().mean(dim=0))]


def set_token_row(tokenizer, text_encoder, token: str, row: torch.Tensor) -> int:
    """Adds `token` to the tokenizer (where it is new) and sets its embedding row to `row`; returns its id.

    The embedding grows only when the token's id falls outside it: T5's has spare rows past its vocabulary (32,128
    rows for 32,100 tokens), which a new token takes as they are.
    """
    import torch

    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    if text_encoder.get_input_embeddings().weight.shape[0] <= token_id:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the row is set just below
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = row.to(weight.device, weight.dtype)
    return token_id


def train_only_rows(embedding: torch.nn.Embedding, row_ids: list[int]) -> None:
    """Makes only `row_ids` of the embedding learn: gradients of every other row are zeroed.

    With zero gradients and no weight decay (the optimizer group for this weight has none), every optimizer of
    training.optimizer leaves those rows exactly unchanged (AdamW's and Prodigy's moments of a zero gradient are zero,
    Lion's sign of a zero momentum is zero), so the rest of the vocabulary keeps its pretrained meaning.
    """
    import torch

    mask = torch.zeros(embedding.weight.shape[0], 1, dtype=embedding.weight.dtype, device=embedding.weight.device)
    mask[row_ids] = 1.0
    embedding.weight.requires_grad_(True)
    # The mask is made before the model moves to its device: it follows the gradient there (the first backward
    # on a GPU would otherwise multiply a CUDA gradient by a CPU mask).
    embedding.weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))


def prompt_token_count(tokenizer, prompt: str) -> int:
    """Tokens the prompt takes, start and end tokens included."""
    return len(tokenizer(prompt, truncation=False).input_ids)


def load_tokenizer(cfg: Config):
    """The tokenizer alone (no weights), to check prompts before a model loads."""
    from transformers import CLIPTokenizer

    source = cfg.model.tokenizer_name or cfg.model.pretrained_model
    sub = {} if cfg.model.tokenizer_name else {"subfolder": "tokenizer"}
    try:
        return CLIPTokenizer.from_pretrained(source, revision=cfg.model.revision, **sub)
    except (OSError, ValueError) as e:
        raise UserError(f"model.pretrained_model: could not load the tokenizer of {source}: {e}") from None
