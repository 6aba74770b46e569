"""The RPC worker: serves this machine's ggml device to the head over llama.cpp's RPC protocol.

The server is llama.cpp's own (``ggml_backend_rpc_start_server`` from the same build the head uses), so both
sides always speak the same protocol version. It serves one client at a time: while the head is connected,
other connections wait in the listen backlog.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("inference.worker")

DEFAULT_PORT = 50052
RPC_CMD_HELLO = 14
# rpc_msg_hello_req carries a 24-byte transport capability block; the reply is major, minor, patch, pad, caps.
RPC_CONN_CAPS_SIZE = 24


class ConfigError(ValueError):
    """A worker option has a value the worker cannot use; the message names the option and the fix."""


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class WorkerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    threads: int = 0
    cache_dir: str | None = None
    allow_remote: bool = False

    def validated(self) -> WorkerConfig:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port; use 1-65535")
        if self.threads < 0:
            raise ConfigError(f"--threads {self.threads} is negative; use 0 for every usable core or a count")
        if not is_loopback(self.host) and not self.allow_remote:
            raise ConfigError(
                f"--host {self.host} is not a loopback address and the RPC protocol has no authentication; "
                "bind to the cluster interface only behind a firewall and pass --allow-remote"
            )
        threads = self.threads or usable_cpus()
        cache_dir = self.cache_dir
        if cache_dir:
            try:
                os.makedirs(cache_dir, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--cache-dir {cache_dir} cannot be created: {exc.strerror}") from exc
            if not os.access(cache_dir, os.W_OK):
                raise ConfigError(f"--cache-dir {cache_dir} is not writable by this user")
        return WorkerConfig(self.host, self.port, threads, cache_dir, self.allow_remote)

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed during the RPC hello")
        data += chunk
    return data


def rpc_hello(host: str, port: int, timeout: float = 5.0) -> tuple[int, int, int]:
    """Ask an RPC server for its protocol version (major, minor, patch)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack("<BQ", RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
        (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
        reply = _recv_exact(sock, size)
    major, minor, patch = reply[0], reply[1], reply[2]
    return major, minor, patch


def _announce_version(config: WorkerConfig) -> None:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    for _ in range(100):
        try:
            version = rpc_hello(host, config.port, timeout=2.0)
        except OSError:
            time.sleep(0.1)
            continue
        log.info("RPC protocol version %d.%d.%d", *version)
        return
    log.warning("could not read the RPC protocol version from %s", config.endpoint)


def run(config: WorkerConfig) -> None:
    from inference import ggml

    config = config.validated()
    handles = ggml.local_devices()
    names = ", ".join(ggml.describe(h).name for h in handles)
    log.info(
        "serving %s on %s with %d threads, tensor cache %s",
        names,
        config.endpoint,
        config.threads,
        config.cache_dir or "off",
    )
    threading.Thread(target=_announce_version, args=(config,), daemon=True).start()
    ggml.start_rpc_server(config.endpoint, config.cache_dir, config.threads, handles)
    raise RuntimeError(f"the RPC server on {config.endpoint} stopped")
