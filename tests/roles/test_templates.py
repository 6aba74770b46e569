"""The units and the ruleset as the roles render them, checked by systemd-analyze and nft where present."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ansiblerun import REPO
from tests.roles.conftest import nft_usable

MAX_EXPOSURE = 3.0


def directives(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_worker_listens_on_its_cluster_address_with_its_inventory_port(rendered):
    venv = rendered / "venv"
    for host, address, port in (("pi1", "10.0.0.11", 50052), ("pi2", "10.0.0.12", 50060)):
        unit = directives(rendered / host / "llmfleet-rpc-worker.service")
        assert unit["ExecStart"] == [
            f"{venv}/bin/python -m inference worker --host {address} --allow-remote --port {port} "
            "--threads 0 --cache-dir %C/llmfleet-rpc-worker --cache-max-size 16G"
        ]
        assert unit["User"] == ["llmfleet-rpc"] and unit["Slice"] == ["llmfleet.slice"]
        assert unit["Restart"] == ["on-failure"]
        assert unit["CacheDirectory"] == ["llmfleet-rpc-worker"]
        assert unit["CapabilityBoundingSet"] == [""] and unit["MemoryDenyWriteExecute"] == ["yes"]
        assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
        assert "CPUAffinity" not in unit and "MemoryMax" not in unit
        assert "ReadWritePaths" not in unit


def test_head_serves_the_inventory_workers_with_the_key_as_a_credential(rendered):
    unit = directives(rendered / "gpu1" / "llmfleet-head.service")
    assert unit["ExecStart"] == [
        f"{rendered}/venv/bin/python -m inference serve --model /srv/models/qwen3-30b-a3b-q4_k.gguf "
        "--host 0.0.0.0 --port 8080 --split layer --ctx 8192 --parallel 2 --threads 0 --flash-attn auto "
        "--gpu-layers 999 --reasoning-format auto --rpc 10.0.0.11:50052,10.0.0.12:50060 --metrics-port 9180 "
        # Automatic degradation at the monitoring alert's 80 ms per output token, on by default.
        "--degrade-target-ms-per-token 80 --degrade-window 60 --degrade-max-tokens 256 "
        "--api-key-file %d/api-key"
    ]
    assert unit["LoadCredential"] == ["api-key:/etc/llmfleet/head-api-key"]
    assert unit["User"] == ["llmfleet-head"] and unit["PrivateDevices"] == ["yes"]
    assert unit["MemoryDenyWriteExecute"] == ["yes"]
    assert not any(v.startswith("LLAMA_CPP_LIB_PATH") for v in unit["Environment"])
    assert "NUMAPolicy" not in unit and "CPUAffinity" not in unit


def test_pinning_facts_limits_and_cuda_reach_the_units(rendered):
    worker = directives(rendered / "pi1-tuned" / "llmfleet-rpc-worker.service")
    assert worker["CPUAffinity"] == ["1 2 3"]
    assert worker["MemoryHigh"] == ["6G"] and worker["MemoryMax"] == ["7G"]
    head = directives(rendered / "gpu1-tuned" / "llmfleet-head.service")
    assert head["CPUAffinity"] == ["1 2 3"]
    assert head["NUMAPolicy"] == ["bind"] and head["NUMAMask"] == ["1"]
    assert "Environment" in head and "LLAMA_CPP_LIB_PATH=/opt/llama.cpp-cuda/lib" in head["Environment"]
    assert head["PrivateDevices"] == ["no"] and head["DevicePolicy"] == ["closed"]
    assert "char-nvidia-uvm rw" in head["DeviceAllow"]
    assert head["MemoryDenyWriteExecute"] == ["no"]
    assert "--metrics-port" not in head["ExecStart"][0]
    assert "--model /srv/models/synth-tiny-q8_0.gguf " in head["ExecStart"][0]


def test_arguments_with_specifiers_or_spaces_reach_the_head_whole(rendered):
    exec_start = directives(rendered / "gpu1-tuned" / "llmfleet-head.service")["ExecStart"][0]
    assert "--alias 'qwen 100%%'" in exec_start
    assert "--queue-size '$$8'" in exec_start
    assert " --no-cache-prompt " in exec_start  # gpu1, with the default, has none (see above)


def test_repacking_and_automatic_degradation_options_reach_the_units(rendered):
    # The defaults (pi1, gpu1 above) repack and leave degradation off, so neither unit names them.
    worker = directives(rendered / "pi1-tuned" / "llmfleet-rpc-worker.service")["ExecStart"][0]
    assert worker.endswith(" --no-repack")
    head = directives(rendered / "gpu1-tuned" / "llmfleet-head.service")["ExecStart"][0]
    assert " --degrade-target-ms-per-token 12.5 --degrade-window 30 --degrade-max-tokens 256 " in head


UNITS = [
    (host, unit)
    for host, unit in [("pi1", "llmfleet-rpc-worker.service"), ("gpu1", "llmfleet-head.service")]
    for host in (host, f"{host}-tuned")
]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(rendered):
    paths = [str(rendered / host / unit) for host, unit in UNITS]
    proc = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "llmfleet" not in proc.stderr, proc.stderr


def exposure(path: Path) -> float:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(("host", "unit"), UNITS)
def test_units_expose_at_most_three_by_systemd_analyze_security(host, unit, rendered):
    value = exposure(rendered / host / unit)
    assert value <= MAX_EXPOSURE, f"{unit} of {host} has exposure {value}"


def test_worker_ruleset_lets_the_head_alone_reach_rpc(rendered):
    text = (rendered / "pi1" / "llmfleet.nft").read_text()
    assert "table inet llmfleet {" in text and "delete table inet llmfleet" in text
    assert "elements = { 10.0.0.21 }" in text
    assert 'tcp dport 50052 counter drop comment "rpc_clients: anyone else"' in text
    assert "policy accept;" in text and "8080" not in text
    assert "dport 50060" in (rendered / "pi2" / "llmfleet.nft").read_text()
    assert not re.search(r"dport 22\b", text)
    # No worker metrics port by default: the node exporter's is the one metrics port guarded.
    assert re.findall(r'tcp dport (\d+) counter drop comment "metrics_clients', text) == ["9100"]
    assert "prometheus_clients" not in text  # Prometheus runs on the head


def test_the_node_exporter_and_prometheus_are_open_to_the_monitoring_host_and_its_clients(rendered):
    # Prometheus runs on the inference_head group's host (no monitoring group here): gpu1, 10.0.0.21.
    for host in ("pi1", "pi2", "gpu1"):
        text = (rendered / host / "llmfleet.nft").read_text()
        assert "tcp dport 9100 ip saddr @metrics_clients_v4 accept" in text, host
        metrics_set = text[text.index("set metrics_clients_v4") :]
        assert "elements = { 10.0.0.21 }" in metrics_set[: metrics_set.index("}") + 1], host
    head = (rendered / "gpu1" / "llmfleet.nft").read_text()
    assert 'tcp dport 9090 counter drop comment "prometheus_clients: anyone else"' in head
    clients = head[head.index("set prometheus_clients_v4") :]
    assert "elements" not in clients[: clients.index("}") + 1]  # [] by default: its own host alone


def test_alertmanager_is_guarded_beside_prometheus_when_the_monitoring_role_runs_it(rendered):
    head = (rendered / "gpu1-tuned" / "llmfleet.nft").read_text()
    assert "tcp dport 9093 ip saddr @alertmanager_clients_v4 accept" in head
    assert 'tcp dport 9093 counter drop comment "alertmanager_clients: anyone else"' in head
    clients = head[head.index("set alertmanager_clients_v4") :]
    assert "elements = { 192.0.2.0/24 }" in clients[: clients.index("}") + 1]
    # Off by default (gpu1), and never on a host without Prometheus.
    for host in ("gpu1", "pi1", "pi1-tuned"):
        assert "9093" not in (rendered / host / "llmfleet.nft").read_text(), host


def test_a_worker_metrics_port_is_open_to_the_metrics_clients_alone(rendered):
    text = (rendered / "pi1-tuned" / "llmfleet.nft").read_text()
    assert "tcp dport 50053 ip saddr @metrics_clients_v4 accept" in text
    assert 'tcp dport 50053 counter drop comment "metrics_clients: anyone else"' in text
    metrics_set = text[text.index("set metrics_clients_v4") :]
    assert metrics_set[: metrics_set.index("}") + 1].count("10.0.0.21") == 1


def test_head_ruleset_guards_api_and_metrics(rendered):
    text = (rendered / "gpu1" / "llmfleet.nft").read_text()
    assert 'tcp dport 8080 counter drop comment "api_clients: anyone else"' in text
    assert 'tcp dport 9180 counter drop comment "metrics_clients: anyone else"' in text
    assert "50052" not in text


def test_drop_policy_accepts_ssh_before_anything_is_dropped(rendered):
    text = (rendered / "gpu1-tuned" / "llmfleet.nft").read_text()
    assert "policy drop;" in text
    ssh = text.index('tcp dport 22 accept comment "ssh: never locked out"')
    assert ssh < text.index("ct state invalid drop") or text.index("established,related accept") < ssh
    assert ssh < text.index("counter drop")
    assert "tcp dport { 9100 } accept" in text and "udp dport { 68 } accept" in text
    assert "elements = { 10.0.0.0/24 }" in text and "elements = { fd00:10::/64 }" in text
    assert "9180" not in text  # metrics port 0: no separate listener, nothing to guard


@pytest.mark.skipif(not nft_usable(), reason="nft cannot check rulesets here")
@pytest.mark.parametrize("host", ["pi1", "pi1-tuned", "gpu1", "gpu1-tuned"])
def test_rulesets_pass_nft_check(host, rendered):
    path = rendered / host / "llmfleet.nft"
    proc = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_example_inventory_passes_the_checks_and_renders(tmp_path):
    from tests.roles.conftest import render

    out = render(tmp_path, inventory=REPO / "inventory/example", ansible_connection="local")
    head = directives(out / "gpu1" / "llmfleet-head.service")
    assert "--model /srv/models/Qwen3-30B-A3B-Q4_K_M.gguf " in head["ExecStart"][0]
    workers = ",".join(f"10.0.0.1{i}:50052" for i in range(1, 5))
    assert f"--rpc {workers}" in head["ExecStart"][0]
    assert "--alias qwen3-30b-a3b" in head["ExecStart"][0]
    assert "--split experts " in head["ExecStart"][0]
    assert "--sharded-cache-dir /var/lib/llmfleet/sharded --experts-partial-type f32" in head["ExecStart"][0]
    assert (
        "--degrade-target-ms-per-token 80 --degrade-window 60 --degrade-max-tokens 256 "
        in head["ExecStart"][0]
    )
    assert "LLAMA_CPP_LIB_PATH=/opt/llama.cpp-cuda/lib" in head["Environment"]
    assert directives(out / "pi3" / "llmfleet-rpc-worker.service")["MemoryMax"] == ["7G"]
    ruleset = (out / "pi3" / "llmfleet.nft").read_text()
    assert "elements = { 10.0.0.21 }" in ruleset
    assert "elements = { 10.0.0.0/24 }" in (out / "gpu1" / "llmfleet.nft").read_text()
