"""Real processes on loopback: RPC workers and serving heads started as users start them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from inference.synth import synth_model

STARTUP_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, headers=None, timeout: float = 60.0):
    """(status, headers, parsed JSON or text) without raising on HTTP errors."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, raw = exc.code, dict(exc.headers), exc.read()
    text = raw.decode()
    try:
        return status, hdrs, json.loads(text)
    except json.JSONDecodeError:
        return status, hdrs, text


class Proc:
    def __init__(self, args: list[str], log_path: Path, **popen_kwargs):
        self.args = args
        self.log_path = log_path
        self.log = log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "inference", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            **popen_kwargs,
        )

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class Worker(Proc):
    def __init__(self, tmp: Path, port: int | None = None, threads: int = 1):
        self.port = port or free_port()
        self.threads = threads
        super().__init__(self._args(), tmp / f"worker-{self.port}.log", **self._popen_kwargs())
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"worker exited: {self.output()}")
            if "RPC protocol version" in self.output():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker on {self.port} did not start: {self.output()}")

    def _args(self) -> list[str]:
        return ["worker", "--port", str(self.port), "--threads", str(self.threads)]

    def _popen_kwargs(self) -> dict:
        return {}

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


class Server(Proc):
    def __init__(self, tmp: Path, model: Path, *extra: str, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                "serve",
                "--model",
                str(model),
                "--port",
                str(self.port),
                "--threads",
                "1",
                "--flash-attn",
                "on",
                *extra,
            ],
            tmp / f"serve-{self.port}.log",
        )
        if wait:
            self.wait_status("ok")

    def health(self):
        try:
            return http("GET", self.url + "/health", timeout=10)[2]
        except OSError:
            return None

    def wait_status(self, status: str, timeout: float = STARTUP_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"serve exited: {self.output()}")
            body = self.health()
            if isinstance(body, dict) and body.get("status") == status:
                return body
            time.sleep(0.2)
        raise RuntimeError(
            f"serve never reported {status}; last health {body}; log:\n{self.output()[-3000:]}"
        )

    def complete(self, prompt: str, max_tokens: int = 24, **extra):
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        return http("POST", self.url + "/v1/completions", body)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    synth_model("tiny", "q8_0", path, seed=7)
    return path


@pytest.fixture
def procs():
    """Starts processes for one test and stops every one of them afterwards."""
    started: list[Proc] = []

    def start(cls, *args, **kwargs):
        proc = cls(*args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        with contextlib.suppress(Exception):
            proc.stop()


def wait_for(condition, timeout: float, what: str):
    """``condition()``'s first true value, polled every 0.1 s; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")
