"""The link relay used by benchmarks: it must count truthfully and hold traffic to the link it models."""

from __future__ import annotations

import os
import socket
import threading
import time

from inference.netsim import Link, ProcessRelay, Relay, median_round_trip


def _echo_server(think_s: float = 0.0) -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                time.sleep(think_s)
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def _exchange(port: int, payloads: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for payload in payloads:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += sock.recv(65536)
            assert got == payload


def test_relay_counts_bytes_and_round_trips():
    server, port = _echo_server()
    relay = Relay(("127.0.0.1", port)).start()
    try:
        _exchange(relay.port, [b"x" * 1000, b"y" * 3000, b"z" * 10])
        deadline = time.monotonic() + 5
        while relay.stats.to_head < 4010 and time.monotonic() < deadline:
            time.sleep(0.01)
        counts = relay.stats.snapshot()
        assert {k: counts[k] for k in ("to_worker", "to_head", "round_trips")} == {
            "to_worker": 4010,
            "to_head": 4010,
            "round_trips": 3,
        }
    finally:
        relay.stop()
        server.close()


def test_relay_adds_the_link_delay_to_each_round_trip():
    server, port = _echo_server()
    relay = Relay(("127.0.0.1", port), delay_ms=25).start()
    try:
        started = time.monotonic()
        _exchange(relay.port, [b"ping"] * 4)
        elapsed = time.monotonic() - started
        assert elapsed >= 4 * 2 * 0.025
    finally:
        relay.stop()
        server.close()


def test_relay_times_the_workers_turns_without_the_link():
    server, port = _echo_server(think_s=0.05)
    relay = Relay(("127.0.0.1", port), delay_ms=40).start()
    try:
        _exchange(relay.port, [b"ping"] * 3)
        held = relay.stats.snapshot()["worker_s"]
        # three turns of 50 ms at the worker; the 2 x 40 ms a turn spends on the link is not the worker's
        assert 3 * 0.05 <= held < 3 * 0.05 + 3 * 0.04
    finally:
        relay.stop()
        server.close()


def test_link_serialises_chunks_at_its_rate():
    link = Link(delay_s=0.001, rate_bps=8e6)  # one megabyte a second
    first = link.departure(0.0, 1_000_000)
    second = link.departure(0.0, 500_000)
    assert abs(first - 1.001) < 1e-9
    assert abs(second - 1.501) < 1e-9


def _pinger(sock: socket.socket):
    def ping(payload: bytes = b"ping") -> float:
        started = time.monotonic()
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += sock.recv(65536)
        assert got == payload
        return time.monotonic() - started

    return ping


def test_relay_takes_a_new_link_model_on_an_open_connection():
    server, port = _echo_server()
    relay = Relay(("127.0.0.1", port)).start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            ping = _pinger(sock)
            assert ping() < 0.04
            relay.set_link(delay_ms=25)
            assert ping() >= 2 * 0.025
            relay.set_link()  # back to loopback: still in order, and no longer held
            assert ping() < 0.04
    finally:
        relay.stop()
        server.close()


def test_process_relay_counts_in_its_own_process_and_follows_set_link():
    server, port = _echo_server()
    relay = ProcessRelay(("127.0.0.1", port)).start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            ping = _pinger(sock)
            ping(b"x" * 1000)
            ping(b"y" * 3000)
            counts = relay.stats.snapshot()
            assert {k: counts[k] for k in ("to_worker", "to_head", "round_trips")} == {
                "to_worker": 4000,
                "to_head": 4000,
                "round_trips": 2,
            }
            assert 0 < counts["worker_s"] < 1
            relay.set_link(delay_ms=25)
            time.sleep(0.3)  # the relay process polls for link changes
            assert ping() >= 2 * 0.025
    finally:
        relay.stop()
        server.close()


def test_a_sub_millisecond_link_delay_stays_sub_millisecond():
    # A Pi's link: 0.15 ms each way. Timers that round up to whole milliseconds made each round trip take
    # 2-3 ms, which swamped the expert split's one round trip a layer and worker.
    assert median_round_trip(delay_ms=0.15, pings=100) < 0.0015


def test_a_process_relay_runs_on_the_cpus_it_is_given():
    cpu = min(os.sched_getaffinity(0))
    server, port = _echo_server()
    relay = ProcessRelay(("127.0.0.1", port), cpus={cpu}).start()
    try:
        assert os.sched_getaffinity(relay.pid) == {cpu}
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            _pinger(sock)(b"z" * 100)
        assert relay.stats.snapshot()["to_head"] == 100
    finally:
        relay.stop()
        server.close()
