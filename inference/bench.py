"""Throughput benchmark: this service against llama.cpp's llama-server and llama-cpp-python's server.

Every server gets the same model, thread count and context; clients send completions at temperature 0 and
the aggregate rate counts the completion tokens each server reports. Prints a Markdown table.

With ``--prompt-tokens N`` every request carries a prompt of exactly N tokens (token ids built with the
model's own tokenizer, distinct for every request so that no server can reuse a cached prompt), and the
prompt size each server reports is checked. Besides the aggregate rate, the table gives the decode rate of
one stream (completion tokens after the first over the time from the first to the last) and the time to
the first token. RPC runs go through a link-emulating relay per worker (``inference.netsim``) that counts
bytes and round trips; workers can be pinned to cores and kept off the GPU to stand in for small boards.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from inference import config as config_module
from inference.netsim import ProcessRelay, median_round_trip

CACHE = pathlib.Path(os.environ.get("LLMFLEET_CACHE", pathlib.Path.home() / ".cache" / "llmfleet"))
PROMPTS = [
    "Write a short story about a lighthouse keeper who",
    "Explain how a mixture-of-experts language model routes",
    "List the steps to set up a Raspberry Pi cluster:",
    "The history of distributed computing began when",
    "A recipe for bread needs flour, water and",
    "In the year 2050, the city of",
    "def quicksort(items):",
    "The four seasons of the year are",
]


def default_prompt(k: int) -> str:
    """The k-th request's short prompt: PROMPTS in turn, numbered once they repeat, so that no two requests of
    a run share a first token and no server's prompt cache can skip a measured prefill."""
    text = PROMPTS[k % len(PROMPTS)]
    return text if k < len(PROMPTS) else f"{k}. {text}"


# Shares no first word with PROMPTS, nor with the prompts of a given token count, which start with a number.
WARM_UP_PROMPT = "Say hello to the reader."

# Words for prompts of a given token count: common English, so the text tokenizes like ordinary prose.
WORDS = (
    "the of and to in is that for it as with was on be by at this from have or one had not but what all "
    "were when we there can an your which their said if do will each about how up out them then she many "
    "some so these would other into has more her two like him see time could no make than first been its "
    "who now people my made over did down only way find use may water long little very after words called "
    "just where most know get through back much before go good new write our used me man too any day same "
    "right look think also around another came come work three word must because does part even place "
    "well"
)

WORD_LIST = WORDS.split()


def prompt_of_tokens(tokenize: Callable[[str], list[int]], n: int, seed: int) -> list[int]:
    """Exactly ``n`` token ids of English-like text (``tokenize`` maps text to ids, without special tokens).

    The text starts with the seed, so prompts of different seeds part after a token or two and a server's
    prompt cache cannot shorten a measured prefill.
    """
    if n < 1:
        raise ValueError(f"a prompt needs at least one token, not {n}")
    rng = random.Random(seed)
    text = f"{seed}."
    tokens = tokenize(text)
    while len(tokens) < n:
        words = max(4, n - len(tokens))
        text += " " + " ".join(rng.choice(WORD_LIST) for _ in range(words))
        tokens = tokenize(text)
    return tokens[:n]


@dataclass
class Target:
    name: str
    command: list[str]
    ready_path: str
    port: int
    env: dict | None = None
    kind: str = "llmfleet"


@dataclass
class Result:
    target: str
    clients: int
    tokens: int
    seconds: float
    ttft: float
    rpc_bytes_per_token: float | None = None
    rpc_round_trips_per_token: float | None = None
    rpc_worker_ms_per_token: float | None = None  # time a worker held its turns, mean over the workers
    decode_rate: float | None = None  # tokens/s of one stream after its first token, mean over requests
    prompt_tokens: float | None = None  # mean prompt size the server reported
    ttft_max: float | None = None
    round: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, path: str, body: dict | None = None, timeout: float = 600.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass
class Stream:
    """What one streamed request gave: token counts as the server reported them, and timings."""

    tokens: int
    ttft: float
    last: float  # seconds from sending to the last text chunk
    prompt_tokens: int | None = None

    @property
    def decode_rate(self) -> float | None:
        span = self.last - self.ttft
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else None


def _stream_completion(port: int, prompt: str | list[int], max_tokens: int) -> Stream:
    """One streamed request."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    first = None
    last = 0.0
    chunks = 0
    usage = None
    prompt_n = None
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]["completion_tokens"]
                prompt_n = data["usage"].get("prompt_tokens")
            if data.get("choices") and data["choices"][0].get("text"):
                chunks += 1
                last = time.perf_counter() - started
                if first is None:
                    first = last
    finally:
        conn.close()
    return Stream(usage if usage is not None else chunks, first or 0.0, last, prompt_n)


def wait_ready(proc: subprocess.Popen, port: int, path: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            status, _ = _request(port, path, timeout=5)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def measure(
    target: Target,
    clients: int,
    requests_per_client: int,
    max_tokens: int,
    prompt: Callable[[int], str | list[int]] | None = None,
) -> Result:
    """``prompt(k)`` gives the k-th request's prompt (default: default_prompt)."""
    totals = [0] * clients
    streams: list[Stream] = []
    errors: list[str] = []
    prompt = prompt or default_prompt
    # Build every prompt before the clock starts: tokenizing is not the servers' time.
    prompts = {(i, r): prompt(i + r * clients) for i in range(clients) for r in range(requests_per_client)}

    def client(i: int) -> None:
        for r in range(requests_per_client):
            try:
                stream = _stream_completion(target.port, prompts[i, r], max_tokens)
            except (OSError, RuntimeError) as exc:
                errors.append(str(exc))
                return
            totals[i] += stream.tokens
            streams.append(stream)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{target.name}: {errors[0]}")
    rates = [s.decode_rate for s in streams if s.decode_rate is not None]
    reported = [s.prompt_tokens for s in streams if s.prompt_tokens is not None]
    return Result(
        target.name,
        clients,
        sum(totals),
        elapsed,
        sum(s.ttft for s in streams) / len(streams),
        decode_rate=sum(rates) / len(rates) if rates else None,
        prompt_tokens=sum(reported) / len(reported) if reported else None,
        ttft_max=max(s.ttft for s in streams),
    )


def start(target: Target, log_dir: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ, **(target.env or {}))
    with (log_dir / f"{target.name.replace(' ', '_').replace('/', '_')}.log").open("ab") as log:
        proc = subprocess.Popen(
            target.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    # Each server leads a process group of its own; a script that must kill a stuck run finds them here.
    with (log_dir / "pids").open("a") as pids:
        pids.write(f"{proc.pid}\n")
    return proc


def parse_cpu_sets(text: str | None, workers: int) -> list[str | None]:
    """``0-3:4-7`` -> one taskset CPU list per worker (colon-separated, as CPU lists hold commas); ValueError
    names a wrong count or a malformed list."""
    if not text:
        return [None] * workers
    sets = [s.strip() for s in text.split(":")]
    if len(sets) != workers or not all(sets):
        raise ValueError(f"--rpc-worker-cpus {text!r} needs {workers} non-empty CPU lists separated by ':'")
    for cpus in sets:
        try:
            cpu_numbers(cpus)
        except ValueError as exc:
            raise ValueError(f"--rpc-worker-cpus: {exc}") from None
    return sets


def cpu_numbers(cpus: str) -> set[int]:
    """A taskset CPU list, ``0-2,5``, as CPU numbers: {0, 1, 2, 5}. ValueError names a malformed list.

    The same syntax as module_utils/llmfleet_sysfs.parse_cpu_list, which this package cannot import (it is an
    Ansible module utility, not part of the inference wheel)."""
    numbers: set[int] = set()
    for part in cpus.split(","):
        first, _, last = part.strip().partition("-")
        try:
            start, stop = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"CPU list {cpus!r}: expected numbers and ranges such as 0-2,5") from None
        if stop < start:
            raise ValueError(
                f"CPU list {cpus!r} has the range {part.strip()!r} going down; expected low-high"
            )
        numbers.update(range(start, stop + 1))
    return numbers


def worker_command(port: int, threads: int, cpus: str | None, repack: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "inference", "worker", "--port", str(port), "--threads", str(threads)]
    if not repack:
        cmd.append("--no-repack")
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ensure_model(path: pathlib.Path | None, shape: str, quant: str) -> pathlib.Path:
    if path:
        return path
    path = CACHE / "models" / f"{shape}-{quant}.gguf"
    if not path.exists():
        from inference.synth import synth_model

        path.parent.mkdir(parents=True, exist_ok=True)
        synth_model(shape, quant, path, seed=0)
    return path


CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
# --rpc-splits variants that set the head's environment: the expert split's wire types (patch 0006; the
# plain split sends the hidden state as Q8_0 where that is exact and the partials as f32), and the blocking
# copy of a split's inputs to an RPC device that patch 0007 replaced, to measure both in one build
WIRE_VARIANTS = {
    "hidden-f32": {"LLAMA_EXPERT_SPLIT_HIDDEN_TYPE": "f32"},
    "partial-f16": {"LLAMA_EXPERT_SPLIT_PARTIAL_TYPE": "f16"},
    "partial-q8_0": {"LLAMA_EXPERT_SPLIT_PARTIAL_TYPE": "q8_0"},
    "sync-inputs": {"GGML_SCHED_RPC_SYNC_INPUTS": "1"},
}
SPLIT_VARIANTS = ("", "no-repack", *WIRE_VARIANTS)


def targets(args, model: pathlib.Path) -> list[tuple[str, Callable[[], Target]]]:
    py = sys.executable
    common = ["--threads", str(args.threads), "--ctx", str(args.ctx), "--parallel", str(args.parallel)]
    if args.flash_attn:
        common += ["--flash-attn", args.flash_attn]
    if args.gpu_layers is not None:
        common += ["--gpu-layers", str(args.gpu_layers)]
    out = []

    def ours(name: str, extra: list[str], env: dict | None = None, kind: str = "llmfleet") -> Target:
        port = free_port()
        cmd = [py, "-m", "inference", "serve", "--model", str(model), "--port", str(port), *common, *extra]
        return Target(name, cmd, "/health", port, env, kind)

    if not args.skip_local:
        out.append(("llmfleet", lambda: ours("llmfleet", [])))
    if args.llama_server:
        port = free_port()
        cmd = [args.llama_server, "-m", str(model), "--port", str(port), "-t", str(args.threads), "-tb"]
        cmd += [str(args.threads), "-c", str(args.ctx), "-np", str(args.parallel), "--no-webui"]
        if args.flash_attn:
            cmd += ["-fa", args.flash_attn]
        if args.gpu_layers is not None:
            cmd += ["-ngl", str(args.gpu_layers)]
        if args.kv_unified:
            cmd += ["-kvu"]
        out.append(
            (
                "llama-server",
                lambda c=cmd, p=port: Target("llama-server", c, "/health", p, kind="llama-server"),
            )
        )
    if not args.skip_llama_cpp_python:
        port = free_port()
        cmd = [py, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port)]
        cmd += [
            "--n_threads",
            str(args.threads),
            "--n_threads_batch",
            str(args.threads),
            "--n_ctx",
            str(args.ctx),
        ]
        out.append(
            (
                "llama_cpp.server",
                lambda c=cmd, p=port: Target("llama_cpp.server", c, "/v1/models", p, kind="llama_cpp.server"),
            )
        )
    head_env = CPU_ONLY if args.rpc_head_device == "cpu" else {}
    for split in args.rpc_splits:
        label = f"llmfleet rpc x{args.rpc_workers} {split}"
        mode, _, variant = split.partition("/")
        env = {**head_env, **WIRE_VARIANTS.get(variant, {})} or None
        out.append((label, lambda s=mode, n=label, e=env: ours(n, ["--split", s], e, "rpc")))
    return out


def main(argv: list[str] | None = None) -> int:
    """The ``bench`` command: a SIGTERM (e.g. from ``timeout``) unwinds through ``run``'s cleanup, which
    stops the servers and workers it started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return run(argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's arguments, checked; --rpc-splits becomes a list."""
    parser = argparse.ArgumentParser(prog="python -m inference bench", description=__doc__)
    parser.add_argument("--model", type=pathlib.Path, help="GGUF to serve (default: synthesize --shape)")
    parser.add_argument("--shape", default="bench")
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument("--llama-server", help="path of llama.cpp's llama-server binary")
    parser.add_argument("--skip-llama-cpp-python", action="store_true")
    parser.add_argument(
        "--skip-local", action="store_true", help="no run of this service without RPC workers"
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument(
        "--flash-attn", choices=["auto", "on", "off"], help="for every server (default: theirs)"
    )
    parser.add_argument("--gpu-layers", type=int, help="layers offloaded, for every server (default: theirs)")
    parser.add_argument(
        "--kv-unified",
        action="store_true",
        help="give llama-server one KV pool for all slots (-kvu), as this service always has",
    )
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        help="send prompts of exactly this many tokens, distinct for every request (default: short fixed prompts)",
    )
    parser.add_argument(
        "--rpc-splits",
        default="layer,tensor",
        help="comma list of serve --split modes, each optionally with /no-repack (workers started with "
        "--no-repack), /sync-inputs (the blocking input copies that patch 0007 replaced) or, for experts, "
        "/hidden-f32, /partial-f16 or /partial-q8_0 (the wire types of patch 0006), e.g. "
        "experts,experts/no-repack; empty for none",
    )
    parser.add_argument("--rpc-workers", type=int, default=2, help="loopback RPC workers for the rpc runs")
    parser.add_argument("--rpc-worker-threads", type=int, default=1)
    parser.add_argument(
        "--rpc-worker-cpus",
        help="pin each worker to CPUs with taskset: one CPU list per worker, separated by ':' (e.g. 0-3:4-7)",
    )
    parser.add_argument(
        "--rpc-worker-device",
        choices=["auto", "cpu"],
        default="auto",
        help="cpu: hide GPUs from the workers, so they serve the CPU as a small board would",
    )
    parser.add_argument(
        "--rpc-head-device", choices=["auto", "cpu"], default="auto", help="cpu: hide GPUs from the head"
    )
    parser.add_argument(
        "--no-relay",
        action="store_true",
        help="connect the head to the workers directly (no counts, no link)",
    )
    parser.add_argument(
        "--relay-cpus",
        choices=["bench", "worker"],
        default="bench",
        help="where each worker's relay process runs: bench, the CPUs this bench runs on (e.g. the head's "
        "under taskset), or worker, its worker's --rpc-worker-cpus, where it waits on the worker's spinning "
        "compute threads instead of the head's (slower with a CPU head in docs/benchmarks.md)",
    )
    parser.add_argument(
        "--link-delay-ms", type=float, default=0.0, help="one-way delay of each worker's link"
    )
    parser.add_argument("--link-rate-mbit", type=float, help="rate of each worker's link (e.g. 940 for a Pi)")
    parser.add_argument(
        "--link-after-load",
        action="store_true",
        help="load the model at loopback speed and apply the link's delay and rate only for the measurements",
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds a server may take to load"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every server this often; the median round is reported"
    )
    parser.add_argument(
        "--multi-turn",
        type=int,
        metavar="TURNS",
        help="instead: a chat of TURNS turns re-sent whole each turn, growing by --turn-tokens a turn; time to "
        "first token per turn of this service with and without prompt reuse and of llama-server, all running "
        "at once and taking turns, --rounds conversations",
    )
    parser.add_argument(
        "--turn-tokens", type=int, default=250, help="tokens a turn adds to the conversation (--multi-turn)"
    )
    parser.add_argument(
        "--json", type=pathlib.Path, help="also write the results here (rewritten after every run)"
    )
    args = parser.parse_args(argv)
    args.rpc_splits = [s for s in args.rpc_splits.split(",") if s]
    for split in args.rpc_splits:
        mode, _, variant = split.partition("/")
        if mode not in config_module.SPLIT_MODES or variant not in SPLIT_VARIANTS:
            parser.error(
                f"--rpc-splits {split!r}: give serve --split modes ({', '.join(config_module.SPLIT_MODES)}), each "
                f"optionally followed by one of /{', /'.join(v for v in SPLIT_VARIANTS if v)}"
            )
    try:
        parse_cpu_sets(args.rpc_worker_cpus, args.rpc_workers)
    except ValueError as exc:
        parser.error(str(exc))
    if args.relay_cpus == "worker" and not args.rpc_worker_cpus:
        parser.error("--relay-cpus worker runs each relay on its worker's CPUs: give --rpc-worker-cpus too")
    if args.prompt_tokens is not None and args.prompt_tokens < 1:
        parser.error(f"--prompt-tokens {args.prompt_tokens} must be at least 1")
    if (
        args.llama_server
        and not shutil.which(args.llama_server)
        and not os.access(args.llama_server, os.X_OK)
    ):
        parser.error(
            f"--llama-server {args.llama_server} is not an executable; build it with `make llama-server`"
        )
    return args


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    cpu_sets = parse_cpu_sets(args.rpc_worker_cpus, args.rpc_workers)
    model = ensure_model(args.model, args.shape, args.quant)
    if args.multi_turn:
        return multi_turn(args, model)
    prompt = None
    if args.prompt_tokens:
        from inference.tokenizer import Tokenizer

        tokenizer = Tokenizer(str(model))

        def prompt(k: int) -> list[int]:
            return prompt_of_tokens(
                lambda text: tokenizer.tokenize(text, add_special=False), args.prompt_tokens, next(seeds)
            )

        seeds = iter(range(1, 1 << 30))  # a fresh prompt for every request of the whole run
    log_dir = CACHE / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    args.link_round_trip_ms = None
    if args.rpc_splits and not args.no_relay:
        # what one round trip over the emulated link really takes here, relay included, against the model
        args.link_round_trip_ms = median_round_trip(args.link_delay_ms, args.link_rate_mbit) * 1000
        print(
            f"# link: a round trip through a relay takes {args.link_round_trip_ms:.3f} ms "
            f"(median of 200 pings; the link model alone: {2 * args.link_delay_ms:.3f} ms)",
            file=sys.stderr,
            flush=True,
        )
    # Rounds interleave the servers, so background load on a shared machine falls on each of them alike, and
    # every other round runs them in reverse order, so that no server always follows the same one.
    plan = []
    for index in range(args.rounds):
        order = targets(args, model)
        plan += [(index, *t) for t in (order if index % 2 == 0 else order[::-1])]
    for round_index, name, make_target in plan:
        workers: list[subprocess.Popen] = []
        relays: list[ProcessRelay] = []
        target = make_target()
        if target.kind == "rpc":
            endpoints = []
            worker_env = CPU_ONLY if args.rpc_worker_device == "cpu" else None
            for cpus in cpu_sets:
                port = free_port()
                worker_cmd = worker_command(
                    port, args.rpc_worker_threads, cpus, not name.endswith("/no-repack")
                )
                workers.append(start(Target(f"worker-{port}", worker_cmd, "", port, worker_env), log_dir))
                if args.no_relay:
                    endpoints.append(f"127.0.0.1:{port}")
                    continue
                delay, rate = (
                    (0.0, None) if args.link_after_load else (args.link_delay_ms, args.link_rate_mbit)
                )
                relay_cpus = cpu_numbers(cpus) if cpus and args.relay_cpus == "worker" else None
                relay = ProcessRelay(("127.0.0.1", port), delay, rate, relay_cpus).start()
                relays.append(relay)
                endpoints.append(relay.endpoint)
            time.sleep(2)
            target.command += ["--rpc", ",".join(endpoints)]
            if "tensor" in name and not args.flash_attn:
                target.command += ["--flash-attn", "on"]
        print(f"# {name}: {' '.join(target.command)}", file=sys.stderr, flush=True)
        proc = start(target, log_dir)
        try:
            loading = time.perf_counter()
            wait_ready(proc, target.port, target.ready_path, args.ready_timeout)
            print(f"  ready in {time.perf_counter() - loading:.1f} s", file=sys.stderr, flush=True)
            if args.link_after_load:
                for r in relays:
                    r.set_link(args.link_delay_ms, args.link_rate_mbit)
            # Warm up on a prompt of its own: a measured prompt seen before would start from the server's
            # prompt cache (llama-server keeps each slot's last prompt) and skip its prefill.
            measure(target, 1, 1, 8, lambda _k: WARM_UP_PROMPT)
            for c in clients:
                before = [r.stats.snapshot() for r in relays]
                result = measure(target, c, args.requests, args.max_tokens, prompt)
                result.round = round_index
                if relays and result.tokens:
                    after = [r.stats.snapshot() for r in relays]
                    moved = sum(
                        a["to_worker"] + a["to_head"] - b["to_worker"] - b["to_head"]
                        for a, b in zip(after, before, strict=True)
                    )
                    turns = sum(
                        a["round_trips"] - b["round_trips"] for a, b in zip(after, before, strict=True)
                    )
                    result.rpc_bytes_per_token = moved / result.tokens
                    result.rpc_round_trips_per_token = turns / result.tokens
                    held = [a["worker_s"] - b["worker_s"] for a, b in zip(after, before, strict=True)]
                    result.rpc_worker_ms_per_token = statistics.mean(held) * 1000 / result.tokens
                results.append(result)
                if args.json:
                    write_json(args.json, results)
                decode = f"{result.decode_rate:.2f}" if result.decode_rate else "?"
                print(
                    f"  {c} clients: {result.rate:.2f} tok/s, {decode} tok/s per stream, "
                    f"TTFT {result.ttft * 1000:.0f} ms",
                    file=sys.stderr,
                    flush=True,
                )
                if args.prompt_tokens and result.prompt_tokens not in (None, args.prompt_tokens):
                    print(
                        f"  warning: the server counted {result.prompt_tokens:.1f} prompt tokens, "
                        f"not {args.prompt_tokens}",
                        file=sys.stderr,
                    )
        except RuntimeError as exc:
            print(f"  failed: {exc}", file=sys.stderr)
        finally:
            stop(proc)
            for w in workers:
                stop(w)
            for r in relays:
                r.stop()
    print_table(results, clients, model, args)
    if args.json:
        write_json(args.json, results)
    return 0


def write_json(path: pathlib.Path, results: list[Result]) -> None:
    path.write_text(json.dumps([r.__dict__ | {"rate": r.rate} for r in results], indent=2))


def summarize(results: list[Result]) -> list[tuple[Result, float, float]]:
    """Per server and client count: the run with the median rate, and the lowest and highest rate seen."""
    groups: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.target, r.clients), []).append(r)
    out = []
    for runs in groups.values():
        ranked = sorted(runs, key=lambda r: r.rate)
        out.append((ranked[(len(ranked) - 1) // 2], ranked[0].rate, ranked[-1].rate))
    return out


def paired_ratios(
    results: list[Result], reference: str = "llama-server"
) -> dict[tuple[str, int], list[float]]:
    """Per server and client count: its rate over the reference's rate of the same round, round by round.
    Rounds are minutes apart at most, so this cancels the slow drift of a shared machine that the ratio of
    two medians keeps."""
    ref = {(r.round, r.clients): r.rate for r in results if r.target == reference and r.rate}
    out: dict[tuple[str, int], list[float]] = {}
    for r in results:
        if (r.round, r.clients) in ref:
            out.setdefault((r.target, r.clients), []).append(r.rate / ref[(r.round, r.clients)])
    return out


def print_table(results: list[Result], clients: list[int], model: pathlib.Path, args) -> None:
    rows = summarize(results)
    paired = paired_ratios(results)
    base = {r.clients: r.rate for r, _, _ in rows if r.target == "llama-server"}
    base_decode = {r.clients: r.decode_rate for r, _, _ in rows if r.target == "llama-server"}
    prompt = f"{args.prompt_tokens}-token prompts" if args.prompt_tokens else "short prompts"
    print(f"\nModel {model.name}, {args.threads} threads, ctx {args.ctx}, parallel {args.parallel}, ")
    print(
        f"{args.requests} requests per client of {args.max_tokens} tokens, {prompt}, temperature 0, ", end=""
    )
    print(f"median of {args.rounds} interleaved round(s)")
    if getattr(args, "link_round_trip_ms", None) is not None:
        print(
            f"Emulated link: {args.link_rate_mbit or 'unlimited'} Mbit/s, {args.link_delay_ms} ms each way; a round "
            f"trip through its relay measured {args.link_round_trip_ms:.3f} ms (the model alone: "
            f"{2 * args.link_delay_ms:.3f} ms)"
            + ("; each relay on its worker's CPUs" if args.relay_cpus == "worker" else "")
        )
    print()
    print(
        "| server | clients | tokens | seconds | tok/s | range | vs llama-server | per round vs llama-server "
        "| mean TTFT ms | RPC KiB/token | RPC round trips/token | RPC worker ms/token | decode tok/s per stream "
        "| decode vs llama-server | max TTFT ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r, low, high in rows:
        ratio = f"{r.rate / base[r.clients]:.2f}x" if base.get(r.clients) else "—"
        kib = f"{r.rpc_bytes_per_token / 1024:.1f}" if r.rpc_bytes_per_token is not None else "—"
        trips = f"{r.rpc_round_trips_per_token:.1f}" if r.rpc_round_trips_per_token is not None else "—"
        held = f"{r.rpc_worker_ms_per_token:.1f}" if r.rpc_worker_ms_per_token is not None else "—"
        decode = f"{r.decode_rate:.2f}" if r.decode_rate else "—"
        ref = base_decode.get(r.clients)
        decode_ratio = f"{r.decode_rate / ref:.2f}x" if ref and r.decode_rate else "—"
        worst = f"{r.ttft_max * 1000:.0f}" if r.ttft_max is not None else "—"
        each = sorted(paired.get((r.target, r.clients), []))
        per_round = (
            f"{statistics.median(each):.2f}x ({each[0]:.2f} to {each[-1]:.2f})"
            if len(each) > 1 and r.target != "llama-server"
            else "—"
        )
        print(
            f"| {r.target} | {r.clients} | {r.tokens} | {r.seconds:.1f} | {r.rate:.2f} | {low:.2f} to {high:.2f} "
            f"| {ratio} | {per_round} | {r.ttft * 1000:.0f} | {kib} | {trips} | {held} | {decode} | {decode_ratio} "
            f"| {worst} |"
        )


# --multi-turn: each turn adds a user message and the reply before it (fixed text, the same for every server, so
# that each computes the same prompts); the model's own replies are generated and thrown away.
MULTI_TURN_REPLY_TOKENS = 16


def conversation(
    tokenize: Callable[[str], list[int]], turns: int, turn_tokens: int, seed: int
) -> list[list[int]]:
    """The prompt of each turn as token ids: turn k re-sends turns 1..k-1 whole and adds ``turn_tokens``."""
    prompts, history = [], []
    for k in range(turns):
        history = history + prompt_of_tokens(tokenize, turn_tokens, seed * 1000 + k)
        prompts.append(history)
    return prompts


def multi_turn(args, model: pathlib.Path) -> int:
    """Time to first token per turn of --rounds conversations, every server started at once; in each turn the
    servers take their requests one after another, in an order that rotates, so that background load falls on
    all alike. Prints a Markdown table of the medians and of the per-conversation ratios."""
    from inference.tokenizer import Tokenizer

    tokenizer = Tokenizer(str(model))
    longest = args.multi_turn * args.turn_tokens + MULTI_TURN_REPLY_TOKENS
    if longest >= args.ctx // args.parallel:
        print(
            f"--multi-turn {args.multi_turn} x --turn-tokens {args.turn_tokens} needs {longest} tokens a "
            f"sequence; raise --ctx (now {args.ctx} / --parallel {args.parallel})",
            file=sys.stderr,
        )
        return 2
    args.rpc_splits = []
    args.skip_llama_cpp_python = True
    made = dict(targets(args, model))
    servers = [("reuse", made["llmfleet"]())]
    plain = made["llmfleet"]()
    plain.name, plain.command = "no reuse", [*plain.command, "--no-cache-prompt"]
    servers.append(("no reuse", plain))
    if "llama-server" in made:
        servers.append(("llama-server", made["llama-server"]()))
    log_dir = CACHE / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    ttft: dict[str, list[list[float]]] = {name: [] for name, _ in servers}
    try:
        for name, target in servers:
            print(f"# {name}: {' '.join(target.command)}", file=sys.stderr, flush=True)
            procs.append(start(target, log_dir))
        for proc, (_, target) in zip(procs, servers, strict=True):
            wait_ready(proc, target.port, target.ready_path, args.ready_timeout)
            measure(target, 1, 1, 8, lambda _k: WARM_UP_PROMPT)
        tokenize = lambda text: tokenizer.tokenize(text, add_special=False)  # noqa: E731
        for round_index in range(args.rounds):
            prompts = conversation(tokenize, args.multi_turn, args.turn_tokens, round_index + 1)
            for name, _ in servers:
                ttft[name].append([])
            for turn, prompt in enumerate(prompts):
                shift = (turn + round_index) % len(servers)
                for name, target in servers[shift:] + servers[:shift]:
                    stream = _stream_completion(target.port, prompt, MULTI_TURN_REPLY_TOKENS)
                    ttft[name][-1].append(stream.ttft)
                line = ", ".join(f"{name} {ttft[name][-1][-1] * 1000:.0f} ms" for name, _ in servers)
                print(
                    f"  conversation {round_index + 1} turn {turn + 1}: {line}", file=sys.stderr, flush=True
                )
    finally:
        for proc in procs:
            stop(proc)
    print_multi_turn(ttft, args, model)
    return 0


def print_multi_turn(ttft: dict[str, list[list[float]]], args, model: pathlib.Path) -> None:
    """Median TTFT per turn and server, and the medians of the per-conversation ratios of reuse to the rest."""
    names = list(ttft)
    others = [n for n in names if n != "reuse"]
    print(f"\nModel {model.name}, {args.threads} threads, ctx {args.ctx}, parallel {args.parallel}, ", end="")
    print(
        f"{args.multi_turn} turns of {args.turn_tokens} tokens each, {MULTI_TURN_REPLY_TOKENS}-token replies, "
        f"median of {args.rounds} conversation(s)\n"
    )
    heads = " | ".join(f"{n} TTFT ms" for n in names)
    ratios = " | ".join(f"reuse / {n}" for n in others)
    print(f"| turn | prompt tokens | {heads} | {ratios} |")
    print("|---:|---:|" + "---:|" * (len(names) + len(others)))
    for turn in range(args.multi_turn):
        cells = [f"{statistics.median(c[turn] for c in ttft[n]) * 1000:.0f}" for n in names]
        for n in others:
            each = sorted(r[turn] / o[turn] for r, o in zip(ttft["reuse"], ttft[n], strict=True) if o[turn])
            span = f" ({each[0]:.2f} to {each[-1]:.2f})" if len(each) > 1 else ""
            cells.append(f"{statistics.median(each):.2f}{span}" if each else "—")
        print(f"| {turn + 1} | {(turn + 1) * args.turn_tokens} | " + " | ".join(cells) + " |")
