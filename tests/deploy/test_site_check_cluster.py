"""playbooks/site.yml with --check --diff on hosts that were never deployed (as `up` creates them): it
reports what the first real run would install and start, fails nothing and changes nothing. After a
converged run the site tests check the same (test_site_cluster.py); this is the first look a new user
takes at a cluster."""

from __future__ import annotations

import json

import pytest

from tests.ansiblerun import host_results

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

cluster_conftest = pytest.importorskip(
    "tests.cluster.conftest", reason="the local cluster harness (tests/cluster) is not in this checkout"
)
local_cluster = cluster_conftest.local_cluster

from tests.cluster import cluster, config, ssh, wheelhouse  # noqa: E402  (only once the harness is here)
from tests.deploy.test_site_cluster import site_run  # noqa: E402

HOSTS = [config.host_by_name(name) for name in ("pi1", "gpu1")]  # a worker and the head
# What a deployment leaves on a host, read the way an operator would look.
STATE = (
    "ls -la /opt/llmfleet /opt/llmfleet/venv /etc/llmfleet /var/lib/llmfleet /etc/nftables.d 2>&1; "
    "cat /etc/nftables.conf 2>&1; nft list tables 2>&1; "
    "systemctl list-units --all --no-legend --plain 'llmfleet*' 'prometheus*'; "
    "getent passwd | cut -d: -f1 | sort"
)


def read_state(host) -> str:
    result = ssh.run(host, STATE, check=False)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def checked(local_cluster, tmp_path_factory):
    if not wheelhouse.is_complete(wheelhouse.deps_dir()):
        pytest.skip("the hosts' wheelhouse is not filled: run `python -m tests.cluster wheelhouse`")
    # Hosts as `up` creates them: nothing of llmfleet deployed yet.
    cluster.down()
    cluster.up()
    before = {host.name: read_state(host) for host in HOSTS}
    rc, output = site_run(tmp_path_factory.mktemp("site-check"), "--check", "--diff", timeout=1800)
    after = {host.name: read_state(host) for host in HOSTS}
    return rc, output, before, after


def test_check_mode_on_never_deployed_hosts_fails_nothing(checked):
    rc, output, _, _ = checked
    for host, stats in output["stats"].items():
        assert stats["failures"] == 0 and stats["unreachable"] == 0, (host, json.dumps(output["stats"]))
    assert rc == 0, json.dumps(output["stats"])


def test_it_reports_what_the_first_run_would_install_and_start(checked):
    _, output, _, _ = checked
    worker = host_results(output, "pi1")
    for task in (
        "rpc_worker : Write the RPC worker's systemd unit",
        "inference_package : Create the virtual environment",
        "firewall : Write the llmfleet ruleset, checked by nft before it is saved",
    ):
        assert worker[task].get("changed"), (task, worker[task])
    head = host_results(output, "gpu1")
    assert head["inference_head : Write the inference head's systemd unit"].get("changed")


def test_it_changes_nothing_on_the_hosts(checked):
    _, _, before, after = checked
    for host in HOSTS:
        # ... which had nothing installed before (the harness leaves only the hosts' wheelhouse in /opt/llmfleet).
        assert "cannot access '/opt/llmfleet/venv'" in before[host.name], before[host.name]
        assert after[host.name] == before[host.name], f"{host.name} changed under --check"
