"""Every shape the server sends, checked against OpenAI's published API schema (tests/inference/openai_openapi):
models listed and retrieved, completions and chat completions plain and streamed (each chunk, the usage
chunk), and errors; and the requests the schema takes that the server refuses, as README lists them."""

from __future__ import annotations

import itertools
import json
from http.client import HTTPConnection

import pytest

from inference import api
from tests.inference import openai_openapi as spec
from tests.inference.conftest import Server, http
from tests.inference.test_hostile import LIVE_VALUES, _with_field

KEY = "schema-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema")
    (tmp / "key").write_text(KEY)
    proc = Server(tmp, tiny_model, "--ctx", "1024", "--parallel", "2", "--api-key-file", str(tmp / "key"))
    yield proc
    proc.stop()


def _post(server, path: str, body) -> dict:
    code, _, reply = http("POST", server.url + path, body, AUTH)
    assert code == 200, reply
    return reply


def _events(server, path: str, body: dict) -> list[dict]:
    """A stream's events, parsed, after checking that it ends with [DONE]."""
    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(
            "POST", path, json.dumps({**body, "stream": True}), {**AUTH, "Content-Type": "application/json"}
        )
        response = conn.getresponse()
        assert response.status == 200
        raw = response.read().decode()
    finally:
        conn.close()
    data = [event.removeprefix("data: ") for event in raw.split("\n\n") if event]
    assert data[-1] == "[DONE]", raw
    return [json.loads(event) for event in data[:-1]]


def test_models_listed_and_retrieved_match_the_schema(server):
    code, _, listed = http("GET", server.url + "/v1/models", headers=AUTH)
    assert code == 200
    spec.check(listed, "ListModelsResponse")
    code, _, model = http("GET", server.url + "/v1/models/tiny", headers=AUTH)
    assert code == 200
    spec.check(model, "Model")


COMPLETIONS = [
    {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True},  # finish_reason length
    {"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0},  # token ids
    {"prompt": ["Hello"], "max_tokens": 2, "seed": 7, "stop": ["\n"], "user": "u"},
]
CHATS = [
    CHAT,  # the smallest request: no model, no sampling fields
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3},
    {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "assistant", "content": None},
            {"role": "user", "content": "Again"},
        ],
        "max_tokens": 5,
        "temperature": 0,
        "stop": "x",
        "ignore_eos": True,
    },
]


@pytest.mark.parametrize("body", COMPLETIONS)
def test_completions_match_the_schema(server, body):
    spec.check(_post(server, "/v1/completions", body), "CreateCompletionResponse")


@pytest.mark.parametrize("body", CHATS)
def test_chat_completions_match_the_schema(server, body):
    reply = _post(server, "/v1/chat/completions", body)
    spec.check(reply, "CreateChatCompletionResponse")
    # Required although null here: clients generated from the schema refuse a reply without them.
    choice = reply["choices"][0]
    assert choice["logprobs"] is None
    assert choice["message"]["refusal"] is None


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("body", CHATS)
def test_chat_chunks_match_the_schema(server, body, include_usage):
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = _events(server, "/v1/chat/completions", {**body, **extra})
    for chunk in chunks:
        spec.check(chunk, "CreateChatCompletionStreamResponse")
    if include_usage:
        # Every chunk carries usage, null but in the last, which has it and no choices.
        *text_chunks, last = chunks
        assert all("usage" in c and c["usage"] is None for c in text_chunks), text_chunks
        assert last["choices"] == [] and last["usage"]["completion_tokens"] >= 1
    else:
        text_chunks = chunks
        assert all("usage" not in c for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in text_chunks]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) <= {None}


# A completion's chunk is a CreateCompletionResponse ("the streamed and non-streamed response objects share
# the same shape"), whose finish_reason the schema does not let be null. OpenAI's API sends null there until
# the last chunk, as for chat, where the schema allows it; so does this server, and only there.
UNFINISHED = "$.choices[0].finish_reason"


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("body", COMPLETIONS)
def test_completion_chunks_match_the_schema(server, body, include_usage):
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = _events(server, "/v1/completions", {**body, **extra})
    if include_usage:
        *chunks, last = chunks
        spec.check(last, "CreateCompletionResponse")
        assert last["choices"] == [] and last["usage"]["completion_tokens"] >= 1
    assert all("usage" not in c for c in chunks)  # may be absent, but not null, before the last
    *unfinished, final = chunks
    spec.check(final, "CreateCompletionResponse")
    for chunk in unfinished:
        assert chunk["choices"][0]["finish_reason"] is None
        assert all(
            line.startswith(UNFINISHED + ":") for line in spec.errors(chunk, "CreateCompletionResponse")
        )


ERRORS = [
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400),
    ("POST", "/v1/completions", b'{"prompt": ', 400),
    ("POST", "/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 100_000}, 400),
    ("POST", "/v1/chat/completions", b"x" * (9 * 1024 * 1024), 413),
    ("GET", "/v1/models/gpt-4", None, 404),
    ("GET", "/v1/nothing", None, 404),
    ("GET", "/v1/completions", None, 405),
    ("GET", "/v1/models", None, 401),  # without the key
]


@pytest.mark.parametrize(("method", "path", "body", "status"), ERRORS)
def test_errors_match_the_schema(server, method, path, body, status):
    code, _, reply = http(method, server.url + path, body, AUTH if status != 401 else None)
    assert code == status, reply
    spec.check(reply, "ErrorResponse")


# Where test_hostile's value for a refused field is not one OpenAI's API takes.
SPEC_VALUES = {("completion", "logprobs"): 2, ("chat", "service_tier"): "flex"}


def _refusal_cases():
    """Each row of README's table of refused requests, as (endpoint kind, field, request fragment, param)."""
    for name, field, limit in api.refusals():
        for kind in field.endpoints:
            if limit is not None:
                fragment = limit.example
                param = name.replace("[]", "[0]")
            else:
                value = SPEC_VALUES.get((kind, name), LIVE_VALUES.get(name))
                fragment, param = _with_field(kind, name, value)
            yield pytest.param(
                kind, name, limit, fragment, param, id=f"{kind}-{name}-{json.dumps(fragment)[:40]}"
            )


@pytest.mark.parametrize(("kind", "name", "limit", "fragment", "param"), list(_refusal_cases()))
def test_each_listed_refusal_is_a_request_the_schema_takes_answered_with_a_400(
    server, kind, name, limit, fragment, param
):
    base = {"prompt": "Hello", "max_tokens": 2} if kind == "completion" else dict(CHAT)
    body = {"model": "tiny", **base, **fragment}
    spec.check(
        body,
        "CreateCompletionRequest" if kind == "completion" else "CreateChatCompletionRequest",
        request=True,
    )
    code, _, reply = http("POST", server.url + api.ENDPOINT_PATHS[kind], body, AUTH)
    assert code == 400, reply
    spec.check(reply, "ErrorResponse")
    assert reply["error"]["param"] == param
    note = limit.note if limit is not None else api.REQUEST_FIELDS[name].note
    assert note in reply["error"]["message"]


def _schema(name: str) -> dict:
    return spec.document()["components"]["schemas"][name]


def _properties(schema: dict) -> dict:
    """The properties of a schema, through its references and its allOf, oneOf and anyOf."""
    if "$ref" in schema:
        schema = _schema(schema["$ref"].rpartition("/")[2])
    found = dict(schema.get("properties", {}))
    for part in schema.get("allOf", []) + schema.get("oneOf", []) + schema.get("anyOf", []):
        found.update(_properties(part))
    return found


@pytest.mark.parametrize(
    ("kind", "schema_name"),
    [("completion", "CreateCompletionRequest"), ("chat", "CreateChatCompletionRequest")],
)
def test_every_field_of_openais_requests_is_in_request_fields(kind, schema_name):
    """So that none is refused as unknown, unlisted in README."""
    top = _properties(_schema(schema_name))
    fields = set(top)
    fields |= {f"stream_options.{name}" for name in _properties(top["stream_options"])}
    if kind == "chat":
        fields |= {f"messages[].{name}" for name in _properties(top["messages"]["items"])}
        text_part = _schema("ChatCompletionRequestMessageContentPartText")  # other parts are refused by type
        fields |= {f"messages[].content[].{name}" for name in _properties(text_part)}
    missing = sorted(f for f in fields if kind not in getattr(api.REQUEST_FIELDS.get(f), "endpoints", ()))
    assert not missing, (
        f"fields of OpenAI's {schema_name} missing from inference.api.REQUEST_FIELDS: {missing}"
    )


def _nullable_fields(schema_name: str) -> list[str]:
    """The request fields the schema lets be null."""
    fields = _properties(_schema(schema_name))
    return sorted(
        f for f in fields if not spec.errors({**_required(schema_name), f: None}, schema_name, True)
    )


def _required(schema_name: str) -> dict:
    return (
        {"model": "tiny", "prompt": "Hello"}
        if schema_name == "CreateCompletionRequest"
        else {"model": "tiny", **CHAT}
    )


@pytest.mark.parametrize(
    ("kind", "schema_name"),
    [("completion", "CreateCompletionRequest"), ("chat", "CreateChatCompletionRequest")],
)
def test_null_is_accepted_wherever_the_schema_takes_it_but_prompt(kind, schema_name):
    nullable = [f for f in _nullable_fields(schema_name) if f != "prompt"]
    assert len(nullable) >= 10, nullable  # the schema marks most optional fields nullable
    for field in nullable:
        body = {**_required(schema_name), field: None}
        if kind == "chat":
            api.parse_chat(body, "tiny")
        else:
            api.parse_completion(body, "tiny", 1024)


def _shapes():
    """Every object api.py builds, with the schema it must meet (and the paths where null is let be)."""
    for kind, include_usage in itertools.product(("completion", "chat"), (False, True)):
        body = {"prompt": "x"} if kind == "completion" else dict(CHAT)
        if include_usage:
            body.update(stream=True, stream_options={"include_usage": True})
        req = api.parse_completion(body, "m", 10) if kind == "completion" else api.parse_chat(body, "m")[0]
        plain, chunk = (
            ("CreateCompletionResponse", "CreateCompletionResponse")
            if kind == "completion"
            else ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse")
        )
        streamed = "-with-usage" if include_usage else ""
        if not include_usage:
            for finish in ("stop", "length"):
                yield f"{kind}-{finish}", api.completion_body(req, "text", finish, 3, 2), plain, ()
        unfinished = (UNFINISHED,) if kind == "completion" else ()
        if kind == "chat":
            yield f"chat-role-chunk{streamed}", api.chunk_body(req, "", None, role=True), chunk, ()
        yield f"{kind}-text-chunk{streamed}", api.chunk_body(req, "t", None), chunk, unfinished
        yield f"{kind}-last-chunk{streamed}", api.chunk_body(req, None, "stop"), chunk, ()
        if include_usage:
            yield f"{kind}-usage-chunk", api.usage_chunk(req, 3, 2), chunk, ()
    yield "error", api.invalid("n", "no").body(), "ErrorResponse", ()


def _keys(value, path="$"):
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{path}.{key}", value, key
            yield from _keys(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _keys(item, f"{path}[{i}]")


# What each schema lets a reply leave out, of the keys this server sends: every other key is required.
_CACHED = {"$.usage.prompt_tokens_details", "$.usage.prompt_tokens_details.cached_tokens"}
OPTIONAL = {
    "CreateCompletionResponse": {"$.usage", *_CACHED},
    "CreateChatCompletionResponse": {"$.usage", *_CACHED},
    "CreateChatCompletionStreamResponse": {
        "$.usage",
        *_CACHED,
        "$.choices[0].logprobs",
        "$.choices[0].delta.role",
        "$.choices[0].delta.content",
    },
    "ErrorResponse": set(),
}


@pytest.mark.parametrize(("shape", "schema"), [pytest.param(s[1], s[2:], id=s[0]) for s in _shapes()])
def test_every_shape_meets_the_schema_which_catches_each_required_key_left_out(shape, schema):
    name, nulls = schema

    def errors():
        return [line for line in spec.errors(shape, name) if line.split(":")[0] not in nulls]

    assert not errors(), errors()
    for path, parent, key in list(_keys(shape)):
        value = parent.pop(key)
        lost = errors()
        parent[key] = value
        if path in OPTIONAL[name]:
            assert not lost, f"{name} requires {path}: {lost}"
        else:
            assert lost, f"{name} is still valid without {path}"
