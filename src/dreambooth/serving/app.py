"""HTTP on the service (FastAPI): the endpoints, API keys and rate limits, the body limit, errors as JSON, metrics.

Every refusal is JSON, `{"error": {"code": ..., "message": ...}}`, with the status that says what kind it is: 400 bad
JSON, 401 no key, 403 a wrong key or an operator-only field, 404 an unknown character or path, 413 a body over the
limit, 422 a field out of range or over a limit, 429 the rate or the queue (with Retry-After), 504 the deadline. Every
code is a row of docs/serving.md's error table, which tests/test_serve_errors.py provokes row by row.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import logging
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from dreambooth.characters.state import problem_text, state_schema
from dreambooth.serving.auth import LOCAL, Key, Refusal, find_key, host_name
from dreambooth.serving.service import ApiError, RenderBody, Rendered, Service

log = logging.getLogger("dreambooth.serve")
disable_created_metrics()  # the `_created` series double the page and say nothing a scraper needs
ENDPOINTS = ("/", "/healthz", "/metrics", "/v1/characters", "/v1/state-schema", "/v1/compile", "/v1/render",
             "/v1/chat-render", "/docs", "/openapi.json")
# /docs loads Swagger UI from here, not from FastAPI's default CDN, so that it works offline: the files are the copies
# the fastapi-offline package ships (fastapi_offline/static), served by name. FastAPI's /redoc is off: ReDoc's script
# fetches its maker's logo from their CDN whatever it is told.
DOCS_ASSETS = "/docs-assets"
DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers={**(headers or {}), "X-Error-Code": code})


class LocalOnly:
    """A keyless service on loopback answers only requests addressed to one of `hosts` (serving.auth.local_names):
    to a browser, a page whose site rebinds its own name to 127.0.0.1 is the service's own origin, and could draw on
    it and read what it answers (DNS rebinding); its requests carry the site's name in the Host header."""

    def __init__(self, app, hosts: tuple[str, ...]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if host_name(header) in self.hosts:
            return await self.app(scope, receive, send)
        await error_response(403, "host", f"this service has no API keys, so it answers only requests addressed to "
                             f"this machine ({', '.join(self.hosts)}); this one was addressed to "
                             f"'{host_name(header)}', as a page of another site reaching it through DNS rebinding "
                             "would be. Call it at the address it printed when it started, or start it with "
                             "--api-keys to reach it under another name.")(scope, receive, send)


class BodyLimit:
    """Refuses a body over `limit` bytes with 413: at once by its Content-Length, or, when it has none (chunked),
    as soon as more than the limit has arrived. The body (small, by the limit) is read here and handed on whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        # A length that is no number says nothing about the size: the body is counted as it arrives instead (uvicorn
        # refuses such a request before it gets here; this refused it as "over the limit").
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        await body_too_large(self.limit)(scope, receive, send)


def body_too_large(limit: int) -> JSONResponse:
    """The 413 of a body over `limit` bytes (this middleware's, and serve --ray's gateway's before it forwards)."""
    return error_response(413, "body_too_large", f"the request body is over this server's limit of {limit / 1024:g} "
                          f"KiB ({limit} bytes, --max-body-kb); a render request is a few hundred bytes.")


class Measured:
    """Counts every request by endpoint and outcome (the error code, or ok) and times it."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        outcome = {"code": "ok"}

        async def watched(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                status = message["status"]
                code = headers.get(b"x-error-code", b"").decode() or ("ok" if status < 400 else f"http_{status}")
                outcome["code"] = code
            await send(message)

        with self.service.metrics.latency.labels(endpoint).time():
            try:
                await self.app(scope, receive, watched)
            except Exception:  # answered as a 500 by the error middleware outside this one
                outcome["code"] = "internal"
                raise
            finally:
                self.service.metrics.requests.labels(endpoint, outcome["code"]).inc()


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    character: str = Field(max_length=64)
    message: str = Field(min_length=1, max_length=2000, description="What happens, in words; a language model "
                         "turns it into the character's state.")
    format: str = Field("json", pattern="^(png|json)$")


def make_caller(service: Service, keys: list[Key], auth: bool):
    """The dependency that names the caller of a /v1 request (its key, or LOCAL) and applies its rate limit."""
    limiter = service.limiter  # this process's, or one shared by replicas through Redis (serving.stores)

    def caller(request: Request) -> Key:
        if not auth:
            key = LOCAL
            name = request.client.host if request.client else "local"
        else:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ApiError(401, "unauthorized", "send an API key as `Authorization: Bearer TOKEN`.",
                               {"WWW-Authenticate": "Bearer"})
            key = find_key(keys, token.strip())
            if key is None:
                raise ApiError(403, "forbidden", "this API key is not one of the server's.")
            name = key.name
        refused = limiter.take(name)
        if refused:
            raise ApiError(429, "rate_limited", rate_message(refused, service.limits, "key" if auth else "address"),
                           {"Retry-After": str(refused.seconds)})
        return key

    return caller


def rate_message(refused: Refusal, limits, whose: str) -> str:
    """The limit a caller hit, with its value and the option that sets it."""
    burst, rate = limits.burst, f"{limits.rate_per_minute:g}"
    if refused.limit == "burst":
        said = (f"more than {burst} request(s) in a row for this {whose}, this server's burst (--burst {burst}); "
                f"after a burst it takes {rate} a minute (--rate-per-minute)")
    else:
        said = (f"more than {rate} requests a minute for this {whose}, kept up past a burst of {burst}: this "
                f"server's rate (--rate-per-minute {rate})")
    return f"{said}. Retry in {refused.seconds} s."


def add_error_handlers(app: FastAPI, caller) -> None:
    """Every refusal as `{"error": {"code", "message"}}`; a 500 names no server path (the log has the details)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e.status, e.code, e.message, e.headers)

    def key_refused(request: Request) -> JSONResponse | None:
        """The body is read before the key is checked: a /v1 caller without a key hears that first."""
        if request.url.path.startswith("/v1/"):
            try:
                caller(request)
            except ApiError as refused:
                return error_response(refused.status, refused.code, refused.message, refused.headers)
        return None

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 400:  # FastAPI's answer when json.loads fails other than on syntax, e.g. a RecursionError
            why = "it is nested too deeply" if isinstance(e.__cause__, RecursionError) else "it could not be parsed"
            return key_refused(request) or error_response(400, "bad_json", f"the body is not valid JSON ({why}); "
                                                          "send one JSON object, as GET /docs describes.")
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(e.status_code, codes.get(e.status_code, f"http_{e.status_code}"),
                              f"{e.detail}: {request.method} {request.url.path} (GET /docs lists the API).",
                              getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        refused = key_refused(request)
        if refused is not None:
            return refused
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return error_response(400, "bad_json", "the body is not valid JSON: "
                                  f"{errors[0].get('ctx', {}).get('error', errors[0].get('msg'))}.")
        if any(tuple(err["loc"]) == ("body",) for err in errors):
            return error_response(400, "bad_json", "the body must be a JSON object, sent with `Content-Type: "
                                  "application/json`.")
        problems = [f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {problem_text(err)}" for err in errors]
        return error_response(422, "invalid_request", "; ".join(problems) + ". GET /v1/state-schema describes a "
                              "state; /docs every field.")

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        log.exception("request failed")  # the details (paths, exceptions) stay in the server's log
        return error_response(500, "internal", "the server failed to answer; its log says why. Retry later.")


@functools.cache
def docs_file(name: str) -> bytes:
    return resources.files("fastapi_offline").joinpath("static", name).read_bytes()


def add_docs(app: FastAPI) -> None:
    """/docs: FastAPI's own Swagger UI page, pointed at the local copies of its script, style and icon."""

    def local(request: Request, path: str) -> str:
        return f"{request.scope.get('root_path', '')}{path}"  # behind a proxy's prefix, as FastAPI's own pages do

    @app.get("/docs", include_in_schema=False)
    def swagger_page(request: Request):
        return get_swagger_ui_html(
            openapi_url=local(request, app.openapi_url), title=f"{app.title} - Swagger UI",
            swagger_js_url=local(request, f"{DOCS_ASSETS}/swagger-ui-bundle.js"),
            swagger_css_url=local(request, f"{DOCS_ASSETS}/swagger-ui.css"),
            swagger_favicon_url=local(request, f"{DOCS_ASSETS}/favicon.png"), oauth2_redirect_url=None,
            swagger_ui_parameters={"validatorUrl": None})  # no spec sent to swagger.io's validator

    @app.get(DOCS_ASSETS + "/{name}", include_in_schema=False)
    def docs_asset(name: str):
        if name not in DOCS_FILES:  # names from a fixed list: nothing a request says reaches the file system
            raise StarletteHTTPException(404, "Not Found")
        return Response(docs_file(name), media_type=DOCS_FILES[name], headers={"Cache-Control": "max-age=86400"})


def create_app(service: Service, keys: list[Key], *, auth: bool = True, chat=None,
               hosts: tuple[str, ...] = ()) -> FastAPI:
    """The app. `auth=False` (loopback only, no keys configured) lets every caller in as an operator; `chat`: a
    serving.chat.ChatStates for /v1/chat-render, or None (off); `hosts`: the only names requests may be addressed to
    (`LocalOnly`; empty: any)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        await service.batcher.stop()
        if chat is not None:
            await chat.aclose()

    app = FastAPI(title="dreambooth serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Characters drawn on demand: a state (GET /v1/state-schema) becomes a prompt around the "
                  "character's identifier, and the character's model draws it.")
    add_docs(app)
    app.add_middleware(BodyLimit, limit=service.limits.max_body_bytes)
    if hosts:
        app.add_middleware(LocalOnly, hosts=hosts)
    app.add_middleware(Measured, service=service)  # outermost: 413s are counted too
    caller = make_caller(service, keys, auth)
    add_error_handlers(app, caller)
    page_html = resources.files("dreambooth.serving").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return page_html

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "characters": sorted(service.characters), "queue": service.batcher.depth,
                "auth": auth, "chat": chat is not None}

    @app.get("/metrics")
    def metrics(request: Request):
        if auth:
            caller(request)
        return Response(service.metrics_page(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/characters")
    def characters(key: Key = Depends(caller)):
        return {"characters": [describe(c) for c in service.characters.values()]}

    @app.get("/v1/state-schema")
    def schema(key: Key = Depends(caller)):
        return state_schema()

    @app.post("/v1/compile")
    def compile_request(body: RenderBody, key: Key = Depends(caller)):
        request = service.compile(body, key.operator)
        return {"request": dataclasses.asdict(request)}

    @app.post("/v1/render", responses={200: {"content": {"image/png": {}}}})
    async def render(body: RenderBody, request: Request, key: Key = Depends(caller)):
        rendered = await service.render(body, key.operator, request.is_disconnected)
        return answer(rendered, body.format)

    @app.post("/v1/chat-render")
    async def chat_render(body: ChatBody, request: Request, key: Key = Depends(caller)):
        if chat is None:
            raise ApiError(501, "chat_off", "chat-render is off on this server: start `dreambooth serve` with "
                           "--llm-base-url (an OpenAI-compatible endpoint) to turn it on.")
        service.character(body.character)
        state = await chat.state_for(service.characters[body.character], body.message)
        render_body = RenderBody(character=body.character, state=state, format=body.format)
        rendered = await service.render(render_body, False, request.is_disconnected)
        return answer(rendered, body.format, {"state": state.model_dump(mode="json", exclude_defaults=True)})

    return app


def describe(character) -> dict:
    """What a client needs to know of a character; no server paths."""
    return {"name": character.name, "identifier": character.identifier, "class_word": character.class_word,
            "kind": "lora" if character.loras else "full", "appearance": character.appearance,
            "style": character.style, "width": character.width, "height": character.height, "steps": character.steps,
            "guidance": character.guidance, "scheduler": character.scheduler, "seed_policy": character.seed_policy}


def answer(rendered: Rendered, format: str, extra: dict | None = None) -> Response:
    seed, png, cached = rendered.images[0]
    if format == "png":
        return Response(png, media_type="image/png",
                        headers={"X-Seed": str(seed), "X-Cache": "hit" if cached else "miss"})
    return JSONResponse({**(extra or {}), "request": dataclasses.asdict(rendered.request), "images": [
        {"seed": s, "cached": c, "png_base64": base64.b64encode(p).decode()} for s, p, c in rendered.images]})
