"""The serving head against real llama.cpp: RPC sharding, continuous batching, worker loss, the API surface."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from tests.inference.conftest import Server, Worker, http

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away",
    "Raspberry Pi clusters are",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Greedy completions of a plain local load through llama-cpp-python's own API.

    Flash attention changes the arithmetic enough to flip near-tied tokens of a random-weight model, so the
    reference and every server under test use it alike (tensor split needs it anyway).
    """
    from llama_cpp import Llama

    llm = Llama(model_path=str(tiny_model), n_ctx=512, n_threads=1, flash_attn=True, verbose=False)
    texts = {}
    for prompt in PROMPTS:
        ids = []
        for token in llm.generate(llm.tokenize(prompt.encode()), temp=0.0, top_k=1):
            if llm.token_eos() == token or len(ids) == 24:
                break
            ids.append(token)
        texts[prompt] = llm.detokenize(ids).decode("utf-8", "replace")
    llm.close()
    return texts


@pytest.mark.parametrize("split", ["layer", "tensor"])
def test_rpc_split_gives_the_local_greedy_tokens(split, tiny_model, reference, procs, tmp_path):
    workers = [procs(Worker, tmp_path), procs(Worker, tmp_path)]
    rpc = ",".join(w.endpoint for w in workers)
    server = procs(Server, tmp_path, tiny_model, "--rpc", rpc, "--split", split, "--ctx", "2048")
    health = server.health()
    assert [w["endpoint"] for w in health["workers"]] == [w.endpoint for w in workers]
    assert all(w["connected"] for w in health["workers"])
    assert len(health["engine"]["rpc_devices"]) == 2
    for prompt in PROMPTS[:2]:
        status, _, body = server.complete(prompt)
        assert status == 200, body
        assert body["choices"][0]["text"] == reference[prompt]
    # Each worker holds a share of the weights: both served the head.
    for worker in workers:
        assert "Accepted client connection" in worker.output()


def _stream(url: str, prompt: str, out: dict) -> None:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True, "ignore_eos": True}
    body = json.dumps(body).encode()
    req = urllib.request.Request(
        url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    pieces, finish = [], None
    started = time.monotonic()
    with urllib.request.urlopen(req, timeout=120) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
    out[prompt] = ("".join(pieces), finish, time.monotonic() - started)


def test_concurrent_streams_each_get_their_text_alone(tiny_model, procs, tmp_path):
    """Sequences decoded together stay isolated: same KV, same sampler, same text as alone.

    ggml rounds differently when a step holds several rows (its multi-row kernels) and when a sequence's KV
    cells sit between other sequences' cells (flash attention's tiled half-precision sums); with random
    weights that now and then flips a near-tied expert or token, so which requests happened to share a step
    would decide the text. One-token micro-batches without flash attention keep every row on the one-row,
    single-precision path while the server still schedules the four sequences together, so any difference
    left is a bug of ours.
    """
    server = procs(
        Server,
        tmp_path,
        tiny_model,
        "--parallel",
        "4",
        "--ctx",
        "2048",
        "--ubatch",
        "1",
        "--flash-attn",
        "off",
    )
    alone = {}
    for prompt in PROMPTS:
        _stream(server.url, prompt, alone)
    together: dict = {}
    threads = [threading.Thread(target=_stream, args=(server.url, p, together)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for prompt in PROMPTS:
        assert together[prompt][0] == alone[prompt][0]
        assert together[prompt][1] == "length"
    metrics = http("GET", server.url + "/metrics")[2]
    assert 'llmfleet_requests_total{endpoint="/v1/completions",status="200"} 8.0' in metrics
    assert "llmfleet_completion_tokens_total 192.0" in metrics


def test_lost_worker_fails_requests_clearly_and_the_engine_recovers(tiny_model, procs, tmp_path):
    first, second = procs(Worker, tmp_path), procs(Worker, tmp_path)
    server = procs(
        Server, tmp_path, tiny_model, "--rpc", f"{first.endpoint},{second.endpoint}", "--ctx", "2048"
    )
    status, _, before = server.complete(PROMPTS[0])
    assert status == 200

    result = {}

    def long_request():
        result["response"] = server.complete(PROMPTS[1], max_tokens=400, ignore_eos=True)

    client = threading.Thread(target=long_request)
    client.start()
    time.sleep(0.5)
    second.stop(signal_kill())
    client.join(60)
    status, _, body = result["response"]
    assert status == 503
    assert second.endpoint in body["error"]["message"]
    assert "lost RPC worker" in body["error"]["message"]

    health = server.wait_status("degraded", timeout=30)
    down = [w for w in health["workers"] if not w["up"]]
    assert [w["endpoint"] for w in down] == [second.endpoint]
    status, headers, body = server.complete(PROMPTS[0])
    assert status == 503 and "Retry-After" in headers
    assert second.endpoint in body["error"]["message"]

    procs(Worker, tmp_path, port=second.port)
    server.wait_status("ok", timeout=60)
    status, _, after = server.complete(PROMPTS[0])
    assert status == 200
    assert after["choices"][0]["text"] == before["choices"][0]["text"]
    metrics = http("GET", server.url + "/metrics")[2]
    assert "llmfleet_engine_restarts_total 1.0" in metrics
    assert server.popen.poll() is None


def signal_kill():
    import signal

    return signal.SIGKILL
