"""SSH from the controller into the hosts, with the harness's own key."""

from __future__ import annotations

import socket
import subprocess

from tests.cluster import config
from tests.cluster.config import Host
from tests.cluster.system import run as run_local

# Host keys come from the shared base image and the hosts are recreated at will: checking them would only
# fail. This is acceptable on the private, offline bridge only.
SSH_OPTIONS = (
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=5",
    "-o", "IdentitiesOnly=yes",
)  # fmt: skip


def ensure_key() -> bool:
    """Generate the harness's ed25519 key once; return whether it was generated now."""
    if config.SSH_KEY.exists():
        return False
    config.SSH_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    run_local(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "llmfleet-local-cluster", "-f", config.SSH_KEY]
    )
    return True


def public_key() -> str:
    return config.SSH_KEY.with_suffix(".pub").read_text()


def argv(host: Host, command: str) -> list[str]:
    return ["ssh", "-i", str(config.SSH_KEY), *SSH_OPTIONS, f"root@{host.address}", command]


def run(
    host: Host, command: str, *, timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a shell command on the host; return the finished process (stdout/stderr captured)."""
    try:
        return run_local(argv(host, command), check=check, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, 124, stdout="", stderr=f"timed out after {timeout} s")


def port_open(host: Host, port: int = 22, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host.address, port), timeout=timeout):
            return True
    except OSError:
        return False
