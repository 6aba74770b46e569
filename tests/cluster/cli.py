"""Command line of the local cluster harness: parses arguments and calls the operation."""

from __future__ import annotations

import argparse
import sys

from tests.cluster import cluster, config, image, supervisor, wheelhouse
from tests.cluster.hoststate import SUPERVISE_COMMAND
from tests.cluster.system import HarnessError, ensure_packages, harness_lock, require_root


def _up(args: argparse.Namespace) -> int:
    if args.fresh:
        cluster.recreate()
    else:
        cluster.up()
    return 0


def _down(_args: argparse.Namespace) -> int:
    cluster.down()
    return 0


def _status(_args: argparse.Namespace) -> int:
    statuses = cluster.status()
    # Like `systemctl is-active`: 0 only when everything is up, so scripts can test it.
    return 0 if all(item.up for item in statuses) else 3


def _reboot(args: argparse.Namespace) -> int:
    cluster.reboot(config.host_by_name(args.host))
    return 0


def _image(_args: argparse.Namespace) -> int:
    require_root()
    with harness_lock():
        ensure_packages()
        path, built = image.ensure_image()
    if not built:
        print(f"Base image {path.name} is built; nothing changed.")
    return 0


def _wheelhouse(_args: argparse.Namespace) -> int:
    wheelhouse.ensure()
    return 0


def _report(_args: argparse.Namespace) -> int:
    """What the demo shows once site.yml has run: the head's health, one completion through the workers, and
    where Prometheus answers."""
    import json
    import time
    import urllib.request

    from tests.cluster import config, ssh

    head = config.host_by_name("gpu1")
    key = ssh.run(head, "cat /etc/llmfleet/head-api-key").stdout.strip()
    base = f"http://{head.address}:8080"
    with urllib.request.urlopen(base + "/health", timeout=30) as resp:
        print("GET /health:", json.dumps(json.loads(resp.read()), indent=2))
    body = {"prompt": "A small cluster of Raspberry Pis", "max_tokens": 32, "temperature": 0}
    request = urllib.request.Request(
        base + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        reply = json.loads(resp.read())
    print("POST /v1/completions:", json.dumps(reply["choices"][0]["text"]), "usage:", reply["usage"])
    prometheus = f"http://{head.address}:9090"
    # A Prometheus reloaded a moment ago lists its targets, then scrapes each, within a scrape interval.
    deadline = time.monotonic() + 45
    while True:
        with urllib.request.urlopen(prometheus + "/api/v1/targets?state=active", timeout=30) as resp:
            targets = json.loads(resp.read())["data"]["activeTargets"]
        up = sum(target["health"] == "up" for target in targets)
        if (targets and up == len(targets)) or time.monotonic() > deadline:
            break
        time.sleep(3)
    print(
        f"Prometheus: {prometheus}/ ({up} of {len(targets)} targets up), its alerts at {prometheus}/alerts,"
    )
    print(f"the cluster's console page at {prometheus}/consoles/llmfleet.html (docs/monitoring.md).")
    print("The cluster stays up; tear it down with `make demo-down` (python -m tests.cluster down).")
    return 0


def _supervise(args: argparse.Namespace) -> int:
    return supervisor.supervise(config.host_by_name(args.host))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    hosts = [host.name for host in config.HOSTS]
    up = sub.add_parser("up", help="build what is missing and bring the five hosts up")
    up.add_argument(
        "--fresh",
        action="store_true",
        help="replace hosts that are already up (their disks and settings) with factory-new ones",
    )
    up.set_defaults(func=_up)
    sub.add_parser("down", help="stop the hosts and discard their disks").set_defaults(func=_down)
    sub.add_parser("status", help="say which hosts are up (exit 3 unless all are)").set_defaults(func=_status)
    reboot = sub.add_parser("reboot", help="reboot one host, keeping its disk, and wait for SSH")
    reboot.add_argument("host", choices=hosts)
    reboot.set_defaults(func=_reboot)
    sub.add_parser("report", help="print the head's health and one completion (after site.yml)").set_defaults(
        func=_report
    )
    sub.add_parser("image", help="build the base image only").set_defaults(func=_image)
    sub.add_parser("wheelhouse", help="collect the hosts' Python wheels on this machine").set_defaults(
        func=_wheelhouse
    )
    supervise = sub.add_parser(SUPERVISE_COMMAND)  # started by `up`, one per host; not for people
    supervise.add_argument("host", choices=hosts)
    supervise.set_defaults(func=_supervise)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (HarnessError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
