"""Validated settings of the serving head. The CLI builds a ServeConfig; everything else reads it."""

from __future__ import annotations

import math
import pathlib
import socket
from dataclasses import dataclass, field, replace

from inference.worker import ConfigError, usable_cpus

SPLIT_MODES = ("layer", "tensor", "experts", "none")
# The type in which each RPC worker's partial sum of a layer's experts comes back in --split experts (patch
# 0006's LLAMA_EXPERT_SPLIT_PARTIAL_TYPE): f32 is exact; f16 and q8_0 send 1/2 and 17/64 of its bytes and
# round each partial (distributed-llama's --buffer-float-type q80 makes the same trade).
EXPERTS_PARTIAL_TYPES = ("f32", "f16", "q8_0")
DEFAULT_SHARDED_CACHE = "~/.cache/llmfleet/sharded"
FLASH_ATTN_MODES = ("auto", "on", "off")
# llama-server's --reasoning-format values that this server knows: none keeps Qwen3's <think> blocks in the
# content; auto and deepseek move them to reasoning_content.
REASONING_FORMATS = ("auto", "deepseek", "none")
DEFAULT_PORT = 8080
GGUF_MAGIC = b"GGUF"
MAX_PARALLEL = 64
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_KEEPALIVE_TIMEOUT = 15.0
DEFAULT_MAX_CONNECTIONS = 512


def rpc_endpoint(item: str) -> tuple[str, int]:
    """One --rpc entry as ggml's RPC client reads it: (host, port), or a ConfigError naming the fix.

    ggml-rpc's ``parse_endpoint`` splits the entry at its first ':' and its client resolves the host with
    ``gethostbyname`` and connects over AF_INET: an IPv4 address or a name with an IPv4 address. An IPv6
    endpoint, bracketed or not, aborts the engine with "Failed to parse endpoint" or "Cannot resolve host".
    """
    if "[" in item or item.count(":") > 1:
        raise ConfigError(
            f"--rpc entry {item!r} is an IPv6 endpoint, but ggml's RPC client connects over IPv4 only; "
            "give the worker's IPv4 address, e.g. 10.0.0.11:50052 (the worker binds IPv4 only too)"
        )
    host, sep, port = item.partition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"--rpc entry {item!r} is not host:port (for example 10.0.0.11:50052)")
    return host, int(port)


def resolve_ipv4(item: str, host: str) -> str:
    """The IPv4 address ggml's client would connect to for ``host`` (``gethostbyname``: IPv4 only)."""
    try:
        return socket.gethostbyname(host)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(
            f"--rpc entry {item!r}: {host!r} has no IPv4 address here, and ggml's RPC client resolves names "
            "to IPv4 only; fix the name or give the worker's IPv4 address, e.g. 10.0.0.11:50052"
        ) from exc


def parse_endpoints(text: str) -> list[str]:
    """``host:port,host:port`` -> endpoints (IPv4 addresses or names)."""
    endpoints = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        rpc_endpoint(item)
        endpoints.append(item)
    return endpoints


def check_rpc_endpoints(endpoints: tuple[str, ...]) -> None:
    """Every entry usable by ggml's client, and no worker twice, however it is written."""
    seen: dict[tuple[str, int], str] = {}
    for item in endpoints:
        host, port = rpc_endpoint(item)
        worker = (resolve_ipv4(item, host), port)
        if worker in seen:
            raise ConfigError(
                f"--rpc lists the worker at {worker[0]}:{port} twice ({seen[worker]!r} and {item!r}); a worker "
                "serves one client at a time, so the head's second connection would never be answered: "
                "list each worker once"
            )
        seen[worker] = item


def parse_origins(items) -> tuple[str, ...]:
    """--cors-origin values (each one origin or a comma list) -> origins as browsers send them, or ``*``."""
    origins = []
    for raw in items:
        for part in raw.split(","):
            item = part.strip().lower().rstrip("/")
            if not item:
                continue
            scheme, sep, host = item.partition("://")
            if item != "*" and (
                not sep
                or not scheme.isascii()
                or not scheme[:1].isalpha()
                or not host
                or any(c in host for c in "/?#@ ")
            ):
                raise ConfigError(
                    f"--cors-origin {part.strip()!r} is not an origin; give scheme://host[:port] as a browser "
                    "sends it (https://chat.example.org, http://localhost:3000), or * for any origin"
                )
            if item not in origins:
                origins.append(item)
    return tuple(origins)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"{option} {text!r} must be comma-separated numbers, for example 1,1,2") from exc
    if not values or any(v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"{option} {text!r} needs non-negative weights with a positive sum")
    return values


@dataclass(frozen=True)
class ServeConfig:
    model: str
    rpc: tuple[str, ...] = ()
    split: str = "layer"
    tensor_split: tuple[float, ...] = ()
    ctx: int = 32768
    parallel: int = 4
    experts_used: int | None = None
    api_key_file: str | None = None
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API from a browser; "*" for any
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    metrics_port: int | None = None
    threads: int = 0
    batch: int = 2048
    ubatch: int = 512
    queue_size: int = 64
    flash_attn: str = "auto"
    threadpool: bool = True
    gpu_layers: int = 999
    model_alias: str | None = None
    retry_after: int = 5
    worker_probe_interval: float = 5.0
    rpc_timeout: float = 60.0
    sharded_cache_dir: str = DEFAULT_SHARDED_CACHE
    experts_partial_type: str = "f32"
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # request line and headers, from connect or first byte
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # a request's body, from the end of its headers
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT  # idle between requests on one connection
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    reasoning_format: str = "auto"  # "none" keeps <think> blocks in content; see inference.chat
    # A request starts from the longest prompt prefix that a free sequence's KV cache still holds (llama-server's
    # cache_prompt); finished sequences' cells are kept until their sequence id is taken again.
    cache_prompt: bool = True
    # Automatic degradation (inference.degrade): 0 turns it off.
    degrade_target_ms_per_token: float = 0.0
    degrade_window: float = 60.0
    degrade_max_tokens: int = 256
    api_key: str | None = field(default=None, repr=False)

    def validated(self) -> ServeConfig:
        path = pathlib.Path(self.model)
        if not path.is_file():
            raise ConfigError(f"--model {self.model}: no such file; give the path of a .gguf model")
        with path.open("rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                raise ConfigError(f"--model {self.model} is not a GGUF file (it lacks the GGUF magic)")
        if self.split not in SPLIT_MODES:
            raise ConfigError(f"--split {self.split!r} is not one of {', '.join(SPLIT_MODES)}")
        if self.flash_attn not in FLASH_ATTN_MODES:
            raise ConfigError(f"--flash-attn {self.flash_attn!r} is not one of {', '.join(FLASH_ATTN_MODES)}")
        if self.reasoning_format not in REASONING_FORMATS:
            raise ConfigError(
                f"--reasoning-format {self.reasoning_format!r} is not one of {', '.join(REASONING_FORMATS)}"
            )
        if self.split == "experts" and not self.rpc:
            raise ConfigError(
                "--split experts puts each layer's experts on the RPC workers; give them with --rpc"
            )
        if self.experts_partial_type not in EXPERTS_PARTIAL_TYPES:
            raise ConfigError(
                f"--experts-partial-type {self.experts_partial_type!r} is not one of "
                f"{', '.join(EXPERTS_PARTIAL_TYPES)}"
            )
        if self.experts_partial_type != "f32" and self.split != "experts":
            raise ConfigError(
                f"--experts-partial-type {self.experts_partial_type} applies to --split experts only (this is "
                f"--split {self.split}); drop it or use --split experts"
            )
        if self.split == "tensor" and self.flash_attn == "off":
            raise ConfigError("--split tensor needs flash attention; drop --flash-attn off")
        if self.ctx < 64:
            raise ConfigError(f"--ctx {self.ctx} is too small; use at least 64 tokens")
        if not 1 <= self.parallel <= MAX_PARALLEL:
            raise ConfigError(f"--parallel {self.parallel} must be between 1 and {MAX_PARALLEL}")
        if self.ctx // self.parallel < 32:
            raise ConfigError(
                f"--ctx {self.ctx} leaves {self.ctx // self.parallel} tokens to each of --parallel "
                f"{self.parallel} sequences; raise --ctx or lower --parallel"
            )
        if self.experts_used is not None and self.experts_used < 1:
            raise ConfigError(f"--experts-used {self.experts_used} must be at least 1")
        if not self.rpc_timeout > 0:
            raise ConfigError(
                f"--rpc-timeout {self.rpc_timeout} must be a positive number of seconds (default 60)"
            )
        if not self.worker_probe_interval > 0:
            raise ConfigError(
                f"--worker-probe-interval {self.worker_probe_interval} must be a positive number"
            )
        for option, seconds, default in (
            ("--header-timeout", self.header_timeout, DEFAULT_HEADER_TIMEOUT),
            ("--body-timeout", self.body_timeout, DEFAULT_BODY_TIMEOUT),
            ("--keepalive-timeout", self.keepalive_timeout, DEFAULT_KEEPALIVE_TIMEOUT),
        ):
            if not 0 < seconds < math.inf:
                raise ConfigError(
                    f"{option} {seconds} must be a positive number of seconds (default {default:g})"
                )
        if self.max_connections < 1:
            raise ConfigError(
                f"--max-connections {self.max_connections} must be at least 1 (default {DEFAULT_MAX_CONNECTIONS})"
            )
        if not 0 <= self.degrade_target_ms_per_token < math.inf:
            raise ConfigError(
                f"--degrade-target-ms-per-token {self.degrade_target_ms_per_token} must be a number of "
                "milliseconds, e.g. 80, or 0 to turn automatic degradation off"
            )
        if not 0 < self.degrade_window < math.inf:
            raise ConfigError(
                f"--degrade-window {self.degrade_window} must be a positive number of seconds (default 60)"
            )
        if self.degrade_max_tokens < 1:
            raise ConfigError(
                f"--degrade-max-tokens {self.degrade_max_tokens} must be at least 1 (default 256)"
            )
        if self.queue_size < 0:
            raise ConfigError(f"--queue-size {self.queue_size} must be 0 or more")
        if not 1 <= self.ubatch <= self.batch:
            raise ConfigError(f"--ubatch {self.ubatch} must be between 1 and --batch {self.batch}")
        for option, port in (("--port", self.port), ("--metrics-port", self.metrics_port)):
            if port is not None and not 0 <= port < 65536:
                raise ConfigError(f"{option} {port} is not a TCP port; use 1-65535 (0 picks a free one)")
        cors_origins = parse_origins(self.cors_origins)
        if self.tensor_split and self.rpc and len(self.tensor_split) < len(self.rpc):
            raise ConfigError(
                f"--tensor-split has {len(self.tensor_split)} weights for {len(self.rpc)} RPC workers; "
                "give one weight per device"
            )
        api_key = self.api_key
        if self.api_key_file:
            try:
                api_key = pathlib.Path(self.api_key_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"--api-key-file {self.api_key_file} cannot be read: {exc.strerror}"
                ) from exc
            if not api_key:
                raise ConfigError(
                    f"--api-key-file {self.api_key_file} is empty; put the key on its first line"
                )
        # Last, since it may resolve worker names.
        check_rpc_endpoints(self.rpc)
        return replace(
            self,
            model=str(path.resolve()),
            sharded_cache_dir=str(pathlib.Path(self.sharded_cache_dir).expanduser()),
            threads=self.threads or usable_cpus(),
            api_key=api_key,
            model_alias=self.model_alias or path.name.removesuffix(".gguf"),
            cors_origins=cors_origins,
        )

    @property
    def ctx_per_sequence(self) -> int:
        return self.ctx // self.parallel
