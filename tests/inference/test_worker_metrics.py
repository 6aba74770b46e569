"""The RPC worker's /health and /metrics port: it answers while the head holds the RPC port, and its figures
follow the head's real connection (read from the kernel, parsed here with prometheus_client's parser)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference.worker import ConfigError, WorkerConfig

from .conftest import Server, Worker, free_port, http, wait_for


class MetricsWorker(Worker):
    def __init__(self, tmp: Path):
        self.metrics_port = free_port()
        super().__init__(tmp)

    def _args(self) -> list[str]:
        return [*super()._args(), "--metrics-port", str(self.metrics_port)]

    def scrape(self) -> dict[str, float]:
        status, _, text = http("GET", f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
        assert status == 200, text
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith(("llmfleet_worker_", "process_"))
        }

    def health(self) -> dict:
        status, _, body = http("GET", f"http://127.0.0.1:{self.metrics_port}/health", timeout=10)
        assert status == 200, body
        return body


def test_a_worker_without_a_head_reports_no_client(tmp_path, procs):
    worker = procs(MetricsWorker, tmp_path)
    # the worker's own hello at start (it logs the protocol version) is a short connection of its own
    wait_for(lambda: worker.health()["client"] is None, 10, "no client")
    assert worker.health() == {
        "status": "ok",
        "endpoint": worker.endpoint,
        "protocol": "7.1.0",
        "client": None,
    }
    metrics = worker.scrape()
    assert metrics["llmfleet_worker_info"] == 1
    assert metrics["llmfleet_worker_client_connected"] == 0
    assert metrics["llmfleet_worker_rpc_received_bytes_total"] < 1000  # a hello at most
    assert metrics["llmfleet_worker_rpc_connections_total"] <= 1
    assert metrics["process_resident_memory_bytes"] > 0


def test_the_metrics_follow_the_heads_connection(tiny_model, tmp_path, procs):
    worker = procs(MetricsWorker, tmp_path)
    server = procs(
        Server, tmp_path, tiny_model, "--rpc", worker.endpoint, "--split", "layer", "--ctx", "512",
        "--parallel", "1", "--worker-probe-interval", "3600",
    )  # fmt: skip
    # the head uploaded the worker's layers: most of the file's 4.6 MB
    wait_for(
        lambda: worker.scrape()["llmfleet_worker_rpc_received_bytes_total"] > 2e6, 10, "the upload counted"
    )
    loaded = worker.scrape()
    assert loaded["llmfleet_worker_client_connected"] == 1
    assert loaded["llmfleet_worker_rpc_connections_total"] >= 1
    assert worker.health()["client"].startswith("127.0.0.1:")
    status, _, body = server.complete("Count the bytes", max_tokens=16, ignore_eos=True)
    assert status == 200, body
    wait_for(
        lambda: (
            worker.scrape()["llmfleet_worker_rpc_sent_bytes_total"]
            > loaded["llmfleet_worker_rpc_sent_bytes_total"]
        ),
        10,
        "the hidden states sent back counted",
    )
    server.stop()
    wait_for(lambda: worker.scrape()["llmfleet_worker_client_connected"] == 0, 10, "the head gone")
    after = worker.scrape()
    # a closed connection's bytes stay in the totals
    assert (
        after["llmfleet_worker_rpc_received_bytes_total"]
        >= loaded["llmfleet_worker_rpc_received_bytes_total"]
    )
    assert worker.health()["client"] is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metrics_port": 70000}, "--metrics-port 70000 is not a TCP port"),
        ({"metrics_port": "same"}, "is the RPC port; give another"),
        ({"metrics_port": "taken"}, "is taken by another process"),
    ],
)
def test_a_metrics_port_the_worker_cannot_use_is_refused_by_name(change, message):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        value = {"same": port, "taken": taken.getsockname()[1]}.get(
            change["metrics_port"], change["metrics_port"]
        )
        with pytest.raises(ConfigError, match=message):
            WorkerConfig(port=port, metrics_port=value).validated()
