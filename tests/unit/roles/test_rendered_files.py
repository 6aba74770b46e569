"""The files the roles install for boot time, rendered from their templates and then exercised:
the CPU script runs against fake trees, tmpfiles applies the THP lines, systemd checks the units."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import fakehw
from tests.ansible_playbook import local_inventory, run_playbook

PLAYBOOK = Path(__file__).with_name("render_templates.yml")

VARIANTS = {
    "full": {
        "cpu_tuning_governor": "performance",
        "cpu_tuning_min_freq_khz": 2000000,
        "cpu_tuning_energy_perf_bias": 0,
        "memory_tuning_thp_enabled": "never",
        "memory_tuning_thp_defrag": "defer",
        "memory_tuning_zram_size_percent": 75,
        "memory_tuning_zram_algorithm": "lz4",
        "memory_tuning_prewarm_files": ["/srv/models/qwen3 30b.gguf", "/srv/cache/rpc.bin"],
        "memory_tuning_prewarm_lock": True,
        "cgroup_slices_inference_cpu_quota": "300%",
        "cgroup_slices_inference_memory_high": "85%",
        "cgroup_slices_inference_memory_max": "7G",
        "cgroup_slices_housekeeping_cpus": [0],
        "cpu_pinning_sched_fifo": True,
        "storage_tuning_block_queues": [
            {"match": "nvme[0-9]*n[0-9]*", "scheduler": "none", "read_ahead_kb": 4096},
            {"match": "sd[a-z]*", "read_ahead_kb": 512},
        ],
    },
    "minimal": {
        "cpu_tuning_governor": None,
        "cpu_tuning_min_freq_khz": None,
        "cpu_tuning_energy_perf_bias": None,
        "memory_tuning_prewarm_files": ["/srv/models/model.gguf"],
        "storage_tuning_block_queues": [{"match": "mmcblk[0-9]*"}],
        "memory_tuning_thp_enabled": None,
        "memory_tuning_thp_defrag": "never",
    },
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("rendered")
    tree = fakehw.build("x86", base / "tree")
    inventory = local_inventory(base / "inventory.yml", {"localhost": {}})
    # The play targets localhost; each variant is a run of its own with its variables as extra vars.
    for name, variables in VARIANTS.items():
        (base / name).mkdir()
        extra = base / f"{name}.json"
        extra.write_text(
            json.dumps({"render_dir": str(base / name), "tuning_facts_root": str(tree), **variables})
        )
        run = run_playbook(PLAYBOOK, inventory, "-e", f"@{extra}")
        failure, _ = run.first_failure("localhost")
        assert failure is None, f"{name}: {failure.task}: {failure.message}"
    return {name: base / name for name in VARIANTS}


def run_cpu_script(script: Path, host: fakehw.FakeHost) -> subprocess.CompletedProcess:
    """Run the boot script with /sys moved below the fake root, as a chroot would see it."""
    text = script.read_text().replace("/sys/", f"{host.root}/sys/")
    return subprocess.run(["sh", "-c", text], capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_cpu_script_sets_every_cpu_and_is_repeatable(rendered, tmp_path):
    host = fakehw.build("x86", tmp_path / "x86")
    for _ in range(2):
        result = run_cpu_script(rendered["full"] / "llmfleet-cpu-tuning", host)
        assert result.returncode == 0, result.stderr
    for cpu in range(8):
        policy = f"sys/devices/system/cpu/cpufreq/policy{cpu}"
        assert host.read(f"{policy}/scaling_governor") == "performance"
        assert host.read(f"{policy}/scaling_min_freq") == "2000000"
        assert host.read(f"sys/devices/system/cpu/cpu{cpu}/power/energy_perf_bias") == "0"


@pytest.mark.slow
def test_cpu_script_reports_a_refused_write_and_sets_the_rest(rendered, tmp_path):
    host = fakehw.build("rk3588", tmp_path / "rk3588")
    refused = host.path("sys/devices/system/cpu/cpufreq/policy4/scaling_governor")
    refused.unlink()
    refused.mkdir()
    result = run_cpu_script(rendered["full"] / "llmfleet-cpu-tuning", host)
    assert result.returncode == 1
    assert "cannot write 'performance' to" in result.stderr
    assert "cpu4/cpufreq/scaling_governor" in result.stderr
    assert host.read("sys/devices/system/cpu/cpufreq/policy6/scaling_governor") == "performance"


@pytest.mark.slow
def test_cpu_script_without_settings_changes_nothing(rendered, tmp_path):
    host = fakehw.build("pi5", tmp_path / "pi5")
    script = (rendered["minimal"] / "llmfleet-cpu-tuning").read_text()
    assert "scaling_governor" not in script
    assert "energy_perf_bias" not in script
    assert run_cpu_script(rendered["minimal"] / "llmfleet-cpu-tuning", host).returncode == 0
    assert host.read("sys/devices/system/cpu/cpufreq/policy0/scaling_governor") == "ondemand"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="needs systemd-tmpfiles")
def test_tmpfiles_lines_set_thp_at_boot(rendered, tmp_path):
    host = fakehw.build("pi5", tmp_path / "pi5")
    # tmpfiles writes without truncating, which a kernel attribute does not mind; start from empty files
    # so that what they hold afterwards is exactly what was written.
    for name in ("enabled", "defrag"):
        host.path(f"sys/kernel/mm/transparent_hugepage/{name}").write_text("")
    subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={host.root}", str(rendered["full"] / "llmfleet-thp.conf")],
        check=True,
    )
    assert host.read("sys/kernel/mm/transparent_hugepage/enabled") == "never"
    assert host.read("sys/kernel/mm/transparent_hugepage/defrag") == "defer"


def test_tmpfiles_leave_a_null_thp_setting_alone(rendered):
    lines = (rendered["minimal"] / "llmfleet-thp.conf").read_text().splitlines()
    assert [line for line in lines if not line.startswith("#")] == [
        "w /sys/kernel/mm/transparent_hugepage/defrag - - - - never"
    ]


def systemd_verify(path: Path) -> list[str]:
    """Problems systemd-analyze finds in a unit, less missing programs (vmtouch is not installed here)."""
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, check=False
    )
    return [line for line in result.stderr.splitlines() if "is not executable" not in line and line.strip()]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_units_pass_systemd_verification(rendered, variant):
    for unit in ("llmfleet.slice", "llmfleet-prewarm.service"):
        assert systemd_verify(rendered[variant] / unit) == [], unit


@pytest.mark.slow
def test_slice_and_pinning_directives(rendered):
    slice_unit = (rendered["full"] / "llmfleet.slice").read_text()
    for line in ("CPUQuota=300%", "MemoryHigh=85%", "MemoryMax=7G", "TasksMax=4096"):
        assert f"\n{line}\n" in slice_unit
    # By default the slice takes the CPUs cpu_pinning chose: the GPU's node less housekeeping.
    assert "\nAllowedCPUs=4 5 6 7\n" in slice_unit
    assert "AllowedCPUs=0\n" in (rendered["full"] / "housekeeping.conf").read_text()
    minimal_slice = (rendered["minimal"] / "llmfleet.slice").read_text()
    assert "CPUQuota" not in minimal_slice
    assert "MemoryMax" not in minimal_slice
    pinning = (rendered["full"] / "cpu-pinning.conf").read_text()
    assert "[Service]\nCPUAffinity=4 5 6 7\nNUMAPolicy=preferred\nNUMAMask=1\n" in pinning
    assert "CPUSchedulingPolicy=fifo\nCPUSchedulingPriority=10\n" in pinning


@pytest.mark.slow
def test_prewarm_unit_waits_for_the_mounts_and_quotes_paths(rendered):
    locked = (rendered["full"] / "llmfleet-prewarm.service").read_text()
    assert "RequiresMountsFor=/srv/models /srv/cache\n" in locked
    assert "ExecStart=/usr/bin/vmtouch -l -q -- '/srv/models/qwen3 30b.gguf' /srv/cache/rpc.bin\n" in locked
    assert "LimitMEMLOCK=infinity" in locked
    oneshot = (rendered["minimal"] / "llmfleet-prewarm.service").read_text()
    assert (
        "Type=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/vmtouch -t -q -- /srv/models/model.gguf\n"
        in oneshot
    )


@pytest.mark.slow
def test_zram_config(rendered):
    config = (rendered["full"] / "zram-generator.conf").read_text()
    assert (
        "[zram0]\nzram-size = min(ram * 75 / 100, 8192)\ncompression-algorithm = lz4\nswap-priority = 100\n"
        in (config)
    )


@pytest.mark.slow
def test_udev_rule_lines(rendered):
    rules = [
        line
        for line in (rendered["full"] / "60-llmfleet-block-queues.rules").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules == [
        'ACTION=="add|change", SUBSYSTEM=="block", ENV{DEVTYPE}=="disk", KERNEL=="nvme[0-9]*n[0-9]*", '
        'ATTR{queue/scheduler}="none", ATTR{queue/read_ahead_kb}="4096"',
        'ACTION=="add|change", SUBSYSTEM=="block", ENV{DEVTYPE}=="disk", KERNEL=="sd[a-z]*", '
        'ATTR{queue/read_ahead_kb}="512"',
    ]
    minimal = (rendered["minimal"] / "60-llmfleet-block-queues.rules").read_text()
    assert "ACTION" not in minimal


@pytest.mark.slow
def test_cpu_script_sets_the_online_cpus_and_names_the_offline_ones(rendered, tmp_path):
    host = fakehw.build("x86", tmp_path / "x86")
    host.take_offline(5, 7)
    result = run_cpu_script(rendered["full"] / "llmfleet-cpu-tuning", host)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "left alone, offline: cpu5 cpu7\n"
    for cpu in (0, 1, 2, 3, 4, 6):
        assert host.read(f"sys/devices/system/cpu/cpufreq/policy{cpu}/scaling_governor") == "performance"
        assert host.read(f"sys/devices/system/cpu/cpu{cpu}/power/energy_perf_bias") == "0"
    assert host.read("sys/devices/system/cpu/cpu7/power/energy_perf_bias") == "6"
