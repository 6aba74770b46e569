"""RPC workers that hang, restart or vanish: the head notices, names the worker, fails what is in flight with
that reason, and recovers by itself."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.inference.conftest import Server, Worker, http, wait_for

RPC_TIMEOUT = 3
PROBE_INTERVAL = 1


def _server(procs, tmp_path, model, workers, *extra):
    return procs(
        Server,
        tmp_path,
        model,
        "--rpc",
        ",".join(w.endpoint for w in workers),
        "--ctx",
        "2048",
        "--parallel",
        "1",
        "--rpc-timeout",
        str(RPC_TIMEOUT),
        "--worker-probe-interval",
        str(PROBE_INTERVAL),
        *extra,
    )


def test_a_stopped_worker_fails_the_request_in_flight_and_the_head_recovers_after_it_resumes(
    tiny_model, procs, tmp_path
):
    first, second = procs(Worker, tmp_path), procs(Worker, tmp_path)
    server = _server(procs, tmp_path, tiny_model, [first, second])
    result = {}

    def long_request():
        result["reply"] = server.complete("Lorem", max_tokens=1500, ignore_eos=True)
        result["at"] = time.monotonic()

    client = threading.Thread(target=long_request)
    client.start()
    wait_for(lambda: http("GET", server.url + "/health")[2]["slots"]["active"], 30, "the request starting")
    time.sleep(0.3)
    second.popen.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        client.join(60)
        assert not client.is_alive(), "the request hung on a stopped worker"
        status, _, body = result["reply"]
        assert status == 503, body
        message = body["error"]["message"]
        assert second.endpoint in message and "lost RPC worker" in message
        assert "--rpc-timeout" in message or "hello" in message
        assert result["at"] - stopped_at < RPC_TIMEOUT + 15
        health = server.wait_status("degraded", timeout=10)
        assert [w["endpoint"] for w in health["workers"] if not w["up"]] == [second.endpoint]
        metrics = http("GET", server.url + "/metrics")[2]
        assert f'llmfleet_rpc_worker_up{{endpoint="{second.endpoint}"}} 0.0' in metrics
    finally:
        second.popen.send_signal(signal.SIGCONT)
    server.wait_status("ok", timeout=60)
    status, _, body = server.complete("Lorem", max_tokens=4)
    assert status == 200, body


def test_a_worker_stopped_while_the_head_is_idle_shows_in_health_without_a_request(
    tiny_model, procs, tmp_path
):
    worker = procs(Worker, tmp_path)
    server = _server(procs, tmp_path, tiny_model, [worker])
    worker.popen.send_signal(signal.SIGSTOP)
    try:
        health = wait_for(
            lambda: (h := server.health()) and h["status"] == "degraded" and not h["workers"][0]["up"] and h,
            PROBE_INTERVAL + min(RPC_TIMEOUT, 10) + 15,
            "the stopped worker reported down",
        )
        assert worker.endpoint in health["detail"]
        assert "heartbeat" in server.output()
    finally:
        worker.popen.send_signal(signal.SIGCONT)
    server.wait_status("ok", timeout=60)


def test_a_restarted_worker_is_noticed_before_the_next_request(tiny_model, procs, tmp_path):
    first, second = procs(Worker, tmp_path), procs(Worker, tmp_path)
    server = _server(procs, tmp_path, tiny_model, [first, second])
    status, _, before = server.complete("Hello", max_tokens=8)
    assert status == 200
    pid = server.health()["engine"]["pid"]
    second.stop(signal.SIGKILL)
    procs(Worker, tmp_path, port=second.port)
    # The engine sees its connection hang up and restarts on the new worker process: no request is needed
    # to find out, and none fails for it.
    wait_for(
        lambda: (h := server.health()) and h["status"] == "ok" and h["engine"].get("pid") not in (None, pid),
        60,
        "a new engine serving",
    )
    assert f"RPC worker {second.endpoint} closed its connection" in server.output()
    status, _, after = server.complete("Hello", max_tokens=8)
    assert status == 200, after
    assert after["choices"][0]["text"] == before["choices"][0]["text"]


def _keepalive_timers(port: int) -> list[str]:
    out = subprocess.run(
        ["ss", "-tnoH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_the_worker_probes_an_idle_client_connection_with_tcp_keepalive(tmp_path, procs):
    """A head that vanished without closing (power loss, a dropped link) would otherwise hold the worker's only
    client slot forever; keepalive ends that connection, and the worker accepts the next head."""
    worker = procs(Worker, tmp_path)
    with socket.create_connection(("127.0.0.1", worker.port)):
        lines = wait_for(lambda: _keepalive_timers(worker.port), 10, "the accepted connection")
        assert "timer:(keepalive" in lines[0], lines


@pytest.mark.parametrize("option", ["--rpc-timeout", "--worker-probe-interval"])
def test_liveness_options_must_be_positive(tiny_model, option, tmp_path):
    proc = Server(tmp_path, tiny_model, option, "0", wait=False)
    assert proc.popen.wait(30) != 0
    proc.stop()
    assert option in proc.output()


def test_the_head_speaks_the_protocol_version_it_compares_against(tmp_path, procs):
    from inference.worker import RPC_PROTOCOL, rpc_hello

    worker = procs(Worker, tmp_path)
    assert rpc_hello("127.0.0.1", worker.port) == RPC_PROTOCOL


@pytest.mark.parametrize("version", [(7, 2, 0), (8, 0, 0), (6, 0, 0)])
def test_a_worker_of_another_build_is_refused_by_name_without_starting_an_engine(
    tiny_model, version, tmp_path
):
    from inference.worker import RPC_PROTOCOL
    from tests.modules.fakerpc import FakeRpcServer

    fake = FakeRpcServer(version=version)
    endpoint = f"127.0.0.1:{fake.port}"
    server = Server(tmp_path, tiny_model, "--rpc", endpoint, wait=False)
    try:
        health = wait_for(
            lambda: (h := server.health()) and h["status"] == "degraded" and h["workers"][0]["detail"] and h,
            60,
            "the worker refused",
        )
        detail = health["workers"][0]["detail"]
        assert endpoint in detail and "{}.{}.{}".format(*version) in detail
        assert "{}.{}.{}".format(*RPC_PROTOCOL) in detail
        assert endpoint in health["detail"]
        time.sleep(2)  # a recovery round later, still no engine
        assert "engine process" not in server.output()
    finally:
        server.stop()
        fake.sock.close()
