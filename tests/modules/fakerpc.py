"""A stand-in ggml RPC server on loopback whose answers a test chooses: other protocol versions, odd replies."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY = 14, 15, 11


class FakeRpcServer:
    """Serves one client at a time, as ggml's server does.

    ``version`` is the (major, minor, patch) the hello answers with; ``devices`` the (free, total) of each
    device; ``close_after_command`` closes the connection on that command instead of answering it.
    """

    def __init__(self, version=(7, 0, 0), devices=((8 << 30, 16 << 30),), close_after_command=None):
        self.version = version
        self.devices = devices
        self.close_after_command = close_after_command
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.commands: list[int] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client, contextlib.suppress(OSError, struct.error):
                self._session(client)

    def _recv(self, client: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = client.recv(size - len(data))
            if not chunk:
                raise OSError("client went away")
            data += chunk
        return data

    def _session(self, client: socket.socket) -> None:
        while True:
            cmd, size = struct.unpack("<BQ", self._recv(client, 9))
            payload = self._recv(client, size)
            self.commands.append(cmd)
            if cmd == self.close_after_command:
                return
            if cmd == HELLO:
                reply = bytes([*self.version, 0]) + bytes(24)
            elif cmd == DEVICE_COUNT:
                reply = struct.pack("<I", len(self.devices))
            elif cmd == GET_DEVICE_MEMORY:
                reply = struct.pack("<QQ", *self.devices[struct.unpack("<I", payload)[0]])
            else:
                return
            client.sendall(struct.pack("<Q", len(reply)) + reply)

    def close(self) -> None:
        self.sock.close()
