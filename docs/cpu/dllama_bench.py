"""distributed-llama on the emulated Pi cluster of docs/cpu/pi-emulation-bench.sh: one root and its workers,
each pinned to one Pi's cores, every link through a relay (inference/netsim.py). Prints a Markdown table.

    taskset -c 12-15 python3 docs/cpu/dllama_bench.py --dllama /tmp/w/distributed-llama/dllama \\
        --model /tmp/w/dllama/qwen3-30b-a3b.m --tokenizer /tmp/w/dllama/qwen3-30b-a3b.t \\
        --cpus 0-2:3-5:6-8:9-11 --threads 3 --tokens 64 > dllama.md 2> dllama.err

Layout
    ``--cpus`` gives one CPU list per node, the root's first: four lists make distributed-llama's "4 x
    Raspberry Pi" cluster, a root and three workers (its node count must divide the model's KV heads, 4 for
    Qwen3-30B-A3B, and the root computes a slice like every worker). Each worker listens on a loopback port
    behind a ``ProcessRelay`` modelling a Pi's link (940 Mbit/s, 0.15 ms one way, the rate a chunk leaves at
    and its delay, per TCP connection and direction). The root reaches every worker through the worker's
    relay, and so do the workers among themselves: the root hands each worker the same addresses it was
    given, and a worker connects to the workers listed after it and accepts the others. Every link of the
    full mesh thus crosses one relay, and each relay counts the traffic of all links into its worker. The
    links into one worker share that relay's process (one interpreter lock for up to three links, where the
    llama.cpp benchmark has one link a relay process), which may add to the sync time; ``--no-relay``
    measures without relays. The relays (and this script) run on this process's CPUs: run it under
    ``taskset`` on the head's cores. With ``--link-after-load`` (the default) the relays pass the weights at
    loopback speed and take on the link model once the root prints ``Weights loaded`` (the root is stopped
    with SIGSTOP meanwhile, so its first forward pass already sees the link).

Measurement
    ``dllama inference`` with a short prompt (one token per character with docs/cpu/dllama_synth.py's
    tokenizer, plus the bos), ``--steps`` set so that it generates ``--tokens`` tokens, greedy
    (``--temperature 0``, as the llama.cpp benchmark's requests), ``--buffer-float-type q80`` (the only sync
    type distributed-llama takes with Q40 weights). The root prints a line per generated token,
    ``🔶 Pred <ms> Sync <ms> | Sent <kB> Recv <kB> | <text>``: Pred is the time its executor spent in the
    token's operations, Sync the time spent exchanging slices with the other nodes (both whole
    milliseconds), Sent and Recv the root's own traffic for that token (whole KiB, though labelled kB). At
    the end it prints the prediction rate, tokens over the sum of Pred + Sync (its ``tokens/s``). This
    script also times the lines as they arrive: the wall-clock rate counts the tokens after the first over
    the time from the first token's line to the last's, like the llama.cpp benchmark's decode rate per
    stream (sampling and the control packet included). The link figures are relay totals between those two
    lines over the tokens between them: bytes both ways summed over all relays, round trips (a relay counts
    one each time its direction turns from the worker towards the root, the links into one worker
    interleaved) summed, and the time a worker held its turns, the mean over the relays.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from inference.netsim import ProcessRelay, median_round_trip  # noqa: E402  (this checkout's)

PRED = re.compile(r"Pred\s*(\d+) ms Sync\s*(\d+) ms \| Sent\s*(\d+) kB Recv\s*(\d+) kB")
RATE = re.compile(r"tokens/s:\s*([\d.]+|inf|nan) \(([\d.]+|inf|nan) ms/tok\)")
# 20 tokens with the bos, about as many as inference.bench's short prompts take with the synthetic GGUF's
# tokenizer (19 to 21 for the first three).
DEFAULT_PROMPT = "Write a short story"


class Stopped(Exception):
    """SIGTERM (e.g. from timeout(1)): unwind so that the processes are stopped."""


def _on_sigterm(_signum, _frame):
    raise Stopped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether a socket listens on ``port`` (from /proc, without connecting: a dllama worker takes the first
    connection it accepts for the root's)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    return True
    return False


def start(cmd: list[str], log_path: str, pipe: bool = False) -> subprocess.Popen:
    """``cmd`` in a process group of its own, its output to ``log_path`` (or to a pipe if ``pipe``)."""
    log = None if pipe else open(log_path, "wb")  # noqa: SIM115 (kept open for the process's life)
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE if pipe else log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def pinned(cpus: str, cmd: list[str], line_buffered: bool = False) -> list[str]:
    prefix = ["taskset", "-c", cpus]
    if line_buffered and shutil.which("stdbuf"):
        prefix += ["stdbuf", "-oL"]
    return prefix + cmd


def read_lines(stream, lines: queue.Queue, log_path: str) -> None:
    """Each line of the root's stdout with the time it arrived; copied to its log; None at the end."""
    with open(log_path, "wb") as log:
        for raw in iter(stream.readline, b""):
            lines.put((time.monotonic(), raw.decode("utf-8", "replace")))
            log.write(raw)
            log.flush()
    lines.put(None)


def run_once(args, relays: list[ProcessRelay], endpoints: list[str], index: int) -> dict:
    """One ``dllama inference``; returns its measurements."""
    root_cpus = args.cpus.split(":")[0]
    cmd = [
        args.dllama,
        "inference",
        "--model",
        args.model,
        "--tokenizer",
        args.tokenizer,
        "--buffer-float-type",
        args.buffer_float_type,
        "--nthreads",
        str(args.threads),
        "--max-seq-len",
        str(args.max_seq_len),
        "--prompt",
        args.prompt,
        "--steps",
        str(len(args.prompt) + args.tokens),
        "--temperature",
        "0",
        "--seed",
        "1",
    ]
    if endpoints:
        cmd += ["--workers", *endpoints]  # last: the list runs to the next option
    log_path = os.path.join(args.log_dir, f"root-{index}.log")
    print(f"# root on cores {root_cpus}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    for r in relays:
        r.set_link(*((0.0, None) if args.link_after_load else (args.link_delay_ms, args.link_rate_mbit)))
    started = time.monotonic()
    root = start(pinned(root_cpus, cmd, line_buffered=True), log_path, pipe=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(root.stdout, lines, log_path), daemon=True)
    reader.start()
    result: dict = {"run": index, "tokens": 0}
    preds: list[tuple[float, int, int, int, int]] = []
    snapshots: list[list[dict]] = []
    rates: list[tuple[float, float]] = []
    deadline = started + args.timeout
    try:
        while True:
            try:
                item = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"the root did not finish within {args.timeout} s") from None
            if item is None:
                break
            now, line = item
            if "Weights loaded" in line:
                result["load_s"] = now - started
                print(f"  weights loaded in {now - started:.1f} s", file=sys.stderr, flush=True)
                if args.link_after_load and relays:
                    os.kill(root.pid, signal.SIGSTOP)
                    try:
                        for r in relays:
                            r.set_link(args.link_delay_ms, args.link_rate_mbit)
                        time.sleep(0.3)  # a relay process applies a new link within 50 ms
                    finally:
                        os.kill(root.pid, signal.SIGCONT)
            elif m := PRED.search(line):
                preds.append((now, *map(int, m.groups())))
                snapshots.append([r.stats.snapshot() for r in relays])
            elif m := RATE.search(line):
                rates.append((float(m.group(1)), float(m.group(2))))
            elif "Critical error" in line:
                print(f"  {line.strip()}", file=sys.stderr, flush=True)
        root.wait(30)
    finally:
        stop(root)
    result["exit"] = root.returncode
    result["tokens"] = len(preds)
    if len(rates) == 2:  # Evaluation, then Prediction
        result["prompt_rate"], result["dllama_rate"] = rates[0][0], rates[1][0]
    n = len(preds) - 1
    if n >= 1:
        wall = preds[-1][0] - preds[0][0]
        result["wall_rate"] = n / wall if wall > 0 else None
        result["pred_ms"] = float(statistics.mean(p[1] for p in preds[1:]))
        result["sync_ms"] = float(statistics.mean(p[2] for p in preds[1:]))
        result["root_kib"] = float(statistics.mean(p[3] + p[4] for p in preds[1:]))  # its "kB" are KiB
        if relays:
            first, last = snapshots[0], snapshots[-1]
            moved = sum(
                b["to_worker"] + b["to_head"] - a["to_worker"] - a["to_head"]
                for a, b in zip(first, last, strict=True)
            )
            turns = sum(b["round_trips"] - a["round_trips"] for a, b in zip(first, last, strict=True))
            held = statistics.mean(b["worker_s"] - a["worker_s"] for a, b in zip(first, last, strict=True))
            result["link_kib"] = moved / 1024 / n
            result["round_trips"] = turns / n
            result["worker_ms"] = held * 1000 / n
    print(
        f"  run {index}: {result['tokens']} tokens, exit {result['exit']}, "
        + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)),
        file=sys.stderr,
        flush=True,
    )
    return result


def fmt(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def print_table(args, results: list[dict], round_trip_ms: float | None) -> None:
    nodes = len(args.cpus.split(":"))
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    of_nodes = f"{nodes} node{'s' if nodes > 1 else ''} of {threads}"
    name = f"distributed-llama, root + {nodes - 1} workers" if nodes > 1 else "distributed-llama, one node"
    print(
        f"distributed-llama `dllama inference`, {os.path.basename(args.model)}, {of_nodes} "
        f"(cores {args.cpus.replace(':', ' / ')}), --buffer-float-type {args.buffer_float_type}, "
        f"{len(args.prompt) + 1}-token prompt, {args.tokens} tokens, temperature 0"
        + (
            f", links {args.link_rate_mbit:g} Mbit/s and {args.link_delay_ms:g} ms one way"
            + (f" (a relay round trip: {round_trip_ms:.3f} ms)" if round_trip_ms else "")
            if nodes > 1 and not args.no_relay
            else ""
        )
        + ".\n"
    )
    print(
        "| server | run | decode tok/s (wall) | dllama tok/s (Pred+Sync) | Pred ms / token | Sync ms / token "
        "| prompt tok/s | link KiB / token | link round trips / token | worker-held ms / token "
        "| root KiB / token | load s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {name} | {r['run']} | {fmt(r.get('wall_rate'))} | {fmt(r.get('dllama_rate'))} "
            f"| {fmt(r.get('pred_ms'), 1)} | {fmt(r.get('sync_ms'), 1)} | {fmt(r.get('prompt_rate'))} "
            f"| {fmt(r.get('link_kib'), 0)} | {fmt(r.get('round_trips'), 1)} | {fmt(r.get('worker_ms'), 1)} "
            f"| {fmt(r.get('root_kib'), 0)} | {fmt(r.get('load_s'), 1)} |"
        )
    print(
        "\nWall: tokens after the first over the time between the first and the last token's line. Pred, "
        "Sync: distributed-llama's own per-token times (whole ms), means over the same tokens. Link: all "
        "relays together (every link of the full mesh), per token; a relay's round trips interleave the "
        "links into its worker. Root: the root's own Sent + Recv."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dllama", required=True, help="the dllama binary")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--cpus", default="0-2:3-5:6-8:9-11", help="CPU list per node, root first, ':'")
    parser.add_argument("--threads", type=int, default=3, help="--nthreads of every node")
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="printable ASCII (one token a character)")
    parser.add_argument("--runs", type=int, default=1, help="inference runs, weights reloaded for each")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--buffer-float-type", default="q80")
    parser.add_argument("--link-rate-mbit", type=float, default=940.0)
    parser.add_argument("--link-delay-ms", type=float, default=0.15)
    parser.add_argument("--link-after-load", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--no-relay", action="store_true", help="workers on plain loopback")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for one run, loading included")
    parser.add_argument("--log-dir", default="dllama-logs")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not args.prompt.isascii() or not args.prompt.isprintable():
        parser.error("--prompt must be printable ASCII")
    os.makedirs(args.log_dir, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)

    workers: list[subprocess.Popen] = []
    relays: list[ProcessRelay] = []
    results: list[dict] = []
    round_trip_ms = None
    try:
        worker_cpus = args.cpus.split(":")[1:]
        if worker_cpus and not args.no_relay:
            round_trip_ms = median_round_trip(args.link_delay_ms, args.link_rate_mbit) * 1000
            print(
                f"# link: a round trip through a relay takes {round_trip_ms:.3f} ms (median of 200 pings; "
                f"the link model alone: {2 * args.link_delay_ms:.3f} ms)",
                file=sys.stderr,
                flush=True,
            )
        endpoints = []
        for i, cpus in enumerate(worker_cpus, start=1):
            port = free_port()
            cmd = [args.dllama, "worker", "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--nthreads", str(args.threads)]
            print(f"# worker {i} on cores {cpus}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            workers.append(start(pinned(cpus, cmd, line_buffered=True), f"{args.log_dir}/worker-{i}.log"))
            deadline = time.monotonic() + 30
            while not listening(port):
                if workers[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {i} did not listen on port {port}")
                time.sleep(0.05)
            if args.no_relay:
                endpoints.append(f"127.0.0.1:{port}")
            else:
                relays.append(ProcessRelay(("127.0.0.1", port)).start())
                endpoints.append(relays[-1].endpoint)
        for index in range(args.runs):
            results.append(run_once(args, relays, endpoints, index))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2)
    except (RuntimeError, Stopped) as exc:
        print(f"  failed: {str(exc) or 'stopped'}", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        for w in workers:
            stop(w)
        for r in relays:
            r.stop()
    if results:
        print_table(args, results, round_trip_ms)
    return 0 if results and all(r["tokens"] == args.tokens for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
