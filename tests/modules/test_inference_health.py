"""inference_health against a real head sharding the tiny model over a real RPC worker."""

from __future__ import annotations

import pytest
from ansible.module_utils import llmfleet_health as health
from ansible.module_utils import llmfleet_rpc as rpc

from tests.ansiblerun import adhoc as ansible_adhoc
from tests.inference.conftest import Server, free_port
from tests.modules.conftest import API_KEY


def test_healthy_head_reports_workers_and_speed(head, worker):
    result, found = health.check(head.url, api_key=API_KEY, max_tokens=8, expected_workers=[worker.endpoint])
    assert found == []
    assert result["status"] == "ok" and result["http_status"] == 200
    assert result["connected_workers"] == [worker.endpoint]
    assert result["models"] == ["tiny"]
    assert result["slots"]["total"] >= 1
    completion = result["completion"]
    assert 1 <= completion["completion_tokens"] <= 8
    assert completion["prompt_tokens"] > 0
    assert result["time_to_first_token_ms"] > 0
    if completion["completion_tokens"] > 1:
        assert result["tokens_per_second"] > 0
        assert result["ms_per_token"] == pytest.approx(1000.0 / result["tokens_per_second"], rel=1e-3)


def test_thresholds_fail_with_the_measured_numbers(head):
    result, found = health.check(
        head.url, api_key=API_KEY, max_tokens=8, min_tokens_per_second=1e9, max_time_to_first_token_ms=0.001
    )
    assert result["status"] == "ok"
    ttft = f"{result['time_to_first_token_ms']:.1f} ms"
    assert any(f"time to first token {ttft} exceeds max_time_to_first_token_ms 0.001" in m for m in found)
    assert any("below min_tokens_per_second 1e+09" in m or "too few to measure" in m for m in found)


def test_missing_or_wrong_api_key_is_named(head):
    _, found = health.check(head.url, max_tokens=2)
    assert len(found) == 1 and "HTTP 401" in found[0] and "give api_key" in found[0]
    _, found = health.check(head.url, api_key="wrong", max_tokens=2)
    assert "not the head's" in found[0]


def test_a_worker_the_head_does_not_know_is_reported(head, worker):
    _, found = health.check(head.url, api_key=API_KEY, completion=False, expected_workers=["10.9.9.9:50052"])
    assert found == [
        f"worker 10.9.9.9:50052 is not one of the head's RPC workers ({worker.endpoint}); "
        "check the head's --rpc list (inference_head_rpc_workers)"
    ]


def test_the_connected_worker_is_busy_to_other_clients(head, worker):
    info = rpc.probe("127.0.0.1", worker.port, timeout=0.5)
    assert info["state"] == "busy"
    assert rpc.problems(info, expected_major=7) == []


def test_unreachable_head_has_a_status_and_a_message():
    url = f"http://127.0.0.1:{free_port()}"
    result, found = health.check(url)
    assert result["status"] == "unreachable"
    assert found[0].startswith(f"the head at {url} is unreachable: cannot reach {url}/health")


def test_head_waiting_for_a_lost_worker_is_degraded(tiny_model, module_tmp):
    missing = f"127.0.0.1:{free_port()}"
    server = Server(module_tmp, tiny_model, "--rpc", missing, "--ctx", "1024", wait=False)
    try:
        server.wait_status("degraded")
        result, found = health.check(server.url, expected_workers=[missing])
    finally:
        server.stop()
    assert result["status"] == "degraded" and result["http_status"] == 503
    assert result["connected_workers"] == []
    assert found == [f"the head at {server.url} is degraded: {result['detail']} (workers down: {missing})"]
    assert "waiting for RPC workers" in result["detail"]


def test_module_returns_status_on_failure_for_until(run_module, head, worker):
    ok = run_module(
        "inference_health",
        {"url": head.url, "api_key": API_KEY, "max_tokens": 4, "expected_workers": [worker.endpoint]},
        check_mode=True,
    )
    assert not ok.get("failed"), ok.get("msg", ok)
    assert ok["changed"] is False and ok["status"] == "ok"
    assert API_KEY not in str(ok)
    failed = run_module(
        "inference_health", {"url": head.url, "api_key": API_KEY, "min_tokens_per_second": 1e9}
    )
    assert failed["failed"] is True and failed["status"] == "ok"
    assert "min_tokens_per_second" in failed["msg"]
    bad = run_module("inference_health", {"url": "127.0.0.1:8080"})
    assert bad["failed"] is True and "needs a scheme" in bad["msg"]


def test_module_runs_through_ansible_and_hides_the_key(head, worker, tmp_path):
    args = {"url": head.url, "api_key": API_KEY, "max_tokens": 4, "expected_workers": [worker.endpoint]}
    result = ansible_adhoc(tmp_path, "inference_health", args, "--check")
    assert result["status"] == "ok" and not result.get("failed"), result
    assert result["connected_workers"] == [worker.endpoint]
    assert result["completion"]["completion_tokens"] >= 1
    assert API_KEY not in str(result)
