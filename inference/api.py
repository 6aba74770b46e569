"""OpenAI request bodies: validation into typed requests, and the response and chunk shapes.

Every error names the offending field, so a client can fix its request without reading server logs.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from inference.engine import SamplingParams

MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


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

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


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

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, **self.sampling)


def _common(body: dict, kind: str, model_alias: str, default_max_tokens: int | None) -> dict:
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
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise invalid("n", "only n=1 is supported; send one request per completion")
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens", 1)
    else:
        max_tokens = _integer(body, "max_tokens", 1)
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
        include_usage = _boolean(stream_options, "include_usage")
        if not stream:
            raise invalid("stream_options", "only allowed when stream is true")
    if body.get("logprobs") not in (None, False, 0):
        raise invalid("logprobs", "log probabilities are not supported by this server")
    if kind == "completion" and _boolean(body, "echo"):
        raise invalid("echo", "echo is not supported by this server")
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    sampling = {
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "top_k": _integer(body, "top_k", 0, 1_000_000) or 0,
        "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
        "seed": seed,
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    }
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    return {
        "kind": kind,
        "model": model_alias,
        "max_tokens": max_tokens,
        "sampling": sampling,
        "stop": stops,
        "stream": stream,
        "include_usage": include_usage,
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
    }


def parse_completion(body, model_alias: str, n_vocab: int) -> GenerationRequest:
    if not isinstance(body, dict):
        raise invalid("body", "expected a JSON object")
    if "prompt" not in body:
        raise invalid("prompt", "required; give the text to complete")
    prompt = body["prompt"]
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
        raise invalid("prompt", "only one prompt per request is supported")
    else:
        raise invalid("prompt", "expected a string, or a list of token ids")
    fields = _common(body, "completion", model_alias, default_max_tokens=16)
    return GenerationRequest(prompt_text=text, prompt_tokens=tokens, **fields)


def _message_text(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{index}].content[{j}]"
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(where, 'only text parts ({"type": "text", "text": ...}) are supported')
            if not isinstance(part.get("text"), str):
                raise invalid(where + ".text", "expected a string")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{index}].content", "expected a string or a list of text parts")


def parse_chat(body, model_alias: str) -> tuple[GenerationRequest, list[dict]]:
    if not isinstance(body, dict):
        raise invalid("body", "expected a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", 'required; give a non-empty list of {"role", "content"} objects')
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}]", "expected an object with role and content")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"messages[{i}].role", f"{role!r} is not one of {', '.join(CHAT_ROLES)}")
        clean.append({"role": role, "content": _message_text(message.get("content"), i)})
    fields = _common(body, "chat", model_alias, default_max_tokens=None)
    return GenerationRequest(prompt_text=None, prompt_tokens=None, **fields), clean


def completion_body(req: GenerationRequest, text: str, finish: str, prompt_n: int, completion_n: int) -> dict:
    usage = {
        "prompt_tokens": prompt_n,
        "completion_tokens": completion_n,
        "total_tokens": prompt_n + completion_n,
    }
    if req.kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        obj = "chat.completion"
    return {
        "id": req.id,
        "object": obj,
        "created": req.created,
        "model": req.model,
        "choices": [choice],
        "usage": usage,
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
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model, "choices": [choice]}


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


def usage_chunk(req: GenerationRequest, prompt_n: int, completion_n: int) -> dict:
    body = chunk_body(req, None, None)
    body["choices"] = []
    body["usage"] = {
        "prompt_tokens": prompt_n,
        "completion_tokens": completion_n,
        "total_tokens": prompt_n + completion_n,
    }
    return body
