"""What chat clients of Qwen3 expect beyond text: tools, structured output and reasoning.

- Tools (``tools``, ``tool_choice``, ``parallel_tool_calls``) go to the chat template, which lists them in the
  system turn as Qwen3's does; the model answers with ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``
  blocks, which ChatParser turns into OpenAI ``tool_calls``. ``tool_choice`` ``required`` or a named function
  is enforced by a llama.cpp grammar, so that the reply is calls whose arguments match the functions'
  JSON schemas; ``none`` bans the ``<tool_call>`` token.
- Structured output (``response_format`` ``json_object`` or ``json_schema``) is a llama.cpp grammar too, made
  from the schema by llama-cpp-python's converter (``llama_cpp.llama_grammar.SchemaConverter``, the one
  behind ``json_schema_to_gbnf``).
- Reasoning: Qwen3 thinks in ``<think>...</think>`` before answering; ChatParser moves that text to
  ``reasoning_content`` unless the reasoning format (``serve --reasoning-format`` or the request's
  ``reasoning_format``) is ``none``. A grammar lets the model think first where the prompt has thinking on.

Everything here is decided while a request is prepared (parse_options, prepare), except ChatParser, which
runs as tokens arrive.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from dataclasses import dataclass, field

from inference.api import invalid
from inference.config import REASONING_FORMATS

TOOL_CHOICES = ("none", "auto", "required")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# OpenAI's rule for function names.
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FUNCTION_FIELDS = ("name", "description", "parameters", "strict")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}

# JSON Schema keywords that llama-cpp-python's converter turns into grammar rules, and those that only
# annotate; under ``strict`` any other keyword is refused, since the grammar would not enforce it.
SCHEMA_KEYWORDS = frozenset(
    (
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "format",
        "minLength",
        "maxLength",
    )
)
SCHEMA_ANNOTATIONS = frozenset(
    ("title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated", "readOnly")
)
SCHEMA_TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")
SCHEMA_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")

# Text of a reasoning block up to its "</think>" (one alternative per character of "</think>" that does not
# continue it), and the blank lines that follow it.
THINK_GRAMMAR = r"""think-text ::= ( [^<] | "<" ( [^/] | "/" ( [^t] | "t" ( [^h] | "h" ( [^i] | "i" ( [^n] | "n" ( [^k] | "k" [^>] ) ) ) ) ) ) )*
think-end ::= "</think>" [\n ]{0,4}"""


_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


@dataclass(frozen=True)
class ChatOptions:
    """The tool, output-format and reasoning fields of one chat request, checked.

    ``tools`` are the request's, normalised to ``{"type": "function", "function": {...}}`` (the form chat
    templates take); ``tool_choice`` is auto, none, required or function (then ``function`` names it).
    ``response_format`` is text, json_object or json_schema (then ``schema`` holds it, and ``strict``).
    """

    tools: tuple = ()
    tool_choice: str = "none"
    function: str | None = None
    parallel_tool_calls: bool = True
    response_format: str = "text"
    schema: dict | None = None
    strict: bool = False
    reasoning_format: str | None = None  # the request's; None: the server's

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forces_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice in ("required", "function")


@dataclass
class ChatPlan:
    """What generating and answering one chat request needs (made by prepare, carried by the request)."""

    options: ChatOptions = field(default_factory=ChatOptions)
    reasoning: bool = True  # split <think> blocks into reasoning_content
    reasoning_open: bool = False  # the prompt ends inside a <think> block: the reply starts in reasoning


# -- request fields -----------------------------------------------------------------------------------------


def parse_options(body: dict) -> ChatOptions:
    """The tool, response_format and reasoning_format fields of a chat body; 400 naming the field if bad."""
    tools = _tools(body.get("tools"))
    choice, function = _tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        parallel = True
    elif not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", f"expected true or false, got {type(parallel).__name__}")
    kind, schema, strict = _response_format(body.get("response_format"))
    if kind != "text" and choice in ("required", "function"):
        raise invalid(
            "response_format",
            f"cannot be {kind} while tool_choice forces a tool call; leave one of them out",
        )
    reasoning_format = body.get("reasoning_format")
    if reasoning_format is not None and reasoning_format not in REASONING_FORMATS:
        raise invalid(
            "reasoning_format", f"{reasoning_format!r} is not one of {', '.join(REASONING_FORMATS)}"
        )
    return ChatOptions(
        tools=tuple(tools),
        tool_choice=choice,
        function=function,
        parallel_tool_calls=parallel,
        response_format=kind,
        schema=schema,
        strict=strict,
        reasoning_format=reasoning_format,
    )


def _tools(value) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("tools", 'expected a list of {"type": "function", "function": {"name": ...}} objects')
    tools, names = [], set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid(
                where, 'expected {"type": "function", "function": {...}}; only functions are supported'
            )
        for key in tool:
            if key not in ("type", "function"):
                raise invalid(f"{where}.{key}", "unknown field of a tool; remove it")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{where}.function", 'expected an object with "name" and "parameters"')
        for key in function:
            if key not in FUNCTION_FIELDS:
                raise invalid(
                    f"{where}.function.{key}", f"unknown field; a function has {', '.join(FUNCTION_FIELDS)}"
                )
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise invalid(f"{where}.function.name", "required: 1 to 64 letters, digits, _ or -")
        if name in names:
            raise invalid(f"{where}.function.name", f"{name!r} is given twice; function names must differ")
        names.add(name)
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise invalid(f"{where}.function.description", "expected a string")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid(f"{where}.function.parameters", "expected a JSON schema object")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid(f"{where}.function.strict", "expected true or false")
        clean = {"name": name}
        if function.get("description") is not None:
            clean["description"] = function["description"]
        clean["parameters"] = parameters if parameters is not None else dict(EMPTY_PARAMETERS)
        if strict is not None:
            clean["strict"] = strict
        tools.append({"type": "function", "function": clean})
    return tools


def _tool_choice(value, tools: list[dict]) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if tools else "none"), None
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise invalid(
                "tool_choice",
                f'{value!r} is not one of none, auto, required, or {{"type": "function", "function": {{"name": ...}}}}',
            )
        if value == "required" and not tools:
            raise invalid("tool_choice", "required needs tools; give the functions in tools")
        return value, None
    if (
        isinstance(value, dict)
        and value.get("type") == "function"
        and isinstance(value.get("function"), dict)
    ):
        name = value["function"].get("name")
        known = [t["function"]["name"] for t in tools]
        if name not in known:
            listed = ", ".join(known) if known else "none are given"
            raise invalid("tool_choice.function.name", f"{name!r} is not a function in tools ({listed})")
        return "function", name
    raise invalid(
        "tool_choice", 'expected none, auto, required, or {"type": "function", "function": {"name": ...}}'
    )


def _response_format(value) -> tuple[str, dict | None, bool]:
    if value is None:
        return "text", None, False
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid(
            "response_format",
            'expected {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}',
        )
    kind = value["type"]
    allowed = ("type", "json_schema") if kind == "json_schema" else ("type",)
    for key in value:
        if key not in allowed:
            raise invalid(f"response_format.{key}", f"not a field of a {kind} response_format; remove it")
    if kind != "json_schema":
        return kind, None, False
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid(
            "response_format.json_schema", 'required: {"name": ..., "schema": {...}, "strict": true}'
        )
    for key in spec:
        if key not in ("name", "description", "schema", "strict"):
            raise invalid(f"response_format.json_schema.{key}", "unknown field; remove it")
    if not isinstance(spec.get("name"), str) or not FUNCTION_NAME.match(spec["name"]):
        raise invalid("response_format.json_schema.name", "required: 1 to 64 letters, digits, _ or -")
    schema = spec.get("schema")
    if schema is None:
        schema = {}
    if not isinstance(schema, dict):
        raise invalid("response_format.json_schema.schema", "expected a JSON schema object")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid("response_format.json_schema.strict", "expected true or false")
    return kind, schema, bool(strict)


def check_schema(schema, where: str, strict: bool) -> None:
    """Refuses (400, naming the keyword's path) what llama-cpp-python's converter cannot turn into a grammar:
    always a ``$ref`` outside the document, an unknown ``type``; under ``strict`` also any keyword that the
    grammar would not enforce (``minimum``, ``not``, ``uniqueItems``, an unknown ``format``, ...)."""
    pending = [(schema, where)]
    while pending:
        node, path = pending.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise invalid(path, "expected a JSON schema object")
        for key, value in node.items():
            here = f"{path}.{key}"
            if key in ("properties", "$defs", "definitions"):
                if not isinstance(value, dict):
                    raise invalid(here, "expected an object of schemas")
                pending.extend((sub, f"{here}.{name}") for name, sub in value.items())
            elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
                if not isinstance(value, list) or not value:
                    raise invalid(here, "expected a non-empty list of schemas")
                pending.extend((sub, f"{here}[{i}]") for i, sub in enumerate(value))
            elif key == "items":
                if isinstance(value, list):
                    pending.extend((sub, f"{here}[{i}]") for i, sub in enumerate(value))
                else:
                    pending.append((value, here))
            elif key == "additionalProperties" and isinstance(value, dict):
                pending.append((value, here))
            elif key == "$ref":
                if not isinstance(value, str) or not value.startswith("#/"):
                    raise invalid(here, "only references inside the schema (#/$defs/...) are supported")
            elif key == "type":
                types = value if isinstance(value, list) else [value]
                for t in types:
                    if t not in SCHEMA_TYPES:
                        raise invalid(here, f"{t!r} is not a JSON schema type ({', '.join(SCHEMA_TYPES)})")
            elif key == "required":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise invalid(here, "expected a list of property names")
            elif key == "format" and strict and value not in SCHEMA_FORMATS:
                raise invalid(
                    here,
                    f"format {value!r} cannot be enforced (supported: {', '.join(SCHEMA_FORMATS)}); "
                    "remove it or send strict false",
                )
            elif strict and key not in SCHEMA_KEYWORDS and key not in SCHEMA_ANNOTATIONS:
                raise invalid(
                    here,
                    f"the JSON schema keyword {key!r} is not supported by the grammar this server makes from "
                    "schemas; remove it, or send strict false to have it ignored",
                )


# -- grammars -----------------------------------------------------------------------------------------------


def _converter():
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _visit(converter, schema: dict, name: str, where: str) -> str:
    """The rule for ``schema`` (its references resolved) in ``converter``'s grammar."""
    try:
        schema = converter.resolve_refs(json.loads(json.dumps(schema)), where)
        return converter.visit(schema, name)
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise invalid(where, f"cannot be turned into a grammar: {exc}") from None


def _tool_call_schema(tool: dict) -> dict:
    function = tool["function"]
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": function["parameters"]},
        "required": ["name", "arguments"],
    }


def grammar(options: ChatOptions, think: str) -> str | None:
    """The GBNF grammar (root ``root``) that a reply must follow, or None for free text.

    ``think`` is what may come before the answer: "" nothing, "optional" a whole ``<think>...</think>``
    block, "open" the end of one (the prompt opened it). Raises a 400 naming the schema's field when a schema
    cannot be turned into a grammar.
    """
    converter = _converter()
    if options.forces_tools:
        tools = [
            (i, t)
            for i, t in enumerate(options.tools)
            if options.tool_choice == "required" or t["function"]["name"] == options.function
        ]
        for i, tool in tools:
            check_schema(
                tool["function"]["parameters"],
                f"tools[{i}].function.parameters",
                tool["function"].get("strict", False),
            )
        schemas = [_tool_call_schema(t) for _, t in tools]
        call_schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        call = _visit(converter, call_schema, "tool-call", "tools")
        one = f'"<tool_call>\\n" {call} "\\n</tool_call>"'
        many = options.tool_choice == "required" and options.parallel_tool_calls
        body = f'{one} ( "\\n" {one} )*' if many else one
    elif options.response_format == "json_object":
        body = _visit(converter, {"type": "object"}, "answer", "response_format")
    elif options.response_format == "json_schema":
        where = "response_format.json_schema.schema"
        check_schema(options.schema, where, options.strict)
        body = _visit(converter, options.schema, "answer", where)
    else:
        return None
    # The converter's string characters include control characters, which JSON does not allow unescaped
    # in a string (llama.cpp's own converter has since left them out): a reply would not parse.
    rules = converter.format_grammar().replace(_LOOSE_CHAR, _JSON_CHAR)
    if think == "open":
        return f"root ::= think-text think-end {body}\n{THINK_GRAMMAR}\n{rules}"
    if think == "optional":
        return f'root ::= ( "<think>" think-text think-end )? {body}\n{THINK_GRAMMAR}\n{rules}'
    return f"root ::= {body}\n{rules}"


def reasoning_open(prompt: str) -> bool:
    """Whether the prompt's last turn leaves a ``<think>`` block open (a prefill such as ``<think>\\n``), so
    that the reply starts inside the reasoning."""
    turn = prompt[prompt.rfind("<|im_start|>") + 1 :]
    return turn.rfind(THINK_OPEN) > turn.rfind(THINK_CLOSE)


# -- the reply ----------------------------------------------------------------------------------------------


def _held_suffix(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _trailing_space(text: str) -> int:
    return len(text) - len(text.rstrip())


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ChatParser:
    """Splits a chat reply, as its text arrives, into OpenAI delta fields.

    feed() and finish() return deltas, each one of ``{"reasoning_content": str}``, ``{"content": str}`` or
    ``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}`` (a call's first delta;
    later ones carry ``index`` and ``function.arguments`` fragments). Joined, the fragments of a call are its
    arguments' JSON text as the model wrote it. Text that could still become a tag is held back; a
    ``<tool_call>`` block that is not a JSON call stays in the content. ``done`` turns true once no more
    calls may follow (``parallel_tool_calls`` false and one call made): the rest of the reply is dropped.
    """

    def __init__(self, reasoning: bool, reasoning_open: bool, tools: bool, parallel: bool = True):
        self.reasoning, self.tools, self.parallel = reasoning, tools, parallel
        self.mode = "reasoning" if reasoning and reasoning_open else ("start" if reasoning else "content")
        self.skip_space = self.mode == "reasoning"
        self.pending = ""
        self.calls = 0
        self.done = False
        self.call_text = ""
        self.call_head = False  # the current call's id and name are out
        self.call_sent = 0  # characters of its arguments that are out
        self.call_id = ""

    def feed(self, text: str) -> list[dict]:
        if self.done:
            return []
        self.pending += text
        return self._run(final=False)

    def finish(self) -> list[dict]:
        """The deltas of what was held back, at the end of the reply."""
        if self.done:
            return []
        out = self._run(final=True)
        if self.mode == "call":
            self.call_text += self.pending
            self.pending = ""
            out += self._end_call(complete=False)
        elif self.pending:
            field_name = "reasoning_content" if self.mode == "reasoning" else "content"
            out.append({field_name: self.pending})
            self.pending = ""
        return out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def _run(self, final: bool) -> list[dict]:
        out: list[dict] = []
        while True:
            before = (self.mode, len(self.pending))
            getattr(self, "_" + self.mode)(out, final)
            if self.done or (self.mode, len(self.pending)) == before:
                return out

    def _start(self, out: list[dict], final: bool) -> None:
        stripped = self.pending.lstrip()
        if stripped.startswith(THINK_OPEN):
            self.pending = stripped[len(THINK_OPEN) :]
            self.mode, self.skip_space = "reasoning", True
        elif final or not THINK_OPEN.startswith(stripped):
            self.mode = "content"

    def _reasoning(self, out: list[dict], final: bool) -> None:
        if self.skip_space:
            self.pending = self.pending.lstrip()
            if not self.pending:
                return
            self.skip_space = False
        end = self.pending.find(THINK_CLOSE)
        if end >= 0:
            text = self.pending[:end].rstrip()
            if text:
                out.append({"reasoning_content": text})
            self.pending = self.pending[end + len(THINK_CLOSE) :]
            self.mode, self.skip_space = "content", True
            return
        keep = _held_suffix(self.pending, THINK_CLOSE)
        keep = max(keep, _trailing_space(self.pending[: len(self.pending) - keep]) + keep)
        if not final and len(self.pending) > keep:
            out.append({"reasoning_content": self.pending[: len(self.pending) - keep]})
            self.pending = self.pending[len(self.pending) - keep :]

    def _content(self, out: list[dict], final: bool) -> None:
        if self.skip_space:
            self.pending = self.pending.lstrip()
            if not self.pending:
                return
            self.skip_space = False
        if not self.tools:
            if self.pending and not final:
                out.append({"content": self.pending})
                self.pending = ""
            return
        start = self.pending.find(CALL_OPEN)
        if start >= 0:
            text = self.pending[:start].rstrip()
            if text:
                out.append({"content": text})
            self.pending = self.pending[start + len(CALL_OPEN) :]
            self.mode, self.call_text, self.call_head, self.call_sent = "call", "", False, 0
            return
        keep = _held_suffix(self.pending, CALL_OPEN)
        keep = _trailing_space(self.pending[: len(self.pending) - keep]) + keep
        if not final and len(self.pending) > keep:
            out.append({"content": self.pending[: len(self.pending) - keep]})
            self.pending = self.pending[len(self.pending) - keep :]

    def _call(self, out: list[dict], final: bool) -> None:
        end = self.pending.find(CALL_CLOSE)
        if end >= 0:
            self.call_text += self.pending[:end]
            self.pending = self.pending[end + len(CALL_CLOSE) :]
            out += self._end_call(complete=True)
            if not self.parallel and self.calls:
                self.done, self.pending = True, ""
            else:
                self.mode, self.skip_space = "content", True
            return
        keep = _held_suffix(self.pending, CALL_CLOSE)
        self.call_text += self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        out += self._stream_call()

    def _stream_call(self) -> list[dict]:
        """Deltas of the call so far: its id and name once its head is complete, then argument fragments
        (all but a final ``}`` and spaces, which may close the call rather than its arguments)."""
        out = []
        if not self.call_head:
            match = _CALL_HEAD.match(self.call_text)
            if match is None:
                return out
            try:
                name = json.loads(f'"{match.group(1)}"')
            except json.JSONDecodeError:
                return out
            self.call_head, self.call_id, self.args_at = True, new_call_id(), match.end()
            out.append(self._call_delta(name=name, arguments=""))
        args = self.call_text[self.args_at :].rstrip()
        if args.endswith("}"):
            args = args[:-1].rstrip()
        if len(args) > self.call_sent:
            out.append(self._call_delta(arguments=args[self.call_sent :]))
            self.call_sent = len(args)
        return out

    def _end_call(self, complete: bool) -> list[dict]:
        text = self.call_text
        out = self._stream_call()
        call = None
        with contextlib.suppress(json.JSONDecodeError):
            call = json.loads(text)
        valid = (
            isinstance(call, dict)
            and set(call) == {"name", "arguments"}
            and isinstance(call["name"], str)
            and isinstance(call["arguments"], dict | str)
        )
        if self.call_head:
            # Out already: finish its arguments with what remains of them.
            args = text[self.args_at :].rstrip()
            if complete and valid and args.endswith("}"):
                args = args[:-1].rstrip()
            if len(args) > self.call_sent:
                out.append(self._call_delta(arguments=args[self.call_sent :]))
            self.calls += 1
        elif valid:
            self.call_id = new_call_id()
            arguments = call["arguments"]
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            out.append(self._call_delta(name=call["name"], arguments=arguments))
            self.calls += 1
        else:
            out.append({"content": CALL_OPEN + text + (CALL_CLOSE if complete else "")})
        self.call_head, self.call_text, self.call_sent = False, "", 0
        return out

    def _call_delta(self, name: str | None = None, arguments: str = "") -> dict:
        call: dict = {"index": self.calls}
        if name is not None:
            call.update(id=self.call_id, type="function", function={"name": name, "arguments": arguments})
        else:
            call["function"] = {"arguments": arguments}
        return {"tool_calls": [call]}


class Message:
    """A whole reply's message fields, gathered from ChatParser's deltas."""

    def __init__(self):
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict] = []

    def add(self, delta: dict) -> None:
        if "content" in delta:
            self.content.append(delta["content"])
        elif "reasoning_content" in delta:
            self.reasoning.append(delta["reasoning_content"])
        else:
            for part in delta["tool_calls"]:
                if "id" in part:
                    self.calls.append(
                        {"id": part["id"], "type": "function", "function": dict(part["function"])}
                    )
                else:
                    self.calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]

    def fill(self, message: dict) -> None:
        """Sets ``content`` (null when the reply is tool calls alone), ``reasoning_content`` (when the model
        reasoned) and ``tool_calls`` (when it called tools) of an OpenAI message."""
        content = "".join(self.content)
        message["content"] = content if content or not self.calls else None
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = self.calls


# -- preparing a request ------------------------------------------------------------------------------------


def template_variables(options: ChatOptions) -> dict:
    """What the chat template gets besides the messages: ``tools`` when there are any."""
    return {"tools": [dict(t) for t in options.tools]} if options.tools else {}


def plan(req, options: ChatOptions, prompt: str, tokenizer, reasoning_format: str) -> ChatPlan:
    """Settles how ``req`` (an api.GenerationRequest whose chat rendered to ``prompt``) is generated and
    answered: its grammar and the biases of ``tool_choice`` none go into its sampling parameters, and
    ``req.chat`` gets the ChatPlan. 400 when a grammar cannot be made or is refused by llama.cpp."""
    fmt = options.reasoning_format or reasoning_format
    opened = reasoning_open(prompt)
    thinks = (
        tokenizer.single_token(THINK_OPEN) is not None and tokenizer.single_token(THINK_CLOSE) is not None
    )
    thinking = thinks and req.template_kwargs.get("enable_thinking") is not False
    think = "open" if opened else ("optional" if thinking else "")
    text = grammar(options, think)
    if text is not None:
        if req.sampling.get("ignore_eos"):
            field_name = "tool_choice" if options.forces_tools else "response_format"
            raise invalid(
                "ignore_eos", f"cannot be true with {field_name}: the grammar ends the reply; leave it out"
            )
        check_grammar(tokenizer, text, "tools" if options.forces_tools else "response_format")
        req.sampling["grammar"] = text
    if options.tools and options.tool_choice == "none":
        call = tokenizer.single_token(CALL_OPEN)
        if call is not None:
            req.sampling["logit_bias"] = (*req.sampling.get("logit_bias", ()), (call, float("-inf")))
    req.chat = ChatPlan(options=options, reasoning=fmt != "none", reasoning_open=opened)
    return req.chat


def check_grammar(tokenizer, text: str, where: str) -> None:
    """Refuses (400) a grammar that llama.cpp's parser rejects, before it reaches the engine."""
    lc = tokenizer.lc
    sampler = lc.llama_sampler_init_grammar(tokenizer.vocab, text.encode(), b"root")
    if not sampler:
        raise invalid(
            where, "llama.cpp could not parse the grammar made from this field; simplify the schema"
        )
    lc.llama_sampler_free(sampler)


def parser(chat_plan: ChatPlan | None) -> ChatParser | None:
    """The parser of a chat reply, or None where its text goes out as it is."""
    if chat_plan is None:
        return None
    options = chat_plan.options
    if not (chat_plan.reasoning or options.calls_tools):
        return None
    return ChatParser(
        chat_plan.reasoning, chat_plan.reasoning_open, options.calls_tools, options.parallel_tool_calls
    )
