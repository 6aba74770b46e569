"""The RPC worker: serves this machine's ggml device to the head over llama.cpp's RPC protocol.

The server is llama.cpp's own (``ggml_backend_rpc_start_server`` from the same build the head uses), so both
sides always speak the same protocol version. It serves one client at a time: while the head is connected,
other connections wait in the listen backlog.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace

log = logging.getLogger("inference.worker")

DEFAULT_PORT = 50052
RPC_CMD_HELLO = 14
# RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION of the llama.cpp this package is built against (ggml-rpc.h), which
# the head speaks; a unit test checks it against a worker of the installed build.
RPC_PROTOCOL = (7, 1, 0)  # 7.0 upstream; patch 0003 adds the graph cache by uid
# rpc_msg_hello_req carries a 24-byte transport capability block; the reply is major, minor, patch, pad, caps.
RPC_CONN_CAPS_SIZE = 24


# The tensor cache (--cache-dir) keeps each large weight the head sent, in a file named by the FNV-1a hash of
# its bytes (llama.cpp's ggml-rpc, HASH_THRESHOLD: tensors over 10 MiB). Entries are pruned to this size at
# start, those unused for longest first (a cache hit sets an entry's mtime: inference/patches/llama.cpp/0001).
DEFAULT_CACHE_MAX_BYTES = 16 << 30
CACHE_ENTRY = re.compile(r"[0-9a-f]{16}")
CACHE_PARTIAL = re.compile(r"[0-9a-f]{16}\.partial")
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(ValueError):
    """A worker option has a value the worker cannot use; the message names the option and the fix."""


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def ipv4_address(host: str) -> ipaddress.IPv4Address | None:
    """``host`` as an IPv4 address that ggml's RPC server can bind, else None.

    The server (ggml-rpc's ``create_server``) opens an AF_INET socket on ``inet_addr(host)``: an IPv4
    address. A name such as localhost or 255.255.255.255 (``inet_addr``'s error value) ends the worker with
    "Invalid host address"; an IPv6 endpoint does not even parse (``parse_endpoint`` splits at the first ':').
    """
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return None
    return None if address == ipaddress.IPv4Address("255.255.255.255") else address


def bind_problem(host: str, port: int) -> str | None:
    """Why ggml's server could not bind ``host:port`` (it binds with SO_REUSEADDR), in words; None if it can."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return (
                    f"--host {host} is not an address of this machine; give one of its IPv4 addresses "
                    "(ip -4 addr lists them), or 127.0.0.1"
                )
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"--port {port} on {host} is taken by another process (another worker?); stop it or "
                    "give another --port"
                )
            if exc.errno == errno.EACCES:
                return f"--port {port} needs root to bind; give a port above 1023 such as {DEFAULT_PORT}"
            return f"--host {host} --port {port} cannot be bound: {exc.strerror or exc}"
    return None


@dataclass(frozen=True)
class WorkerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    threads: int = 0
    cache_dir: str | None = None
    allow_remote: bool = False
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    metrics_port: int = 0  # 0: no /health and /metrics endpoint
    # Repack the weights the CPU backend has interleaved matrix kernels for (Q4_0, Q4_K, IQ4_NL, ... per CPU),
    # as a local load does: inference/patches/llama.cpp/0005. Off: GGML_RPC_NO_REPACK=1 for the server.
    repack: bool = True

    def validated(self) -> WorkerConfig:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port; use 1-65535")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(
                f"--metrics-port {self.metrics_port} is not a TCP port; use 1-65535, or 0 for none"
            )
        if self.metrics_port == self.port:
            raise ConfigError(
                f"--metrics-port {self.metrics_port} is the RPC port; give another, e.g. {self.port + 1}"
            )
        if self.threads < 0:
            raise ConfigError(f"--threads {self.threads} is negative; use 0 for every usable core or a count")
        address = ipv4_address(self.host)
        if address is None:
            raise ConfigError(
                f"--host {self.host!r} is not an IPv4 address such as 127.0.0.1, and ggml's RPC server binds "
                "only those (no host names, no IPv6): give 127.0.0.1 for this machine alone, or its cluster "
                "address (e.g. 10.0.0.11) with --allow-remote"
            )
        if not address.is_loopback and not self.allow_remote:
            raise ConfigError(
                f"--host {self.host} is not a loopback address and the RPC protocol has no authentication; "
                "bind to the cluster interface only behind a firewall and pass --allow-remote"
            )
        problem = bind_problem(self.host, self.port)
        if problem:
            raise ConfigError(problem)
        if self.metrics_port:
            problem = bind_problem(self.host, self.metrics_port)
            if problem:
                raise ConfigError(problem.replace("--port", "--metrics-port"))
        threads = self.threads or usable_cpus()
        cache_dir = self.cache_dir
        if cache_dir:
            try:
                os.makedirs(cache_dir, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--cache-dir {cache_dir} cannot be created: {exc.strerror}") from exc
            if not os.access(cache_dir, os.W_OK):
                raise ConfigError(f"--cache-dir {cache_dir} is not writable by this user")
        if self.cache_max_bytes <= 0:
            raise ConfigError(
                f"--cache-max-size {self.cache_max_bytes} must be positive, e.g. 16G; to keep no cache, "
                "leave out --cache-dir"
            )
        return replace(self, threads=threads, cache_dir=cache_dir)

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


# How the worker notices a head that vanished without closing its connection (power loss, a dropped link):
# TCP keepalive probes after 10 s of silence, every 5 s, 3 unanswered end it; data unacknowledged for 30 s
# ends it too. The RPC server serves one client at a time, so until then it could accept no other head.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3
USER_TIMEOUT_MS = 30_000


def process_tcp_sockets() -> list[socket.socket]:
    """This process's TCP sockets, as duplicates of their descriptors (the caller closes them). For sockets
    that ggml's C code opened, which Python has no other handle on."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            found.append(sock)
        else:
            sock.close()
    return found


def listening_sockets(port: int) -> list[socket.socket]:
    """This process's listening TCP sockets on ``port`` (duplicates of their descriptors; close them)."""
    found = []
    for sock in process_tcp_sockets():
        try:
            listening = (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) and sock.getsockname()[1] == port
            )
        except OSError:
            listening = False
        if listening:
            found.append(sock)
        else:
            sock.close()
    return found


def keep_connections_alive(sock: socket.socket) -> None:
    """Set keepalive and a user timeout on a listening socket; Linux copies them to every accepted one."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


def parse_size(text: str) -> int:
    """``16G``, ``512M``, ``1048576`` -> bytes (binary units K, M, G, T; an optional trailing B or iB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(
            f"--cache-max-size {text!r} is not a size; give bytes or a number with K, M, G or T"
        )
    return int(float(match[1]) * SIZE_UNITS[match[2].upper()])


@dataclass(frozen=True)
class PruneResult:
    kept: int  # entries left
    kept_bytes: int
    removed: int  # entries removed to stay under the bound
    removed_bytes: int
    partial: int  # unfinished writes removed


def prune_cache(cache_dir: str, max_bytes: int) -> PruneResult:
    """Remove unfinished writes (``<hash>.partial``) and the least recently used entries (oldest mtime) until
    the entries take at most ``max_bytes``. Other files in the directory are left alone."""
    entries, partial = [], 0
    for entry in os.scandir(cache_dir):
        if not entry.is_file(follow_symlinks=False):
            continue
        if CACHE_PARTIAL.fullmatch(entry.name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            partial += 1
        elif CACHE_ENTRY.fullmatch(entry.name):
            info = entry.stat(follow_symlinks=False)
            entries.append((info.st_mtime_ns, info.st_size, entry.path))
    entries.sort(reverse=True)
    kept = kept_bytes = removed = removed_bytes = 0
    for _, size, path in entries:
        if kept_bytes + size <= max_bytes:
            kept, kept_bytes = kept + 1, kept_bytes + size
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        removed, removed_bytes = removed + 1, removed_bytes + size
    return PruneResult(kept, kept_bytes, removed, removed_bytes, partial)


def version_problem(endpoint: str, version: tuple[int, int, int]) -> str | None:
    """Why this head cannot use a worker speaking ``version``, by ggml's rule (the client aborts on another
    major version or a newer minor one), naming both versions; None when it can."""
    major, minor = RPC_PROTOCOL[:2]
    if version[0] == major and version[1] <= minor:
        return None
    theirs, ours = ".".join(map(str, version)), ".".join(map(str, RPC_PROTOCOL))
    return (
        f"RPC worker {endpoint} speaks protocol {theirs} and this head {ours}: ggml refuses it; install the "
        "head's llama-cpp-python build on the worker (the same wheelhouse)"
    )


def _announce_version(config: WorkerConfig) -> None:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    for _ in range(100):
        # ggml's server socket exists from here on; set its options before the first client is accepted.
        sockets = listening_sockets(config.port)
        if not sockets:
            time.sleep(0.1)
            continue
        for sock in sockets:
            with sock:
                keep_connections_alive(sock)
        break
    else:
        log.warning("found no listening socket on port %d to enable TCP keepalive on", config.port)
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
    if config.repack:
        os.environ.pop("GGML_RPC_NO_REPACK", None)
    else:
        os.environ["GGML_RPC_NO_REPACK"] = "1"
    log.info(
        "serving %s on %s with %d threads, tensor cache %s, weights %s",
        names,
        config.endpoint,
        config.threads,
        config.cache_dir or "off",
        "repacked for the CPU kernels" if config.repack else "as sent (--no-repack)",
    )
    if config.cache_dir:
        pruned = prune_cache(config.cache_dir, config.cache_max_bytes)
        log.info(
            "tensor cache %s: %d entries, %.1f MiB kept; %d unused entries (%.1f MiB) and %d unfinished writes "
            "removed (bound %.1f MiB)",
            config.cache_dir,
            pruned.kept,
            pruned.kept_bytes / 2**20,
            pruned.removed,
            pruned.removed_bytes / 2**20,
            pruned.partial,
            config.cache_max_bytes / 2**20,
        )
    if config.metrics_port:
        from inference import worker_metrics

        protocol = ".".join(str(v) for v in RPC_PROTOCOL)
        worker_metrics.start(config.host, config.metrics_port, config.port, config.endpoint, protocol)
    threading.Thread(target=_announce_version, args=(config,), daemon=True).start()
    ggml.start_rpc_server(config.endpoint, config.cache_dir, config.threads, handles)
    raise RuntimeError(f"the RPC server on {config.endpoint} stopped")
