"""Throughput benchmark: this service against llama.cpp's llama-server and llama-cpp-python's server.

Every server gets the same model, thread count and context; clients send completions at temperature 0 and
the aggregate rate counts the completion tokens each server reports. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from inference.netsim import Relay

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


@dataclass
class Target:
    name: str
    command: list[str]
    ready_path: str
    port: int
    env: dict | None = None


@dataclass
class Result:
    target: str
    clients: int
    tokens: int
    seconds: float
    ttft: float
    rpc_bytes_per_token: float | None = None
    rpc_round_trips_per_token: float | None = None

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


def _stream_completion(port: int, prompt: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first token) of one streamed request."""
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
    chunks = 0
    usage = None
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
            if data.get("choices") and data["choices"][0].get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - started
    finally:
        conn.close()
    return (usage if usage is not None else chunks), (first or 0.0)


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


def measure(target: Target, clients: int, requests_per_client: int, max_tokens: int) -> Result:
    totals = [0] * clients
    ttfts: list[float] = []
    errors: list[str] = []

    def client(i: int) -> None:
        for r in range(requests_per_client):
            try:
                n, ttft = _stream_completion(
                    target.port, PROMPTS[(i + r * clients) % len(PROMPTS)], max_tokens
                )
            except (OSError, RuntimeError) as exc:
                errors.append(str(exc))
                return
            totals[i] += n
            ttfts.append(ttft)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{target.name}: {errors[0]}")
    return Result(target.name, clients, sum(totals), elapsed, sum(ttfts) / len(ttfts))


def start(target: Target, log_dir: pathlib.Path) -> subprocess.Popen:
    log = (log_dir / f"{target.name.replace(' ', '_').replace('/', '_')}.log").open("wb")
    env = dict(os.environ, **(target.env or {}))
    return subprocess.Popen(
        target.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


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


def targets(args, model: pathlib.Path) -> list[tuple[Target, list[subprocess.Popen]]]:
    py = sys.executable
    common = ["--threads", str(args.threads), "--ctx", str(args.ctx), "--parallel", str(args.parallel)]
    out = []

    def ours(name: str, extra: list[str]) -> Target:
        port = free_port()
        cmd = [py, "-m", "inference", "serve", "--model", str(model), "--port", str(port), *common, *extra]
        return Target(name, cmd, "/health", port)

    out.append(("llmfleet", lambda: ours("llmfleet", [])))
    if args.llama_server:
        port = free_port()
        cmd = [args.llama_server, "-m", str(model), "--port", str(port), "-t", str(args.threads), "-tb"]
        cmd += [str(args.threads), "-c", str(args.ctx), "-np", str(args.parallel), "--no-webui"]
        out.append(("llama-server", lambda c=cmd, p=port: Target("llama-server", c, "/health", p)))
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
        out.append(("llama_cpp.server", lambda c=cmd, p=port: Target("llama_cpp.server", c, "/v1/models", p)))
    for split in args.rpc_splits:
        label = f"llmfleet rpc x{args.rpc_workers} {split}"
        out.append((label, lambda s=split, n=label: ours(n, ["--split", s])))
    return out


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference bench", description=__doc__)
    parser.add_argument("--model", type=pathlib.Path, help="GGUF to serve (default: synthesize --shape)")
    parser.add_argument("--shape", default="bench")
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument("--llama-server", help="path of llama.cpp's llama-server binary")
    parser.add_argument("--skip-llama-cpp-python", action="store_true")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rpc-splits", default="layer,tensor", help="comma list; empty for none")
    parser.add_argument("--rpc-workers", type=int, default=2, help="loopback RPC workers for the rpc runs")
    parser.add_argument("--rpc-worker-threads", type=int, default=1)
    parser.add_argument(
        "--link-delay-ms", type=float, default=0.0, help="one-way delay of each worker's link"
    )
    parser.add_argument("--link-rate-mbit", type=float, help="rate of each worker's link (e.g. 940 for a Pi)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every server this often; medians reported"
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.rpc_splits = [s for s in args.rpc_splits.split(",") if s]
    clients = [int(c) for c in args.clients.split(",")]
    if (
        args.llama_server
        and not shutil.which(args.llama_server)
        and not os.access(args.llama_server, os.X_OK)
    ):
        parser.error(
            f"--llama-server {args.llama_server} is not an executable; build it with `make llama-server`"
        )
    model = ensure_model(args.model, args.shape, args.quant)
    log_dir = CACHE / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    # Rounds interleave the servers, so background load on a shared machine falls on each of them alike.
    plan = [t for _ in range(args.rounds) for t in targets(args, model)]
    for name, make_target in plan:
        workers: list[subprocess.Popen] = []
        relays: list[Relay] = []
        target = make_target()
        if "rpc" in name:
            endpoints = []
            for _ in range(args.rpc_workers):
                port = free_port()
                worker_cmd = [sys.executable, "-m", "inference", "worker", "--port", str(port)]
                worker_cmd += ["--threads", str(args.rpc_worker_threads)]
                workers.append(start(Target(f"worker-{port}", worker_cmd, "", port), log_dir))
                relay = Relay(("127.0.0.1", port), args.link_delay_ms, args.link_rate_mbit).start()
                relays.append(relay)
                endpoints.append(relay.endpoint)
            time.sleep(2)
            target.command += ["--rpc", ",".join(endpoints)]
            if "tensor" in name:
                target.command += ["--flash-attn", "on"]
        print(f"# {name}: {' '.join(target.command)}", file=sys.stderr, flush=True)
        proc = start(target, log_dir)
        try:
            wait_ready(proc, target.port, target.ready_path)
            measure(target, 1, 1, 8)  # warm-up
            for c in clients:
                before = [r.stats.snapshot() for r in relays]
                result = measure(target, c, args.requests, args.max_tokens)
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
                results.append(result)
                print(
                    f"  {c} clients: {result.rate:.2f} tok/s, TTFT {result.ttft * 1000:.0f} ms",
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
        args.json.write_text(json.dumps([r.__dict__ | {"rate": r.rate} for r in results], indent=2))
    return 0


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


def print_table(results: list[Result], clients: list[int], model: pathlib.Path, args) -> None:
    rows = summarize(results)
    base = {r.clients: r.rate for r, _, _ in rows if r.target == "llama-server"}
    print(f"\nModel {model.name}, {args.threads} threads, ctx {args.ctx}, parallel {args.parallel}, ")
    print(f"{args.requests} requests per client of {args.max_tokens} tokens, temperature 0, ", end="")
    print(f"median of {args.rounds} interleaved round(s)\n")
    print(
        "| server | clients | tok/s (median) | range | vs llama-server | mean TTFT ms "
        "| RPC KiB/token | RPC round trips/token |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r, low, high in rows:
        ratio = f"{r.rate / base[r.clients]:.2f}x" if base.get(r.clients) else "—"
        kib = f"{r.rpc_bytes_per_token / 1024:.1f}" if r.rpc_bytes_per_token is not None else "—"
        trips = f"{r.rpc_round_trips_per_token:.1f}" if r.rpc_round_trips_per_token is not None else "—"
        print(
            f"| {r.target} | {r.clients} | {r.rate:.2f} | {low:.2f} to {high:.2f} | {ratio} "
            f"| {r.ttft * 1000:.0f} | {kib} | {trips} |"
        )
