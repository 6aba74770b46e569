"""A client for llama.cpp's RPC protocol (ggml-rpc), enough to ask a worker what it is and how it is doing.

Wire format (ggml/src/ggml-rpc/ggml-rpc.cpp): a request is ``cmd (1 byte) | size (uint64 LE) | payload``, a
response is ``size (uint64 LE) | payload``. The first command of a connection must be HELLO with a 24-byte
transport capability block; all zeros asks for plain TCP. The server serves one client at a time with a
listen backlog of 1: while the head is connected, a new connection is accepted by the kernel but nobody reads
from it, so the hello goes unanswered until the head leaves. Once two such connections wait (the head's own
liveness probes fill the queue), the kernel drops further SYNs and a connect times out as if a firewall
dropped it; from the head itself, its established connection to the worker tells the two apart.

So a probe ends in one of: refused (nothing listens), no TCP connection (host down, firewall, or a full
queue seen from elsewhere than the head), connected but the hello unanswered (busy with another client, or
hung), or an answer. The client refuses an answer whose major version differs from its own or whose minor
version is newer (``negotiate_hello``); an older minor version is served.
"""

from __future__ import annotations

import socket
import statistics
import struct
import time

RPC_CMD_GET_DEVICE_MEMORY = 11
RPC_CMD_HELLO = 14
RPC_CMD_DEVICE_COUNT = 15
RPC_CONN_CAPS_SIZE = 24
HELLO_REPLY_SIZE = 4 + RPC_CONN_CAPS_SIZE
DEFAULT_PORT = 50052
TCP_ESTABLISHED = "01"


class RpcError(Exception):
    """The worker could not be asked; ``state`` says how far the conversation got."""

    state = "error"

    def __init__(self, endpoint: str, message: str):
        super().__init__(f"RPC worker {endpoint}: {message}")
        self.endpoint = endpoint


class WorkerUnreachable(RpcError):
    """No TCP connection: refused (no worker listens there), or no answer at all."""

    state = "unreachable"


class ConnectTimeout(WorkerUnreachable):
    """The TCP connection got no answer: a firewall drops it, the host is down, or the listen queue is full."""


class WorkerBusy(RpcError):
    """The connection was accepted but the hello got no answer: the worker serves another client."""

    state = "busy"


class ProtocolError(RpcError):
    """The peer answered, but not as a ggml RPC server of a version we can talk to."""

    state = "protocol_error"


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RpcConnection:
    """One connection to an RPC server, past the hello."""

    def __init__(self, sock: socket.socket, endpoint: str, version: tuple[int, int, int]):
        self.sock = sock
        self.endpoint = endpoint
        self.version = version

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RpcConnection:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def command(self, cmd: int, payload: bytes, reply_size: int) -> bytes:
        self.sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
        return _recv_reply(self.sock, self.endpoint, reply_size, f"command {cmd}")

    def device_count(self) -> int:
        return struct.unpack("<I", self.command(RPC_CMD_DEVICE_COUNT, b"", 4))[0]

    def device_memory(self, device: int) -> tuple[int, int]:
        """(free, total) bytes of one device."""
        return struct.unpack("<QQ", self.command(RPC_CMD_GET_DEVICE_MEMORY, struct.pack("<I", device), 16))


def _recv_exact(sock: socket.socket, size: int, endpoint: str, what: str) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ProtocolError(
                endpoint,
                f"closed the connection during {what} after {len(data)} of {size} bytes; "
                "it is not a ggml RPC server, or it speaks a protocol version whose hello differs",
            )
        data += chunk
    return bytes(data)


def _recv_reply(sock: socket.socket, endpoint: str, expected: int, what: str) -> bytes:
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8, endpoint, what))
    if size != expected:
        raise ProtocolError(
            endpoint, f"answered {what} with {size} bytes, expected {expected}; is it a ggml RPC server?"
        )
    return _recv_exact(sock, size, endpoint, what)


def connect(host: str, port: int, timeout: float) -> RpcConnection:
    """Open a connection and say hello. Raises WorkerUnreachable, WorkerBusy or ProtocolError."""
    endpoint = format_endpoint(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError as exc:
        raise WorkerUnreachable(
            endpoint,
            "unreachable, connection refused: no RPC worker listens on that address and port; is its "
            "service running?",
        ) from exc
    except TimeoutError as exc:
        raise ConnectTimeout(
            endpoint,
            f"unreachable, no answer to the TCP connection within {timeout:g} s: the host is down or a "
            "firewall drops the packets (the firewall role opens the port to the head only); a busy worker "
            "whose listen queue is full looks the same from any host but the head, so ask from the head",
        ) from exc
    except OSError as exc:
        raise WorkerUnreachable(endpoint, f"unreachable, cannot connect: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(struct.pack("<BQ", RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
        try:
            reply = _recv_reply(sock, endpoint, HELLO_REPLY_SIZE, "the hello")
        except TimeoutError as exc:
            raise WorkerBusy(
                endpoint,
                f"busy, served by another client: the connection was accepted but the hello got no answer "
                f"within {timeout:g} s; a worker serves one client (the head) at a time, or else it hangs",
            ) from exc
        except ConnectionResetError as exc:
            raise ProtocolError(endpoint, "reset the connection during the hello") from exc
    except BaseException:
        sock.close()
        raise
    return RpcConnection(sock, endpoint, (reply[0], reply[1], reply[2]))


def _proc_net_address(host: str, port: int) -> str | None:
    """``host:port`` as /proc/net/tcp writes a remote address (IPv4, bytes reversed, hex)."""
    try:
        packed = socket.inet_aton(socket.gethostbyname(host))
    except OSError:
        return None
    return f"{packed[::-1].hex().upper()}:{port:04X}"


def held_from_here(host: str, port: int, proc_net_tcp: str = "/proc/net/tcp") -> bool:
    """Whether a process of this host (the head) has an established TCP connection to ``host:port``."""
    wanted = _proc_net_address(host, port)
    try:
        with open(proc_net_tcp) as handle:
            lines = handle.read().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[2] == wanted and fields[3] == TCP_ESTABLISHED:
            return True
    return False


def probe(host: str, port: int, timeout: float = 5.0, rtt_samples: int = 5) -> dict:
    """Everything a worker tells about itself, as a JSON-friendly dict.

    ``state`` is ``ok``, ``busy`` (hello unanswered), ``unreachable`` or ``protocol_error``; the other keys
    are filled as far as the conversation got. Round-trip times are of DEVICE_COUNT commands, which the
    server answers without touching a device.
    """
    endpoint = format_endpoint(host, port)
    result = {
        "endpoint": endpoint,
        "state": "ok",
        "reachable": False,
        "busy": False,
        "protocol_version": None,
        "protocol": None,
        "device_count": None,
        "devices": [],
        "free_bytes": None,
        "total_bytes": None,
        "rtt_ms": None,
        "detail": "",
    }
    started = time.monotonic()
    try:
        conn = connect(host, port, timeout)
    except ConnectTimeout as exc:
        if not held_from_here(host, port):
            result.update(state=exc.state, detail=str(exc))
            return result
        result.update(
            state="busy",
            reachable=True,
            busy=True,
            detail=f"RPC worker {endpoint}: busy, served by another client: its listen queue is full and "
            "this host holds an established connection to it (the head here is connected, and a worker "
            "serves one client at a time)",
        )
        return result
    except RpcError as exc:
        result.update(
            state=exc.state,
            reachable=not isinstance(exc, WorkerUnreachable),
            busy=isinstance(exc, WorkerBusy),
            detail=str(exc),
        )
        return result
    result["reachable"] = True
    result["connect_ms"] = round((time.monotonic() - started) * 1000.0, 3)
    major, minor, patch = conn.version
    result["protocol"] = {"major": major, "minor": minor, "patch": patch}
    result["protocol_version"] = f"{major}.{minor}.{patch}"
    try:
        with conn:
            samples = []
            count = 0
            for _ in range(max(1, rtt_samples)):
                sent = time.perf_counter()
                count = conn.device_count()
                samples.append((time.perf_counter() - sent) * 1000.0)
            result["device_count"] = count
            for index in range(count):
                free, total = conn.device_memory(index)
                result["devices"].append({"index": index, "free_bytes": free, "total_bytes": total})
    except RpcError as exc:
        result.update(state=exc.state, detail=str(exc))
        return result
    except OSError as exc:
        result.update(state="protocol_error", detail=f"RPC worker {endpoint}: {exc.strerror or exc}")
        return result
    result["free_bytes"] = sum(d["free_bytes"] for d in result["devices"])
    result["total_bytes"] = sum(d["total_bytes"] for d in result["devices"])
    result["rtt_ms"] = {
        "median": round(statistics.median(samples), 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
        "samples": len(samples),
    }
    return result


def human_bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024.0 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024.0
    return f"{size:.1f} GiB"


def version_problem(info: dict, expected_major: int, expected_minor: int) -> str | None:
    """ggml's rule for the head (protocol ``expected_major.expected_minor``) talking to this worker.

    The client aborts with "RPC server version mismatch" when the server's major version differs from its
    own or its minor version is newer; a worker of an older minor version is served.
    """
    major, minor = info["protocol"]["major"], info["protocol"]["minor"]
    if major == expected_major and minor <= expected_minor:
        return None
    why = "another major version" if major != expected_major else "a newer minor version"
    return (
        f"RPC worker {info['endpoint']} speaks protocol {info['protocol_version']} and the head speaks "
        f"{expected_major}.{expected_minor}: ggml's client refuses a worker of {why} (it accepts the same major "
        f"version with a minor version up to its own); head and workers need the same llama-cpp-python build, "
        "so reinstall the worker from the same wheelhouse as the head"
    )


def problems(
    info: dict,
    expected_major: int,
    min_free_bytes: int = 0,
    require_idle: bool = False,
    expected_minor: int = 1,
) -> list[str]:
    """What makes this worker unfit, one sentence each; empty when it is fit.

    ``expected_major`` and ``expected_minor`` are the head's protocol version. A busy worker (the head holds
    its one connection) passes unless ``require_idle``; its version and memory cannot be read then, and the
    head that holds it has already allocated its share.
    """
    state = info["state"]
    if state == "busy":
        if require_idle:
            return [info["detail"] + "; require_idle is set: stop the head first, or drop require_idle"]
        return []
    if state != "ok":
        return [info["detail"]]
    found = []
    mismatch = version_problem(info, expected_major, expected_minor)
    if mismatch:
        found.append(mismatch)
    if info["device_count"] == 0:
        found.append(f"RPC worker {info['endpoint']} offers no device")
    elif min_free_bytes and info["free_bytes"] < min_free_bytes:
        devices = ", ".join(
            f"device {d['index']}: {human_bytes(d['free_bytes'])} free of {human_bytes(d['total_bytes'])}"
            for d in info["devices"]
        )
        found.append(
            f"RPC worker {info['endpoint']} has {human_bytes(info['free_bytes'])} ({info['free_bytes']} bytes) "
            f"free, expected at least {human_bytes(min_free_bytes)} ({min_free_bytes} bytes) for its shard "
            f"({devices}); free memory on the worker, give it a smaller share, or add a worker"
        )
    return found
