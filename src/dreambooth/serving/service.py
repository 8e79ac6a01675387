"""The service's logic, without HTTP: characters, compile, limits, the cache, the queue. `serving.app` puts HTTP on it.

A render goes: the character's state compiled (or an operator's raw prompt), the request's overrides applied and
checked against the limits, one request per image (the seeds as `dreambooth generate` gives them), the cache asked
for each, the missing ones queued as one group, and the answer awaited until its deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from dreambooth.characters.character import MAX_GUIDANCE, MAX_SEED, Character, merged_vocabulary
from dreambooth.characters.compiler import RenderRequest, compile_prompt
from dreambooth.characters.state import CharacterState
from dreambooth.errors import UserError
from dreambooth.generate import image_seed
from dreambooth.serving.auth import Limiter, RateLimiter
from dreambooth.serving.batcher import Batcher, DeadlineExceeded, QueueFull
from dreambooth.serving.cache import ImageCache, ImageStore, cache_key
from dreambooth.serving.metrics import Metrics


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much the service takes on."""

    max_body_bytes: int = 64 * 1024
    max_steps: int = 50
    max_pixels: int = 1024 * 1024  # SDXL's native size; SD 1.x draws 512x512, SD 2.x 768x768
    max_images: int = 4
    rate_per_minute: float = 120.0
    burst: int = 20
    max_queue: int = 64
    max_batch: int = 4
    batch_window_ms: float = 25.0
    deadline_s: float = 300.0


class ApiError(Exception):
    """An answer other than success: HTTP status, a stable code, a message a person can act on."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class RenderBody(BaseModel):
    """A picture of a character: its state (or, for operators, a raw prompt), and what to change of its defaults."""

    # Python's json reads NaN and Infinity, and a NaN passes no range check: refused as not finite, by name.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    character: str = Field(max_length=64, description="The character's name (GET /v1/characters).")
    state: CharacterState | None = Field(None, description="The character's state; empty if neither it nor "
                                         "`prompt` is given.")
    prompt: str | None = Field(None, max_length=2000, description="A raw prompt instead of a state (operator keys "
                               "only); used as written.")
    negative_prompt: str | None = Field(None, max_length=2000, description="Replaces the character's (operators).")
    n: int = Field(1, ge=1, description="Images to draw (more than 1 needs format json).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Replaces the seed policy's seed.")
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    format: Literal["png", "json"] = Field("png", description="png: the image; json: images (base64), the compiled "
                                           "request and the seeds.")
    deadline_s: float | None = Field(None, gt=0, description="Give up after this many seconds (at most the "
                                     "server's --deadline-s).")


@dataclass(frozen=True)
class TextRules:
    """What a character's model reads of a prompt and how it draws (characters.compiler.family_budget): the whole
    prompt within `limit` tokens of `encoder` as `count` counts them; where another encoder reads less of it (Flux
    and SD3: CLIP reads the first 77 tokens, T5 the whole prompt), the identity within `identity_limit` as
    `count_identity` counts them; whether its pipeline takes a negative prompt; the multiple its sides must be."""

    count: Callable[[str], int]
    limit: int
    encoder: str = "CLIP"
    count_identity: Callable[[str], int] | None = None
    identity_limit: int | None = None
    family: str = "its model"  # the family's title, for messages
    negative_prompt: bool = True
    side_multiple: int = 8


class Renderer(Protocol):
    calls: int

    def count_tokens(self, name: str): ...
    def max_tokens(self, name: str) -> int: ...
    # optional: text_rules(name) -> TextRules, where a model reads more than a CLIP prompt (Service.rules)
    def model_hash(self, name: str) -> str: ...
    def model_family(self, name: str) -> tuple[str, int]: ...
    def unusable(self, name: str) -> list[str]: ...
    def render(self, requests: list[RenderRequest]) -> list[bytes]: ...


@dataclass
class Rendered:
    request: RenderRequest  # as compiled, before per-image seeds
    images: list[tuple[int, bytes, bool]]  # (seed, png, from the cache)


def image_seeds(seed: int, n: int) -> list[int]:
    """The seeds of a request's n images: the seed, then seeds hashed from it as `dreambooth generate` derives them,
    cut to 53 bits so that JSON carries them exactly and a request's `seed` (or `generate --seed`) draws each
    image again."""
    return [seed if i == 0 else image_seed(seed, i) >> 10 for i in range(n)]


def batch_key(request: RenderRequest) -> tuple:
    """What one pipeline call shares."""
    return (request.character, request.width, request.height, request.steps, request.guidance, request.scheduler)


class Service:
    def __init__(self, characters: dict[str, Character], renderer: Renderer, *, limits: Limits = Limits(),
                 cache: ImageStore | None = None, limiter: Limiter | None = None):
        self.characters, self.renderer, self.limits = characters, renderer, limits
        # Each character's vocabulary (the shipped one with its own merged over it), merged once, not per request.
        self.vocabularies = {name: merged_vocabulary(c) for name, c in characters.items()}
        self.cache = cache or ImageCache(None, 0)
        # the callers' rate limits: this process's own unless given (one kept in Redis, shared by replicas)
        self.limiter = limiter or RateLimiter(limits.rate_per_minute, limits.burst)
        self.metrics = Metrics(limits.max_batch)
        self.batcher = Batcher(self._draw, max_queue=limits.max_queue, max_batch=limits.max_batch,
                               window_s=limits.batch_window_ms / 1000.0, on_batch=self.metrics.record_batch)

    # ------------------------------------------------------------------------------------------- compiling
    def character(self, name: str) -> Character:
        if name not in self.characters:
            raise ApiError(404, "unknown_character", f"no character named {name!r}; GET /v1/characters lists them "
                           f"({', '.join(sorted(self.characters))}).")
        return self.characters[name]

    def rules(self, name: str) -> TextRules:
        """The renderer's TextRules of the character's model; a renderer with count_tokens and max_tokens alone (the
        tests' stand-in) reads prompts as CLIP does, with negative prompts."""
        text_rules = getattr(self.renderer, "text_rules", None)
        if text_rules is not None:
            return text_rules(name)
        return TextRules(count=self.renderer.count_tokens(name), limit=self.renderer.max_tokens(name))

    def compile(self, body: RenderBody, operator: bool) -> RenderRequest:
        """The render request of a body, checked against the limits; refusals name the field."""
        character = self.character(body.character)
        if (body.prompt is not None or body.negative_prompt is not None) and not operator:
            raise ApiError(403, "operator_only", "`prompt` and `negative_prompt` are for operator keys; send a "
                           "`state` instead (GET /v1/state-schema).")
        if body.prompt is not None and body.state is not None:
            raise ApiError(422, "invalid_request", "give either `state` or `prompt`, not both.")
        rules = self.rules(character.name)
        count, most = rules.count, rules.limit
        try:
            request = compile_prompt(character, body.state or CharacterState(), count_tokens=count, max_tokens=most,
                                     vocabulary=self.vocabularies[character.name],
                                     identity_tokens=rules.count_identity, max_identity_tokens=rules.identity_limit)
        except UserError as e:
            raise ApiError(422, "invalid_character", str(e)) from None
        reads = f"its {rules.encoder} text encoder reads {most}"
        if body.prompt is not None:
            tokens = count(body.prompt)
            if tokens > most:
                raise ApiError(422, "prompt_too_long", f"`prompt` is {tokens} tokens; {reads} (start and end "
                               "included). Shorten it: it is not cut silently.")
            request = dataclasses.replace(request, prompt=body.prompt, tokens=tokens, dropped=[],
                                          fragments=[{"slot": "prompt", "text": body.prompt, "weight": 1.0}])
        if body.negative_prompt and not rules.negative_prompt:
            raise ApiError(422, "invalid_request", f"`negative_prompt`: {rules.family} draws without a negative "
                           "prompt (its pipeline would ignore it, not use it). Leave it out; say what the picture "
                           "should show in `prompt` instead.")
        if body.negative_prompt is not None and count(body.negative_prompt) > most:
            raise ApiError(422, "prompt_too_long", f"`negative_prompt` is {count(body.negative_prompt)} tokens; "
                           f"{reads}. Shorten it: it is not cut silently.")
        changes = {k: getattr(body, k) for k in ("negative_prompt", "seed", "steps", "guidance", "width", "height")
                   if getattr(body, k) is not None}
        request = dataclasses.replace(request, **changes)
        self._check_limits(request, body, rules.side_multiple)
        return request

    def _check_limits(self, request: RenderRequest, body: RenderBody, side_multiple: int = 8) -> None:
        """Each limit the request passes, named with this server's value and the option that sets it."""
        limits, problems = self.limits, []
        if request.steps > limits.max_steps:
            problems.append(f"steps {request.steps} is more than this server's {limits.max_steps} (--max-steps)")
        if request.width * request.height > limits.max_pixels:
            problems.append(f"{request.width}x{request.height} is {request.width * request.height} pixels, more "
                            f"than this server's {limits.max_pixels} (--max-pixels)")
        for side in ("width", "height"):
            if getattr(request, side) % side_multiple:
                problems.append(f"{side} {getattr(request, side)} is not a multiple of {side_multiple}")
        if body.n > limits.max_images:
            problems.append(f"n {body.n} is more images than this server's {limits.max_images} a request "
                            "(--max-images)")
        if body.n > limits.max_queue:
            problems.append(f"n {body.n} is more images than this server's queue holds ({limits.max_queue}, "
                            "--max-queue)")
        if body.n > 1 and body.format == "png":
            problems.append("n > 1 needs \"format\": \"json\" (one PNG holds one image)")
        if body.deadline_s is not None and body.deadline_s > limits.deadline_s:
            problems.append(f"deadline_s {body.deadline_s:g} is longer than this server's {limits.deadline_s:g} s "
                            "(--deadline-s)")
        if problems:
            raise ApiError(422, "over_limit", "; ".join(problems) + ".")

    def never_drawn(self) -> list[str]:
        """Each character whose own settings this server's limits refuse, with what to raise or change: its size
        and steps (which every request that does not override them asks for), its prompt and negative prompt (which
        no request can shorten), one image, and what the renderer found it cannot draw with (its sampler). Checked
        at start-up, so that a server does not come up refusing every render of a character."""
        limits, found = self.limits, []
        for name, character in self.characters.items():
            problems = list(self.renderer.unusable(name))
            rules = self.rules(name)
            pixels = character.width * character.height
            if pixels > limits.max_pixels:
                family, side = self.renderer.model_family(name)
                problems.append(f"its {character.width}x{character.height} is {pixels} pixels, more than --max-pixels "
                                f"{limits.max_pixels} (its model is {family}, made for {side}x{side}): raise "
                                f"--max-pixels to at least {pixels}, or lower its width and height")
            if character.steps > limits.max_steps:
                problems.append(f"its steps {character.steps} are more than --max-steps {limits.max_steps}: raise "
                                f"--max-steps to at least {character.steps}, or lower its steps")
            problems += self._text_problems(character, rules)
            for option, value in (("--max-images", limits.max_images), ("--max-queue", limits.max_queue)):
                if value < 1:
                    problems.append(f"{option} {value} admits no image: raise {option} to at least 1")
            if problems:
                found.append(f"{name}: " + "; ".join(problems))
        return found

    @staticmethod
    def _text_problems(character: Character, rules: TextRules) -> list[str]:
        """What of the character's own text its model cannot read as written: its identity over the tokens of any of
        its text encoders, a negative prompt its pipeline does not take, or one over its tokens; its sides not a
        multiple of its family's (Flux and SD3: 16)."""
        count, most, problems = rules.count, rules.limit, []
        identity = character.prompt_template.format(identifier=character.identifier, class_word=character.class_word)
        texts = [("prompt_template", identity, count, most, rules.encoder)]
        if rules.count_identity is not None:  # the CLIP that reads the prompt's first tokens only
            texts.append(("prompt_template", identity, rules.count_identity, rules.identity_limit, "CLIP"))
        if character.negative_prompt and not rules.negative_prompt:
            problems.append(f"its negative_prompt: {rules.family} draws without a negative prompt (its pipeline "
                            "would ignore it, not use it): remove negative_prompt, and put what the pictures should "
                            "show in its prompt_template, appearance or style")
        else:
            texts.append(("negative_prompt", character.negative_prompt or "", count, most, rules.encoder))
        for key, text, counter, limit, encoder in texts:
            if counter(text) > limit:  # no option raises a text encoder's length
                problems.append(f"its {key} makes {counter(text)} tokens, more than its text encoder's {limit} "
                                f"({encoder}): shorten {key}")
        step = rules.side_multiple
        for side in ("width", "height"):
            value = getattr(character, side)
            if value is not None and value % step:
                problems.append(f"its {side} {value} is not a multiple of {step} ({rules.family} draws in steps of "
                                f"{step} pixels): set its {side} to {max(step, value // step * step)} or "
                                f"{value // step * step + step}")
        return problems

    # ------------------------------------------------------------------------------------------- drawing
    def metrics_page(self) -> bytes:
        """/metrics' text, the gauges read now."""
        return self.metrics.render(self.batcher.depth, getattr(self.renderer, "loras_loaded", None))

    def _draw(self, items: list[tuple[RenderRequest, str]]) -> list[bytes]:
        """On the worker thread: one pipeline call, and the images into the cache (a client that left or timed
        out still leaves its picture for the retry)."""
        switches = getattr(self.renderer, "lora_switches", 0)
        pngs = self.renderer.render([request for request, _ in items])
        self.metrics.lora_switches.inc(getattr(self.renderer, "lora_switches", 0) - switches)
        for (_, key), png in zip(items, pngs):
            self.cache.put(key, png)
        return pngs

    async def render(self, body: RenderBody, operator: bool, disconnected=None) -> Rendered:
        """Every image of the body, from the cache or drawn; `disconnected()` is polled while waiting."""
        request = self.compile(body, operator)
        model = self.renderer.model_hash(request.character)
        per_image = [dataclasses.replace(request, seed=seed) for seed in image_seeds(request.seed, body.n)]
        keys = [cache_key(dataclasses.asdict(r), model) for r in per_image]
        found = [self.cache.get(key) for key in keys]
        self.metrics.cache.labels("hit").inc(sum(f is not None for f in found))
        self.metrics.cache.labels("miss").inc(sum(f is None for f in found))
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            seconds = body.deadline_s or self.limits.deadline_s  # at most the server's: _check_limits
            deadline = time.monotonic() + seconds
            try:
                jobs = self.batcher.submit(batch_key(request), [(per_image[i], keys[i]) for i in missing], deadline)
            except QueueFull as e:
                raise ApiError(429, "queue_full", f"{e}. The server draws {self.limits.max_batch} image(s) at a "
                               f"time (--max-batch) and queues at most {self.limits.max_queue} (--max-queue).",
                               {"Retry-After": str(e.retry_after)}) from None
            pngs = await self._wait(jobs, deadline, seconds, disconnected)
            for i, png in zip(missing, pngs):
                found[i] = png
        images = [(r.seed, png, i not in missing) for i, (r, png) in enumerate(zip(per_image, found))]
        return Rendered(request, images)

    async def _wait(self, jobs, deadline: float, seconds: float, disconnected) -> list[bytes]:
        futures = [job.future for job in jobs]
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded()
                done, pending = await asyncio.wait(futures, timeout=min(0.2, left))
                failed = next((f for f in done if not f.cancelled() and f.exception() is not None), None)
                if failed is not None:
                    raise failed.exception()
                if not pending:
                    return [f.result() for f in futures]
                if disconnected is not None and await disconnected():
                    raise ApiError(499, "client_closed", "the client closed the connection.")
        except DeadlineExceeded:
            raise ApiError(504, "deadline", f"not drawn within {seconds:g} s (the queue was long or the model slow); "
                           "retry later, or with a longer deadline_s up to the server's "
                           f"{self.limits.deadline_s:g} (--deadline-s).") from None
        finally:
            self.batcher.cancel(jobs)  # whatever is still queued goes; a batch drawing finishes into the cache
