"""Every sampling parameter end to end, while another stream runs: one request can never cost another its reply."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from tests.inference.conftest import Server, http

SAMPLING_CASES = [
    {"temperature": 0},
    {"temperature": 0.8},
    {"temperature": 0.8, "top_p": 0.5},
    {"temperature": 0.8, "top_k": 5},
    {"temperature": 0.8, "min_p": 0.2},
    {"temperature": 0.8, "seed": 42},
    {"presence_penalty": 0.5},
    {"frequency_penalty": 0.5},
    {"presence_penalty": -2.0, "frequency_penalty": 2.0},
    {"temperature": 0, "presence_penalty": 1.5},
    {"temperature": 0, "ignore_eos": True},
    {
        "temperature": 1.3,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "seed": 7,
        "presence_penalty": 0.3,
        "frequency_penalty": 0.7,
        "ignore_eos": True,
    },
]
BACKGROUND_TOKENS = 400


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    proc = Server(tmp_path_factory.mktemp("sampling"), tiny_model, "--ctx", "2048", "--parallel", "4")
    yield proc
    proc.stop()


def _stream_events(url: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        url + path,
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    events = []
    with urllib.request.urlopen(req, timeout=300) as resp:
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def _restarts(server) -> float:
    metrics = http("GET", server.url + "/metrics")[2]
    line = next(x for x in metrics.splitlines() if x.startswith("llmfleet_engine_restarts_total "))
    return float(line.split()[1])


def test_every_sampling_parameter_alone_and_combined_while_another_stream_finishes_intact(server):
    background: dict = {}

    def long_stream():
        background["events"] = _stream_events(
            server.url,
            "/v1/completions",
            {"prompt": "A long story", "max_tokens": BACKGROUND_TOKENS, "temperature": 0, "ignore_eos": True},
        )

    thread = threading.Thread(target=long_stream)
    thread.start()
    pid = None
    try:
        for case in SAMPLING_CASES:
            for path, body in (
                ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 6, **case}),
                (
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, **case},
                ),
            ):
                status, _, reply = http("POST", server.url + path, body, timeout=120)
                assert status == 200, (case, reply)
                choice = reply["choices"][0]
                assert choice["finish_reason"] in ("length", "stop"), (case, reply)
                if case.get("ignore_eos"):
                    assert choice["finish_reason"] == "length"
                    assert reply["usage"]["completion_tokens"] == 6
                events = _stream_events(server.url, path, body)
                assert "error" not in events[-1], (case, events[-1])
                assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop"), (case, events)
                health = http("GET", server.url + "/health")[2]
                assert health["status"] == "ok", (case, health)
                pid = pid or health["engine"]["pid"]
                assert health["engine"]["pid"] == pid, f"the engine restarted after {case}"
    finally:
        thread.join(300)
    events = background["events"]
    assert "error" not in events[-1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert len([e for e in events if e["choices"] and e["choices"][0]["text"]]) <= BACKGROUND_TOKENS
    assert _restarts(server) == 0


def test_greedy_with_ignore_eos_runs_to_max_tokens(server):
    body = {"prompt": "The end", "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    status, _, reply = http("POST", server.url + "/v1/completions", body)
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 64
