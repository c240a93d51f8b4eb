"""The OpenAI-compatible HTTP app: :func:`create_app` ``(engine, settings)`` -> a FastAPI app.

Endpoints: ``GET /health`` (no key needed), ``GET /v1/models``, ``POST /v1/chat/completions``
(JSON or server-sent events), ``POST /v1/embeddings``. A pure ASGI guard in front of FastAPI
checks the API key (``hmac.compare_digest``) and the body size (413 from ``Content-Length`` or,
without one, once the streamed body passes the limit) before a route reads anything. Every error
is OpenAI's body (:mod:`autoglm_phone.serve.errors`); unexpected exceptions are logged here and
answered with a bare 500.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import autoglm_phone.serve.protocol as P
from autoglm_phone.data.instructions import format_conversation
from autoglm_phone.serve.engine import Engine, Job, Prompt, Sampling
from autoglm_phone.serve.errors import APIError, internal, invalid, timed_out
from autoglm_phone.serve.media import MediaLimits, load_audio, load_image
from autoglm_phone.serve.text import TextStream

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    model_name: str = "autoglm-phone"
    api_key: str | None = None  # None: no key asked for
    max_body_bytes: int = 32 * 2**20
    limits: MediaLimits = field(default_factory=MediaLimits)
    request_timeout_s: float = 300.0
    default_max_tokens: int = 64  # when a request sets neither max_tokens nor max_completion_tokens
    default_temperature: float = 0.0  # when a request sets none: greedy
    max_embedding_inputs: int = 256


# -- the guard: API key and body size, before FastAPI ------------------------------------------
def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class Guard:
    """ASGI middleware: the API key on every path but ``/health``, and the body-size limit."""

    def __init__(self, app: Any, settings: ServeSettings) -> None:
        self.app, self.settings = app, settings
        self.key = settings.api_key.encode() if settings.api_key else None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.key is None:
            return True
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["path"] != "/health" and not self._authorized(headers):
            err = APIError(401, "invalid or missing API key", code="invalid_api_key")
            return await _error_response(err)(scope, receive, send)
        limit = self.settings.max_body_bytes
        too_big = APIError(
            413, f"the request body is over the {limit:,}-byte limit", code="payload_too_large"
        )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _error_response(too_big)(scope, receive, send)
        # read the whole body here (counting, with or without Content-Length), then replay it
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _error_response(too_big)(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, when it comes

        await self.app(scope, replay, send)


# -- requests to prompts -------------------------------------------------------------------------
async def build_prompt(
    req: P.ChatCompletionRequest, engine: Engine, settings: ServeSettings
) -> tuple[Prompt, bool]:
    """The tokenized GLM-4 chat prompt with its decoded media, and whether thinking is on."""
    backend, limits = engine.backend, settings.limits
    kwargs = req.chat_template_kwargs or {}
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise invalid(f"unsupported chat_template_kwargs {unknown}", "chat_template_kwargs")
    thinking = kwargs.get("enable_thinking", False)
    if not isinstance(thinking, bool):
        raise invalid("enable_thinking must be true or false", "chat_template_kwargs")
    turns, media = [], []
    for i, msg in enumerate(req.messages):
        role = "system" if msg.role == "developer" else msg.role
        parts = msg.content
        if not isinstance(parts, list):
            parts = [P.TextPart(type="text", text=parts or "")]
        texts, kinds = [], []
        for j, part in enumerate(parts):
            param = f"messages[{i}].content[{j}]"
            if isinstance(part, P.TextPart):
                texts.append(part.text)
                continue
            if role != "user":
                raise invalid(f"media are only accepted in user messages, not {role}", param)
            if len(media) >= limits.max_media:
                raise invalid(
                    f"more than {limits.max_media} images and audio clips in one request",
                    param,
                    "too_many_media",
                )
            if isinstance(part, P.ImagePart):
                x = await asyncio.to_thread(
                    load_image, part.image_url.url, backend.spec, limits, f"{param}.image_url"
                )
                media.append(("image", x))
                kinds.append("image")
            else:
                audio = part.input_audio
                x = await asyncio.to_thread(
                    load_audio, audio.data, audio.format, backend.spec, limits,
                    f"{param}.input_audio",
                )  # fmt: skip
                media.append(("audio", x))
                kinds.append("audio")
        turns.append((role, "".join(texts), kinds))
    text = format_conversation(turns, thinking=thinking)
    ids = backend.tokenizer(text)["input_ids"]
    # blocks go in the model's table order (images, then audio), each in request order
    media.sort(key=lambda m: m[0] != "image")
    return Prompt(ids, media), thinking


def _check_model(name: str, settings: ServeSettings) -> None:
    if name != settings.model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {settings.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _check_fields(req: Any) -> None:
    bad = P.unsupported_fields(req)
    if bad:
        raise invalid(f"unsupported parameters: {', '.join(bad)}", bad[0], "unsupported_parameter")


async def make_job(
    req: P.ChatCompletionRequest, engine: Engine, settings: ServeSettings
) -> tuple[Job, bool]:
    _check_model(req.model, settings)
    _check_fields(req)
    prompt, thinking = await build_prompt(req, engine, settings)
    backend = engine.backend
    n_prompt, window = backend.prompt_length(prompt), backend.context_window
    if n_prompt >= window:
        raise invalid(
            f"the prompt is {n_prompt} tokens; the context window is {window}",
            "messages",
            "context_length_exceeded",
        )
    if n_prompt > backend.max_prompt_length:
        raise invalid(
            f"the prompt is {n_prompt} tokens; this model takes prompts of at most "
            f"{backend.max_prompt_length}",
            "messages",
            "context_length_exceeded",
        )
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and n_prompt + asked > window:
        raise invalid(
            f"the prompt ({n_prompt} tokens) + max_tokens ({asked}) exceed the context window "
            f"({window})",
            "max_completion_tokens" if req.max_completion_tokens else "max_tokens",
            "context_length_exceeded",
        )
    max_tokens = asked or min(settings.default_max_tokens, window - n_prompt)
    temperature = settings.default_temperature if req.temperature is None else req.temperature
    sampling = Sampling(temperature, 1.0 if req.top_p is None else req.top_p, req.seed)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    text = TextStream(backend.tokenizer, stop, thinking)
    job = Job(prompt, n_prompt, max_tokens, sampling, text, settings.request_timeout_s)
    engine.submit(job)
    return job, thinking


async def _next_event(job: Job) -> tuple:
    """The job's next event, or a timeout error once its deadline has passed."""
    left = job.deadline - time.monotonic() + 1.0  # the worker reports its own timeouts first
    try:
        return await asyncio.wait_for(job.events.get(), timeout=max(left, 0.0))
    except asyncio.TimeoutError:
        job.cancel()
        return ("error", timed_out(job.timeout_s))


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def complete(job: Job, request: Request) -> tuple[str, str, str]:
    """Reasoning, content and finish reason of a non-streamed request; the job is cancelled if
    the client disconnects first."""
    reasoning, content = [], []

    async def collect() -> str:
        while True:
            event = await _next_event(job)
            if event[0] == "delta":
                reasoning.append(event[1])
                content.append(event[2])
            elif event[0] == "done":
                return event[1]
            else:
                raise event[1]

    task = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            job.cancel()
    if not task.done() or task.cancelled():
        raise asyncio.CancelledError
    return "".join(reasoning), "".join(content), task.result()


def _sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def stream_chunks(
    job: Job, req: P.ChatCompletionRequest, settings: ServeSettings
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content (and reasoning) deltas, one chunk with the
    finish reason, a usage chunk if asked for, ``[DONE]``. A failure after the first byte is an
    error event, then ``[DONE]``; a client that goes away cancels the job."""
    head = {"id": P.completion_id(), "created": P.now(), "model": settings.model_name}

    def chunk(delta: P.Delta, finish: str | None = None) -> str:
        choice = P.ChunkChoice(delta=delta, finish_reason=finish)
        return _sse(P.ChatCompletionChunk(**head, choices=[choice]).model_dump(exclude_none=True))

    try:
        yield chunk(P.Delta(role="assistant", content=""))
        while True:
            event = await _next_event(job)
            if event[0] == "delta":
                yield chunk(P.Delta(reasoning_content=event[1] or None, content=event[2] or None))
            elif event[0] == "done":
                yield chunk(P.Delta(), event[1])
                break
            else:
                yield _sse(event[1].body())
                break
        if req.stream_options is not None and req.stream_options.include_usage:
            usage = _usage(job)
            yield _sse(P.ChatCompletionChunk(**head, choices=[], usage=usage).model_dump())
        yield _sse("[DONE]")
    finally:
        if job.finish_reason is None:
            job.cancel()


def _usage(job: Job) -> P.Usage:
    n, m = job.prompt_tokens, job.completion_tokens
    return P.Usage(prompt_tokens=n, completion_tokens=m, total_tokens=n + m)


# -- embeddings ----------------------------------------------------------------------------------
async def embed(
    req: P.EmbeddingRequest, engine: Engine, settings: ServeSettings
) -> P.EmbeddingList:
    _check_model(req.model, settings)
    _check_fields(req)
    backend = engine.backend
    if req.dimensions is not None and req.dimensions != backend.embed_dim:
        raise invalid(f"dimensions must be {backend.embed_dim} (the model's)", "dimensions")
    items = req.input if isinstance(req.input, list) else [req.input]
    if not items:
        raise invalid("input is empty", "input")
    if len(items) > settings.max_embedding_inputs:
        raise invalid(f"more than {settings.max_embedding_inputs} inputs", "input")
    texts: dict[int, str] = {}
    media: dict[str, dict[int, Any]] = {"image": {}, "audio": {}}
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise invalid("empty string", param)
            texts[i] = item
        elif isinstance(item, P.ImagePart):
            url = item.image_url.url
            spec, limits = backend.spec, settings.limits
            media["image"][i] = await asyncio.to_thread(load_image, url, spec, limits, param)
        else:
            a = item.input_audio
            media["audio"][i] = await asyncio.to_thread(
                load_audio, a.data, a.format, backend.spec, settings.limits, param
            )
    vectors: dict[int, np.ndarray] = {}
    tokens = 0
    if texts:
        z, tokens = await engine.call(backend.embed_text, list(texts.values()))
        vectors.update(zip(texts, z.float().cpu().numpy(), strict=True))
    for modality, found in media.items():
        if found:
            z = await engine.call(backend.embed_media, modality, list(found.values()))
            vectors.update(zip(found, z.float().cpu().numpy(), strict=True))
    data = []
    for i in range(len(items)):
        v = vectors[i].astype(np.float32)
        out = (
            base64.b64encode(v.tobytes()).decode()
            if req.encoding_format == "base64"
            else v.tolist()
        )
        data.append(P.Embedding(index=i, embedding=out))
    usage = P.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return P.EmbeddingList(data=data, model=settings.model_name, usage=usage)


# -- the app -------------------------------------------------------------------------------------
def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return invalid("the request body is not valid JSON", None, "invalid_json")
    msg = first.get("msg", "invalid request")
    return invalid(f"{param}: {msg}" if param else msg, param, "invalid_request")


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving ``engine``'s model (the engine's worker starts with the app)."""
    settings = settings or ServeSettings()
    created = P.now()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield

    app = FastAPI(
        title="autoglm-phone", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.engine, app.state.settings = engine, settings

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=kind))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _error_response(internal())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=settings.model_name, created=created)])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: P.ChatCompletionRequest, request: Request) -> Any:
        job, _ = await make_job(req, engine, settings)
        if req.stream:
            return StreamingResponse(
                stream_chunks(job, req, settings),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        reasoning, content, finish = await complete(job, request)
        message = P.AssistantMessage(content=content, reasoning_content=reasoning or None)
        return P.ChatCompletion(
            id=P.completion_id(),
            created=P.now(),
            model=settings.model_name,
            choices=[P.Choice(message=message, finish_reason=finish)],
            usage=_usage(job),
        ).model_dump(exclude_none=True)

    @app.post("/v1/embeddings")
    async def embeddings(req: P.EmbeddingRequest) -> P.EmbeddingList:
        return await embed(req, engine, settings)

    app.add_middleware(Guard, settings=settings)
    return app
