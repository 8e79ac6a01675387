"""The studio's projects and photos (dreambooth.studio.projects): folders confined to the root, uploads checked as
the pre-flight checks photos, nothing of the user's lost, the live report and the recipe through the library's own
code."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import draw_subject, photo_folder
from PIL import Image

from dreambooth.config import SECTION_TYPES, all_keys
from dreambooth.config_file import load_config, read_config
from dreambooth.errors import UserError
from dreambooth.studio.projects import (
    READ_CHUNK,
    Projects,
    family_defaults,
    find_models,
    recipe_schema,
    save_config,
)

STORED = re.compile(r"^[A-Za-z0-9_-]+-[0-9a-f]{8}\.(jpg|png|webp)$")


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def projects(tmp_path):
    return Projects(tmp_path / "projects")


@pytest.fixture
def project(projects):
    return projects.create("saya", identifier="<saya>", class_word="girl")


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------- projects


def test_create_list_and_open(projects, tiny_model):
    made = projects.create("saya", identifier="<saya>", class_word="girl", model=str(tiny_model))
    assert {"config.yaml", "characters.yaml", "README.md", "data", "prompts"} <= set(files_in(made.path))
    assert (made.path / "data" / "instance").is_dir() and (made.path / "data" / "class").is_dir()
    photo_folder(made.path / "elsewhere", 1)  # not the photo folder: not counted
    (made.path / "data" / "instance" / "a.png").write_bytes(encoded(draw_subject(0)))
    (made.path / "data" / "instance" / "a.txt").write_text("a photo of <saya> girl")  # a caption, not a photo
    assert projects.list() == [{"name": "saya", "identifier": "<saya>", "class_word": "girl",
                                "model": str(tiny_model), "photos": 1, "has_output": False}]
    (made.path / "output").mkdir()
    (made.path / "output" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert projects.open("saya").summary()["has_output"] is True
    with pytest.raises(UserError, match="already exists"):
        projects.create("saya", identifier="<x>", class_word="dog")
    with pytest.raises(UserError, match="no project named nope"):
        projects.open("nope")


@pytest.mark.parametrize("name", ["../x", "..", "/etc", "a/b", ".hidden", "", "a\\b", "x" * 65, "na\x00me"])
def test_a_project_name_that_could_leave_the_root_is_refused(projects, name):
    with pytest.raises(UserError, match="is refused"):
        projects.create(name, identifier="<x>", class_word="dog")
    with pytest.raises(UserError, match="is refused"):
        projects.open(name)
    assert files_in(projects.root) == []


def test_a_symlink_out_of_the_root_is_refused(projects, tmp_path):
    outside = tmp_path / "outside"
    Projects(tmp_path).create("outside", identifier="<x>", class_word="dog")
    (projects.root / "evil").symlink_to(outside)
    with pytest.raises(UserError, match="outside"):
        projects.open("evil")
    assert projects.list() == []


def test_a_photo_name_that_could_leave_the_folder_is_refused(project, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(encoded(draw_subject(1)))
    (project.photo_dir / "link.png").symlink_to(secret)
    for name in ("../../config.yaml", "/etc/passwd", "..", "link.png", "missing.png", ".hidden.png"):
        for call in (project.remove_photo, project.caption, lambda n: project.crop_photo(n, (0, 0, 8, 8))):
            with pytest.raises(UserError):
                call(name)
    assert secret.exists() and (project.path / "config.yaml").exists()
    assert not (project.path / "trash").exists()


# ---------------------------------------------------------------------------------------------- uploads


def test_a_good_photo_is_stored_under_a_safe_new_name(project):
    png, jpeg = encoded(draw_subject(0)), encoded(draw_subject(1), "JPEG", quality=95)
    first = project.add_photo(png, "../../evil/My Photo (1).PNG")
    second = project.add_photo(io.BytesIO(jpeg), "C:\\Users\\me\\cat.jpeg")
    assert STORED.match(first["name"]) and first["name"].startswith("My_Photo_1-")
    assert STORED.match(second["name"]) and second["name"].startswith("cat-") and second["name"].endswith(".jpg")
    assert (project.photo_dir / first["name"]).read_bytes() == png
    assert (project.photo_dir / second["name"]).read_bytes() == jpeg
    assert files_in(project.photo_dir) == sorted([first["name"], second["name"]])  # no temporary file left
    with pytest.raises(UserError, match="already in project"):
        project.add_photo(png, "again.png")
    assert [row["status"] for row in project.photos()] == ["usable", "usable"]


def test_a_text_file_named_png_is_refused_with_the_preflights_reason(project):
    with pytest.raises(UserError, match=r"notes\.png is not a usable photo: not an image \(text file named \.png\)"):
        project.add_photo(b"just some notes\n", "notes.png")
    with pytest.raises(UserError, match="truncated or corrupt image"):
        project.add_photo(encoded(draw_subject(0))[:300], "cut.png")
    assert files_in(project.photo_dir) == []


def test_an_oversize_upload_is_refused_without_reading_it_all(projects):
    project = Projects(projects.root, max_upload_bytes=2 * READ_CHUNK).create("p", identifier="<x>", class_word="dog")

    class Endless:
        read_total = 0

        def read(self, n):
            self.read_total += n
            return b"\0" * n

    stream = Endless()
    with pytest.raises(UserError, match="over the upload limit of 2 MB"):
        project.add_photo(stream, "huge.png")
    assert stream.read_total <= 3 * READ_CHUNK  # stopped at the limit, not at the end of the stream
    with pytest.raises(UserError, match="over the upload limit"):
        project.add_photo(b"\0" * (2 * READ_CHUNK + 1), "huge.png")
    assert files_in(project.photo_dir) == []


def test_a_decompression_bomb_is_refused_before_decoding(project, projects):
    bomb = encoded(Image.new("1", (10_000, 10_000)))  # 100 megapixels in a few kilobytes
    assert len(bomb) < 200_000
    with pytest.raises(UserError, match="decompression bomb"):
        project.add_photo(bomb, "bomb.png")
    strict = Projects(projects.root, max_pixels=100 * 100).open("saya")
    with pytest.raises(UserError, match="more pixels than the limit"):
        strict.add_photo(encoded(draw_subject(0, size=200)), "big.png")
    assert files_in(project.photo_dir) == []


def test_cmyk_16_bit_and_exif_rotated_photos_are_taken_as_the_preflight_takes_them(project):
    cmyk = encoded(draw_subject(0).convert("CMYK"), "JPEG")
    deep = encoded(Image.fromarray((np.arange(72 * 72).reshape(72, 72) * 12).astype(np.uint16)), "PNG")
    turned = draw_subject(2).resize((96, 64))
    exif = turned.getexif()
    exif[0x0112] = 6  # rotate 90 degrees to show upright
    rotated = encoded(turned, "JPEG", exif=exif)
    notes = {name: project.add_photo(data, name)["notes"] for name, data in
             (("cmyk.jpg", cmyk), ("deep.png", deep), ("turned.jpg", rotated))}
    assert any("converted from CMYK" in n for n in notes["cmyk.jpg"])
    assert any("16-bit grayscale" in n for n in notes["deep.png"])
    assert any("rotated upright per its EXIF orientation tag (6)" in n for n in notes["turned.jpg"])
    rows = {row["name"].split("-")[0]: row for row in project.photos()}
    assert {row["status"] for row in rows.values()} == {"usable"}
    assert (rows["turned"]["width"], rows["turned"]["height"]) == (64, 96)  # upright, as training reads it
    assert rows["turned"]["small"] and any("smaller than the training resolution" in n for n in rows["turned"]["notes"])


def test_a_gif_is_refused_by_type(project):
    with pytest.raises(UserError, match="uploads take JPEG, PNG, WEBP"):
        project.add_photo(encoded(draw_subject(0), "GIF"), "anim.png")


# ---------------------------------------------------------------------------------------------- photo edits


def test_remove_moves_the_photo_and_its_caption_to_the_trash(project):
    data = encoded(draw_subject(0))
    name = project.add_photo(data, "a.png")["name"]
    project.set_caption(name, "a photo of <saya> girl smiling")
    where = project.remove_photo(name)
    assert files_in(project.photo_dir) == []
    trashed = project.path / where
    assert trashed.read_bytes() == data  # recoverable, byte for byte
    assert any(p.name.endswith(Path(name).stem + ".txt") for p in trashed.parent.iterdir())


def test_crop_keeps_the_original(project):
    data = encoded(draw_subject(0, size=96))
    name = project.add_photo(data, "a.png")["name"]
    project.set_caption(name, "a photo of <saya> girl")
    cropped = project.crop_photo(name, (10, 20, 74, 84))
    assert cropped == name and Image.open(project.photo_dir / cropped).size == (64, 64)
    originals = list((project.path / "trash" / "originals").iterdir())
    assert [p.read_bytes() for p in originals] == [data]
    assert project.caption(cropped) == "a photo of <saya> girl"  # same stem: the caption still applies
    with pytest.raises(UserError, match="does not fit"):
        project.crop_photo(cropped, (0, 0, 65, 10))
    jpeg = project.add_photo(encoded(draw_subject(1, size=96), "JPEG"), "b.jpg")["name"]
    assert project.crop_photo(jpeg, (0, 0, 50, 50)) == jpeg.replace(".jpg", ".png")


def test_captions_round_trip_in_the_training_convention(project):
    name = project.add_photo(encoded(draw_subject(0)), "a.png")["name"]
    assert project.caption(name) is None
    text = "a photo of {identifier} {class} on a beach"
    project.set_caption(name, f"  {text}\n")
    assert (project.photo_dir / (Path(name).stem + ".txt")).read_text() == text + "\n"
    assert project.caption(name) == text and project.photos()[0]["caption"] == text
    project.set_caption(name, "")
    assert project.caption(name) is None and len(list((project.path / "trash").iterdir())) == 1


# ---------------------------------------------------------------------------------------------- report


@pytest.fixture
def no_weights(monkeypatch):
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the report loaded model weights")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def test_the_report_lists_a_bad_photo_and_how_the_identifier_tokenizes(projects, tiny_model, no_weights):
    project = projects.create("saya", identifier="<saya>", class_word="girl", model=str(tiny_model))
    project.save_config({"training": {"resolution": 64}, "dataset": {"num_class_images": 2}})
    for i in range(3):
        project.add_photo(encoded(draw_subject(i)), f"p{i}.png")
    (project.photo_dir / "bad.png").write_text("not a photo")  # put there by hand, not uploaded
    report = project.report()
    rows = {row["name"]: row for row in report["photos"]}
    assert rows["bad.png"]["status"] == "rejected"
    assert rows["bad.png"]["reason"] == "not an image (text file named .png)"
    assert report["usable"] == 3 and report["rejected"] == 1
    assert report["identifier"]["kind"] == "new" and report["identifier"]["pieces"] == ["<saya>"]
    assert "initialised from 'girl'" in report["identifier"]["text"]
    assert report["ok"] is True, report["problems"]
    assert "rejected  bad.png: not an image" in report["text"]
    assert report["captions"].startswith("captions: none")
    import json

    json.dumps(report)  # plain data for the app


def test_the_report_gives_trains_refusals_verbatim(project, tiny_model, no_weights):
    project.add_photo(encoded(draw_subject(0)), "p.png")
    report = project.report()  # no base model set: a problem, not a crash
    assert report["ok"] is False
    assert report["problems"][0] == ("model.pretrained_model: no base model given; set it in config.yaml or pass "
                                     "--pretrained_model_name_or_path PATH (a diffusers folder)")
    assert report["identifier"] is None and [row["status"] for row in report["photos"]] == ["usable"]
    for row in report["photos"]:
        (project.photo_dir / row["name"]).unlink()
    project.save_config({"model": {"pretrained_model": str(tiny_model)}})
    report = project.report()
    assert any(p.startswith(f"The instance image folder {project.photo_dir} holds no image files")
               for p in report["problems"])
    assert report["identifier"]["kind"] == "new"


# ---------------------------------------------------------------------------------------------- recipe


def test_the_schema_has_exactly_the_configs_fields():
    schema = recipe_schema()
    offered = {f"{section}.{key}" for section, prop in schema["properties"].items()
               for key in schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]]["properties"]}
    assert offered == set(all_keys()) - {"output.hub_token"}  # a secret never goes into config.yaml
    assert set(schema["properties"]) == set(SECTION_TYPES)
    lora = schema["$defs"]["LoraSection"]["properties"]
    assert lora["adapter"]["enum"] == ["lora", "dora", "lokr", "loha"] and lora["rank"]["minimum"] == 1


def test_save_config_refuses_a_made_up_key_with_the_command_lines_message(project, tmp_path):
    before = project.config_path.read_text()
    with pytest.raises(UserError) as refused:
        save_config(project, {"training": {"learning_rat": 1e-4}})
    assert project.config_path.read_text() == before and files_in(project.path).count("config.yaml") == 1
    assert not [n for n in files_in(project.path) if n.endswith(".tmp")]
    hand_written = tmp_path / "hand" / "config.yaml"
    hand_written.parent.mkdir()
    hand_written.write_text(before.replace("training:\n", "training:\n  learning_rat: 0.0001\n"))
    with pytest.raises(UserError) as cli:
        load_config(hand_written)
    line = "training.learning_rat: unknown key; did you mean 'training.learning_rate'?"
    assert line in str(refused.value) and line in str(cli.value)
    assert str(project.config_path) in str(refused.value)
    with pytest.raises(UserError, match="climbs out"):
        save_config(project, {"output": {"output_dir": "../elsewhere"}})
    # the log folder is relative to the run folder: the run writes it wherever it leads
    with pytest.raises(UserError, match="output.logging_dir '/tmp/logs' is refused: it is an absolute path"):
        save_config(project, {"output": {"logging_dir": "/tmp/logs"}})
    with pytest.raises(UserError, match="output.logging_dir '../../logs' is refused: it climbs out"):
        save_config(project, {"output": {"logging_dir": "../../logs"}})
    with pytest.raises(UserError, match="output.hub_token is a secret, and the studio never writes one"):
        save_config(project, {"output": {"hub_token": "hf_" + "x" * 30}})
    assert project.config_path.read_text() == before


def test_save_config_writes_what_train_reads_back(project, tiny_model):
    values = {"model": {"pretrained_model": str(tiny_model), "method": "lora"},
              "training": {"learning_rate": 1e-4, "max_train_steps": 40, "resolution": 64},
              "lora": {"rank": 8, "adapter": "dora"}, "validation": {"prompts": ["a photo of <saya> girl"]}}
    save_config(project, values)
    cfg = read_config(project.config_path).config
    assert (cfg.model.method, cfg.lora.rank, cfg.lora.adapter) == ("lora", 8, "dora")
    assert (cfg.training.learning_rate, cfg.training.max_train_steps, cfg.training.resolution) == (1e-4, 40, 64)
    assert cfg.validation.prompts == ["a photo of <saya> girl"]
    assert cfg.token.identifier == "<saya>" and cfg.dataset.instance_dir == project.path / "data" / "instance"
    written = yaml.safe_load(project.config_path.read_text())
    assert list(written) == ["model", "token", "training", "dataset", "lora", "validation", "output"]


def test_family_defaults_and_local_models(tiny_model, tmp_path):
    defaults = family_defaults(tiny_model)
    assert defaults["family"] in ("sd1", "sd2") and defaults["resolution"] > 0
    assert defaults["drawing"]["scheduler"] == "dpm++"
    assert family_defaults(tmp_path) is None
    models = tmp_path / "models"
    (models / "org" / "base").mkdir(parents=True)
    (models / "org" / "base" / "model_index.json").write_text((Path(tiny_model) / "model_index.json").read_text())
    (models / "notes").mkdir()
    assert [(m["name"], m["title"]) for m in find_models(models)] == [("org/base", defaults["title"])]
