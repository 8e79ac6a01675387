"""Characters and the prompt compiler: the file is validated in full, and every state gives a prompt that keeps the
identity, fits the text encoder, and is the same every time (property tests with hypothesis)."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dreambooth.characters.character import Character, load_characters, merged_vocabulary, shipped_vocabulary, sized
from dreambooth.characters.compiler import compile_prompt, token_counter
from dreambooth.characters.state import EMOTIONS, GAZES, LIGHTING, SHOTS, TIMES_OF_DAY, CharacterState, state_schema
from dreambooth.cli import main
from dreambooth.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")


def character(**fields) -> Character:
    return Character(**{"name": "saya", "model": "m", "identifier": "sks", "class_word": "dog", **fields})


free_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=80)
states = st.builds(
    CharacterState, emotion=st.sampled_from(EMOTIONS), intensity=st.floats(0, 1),
    expression=st.none() | free_text, action=st.none() | free_text, gaze=st.none() | st.sampled_from(GAZES),
    outfit=st.none() | free_text, location=st.none() | free_text | st.sampled_from(["beach", "forest"]),
    time_of_day=st.none() | st.sampled_from(TIMES_OF_DAY), lighting=st.none() | st.sampled_from(LIGHTING),
    shot=st.none() | st.sampled_from(SHOTS), style=st.none() | free_text, extra=st.lists(free_text, max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=states)
def test_every_state_keeps_the_identity_within_the_tokens_and_compiles_the_same_twice(tokenizer, state):
    who = character(appearance=["long black hair", "red scarf"], style="watercolor")
    count = token_counter(tokenizer)
    request = compile_prompt(who, state, count_tokens=count, max_tokens=77)
    assert request.prompt.startswith("a photo of sks dog")
    assert request.tokens == count(request.prompt) <= 77
    assert compile_prompt(who, CharacterState.model_validate_json(state.model_dump_json()), count_tokens=count,
                          max_tokens=77) == request
    assert ", ".join(f["text"] for f in request.fragments) == request.prompt  # what is weighted is what is drawn
    assert {d["slot"] for d in request.dropped} <= {"appearance", "emotion", "expression", "gaze", "action", "outfit",
                                                     "shot", "location", "time_of_day", "lighting", "style", "extra"}
    assert 0 <= request.seed < 2**53


def test_fragments_follow_the_vocabulary_and_intensity_weights_the_emotion():
    words = len  # one token a character: enough room for everything
    state = CharacterState(emotion="happy", intensity=1.0, location="beach", shot="close_up", gaze="at_viewer",
                           action="eating (an) apple", extra=["film grain"])
    request = compile_prompt(character(appearance=["red scarf"]), state, count_tokens=words, max_tokens=10_000)
    assert request.prompt == ("a photo of sks dog, red scarf, happy, smiling, looking at viewer, eating (an) apple, "
                              "close-up, on a beach, film grain")
    weights = {f["text"]: f["weight"] for f in request.fragments}
    assert weights["happy, smiling"] == 1.3 and weights["eating (an) apple"] == 1.0  # free text stays as written
    assert weights["a photo of sks dog"] == 1.0 and request.fragments[0]["slot"] == "identity"
    faint = compile_prompt(character(), CharacterState(emotion="calm", intensity=0.0), count_tokens=words,
                           max_tokens=10_000)
    assert [(f["text"], f["weight"]) for f in faint.fragments][1:] == [("calm, relaxed", 0.7)]
    unset = compile_prompt(character(), CharacterState(expression="smirk", intensity=1.0), count_tokens=words,
                           max_tokens=10_000)
    assert unset.prompt == "a photo of sks dog, smirk"  # no emotion given, none added


def test_a_long_prompt_loses_its_least_important_fragments_first(tokenizer):
    count = token_counter(tokenizer)
    state = CharacterState(emotion="sad", location="forest", style="oil painting, thick brush strokes",
                           extra=[f"extra words number {i}" for i in range(8)], lighting="dramatic")
    request = compile_prompt(character(appearance=["long black hair"]), state, count_tokens=count, max_tokens=40)
    assert request.tokens <= 40 and request.prompt.startswith("a photo of sks dog, long black hair, sad")
    # extras (10) first, the later ones first on a tie, then style (20), then lighting (35)
    assert request.dropped == [*({"slot": "extra", "text": f"extra words number {i}"} for i in reversed(range(8))),
                               {"slot": "style", "text": "oil painting, thick brush strokes"},
                               {"slot": "lighting", "text": "dramatic lighting"}]
    assert request.prompt == "a photo of sks dog, long black hair, sad, teary eyes, in a forest"


def test_the_identity_is_never_dropped_and_a_template_too_long_is_refused(tokenizer):
    count = token_counter(tokenizer)
    with pytest.raises(UserError, match="prompt_template alone takes"):
        compile_prompt(character(prompt_template="a photo of {identifier} {class_word}" + " very" * 100),
                       CharacterState(), count_tokens=count)
    tight = compile_prompt(character(appearance=["long black hair"]), CharacterState(emotion="happy"),
                           count_tokens=count, max_tokens=count("a photo of sks dog"))
    assert tight.prompt == "a photo of sks dog"
    assert tight.dropped == [{"slot": "emotion", "text": "happy, smiling"},
                             {"slot": "appearance", "text": "long black hair"}]


def test_a_seed_is_the_same_in_every_process_and_for_every_later_schema():
    """Pinned: a seed built on Python's hash() or on the schema's full field list would move."""
    state = CharacterState(emotion="happy", location="beach", intensity=-0.0)
    assert compile_prompt(character(), state, count_tokens=len, max_tokens=999).seed == 4919174120468941
    assert state.canonical() == '{"emotion": "happy", "intensity": 0.0, "location": "beach"}'


def test_the_seed_policy():
    state = CharacterState(emotion="sad")
    fixed = character(seed_policy="fixed", seed=42)
    assert compile_prompt(fixed, state, count_tokens=len, max_tokens=999).seed == 42
    by_state = character(seed_policy="state")
    seeds = {compile_prompt(by_state, s, count_tokens=len, max_tokens=999).seed
             for s in (state, CharacterState(emotion="happy"), CharacterState(emotion="sad", intensity=0.9))}
    assert len(seeds) == 3  # another state, another picture
    assert compile_prompt(character(name="other"), state, count_tokens=len, max_tokens=999).seed not in seeds


def test_a_character_overrides_the_vocabulary():
    own = character(vocabulary={"words": {"location": {"beach": "on a black sand beach"}},
                                "slots": {"extra": {"priority": 95}}})
    vocabulary = merged_vocabulary(own)
    assert vocabulary["words"]["location"]["beach"] == "on a black sand beach"
    assert vocabulary["words"]["location"]["forest"] == shipped_vocabulary()["words"]["location"]["forest"]
    assert vocabulary["slots"]["extra"]["priority"] == 95
    request = compile_prompt(own, CharacterState(location="beach"), count_tokens=len, max_tokens=999)
    assert "on a black sand beach" in request.prompt


def test_the_state_schema_is_a_tool_definition():
    schema = state_schema()
    assert schema["title"] == "CharacterState" and schema["additionalProperties"] is False
    emotion = schema["properties"]["emotion"]["anyOf"]
    assert set(emotion[0]["enum"]) == set(EMOTIONS) and emotion[1] == {"type": "null"}
    assert schema["properties"]["intensity"]["maximum"] == 1.0


def write_characters(tmp_path, entries) -> object:
    path = tmp_path / "characters.yaml"
    path.write_text(yaml.safe_dump({"characters": entries}))
    return path


def problems_of(path) -> str:
    """The message of the UserError that loading the characters file raises."""
    with pytest.raises(UserError) as err:
        load_characters(path)
    return str(err.value)


def test_every_problem_of_the_characters_file_is_reported_at_once(tmp_path):
    path = write_characters(tmp_path, [
        {"name": "a", "model": "m", "identifier": "sks", "class_word": "dog", "width": 500, "steps": 0},
        {"name": "a", "model": "m", "identifier": "sks", "class_word": "dog", "scheduler": "fastest",
         "prompt_template": "a picture", "vocabulary": {"words": {"locaton": {}}}},
        {"name": "b c", "model": "m", "identifier": "", "class_word": "dog", "colour": "red"}])
    message = problems_of(path)
    for expected in ("characters[0] (a).width: Value error, 500 is not a multiple of 8",
                     "characters[0] (a).steps: Input should be greater than or equal to 1",
                     "characters[1] (a).scheduler: Value error, unknown scheduler 'fastest'",
                     "characters[1] (a).prompt_template: Value error, must contain {identifier} and {class_word}",
                     "characters[1] (a).vocabulary.words.locaton.[key]: Input should be 'appearance'",
                     "characters[1] (a).name: a is the name of an earlier character too",
                     "characters[2] (b c).name: String should match pattern",
                     "characters[2] (b c).identifier: Value error, must not be empty",
                     "characters[2] (b c).colour: Extra inputs are not permitted"):
        assert expected in message, message


def test_the_vocabulary_template_and_files_of_a_character_are_checked(tmp_path):
    (tmp_path / "model").mkdir()
    base = {"model": "model", "identifier": "sks", "class_word": "dog"}
    path = write_characters(tmp_path, [
        {**base, "name": "a", "vocabulary": {"words": {"location": {"beach": None}},
                                             "slots": {"extra": {"priority": "high"}, "style": {"priorty": 5}}}},
        {**base, "name": "a2", "vocabulary": {"words": {"emotion": {"hapy": "happy"}}}},
        {**base, "name": "b", "prompt_template": "{identifier} {class_word} {style}", "seed": 2**60},
        {**base, "name": "c", "prompt_template": "a {identifier {class_word}", "model": "missing",
         "loras": [{"file": "none.safetensors"}]}])
    message = problems_of(path)
    for expected in ("(a2).vocabulary.words: Value error, words.emotion: hapy is not a value of emotion",
                     "(a).vocabulary.words.location.beach: Input should be a valid string",
                     "(a).vocabulary.slots.extra.priority: Input should be a valid integer",
                     "(a).vocabulary.slots.style.priorty: Extra inputs are not permitted",
                     "(b).prompt_template: Value error, {style} is not a field it can hold",
                     "(b).seed: Input should be less than or equal to 9007199254740991",
                     "(c).prompt_template: Value error, unexpected '{' in field name (write a literal brace as",
                     f"(c).model: {tmp_path / 'missing'} does not exist",
                     f"(c).loras[0].file: {tmp_path / 'none.safetensors'} does not exist"):
        assert expected in message, message


def test_the_shipped_vocabulary_is_a_valid_one():
    from dreambooth.characters.character import Vocabulary

    Vocabulary.model_validate(shipped_vocabulary())


def test_paths_in_the_characters_file_are_relative_to_it(tmp_path, monkeypatch):
    (tmp_path / "output").mkdir()
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "h.safetensors").write_bytes(b"")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_characters(tmp_path, [{"name": "a", "model": "output", "identifier": "sks", "class_word": "dog",
                                        "loras": [{"file": "a.safetensors", "weight": 0.8},
                                                  {"file": "~/h.safetensors"}]},
                                       {"name": "b", "model": "org/model", "identifier": "sks", "class_word": "dog"}])
    loaded = load_characters(path)
    assert loaded["a"].model == str(tmp_path / "output")
    home_lora = tmp_path / "home" / "h.safetensors"
    assert [lora.file for lora in loaded["a"].loras] == [tmp_path / "a.safetensors", home_lora]
    assert loaded["b"].model == "org/model"  # a hub id stays one


def test_compile_prompt_prints_the_request_of_a_character_of_init(tiny_model, tmp_path, capsys):
    assert main(["init", str(tmp_path / "project"), "--identifier", "sks", "--class-word", "dog"]) == 0
    characters = tmp_path / "project" / "characters.yaml"
    data = yaml.safe_load(characters.read_text())
    data["characters"][0]["model"] = str(tiny_model)
    characters.write_text(yaml.safe_dump(data))
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"emotion": "happy", "location": "beach"}))
    capsys.readouterr()
    assert main(["compile-prompt", "--characters", str(characters), "--character", "sks", "--state", str(state)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["prompt"] == "a photo of sks dog, happy, smiling, on a beach"
    assert record["negative_prompt"] == "blurry, lowres" and record["tokens"] <= 77 and record["dropped"] == []
    (tmp_path / "project" / "config.yaml").unlink()
    assert main(["init", str(tmp_path / "project"), "--identifier", "zz", "--class-word", "cat", "--force"]) == 0
    assert yaml.safe_load(characters.read_text())["characters"][0]["model"] == str(tiny_model)  # kept
    capsys.readouterr()
    assert main(["compile-prompt", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "CharacterState"


def test_numbers_that_are_not_finite_are_refused_as_such_in_the_characters_file(tmp_path):
    """YAML's .nan and .inf are floats: a NaN passes no range check (it compares false with both bounds), so each
    number of a character is refused as not finite, whatever check it would have failed."""
    (tmp_path / "a.safetensors").write_bytes(b"")
    path = tmp_path / "characters.yaml"
    path.write_text("characters:\n"
                    "  - {name: a, model: m, identifier: sks, class_word: dog, guidance: .nan, steps: .inf,\n"
                    "     loras: [{file: a.safetensors, weight: .nan}]}\n"
                    "  - {name: b, model: m, identifier: sks, class_word: dog, width: -.inf, seed: .nan,\n"
                    "     vocabulary: {slots: {extra: {priority: .inf}}}}\n")
    message = problems_of(path)
    for key in ("(a).guidance", "(a).steps", "(a).loras.0.weight", "(b).width", "(b).seed",
                "(b).vocabulary.slots.extra.priority"):
        assert f"{key}: " in message and "is not a finite number" in message.split(f"{key}: ")[1].split("\n")[0], \
            (key, message)
    assert "less than or equal" not in message and "greater than" not in message


@pytest.mark.parametrize(("state", "message"), [
    ("{not json", "is not valid JSON"),
    ('{"intensity": NaN}', "intensity: nan is not a finite number"),
    ('{"intensity": -Infinity}', "intensity: -inf is not a finite number"),
    ('{"emotion": "elated", "intensity": 3}', "emotion: Input should be 'neutral'"),
    ('{"mood": "happy"}', "mood: Extra inputs are not permitted"),
    (None, "is a folder; give the file"),
])
def test_a_bad_state_is_refused_with_its_key(tiny_model, tmp_path, capsys, state, message):
    characters = write_characters(tmp_path, [{"name": "a", "model": str(tiny_model), "identifier": "sks",
                                              "class_word": "dog"}])
    state_file = tmp_path / "state.json"
    state_file.mkdir() if state is None else state_file.write_text(state)
    assert main(["compile-prompt", "--characters", str(characters), "--character", "a", "--state",
                 str(state_file)]) == 2
    assert message in capsys.readouterr().err


def test_a_vocabulary_sets_the_text_between_fragments():
    """A model trained on plain captions (the built-in world's) reads "a photo of a circle red" better than "a photo
    of a circle, red": the joiner is data, and the weighted fragments rebuild the same prompt."""
    state = CharacterState(emotion="happy", location="beach")
    plain = compile_prompt(character(), state, count_tokens=len, max_tokens=999)
    spaced = compile_prompt(character(vocabulary={"joiner": " "}), state, count_tokens=len, max_tokens=999)
    assert plain.joiner == ", " and spaced.joiner == " "
    assert spaced.prompt == plain.prompt.replace(", on a beach", " on a beach").replace("dog, happy", "dog happy")
    for request in (plain, spaced):
        assert request.prompt == request.joiner.join(f["text"] for f in request.fragments)
    with pytest.raises(ValidationError):
        character(vocabulary={"joiner": ""})


def test_a_character_without_a_size_is_drawn_at_its_models_own(tiny_model, tmp_path):
    """An SDXL character with SD's 512 px default drew badly; no width and height means the side its model was made
    for, read from the model's config files (the UNet's sample size times the VAE's downscaling)."""
    from dreambooth.models.tiny_families import build_model

    xl = build_model(tmp_path / "xl", size="sdxl-tiny", seed=2)
    (tmp_path / "no-configs").mkdir()
    path = write_characters(tmp_path, [
        {"name": "sd", "model": str(tiny_model), "identifier": "sks", "class_word": "dog"},
        {"name": "xl", "model": str(xl), "identifier": "sks", "class_word": "dog", "height": 96}])
    characters = load_characters(path)

    def side(model):
        unet = json.loads((model / "unet" / "config.json").read_text())
        vae = json.loads((model / "vae" / "config.json").read_text())
        return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)

    assert (characters["sd"].width, characters["sd"].height) == (side(tiny_model), side(tiny_model))
    assert (characters["xl"].width, characters["xl"].height) == (side(xl), 96)  # a side given stays
    assert side(tiny_model) != 512  # not the old default
    # configs not here (a hub id the service fetches): the service sizes it from the loaded pipeline
    path = write_characters(tmp_path, [
        {"name": "a", "model": str(tmp_path / "no-configs"), "identifier": "sks", "class_word": "dog"}])
    unsized = load_characters(path)["a"]
    assert (unsized.width, unsized.height) == (None, None)
    assert (sized(unsized, 1024).width, sized(unsized, 1024).height) == (1024, 1024)
