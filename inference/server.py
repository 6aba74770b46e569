"""The HTTP front of the head: OpenAI-compatible API, /health and /metrics, over aiohttp.

The front never touches the weights: it tokenizes with a vocabulary-only load of the model and hands token
ids to the supervised engine process, so it stays up while the engine restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time

from aiohttp import HttpVersion11, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from inference import api
from inference.api import ApiError, GenerationRequest
from inference.config import ServeConfig
from inference.metrics import Metrics
from inference.supervisor import QueueFull, Supervisor, Unavailable
from inference.tokenizer import TemplateError, TextStream, Tokenizer

log = logging.getLogger("inference.server")

MAX_BODY_BYTES = 8 * 1024 * 1024
CORS_DEFAULT_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE = 600
SUPERVISOR = web.AppKey("supervisor", Supervisor)
METRICS = web.AppKey("metrics", Metrics)
TOKENIZER = web.AppKey("tokenizer", Tokenizer)
CONFIG = web.AppKey("config", ServeConfig)


def _json(status: int, body: dict, headers: dict | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def errors_and_metrics(request: web.Request, handler):
    metrics = request.app[METRICS]
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
    try:
        if _is_preflight(request):
            response = _preflight(request)
        else:
            response = await handler(request)
    except ApiError as exc:
        response = _json(exc.status, exc.body(), exc.headers)
    except web.HTTPException as exc:
        kind = "invalid_request_error"
        message = {404: "no such endpoint", 405: "method not allowed for this endpoint"}.get(
            exc.status, exc.reason
        )
        headers = {}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            headers["Allow"] = ", ".join(_allowed_methods(request, exc))
            message += f"; it takes {headers['Allow']}"
        if exc.status == 413:
            message = f"request body is larger than {MAX_BODY_BYTES} bytes"
        response = _json(
            exc.status, {"error": {"message": message, "type": kind, "param": None, "code": None}}, headers
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        response = _json(
            500,
            {
                "error": {
                    "message": "internal error; see the server log",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
        )
    metrics.requests.labels(endpoint, str(response.status)).inc()
    return response


def _allowed_methods(request: web.Request, exc: web.HTTPMethodNotAllowed) -> list[str]:
    methods = set(exc.allowed_methods)
    if request.app[CONFIG].cors_origins:
        methods.add("OPTIONS")
    return sorted(methods)


def _cors_origin(request: web.Request) -> str | None:
    """The Access-Control-Allow-Origin value for this request's origin, or None if it is not let in."""
    allowed, origin = request.app[CONFIG].cors_origins, request.headers.get("Origin")
    if not allowed or not origin:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin.lower().rstrip("/") in allowed else None


def _is_preflight(request: web.Request) -> bool:
    return (
        request.method == "OPTIONS"
        and bool(request.app[CONFIG].cors_origins)
        and "Origin" in request.headers
        and "Access-Control-Request-Method" in request.headers
    )


def _preflight(request: web.Request) -> web.Response:
    """A browser's CORS preflight: which methods and headers a page of an allowed origin may use."""
    exc = request.match_info.http_exception
    if not isinstance(exc, web.HTTPMethodNotAllowed):
        raise exc if exc is not None else web.HTTPNotFound()
    if _cors_origin(request) is None:
        raise ApiError(
            403,
            f"origin {request.headers['Origin']!r} may not call this server from a browser; "
            "the server's --cors-origin lists the origins that may",
            code="origin_not_allowed",
        )
    headers = {
        "Access-Control-Allow-Methods": ", ".join(_allowed_methods(request, exc)),
        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers")
        or CORS_DEFAULT_HEADERS,
        "Access-Control-Max-Age": str(CORS_MAX_AGE),
    }
    return web.Response(status=204, headers=headers)


async def _add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer to an allowed origin, streams and errors included, so that a page can read it."""
    if not request.app[CONFIG].cors_origins:
        return
    origin = _cors_origin(request)
    if origin != "*":
        response.headers.add("Vary", "Origin")
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"


def _check_key(request: web.Request) -> None:
    key = request.app[CONFIG].api_key
    if not key:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(
            401,
            "missing or incorrect API key; send it as 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


async def _read_json(request: web.Request):
    try:
        return await request.json(loads=json.loads)
    except json.JSONDecodeError as exc:
        raise api.invalid(
            "body", f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise api.invalid("body", "the body is not UTF-8 text") from exc
    except RecursionError as exc:
        raise api.invalid("body", "the JSON is nested too deeply; send a flatter body") from exc


def _model_object(app: web.Application) -> dict:
    config, tokenizer = app[CONFIG], app[TOKENIZER]
    return {
        "id": config.model_alias,
        "object": "model",
        "created": int(app["started"]),
        "owned_by": "llmfleet",
        "meta": {
            "n_ctx": config.ctx,
            "n_ctx_per_sequence": config.ctx_per_sequence,
            "n_ctx_train": tokenizer.n_ctx_train,
            "n_vocab": tokenizer.n_vocab,
            "parallel": config.parallel,
            "split": config.split,
            "rpc_workers": list(config.rpc),
        },
    }


async def models(request: web.Request) -> web.Response:
    _check_key(request)
    return _json(200, {"object": "list", "data": [_model_object(request.app)]})


async def model(request: web.Request) -> web.Response:
    _check_key(request)
    alias, asked = request.app[CONFIG].model_alias, request.match_info["model"]
    if asked != alias:
        raise ApiError(
            404,
            f"model: the model '{asked}' does not exist; this server serves '{alias}'",
            param="model",
            code="model_not_found",
        )
    return _json(200, _model_object(request.app))


async def health(request: web.Request) -> web.Response:
    body = request.app[SUPERVISOR].health()
    return _json(200 if body["status"] == "ok" else 503, body)


async def metrics_endpoint(request: web.Request) -> web.Response:
    output = generate_latest(request.app[METRICS].registry)
    return web.Response(body=output, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def completions(request: web.Request) -> web.StreamResponse:
    _check_key(request)
    tokenizer = request.app[TOKENIZER]
    body = await _read_json(request)
    req = api.parse_completion(body, request.app[CONFIG].model_alias, tokenizer.n_vocab)
    tokens = req.prompt_tokens if req.prompt_tokens is not None else tokenizer.tokenize(req.prompt_text)
    return await _generate(request, req, tokens, "prompt")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    _check_key(request)
    tokenizer = request.app[TOKENIZER]
    body = await _read_json(request)
    req, messages = api.parse_chat(body, request.app[CONFIG].model_alias)
    try:
        text = tokenizer.render_chat(messages, **req.template_kwargs)
    except TemplateError as exc:
        raise api.invalid("messages", str(exc)) from exc
    tokens = tokenizer.tokenize(text, add_special=False)
    return await _generate(request, req, tokens, "messages")


async def _generate(request: web.Request, req: GenerationRequest, tokens: list[int], prompt_field: str):
    config = request.app[CONFIG]
    limit = config.ctx_per_sequence
    if not tokens:
        raise api.invalid(prompt_field, "the prompt is empty")
    if len(tokens) >= limit:
        raise api.invalid(
            prompt_field,
            f"the prompt has {len(tokens)} tokens; the context per sequence is {limit} "
            f"(--ctx {config.ctx} / --parallel {config.parallel}); shorten the prompt",
            code="context_length_exceeded",
        )
    room = limit - len(tokens)
    if req.max_tokens is not None and req.max_tokens > room:
        raise api.invalid(
            req.max_tokens_field,
            f"{req.max_tokens} tokens plus the {len(tokens)}-token prompt exceed the {limit}-token context "
            f"per sequence; ask for at most {room}",
            code="context_length_exceeded",
        )
    supervisor = request.app[SUPERVISOR]
    kind = _EventStream if req.stream else _Collected
    output = kind(request.app[TOKENIZER], req, len(tokens))
    try:
        job = supervisor.submit(tokens, req.sampling_params(req.max_tokens or room), output)
    except (Unavailable, QueueFull) as exc:
        if isinstance(exc, QueueFull):
            message, code = f"the server is at capacity ({exc}); retry later", "queue_full"
        else:
            message, code = f"the model is not available: {exc}", "engine_unavailable"
        raise ApiError(
            503, message, kind="server_error", code=code, headers={"Retry-After": str(config.retry_after)}
        ) from exc
    output.stop_early = lambda: supervisor.cancel(job)
    try:
        if req.stream:
            return await _stream(request, req, output)
        return await _collect(req, output)
    finally:
        supervisor.cancel(job)


class _Output:
    """One request's generated tokens, turned into text as the supervisor hands them over (see
    supervisor.Output): incomplete UTF-8 and a possible stop string are held back, and ``done`` resolves at
    the end. Subclasses say where the text goes."""

    def __init__(self, tokenizer: Tokenizer, req: GenerationRequest, prompt_n: int):
        self.req, self.prompt_n = req, prompt_n
        self.text = TextStream(tokenizer, req.stop)
        self.generated = 0
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.stop_early = lambda: None  # frees the sequence when a stop string ends the text

    def token(self, token: int) -> None:
        if self.done.done():
            return
        self.generated += 1
        piece = self.text.push(token)
        if piece:
            self.piece(piece)
        if self.text.stopped:
            self.stop_early()
            self.end("stop")

    def finish(self, reason: str) -> None:
        if self.done.done():
            return
        tail = self.text.finish()
        if tail:
            self.piece(tail)
        self.end(reason)

    def fail(self, message: str) -> None:
        if not self.done.done():
            try:
                self.error(message)
            finally:
                self.close()

    def close(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def piece(self, text: str) -> None:
        raise NotImplementedError

    def end(self, reason: str) -> None:
        raise NotImplementedError

    def error(self, message: str) -> None:
        raise NotImplementedError


class _Collected(_Output):
    """The whole text, for a response that is not streamed."""

    def __init__(self, tokenizer: Tokenizer, req: GenerationRequest, prompt_n: int):
        super().__init__(tokenizer, req, prompt_n)
        self.pieces: list[str] = []
        self.reason: str | None = None
        self.failure: str | None = None

    def piece(self, text: str) -> None:
        self.pieces.append(text)

    def end(self, reason: str) -> None:
        self.reason = reason
        self.close()

    def error(self, message: str) -> None:
        self.failure = message


async def _collect(req: GenerationRequest, output: _Collected) -> web.Response:
    await output.done
    if output.failure is not None:
        raise ApiError(503, output.failure, kind="server_error", code="engine_failed")
    text = "".join(output.pieces)
    return _json(200, api.completion_body(req, text, output.reason, output.prompt_n, output.generated))


def _sse(payload: dict | str) -> bytes:
    """One server-sent event: a JSON body, or a bare string such as [DONE]."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class _EventStream(_Output):
    """Server-sent events written to the connection as each token arrives: one transport write per token,
    with no task switch in between. Until the response's headers are out, events wait in ``pending``."""

    def __init__(self, tokenizer: Tokenizer, req: GenerationRequest, prompt_n: int):
        super().__init__(tokenizer, req, prompt_n)
        # A text chunk is the same JSON every time but for its text: keep what surrounds the text.
        self.before, self.after = api.chunk_frame(req)
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.chunked = False

    def attach(self, transport: asyncio.Transport, chunked: bool) -> None:
        self.transport, self.chunked = transport, chunked
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            self._write(data)

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            self.pending.append(data)
        elif transport.is_closing():
            # The client went away: free the sequence now rather than at the handler's cancellation.
            self.stop_early()
            self.close()
        elif self.chunked:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            transport.write(data)

    def _event(self, payload: dict | str) -> None:
        self._write(_sse(payload))

    def opening(self) -> bytes:
        return _sse(api.chunk_body(self.req, "", None, role=True)) if self.req.kind == "chat" else b""

    def piece(self, text: str) -> None:
        self._write(f"data: {self.before}{json.dumps(text)}{self.after}\n\n".encode())

    def end(self, reason: str) -> None:
        req = self.req
        self._event(api.chunk_body(req, None if req.kind == "chat" else "", reason))
        if req.include_usage:
            self._event(api.usage_chunk(req, self.prompt_n, self.generated))
        self._event("[DONE]")
        self.close()

    def error(self, message: str) -> None:
        self._event(ApiError(503, message, kind="server_error", code="engine_failed").body())


async def _stream(request: web.Request, req: GenerationRequest, output: _EventStream):
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    if request.version >= HttpVersion11:
        response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        # Puts the headers on the wire (with the chat's role chunk), so that events may follow directly.
        await response.write(output.opening())
        output.attach(request.transport, response.chunked)
        await output.done
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        log.info("client of %s went away", req.id)
        raise
    return response


def build_app(config: ServeConfig, registry: CollectorRegistry | None = None) -> web.Application:
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    app = web.Application(middlewares=[errors_and_metrics], client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = config
    app[METRICS] = metrics
    app[TOKENIZER] = Tokenizer(config.model)
    app[SUPERVISOR] = Supervisor(config, metrics)
    app["started"] = time.time()
    app.on_response_prepare.append(_add_cors_headers)
    app.router.add_get("/v1/models", models)
    # A model id may hold slashes (--alias Qwen/Qwen3-30B-A3B).
    app.router.add_get("/v1/models/{model:.+}", model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_endpoint)

    async def lifecycle(app: web.Application):
        await app[SUPERVISOR].start()
        yield
        await app[SUPERVISOR].close()

    app.cleanup_ctx.append(lifecycle)
    return app


def metrics_app(app: web.Application) -> web.Application:
    """A second listener for /metrics alone, for a scrape port that the firewall opens to monitoring only."""
    side = web.Application()
    side[METRICS] = app[METRICS]
    side.router.add_get("/metrics", metrics_endpoint)
    return side


async def serve(config: ServeConfig) -> None:
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    runners = [runner]
    if config.metrics_port is not None:
        side = web.AppRunner(metrics_app(app), access_log=None)
        await side.setup()
        await web.TCPSite(side, config.host, config.metrics_port).start()
        runners.append(side)
    log.info("serving %s on http://%s:%d", config.model_alias, config.host, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for r in reversed(runners):
        await r.cleanup()
