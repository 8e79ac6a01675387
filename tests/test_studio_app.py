"""The studio's guard, before any route: who may call (loopback without keys; a key by bearer header or the login's
session cookie), no state change without the page's CSRF token, bounded bodies; and the command's own refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dreambooth.cli import main
from dreambooth.serving.auth import parse_keys
from dreambooth.studio.app import CSRF_HEADER, SESSION_COOKIE, Access, create_studio

TOKEN = "s" * 24


def client(keys: str = "", max_upload: int = 1024) -> tuple[TestClient, Access]:
    access = Access(parse_keys(keys, "test") if keys else [])
    return TestClient(create_studio(access, max_upload_bytes=max_upload)), access


def test_the_page_carries_the_token_and_no_state_changes_without_it():
    studio, access = client()
    page = studio.get("/").text
    assert f'<meta name="studio-csrf" content="{access.csrf}">' in page and "{{" not in page
    refused = studio.post("/api/logout")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf"
    assert studio.post("/api/logout", headers={CSRF_HEADER: "x" * 43}).status_code == 403  # another token
    assert studio.post("/api/logout", headers={CSRF_HEADER: access.csrf}).status_code == 200
    assert studio.get("/api/whoami").json() == {"name": "local", "role": "operator"}  # loopback without keys
    assert Access([]).csrf != access.csrf  # each studio process its own


def test_with_keys_a_caller_logs_in_once_and_the_cookie_holds_no_key():
    studio, access = client(f"alice user {TOKEN}")
    assert studio.get("/").status_code == 200 and studio.get("/healthz").status_code == 200  # open: page, health
    assert studio.get("/api/whoami").status_code == 401
    wrong = studio.post("/api/login", json={"token": "t" * 24}, headers={CSRF_HEADER: access.csrf})
    assert wrong.status_code == 403 and SESSION_COOKIE not in wrong.cookies
    answer = studio.post("/api/login", json={"token": TOKEN}, headers={CSRF_HEADER: access.csrf})
    assert answer.status_code == 200
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    assert studio.get("/api/whoami").json()["name"] == "alice"  # the browser's cookie
    forged = TestClient(studio.app, cookies={SESSION_COOKIE: "alice." + "0" * 64})
    assert forged.get("/api/whoami").status_code == 401
    bearer = TestClient(studio.app)
    assert bearer.get("/api/whoami", headers={"Authorization": f"Bearer {TOKEN}"}).json()["name"] == "alice"


def test_a_body_over_the_limit_is_refused_as_it_arrives():
    studio, access = client(max_upload=1024)
    answer = studio.post("/api/login", content=b"x" * (1024 + 64 * 1024 + 1), headers={CSRF_HEADER: access.csrf})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "body_too_large"


def test_the_studio_command_refuses_another_host_without_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DREAMBOOTH_API_KEYS", raising=False)
    assert main(["studio", "--projects", str(tmp_path / "p"), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 is reachable from other machines" in err and "give --api-keys FILE" in err
    assert not (tmp_path / "p").exists()  # nothing made before the refusal
    (tmp_path / "file").write_text("the user's own file")
    assert main(["studio", "--projects", str(tmp_path / "file"), "--port", "0"]) == 2
    assert "--projects " + str(tmp_path / "file") + " is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "the user's own file"
    # "give --api-keys FILE ... or keep the default loopback host": either starts it
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice user {TOKEN}\n")
    for argv in (["--host", "0.0.0.0", "--api-keys", str(keys)], []):
        assert main(["studio", "--projects", str(tmp_path / "p"), "--port", "0", *argv]) == 0
        assert "studio at http://" in capsys.readouterr().out


def test_without_keys_the_studio_answers_only_requests_addressed_to_this_machine(tmp_path, monkeypatch):
    """A page of another site whose name is rebound to 127.0.0.1 is the studio's own origin to the browser: were the
    studio to answer it, the page could read the CSRF token and do anything."""
    import uvicorn

    monkeypatch.delenv("DREAMBOOTH_API_KEYS", raising=False)
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: started.append(self.config.app))
    assert main(["studio", "--projects", str(tmp_path / "p"), "--port", "0"]) == 0
    studio = TestClient(started[0], base_url="http://127.0.0.1:7860")
    assert studio.get("/").status_code == 200
    for host in ("localhost:7860", "[::1]:7860", "127.0.0.1"):
        assert studio.get("/healthz", headers={"host": host}).status_code == 200
    rebound = studio.get("/", headers={"host": "attacker.example:7860"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host"
    assert "'attacker.example'" in rebound.json()["error"]["message"] and "studio-csrf" not in rebound.text
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice user {TOKEN}\n")
    assert main(["studio", "--projects", str(tmp_path / "p"), "--port", "0", "--api-keys", str(keys)]) == 0
    assert TestClient(started[1]).get("/", headers={"host": "studio.example"}).status_code == 200  # a key guards it


@pytest.mark.parametrize(("body", "said"), [
    (b"{not json", "the body is not valid JSON (Expecting property name enclosed in double quotes at character 1)."),
    (b"", "the body must be a JSON object with this request's fields (Content-Type: application/json)."),
    (b"[1, 2]", "the body must be a JSON object with this request's fields (Content-Type: application/json)."),
    (b'{"token": 5}', "token: Input should be a valid string."),
])
def test_a_body_that_is_not_what_the_route_takes_is_refused_saying_why(body, said):
    studio, access = client()
    answer = studio.post("/api/login", content=body, headers={CSRF_HEADER: access.csrf,
                                                               "Content-Type": "application/json"})
    assert answer.status_code == 422 and answer.json()["error"] == {"code": "invalid_request", "message": said}


@pytest.mark.parametrize(("path", "body", "said"), [
    ("runs", {"kind": "train", "steps": True}, "steps: Input should be a valid integer."),
    ("runs", {"kind": "extend", "steps": "50"}, "steps: Input should be a valid integer."),
    ("try", {"prompt": "a photo", "seed": 1.5}, "seed: Input should be a valid integer."),
    ("try", {"prompt": "a photo", "guidance": True}, "guidance: Input should be a valid number."),
    ("export", {"format": "kohya", "half": 1}, "half: Input should be a valid boolean."),
    ("evaluate", {"seeds": [1, "2"]}, "seeds.1: Input should be a valid integer."),
    ("photos/a.png/crop", {"box": [0, 0, 10.5, 10]}, "box.2: Input should be a valid integer."),
])
def test_a_number_or_switch_of_another_type_is_refused_not_read_as_one(with_runs, path, body, said):
    """pydantic's lax mode would read `true` as 1 step, "50" as 50 and 1 as a switch on: each is refused."""
    studio, _ = with_runs
    answer = studio.post(f"/api/projects/dog/{path}", json=body)
    assert answer.status_code == 422 and answer.json()["error"] == {"code": "invalid_request", "message": said}


@pytest.mark.parametrize("path", ["/api/whoami", "/healthz"])
def test_reading_never_needs_the_token(path):
    studio, _ = client()
    assert studio.get(path).status_code == 200


# ------------------------------------------------------------------------------------- projects over HTTP
@pytest.fixture
def studio(tmp_path, tiny_model):
    from dreambooth.studio.projects import Projects

    access = Access([])
    app = create_studio(access, max_upload_bytes=2 * 1024 * 1024,
                        projects=Projects(tmp_path / "projects", max_upload_bytes=2 * 1024 * 1024),
                        models_dir=tiny_model.parent)
    with TestClient(app, headers={CSRF_HEADER: access.csrf}) as client:
        yield client


@pytest.fixture
def with_runs(tmp_path):
    """The studio's app with its projects and run manager under tmp_path/projects: its client (carrying the page's
    CSRF token) and its Projects."""
    from dreambooth.studio.projects import Projects
    from dreambooth.studio.runs import RunManager

    access = Access([])
    projects = Projects(tmp_path / "projects")
    app = create_studio(access, max_upload_bytes=2 * 1024 * 1024, projects=projects,
                        runs=RunManager(tmp_path / "projects" / ".studio"))
    with TestClient(app, headers={CSRF_HEADER: access.csrf}) as client:
        yield client, projects


def png(i: int) -> bytes:
    import io

    from conftest import draw_subject

    buffer = io.BytesIO()
    draw_subject(i).save(buffer, format="PNG")
    return buffer.getvalue()


def new_dog_project(studio: TestClient, tiny_model, photos: int = 0) -> None:
    """Project `dog` (identifier sks) on the tiny model, through the API, with `photos` photos of the subject."""
    studio.post("/api/projects", json={"name": "dog", "identifier": "sks", "class_word": "dog",
                                       "model": str(tiny_model)}).raise_for_status()
    for i in range(photos):
        studio.put(f"/api/projects/dog/photos/p{i}.png", content=png(i)).raise_for_status()


def test_a_project_is_made_filled_and_checked_through_the_api(studio, tiny_model):
    made = studio.post("/api/projects", json={"name": "saya", "identifier": "<saya>", "class_word": "girl",
                                              "model": str(tiny_model)})
    assert made.status_code == 200, made.text
    assert [p["name"] for p in studio.get("/api/projects").json()["projects"]] == ["saya"]
    for i in range(3):
        assert studio.put(f"/api/projects/saya/photos/photo{i}.png", content=png(i)).status_code == 200
    refused = studio.put("/api/projects/saya/photos/notes.png", content=b"just some text, not a picture")
    assert refused.status_code == 422 and "not an image" in refused.json()["error"]["message"]
    photos = studio.get("/api/projects/saya/photos").json()["photos"]
    assert len(photos) == 3 and all(p["status"] == "usable" for p in photos)
    assert studio.get(f"/api/projects/saya/photos/{photos[0]['name']}").content == png(0)
    assert studio.put(f"/api/projects/saya/photos/{photos[0]['name']}/caption",
                      json={"text": "a photo of <saya> girl smiling"}).status_code == 200
    report = studio.get("/api/projects/saya/report").json()
    assert report["identifier"]["identifier"] == "<saya>" and report["usable"] == 3, report
    assert [m["name"] for m in studio.get("/api/models").json()["models"]] == [tiny_model.name]
    schema = studio.get("/api/recipe-schema").json()
    assert "training" in schema["properties"]
    saved = studio.put("/api/projects/saya/config", json={"values": {"training": {"max_train_steps": 7}}})
    assert saved.status_code == 200 and saved.json()["config"]["training"]["max_train_steps"] == 7
    wrong = studio.put("/api/projects/saya/config", json={"values": {"training": {"max_train_stepz": 7}}})
    assert wrong.status_code == 422 and "max_train_stepz" in wrong.json()["error"]["message"]
    assert studio.get("/api/projects/saya").json()["config"]["training"]["max_train_steps"] == 7  # kept
    removed = studio.delete(f"/api/projects/saya/photos/{photos[1]['name']}")
    assert removed.status_code == 200 and len(studio.get("/api/projects/saya/photos").json()["photos"]) == 2


@pytest.mark.parametrize("path", ["/api/projects/..", "/api/projects/%2e%2e/photos", "/api/projects/a%2Fb/report"])
def test_a_path_outside_the_projects_is_refused(studio, path):
    answer = studio.get(path)
    assert answer.status_code in (404, 422) and "error" in answer.json()


def test_a_link_in_a_project_that_leads_out_serves_nothing(studio, tmp_path):
    outside = tmp_path / "outside" / "a" / "b"
    outside.mkdir(parents=True)
    (outside / "secret.png").write_bytes(b"not the studio's")
    studio.post("/api/projects", json={"name": "p", "identifier": "sks", "class_word": "dog"}).raise_for_status()
    (tmp_path / "projects" / "p" / "tries").symlink_to(tmp_path / "outside")
    answer = studio.get("/api/projects/p/tries/a/b/secret.png")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


def test_a_file_where_the_studio_keeps_a_folder_is_named_not_a_bare_500(studio, tmp_path):
    studio.post("/api/projects", json={"name": "p", "identifier": "sks", "class_word": "dog"}).raise_for_status()
    photo = studio.put("/api/projects/p/photos/a.png", content=png(0)).json()["name"]
    trash = tmp_path / "projects" / "p" / "trash"
    trash.write_text("the user's own file")
    answer = studio.delete(f"/api/projects/p/photos/{photo}")
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "disk"
    assert f"File exists ({trash})" in answer.json()["error"]["message"]
    assert trash.read_text() == "the user's own file" and studio.get(f"/api/projects/p/photos/{photo}").is_success


def test_a_project_photo_or_run_that_is_not_there_is_a_404_saying_so(with_runs, tiny_model):
    studio, _ = with_runs
    new_dog_project(studio, tiny_model, photos=1)
    for method, path, said in (("GET", "/api/projects/cat/photos", "there is no project named cat"),
                               ("POST", "/api/projects/cat/runs", "there is no project named cat"),
                               ("GET", "/api/projects/dog/photos/p9.png", "photo 'p9.png' is not in project dog"),
                               ("DELETE", "/api/projects/dog/photos/p9.png", "photo 'p9.png' is not in project"),
                               ("GET", "/api/runs/r-nope", "there is no run r-nope"),
                               ("POST", "/api/runs/r-nope/stop", "there is no run r-nope")):
        answer = studio.request(method, path, json={} if method == "POST" else None)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found", (path, answer.text)
        assert said in answer.json()["error"]["message"], answer.text


def test_an_upload_over_the_limit_is_refused_before_it_is_read_whole(studio, tiny_model):
    studio.post("/api/projects", json={"name": "p", "identifier": "sks", "class_word": "dog",
                                       "model": str(tiny_model)})
    answer = studio.put("/api/projects/p/photos/big.png", content=b"\0" * (3 * 1024 * 1024))
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "body_too_large"
    message = answer.json()["error"]["message"]  # the studio's own limit and flag, not serve's --max-body-kb
    assert "limit of 2 MB (--max-upload-mb); it was not added" in message and "max-body-kb" not in message
    # saved smaller, as the message says, it is added
    assert studio.put("/api/projects/p/photos/big.png", content=png(0)).status_code == 200


# ---------------------------------------------------------------------------------------------- runs over HTTP
def test_a_run_is_started_followed_and_its_sample_and_report_shown_through_the_api(with_runs, tiny_model):
    """The whole of a short run through the studio's API: the recipe saved, a run started, its server-sent events
    followed to the end, its newest sample and its report served; a second start and a refused stop answered."""
    import json as jsonlib

    studio, _ = with_runs
    new_dog_project(studio, tiny_model, photos=4)
    recipe = {"training": {"resolution": 64, "learning_rate": 1e-3, "max_train_steps": 3},
              "dataset": {"with_prior_preservation": False},
              "validation": {"steps": 3, "num_inference_steps": 1},
              "output": {"checkpointing_steps": 1000, "logging_steps": 1, "report_to": "none"}}
    studio.put("/api/projects/dog/config", json={"values": recipe}).raise_for_status()
    run = studio.post("/api/projects/dog/runs", json={"kind": "train"}).json()
    again = studio.post("/api/projects/dog/runs", json={"kind": "train"})
    assert again.status_code == 422 and run["id"] in again.json()["error"]["message"]
    events = []
    with studio.stream("GET", f"/api/runs/{run['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(jsonlib.loads(line[6:]))
    assert events[-1]["kind"] == "state" and events[-1]["state"] == "finished", events[-1]
    assert [e["step"] for e in events if e["kind"] == "step"][-1] == 3
    shown = studio.get(f"/api/runs/{run['id']}").json()
    assert shown["run"]["state"] == "finished" and shown["progress"]["step"] == 3
    assert studio.get(f"/api/runs/{run['id']}/sample").content.startswith(b"\x89PNG")
    report = studio.get(f"/api/runs/{run['id']}/report")
    assert report.status_code == 200 and "<html" in report.text.lower()
    stop = studio.post(f"/api/runs/{run['id']}/stop")
    assert stop.status_code == 422 and "finished" in stop.json()["error"]["message"]
    for escape in ("../../config.yaml", "%2e%2e/%2e%2e/config.yaml", "..%2f..%2fconfig.yaml"):
        answer = studio.get(f"/api/runs/{run['id']}/report/{escape}")
        assert answer.status_code in (404, 422) and "pretrained_model" not in answer.text


def test_a_run_the_pre_flight_refuses_is_refused_at_start_with_trains_message(with_runs, tmp_path, tiny_model,
                                                                             capsys, monkeypatch):
    """Start on a project `train` would refuse (no photos yet; a recipe value out of place): the start answers with
    the message `dreambooth train --config` ends with, word for word, and nothing is queued."""
    studio, projects = with_runs
    new_dog_project(studio, tiny_model)
    config = projects.open("dog").config_path

    def photos_and_a_width_off_the_grid():
        for i in range(3):
            studio.put(f"/api/projects/dog/photos/p{i}.png", content=png(i)).raise_for_status()
        studio.put("/api/projects/dog/config", json={"values": {"validation": {"width": 65}}}).raise_for_status()

    for prepare in (lambda: None, photos_and_a_width_off_the_grid):
        prepare()
        refused = studio.post("/api/projects/dog/runs", json={"kind": "train"})
        monkeypatch.chdir(tmp_path)
        assert main(["train", "--config", str(config)]) == 2
        said = capsys.readouterr().err.strip().removeprefix("error: ")
        assert refused.status_code == 422 and refused.json()["error"]["message"] == said, refused.text
        assert studio.get("/api/runs").json() == {"runs": []}
    assert "validation.width" in said


def test_a_result_is_tried_beside_the_base_model_on_the_same_seed(tmp_path, tiny_model):
    """Try it: `generate`'s own job twice, the trained model's picture and the base model's, on one prompt and seed;
    a result that does not exist yet is refused with what to do."""
    import yaml

    from dreambooth.cli import main as cli
    from dreambooth.studio.projects import Projects

    projects = Projects(tmp_path / "projects")
    access = Access([])
    app = create_studio(access, max_upload_bytes=2 * 1024 * 1024, projects=projects)
    with TestClient(app, headers={CSRF_HEADER: access.csrf}) as studio:
        new_dog_project(studio, tiny_model)
        early = studio.post("/api/projects/dog/try", json={"prompt": "a photo of sks dog"})
        assert early.status_code == 422 and "train it first" in early.json()["error"]["message"]
        for i in range(3):
            studio.put(f"/api/projects/dog/photos/p{i}.png", content=png(i)).raise_for_status()
        recipe = {"training": {"resolution": 64, "learning_rate": 1e-3, "max_train_steps": 2},
                  "dataset": {"with_prior_preservation": False}, "output": {"report_to": "none"}}
        studio.put("/api/projects/dog/config", json={"values": recipe}).raise_for_status()
        folder = projects.open("dog").path
        assert cli(["train", "--config", str(folder / "config.yaml")]) == 0
        tried = studio.post("/api/projects/dog/try", json={"prompt": "a photo of sks dog", "seed": 5, "steps": 2})
        assert tried.status_code == 200, tried.text
        images = tried.json()["images"]
        trained = studio.get(f"/api/projects/dog/{images['trained']}")
        base = studio.get(f"/api/projects/dog/{images['base']}")
        assert trained.content.startswith(b"\x89PNG") and base.content.startswith(b"\x89PNG")
        assert trained.content != base.content  # the trained model draws another picture on the same seed
        settings = yaml.safe_load((folder / images["trained"]).parent.joinpath("settings.json").read_text())
        assert settings["seeds"] == [5] and settings["model"] == str(folder / "output")
        wrong = studio.post("/api/projects/dog/try", json={"prompt": "x", "result": "../output"})
        assert wrong.status_code == 422 and "checkpoint-200" in wrong.json()["error"]["message"]


def test_a_lora_result_is_exported_made_a_character_and_served(tmp_path, tiny_model):
    """Ship it: the LoRA exported to kohya (size and place given, never over an earlier export), merged into its
    base as one file; made a character of characters.yaml; `serve` of it started and drawing that character."""
    import json as jsonlib
    import urllib.request

    from dreambooth.cli import main as cli
    from dreambooth.studio.projects import Projects

    projects = Projects(tmp_path / "projects")
    access = Access([])
    app = create_studio(access, max_upload_bytes=2 * 1024 * 1024, projects=projects)
    with TestClient(app, headers={CSRF_HEADER: access.csrf}) as studio:
        new_dog_project(studio, tiny_model, photos=3)
        recipe = {"model": {"method": "lora"}, "training": {"resolution": 64, "learning_rate": 1e-3,
                                                             "max_train_steps": 2},
                  "dataset": {"with_prior_preservation": False}, "output": {"report_to": "none"}}
        studio.put("/api/projects/dog/config", json={"values": recipe}).raise_for_status()
        folder = projects.open("dog").path
        assert cli(["train", "--config", str(folder / "config.yaml")]) == 0
        first = studio.post("/api/projects/dog/export", json={"format": "kohya"})
        assert first.status_code == 200, first.text
        again = studio.post("/api/projects/dog/export", json={"format": "kohya"}).json()
        assert first.json()["path"] != again["path"] and (folder / first.json()["path"]).is_file()
        assert first.json()["bytes"] == (folder / first.json()["path"]).stat().st_size > 0
        merged = studio.post("/api/projects/dog/export", json={"format": "single-file", "merge": True})
        assert merged.status_code == 200 and merged.json()["merged"], merged.text
        full = studio.post("/api/projects/dog/export", json={"format": "single-file"})
        assert full.status_code == 422  # a LoRA alone is no model: the command line's message says what to do
        assert studio.get("/api/projects/dog/serve").json() == {"url": None}
        made = studio.post("/api/projects/dog/characters", json={"name": "rex"})
        assert made.status_code == 200 and made.json()["character"]["loras"], made.text
        bad = studio.post("/api/projects/dog/characters", json={"name": "no spaces please"})
        assert bad.status_code == 422
        url = studio.post("/api/projects/dog/serve").json()["url"]
        try:
            with urllib.request.urlopen(url + "v1/characters", timeout=30) as answer:
                assert "rex" in [c["name"] for c in jsonlib.loads(answer.read())["characters"]]
            request = urllib.request.Request(url + "v1/render", data=jsonlib.dumps(
                {"character": "rex", "steps": 2, "width": 64, "height": 64}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as answer:
                assert answer.read().startswith(b"\x89PNG")
        finally:
            assert studio.delete("/api/projects/dog/serve").json() == {"stopped": True}


def test_pushing_to_the_hub_is_refused_with_the_trainers_message_or_uploads_the_output(tmp_path, tiny_model,
                                                                                      monkeypatch):
    """Ship it's hub upload goes through training.hub as `--push_to_hub` does: nothing trained yet, then no token,
    each refused with the library's own message; with a token, the output uploaded as train uploads it."""
    from dreambooth.cli import main as cli
    from dreambooth.studio.projects import Projects

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no saved token
    projects = Projects(tmp_path / "projects")
    access = Access([])
    with TestClient(create_studio(access, max_upload_bytes=2 * 1024 * 1024, projects=projects),
                    headers={CSRF_HEADER: access.csrf}) as studio:
        new_dog_project(studio, tiny_model)
        early = studio.post("/api/projects/dog/push")
        assert early.status_code == 422 and "train it first" in early.json()["error"]["message"]
        for i in range(3):
            studio.put(f"/api/projects/dog/photos/p{i}.png", content=png(i)).raise_for_status()
        studio.put("/api/projects/dog/config", json={"values": {
            "training": {"resolution": 64, "max_train_steps": 1}, "dataset": {"with_prior_preservation": False},
            "output": {"report_to": "none"}}}).raise_for_status()
        assert cli(["train", "--config", str(projects.open("dog").config_path)]) == 0
        refused = studio.post("/api/projects/dog/push")
        assert refused.status_code == 422 and refused.json()["error"]["message"].startswith("output.push_to_hub: ")
        # with a token and a hub (stood in for: none is reachable here), the output goes up as train's upload sends it
        import huggingface_hub

        from dreambooth.config_file import load_config

        calls = {}
        monkeypatch.setenv("HF_TOKEN", "hf_" + "s" * 30)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, token=None, **kw: {"name": "me"})
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault(
            "repo", repo_id))
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
        pushed = studio.post("/api/projects/dog/push")
        output = Path(load_config(projects.open("dog").config_path).output.output_dir)
        assert pushed.status_code == 200, pushed.text
        assert pushed.json() == {"repo": f"me/{output.name}", "url": f"https://huggingface.co/me/{output.name}"}
        assert calls["repo"] == pushed.json()["repo"] and Path(calls["upload"]["folder_path"]) == output
        assert "checkpoint-*" in calls["upload"]["ignore_patterns"]
