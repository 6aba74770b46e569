"""Requests as an unusual or hostile client sends them: fields the server does not honour, text that is not
Unicode, chats of every shape, seeds at the edges of their range, browsers and odd methods."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from inference import api
from tests.inference.conftest import Server, http

README = Path(__file__).resolve().parents[2] / "README.md"
ORIGIN = "https://chat.example.org"
CHAT = {"messages": [{"role": "user", "content": "Hello"}]}
COMPLETION = {"prompt": "Hello"}

# A value that asks for something, for every refused field.
LIVE_VALUES = {
    "n": 2,
    "logprobs": True,
    "store": True,
    "service_tier": "priority",
    "echo": True,
    "suffix": "return x",
    "best_of": 3,
    "top_logprobs": 2,
    "functions": [{"name": "get_weather", "parameters": {}}],
    "function_call": {"name": "get_weather"},
    "prediction": {"type": "content", "content": "def f():"},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "reasoning_effort": "low",
    "verbosity": "high",
    "web_search_options": {},
    "messages[].function_call": {"name": "f", "arguments": "{}"},
    "messages[].refusal": "I cannot help with that.",
    "messages[].audio": {"id": "audio_1"},
}


def _base(kind: str) -> dict:
    return json.loads(json.dumps(CHAT if kind == "chat" else COMPLETION))


def _parse(body, kind: str = "chat"):
    if kind == "chat":
        return api.parse_chat(body, "m")[0]
    return api.parse_completion(body, "m", 1024)


def _with_field(kind: str, name: str, value) -> tuple[dict, str]:
    """A request carrying ``value`` at the table's ``name``, and the param an error about it names."""
    body = _base(kind)
    if name.startswith("messages[]."):
        key = name.removeprefix("messages[].")
        body["messages"] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        body["messages"][1][key] = value
        return body, f"messages[1].{key}"
    if name.startswith("stream_options."):
        body["stream"] = True
        body["stream_options"] = {name.removeprefix("stream_options."): value}
        return body, name
    body[name] = value
    return body, name


def _refused_cases():
    for name, spec in api.REQUEST_FIELDS.items():
        if spec.status == api.REFUSED:
            for kind in spec.endpoints:
                yield pytest.param(kind, name, id=f"{kind}-{name}")


def _error(call) -> api.ApiError:
    with pytest.raises(api.ApiError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(("kind", "name"), list(_refused_cases()))
def test_a_refused_field_that_asks_for_something_is_a_400_naming_it(kind, name):
    body, param = _with_field(kind, name, LIVE_VALUES[name])
    error = _error(lambda: _parse(body, kind))
    assert (error.status, error.param, error.code) == (400, param, "unsupported_field")
    assert error.message.startswith(f"{param}: ") and api.REQUEST_FIELDS[name].note in error.message


@pytest.mark.parametrize(("kind", "name"), list(_refused_cases()))
def test_a_refused_field_is_accepted_when_it_asks_for_nothing(kind, name):
    for value in (None, *api.REQUEST_FIELDS[name].inert):
        body, _ = _with_field(kind, name, value)
        _parse(body, kind)


def test_inert_values_are_told_apart_by_type():
    for body in ({**COMPLETION, "n": True}, {**COMPLETION, "logprobs": 1}, {**CHAT, "store": 0}):
        assert (
            _error(lambda body=body: _parse(body, "chat" if "messages" in body else "completion")).status
            == 400
        )


@pytest.mark.parametrize(
    ("kind", "name", "value"),
    [
        ("completion", "user", "user-1234"),
        ("chat", "user", "user-1234"),
        ("chat", "safety_identifier", "hash-of-user"),
        ("chat", "metadata", {"team": "search"}),
        ("chat", "prompt_cache_key", "conversation-7"),
        ("chat", "stream_options.include_obfuscation", False),
    ],
)
def test_ignored_fields_are_accepted(kind, name, value):
    assert api.REQUEST_FIELDS[name].status == api.IGNORED
    _parse(_with_field(kind, name, value)[0], kind)


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("completion", {**COMPLETION, "repetition_penalty": 1.1}, "repetition_penalty"),
        ("completion", {**COMPLETION, "grammar": "root ::= x"}, "grammar"),
        ("completion", {**COMPLETION, "max_completion_tokens": 4}, "max_completion_tokens"),
        ("completion", {**COMPLETION, "messages": CHAT["messages"]}, "messages"),
        ("completion", {**COMPLETION, "chat_template_kwargs": {}}, "chat_template_kwargs"),
        ("chat", {**CHAT, "prompt": "Hello"}, "prompt"),
        ("chat", {**CHAT, "echo": False}, "echo"),
        ("chat", {**CHAT, "temprature": 0.5}, "temprature"),
        ("chat", {**CHAT, "stream": True, "stream_options": {"usage": True}}, "stream_options.usage"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "Hi", "reasoning": "x"}]},
            "messages[0].reasoning",
        ),
        (
            "chat",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {}}]}
                ]
            },
            "messages[0].content[0].cache_control",
        ),
    ],
)
def test_an_unknown_field_or_one_of_the_other_endpoint_is_a_400_naming_it(kind, body, param):
    error = _error(lambda: _parse(body, kind))
    assert (error.status, error.param, error.code) == (400, param, "unknown_field")
    assert error.message.startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("marker", "made_by"), [("request-fields", "fields_table"), ("refused-requests", "refusals_table")]
)
def test_the_readme_tables_of_request_fields_are_the_servers(marker, made_by):
    text = README.read_text()
    table = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", text, re.S)
    assert table, f"README.md lost its <!-- {marker} --> block"
    assert table.group(1) == getattr(api, made_by)(), (
        f"README.md's {marker} table differs from inference.api.REQUEST_FIELDS; put the output of "
        f"`python -c 'from inference import api; print(api.{made_by}())'` between its markers"
    )


def test_ignore_eos_reaches_the_sampling_parameters():
    assert _parse({**COMPLETION, "ignore_eos": True}, "completion").sampling_params(4).ignore_eos is True
    assert _parse(dict(CHAT)).sampling_params(4).ignore_eos is False
    assert _error(lambda: _parse({**CHAT, "ignore_eos": "yes"})).param == "ignore_eos"


LONE = "\\ud83d"  # as JSON spells it: the first half of an emoji's surrogate pair, alone


@pytest.mark.parametrize(
    ("kind", "raw", "param"),
    [
        ("completion", f'{{"prompt": "hello {LONE} world"}}', "prompt"),
        ("completion", f'{{"prompt": ["hello {LONE}"]}}', "prompt[0]"),
        ("completion", f'{{"prompt": "hi", "stop": ["ok", "{LONE}"]}}', "stop[1]"),
        ("completion", f'{{"prompt": "hi", "model": "m{LONE}"}}', "model"),
        ("completion", f'{{"prompt": "hi", "user": "{LONE}"}}', "user"),
        ("completion", f'{{"prompt": "hi", "x{LONE}": 1}}', "x\\ud83d"),
        ("chat", f'{{"messages": [{{"role": "user", "content": "{LONE}"}}]}}', "messages[0].content"),
        (
            "chat",
            f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "a{LONE}"}}]}}]}}',
            "messages[0].content[0].text",
        ),
        (
            "chat",
            f'{{"messages": [{{"role": "user", "content": "hi", "name": "{LONE}"}}]}}',
            "messages[0].name",
        ),
        ("chat", f'{{"messages": [{{"role": "{LONE}", "content": "hi"}}]}}', "messages[0].role"),
        (
            "chat",
            f'{{"messages": [{{"role": "user", "content": "hi"}}], "chat_template_kwargs": {{"x": "{LONE}"}}}}',
            "chat_template_kwargs.x",
        ),
        (
            "chat",
            f'{{"messages": [{{"role": "user", "content": "hi"}}], "metadata": {{"{LONE}": "v"}}}}',
            "metadata.\\ud83d",
        ),
    ],
)
def test_text_that_is_not_unicode_is_a_400_naming_the_field(kind, raw, param):
    error = _error(lambda: _parse(json.loads(raw), kind))
    assert (error.status, error.param) == (400, param)
    assert "not valid Unicode" in error.message
    json.dumps(error.body()).encode("utf-8")  # the answer itself is text a client can read


def test_text_is_checked_at_any_depth_the_json_parser_takes():
    depth = 900
    body = json.loads(f'{{"prompt": "hi", "user": {"[" * depth}"{LONE}"{"]" * depth}}}')
    error = _error(lambda: _parse(body, "completion"))
    assert error.param == "user" + "[0]" * depth


def test_a_whole_surrogate_pair_is_text():
    assert (
        _parse(json.loads('{"prompt": "smile \\ud83d\\ude00"}'), "completion").prompt_text
        == "smile \U0001f600"
    )


def _unmix(value: int) -> int:
    """The API seed whose splitmix64 finaliser gives ``value``: the finaliser run backwards."""
    mask = (1 << 64) - 1

    def unshift(y: int, shift: int) -> int:
        x = y
        for _ in range(64 // shift + 1):
            x = y ^ (x >> shift)
        return x

    z = unshift(value, 31)
    z = unshift(z * pow(0x94D049BB133111EB, -1, 1 << 64) & mask, 27)
    z = unshift(z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64) & mask, 30)
    z = (z - 0x9E3779B97F4A7C15) & mask
    return z - (1 << 64) if z >= 1 << 63 else z


def test_seeds_keep_every_bit_and_never_mean_random():
    seeds = [0, 42, 2**32 + 42, -1, 4294967295, 2**31, -(2**63), 2**63 - 1, -42]
    mapped = [api.sampler_seed(s) for s in seeds]
    assert len(set(mapped)) == len(seeds)
    assert all(0 <= m < api.LLAMA_RANDOM_SEED for m in mapped)
    assert mapped == [api.sampler_seed(s) for s in seeds]
    # The seed whose mix folds to llama.cpp's "random" still gets a fixed seed.
    unlucky = _unmix(0xFFFFFFFF00000000)
    assert api.SEED_MIN <= unlucky <= api.SEED_MAX
    assert api.sampler_seed(unlucky) != api.LLAMA_RANDOM_SEED
    # What the engine gets is the mapped seed, which it masks to 32 bits unchanged.
    params = _parse({**COMPLETION, "seed": 2**32 + 42}, "completion").sampling_params(4)
    assert params.seed == api.sampler_seed(2**32 + 42) == params.seed & 0xFFFFFFFF
    assert _parse(dict(COMPLETION), "completion").sampling_params(4).seed is None


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1, -(2**63) - 1, 1.0, "42", True])
def test_a_seed_outside_signed_64_bits_is_a_400(seed):
    assert _error(lambda: _parse({**COMPLETION, "seed": seed}, "completion")).param == "seed"


def _chat(*messages, **extra) -> list[dict]:
    return api.parse_chat({"messages": list(messages), **extra}, "m")[1]


def test_a_developer_message_is_a_system_message():
    assert _chat({"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_adjacent_system_messages_become_one_and_others_stay_apart():
    messages = _chat(
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Now in German."},
        {"role": "system", "content": "Formally.", "name": "policy"},
        {"role": "user", "content": "Again"},
    )
    assert messages == [
        {"role": "system", "content": "Be brief.\n\nAnswer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Now in German."},
        {"role": "system", "content": "Formally.", "name": "policy"},
        {"role": "user", "content": "Again"},
    ]


def test_tool_results_names_and_null_assistant_content_reach_the_template():
    messages = _chat(
        {"role": "user", "content": "Weather?", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    )
    assert messages == [
        {"role": "user", "content": "Weather?", "name": "ann"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool"])
def test_null_content_is_a_400_outside_an_assistant_message(role):
    error = _error(lambda: _chat({"role": "user", "content": "Hi"}, {"role": role, "content": None}))
    assert error.param == "messages[1].content"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ("no", "chat_template_kwargs"),
        ({"messages": []}, "chat_template_kwargs.messages"),
        ({"add_generation_prompt": False}, "chat_template_kwargs.add_generation_prompt"),
        ({"tools": [{"type": "function"}]}, "chat_template_kwargs.tools"),
        ({"not a name": 1}, "chat_template_kwargs.not a name"),
    ],
)
def test_template_variables_the_server_sets_cannot_be_overridden(kwargs, param):
    assert (
        _error(lambda: _chat({"role": "user", "content": "Hi"}, chat_template_kwargs=kwargs)).param == param
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from inference.tokenizer import Tokenizer

    return Tokenizer(str(tiny_model))


def test_a_chat_ends_with_a_new_assistant_turn(tokenizer):
    text = tokenizer.render_chat(
        _chat({"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    )
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("prefill", ["Once upon", "Trailing space ", "", "<think>\nLet me see"])
def test_a_trailing_assistant_message_is_continued(tokenizer, prefill):
    messages = _chat({"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": prefill})
    text = tokenizer.render_chat(messages)
    assert text == f"<|im_start|>user\nTell a story<|im_end|>\n<|im_start|>assistant\n{prefill}"


def test_an_earlier_assistant_message_is_closed_as_usual(tokenizer):
    messages = _chat(
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "?"},
    )
    assert tokenizer.render_chat(messages).endswith(
        "Hello<|im_end|>\n<|im_start|>user\n?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_variables_reach_the_template(tokenizer):
    messages = _chat({"role": "user", "content": "Hi"})
    assert tokenizer.render_chat(messages, enable_thinking=False).endswith(
        "assistant\n<think>\n\n</think>\n\n"
    )


def test_a_template_that_drops_the_final_assistant_message_cannot_continue_it(tiny_model):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from inference.tokenizer import TemplateError, Tokenizer

    tokenizer = Tokenizer(str(tiny_model))
    tokenizer.chat_template = ImmutableSandboxedEnvironment().from_string(
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="cannot be continued"):
        tokenizer.render_chat(
            _chat({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"})
        )


def test_the_training_context_comes_from_the_gguf(tokenizer):
    assert tokenizer.n_ctx_train == 2048  # the tiny shape's qwen3moe.context_length


# Against a running head.


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    key_file = tmp / "api-key"
    key_file.write_text("k3y\n")
    proc = Server(
        tmp,
        tiny_model,
        "--ctx",
        "1024",
        "--parallel",
        "2",
        "--api-key-file",
        str(key_file),
        "--cors-origin",
        f"{ORIGIN}/, http://localhost:3000",
        "--cors-origin",
        "HTTP://127.0.0.1:8000",
    )
    yield proc
    proc.stop()


AUTH = {"Authorization": "Bearer k3y"}


def _post(server, path: str, body, headers=None):
    return http("POST", server.url + path, body, {**AUTH, **(headers or {})})


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"1": 500}}, "logit_bias"),
        ("/v1/completions", {**COMPLETION, "suffix": "}"}, "suffix"),
        ("/v1/completions", {**COMPLETION, "mirostat": 2}, "mirostat"),
        ("/v1/completions", b'{"prompt": "hello \\ud83d world"}', "prompt"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
            "messages[0].content",
        ),
        ("/v1/completions", {**COMPLETION, "seed": 2**64 - 1}, "seed"),
        pytest.param(
            "/v1/completions",
            b'{"prompt": "hi", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "body",
            id="nested-too-deeply",
        ),
    ],
)
def test_the_server_answers_hostile_fields_with_a_400_naming_them(server, path, body, param):
    code, _, reply = _post(server, path, body)
    assert code == 400, reply
    assert reply["error"]["param"] == param
    assert reply["error"]["type"] == "invalid_request_error"


def test_an_oversized_max_completion_tokens_is_named_as_sent(server):
    code, _, reply = _post(server, "/v1/chat/completions", {**CHAT, "max_completion_tokens": 5000})
    assert code == 400
    assert reply["error"]["param"] == "max_completion_tokens"
    assert reply["error"]["message"].startswith("max_completion_tokens: 5000 tokens")
    assert reply["error"]["code"] == "context_length_exceeded"
    code, _, reply = _post(
        server, "/v1/chat/completions", {**CHAT, "max_tokens": 3, "max_completion_tokens": 4}
    )
    assert code == 400 and reply["error"]["param"] == "max_completion_tokens"


def test_a_continued_assistant_message_is_the_prompt_completed(server):
    """The chat's prompt ends inside the assistant turn: it is the same as completing the rendered text."""
    messages = [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": "Once upon"}]
    chat = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 12, "temperature": 0})[
        2
    ]
    prompt = "<|im_start|>user\nTell a story<|im_end|>\n<|im_start|>assistant\nOnce upon"
    plain = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})[2]
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    assert chat["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_a_developer_message_gets_the_system_prompt(server):
    def reply(role):
        body = {
            "messages": [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        return _post(server, "/v1/chat/completions", body)[2]

    system, developer = reply("system"), reply("developer")
    assert developer["choices"] == system["choices"]
    assert developer["usage"]["prompt_tokens"] == system["usage"]["prompt_tokens"]
    # The same prompt: all of it but its last token is reused from the first request's KV cache.
    assert (
        developer["usage"]["prompt_tokens_details"]["cached_tokens"] == system["usage"]["prompt_tokens"] - 1
    )


def test_distinct_seeds_give_distinct_reproducible_samples(server):
    def sample(seed):
        body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": seed}
        code, _, reply = _post(server, "/v1/completions", body)
        assert code == 200, reply
        return reply["choices"][0]["text"]

    seeds = [42, 2**32 + 42, -1, 4294967295, 0, 2**63 - 1]
    first = {seed: sample(seed) for seed in seeds}
    assert {seed: sample(seed) for seed in seeds} == first
    assert len(set(first.values())) == len(seeds), first


def test_ignore_eos_is_accepted(server):
    code, _, reply = _post(server, "/v1/completions", {**COMPLETION, "max_tokens": 4, "ignore_eos": True})
    assert code == 200, reply
    assert reply["usage"]["completion_tokens"] == 4


def test_models_report_the_training_context_and_each_model_by_id(server):
    listed = http("GET", server.url + "/v1/models", headers=AUTH)[2]["data"]
    assert listed[0]["meta"]["n_ctx_train"] == 2048
    code, _, one = http("GET", server.url + "/v1/models/tiny", headers=AUTH)
    assert code == 200
    assert one == listed[0]
    for other in ("gpt-4", "tiny/extra", "Tiny"):
        code, _, reply = http("GET", server.url + f"/v1/models/{other}", headers=AUTH)
        assert code == 404, other
        assert reply["error"]["code"] == "model_not_found"
        assert reply["error"]["param"] == "model"
    assert http("GET", server.url + "/v1/models/tiny")[0] == 401


def test_a_browser_preflight_from_an_allowed_origin_is_answered(server):
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    code, answer, _ = http("OPTIONS", server.url + "/v1/chat/completions", headers=headers)
    assert code == 204
    assert answer["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in answer["Access-Control-Allow-Methods"]
    assert answer["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "Origin" in answer["Vary"]
    for origin in ("http://localhost:3000", "http://127.0.0.1:8000"):
        code, answer, _ = http("OPTIONS", server.url + "/v1/models", headers={**headers, "Origin": origin})
        assert code == 204 and answer["Access-Control-Allow-Origin"] == origin
    code, answer, reply = http(
        "OPTIONS", server.url + "/v1/completions", headers={**headers, "Origin": "https://evil.example"}
    )
    assert code == 403
    assert reply["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in answer
    code, _, reply = http("OPTIONS", server.url + "/v1/nothing", headers=headers)
    assert code == 404 and "error" in reply


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", {**COMPLETION, "max_tokens": 2}, 200),
        ("/v1/completions", {**COMPLETION, "max_tokens": 2, "stream": True}, 200),
        ("/v1/completions", {**COMPLETION, "tools": []}, 400),
    ],
)
def test_replies_to_an_allowed_origin_carry_the_cors_header(server, path, body, status):
    code, answer, _ = _post(server, path, body, {"Origin": ORIGIN})
    assert code == status
    assert answer["Access-Control-Allow-Origin"] == ORIGIN
    assert "Retry-After" in answer["Access-Control-Expose-Headers"]
    code, answer, _ = _post(server, path, body, {"Origin": "https://evil.example"})
    assert code == status and "Access-Control-Allow-Origin" not in answer
    code, answer, _ = _post(server, path, body)
    assert code == status and "Access-Control-Allow-Origin" not in answer


def test_an_unauthorised_reply_still_carries_the_cors_header(server):
    code, answer, _ = http("GET", server.url + "/v1/models", headers={"Origin": ORIGIN})
    assert code == 401
    assert answer["Access-Control-Allow-Origin"] == ORIGIN


def test_a_405_names_the_allowed_methods(server):
    code, answer, reply = http("GET", server.url + "/v1/chat/completions", headers=AUTH)
    assert code == 405
    assert answer["Allow"] == "OPTIONS, POST"
    assert "POST" in reply["error"]["message"]
    code, answer, _ = http("DELETE", server.url + "/v1/models", headers=AUTH)
    assert code == 405
    assert answer["Allow"] == "GET, HEAD, OPTIONS"


def test_cors_origins_are_normalised_or_refused_with_the_option_named(tiny_model):
    from inference.config import ServeConfig, parse_origins
    from inference.worker import ConfigError

    assert parse_origins(["https://A.example/, http://localhost:3000", "https://a.example"]) == (
        "https://a.example",
        "http://localhost:3000",
    )
    assert parse_origins(["*"]) == ("*",)
    config = ServeConfig(model=str(tiny_model), cors_origins=("HTTPS://Chat.Example.org/",)).validated()
    assert config.cors_origins == ("https://chat.example.org",)
    assert ServeConfig(model=str(tiny_model)).validated().cors_origins == ()
    for bad in ("chat.example.org", "https://chat.example.org/app", "null", "https://"):
        with pytest.raises(ConfigError, match="--cors-origin"):
            parse_origins([bad])
