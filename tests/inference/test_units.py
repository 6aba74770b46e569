"""Pure-Python parts of the service: option validation, the text stream, request parsing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from inference import api, engine
from inference.config import ServeConfig, parse_endpoints, parse_floats
from inference.tokenizer import TextStream
from inference.worker import ConfigError, WorkerConfig


class FakePieces:
    """Token ids are indexes into a list of byte strings."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def piece(self, token: int) -> bytes:
        return self.pieces[token]


def test_text_stream_holds_back_split_utf8_and_stop_prefixes():
    pieces = FakePieces([b"Hel", b"lo \xf0\x9f", b"\x98\x80 ", b"wor", b"ld", b" END", b"!"])
    stream = TextStream(pieces, stop=["world"])
    out = [stream.push(t) for t in range(5)]
    assert out == ["Hel", "lo ", "\U0001f600 ", "", ""]
    assert stream.stopped
    stream = TextStream(pieces, stop=["END"])
    text = "".join(stream.push(t) for t in range(7)) + stream.finish()
    assert text == "Hello \U0001f600 world "
    assert stream.stopped


def test_text_stream_releases_a_false_stop_prefix_at_the_end():
    stream = TextStream(FakePieces([b"abc", b"EN"]), stop=["END"])
    assert stream.push(0) == "abc"
    assert stream.push(1) == ""
    assert stream.finish() == "EN"
    assert not stream.stopped


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"model": "/nonexistent.gguf"}, "--model"),
        ({"split": "diagonal"}, "--split"),
        ({"split": "tensor", "flash_attn": "off"}, "--split tensor"),
        ({"parallel": 0}, "--parallel"),
        ({"ctx": 64, "parallel": 4}, "--ctx"),
        ({"experts_used": 0}, "--experts-used"),
        ({"ubatch": 4096, "batch": 2048}, "--ubatch"),
        ({"port": 70000}, "--port"),
        ({"api_key_file": "/nonexistent/key"}, "--api-key-file"),
        ({"rpc": ("a:1", "b:2"), "tensor_split": (1.0,)}, "--tensor-split"),
    ],
)
def test_serve_options_are_validated_with_the_option_named(tiny_model, kwargs, fragment):
    config = ServeConfig(model=str(tiny_model))
    fields = {**config.__dict__, **kwargs}
    with pytest.raises(ConfigError, match=fragment.replace("-", r"\-")):
        ServeConfig(**fields).validated()


def test_a_non_gguf_model_file_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        ServeConfig(model=str(path)).validated()


def test_an_empty_api_key_file_is_refused(tiny_model, tmp_path):
    key = tmp_path / "key"
    key.write_text("\n")
    with pytest.raises(ConfigError, match=r"--api-key-file .* is empty"):
        ServeConfig(model=str(tiny_model), api_key_file=str(key)).validated()


def test_endpoint_and_weight_lists_parse_or_name_the_bad_entry():
    assert parse_endpoints("10.0.0.1:50052, 10.0.0.2:50052") == ["10.0.0.1:50052", "10.0.0.2:50052"]
    assert parse_endpoints("pi1:50052") == ["pi1:50052"]
    with pytest.raises(ConfigError, match="'pi1' is not host:port"):
        parse_endpoints("pi1")
    with pytest.raises(ConfigError, match="port"):
        parse_endpoints("pi1:99999")
    assert parse_floats("1,1,2", "--tensor-split") == [1.0, 1.0, 2.0]
    with pytest.raises(ConfigError, match="--tensor-split"):
        parse_floats("1,x", "--tensor-split")


def test_worker_refuses_a_network_bind_without_allow_remote():
    with pytest.raises(ConfigError, match="--allow-remote"):
        WorkerConfig(host="0.0.0.0").validated()
    assert WorkerConfig(host="0.0.0.0", allow_remote=True).validated().threads >= 1
    result = subprocess.run(
        [sys.executable, "-m", "inference", "worker", "--host", "192.0.2.1"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "--allow-remote" in result.stderr


def test_worker_threads_default_to_every_usable_core():
    import os

    assert WorkerConfig().validated().threads == len(os.sched_getaffinity(0))


def test_chat_parsing_joins_text_parts_and_defaults_max_tokens_to_the_context():
    req, messages = api.parse_chat(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ]
        },
        "m",
    )
    assert messages == [{"role": "user", "content": "ab"}]
    assert req.max_tokens is None
    assert req.id.startswith("chatcmpl-")


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_chunk_frame_around_any_text_is_the_chunk_body(kind):
    if kind == "chat":
        req, _ = api.parse_chat({"messages": [{"role": "user", "content": "hi"}]}, 'm "quoted"\\')
    else:
        req = api.parse_completion({"prompt": "hi"}, 'm "quoted"\\', 100)
    before, after = api.chunk_frame(req)
    for text in ["", "plain", 'a "quote" and \\ backslash', "line\nbreak\x00nul", "\U0001f600 é"]:
        framed = before + json.dumps(text) + after
        assert framed == json.dumps(api.chunk_body(req, text, None), separators=(",", ":"))


def test_engine_messages_split_across_reads_come_out_whole_and_in_order():
    left, right = socket.socketpair()
    messages = [
        ("ready", {"pid": 1}),
        ("step", [(1, 42, None), (2, 7, "stop")], (10, 2, [(1, 3), (2, 0)])),
        ("fatal", "x" * 100000),
    ]
    with left, right:
        for message in messages:
            engine.send(left.fileno(), message)
        left.close()
        data = b""
        while chunk := right.recv(65536):
            data += chunk
    reader = engine.MessageReader()
    received = []
    for at in range(0, len(data), 7):  # awkward pieces: headers and bodies split anywhere
        received.extend(reader.feed(data[at : at + 7]))
    assert received == messages
    assert not reader.buffer


def test_the_engine_process_loads_llama_cpp_before_numpy():
    """With a CUDA build, numpy's libraries loaded first made the model load crash; the engine process starts
    by importing the server's modules, so none of them may import numpy at module level."""
    code = (
        "import sys; import inference.cli, inference.server, inference.supervisor, inference.engine; "
        "print(sorted(m for m in ('numpy', 'gguf') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


class _Recorder:
    def __init__(self, broken: bool = False):
        self.broken, self.events = broken, []

    def cached(self, tokens: int) -> None:
        self.events.append(("cached", tokens))

    def token(self, token: int) -> None:
        if self.broken:
            raise RuntimeError("broken output")
        self.events.append(("token", token))

    def finish(self, reason: str) -> None:
        self.events.append(("finish", reason))

    def fail(self, message: str) -> None:
        self.events.append(("fail", message))


def test_a_failing_output_costs_only_its_own_request(caplog):
    from prometheus_client import CollectorRegistry

    from inference.engine import SamplingParams
    from inference.metrics import Metrics
    from inference.supervisor import Request, Supervisor

    supervisor = Supervisor(ServeConfig(model="unused.gguf"), Metrics(CollectorRegistry()))
    broken, fine = _Recorder(broken=True), _Recorder()
    for rid, output in ((1, broken), (2, fine)):
        supervisor.active[rid] = Request([1, 2], SamplingParams(max_tokens=4), output, id=rid)
    supervisor._handle(("step", [(1, 7, None), (2, 8, None), (2, 9, "length")], (6, 2, [(1, 0), (2, 0)])))
    assert fine.events == [("cached", 0), ("token", 8), ("token", 9), ("finish", "length")]
    assert broken.events[0] == ("cached", 0) and broken.events[1][0] == "fail"
    assert not supervisor.active
    assert "delivering to request 1 failed" in caplog.text
