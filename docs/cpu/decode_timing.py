"""Where a streamed token's time goes on a small CPU machine: the decode in-process, llama-server's own decode
timing, and the CPU this service's HTTP front spends per streamed token. Prints one table.

    .venv/bin/python docs/cpu/decode_timing.py \\
        --model ~/.cache/llmfleet/models/bench-q8_0.gguf \\
        --llama-server ~/.cache/llmfleet/llama-server-0.3.36/build/bin/llama-server

Run it on an otherwise idle machine; every number is the median of its repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from inference import bench  # noqa: E402  (this checkout's, also when the package is not installed)


def in_process_decode(model: str, threads: int, kv_unified: bool, tokens: int) -> float:
    """Median ms of one llama_decode of one token, with the engine's context settings, in a fresh process."""
    code = f"""
import ctypes, statistics, time
import llama_cpp as lc
from inference import ggml
lc.llama_backend_init()
quiet = lc.llama_log_callback(lambda *a: None)
lc.llama_log_set(quiet, ctypes.c_void_p(0))
model = lc.llama_model_load_from_file({model!r}.encode(), lc.llama_model_default_params())
params = lc.llama_context_default_params()
params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 4096, 2048, 512, 4
params.n_threads = params.n_threads_batch = {threads}
params.kv_unified, params.no_perf = {kv_unified}, True
ctx = lc.llama_init_from_model(model, params)
ggml.attach_threadpool(ctx, {threads})
batch = lc.llama_batch_init(512, 0, 1)
def decode(ids, pos0):
    batch.n_tokens = len(ids)
    for i, t in enumerate(ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, i == len(ids) - 1
    assert lc.llama_decode(ctx, batch) == 0
decode(list(range(10, 42)), 0)
times = []
for i in range({tokens}):
    start = time.perf_counter()
    decode([100 + i % 50], 32 + i)
    times.append(time.perf_counter() - start)
print(1000 * statistics.median(times))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return float(out.stdout.split()[-1])


def greedy_choice(model: str, threads: int) -> tuple[float, float]:
    """Microseconds per greedy token choice over the same logits: llama.cpp's greedy sampler (what
    llama_sampler_sample does for every token: a candidate array of the whole vocabulary) and the engine's
    argmax."""
    code = f"""
import time
from inference.config import ServeConfig
from inference.engine import Engine, SamplingParams, _make_sampler
engine = Engine(ServeConfig(model={model!r}, threads={threads}, ctx=4096, parallel=4).validated())
engine.submit(0, [10, 11, 12, 13], SamplingParams(max_tokens=8, temperature=0))
engine.step(); engine.step()  # the prompt, then one token: the last batch's only output is at index 0
greedy = _make_sampler(engine.llama_cpp, engine.vocab, SamplingParams(max_tokens=1, temperature=0))
n = 2000
start = time.perf_counter()
for _ in range(n):
    chosen = engine.llama_cpp.llama_sampler_sample(greedy, engine.ctx, 0)
middle = time.perf_counter()
for _ in range(n):
    assert engine._argmax(0) == chosen
print(1e6 * (middle - start) / n, 1e6 * (time.perf_counter() - middle) / n)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    sampler, argmax = out.stdout.split()[-2:]
    return float(sampler), float(argmax)


def _start(argv: list[str]) -> subprocess.Popen:
    # In its own session, as bench.stop expects (it signals the process group).
    return subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True
    )


def llama_server_decode(binary: str, model: str, threads: int, extra: list[str], tokens: int) -> float:
    """Median of llama-server's own timings.predicted_per_token_ms over four requests."""
    port = bench.free_port()
    argv = [binary, "-m", model, "--port", str(port), "-t", str(threads), "-tb", str(threads), "-c", "4096"]
    server = _start([*argv, "-np", "4", "--no-webui", *extra])
    try:
        bench.wait_ready(server, port, "/health")
        per_token = []
        for i in range(4):
            body = {
                "prompt": f"The quick brown fox {i}",
                "n_predict": tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            status, answer = bench._request(port, "/completion", body)
            if status != 200:
                raise RuntimeError(f"llama-server answered HTTP {status}: {answer[:300]!r}")
            per_token.append(json.loads(answer)["timings"]["predicted_per_token_ms"])
        return statistics.median(per_token)
    finally:
        bench.stop(server)


def _cpu_seconds(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def front_cpu(model: str, threads: int, clients: int, tokens: int) -> tuple[float, float, float]:
    """(user ms, system ms) of the service's front process per streamed token, and the tok/s it served."""
    port = bench.free_port()
    argv = [sys.executable, "-m", "inference", "serve", "--model", model, "--threads", str(threads)]
    server = _start([*argv, "--ctx", "4096", "--parallel", "4", "--port", str(port)])

    def stream(i: int, n: int) -> int:
        return bench._stream_completion(port, f"The quick brown fox {i}", n).tokens

    try:
        bench.wait_ready(server, port, "/health")  # 200 only once the engine is ok
        stream(0, 8)
        before, start = _cpu_seconds(server.pid), time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            n = sum(pool.map(lambda i: stream(i, tokens), range(2 * clients)))
        elapsed, after = time.perf_counter() - start, _cpu_seconds(server.pid)
        return 1000 * (after[0] - before[0]) / n, 1000 * (after[1] - before[1]) / n, n / elapsed
    finally:
        bench.stop(server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for label, kv_unified in (
        ("unified KV pool (the engine's setting)", True),
        ("one KV stream per sequence", False),
    ):
        values = [
            in_process_decode(args.model, args.threads, kv_unified, args.tokens) for _ in range(args.repeats)
        ]
        rows.append((f"llama_decode in-process, {label}", f"{statistics.median(values):.2f} ms/token"))
    choices = [greedy_choice(args.model, args.threads) for _ in range(args.repeats)]
    rows.append(
        (
            "greedy choice of a token: llama_sampler_sample / the engine's argmax",
            f"{statistics.median(c[0] for c in choices):.1f} us / {statistics.median(c[1] for c in choices):.1f} us",
        )
    )
    for label, extra in (("default -np 4", []), ("-np 4 -kvu", ["-kvu"])):
        values = [
            llama_server_decode(args.llama_server, args.model, args.threads, extra, args.tokens)
            for _ in range(args.repeats)
        ]
        rows.append(
            (f"llama-server's own decode timing, {label}", f"{statistics.median(values):.2f} ms/token")
        )
    for clients in (1, 4):
        runs = [front_cpu(args.model, args.threads, clients, args.tokens) for _ in range(args.repeats)]
        user, system, rate = (statistics.median(r[k] for r in runs) for k in range(3))
        rows.append(
            (
                f"this service's HTTP front, {clients} client(s) at {rate:.0f} tok/s",
                f"{user:.3f} ms user + {system:.3f} ms system per token",
            )
        )
    print(f"| what ({args.threads} threads, {os.path.basename(args.model)}) | value |\n|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
