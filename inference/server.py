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
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from aiohttp import HttpVersion11, web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from inference import api, chat
from inference.api import ApiError, GenerationRequest
from inference.config import ServeConfig
from inference.metrics import Metrics
from inference.supervisor import QueueFull, Supervisor, Unavailable
from inference.tokenizer import TemplateError, TextStream, Tokenizer

log = logging.getLogger("inference.server")

MAX_BODY_BYTES = 8 * 1024 * 1024
# A body up to this size is decoded, checked, rendered and tokenized on the event loop (a few milliseconds);
# a larger one in a preparer process (see _Preparer), since a few MiB take seconds and would stall every
# other connection, /health included. Handing a small body over would cost more than preparing it.
PREPARE_INLINE_BYTES = 4096
PREPARE_PROCESSES = 2
# How long aiohttp may read and drop the rest of a body that a handler did not read (its default), at most
# --body-timeout.
LINGERING_SECONDS = 10.0
# How long a connection refused over --max-connections is read from, so that the kernel does not answer the
# unread request with a reset, which could lose the 503 before the client reads it.
REFUSED_LINGER_SECONDS = 1.0
REFUSED_WARNING_INTERVAL = 60.0
# A connection whose headers are overdue is closed within a quarter of --header-timeout (and a second).
SWEEPS_PER_HEADER_TIMEOUT = 4
CORS_DEFAULT_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE = 600
SUPERVISOR = web.AppKey("supervisor", Supervisor)
DEGRADATION_HEADER = "X-Llmfleet-Degradation-Level"
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
        if exc.status == 408:
            await _answer_and_close(request, response)
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


async def _answer_and_close(request: web.Request, response: web.Response) -> None:
    """Sends the answer and closes the connection: what is left of a body that came too slowly is not waited
    for, as aiohttp would otherwise linger reading it."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()


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
        response.headers["Access-Control-Expose-Headers"] = f"Retry-After, {DEGRADATION_HEADER}"


async def _add_degradation_header(request: web.Request, response: web.StreamResponse) -> None:
    """With automatic degradation on, every answer says the level it was served at (0: as configured)."""
    ladder = request.app[SUPERVISOR].ladder
    if ladder is not None:
        response.headers[DEGRADATION_HEADER] = str(ladder.level)


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


async def _read_body(request: web.Request) -> bytes:
    """The body, which must arrive whole within --body-timeout of the request's headers."""
    if request.content.is_eof():  # the whole body came with the headers
        return await request.read()
    timeout = request.app[CONFIG].body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout:g} s (the server's --body-timeout); "
            "send the body with the headers",
            code="body_timeout",
        ) from None


def _decode_json(raw: bytes, charset: str | None):
    try:
        return json.loads(raw.decode(charset or "utf-8"))
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


# A drain ends by itself after this long unless the request names another lease.
DRAIN_LEASE_DEFAULT = 600.0
DRAIN_LEASE_MAX = 3600.0


def _admin_seconds(request: web.Request, name: str, default: float, limit: float) -> float:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= limit:
        raise api.invalid(name, f"'{text}' is not a number of seconds from 0 to {limit:g}; e.g. ?{name}=60")
    return value


def _admin_state(supervisor: Supervisor, drained: bool | None = None) -> dict:
    state = {
        "draining": supervisor.draining,
        "status": supervisor.state,
        "active": len(supervisor.active),
        "waiting": len(supervisor.waiting),
        # A planned worker restart is over once a new engine serves: its pid differs from this one.
        "engine_pid": supervisor.engine_info.get("pid") if supervisor.state == "ok" else None,
    }
    if drained is not None:
        state["drained"] = drained
    return state


async def _admin(request: web.Request, action) -> web.Response:
    """Admin endpoints take the API key like the API; the metrics port answers them too, so that the firewall
    can keep the admin port to the operators' hosts."""
    try:
        _check_key(request)
        return await action(request)
    except ApiError as exc:
        return _json(exc.status, exc.body(), exc.headers)


async def admin_drain(request: web.Request) -> web.Response:
    """POST /admin/drain?lease=S&wait=S: stop admitting sequences to the engine (new requests wait in the
    queue), wait up to ``wait`` seconds for the running ones to finish; ``drained`` says whether they did.
    The drain ends by itself after ``lease`` seconds."""

    async def drain(request: web.Request) -> web.Response:
        lease = _admin_seconds(request, "lease", DRAIN_LEASE_DEFAULT, DRAIN_LEASE_MAX)
        wait = _admin_seconds(request, "wait", 0.0, DRAIN_LEASE_MAX)
        supervisor = request.app[SUPERVISOR]
        drained = await supervisor.drain(lease, wait)
        return _json(200, _admin_state(supervisor, drained))

    return await _admin(request, drain)


async def admin_resume(request: web.Request) -> web.Response:
    """POST /admin/resume: admit the queued requests again."""

    async def resume(request: web.Request) -> web.Response:
        supervisor = request.app[SUPERVISOR]
        supervisor.resume()
        return _json(200, _admin_state(supervisor))

    return await _admin(request, resume)


async def metrics_endpoint(request: web.Request) -> web.Response:
    output = generate_latest(request.app[METRICS].registry)
    return web.Response(body=output, headers={"Content-Type": CONTENT_TYPE_LATEST})


Prepared = tuple[GenerationRequest, list[int]]


async def completions(request: web.Request) -> web.StreamResponse:
    _check_key(request)
    req, tokens = await _prepare(request, _prepare_completion)
    return await _generate(request, req, tokens, "prompt")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    _check_key(request)
    req, tokens = await _prepare(request, _prepare_chat)
    return await _generate(request, req, tokens, "messages")


async def _prepare(request: web.Request, prepare: Callable[..., Prepared]) -> Prepared:
    """The request and its prompt's tokens, from the body: see PREPARE_INLINE_BYTES for where the work runs."""
    raw = await _read_body(request)
    app = request.app
    if len(raw) <= PREPARE_INLINE_BYTES:
        return prepare(app[CONFIG], app[TOKENIZER], raw, request.charset)
    return await app[PREPARER].run(prepare, raw, request.charset)


def _prepare_completion(
    config: ServeConfig, tokenizer: Tokenizer, raw: bytes, charset: str | None
) -> Prepared:
    req = api.parse_completion(_decode_json(raw, charset), config.model_alias, tokenizer.n_vocab)
    if req.prompt_tokens is not None:
        tokens = req.prompt_tokens
    else:
        _check_room(config, req, tokenizer.min_tokens(req.prompt_text), "prompt", at_least=True)
        tokens = tokenizer.tokenize(req.prompt_text)
    _check_prompt(config, req, tokens, "prompt")
    return req, tokens


def _prepare_chat(config: ServeConfig, tokenizer: Tokenizer, raw: bytes, charset: str | None) -> Prepared:
    body = _decode_json(raw, charset)
    req, messages = api.parse_chat(body, config.model_alias, tokenizer.n_vocab)
    options = chat.parse_options(body)
    try:
        text = tokenizer.render_chat(messages, **req.template_kwargs, **chat.template_variables(options))
    except TemplateError as exc:
        raise api.invalid("messages", str(exc)) from exc
    chat.plan(req, options, text, tokenizer, config.reasoning_format)
    _check_room(config, req, tokenizer.min_tokens(text), "messages", at_least=True)
    tokens = tokenizer.tokenize(text, add_special=False)
    _check_prompt(config, req, tokens, "messages")
    return req, tokens


def _check_prompt(config: ServeConfig, req: GenerationRequest, tokens: list[int], prompt_field: str) -> None:
    if not tokens:
        raise api.invalid(prompt_field, api.EMPTY_PROMPT)
    _check_room(config, req, len(tokens), prompt_field)


def _check_room(
    config: ServeConfig, req: GenerationRequest, prompt_n: int, prompt_field: str, at_least: bool = False
) -> None:
    """Refuses a prompt of ``prompt_n`` tokens that leaves no room for itself and max_tokens in a sequence's
    context. With ``at_least``, ``prompt_n`` is Tokenizer.min_tokens, a bound known before tokenizing, so
    that a prompt that cannot fit is refused without the cost of tokenizing it."""
    if at_least and not prompt_n:
        return
    limit = config.ctx_per_sequence
    count = f"at least {prompt_n}" if at_least else str(prompt_n)
    prompt = f"prompt of at least {prompt_n} tokens" if at_least else f"{prompt_n}-token prompt"
    if prompt_n >= limit:
        raise api.invalid(
            prompt_field,
            f"the prompt has {count} tokens; the context per sequence is {limit} "
            f"(--ctx {config.ctx} / --parallel {config.parallel}); shorten the prompt",
            code="context_length_exceeded",
        )
    room = limit - prompt_n
    if req.max_tokens is not None and req.max_tokens > room:
        raise api.invalid(
            req.max_tokens_field,
            f"{req.max_tokens} tokens plus the {prompt} exceed the {limit}-token context "
            f"per sequence; ask for at most {room}" + (" (fewer if the prompt has more)" if at_least else ""),
            code="context_length_exceeded",
        )


async def _generate(request: web.Request, req: GenerationRequest, tokens: list[int], prompt_field: str):
    """Runs a prepared request, whose prompt fits (see _check_prompt)."""
    config = request.app[CONFIG]
    room = config.ctx_per_sequence - len(tokens)
    supervisor = request.app[SUPERVISOR]
    kind = _EventStream if req.stream else _Collected
    output = kind(request.app[TOKENIZER], req, len(tokens))
    try:
        job = supervisor.submit(tokens, req.sampling_params(req.max_tokens or room), output)
    except (Unavailable, QueueFull) as exc:
        # 503, not the 429 that OpenAI's API schema lists: its 429 is a caller over its rate limit, while a full
        # queue is the server out of capacity for everyone (RFC 9110's 503, OpenAI's own answer to overload).
        # Clients retry both after Retry-After; load balancers and 5xx alerts treat a 503 as the server's.
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
        self.cached_n = 0  # prompt tokens reused from the KV cache
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.stop_early = lambda: None  # frees the sequence when a stop string ends the text
        # Splits a chat reply into content, reasoning and tool calls (chat.ChatParser); None: text as it is.
        self.parser = chat.parser(req.chat) if req.kind == "chat" else None

    def cached(self, tokens: int) -> None:
        self.cached_n = tokens

    def token(self, token: int) -> None:
        if self.done.done():
            return
        self.generated += 1
        piece = self.text.push(token)
        if piece:
            self._text(piece)
        if self.text.stopped or (self.parser is not None and self.parser.done):
            self.stop_early()
            self.finish("stop")

    def finish(self, reason: str) -> None:
        if self.done.done():
            return
        tail = self.text.finish()
        if tail:
            self._text(tail)
        if self.parser is not None:
            for delta in self.parser.finish():
                self.delta(delta)
            reason = self.parser.finish_reason(reason)
        self.end(reason)

    def _text(self, text: str) -> None:
        if self.parser is None:
            self.piece(text)
            return
        for delta in self.parser.feed(text):
            self.delta(delta)

    def delta(self, delta: dict) -> None:
        """One of chat.ChatParser's deltas."""
        raise NotImplementedError

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
        self.message = chat.Message()
        self.reason: str | None = None
        self.failure: str | None = None

    def piece(self, text: str) -> None:
        self.pieces.append(text)

    def delta(self, delta: dict) -> None:
        self.message.add(delta)

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
    body = api.completion_body(req, text, output.reason, output.prompt_n, output.generated, output.cached_n)
    if output.parser is not None:
        output.message.fill(body["choices"][0]["message"])
    return _json(200, body)


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

    def delta(self, delta: dict) -> None:
        if "content" in delta:
            self.piece(delta["content"])
            return
        body = api.chunk_body(self.req, None, None)
        body["choices"][0]["delta"] = delta
        self._event(body)

    def end(self, reason: str) -> None:
        req = self.req
        self._event(api.chunk_body(req, None if req.kind == "chat" else "", reason))
        if req.include_usage:
            self._event(api.usage_chunk(req, self.prompt_n, self.generated, self.cached_n))
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


class _Preparer:
    """Processes that turn large bodies into requests and their prompts' tokens (_prepare_completion and
    _prepare_chat, run in a preparer process), answering only what fits a sequence's context, or an ApiError.

    Processes, not threads: tokenizing (ctypes) and the chat template (bytecode) would give the event loop
    its turn from a thread, but CPython's JSON decoder holds the GIL for a whole body, and 8 MiB of small
    values (a long list of token ids; [[], [], ...]) hold it for up to seconds.
    """

    def __init__(self, config: ServeConfig):
        self.config = config
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            PREPARE_PROCESSES,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_preparer_init,
            initargs=(self.config, os.getpid()),
        )
        for _ in range(PREPARE_PROCESSES):
            pool.submit(os.getpid)  # starts the processes now rather than at the first large request
        return pool

    async def run(self, prepare: Callable[..., Prepared], raw: bytes, charset: str | None) -> Prepared:
        pool = self.pool
        try:
            return await asyncio.wrap_future(pool.submit(_prepare_in_preparer, prepare, raw, charset))
        except BrokenProcessPool as exc:
            if pool is self.pool:
                log.error("a request preparer process died; starting new ones")
                self.pool = self._start()
                pool.shutdown(wait=False)
            raise ApiError(
                503,
                "the process preparing this request died; retry it",
                kind="server_error",
                code="preparer_failed",
                headers={"Retry-After": str(self.config.retry_after)},
            ) from exc

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


_preparer_state: tuple[ServeConfig, Tokenizer] | None = None  # in a preparer process


def _preparer_init(config: ServeConfig, parent: int) -> None:
    global _preparer_state
    _preparer_state = (config, Tokenizer(config.model))
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="parent-watch").start()


def _exit_with(parent: int) -> None:
    """A pool's process waits for work on a queue whose writing end it holds too, so it would outlive a head
    killed outright: it watches for that itself."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _prepare_in_preparer(prepare: Callable[..., Prepared], raw: bytes, charset: str | None) -> Prepared:
    config, tokenizer = _preparer_state
    return prepare(config, tokenizer, raw, charset)


PREPARER = web.AppKey("preparer", _Preparer)


class Connections:
    """The open connections of one listener, with the deadlines and the bound that aiohttp lacks.

    aiohttp closes a connection that holds no whole request keepalive_timeout after it opened or after its
    last response (RequestHandler._process_keepalive), which bounds idle keep-alive; but it has no deadline
    for a request's line and headers, none for its body, and no bound on connections. So:

    - the listener's protocol factory (``protocol_factory``) wraps each of aiohttp's RequestHandlers in a
      _Watched, which notes when its headers are due: header_timeout after the connection opened, or after
      the first byte of a later request on it (bytes that follow do not push that back);
    - ``middleware`` marks a connection in a request from the moment the request reaches the application
      until its handler returns, so a stream, or a long generation answered at its end, is never cut;
    - a sweep over the open connections, SWEEPS_PER_HEADER_TIMEOUT times per header_timeout (and at least
      every second) while any is open, closes those whose headers are overdue: this costs a request two
      assignments, where a timer per connection would be armed and cancelled for every request;
    - the body's deadline is an asyncio.timeout around reading it (_read_body), answered with a 408;
    - past max_connections a new connection gets a fixed 503 (_Refused) and is closed.
    """

    def __init__(self, config: ServeConfig):
        self.header_timeout = config.header_timeout
        self.max_connections = config.max_connections
        self.refusal = _refusal(config)
        self.open: dict[RequestHandler, _Watched] = {}  # by aiohttp's handler, which request.protocol is
        self.sweep_interval = min(1.0, self.header_timeout / SWEEPS_PER_HEADER_TIMEOUT)
        self.sweeping: asyncio.TimerHandle | None = None
        self.warned_at = -REFUSED_WARNING_INTERVAL

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        def protocol() -> asyncio.Protocol:
            if len(self.open) >= self.max_connections:
                now = time.monotonic()
                if now - self.warned_at >= REFUSED_WARNING_INTERVAL:
                    self.warned_at = now
                    log.warning("%d connections are open (--max-connections): refusing more", len(self.open))
                return _Refused(self.refusal, min(REFUSED_LINGER_SECONDS, self.header_timeout))
            return _Watched(self, server())

        return protocol

    def opened(self, watched: _Watched) -> None:
        self.open[watched.handler] = watched
        if self.sweeping is None:
            self.sweeping = watched.loop.call_later(self.sweep_interval, self._sweep, watched.loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for watched in list(self.open.values()):
            if watched.headers_due is not None and watched.headers_due <= now:
                log.debug("closing a connection whose request headers are late (--header-timeout)")
                watched.headers_due = None
                watched.handler.force_close()
        self.sweeping = loop.call_later(self.sweep_interval, self._sweep, loop) if self.open else None

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        watched = self.open.get(request.protocol)
        if watched is None:  # served by another listener
            return await handler(request)
        watched.in_request, watched.headers_due = True, None
        try:
            return await handler(request)
        finally:
            watched.in_request = False  # the next request's headers are due after its first byte


class _Watched(asyncio.Protocol):
    """aiohttp's protocol of one connection, with the time its request's headers are due (see Connections)."""

    def __init__(self, connections: Connections, handler: RequestHandler):
        self.connections, self.handler = connections, handler
        self.loop = asyncio.get_running_loop()
        self.in_request = False
        self.headers_due: float | None = self.loop.time() + connections.header_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connections.opened(self)
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.headers_due is None and not self.in_request:
            self.headers_due = self.loop.time() + self.connections.header_timeout
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.open.pop(self.handler, None)
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


class _Refused(asyncio.Protocol):
    """A connection over --max-connections: answered at once with a 503, then closed."""

    def __init__(self, answer: bytes, linger: float):
        self.answer, self.linger = answer, linger
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.answer)
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(self.linger, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is read and dropped: see REFUSED_LINGER_SECONDS

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


CONNECTIONS = web.AppKey("connections", Connections)


def _refusal(config: ServeConfig) -> bytes:
    error = ApiError(
        503,
        f"the server has {config.max_connections} open connections, its --max-connections; retry later",
        kind="server_error",
        code="too_many_connections",
    )
    body = json.dumps(error.body()).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {config.retry_after}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def build_app(config: ServeConfig, registry: CollectorRegistry | None = None) -> web.Application:
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    connections = Connections(config)
    app = web.Application(
        middlewares=[connections.middleware, errors_and_metrics], client_max_size=MAX_BODY_BYTES
    )
    app[CONFIG] = config
    app[METRICS] = metrics
    app[CONNECTIONS] = connections
    app[TOKENIZER] = Tokenizer(config.model)
    app[SUPERVISOR] = Supervisor(config, metrics)
    app[PREPARER] = _Preparer(config)
    app["started"] = time.time()
    app.on_response_prepare.append(_add_cors_headers)
    app.on_response_prepare.append(_add_degradation_header)
    app.router.add_get("/v1/models", models)
    # A model id may hold slashes (--alias Qwen/Qwen3-30B-A3B).
    app.router.add_get("/v1/models/{model:.+}", model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_post("/admin/drain", admin_drain)
    app.router.add_post("/admin/resume", admin_resume)

    async def lifecycle(app: web.Application):
        await app[SUPERVISOR].start()
        yield
        await app[SUPERVISOR].close()
        app[PREPARER].close()

    app.cleanup_ctx.append(lifecycle)
    return app


def metrics_app(app: web.Application) -> web.Application:
    """A second listener for /metrics and the admin endpoints (which take the API key), for a port that the
    firewall opens to monitoring and the operators' hosts only."""
    connections = Connections(app[CONFIG])
    side = web.Application(middlewares=[connections.middleware])
    side[CONFIG] = app[CONFIG]
    side[METRICS] = app[METRICS]
    side[SUPERVISOR] = app[SUPERVISOR]
    side[CONNECTIONS] = connections
    side.router.add_get("/metrics", metrics_endpoint)
    side.router.add_post("/admin/drain", admin_drain)
    side.router.add_post("/admin/resume", admin_resume)
    return side


async def _listen(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, asyncio.Server]:
    """Serves the app on host:port. The listening socket is opened here rather than by web.TCPSite, whose
    protocol factory is aiohttp's alone, so that the app's Connections sees every connection."""
    config = app[CONFIG]
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        keepalive_timeout=config.keepalive_timeout,
        lingering_time=min(LINGERING_SECONDS, config.body_timeout),
    )
    await runner.setup()
    factory = app[CONNECTIONS].protocol_factory(runner.server)
    listener = await asyncio.get_running_loop().create_server(factory, host, port, backlog=128)
    return runner, listener


async def serve(config: ServeConfig) -> None:
    app = build_app(config)
    served = [await _listen(app, config.host, config.port)]
    if config.metrics_port is not None:
        served.append(await _listen(metrics_app(app), config.host, config.metrics_port))
    log.info("serving %s on http://%s:%d", config.model_alias, config.host, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for runner, listener in reversed(served):
        listener.close()
        await runner.cleanup()
