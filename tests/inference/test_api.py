"""The API surface of one running head: bad input, authentication, capacity, the official OpenAI client."""

from __future__ import annotations

import json
import threading
import time
from http.client import HTTPConnection

import pytest

from tests.inference import openai_openapi as spec
from tests.inference.conftest import Server, http


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    key_file = tmp / "api-key"
    key_file.write_text("s3cret-key\n")
    proc = Server(tmp, tiny_model, "--ctx", "1024", "--parallel", "2", "--api-key-file", str(key_file))
    yield proc
    proc.stop()


AUTH = {"Authorization": "Bearer s3cret-key"}

BAD_COMPLETIONS = [
    (b'{"prompt": "hi", ', 400, "body"),
    (b"[1, 2, 3]", 400, "body"),
    ({"max_tokens": 5}, 400, "prompt"),
    ({"prompt": 42}, 400, "prompt"),
    ({"prompt": ["one", "two"]}, 400, "prompt"),
    ({"prompt": [1, 99999999]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "hi", "temperature": 7}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "hi", "top_k": -1}, 400, "top_k"),
    ({"prompt": "hi", "seed": 1.5}, 400, "seed"),
    ({"prompt": "hi", "stop": [1, 2]}, 400, "stop"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": "hi", "n": 3}, 400, "n"),
    ({"prompt": "hi", "logprobs": 5}, 400, "logprobs"),
    ({"prompt": "word " * 600}, 400, "prompt"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_COMPLETIONS)
def test_bad_completion_requests_get_a_4xx_naming_the_field(server, body, status, param):
    code, _, reply = http("POST", server.url + "/v1/completions", body, AUTH)
    assert code == status, reply
    assert reply["error"]["param"] == param
    assert param in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


BAD_CHATS = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "max_completion_tokens"),
    (
        {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
        "stream_options",
    ),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHATS)
def test_bad_chat_requests_get_a_400_naming_the_field(server, body, param):
    code, _, reply = http("POST", server.url + "/v1/chat/completions", body, AUTH)
    assert code == 400, reply
    assert reply["error"]["param"] == param


def test_the_server_survives_bad_input(server):
    assert server.popen.poll() is None
    code, _, reply = http(
        "POST",
        server.url + "/v1/completions",
        {"prompt": "still here", "max_tokens": 3, "ignore_eos": True},
        AUTH,
    )
    assert code == 200
    assert reply["usage"]["completion_tokens"] == 3


def test_unknown_endpoint_and_method_answer_in_openai_form(server):
    code, _, reply = http("GET", server.url + "/v1/nothing", headers=AUTH)
    assert code == 404 and "error" in reply
    code, headers, reply = http("GET", server.url + "/v1/completions", headers=AUTH)
    assert code == 405 and "error" in reply
    assert headers["Allow"] == "POST"


def test_without_cors_origins_browsers_get_no_cors_answers(server):
    preflight = {"Origin": "https://chat.example.org", "Access-Control-Request-Method": "POST"}
    code, headers, reply = http("OPTIONS", server.url + "/v1/completions", headers=preflight)
    assert code == 405 and "error" in reply
    assert headers["Allow"] == "POST"
    assert "Access-Control-Allow-Origin" not in headers
    code, headers, _ = http(
        "POST", server.url + "/v1/completions", {"prompt": "hi", "max_tokens": 1}, {**AUTH, **preflight}
    )
    assert code == 200
    assert "Access-Control-Allow-Origin" not in headers


def test_requests_without_the_key_are_refused(server):
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/models", None)):
        method = "POST" if body else "GET"
        code, _, reply = http(method, server.url + path, body)
        assert code == 401
        assert reply["error"]["code"] == "invalid_api_key"
        code, _, reply = http(method, server.url + path, body, {"Authorization": "Bearer wrong"})
        assert code == 401
    # Health and metrics stay open for load balancers and Prometheus (the firewall limits who reaches them).
    assert http("GET", server.url + "/health")[0] == 200
    assert http("GET", server.url + "/metrics")[0] == 200


def test_models_lists_the_served_model(server):
    code, _, reply = http("GET", server.url + "/v1/models", headers=AUTH)
    assert code == 200
    assert [m["id"] for m in reply["data"]] == ["tiny"]
    assert reply["data"][0]["meta"]["n_ctx_per_sequence"] == 512


def test_stop_strings_cut_the_text_and_finish_with_stop(server):
    body = {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = http("POST", server.url + "/v1/completions", body, AUTH)[2]["choices"][0]["text"]
    stop = full[5:9]
    assert stop.strip()
    reply = http("POST", server.url + "/v1/completions", {**body, "stop": [stop]}, AUTH)[2]
    assert reply["choices"][0]["text"] == full[: full.index(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    first = http("POST", server.url + "/v1/completions", body, AUTH)[2]["choices"][0]["text"]
    second = http("POST", server.url + "/v1/completions", body, AUTH)[2]["choices"][0]["text"]
    assert first == second


def test_the_openai_client_works_streaming_and_not(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret-key", max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["tiny"]

        chat = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage.completion_tokens == 8
        streamed = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(streamed)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == chat.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == 8

        completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
        pieces = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=6, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in pieces) == completion.choices[0].text

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="Hello", max_tokens=2)
        with (
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0) as other,
            pytest.raises(openai.AuthenticationError),
        ):
            other.models.list()


def test_a_full_queue_answers_503_with_retry_after(tiny_model, tmp_path):
    proc = Server(tmp_path, tiny_model, "--ctx", "1024", "--parallel", "1", "--queue-size", "0")
    try:
        started = threading.Event()
        result = {}

        def occupy():
            started.set()
            result["long"] = http(
                "POST", proc.url + "/v1/completions", {"prompt": "a", "max_tokens": 1000, "ignore_eos": True}
            )

        thread = threading.Thread(target=occupy)
        thread.start()
        started.wait()
        for _ in range(100):
            if http("GET", proc.url + "/health")[2]["slots"]["active"] == 1:
                break
        code, headers, reply = http("POST", proc.url + "/v1/completions", {"prompt": "b", "max_tokens": 2})
        thread.join(120)
        assert code == 503
        assert headers["Retry-After"] == "5"
        assert reply["error"]["code"] == "queue_full"
        spec.check(reply, "ErrorResponse")
        assert result["long"][0] == 200
        metrics = http("GET", proc.url + "/metrics")[2]
        assert 'llmfleet_requests_total{endpoint="/v1/completions",status="503"} 1.0' in metrics
        assert "llmfleet_queue_depth 0.0" in metrics
    finally:
        proc.stop()


def _metric(server, name: str) -> float:
    metrics = http("GET", server.url + "/metrics")[2]
    return float(next(x for x in metrics.splitlines() if x.startswith(name + " ")).split()[1])


def test_a_client_that_leaves_mid_stream_frees_its_sequence(tiny_model, tmp_path):
    # A context long enough that the stream outlasts every check below by seconds, even on a busy machine.
    server = Server(tmp_path, tiny_model, "--ctx", "4096", "--parallel", "1")
    try:
        # The tiny model's greedy path depends on the CPU's float rounding: without ignore_eos it may end early.
        body = {"prompt": "Lorem ipsum", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
        full = http("POST", server.url + "/v1/completions", body, timeout=300)[2]
        assert full["choices"][0]["finish_reason"] == "length"  # else leaving early would prove nothing
        before = _metric(server, "llmfleet_completion_tokens_total")
        conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}))
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")
        assert _metric(server, "llmfleet_kv_cache_tokens") > 0
        conn.close()
        deadline = time.monotonic() + 30
        while http("GET", server.url + "/health")[2]["slots"]["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http("GET", server.url + "/health")[2]["slots"]["active"] == 0
        assert _metric(server, "llmfleet_completion_tokens_total") - before < body["max_tokens"]
        # the KV gauges are the engine's last report, sent once it has released the sequence: a step later
        # than the supervisor's own count above, so wait for it (a gauge left stale would fail here)
        while _metric(server, "llmfleet_kv_cache_tokens") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metric(server, "llmfleet_kv_cache_tokens") == 0
        assert _metric(server, "llmfleet_kv_cache_usage_ratio") == 0
    finally:
        server.stop()


def test_streams_and_plain_replies_share_one_kept_alive_connection(server):
    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0}
    texts = []
    for stream in (True, False, True):
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": stream}), AUTH)
        response = conn.getresponse()
        assert response.status == 200
        raw = response.read().decode()
        if stream:
            events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
            assert events[-1] == "[DONE]"
            texts.append("".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]))
        else:
            texts.append(json.loads(raw)["choices"][0]["text"])
    conn.close()
    assert texts[0] == texts[1] == texts[2]
    assert texts[0]
