"""LoRAs into a pipeline for drawing: each as a named adapter at its weight, with its new identifier tokens.

diffusers' `load_lora_weights` does the loading; what is added here is what it lacks: a kohya file with bundled
embeddings (which diffusers refuses) is split, a LoRA made for another model is refused in one paragraph before
diffusers touches it (`formats.lora_fit`, asked of the loaded pipeline), and new tokens' embeddings join the
tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.formats.lora import (
    SDXL_TOKEN_KEYS,
    TOKEN_KEYS,
    check_lora_source,
    read_metadata,
    read_token_file,
    token_file_for,
)
from dreambooth.formats.lora_fit import family_error, fit_error, read_adapted_layers, transformer_lora_family
from dreambooth.formats.lycoris import lycoris_kind
from dreambooth.formats.lycoris_loading import load_lycoris_adapter
from dreambooth.models.base import lora_base_model, model_fingerprint, safetensors_header
from dreambooth.models.families import pipeline_family
from dreambooth.models.layout import pipeline_layout


def load_failure(file: Path, error: Exception, model: Path | str | None) -> UserError:
    """diffusers' error for a LoRA it cannot load (one that `formats.lora_fit` let through: an adapter type it does
    not read, say), in one line, with the base model the LoRA records."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = (lines or [type(error).__name__])[0][:300]
    base = lora_base_model(file)
    hint = (f" It was trained on {base}; pass that model (or a fine-tune of it) as --model." if base else
            " Is it a LoRA for this model's family and shape (LoRAs of SD 1.x, 2.x, SDXL, Flux and SD3 do not "
            "mix)?")
    return UserError(f"LoRA {file} could not be loaded into {model or 'this model'}: {detail}.{hint}")


@contextlib.contextmanager
def held_library_output():
    """peft's warnings and diffusers' log lines while a LoRA loads, shown only if it loads: when it fails, the one
    paragraph that follows says why, and the libraries' page before it would bury that."""
    logger = logging.getLogger("diffusers")  # diffusers' library logger, with its own handler
    held: list[logging.LogRecord] = []
    hold = logging.Handler()
    hold.emit = held.append
    handlers, logger.handlers = logger.handlers, [hold]
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        logger.handlers = handlers
    for record in held:
        logger.handle(record)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def note_other_base(file: Path, model: Path | str | None) -> None:
    """A LoRA on another model of the same shape loads, and may be what the user wants (a fine-tune of its base);
    say so rather than refuse."""

    meta = read_metadata(file)
    recorded, here = meta.get("dreambooth.base_model_hash"), model_fingerprint(model) if model else ""
    if recorded and here and recorded != here:
        print(f"note: LoRA {file} was trained on {meta.get('dreambooth.base_model')} (weights {recorded}); "
              f"{model} has other weights ({here}). It loads; results depend on how close the two models are.")


def bundled_embeddings(tensors: dict) -> dict:
    """Embeddings bundled in a kohya LoRA as A1111 reads them: `bundle_emb.<token>.emb_params` (or
    `.string_to_param.*`) as {token: vectors}; SDXL's `bundle_emb.<token>.clip_l` and `.clip_g` as
    {token: {"clip_l": vectors, "clip_g": vectors}}."""
    found = {}
    for key, value in tensors.items():
        if not key.startswith("bundle_emb."):
            continue
        name = key[len("bundle_emb."):]
        token, _, part = name.rpartition(".")
        if part in TOKEN_KEYS:
            found.setdefault(token, {})[part] = value
            continue
        found[name.rsplit(".emb_params", 1)[0].split(".string_to_param")[0]] = value
    return found


def check_pipeline_fit(pipe, file: Path, name: str, flag: str) -> None:
    """Refuses a LoRA that does not fit a loaded pipeline: another family, or (for the UNet families) layers of
    another shape (formats.lora_fit)."""
    family = pipeline_family(pipe)
    header = safetensors_header(file)
    theirs = transformer_lora_family(list(header[0]) if header else [], header[1] if header else {})
    if theirs is not None or (family is not None and family.denoiser != "unet"):
        family_error(file, theirs, family, name, flag)
        return
    error = fit_error(read_adapted_layers(file), pipeline_layout(pipe, name), flag)
    if error is not None:
        raise error


def load_lora_adapter(pipe, path: Path, adapter_name: str, model: Path | str | None = None,
                      flag: str = "--model") -> Path:
    """One LoRA (diffusers or kohya format, or LoKr/LoHa in LyCORIS', file or folder) as a named adapter, with its
    new tokens; returns its file.

    A LoRA that does not fit the pipeline is refused first (`flag` names where the user passes the model). diffusers
    refuses a kohya file with bundled embeddings ("Invalid LoRA checkpoint"), so those keys are taken out here and
    their embeddings loaded as textual inversions.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = check_lora_source(path)
    check_pipeline_fit(pipe, file, str(model or "this model"), flag)
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
    bundled = [k for k in keys if k.startswith("bundle_emb.")]
    source = str(file)
    tensors = {}
    if bundled:
        tensors = load_file(str(file))
        source = {k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}
    try:
        with held_library_output(), warnings.catch_warnings():
            # several named adapters on one model is how LoRAs mix and the service's characters switch, not the
            # mistake peft warns of on every LoRA after the first
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if lycoris_kind(keys):  # LoKr, LoHa: diffusers' SD pipelines have no reader; peft's layers take them
                load_lycoris_adapter(pipe, file, adapter_name)
            elif isinstance(source, dict):
                pipe.load_lora_weights(source, adapter_name=adapter_name)
            else:
                pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)
    except AssertionError:  # diffusers' kohya Flux converter asserts FLUX.1's own widths
        raise UserError(f"LoRA {file}: diffusers' kohya Flux reader could not convert it. It splits a single "
                        "block's linear1 at FLUX.1's own widths (3 x 3072 + 12288), so a kohya file of a Flux model "
                        "of another width does not load in diffusers; use the LoRA's diffusers-format original (its "
                        "run's pytorch_lora_weights.safetensors).") from None
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise load_failure(file, e, model) from None
    note_other_base(file, model)
    load_token_embeddings(pipe, file, bundled_embeddings(tensors))
    return file


def load_loras(pipe, loras: list[tuple[Path, float]], model: Path | str | None = None) -> None:
    """Loads each LoRA as its own adapter at its weight (diffusers or kohya format), and any token embeddings.

    A pipeline that holds adapters already (a LoRA run's checkpoint, `models.loading`) keeps them on at weight 1.0
    beside the new ones, which take names of their own.
    """
    kept = sorted({name for names in pipe.get_list_adapters().values() for name in names}) if loras else []
    names, weights = [], []
    for path, weight in loras:
        name = next(f"lora{i}" for i in range(len(kept) + len(names) + 1) if f"lora{i}" not in {*kept, *names})
        load_lora_adapter(pipe, path, name, model)
        names.append(name)
        weights.append(weight)
    if names:
        pipe.set_adapters([*kept, *names], adapter_weights=[1.0] * len(kept) + weights)


def text_sides(pipe) -> list[tuple[str, object, object]]:
    """(component name, tokenizer, text encoder) of a pipeline's CLIP encoders, the ones new identifier tokens go
    into: one (SD 1.x/2.x, Flux), or two in the order of SDXL_TOKEN_KEYS (SDXL, SD3); never T5. The drawing side's
    twin of training.components.Models.text_sides."""
    family = pipeline_family(pipe)
    names = [(t.component, t.tokenizer) for t in family.text_encoders if t.kind == "clip"] if family else \
        [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
    return [(name, getattr(pipe, tokenizer), getattr(pipe, name)) for name, tokenizer in names
            if getattr(pipe, name, None) is not None]


def token_encoders(pipe) -> dict[str, tuple[object, object]]:
    """{token key: (tokenizer, text encoder)} of every text encoder of a pipeline that a token file may hold rows
    for: its CLIP encoders (`clip_l`, and SDXL's and SD3's `clip_g`) and its T5 (`t5`)."""
    family = pipeline_family(pipe)
    if family is None:
        return {key: (tokenizer, encoder) for key, (_, tokenizer, encoder) in zip(SDXL_TOKEN_KEYS, text_sides(pipe))}
    return {t.token_key: (getattr(pipe, t.tokenizer), getattr(pipe, t.component)) for t in family.text_encoders
            if getattr(pipe, t.component, None) is not None}


def load_token_vectors(pipe, vectors: dict) -> None:
    """New tokens with their trained embeddings, into the pipeline's tokenizers and text encoders: {token: vector}
    for a model with one CLIP encoder, or {token: {"clip_l": vector, "clip_g": vector, "t5": vector}}, rows for each
    encoder the token was trained in."""
    sides = token_encoders(pipe)
    clip = [key for key in sides if key != "t5"]
    for token, vector in vectors.items():
        if not isinstance(vector, dict):
            if len(clip) != 1:
                raise UserError(f"the new token {token} was trained for a model with one CLIP text encoder (SD "
                                "1.x/2.x, Flux); this model has two (SDXL, SD3), and the token would mean something "
                                "only to the first. Use it with the model it was trained on.")
            vector = {clip[0]: vector}
        trained = [key for key in vector if key != "t5"]
        if len(trained) != len(clip) or ("t5" in vector and "t5" not in sides):
            raise UserError(f"the new token {token} was trained for a model with {len(trained)} CLIP text "
                            f"encoder(s){' and T5' if 't5' in vector else ''} ({', '.join(vector)}); this model has "
                            f"{len(clip)}{' and T5' if 't5' in sides else ''}. Use it with the model it was trained "
                            "on.")
        for key, rows in vector.items():
            tokenizer, encoder = sides[key]
            if token not in tokenizer.get_vocab():
                _insert_token(pipe, token, rows, tokenizer, encoder)


def _insert_token(pipe, token: str, rows, tokenizer, encoder) -> None:
    """One token's rows into one tokenizer and text encoder. A single row goes in directly
    (training.tokens.set_token_row): SD3's pipeline has no textual-inversion loader, and diffusers' would cut T5's
    embedding down to its tokenizer's length. Several rows (an A1111 embedding bundled in a kohya LoRA) go through the
    pipeline's own `load_textual_inversion`, which spreads them over tokens it makes up for them."""
    from dreambooth.training.tokens import set_token_row

    width = encoder.get_input_embeddings().weight.shape[1]
    if rows.shape[-1] != width:
        raise UserError(f"the embedding of {token} is {rows.shape[-1]} wide and this model's {type(encoder).__name__} "
                        f"takes {width}; it was trained for another model. Use it with the model it was trained on.")
    rows = rows.reshape(-1, width)
    if rows.shape[0] == 1:
        set_token_row(tokenizer, encoder, token, rows[0])
    elif hasattr(pipe, "load_textual_inversion"):
        pipe.load_textual_inversion(rows, token=token, tokenizer=tokenizer, text_encoder=encoder)
    else:
        raise UserError(f"the embedding of {token} has {rows.shape[0]} vectors; {type(pipe).__name__} has no "
                        "textual-inversion loader to spread them over tokens. Use a one-vector embedding.")


def load_token_file(pipe, file: Path) -> None:
    load_token_vectors(pipe, read_token_file(file))


def load_token_embeddings(pipe, lora: Path, bundled: dict | None = None) -> None:
    """The new identifier tokens trained with a LoRA: bundled in it (kohya export), or in its token file."""
    if bundled:
        load_token_vectors(pipe, bundled)
        return
    file = token_file_for(lora)
    meta = read_metadata(lora)
    if not file.is_file():
        if json.loads(meta.get("dreambooth.new_tokens", "[]")):
            raise UserError(f"LoRA {lora} was trained with new token(s) {meta['dreambooth.new_tokens']} whose "
                            f"embeddings live in {file.name} beside it, which is missing; copy it along.")
        return
    load_token_file(pipe, file)
