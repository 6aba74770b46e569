"""Tokenizer and chat template of a GGUF model, loaded without its weights.

The server process keeps this so that it can validate prompt lengths and turn tokens into text while the
engine (which owns the weights and the RPC connections) is down or restarting.
"""

from __future__ import annotations

import codecs
import ctypes
import datetime
import json
import uuid
from collections.abc import Iterable

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when the GGUF carries no template: ChatML, which Qwen models speak.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TemplateError(ValueError):
    pass


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """``tojson`` as chat templates expect it (transformers' and llama.cpp's): plain JSON in the order given,
    not Jinja's HTML-safe JSON with sorted keys and ``<`` escaped."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class Tokenizer:
    def __init__(self, model_path: str):
        import llama_cpp

        self.lc = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
        if not self.model:
            raise ValueError(f"cannot read the vocabulary of {model_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        # A vocabulary-only load leaves llama.cpp's hyper-parameters unread (n_ctx_train 0): read the GGUF's.
        arch = self.metadata("general.architecture")
        declared = self.metadata(f"{arch}.context_length") if arch else None
        self.n_ctx_train = (
            int(declared)
            if declared and declared.isdigit()
            else llama_cpp.llama_model_n_ctx_train(self.model)
        )
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}
        self.bos_text = self._special_text(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_text = self._special_text(llama_cpp.llama_vocab_eos(self.vocab))
        self.longest_piece = self._longest_piece()
        source = self.metadata("tokenizer.chat_template") or CHATML_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = _tojson
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.chat_template = env.from_string(source)

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.piece(token, special=True).decode("utf-8", "replace")

    def _longest_piece(self) -> int:
        """The most bytes of text one token stands for, special tokens included; 0 where text may vanish in
        tokenizing (WPM and UGM normalise it; a token with lstrip or rstrip swallows the spaces beside it),
        so that no token count follows from a text's length."""
        lc = self.lc
        kinds = (lc.LLAMA_VOCAB_TYPE_BPE, lc.LLAMA_VOCAB_TYPE_SPM, lc.LLAMA_VOCAB_TYPE_RWKV)
        if lc.llama_vocab_type(self.vocab) not in kinds:
            return 0
        strips = lc.LLAMA_TOKEN_ATTR_LSTRIP | lc.LLAMA_TOKEN_ATTR_RSTRIP
        longest = 0
        for token in range(self.n_vocab):
            if lc.llama_vocab_get_attr(self.vocab, token) & strips:
                return 0
            longest = max(longest, len(self.piece(token, special=True)))
        return longest

    def min_tokens(self, text: str) -> int:
        """A lower bound of ``len(self.tokenize(text))`` that costs no tokenizing: every byte of the text's
        UTF-8 is in one token's piece, and no piece is longer than ``longest_piece`` bytes."""
        if not self.longest_piece:
            return 0
        return -(-len(text.encode("utf-8")) // self.longest_piece)

    def metadata(self, key: str) -> str | None:
        size = 1 << 20
        buffer = ctypes.create_string_buffer(size)
        n = self.lc.llama_model_meta_val_str(self.model, key.encode(), buffer, size)
        if n < 0:
            return None
        return buffer.raw[:n].decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        while True:
            out = (self.lc.llama_token * capacity)()
            n = self.lc.llama_tokenize(self.vocab, data, len(data), out, capacity, add_special, True)
            if n >= 0:
                return list(out[:n])
            capacity = -n

    def piece(self, token: int, special: bool = False) -> bytes:
        cached = self._pieces.get(token) if not special else None
        if cached is not None:
            return cached
        buffer = self._piece_buffer
        n = self.lc.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self.lc.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, special)
        data = buffer.raw[:n]
        if not special:
            self._pieces[token] = data
        return data

    def detokenize(self, tokens: Iterable[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def single_token(self, text: str) -> int | None:
        """The id of the one token that ``text`` tokenizes to (such as ``<think>``), or None."""
        tokens = self.tokenize(text, add_special=False)
        return tokens[0] if len(tokens) == 1 else None

    def is_eog(self, token: int) -> bool:
        return bool(self.lc.llama_vocab_is_eog(self.vocab, token))

    def render_chat(self, messages: list[dict], **template_kwargs) -> str:
        """The prompt of a chat. One that ends with an assistant message is continued (a prefill, as
        ``continue_final_message`` in transformers): the prompt ends inside that message, with no end of turn
        and no new assistant turn, so the model carries on writing it."""
        if messages[-1]["role"] != "assistant":
            return self._render(messages, add_generation_prompt=True, **template_kwargs)
        # Rendered whole, then cut where its text ends: only the template knows what closes a turn.
        mark = f"<continue-{uuid.uuid4().hex}>"
        final = {**messages[-1], "content": messages[-1]["content"] + mark}
        text = self._render([*messages[:-1], final], add_generation_prompt=False, **template_kwargs)
        cut = text.rfind(mark)
        if cut < 0:
            raise TemplateError(
                "the model's chat template leaves out the final assistant message, so it cannot be continued; "
                "end the messages with a user message"
            )
        return text[:cut]

    def _render(self, messages: list[dict], add_generation_prompt: bool, **template_kwargs) -> str:
        try:
            return self.chat_template.render(
                **template_kwargs,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_text,
                eos_token=self.eos_text,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template failed: {exc}") from exc


class TextStream:
    """Turns generated tokens into text, holding back bytes of an unfinished UTF-8 character and any tail
    that could still become a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.stop = stop
        self.held = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Text that is safe to send after this token; sets ``stopped`` when a stop string appeared."""
        if self.stopped:
            return ""
        self.held += self.decoder.decode(self.tokenizer.piece(token))
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.held += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stop:
            out, self.held = self.held, ""
            return out
        cut = min((i for i in (self.held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.held = self.held[:cut], ""
            self.stopped = True
            return out
        if final:
            out, self.held = self.held, ""
            return out
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.held)), 0, -1):
                if self.held.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return out
