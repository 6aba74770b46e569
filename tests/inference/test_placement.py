"""Where the head puts a model's tensors over RPC workers, seen from the bytes on the link."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from inference.netsim import Relay
from inference.synth import SHAPES
from inference.tokenizer import Tokenizer

from .conftest import Server, Worker

EXTRA_TOKENS = 32


def bytes_per_generated_token(
    server: Server, relays: list[Relay], direction: str, prompt: str
) -> list[float]:
    """Each relay's count ``direction`` (``to_head`` or ``to_worker`` bytes, or ``round_trips``) per generated token: a request of
    1 + EXTRA_TOKENS tokens against one of 1 with the same prompt, so that the prompt's share cancels out (the
    server must run with --no-cache-prompt, or the second request would skip the prompt)."""

    def sent(max_tokens: int) -> list[int]:
        before = [getattr(r.stats, direction) for r in relays]
        status, _, body = server.complete(prompt, max_tokens=max_tokens, ignore_eos=True)
        assert status == 200 and body["usage"]["completion_tokens"] == max_tokens, body
        return [getattr(r.stats, direction) - b for r, b in zip(relays, before, strict=True)]

    short, long = sent(1), sent(1 + EXTRA_TOKENS)
    return [(b - a) / EXTRA_TOKENS for a, b in zip(short, long, strict=True)]


@contextlib.contextmanager
def expert_split_over_relays(
    model, tmp_path, procs, workers: int = 2, *extra: str
) -> Iterator[tuple[Server, list[Relay]]]:
    """A head serving ``model`` in the expert split over ``workers`` loopback workers, each behind a relay,
    with ``extra`` options of ``serve``."""
    relays = [Relay(("127.0.0.1", procs(Worker, tmp_path).port)).start() for _ in range(workers)]
    try:
        yield procs(
            Server, tmp_path, model, "--rpc", ",".join(r.endpoint for r in relays), "--split", "experts",
            "--ctx", "512", "--parallel", "1", "--worker-probe-interval", "3600", "--no-cache-prompt",
            "--sharded-cache-dir", str(tmp_path / "sharded"), *extra,
        ), relays  # fmt: skip
    finally:
        for relay in relays:
            relay.stop()


def test_layer_split_keeps_the_output_matrix_on_the_head(tiny_model, tmp_path, procs):
    # With the output matrix on the worker that holds the last layers, every generated token's logits
    # (n_vocab floats) come back over the link; on the head, only the last hidden state does.
    n_vocab = Tokenizer(str(tiny_model)).n_vocab
    worker = procs(Worker, tmp_path)
    relay = Relay(("127.0.0.1", worker.port)).start()
    try:
        server = procs(
            Server, tmp_path, tiny_model, "--rpc", relay.endpoint, "--split", "layer", "--ctx", "512",
            "--parallel", "1", "--worker-probe-interval", "3600", "--no-cache-prompt",
        )  # fmt: skip
        (per_token,) = bytes_per_generated_token(server, [relay], "to_head", "Where do the logits live")
    finally:
        relay.stop()
    assert per_token < n_vocab * 4 / 2, (
        f"{per_token:.0f} bytes per token came back, {n_vocab} logits are 4 each"
    )


def test_the_expert_split_sends_each_layers_graph_once_and_the_hidden_state_as_q8_0(
    tiny_model, tmp_path, procs
):
    # Each worker runs one graph a layer (its slice of the experts), and the same graphs every token: the
    # workers keep them by uid (protocol 7.1), so a token sends each worker its inputs and a 13-byte
    # recompute a layer, not each layer's graph of serialized tensors (~4 KiB) again. Of the inputs, the
    # hidden state goes as Q8_0 blocks (patch 0006; the tiny model's weights are Q8_0, whose kernels quantize
    # it so anyway): 34 bytes per 32 values. The rest, the expert choice and weights and the messages'
    # headers, is ~1.2 KiB a layer: 5,981 bytes a token here, 9,091 with the hidden state in f32.
    shape = SHAPES["tiny"]
    hidden_q8_0 = shape.n_embd // 32 * 34
    with expert_split_over_relays(tiny_model, tmp_path, procs) as (server, relays):
        sent = bytes_per_generated_token(server, relays, "to_worker", "Graphs kept by uid")
    for per_token in sent:
        assert per_token < shape.n_layer * (1300 + hidden_q8_0), (
            f"{per_token:.0f} bytes per token to a worker over {shape.n_layer} layers, the hidden state as Q8_0 "
            f"is {hidden_q8_0} a layer"
        )


def test_the_expert_split_fetches_one_partial_sum_a_layer_from_each_worker(tiny_model, tmp_path, procs):
    # Each worker weights and adds its slice's outputs over the selected experts itself, so one layer sends
    # back one [n_embd] partial a token in one round trip; the head only adds the workers' partials. Were
    # the sum over experts left to the head, each worker would send n_expert_used rows a layer, and a
    # second round trip for them.
    shape = SHAPES["tiny"]
    with expert_split_over_relays(tiny_model, tmp_path, procs) as (server, relays):
        back = bytes_per_generated_token(server, relays, "to_head", "One partial a layer")
        trips = bytes_per_generated_token(server, relays, "round_trips", "One round trip a layer")
    partial = shape.n_embd * 4  # one f32 row
    for per_token, turns in zip(back, trips, strict=True):
        print(f"{per_token:.0f} bytes and {turns:.2f} round trips a token from a worker")
        assert per_token < shape.n_layer * partial * 1.5, (
            f"{per_token:.0f} bytes per token from a worker, one partial a layer is {partial}"
        )
        assert turns <= shape.n_layer + 1, f"{turns:.2f} round trips per token, {shape.n_layer} layers"


@pytest.mark.parametrize(("partial_type", "row_bytes"), [("f16", 256 * 2), ("q8_0", 256 // 32 * 34)])
def test_the_expert_split_fetches_the_partials_in_the_partial_type(
    tiny_model, tmp_path, procs, partial_type, row_bytes
):
    # --experts-partial-type has each worker send its partial back as f16 (half the bytes of f32) or as Q8_0
    # blocks (34 bytes a 32 values); f32 would be 1,024 bytes a layer here and fail the bound.
    shape = SHAPES["tiny"]
    options = ("--experts-partial-type", partial_type)
    with expert_split_over_relays(tiny_model, tmp_path, procs, 2, *options) as (server, relays):
        back = bytes_per_generated_token(server, relays, "to_head", "Partials in fewer bytes")
        status, _, body = server.complete("Partials in fewer bytes", max_tokens=8, ignore_eos=True)
    assert status == 200 and body["usage"]["completion_tokens"] == 8, body
    for per_token in back:
        print(f"{per_token:.0f} bytes a token from a worker, partials as {partial_type}")
        assert per_token < shape.n_layer * (row_bytes + 64), (
            f"{per_token:.0f} bytes per token from a worker, a {partial_type} partial is {row_bytes} a layer"
        )
