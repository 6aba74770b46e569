"""A planned worker restart behind a drained head: requests wait in the queue instead of failing, and the
admin endpoints take the API key on the metrics port."""

from __future__ import annotations

import signal
import threading
import time

from tests.inference.conftest import Server, Worker, free_port, http, wait_for

KEY = "drain-test-key"


def test_a_worker_restarted_behind_a_drained_head_costs_a_client_latency_not_errors(
    tiny_model, procs, tmp_path
):
    worker = procs(Worker, tmp_path)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    metrics_port = free_port()
    server = procs(
        Server,
        tmp_path,
        tiny_model,
        "--rpc",
        worker.endpoint,
        "--ctx",
        "1024",
        "--parallel",
        "1",
        "--worker-probe-interval",
        "1",
        "--api-key-file",
        str(key_file),
        "--metrics-port",
        str(metrics_port),
    )
    admin = f"http://127.0.0.1:{metrics_port}/admin"
    auth = {"Authorization": f"Bearer {KEY}"}
    answers: list[int] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0}
            try:
                answers.append(http("POST", server.url + "/v1/completions", body, auth, timeout=120)[0])
            except OSError as exc:
                answers.append(repr(exc))

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    wait_for(lambda: len(answers) >= 2, 60, "two answers before the drain")

    assert http("POST", admin + "/drain", headers={})[0] == 401
    status, _, body = http("POST", admin + "/drain?lease=abc", headers=auth)
    assert status == 400 and body["error"]["param"] == "lease", body
    status, _, body = http("POST", admin + "/drain?lease=120&wait=30", headers=auth)
    assert status == 200 and body["drained"] is True and body["active"] == 0, body
    wait_for(lambda: server.health()["slots"]["waiting"] == 1, 30, "the client's next request queued")
    answered = len(answers)
    time.sleep(1)
    assert len(answers) == answered, "a request went through a drained head"

    pid = server.health()["engine"]["pid"]
    worker.stop(signal.SIGTERM)
    procs(Worker, tmp_path, port=worker.port)
    wait_for(
        lambda: (h := server.health()) and h["status"] == "ok" and h["engine"].get("pid") not in (None, pid),
        90,
        "a new engine on the restarted worker",
    )
    health = server.health()
    assert health["draining"] is True and health["slots"]["waiting"] == 1, health
    status, _, body = http("POST", admin + "/resume", headers=auth)
    assert status == 200 and body["draining"] is False, body
    wait_for(lambda: len(answers) >= answered + 2, 60, "answers after the resume")
    stop.set()
    thread.join(120)
    assert set(answers) == {200}, answers
