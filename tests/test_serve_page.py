"""The service's web page in a real browser: Debian's headless chromium through selenium, against the real app on the
tiny model on loopback. A person's path: pick the character, set its state with the controls built from the schema,
see the compiled prompt follow, render, and see the picture; with API keys, the key field and the 401 first.

Without /usr/bin/chromium and /usr/bin/chromedriver the tests skip, unless DREAMBOOTH_REQUIRE_BROWSER=1 (CI), where
they fail. Selenium Manager is never asked for a browser: the binaries are given, and nothing goes to the network.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import headless_chromium, requested_urls
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from serving_support import characters_file, running

from dreambooth.command_options import ServeOptions
from dreambooth.serving.app import create_app
from dreambooth.serving.auth import parse_keys
from dreambooth.serving.command import build_service

TOKEN = "t" * 20
WAIT_S = 30  # a render on a busy 2-core machine; typically under a second


@pytest.fixture
def browser(tmp_path):
    with headless_chromium(tmp_path / "chromium", "1100,900") as driver:
        yield driver


@pytest.fixture
def service(tmp_path, tiny_model):
    path = characters_file(tmp_path, tiny_model)
    return build_service(path, ServeOptions(characters=path, cache_dir=tmp_path / "cache"))


def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def text_of(driver, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def set_state(driver) -> None:
    """Emotion happy, intensity up from 0.5 to 0.9 by the keyboard, location typed."""
    Select(driver.find_element(By.ID, "state-emotion")).select_by_value("happy")
    slider = driver.find_element(By.ID, "state-intensity")
    assert [slider.get_attribute(a) for a in ("min", "max", "step")] == ["0", "1", "0.05"]
    slider.send_keys(*[Keys.ARROW_RIGHT] * 8)
    assert slider.get_attribute("value") == "0.9"
    location = driver.find_element(By.ID, "state-location")
    assert location.get_attribute("maxlength") == "80"
    location.send_keys("beach")


def wait_for_prompt(driver) -> str:
    wait(driver, lambda d: all(words in text_of(d, "compile-prompt") for words in ("sks dog", "happy, smiling",
                                                                                     "beach")),
         "the compiled prompt with the state's words")
    return text_of(driver, "compile-prompt")


def render_and_check(driver, tmp_path: Path, name: str) -> None:
    """Render, wait for the picture, and check it on the page and in a screenshot."""
    driver.find_element(By.ID, "render").click()
    wait(driver, lambda d: d.execute_script("const p = document.getElementById('picture'); "
                                            "return p.complete && p.naturalWidth > 0 && !p.hidden"),
         "the rendered picture")
    assert "drawn" in text_of(driver, "picture-info") or "from the cache" in text_of(driver, "picture-info")
    broken = driver.execute_script("return [...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
                                   ".map(i => i.id || i.src.slice(0, 40))")
    assert broken == []
    assert driver.find_element(By.ID, "error").is_displayed() is False
    natural, shown = driver.execute_script("const p = document.getElementById('picture'); "
                                           "return [p.naturalWidth, p.width]")
    assert natural == 64 and shown == 256, "a small picture is scaled up, whole pixels"

    shot = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(shot))
    image = Image.open(io.BytesIO(shot.read_bytes()))
    ratio, width, height, rect = driver.execute_script(
        "const r = document.getElementById('picture').getBoundingClientRect(); "
        "return [devicePixelRatio, innerWidth, innerHeight, [r.left, r.top, r.right, r.bottom]]")
    assert image.format == "PNG" and image.size == (round(width * ratio), round(height * ratio))
    box = tuple(round(v * ratio) for v in rect)
    assert box[2] <= image.size[0] and box[3] <= image.size[1], "the picture is inside the window"
    pixels = np.asarray(image.convert("RGB").crop(box), dtype=np.float32)
    assert pixels.std() > 3, "the picture's region of the screenshot is blank"


def severe_logs(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not any(a in entry["message"] for a in allowed)]


def test_page_compiles_and_renders_a_character(browser, service, tmp_path):
    with running(create_app(service, [], auth=False)) as url:
        browser.get(url + "/")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#character option"), "the characters")
        assert browser.find_elements(By.ID, "api-key") == [], "no key field without auth"
        Select(browser.find_element(By.ID, "character")).select_by_value("dog")
        # The controls come from the schema: every property, enums as selects with a "(none)" first.
        for slot in ("emotion", "intensity", "expression", "action", "gaze", "outfit", "location", "time_of_day",
                     "lighting", "shot", "style", "extra"):
            assert browser.find_element(By.ID, f"state-{slot}")
        gaze = Select(browser.find_element(By.ID, "state-gaze"))
        assert gaze.options[0].text == "(none)" and gaze.options[0].get_attribute("value") == ""
        assert browser.find_element(By.ID, "state-emotion").get_attribute("title") == "What the character feels."
        wait(browser, lambda d: "sks dog" in text_of(d, "compile-prompt"), "the first compiled prompt")
        assert "happy" not in text_of(browser, "compile-prompt"), "an unset control is not in the state"

        set_state(browser)
        prompt = wait_for_prompt(browser)
        assert prompt.startswith("a photo of sks dog")
        emotion = browser.find_element(By.CSS_SELECTOR, "#fragments li.up")
        assert "happy, smiling" in emotion.text and "1.24" in emotion.text, "intensity 0.9 weighs the emotion up"
        assert "seed" in text_of(browser, "settings") and "64×64" in text_of(browser, "settings")

        render_and_check(browser, tmp_path, "page")
        assert "drawn" in text_of(browser, "picture-info")
        render_and_check(browser, tmp_path, "page-again")
        assert "from the cache" in text_of(browser, "picture-info"), "the same state again is the cache's"
        assert severe_logs(browser) == []


def test_page_asks_for_the_api_key(browser, service, tmp_path):
    keys = parse_keys(f"alice user {TOKEN}", "test")
    with running(create_app(service, keys, auth=True)) as url:
        browser.get(url + "/")
        field = wait(browser, lambda d: d.find_elements(By.ID, "api-key"), "the API key field")[0]
        assert field.get_attribute("type") == "password"
        error = browser.find_element(By.ID, "error")
        wait(browser, lambda d: error.is_displayed() and "401" in error.text, "the 401 message")
        assert "API key" in error.text
        assert browser.find_elements(By.CSS_SELECTOR, "#character option") == []

        field.send_keys("w" * 20, Keys.ENTER)
        wait(browser, lambda d: "403" in error.text, "the 403 message of a wrong key")
        assert "refused" in error.text

        field.clear()
        field.send_keys(TOKEN)
        browser.find_element(By.ID, "api-key-use").click()
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#character option"), "the characters, with the key")
        assert not error.is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('dreambooth-serve-api-key')") == TOKEN

        browser.refresh()  # the key is kept for the tab's session
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#character option"), "the characters after reload")
        set_state(browser)
        wait_for_prompt(browser)
        render_and_check(browser, tmp_path, "page-auth")
        assert severe_logs(browser, allowed=("status of 401", "status of 403")) == []


def test_the_api_page_renders_the_api_with_the_network_off(tmp_path, service):
    """/docs loads Swagger UI's script, style and icon from the server (FastAPI's own page fetches them from a CDN and
    was blank offline): with no host name resolving, the page lists the API's operations, and every request it made
    went to the server itself. /redoc, whose script fetches a logo from its maker's CDN, is off."""
    import httpx2

    from dreambooth.serving.app import DOCS_FILES

    with headless_chromium(tmp_path / "chromium", "1100,900", offline=True) as browser, \
            running(create_app(service, [], auth=False)) as url:
        browser.get(url + "/docs")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")) >= 7,
             "/docs listing the operations")
        paths = {e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/v1/render", "/v1/compile", "/v1/chat-render", "/v1/characters", "/healthz"} <= paths, paths
        assert "Compile Request" in browser.find_element(By.TAG_NAME, "body").text
        urls = [u for u in requested_urls(browser) if not u.startswith("chrome://")]  # the blank tab's, in-browser
        assert {f"{url}/openapi.json", *(f"{url}/docs-assets/{name}" for name in DOCS_FILES)} <= set(urls), urls
        outside = [u for u in urls if not u.startswith((url + "/", "data:", "blob:"))]
        assert outside == [], outside
        assert severe_logs(browser) == []
        assert httpx2.get(f"{url}/redoc").json()["error"]["code"] == "not_found"
        assert httpx2.get(f"{url}/docs-assets/..%2F__init__.py").json()["error"]["code"] == "not_found"
