"""playbooks/guard_cluster.yml: a host that drops out of the run stops it before the next play.

The hosts run on this machine (ansible_connection local) except the one made unreachable: SSH to a
loopback port where nothing listens, so its first task is UNREACHABLE at once. The real site.yml and
deploy.yml run in check mode; the tuning roles read fake sysfs trees.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests import fakehw
from tests.ansible_playbook import REPO, PlaybookRun, local_inventory, run_playbook
from tests.inference.conftest import free_port

GUARD_TASK = "Stop when a host of the cluster has dropped out of the run"
GUARD_PLAY = "Check that every worker and the head are still in the run"


def unreachable_host() -> dict:
    return {
        "ansible_connection": "ssh",
        "ansible_host": "127.0.0.1",
        "ansible_port": free_port(),
        "ansible_ssh_common_args": "-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
    }


def cluster_inventory(path: Path, hosts: dict[str, dict]) -> Path:
    return local_inventory(path, hosts, {"rpc_workers": ["pi1", "pi2", "pi3"], "inference_head": ["gpu1"]})


def play_names(run: PlaybookRun) -> list[str]:
    return [play["play"]["name"] for play in run.report["plays"]]


def guard_failure(run: PlaybookRun) -> str:
    failures = [
        task
        for host in ("pi1", "pi2", "pi3", "gpu1", "localhost")
        for task in run.host_tasks(host)
        if task.task == GUARD_TASK and task.failed
    ]
    assert len(failures) == 1, [(t.task, t.result) for t in failures]
    return failures[0].message


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("guard")
    return {
        "pi1": str(fakehw.build("pi5", base / "pi1")),
        "pi2": str(fakehw.build("pi5", base / "pi2")),
        "pi3": str(fakehw.build("pi5", base / "pi3")),
        "gpu1": str(fakehw.build("x86", base / "gpu1")),
    }


@pytest.mark.slow
def test_site_stops_before_the_head_when_a_worker_is_unreachable(trees, tmp_path):
    hosts = {name: {"tuning_facts_root": root} for name, root in trees.items()}
    hosts["pi2"].update(unreachable_host())
    inventory = cluster_inventory(tmp_path / "inventory.yml", hosts)
    run = run_playbook(REPO / "playbooks" / "site.yml", inventory, "--check", "--skip-tags", "debloat")
    assert run.returncode != 0
    assert any(task.result.get("unreachable") for task in run.host_tasks("pi2"))
    # Only the workers' boot configuration and the check ran: the head was neither tuned nor deployed. The
    # reboot play (serial: 1) shows one batch per worker, each with no host left to run on.
    assert play_names(run) == [
        "Configure the boot files of the Raspberry Pi RPC workers",
        *["Reboot the Raspberry Pis whose boot configuration changed, one at a time"] * 3,
        GUARD_PLAY,
    ]
    assert [task.task for task in run.host_tasks("pi1") if "pi_boot" in task.task] == []
    assert [task.task for task in run.host_tasks("gpu1")] == [GUARD_TASK]
    message = guard_failure(run)
    # any_errors_fatal failed pi1 and pi3 when pi2 was unreachable: all three are gone.
    assert message.startswith(
        "pi1, pi2, pi3 dropped out of this run (rpc_workers: pi1, pi2, pi3; inference_head: none)"
    )
    assert 'Stopping before "Tune the Raspberry Pi RPC workers"' in message


@pytest.mark.slow
def test_deploy_stops_before_the_workers_and_head_when_a_worker_is_unreachable(tmp_path):
    hosts = {"pi1": {}, "pi2": unreachable_host(), "pi3": {}, "gpu1": {}}
    inventory = cluster_inventory(tmp_path / "inventory.yml", hosts)
    run = run_playbook(REPO / "playbooks" / "deploy.yml", inventory, "--check")
    assert run.returncode != 0
    assert play_names(run) == [
        GUARD_PLAY,
        "Guard the service ports before anything listens on them",
        GUARD_PLAY,
    ]
    # The firewall play stopped at its facts, where pi2 was unreachable, and any_errors_fatal failed the
    # others: no role ran, and the check runs on localhost, the one host left.
    assert [task.task for task in run.host_tasks("gpu1")] == ["Gathering Facts"]
    assert [task.task for task in run.host_tasks("localhost")] == [GUARD_TASK]
    message = guard_failure(run)
    assert message.startswith(
        "pi1, pi2, pi3, gpu1 dropped out of this run (rpc_workers: pi1, pi2, pi3; inference_head: gpu1)"
    )
    assert 'Stopping before "Deploy the RPC workers and check each from the head"' in message


def guarded_run(tmp_path: Path, hosts: dict[str, dict], first_play_tasks: list[dict], *args: str):
    """A play on every host, the guard, then a play on the head; return the run."""
    playbook = [
        {
            "name": "First",
            "hosts": "rpc_workers:inference_head",
            "gather_facts": False,
            "tasks": first_play_tasks,
        },
        {
            "name": "Check the cluster",
            "ansible.builtin.import_playbook": str(REPO / "playbooks" / "guard_cluster.yml"),
            "vars": {"llmfleet_next_play": "Second"},
        },
        {
            "name": "Second",
            "hosts": "inference_head",
            "gather_facts": False,
            "tasks": [{"name": "Reach the second play", "ansible.builtin.debug": {"msg": "second"}}],
        },
    ]
    path = tmp_path / "playbook.yml"
    path.write_text(yaml.safe_dump(playbook, sort_keys=False))
    return run_playbook(path, cluster_inventory(tmp_path / "inventory.yml", hosts), *args)


PING = [{"name": "Reach the host", "ansible.builtin.ping": {}}]


@pytest.mark.slow
def test_guard_passes_when_every_host_is_still_in_the_run(tmp_path):
    run = guarded_run(tmp_path, {"pi1": {}, "pi2": {}, "pi3": {}, "gpu1": {}}, PING)
    assert run.returncode == 0, run.stderr
    assert play_names(run) == ["First", GUARD_PLAY, "Second"]


@pytest.mark.slow
def test_guard_names_the_unreachable_worker_alone_without_any_errors_fatal(tmp_path):
    run = guarded_run(tmp_path, {"pi1": {}, "pi2": unreachable_host(), "pi3": {}, "gpu1": {}}, PING)
    assert run.returncode != 0
    assert play_names(run) == ["First", GUARD_PLAY]
    message = guard_failure(run)
    assert message.startswith("pi2 dropped out of this run (rpc_workers: pi2; inference_head: none)")


@pytest.mark.slow
def test_guard_names_a_head_that_failed(tmp_path):
    fail_on_head = [
        {
            "name": "Fail on the head",
            "ansible.builtin.fail": {"msg": "broken"},
            "when": "inventory_hostname == 'gpu1'",
        }
    ]
    run = guarded_run(tmp_path, {"pi1": {}, "pi2": {}, "pi3": {}, "gpu1": {}}, fail_on_head)
    assert run.returncode != 0
    assert play_names(run) == ["First", GUARD_PLAY]
    assert guard_failure(run).startswith(
        "gpu1 dropped out of this run (rpc_workers: none; inference_head: gpu1)"
    )


@pytest.mark.slow
def test_a_limited_run_checks_only_the_hosts_it_targets(tmp_path):
    hosts = {"pi1": {}, "pi2": unreachable_host(), "pi3": {}, "gpu1": {}}
    run = guarded_run(tmp_path, hosts, PING, "--limit", "pi1,gpu1")
    assert run.returncode == 0, run.stderr
    assert play_names(run) == ["First", GUARD_PLAY, "Second"]
