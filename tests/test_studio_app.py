"""The studio's guard, before any route: who may call (loopback without keys; a key by bearer header or the login's
session cookie), no state change without the page's CSRF token, bounded bodies; and the command's own refusals."""

from __future__ import annotations

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
    # "give --api-keys FILE ... or keep the default loopback host": either starts it
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice user {TOKEN}\n")
    for argv in (["--host", "0.0.0.0", "--api-keys", str(keys)], []):
        assert main(["studio", "--projects", str(tmp_path / "p"), "--port", "0", *argv]) == 0
        assert "studio at http://" in capsys.readouterr().out


@pytest.mark.parametrize("path", ["/api/whoami", "/healthz"])
def test_reading_never_needs_the_token(path):
    studio, _ = client()
    assert studio.get(path).status_code == 200
