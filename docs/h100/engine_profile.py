"""Where the engine's decode step spends its time, without the HTTP front: ``llama_decode``, sampling (the
greedy argmax, or a sampler chain; on a GPU it includes waiting for the logits) and the Python around them,
for 1, 4 and 16 sequences decoding together.

    python docs/h100/engine_profile.py MODEL [--gpu-layers 999] [--threads 16] [--prompt-tokens 512]

Prints one Markdown row per batch size: steps, ms per step, and its split.
"""

from __future__ import annotations

import argparse
import time
import types

import llama_cpp

from inference.config import ServeConfig
from inference.engine import Engine, SamplingParams


class Timed:
    """Proxy of the llama_cpp module that adds up the time spent in the wrapped functions."""

    def __init__(self, names: list[str]):
        self.seconds = dict.fromkeys(names, 0.0)
        for name in dir(llama_cpp):
            if not name.startswith("__"):
                setattr(self, name, getattr(llama_cpp, name))
        for name in names:
            setattr(self, name, self.wrap(name, getattr(llama_cpp, name)))

    def wrap(self, name, fn):
        def timed(*args):
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[name] += time.perf_counter() - started

        return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--gpu-layers", type=int, default=999)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,4,16")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    config = ServeConfig(
        model=args.model,
        ctx=32768,
        parallel=max(batches),
        threads=args.threads,
        flash_attn="on",
        gpu_layers=args.gpu_layers,
    ).validated()
    engine = Engine(config)
    timed = Timed(["llama_decode", "llama_sampler_sample"])
    engine.llama_cpp = types.SimpleNamespace(
        **{k: getattr(timed, k) for k in dir(timed) if not k.startswith("__")}
    )
    timed.seconds["argmax"] = 0.0
    engine._argmax = timed.wrap("argmax", engine._argmax)  # greedy sequences skip the sampler chain
    print("| sequences | decode steps | ms/step | llama_decode ms | sampling ms | Python ms | tok/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    request = 0
    n_vocab = llama_cpp.llama_vocab_n_tokens(engine.vocab)
    for n in batches:
        for _ in range(n):
            prompt = [
                300 + (request * 7919 + i * 104729) % (n_vocab - 600) for i in range(args.prompt_tokens)
            ]
            engine.submit(request, prompt, SamplingParams(max_tokens=args.max_tokens, temperature=0))
            request += 1
        while any(not s.generated for s in engine.sequences.values()):
            engine.step()  # prefill (and the first token)
        for key in timed.seconds:
            timed.seconds[key] = 0.0
        steps, tokens = 0, 0
        started = time.perf_counter()
        while engine.sequences:
            tokens += len(engine.step())
            steps += 1
        elapsed = time.perf_counter() - started
        decode = timed.seconds["llama_decode"]
        sample = timed.seconds["llama_sampler_sample"] + timed.seconds["argmax"]
        rest = elapsed - decode - sample
        print(
            f"| {n} | {steps} | {1000 * elapsed / steps:.2f} | {1000 * decode / steps:.2f} "
            f"| {1000 * sample / steps:.2f} | {1000 * rest / steps:.3f} | {tokens / elapsed:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
