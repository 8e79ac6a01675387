"""`dreambooth studio`'s web application: the page and the API it calls, over the library (projects, runs, ...).

What every request passes first (`Guard`, outside every route):

- **Who calls.** Without API keys the studio listens on loopback only and every local caller may do everything.
  With keys (`--api-keys`, as `serve` reads them) a caller sends one as `Authorization: Bearer TOKEN`, or logs in
  once (POST /api/login) and the browser then carries a session cookie (HttpOnly, SameSite=Strict) holding the key's
  name signed with this process's secret, never the key.
- **Only this machine's names without keys.** A studio without keys answers only requests addressed (Host header) to
  a loopback name: a page on another site that points its own name at 127.0.0.1 (DNS rebinding) would otherwise be
  the studio's own origin to the browser, read the page's CSRF token and use everything.
- **No state change from another site.** GET and HEAD never change anything. Every other method needs the
  `X-Studio-CSRF` header to equal the token the page was served with: a page on another origin can make the browser
  send a request (with the cookie) but cannot read the token to put in it.
- **Bodies are bounded** (`--max-upload-mb`, plus room for a form): a larger one is refused with 413 as it arrives.

Refusals are JSON, `{"error": {"code", "message"}}`, as the character service answers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from dreambooth.serving.app import BodyLimit, error_response
from dreambooth.serving.auth import Key, find_key, host_name

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSRF_HEADER = "x-studio-csrf"
SESSION_COOKIE = "studio_session"
FORM_ROOM = 64 * 1024  # room for a JSON body; a photo arrives as the raw body of its PUT


@dataclass
class Access:
    """The studio's keys (none: loopback only, everyone local may do everything), the names a request may be addressed
    to without keys (empty: any, for an app built in-process), its CSRF token and the secret its session cookies are
    signed with; both made fresh for each studio process."""

    keys: list[Key]
    hosts: tuple[str, ...] = ()
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def session_for(self, key: Key) -> str:
        signature = hmac.new(self.secret, key.name.encode(), hashlib.sha256).hexdigest()
        return f"{key.name}.{signature}"

    def key_of_session(self, cookie: str) -> Key | None:
        name, _, signature = cookie.rpartition(".")
        key = next((k for k in self.keys if k.name == name), None)
        if key is None:
            return None
        expected = hmac.new(self.secret, name.encode(), hashlib.sha256).hexdigest()
        return key if hmac.compare_digest(signature, expected) else None

    def caller(self, headers: dict, cookies: dict) -> Key | None:
        """The key a request comes with (bearer token or session cookie); None when it has none that is ours."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return find_key(self.keys, token.strip())
        cookie = cookies.get(SESSION_COOKIE)
        return self.key_of_session(cookie) if cookie else None


class Guard:
    """The caller and the CSRF token, checked before any route (module docstring)."""

    OPEN = {"/", "/healthz", "/api/login"}  # the page itself, the health check and logging in need no key

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refusal = self.refusal(request)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, request: Request) -> JSONResponse | None:
        host = host_name(request.headers.get("host", ""))
        if not self.access.keys and self.access.hosts and host not in self.access.hosts:
            return error_response(403, "host", f"this studio has no API keys, so it answers only requests addressed "
                                  f"to this machine ({', '.join(self.access.hosts)}); this one was addressed to "
                                  f"'{host}', as a page of another site reaching it through DNS rebinding would be. "
                                  "Open the address the studio printed when it started, or give it --api-keys to "
                                  "reach it under another name.")
        if request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), self.access.csrf.encode()):
                return error_response(403, "csrf", "this request changes the studio's state and did not come from "
                                      f"the studio's page (no {CSRF_HEADER} header with the page's token). Reload "
                                      "the page and try again; scripts read the token from the page's "
                                      "<meta name=\"studio-csrf\">.")
        if self.access.keys and request.url.path not in self.OPEN:
            if self.access.caller(request.headers, request.cookies) is None:
                return error_response(401, "unauthorized", "log in with one of the studio's API keys (the page "
                                      "asks for it), or send it as `Authorization: Bearer TOKEN`.",
                                      {"WWW-Authenticate": "Bearer"})
        return None


class UploadLimit(BodyLimit):
    """`BodyLimit` in the studio's words: a body that large is a photo over --max-upload-mb (serve's refusal names its
    own flag and a render request)."""

    def __init__(self, app, limit: int, upload_limit: int):
        super().__init__(app, limit)
        self.upload_limit = upload_limit

    async def _refuse(self, scope, receive, send):
        await error_response(413, "body_too_large", f"the upload is over the studio's limit of "
                             f"{self.upload_limit / 2**20:g} MB (--max-upload-mb); it was not added. Photos for "
                             "DreamBooth need no more than a few megapixels: save it smaller (JPEG at quality 90-95) "
                             "and upload it again.")(scope, receive, send)


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=512)


# The bodies' numbers and switches are strict: `true` for a step count or "5" for a seed is refused, not read as 1
# or 5 (pydantic's lax mode would), as the config refuses them.
class NewProject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    identifier: str = Field(min_length=1, max_length=64)
    class_word: str = Field(min_length=1, max_length=64)
    model: str | None = Field(None, max_length=4096)


class Crop(BaseModel):
    model_config = ConfigDict(extra="forbid")

    box: tuple[StrictInt, StrictInt, StrictInt, StrictInt] = Field(
        description="left, top, right, bottom, in the photo's upright pixels")


class Caption(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=4000)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: dict[str, dict] = Field(description="config.yaml's sections and the keys to set in them")


class NewRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field("train", pattern="^(train|resume|extend)$")
    steps: StrictInt | None = Field(None, ge=1, le=10_000_000)


def create_studio(access: Access, *, max_upload_bytes: int, projects=None, models_dir=None, runs=None) -> FastAPI:
    """The studio's app: the page, the health check, logging in, and the routes of `projects` (a
    studio.projects.Projects), the models found under `models_dir`, and `runs` (a studio.runs.RunManager, watched
    while the app runs; its runs are processes of their own and outlive it)."""
    import contextlib

    from dreambooth.studio.shipping import Services

    services = Services()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if runs is not None:
            runs.watch()
        yield
        if runs is not None:
            runs.close()
        services.close()  # the services it started for trying characters end with it; runs do not

    app = FastAPI(title="dreambooth studio", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    add_refusals(app)
    app.add_middleware(Guard, access=access)
    # outermost: counted before anything reads it
    app.add_middleware(UploadLimit, limit=max_upload_bytes + FORM_ROOM, upload_limit=max_upload_bytes)
    page = resources.files("dreambooth.studio").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def studio_page():
        return page.replace("{{csrf}}", access.csrf).replace("{{login}}", "true" if access.keys else "false")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "auth": bool(access.keys)}

    @app.post("/api/login")
    def login(body: Login):
        key = find_key(access.keys, body.token) if access.keys else None
        if access.keys and key is None:
            return error_response(403, "forbidden", "that is not one of the studio's API keys.")
        response = JSONResponse({"name": key.name if key else "local"})
        if key is not None:
            response.set_cookie(SESSION_COOKIE, access.session_for(key), httponly=True, samesite="strict")
        return response

    @app.post("/api/logout")
    def logout():
        response = JSONResponse({"ok": True})
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict")
        return response

    @app.get("/api/whoami")
    def whoami(request: Request):
        key = access.caller(request.headers, request.cookies) if access.keys else None
        return {"name": key.name if key else "local", "role": key.role if key else "operator"}

    if projects is not None:
        add_project_routes(app, projects, models_dir)
    if projects is not None and runs is not None:
        add_run_routes(app, projects, runs)
        add_evaluate_routes(app, projects, runs)
    if projects is not None:
        add_try_routes(app, projects)
        add_ship_routes(app, projects, services)
    return app


def inside(path: str | None, folder: str | None):
    """`path` when it lies in `folder` (both resolved): what a run says it wrote, never anything else."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if not path or not folder:
        raise StarletteHTTPException(404, "Not Found")
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    if not resolved.is_relative_to(root) or not resolved.is_file():
        raise StarletteHTTPException(404, "Not Found")
    return resolved


def add_run_routes(app: FastAPI, projects, runs) -> None:
    """Runs: started from a project, queued one per device, stopped with a checkpoint, followed live (server-sent
    events of studio.runs.RunManager.follow), their newest sample and report."""
    import json

    from fastapi.responses import FileResponse, StreamingResponse

    @app.post("/api/projects/{name}/runs")
    def run_start(name: str, body: NewRun):
        project = projects.open(name)
        # evaluated against train's own pre-flight first: a run it would refuse is refused now, with its message
        return runs.start(project.path, body.kind, body.steps, check=project.check_run).to_dict()

    @app.get("/api/runs")
    def run_list():
        return {"runs": [run.to_dict() for run in runs.runs()]}

    @app.get("/api/runs/{run_id}")
    def run_show(run_id: str):
        return {"run": runs.get(run_id).to_dict(), "progress": runs.progress(run_id).to_dict()}

    @app.post("/api/runs/{run_id}/stop")
    def run_stop(run_id: str):
        return runs.stop(run_id).to_dict()

    @app.get("/api/runs/{run_id}/events")
    async def run_events(run_id: str):
        runs.get(run_id)  # an unknown run is refused before the stream starts

        async def stream():
            async for event in runs.follow(run_id):
                yield f"event: {event.get('kind', 'message')}\ndata: {json.dumps(event)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/api/runs/{run_id}/sample")
    def run_sample(run_id: str):
        run = runs.get(run_id)
        return FileResponse(inside(runs.progress(run_id).sample, run.output), headers={"Cache-Control": "no-store"})

    @app.get("/api/runs/{run_id}/report")
    def run_report(run_id: str):
        run = runs.get(run_id)
        return FileResponse(inside(str(Path(run.output or "") / "report.html"), run.output))

    @app.get("/api/runs/{run_id}/report/{file:path}")
    def run_report_file(run_id: str, file: str):
        """The report's images (report.html names them relative to itself: report/...)."""
        run = runs.get(run_id)
        folder = Path(run.output or "") / "report"
        return FileResponse(inside(str(folder / file), str(folder)))


def add_refusals(app: FastAPI) -> None:
    """A UserError of the library is the command line's message, verbatim, as a 422 (404 for a project, photo or run
    that is not there); a body that is not what a route takes names the field."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from dreambooth.errors import NotFound, UserError

    @app.exception_handler(UserError)
    async def refused(request: Request, e: UserError):
        return error_response(422, "refused", str(e))

    @app.exception_handler(NotFound)  # the more specific class's handler is the one Starlette calls
    async def not_found(request: Request, e: NotFound):
        return error_response(404, "not_found", str(e))

    @app.exception_handler(OSError)
    async def disk_error(request: Request, e: OSError):
        """The disk refused (a file where the studio keeps a folder, a full disk, permissions): said, not a bare 500."""
        where = f" ({e.filename})" if e.filename else ""
        return error_response(500, "disk", f"{request.method} {request.url.path} could not be done: "
                              f"{e.strerror or e}{where}. Fix that (move the file aside, free space, or give the "
                              "studio write access) and try again.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(e.status_code, codes.get(e.status_code, f"http_{e.status_code}"),
                              f"{e.detail}: {request.method} {request.url.path}.")

    def problem(err: dict) -> str:
        where = ".".join(str(p) for p in err["loc"][1:])
        if err["type"] == "json_invalid":  # its loc is the character where parsing stopped
            why = (err.get("ctx") or {}).get("error", err["msg"])
            return f"the body is not valid JSON ({why} at character {where})"
        if not where:
            return "the body must be a JSON object with this request's fields (Content-Type: application/json)"
        return f"{where}: {err['msg']}"

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return error_response(422, "invalid_request", "; ".join(problem(err) for err in e.errors()) + ".")


def add_project_routes(app: FastAPI, projects, models_dir) -> None:
    """Projects, their photos, captions, live pre-flight report and recipe: each a call of studio.projects."""
    from fastapi.responses import FileResponse

    from dreambooth.studio.projects import find_models, recipe_schema

    @app.get("/api/projects")
    def project_list():
        return {"projects": projects.list()}

    @app.post("/api/projects")
    def project_create(body: NewProject):
        project = projects.create(body.name, identifier=body.identifier, class_word=body.class_word,
                                  model=body.model)
        return project.summary()

    @app.get("/api/projects/{name}")
    def project_show(name: str):
        project = projects.open(name)
        return {**project.summary(), "config": project.config_values()}

    @app.get("/api/projects/{name}/photos")
    def photo_list(name: str):
        return {"photos": projects.open(name).photos()}

    @app.put("/api/projects/{name}/photos/{filename}")
    async def photo_add(name: str, filename: str, request: Request):
        """The photo is the request's raw body (bounded by the guard's body limit, and by the project's own)."""
        from starlette.concurrency import run_in_threadpool

        data = await request.body()
        project = projects.open(name)
        return await run_in_threadpool(project.add_photo, data, filename)

    @app.get("/api/projects/{name}/photos/{photo}")
    def photo_file(name: str, photo: str):
        return FileResponse(projects.open(name).photo(photo), headers={"Cache-Control": "no-store"})

    @app.delete("/api/projects/{name}/photos/{photo}")
    def photo_remove(name: str, photo: str):
        return {"moved_to": projects.open(name).remove_photo(photo)}

    @app.post("/api/projects/{name}/photos/{photo}/crop")
    def photo_crop(name: str, photo: str, body: Crop):
        return {"photo": projects.open(name).crop_photo(photo, body.box)}

    @app.get("/api/projects/{name}/photos/{photo}/caption")
    def caption_show(name: str, photo: str):
        return {"caption": projects.open(name).caption(photo)}

    @app.put("/api/projects/{name}/photos/{photo}/caption")
    def caption_set(name: str, photo: str, body: Caption):
        projects.open(name).set_caption(photo, body.text)
        return {"caption": body.text}

    @app.get("/api/projects/{name}/report")
    def report(name: str):
        return projects.open(name).report()

    @app.get("/api/recipe-schema")
    def schema():
        return recipe_schema()

    @app.put("/api/projects/{name}/config")
    def config_save(name: str, body: Recipe):
        return {"config": projects.open(name).save_config(body.values)}

    @app.get("/api/models")
    def models():
        return {"models": find_models(models_dir) if models_dir else []}


class TryBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=2000)
    seed: StrictInt = Field(0, ge=0, le=2**53)
    guidance: float | None = Field(None, ge=0, le=50, strict=True)
    steps: StrictInt | None = Field(None, ge=1, le=500)
    negative_prompt: str = Field("", max_length=2000)
    result: str = Field("final", max_length=64, description="final, or a checkpoint's folder name (checkpoint-N)")
    lora_scale: float = Field(1.0, ge=0, le=4, strict=True)


def add_try_routes(app: FastAPI, projects) -> None:
    """Try it: the trained result beside the base model on the same seed (studio.trying), and the images drawn."""
    from fastapi.responses import FileResponse
    from starlette.concurrency import run_in_threadpool

    from dreambooth.studio.trying import Trial, try_result

    @app.post("/api/projects/{name}/try")
    async def try_it(name: str, body: TryBody):
        project = projects.open(name)
        return await run_in_threadpool(try_result, project, Trial(**body.model_dump()))

    @app.get("/api/projects/{name}/tries/{try_id}/{side}/{file}")
    def tried_image(name: str, try_id: str, side: str, file: str):
        project = projects.open(name)
        folder = project.path / "tries"
        found = inside(str(folder / try_id / side / file), str(folder))
        return FileResponse(inside(str(found), str(project.path)))  # a tries/ that is a link out leads nowhere


class ExportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = Field(pattern="^(kohya|single-file|diffusers)$")
    result: str = Field("final", max_length=64)
    half: StrictBool = False
    merge: StrictBool = Field(False, description="a LoRA result baked into its base model")


class CharacterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    result: str = Field("final", max_length=64)


def add_ship_routes(app: FastAPI, projects, services) -> None:
    """Ship it: export (studio.shipping.export_result), the result as a character, and `serve` of the project's
    characters, started on a free loopback port for the page to open."""
    from starlette.concurrency import run_in_threadpool

    from dreambooth.studio.shipping import add_character, export_result

    @app.post("/api/projects/{name}/export")
    async def export(name: str, body: ExportBody):
        project = projects.open(name)
        return await run_in_threadpool(lambda: export_result(project, **body.model_dump()))

    @app.post("/api/projects/{name}/characters")
    def character(name: str, body: CharacterBody):
        return add_character(projects.open(name), body.name, body.result)

    @app.post("/api/projects/{name}/push")
    async def push(name: str):
        """To the hub, where a token is configured (output.hub_token, HF_TOKEN or `hf auth login`)."""
        from dreambooth.studio.shipping import push_result

        project = projects.open(name)
        return await run_in_threadpool(push_result, project)

    @app.post("/api/projects/{name}/serve")
    async def serve_start(name: str):
        project = projects.open(name)
        return {"url": await run_in_threadpool(services.start, project)}

    @app.get("/api/projects/{name}/serve")
    def serve_status(name: str):
        return {"url": services.url(projects.open(name))}

    @app.delete("/api/projects/{name}/serve")
    def serve_stop(name: str):
        return {"stopped": services.stop(projects.open(name))}


class EvaluateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] | None = Field(None, max_length=32, description="[default: the recipe's validation prompts]")
    num_images: StrictInt | None = Field(None, ge=1, le=64, description="per prompt and seed [default: evaluate's, 4]")
    steps: StrictInt | None = Field(None, ge=1, le=500, description="denoising steps [default: the family's]")
    seeds: list[StrictInt] | None = Field(None, max_length=16)


def add_evaluate_routes(app: FastAPI, projects, runs) -> None:
    """Evaluate every checkpoint: `evaluate --checkpoints all` queued as a run (RunManager.evaluate, followed with the
    run routes), and each finished evaluation's scores with the checkpoint the command named best
    (studio.evaluating)."""
    from starlette.concurrency import run_in_threadpool

    from dreambooth.studio.evaluating import evaluations

    @app.post("/api/projects/{name}/evaluate")
    async def evaluate_start(name: str, body: EvaluateBody):
        project = projects.open(name)
        run = await run_in_threadpool(lambda: runs.evaluate(project.path, **body.model_dump()))
        return run.to_dict()

    @app.get("/api/projects/{name}/evaluations")
    def evaluation_list(name: str):
        return {"evaluations": evaluations(projects.open(name).path)}
