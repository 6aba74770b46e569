"""The RPC worker's own HTTP endpoint: ``/health`` and Prometheus ``/metrics``.

The RPC port serves one client at a time (the head), so a probe of it would queue behind the head; this
endpoint answers on a port of its own, from a thread of the worker process, while llama.cpp's C server runs.
That server keeps no counters, so the figures come from the kernel: the connection to the RPC port and its
TCP_INFO (bytes each way, time since data last arrived), sampled every second, and the process's CPU time
and memory (prometheus_client's process collector; the worker spends its CPU time computing).
Not counted: RPC commands, which only the C server sees.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from inference.worker import process_tcp_sockets

log = logging.getLogger("inference.worker")

SAMPLE_INTERVAL_S = 1.0

# struct tcp_info (linux/tcp.h): tcpi_last_data_recv (u32, ms) at byte 52, tcpi_rtt (u32, us) at 68,
# tcpi_bytes_acked (u64) at 120, tcpi_bytes_received (u64) at 128; present since Linux 4.2.
_TCP_INFO_SIZE = 136


@dataclass(frozen=True)
class TcpInfo:
    bytes_sent: int  # acknowledged by the peer
    bytes_received: int
    idle_ms: int  # since data last arrived
    rtt_us: int


def tcp_info(sock: socket.socket) -> TcpInfo:
    """The kernel's TCP_INFO of a connected socket. Raises OSError for a socket that has none."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    if len(raw) < _TCP_INFO_SIZE:
        raise OSError(f"TCP_INFO has {len(raw)} bytes, this kernel is older than Linux 4.2")
    (idle_ms,) = struct.unpack_from("I", raw, 52)
    (rtt_us,) = struct.unpack_from("I", raw, 68)
    sent, received = struct.unpack_from("QQ", raw, 120)
    return TcpInfo(sent, received, idle_ms, rtt_us)


def rpc_connections(port: int) -> dict[str, TcpInfo]:
    """The established connections to this process's ``port`` (the head's): peer "address:port" -> TCP_INFO."""
    found = {}
    for sock in process_tcp_sockets():
        with sock:
            try:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) or sock.getsockname()[1] != port:
                    continue
                peer = sock.getpeername()
                found[f"{peer[0]}:{peer[1]}"] = tcp_info(sock)
            except OSError:  # not connected
                continue
    return found


class RpcTraffic:
    """Totals over every connection the RPC port has had, from samples of the open ones (a connection's last
    second before it closed may be missed)."""

    def __init__(self, port: int, sample: Callable[[int], dict[str, TcpInfo]] = rpc_connections):
        self.port = port
        self._sample = sample
        self._lock = threading.Lock()
        self._open: dict[str, TcpInfo] = {}
        self._closed_sent = 0
        self._closed_received = 0
        self.connections = 0

    def update(self) -> None:
        now = self._sample(self.port)
        with self._lock:
            for peer, info in self._open.items():
                if peer not in now:
                    self._closed_sent += info.bytes_sent
                    self._closed_received += info.bytes_received
            self.connections += sum(1 for peer in now if peer not in self._open)
            self._open = now

    def totals(self) -> tuple[int, int]:
        """Bytes sent and received over the RPC port since the worker started."""
        with self._lock:
            sent = self._closed_sent + sum(info.bytes_sent for info in self._open.values())
            received = self._closed_received + sum(info.bytes_received for info in self._open.values())
        return sent, received

    def client(self) -> tuple[str, TcpInfo] | None:
        """The connected head, if any."""
        with self._lock:
            return next(iter(self._open.items()), None)


class _TrafficCollector(Collector):
    """The RPC port's byte and connection counters, read from RpcTraffic at each scrape."""

    def __init__(self, traffic: RpcTraffic):
        self.traffic = traffic

    def collect(self):
        sent, received = self.traffic.totals()
        for name, doc, value in (
            ("llmfleet_worker_rpc_sent_bytes", "Bytes sent to heads over the RPC port (acknowledged).", sent),
            ("llmfleet_worker_rpc_received_bytes", "Bytes received from heads over the RPC port.", received),
            (
                "llmfleet_worker_rpc_connections",
                "Connections of heads to the RPC port.",
                self.traffic.connections,
            ),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family


def build_registry(traffic: RpcTraffic, endpoint: str, protocol: str) -> CollectorRegistry:
    """The worker's metrics: its identity, the head's connection and traffic, and the process's CPU time and
    memory."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(_TrafficCollector(traffic))
    info = Gauge(
        "llmfleet_worker_info",
        "1, with the worker's RPC endpoint and protocol version.",
        ["endpoint", "protocol"],
        registry=registry,
    )
    info.labels(endpoint, protocol).set(1)
    connected = Gauge(
        "llmfleet_worker_client_connected", "1 while a head is connected to the RPC port.", registry=registry
    )
    connected.set_function(lambda: 1 if traffic.client() else 0)
    idle = Gauge(
        "llmfleet_worker_client_idle_seconds",
        "Since the connected head last sent data (0 without a head).",
        registry=registry,
    )
    idle.set_function(lambda: (c[1].idle_ms / 1000) if (c := traffic.client()) else 0)
    rtt = Gauge(
        "llmfleet_worker_client_rtt_seconds",
        "The kernel's smoothed round-trip time to the connected head (0 without a head).",
        registry=registry,
    )
    rtt.set_function(lambda: (c[1].rtt_us / 1e6) if (c := traffic.client()) else 0)
    return registry


def _app(traffic: RpcTraffic, registry: CollectorRegistry, endpoint: str, protocol: str) -> web.Application:
    async def health(_request: web.Request) -> web.Response:
        client = traffic.client()
        return web.json_response(
            {
                "status": "ok",
                "endpoint": endpoint,
                "protocol": protocol,
                "client": client[0] if client else None,
            }
        )

    async def metrics(_request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


def start(host: str, port: int, rpc_port: int, endpoint: str, protocol: str) -> threading.Thread:
    """Serve /health and /metrics on ``host``:``port`` from a daemon thread, and sample the RPC port's
    connection every SAMPLE_INTERVAL_S. Raises OSError when the port cannot be bound."""
    traffic = RpcTraffic(rpc_port)
    registry = build_registry(traffic, endpoint, protocol)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(_app(traffic, registry, endpoint, protocol), access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, host, port).start())  # raises here, in the caller

    def sample() -> None:
        while True:
            try:
                traffic.update()
            except Exception:  # the sampler must outlive any one bad sample
                log.exception("could not sample the RPC port's connections")
            time.sleep(SAMPLE_INTERVAL_S)

    threading.Thread(target=sample, daemon=True, name="worker-metrics-sample").start()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="worker-metrics")
    thread.start()
    log.info("health and metrics on http://%s:%d/health and /metrics", host, port)
    return thread
