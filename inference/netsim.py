"""A TCP relay that stands in for a network link between the head and an RPC worker.

It counts the bytes each way, the round trips (a turn of the conversation from head to worker and back) and
the time the worker holds each turn (from the turn's first byte delivered to the worker until its answer's
first byte comes back, without the emulated link: the worker's compute and handling of the request, plus any
wait for the rest of the turn when the head sends a command and asks for its result later). It can hold
traffic to a link's one-way delay and rate, e.g. a Raspberry Pi's gigabit Ethernet. It needs no privileges,
unlike netem, and runs on loopback only.

``Relay`` runs in threads of the calling process; ``ProcessRelay`` runs the same relay in a process of its
own, so that several relays (and the benchmark's clients) do not share one interpreter lock, which would
add to every round trip of a busy link; it may be pinned to CPUs of its own choosing (``cpus``), e.g. its
worker's, so that its threads do not take turns with the head's compute threads. ``set_link`` changes the
link model on the fly, e.g. to load a model at loopback speed and then measure decoding over a Pi's link.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

READ_SIZE = 1 << 16


@dataclass
class LinkStats:
    to_worker: int = 0
    to_head: int = 0
    round_trips: int = 0
    worker_ns: int = 0  # nanoseconds the worker held its turns, see the module's docstring
    _last_direction: str = field(default="", repr=False)
    _turn_start: float | None = field(default=None, repr=False)

    def record(self, direction: str, n: int) -> None:
        """``n`` bytes read from the head (``to_worker``) or from the worker (``to_head``)."""
        if direction == "to_worker":
            self.to_worker += n
        else:
            self.to_head += n
            if self._last_direction == "to_worker":
                self.round_trips += 1
            if self._turn_start is not None:
                self.worker_ns += int((time.monotonic() - self._turn_start) * 1e9)
                self._turn_start = None
        self._last_direction = direction

    def delivered(self, direction: str) -> None:
        """Bytes were just written to the worker (``to_worker``) or to the head."""
        if direction == "to_worker" and self._turn_start is None:
            self._turn_start = time.monotonic()

    def snapshot(self) -> dict:
        """Totals since the relay started: bytes each way, round trips, and seconds the worker held its turns."""
        return {
            "to_worker": self.to_worker,
            "to_head": self.to_head,
            "round_trips": self.round_trips,
            "worker_s": self.worker_ns / 1e9,
        }


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
    """Listens on 127.0.0.1:<port> and relays to ``upstream`` (host, port), in threads of its own.

    Each direction of a connection has a reader thread, which counts and timestamps what arrives, and a
    writer thread, which sends each chunk when the link model lets it leave. Threads sleeping in
    ``time.sleep`` wake within tens of microseconds; an event loop's timers round up to whole milliseconds,
    which would turn a Pi's 0.15 ms one-way delay into 1 ms and swamp a protocol that makes hundreds of
    round trips a token.
    """

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
        self._lock = threading.Lock()  # the stats, and the list of open sockets
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]

    def start(self) -> Relay:
        self._spawn(self._accept, f"relay-{self.upstream[1]}")
        return self

    def stop(self) -> None:
        """Close the listener and every relayed connection, and wait for the threads."""
        with self._lock:
            self._stopping = True
            sockets = [self._listener, *self._sockets]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in list(self._threads):
            thread.join(10)

    def set_link(self, delay_ms: float = 0.0, rate_mbit: float | None = None) -> None:
        """Model another link from the next chunk on (connections already open included)."""
        self.delay_s = delay_ms / 1000.0
        self.rate_bps = rate_mbit * 1e6 if rate_mbit else None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=name)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                head, _ = self._listener.accept()
            except OSError:  # the relay stops
                return
            try:
                worker = socket.create_connection(self.upstream, timeout=10)
            except OSError:  # refused: the head sees its connection closed
                head.close()
                continue
            worker.settimeout(None)
            for sock in (head, worker):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopping:
                    head.close()
                    worker.close()
                    return
                self._sockets += [head, worker]
            done = threading.Semaphore(0)  # released by each direction once it has delivered its last byte
            self._pipe(head, worker, "to_worker", done)
            self._pipe(worker, head, "to_head", done)
            self._spawn(self._close_when_done, "relay-close", done, head, worker)

    def _close_when_done(self, done: threading.Semaphore, *sockets: socket.socket) -> None:
        done.acquire()
        done.acquire()
        with self._lock:
            for sock in sockets:
                sock.close()
                if sock in self._sockets:
                    self._sockets.remove(sock)

    def _pipe(
        self, source: socket.socket, sink: socket.socket, direction: str, done: threading.Semaphore
    ) -> None:
        link = Link(self.delay_s, self.rate_bps)
        pending: queue.SimpleQueue = queue.SimpleQueue()
        shaped = False  # once data has gone through the queue, later data must not overtake it

        def send(data: bytes) -> bool:
            try:
                sink.sendall(data)
            except OSError:
                return False
            with self._lock:
                self.stats.delivered(direction)
            return True

        def read() -> None:
            nonlocal shaped
            try:
                while data := source.recv(READ_SIZE):
                    now = time.monotonic()
                    with self._lock:
                        self.stats.record(direction, len(data))
                    shaped = shaped or bool(self.delay_s or self.rate_bps)
                    if shaped:
                        link.delay_s, link.rate_bps = self.delay_s, self.rate_bps
                        pending.put((link.departure(now, len(data)), data))
                    elif not send(data):
                        break
            except OSError:
                pass
            pending.put(None)  # the source closed: deliver what is still on the wire, then close

        def write() -> None:
            while (item := pending.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not send(data):
                    break
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            done.release()

        self._spawn(read, f"relay-{direction}-read")
        self._spawn(write, f"relay-{direction}-write")


class SharedStats(LinkStats):
    """LinkStats whose counts live in shared memory, written by a relay process and read by its parent."""

    def __init__(self, counters):
        super().__init__()
        self._counters = counters  # multiprocessing Array('q', 4): to_worker, to_head, round_trips, worker_ns

    def record(self, direction: str, n: int) -> None:
        super().record(direction, n)
        c = self._counters
        c[0], c[1], c[2], c[3] = self.to_worker, self.to_head, self.round_trips, self.worker_ns

    def snapshot(self) -> dict:
        to_worker, to_head, round_trips, worker_ns = self._counters[:]
        return {
            "to_worker": to_worker,
            "to_head": to_head,
            "round_trips": round_trips,
            "worker_s": worker_ns / 1e9,
        }


def _relay_process(upstream, delay_ms, rate_mbit, counters, link, conn, cpus) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
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
    """A Relay in a process of its own, with the same interface: start, stop, port, endpoint, stats, set_link.

    ``cpus``: the CPU numbers the relay process runs on (``os.sched_setaffinity``); None keeps the caller's.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        delay_ms: float = 0.0,
        rate_mbit: float | None = None,
        cpus: set[int] | None = None,
    ):
        ctx = multiprocessing.get_context("spawn")
        self.upstream = upstream
        self._counters = ctx.Array("q", 4, lock=False)
        self._link = ctx.Array("d", [delay_ms, rate_mbit or 0.0], lock=False)
        self.stats = SharedStats(self._counters)
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_relay_process,
            args=(upstream, delay_ms, rate_mbit, self._counters, self._link, child, cpus),
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

    @property
    def pid(self) -> int | None:
        """The relay process's id once started."""
        return self._process.pid

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


def _echo(server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(READ_SIZE):
            conn.sendall(data)


def median_round_trip(delay_ms: float = 0.0, rate_mbit: float | None = None, pings: int = 200) -> float:
    """Median seconds for a 64-byte ping and its echo through a ``ProcessRelay`` modelling the link: the
    modelled round trip (2 x delay_ms) plus what the relay itself adds on this machine."""
    server = socket.create_server(("127.0.0.1", 0))
    echo = threading.Thread(target=_echo, args=(server,), daemon=True)
    echo.start()
    relay = ProcessRelay(server.getsockname(), delay_ms, rate_mbit).start()
    times = []
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(pings):
                started = time.monotonic()
                sock.sendall(b"p" * 64)
                got = 0
                while got < 64:
                    got += len(sock.recv(READ_SIZE))
                times.append(time.monotonic() - started)
    finally:
        relay.stop()
        server.close()
    times.sort()
    return times[len(times) // 2]
