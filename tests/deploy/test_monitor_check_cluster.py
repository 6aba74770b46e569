"""playbooks/monitor.yml with --check --diff on hosts that lack Debian's Prometheus packages, as a fresh
Debian or Raspberry Pi OS host does: it reports the packages it would install, fails nothing and changes
nothing. The cluster image carries the packages, so the test purges them from two hosts first; the other
three keep them, and their check runs through the configuration tasks."""

from __future__ import annotations

import json

import pytest

from tests.ansiblerun import BIN, REPO, host_results, run_json

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

cluster_conftest = pytest.importorskip(
    "tests.cluster.conftest", reason="the local cluster harness (tests/cluster) is not in this checkout"
)
local_cluster = cluster_conftest.local_cluster

from tests.cluster import cluster, config, ssh  # noqa: E402  (only once the harness is known to be here)

INVENTORY = REPO / "inventory/local/hosts.yml"
PACKAGES = ["prometheus", "prometheus-alertmanager", "prometheus-node-exporter"]
BARE = [config.host_by_name(name) for name in ("pi1", "gpu1")]  # a worker and the monitoring host
STATE = (
    "dpkg-query -W -f '${Package} ${db:Status-Abbrev}\\n' " + " ".join(PACKAGES) + " 2>&1; "
    "ls -la /etc/default /etc/prometheus 2>&1; "
    "systemctl list-units --all --no-legend --plain 'prometheus*'"
)


def read_state(host) -> str:
    result = ssh.run(host, STATE, check=False)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def checked(local_cluster, tmp_path_factory):
    cluster.down()
    cluster.up()
    try:
        for host in BARE:
            ssh.run(host, "DEBIAN_FRONTEND=noninteractive apt-get -y -q purge " + " ".join(PACKAGES))
        before = {host.name: read_state(host) for host in BARE}
        tmp = tmp_path_factory.mktemp("monitor-check")
        rc, output = run_json(
            tmp,
            [
                str(BIN / "ansible-playbook"),
                "-i",
                str(INVENTORY),
                "playbooks/monitor.yml",
                "--check",
                "--diff",
                "-e",
                "monitoring_alertmanager=true",
            ],
            timeout=600,
            ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        )
        after = {host.name: read_state(host) for host in BARE}
        yield rc, output, before, after
    finally:
        # Hosts with the image's packages again, for the tests that come after.
        cluster.down()
        cluster.up()


def test_check_mode_succeeds_on_hosts_with_and_without_the_packages(checked):
    rc, output, _, _ = checked
    assert rc == 0, json.dumps(output["stats"])
    for host, stats in output["stats"].items():
        assert stats["failures"] == 0 and stats["unreachable"] == 0, (host, stats)


def test_the_packages_it_would_install_are_reported_and_their_configuration_left_for_the_real_run(checked):
    _, output, before, after = checked
    head = host_results(output, "gpu1")
    for task in ("Install the node exporter", "Install Prometheus", "Install Alertmanager"):
        assert head[f"monitoring : {task}"].get("changed"), (task, head[f"monitoring : {task}"])
    for task in ("Make Prometheus listen on its port", "Write the scrape configuration", "Run Prometheus"):
        assert head[f"monitoring : {task}"].get("skipped"), (task, head[f"monitoring : {task}"])
    worker = host_results(output, "pi1")
    assert worker["monitoring : Install the node exporter"].get("changed")
    assert worker["monitoring : Run the node exporter"].get("skipped")
    for host in BARE:
        assert after[host.name] == before[host.name], f"{host.name} changed under --check"
        installed = [package for package in PACKAGES if f"{package} ii" in before[host.name]]
        assert not installed, f"{host.name} still had {installed}: the purge did not run"


def test_hosts_that_have_the_packages_get_their_configuration_checked(checked):
    _, output, _, _ = checked
    # pi2 keeps the image's packages: the check compares the role's defaults file with the package's.
    results = host_results(output, "pi2")
    listen = results["monitoring : Make the node exporter listen on its port"]
    assert listen.get("changed") and "--web.listen-address=:9100" in listen["diff"][0]["after"], listen
    assert not results["monitoring : Run the node exporter"].get("skipped")
