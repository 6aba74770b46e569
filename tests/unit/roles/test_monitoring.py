"""The monitoring role's Prometheus files, rendered as the role renders them: promtool accepts the rules and
the scrape configuration, the alert rules pass their unit tests (tests/monitoring), the thresholds are the
role's variables, and the scrape targets are the inventory's hosts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ansible_playbook import REPO, run_playbook

PLAYBOOK = Path(__file__).with_name("render_monitoring.yml")
RULE_TESTS = REPO / "tests" / "monitoring" / "llmfleet-rules.test.yml"
INVENTORY = REPO / "inventory" / "local" / "hosts.yml"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: `make system-packages` installs Debian's prometheus package"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, check=False)


def render(directory: Path, **variables) -> Path:
    directory.mkdir()
    extra = directory / "extra.json"
    extra.write_text(json.dumps({"render_dir": str(directory), **variables}))
    run = run_playbook(PLAYBOOK, INVENTORY, "-e", f"@{extra}")
    failure, _ = run.first_failure("localhost")
    assert failure is None, f"{failure.task}: {failure.message}"
    shutil.copy(RULE_TESTS, directory)
    return directory


@pytest.fixture(scope="module")
def defaults(tmp_path_factory) -> Path:
    return render(tmp_path_factory.mktemp("monitoring") / "defaults")


def test_promtool_accepts_the_rules_and_the_scrape_configuration(defaults):
    rules = promtool("check", "rules", "llmfleet-rules.yml", cwd=defaults)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = promtool("check", "config", "prometheus.yml", cwd=defaults)
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_alert_passes_its_unit_tests(defaults):
    result = promtool("test", "rules", RULE_TESTS.name, cwd=defaults)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {
        rule["alert"]
        for group in yaml.safe_load((defaults / "llmfleet-rules.yml").read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}  # fmt: skip
    assert alerts == tested, f"alerts without a unit test: {sorted(alerts - tested)}"


def test_the_thresholds_are_the_roles_variables(tmp_path):
    # the unit tests' slow head takes 100 ms a token and its busiest host uses 95% of its memory: above the
    # defaults, below these
    moved = render(
        tmp_path / "moved", monitoring_token_latency_alert_ms=120, monitoring_memory_alert_ratio=0.96
    )
    result = promtool("test", "rules", RULE_TESTS.name, cwd=moved)
    assert result.returncode != 0
    report = result.stdout + result.stderr
    failed = {
        line.split("alertname: ")[1].split(",")[0] for line in report.splitlines() if "alertname: " in line
    }
    assert failed == {"LlmfleetTokenLatencyHigh", "LlmfleetHostMemoryHigh"}, report


def test_the_scrape_targets_are_the_inventorys_hosts(defaults):
    config = yaml.safe_load((defaults / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    hosts = yaml.safe_load(INVENTORY.read_text())["all"]["children"]
    # A group such as monitoring lists hosts by name alone; their address is in their main group.
    address = {
        name: spec["ansible_host"]
        for group in hosts.values()
        for name, spec in group["hosts"].items()
        if spec
    }
    node = {c["labels"]["host"]: c["targets"] for c in jobs["node"]}
    assert node == {name: [f"{ip}:9100"] for name, ip in address.items()}
    head = {c["labels"]["host"]: c["targets"] for c in jobs["llmfleet_head"]}
    assert head == {"gpu1": [f"{address['gpu1']}:9180"]}
    # The local inventory's workers serve metrics of their own (rpc_workers.yml: rpc_worker_metrics_port).
    workers = {c["labels"]["host"]: c["targets"] for c in jobs["llmfleet_worker"]}
    assert workers == {name: [f"{address[name]}:9181"] for name in hosts["rpc_workers"]["hosts"]}


def test_alertmanager_is_off_by_default_and_gets_the_alerts_when_on(defaults, tmp_path):
    assert "alerting" not in yaml.safe_load((defaults / "prometheus.yml").read_text())
    rendered = render(
        tmp_path / "alertmanager", monitoring_alertmanager=True, monitoring_alertmanager_port=9393
    )
    config = promtool("check", "config", "prometheus.yml", cwd=rendered)
    assert config.returncode == 0, config.stdout + config.stderr
    alerting = yaml.safe_load((rendered / "prometheus.yml").read_text())["alerting"]
    assert alerting == {"alertmanagers": [{"static_configs": [{"targets": ["localhost:9393"]}]}]}


def test_the_ports_set_for_prometheus_and_the_node_exporters_are_the_targets(tmp_path):
    rendered = render(tmp_path / "ports", monitoring_prometheus_port=9095, monitoring_node_exporter_port=9110)
    jobs = {
        job["job_name"]: job["static_configs"]
        for job in yaml.safe_load((rendered / "prometheus.yml").read_text())["scrape_configs"]
    }
    assert jobs["prometheus"] == [{"targets": ["localhost:9095"]}]
    assert {target.rsplit(":", 1)[1] for c in jobs["node"] for target in c["targets"]} == {"9110"}


def test_workers_with_a_metrics_port_are_scraped(tmp_path):
    rendered = render(tmp_path / "workers", rpc_worker_metrics_port=50053)
    config = promtool("check", "config", "prometheus.yml", cwd=rendered)
    assert config.returncode == 0, config.stdout + config.stderr
    jobs = {
        job["job_name"]: job["static_configs"]
        for job in yaml.safe_load((rendered / "prometheus.yml").read_text())["scrape_configs"]
    }
    workers = {c["labels"]["host"]: c["targets"] for c in jobs["llmfleet_worker"]}
    hosts = yaml.safe_load(INVENTORY.read_text())["all"]["children"]["rpc_workers"]["hosts"]
    assert workers == {name: [f"{spec['ansible_host']}:50053"] for name, spec in hosts.items()}
