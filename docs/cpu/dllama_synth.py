"""A distributed-llama model file and tokenizer file of a given shape, with random weights.

    python3 docs/cpu/dllama_synth.py --shape qwen3-30b-a3b --out /tmp/w/dllama/model.m \\
        --tokenizer-out /tmp/w/dllama/tokenizer.t --jobs 16

Writes what distributed-llama's ``dllama inference`` / ``dllama worker`` load (``--model``, ``--tokenizer``),
so that its tensor-parallel MoE can be timed on a model of Qwen3-30B-A3B's shape without the 17 GB download.
The layout follows github.com/b4rtaz/distributed-llama at commit 8d624a7b1f9acc0855d71a32519b22fe51e0bd86:
``converter/convert-hf.py`` and ``converter/writer.py`` (model), ``converter/tokenizer-writer.py``
(tokenizer), as read back by ``src/llm.cpp`` (``loadLlmHeader``, ``loadLlmNetWeight``) and
``src/tokenizer.cpp``. All integers and floats are little-endian.

Model file
    int32 magic 0x0A00ABCD, int32 header size in bytes (these 8 bytes plus the pairs), then (key, value)
    int32 pairs: version 0, arch_type 0xABCD02 (Qwen3 MoE), dim, hidden_dim, n_layers, n_heads,
    n_kv_heads, n_experts, n_active_experts, vocab_size, max_seq_len, hidden_act 1 (SiLU), rope_theta,
    weights_float_type 2 (Q40), head_dim, norm_epsilon 6 (1e-6), moe_hidden_dim. The tensors follow with no
    padding, each matrix row-major as [out, in]:

    - token embedding, F32 [vocab, dim]
    - per layer: q [n_heads*head_dim, dim], k and v [n_kv_heads*head_dim, dim], o [dim, n_heads*head_dim],
      all Q40; the router, F32 [n_experts, dim]; per expert gate (w1) [moe_hidden, dim], down (w2)
      [dim, moe_hidden] and up (w3) [moe_hidden, dim], Q40; q_norm and k_norm, F32 [head_dim]; the
      attention and FFN norms, F32 [dim]
    - final norm, F32 [dim]; output (lm_head), Q40 [vocab, dim]

    A Q40 block is 18 bytes for 32 consecutive values of a row: an fp16 scale d, then 16 bytes whose low
    nibbles are values 0-15 and high nibbles values 16-31, each value (nibble - 8) * d.

Weights
    Scaled as in this project's GGUF synthesizer (inference/synth.py), so that activations stay at unit
    scale: Q40 nibbles are uniform random, and each block's scale is ``gain / (4.61 * sqrt(fan_in))`` (4.61:
    the standard deviation of a uniform integer in [-8, 7]) times a uniform factor in [0.75, 1.25] and a
    random sign (which cancels the nibbles' mean of -0.5 across blocks), so weights have a standard
    deviation of ``gain / sqrt(fan_in)``; ``gain`` is 1, but ``LOGIT_STD`` (6) for the output matrix, so
    that greedy decoding does not sit on near-ties. The embedding and the router are normal F32 (standard
    deviation 1 and ``ROUTER_STD / sqrt(dim)``, 2 / sqrt(dim)); norm weights are 1. With these scales greedy
    decoding wanders over the vocabulary (on a 2-layer cut of ``qwen3-30b-a3b``, 16 tokens all different;
    with positive scales only and gain 1 for the output it repeated one token). Apart from which experts
    and tokens come out, distributed-llama's speed does not depend on the values (dense kernels). Each
    chunk of each tensor has its own random stream (from ``--seed``, the tensor's index and the chunk's
    index), so the file does not depend on ``--jobs``. The chunks are generated in ``--jobs`` processes that
    write them in place (``pwrite``) into a file sized up front, under a temporary name renamed when
    complete.

Tokenizer file
    int32 magic 0x567124, int32 header size, (key, value) int32 pairs: version 1, vocab_size,
    max_token_length, bos_id, chat_template (its length), n_eos_tokens, add_bos 1; then the chat template
    bytes, the eos ids (int32 each), and per token a float32 score, a uint32 length and the bytes. Tokens: the
    95 printable ASCII characters and the newline (score 0), then unused ``[n]`` fillers (score -n) up to
    ``bos_id``, then special tokens from ``bos_id`` to the end of the vocabulary (distributed-llama treats
    every id from ``bos_id`` on as special): ``<|endoftext|>`` (bos), ``<|im_start|>``, ``<|im_end|>`` (eos)
    and ``<|extra_n|>`` fillers. For ``qwen3-30b-a3b`` they sit at Qwen3's ids (151643 on) and the vocabulary
    has all 151936 rows (the sampler scans as many logits as the tokenizer has tokens; a tokenizer converted
    from Qwen3's own has 151669, its regular and added tokens). No pair of tokens concatenates to another
    token, so an ASCII prompt of n characters encodes to n + 1 tokens (the bos, then one per character). The
    chat template is a short ChatML text, enough for ``dllama chat`` to pick its ChatML formatting.

Sizes: ``qwen3-30b-a3b`` is 18.29 GB (17.03 GiB: 30.5 B weights, 29.0 B of them in experts, Q40 at 4.5 bits,
plus the F32 embedding, 1.24 GB); ``tiny`` (2 layers, 8 experts, dim 256) is 5.9 MB, for smoke tests.
``--layers`` cuts a shape's layer count (full-width tensors, e.g. to time the writer).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import shutil
import struct
import sys
import time

import numpy as np

MODEL_MAGIC = 0x0A00ABCD
ARCH_QWEN3_MOE = 0xABCD02
FLOAT_F32 = 0
FLOAT_Q40 = 2
HIDDEN_ACT_SILU = 1
NORM_EPSILON_1E6 = 6  # the converter's code for rms_norm_eps 1e-6

TOKENIZER_MAGIC = 0x567124

Q40_BLOCK = 32  # values per block
Q40_BYTES = 18  # fp16 scale + 16 bytes of nibbles
INT4_STD = math.sqrt((16**2 - 1) / 12)  # standard deviation of a uniform integer in [-8, 7]

CHUNK_BYTES = 32 << 20  # one task's share of a tensor

LOGIT_STD = 6.0  # of the logits, for a unit-RMS final hidden state (as inference/synth.py)
ROUTER_STD = 2.0  # of the router logits (as inference/synth.py)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Shape:
    dim: int
    hidden_dim: int  # the dense FFN width (header only: a Qwen3 MoE uses moe_hidden_dim)
    moe_hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_active_experts: int
    vocab_size: int
    bos_id: int
    max_seq_len: int
    rope_theta: int


SHAPES = {
    # Qwen/Qwen3-30B-A3B's config.json
    "qwen3-30b-a3b": Shape(
        dim=2048,
        hidden_dim=6144,
        moe_hidden_dim=768,
        n_layers=48,
        n_heads=32,
        n_kv_heads=4,
        head_dim=128,
        n_experts=128,
        n_active_experts=8,
        vocab_size=151936,
        bos_id=151643,
        max_seq_len=40960,
        rope_theta=1000000,
    ),
    # Splits over 1, 2 or 4 nodes like the real one: one KV head a node at 4, whole Q40 blocks everywhere.
    "tiny": Shape(
        dim=256,
        hidden_dim=512,
        moe_hidden_dim=128,
        n_layers=2,
        n_heads=8,
        n_kv_heads=4,
        head_dim=32,
        n_experts=8,
        n_active_experts=2,
        vocab_size=4096,
        bos_id=4064,
        max_seq_len=4096,
        rope_theta=1000000,
    ),
}


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    kind: str  # "q40" (standard deviation gain / sqrt(cols)), "normal" (F32, standard deviation gain), "ones"
    rows: int
    cols: int
    gain: float = 1.0

    @property
    def nbytes(self) -> int:
        if self.kind == "q40":
            return self.rows * self.cols // Q40_BLOCK * Q40_BYTES
        return self.rows * self.cols * 4


def header_pairs(shape: Shape) -> list[tuple[int, int]]:
    """The model header's (key, value) pairs, keys as in the converter's ``writeHeader``."""
    return [
        (0, 0),  # version
        (1, ARCH_QWEN3_MOE),  # arch_type
        (2, shape.dim),
        (3, shape.hidden_dim),
        (4, shape.n_layers),
        (5, shape.n_heads),
        (6, shape.n_kv_heads),
        (7, shape.n_experts),
        (8, shape.n_active_experts),
        (9, shape.vocab_size),
        (10, shape.max_seq_len),
        (11, HIDDEN_ACT_SILU),
        (12, shape.rope_theta),
        (13, FLOAT_Q40),  # weights_float_type
        (19, shape.head_dim),
        (20, NORM_EPSILON_1E6),
        (21, shape.moe_hidden_dim),
    ]


def header_bytes(shape: Shape) -> bytes:
    pairs = b"".join(struct.pack("<ii", k, v) for k, v in header_pairs(shape))
    return struct.pack("<ii", MODEL_MAGIC, 8 + len(pairs)) + pairs


def tensors(shape: Shape) -> list[Tensor]:
    """Every tensor in file order (the order in which distributed-llama's loader reads them)."""
    s = shape
    q_dim, kv_dim = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    out = [Tensor("embedding", "normal", s.vocab_size, s.dim)]
    for layer in range(s.n_layers):
        p = f"layer{layer}."
        out += [
            Tensor(p + "q", "q40", q_dim, s.dim),
            Tensor(p + "k", "q40", kv_dim, s.dim),
            Tensor(p + "v", "q40", kv_dim, s.dim),
            Tensor(p + "o", "q40", s.dim, q_dim),
            Tensor(p + "router", "normal", s.n_experts, s.dim, gain=ROUTER_STD / math.sqrt(s.dim)),
        ]
        for e in range(s.n_experts):
            out += [
                Tensor(p + f"expert{e}.w1", "q40", s.moe_hidden_dim, s.dim),
                Tensor(p + f"expert{e}.w2", "q40", s.dim, s.moe_hidden_dim),
                Tensor(p + f"expert{e}.w3", "q40", s.moe_hidden_dim, s.dim),
            ]
        out += [
            Tensor(p + "q_norm", "ones", 1, s.head_dim),
            Tensor(p + "k_norm", "ones", 1, s.head_dim),
            Tensor(p + "attn_norm", "ones", 1, s.dim),
            Tensor(p + "ffn_norm", "ones", 1, s.dim),
        ]
    out += [
        Tensor("final_norm", "ones", 1, s.dim),
        Tensor("output", "q40", s.vocab_size, s.dim, gain=LOGIT_STD),
    ]
    return out


def check_shape(shape: Shape) -> None:
    for t in tensors(shape):
        if t.kind == "q40" and t.cols % Q40_BLOCK:
            raise ValueError(f"{t.name}: {t.cols} columns is not a whole number of Q40 blocks")
    if not 0 < shape.bos_id <= shape.vocab_size - 3:
        raise ValueError("bos_id must leave room for <|endoftext|>, <|im_start|> and <|im_end|>")


def plan(shape: Shape, seed: int) -> tuple[list[tuple], int]:
    """The write tasks (offset, kind, count, Q40 step or F32 standard deviation, seed words) and the file's
    total size."""
    tasks = []
    offset = len(header_bytes(shape))
    for index, t in enumerate(tensors(shape)):
        if t.kind == "q40":
            blocks = t.rows * t.cols // Q40_BLOCK
            per_chunk = CHUNK_BYTES // Q40_BYTES
            step = t.gain / (INT4_STD * math.sqrt(t.cols))
            for chunk, start in enumerate(range(0, blocks, per_chunk)):
                count = min(per_chunk, blocks - start)
                tasks.append((offset + start * Q40_BYTES, "q40", count, step, (seed, index, chunk)))
        else:
            values = t.rows * t.cols
            per_chunk = CHUNK_BYTES // 4
            for chunk, start in enumerate(range(0, values, per_chunk)):
                count = min(per_chunk, values - start)
                tasks.append((offset + start * 4, t.kind, count, t.gain, (seed, index, chunk)))
        offset += t.nbytes
    return tasks, offset


def chunk_bytes(kind: str, count: int, scale: float, seed: tuple[int, int, int]) -> np.ndarray:
    """One chunk's bytes: ``count`` Q40 blocks or F32 values."""
    rng = np.random.default_rng(list(seed))
    if kind == "q40":
        words = (count * Q40_BYTES + 7) // 8
        data = rng.bit_generator.random_raw(words).view(np.uint8)[: count * Q40_BYTES]
        scales = rng.uniform(0.75 * scale, 1.25 * scale, count) * (1 - 2 * rng.integers(0, 2, count))
        scales = scales.astype(np.float16)
        data.view("<u2").reshape(count, Q40_BYTES // 2)[:, 0] = scales.view("<u2")
        return data
    if kind == "normal":
        return (rng.standard_normal(count, dtype=np.float32) * np.float32(scale)).astype("<f4")
    return np.ones(count, dtype="<f4")


_fd = -1


def _open_for_writing(path: str) -> None:
    global _fd
    _fd = os.open(path, os.O_WRONLY)


def _write_task(task: tuple) -> int:
    offset, kind, count, scale, seed = task
    data = chunk_bytes(kind, count, scale, seed)
    view = memoryview(data).cast("B")
    written = 0
    while written < len(view):
        written += os.pwrite(_fd, view[written:], offset + written)
    return written


def write_model(shape: Shape, path: str, seed: int, jobs: int) -> int:
    """Write the model file; returns its size in bytes."""
    tasks, total = plan(shape, seed)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < total:
        raise SystemExit(f"{directory}: {free / 1e9:.1f} GB free, the model needs {total / 1e9:.1f} GB")
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(header_bytes(shape))
        f.truncate(total)
    done = 0
    if jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs, initializer=_open_for_writing, initargs=(partial,)) as pool:
            for n in pool.imap_unordered(_write_task, tasks, chunksize=1):
                done += n
    else:
        _open_for_writing(partial)
        try:
            for task in tasks:
                done += _write_task(task)
        finally:
            os.close(_fd)
    if done + len(header_bytes(shape)) != total:
        raise RuntimeError(f"wrote {done} bytes of tensors, expected {total - len(header_bytes(shape))}")
    os.replace(partial, path)
    return total


def vocabulary(shape: Shape) -> tuple[list[bytes], list[float]]:
    """The tokens and their scores (see the module's docstring)."""
    tokens = [bytes([c]) for c in range(0x20, 0x7F)] + [b"\n"]
    tokens += [f"[{n}]".encode() for n in range(shape.bos_id - len(tokens))]
    scores = [0.0] * 96 + [-float(n) for n in range(shape.bos_id - 96)]
    special = [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>"]
    special += [f"<|extra_{n}|>".encode() for n in range(shape.vocab_size - shape.bos_id - len(special))]
    tokens += special
    scores += [0.0] * len(special)
    assert len(tokens) == shape.vocab_size and len(set(tokens)) == len(tokens)
    return tokens, scores


def write_tokenizer(shape: Shape, path: str) -> None:
    tokens, scores = vocabulary(shape)
    template = CHAT_TEMPLATE.encode()
    eos_ids = [shape.bos_id + 2]  # <|im_end|>
    pairs = [
        (0, 1),  # version
        (1, len(tokens)),  # vocab_size
        (2, max(len(t) for t in tokens)),  # max_token_length
        (3, shape.bos_id),
        (7, len(template)),  # chat_template
        (9, len(eos_ids)),  # n_eos_tokens
        (10, 1),  # add_bos
    ]
    body = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    parts = [struct.pack("<ii", TOKENIZER_MAGIC, 8 + len(body)), body, template]
    parts += [struct.pack("<i", i) for i in eos_ids]
    for token, score in zip(tokens, scores, strict=True):
        parts.append(struct.pack("<fI", score, len(token)) + token)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "wb") as f:
        f.write(b"".join(parts))
    os.replace(path + ".partial", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--layers", type=int, help="override the shape's layer count")
    parser.add_argument("--out", required=True, help="model file (distributed-llama's --model)")
    parser.add_argument("--tokenizer-out", help="tokenizer file (--tokenizer); none if not given")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes writing chunks")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    if args.layers:
        shape = dataclasses.replace(shape, n_layers=args.layers)
    check_shape(shape)
    started = time.perf_counter()
    if args.tokenizer_out:
        write_tokenizer(shape, args.tokenizer_out)
    size = write_model(shape, args.out, args.seed, max(1, args.jobs))
    elapsed = time.perf_counter() - started
    print(
        f"{args.out}: {args.shape}, {shape.n_layers} layers, {size / 1e9:.2f} GB in {elapsed:.1f} s "
        f"({size / 1e6 / max(elapsed, 1e-9):.0f} MB/s, {args.jobs} jobs)",
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
