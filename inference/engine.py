"""The engine: owns the model and decodes up to ``--parallel`` sequences together, one llama_decode a step.

It runs in a child process of the server because ggml aborts the process that owns a model when an RPC worker
goes away; the server survives that, reports it, and starts a new engine once the workers answer again.

Messages from the server (tuples over a multiprocessing connection):
    ("submit", request_id, prompt_tokens, SamplingParams)   ("cancel", request_id)   ("stop",)
Messages to the server (length-prefixed pickles, see send() and MessageReader, so that the server takes all
that has arrived with one read):
    ("ready", info)   ("fatal", message)
    ("step", [(request_id, token, finish_reason | None), ...], stats)
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import pickle
import random
import select
import signal
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from inference.config import ServeConfig

log = logging.getLogger("inference.engine")

SPLIT_MODE_VALUES = {"none": 0, "layer": 1, "tensor": 3}
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


class EngineError(RuntimeError):
    pass


class _Sequence:
    __slots__ = ("generated", "max_tokens", "n_past", "pending", "request_id", "sampler", "seq_id")

    def __init__(self, request_id: int, seq_id: int, prompt: list[int], sampler, max_tokens: int):
        """``sampler`` is a llama.cpp sampler chain, or None for plain greedy decoding."""
        self.request_id = request_id
        self.seq_id = seq_id
        self.pending = deque(prompt)  # tokens not yet in the KV cache
        self.n_past = 0
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.generated = 0


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature <= 0.0 and not (params.presence_penalty or params.frequency_penalty)


def _make_sampler(llama_cpp, vocab, params: SamplingParams):
    chain_params = llama_cpp.llama_sampler_chain_default_params()
    chain_params.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(chain_params)
    add = llama_cpp.llama_sampler_chain_add
    if params.presence_penalty or params.frequency_penalty:
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                64, 1.0, params.frequency_penalty, params.presence_penalty
            ),
        )
    if params.temperature <= 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


class Engine:
    """Model, context and the continuous-batching loop. Single-threaded; lives in its own process."""

    def __init__(self, config: ServeConfig):
        import llama_cpp

        # Only after llama_cpp: with a CUDA build, numpy's libraries loaded before llama.cpp's made the model
        # load crash (numpy 2 from PyPI, H100 machine); llama_cpp itself imports numpy after its libraries.
        import numpy

        from inference import ggml

        self.logits_of = numpy.ctypeslib.as_array

        self.llama_cpp = llama_cpp
        self.config = config
        llama_cpp.llama_backend_init()
        self.rpc_devices = []
        for endpoint in config.rpc:
            self.rpc_devices.extend(ggml.add_rpc_server(endpoint))
        self.model = self._load_model()
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.ctx = self._new_context()
        # Kept for the life of this process, which the context shares.
        self.threadpool = ggml.attach_threadpool(self.ctx, config.threads) if config.threadpool else None
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(config.batch, 0, 1)
        self.free_seq_ids = list(range(config.parallel - 1, -1, -1))
        self.sequences: dict[int, _Sequence] = {}
        self.n_ctx_seq = config.ctx_per_sequence

    def _load_model(self):
        lc, config = self.llama_cpp, self.config
        params = lc.llama_model_default_params()
        params.n_gpu_layers = config.gpu_layers
        params.split_mode = SPLIT_MODE_VALUES[config.split]
        if config.tensor_split:
            self._tensor_split = (ctypes.c_float * 128)(*config.tensor_split)
            params.tensor_split = self._tensor_split
        if config.experts_used is not None:
            arch = self._architecture()
            overrides = (lc.llama_model_kv_override * 2)()
            overrides[0].key = f"{arch}.expert_used_count".encode()
            overrides[0].tag = lc.LLAMA_KV_OVERRIDE_TYPE_INT
            overrides[0].value.val_i64 = config.experts_used
            overrides[1].key = b""
            self._overrides = overrides
            params.kv_overrides = overrides
        model = lc.llama_model_load_from_file(config.model.encode(), params)
        if not model:
            raise EngineError(f"llama.cpp could not load {config.model}; its log above says why")
        return model

    def _architecture(self) -> str:
        from gguf import GGUFReader

        reader = GGUFReader(self.config.model)
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

    def info(self) -> dict:
        return {
            "rpc_devices": [d.__dict__ for d in self.rpc_devices],
            "n_ctx": self.llama_cpp.llama_n_ctx(self.ctx),
            "n_ctx_seq": self.n_ctx_seq,
            "parallel": self.config.parallel,
            "pid": os.getpid(),
        }

    # -- sequences ----------------------------------------------------------------------------------------
    def submit(self, request_id: int, prompt: list[int], params: SamplingParams) -> str | None:
        if not self.free_seq_ids:
            return "no free sequence slot"
        if not prompt:
            return "empty prompt"
        seq_id = self.free_seq_ids.pop()
        max_tokens = min(params.max_tokens, self.n_ctx_seq - len(prompt))
        sampler = None if _is_greedy(params) else _make_sampler(self.llama_cpp, self.vocab, params)
        self.sequences[request_id] = _Sequence(request_id, seq_id, prompt, sampler, max_tokens)
        return None

    def release(self, request_id: int) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return
        self.llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
        if seq.sampler is not None:
            self.llama_cpp.llama_sampler_free(seq.sampler)
        self.free_seq_ids.append(seq.seq_id)

    def kv_tokens(self) -> int:
        return sum(seq.n_past for seq in self.sequences.values())

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
            token[n] = seq.pending.popleft()
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
            for i in range(take):
                token[n] = pending.popleft()
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
        status = lc.llama_decode(self.ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}")
        results = []
        for seq, index in outputs:
            if seq.sampler is None:
                new_token = self._argmax(index)
            else:
                new_token = lc.llama_sampler_sample(seq.sampler, self.ctx, index)
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
        return results

    def _argmax(self, index: int) -> int:
        """The greedy choice, as llama.cpp's greedy sampler makes it (the first of equal maxima), without the
        candidate array of the whole vocabulary that llama_sampler_sample builds for every token (152k
        entries for Qwen3)."""
        logits = self.llama_cpp.llama_get_logits_ith(self.ctx, index)
        return int(self.logits_of(logits, shape=(self.n_vocab,)).argmax())


_LENGTH = struct.Struct("!I")


def send(fd: int, message) -> None:
    payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    data = memoryview(_LENGTH.pack(len(payload)) + payload)
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


def run(config: ServeConfig, conn) -> None:
    """Entry point of the engine process."""
    faulthandler.enable()  # a crash inside llama.cpp leaves the Python stack in the server's log
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    out = conn.fileno()
    try:
        engine = Engine(config)
    except Exception as exc:
        send(out, ("fatal", str(exc)))
        return
    send(out, ("ready", engine.info()))
    idle = True
    waiting = poller(conn)
    while True:
        messages = [conn.recv()] if idle else []
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
        try:
            results = engine.step()
        except EngineError as exc:
            send(out, ("fatal", str(exc)))
            return
        idle = not engine.sequences
        if results or finished_early or released:
            send(out, ("step", finished_early + results, (engine.kv_tokens(), len(engine.sequences))))
