"""OpenAI request bodies: validation into typed requests, and the response and chunk shapes.

Every error names the offending field, so a client can fix its request without reading server logs. Every
field a request may carry is in REQUEST_FIELDS, with what the server does with it; anything else is refused,
so that no field is dropped without the client knowing. README's table of request fields is made from it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from inference.engine import SamplingParams

MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Signed 64 bits, as OpenAI's API takes them.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# llama.cpp's LLAMA_DEFAULT_SEED: a sampler given it draws a random seed.
LLAMA_RANDOM_SEED = 0xFFFFFFFF
# Set by the server, or a way around a refused field.
RESERVED_TEMPLATE_VARIABLES = (
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "bos_token",
    "eos_token",
    "tools",
    "documents",
)

HONOURED, REFUSED, IGNORED = "honoured", "refused", "ignored"
COMPLETIONS, CHAT, BOTH = ("completion",), ("chat",), ("completion", "chat")
ENDPOINT_PATHS = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class Limit:
    """Values of an honoured field that OpenAI's API takes and this server answers with a 400.

    ``values`` says which, for README; ``note`` is in the error's message (what to do instead); ``example``
    is a request fragment with such a value, which the tests check OpenAI's request schema accepts and this
    server refuses.
    """

    values: str
    note: str
    example: dict


@dataclass(frozen=True)
class Field:
    """What the server does with one request field.

    A refused field is refused only when its value asks for something: null and the ``inert`` values (such as
    ``n: 1``) are accepted, so that clients sending defaults are not turned away. For a refused field ``note``
    is the error message (what to do instead); for an ignored one, why ignoring it loses nothing. An honoured
    field's ``limits`` are the values it refuses although OpenAI's API takes them.
    """

    status: str
    endpoints: tuple[str, ...]
    note: str
    inert: tuple = ()
    limits: tuple[Limit, ...] = ()


_NO_ZERO_TOKENS = "at least one token is generated per request; ask for 1 or more"
_ONE_PROMPT = "one prompt per request is supported; send a request for each prompt"
_NO_PROMPT = "required; give the text to complete, as a string or a list of token ids"
EMPTY_PROMPT = "the prompt makes no tokens; give some text to complete"
_NO_FUNCTION_ROLE = "the function role is not supported; send a function's result as a tool message"
_ONLY_TEXT = 'only text parts ({"type": "text", "text": ...}) are supported by this server; send text'
_TOKENS_DISAGREE = "send only max_completion_tokens (max_tokens is its older name)"
_LEGACY_FUNCTIONS = "the legacy functions API is not supported; send tools and tool_choice"
REQUEST_FIELDS: dict[str, Field] = {
    # Both endpoints.
    "model": Field(
        HONOURED, BOTH, "The served model's id (`--alias`, default the file name); another is a 404."
    ),
    "stream": Field(HONOURED, BOTH, "Server-sent events, ending with `data: [DONE]`."),
    "stream_options": Field(
        HONOURED,
        BOTH,
        "Only with `stream: true`.",
        limits=(
            Limit(
                "without `stream: true`",
                "only allowed when stream is true",
                {"stream_options": {"include_usage": True}},
            ),
        ),
    ),
    "stream_options.include_usage": Field(HONOURED, BOTH, "A last chunk with `usage` and no choices."),
    "stream_options.include_obfuscation": Field(
        IGNORED, BOTH, "Chunks carry no obfuscation padding; it only hides token lengths from onlookers."
    ),
    "max_tokens": Field(
        HONOURED,
        BOTH,
        "Default 16 for completions, the rest of the sequence's context for chat; more than fits is a 400.",
        limits=(Limit("`0`", _NO_ZERO_TOKENS, {"max_tokens": 0}),),
    ),
    "temperature": Field(HONOURED, BOTH, "0 to 2, default 1; 0 is greedy."),
    "top_p": Field(HONOURED, BOTH, "0 to 1, default 1."),
    "top_k": Field(HONOURED, BOTH, "llama.cpp extension; default 0, off."),
    "min_p": Field(HONOURED, BOTH, "llama.cpp extension; 0 to 1, default 0, off."),
    "seed": Field(HONOURED, BOTH, "A signed 64-bit integer; see Seeds above."),
    "stop": Field(HONOURED, BOTH, f"A string or up to {MAX_STOP_STRINGS} strings; cut from the text."),
    "presence_penalty": Field(HONOURED, BOTH, "-2 to 2, over the last 64 tokens."),
    "frequency_penalty": Field(HONOURED, BOTH, "-2 to 2, over the last 64 tokens."),
    "ignore_eos": Field(
        HONOURED,
        BOTH,
        "llama.cpp extension; true generates past end-of-generation tokens up to `max_tokens`.",
    ),
    "cache_prompt": Field(
        HONOURED,
        BOTH,
        "llama.cpp extension; default true: the prompt starts after the longest prefix that a free sequence's "
        "KV cache holds from an earlier request, such as the conversation so far "
        "(`usage.prompt_tokens_details.cached_tokens` counts it); false computes the whole prompt. Off for "
        "every request with `serve --no-cache-prompt`.",
    ),
    "n": Field(REFUSED, BOTH, "one choice per request is supported; send n requests", inert=(1,)),
    "logprobs": Field(
        REFUSED, BOTH, "log probabilities are not supported by this server; leave logprobs out", (False, 0)
    ),
    "logit_bias": Field(
        HONOURED,
        BOTH,
        "Token id (a string of digits, below the vocabulary size) to a bias from -100 to 100, added to that "
        "token's logit before sampling; -100 in effect bans the token. Greedy decoding honours it too.",
    ),
    "user": Field(IGNORED, BOTH, "An end-user id for the provider's abuse tracking; there is none here."),
    "safety_identifier": Field(IGNORED, BOTH, "Like `user`."),
    "metadata": Field(IGNORED, CHAT, "Tags of stored completions; none are stored (see `store`)."),
    "prompt_cache_key": Field(IGNORED, CHAT, "Routes to a provider's prompt cache; one head has no routing."),
    "store": Field(
        REFUSED, CHAT, "this server keeps no completions; leave store out or send false", inert=(False,)
    ),
    "service_tier": Field(
        REFUSED, CHAT, "this server has one service tier; leave service_tier out", inert=("auto", "default")
    ),
    # /v1/completions only.
    "prompt": Field(
        HONOURED,
        COMPLETIONS,
        "A string, or a list of token ids; one prompt per request.",
        limits=(
            Limit(
                "a list of several prompts (strings or lists of token ids)",
                _ONE_PROMPT,
                {"prompt": ["a", "b"]},
            ),
            Limit(
                "`null` or `[]` (OpenAI's API then completes from a document's start)",
                _NO_PROMPT,
                {"prompt": None},
            ),
            Limit(
                'text that makes no tokens, such as `""` for a model without a BOS token',
                EMPTY_PROMPT,
                {"prompt": ""},
            ),
        ),
    ),
    "echo": Field(REFUSED, COMPLETIONS, "echo is not supported; prepend the prompt yourself", inert=(False,)),
    "suffix": Field(
        REFUSED, COMPLETIONS, "fill-in-the-middle is not supported; send the text before the gap", ("",)
    ),
    "best_of": Field(
        REFUSED, COMPLETIONS, "server-side best-of is not supported; send requests with different seeds", (1,)
    ),
    # /v1/chat/completions only.
    "messages": Field(HONOURED, CHAT, "Normalised, then rendered by the GGUF's chat template; see above."),
    "messages[].role": Field(
        HONOURED,
        CHAT,
        "system, developer (as system), user, assistant, tool.",
        limits=(
            Limit(
                "`function` (deprecated)",
                _NO_FUNCTION_ROLE,
                {"messages": [{"role": "function", "name": "f", "content": "42"}]},
            ),
        ),
    ),
    "messages[].content": Field(
        HONOURED, CHAT, "A string or a list of text parts; null only in an assistant message."
    ),
    "messages[].content[].type": Field(
        HONOURED,
        CHAT,
        "`text` only; images, audio and files are a 400.",
        limits=(
            Limit(
                "`image_url`, `input_audio`, `file`, and an assistant's `refusal`",
                _ONLY_TEXT,
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}
                    ]
                },
            ),
        ),
    ),
    "messages[].content[].text": Field(HONOURED, CHAT, "Parts are joined without a separator."),
    "messages[].name": Field(HONOURED, CHAT, "Given to the chat template (Qwen3's does not print it)."),
    "messages[].tool_call_id": Field(HONOURED, CHAT, "Given to the chat template with the message."),
    "messages[].tool_calls": Field(
        HONOURED,
        CHAT,
        "An assistant's earlier calls (`id`, `type: function`, `function.name`, `function.arguments` a JSON "
        "string), rendered by the template as Qwen3's `<tool_call>` blocks.",
    ),
    "messages[].function_call": Field(REFUSED, CHAT, _LEGACY_FUNCTIONS),
    "messages[].refusal": Field(REFUSED, CHAT, "a refusal cannot be replayed; put its text in content"),
    "messages[].audio": Field(REFUSED, CHAT, "audio is not supported by this server; send text"),
    "max_completion_tokens": Field(
        HONOURED,
        CHAT,
        "Same as `max_tokens`, which may then be left out or be equal.",
        limits=(
            Limit("`0`", _NO_ZERO_TOKENS, {"max_completion_tokens": 0}),
            Limit(
                "another value than `max_tokens` in the same request",
                _TOKENS_DISAGREE,
                {"max_tokens": 4, "max_completion_tokens": 5},
            ),
        ),
    ),
    "chat_template_kwargs": Field(
        HONOURED,
        CHAT,
        'Variables for the chat template, such as `{"enable_thinking": false}` for Qwen3; not '
        + ", ".join(RESERVED_TEMPLATE_VARIABLES)
        + ".",
    ),
    "top_logprobs": Field(
        REFUSED, CHAT, "log probabilities are not supported by this server; leave top_logprobs out", (0,)
    ),
    "tools": Field(
        HONOURED,
        CHAT,
        "Functions (`name`, `description`, `parameters` a JSON schema, `strict`), listed to the model by the "
        "chat template; its `<tool_call>` replies become `message.tool_calls`, finish_reason `tool_calls`.",
    ),
    "tool_choice": Field(
        HONOURED,
        CHAT,
        "`auto` (default with tools), `none` (the `<tool_call>` token is banned), `required` or "
        '`{"type": "function", "function": {"name": ...}}`: these two are enforced by a grammar, so the '
        "reply is calls whose arguments match the schema.",
    ),
    "parallel_tool_calls": Field(
        HONOURED, CHAT, "Default true; false allows one call per reply (later ones are dropped)."
    ),
    "functions": Field(REFUSED, CHAT, _LEGACY_FUNCTIONS, inert=([],)),
    "function_call": Field(REFUSED, CHAT, _LEGACY_FUNCTIONS, inert=("none", "auto")),
    "response_format": Field(
        HONOURED,
        CHAT,
        "`text`, `json_object` or `json_schema` (`name`, `schema`, `strict`), enforced by a llama.cpp grammar "
        "made with llama-cpp-python's schema converter; with `strict` a keyword it cannot enforce is a 400.",
    ),
    "reasoning_format": Field(
        HONOURED,
        CHAT,
        "llama.cpp extension: `none` keeps `<think>` blocks in `content`; `auto`, `deepseek` move them to "
        "`reasoning_content`. Default: `serve --reasoning-format`.",
    ),
    "prediction": Field(REFUSED, CHAT, "predicted outputs are not supported by this server; leave it out"),
    "audio": Field(REFUSED, CHAT, "audio output is not supported by this server; leave it out"),
    "modalities": Field(REFUSED, CHAT, "this server answers in text only", inert=(["text"],)),
    "reasoning_effort": Field(
        REFUSED,
        CHAT,
        'not supported; to turn Qwen3\'s thinking off send chat_template_kwargs {"enable_thinking": false}',
    ),
    "verbosity": Field(REFUSED, CHAT, "not supported by this server; leave it out", inert=("medium",)),
    "web_search_options": Field(REFUSED, CHAT, "web search is not available on this server"),
}


def _same(a, b) -> bool:
    """Equal and of one type, so that ``true`` is not ``1`` and ``0`` is not ``false``."""
    return type(a) is type(b) and a == b


def fields_table() -> str:
    """README's table of request fields, in Markdown."""
    lines = ["| Field | Endpoints | Status | Notes |", "|---|---|---|---|"]
    for name, spec in REQUEST_FIELDS.items():
        where = _where(spec)
        status = spec.status
        if spec.status == REFUSED:
            status = "refused" + (
                " unless " + " or ".join(f"`{json.dumps(v)}`" for v in spec.inert) if spec.inert else ""
            )
        note = spec.note if spec.status != REFUSED else _sentence(spec.note)
        lines.append(f"| `{name}` | {where} | {status} | {note} |")
    return "\n".join(lines) + "\n"


def _sentence(note: str) -> str:
    return note[0].upper() + note[1:] + "."


def _where(spec: Field) -> str:
    return "both" if spec.endpoints == BOTH else ENDPOINT_PATHS[spec.endpoints[0]].removeprefix("/v1/")


def refusals() -> list[tuple[str, Field, Limit | None]]:
    """Every request OpenAI's API takes that this server answers with a 400: each value of a refused field
    that asks for something, and each honoured field's limits."""
    found = []
    for name, spec in REQUEST_FIELDS.items():
        if spec.status == REFUSED:
            found.append((name, spec, None))
        found.extend((name, spec, limit) for limit in spec.limits)
    return found


def refusals_table() -> str:
    """README's table of the requests OpenAI's API takes and this server refuses, in Markdown."""
    lines = ["| Field | Values | Endpoints | Why, and what to do instead |", "|---|---|---|---|"]
    for name, spec, limit in refusals():
        if limit is None:
            values = (
                "any but " + " or ".join(f"`{json.dumps(v)}`" for v in spec.inert) if spec.inert else "any"
            )
            note = spec.note
        else:
            values, note = limit.values, limit.note
        lines.append(f"| `{name}` | {values} | {_where(spec)} | {_sentence(note)} |")
    return "\n".join(lines) + "\n"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def __reduce__(self):
        # Whole, from the process that prepares a large request (see server._Preparer).
        return type(self), (self.status, self.message, self.param, self.code, self.kind, self.headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def _printable(name: str) -> str:
    """A field name fit for an error message, even one that is not valid text."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_text(body) -> None:
    """Refuses a string anywhere in the body that cannot be encoded as UTF-8: JSON's escapes can spell half of
    a surrogate pair (``"\\ud83d"``), which Python keeps as a lone surrogate that no tokenizer takes."""
    pending = [(body, "")]
    while pending:  # not recursive: any depth the JSON parser took is fine
        value, path = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise invalid(
                    _printable(path),
                    f"not valid Unicode text: a lone surrogate {value[exc.start]!a} at character {exc.start} "
                    "(half of a character escaped as a \\ud800-\\udfff pair); send whole characters",
                ) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                pending.extend(((item, where), (key, where)))
        elif isinstance(value, list):
            containers = (item for item in enumerate(value) if isinstance(item[1], str | dict | list))
            pending.extend((item, f"{path}[{i}]") for i, item in containers)


def _check_fields(obj: dict, kind: str, table_prefix: str = "", param_prefix: str = "") -> None:
    """Refuses a field that is not in REQUEST_FIELDS, one of the other endpoint, and a refused field whose
    value asks for something."""
    for key, value in obj.items():
        param = param_prefix + key
        spec = REQUEST_FIELDS.get(table_prefix + key)
        if spec is None:
            raise invalid(
                param,
                "unknown field; this server does not take it, so remove it "
                "(the fields it takes are listed in the README of llmfleet's inference service)",
                code="unknown_field",
            )
        if kind not in spec.endpoints:
            other = ENDPOINT_PATHS[spec.endpoints[0]]
            raise invalid(
                param, f"a field of {other}, not of {ENDPOINT_PATHS[kind]}; remove it", code="unknown_field"
            )
        if spec.status == REFUSED and value is not None and not any(_same(value, v) for v in spec.inert):
            raise invalid(param, spec.note, code="unsupported_field")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise invalid(name, f"expected a number between {low} and {high}, got {type(value).__name__}")
    if not low <= value <= high:
        raise invalid(name, f"{value} is out of range; use a number between {low} and {high}")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(name, f"expected an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(name, f"{value} is out of range; use an integer {bound}")
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"expected true or false, got {type(value).__name__}")
    return value


def sampler_seed(seed: int) -> int:
    """The 32-bit seed llama.cpp's sampler gets for an API seed (a signed 64-bit integer).

    Every bit of the seed counts (splitmix64's finaliser, folded to 32 bits), so seeds that share their low 32
    bits do not behave alike; and the result is never LLAMA_RANDOM_SEED, which would make the sampler draw a
    random seed instead of repeating itself.
    """
    mask = 0xFFFFFFFFFFFFFFFF
    z = (seed + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    folded = (z ^ (z >> 32)) & 0xFFFFFFFF
    return folded if folded != LLAMA_RANDOM_SEED else 0


@dataclass
class GenerationRequest:
    kind: str  # "completion" | "chat"
    model: str
    prompt_text: str | None
    prompt_tokens: list[int] | None
    max_tokens: int | None
    sampling: dict
    stop: list[str]
    stream: bool
    include_usage: bool
    id: str
    created: int
    max_tokens_field: str = "max_tokens"  # as the client sent it, for errors
    template_kwargs: dict = field(default_factory=dict)
    chat: object = None  # chat.ChatPlan of a chat request, once prepared

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, **self.sampling)


def _request_body(body, kind: str) -> dict:
    if not isinstance(body, dict):
        raise invalid("body", "expected a JSON object")
    _check_text(body)
    _check_fields(body, kind)
    return body


def _token_count(body: dict, name: str) -> int | None:
    if _same(body.get(name), 0):
        raise invalid(name, f"0 is out of range: {_NO_ZERO_TOKENS}")
    return _integer(body, name, 1)


def _max_tokens(body: dict, kind: str) -> tuple[int | None, str]:
    max_tokens = _token_count(body, "max_tokens")
    if kind != "chat" or body.get("max_completion_tokens") is None:
        return max_tokens, "max_tokens"
    newer = _token_count(body, "max_completion_tokens")
    if max_tokens is not None and max_tokens != newer:
        raise invalid(
            "max_completion_tokens", f"{newer} disagrees with max_tokens {max_tokens}; {_TOKENS_DISAGREE}"
        )
    return newer, "max_completion_tokens"


def _logit_bias(body: dict, n_vocab: int | None) -> tuple[tuple[int, float], ...]:
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid("logit_bias", 'expected an object of token id to bias, such as {"1234": -100}')
    biases = []
    for key, bias in value.items():
        if not key.isascii() or not key.isdigit():
            raise invalid(
                "logit_bias", f"key {key!r} is not a token id; keys are token ids written as strings"
            )
        token = int(key)
        if n_vocab is not None and token >= n_vocab:
            raise invalid(
                "logit_bias", f"token id {token} is out of range; the vocabulary has {n_vocab} tokens"
            )
        if not _is_number(bias) or not -100 <= bias <= 100:
            raise invalid("logit_bias", f"the bias of token {token} must be a number from -100 to 100")
        biases.append((token, float(bias)))
    return tuple(biases)


def _common(
    body: dict, kind: str, model_alias: str, default_max_tokens: int | None, n_vocab: int | None = None
) -> dict:
    model = body.get("model", model_alias)
    if not isinstance(model, str):
        raise invalid("model", f"expected a string, got {type(model).__name__}")
    if model != model_alias:
        raise ApiError(
            404,
            f"model: the model '{model}' does not exist; this server serves '{model_alias}' (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    max_tokens, max_tokens_field = _max_tokens(body, kind)
    if max_tokens is None:
        max_tokens = default_max_tokens
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise invalid("stop", "expected a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"{len(stops)} stop strings; at most {MAX_STOP_STRINGS} are accepted")
    stops = [s for s in stops if s]
    stream = _boolean(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise invalid("stream_options", 'expected an object such as {"include_usage": true}')
        _check_fields(stream_options, kind, "stream_options.", "stream_options.")
        include_usage = _boolean(stream_options, "include_usage")
        if not stream:
            raise invalid("stream_options", "only allowed when stream is true")
    seed = _integer(body, "seed", SEED_MIN, SEED_MAX)
    sampling = {
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "top_k": _integer(body, "top_k", 0, 1_000_000) or 0,
        "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
        "seed": None if seed is None else sampler_seed(seed),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "ignore_eos": _boolean(body, "ignore_eos"),
        "cache_prompt": _boolean(body, "cache_prompt", default=True),
        "logit_bias": _logit_bias(body, n_vocab),
    }
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    return {
        "kind": kind,
        "model": model_alias,
        "max_tokens": max_tokens,
        "max_tokens_field": max_tokens_field,
        "sampling": sampling,
        "stop": stops,
        "stream": stream,
        "include_usage": include_usage,
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
    }


def parse_completion(body, model_alias: str, n_vocab: int) -> GenerationRequest:
    body = _request_body(body, "completion")
    prompt = body.get("prompt")
    if prompt is None or prompt == []:
        raise invalid("prompt", _NO_PROMPT)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    text, tokens = None, None
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(not 0 <= t < n_vocab for t in prompt):
            raise invalid("prompt", f"token ids must be between 0 and {n_vocab - 1}")
        tokens = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise invalid("prompt", _ONE_PROMPT)
    else:
        raise invalid("prompt", "expected a string, or a list of token ids")
    fields = _common(body, "completion", model_alias, default_max_tokens=16, n_vocab=n_vocab)
    return GenerationRequest(prompt_text=text, prompt_tokens=tokens, **fields)


def _message_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{index}].content[{j}]"
            if not isinstance(part, dict) or "type" not in part:
                raise invalid(where, f"expected a content part; {_ONLY_TEXT}")
            if part["type"] != "text":
                raise invalid(where + ".type", f"{part['type']!r}: {_ONLY_TEXT}")
            _check_fields(part, "chat", "messages[].content[].", where + ".")
            if not isinstance(part.get("text"), str):
                raise invalid(where + ".text", "expected a string")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{index}].content", "expected a string or a list of text parts")


def _message(message, i: int) -> dict:
    if not isinstance(message, dict):
        raise invalid(f"messages[{i}]", "expected an object with role and content")
    role = message.get("role")
    if role == "function":
        raise invalid(f"messages[{i}].role", _NO_FUNCTION_ROLE)
    if role not in CHAT_ROLES:
        raise invalid(f"messages[{i}].role", f"{role!r} is not one of {', '.join(CHAT_ROLES)}")
    _check_fields(message, "chat", "messages[].", f"messages[{i}].")
    content = message.get("content")
    if content is None and role != "assistant":
        raise invalid(f"messages[{i}].content", f'required in a {role} message; send "" for an empty one')
    clean = {"role": role, "content": "" if content is None else _message_text(content, i)}
    if message.get("tool_calls"):
        if role != "assistant":
            raise invalid(f"messages[{i}].tool_calls", "only an assistant message has tool calls")
        clean["tool_calls"] = _tool_calls(message["tool_calls"], i)
    for key in ("name", "tool_call_id"):
        value = message.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise invalid(f"messages[{i}].{key}", f"expected a string, got {type(value).__name__}")
            clean[key] = value
    return clean


def _tool_calls(calls, i: int) -> list[dict]:
    """An assistant message's tool calls, as OpenAI gives them back: id, type function, name, arguments."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise invalid(where, "expected a list of tool calls")
    clean = []
    for j, call in enumerate(calls):
        here = f"{where}[{j}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise invalid(here, 'expected {"id": ..., "type": "function", "function": {"name", "arguments"}}')
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(here + ".function", 'expected {"name": ..., "arguments": "<JSON text>"}')
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise invalid(here + ".function.arguments", "expected the arguments' JSON as a string")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise invalid(here + ".id", "expected a string")
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if call_id is not None:
            entry["id"] = call_id
        clean.append(entry)
    return clean


def normalise_messages(messages: list[dict]) -> list[dict]:
    """The one rewrite of a chat before its template: ``developer`` (OpenAI's newer name) becomes ``system``,
    and adjacent system messages become one, since many templates take a single system message first and
    drop or refuse another. A trailing assistant message stays: the template renders it to be continued."""
    out: list[dict] = []
    for message in messages:
        if message["role"] == "developer":
            message = {**message, "role": "system"}
        previous = out[-1] if out else None
        if (
            previous is not None
            and message["role"] == previous["role"] == "system"
            and "name" not in message
            and "name" not in previous
        ):
            out[-1] = {**previous, "content": previous["content"] + "\n\n" + message["content"]}
        else:
            out.append(message)
    return out


def _template_kwargs(body: dict) -> dict:
    value = body.get("chat_template_kwargs")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("chat_template_kwargs", 'expected an object such as {"enable_thinking": false}')
    for key in value:
        where = f"chat_template_kwargs.{key}"
        if key in RESERVED_TEMPLATE_VARIABLES:
            hints = {"tools": "send them as the request's tools", "documents": "put them in a message"}
            hint = hints.get(key, "the server sets it from the request")
            raise invalid(where, f"may not be set: {hint}")
        if not key.isidentifier():
            raise invalid(where, "not a template variable name; use letters, digits and _")
    return dict(value)


def parse_chat(body, model_alias: str, n_vocab: int | None = None) -> tuple[GenerationRequest, list[dict]]:
    """The request and its messages, normalised (see normalise_messages) for the chat template. Token ids
    (logit_bias) are checked against ``n_vocab`` when given."""
    body = _request_body(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", 'required; give a non-empty list of {"role", "content"} objects')
    clean = normalise_messages([_message(message, i) for i, message in enumerate(messages)])
    template_kwargs = _template_kwargs(body)
    fields = _common(body, "chat", model_alias, default_max_tokens=None, n_vocab=n_vocab)
    req = GenerationRequest(prompt_text=None, prompt_tokens=None, template_kwargs=template_kwargs, **fields)
    return req, clean


# The shapes below are OpenAI's published schemas (CreateCompletionResponse, CreateChatCompletionResponse,
# CreateChatCompletionStreamResponse, CompletionUsage), which tests/inference/test_openai_schema.py checks
# every reply against. A key the schema requires is sent even when its value is null: clients generated
# from the schema with required-field checks refuse an object without it.


def _usage(prompt_n: int, completion_n: int, cached_n: int) -> dict:
    return {
        "prompt_tokens": prompt_n,
        "completion_tokens": completion_n,
        "total_tokens": prompt_n + completion_n,
        "prompt_tokens_details": {"cached_tokens": cached_n},
    }


def completion_body(
    req: GenerationRequest, text: str, finish: str, prompt_n: int, completion_n: int, cached_n: int = 0
) -> dict:
    """A whole reply; ``cached_n`` of the ``prompt_n`` prompt tokens came from the KV cache."""
    if req.kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    return {
        "id": req.id,
        "object": obj,
        "created": req.created,
        "model": req.model,
        "choices": [choice],
        "usage": _usage(prompt_n, completion_n, cached_n),
    }


def chunk_body(req: GenerationRequest, text: str | None, finish: str | None, role: bool = False) -> dict:
    if req.kind == "completion":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        delta = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    body = {"id": req.id, "object": obj, "created": req.created, "model": req.model, "choices": [choice]}
    if req.include_usage and req.kind == "chat":
        # With include_usage every chat chunk carries usage, null until the last. A completion's chunk
        # leaves it out instead: CreateCompletionResponse's usage may be absent but not null.
        body["usage"] = None
    return body


def chunk_frame(req: GenerationRequest) -> tuple[str, str]:
    """The JSON of a text chunk split around its text: ``before + json.dumps(text) + after`` equals
    ``json.dumps(chunk_body(req, text, None), separators=(",", ":"))``."""
    marker = "\x00"
    encoded = json.dumps(chunk_body(req, marker, None), separators=(",", ":"))
    placeholder = json.dumps(marker)
    if encoded.count(placeholder) != 1:
        raise ValueError(f"no single text field in {encoded}")
    before, _, after = encoded.partition(placeholder)
    return before, after


def usage_chunk(req: GenerationRequest, prompt_n: int, completion_n: int, cached_n: int = 0) -> dict:
    """The last chunk of a stream with include_usage: no choices, and the usage."""
    body = chunk_body(req, None, None)
    body["choices"] = []
    body["usage"] = _usage(prompt_n, completion_n, cached_n)
    return body
