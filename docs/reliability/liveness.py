"""What a client sees when an RPC worker restarts, hangs or loses its network: times to the first error and to
recovery, measured with real processes (a head and two workers) on loopback. Prints one markdown table.

    sudo .venv/bin/python docs/reliability/liveness.py [--model PATH] [--rpc-timeout 10] [--probe-interval 5]

Root is needed for the network case only (an nftables table that drops the worker's port on loopback in both
directions, removed afterwards); without root that row is left out. Each case starts fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from inference import bench  # noqa: E402  (this checkout's, also when the package is not installed)

NFT_TABLE = "llmfleet_liveness"


class Cluster:
    def __init__(self, model: pathlib.Path, log_dir: pathlib.Path, rpc_timeout: float, probe: float):
        self.log_dir = log_dir
        self.worker_ports = [bench.free_port(), bench.free_port()]
        self.workers = [self._worker(port) for port in self.worker_ports]
        self.port = bench.free_port()
        rpc = ",".join(f"127.0.0.1:{p}" for p in self.worker_ports)
        command = [sys.executable, "-m", "inference", "serve", "--model", str(model), "--rpc", rpc]
        command += ["--port", str(self.port), "--ctx", "4096", "--parallel", "1", "--threads", "1"]
        command += ["--rpc-timeout", str(rpc_timeout), "--worker-probe-interval", str(probe)]
        self.head = bench.start(bench.Target("head", command, "/health", self.port), log_dir)
        bench.wait_ready(self.head, self.port, "/health", timeout=300)

    def _worker(self, port: int) -> subprocess.Popen:
        proc = bench.start(
            bench.Target(f"worker-{port}", bench.worker_command(port, 1, None), "", port), self.log_dir
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                from inference.worker import rpc_hello

                rpc_hello("127.0.0.1", port, timeout=1)
                return proc
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"worker on {port} did not start")

    def restart_worker(self, index: int) -> None:
        self.workers[index] = self._worker(self.worker_ports[index])

    def health(self) -> dict:
        try:
            _status, body = bench._request(self.port, "/health", timeout=15)
            return json.loads(body)
        except (OSError, ValueError):
            return {"status": "unreachable"}

    def wait_status(self, status: str, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health().get("status") == status:
                return time.monotonic()
            time.sleep(0.05)
        raise RuntimeError(f"the head never reported {status}")

    def complete(self, max_tokens: int) -> tuple[int, dict]:
        body = {"prompt": "liveness", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        status, raw = bench._request(self.port, "/v1/completions", body, timeout=1200)
        return status, json.loads(raw)

    def close(self) -> None:
        for proc in [self.head, *self.workers]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
            bench.stop(proc)


def _in_flight(cluster: Cluster, fault, max_tokens: int = 3500) -> tuple[float, int, str, float]:
    """Start a long request, apply ``fault`` once it runs; (seconds from the fault to the reply, status,
    message, fault time)."""
    result = {}

    def request():
        result["reply"] = cluster.complete(max_tokens)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=request)
    thread.start()
    while not cluster.health().get("slots", {}).get("active"):
        time.sleep(0.02)
    time.sleep(0.3)
    at = time.monotonic()
    fault()
    thread.join()
    status, body = result["reply"]
    message = body.get("error", {}).get("message", "") if status != 200 else "(completed)"
    return result["at"] - at, status, message, at


def nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)


def drop_port(port: int) -> None:
    nft(
        f"table inet {NFT_TABLE} {{\n"
        f"  chain input {{ type filter hook input priority -10; tcp dport {port} drop; tcp sport {port} drop; }}\n"
        f"  chain output {{ type filter hook output priority -10; tcp dport {port} drop; tcp sport {port} drop; }}\n"
        "}\n"
    )


def restore_ports() -> None:
    subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], check=False, capture_output=True)


def case_restart(make) -> dict:
    cluster = make()
    try:
        victim = cluster.workers[1]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        killed = time.monotonic()
        cluster.restart_worker(1)
        restarted = time.monotonic()
        degraded = cluster.wait_status("degraded", timeout=60)
        ok = cluster.wait_status("ok")
        status, _ = cluster.complete(8)
        return {
            "case": "worker killed and restarted on its port, head idle",
            "to first error": f"/health degraded {degraded - killed:.1f} s after the kill",
            "to recovery": f"ok {ok - restarted:.1f} s after the restart",
            "next request": status,
        }
    finally:
        cluster.close()


def case_stop(make, rpc_timeout: float) -> dict:
    cluster = make()
    try:
        victim = cluster.workers[1]
        waited, status, message, _ = _in_flight(cluster, lambda: os.killpg(victim.pid, signal.SIGSTOP))
        time.sleep(1)
        os.killpg(victim.pid, signal.SIGCONT)
        resumed = time.monotonic()
        ok = cluster.wait_status("ok")
        after, _ = cluster.complete(8)
        return {
            "case": f"worker stopped (SIGSTOP) mid-stream, --rpc-timeout {rpc_timeout:g}",
            "to first error": f"{status} after {waited:.1f} s: {message[:90]}",
            "to recovery": f"ok {ok - resumed:.1f} s after SIGCONT",
            "next request": after,
        }
    finally:
        cluster.close()


def case_stop_idle(make, probe: float, rpc_timeout: float) -> dict:
    cluster = make()
    try:
        victim = cluster.workers[1]
        os.killpg(victim.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        degraded = cluster.wait_status("degraded", timeout=120)
        os.killpg(victim.pid, signal.SIGCONT)
        resumed = time.monotonic()
        ok = cluster.wait_status("ok")
        after, _ = cluster.complete(8)
        return {
            "case": f"worker stopped while the head is idle (heartbeat every {probe:g} s)",
            "to first error": f"/health degraded {degraded - stopped:.1f} s after SIGSTOP",
            "to recovery": f"ok {ok - resumed:.1f} s after SIGCONT",
            "next request": after,
        }
    finally:
        cluster.close()


def case_network(make, rpc_timeout: float) -> dict:
    cluster = make()
    try:
        port = cluster.worker_ports[1]
        try:
            waited, status, message, _ = _in_flight(cluster, lambda: drop_port(port))
            time.sleep(2)
        finally:
            restore_ports()
        restored = time.monotonic()
        ok = cluster.wait_status("ok", timeout=600)
        after, _ = cluster.complete(8)
        return {
            "case": f"worker's port dropped both ways mid-stream, then restored, --rpc-timeout {rpc_timeout:g}",
            "to first error": f"{status} after {waited:.1f} s: {message[:90]}",
            "to recovery": f"ok {ok - restored:.1f} s after the port was restored",
            "next request": after,
        }
    finally:
        restore_ports()
        cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=pathlib.Path, help="GGUF (default: the synthetic bench model)")
    parser.add_argument("--rpc-timeout", type=float, default=10.0)
    parser.add_argument("--probe-interval", type=float, default=5.0)
    args = parser.parse_args()
    model = bench.ensure_model(args.model, "bench", "q8_0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="liveness-") as tmp:

        def make() -> Cluster:
            return Cluster(model, pathlib.Path(tmp), args.rpc_timeout, args.probe_interval)

        rows.append(case_restart(make))
        rows.append(case_stop(make, args.rpc_timeout))
        rows.append(case_stop_idle(make, args.probe_interval, args.rpc_timeout))
        if os.geteuid() == 0:
            rows.append(case_network(make, args.rpc_timeout))
    columns = ["case", "to first error", "to recovery", "next request"]
    print(f"model {model.name}, head and two workers on loopback, {os.cpu_count()} CPUs\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
