"""The fake hardware tree and the kernel rules of its writable files, without starting any host."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import fakehw
from tests.cluster.config import host_by_name
from tests.cluster.fakehw import Setting

THP = Setting("/sys/kernel/mm/transparent_hugepage/enabled", "always", ("always", "madvise", "never"), True)
GOVERNOR = Setting("/x/scaling_governor", "ondemand", ("ondemand", "performance", "powersave"))
SWAPPINESS = Setting("/proc/sys/vm/swappiness", "60", minimum=0, maximum=200)


def test_bracketed_setting_renders_like_the_kernel() -> None:
    assert THP.render("madvise") == "always [madvise] never\n"


@pytest.mark.parametrize(
    ("setting", "written", "accepted"),
    [
        (THP, "madvise\n", "madvise"),
        (THP, "never", "never"),
        (THP, "always [madvise] never\n", "madvise"),
        (THP, "sometimes\n", None),
        (GOVERNOR, "performance\n", "performance"),
        (GOVERNOR, "schedutil\n", None),
        (SWAPPINESS, "10\n", "10"),
        (SWAPPINESS, " 10 \n", "10"),
        (SWAPPINESS, "201\n", None),
        (SWAPPINESS, "ten\n", None),
        (SWAPPINESS, "1\n0", None),
        (SWAPPINESS, "", None),
    ],
)
def test_setting_accepts_what_the_kernel_would(setting: Setting, written: str, accepted: str | None) -> None:
    assert setting.accept(written) == accepted


@pytest.mark.parametrize(
    ("setting", "before", "written", "value"),
    [
        # Truncating writers (sysctl -w, `echo x >`): the file holds the write alone.
        (SWAPPINESS, "100\n", "10\n", "10"),
        (GOVERNOR, "ondemand\n", "performance\n", "performance"),
        # Writers that do not truncate (systemd-sysctl, systemd-tmpfiles) leave the old tail behind.
        (SWAPPINESS, "60\n", "5\n", "5"),
        (SWAPPINESS, "1000\n", "5\n", "5"),
        (GOVERNOR, "performance\n", "powersave\n", "powersave"),
        (THP, "[always] madvise never\n", "never", "never"),
        (THP, "[always] madvise never\n", "madvise\n", "madvise"),
        (THP, "[always] madvise never\n", "sometimes", None),
    ],
)
def test_written_value_is_found_with_or_without_truncation(
    setting: Setting, before: str, written: str, value: str | None
) -> None:
    truncated = written
    untruncated = written + before[len(written) :]
    assert setting.written_value(before, truncated) == value
    assert setting.written_value(before, untruncated) == value


def test_cpulists_round_trip() -> None:
    assert fakehw.parse_cpulist("0-3,6,8-9\n") == [0, 1, 2, 3, 6, 8, 9]
    assert fakehw.format_cpulist([0, 1, 2, 3, 6, 8, 9]) == "0-3,6,8-9"
    assert fakehw.format_cpulist([]) == ""


def test_cpumask_is_grouped_in_32_bit_words() -> None:
    assert fakehw.format_cpumask([0, 1], 2) == "3"
    assert fakehw.format_cpumask([1], 8) == "02"
    assert fakehw.format_cpumask([32], 40) == "01,00000000"


def test_nodes_share_the_real_cpus() -> None:
    assert fakehw.split_nodes([0, 1], 2) == [[0], [1]]
    assert fakehw.split_nodes([0, 1, 2], 2) == [[0, 1], [2]]
    assert fakehw.split_nodes([0, 1, 2, 3], 1) == [[0, 1, 2, 3]]


def _plan(hw: fakehw.FakeHardware) -> list[str]:
    return (hw.root / fakehw.PLAN_FILE).read_text().splitlines()


def test_pi_tree_has_a_pi5_model_and_a_shared_cpufreq_policy(tmp_path: Path) -> None:
    hw = fakehw.build(host_by_name("pi1"), tmp_path)
    cpus = fakehw.real_cpus()
    model = (tmp_path / "sys/firmware/devicetree/base/model").read_bytes()
    assert model == b"Raspberry Pi 5 Model B Rev 1.0\0"
    cpu_dir = tmp_path / "sys/devices/system/cpu"
    for cpu in cpus:
        governor = cpu_dir / f"cpu{cpu}/cpufreq/scaling_governor"
        assert governor.resolve() == cpu_dir / "cpufreq/policy0/scaling_governor"
        assert governor.read_text() == "ondemand\n"
        assert (cpu_dir / f"cpu{cpu}/cpu_capacity").read_text() == "1024\n"
    assert (cpu_dir / "cpufreq/policy0/cpuinfo_max_freq").read_text() == "2400000\n"
    assert "Model\t\t: Raspberry Pi 5 Model B Rev 1.0" in (tmp_path / "proc/cpuinfo").read_text()
    plan = _plan(hw)
    assert "ro /sys/devices/system/cpu" in plan
    assert "rw /sys/devices/system/cpu/cpufreq/policy0/scaling_governor" in plan
    assert "rw /sys/kernel/mm/transparent_hugepage/enabled" in plan
    assert "rw /proc/sys/vm/swappiness" in plan
    # Writable files are bound after the read-only directories that contain them.
    assert plan.index("ro /sys/devices/system/cpu") < plan.index(
        "rw /sys/devices/system/cpu/cpufreq/policy0/scaling_governor"
    )
    assert not (tmp_path / "sys/devices/system/node").exists()


def test_gpu_tree_has_two_numa_nodes_and_an_nvidia_gpu_on_node1(tmp_path: Path) -> None:
    hw = fakehw.build(host_by_name("gpu1"), tmp_path)
    cpus = fakehw.real_cpus()
    nodes = tmp_path / "sys/devices/system/node"
    node_cpus = [fakehw.parse_cpulist((nodes / f"node{n}/cpulist").read_text()) for n in (0, 1)]
    assert sorted(node_cpus[0] + node_cpus[1]) == cpus
    gpu = tmp_path / "sys/bus/pci/devices/0000:41:00.0"
    assert (gpu / "vendor").read_text() == "0x10de\n"
    assert (gpu / "class").read_text() == "0x030200\n"
    assert (gpu / "numa_node").read_text() == "1\n"
    assert fakehw.parse_cpulist((gpu / "local_cpulist").read_text()) == node_cpus[1]
    cpu_dir = tmp_path / "sys/devices/system/cpu"
    for cpu in cpus:
        assert (cpu_dir / f"cpu{cpu}/cpufreq").resolve() == cpu_dir / f"cpufreq/policy{cpu}"
    assert {"ro /sys/devices/system/node", "ro /sys/bus/pci/devices"} <= set(_plan(hw))
    assert not (tmp_path / "sys/firmware").exists()


def test_model_volume_gets_a_label_link_and_queue_settings(tmp_path: Path) -> None:
    hw = fakehw.build(host_by_name("pi2"), tmp_path, model_device="loop0")
    plan = _plan(hw)
    assert "link /dev/disk/by-label/llmfleet-models ../../loop0" in plan
    scheduler = tmp_path / "sys/devices/virtual/block/loop0/queue/scheduler"
    assert scheduler.read_text() == "[none] mq-deadline kyber bfq\n"


def test_every_setting_starts_at_its_factory_value(tmp_path: Path) -> None:
    hw = fakehw.build(host_by_name("gpu1"), tmp_path)
    for path, setting in hw.settings.items():
        assert path.read_text() == setting.render(setting.factory)


def test_pi_boot_follows_the_boot_files(tmp_path: Path) -> None:
    from tests import fakehw as unit_fakehw

    boot = tmp_path / "boot/firmware"
    boot.mkdir(parents=True)
    (boot / "cmdline.txt").write_text(unit_fakehw.PI5_CMDLINE_TXT)
    (boot / "config.txt").write_text(unit_fakehw.PI5_CONFIG_TXT)
    stock = fakehw.PiBoot.read(boot)
    assert (stock.memory_controller, stock.pcie_gen, stock.default_governor) == (False, 2, None)
    assert stock.cmdline.endswith(unit_fakehw.PI5_CMDLINE_TXT.strip())
    (boot / "cmdline.txt").write_text("rootwait cgroup_enable=memory cpufreq.default_governor=performance\n")
    (boot / "config.txt").write_text(
        unit_fakehw.PI5_CONFIG_TXT + "[cm5]\ndtparam=pciex1_gen=1\n[all]\ndtparam=pciex1_gen=3\n"
    )
    tuned = fakehw.PiBoot.read(boot)
    assert (tuned.memory_controller, tuned.pcie_gen, tuned.default_governor) == (True, 3, "performance")
