"""rpc_worker_info: the ggml RPC protocol spoken to real workers, and to a stand-in for the odd cases."""

from __future__ import annotations

import re
import socket

import pytest
from ansible.module_utils import llmfleet_rpc as rpc

from tests.ansiblerun import adhoc as ansible_adhoc
from tests.inference.conftest import free_port
from tests.modules.fakerpc import FakeRpcServer


@pytest.fixture
def fake():
    servers = []

    def start(**kwargs) -> FakeRpcServer:
        server = FakeRpcServer(**kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def worker_version(worker) -> str:
    return re.search(r"RPC protocol version (\d+\.\d+\.\d+)", worker.output()).group(1)


def test_probe_reads_version_devices_memory_and_round_trips_of_a_real_worker(worker):
    info = rpc.probe("127.0.0.1", worker.port)
    assert info["state"] == "ok", info
    assert info["reachable"] is True and info["busy"] is False
    assert info["protocol_version"] == worker_version(worker)
    assert info["device_count"] == 1
    device = info["devices"][0]
    assert 0 < device["free_bytes"] <= device["total_bytes"]
    assert info["free_bytes"] == device["free_bytes"]
    assert info["rtt_ms"]["samples"] == 5
    assert 0 < info["rtt_ms"]["min"] <= info["rtt_ms"]["median"] <= info["rtt_ms"]["max"]
    assert rpc.problems(info, expected_major=info["protocol"]["major"]) == []


def test_too_little_free_memory_names_both_amounts(worker):
    info = rpc.probe("127.0.0.1", worker.port)
    want = info["free_bytes"] * 4
    (message,) = rpc.problems(info, expected_major=7, min_free_bytes=want)
    assert f"({info['free_bytes']} bytes) free, expected at least" in message
    assert f"({want} bytes)" in message
    assert f"127.0.0.1:{worker.port}" in message


def test_a_worker_holding_another_client_is_busy_not_down(worker):
    holder = rpc.connect("127.0.0.1", worker.port, timeout=5)
    try:
        info = rpc.probe("127.0.0.1", worker.port, timeout=0.5)
    finally:
        holder.close()
    assert info["state"] == "busy"
    assert info["reachable"] is True and info["busy"] is True
    assert f"127.0.0.1:{worker.port}: busy, served by another client" in info["detail"]
    assert "hello got no answer within 0.5 s" in info["detail"]
    assert rpc.problems(info, expected_major=7, min_free_bytes=1 << 60) == []
    (message,) = rpc.problems(info, expected_major=7, require_idle=True)
    assert "require_idle" in message
    # The worker serves the next client once the holder leaves.
    assert rpc.probe("127.0.0.1", worker.port)["state"] == "ok"


def test_refused_connection_names_the_address():
    port = free_port()
    info = rpc.probe("127.0.0.1", port)
    assert info["state"] == "unreachable" and info["reachable"] is False
    (message,) = rpc.problems(info, expected_major=7)
    assert f"127.0.0.1:{port}: unreachable, connection refused: no RPC worker listens" in message
    assert "busy" not in message and "firewall" not in message


def test_a_connection_accepted_but_never_served_is_busy_not_unreachable():
    # The kernel accepts into the listen backlog of a server that never reads, as ggml's does while it
    # serves another head: connected, but the hello is never answered.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        info = rpc.probe("127.0.0.1", listener.getsockname()[1], timeout=0.3)
    finally:
        listener.close()
    assert info["state"] == "busy" and info["reachable"] is True and info["busy"] is True
    assert "busy, served by another client" in info["detail"]
    assert "hello got no answer within 0.3 s" in info["detail"] and "or else it hangs" in info["detail"]
    assert "unreachable" not in info["detail"] and "firewall" not in info["detail"]


def fill_listen_queue(port: int) -> list[socket.socket]:
    """Connect until the kernel stops answering SYNs; return the connections made."""
    queued = []
    for _ in range(8):
        s = socket.socket()
        s.settimeout(0.3)
        try:
            s.connect(("127.0.0.1", port))
        except TimeoutError:
            s.close()
            break
        queued.append(s)
    return queued


def test_connect_timeout_without_a_connection_from_here_is_unreachable(monkeypatch):
    # A listener whose accept queue is full drops further SYNs, as a firewall would: the connect times out.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = fill_listen_queue(port)
    monkeypatch.setattr(rpc, "held_from_here", lambda host, port: False)
    try:
        info = rpc.probe("127.0.0.1", port, timeout=0.3)
    finally:
        for s in queued:
            s.close()
        listener.close()
    assert info["state"] == "unreachable" and info["reachable"] is False
    assert "unreachable, no answer to the TCP connection within 0.3 s" in info["detail"]
    assert "the host is down or a firewall drops the packets" in info["detail"]
    assert "ask from the head" in info["detail"]


def test_a_worker_whose_queue_the_head_filled_is_busy_seen_from_the_head(worker):
    # The head holds the worker and its liveness probes fill the listen queue: new SYNs are dropped. From
    # the head's host its established connection shows the worker is alive.
    holder = rpc.connect("127.0.0.1", worker.port, timeout=5)
    queued = fill_listen_queue(worker.port)
    try:
        assert rpc.held_from_here("127.0.0.1", worker.port)
        info = rpc.probe("127.0.0.1", worker.port, timeout=0.3)
    finally:
        for s in queued:
            s.close()
        holder.close()
    assert info["state"] == "busy" and info["reachable"] is True
    assert "busy, served by another client: its listen queue is full" in info["detail"]
    assert "this host holds an established connection" in info["detail"]
    assert rpc.problems(info, expected_major=7) == []


def test_held_from_here_reads_established_connections(tmp_path):
    table = tmp_path / "tcp"
    header = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    )
    # 10.77.0.21:40000 -> 10.77.0.11:50052, first ESTABLISHED (01), then FIN_WAIT2 (05).
    row = "   0: 15004D0A:9C40 0B004D0A:C384 {} 00000000:00000000 00:00000000 00000000 0 0 1 1\n"
    table.write_text(header + row.format("01"))
    assert rpc.held_from_here("10.77.0.11", 50052, str(table))
    assert not rpc.held_from_here("10.77.0.12", 50052, str(table))
    assert not rpc.held_from_here("10.77.0.11", 50053, str(table))
    table.write_text(header + row.format("05"))
    assert not rpc.held_from_here("10.77.0.11", 50052, str(table))
    assert not rpc.held_from_here("10.77.0.11", 50052, str(tmp_path / "missing"))


def test_other_major_version_fails_with_both_versions(fake):
    server = fake(version=(6, 2, 1))
    info = rpc.probe("127.0.0.1", server.port)
    assert info["protocol_version"] == "6.2.1"
    (message,) = rpc.problems(info, expected_major=7)
    assert "speaks protocol 6.2.1 and the head speaks 7.1" in message
    assert "another major version" in message
    assert "same llama-cpp-python build" in message


# ggml's client (negotiate_hello) refuses a server whose major version differs or whose minor is newer.
@pytest.mark.parametrize(
    ("worker_version", "head", "refused"),
    [
        ((7, 0, 0), (7, 0), False),
        ((7, 0, 9), (7, 0), False),  # the patch version is not compared
        ((7, 0, 0), (7, 2), False),  # an older worker minor is served
        ((7, 2, 0), (7, 2), False),
        ((7, 1, 0), (7, 0), True),
        ((7, 3, 1), (7, 2), True),
        ((8, 0, 0), (7, 0), True),
        ((6, 9, 0), (7, 0), True),
    ],
)
def test_version_check_follows_ggml_clients_rule(fake, worker_version, head, refused):
    server = fake(version=worker_version)
    info = rpc.probe("127.0.0.1", server.port, rtt_samples=1)
    found = rpc.problems(info, expected_major=head[0], expected_minor=head[1])
    if not refused:
        assert found == []
        return
    (message,) = found
    shown = ".".join(map(str, worker_version))
    assert (
        f"127.0.0.1:{server.port} speaks protocol {shown} and the head speaks {head[0]}.{head[1]}" in message
    )
    assert ("a newer minor version" if worker_version[0] == head[0] else "another major version") in message


def test_module_fails_on_a_newer_minor_version_naming_both(run_module, fake):
    server = fake(version=(7, 2, 0))
    result = run_module("rpc_worker_info", {"host": "127.0.0.1", "port": server.port})
    assert result["failed"] is True
    assert "speaks protocol 7.2.0 and the head speaks 7.1" in result["msg"]
    assert result["protocol"] == {"major": 7, "minor": 2, "patch": 0}
    result = run_module("rpc_worker_info", {"host": "127.0.0.1", "port": server.port, "expected_minor": 2})
    assert not result.get("failed") and result["state"] == "ok"


def test_memory_of_every_device_is_summed(fake):
    server = fake(devices=((1 << 30, 2 << 30), (3 << 30, 4 << 30)))
    info = rpc.probe("127.0.0.1", server.port, rtt_samples=3)
    assert info["device_count"] == 2
    assert info["free_bytes"] == 4 << 30 and info["total_bytes"] == 6 << 30
    assert rpc.problems(info, expected_major=7, min_free_bytes=4 << 30) == []
    (message,) = rpc.problems(info, expected_major=7, min_free_bytes=5 << 30)
    assert "device 0: 1.0 GiB free of 2.0 GiB, device 1: 3.0 GiB free of 4.0 GiB" in message
    assert server.commands == [14, 15, 15, 15, 11, 11]


def test_a_server_that_hangs_up_on_the_hello_is_a_protocol_error(fake):
    server = fake(close_after_command=14)
    info = rpc.probe("127.0.0.1", server.port)
    assert info["state"] == "protocol_error" and info["reachable"] is True
    assert "closed the connection during the hello" in info["detail"]


def test_module_reports_the_worker_and_fails_with_the_keys_set(run_module, worker):
    result = run_module("rpc_worker_info", {"host": "127.0.0.1", "port": worker.port}, check_mode=True)
    assert result["changed"] is False and not result.get("failed")
    assert result["state"] == "ok" and result["device_count"] == 1
    result = run_module(
        "rpc_worker_info", {"host": "127.0.0.1", "port": worker.port, "min_free_bytes": 1 << 62}
    )
    assert result["failed"] is True
    assert "expected at least" in result["msg"]
    assert result["state"] == "ok" and result["free_bytes"] > 0


def test_module_rejects_bad_parameters(run_module):
    result = run_module("rpc_worker_info", {"host": "127.0.0.1", "port": 70000})
    assert result["failed"] is True and "port 70000 is not a TCP port" in result["msg"]
    result = run_module("rpc_worker_info", {"host": "127.0.0.1", "timeout": "soon"})
    assert result["failed"] is True and "timeout" in result["msg"]


def test_module_runs_through_ansible_in_check_mode(worker, tmp_path):
    result = ansible_adhoc(tmp_path, "rpc_worker_info", {"host": "127.0.0.1", "port": worker.port}, "--check")
    assert result["state"] == "ok", result
    assert result["changed"] is False
    assert result["protocol_version"] == worker_version(worker)
    refused = ansible_adhoc(tmp_path, "rpc_worker_info", {"host": "127.0.0.1", "port": free_port()})
    assert refused["failed"] is True
    assert refused["state"] == "unreachable" and "unreachable, connection refused" in refused["msg"]
