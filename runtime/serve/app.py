"""The ASGI app: OpenAI's completions, chat completions and models endpoints, /health and /metrics."""
from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from kvc.errors import GenerationError
from kvc.runtime.serve import metrics
from kvc.runtime.serve.bridge import RequestStream
from kvc.runtime.serve.errors import ApiError, bad_key, bad_request, unknown_model
from kvc.runtime.serve.protocol import (COMPLETIONS_DEFAULT_MAX_TOKENS, ChatRequest, CompletionRequest,
                                        parse_body, sampling_params)
from kvc.runtime.serve.responses import Shape, sse, usage
from kvc.runtime.serve.state import ServerState
from kvc.runtime.serving_request import EndReason

log = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]


def build_app(state: ServerState, manage_lifetime: bool = False) -> Starlette:
    """``manage_lifetime``: start the scheduler with the app and stop it on shutdown (uvicorn);
    otherwise the caller does (tests, Ray Serve replicas)."""
    api = _Api(state)
    routes = [Route("/v1/completions", api.guard(api.completions), methods=["POST"]),
              Route("/v1/chat/completions", api.guard(api.chat), methods=["POST"]),
              Route("/v1/models", api.guard(api.models), methods=["GET"]),
              Route("/v1/models/{name:path}", api.guard(api.model), methods=["GET"]),
              Route("/health", api.health, methods=["GET"]),
              Route("/metrics", api.metrics, methods=["GET"])]
    lifespan = _lifespan(state) if manage_lifetime else None
    return Starlette(routes=routes, lifespan=lifespan)


def _lifespan(state: ServerState):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            state.close()

    return lifespan


class _Api:
    def __init__(self, state: ServerState):
        self.state = state

    def guard(self, handler: Handler) -> Handler:
        """API key check and the error schema for everything under /v1."""
        async def guarded(request: Request) -> Response:
            try:
                self._check_key(request)
                response = await handler(request)
            except ApiError as exc:
                response = exc.response()
            except Exception:
                log.exception("request failed")
                response = ApiError(500, "internal server error", type_="server_error").response()
            self.state.http_responses[response.status_code] += 1
            return response
        return guarded

    def _check_key(self, request: Request) -> None:
        key = self.state.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise bad_key()

    # --- /v1 ---
    async def completions(self, request: Request) -> Response:
        body = parse_body(await self._body(request), CompletionRequest)
        self._check_model(body.model)
        prompt = body.single_prompt()
        ids = self._encode(prompt, "prompt")
        default = COMPLETIONS_DEFAULT_MAX_TOKENS
        return await self._generate(request, body, ids, self._max_tokens(body.max_tokens, default, "max_tokens"),
                                    Shape(chat=False, model=self.state.model_name))

    async def chat(self, request: Request) -> Response:
        body = parse_body(await self._body(request), ChatRequest)
        self._check_model(body.model)
        template = self.state.chat_template
        if template is None:
            raise bad_request(f"this model cannot chat: {self.state.chat_error}", param="messages")
        try:
            text = template.render(body.plain_messages(), add_generation_prompt=True)
        except GenerationError as exc:
            raise bad_request(str(exc), param="messages") from None
        ids = self._encode(text, "messages")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        default = max(1, self.state.model.capacity - len(ids))  # until a stop rule or the cache is full
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return await self._generate(request, body, ids, self._max_tokens(asked, default, name),
                                    Shape(chat=True, model=self.state.model_name))

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._check_model(request.path_params["name"])
        return JSONResponse(self._model_card())

    # --- outside /v1: no key, for load balancers and Prometheus ---
    async def health(self, request: Request) -> Response:
        if not self.state.scheduler.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        text = metrics.render(self.state.scheduler.stats.snapshot(), self.state.model_name,
                              dict(self.state.http_responses))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # --- pieces ---
    async def _body(self, request: Request) -> bytes:
        limit = self.state.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, name: str) -> None:
        if name != self.state.model_name:
            raise unknown_model(name)

    def _model_card(self) -> dict:
        return {"id": self.state.model_name, "object": "model", "created": 0, "owned_by": "kvc",
                "max_model_len": self.state.model.capacity}

    def _encode(self, prompt: str | list[int], param: str) -> list[int]:
        try:
            return self.state.model.encode(prompt)
        except GenerationError as exc:
            raise bad_request(str(exc), param=param) from None

    @staticmethod
    def _max_tokens(asked: int | None, default: int, name: str) -> int:
        if asked is None:
            return default
        if asked < 1:
            raise bad_request(f"{name}={asked} is invalid: must be >= 1", param=name)
        return asked

    async def _generate(self, request: Request, body, ids: list[int], max_tokens: int, shape: Shape) -> Response:
        params = sampling_params(body, max_tokens)
        stream = RequestStream(self.state.scheduler, ids, params, self.state.config.timeout_s)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse_events(stream, shape, len(ids), include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(stream, request, shape, len(ids))


async def _collect(stream: RequestStream, request: Request, shape: Shape, prompt_tokens: int) -> Response:
    watcher = asyncio.create_task(stream.cancel_on_disconnect(request.is_disconnected))
    pieces, last = [], None
    try:
        async for event in stream.events():
            pieces.append(event.text)
            last = event
    finally:
        watcher.cancel()
        stream.cancel()  # no-op once ended; ends the request if this task was cancelled
    if last.end is EndReason.ERROR:
        raise ApiError(500, last.message, type_="server_error")
    if last.end is EndReason.TIMEOUT and stream.request.first_token_at is None:
        raise ApiError(503, f"the request {last.message} ({request.url.path}); retry later", type_="server_error",
                       code="timeout")
    completion = len(stream.request.generated)
    return JSONResponse(shape.full("".join(pieces), last.end, usage(prompt_tokens, completion)))


async def _sse_events(stream: RequestStream, shape: Shape, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events; a disconnected client cancels this generator, which cancels the request."""
    try:
        first = True
        async for event in stream.events():
            if event.end is EndReason.ERROR or (event.end is EndReason.TIMEOUT
                                                 and stream.request.first_token_at is None):
                yield sse(ApiError(500, event.message, type_="server_error").body())
                return
            if event.text or event.end is not None or first:
                yield sse(shape.chunk(event.text, event.end, first=first))
                first = False
        if include_usage:
            yield sse(shape.usage_chunk(usage(prompt_tokens, len(stream.request.generated))))
        yield sse("[DONE]")
    finally:
        stream.cancel()
