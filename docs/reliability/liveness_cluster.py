"""The faults of liveness.py on the five-host local cluster that `make demo` deploys: an RPC worker restarted by
systemd, stopped (SIGSTOP) mid-stream, and cut off by nftables on its host; times to the first error and to
recovery as a client of the head sees them. Prints one markdown table.

    make demo   # the cluster up, site.yml applied
    sudo .venv/bin/python docs/reliability/liveness_cluster.py [--worker pi2]

The head runs with the role's defaults (--rpc-timeout 60, --worker-probe-interval 5).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import threading
import time
import urllib.error
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.cluster import config, ssh  # noqa: E402

HEAD = config.host_by_name("gpu1")
BASE = f"http://{HEAD.address}:8080"
UNIT = "llmfleet-rpc-worker"
NFT_TABLE = "llmfleet_liveness"


def health() -> dict:
    try:
        with urllib.request.urlopen(BASE + "/health", timeout=15) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
    except (OSError, ValueError):
        return {"status": "unreachable"}


def wait_status(status: str, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health().get("status") == status:
            return time.monotonic()
        time.sleep(0.1)
    raise RuntimeError(f"the head never reported {status}")


def complete(key: str, max_tokens: int) -> tuple[int, dict]:
    body = {"prompt": "liveness", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(
        BASE + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=1200) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def in_flight(key: str, fault) -> tuple[float, int, str]:
    result = {}

    def request():
        result["reply"] = complete(key, 480)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=request)
    thread.start()
    while not health().get("slots", {}).get("active"):
        time.sleep(0.02)
    time.sleep(0.3)
    at = time.monotonic()
    fault()
    thread.join()
    status, body = result["reply"]
    message = body.get("error", {}).get("message", "") if status != 200 else "(completed)"
    return result["at"] - at, status, message


def on(host, command: str) -> None:
    ssh.run(host, command)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", default="pi2", help="the worker host to fail")
    args = parser.parse_args()
    worker = config.host_by_name(args.worker)
    key = ssh.run(HEAD, "cat /etc/llmfleet/head-api-key").stdout.strip()
    wait_status("ok")
    rows = []

    at = time.monotonic()
    on(worker, f"systemctl restart {UNIT}")
    restarted = time.monotonic()
    degraded = wait_status("degraded", timeout=60)
    ok = wait_status("ok")
    status, _ = complete(key, 8)
    rows.append(
        (
            f"systemctl restart {UNIT} on {worker.name}, head idle",
            f"/health degraded {degraded - at:.1f} s after the restart began",
            f"ok {ok - restarted:.1f} s after it returned",
            status,
        )
    )

    waited, status, message = in_flight(key, lambda: on(worker, f"systemctl kill -s SIGSTOP {UNIT}"))
    on(worker, f"systemctl kill -s SIGCONT {UNIT}")
    resumed = time.monotonic()
    ok = wait_status("ok")
    after, _ = complete(key, 8)
    rows.append(
        (
            f"worker on {worker.name} stopped (SIGSTOP) mid-stream",
            f"{status} after {waited:.1f} s: {message[:90]}",
            f"ok {ok - resumed:.1f} s after SIGCONT",
            after,
        )
    )

    port = 50052
    drop = (
        f"nft add table inet {NFT_TABLE}; "
        f"nft 'add chain inet {NFT_TABLE} input {{ type filter hook input priority -10; }}'; "
        f"nft 'add chain inet {NFT_TABLE} output {{ type filter hook output priority -10; }}'; "
        f"nft add rule inet {NFT_TABLE} input tcp dport {port} drop; "
        f"nft add rule inet {NFT_TABLE} output tcp sport {port} drop"
    )
    try:
        waited, status, message = in_flight(key, lambda: on(worker, drop))
        time.sleep(2)
    finally:
        ssh.run(worker, f"nft delete table inet {NFT_TABLE}", check=False)
    restored = time.monotonic()
    ok = wait_status("ok", timeout=900)
    after, _ = complete(key, 8)
    rows.append(
        (
            f"{worker.name}'s RPC port dropped both ways on {worker.name} mid-stream, then restored",
            f"{status} after {waited:.1f} s: {message[:90]}",
            f"ok {ok - restored:.1f} s after the port was restored",
            after,
        )
    )
    print(f"local cluster (five systemd-nspawn hosts), fault on {worker.name}\n")
    print("| case | to first error | to recovery | next request |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
