"""The studio's page in a real browser: Debian's headless chromium through selenium, against the real studio app (built
as `dreambooth studio` builds it) on the tiny model on loopback. A person's whole path: create a project, upload four
photos (one not a picture: shown refused with the studio's reason), drop a copy of one (refused), caption one, crop it
(a box dragged over it), set the recipe through the form made from the schema, start a run, watch its steps and a sample
arrive, stop it (a checkpoint), resume it to the end and see its report; try the result beside the base model on one
seed, export it to kohya, add it as a character, start the character service and render the character on the service's
own page. The run is a LoRA run (kohya's format is a LoRA's). A screenshot of each screen is saved under the test's tmp
folder.

Without /usr/bin/chromium and /usr/bin/chromedriver the test skips, unless DREAMBOOTH_REQUIRE_BROWSER=1 (CI), where it
fails (conftest.headless_chromium).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import draw_subject, headless_chromium
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from serving_support import running

from dreambooth.studio.app import Access, create_studio
from dreambooth.studio.projects import Projects
from dreambooth.studio.runs import RunManager

WAIT_S = 60  # a run's process starting (torch's import) and its steps on a busy 2-core machine
UPLOAD_LIMIT = 2 * 1024 * 1024
# The recipe of test_studio_app's run test, as a person sets it in the form: section, key, value. max_train_steps is
# far off so that the run is still going when the test stops it; the resume then asks for two steps more. A LoRA, as
# test_studio_app's ship test trains, for the kohya export.
RECIPE = [("model", "method", "lora"), ("training", "resolution", "64"), ("training", "learning_rate", "0.001"),
          ("training", "max_train_steps", "1000"), ("dataset", "with_prior_preservation", "false"),
          ("validation", "steps", "1"), ("validation", "num_inference_steps", "1"),
          ("output", "checkpointing_steps", "1000"), ("output", "logging_steps", "1"), ("output", "report_to", "none")]


@pytest.fixture
def browser(tmp_path):
    with headless_chromium(tmp_path / "chromium", "1200,1000") as driver:
        yield driver


@pytest.fixture
def studio(tmp_path, tiny_model, clip_dir, dino_dir):
    """The studio's URL and its run manager (with the tiny CLIP and DINO scorers, as `studio --clip --dino` gives
    them); runs left going by a failed test are stopped (then killed) after it."""
    root = tmp_path / "projects"
    runs = RunManager(root / ".studio", clip=clip_dir, dino=dino_dir)
    app = create_studio(Access([]), max_upload_bytes=UPLOAD_LIMIT, models_dir=tiny_model.parent,
                        projects=Projects(root, max_upload_bytes=UPLOAD_LIMIT), runs=runs)
    with running(app) as url:
        try:
            yield url, runs
        finally:
            end_runs(runs)


def end_runs(runs: RunManager) -> None:
    for run in runs.runs():
        if not run.ended:
            try:
                runs.stop(run.id)
            except Exception:  # noqa: BLE001 - ending anyway, below
                pass
    deadline = time.monotonic() + 30
    while any(not run.ended for run in runs.runs()) and time.monotonic() < deadline:
        runs.tick()
        time.sleep(0.5)
    for run in runs.runs():
        if not run.ended and run.pid:
            try:
                os.killpg(run.pid, signal.SIGKILL)  # the runner's own session: it and its trainer
            except ProcessLookupError:
                pass


def wait(driver, condition, what: str, seconds: float = WAIT_S):
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def js(driver, script: str, *arguments):
    return driver.execute_script(script, *arguments)


def text_of(driver, element_id: str) -> str:
    return js(driver, "return document.getElementById(arguments[0]).textContent", element_id)


def screenshot(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / "screens" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000, name


def photo_files(folder: Path) -> list[Path]:
    """Three good PNGs of the subject and one file named like a PNG that is text."""
    folder.mkdir()
    paths = []
    for i in range(3):
        paths.append(folder / f"subject{i}.png")
        draw_subject(i).save(paths[-1])
    paths.append(folder / "notes.png")
    paths[-1].write_text("just some text, not a picture")
    return paths


def create_project(driver, tiny_model: Path) -> None:
    wait(driver, lambda d: d.find_element(By.ID, "screen-projects").is_displayed(), "the projects screen")
    wait(driver, lambda d: len(Select(d.find_element(By.ID, "new-model-choice")).options) == 2, "the models found")
    model = Select(driver.find_element(By.ID, "new-model-choice"))
    assert model.first_selected_option.get_attribute("value") == str(tiny_model.resolve())
    driver.find_element(By.ID, "new-name").send_keys("dog")
    driver.find_element(By.ID, "new-identifier").send_keys("sks")
    driver.find_element(By.ID, "new-class-word").send_keys("dog")
    driver.find_element(By.ID, "new-create").click()
    wait(driver, lambda d: d.find_element(By.ID, "screen-photos").is_displayed(), "the new project's photos")
    assert "dog" in text_of(driver, "current-project")


def upload_photos(driver, files: list[Path]) -> None:
    driver.find_element(By.ID, "photo-input").send_keys("\n".join(str(f) for f in files))
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#uploads li[data-state=added]")) == 3
         and d.find_elements(By.CSS_SELECTOR, "#uploads li[data-upload='notes.png'][data-state=refused]"),
         "three photos added and one refused")
    refused = driver.find_element(By.CSS_SELECTOR, "#uploads li[data-upload='notes.png'] .message").text
    assert refused.startswith("notes.png is not a usable photo") and "not an image" in refused, refused
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#photos .photo")) == 3, "the three thumbnails")
    cards = driver.find_elements(By.CSS_SELECTOR, "#photos .photo")
    assert [c.get_attribute("data-status") for c in cards] == ["usable"] * 3
    assert all(js(driver, "return arguments[0].querySelector('img').naturalWidth", c) == 72 for c in cards)
    # 72-pixel photos against the default resolution of 512; two of them alike (the pre-flight's near duplicates)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#photos .photo .small")) == 3
    assert driver.find_elements(By.CSS_SELECTOR, "#photos .photo .near-duplicate")
    wait(driver, lambda d: "sks" in text_of(d, "report-identifier") and "3 usable" in text_of(d, "report-counts"),
         "the pre-flight report of the three photos")


def drop_a_copy(driver) -> None:
    """A photo dropped on the drop zone (a drag from the desktop, as a script makes one): the same bytes as one
    already there, refused with the studio's words."""
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.querySelector("#photos .photo img").src).then((r) => r.blob()).then((blob) => {
          const dragged = new DataTransfer();
          dragged.items.add(new File([blob], "again.png", {type: "image/png"}));
          document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dragged, bubbles: true,
                                                                               cancelable: true}));
          done();
        });""")
    refused = "#uploads li[data-upload='again.png'][data-state=refused]"
    row = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, refused), "the dropped copy refused")[0]
    message = row.find_element(By.CLASS_NAME, "message").text
    assert message.startswith("again.png is already in project dog as subject0-") and "not added again" in message


def caption_a_photo(driver) -> None:
    card = driver.find_element(By.CSS_SELECTOR, "#photos .photo")
    name = card.get_attribute("data-photo")
    card.find_element(By.CLASS_NAME, "caption-text").send_keys("a photo of sks dog on the grass")
    card.find_element(By.CLASS_NAME, "caption-save").click()
    wait(driver, lambda d: "captions: 1 of 3 photos" in text_of(d, "report-captions"), "the caption in the report")
    shown = driver.find_element(By.CSS_SELECTOR, f"#photos .photo[data-photo='{name}'] .caption-text")
    assert shown.get_attribute("value") == "a photo of sks dog on the grass"  # read back from the project


def crop_a_photo(driver, tmp_path: Path) -> None:
    """The captioned photo cropped: a box dragged over it (then one side typed), applied; the photo is the box's size
    under its own name, its caption still its own."""
    from selenium.webdriver.common.action_chains import ActionChains

    card = driver.find_element(By.CSS_SELECTOR, "#photos .photo")
    name = card.get_attribute("data-photo")
    card.find_element(By.CLASS_NAME, "crop").click()
    wait(driver, lambda d: d.find_element(By.ID, "crop-box").is_displayed(), "the crop panel")
    sides = ("crop-left", "crop-top", "crop-right", "crop-bottom")
    box = lambda: [int(driver.find_element(By.ID, side).get_attribute("value")) for side in sides]  # noqa: E731
    wait(driver, lambda d: box() == [0, 0, 72, 72], "the largest centred square of the 72-pixel photo")
    image = driver.find_element(By.ID, "crop-image")
    half = image.size["width"] / 2
    ActionChains(driver).move_to_element_with_offset(image, -half * 0.8, -half * 0.8).click_and_hold() \
        .move_to_element_with_offset(image, half * 0.7, half * 0.7).release().perform()
    left, top, right, bottom = box()
    assert 4 <= left <= 10 and 4 <= top <= 10 and 58 <= right <= 64 and 58 <= bottom <= 64, box()
    screenshot(driver, tmp_path, "2-crop")
    typed = driver.find_element(By.ID, "crop-right")
    typed.clear()
    typed.send_keys(str(left + 56))
    driver.find_element(By.ID, "crop-apply").click()
    wait(driver, lambda d: not d.find_element(By.ID, "crop-box").is_displayed(), "the crop applied")
    # read in one script each time: the list is drawn again as the photos and the report refresh
    shown = """const card = [...document.querySelectorAll("#photos .photo")]
                                 .find((c) => c.dataset.photo === arguments[0]);
               const image = card && card.querySelector("img");
               return image && image.complete ? [image.naturalWidth, card.querySelector(".facts").textContent,
                                                 card.querySelector(".caption-text").value] : null;"""
    wait(driver, lambda d: (js(d, shown, name) or [0])[0] == 56, "the cropped picture, 56 pixels wide")
    assert js(driver, shown, name)[1:] == [f"56×{bottom - top}", "a photo of sks dog on the grass"]


def set_recipe(driver) -> None:
    driver.find_element(By.ID, "nav-recipe").click()
    wait(driver, lambda d: d.find_elements(By.ID, "field-training-resolution"), "the recipe form")
    assert driver.find_element(By.ID, "field-training-resolution").get_attribute("value") == "512"  # the default
    unset = Select(driver.find_element(By.ID, "field-output-report_to")).options[0]
    assert unset.get_attribute("textContent") == "(unset)" and unset.get_attribute("value") == ""
    assert "Training resolution" in driver.find_element(By.ID, "field-training-resolution").get_attribute("title")
    assert driver.find_element(By.ID, "field-model-pretrained_model").get_attribute("value").endswith("model")
    bad = driver.find_element(By.ID, "field-training-resolution")
    bad.clear()
    bad.send_keys("4")  # under the schema's minimum: the config's own refusal, next to the form
    driver.find_element(By.ID, "recipe-save").click()
    wait(driver, lambda d: d.find_element(By.ID, "recipe-error").is_displayed(), "the refusal of resolution 4")
    assert "resolution" in text_of(driver, "recipe-error")
    for section, key, value in RECIPE:
        details = driver.find_element(By.CSS_SELECTOR, f"details[data-section={section}]")
        if not details.get_attribute("open"):
            details.find_element(By.TAG_NAME, "summary").click()
        field = driver.find_element(By.ID, f"field-{section}-{key}")
        if field.tag_name == "select":
            Select(field).select_by_value(value)
        else:
            field.clear()
            field.send_keys(value)
    driver.find_element(By.ID, "recipe-save").click()
    wait(driver, lambda d: "saved config.yaml" in text_of(d, "recipe-saved"), "the recipe saved")
    assert not driver.find_element(By.ID, "recipe-error").is_displayed()
    assert driver.find_element(By.ID, "field-training-resolution").get_attribute("value") == "64"


def start_run(driver, kind: str, steps: int | None = None) -> str:
    Select(driver.find_element(By.ID, "run-kind")).select_by_value(kind)
    field = driver.find_element(By.ID, "run-steps")
    field.clear()
    if steps is not None:
        field.send_keys(str(steps))
    before = text_of(driver, "run-id")
    driver.find_element(By.ID, "run-start").click()
    wait(driver, lambda d: text_of(d, "run-id") not in ("", before), f"the {kind} run followed")
    assert not driver.find_element(By.ID, "runs-error").is_displayed(), text_of(driver, "runs-error")
    return text_of(driver, "run-id")


def run_state(driver) -> str:
    return driver.find_element(By.ID, "run-state").get_attribute("data-state")


def step(driver) -> int:
    return int(driver.find_element(By.ID, "run-step").get_attribute("data-step"))


def options(driver, select_id: str) -> list[str]:
    return [o.get_attribute("value") for o in Select(driver.find_element(By.ID, select_id)).options]


def loaded(driver, image_id: str) -> bool:
    return js(driver, "const i = document.getElementById(arguments[0]); "
                      "return !i.hidden && i.complete && i.naturalWidth > 0", image_id)


def try_the_result(driver, project: Path, checkpoint: str) -> None:
    """Try it: the results offered are the output and the checkpoint the stopped run left; the output and the base
    model each draw the prompt on seed 7, shown side by side with that seed."""
    driver.find_element(By.ID, "nav-try").click()
    wait(driver, lambda d: options(d, "try-result") == ["final", Path(checkpoint).name], "the results to try")
    assert driver.find_element(By.ID, "try-prompt").get_attribute("value") == "a photo of sks dog"
    for field, value in (("try-seed", "7"), ("try-steps", "2")):
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(value)
    driver.find_element(By.ID, "try-generate").click()
    wait(driver, lambda d: loaded(d, "try-trained") and loaded(d, "try-base"), "the trained and the base pictures")
    assert not driver.find_element(By.ID, "try-error").is_displayed(), text_of(driver, "try-error")
    seeds = [driver.find_element(By.ID, f"try-{side}-caption").get_attribute("data-seed")
             for side in ("trained", "base")]
    assert seeds == ["7", "7"] and "seed 7" in text_of(driver, "try-base-caption")
    tried = project / "tries" / driver.find_element(By.ID, "try-images").get_attribute("data-try")
    drawn = [next((tried / side).glob("*.png")) for side in ("trained", "base")]
    assert drawn[0].read_bytes() != drawn[1].read_bytes()  # the LoRA draws another picture on the same seed


def evaluate_every_checkpoint(driver, runs) -> None:
    """Try it's evaluate button queues `evaluate --checkpoints all` as a run; its scores come back with one best."""
    driver.find_element(By.ID, "evaluate-images").send_keys("1")
    driver.find_element(By.ID, "evaluate-steps").send_keys("2")
    driver.find_element(By.ID, "evaluate-start").click()
    wait(driver, lambda d: "queued as run" in text_of(d, "evaluate-queued"), "the evaluation queued")
    run_id = text_of(driver, "evaluate-queued").split()[3]
    wait(driver, lambda d: runs.get(run_id).ended, "the evaluation", seconds=180)
    assert runs.get(run_id).state == "finished", runs.get(run_id).message
    driver.find_element(By.ID, "evaluate-refresh").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#evaluations tr[data-best=true]"), "the best checkpoint")
    rows = driver.find_elements(By.CSS_SELECTOR, "#evaluations tr[data-checkpoint]")
    assert len(rows) >= 2 and sum(r.get_attribute("data-best") == "true" for r in rows) == 1
    assert "★ best" in driver.find_element(By.CSS_SELECTOR, "#evaluations tr[data-best=true]").text


def human(size: int) -> str:
    """The page's size in binary units, as a reader would check it."""
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.{2 if size < 10 else 1}f} {unit}"
    raise AssertionError(size)


def export_to_kohya(driver, project: Path) -> None:
    driver.find_element(By.ID, "nav-ship").click()
    wait(driver, lambda d: "final" in options(d, "ship-result"), "the ship it screen")
    Select(driver.find_element(By.ID, "export-format")).select_by_value("single-file")  # a LoRA alone is no model
    driver.find_element(By.ID, "export-start").click()
    wait(driver, lambda d: d.find_element(By.ID, "export-error").is_displayed(), "export's refusal")
    assert "is a LoRA, which holds only adapter weights" in text_of(driver, "export-error")  # the command's words
    assert not driver.find_elements(By.CSS_SELECTOR, "#exports li")
    Select(driver.find_element(By.ID, "export-format")).select_by_value("kohya")
    driver.find_element(By.ID, "export-start").click()
    row = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#exports li[data-format=kohya]"), "the export")[0]
    assert not driver.find_element(By.ID, "export-error").is_displayed(), text_of(driver, "export-error")
    path = row.find_element(By.CLASS_NAME, "path").text
    assert path.startswith("exports/dog-final-kohya") and path.endswith(".safetensors"), path
    size = (project / path).stat().st_size
    assert row.get_attribute("data-bytes") == str(size) and row.find_element(By.CLASS_NAME, "size").text == human(size)


def add_character_and_serve(driver, tmp_path: Path) -> None:
    """The result added as character rex, the service started, its link opened in a new tab and rex rendered there
    by the service's own page; then the service stopped from the studio."""
    name = driver.find_element(By.ID, "character-name")
    name.clear()
    name.send_keys("rex")
    driver.find_element(By.ID, "character-add").click()
    wait(driver, lambda d: d.find_element(By.ID, "character-done").get_attribute("data-character") == "rex", "rex")
    assert "characters.yaml" in text_of(driver, "character-done")
    assert text_of(driver, "serve-state") == "not running"
    assert not driver.find_element(By.ID, "serve-link").is_displayed()
    driver.find_element(By.ID, "serve-start").click()
    link = wait(driver, lambda d: [a for a in d.find_elements(By.ID, "serve-link") if a.is_displayed()],
                "the service's link")[0]
    assert link.get_attribute("href").startswith("http://127.0.0.1:") and link.get_attribute("target") == "_blank"
    screenshot(driver, tmp_path, "7-ship")
    studio_tab = driver.current_window_handle
    link.click()
    wait(driver, lambda d: len(d.window_handles) == 2, "the service's page in a new tab")
    driver.switch_to.window(next(h for h in driver.window_handles if h != studio_tab))
    wait(driver, lambda d: "rex" in options(d, "character"), "rex on the service's page")
    Select(driver.find_element(By.ID, "character")).select_by_value("rex")
    driver.find_element(By.ID, "render").click()
    wait(driver, lambda d: loaded(d, "picture"), "rex rendered by the service")
    assert "drawn" in text_of(driver, "picture-info")
    screenshot(driver, tmp_path, "8-service")
    driver.close()
    driver.switch_to.window(studio_tab)
    driver.find_element(By.ID, "serve-stop").click()
    wait(driver, lambda d: text_of(d, "serve-state") == "stopped", "the service stopped")
    assert not driver.find_element(By.ID, "serve-link").is_displayed()


def test_the_studio_page_does_the_whole_job(browser, studio, tiny_model, tmp_path):
    url, runs = studio
    browser.get(url + "/")
    create_project(browser, tiny_model)
    screenshot(browser, tmp_path, "1-projects")  # now listing nothing but the form; the list is checked below
    upload_photos(browser, photo_files(tmp_path / "photos"))
    drop_a_copy(browser)
    caption_a_photo(browser)
    crop_a_photo(browser, tmp_path)
    screenshot(browser, tmp_path, "2-photos")
    set_recipe(browser)
    screenshot(browser, tmp_path, "3-recipe")

    browser.find_element(By.ID, "nav-runs").click()
    first = start_run(browser, "train")
    wait(browser, lambda d: step(d) >= 1 and js(d, "const i = document.getElementById('run-sample'); "
                                               "return !i.hidden && i.complete && i.naturalWidth > 0"),
         "a step and a sample")
    assert run_state(browser) == "running" and text_of(browser, "run-step").endswith("/ 1000")
    assert text_of(browser, "run-loss") != "–" and "training:" in text_of(browser, "run-log")
    screenshot(browser, tmp_path, "4-run-going")
    browser.find_element(By.ID, "run-stop").click()
    wait(browser, lambda d: run_state(d) == "stopped", "the run stopped")
    stopped_at = step(browser)
    assert f"stopped at step {stopped_at}" in text_of(browser, "run-message")
    assert "checkpoint" in text_of(browser, "run-checkpoint"), text_of(browser, "run-checkpoint")
    assert runs.get(first).state == "stopped" and runs.get(first).checkpoint

    second = start_run(browser, "resume", stopped_at + 2)
    wait(browser, lambda d: run_state(d) == "finished", "the resumed run finished")
    assert step(browser) == stopped_at + 2
    wait(browser, lambda d: d.find_element(By.ID, "run-report").is_displayed() and js(
        d, "const f = document.getElementById('run-report').contentDocument; "
           "return f && f.readyState === 'complete' && f.body && f.body.innerText.length > 100"), "the run's report")
    rows = {r.get_attribute("data-run"): r.get_attribute("data-state")
            for r in browser.find_elements(By.CSS_SELECTOR, "#run-list tbody tr")}
    assert rows == {first: "stopped", second: "finished"}
    js(browser, "document.getElementById('run-report').scrollIntoView()")
    screenshot(browser, tmp_path, "5-runs")

    project = tmp_path / "projects" / "dog"
    try_the_result(browser, project, runs.get(first).checkpoint)
    screenshot(browser, tmp_path, "6-try")
    evaluate_every_checkpoint(browser, runs)
    export_to_kohya(browser, project)
    add_character_and_serve(browser, tmp_path)

    browser.find_element(By.ID, "nav-projects").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#project-list tr[data-project=dog]"), "the list")
    assert browser.find_element(By.CSS_SELECTOR, "#project-list tr[data-project=dog]").text.split()[:3] == \
        ["dog", "sks", "dog"]
    screenshot(browser, tmp_path, "1-projects")
    assert sorted(p.name for p in (tmp_path / "screens").iterdir()) == [
        "1-projects.png", "2-crop.png", "2-photos.png", "3-recipe.png", "4-run-going.png", "5-runs.png",
        "6-try.png", "7-ship.png", "8-service.png"]
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all("422" in m or "404" in m for m in severe), severe  # the refused recipe, upload, export; no script error
