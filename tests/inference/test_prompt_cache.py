"""Prompt reuse across requests (llama-server's cache_prompt) over the real server on the tiny model: a request
starts from the longest prefix that a free sequence's KV cache holds, and greedy text is the same as a server
that computes every prompt in full.

Both servers run with flash attention off: on the CPU, ggml's flash attention picks its kernel by the number of
query rows in a batch (tiled, one row, or split over the KV cells), so the same token's attention can be summed
in another order when only the end of its prompt is computed, and the tiny random model's near ties flip.
"""

from __future__ import annotations

import pytest

from tests.inference.conftest import Server, http

TURNS = 4
REPLY_TOKENS = 12
USER_LINES = [
    "Tell me about the weather in the mountains today.",
    "And tomorrow, will it rain in the valley or stay dry?",
    "What should I pack for a two-day hike then?",
    "Thanks. Which trail is the shortest one to the summit?",
]


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    """(with reuse, without reuse): two sequences each, so that a third conversation takes another's slot."""
    tmp = tmp_path_factory.mktemp("prompt-cache")
    common = ("--flash-attn", "off", "--ctx", "2048", "--parallel", "2")
    reuse = Server(tmp, tiny_model, *common)
    plain = Server(tmp, tiny_model, *common, "--no-cache-prompt")
    yield reuse, plain
    reuse.stop()
    plain.stop()


def _chat(server: Server, messages: list[dict], **extra) -> tuple[dict, dict]:
    body = {
        "messages": messages,
        "max_tokens": REPLY_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }
    status, _, reply = http("POST", server.url + "/v1/chat/completions", body)
    assert status == 200, reply
    message = reply["choices"][0]["message"]
    return {k: message.get(k) for k in ("content", "reasoning_content", "tool_calls")}, reply["usage"]


def _conversation(server: Server, opening: str, turns: int = TURNS) -> list[tuple[dict, dict]]:
    """Each turn re-sends the whole conversation, as chat clients do: [(reply message, usage)] per turn."""
    messages = [{"role": "system", "content": f"You are a guide. {opening}"}]
    out = []
    for line in USER_LINES[:turns]:
        messages.append({"role": "user", "content": line})
        message, usage = _chat(server, messages)
        out.append((message, usage))
        messages.append({"role": "assistant", "content": message["content"] or ""})
    return out


def _metric(server: Server, name: str) -> float:
    metrics = http("GET", server.url + "/metrics")[2]
    return float(next(x for x in metrics.splitlines() if x.startswith(name + " ")).split()[1])


def test_each_turn_reuses_the_conversation_so_far_and_says_the_same(servers):
    reuse, plain = servers
    before = _metric(reuse, "llmfleet_prompt_tokens_cached_total")
    with_reuse = _conversation(reuse, "Answer briefly.")
    without = _conversation(plain, "Answer briefly.")
    assert [m for m, _ in with_reuse] == [m for m, _ in without]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for _, u in with_reuse]
    prompts = [u["prompt_tokens"] for _, u in with_reuse]
    assert [u["prompt_tokens"] for _, u in without] == prompts
    assert all(u["prompt_tokens_details"]["cached_tokens"] == 0 for _, u in without)
    # Turn n starts after the previous turn's prompt at least: its reply and the new user message are computed.
    for n in range(1, TURNS):
        assert prompts[n - 1] <= cached[n] < prompts[n], (cached, prompts)
    assert _metric(reuse, "llmfleet_prompt_tokens_cached_total") - before == sum(cached)


def test_interleaved_conversations_taking_each_other_s_slots_say_the_same(servers):
    # Three conversations over two sequences, their turns interleaved one request at a time, so that turns
    # take each other's sequences, and never share a batch: requests decoded side by side may take other CPU
    # kernels (batched matrix products), whose other summation order flips the tiny random model's near ties
    # with or without reuse.
    reuse, plain = servers
    openings = ["Answer briefly.", "Answer in detail.", "Answer like a pirate."]
    expected = {o: [m for m, _ in _conversation(plain, o, turns=3)] for o in openings}
    order = [0, 1, 0, 2, 1, 0, 2, 1, 2]  # A1 B1 A2 C1 B2 A3 C2 B3 C3
    history = {o: [{"role": "system", "content": f"You are a guide. {o}"}] for o in openings}
    got: dict[str, list] = {o: [] for o in openings}
    for index in order:
        opening = openings[index]
        messages = history[opening]
        messages.append({"role": "user", "content": USER_LINES[len(got[opening])]})
        message, usage = _chat(reuse, messages)
        got[opening].append((message, usage))
        messages.append({"role": "assistant", "content": message["content"] or ""})
    for opening in openings:
        assert [m for m, _ in got[opening]] == expected[opening], opening
    # every later turn started from a kept prefix, its own or the system prompt another conversation shares
    assert all(u["prompt_tokens_details"]["cached_tokens"] > 0 for o in openings for _, u in got[o][1:])


def _complete(server: Server, prompt: list[int], **extra) -> tuple[str, dict]:
    body = {"prompt": prompt, "max_tokens": REPLY_TOKENS, "temperature": 0, "ignore_eos": True, **extra}
    status, _, reply = http("POST", server.url + "/v1/completions", body)
    assert status == 200, reply
    return reply["choices"][0]["text"], reply["usage"]


def test_a_prompt_equal_to_or_a_prefix_of_a_cached_one_recomputes_its_last_token(servers):
    reuse, plain = servers
    prompt = [(37 * i) % 900 + 50 for i in range(90)]
    _complete(reuse, prompt)
    for tokens, cached in ((prompt, len(prompt) - 1), (prompt[:60], 59), ([*prompt[:60], 7, 8, 9], 60)):
        text, usage = _complete(reuse, tokens)
        assert usage["prompt_tokens_details"]["cached_tokens"] == cached
        assert text == _complete(plain, tokens)[0]
    # cache_prompt false computes the whole prompt, with the same text.
    text, usage = _complete(reuse, prompt, cache_prompt=False)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert text == _complete(plain, prompt)[0]


def test_a_streamed_reply_reports_its_cached_tokens_in_the_usage_chunk(servers):
    reuse, _ = servers
    prompt = [(53 * i) % 900 + 60 for i in range(40)]
    _complete(reuse, prompt)
    body = {
        "prompt": [*prompt, 11, 12],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, _, text = http("POST", reuse.url + "/v1/completions", body)
    assert status == 200
    usage = [line for line in text.splitlines() if '"usage"' in line][-1]
    assert '"prompt_tokens_details":{"cached_tokens":40}' in usage


def test_cache_prompt_must_be_a_boolean(servers):
    reuse, _ = servers
    status, _, reply = http("POST", reuse.url + "/v1/completions", {"prompt": "hi", "cache_prompt": "no"})
    assert status == 400
    assert reply["error"]["param"] == "cache_prompt"
    assert "expected true or false" in reply["error"]["message"]
