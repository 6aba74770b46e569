"""playbooks/tune.yml with --check --diff on freshly created cluster hosts: it reports what it would change,
with the before and after of each change, and changes nothing on the hosts."""

from __future__ import annotations

import json

import pytest

from tests.ansiblerun import BIN, REPO, run_json

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

cluster_conftest = pytest.importorskip(
    "tests.cluster.conftest", reason="the local cluster harness (tests/cluster) is not in this checkout"
)
local_cluster = cluster_conftest.local_cluster

from tests.cluster import cluster, config, ssh  # noqa: E402  (only once the harness is known to be here)

INVENTORY = REPO / "inventory/local/hosts.yml"
HOSTS = [config.host_by_name(name) for name in ("pi1", "gpu1")]

# What the tuning roles would touch, read the way an operator would look.
STATE = {
    "governors": "cat /sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor",
    "thp": "cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag",
    "vm": "cd /proc/sys/vm && grep -H . swappiness dirty_ratio dirty_background_ratio vfs_cache_pressure",
    "files": "ls -la /etc/sysctl.d /etc/tmpfiles.d /etc/systemd/system /usr/local/sbin; cat /etc/fstab",
    "udev": "ls -la /etc/udev 2>&1",
    "mounts": "findmnt --list --noheadings --output TARGET,SOURCE,OPTIONS",
    "units": "systemctl list-units --all --no-legend --plain 'llmfleet*' 'cups*' 'avahi*'; systemctl get-default",
}

# Modules that report a change in check mode without a diff of their own (ansible.posix.sysctl and
# ansible.posix.mount do not support diff mode); every other change must show its before and after.
NO_DIFF_ACTIONS = {"ansible.posix.sysctl", "ansible.posix.mount", "ansible.builtin.command"}


def read_state(host) -> dict[str, str]:
    state = {}
    for name, command in STATE.items():
        result = ssh.run(host, command, check=False)
        state[name] = f"rc {result.returncode}\n{result.stdout}{result.stderr}"
    return state


@pytest.fixture(scope="module")
def checked(local_cluster, tmp_path_factory):
    # Hosts as `up` creates them: base image, factory hardware, nothing applied yet.
    cluster.down()
    cluster.up()
    before = {host.name: read_state(host) for host in HOSTS}
    tmp = tmp_path_factory.mktemp("tune-check")
    rc, output = run_json(
        tmp,
        [str(BIN / "ansible-playbook"), "-i", str(INVENTORY), "playbooks/tune.yml", "--check", "--diff"],
        timeout=1200,
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
    )
    after = {host.name: read_state(host) for host in HOSTS}
    return rc, output, before, after


def changed_results(output: dict, host: str) -> list[tuple[str, dict]]:
    """(task name, result) of every change the host reported, one per loop item."""
    found = []
    for play in output["plays"]:
        for task in play["tasks"]:
            result = task["hosts"].get(host)
            if not result or not result.get("changed"):
                continue
            for item in result.get("results") or [result]:
                if item.get("changed"):
                    found.append((task["task"]["name"], {"action": result.get("action"), **item}))
    return found


def test_check_mode_succeeds_and_reports_changes_on_every_host(checked):
    rc, output, _, _ = checked
    assert rc == 0, json.dumps(output["stats"])
    for host, stats in output["stats"].items():
        assert stats["failures"] == 0 and stats["unreachable"] == 0, (host, stats)
        assert stats["changed"] > 0, (host, stats)


@pytest.mark.parametrize("host", [host.name for host in HOSTS])
def test_check_mode_changes_nothing_on_the_host(checked, host):
    _, _, before, after = checked
    for name in STATE:
        assert after[host][name] == before[host][name], f"{host}: {name} changed under --check"


@pytest.mark.parametrize("host", [host.name for host in HOSTS])
def test_every_reported_change_shows_before_and_after(checked, host):
    _, output, _, _ = checked
    changes = changed_results(output, host)
    assert changes
    missing = [
        name for name, result in changes if not result.get("diff") and result["action"] not in NO_DIFF_ACTIONS
    ]
    assert not missing, f"{host}: changes without a diff: {missing}"


def test_diff_shows_the_governor_and_thp_values_it_would_set(checked):
    _, output, before, _ = checked
    diffs: dict[str, dict[str, str]] = {}
    for name, result in changed_results(output, "pi1"):
        diff = result.get("diff")
        if isinstance(diff, dict) and isinstance(diff.get("before"), str):  # one per loop item: join them
            joined = diffs.setdefault(name, {"before": "", "after": ""})
            joined["before"] += diff["before"]
            joined["after"] += diff["after"]
    governor = diffs["cpu_tuning : Set the CPU governor on every CPU now"]
    assert "scaling_governor: ondemand" in governor["before"] and "ondemand" in before["pi1"]["governors"]
    assert "scaling_governor: performance" in governor["after"]
    thp = diffs["memory_tuning : Set transparent huge pages now"]
    assert "enabled: always" in thp["before"] and "enabled: madvise" in thp["after"]
