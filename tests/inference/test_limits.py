"""A head under a heavy or hostile client: prompts of megabytes, and connections that are slow, idle or too
many. Every other client, /health included, must go on being answered."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from inference.config import ServeConfig
from inference.worker import ConfigError
from tests.inference.conftest import Server, http

MIB = 1024 * 1024
HEALTH_LATENCY = 0.3  # the slowest /health answer allowed while a large request is handled
# The `slow` head's deadlines. Keep-alive is the longest, as by default, so that a connection closed at the
# header deadline shows that deadline at work, not aiohttp's keep-alive.
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 2.0
SLACK = 1.5  # how late past a deadline a connection may close, on a machine busy with other tests
LONGEST = "<|object_ref_start|>"  # the longest token of the tiny model's vocabulary (Qwen3's): 20 bytes


@pytest.fixture(scope="module")
def big(tiny_model, tmp_path_factory):
    """A head with room for a prompt of 65536 tokens, which the cheap bound lets through up to 896 KiB."""
    proc = Server(tmp_path_factory.mktemp("big"), tiny_model, "--ctx", "65536", "--parallel", "1")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def slow(tiny_model, tmp_path_factory):
    proc = Server(
        tmp_path_factory.mktemp("slow"),
        tiny_model,
        "--ctx",
        "8192",
        "--parallel",
        "1",
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--keepalive-timeout",
        str(KEEPALIVE_TIMEOUT),
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def capped(tiny_model, tmp_path_factory):
    proc = Server(
        tmp_path_factory.mktemp("capped"),
        tiny_model,
        "--ctx",
        "256",
        "--parallel",
        "1",
        "--max-connections",
        "4",
    )
    yield proc
    proc.stop()


# Large prompts.


def _body(kind: str, text: str) -> tuple[str, bytes]:
    if kind == "completion":
        return "/v1/completions", json.dumps({"prompt": text, "max_tokens": 4}).encode()
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return "/v1/chat/completions", json.dumps(body).encode()


def _health_while(server: Server, path: str, data: bytes, min_probes: int = 6):
    """The answer to ``data`` and how long it took, and the latencies of /health probes sent while it was
    handled: several at once, in threads of their own, a new one every 50 ms until the request ends."""
    answer: dict = {}

    def send():
        started = time.monotonic()
        answer["reply"] = http("POST", server.url + path, data, timeout=120)
        answer["seconds"] = time.monotonic() - started

    latencies: list[float] = []

    def probe():
        started = time.monotonic()
        status = http("GET", server.url + "/health", timeout=60)[0]
        latencies.append(time.monotonic() - started if status == 200 else math.inf)

    sender = threading.Thread(target=send)
    sender.start()
    probes = []
    while sender.is_alive() or len(probes) < min_probes:
        time.sleep(0.05)
        probes.append(threading.Thread(target=probe))
        probes[-1].start()
    sender.join()
    for p in probes:
        p.join()
    return answer["reply"], answer["seconds"], latencies


@pytest.mark.parametrize(("kind", "param"), [("completion", "prompt"), ("chat", "messages")])
def test_a_prompt_of_megabytes_is_refused_at_once_and_stalls_no_one(big, kind, param):
    path, data = _body(kind, "hello world " * (6 * MIB // 12))
    (status, _, reply), seconds, latencies = _health_while(big, path, data)
    assert status == 400, reply
    assert reply["error"]["param"] == param
    assert reply["error"]["code"] == "context_length_exceeded"
    assert "at least" in reply["error"]["message"]  # refused by the bound, not after tokenizing
    assert seconds < 2.0
    assert max(latencies) < HEALTH_LATENCY, latencies


@pytest.mark.parametrize(("kind", "param"), [("completion", "prompt"), ("chat", "messages")])
def test_a_large_prompt_is_tokenized_off_the_event_loop(big, kind, param):
    # 850 KiB: under the bound's 65536 tokens (at most 14 bytes each), but some 500 000 tokens of this text,
    # which take the tokenizer the best part of a second.
    path, data = _body(kind, "hello world " * (850 * 1024 // 12))
    (status, _, reply), _, latencies = _health_while(big, path, data)
    assert status == 400, reply
    assert reply["error"]["param"] == param
    assert "at least" not in reply["error"]["message"]  # counted exactly
    assert max(latencies) < HEALTH_LATENCY, latencies


# Bodies of millions of small JSON values, which CPython's JSON decoder takes a long time over while holding
# the GIL: a thread would not keep them from stalling the event loop.
DENSE_BODIES = {
    "token-ids": ("/v1/completions", {"prompt": [7, 42, 99, 500] * (MIB // 4)}, "prompt"),
    "messages": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}] * 150_000},
        "messages",
    ),
    "empty-arrays": ("/v1/completions", {"prompt": "hi", "stop": [[]] * 1_500_000}, "stop"),
}


@pytest.mark.parametrize("name", DENSE_BODIES)
def test_a_body_of_millions_of_values_is_decoded_off_the_event_loop(big, name):
    path, body, param = DENSE_BODIES[name]
    (status, _, reply), _, latencies = _health_while(big, path, json.dumps(body).encode())
    assert status == 400, reply
    assert reply["error"]["param"] == param
    assert max(latencies) < HEALTH_LATENCY, latencies


def test_a_preparer_process_that_dies_is_replaced(tiny_model, tmp_path, procs):
    server = procs(Server, tmp_path, tiny_model, "--ctx", "2048", "--parallel", "1")
    engine = re.search(r"engine process (\d+) started", server.output()).group(1)
    children = Path(f"/proc/{server.popen.pid}/task/{server.popen.pid}/children").read_text().split()
    preparers = [pid for pid in children if pid != engine and "spawn_main" in _cmdline(pid)]
    assert len(preparers) == 2, [_cmdline(pid) for pid in children]
    os.kill(int(preparers[0]), signal.SIGKILL)
    path, data = _body("completion", "hello world " * 1000)
    deadline = time.monotonic() + 30
    while (reply := http("POST", server.url + path, data))[0] != 400:
        assert reply[0] == 503 and reply[2]["error"]["code"] == "preparer_failed", reply
        assert time.monotonic() < deadline, "no preparer came back"
        time.sleep(0.5)
    assert reply[2]["error"]["param"] == "prompt"
    assert "a request preparer process died" in server.output()


def _cmdline(pid: str) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")


@pytest.mark.parametrize(
    ("tokens", "max_tokens", "status", "param"),
    [
        (240, 16, 200, None),  # exactly fills the 256-token context
        (241, 16, 400, "max_tokens"),
        (255, 1, 200, None),
        (256, 1, 400, "prompt"),
    ],
)
def test_the_bound_refuses_no_prompt_that_fits(capped, tokens, max_tokens, status, param):
    # The longest token over and over: a prompt whose bound is its exact count.
    body = {"prompt": LONGEST * tokens, "max_tokens": max_tokens, "ignore_eos": True}
    code, _, reply = http("POST", capped.url + "/v1/completions", body)
    assert code == status, reply
    if status == 200:
        assert reply["usage"]["prompt_tokens"] == tokens
    else:
        assert reply["error"]["param"] == param


def test_the_bound_is_never_above_the_token_count(tiny_model):
    from inference.tokenizer import Tokenizer

    tokenizer = Tokenizer(str(tiny_model))
    assert tokenizer.longest_piece == len(LONGEST.encode())
    texts = [
        "",
        LONGEST * 100,
        LONGEST.strip() * 100,
        "<|im_start|>" * 50,
        "<|endoftext|><|im_end|>" * 30,
        "héllo wörld ✓ 😀 " * 40,
        "\n\n\t  " * 100,
        "0123456789" * 77,
    ]
    for text in texts:
        for add_special in (True, False):
            assert tokenizer.min_tokens(text) <= len(tokenizer.tokenize(text, add_special=add_special)), text
    assert tokenizer.min_tokens(LONGEST * 100) == 100


# Slow, idle and surplus connections.


def _connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=KEEPALIVE_TIMEOUT + SLACK + 5)


def _closed_after(sock: socket.socket, started: float) -> float:
    """Seconds from ``started`` until the server closes the connection; what it sends before is dropped."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP response with a Content-Length, read from a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a body"
        rest += chunk
    return int(lines[0].split()[1]), headers, rest


HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /hea", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
    ids=["nothing", "half-a-request-line", "half-the-headers"],
)
def test_a_connection_without_whole_headers_is_closed_at_the_header_deadline(slow, sent):
    with _connect(slow) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        assert HEADER_TIMEOUT * 0.9 <= _closed_after(sock, started) <= HEADER_TIMEOUT + SLACK


def test_headers_sent_a_byte_at_a_time_are_closed_at_the_header_deadline(slow):
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200
    with _connect(slow) as sock:
        started = time.monotonic()
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            if time.monotonic() - started > HEADER_TIMEOUT + SLACK:
                pytest.fail("still open past the header deadline")
        assert _closed_after(sock, started) <= HEADER_TIMEOUT + SLACK


@pytest.mark.parametrize("pace", [None, 0.1], ids=["part-of-a-body", "a-byte-at-a-time"])
def test_a_slow_body_is_answered_408_and_closed_at_the_body_deadline(slow, pace):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    body = b'{"prompt": "' + b"x" * 80 + b'"}'
    with _connect(slow) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        started = time.monotonic()
        if pace is not None:
            sock.setblocking(False)
            for byte in body[10:]:
                try:
                    sock.sendall(bytes([byte]))
                    if sock.recv(65536, socket.MSG_PEEK):
                        break
                except BlockingIOError:
                    pass
                time.sleep(pace)
            sock.settimeout(BODY_TIMEOUT + SLACK + 5)
        status, headers, reply = _read_response(sock)
        answered = time.monotonic() - started
        assert status == 408
        assert headers["connection"].lower() == "close"
        error = json.loads(reply)["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "body_timeout"
        assert "--body-timeout" in error["message"]
        assert BODY_TIMEOUT * 0.9 <= answered <= BODY_TIMEOUT + SLACK
        assert _closed_after(sock, started) <= BODY_TIMEOUT + SLACK


def test_a_slow_body_that_is_not_read_is_given_no_longer(slow):
    # Answered before its body is read (no such endpoint); aiohttp then reads the rest for a while.
    with _connect(slow) as sock:
        sock.sendall(
            b"POST /v1/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
        )
        started = time.monotonic()
        assert _read_response(sock)[0] == 404
        assert _closed_after(sock, started) <= BODY_TIMEOUT + SLACK


def test_an_idle_kept_alive_connection_is_closed_at_the_keepalive_deadline(slow):
    with _connect(slow) as sock:
        sock.sendall(HEALTH)
        assert _read_response(sock)[0] == 200
        started = time.monotonic()
        assert KEEPALIVE_TIMEOUT * 0.9 <= _closed_after(sock, started) <= KEEPALIVE_TIMEOUT + SLACK


def test_half_a_second_request_on_a_kept_alive_connection_is_closed(slow):
    with _connect(slow) as sock:
        sock.sendall(HEALTH)
        assert _read_response(sock)[0] == 200
        started = time.monotonic()
        sock.sendall(HEALTH[:20])
        assert HEADER_TIMEOUT * 0.9 <= _closed_after(sock, started) <= HEADER_TIMEOUT + SLACK


def test_a_kept_alive_connection_idle_past_the_header_deadline_stays_open(slow):
    # Between requests the keep-alive deadline counts, not the header deadline.
    pause = (HEADER_TIMEOUT + KEEPALIVE_TIMEOUT) / 2
    with _connect(slow) as sock:
        for _ in range(3):
            sock.sendall(HEALTH)
            assert _read_response(sock)[0] == 200
            time.sleep(pause)


@pytest.mark.slow
def test_long_generations_outlive_every_deadline_intact(slow):
    """A generation in progress has no deadline: neither one answered at its end nor a stream."""
    body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
    started = time.monotonic()
    status, _, reply = http("POST", slow.url + "/v1/completions", body, timeout=300)
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == 4000
    assert time.monotonic() - started > KEEPALIVE_TIMEOUT * 2, "too short to outlive the deadlines"

    data = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    with _connect(slow) as sock:
        sock.settimeout(300)
        sock.sendall(
            b"POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(data), data)
        )
        started = time.monotonic()
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
        assert time.monotonic() - started > KEEPALIVE_TIMEOUT * 2, "too short to outlive the deadlines"
    head, _, events = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"200"
    payloads = [line[len(b"data: ") :] for line in events.split(b"\n\n") if line.startswith(b"data: ")]
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 4000
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == reply["choices"][0]["text"]


def test_connections_over_the_cap_get_a_503_and_those_under_it_keep_working(capped):
    held = []
    try:
        for _ in range(4):
            sock = _connect(capped)
            sock.sendall(HEALTH)
            assert _read_response(sock)[0] == 200
            held.append(sock)
        started = time.monotonic()
        status, headers, reply = http("GET", capped.url + "/health", timeout=10)
        assert time.monotonic() - started < 1.0
        assert status == 503
        assert headers["Retry-After"] == "5"
        assert reply["error"]["code"] == "too_many_connections"
        assert reply["error"]["type"] == "server_error"
        assert "--max-connections" in reply["error"]["message"]
        with _connect(capped) as refused:  # answered without a request, then closed
            assert _closed_after(refused, time.monotonic()) < 1.5
        for sock in held:
            sock.sendall(HEALTH)
            assert _read_response(sock)[0] == 200
        held.pop().close()
        deadline = time.monotonic() + 5
        while (status := http("GET", capped.url + "/health", timeout=10)[0]) != 200:
            assert time.monotonic() < deadline, "a freed connection was not given to a new client"
            time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()


# Options.


@pytest.mark.parametrize(
    ("field", "option", "value"),
    [
        ("header_timeout", "--header-timeout", 0),
        ("body_timeout", "--body-timeout", -1),
        ("keepalive_timeout", "--keepalive-timeout", math.nan),
        ("header_timeout", "--header-timeout", math.inf),
        ("max_connections", "--max-connections", 0),
    ],
)
def test_limits_out_of_range_are_refused_naming_the_option(tiny_model, field, option, value):
    with pytest.raises(ConfigError, match=option):
        ServeConfig(model=str(tiny_model), **{field: value}).validated()


def test_limit_options_reach_the_config(tiny_model, monkeypatch):
    from inference import cli, server

    configs = []

    async def serve(config):
        configs.append(config)

    monkeypatch.setattr(server, "serve", serve)
    given = [
        "--header-timeout",
        "2.5",
        "--body-timeout",
        "7",
        "--keepalive-timeout",
        "3",
        "--max-connections",
        "9",
    ]
    for argv in ([], given):
        assert cli.main(["serve", "--model", str(tiny_model), *argv]) == 0
    defaults, chosen = configs
    assert (defaults.header_timeout, defaults.body_timeout, defaults.keepalive_timeout) == (10, 30, 15)
    assert defaults.max_connections == 512
    assert (chosen.header_timeout, chosen.body_timeout, chosen.keepalive_timeout) == (2.5, 7, 3)
    assert chosen.max_connections == 9
