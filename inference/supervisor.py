"""Keeps an engine process running and feeds it requests: admission, the bounded queue, worker loss and recovery.

All methods run on the server's asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import multiprocessing
import os
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Protocol

from inference import degrade
from inference import engine as engine_module
from inference.config import ServeConfig, split_endpoint
from inference.engine import SamplingParams
from inference.metrics import Metrics
from inference.worker import rpc_hello, version_problem

log = logging.getLogger("inference.supervisor")

HELLO_TIMEOUT = 3.0
RECOVERY_INTERVAL = 1.0
# An engine that fails before it is ready (a shard that does not fit, a bad model, a worker of another
# build) would fail the same way again: wait twice as long after each such failure, up to this.
MAX_RESTART_BACKOFF = 60.0
# A degradation step that reloads the model waits this long for the running sequences (capped at the
# level's max_tokens by then) before it stops the engine, failing what still runs; queued requests wait.
RELOAD_DRAIN_WAIT = 120.0
RELOAD_DRAIN_LEASE = 900.0


class Unavailable(Exception):
    """The engine cannot take requests now (loading, or waiting for a lost worker)."""


class QueueFull(Exception):
    pass


class Output(Protocol):
    """Where a request's tokens go. Called on the loop, straight from the engine pipe's callback, so that a
    streamed token costs no task switch: cached() at most once, before the first token(); token() for each,
    then finish() or fail() once."""

    def cached(self, tokens: int) -> None:
        """How many of the prompt's tokens were reused from the KV cache rather than computed."""

    def token(self, token: int) -> None: ...

    def finish(self, reason: str) -> None: ...

    def fail(self, message: str) -> None: ...


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    output: Output
    created: float = field(default_factory=time.monotonic)
    id: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    generated: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache, once the engine admitted the request
    finished: bool = False


@dataclass
class WorkerState:
    endpoint: str
    up: bool | None = None
    connected: bool = False
    version: str | None = None
    detail: str = ""


class Supervisor:
    def __init__(self, config: ServeConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.state = "loading"
        self.detail = "starting the engine"
        self.workers = {ep: WorkerState(ep) for ep in config.rpc}
        self.engine_info: dict = {}
        self.waiting: deque[Request] = deque()
        self.active: dict[int, Request] = {}
        self._ids = itertools.count(1)
        self._process = None
        self._conn = None
        self._reader = engine_module.MessageReader()
        self._outbox: queue.SimpleQueue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._recovering = False
        self._closing = False
        self._fatal: str | None = None  # what the engine said before it exited
        self._engine_was_ready = False
        self._failed_starts = 0  # engines in a row that exited before they were ready
        self.ready = asyncio.Event()
        # The engine's own settings: the configured ones, with fewer experts at a degradation level.
        self.engine_config = config
        self.ladder: degrade.Ladder | None = None
        if config.degrade_target_ms_per_token > 0:
            self.ladder = degrade.Ladder(
                config.degrade_target_ms_per_token,
                config.degrade_window,
                degrade.levels(config.degrade_max_tokens, None, config.experts_used),
            )
        self._resume_when_ready = False
        self._reloading = False
        metrics.degradation_level.set(0)
        # Drained: no new sequence enters the engine; requests wait in the queue, even through an engine restart
        # (a worker restarted on purpose), until resume() or the lease ends.
        self.draining = False
        self._drain_lease: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.kv_tokens = 0  # as the engine last reported; read by the gauges when scraped
        metrics.kv_cache_tokens.set_function(lambda: self.kv_tokens)
        metrics.kv_cache_usage.set_function(lambda: self.kv_tokens / config.ctx)
        metrics.set_state(self.state)

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.config.rpc:
            await self._probe_all()
        if all(w.up for w in self.workers.values()):
            self._spawn()
        else:
            self._enter_degraded("waiting for RPC workers: " + ", ".join(self._down()))
        self._background(self._watch_workers())
        if self.ladder is not None:
            self._background(self._watch_speed())

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        self._send(("stop",))
        self._reap(timeout=5.0)

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_state(self, state: str, detail: str) -> None:
        self.state, self.detail = state, detail
        self.metrics.set_state(state)
        if state == "ok":
            self.ready.set()
        else:
            self.ready.clear()

    def _spawn(self) -> None:
        # ggml would otherwise attach gdb to print a backtrace when a worker is lost, delaying recovery.
        os.environ.setdefault("GGML_NO_BACKTRACE", "1")
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=engine_module.run, args=(self.engine_config, child), name="llmfleet-engine"
        )
        process.daemon = True
        process.start()
        child.close()
        self._process, self._conn = process, parent
        self._reader = engine_module.MessageReader()
        self._fatal, self._engine_was_ready = None, False
        # A long prompt can outgrow the pipe while the engine is mid-step; a sender thread keeps the event
        # loop from blocking on it and keeps messages in order.
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox = outbox
        threading.Thread(target=_pump, args=(outbox, parent), daemon=True, name="engine-sender").start()
        self._loop.add_reader(parent.fileno(), self._on_readable)
        self._set_state("loading", "loading the model")
        log.info("engine process %d started", process.pid)

    def _send(self, message: tuple) -> None:
        if self._outbox is not None:
            self._outbox.put(message)

    def _reap(self, timeout: float = 0.0) -> int | None:
        if self._conn is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._conn.fileno())
            self._outbox.put(None)
            self._outbox = None
            self._conn = None
        code = None
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5.0)
            code = self._process.exitcode
            self._process = None
        return code

    # -- messages from the engine -------------------------------------------------------------------------
    def _on_readable(self) -> None:
        if self._conn is None:
            return
        try:
            data = os.read(self._conn.fileno(), 1 << 16)
        except OSError:
            data = b""
        if not data:
            self._engine_lost()
            return
        for message in self._reader.feed(data):
            self._handle(message)

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "step":
            _, results, (self.kv_tokens, _active, admitted) = message
            for request_id, cached in admitted:
                request = self.active.get(request_id)
                if request is None:
                    continue
                request.cached_tokens = cached
                self.metrics.prompt_tokens_cached.inc(cached)
                with contextlib.suppress(Exception):  # a failing output fails at its first token below
                    request.output.cached(cached)
            now = time.monotonic()
            for request_id, token, finish in results:
                request = self.active.get(request_id)
                if request is None:
                    continue
                try:
                    if token >= 0:
                        self._deliver_token(request, token, now)
                    if finish:
                        self._finish(request)
                        if finish.startswith("error:"):
                            request.output.fail(finish.removeprefix("error:"))
                        else:
                            request.output.finish(finish)
                except Exception:
                    # One request's output must not cost the others the rest of this step.
                    log.exception("delivering to request %d failed; cancelling it", request_id)
                    self.cancel(request)
                    with contextlib.suppress(Exception):
                        request.output.fail("internal error while sending the reply; see the server log")
        elif kind == "ready":
            self.engine_info = message[1]
            self._engine_was_ready, self._failed_starts = True, 0
            for worker in self.workers.values():
                worker.connected, worker.up = True, True
                self.metrics.worker_up.labels(worker.endpoint).set(1)
            self._set_state("ok", "serving")
            log.info("engine ready: %s", self.engine_info)
            if self.ladder is not None and self.ladder.level <= 1:
                # The expert levels follow the model's own count, known once it is loaded.
                self.ladder.rungs = degrade.levels(
                    self.config.degrade_max_tokens,
                    self.engine_info.get("model_experts_used"),
                    self.config.experts_used,
                )
            if self._resume_when_ready:
                self._resume_when_ready = False
                self.resume()
            self._dispatch()
        elif kind == "fatal":
            self._fatal = message[1]
            log.error("engine failed: %s", message[1])

    def _deliver_token(self, request: Request, token: int, now: float) -> None:
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.time_to_first_token.observe(now - request.created)
        else:
            self.metrics.time_per_output_token.observe(now - request.last_token_at)
            if self.ladder is not None:
                self.ladder.observe(now, now - request.last_token_at)
        request.last_token_at = now
        request.generated += 1
        self.metrics.completion_tokens.inc()
        request.output.token(token)

    def _finish(self, request: Request) -> None:
        request.finished = True
        self.active.pop(request.id, None)
        self.metrics.active_sequences.set(len(self.active))
        self._dispatch()

    # -- admission ----------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, output: Output) -> Request:
        if self.state != "ok" and not self.draining:
            raise Unavailable(self.detail)
        if len(self.active) >= self.config.parallel and len(self.waiting) >= self.config.queue_size:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting")
        cap = self.ladder.current.max_tokens if self.ladder is not None else None
        if cap is not None and params.max_tokens > cap:
            params = replace(params, max_tokens=cap)
        request = Request(prompt=prompt, params=params, output=output, id=next(self._ids))
        self.metrics.prompt_tokens.inc(len(prompt))
        self.waiting.append(request)
        self._dispatch()
        return request

    def cancel(self, request: Request) -> None:
        """The client went away or a stop string matched: free the request's sequence."""
        if request.finished:
            return
        request.finished = True
        if request.id in self.active:
            del self.active[request.id]
            self._send(("cancel", request.id))
            self.metrics.active_sequences.set(len(self.active))
            self._dispatch()
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(request)
            self.metrics.queue_depth.set(len(self.waiting))

    def _dispatch(self) -> None:
        while (
            self.state == "ok"
            and not self.draining
            and self.waiting
            and len(self.active) < self.config.parallel
        ):
            request = self.waiting.popleft()
            self.active[request.id] = request
            self._send(("submit", request.id, request.prompt, request.params))
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.active_sequences.set(len(self.active))
        if self.active:
            self._idle.clear()
        else:
            self._idle.set()

    # -- draining, for a planned worker or head restart ---------------------------------------------------
    async def drain(self, lease: float, wait: float) -> bool:
        """Stop admitting sequences to the engine and wait up to ``wait`` seconds for the running ones to
        finish; True once none runs. New requests queue meanwhile. The drain ends by itself after ``lease``
        seconds, so a run that dies half-way does not leave the head holding every request."""
        self.draining = True
        if self._drain_lease is not None:
            self._drain_lease.cancel()
        self._drain_lease = self._loop.call_later(lease, self._lease_ended)
        log.info("draining: no new sequences for up to %g s; %d running", lease, len(self.active))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._idle.wait()
        return not self.active

    def resume(self) -> None:
        """Admit queued requests again."""
        if self._drain_lease is not None:
            self._drain_lease.cancel()
            self._drain_lease = None
        if self.draining:
            log.info("resuming: %d requests waited", len(self.waiting))
        self.draining = False
        self._dispatch()

    def _lease_ended(self) -> None:
        self._drain_lease = None
        log.warning("the drain lease ended without a resume; admitting requests again")
        self.resume()

    # -- automatic degradation ----------------------------------------------------------------------------
    async def _watch_speed(self) -> None:
        """Every quarter window (at most 5 s), let the ladder judge the time per output token."""
        interval = min(5.0, self.ladder.window_s / 4)
        while not self._closing:
            await asyncio.sleep(interval)
            if self.state != "ok" or self.draining or self._reloading:
                continue
            before = self.ladder.current
            level = self.ladder.decide(time.monotonic())
            if level is None:
                continue
            log.warning(
                "degradation level %d -> %d (%s): %s",
                before.index,
                level.index,
                level.describe(),
                self.ladder.reason,
            )
            self.metrics.degradation_level.set(level.index)
            if level.experts_used != self.engine_config.experts_used:
                self._reloading = True
                self._background(self._reload(replace(self.config, experts_used=level.experts_used)))

    async def _reload(self, config: ServeConfig) -> None:
        """Restart the engine with ``config``: drain (queued requests wait, running ones finish), stop the
        engine, start the new one, resume once it is ready. RPC workers keep the weights' tensor cache, so a
        reload sends hashes instead of the weights where the workers run with --cache-dir."""
        try:
            drained = await self.drain(RELOAD_DRAIN_LEASE, RELOAD_DRAIN_WAIT)
            if self._closing:
                return
            log.info(
                "reloading the engine with %s experts per token%s",
                config.experts_used or "the model's",
                "" if drained else f"; {len(self.active)} sequences still running are failed",
            )
            # The old engine's exit is not a loss: stop reading it first.
            if self._conn is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(self._conn.fileno())
            self._send(("stop",))
            if self._process is not None:
                await asyncio.to_thread(self._process.join, 30.0)
            self._reap(timeout=5.0)
            self.kv_tokens = 0
            reason = "the engine reloaded for a degradation step before this request finished"
            for request in list(self.active.values()):
                request.finished = True
                with contextlib.suppress(Exception):
                    request.output.fail(reason)
            self.active.clear()
            self.engine_config = config
            self._resume_when_ready = True
            self._spawn()
        finally:
            self._reloading = False

    def degradation(self) -> dict | None:
        """The ladder's state for /health: None when automatic degradation is off."""
        if self.ladder is None:
            return None
        level = self.ladder.current
        return {
            "level": level.index,
            "levels": len(self.ladder.rungs),
            "max_tokens": level.max_tokens,
            "experts_used": level.experts_used,
            "target_ms_per_token": self.ladder.target_ms,
            "window_s": self.ladder.window_s,
            "reason": self.ladder.reason,
        }

    # -- worker loss and recovery -------------------------------------------------------------------------
    def _engine_lost(self) -> None:
        code = self._reap()
        self.kv_tokens = 0
        if self._closing:
            return
        self.metrics.engine_restarts.inc()
        cause = self._fatal or f"the engine process exited with code {code}"
        if not self._engine_was_ready:
            self._failed_starts += 1
        self._set_state("degraded", cause)
        for worker in self.workers.values():
            worker.connected = False
        self._background(self._after_loss(cause))

    async def _after_loss(self, cause: str) -> None:
        await self._probe_all()
        lost = self._down()
        if lost:
            reason = (
                f"lost RPC worker {self._down_with_reasons()}; the engine restarts once it answers again "
                f"({cause})"
            )
        elif self._failed_starts:
            reason = f"the engine failed to start: {cause}"
        else:
            reason = f"the engine stopped: {cause}"
        log.error("engine down: %s", reason)
        self._enter_degraded(reason)

    def _enter_degraded(self, reason: str) -> None:
        self._set_state("degraded", reason)
        # A drained head keeps its queue through the restart it was drained for.
        lost = list(self.active.values()) + ([] if self.draining else list(self.waiting))
        self.active.clear()
        if not self.draining:
            self.waiting.clear()
        self._idle.set()
        for request in lost:
            request.finished = True
            request.output.fail(reason)
        self.metrics.active_sequences.set(0)
        self.metrics.queue_depth.set(len(self.waiting))
        if not self._recovering:
            self._recovering = True
            self._background(self._recover())

    def restart_delay(self) -> float:
        """Seconds before the next engine start: RECOVERY_INTERVAL, doubled for each engine in a row that
        failed before it was ready, up to MAX_RESTART_BACKOFF."""
        if not self._failed_starts:
            return RECOVERY_INTERVAL
        return min(MAX_RESTART_BACKOFF, RECOVERY_INTERVAL * 2 ** (self._failed_starts - 1))

    async def _recover(self) -> None:
        try:
            failure = self.detail
            delay = self.restart_delay()
            if self._failed_starts:
                self.detail = f"{failure}; retrying in {delay:g} s"
                log.error("%s", self.detail)
            while not self._closing:
                await asyncio.sleep(delay)
                delay = RECOVERY_INTERVAL
                await self._probe_all()
                down = self._down()
                if down:
                    self.detail = "waiting for RPC workers: " + self._down_with_reasons()
                    if self._failed_starts:
                        self.detail += f"; the last engine failed: {failure}"
                    continue
                log.info("all RPC workers answer; starting a new engine")
                self._spawn()
                if self._failed_starts:
                    self.detail = f"loading the model; the last engine failed: {failure}"
                return
        finally:
            self._recovering = False

    def _down(self) -> list[str]:
        return [w.endpoint for w in self.workers.values() if not w.up]

    def _down_with_reasons(self) -> str:
        """``endpoint (why), ...`` of the workers that are down."""
        return ", ".join(
            f"{w.endpoint} ({w.detail})" if w.detail else w.endpoint
            for w in self.workers.values()
            if not w.up
        )

    async def _probe_all(self) -> None:
        await asyncio.gather(*(self._probe_hello(w) for w in self.workers.values()))

    async def _probe_hello(self, worker: WorkerState) -> None:
        host, port = split_endpoint(worker.endpoint)
        try:
            version = await asyncio.to_thread(rpc_hello, host, port, HELLO_TIMEOUT)
        except TimeoutError:
            worker.up = False
            worker.detail = (
                f"no answer to the RPC hello within {HELLO_TIMEOUT:g} s: the worker hangs, serves another "
                "client, or cannot be reached"
            )
        except OSError as exc:
            worker.up, worker.detail = False, exc.strerror or str(exc)
        else:
            worker.version = "{}.{}.{}".format(*version)
            problem = version_problem(worker.endpoint, version)
            # A worker of another build is a configuration error: an engine would abort on it, so none starts.
            worker.up, worker.detail = problem is None, problem or ""
        self.metrics.worker_up.labels(worker.endpoint).set(1 if worker.up else 0)

    async def _watch_workers(self) -> None:
        """While the engine holds the workers' only connection, a hello would wait; a refused connect means the
        worker process is gone, and the engine would abort on its next step anyway: restart it now."""
        while not self._closing:
            await asyncio.sleep(self.config.worker_probe_interval)
            if self.state != "ok":
                continue
            refused = [
                w for w in self.workers.values() if await asyncio.to_thread(_connect_refused, w.endpoint)
            ]
            for worker in refused:
                worker.up, worker.connected, worker.detail = False, False, "connection refused"
                self.metrics.worker_up.labels(worker.endpoint).set(0)
            if refused and self._process is not None:
                log.error("RPC worker %s refuses connections; restarting the engine", refused[0].endpoint)
                self._process.kill()

    def health(self) -> dict:
        return {
            "status": self.state,
            "detail": self.detail,
            "draining": self.draining,
            "model": self.config.model_alias,
            "workers": [
                {
                    "endpoint": w.endpoint,
                    "up": bool(w.up),
                    "connected": w.connected and self.state == "ok",
                    "protocol": w.version,
                    "detail": w.detail,
                }
                for w in self.workers.values()
            ],
            "slots": {
                "total": self.config.parallel,
                "active": len(self.active),
                "waiting": len(self.waiting),
            },
            "engine": self.engine_info if self.state == "ok" else {},
            "degradation": self.degradation(),
        }


def _connect_refused(endpoint: str) -> bool:
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError as exc:
        return exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH)


def _pump(outbox: queue.SimpleQueue, conn) -> None:
    """Sends queued messages to the engine until told to stop (None), then closes the connection."""
    try:
        while (message := outbox.get()) is not None:
            conn.send(message)
            if message == ("stop",):
                break
    except OSError:
        pass
    finally:
        conn.close()
