"""The studio's "evaluate every checkpoint": `dreambooth evaluate --checkpoints all` queued as a run of the studio's
run manager, on the tiny model with tiny CLIP and DINO folders, and the checkpoint the command picked marked best."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from test_studio_app import png

from dreambooth.cli import main as cli
from dreambooth.studio.app import CSRF_HEADER, Access, create_studio
from dreambooth.studio.projects import Projects
from dreambooth.studio.runs import RunManager


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    """No CLIP or DINO this machine has cached is found, here or by the evaluate processes (they inherit it)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def studio_on(root, **scorers) -> tuple[TestClient, Projects]:
    projects = Projects(root)
    access = Access([])
    app = create_studio(access, max_upload_bytes=2 * 1024 * 1024, projects=projects,
                        runs=RunManager(root / ".studio", **scorers))
    return TestClient(app, headers={CSRF_HEADER: access.csrf}), projects


def trained_project(studio: TestClient, projects: Projects, tiny_model):
    """A project trained 2 steps with a checkpoint every step: checkpoint-1, checkpoint-2 and the final model."""
    studio.post("/api/projects", json={"name": "dog", "identifier": "sks", "class_word": "dog",
                                       "model": str(tiny_model)}).raise_for_status()
    for i in range(3):
        studio.put(f"/api/projects/dog/photos/p{i}.png", content=png(i)).raise_for_status()
    recipe = {"training": {"resolution": 64, "learning_rate": 1e-3, "max_train_steps": 2},
              "dataset": {"with_prior_preservation": False},
              "output": {"checkpointing_steps": 1, "report_to": "none"}}
    studio.put("/api/projects/dog/config", json={"values": recipe}).raise_for_status()
    folder = projects.open("dog").path
    assert cli(["train", "--config", str(folder / "config.yaml")]) == 0
    return folder


def test_every_checkpoint_is_evaluated_as_a_queued_run_and_the_best_marked(tmp_path, tiny_model, clip_dir, dino_dir):
    studio, projects = studio_on(tmp_path / "projects", clip=clip_dir, dino=dino_dir)
    with studio:
        folder = trained_project(studio, projects, tiny_model)
        assert studio.get("/api/projects/dog/evaluations").json() == {"evaluations": []}
        run = studio.post("/api/projects/dog/evaluate", json={"prompts": ["a photo of sks dog"], "num_images": 1,
                                                              "steps": 1})
        assert run.status_code == 200, run.text
        run = run.json()
        assert run["kind"] == "evaluate" and run["state"] == "running" and run["device"] == "cpu"
        argv = run["argv"]
        assert argv[argv.index("--model") + 1] == str(folder / "output") and "--checkpoints" in argv
        assert argv[argv.index("--clip") + 1] == str(clip_dir) and argv[argv.index("--dino") + 1] == str(dino_dir)
        busy = studio.post("/api/projects/dog/runs", json={"kind": "train"})  # one run of a project at a time
        assert busy.status_code == 422 and f"already has run {run['id']} (evaluate)" in busy.json()["error"]["message"]
        end = time.monotonic() + 180
        while (shown := studio.get(f"/api/runs/{run['id']}").json()["run"])["state"] == "running":
            assert time.monotonic() < end, "the evaluation did not end in 180 s"
            time.sleep(0.5)
        assert shown["state"] == "finished", shown["message"]
        (evaluation,) = studio.get("/api/projects/dog/evaluations").json()["evaluations"]
    record = json.loads((folder / "output" / "checkpoint_metrics.json").read_text())  # what the command wrote
    assert evaluation["id"] == run["id"] and evaluation["best"] == record["best"] and record["best"]
    assert shown["message"].startswith(f"best: {record['best']} (highest dino")
    checkpoints = evaluation["checkpoints"]
    assert [c["step"] for c in checkpoints] == [1, 2, 2] and len({c["name"] for c in checkpoints}) == 3
    assert [c["name"] for c in checkpoints if c["best"]] == [record["best"]]
    best = next(c for c in checkpoints if c["best"])
    assert all(set(c["metrics"]) >= {"dino", "clip_i", "clip_t"} for c in checkpoints)
    # the command's rule: highest DINO, ties to CLIP-I, then the earlier step
    assert best == max(checkpoints, key=lambda c: (c["metrics"]["dino"], c["metrics"]["clip_i"], -c["step"]))
    assert (folder / "evaluations" / run["id"] / best["name"] / "metrics.json").is_file()


def test_without_scorers_the_evaluation_is_refused_with_the_commands_message(tmp_path, tiny_model):
    from dreambooth.evaluation.scorers import nothing_to_measure

    studio, _ = studio_on(tmp_path / "projects")
    with studio:
        studio.post("/api/projects", json={"name": "dog", "identifier": "sks", "class_word": "dog",
                                           "model": str(tiny_model)}).raise_for_status()
        refused = studio.post("/api/projects/dog/evaluate", json={})
        assert refused.status_code == 422
        assert refused.json()["error"]["message"] == nothing_to_measure()  # `evaluate`'s own refusal, word for word
        assert refused.json()["error"]["message"].startswith("nothing to measure: no --clip or --dino was given")
        assert studio.get("/api/runs").json() == {"runs": []}  # nothing queued
