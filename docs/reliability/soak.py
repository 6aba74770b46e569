"""A bounded soak of the head: many clients, a mix of requests, one RPC worker killed and restarted midway.

Starts two RPC workers and a head on loopback (real processes), runs ``--clients`` concurrent clients for
``--minutes``, kills one worker with SIGKILL at ``--kill-at`` minutes, starts it again on the same port 5 s
later, and prints two markdown tables. Exits 0 only when no request hung, none was lost and none got an
answer it should not have.

    .venv/bin/python docs/reliability/soak.py [--model PATH] [--clients 64] [--minutes 10] [--kill-at 5] \
        [--seed 0] [--json soak.json]

The head runs as ``serve --model M --rpc w1,w2 --ctx 8192 --parallel 4 --queue-size 64 --rpc-timeout 10
--worker-probe-interval 2``; the model is the synthetic ``tiny`` shape at q8_0 unless ``--model`` names one.
Logs of the head and workers go to ``~/.cache/llmfleet/soak-logs/<time>/``. ``--json PATH`` writes every
request, the RSS samples, the /health transitions and the summary.

Each client loops until the deadline, drawing every request from a seeded generator (client i uses
``Random(f"{seed}/{i}")``, so a run sends the same requests in the same order per client; only their
interleaving varies). Kinds, with their share of draws:

- ``{chat|completions} {stream|plain} {short|long}`` (10 % each): ``/v1/chat/completions`` or
  ``/v1/completions``, streamed (SSE) or not, short (``max_tokens`` 8) or long (``max_tokens`` 200,
  ``"ignore_eos": true``, so exactly 200 tokens and ``finish_reason`` ``length``).
- ``{chat|completions} stream cancel`` (5 % each): a long streamed request whose client closes the connection
  after 2 to 6 data events.
- ``bad json``, ``bad field``, ``bad max_tokens 0`` (10 % together): a body that is not JSON, a body with an
  unknown field, ``max_tokens: 0``; each must be a 4xx with an OpenAI error body.

Every request has ``--request-timeout`` seconds (default 120) from connecting to the end of the reply; each
socket read waits at most what is left of it. A client that got a 503 waits 0.5 to 1.5 s before its next
request, as a client honouring ``Retry-After`` would (the head says 5 s).

Outcomes (columns of the first table, one row per kind):

- **ok**: a 200 with a complete body (``choices[0]`` with text and a ``finish_reason``, ``usage``), or a stream
  that ended (after ``data: [DONE]`` or a chunk with a ``finish_reason``), for a well-formed request.
- **error**: an expected, clear error: a 4xx with an OpenAI error body for a bad request; a 503 with an error
  body or an SSE ``error`` event for a good one, while the worker was down (from the kill until /health said
  ok again, plus 2 s) or, at any time, with code ``queue_full``.
- **cancelled**: we closed the stream ourselves.
- **HUNG**: no end of the reply within the timeout.
- **LOST**: connection refused or reset, an empty reply, malformed JSON or SSE, an error status without an
  error body, a stream that ended with neither ``[DONE]``, a ``finish_reason`` nor an error event.
- **unexpected**: a clear answer that is wrong: a 200 for a bad request, a 4xx or 500 for a good one, a 503
  or an SSE error outside the outage, a long ``ignore_eos`` reply that is not 200 tokens.
- **ok p50 / p99 ms**: latency of the ok requests, from connecting to the end of the reply.

Second table (measure, value):

- **result**: PASS when HUNG, LOST and unexpected are all 0 (the exit status is 0 then, 1 otherwise).
- **requests per second**: all requests over the run, the last requests' tail included.
- **kill → first 503 or SSE error**: from the SIGKILL to the end of the first request that got one.
- **restart → first ok**: from the restarted worker's first answer to an RPC hello to the end of the first ok
  request sent after it (and the same from the kill).
- **/health after the kill**: its status changes, seconds from the kill (polled twice a second).
- **head RSS**: the ``serve`` process and its children (the engine, started afresh after the kill, and
  multiprocessing's helper), sampled every ``--rss-interval`` s, at minute 2 (a quarter into runs shorter
  than 8 minutes) and at the end, and the growth (target below 5 %). **front RSS**: the ``serve`` process
  alone, whose memory outlives engine restarts.
- **slots after the run**: /health's active and waiting sequences once every client is done (0 and 0,
  or a cancelled or failed request kept its sequence).
- **llmfleet_engine_restarts_total**: from /metrics at the end (1 for the one kill).
- **head log**: its ERROR lines, and Python tracebacks and fatal-error dumps (the engine aborts inside ggml
  when a worker's connection breaks, once per loss).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import psutil

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from inference import bench  # noqa: E402  (this checkout's, also when the package is not installed)
from inference.worker import rpc_hello  # noqa: E402

HEAD_OPTIONS = [
    *("--ctx", "8192", "--parallel", "4", "--queue-size", "64"),
    *("--rpc-timeout", "10", "--worker-probe-interval", "2"),
]
SHORT, LONG = 8, 200
OUTCOMES = ["ok", "error", "cancelled", "HUNG", "LOST", "unexpected"]
OUTAGE_GRACE = 2.0  # seconds after /health says ok again during which a 503 still counts as the outage's
BACKOFF = (0.5, 1.5)  # seconds a client waits after a 503

GOOD_KINDS = [
    f"{endpoint} {mode} {length}"
    for endpoint in ("chat", "completions")
    for mode in ("stream", "plain")
    for length in ("short", "long")
]
CANCEL_KINDS = ["chat stream cancel", "completions stream cancel"]
BAD_KINDS = ["bad json", "bad field", "bad max_tokens 0"]
KINDS = GOOD_KINDS + CANCEL_KINDS + BAD_KINDS
WEIGHTS = [10.0] * len(GOOD_KINDS) + [5.0] * len(CANCEL_KINDS) + [10.0 / len(BAD_KINDS)] * len(BAD_KINDS)
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class Record:
    """One request: what was sent and what came back. Times are seconds from the clients' start."""

    client: int
    seq: int
    kind: str
    start: float
    end: float = 0.0
    status: int | None = None
    # complete | error_body | sse_error | cancelled | timeout | lost | wrong
    reply: str = ""
    code: str | None = None  # the error body's code
    detail: str = ""
    events: int = 0  # SSE data events, or 1 for a plain body
    outcome: str = ""

    @property
    def latency(self) -> float:
        return self.end - self.start


class Hung(Exception):
    pass


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Hung
    return left


def _error_body(raw: bytes) -> dict | None:
    """The ``error`` object of an OpenAI error body, or None if ``raw`` is not one."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and error["message"]
        and {"type", "param", "code"} <= error.keys()
    ):
        return error
    return None


def _check_choice(body: dict, chat: bool) -> str:
    """What is wrong with a complete (non-streamed) reply, or ""."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "no choices"
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    if not isinstance(text, str):
        return "no text in choices[0]"
    if choice.get("finish_reason") not in ("stop", "length"):
        return f"finish_reason {choice.get('finish_reason')!r}"
    usage = body.get("usage")
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        return "no usage"
    return ""


def exchange(port: int, path: str, payload: bytes, record: Record, timeout: float, cancel_after: int | None):
    """Sends one request and fills in ``record``'s reply fields; every read waits at most what is left of
    ``timeout``."""
    deadline = time.monotonic() + timeout
    chat, long = record.kind.startswith("chat"), " long" in record.kind or "cancel" in record.kind
    stream = " stream " in record.kind
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    sock = resp = None
    try:
        conn.connect()
        sock = conn.sock  # kept: getresponse() drops conn.sock when the reply closes the connection
        conn.request("POST", path, payload, {"Content-Type": "application/json"})
        sock.settimeout(_left(deadline))
        resp = conn.getresponse()
        record.status = resp.status
        event_stream = resp.getheader("Content-Type", "").startswith("text/event-stream")
        if stream and resp.status == 200 and event_stream:
            _read_stream(resp, sock, deadline, record, long, cancel_after)
            return
        raw = b""
        while True:
            sock.settimeout(_left(deadline))
            piece = resp.read1(1 << 16)
            if not piece:
                break
            raw += piece
        record.events = 1
        if resp.status == 200:
            try:
                body = json.loads(raw)
            except ValueError:
                record.reply, record.detail = "lost", f"200 with a body that is not JSON: {raw[:120]!r}"
                return
            if not isinstance(body, dict):
                record.reply, record.detail = "lost", f"200 with {raw[:120]!r}"
                return
            problem = "a stream" if stream else _check_choice(body, chat)
            if problem:
                record.reply, record.detail = "lost", f"200 with {problem}: {raw[:160]!r}"
                return
            if long and not stream and "cancel" not in record.kind:
                tokens = body["usage"]["completion_tokens"]
                reason = body["choices"][0]["finish_reason"]
                if tokens != LONG or reason != "length":
                    record.reply = "wrong"
                    record.detail = f"ignore_eos reply of {tokens} tokens, finish_reason {reason!r}"
                    return
            record.reply = "complete"
            return
        error = _error_body(raw)
        if error is None:
            record.reply, record.detail = "lost", f"{resp.status} without an error body: {raw[:160]!r}"
            return
        record.reply, record.code, record.detail = "error_body", error.get("code"), error["message"][:200]
    except (Hung, TimeoutError):
        record.reply, record.detail = "timeout", f"no end within {timeout:g} s"
    except (OSError, http.client.HTTPException) as exc:
        record.reply, record.detail = "lost", f"{type(exc).__name__}: {exc}"[:200]
    finally:
        record.end = time.monotonic()
        # All three: a reply that closes the connection leaves the socket to the response alone.
        if resp is not None:
            resp.close()
        conn.close()
        if sock is not None:
            sock.close()


def _read_stream(resp, sock, deadline: float, record: Record, long: bool, cancel_after: int | None) -> None:
    done = finished = False
    reason = None
    error = None
    usage = None
    while True:
        sock.settimeout(_left(deadline))
        line = resp.readline(1 << 20)
        if not line:
            break
        line = line.strip()
        if not line or line.startswith(b":"):
            continue
        if not line.startswith(b"data:"):
            record.reply, record.detail = "lost", f"not an SSE data line: {line[:120]!r}"
            return
        data = line[5:].strip()
        if done:
            record.reply, record.detail = "lost", f"an event after [DONE]: {data[:120]!r}"
            return
        if data == b"[DONE]":
            done = True
            continue
        try:
            event = json.loads(data)
        except ValueError:
            record.reply, record.detail = "lost", f"an event that is not JSON: {data[:120]!r}"
            return
        if not isinstance(event, dict):
            record.reply, record.detail = "lost", f"an event that is not an object: {data[:120]!r}"
            return
        if "error" in event:
            error = _error_body(data)
            if error is None:
                record.reply, record.detail = "lost", f"a malformed error event: {data[:160]!r}"
                return
            continue
        record.events += 1
        choices = event.get("choices")
        if choices and isinstance(choices[0], dict) and choices[0].get("finish_reason"):
            finished, reason = True, choices[0]["finish_reason"]
        if event.get("usage"):
            usage = event["usage"]
        if cancel_after is not None and record.events >= cancel_after and not finished:
            record.reply, record.detail = "cancelled", f"closed after {record.events} events"
            return
    if error is not None:
        record.reply, record.code, record.detail = "sse_error", error.get("code"), error["message"][:200]
        if done or finished:
            record.reply, record.detail = "lost", f"an error event in a finished stream: {error['message']}"
        return
    if not (done or finished):
        record.reply = "lost"
        record.detail = (
            f"the stream ended after {record.events} events without [DONE], finish_reason or error"
        )
        return
    if long and cancel_after is None:
        tokens = usage.get("completion_tokens") if usage else None
        if reason != "length" or tokens not in (None, LONG):
            record.reply = "wrong"
            record.detail = f"ignore_eos stream of {tokens} tokens, finish_reason {reason!r}"
            return
    record.reply = "complete"
    if not done:
        record.detail = "no [DONE]"


def make_request(rng: random.Random, kind: str, model: str) -> tuple[str, bytes, int | None]:
    """(path, body, events after which the client closes the stream) for one request of ``kind``."""
    words = rng.choice(bench.PROMPTS)
    prompt = f"{rng.randrange(10**6)}. {words}"
    if kind.startswith("bad"):
        path = PATHS[rng.choice(["chat", "completions"])]
        body: dict = {"model": model, "max_tokens": SHORT}
        if path == PATHS["chat"]:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if kind == "bad json":
            text = json.dumps(body)
            return path, text[: rng.randrange(1, len(text) - 1)].encode(), None
        if kind == "bad field":
            body["frobnicate"] = True
        else:
            body["max_tokens"] = 0
        return path, json.dumps(body).encode(), None
    endpoint = kind.split()[0]
    stream = " stream " in kind
    long = kind.endswith("long") or kind.endswith("cancel")
    body = {
        "model": model,
        "max_tokens": LONG if long else SHORT,
        "temperature": round(rng.uniform(0, 1), 2),
        "seed": rng.randrange(1 << 32),
    }
    if long:
        body["ignore_eos"] = True
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    cancel_after = rng.randint(2, 6) if kind.endswith("cancel") else None
    return PATHS[endpoint], json.dumps(body).encode(), cancel_after


class Cluster:
    """Two RPC workers and a head; every process it starts is in ``self.procs`` until stopped."""

    def __init__(self, log_dir: pathlib.Path, worker_threads: int):
        self.log_dir, self.worker_threads = log_dir, worker_threads
        self.procs: list[subprocess.Popen] = []
        self.head_command: list[str] = []

    def start(self, model: pathlib.Path, head_threads: int) -> None:
        self.worker_ports = [bench.free_port(), bench.free_port()]
        self.workers = [self._worker(port) for port in self.worker_ports]
        self.port = bench.free_port()
        rpc = ",".join(f"127.0.0.1:{p}" for p in self.worker_ports)
        command = [sys.executable, "-m", "inference", "serve", "--model", str(model), "--rpc", rpc]
        command += ["--port", str(self.port), *HEAD_OPTIONS]
        if head_threads:
            command += ["--threads", str(head_threads)]
        self.head_command = command
        self.head = self._start(bench.Target("head", command, "/health", self.port))
        bench.wait_ready(self.head, self.port, "/health", timeout=300)
        self.model_id = json.loads(bench._request(self.port, "/v1/models", timeout=10)[1])["data"][0]["id"]

    def _start(self, target: bench.Target) -> subprocess.Popen:
        proc = bench.start(target, self.log_dir)
        self.procs.append(proc)
        return proc

    def _worker(self, port: int) -> subprocess.Popen:
        command = bench.worker_command(port, self.worker_threads, None)
        proc = self._start(bench.Target(f"worker-{port}", command, "", port))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker on {port} exited with {proc.returncode}")
            try:
                rpc_hello("127.0.0.1", port, timeout=1)
                return proc
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"worker on {port} did not start")

    def kill_worker(self, index: int) -> None:
        victim = self.workers[index]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()

    def restart_worker(self, index: int) -> None:
        self.workers[index] = self._worker(self.worker_ports[index])

    def rss(self) -> tuple[int, int, int]:
        """(front RSS, front and children RSS, process count) in bytes."""
        front = psutil.Process(self.head.pid)
        procs = [front, *front.children(recursive=True)]
        sizes = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                sizes.append(proc.memory_info().rss)
        return sizes[0] if sizes else 0, sum(sizes), len(sizes)

    def metric(self, name: str) -> float | None:
        try:
            _status, body = bench._request(self.port, "/metrics", timeout=15)
        except OSError:
            return None
        match = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.MULTILINE)
        return float(match.group(1)) if match else None

    def slots(self) -> dict | None:
        try:
            return json.loads(bench._request(self.port, "/health", timeout=15)[1]).get("slots")
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def stop(self) -> None:
        """The head first, so that it does not see its workers go."""
        for proc in sorted(self.procs, key=lambda p: p is not getattr(self, "head", None)):
            bench.stop(proc)


@dataclass
class Soak:
    """What the run saw besides the requests; times are seconds from the clients' start."""

    records: list[Record] = field(default_factory=list)
    rss: list[dict] = field(default_factory=list)
    health: list[dict] = field(default_factory=list)
    killed: float | None = None
    relaunched: float | None = None  # the killed worker's new process started
    restarted: float | None = None  # and answered an RPC hello
    slots_after: dict | None = None  # /health's slots once the clients are done
    ended: float = 0.0


def client_loop(index: int, cluster: Cluster, soak: Soak, t0: float, deadline: float, args, stop) -> None:
    rng = random.Random(f"{args.seed}/{index}")
    seq = 0
    while not stop.is_set() and time.monotonic() < deadline:
        kind = rng.choices(KINDS, WEIGHTS)[0]
        path, payload, cancel_after = make_request(rng, kind, cluster.model_id)
        backoff = rng.uniform(*BACKOFF)
        record = Record(index, seq, kind, time.monotonic())
        exchange(cluster.port, path, payload, record, args.request_timeout, cancel_after)
        record.start -= t0
        record.end -= t0
        soak.records.append(record)
        seq += 1
        if record.status == 503 or record.reply == "sse_error":
            stop.wait(backoff)


def watch(cluster: Cluster, soak: Soak, t0: float, interval: float, stop) -> None:
    """Samples the head's RSS every ``interval`` s and /health twice a second (transitions only)."""
    last_status = None
    next_rss = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_rss:
            try:
                front, total, count = cluster.rss()
                soak.rss.append({"t": now - t0, "front": front, "total": total, "processes": count})
            except psutil.Error:
                pass
            next_rss += interval
        try:
            status = json.loads(bench._request(cluster.port, "/health", timeout=5)[1]).get("status")
        except (OSError, ValueError, http.client.HTTPException):
            status = "unreachable"
        if status != last_status:
            soak.health.append({"t": time.monotonic() - t0, "status": status})
            last_status = status
        stop.wait(0.5)


def outage(soak: Soak) -> tuple[float, float] | None:
    """(start, end) of the time the killed worker's loss may show as 503s: from the kill until /health says ok
    again after the restart, plus OUTAGE_GRACE."""
    if soak.killed is None:
        return None
    back = next(
        (h["t"] for h in soak.health if h["t"] > (soak.restarted or soak.killed) and h["status"] == "ok"),
        soak.ended,
    )
    return soak.killed, back + OUTAGE_GRACE


def classify(record: Record, window: tuple[float, float] | None) -> str:
    bad = record.kind.startswith("bad")
    if record.reply == "timeout":
        return "HUNG"
    if record.reply == "lost":
        return "LOST"
    if record.reply == "cancelled":
        return "cancelled"
    if record.reply == "wrong":
        return "unexpected"
    if record.reply == "complete":
        return "unexpected" if bad else "ok"
    # A clear error: an error body, or an error event in a stream.
    if bad:
        return "error" if record.reply == "error_body" and 400 <= (record.status or 0) < 500 else "unexpected"
    if record.reply == "error_body" and record.status != 503:
        return "unexpected"
    if record.code == "queue_full":
        return "error"
    if window and record.end >= window[0] and record.start <= window[1]:
        return "error"
    return "unexpected"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def summarize(soak: Soak, args, cluster_restarts: float | None, log_counts: tuple[int, int]) -> dict:
    window = outage(soak)
    for record in soak.records:
        record.outcome = classify(record, window)
    rows = []
    for kind in [*KINDS, "all"]:
        chosen = [r for r in soak.records if kind in ("all", r.kind)]
        counts = {o: sum(r.outcome == o for r in chosen) for o in OUTCOMES}
        latencies = [r.latency for r in chosen if r.outcome == "ok"]
        rows.append(
            {
                "kind": kind,
                "requests": len(chosen),
                **counts,
                "p50": percentile(latencies, 0.5),
                "p99": percentile(latencies, 0.99),
            }
        )
    total = rows[-1]
    summary: dict = {"rows": rows, "outage": window}
    summary["passed"] = total["HUNG"] == 0 and total["LOST"] == 0 and total["unexpected"] == 0
    summary["requests_per_second"] = total["requests"] / soak.ended if soak.ended else 0.0
    if soak.killed is not None:
        errors = [
            r.end
            for r in soak.records
            if r.end >= soak.killed and (r.status == 503 or r.reply == "sse_error") and r.code != "queue_full"
        ]
        summary["kill_to_first_503"] = min(errors) - soak.killed if errors else None
        after = soak.restarted if soak.restarted is not None else soak.killed
        oks = [r.end for r in soak.records if r.outcome == "ok" and r.start >= after]
        summary["restart_to_first_ok"] = min(oks) - after if oks else None
        summary["kill_to_first_ok"] = min(oks) - soak.killed if oks else None
    rss = soak.rss
    if rss:
        mark = 120.0 if soak.ended >= 480 else soak.ended / 4
        base = next((s for s in rss if s["t"] >= mark), rss[0])
        end = rss[-1]
        summary["rss"] = {
            "base": base,
            "end": end,
            "growth_total": (end["total"] - base["total"]) / base["total"] * 100 if base["total"] else None,
            "growth_front": (end["front"] - base["front"]) / base["front"] * 100 if base["front"] else None,
        }
    summary["engine_restarts_total"] = cluster_restarts
    summary["log_errors"], summary["log_tracebacks"] = log_counts
    return summary


def print_tables(soak: Soak, summary: dict, args, model: pathlib.Path) -> None:
    kill = (
        f"worker 2 killed at {soak.killed / 60:.2f} min, started again {soak.relaunched - soak.killed:.1f} s "
        f"later and answering {soak.restarted - soak.killed:.1f} s after the kill"
        if soak.killed is not None and soak.restarted is not None
        else "no worker killed"
    )
    print(
        f"\nSoak of the head: model {model.name}, {args.clients} clients for {args.minutes:g} min "
        f"(ran {soak.ended / 60:.2f} min), {kill}; head {' '.join(HEAD_OPTIONS)}; seed {args.seed}; "
        f"request timeout {args.request_timeout:g} s; {os.cpu_count()} CPUs\n"
    )
    print("| kind | requests | ok | error | cancelled | HUNG | LOST | unexpected | ok p50 ms | ok p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in summary["rows"]:
        name = f"**{row['kind']}**" if row["kind"] == "all" else row["kind"]
        counts = " | ".join(str(row[o]) for o in OUTCOMES)
        print(f"| {name} | {row['requests']} | {counts} | {ms(row['p50'])} | {ms(row['p99'])} |")
    total = summary["rows"][-1]
    verdict = "PASS" if summary["passed"] else "FAIL"
    lines = [
        (
            "result",
            f"{verdict} (HUNG {total['HUNG']}, LOST {total['LOST']}, unexpected {total['unexpected']})",
        ),
        ("requests per second", f"{summary['requests_per_second']:.1f}"),
    ]

    def seconds(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f} s"

    if soak.killed is not None:
        lines.append(("kill → first 503 or SSE error", seconds(summary.get("kill_to_first_503"))))
        lines.append(
            (
                "restart → first ok (request sent after the restart)",
                f"{seconds(summary.get('restart_to_first_ok'))} "
                f"({seconds(summary.get('kill_to_first_ok'))} after the kill)",
            )
        )
        around = [
            f"{h['status']} at {h['t'] - soak.killed:+.1f} s"
            for h in soak.health
            if h["t"] >= soak.killed - 1 and h["t"] <= (summary["outage"] or (0, soak.ended))[1] + 30
        ]
        lines.append(("/health after the kill", ", ".join(around) or "no change"))
    rss = summary.get("rss")
    if rss:
        base, end = rss["base"], rss["end"]
        growth = rss["growth_total"]
        met = "met" if growth is not None and growth < 5 else "missed"
        lines.append(
            (
                f"head RSS (serve + children) at {base['t'] / 60:.1f} min → end",
                f"{mib(base['total'])} → {mib(end['total'])} ({growth:+.1f} %; target < 5 %: {met})",
            )
        )
        lines.append(
            (
                f"front RSS (serve alone) at {base['t'] / 60:.1f} min → end",
                f"{mib(base['front'])} → {mib(end['front'])} ({rss['growth_front']:+.1f} %)",
            )
        )
    slots = soak.slots_after
    lines.append(
        (
            "slots after the run (expected 0 and 0)",
            "?" if slots is None else f"active {slots.get('active')}, waiting {slots.get('waiting')}",
        )
    )
    restarts = summary["engine_restarts_total"]
    lines.append(("llmfleet_engine_restarts_total", "?" if restarts is None else f"{restarts:g}"))
    lines.append(
        (
            "head log",
            f"{summary['log_errors']} ERROR lines, {summary['log_tracebacks']} tracebacks or fatal errors "
            "(the engine aborts once per worker loss)",
        )
    )
    print("\n| measure | value |\n|---|---|")
    for name, value in lines:
        print(f"| {name} | {value} |")
    shown: dict[str, int] = {}
    for record in soak.records:
        if record.outcome in ("HUNG", "LOST", "unexpected") and shown.get(record.outcome, 0) < 5:
            shown[record.outcome] = shown.get(record.outcome, 0) + 1
            print(
                f"\n{record.outcome}: client {record.client} #{record.seq} {record.kind} at "
                f"{record.start:.1f} to {record.end:.1f} s, status {record.status}: {record.detail}",
                end="",
            )
    if shown:
        print()


def count_log(path: pathlib.Path) -> tuple[int, int]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return 0, 0
    crashes = text.count("Traceback (most recent call last)") + text.count("Fatal Python error")
    return len(re.findall(r" ERROR ", text)), crashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=pathlib.Path, help="GGUF (default: the synthetic tiny model, q8_0)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--kill-at", type=float, help="minutes into the run to kill worker 2 (default half of --minutes)"
    )
    parser.add_argument("--no-kill", action="store_true", help="leave the workers alone")
    parser.add_argument("--restart-after", type=float, default=5.0, help="seconds between kill and restart")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--rss-interval", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--head-threads", type=int, default=0, help="serve --threads (default: the head's)")
    parser.add_argument("--log-dir", type=pathlib.Path, help="default ~/.cache/llmfleet/soak-logs/<time>")
    parser.add_argument("--json", type=pathlib.Path, help="also write every request and the summary here")
    args = parser.parse_args()
    kill_at = args.minutes / 2 if args.kill_at is None else args.kill_at
    if not args.no_kill and not 0 < kill_at < args.minutes:
        parser.error(f"--kill-at {kill_at:g} must lie inside the run (0 to {args.minutes:g} minutes)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    model = bench.ensure_model(args.model, "tiny", "q8_0")
    log_dir = args.log_dir or bench.CACHE / "soak-logs" / time.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"# logs in {log_dir}", file=sys.stderr, flush=True)
    soak = Soak()
    stop = threading.Event()
    cluster = Cluster(log_dir, args.worker_threads)
    try:
        cluster.start(model, args.head_threads)
        print(f"# head: {' '.join(cluster.head_command)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60
        watcher = threading.Thread(
            target=watch, args=(cluster, soak, t0, args.rss_interval, stop), daemon=True
        )
        watcher.start()
        clients = [
            threading.Thread(
                target=client_loop, args=(i, cluster, soak, t0, deadline, args, stop), daemon=True
            )
            for i in range(args.clients)
        ]
        for thread in clients:
            thread.start()
        if not args.no_kill:
            time.sleep(max(0.0, t0 + kill_at * 60 - time.monotonic()))
            cluster.kill_worker(1)
            soak.killed = time.monotonic() - t0
            print(f"# killed worker 2 at {soak.killed:.1f} s", file=sys.stderr, flush=True)
            time.sleep(args.restart_after)
            soak.relaunched = time.monotonic() - t0
            cluster.restart_worker(1)
            soak.restarted = time.monotonic() - t0
            print(f"# restarted worker 2 at {soak.restarted:.1f} s", file=sys.stderr, flush=True)
        time.sleep(max(0.0, deadline - time.monotonic()))
        # A request sent just before the deadline may run for up to the request timeout.
        for thread in clients:
            thread.join(max(0.0, deadline + args.request_timeout + 10 - time.monotonic()))
        stuck = sum(thread.is_alive() for thread in clients)
        if stuck:
            print(f"# {stuck} clients did not finish", file=sys.stderr)
        soak.ended = time.monotonic() - t0
        # The last RSS sample at the end, after the load.
        front, total, count = cluster.rss()
        soak.rss.append({"t": soak.ended, "front": front, "total": total, "processes": count})
        stop.set()
        watcher.join(10)
        restarts = cluster.metric("llmfleet_engine_restarts_total")
        soak.slots_after = cluster.slots()
    except KeyboardInterrupt:
        print("\n# interrupted; stopping the head and workers", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"# failed: {exc}; logs in {log_dir}", file=sys.stderr)
        return 2
    finally:
        stop.set()
        cluster.stop()
    summary = summarize(soak, args, restarts, count_log(log_dir / "head.log"))
    print_tables(soak, summary, args, model)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
                    "model": str(model),
                    "head": cluster.head_command,
                    "killed": soak.killed,
                    "relaunched": soak.relaunched,
                    "restarted": soak.restarted,
                    "slots_after": soak.slots_after,
                    "ended": soak.ended,
                    "summary": summary,
                    "health": soak.health,
                    "rss": soak.rss,
                    "requests": [asdict(r) for r in soak.records],
                },
                indent=1,
            )
        )
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
