"""What Qwen3 chat clients send and expect, with the official OpenAI client against a real head: tools and
tool calls, structured output, reasoning_content, chat_template_kwargs, logit_bias."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from inference.chat import ChatParser, Message
from inference.tokenizer import Tokenizer
from tests.inference.conftest import Server, http

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer"},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days", "metric"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The forecast of a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
            },
        },
    },
]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    proc = Server(tmp_path_factory.mktemp("chat"), tiny_model, "--ctx", "2048", "--parallel", "2")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Tokenizer(str(tiny_model))


def _streamed_calls(stream) -> tuple[list[dict], str | None]:
    calls: list[dict] = []
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for part in choice.delta.tool_calls or []:
            if part.id is not None:
                assert part.index == len(calls) and part.type == "function" and part.function.name
                calls.append(
                    {"id": part.id, "name": part.function.name, "arguments": part.function.arguments}
                )
            else:
                assert part.function.name is None
                calls[part.index]["arguments"] += part.function.arguments
    return calls, finish


@pytest.mark.parametrize(
    "choice",
    [{"type": "function", "function": {"name": "get_weather"}}, "required"],
    ids=["named", "required"],
)
def test_a_forced_tool_call_round_trip_streamed_and_not(client, choice):
    ask = dict(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=120,
        extra_body=NO_THINKING,
    )
    reply = client.chat.completions.create(**ask)
    choice0 = reply.choices[0]
    assert choice0.finish_reason == "tool_calls"
    assert choice0.message.content is None
    (call,) = choice0.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])

    calls, finish = _streamed_calls(client.chat.completions.create(**ask, stream=True))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [(call.function.name, call.function.arguments)]

    # The result goes back as a tool message; the model then answers in text.
    answer = client.chat.completions.create(
        model="tiny",
        messages=[*ASK, choice0.message.model_dump(exclude_none=True), _tool_result(call.id)],
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=8,
        extra_body=NO_THINKING,
    )
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.usage.prompt_tokens > reply.usage.prompt_tokens


def _tool_result(call_id: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": '{"forecast": "sunny", "celsius": 21}'}


def test_the_template_renders_tools_calls_and_results_as_qwen3_does(tokenizer):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        _tool_result("call_1"),
        _tool_result("call_2"),
    ]
    text = tokenizer.render_chat(messages, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n" + json.dumps(TOOLS[1]) + "\n</tools>" in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
        in text
    )
    result = '\n<tool_response>\n{"forecast": "sunny", "celsius": 21}\n</tool_response>'
    assert f"<|im_start|>user{result}{result}<|im_end|>\n<|im_start|>assistant\n" in text
    ids = tokenizer.tokenize(text, add_special=False)
    for tag in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        assert tokenizer.single_token(tag) in ids


def test_response_format_json_schema_gives_json_that_validates(client, server):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
            "confidence": {"type": "integer"},
            "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
        },
        "required": ["answer", "confidence", "flags"],
        "additionalProperties": False,
    }
    ask = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Is it sunny?"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": schema, "strict": True},
        },
        temperature=0,
        max_tokens=100,
        extra_body=NO_THINKING,
    )
    reply = client.chat.completions.create(**ask)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    streamed = client.chat.completions.create(**ask, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == reply.choices[0].message.content
    )

    unsupported = {
        **schema,
        "properties": {**schema["properties"], "confidence": {"type": "integer", "minimum": 0}},
    }
    code, _, body = http(
        "POST",
        server.url + "/v1/chat/completions",
        {
            "messages": ask["messages"],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": unsupported, "strict": True},
            },
        },
    )
    assert code == 400
    assert body["error"]["param"] == "response_format.json_schema.schema.properties.confidence.minimum"
    assert "strict false" in body["error"]["message"]


def test_enable_thinking_false_changes_the_prompt(client, tokenizer):
    ask = dict(model="tiny", messages=ASK, temperature=0, max_tokens=4)
    thinking = client.chat.completions.create(**ask)
    plain = client.chat.completions.create(**ask, extra_body=NO_THINKING)
    empty_block = tokenizer.tokenize("<think>\n\n</think>\n\n", add_special=False)
    assert plain.usage.prompt_tokens == thinking.usage.prompt_tokens + len(empty_block)
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None


def test_reasoning_is_split_from_the_content(client, tokenizer):
    # The prompt ends inside a think block (a prefill), so the reply starts as reasoning; "</think>" is
    # banned, so all of it is.
    close = tokenizer.single_token("</think>")
    ask = dict(
        model="tiny",
        messages=[*ASK, {"role": "assistant", "content": "<think>\n"}],
        temperature=0,
        max_tokens=12,
        logit_bias={str(close): -100},
        extra_body={"ignore_eos": True},
    )
    split = client.chat.completions.create(**ask)
    inline = client.chat.completions.create(
        **{**ask, "extra_body": {"ignore_eos": True, "reasoning_format": "none"}}
    )
    reasoning = split.choices[0].message.reasoning_content
    assert reasoning and reasoning == inline.choices[0].message.content.strip()
    assert not split.choices[0].message.content
    assert getattr(inline.choices[0].message, "reasoning_content", None) is None
    assert split.usage.completion_tokens == inline.usage.completion_tokens == 12
    streamed = client.chat.completions.create(**ask, stream=True)
    chunks = [c.choices[0].delta for c in streamed if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in chunks) == reasoning
    assert not "".join(d.content or "" for d in chunks)

    # Closed by the model ("</think>" pushed up), then the answer under a schema's grammar: the content is the
    # JSON alone.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    closed = client.chat.completions.create(
        **{**ask, "logit_bias": {str(close): 100}, "max_tokens": 30, "extra_body": {}},
        response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}},
    )
    jsonschema.validate(json.loads(closed.choices[0].message.content), schema)
    assert "</think>" not in closed.choices[0].message.content


def test_a_logit_bias_of_minus_100_changes_the_greedy_first_token(server, tokenizer):
    def first(**extra):
        code, _, body = http(
            "POST",
            server.url + "/v1/completions",
            {"prompt": "The weather today", "max_tokens": 1, "temperature": 0, **extra},
        )
        assert code == 200, body
        (token,) = tokenizer.tokenize(body["choices"][0]["text"], add_special=False)
        return token

    greedy = first()
    banned = first(logit_bias={str(greedy): -100})
    assert banned != greedy
    assert first(logit_bias={str(greedy): -100, str(banned): -100}) not in (greedy, banned)
    # The sampler chain's path (temperature > 0) honours it too.
    assert first(temperature=0.8, seed=3, logit_bias={"300": 100}) == 300


BAD = [
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": [5]}, "logit_bias"),
    ({"tools": {"name": "f"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
        "response_format.json_schema.name",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "tuple"}},
            }
        },
        "response_format.json_schema.schema.type",
    ),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"reasoning_format": "hidden"}, "reasoning_format"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{}]}]}, "messages[0].tool_calls"),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": {}}}],
                }
            ]
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_tool_format_and_bias_fields_get_a_400_naming_them(server, extra, param):
    code, _, body = http("POST", server.url + "/v1/chat/completions", {"messages": ASK, **extra})
    assert code == 400, body
    assert body["error"]["param"] == param, body
    assert param in body["error"]["message"]


def _parse(text: str, step: int, **kwargs) -> tuple[dict, str]:
    parser, message = ChatParser(**kwargs), Message()
    for i in range(0, len(text), step):
        for delta in parser.feed(text[i : i + step]):
            message.add(delta)
    for delta in parser.finish():
        message.add(delta)
    out: dict = {}
    message.fill(out)
    return out, parser.finish_reason("stop")


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_the_reply_parser_splits_reasoning_content_and_calls_however_the_text_arrives(step):
    text = (
        '<think>\nIt is a < b </thi question.\n</think>\n\nLet me look.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris", "n": {"deep": "}"}}}\n</tool_call>\n<tool_call>\n'
        '{"arguments": {}, "name": "get_time"}\n</tool_call>'
    )
    message, reason = _parse(text, step, reasoning=True, reasoning_open=False, tools=True)
    assert reason == "tool_calls"
    assert message["reasoning_content"] == "It is a < b </thi question."
    assert message["content"] == "Let me look."
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert calls == [("get_weather", '{"city": "Paris", "n": {"deep": "}"}}'), ("get_time", "{}")]
    one, _ = _parse(text, step, reasoning=True, reasoning_open=False, tools=True, parallel=False)
    assert len(one["tool_calls"]) == 1
    inline, reason = _parse(text, step, reasoning=False, reasoning_open=False, tools=False)
    assert inline == {"content": text} and reason == "stop"
    broken, reason = _parse(
        "<tool_call>\nnot json\n</tool_call>", step, reasoning=True, reasoning_open=False, tools=True
    )
    assert broken == {"content": "<tool_call>\nnot json\n</tool_call>"} and reason == "stop"
