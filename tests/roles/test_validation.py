"""A wrong setting fails before any change, with a message that names the variable and what it expects."""

from __future__ import annotations

import pytest
import yaml

from tests.ansiblerun import BIN, REPO, host_results, playbook, run

HEAD = {"inference_head_model_src": "/srv/models/m.gguf", "inference_head_rpc_workers": ["10.0.0.11:50052"]}

# name: (role, variables, words the failure message must contain)
CASES = {
    "worker_port_not_a_number": ("rpc_worker", {"rpc_worker_port": "fifty"}, ["rpc_worker_port", "int"]),
    "worker_on_every_interface": (
        "rpc_worker",
        {"rpc_worker_host": "0.0.0.0"},
        ["rpc_worker_host is 0.0.0.0", "Set rpc_worker_host to the cluster interface's address"],
    ),
    "worker_affinity_not_cpus": (
        "rpc_worker",
        {"rpc_worker_host": "10.0.0.11", "rpc_worker_cpu_affinity": "all"},
        ["rpc_worker_cpu_affinity 'all'", '"1 2 3"'],
    ),
    "head_split_unknown": (
        "inference_head",
        {**HEAD, "inference_head_split": "diagonal"},
        ["inference_head_split", "layer, tensor, experts, none"],
    ),
    "head_url_without_digest": (
        "inference_head",
        {"inference_head_model_url": "http://127.0.0.1/m.gguf", "inference_head_rpc_workers": []},
        [
            "Set exactly one of inference_head_model_url (with inference_head_model_sha256",
            "inference_head_model_synth",
        ],
    ),
    "head_two_model_sources": (
        "inference_head",
        {
            **HEAD,
            "inference_head_model_url": "http://127.0.0.1/m.gguf",
            "inference_head_model_sha256": "a" * 64,
        },
        ["Set exactly one of"],
    ),
    "head_tensor_split_without_flash_attention": (
        "inference_head",
        {**HEAD, "inference_head_split": "tensor", "inference_head_flash_attn": "off"},
        ["tensor split needs flash attention"],
    ),
    "head_expert_split_without_workers": (
        "inference_head",
        {**HEAD, "inference_head_split": "experts", "inference_head_rpc_workers": []},
        ["inference_head_split experts", "the expert split RPC workers"],
    ),
    "head_partial_type_without_the_expert_split": (
        "inference_head",
        {**HEAD, "inference_head_experts_partial_type": "q8_0"},
        [
            "inference_head_experts_partial_type is q8_0 but inference_head_split is layer",
            "Set inference_head_split",
        ],
    ),
    "head_partial_type_unknown": (
        "inference_head",
        {**HEAD, "inference_head_split": "experts", "inference_head_experts_partial_type": "bf16"},
        ["inference_head_experts_partial_type", "f32, f16, q8_0", "bf16"],
    ),
    "head_cuda_without_a_build": (
        "inference_head",
        {**HEAD, "inference_head_backend": "cuda"},
        ["inference_head_llama_cpp_lib_path is ''", "-DGGML_CUDA=on"],
    ),
    "head_workers_not_endpoints": (
        "inference_head",
        {**HEAD, "inference_head_rpc_workers": ["pi1"]},
        ["inference_head_rpc_workers is ['pi1']", "10.0.0.11:50052"],
    ),
    "firewall_guarding_ssh": (
        "firewall",
        {"firewall_manage_rpc": True, "firewall_ssh_port": 50052},
        ["firewall_ssh_port 50052 is among the ports this role guards"],
    ),
    "firewall_client_not_an_address": (
        "firewall",
        {"firewall_manage_api": True, "firewall_api_allowed_cidrs": ["10.0.0.0/24", "everyone"]},
        ["firewall_api_allowed_cidrs has ['everyone']"],
    ),
    "firewall_alertmanager_client_not_an_address": (
        "firewall",
        {"monitoring_alertmanager": True, "firewall_alertmanager_allowed_cidrs": ["monitoring.example"]},
        ["firewall_alertmanager_allowed_cidrs has ['monitoring.example']"],
    ),
    "alertmanager_args_not_flags": (
        "monitoring",
        {
            "monitoring_alertmanager": True,
            "monitoring_alertmanager_args": ["--log.level=debug", "--web.external-url=http://a b"],
        },
        ["monitoring_alertmanager_args has ['--web.external-url=http://a b']", "one an element"],
    ),
    "prometheus_args_not_flags": (
        "monitoring",
        {"monitoring_prometheus_args": ["--storage.tsdb.retention.time=30d", "--web.enable-admin-api yes"]},
        ["monitoring_prometheus_args has ['--web.enable-admin-api yes']", "one an element"],
    ),
    "node_exporter_args_not_flags": (
        "monitoring",
        {"monitoring_node_exporter_args": ["collector.systemd"]},
        ["monitoring_node_exporter_args has ['collector.systemd']", "--name=value"],
    ),
    "package_isolation_unknown": (
        "inference_package",
        {"inference_package_build_isolation": "sometimes"},
        ["inference_package_build_isolation", "auto, always, never"],
    ),
    "package_requirement_unpinned": (
        "inference_package",
        {"inference_package_requirements": ["numpy"]},
        ["unpinned:", "['numpy']"],
    ),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("reject")
    hosts = {name: {"case_role": role, **variables} for name, (role, variables, _) in CASES.items()}
    inventory = tmp / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump(
            {"all": {"vars": {"ansible_connection": "local"}, "children": {"cases": {"hosts": hosts}}}}
        )
    )
    _, output = playbook(tmp, REPO / "tests/roles/reject.yml", inventory, {}, "--check")
    return {name: host_results(output, name)["Report the outcome"]["msg"] for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_bad_setting_fails_in_validation_naming_it(name, outcomes):
    _, _, words = CASES[name]
    outcome = outcomes[name]
    # The argument spec or one of the roles' first checks, which all run before any change, failed.
    assert outcome.startswith(("Validating arguments against arg spec", "Check ")), outcome
    for word in words:
        assert word in outcome, outcome


PLAYBOOKS = ["playbooks/deploy.yml", "playbooks/site.yml", "tests/roles/render.yml", "tests/roles/reject.yml"]


@pytest.mark.parametrize("path", PLAYBOOKS)
def test_playbook_passes_syntax_check_with_the_example_inventory(path, tmp_path):
    if path == "playbooks/site.yml" and not (REPO / "playbooks/tune.yml").exists():
        pytest.skip("playbooks/site.yml imports playbooks/tune.yml, which the tuning roles bring")
    proc = run(
        tmp_path,
        [
            str(BIN / "ansible-playbook"),
            "--syntax-check",
            "-i",
            str(REPO / "inventory/example"),
            str(REPO / path),
        ],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_second_head_is_refused_by_the_head_and_the_workers_firewall(tmp_path):
    # Two heads would take the same workers from each other: the head's role and the firewall that would
    # open the workers' RPC port to both refuse before any change.
    inventory = tmp_path / "inventory.yml"
    cases = {"gpu1": {"case_role": "inference_head", **HEAD}, "pi1": {"case_role": "firewall"}}
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "vars": {"ansible_connection": "local"},
                    "children": {
                        "cases": {"hosts": cases},
                        "inference_head": {"hosts": {"gpu1": {}, "gpu2": {}}},
                        "rpc_workers": {"hosts": {"pi1": {}}},
                    },
                }
            }
        )
    )
    _, output = playbook(tmp_path, REPO / "tests/roles/reject.yml", inventory, {}, "--check")
    for host in cases:
        outcome = host_results(output, host)["Report the outcome"]["msg"]
        assert outcome.startswith("Check "), outcome
        assert "The inference_head group has 2 hosts (gpu1, gpu2)" in outcome
        assert "a worker serves one head at a time" in outcome
        assert "Keep one host in inference_head" in outcome
