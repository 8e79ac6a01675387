"""`dreambooth compile-prompt`: a character's render request for a state, printed as JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from pydantic import ValidationError

from dreambooth.characters.character import Character, load_characters
from dreambooth.characters.compiler import Budget, compile_prompt, family_budget, token_counter
from dreambooth.characters.state import CharacterState, problem_text
from dreambooth.config_file import read_text
from dreambooth.errors import UserError


def read_state(path: Path) -> CharacterState:
    """A state from a JSON file; every problem named by its key."""
    try:
        data = json.loads(read_text(path, "--state"))
    except json.JSONDecodeError as e:
        raise UserError(f"--state {path} is not valid JSON: {e}") from None
    try:
        return CharacterState.model_validate(data)
    except ValidationError as e:
        problems = [f"{'.'.join(map(str, err['loc'])) or 'state'}: {problem_text(err)}" for err in e.errors()]
        raise UserError(f"--state {path} is not a valid state ({'; '.join(problems)}). `dreambooth compile-prompt "
                        "--schema` prints what a state holds.") from None


def character_budget(character: Character) -> Budget:
    """The character's model's token budget (compiler.family_budget), counted with its own tokenizers, the CLIP ones
    with the new tokens its LoRAs were trained with, so that an identifier such as `<saya>` counts as the one token
    it is."""
    from transformers import AutoTokenizer

    from dreambooth.formats.lora import find_lora_file, new_tokens
    from dreambooth.models.families import FAMILIES, folder_family

    folder = Path(character.model)
    if not (folder / "tokenizer").is_dir():
        raise UserError(f"character {character.name}: {character.model} has no tokenizer/ folder; prompts are "
                        "measured with the model's own tokenizer. Give a local diffusers model folder as `model`.")
    family = folder_family(folder) or FAMILIES["sd1"]
    tokenizers = {}
    for encoder in family.text_encoders:
        if (folder / encoder.tokenizer).is_dir():
            tokenizers[encoder.tokenizer] = tokenizer = AutoTokenizer.from_pretrained(folder / encoder.tokenizer)
            if encoder.kind == "clip":
                for lora in character.loras:
                    tokenizer.add_tokens(new_tokens(find_lora_file(lora.file)))
    return family_budget(family, tokenizers)


def counter(tokenizers) -> Callable[[str], int]:
    """The most tokens any of `tokenizers` makes of a text."""
    counts = [token_counter(tokenizer) for tokenizer in tokenizers]
    return lambda text: max(count(text) for count in counts)


def compile_prompt_command(options) -> dict:
    """`options`: a command_options.CompilePromptOptions."""
    from dreambooth.characters.state import state_schema

    if options.schema:
        print(json.dumps(state_schema(), indent=2))
        return state_schema()
    if options.character is None or options.state is None:
        raise UserError("compile-prompt needs --character NAME and --state FILE (or --schema to print the state's "
                        "JSON Schema).")
    characters = load_characters(options.characters)
    if options.character not in characters:
        raise UserError(f"--character {options.character}: no such character in {options.characters} (it has "
                        f"{', '.join(characters)}).")
    character = characters[options.character]
    state = read_state(options.state)
    budget = character_budget(character)
    if character.width is None or character.height is None:
        raise UserError(f"character {character.name}: no width and height given, and the size its model "
                        f"{character.model} was made for cannot be read from its denoiser's (unet/ or transformer/) "
                        "and vae/ config.json; give width and height in the characters file, or a local diffusers "
                        "folder as its model.")
    request = compile_prompt(character, state, count_tokens=counter(budget.prompt), max_tokens=budget.limit,
                             identity_tokens=counter(budget.identity) if budget.identity else None,
                             max_identity_tokens=budget.identity_limit)
    record = asdict(request)
    print(json.dumps(record, indent=2))
    return record
