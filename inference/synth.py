"""Synthetic Qwen3-MoE models: random weights in a GGUF that llama.cpp loads and runs.

``python -m inference synth-model --shape tiny --quant q8_0 --out tiny.gguf`` writes a model of the
llama.cpp architecture ``qwen3moe`` (the one Qwen3-30B-A3B converts to) with every tensor name, shape and
metadata key that llama.cpp's loader asks for, a byte-level BPE vocabulary and a chat template with Qwen3's
conventions (ChatML turns, tools, tool calls and responses, thinking; see CHAT_TEMPLATE). The
model says nothing useful, but it exercises exactly the code that the real one does: same graph, same MoE
routing, same tokenizer type, same quantized matmuls, and (for the ``qwen3-30b-a3b`` shape) the same
tensor sizes. Tests and benchmarks can therefore run without a multi-gigabyte download.

Shapes (``SHAPES``)
    ``tiny`` for unit tests (a few MB, loads in milliseconds), ``bench`` for throughput measurements on
    small machines (keeps the MoE structure, decodes at tens of tokens/s on two cores) and
    ``qwen3-30b-a3b`` with the real dimensions (30.5 B parameters).

Weights
    Every 2-D/3-D weight is drawn as integers uniform in [-127, 127] times a per-tensor step chosen so that
    its standard deviation is ``gain / sqrt(fan_in)`` (activations stay at unit scale through every layer).
    Such a tensor *is* a q8_0 tensor (32-value blocks, one f16 scale), so q8_0 is written losslessly, and
    q4_0 is the same weights rounded to 15 levels: both come straight from the random integers, at random-
    number-generator speed (~200 M weights/s) rather than through a float quantizer. Norm weights are 1
    and the router (``ffn_gate_inp``) is a normal F32 matrix. The random stream of each tensor depends only
    on ``--seed``, the tensor's name and its shape, so a reduced-layer model shares its tensors with the
    full one. ``token_embd`` and ``output`` are scaled so that the logits have a standard deviation of
    ``LOGIT_STD`` (6): the median top-1/top-2 margin is above 1, not a near-tie everywhere, and greedy
    decoding wanders over the vocabulary instead of repeating a token. Output is bit-for-bit deterministic
    for a given file and llama.cpp configuration. Like any MoE model under llama.cpp, it is not guaranteed
    to give the same greedy tokens for every batch layout: batched and single-token kernels round
    differently, and once in a while that flips a near-tied expert choice or argmax. Measured on ``tiny``
    (seed 7), single-token decoding against one 512-token batch: 6 of 24 prompts diverge within 48
    tokens (3 of 24 with flash attention), so cross-layout comparisons should pin prompts that agree.

q4_k
    gguf-py has no k-quant quantizer, so for ``q4_k`` the model is first written as q8_0 to a temporary
    file next to the output, then requantized by llama.cpp itself (``llama_model_quantize`` from
    llama-cpp-python, ``LLAMA_FTYPE_MOSTLY_Q4_K_M``, requantizing allowed). The q4_k model is thus the q8_0
    model of the same seed, quantized the way ``llama-quantize`` would do it (Q4_K with some Q6_K tensors;
    tensors whose rows are not a multiple of 256 get llama.cpp's fallback type).

Memory and time
    Data are generated and written tensor by tensor in chunks of at most ``CHUNK_ELEMS`` weights: the
    header (metadata and tensor table) is written first from the plan, then each chunk is generated,
    packed and appended. Peak memory is the vocabulary plus a few chunks, whatever the shape; for q4_k
    llama.cpp's requantizer is limited to ``QUANTIZE_BUF_BYTES`` of rows at a time. The output appears
    under its final name only when complete (written as ``PATH.partial``, then renamed). The command prints
    progress and, at the end, the process's peak RSS (``getrusage`` ``ru_maxrss``; ``/usr/bin/time -v``
    agrees). Measured on 2 shared cores: ``bench`` q8_0 in 2.6 s with 64 MiB peak RSS, ``qwen3-30b-a3b``
    with ``--layers 2`` (full-width tensors, 1.9 GB) in 16 s with 101 MiB; throughput is disk-bound at
    about 100 MiB/s, so the full 30 GiB model takes minutes. ``write_header_only`` writes the file with
    its data left as a sparse hole, so llama.cpp's loader can check the full shape's header in seconds.
    q4_k needs room for the temporary q8_0 file as well as the output.

Vocabulary
    Byte-level BPE like Qwen's (``tokenizer.ggml.model`` = ``gpt2``, ``tokenizer.ggml.pre`` = ``qwen2``): the
    256 byte tokens in GPT-2's byte-to-unicode form, then merges learnt from a small built-in English text,
    then merges generated deterministically until the vocabulary is full, then Qwen3's 26 added tokens
    (``SPECIAL_TOKENS``): ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and the other ``<|...|>`` ones
    CONTROL, ``<tool_call>``, ``</tool_call>``, ``<tool_response>``, ``</tool_response>``, ``<think>``,
    ``</think>`` USER_DEFINED (printed in replies), as in Qwen3's GGUF files. As in Qwen3, eos is
    ``<|im_end|>``, bos and pad are ``<|endoftext|>`` and no bos is added; llama.cpp also ends generation at
    ``<|fim_pad|>``, ``<|repo_name|>`` and ``<|file_sep|>``. The ``qwen3-30b-a3b`` shape puts the added
    tokens at Qwen3's ids (151643 to 151668) and fills the rest of the 151936 rows with unused ``[PADn]``
    tokens; smaller shapes end with them. With
    only ~600 merges learnt from real text, English takes about 1.8 characters per token (Qwen's own
    tokenizer: about 4), so benchmarks should compare token counts, not characters. Any UTF-8 text
    round-trips exactly through llama.cpp's tokenizer and detokenizer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import functools
import itertools
import multiprocessing
import os
import re
import resource
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ARCH = "qwen3moe"
QUANTS = ("q8_0", "q4_0", "q4_k")
# Qwen3's added tokens, in the order of its vocabulary (ids 151643 to 151668). Those of Qwen's tokenizer
# marked not special (tool calls, tool responses, thinking, fill-in-the-middle) are USER_DEFINED, as in
# Qwen3's GGUF files: their text is printed when detokenizing, so a reply shows them, and they are matched in
# any text; the others are CONTROL.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
USER_DEFINED_TOKENS = frozenset(t for t in SPECIAL_TOKENS if not t.startswith("<|"))
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|endoftext|>"
# Largest number of weights generated and packed at once: bounds memory whatever the tensor size.
CHUNK_ELEMS = 1 << 22
# Standard deviation of the logits over the vocabulary (for a unit-RMS final hidden state).
LOGIT_STD = 6.0
# Standard deviation of the router logits (for a unit-RMS hidden state).
ROUTER_STD = 2.0
# Rows the q4_k requantizer may hold at once (llama.cpp's default is 8 GiB).
QUANTIZE_BUF_BYTES = 256 << 20

# Qwen3's chat conventions, in a template of our own: ChatML turns (<|im_start|>role\ncontent<|im_end|>\n);
# tools listed as JSON signatures in a <tools> block of the system turn, with the <tool_call> reply format;
# an assistant's tool calls as <tool_call>{"name": ..., "arguments": ...}</tool_call> after its text; tool
# results as <tool_response> blocks in a user turn (consecutive ones share it); the reasoning (<think>...
# </think>) of assistant turns before the last user message dropped; and ``enable_thinking`` false writing
# an empty think block after the assistant header, so that the model answers without reasoning.
CHAT_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- if tools -%}
  {{- '<|im_start|>system\\n' -}}
  {%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}
  {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' -}}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}
  {%- for tool in tools -%}{{- '\\n' -}}{{- tool | tojson -}}{%- endfor -%}
  {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments ' -}}
  {{- 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' -}}
  {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}
{%- elif messages[0]['role'] == 'system' -%}
  {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}
{%- endif -%}
{%- for m in messages -%}
  {%- set content = m['content'] if m['content'] is string else '' -%}
  {%- if m['role'] == 'system' and loop.first -%}
  {%- elif m['role'] == 'tool' -%}
    {%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}
    {%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
  {%- elif m['role'] == 'assistant' -%}
    {%- if loop.index0 < ns.last_user and '</think>' in content -%}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
    {%- endif -%}
    {{- '<|im_start|>assistant\\n' + content -}}
    {%- for call in m['tool_calls'] or [] -%}
      {%- set f = call['function'] if call['function'] is defined else call -%}
      {%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}
      {{- '<tool_call>\\n{"name": ' -}}{{- f['name'] | tojson -}}{{- ', "arguments": ' -}}
      {%- if f['arguments'] is string -%}{{- f['arguments'] -}}{%- else -%}{{- f['arguments'] | tojson -}}{%- endif -%}
      {{- '}\\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}
"""


class SynthError(Exception):
    """A request that cannot be carried out; the message names the option and the fix."""


@dataclass(frozen=True)
class Shape:
    """Hyper-parameters of a qwen3moe model, as llama.cpp reads them from the GGUF metadata."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_vocab: int
    n_ctx: int
    rope_theta: float = 1e6
    rms_eps: float = 1e-6
    # Dense FFN width recorded as feed_forward_length (unused by an all-MoE model; Qwen3 records it).
    n_ff: int = 0
    # Id of the first special token; None puts the special tokens at the end of the vocabulary.
    first_special: int | None = None

    @property
    def n_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_kv(self) -> int:
        return self.n_head_kv * self.head_dim


SHAPES: dict[str, Shape] = {
    # Unit tests: ~1.2 M parameters. Every row length is a multiple of 256 so q4_k is genuine Q4_K.
    "tiny": Shape(
        n_layer=4,
        n_embd=256,
        n_head=4,
        n_head_kv=2,
        head_dim=64,
        n_expert=4,
        n_expert_used=2,
        n_ff_exp=256,
        n_vocab=1024,
        n_ctx=2048,
        n_ff=512,
    ),
    # Benchmarks on small CPUs: ~255 M parameters (~270 MB at q8_0), ~62 M active per token.
    "bench": Shape(
        n_layer=8,
        n_embd=1024,
        n_head=8,
        n_head_kv=2,
        head_dim=128,
        n_expert=32,
        n_expert_used=4,
        n_ff_exp=256,
        n_vocab=16384,
        n_ctx=8192,
        n_ff=1024,
    ),
    # Qwen3-30B-A3B's real dimensions: 30.5 B parameters, 3.3 B active per token.
    "qwen3-30b-a3b": Shape(
        n_layer=48,
        n_embd=2048,
        n_head=32,
        n_head_kv=4,
        head_dim=128,
        n_expert=128,
        n_expert_used=8,
        n_ff_exp=768,
        n_vocab=151936,
        n_ctx=40960,
        n_ff=6144,
        first_special=151643,
    ),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the plan. ``shape`` is in numpy order (the GGUF/ggml order reversed)."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "ones": F32 filled with 1; "normal": F32 normal; "weight": quantized matrix
    std: float

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class SynthResult:
    path: Path
    shape_name: str
    quant: str
    n_layer: int
    n_params: int
    n_bytes: int
    seconds: float
    peak_rss_bytes: int


# --- weights ----------------------------------------------------------------------------------------


def tensor_plan(shape: Shape) -> list[TensorSpec]:
    """Every tensor llama.cpp's qwen3moe loader creates, in file order, with the std of its weights."""
    e, v = shape.n_embd, shape.n_vocab
    plan = [
        TensorSpec("token_embd.weight", (v, e), "weight", 1.0),
        TensorSpec("output_norm.weight", (e,), "ones", 0.0),
        TensorSpec("output.weight", (v, e), "weight", LOGIT_STD / np.sqrt(e)),
    ]
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        plan += [
            TensorSpec(b + "attn_norm.weight", (e,), "ones", 0.0),
            TensorSpec(b + "attn_q.weight", (shape.n_q, e), "weight", 1 / np.sqrt(e)),
            TensorSpec(b + "attn_k.weight", (shape.n_kv, e), "weight", 1 / np.sqrt(e)),
            TensorSpec(b + "attn_v.weight", (shape.n_kv, e), "weight", 1 / np.sqrt(e)),
            TensorSpec(b + "attn_output.weight", (e, shape.n_q), "weight", 1 / np.sqrt(shape.n_q)),
            TensorSpec(b + "attn_q_norm.weight", (shape.head_dim,), "ones", 0.0),
            TensorSpec(b + "attn_k_norm.weight", (shape.head_dim,), "ones", 0.0),
            TensorSpec(b + "ffn_norm.weight", (e,), "ones", 0.0),
            TensorSpec(b + "ffn_gate_inp.weight", (shape.n_expert, e), "normal", ROUTER_STD / np.sqrt(e)),
            TensorSpec(
                b + "ffn_gate_exps.weight", (shape.n_expert, shape.n_ff_exp, e), "weight", 1 / np.sqrt(e)
            ),
            TensorSpec(
                b + "ffn_up_exps.weight", (shape.n_expert, shape.n_ff_exp, e), "weight", 1 / np.sqrt(e)
            ),
            TensorSpec(
                b + "ffn_down_exps.weight",
                (shape.n_expert, e, shape.n_ff_exp),
                "weight",
                1 / np.sqrt(shape.n_ff_exp),
            ),
        ]
    return plan


# Standard deviation of integers uniform in [-127, 127].
_UNIFORM_INT8_STD = float(np.sqrt((255**2 - 1) / 12))
# q4_0 nibble for each int8 bit pattern: round(u * 7 / 127) + 8, in 1..15 (-128 is never drawn).
_Q4_LUT = np.array(
    [(1 if u >= 0 else -1) * int(abs(u) * 7 / 127 + 0.5) + 8 for u in range(-128, 128)], dtype=np.uint8
)[np.arange(256, dtype=np.uint8).view(np.int8).astype(np.int16) + 128]

# ggml types and GGUF file types used here (values from ggml.h / llama.h).
_GGML_F32, _GGML_Q4_0, _GGML_Q8_0 = 0, 2, 8
_FILE_TYPE = {"q8_0": 7, "q4_0": 2}
_BLOCK = 32
_BLOCK_BYTES = {_GGML_Q8_0: 34, _GGML_Q4_0: 18}


def _ggml_type(spec: TensorSpec, quant: str) -> int:
    if spec.kind != "weight":
        return _GGML_F32
    return _GGML_Q4_0 if quant == "q4_0" else _GGML_Q8_0


def _nbytes(spec: TensorSpec, ggml_type: int) -> int:
    if ggml_type == _GGML_F32:
        return 4 * spec.n_elements
    return spec.n_elements // _BLOCK * _BLOCK_BYTES[ggml_type]


def _rng(seed: int, name: str, shape: tuple[int, ...], chunk: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *shape, chunk])


def _n_chunks(spec: TensorSpec) -> int:
    if spec.kind == "ones":
        return 1
    row = spec.shape[-1]
    rows_per_chunk = max(1, CHUNK_ELEMS // row)
    return -(-(spec.n_elements // row) // rows_per_chunk)


def _chunk(spec: TensorSpec, seed: int, ggml_type: int, chunk: int) -> bytes:
    """Piece ``chunk`` of the tensor's data (at most CHUNK_ELEMS weights), packed for ``ggml_type``. Each
    piece depends only on its arguments, so pieces can be made in any order or process."""
    if spec.kind == "ones":
        return np.ones(spec.n_elements, dtype=np.float32).tobytes()
    row = spec.shape[-1]
    n_rows = spec.n_elements // row
    rows_per_chunk = max(1, CHUNK_ELEMS // row)
    first = chunk * rows_per_chunk
    n = (min(n_rows, first + rows_per_chunk) - first) * row
    rng = _rng(seed, spec.name, spec.shape, chunk)
    if spec.kind == "normal":
        return (rng.standard_normal(n, dtype=np.float32) * np.float32(spec.std)).tobytes()
    step = spec.std / _UNIFORM_INT8_STD
    q = rng.integers(-127, 128, size=n, dtype=np.int8).view(np.uint8).reshape(-1, _BLOCK)
    if ggml_type == _GGML_Q8_0:
        out = np.empty((q.shape[0], 34), dtype=np.uint8)
        out[:, :2] = np.frombuffer(np.float16(step).tobytes(), dtype=np.uint8)
        out[:, 2:] = q
    else:
        nib = _Q4_LUT[q]
        out = np.empty((q.shape[0], 18), dtype=np.uint8)
        out[:, :2] = np.frombuffer(np.float16(step * 127 / 7).tobytes(), dtype=np.uint8)
        out[:, 2:] = nib[:, :16] | (nib[:, 16:] << 4)
    return out.tobytes()


def _pieces(
    plan: list[TensorSpec], seed: int, quant: str, jobs: int
) -> Iterator[tuple[TensorSpec, int, bytes]]:
    """Every tensor's pieces in file order, as (spec, ggml type, bytes); made by ``jobs`` processes when
    more than one, at most 2 x jobs pieces ahead of the writer (so memory stays at a few pieces each)."""
    work = [(spec, _ggml_type(spec, quant), k) for spec in plan for k in range(_n_chunks(spec))]
    if jobs <= 1:
        for spec, ggml_type, k in work:
            yield spec, ggml_type, _chunk(spec, seed, ggml_type, k)
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        ahead: collections.deque = collections.deque()
        todo = iter(work)
        for spec, ggml_type, k in todo:
            ahead.append((spec, ggml_type, pool.submit(_chunk, spec, seed, ggml_type, k)))
            if len(ahead) >= 2 * jobs:
                break
        while ahead:
            spec, ggml_type, future = ahead.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append((nxt[0], nxt[1], pool.submit(_chunk, nxt[0], seed, nxt[1], nxt[2])))
            yield spec, ggml_type, future.result()


# --- vocabulary -------------------------------------------------------------------------------------

# English text the first merges are learnt from, so that common words become single tokens.
_CORPUS = """\
The cluster serves a language model to everyone on the local network. Each node runs a small worker that
holds a slice of the model in memory, and the head node sends it the activations for its layers. When a
request arrives, the server turns the prompt into tokens, runs them through the network of workers, and
streams the answer back one token at a time. The time to the first token depends on the length of the
prompt; the time between tokens depends on how fast the slowest worker can read its weights from memory.
A mixture of experts model only reads a few experts for every token, which is why it can be fast even when
the whole model is large. The router picks the experts with the highest scores, and their outputs are
added together with weights that sum to one. If one of the workers is lost, the service should say so
clearly, keep the other requests alive, and recover when the worker comes back.

We measure throughput in tokens per second, latency in milliseconds, and memory in megabytes. A good
benchmark is repeatable: it uses the same prompt, the same seed, and the same settings every time, and it
reports the median of several runs together with the spread. Numbers without their conditions are not
worth much. The operator should be able to read the dashboard and know at a glance whether the system is
healthy, which node is the bottleneck, and what changed since yesterday.

Here is a short list of things that often go wrong: the network is slower than expected, a node runs out
of memory, the temperature of a board rises until its clock is throttled, the power supply cannot keep up,
or a configuration file was edited by hand and never committed. Most of these problems can be found with
simple checks that run before the service starts. It is better to fail early with a clear message than
to fail late with a confusing one.

Questions people ask: How many users can it serve at the same time? What happens when the context is
full? Can I use it from my own program? Yes, there is an API that is compatible with the common chat
completion format, so most clients work without changes. The answers are generated by the model, so they
may be wrong; they should be checked before they are used for anything important.

Numbers like 1, 2, 3, 10, 100, 2048 and 40960 appear in logs, and so do words like error, warning, info,
debug, request, response, status, version, config, server, client, user, assistant, system and tool.
"""

# Pre-tokenizer for learning merges: an ASCII-friendly approximation of Qwen2's regex (\\p{L} -> [^\\W\\d_]).
_PRETOKENIZE = re.compile(
    r"'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])|[^\r\n\w]?[^\W\d_]+|\d| ?[^\s\w]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@functools.cache
def bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value, indexed by byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return tuple(chr(table[b]) for b in range(256))


def _byte_tokens() -> list[str]:
    """The 256 byte tokens in the order of GPT-2/Qwen vocabularies (printable bytes first)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    bs += [b for b in range(256) if b not in bs]
    table = bytes_to_unicode()
    return [table[b] for b in bs]


def _learn_merges(text: str, limit: int) -> list[tuple[str, str]]:
    """Classic BPE training on ``text``: repeatedly merge the most frequent adjacent pair."""
    table = bytes_to_unicode()
    word_counts = Counter(_PRETOKENIZE.findall(text))
    words = [[table[b] for b in w.encode()] for w in word_counts]
    counts = list(word_counts.values())
    pairs: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for p in itertools.pairwise(w):
            pairs[p] += counts[i]
            where[p].add(i)
    merges: list[tuple[str, str]] = []
    while len(merges) < limit and pairs:
        best, _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(best)
        for i in sorted(where.pop(best)):
            w = words[i]
            for p in itertools.pairwise(w):
                pairs[p] -= counts[i]
                if pairs[p] <= 0:
                    del pairs[p]
            merged: list[str] = []
            j = 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    merged.append(w[j] + w[j + 1])
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            for p in itertools.pairwise(merged):
                pairs[p] += counts[i]
                where[p].add(i)
    return merges


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int]


@functools.cache
def build_vocab(n_vocab: int, first_special: int | None = None) -> Vocab:
    """A deterministic byte-level BPE vocabulary of ``n_vocab`` tokens (see the module docstring)."""
    normal, control, user_defined, unused = 1, 3, 4, 5
    if first_special is None:
        first_special = n_vocab - len(SPECIAL_TOKENS)
    if first_special < 257 or first_special + len(SPECIAL_TOKENS) > n_vocab:
        raise SynthError(f"a vocabulary of {n_vocab} tokens cannot hold 256 bytes and the special tokens")
    tokens = _byte_tokens()
    known = set(tokens)
    merges: list[str] = []

    def add(a: str, b: str) -> bool:
        if a + b in known:
            return False
        known.add(a + b)
        tokens.append(a + b)
        merges.append(f"{a} {b}")
        return True

    for a, b in _learn_merges(_CORPUS, first_special - 256):
        add(a, b)
    # Fill up with generated merges: extend learnt (then generated) tokens by one lowercase letter.
    letters = [bytes_to_unicode()[c] for c in b"etaoinshrdlcumwfgypbvkjxqz"]
    prefix = 256
    while len(tokens) < first_special:
        for c in letters:
            if len(tokens) >= first_special:
                break
            add(tokens[prefix], c)
        prefix += 1
    types = [normal] * len(tokens)
    special = {}
    for t in SPECIAL_TOKENS:
        special[t] = len(tokens)
        tokens.append(t)
        types.append(user_defined if t in USER_DEFINED_TOKENS else control)
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(unused)
    assert len(set(tokens)) == n_vocab
    return Vocab(tokens=tokens, types=types, merges=merges, special=special)


# --- writing ----------------------------------------------------------------------------------------


def resolve_shape(shape_name: str, layers: int | None = None) -> Shape:
    if shape_name not in SHAPES:
        raise SynthError(f"--shape {shape_name!r} is not known: use one of {', '.join(SHAPES)}")
    shape = SHAPES[shape_name]
    if layers is not None:
        if layers < 1 or layers > shape.n_layer:
            raise SynthError(f"--layers must be between 1 and {shape.n_layer} for --shape {shape_name}")
        shape = replace(shape, n_layer=layers)
    return shape


def _writer(path: Path, shape: Shape, shape_name: str, quant: str, seed: int, plan: list[TensorSpec]):
    import gguf

    vocab = build_vocab(shape.n_vocab, shape.first_special)
    w = gguf.GGUFWriter(path, ARCH)
    w.add_name(f"synthetic {ARCH} {shape_name}")
    w.add_description("Random weights for testing and benchmarking; not a trained model.")
    w.add_file_type(_FILE_TYPE["q8_0" if quant == "q4_k" else quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff or shape.n_ff_exp * shape.n_expert_used)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_expert_count(shape.n_expert)
    w.add_expert_used_count(shape.n_expert_used)
    w.add_expert_feed_forward_length(shape.n_ff_exp)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_eos_token_id(vocab.special[EOS_TOKEN])
    w.add_pad_token_id(vocab.special[PAD_TOKEN])
    w.add_bos_token_id(vocab.special[BOS_TOKEN])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_string("llmfleet.synth.shape", shape_name)
    w.add_uint32("llmfleet.synth.seed", seed)
    for spec in plan:
        ggml_type = _ggml_type(spec, quant)
        w.add_tensor_info(
            spec.name,
            spec.shape,
            np.dtype(np.float32),
            _nbytes(spec, ggml_type),
            raw_dtype=gguf.GGMLQuantizationType(ggml_type),
        )
    return w


def _total_params(shape: Shape) -> int:
    return sum(s.n_elements for s in tensor_plan(shape))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _write_gguf(
    path: Path,
    shape: Shape,
    shape_name: str,
    quant: str,
    seed: int,
    progress: Callable[[str], None] | None,
    *,
    with_data: bool = True,
    jobs: int = 1,
) -> int:
    """Write the GGUF; without data, the file is the header and a hole of the data's size (sparse). ``jobs``
    processes make the random data (the file is the same for any number)."""
    plan = tensor_plan(shape)
    w = _writer(path, shape, shape_name, quant, seed, plan)
    total = sum(_nbytes(s, _ggml_type(s, quant)) for s in plan)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())
    if not with_data:
        fout.truncate(
            fout.tell() + sum(w.ggml_pad(_nbytes(s, _ggml_type(s, quant)), w.data_alignment) for s in plan)
        )
        w.close()
        return _total_params(shape)
    done, t0, last = 0, time.monotonic(), -1.0
    written: dict[str, int] = {}
    for spec, ggml_type, data in _pieces(plan, seed, quant, jobs):
        fout.write(data)
        n = written[spec.name] = written.get(spec.name, 0) + len(data)
        done += len(data)
        if n < _nbytes(spec, ggml_type):
            continue
        assert n == _nbytes(spec, ggml_type), spec.name
        w.write_padding(fout, n)
        now = time.monotonic() - t0
        if progress is not None and (now - last >= 2.0 or done == total):
            last = now
            progress(f"  {100 * done / total:5.1f}%  {done / 2**20:9.1f} MiB  {now:6.1f} s  {spec.name}")
    assert len(written) == len(plan)
    w.close()
    return _total_params(shape)


def _requantize_q4_k(src: Path, dst: Path) -> None:
    try:
        import llama_cpp
    except ImportError as e:
        raise SynthError(f"--quant q4_k needs llama-cpp-python (llama.cpp's quantizer): {e}") from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    params.max_buf_size = QUANTIZE_BUF_BYTES
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SynthError(f"llama.cpp could not quantize {src} to q4_k (llama_model_quantize returned {rc})")


def synth_model(
    shape_name: str,
    quant: str,
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    layers: int | None = None,
    progress: Callable[[str], None] | None = None,
    shape: Shape | None = None,
    jobs: int = 1,
) -> SynthResult:
    """Write a random-weight qwen3moe GGUF of ``SHAPES[shape_name]`` to ``out``; or of ``shape``, a shape of
    one's own (e.g. a test's), named ``shape_name`` in the file. ``jobs`` processes make the random data
    (the file is byte for byte the same for any number)."""
    shape = resolve_shape(shape_name, layers) if shape is None else shape
    if quant not in QUANTS:
        raise SynthError(f"--quant {quant!r} is not supported: use one of {', '.join(QUANTS)}")
    if jobs < 1:
        raise SynthError(f"--jobs must be at least 1, got {jobs}")
    if not 0 <= seed < 2**32:
        raise SynthError(f"--seed must be an integer between 0 and {2**32 - 1}, got {seed}")
    out = Path(out)
    if out.is_dir():
        raise SynthError(f"--out {out} is a directory: give a file path such as {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise SynthError(f"--out {out}: directory {out.parent} does not exist; create it first")
    if progress is not None:
        progress(
            f"synth-model: {shape_name} ({shape.n_layer} layers), {quant}, seed {seed}, "
            f"{_total_params(shape) / 1e6:.1f} M parameters -> {out}"
        )
    t0 = time.monotonic()
    partial = out.with_name(out.name + ".partial")
    try:
        if quant == "q4_k":
            fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".q8_0.tmp", dir=out.parent)
            os.close(fd)
            try:
                if progress:
                    progress(f"writing q8_0 source {tmp}")
                n_params = _write_gguf(Path(tmp), shape, shape_name, "q8_0", seed, progress, jobs=jobs)
                if progress:
                    progress("requantizing to q4_k (Q4_K_M) with llama.cpp")
                _requantize_q4_k(Path(tmp), partial)
            finally:
                Path(tmp).unlink(missing_ok=True)
        else:
            n_params = _write_gguf(partial, shape, shape_name, quant, seed, progress, jobs=jobs)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return SynthResult(
        path=out,
        shape_name=shape_name,
        quant=quant,
        n_layer=shape.n_layer,
        n_params=n_params,
        n_bytes=out.stat().st_size,
        seconds=time.monotonic() - t0,
        peak_rss_bytes=peak_rss_bytes(),
    )


def write_header_only(shape_name: str, quant: str, out: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """The file ``synth_model`` would write, with the tensor data left as a hole (all zeros, no disk).

    For checking the metadata and tensor table of shapes too large to generate, e.g. by loading the file
    with llama.cpp's ``no_alloc`` (metadata only) or ``vocab_only`` parameters.
    """
    if quant not in ("q8_0", "q4_0"):
        raise SynthError(f"a header-only file can be q8_0 or q4_0, not {quant}")
    out = Path(out)
    _write_gguf(out, resolve_shape(shape_name), shape_name, quant, seed, None, with_data=False)
    return out


def main_synth(shape: str, quant: str, out: str, seed: int, layers: int | None, jobs: int = 1) -> int:
    """The ``synth-model`` command: writes the model and prints a one-line summary."""

    def say(msg: str) -> None:
        print(msg, flush=True)

    try:
        r = synth_model(shape, quant, out, seed=seed, layers=layers, progress=say, jobs=jobs)
    except SynthError as e:
        print(f"synth-model: error: {e}", file=sys.stderr)
        return 2
    say(
        f"wrote {r.path}: {r.n_layer} layers, {r.n_params / 1e6:.1f} M parameters, "
        f"{r.n_bytes / 2**20:.1f} MiB in {r.seconds:.1f} s (peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB)"
    )
    return 0
