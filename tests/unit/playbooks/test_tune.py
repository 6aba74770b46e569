"""playbooks/tune.yml in check mode with --diff on a fake Raspberry Pi 5 and a fake GPU host.

Nothing may change (neither the fake sysfs trees nor this machine); the report must show what a real
run would change, per CPU and device. debloat is skipped: it asks the running systemd about units.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import fakehw
from tests.ansible_playbook import REPO, PlaybookRun, local_inventory, run_playbook

PLAYBOOK = REPO / "playbooks" / "tune.yml"


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): path.read_text()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, fakehw.FakeHost]:
    base = tmp_path_factory.mktemp("tune")
    return {"pi1": fakehw.build("pi5", base / "pi1"), "gpu1": fakehw.build("x86", base / "gpu1")}


@pytest.fixture(scope="module")
def run(trees, tmp_path_factory) -> tuple[PlaybookRun, dict, dict]:
    base = tmp_path_factory.mktemp("tune-inventory")
    hosts = {
        "pi1": {
            "tuning_facts_root": str(trees["pi1"]),
            "memory_tuning_swappiness": 150,
            "memory_tuning_page_cluster": 0,
            "memory_tuning_zram_enabled": True,
            "cgroup_slices_inference_memory_high": "85%",
        },
        "gpu1": {
            "tuning_facts_root": str(trees["gpu1"]),
            "memory_tuning_swappiness": 1,
            "storage_tuning_model_source": "LABEL=models",
            "storage_tuning_model_fstype": "xfs",
        },
    }
    inventory = local_inventory(
        base / "inventory.yml", hosts, {"rpc_workers": ["pi1"], "inference_head": ["gpu1"]}
    )
    before = {name: snapshot(tree.root) for name, tree in trees.items()}
    result = run_playbook(PLAYBOOK, inventory, "--check", "--diff", "--skip-tags", "debloat")
    after = {name: snapshot(tree.root) for name, tree in trees.items()}
    return result, before, after


def task(run: PlaybookRun, host: str, name: str):
    matches = [entry for entry in run.host_tasks(host) if entry.task.endswith(f" : {name}")]
    assert matches, f"{name} did not run on {host}"
    return matches[0]


def items(result) -> dict[str, dict]:
    return {str(item["item"]): item for item in result.result["results"]}


@pytest.mark.slow
def test_check_mode_runs_through_and_changes_nothing(run):
    result, before, after = run
    for host in ("pi1", "gpu1"):
        failure, _ = result.first_failure(host)
        assert failure is None, f"{host}: {failure.task}: {failure.message}"
    assert result.returncode == 0, result.stderr
    assert before == after


@pytest.mark.slow
def test_governor_diff_names_each_cpufreq_policy(run):
    result = run[0]
    pi = task(result, "pi1", "Set the CPU governor on every CPU now").result
    assert pi["changed"] is True
    assert pi["diff"]["after"] == "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor: performance\n"
    gpu = task(result, "gpu1", "Set the CPU governor on every CPU now").result
    assert len(gpu["changed_paths"]) == 8
    assert "cpu7/cpufreq/scaling_governor: powersave" in gpu["diff"]["before"]


@pytest.mark.slow
def test_energy_bias_only_where_the_cpu_has_it(run):
    result = run[0]
    assert (
        task(result, "pi1", "Set the energy/performance bias on every CPU now").result.get("skipped") is True
    )
    gpu = task(result, "gpu1", "Set the energy/performance bias on every CPU now").result
    assert gpu["changed"] is True
    assert gpu["diff"]["after"].count(": 0\n") == 8


@pytest.mark.slow
def test_thp_reports_only_what_differs(run):
    result = run[0]
    pi = items(task(result, "pi1", "Set transparent huge pages now"))
    gpu = items(task(result, "gpu1", "Set transparent huge pages now"))
    enabled = "{'key': 'enabled', 'value': 'madvise'}"
    defrag = "{'key': 'defrag', 'value': 'defer+madvise'}"
    assert (pi[enabled]["changed"], pi[defrag]["changed"]) == (False, True)
    assert gpu[enabled]["diff"]["before"] == "/sys/kernel/mm/transparent_hugepage/enabled: always\n"


@pytest.mark.slow
def test_block_queues_follow_the_device_patterns(run):
    result = run[0]
    settings = task(result, "pi1", "Set the block device queue settings now").result["results"]
    changed = sorted(path for entry in settings for path in entry.get("changed_paths", []))
    assert changed == ["/sys/block/mmcblk0/queue/read_ahead_kb", "/sys/block/nvme0n1/queue/read_ahead_kb"]
    rule = task(result, "pi1", "Write the udev rule that sets the queue settings on every boot and hotplug")
    assert (
        'KERNEL=="nvme[0-9]*n[0-9]*", ATTR{queue/scheduler}="none", ATTR{queue/read_ahead_kb}="4096"'
        in (rule.result["diff"][0]["after"])
    )


@pytest.mark.slow
def test_swappiness_per_group(run):
    result = run[0]
    pi = items(task(result, "pi1", "Write the vm sysctls to sysctl.d and apply them now"))
    assert "{'key': 'vm.swappiness', 'value': 150}" in pi
    assert "{'key': 'vm.page-cluster', 'value': 0}" in pi
    gpu = items(task(result, "gpu1", "Write the vm sysctls to sysctl.d and apply them now"))
    assert "{'key': 'vm.swappiness', 'value': 1}" in gpu


@pytest.mark.slow
def test_zram_only_on_the_pi(run):
    result = run[0]
    config = task(result, "pi1", "Configure the zram swap device").result["diff"][0]["after"]
    assert "zram-size = min(ram * 50 / 100, 8192)" in config
    assert task(result, "gpu1", "Install systemd-zram-generator").result.get("skipped") is True


@pytest.mark.slow
def test_slice_takes_the_pinned_cpus(run):
    result = run[0]
    pi_slice = task(result, "pi1", "Write the inference slice unit").result["diff"][0]["after"]
    assert "AllowedCPUs=1 2 3\n" in pi_slice
    assert "MemoryHigh=85%\n" in pi_slice
    gpu_slice = task(result, "gpu1", "Write the inference slice unit").result["diff"][0]["after"]
    assert "AllowedCPUs=4 5 6 7\n" in gpu_slice


@pytest.mark.slow
def test_model_volume_is_mounted_by_label_with_noatime(run):
    result = run[0]
    mount = task(result, "gpu1", "Mount the model volume and record it in fstab").result
    assert mount["changed"] is True
    assert (mount["name"], mount["src"], mount["fstype"], mount["opts"]) == (
        "/srv/models",
        "LABEL=models",
        "xfs",
        "noatime",
    )
    assert task(result, "pi1", "Mount the model volume and record it in fstab").result.get("skipped") is True
