"""A TCP relay that stands in for a network link between the head and an RPC worker.

It counts the bytes each way and the round trips (a turn of the conversation from head to worker and back),
and can hold traffic to a link's one-way delay and rate, e.g. a Raspberry Pi's gigabit Ethernet. It needs
no privileges, unlike netem, and runs on loopback only.

``Relay`` runs in a thread of the calling process; ``ProcessRelay`` runs the same relay in a process of its
own, so that several relays (and the benchmark's clients) do not share one interpreter lock, which would
add to every round trip of a busy link. ``set_link`` changes the link model on the fly, e.g. to load a
model at loopback speed and then measure decoding over a Pi's link.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import time
from dataclasses import dataclass, field

READ_SIZE = 1 << 16


@dataclass
class LinkStats:
    to_worker: int = 0
    to_head: int = 0
    round_trips: int = 0
    _last_direction: str = field(default="", repr=False)

    def record(self, direction: str, n: int) -> None:
        if direction == "to_worker":
            self.to_worker += n
        else:
            self.to_head += n
            if self._last_direction == "to_worker":
                self.round_trips += 1
        self._last_direction = direction

    def snapshot(self) -> dict:
        return {"to_worker": self.to_worker, "to_head": self.to_head, "round_trips": self.round_trips}


class Link:
    """Serialises one direction: each chunk leaves after the delay, no sooner than the rate allows."""

    def __init__(self, delay_s: float, rate_bps: float | None):
        self.delay_s = delay_s
        self.rate_bps = rate_bps
        self.free_at = 0.0

    def departure(self, now: float, size: int) -> float:
        start = max(now, self.free_at)
        busy = size * 8 / self.rate_bps if self.rate_bps else 0.0
        self.free_at = start + busy
        return self.free_at + self.delay_s


class Relay:
    """Listens on 127.0.0.1:<port> and relays to ``upstream`` (host, port), in a thread of its own."""

    def __init__(
        self,
        upstream: tuple[str, int],
        delay_ms: float = 0.0,
        rate_mbit: float | None = None,
        stats: LinkStats | None = None,
    ):
        self.upstream = upstream
        self.delay_s = 0.0
        self.rate_bps: float | None = None
        self.set_link(delay_ms, rate_mbit)
        self.stats = stats if stats is not None else LinkStats()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"relay-{upstream[1]}")

    def start(self) -> Relay:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    def set_link(self, delay_ms: float = 0.0, rate_mbit: float | None = None) -> None:
        """Model another link from the next chunk on (connections already open included)."""
        self.delay_s = delay_ms / 1000.0
        self.rate_bps = rate_mbit * 1e6 if rate_mbit else None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, head_reader, head_writer) -> None:
        try:
            worker_reader, worker_writer = await asyncio.open_connection(*self.upstream)
        except (OSError, asyncio.CancelledError):  # refused, or still waiting when the relay stops
            head_writer.close()
            return
        try:
            await asyncio.gather(
                self._pipe(head_reader, worker_writer, "to_worker"),
                self._pipe(worker_reader, head_writer, "to_head"),
            )
        except asyncio.CancelledError:
            pass  # the relay stops: close both sides quietly
        finally:
            for writer in (head_writer, worker_writer):
                writer.close()
                with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                    await writer.wait_closed()

    async def _pipe(self, reader, writer, direction: str) -> None:
        link = Link(self.delay_s, self.rate_bps)
        pending: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await pending.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        shaped = False  # once data has gone through the queue, later data must not overtake it
        try:
            while data := await reader.read(READ_SIZE):
                self.stats.record(direction, len(data))
                shaped = shaped or bool(self.delay_s or self.rate_bps)
                if shaped:
                    link.delay_s, link.rate_bps = self.delay_s, self.rate_bps
                    await pending.put((link.departure(time.monotonic(), len(data)), data))
                else:
                    writer.write(data)
                    await writer.drain()
            await pending.put(None)
            await sender  # the source closed: deliver what is still on the wire
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await sender
            writer.close()


class SharedStats(LinkStats):
    """LinkStats whose counts live in shared memory, written by a relay process and read by its parent."""

    def __init__(self, counters):
        super().__init__()
        self._counters = counters  # multiprocessing Array('q', 3): to_worker, to_head, round_trips

    def record(self, direction: str, n: int) -> None:
        super().record(direction, n)
        c = self._counters
        c[0], c[1], c[2] = self.to_worker, self.to_head, self.round_trips

    def snapshot(self) -> dict:
        to_worker, to_head, round_trips = self._counters[:]
        return {"to_worker": to_worker, "to_head": to_head, "round_trips": round_trips}


def _relay_process(upstream, delay_ms, rate_mbit, counters, link, conn) -> None:
    relay = Relay(tuple(upstream), delay_ms, rate_mbit, stats=SharedStats(counters)).start()
    conn.send(relay.port)
    applied = (delay_ms, rate_mbit)
    # The parent changes the link through shared memory and stops the relay by closing its end of the pipe.
    while not conn.poll(0.05):
        wanted = (link[0], link[1] or None)
        if wanted != applied:
            relay.set_link(*wanted)
            applied = wanted
    relay.stop()


class ProcessRelay:
    """A Relay in a process of its own, with the same interface: start, stop, port, endpoint, stats, set_link."""

    def __init__(self, upstream: tuple[str, int], delay_ms: float = 0.0, rate_mbit: float | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.upstream = upstream
        self._counters = ctx.Array("q", 3, lock=False)
        self._link = ctx.Array("d", [delay_ms, rate_mbit or 0.0], lock=False)
        self.stats = SharedStats(self._counters)
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_relay_process,
            args=(upstream, delay_ms, rate_mbit, self._counters, self._link, child),
            daemon=True,
            name=f"relay-{upstream[1]}",
        )
        self._child = child
        self.port = 0

    def start(self) -> ProcessRelay:
        self._process.start()
        self._child.close()
        if not self._conn.poll(30):
            raise RuntimeError("the relay process did not start")
        self.port = self._conn.recv()
        return self

    def set_link(self, delay_ms: float = 0.0, rate_mbit: float | None = None) -> None:
        self._link[0], self._link[1] = delay_ms, rate_mbit or 0.0

    def stop(self) -> None:
        if self._process.is_alive():
            self._conn.send("stop")
            self._process.join(15)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        self._conn.close()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"
