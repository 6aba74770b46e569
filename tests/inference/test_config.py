"""What ggml's RPC code can use: --rpc entries of the head and --host of the worker, refused early otherwise.

ggml-rpc splits an endpoint at its first ':' and speaks IPv4 alone: the client resolves the host with
gethostbyname, the server binds inet_addr(host). Anything else used to pass validation and end in an abort
("Failed to parse endpoint") or a traceback.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from inference import config as config_module
from inference.config import ServeConfig, parse_endpoints
from inference.worker import ConfigError, WorkerConfig
from tests.inference.conftest import free_port


def serve_config(tiny_model, *rpc: str) -> ServeConfig:
    return ServeConfig(model=str(tiny_model), rpc=rpc).validated()


def refused_on_the_command_line(*args: str) -> str:
    """``python -m inference ARGS``, which must exit with argparse's usage status (2) and no traceback; its
    standard error."""
    result = subprocess.run(
        [sys.executable, "-m", "inference", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize("entry", ["[::1]:50052", "::1:50052", "[fd00::11]:50052", "fd00::11:50052"])
def test_an_ipv6_rpc_entry_is_refused_naming_the_option_and_the_fix(tiny_model, entry):
    fragment = f"--rpc entry '{entry}' is an IPv6 endpoint, but ggml's RPC client connects over IPv4 only"
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as caught:
        serve_config(tiny_model, "127.0.0.1:50052", entry)
    assert "give the worker's IPv4 address, e.g. 10.0.0.11:50052" in str(caught.value)
    with pytest.raises(ConfigError, match="IPv6 endpoint"):
        parse_endpoints(f"127.0.0.1:50052,{entry}")


def test_serve_refuses_an_ipv6_worker_on_the_command_line(tiny_model):
    stderr = refused_on_the_command_line("serve", "--model", str(tiny_model), "--rpc", "[::1]:50052")
    assert "--rpc entry '[::1]:50052' is an IPv6 endpoint" in stderr


def test_a_worker_name_with_an_ipv4_address_is_kept_as_written(tiny_model):
    assert serve_config(tiny_model, "localhost:50052", "127.0.0.1:50053").rpc == (
        "localhost:50052",
        "127.0.0.1:50053",
    )


def test_a_worker_name_without_an_ipv4_address_is_refused(tiny_model, monkeypatch):
    def no_ipv4(host: str) -> str:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(config_module.socket, "gethostbyname", no_ipv4)
    with pytest.raises(ConfigError) as caught:
        serve_config(tiny_model, "pi9:50052")
    message = str(caught.value)
    assert message.startswith("--rpc entry 'pi9:50052': 'pi9' has no IPv4 address here")
    assert "resolves names to IPv4 only" in message


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:50052", "127.0.0.1:50052"),
        ("localhost:50052", "127.0.0.1:50052"),  # one worker under two names
        ("127.0.0.1:50052", "127.0.0.1:050052"),
    ],
)
def test_the_same_worker_twice_is_refused(tiny_model, first, second):
    with pytest.raises(ConfigError) as caught:
        serve_config(tiny_model, first, "127.0.0.2:50052", second)
    message = str(caught.value)
    assert message.startswith(f"--rpc lists the worker at 127.0.0.1:50052 twice ('{first}' and '{second}')")
    assert "list each worker once" in message


def test_one_address_on_two_ports_is_two_workers(tiny_model):
    assert len(serve_config(tiny_model, "127.0.0.1:50052", "127.0.0.1:50053").rpc) == 2


@pytest.mark.parametrize("host", ["::1", "::", "fd00::11", "localhost", "pi1", "255.255.255.255", ""])
def test_a_worker_host_ggml_cannot_bind_is_refused_naming_the_option_and_the_fix(host):
    with pytest.raises(ConfigError) as caught:
        WorkerConfig(host=host, port=free_port(), allow_remote=True).validated()
    message = str(caught.value)
    assert message.startswith(f"--host {host!r} is not an IPv4 address such as 127.0.0.1")
    assert "give 127.0.0.1 for this machine alone" in message


@pytest.mark.parametrize("host", ["::1", "localhost"])
def test_worker_refuses_such_a_host_on_the_command_line_without_a_traceback(host):
    stderr = refused_on_the_command_line("worker", "--host", host, "--port", str(free_port()))
    assert f"--host {host!r} is not an IPv4 address" in stderr


def test_a_worker_host_that_is_not_an_address_of_this_machine_is_refused():
    # 192.0.2.0/24 is documentation space (RFC 5737): no machine has it.
    with pytest.raises(ConfigError) as caught:
        WorkerConfig(host="192.0.2.1", port=free_port(), allow_remote=True).validated()
    assert str(caught.value).startswith("--host 192.0.2.1 is not an address of this machine")


def test_a_worker_port_in_use_is_refused():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port} on 127.0.0.1 is taken by another process"):
            WorkerConfig(port=port).validated()
        # Every address includes this one.
        with pytest.raises(ConfigError, match=f"--port {port} on 0.0.0.0 is taken"):
            WorkerConfig(host="0.0.0.0", port=port, allow_remote=True).validated()


def test_a_bindable_worker_host_passes():
    port = free_port()
    assert WorkerConfig(host="127.0.0.1", port=port).validated().endpoint == f"127.0.0.1:{port}"
    assert WorkerConfig(host="127.0.0.2", port=port).validated().host == "127.0.0.2"
    assert WorkerConfig(host="0.0.0.0", port=port, allow_remote=True).validated().threads >= 1


@pytest.mark.parametrize(
    ("split", "partial", "words"),
    [
        ("experts", "bf16", ["--experts-partial-type 'bf16' is not one of f32, f16, q8_0"]),
        ("layer", "q8_0", ["--experts-partial-type q8_0 applies to --split experts only", "--split layer"]),
        ("none", "f16", ["applies to --split experts only", "drop it or use --split experts"]),
    ],
)
def test_a_partial_type_is_refused_naming_the_option_and_the_fix(tiny_model, split, partial, words):
    config = ServeConfig(
        model=str(tiny_model), rpc=("127.0.0.1:50052",), split=split, experts_partial_type=partial
    )
    with pytest.raises(ConfigError) as caught:
        config.validated()
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize("partial", config_module.EXPERTS_PARTIAL_TYPES)
def test_every_partial_type_passes_with_the_expert_split(tiny_model, partial):
    config = ServeConfig(
        model=str(tiny_model), rpc=("127.0.0.1:50052",), split="experts", experts_partial_type=partial
    ).validated()
    assert config.experts_partial_type == partial


def test_serve_refuses_a_partial_type_without_the_expert_split_on_the_command_line(tiny_model):
    stderr = refused_on_the_command_line("serve", "--model", str(tiny_model), "--experts-partial-type", "f16")
    assert "--experts-partial-type f16 applies to --split experts only" in stderr
