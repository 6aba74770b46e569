"""Where the head puts a model's tensors over RPC workers, seen from the bytes on the link."""

from __future__ import annotations

from inference.netsim import Relay
from inference.tokenizer import Tokenizer

from .conftest import Server, Worker


def test_layer_split_keeps_the_output_matrix_on_the_head(tiny_model, tmp_path, procs):
    # With the output matrix on the worker that holds the last layers, every generated token's logits
    # (n_vocab floats) come back over the link; on the head, only the last hidden state does.
    n_vocab = Tokenizer(str(tiny_model)).n_vocab
    worker = procs(Worker, tmp_path)
    relay = Relay(("127.0.0.1", worker.port)).start()
    try:
        server = procs(
            Server, tmp_path, tiny_model, "--rpc", relay.endpoint, "--split", "layer", "--ctx", "512",
            "--parallel", "1", "--worker-probe-interval", "3600",
        )  # fmt: skip

        def bytes_to_head(max_tokens: int) -> int:
            before = relay.stats.to_head
            status, _, body = server.complete(
                "Where do the logits live", max_tokens=max_tokens, ignore_eos=True
            )
            assert status == 200 and body["usage"]["completion_tokens"] == max_tokens, body
            return relay.stats.to_head - before

        per_token = (bytes_to_head(33) - bytes_to_head(1)) / 32
    finally:
        relay.stop()
    assert per_token < n_vocab * 4 / 2, (
        f"{per_token:.0f} bytes per token came back, {n_vocab} logits are 4 each"
    )


def test_the_expert_split_sends_each_layers_graph_once(tiny_model, tmp_path, procs):
    # Each worker runs one graph a layer (its slice of the experts), and the same graphs every token: the
    # workers keep them by uid (protocol 7.1), so a token sends each worker its inputs and a 13-byte
    # recompute a layer, not each layer's graph of serialized tensors (~4 KiB) again.
    workers = [procs(Worker, tmp_path) for _ in range(2)]
    relays = [Relay(("127.0.0.1", w.port)).start() for w in workers]
    try:
        server = procs(
            Server, tmp_path, tiny_model, "--rpc", ",".join(r.endpoint for r in relays), "--split", "experts",
            "--ctx", "512", "--parallel", "1", "--worker-probe-interval", "3600",
            "--sharded-cache-dir", str(tmp_path / "sharded"),
        )  # fmt: skip

        def bytes_to_workers(max_tokens: int) -> list[int]:
            before = [r.stats.to_worker for r in relays]
            status, _, body = server.complete("Graphs kept by uid", max_tokens=max_tokens, ignore_eos=True)
            assert status == 200 and body["usage"]["completion_tokens"] == max_tokens, body
            return [r.stats.to_worker - b for r, b in zip(relays, before, strict=True)]

        short, long = bytes_to_workers(1), bytes_to_workers(33)
    finally:
        for relay in relays:
            relay.stop()
    n_layer = 4  # the tiny shape
    for sent_short, sent_long in zip(short, long, strict=True):
        per_token = (sent_long - sent_short) / 32
        assert per_token < n_layer * 4096, (
            f"{per_token:.0f} bytes per token to a worker over {n_layer} layers"
        )
