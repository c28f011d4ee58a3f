"""The OpenAI-compatible HTTP server: a FastAPI app over one AsyncLLMEngine, run by uvicorn.

Every error is a JSON body in OpenAI's shape (`{"object": "error", "error": {...}}`): validation
errors are 400 (not FastAPI's 422), unknown routes 404, wrong methods 405, bodies over the limit 413,
a full waiting queue 429 and a server that is shutting down 503, both with Retry-After. A 500 means a
bug, and is logged.

On SIGTERM (or Ctrl+C) the server drains: new requests get 503 while the requests in flight finish
(for up to `shutdown_timeout_s`, after which they are aborted), then uvicorn stops and the process
exits with code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hopperllm import __version__
from hopperllm.engine.async_engine import AsyncLLMEngine
from hopperllm.entrypoints.openai.metrics import ServerMetrics
from hopperllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    ResponsesRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    VersionResponse,
    error_payload,
)
from hopperllm.entrypoints.openai.responses import ResponseStore
from hopperllm.entrypoints.openai.serving import RETRY_AFTER_S, APIError, OpenAIServing

logger = logging.getLogger(__name__)

from hopperllm.entrypoints.cli_serve import DEFAULT_MAX_REQUEST_BYTES  # noqa: E402

# open without an API key: probes, scrapers and the API's own description
UNAUTHENTICATED_PATHS = frozenset(
    {"/health", "/ping", "/metrics", "/version", "/openapi.json", "/docs", "/redoc"}
)
# answered while draining (the rest get 503): /health itself reports 503 then
OPEN_WHILE_DRAINING = frozenset({"/health", "/ping", "/metrics", "/version"})


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    shutdown_timeout_s: float = 30.0
    log_requests: bool = False
    max_log_len: int | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    enable_prompt_tokens_details: bool = False
    return_tokens_as_token_ids: bool = False
    reasoning_parser: str | None = None
    # --enable-responses-store: how many /v1/responses answers to keep (0: none, as vLLM by default)
    max_stored_responses: int = 0


@dataclass
class ServerState:
    """What the app's parts share: whether we are draining, and whether the engine is stopped."""

    draining: bool = False
    _stopped: asyncio.Event | None = field(default=None, repr=False)
    _stop_started: bool = False

    async def stop_engine(self, engine: AsyncLLMEngine, drain_timeout_s: float) -> None:
        """Drain and stop the engine once, however many times (signal, lifespan) it is asked."""
        self.draining = True
        if self._stopped is None:
            self._stopped = asyncio.Event()
        if self._stop_started:
            await self._stopped.wait()
            return
        self._stop_started = True
        try:
            await engine.shutdown(drain_timeout_s=drain_timeout_s)
        finally:
            self._stopped.set()


ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)
}


def server_dev_mode() -> bool:
    """HOPPERLLM_SERVER_DEV_MODE=1 adds the routes vLLM keeps for development (POST /reset_prefix_cache)."""
    value = os.environ.get("HOPPERLLM_SERVER_DEV_MODE", "0")
    if value not in ("0", "1"):
        raise ValueError(f"HOPPERLLM_SERVER_DEV_MODE={value!r}: use 0 or 1")
    return value == "1"


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    state = ServerState()
    metrics = ServerMetrics(
        engine, settings.served_model_names[0], engine.config.scheduler_config.max_model_len
    )
    serving = OpenAIServing(
        engine,
        settings.served_model_names,
        metrics,
        log_requests=settings.log_requests,
        max_log_len=settings.max_log_len,
        is_draining=lambda: state.draining,
        enable_auto_tool_choice=settings.enable_auto_tool_choice,
        tool_call_parser=settings.tool_call_parser,
        enable_prompt_tokens_details=settings.enable_prompt_tokens_details,
        return_tokens_as_token_ids=settings.return_tokens_as_token_ids,
        reasoning_parser=settings.reasoning_parser,
        responses_store=(
            ResponseStore(settings.max_stored_responses) if settings.max_stored_responses > 0 else None
        ),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await state.stop_engine(engine, settings.shutdown_timeout_s)

    app = FastAPI(
        title="hopperllm",
        description="OpenAI-compatible API of the hopperllm inference engine",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.server_state = state
    app.state.engine = engine
    app.state.settings = settings

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        return await serving.create_completion(body, raw)

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        return await serving.create_chat_completion(body, raw)

    @app.post("/v1/responses", responses=ERROR_RESPONSES)
    async def create_response(body: ResponsesRequest, raw: Request) -> Response:
        return await serving.create_response(body, raw)

    @app.get("/v1/responses/{response_id}", responses=ERROR_RESPONSES)
    async def retrieve_response(response_id: str) -> Response:
        return JSONResponse(serving.stored_response(response_id))

    @app.delete("/v1/responses/{response_id}", responses=ERROR_RESPONSES)
    async def delete_response(response_id: str) -> Response:
        return JSONResponse(serving.stored_response(response_id, delete=True))

    @app.get("/v1/models")
    async def show_models() -> Response:
        return _json(serving.show_models())

    @app.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> Response:
        return _json(serving.tokenize(body))

    @app.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> Response:
        return _json(serving.detokenize(body))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        return _json(serving.tokenizer_info())

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        if state.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)})
        if not engine.is_running:
            raise APIError(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/ping", responses={503: {"model": ErrorResponse}})
    @app.post("/ping", responses={503: {"model": ErrorResponse}})
    async def ping() -> Response:
        """vLLM's (SageMaker's) liveness route: /health's answer."""
        return await health()

    if server_dev_mode():

        @app.post("/reset_prefix_cache", responses={409: {"model": ErrorResponse}})
        async def reset_prefix_cache() -> Response:
            """(HOPPERLLM_SERVER_DEV_MODE=1, as vLLM's VLLM_SERVER_DEV_MODE) drop the prefix cache's blocks
            between benchmark runs; 409 while a request runs."""
            if not await engine.call("reset_prefix_cache"):
                raise APIError(409, "the prefix cache can be reset only while no request runs")
            return JSONResponse({"reset": True})

    @app.get("/metrics")
    async def show_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def show_version() -> Response:
        return _json(VersionResponse(version=__version__))

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> Response:
        message, param = _validation_message(e)
        return JSONResponse(error_payload(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == 404:
            message = f"{request.method} {request.url.path} is not a route of this server"
        elif e.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
        else:
            message = str(e.detail)
        return JSONResponse(
            error_payload(e.status_code, message), status_code=e.status_code, headers=e.headers
        )

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception) -> Response:
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse(error_payload(500, f"internal server error: {type(e).__name__}"), status_code=500)

    app.add_middleware(GuardMiddleware, settings=settings, state=state)
    return app


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    """One line naming each bad field once; a field of several accepted types (prompt) that matched
    none says so instead of listing every type's complaint. The param is the first bad field."""
    by_field: dict[str, list[dict]] = {}
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        by_field.setdefault(loc[0] if loc else "", []).append({**err, "where": ".".join(loc)})
    if not by_field:
        return "invalid request", None
    parts = []
    for name, errs in list(by_field.items())[:3]:
        if len(errs) == 1:
            where = errs[0]["where"]
            parts.append(f"{where}: {errs[0]['msg']}" if where else str(errs[0]["msg"]))
        else:
            parts.append(f"{name}: matches none of its accepted types")
    more = f" (and {len(by_field) - 3} more fields)" if len(by_field) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, next(iter(by_field)) or None


# -- the guard: draining, API key, body size ------------------------------------------------------
class GuardMiddleware:
    """A plain ASGI middleware (no BaseHTTPMiddleware, which would buffer streams and hide client
    disconnects): 503 while draining, 401 without the API key, 413 for a body over the limit.

    The body is read here, up to the limit, whether it comes with a Content-Length or chunked, and is
    replayed to the app; later `receive()` calls go straight through, so disconnects still arrive.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings, state: ServerState):
        self.app = app
        self.state = state
        self.max_bytes = settings.max_request_bytes
        self.api_key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.state.draining and path not in OPEN_WHILE_DRAINING:
            await _send_error(send, 503, "the server is shutting down", {"Retry-After": str(RETRY_AFTER_S)})
            return
        headers = dict(scope["headers"])
        if self.api_key is not None and path not in UNAUTHENTICATED_PATHS and not self._authorized(headers):
            await _send_error(
                send,
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                await _send_error(send, 400, "the Content-Length header is not a number")
                return
            if declared_bytes > self.max_bytes:
                await self._reject_too_large(receive, send, declared_bytes)
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject_too_large(receive, send, None, more=message.get("more_body", False))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key or b"")

    async def _reject_too_large(
        self, receive: Receive, send: Send, declared: int | None, more: bool = True
    ) -> None:
        # Read (and drop) what is left of a body up to one more limit's worth before answering: closing
        # with unread data makes the kernel reset the connection, and the client would see that, not 413.
        budget = self.max_bytes
        if declared is not None and declared > 2 * self.max_bytes:
            more = False
        while more and budget > 0:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            budget -= len(message.get("body", b""))
            more = message.get("more_body", False)
        size = f"{declared} bytes" if declared is not None else "more"
        await _send_error(
            send, 413, f"the request body is {size}, over this server's limit of {self.max_bytes} bytes"
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_payload(status, message), separators=(",", ":")).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# -- running it -----------------------------------------------------------------------------------
class GracefulServer(uvicorn.Server):
    """uvicorn.Server that drains on SIGTERM/SIGINT instead of closing at once: new requests get 503
    while the requests in flight finish (up to the shutdown timeout), then it stops. It does not
    re-raise the signal afterwards, so the process exits with code 0. A second Ctrl+C aborts the requests in
    flight at once (their streams end with an error event) and stops as cleanly; a third forces exit."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._expedited = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self._loop is None:
            if sig == signal.SIGINT and self._loop is not None and not self._expedited:
                self._expedited = True
                logger.info("received SIGINT again: aborting the requests in flight")
                self._loop.call_soon_threadsafe(self._app.state.engine.abort_all_soon)
                return
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        logger.info("received %s: draining requests in flight, then stopping", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        state: ServerState = self._app.state.server_state
        settings: ServerSettings = self._app.state.settings
        try:
            await state.stop_engine(self._app.state.engine, settings.shutdown_timeout_s)
        finally:
            self.should_exit = True


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the port before the model loads, so that a taken port fails at once. Raises ValueError."""
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def make_server(
    app: FastAPI, log_level: str = "info", access_log: bool = True, graceful_timeout_s: float = 10.0
) -> GracefulServer:
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout_s,
        timeout_keep_alive=5,
    )
    return GracefulServer(config, app)
