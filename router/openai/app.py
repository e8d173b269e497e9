"""The OpenAI-compatible HTTP API as an ASGI app (FastAPI): POST /v1/completions and
/v1/chat/completions (whole responses or server-sent events ending in `data: [DONE]`),
GET /v1/models, /health and /metrics.

A request takes the gRPC path's road: the same validation core, the same front end (admission
control, deadlines, placement, replay), the same bearer token. Errors are OpenAI error objects
with the HTTP status a client expects. The response starts only once the request's first chunk
exists, so everything that can refuse a request (validation, admission, no instance) still
answers with its own status; later failures arrive as an error event in the stream. A client
that goes away, before or during its stream, closes the front end's stream, which aborts the
request wherever it runs and frees its KV."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.errors import RequestError
from router.openai.backend import GenerateBackend, HealthCheck, ServedModel, StreamChunk
from router.openai.chat import chat_prompt_ids
from router.openai.errors import error_body, request_error_body, request_error_headers
from router.openai.mapping import (
    ResponseBuilder,
    chat_params,
    check_model,
    completion_params,
    parse_body,
    refuse_unsupported_chat,
)
from router.openai.schema import ChatCompletionRequest, CompletionRequest
from router.validation import validate_params

log = logging.getLogger(__name__)

# The same bound as the gRPC port's largest message.
MAX_BODY_BYTES = 16 << 20
# Sent for a client that left before its response (nginx's code; nobody reads it).
CLIENT_CLOSED = 499
DONE_EVENT = "data: [DONE]\n\n"


class _ClientGone(Exception):
    """The client disconnected before its response started."""


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, coro):
    """`coro`'s result; if the client disconnects first, cancels it (which closes the front
    end's stream and aborts the request), lets it clean up, and raises _ClientGone."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise _ClientGone()
    return work.result()


async def _next(chunks):
    return await chunks.__anext__()


async def _run_out(chunks) -> None:
    """Nothing follows a finished chunk; iterating to the end lets the front end close the
    request as finished (closing it early would count it as cancelled)."""
    async for _ in chunks:
        pass


async def _collect(first: StreamChunk, chunks) -> tuple[str, StreamChunk]:
    texts, chunk = [first.text], first
    while not chunk.finished:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            raise RequestError(grpc.StatusCode.INTERNAL, "the stream ended without its final chunk") from None
        texts.append(chunk.text)
    await _run_out(chunks)
    return "".join(texts), chunk


async def _events(builder: ResponseBuilder, first: StreamChunk, chunks):
    """The server-sent events of one stream; a failure after the start is an error event."""
    chunk = first
    try:
        while True:
            if chunk.finished:
                await _run_out(chunks)
            yield _event(builder.chunk(chunk))
            if chunk.finished:
                if builder.include_usage:
                    yield _event(builder.usage_chunk(chunk))
                break
            chunk = await chunks.__anext__()
    except RequestError as exc:
        yield _event(request_error_body(exc))
    except StopAsyncIteration:
        yield _event(error_body("the stream ended without its final chunk", 500))
    yield DONE_EVENT


class _EventStream(StreamingResponse):
    """A streaming response that closes the front end's stream however it ends (finished,
    client gone, server stopping), so an abandoned request never lingers."""

    def __init__(self, body, chunks, headers: dict[str, str]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self._chunks = chunks

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._chunks.aclose()


def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(request_error_body(exc), status_code=exc.http_status, headers=request_error_headers(exc))


def build_app(backend: GenerateBackend, model: ServedModel, *, auth_token: str | None = None,
              health: HealthCheck | None = None, metrics_registry=None) -> FastAPI:
    """The app for one served model; `metrics_registry` (a prometheus CollectorRegistry)
    enables GET /metrics."""
    app = FastAPI(title="disagg-serve (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
    expected_auth = f"Bearer {auth_token}".encode() if auth_token else None

    def authorize(request: Request) -> None:
        if expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected_auth):
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token "
                               "(send 'Authorization: Bearer <token>')")

    async def json_body(request: Request):
        size, parts = 0, []
        async for part in request.stream():
            size += len(part)
            if size > MAX_BODY_BYTES:
                raise RequestError.invalid(f"the request body is over {MAX_BODY_BYTES} bytes")
            parts.append(part)
        try:
            return json.loads(b"".join(parts))
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
            raise RequestError.invalid(f"the request body is not valid JSON: {exc}") from None

    def tokenize(text: str) -> list[int]:
        return model.tokenizer.encode(text)

    async def respond(request: Request, kind: str, validated, stream: bool, include_usage: bool) -> Response:
        chunks = backend.generate(validated)
        try:
            first = await _unless_disconnected(request, _next(chunks))
        except StopAsyncIteration:
            raise RequestError(grpc.StatusCode.INTERNAL, "the stream ended before its first chunk") from None
        except _ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        builder = ResponseBuilder(kind, first.request_id, model.name, int(time.time()), include_usage)
        headers = {"X-Request-Id": first.request_id}
        if stream:
            return _EventStream(_events(builder, first, chunks), chunks, headers)
        try:
            text, final = await _unless_disconnected(request, _collect(first, chunks))
        except _ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            await chunks.aclose()
        return JSONResponse(builder.whole(text, final), headers=headers)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}", exc.status_code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", 500), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse_body(CompletionRequest, await json_body(request))
        check_model(req.model, model)
        validated = validate_params(completion_params(req), tokenize, model.limits)
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        return await respond(request, "completion", validated, bool(req.stream), include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = parse_body(ChatCompletionRequest, await json_body(request))
        check_model(req.model, model)
        refuse_unsupported_chat(req)
        prompt_ids = chat_prompt_ids(model.tokenizer, req, model.chat_template, model.limits.max_model_len)
        validated = validate_params(chat_params(req, prompt_ids), tokenize, model.limits)
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        return await respond(request, "chat", validated, bool(req.stream), include_usage)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        card = {"id": model.name, "object": "model", "created": model.created, "owned_by": "disagg-serve",
                "root": model.root, "parent": None, "max_model_len": model.limits.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health_check() -> JSONResponse:
        reason = health() if health is not None else None
        if reason is not None:
            return JSONResponse(error_body(reason, 503), status_code=503)
        return JSONResponse({"status": "ok"})

    if metrics_registry is not None:
        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    return app
