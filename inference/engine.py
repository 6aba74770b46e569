"""The engine: owns the model and decodes up to ``--parallel`` sequences together, one llama_decode a step.

It runs in a child process of the server because ggml aborts the process that owns a model when an RPC worker
goes away; the server survives that, reports it, and starts a new engine once the workers answer again.

Messages from the server (tuples over a multiprocessing connection):
    ("submit", request_id, prompt_tokens, SamplingParams)   ("cancel", request_id)   ("stop",)
Messages to the server (length-prefixed pickles, see send() and MessageReader, so that the server takes all
that has arrived with one read):
    ("ready", info)   ("fatal", message)
    ("step", [(request_id, token, finish_reason | None), ...], (kv_tokens, active, admitted))
        where admitted lists (request_id, prompt tokens reused from the KV cache) of requests admitted since
        the last "step", each before or with its first token
A finish reason ``"error:<message>"`` fails that request alone; a "fatal" message precedes the engine's exit and
says why, so that the server can report the cause instead of an exit code.

With RPC workers, a watchdog thread bounds every wait on them (loading, each decode step, see StepWatchdog),
and between steps the engine watches its RPC connections, so that a worker that hangs, restarts or drops off
the network ends this process with a message naming it instead of leaving every client waiting.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import os
import pickle
import random
import select
import signal
import socket
import struct
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from inference.config import ServeConfig

log = logging.getLogger("inference.engine")

SPLIT_MODE_VALUES = {"none": 0, "layer": 1, "tensor": 3, "experts": 1}
FLASH_ATTN_VALUES = {"auto": -1, "off": 0, "on": 1}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # llama-server's extension: end-of-generation tokens are never chosen
    logit_bias: tuple[
        tuple[int, float], ...
    ] = ()  # (token, bias) added to the logits, as OpenAI's logit_bias
    grammar: str | None = None  # GBNF (root rule "root") that the generated text must follow
    # llama-server's extension: start from the longest prefix of the prompt that a free slot's KV cache holds.
    # False computes the whole prompt (the cells it leaves are still kept for later requests).
    cache_prompt: bool = True


class EngineError(RuntimeError):
    pass


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` of an exception, for a client or /health (the traceback goes to the log)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Sequence:
    __slots__ = (
        "biases",
        "cached",
        "generated",
        "max_tokens",
        "n_past",
        "pending",
        "request_id",
        "sampler",
        "seq_id",
        "tokens",
    )

    def __init__(
        self, request_id: int, seq_id: int, prompt: list[int], sampler, max_tokens: int, cached: int = 0
    ):
        """``sampler`` is a llama.cpp sampler chain, or None for plain greedy decoding; the first ``cached``
        tokens of ``prompt`` are already in the KV cache of ``seq_id``."""
        self.request_id = request_id
        self.seq_id = seq_id
        self.tokens = prompt[:cached]  # what the KV cache of seq_id holds, positions 0..n_past-1
        self.pending = deque(prompt[cached:])  # tokens not yet in the KV cache
        self.n_past = cached
        self.cached = cached
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.generated = 0
        self.biases: dict[int, float] = {}  # the greedy path's logit_bias and ignore_eos


# llama-server's --slot-prompt-similarity default: a free slot is chosen for its cached prefix only when that
# prefix is at least this share of the prompt; else the least recently used slot is, so that a short shared
# start (a system prompt) does not cost another conversation its cached turns.
SLOT_PROMPT_SIMILARITY = 0.1


def common_prefix(a: list[int], b: list[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


# Tokens looked back on by the presence and frequency penalties (llama-server's default repeat_last_n).
PENALTY_LAST_N = 64


def _is_greedy(params: SamplingParams) -> bool:
    """Whether the engine's own argmax (with logit_bias and ignore_eos applied) serves these parameters."""
    return (
        params.temperature <= 0.0
        and not (params.presence_penalty or params.frequency_penalty)
        and params.grammar is None
    )


def _make_sampler(llama_cpp, n_vocab: int, params: SamplingParams, eog_tokens: list[int], vocab=None):
    """A llama.cpp sampler chain for ``params`` (``vocab`` is needed for a grammar). Raises EngineError when
    llama.cpp refuses a part of it."""
    chain_params = llama_cpp.llama_sampler_chain_default_params()
    chain_params.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(chain_params)
    try:
        _fill_chain(llama_cpp, chain, n_vocab, params, eog_tokens, vocab)
    except BaseException:
        llama_cpp.llama_sampler_free(chain)
        raise
    return chain


def _biases(params: SamplingParams, eog_tokens: list[int]) -> dict[int, float]:
    """Token -> bias of logit_bias, and -inf for end-of-generation tokens under ignore_eos."""
    biases: dict[int, float] = {}
    for token, bias in params.logit_bias:
        biases[token] = biases.get(token, 0.0) + bias
    if params.ignore_eos:
        biases.update(dict.fromkeys(eog_tokens, float("-inf")))
    return biases


def _fill_chain(llama_cpp, chain, n_vocab: int, params: SamplingParams, eog_tokens: list[int], vocab) -> None:
    def add(sampler, name: str) -> None:
        if not sampler:
            raise EngineError(f"llama.cpp could not create the {name} sampler")
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    wanted = _biases(params, eog_tokens)
    if wanted:
        biases = (llama_cpp.llama_logit_bias * len(wanted))()
        for bias, (token, value) in zip(biases, wanted.items(), strict=True):
            bias.token, bias.bias = token, value
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(wanted), biases), "logit bias")
    if params.grammar is not None:
        # Before the penalties and truncations: they then see only the tokens that the grammar allows.
        add(llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root"), "grammar")
    if params.presence_penalty or params.frequency_penalty:
        # llama-cpp-python 0.3.36 binds the llama.h of its vendored llama.cpp: n_vocab comes first.
        add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, 1.0, params.frequency_penalty, params.presence_penalty
            ),
            "penalties",
        )
    if params.temperature <= 0.0:
        add(llama_cpp.llama_sampler_init_greedy(), "greedy")
        return
    if params.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(params.top_k), "top-k")
    if params.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1), "top-p")
    if params.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1), "min-p")
    add(llama_cpp.llama_sampler_init_temp(params.temperature), "temperature")
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF), "distribution")


class Engine:
    """Model, context and the continuous-batching loop. Single-threaded; lives in its own process."""

    def __init__(self, config: ServeConfig, watchdog: StepWatchdog | None = None):
        import llama_cpp

        # Only after llama_cpp: with a CUDA build, numpy's libraries loaded before llama.cpp's made the model
        # load crash (numpy 2 from PyPI, H100 machine); llama_cpp itself imports numpy after its libraries.
        import numpy

        from inference import ggml

        self.logits_of = numpy.ctypeslib.as_array
        self.numpy = numpy

        self.llama_cpp = llama_cpp
        self.config = config
        # Only RPC waits can hang: a local model has nothing to watch.
        self.watchdog = watchdog if config.rpc else None
        llama_cpp.llama_backend_init()
        self.model_path = config.model
        if config.split == "experts":
            self.model_path = self._sharded_model()
            if config.experts_partial_type != "f32":
                # Read by patch 0006's qwen3moe graph when it first builds one; f32, its default, stays unset
                # so that a benchmark's environment can still choose.
                os.environ["LLAMA_EXPERT_SPLIT_PARTIAL_TYPE"] = config.experts_partial_type
        self.rpc_devices = []
        self.rpc_handles: list[tuple[str, int]] = []  # (endpoint, device handle)
        for endpoint in config.rpc:
            self._arm(f"the RPC hello of {endpoint}")
            for handle in ggml.add_rpc_server_handles(endpoint):
                self.rpc_handles.append((endpoint, handle))
                self.rpc_devices.append(ggml.describe(handle))
        self._arm("loading the model onto the RPC workers")
        self.model = self._load_model()
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.eog_tokens = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        self._arm("creating the context on the RPC workers")
        self.ctx = self._new_context()
        self._disarm()
        self.connections = RpcConnections(config.rpc) if config.rpc else None
        # Kept for the life of this process, which the context shares.
        self.threadpool = ggml.attach_threadpool(self.ctx, config.threads) if config.threadpool else None
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(config.batch, 0, 1)
        self.free_seq_ids = list(range(config.parallel - 1, -1, -1))
        self.sequences: dict[int, _Sequence] = {}
        self.n_ctx_seq = config.ctx_per_sequence
        # Prompt reuse (llama-server's slot prompt cache): the tokens whose cells each free sequence id still
        # holds in the KV cache, and when each was last released (a counter), for the least recently used.
        self.cache_prompt = config.cache_prompt
        self.kept: dict[int, list[int]] = {seq_id: [] for seq_id in self.free_seq_ids}
        self.last_used: dict[int, int] = dict.fromkeys(self.free_seq_ids, 0)
        self._uses = 0
        self.admitted: list[tuple[int, int]] = []  # (request_id, cached prompt tokens) not yet reported

    def _sharded_model(self) -> str:
        """The model with each layer's experts cut into one slice per RPC worker (made once, then cached)."""
        from inference import reshard

        def progress(line: str) -> None:
            log.info("expert split: %s", line)

        path = reshard.ensure_sharded(
            self.config.model, len(self.config.rpc), self.config.sharded_cache_dir, progress
        )
        return str(path)

    def _place_expert_slices(self, params) -> None:
        """Expert split: slice k of every layer's experts on RPC device k; every other tensor on the head (its
        GPUs when it has any, else its CPU), logits included."""
        from inference import ggml

        if len(self.rpc_handles) != len(self.config.rpc):
            raise EngineError(
                f"--split experts needs one device per RPC worker; the {len(self.config.rpc)} workers offer "
                f"{len(self.rpc_handles)}"
            )

        patterns = [rf"\.shard{k}\.weight$" for k in range(len(self.rpc_handles))]
        buffer_types = [ggml.buffer_type(handle) for _, handle in self.rpc_handles]
        self._override_buffer_types(params, list(zip(patterns, buffer_types, strict=True)))
        local_gpus = self._local_gpus()
        # The model's devices in this order, given explicitly: left to itself llama.cpp puts RPC devices before
        # the local GPUs (llama_model_load_from_file_impl, "add RPC servers at the front"), and tensor_split
        # follows that order, so shares meant for the GPUs would put the layers on the first worker.
        handles = local_gpus + [handle for _, handle in self.rpc_handles]
        self._devices = (ctypes.c_void_p * (len(handles) + 1))(*handles, None)  # NULL-terminated
        params.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        if local_gpus:
            # Layers go to the local GPUs alone: the RPC devices, after them, get a zero share.
            shares = [1.0] * len(local_gpus) + [0.0] * len(self.rpc_handles)
            self._tensor_split = (ctypes.c_float * 128)(*shares)
            params.tensor_split = self._tensor_split
        else:
            params.n_gpu_layers = 0

    def _keep_output_on_head(self, params) -> None:
        """Layer split: the output matrix on the head (its first GPU, else its CPU), not on the device of the
        last layers, so that one hidden state per token crosses the link instead of n_vocab logits (151,936
        floats, 0.6 MB, for Qwen3)."""
        from inference import ggml

        gpus = self._local_gpus()
        head = gpus[0] if gpus else ggml.cpu_device()
        self._override_buffer_types(params, [(r"^output\.weight$", ggml.buffer_type(head))])

    def _override_buffer_types(self, params, placements: list[tuple[str, int]]) -> None:
        """Set ``tensor_buft_overrides``: each (regular expression over tensor names, buffer type)."""

        class BuftOverride(ctypes.Structure):  # struct llama_model_tensor_buft_override (llama.h)
            _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

        overrides = (BuftOverride * (len(placements) + 1))()  # ends with a null pattern
        for k, (pattern, buft) in enumerate(placements):
            overrides[k].pattern, overrides[k].buft = pattern.encode(), buft
        self._buft_overrides = overrides  # kept alive for the model's life
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)

    def _local_gpus(self) -> list[int]:
        """Handles of this machine's GPUs in the registry (the RPC workers' devices left out), in order."""
        from inference import ggml

        rpc = {handle for _, handle in self.rpc_handles}
        return [h for h in ggml.device_handles() if h not in rpc and ggml.describe(h).kind in ("gpu", "igpu")]

    def _load_model(self):
        lc, config = self.llama_cpp, self.config
        params = lc.llama_model_default_params()
        params.n_gpu_layers = config.gpu_layers
        params.split_mode = SPLIT_MODE_VALUES[config.split]
        if config.tensor_split:
            self._tensor_split = (ctypes.c_float * 128)(*config.tensor_split)
            params.tensor_split = self._tensor_split
        if config.split == "experts":
            self._place_expert_slices(params)
        elif config.split == "layer" and config.rpc:
            self._keep_output_on_head(params)
        if config.experts_used is not None:
            arch = self._architecture()
            overrides = (lc.llama_model_kv_override * 2)()
            overrides[0].key = f"{arch}.expert_used_count".encode()
            overrides[0].tag = lc.LLAMA_KV_OVERRIDE_TYPE_INT
            overrides[0].value.val_i64 = config.experts_used
            overrides[1].key = b""
            self._overrides = overrides
            params.kv_overrides = overrides
        if self.watchdog is not None:
            # Every tensor that reaches the workers re-arms the deadline, so only a stalled upload trips it.
            def progress(_fraction, _data):
                self._arm("loading the model onto the RPC workers")
                return True

            self._progress = lc.llama_progress_callback(progress)
            params.progress_callback = self._progress
        model = lc.llama_model_load_from_file(self.model_path.encode(), params)
        if not model:
            raise EngineError(f"llama.cpp could not load {self.model_path}; its log above says why")
        return model

    def _architecture(self) -> str:
        from gguf import GGUFReader

        reader = GGUFReader(self.model_path)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()

    def _new_context(self):
        lc, config = self.llama_cpp, self.config
        params = lc.llama_context_default_params()
        params.n_ctx = config.ctx
        params.n_batch = config.batch
        params.n_ubatch = config.ubatch
        params.n_seq_max = config.parallel
        params.n_threads = config.threads
        params.n_threads_batch = config.threads
        params.flash_attn_type = FLASH_ATTN_VALUES[config.flash_attn]
        # One KV pool shared by all sequences, as llama-server's default. Per-sequence streams measured a few
        # percent faster per token on the CPU, but gave one sequence of four other greedy tokens when decoded
        # beside the others than alone (one-token micro-batches), so the pool stays unified.
        params.kv_unified = True
        params.no_perf = True
        ctx = lc.llama_init_from_model(self.model, params)
        if not ctx:
            raise EngineError("llama.cpp could not create a context; lower --ctx or --parallel")
        return ctx

    def close(self) -> None:
        """Free the context and the model and close the watched connections (the process may go on)."""
        lc = self.llama_cpp
        if self.connections is not None:
            self.connections.close()
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)

    def _arm(self, what: str, ubatches: int = 1) -> None:
        if self.watchdog is not None:
            self.watchdog.arm(self.config.rpc_timeout * ubatches, what)

    def _disarm(self) -> None:
        if self.watchdog is not None:
            self.watchdog.disarm()

    def info(self) -> dict:
        return {
            "rpc_devices": [d.__dict__ for d in self.rpc_devices],
            "n_ctx": self.llama_cpp.llama_n_ctx(self.ctx),
            "n_ctx_seq": self.n_ctx_seq,
            "parallel": self.config.parallel,
            "cache_prompt": self.cache_prompt,
            "pid": os.getpid(),
            # the GGUF's experts per token (None for a dense model) and the count served (--experts-used)
            "model_experts_used": self._meta_int(
                f"{self._meta_str('general.architecture')}.expert_used_count"
            ),
            "experts_used": self.config.experts_used,
        }

    def _meta_str(self, key: str) -> str | None:
        """The model's GGUF metadata value ``key`` as text, None where it has none."""
        buf = ctypes.create_string_buffer(256)
        if self.llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf)) < 0:
            return None
        return buf.value.decode(errors="replace")

    def _meta_int(self, key: str) -> int | None:
        value = self._meta_str(key)
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    # -- sequences ----------------------------------------------------------------------------------------
    def submit(self, request_id: int, prompt: list[int], params: SamplingParams) -> str | None:
        """Admit a request; returns why it cannot be served (that request alone fails), or None.

        The request takes the free sequence id whose kept cells share the longest prefix with ``prompt`` (see
        _take_slot) and starts after that prefix; (request_id, cached tokens) goes to ``admitted``."""
        if not self.free_seq_ids:
            return "no free sequence slot"
        if not prompt:
            return "empty prompt"
        max_tokens = min(params.max_tokens, self.n_ctx_seq - len(prompt))
        try:
            if _is_greedy(params):
                sampler = None
            else:
                sampler = _make_sampler(self.llama_cpp, self.n_vocab, params, self.eog_tokens, self.vocab)
        except Exception as exc:
            log.exception("request %d: setting up its sampler failed", request_id)
            return "could not set up sampling: " + describe_exception(exc)
        seq_id, cached = self._take_slot(prompt, self.cache_prompt and params.cache_prompt)
        seq = _Sequence(request_id, seq_id, prompt, sampler, max_tokens, cached)
        seq.biases = _biases(params, self.eog_tokens) if sampler is None else {}
        self.sequences[request_id] = seq
        self.admitted.append((request_id, cached))
        return None

    def _take_slot(self, prompt: list[int], reuse: bool) -> tuple[int, int]:
        """A free sequence id for ``prompt`` and how many of its first tokens that id's KV cache already holds.

        With ``reuse``: the id whose kept tokens share the longest prefix with the prompt, when that prefix
        is at least SLOT_PROMPT_SIMILARITY of the prompt, else the least recently used id (which may still
        share a prefix). At least the prompt's last token is computed again, since sampling needs its logits.
        The id's cells after the reused prefix are removed."""
        free = self.free_seq_ids
        lru = min(free, key=self.last_used.__getitem__)
        seq_id, cached = lru, 0
        if reuse:
            matches = {sid: common_prefix(self.kept[sid], prompt) for sid in free}
            best = max(free, key=lambda sid: (matches[sid], -self.last_used[sid]))
            if matches[best] >= SLOT_PROMPT_SIMILARITY * len(prompt):
                seq_id = best
            cached = min(matches[seq_id], len(prompt) - 1)
        free.remove(seq_id)
        kept, rm = self.kept[seq_id], self.llama_cpp.llama_memory_seq_rm
        # A memory that cannot cut a sequence short (recurrent or sliding-window layers) starts it afresh.
        if cached < len(kept) and (cached == 0 or not rm(self.memory, seq_id, cached, -1)):
            rm(self.memory, seq_id, -1, -1)
            cached = 0
        self.kept[seq_id] = []
        return seq_id, cached

    def release(self, request_id: int) -> None:
        """End a request's sequence. Its cells stay in the KV cache for a later prompt that starts the same way
        (without prompt reuse they are removed)."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return
        if self.cache_prompt:
            self.kept[seq.seq_id] = seq.tokens
        else:
            self.llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
        self._uses += 1
        self.last_used[seq.seq_id] = self._uses
        if seq.sampler is not None:
            self.llama_cpp.llama_sampler_free(seq.sampler)
        self.free_seq_ids.append(seq.seq_id)

    def _evict_kept(self) -> bool:
        """Remove the kept cells of the least recently used free sequence id that has some; False if none has.

        Each sequence id holds at most ``n_ctx_seq`` positions and --parallel of them fit in --ctx, so kept
        cells never crowd out a running sequence; this is for a KV cache that llama.cpp still finds full."""
        holding = [sid for sid in self.free_seq_ids if self.kept[sid]]
        if not holding:
            return False
        seq_id = min(holding, key=self.last_used.__getitem__)
        log.warning(
            "KV cache full: dropping the %d kept tokens of sequence %d", len(self.kept[seq_id]), seq_id
        )
        self.llama_cpp.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
        self.kept[seq_id] = []
        return True

    def kv_tokens(self) -> int:
        """Tokens of the running sequences in the KV cache (kept cells of finished ones are not counted)."""
        return sum(seq.n_past for seq in self.sequences.values())

    def take_admitted(self) -> list[tuple[int, int]]:
        """(request_id, cached prompt tokens) of the requests admitted since the last call."""
        admitted, self.admitted = self.admitted, []
        return admitted

    # -- one step -----------------------------------------------------------------------------------------
    def step(self) -> list[tuple[int, int, str | None]]:
        """Decode one batch: the next token of every generating sequence, then prompt chunks in the room left."""
        lc, batch = self.llama_cpp, self.batch
        token, pos, n_seq, seq_ids, logits = (
            batch.token,
            batch.pos,
            batch.n_seq_id,
            batch.seq_id,
            batch.logits,
        )
        budget = self.config.batch
        n = 0
        outputs: list[tuple[_Sequence, int]] = []
        generating = [s for s in self.sequences.values() if s.generated and s.pending]
        prefilling = [s for s in self.sequences.values() if not s.generated and s.pending]
        for seq in generating:
            token[n] = next_token = seq.pending.popleft()
            seq.tokens.append(next_token)
            pos[n] = seq.n_past
            n_seq[n] = 1
            seq_ids[n][0] = seq.seq_id
            logits[n] = 1
            seq.n_past += 1
            outputs.append((seq, n))
            n += 1
        budget -= n
        for seq in prefilling:
            if budget <= 0:
                break
            take = min(budget, len(seq.pending))
            sid, base = seq.seq_id, seq.n_past
            pending = seq.pending
            chunk = [pending.popleft() for _ in range(take)]
            seq.tokens += chunk
            for i, chunk_token in enumerate(chunk):
                token[n] = chunk_token
                pos[n] = base + i
                n_seq[n] = 1
                seq_ids[n][0] = sid
                logits[n] = 0
                n += 1
            seq.n_past += take
            budget -= take
            if not pending:
                logits[n - 1] = 1
                outputs.append((seq, n - 1))
        if n == 0:
            return []
        batch.n_tokens = n
        self._arm(f"a decode step of {n} tokens on the RPC workers", ubatches=-(-n // self.config.ubatch))
        status = lc.llama_decode(self.ctx, batch)
        # 1: no room in the KV cache for the batch, found before anything was computed; kept cells can go.
        while status == 1 and self._evict_kept():
            status = lc.llama_decode(self.ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}")
        results = []
        for seq, index in outputs:
            try:
                new_token = self._choose(seq, index)
            except Exception as exc:
                # One sequence's sampling must not cost the others their step, nor the engine its life.
                log.exception("request %d: sampling failed", seq.request_id)
                results.append((seq.request_id, -1, "error:sampling failed: " + describe_exception(exc)))
                self.release(seq.request_id)
                continue
            seq.generated += 1
            finish = None
            if lc.llama_vocab_is_eog(self.vocab, new_token):
                finish = "stop"
            elif seq.generated >= seq.max_tokens or seq.n_past + 1 >= self.n_ctx_seq:
                finish = "length"
            results.append((seq.request_id, new_token, finish))
            if finish:
                self.release(seq.request_id)
            else:
                seq.pending.append(new_token)
        self._disarm()
        return results

    def _choose(self, seq: _Sequence, index: int) -> int:
        if seq.sampler is not None:
            return self.llama_cpp.llama_sampler_sample(seq.sampler, self.ctx, index)
        return self._argmax(index, seq.biases)

    def _argmax(self, index: int, biases: dict[int, float] | None = None) -> int:
        """The greedy choice, as llama.cpp's greedy sampler makes it (the first of equal maxima), without the
        candidate array of the whole vocabulary that llama_sampler_sample builds for every token (152k
        entries for Qwen3)."""
        logits = self.logits_of(self.llama_cpp.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        if biases:
            # llama.cpp's buffer, rewritten by the next decode.
            logits[list(biases)] += self.numpy.array(list(biases.values()), dtype=self.numpy.float32)
        return int(logits.argmax())


_LENGTH = struct.Struct("!I")


_SEND_LOCK = threading.Lock()  # the step watchdog's thread may send its fatal message


def send(fd: int, message) -> None:
    payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    data = memoryview(_LENGTH.pack(len(payload)) + payload)
    with _SEND_LOCK:
        while data:
            data = data[os.write(fd, data) :]


class MessageReader:
    """Splits what arrives from send() into messages; a message may come in several reads."""

    def __init__(self):
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list:
        buffer = self.buffer
        buffer += data
        messages, at = [], 0
        while len(buffer) - at >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, at)
            end = at + _LENGTH.size + size
            if len(buffer) < end:
                break
            messages.append(pickle.loads(buffer[at + _LENGTH.size : end]))
            at = end
        del buffer[:at]
        return messages


def poller(conn) -> Callable[[], bool]:
    """A cheap "is a message (or the end) waiting?" for a multiprocessing connection. Connection.poll() builds
    and registers a new selector at every call, which costs more per token than the rest of the bookkeeping."""
    poll = select.poll()
    poll.register(conn.fileno(), select.POLLIN)
    return lambda: bool(poll.poll(0))


EXIT_STALLED = 3  # the engine's exit status when the step watchdog ended it
# The longest an idle engine waits for one worker's answer to a heartbeat; capped by --rpc-timeout.
HEARTBEAT_TIMEOUT = 10.0


class StepWatchdog:
    """Ends the engine process when a wait on the RPC workers outlasts its deadline.

    ggml's RPC client has no timeouts: a worker that is stopped (SIGSTOP, swapping to death) keeps its TCP
    connection open and the client's recv() waits forever, as does one behind a dropped link until the kernel
    gives up (15 minutes). The engine arms a deadline before each wait (a decode step: ``--rpc-timeout`` per
    micro-batch; the model upload: ``--rpc-timeout`` between two tensors) and disarms it after; past it this
    thread sends ("fatal", reason) and exits the process, and the server finds out which worker is at fault
    and recovers. Arming is two attribute writes, so it costs a decode step nothing measurable.
    """

    def __init__(self, out_fd: int, tick: float = 0.25):
        self._out, self._tick = out_fd, tick
        self._deadline: float | None = None
        self._seconds = 0.0
        self._what = ""
        threading.Thread(target=self._watch, daemon=True, name="step-watchdog").start()

    def arm(self, seconds: float, what: str) -> None:
        self._seconds, self._what = seconds, what
        self._deadline = time.monotonic() + seconds

    def disarm(self) -> None:
        self._deadline = None

    def _watch(self) -> None:
        while True:
            deadline = self._deadline
            now = time.monotonic()
            if deadline is None or now < deadline:
                time.sleep(self._tick if deadline is None else min(self._tick, deadline - now))
                continue
            reason = (
                f"no answer from the RPC workers within {self._seconds:g} s during {self._what}: a worker "
                "hung or its network is down (--rpc-timeout)"
            )
            log.error("%s; ending the engine", reason)
            with contextlib.suppress(OSError):
                send(self._out, ("fatal", reason))
            os._exit(EXIT_STALLED)


class RpcConnections:
    """The engine's TCP connections to its RPC workers, found among the process's sockets by peer address.

    Between steps nothing may arrive on them, so a hang-up (the worker exited or restarted) shows at once as
    POLLRDHUP/POLLHUP/POLLERR; without this an idle engine would learn of it only at its next request.
    """

    def __init__(self, endpoints: tuple[str, ...]):
        from inference.config import split_endpoint
        from inference.worker import process_tcp_sockets

        wanted: dict[tuple[str, int], str] = {}
        for endpoint in endpoints:
            host, port = split_endpoint(endpoint)
            with contextlib.suppress(OSError):
                for *_, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                    wanted[(address[0], port)] = endpoint
        self.endpoints: dict[int, str] = {}
        self._sockets: list[socket.socket] = []
        for sock in process_tcp_sockets():
            try:
                peer = sock.getpeername()
            except OSError:
                peer = None
            endpoint = wanted.get((peer[0], peer[1])) if peer else None
            if endpoint is None:
                sock.close()
                continue
            self._sockets.append(sock)
            self.endpoints[sock.fileno()] = endpoint
        self._poll = select.poll()
        self.register_in(self._poll)
        self.missing = sorted(set(endpoints) - set(self.endpoints.values()))

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def register_in(self, poll: select.poll) -> None:
        for fd in self.endpoints:
            poll.register(fd, select.POLLRDHUP)

    def hung_up(self, events=None) -> list[str]:
        """Endpoints whose connection the worker closed; ``events`` from a poll that includes ours, else
        polls now without waiting."""
        if events is None:
            events = self._poll.poll(0)
        return sorted({self.endpoints[fd] for fd, _ in events if fd in self.endpoints})


def _heartbeat(engine: Engine, watchdog: StepWatchdog) -> None:
    """One round trip to every RPC device over the engine's own connections, under the watchdog."""
    from inference import ggml

    timeout = min(engine.config.rpc_timeout, HEARTBEAT_TIMEOUT)
    for endpoint, handle in engine.rpc_handles:
        watchdog.arm(timeout, f"a heartbeat to {endpoint}")
        ggml.device_memory(handle)
    watchdog.disarm()


def run(config: ServeConfig, conn) -> None:
    """Entry point of the engine process: any exception ends it with a "fatal" message that names it."""
    faulthandler.enable()  # a crash inside llama.cpp leaves the Python stack in the server's log
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    out = conn.fileno()
    try:
        _serve(config, conn, out)
    except EOFError:
        log.info("the server closed the engine's pipe; exiting")
    except Exception as exc:
        log.error("engine failed:\n%s", traceback.format_exc())
        with contextlib.suppress(OSError):
            send(out, ("fatal", describe_exception(exc)))


def _serve(config: ServeConfig, conn, out: int) -> None:
    watchdog = StepWatchdog(out) if config.rpc else None
    engine = Engine(config, watchdog)
    connections = engine.connections
    if connections is not None and connections.missing:
        log.warning("no connection found to watch for %s", ", ".join(connections.missing))
    send(out, ("ready", engine.info()))
    idle = True
    waiting = poller(conn)
    idle_poll = select.poll()
    idle_poll.register(conn.fileno(), select.POLLIN)
    if connections is not None:
        connections.register_in(idle_poll)
    heartbeat_ms = int(config.worker_probe_interval * 1000)
    while True:
        if idle:
            events = idle_poll.poll(heartbeat_ms if watchdog is not None else None)
            lost = connections.hung_up(events) if connections is not None else []
            if not events and watchdog is not None:
                _heartbeat(engine, watchdog)
                continue
        else:
            lost = connections.hung_up() if connections is not None else []
        if lost:
            raise EngineError(f"RPC worker {', '.join(lost)} closed its connection (it exited or restarted)")
        messages = []
        while waiting():
            messages.append(conn.recv())
        finished_early = []
        released = False  # a cancel changes what the KV cache holds even when no token comes of this step
        for message in messages:
            kind = message[0]
            if kind == "submit":
                _, request_id, prompt, params = message
                error = engine.submit(request_id, prompt, params)
                if error:
                    finished_early.append((request_id, -1, "error:" + error))
            elif kind == "cancel":
                engine.release(message[1])
                released = True
            elif kind == "stop":
                return
        results = engine.step()
        idle = not engine.sequences
        if results or finished_early or released:
            stats = (engine.kv_tokens(), len(engine.sequences), engine.take_admitted())
            send(out, ("step", finished_early + results, stats))
