"""Tuning facts gathered from the fake Raspberry Pi 5, RK3588 and two-socket x86 trees."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.llmfleet_sysfs import SysfsError
from ansible.module_utils.llmfleet_tuning_facts import (
    block_facts,
    board_facts,
    boot_facts,
    cgroup_facts,
    cpu_facts,
    cpufreq_facts,
    decode_throttled,
    gather,
    gpu_facts,
    memory_facts,
    mount_facts,
    numa_facts,
    nvme_facts,
    parse_mounts,
    parse_swaps,
    performance_cpus,
    sched_facts,
    swap_facts,
    thp_facts,
    vm_facts,
)

from tests import fakehw
from tests.fakehw import NVIDIA_GPU_ADDRESS, PI5_MODEL, RK3588_MODEL, FakeHost


def test_pi5_cpus_are_all_performance_cores(pi5):
    cpu = cpu_facts(str(pi5))
    assert cpu["online"] == [0, 1, 2, 3]
    assert cpu["online_list"] == "0-3"
    assert cpu["performance"] == [0, 1, 2, 3]
    assert cpu["performance_list"] == "0-3"
    first = cpu["cpus"][0]
    assert first["capacity"] == 1024
    assert first["max_freq_khz"] == 2400000
    assert first["governor"] == "ondemand"
    assert first["governors_offered"] == ["ondemand", "performance", "powersave"]
    assert first["driver"] == "cpufreq-dt"
    assert first["energy_perf_bias"] is None


def test_rk3588_performance_cores_are_both_a76_clusters(rk3588):
    cpu = cpu_facts(str(rk3588))
    assert cpu["performance"] == [4, 5, 6, 7]
    assert cpu["performance_list"] == "4-7"


def test_x86_without_capacity_counts_every_cpu(x86):
    assert cpu_facts(str(x86))["performance"] == list(range(8))


def test_performance_falls_back_to_frequency_then_to_all_cpus():
    def cpu(ident, capacity=None, freq=None, online=True):
        return {"id": ident, "online": online, "capacity": capacity, "max_freq_khz": freq}

    by_frequency = [cpu(0, freq=1800000), cpu(1, freq=2400000), cpu(2, freq=2300000)]
    assert performance_cpus(by_frequency) == [1, 2]
    assert performance_cpus([cpu(0), cpu(1), cpu(2, online=False)]) == [0, 1]
    partly_known = [cpu(0, capacity=1024, freq=2400000), cpu(1, freq=1800000)]
    assert performance_cpus(partly_known) == [0]
    assert performance_cpus([]) == []


def test_offline_cpus_are_listed_but_not_counted(rk3588):
    rk3588.write("sys/devices/system/cpu/online", "0-5")
    cpu = cpu_facts(str(rk3588))
    assert cpu["count"] == 6
    assert [entry["online"] for entry in cpu["cpus"]] == [True] * 6 + [False] * 2
    assert cpu["performance"] == [4, 5]


def test_online_falls_back_to_the_cpu_directories(pi5):
    pi5.remove("sys/devices/system/cpu/online")
    assert cpu_facts(str(pi5))["online"] == [0, 1, 2, 3]


def test_cpufreq_summarises_driver_and_governors(pi5, x86):
    pi = cpufreq_facts(cpu_facts(str(pi5))["cpus"])
    assert pi == {
        "present": True,
        "driver": "cpufreq-dt",
        "drivers": ["cpufreq-dt"],
        "governors_offered": ["ondemand", "performance", "powersave"],
        "governors_current": ["ondemand"],
        "governor": "ondemand",
        "energy_perf_bias": False,
        "energy_performance_preference": False,
        "energy_performance_preferences_offered": [],
    }
    intel = cpufreq_facts(cpu_facts(str(x86))["cpus"])
    assert intel["driver"] == "intel_pstate"
    assert intel["energy_perf_bias"] is True
    assert intel["energy_performance_preference"] is True
    assert intel["energy_performance_preferences_offered"][:2] == ["default", "performance"]


def test_cpufreq_offers_only_what_every_cpu_offers_and_flags_mixed_governors(x86):
    x86.write("sys/devices/system/cpu/cpufreq/policy5/scaling_available_governors", "powersave")
    x86.write("sys/devices/system/cpu/cpufreq/policy5/scaling_governor", "performance")
    facts = cpufreq_facts(cpu_facts(str(x86))["cpus"])
    assert facts["governors_offered"] == ["powersave"]
    assert facts["governors_current"] == ["performance", "powersave"]
    assert facts["governor"] is None


def test_cpufreq_absent_without_a_driver(tmp_path):
    host = FakeHost(tmp_path)
    host.cpus("0-1")
    (tmp_path / "sys/devices/system/cpu/cpu0").mkdir()
    (tmp_path / "sys/devices/system/cpu/cpu1").mkdir()
    facts = cpufreq_facts(cpu_facts(str(host))["cpus"])
    assert facts["present"] is False
    assert facts["governors_offered"] == []
    assert facts["driver"] is None


def test_numa_nodes_of_the_two_socket_host(x86, pi5):
    assert numa_facts(str(x86)) == {
        "count": 2,
        "nodes": [
            {"id": 0, "cpus": [0, 1, 2, 3], "cpulist": "0-3"},
            {"id": 1, "cpus": [4, 5, 6, 7], "cpulist": "4-7"},
        ],
    }
    assert numa_facts(str(pi5)) == {"count": 0, "nodes": []}


def test_gpus_are_display_class_devices_with_their_node(x86, pi5):
    gpus = gpu_facts(str(x86))
    assert [gpu["address"] for gpu in gpus] == ["0000:02:00.0", NVIDIA_GPU_ADDRESS]
    nvidia = gpus[1]
    assert nvidia == {
        "address": NVIDIA_GPU_ADDRESS,
        "class": "0x030200",
        "vendor": "0x10de",
        "device": "0x2330",
        "nvidia": True,
        "numa_node": 1,
        "local_cpus": [4, 5, 6, 7],
    }
    assert gpus[0]["nvidia"] is False
    assert gpu_facts(str(pi5)) == []


def test_gpu_without_numa_information_has_no_node(x86):
    x86.write(f"sys/bus/pci/devices/{NVIDIA_GPU_ADDRESS}/numa_node", "-1")
    x86.remove(f"sys/bus/pci/devices/{NVIDIA_GPU_ADDRESS}/local_cpulist")
    x86.remove(f"sys/bus/pci/devices/{NVIDIA_GPU_ADDRESS}/vendor")
    gpu = gpu_facts(str(x86))[1]
    assert gpu["numa_node"] is None
    assert gpu["local_cpus"] == []
    assert gpu["vendor"] is None
    assert gpu["nvidia"] is False


def test_thp_selection_and_offer(pi5, tmp_path):
    assert thp_facts(str(pi5)) == {
        "present": True,
        "enabled": "madvise",
        "enabled_offered": ["always", "madvise", "never"],
        "defrag": "madvise",
        "defrag_offered": ["always", "defer", "defer+madvise", "madvise", "never"],
    }
    assert thp_facts(str(tmp_path)) == {
        "present": False,
        "enabled": None,
        "enabled_offered": [],
        "defrag": None,
        "defrag_offered": [],
    }


def test_vm_sysctls_are_integers_by_sysctl_name(pi5):
    vm = vm_facts(str(pi5))
    assert vm["swappiness"] == 60
    assert vm["page-cluster"] == 3
    assert "dirty_expire_centisecs" not in vm


def test_memory_total(pi5, tmp_path):
    assert memory_facts(str(pi5)) == {"total_kb": 8245740, "total_mb": 8052}
    assert memory_facts(str(tmp_path)) == {"total_kb": None, "total_mb": None}


def test_swaps_flag_zram_and_disk(pi5, x86, rk3588):
    assert swap_facts(str(pi5)) == {
        "devices": [
            {
                "name": "/dev/zram0",
                "type": "partition",
                "size_kb": 4026236,
                "used_kb": 0,
                "priority": 100,
                "zram": True,
            }
        ],
        "total_kb": 4026236,
        "zram": True,
        "disk": False,
    }
    x86_swap = swap_facts(str(x86))
    assert (x86_swap["zram"], x86_swap["disk"], x86_swap["devices"][0]["priority"]) == (False, True, -2)
    assert swap_facts(str(rk3588))["devices"] == []


def test_parse_swaps_skips_short_lines_and_unescapes_names():
    text = "Filename Type Size Used Priority\n/swap\\040file file 10 0 -2\ngarbage\n"
    assert [device["name"] for device in parse_swaps(text)] == ["/swap file"]


def test_block_devices_of_the_pi(pi5):
    devices = {device["name"]: device for device in block_facts(str(pi5))}
    assert list(devices) == ["mmcblk0", "nvme0n1", "zram0"]
    nvme = devices["nvme0n1"]
    assert nvme == {
        "name": "nvme0n1",
        "kind": "nvme",
        "rotational": False,
        "removable": False,
        "scheduler": "none",
        "schedulers_offered": ["none", "mq-deadline", "kyber", "bfq"],
        "read_ahead_kb": 128,
        "size_bytes": 1953525168 * 512,
    }
    assert devices["mmcblk0"]["kind"] == "mmc"
    zram = devices["zram0"]
    assert (zram["kind"], zram["scheduler"], zram["schedulers_offered"]) == ("zram", "none", [])
    assert zram["comp_algorithm"] == "zstd"
    assert zram["disksize_bytes"] == 8052480 * 512


def test_block_devices_of_the_x86_host(x86):
    devices = {device["name"]: device for device in block_facts(str(x86))}
    assert devices["sda"]["rotational"] is True
    assert devices["sda"]["kind"] == "scsi"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("loop0", "loop"),
        ("dm-0", "dm"),
        ("md127", "md"),
        ("vda", "virtio"),
        ("ram0", "ram"),
        ("xvda", "other"),
    ],
)
def test_block_kinds(tmp_path, name, kind):
    (tmp_path / "sys/block" / name).mkdir(parents=True)
    device = block_facts(str(tmp_path))[0]
    assert device["kind"] == kind
    assert device["scheduler"] is None
    assert device["rotational"] is None
    assert device["size_bytes"] is None


def test_mounts_with_options_and_escaped_spaces(x86):
    mounts = {mount["mountpoint"]: mount for mount in mount_facts(str(x86))}
    assert mounts["/srv/models"] == {
        "device": "/dev/nvme0n1p1",
        "mountpoint": "/srv/models",
        "fstype": "xfs",
        "options": ["rw", "noatime", "attr2", "inode64"],
    }
    assert "/srv/my data" in mounts


def test_parse_mounts_skips_short_lines():
    assert parse_mounts("broken line\n") == []


def test_board_of_a_pi5_from_proc(pi5):
    assert board_facts(str(pi5)) == {"model": PI5_MODEL, "raspberry_pi": True, "raspberry_pi_generation": 5}


def test_board_from_the_firmware_path(rk3588):
    assert board_facts(str(rk3588)) == {
        "model": RK3588_MODEL,
        "raspberry_pi": False,
        "raspberry_pi_generation": None,
    }


def test_board_without_a_device_tree(x86):
    assert board_facts(str(x86)) == {"model": None, "raspberry_pi": False, "raspberry_pi_generation": None}


def test_decode_throttled_names_current_and_past_conditions():
    decoded = decode_throttled("throttled=0x50005\n")
    assert decoded["ok"] is False
    assert decoded["raw"] == "0x50005"
    assert decoded["now"] == {
        "under_voltage": True,
        "arm_freq_capped": False,
        "throttled": True,
        "soft_temp_limit": False,
    }
    assert decoded["since_boot"] == {
        "under_voltage": True,
        "arm_freq_capped": False,
        "throttled": True,
        "soft_temp_limit": False,
    }
    healthy = decode_throttled("throttled=0x0")
    assert healthy["ok"] is True
    assert not any(healthy["now"].values())
    assert decode_throttled("throttled=0x80000")["since_boot"]["soft_temp_limit"] is True


@pytest.mark.parametrize("output", ["", 'error=1 error_msg="Command not registered"', "throttled=zz"])
def test_decode_throttled_refuses_other_output(output):
    with pytest.raises(SysfsError, match="expected 'throttled=0x<hex>'"):
        decode_throttled(output)


def test_sched_rt_throttling(pi5, tmp_path):
    assert sched_facts(str(pi5)) == {"rt_runtime_us": 950000, "rt_period_us": 1000000}
    pi5.write("proc/sys/kernel/sched_rt_runtime_us", "-1")
    assert sched_facts(str(pi5))["rt_runtime_us"] == -1
    assert sched_facts(str(tmp_path)) == {"rt_runtime_us": None, "rt_period_us": None}


def test_cgroup_v2(pi5):
    facts = cgroup_facts(str(pi5))
    assert {key: facts[key] for key in ("version", "hybrid", "controllers", "memory_controller")} == {
        "version": 2,
        "hybrid": False,
        "controllers": ["cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc"],
        "memory_controller": True,
    }


def test_cgroup_v1_hybrid_and_absent(tmp_path):
    (tmp_path / "sys/fs/cgroup/cpu").mkdir(parents=True)
    facts = cgroup_facts(str(tmp_path))
    assert (facts["version"], facts["hybrid"], facts["controllers"]) == (1, False, [])
    unified = tmp_path / "sys/fs/cgroup/unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("\n")
    facts = cgroup_facts(str(tmp_path))
    assert (facts["version"], facts["hybrid"], facts["controllers"]) == (1, True, [])
    # Neither /proc/cgroups nor a v2 root says whether memory limits work.
    assert facts["memory_controller"] is None
    assert cgroup_facts(str(tmp_path / "nothing"))["version"] is None


def test_memory_controller_off_on_stock_raspberry_pi_os(tmp_path):
    stock = fakehw.build("pi5_stock", tmp_path / "stock")
    facts = cgroup_facts(str(stock))
    assert facts["memory_controller"] is False
    assert facts["enabled"]["memory"] is False and facts["enabled"]["cpu"] is True


def test_memory_controller_follows_proc_cgroups_on_a_hybrid_host(tmp_path):
    host = FakeHost(tmp_path)
    host.write("sys/fs/cgroup/unified/cgroup.controllers", "")
    host.write("proc/cgroups", "#subsys_name\thierarchy\tnum_cgroups\tenabled\nmemory\t4\t74\t1\n")
    assert cgroup_facts(str(host))["memory_controller"] is True
    host.write("proc/cgroups", "#subsys_name\thierarchy\tnum_cgroups\tenabled\nmemory\t0\t1\t0\n")
    assert cgroup_facts(str(host))["memory_controller"] is False


def test_memory_controller_on_v2_needs_the_root_to_offer_it(pi5):
    # /proc/cgroups says enabled, but the v2 root does not offer memory (cgroup_no_v1 setups, old kernels).
    pi5.write("sys/fs/cgroup/cgroup.controllers", "cpuset cpu io pids")
    assert cgroup_facts(str(pi5))["memory_controller"] is False


def test_boot_facts_of_a_stock_pi_show_the_firmware_line_and_nothing_pending(tmp_path):
    stock = fakehw.build("pi5_stock", tmp_path / "stock")
    facts = boot_facts(str(stock))
    assert facts["cmdline"].startswith("reboot=w coherent_pool=1M")
    assert "cgroup_disable=memory" in facts["cmdline_tokens"]
    assert facts["firmware_dir"] == "/boot/firmware"
    assert facts["cmdline_file_tokens"][-1] == "plymouth.ignore-serial-consoles"
    assert facts["cmdline_pending"] == []
    assert facts["reboot_required"] is False


def test_boot_facts_see_an_edit_of_cmdline_txt_and_the_reboot_flag(tmp_path):
    stock = fakehw.build("pi5_stock", tmp_path / "stock")
    # The firmware passes console=serial0 on as console=ttyAMA10: not a pending change.
    line = fakehw.PI5_CMDLINE_TXT.strip() + " cgroup_enable=memory"
    stock.write("proc/cmdline", stock.read("proc/cmdline").replace("serial0", "ttyAMA10"))
    stock.write("boot/firmware/cmdline.txt", line)
    facts = boot_facts(str(stock))
    assert facts["cmdline_pending"] == ["cgroup_enable=memory"]
    assert facts["reboot_required_reasons"] == [
        "/boot/firmware/cmdline.txt has cgroup_enable=memory, the running kernel does not"
    ]
    stock.write("run/reboot-required", "*** System restart required ***")
    assert boot_facts(str(stock))["reboot_required_reasons"][0] == "/run/reboot-required exists"


def test_boot_facts_find_the_older_boot_directory_or_none(tmp_path, x86):
    host = FakeHost(tmp_path)
    host.write("boot/cmdline.txt", "root=/dev/mmcblk0p2 rootwait")
    assert boot_facts(str(host))["firmware_dir"] == "/boot"
    assert boot_facts(str(x86))["firmware_dir"] is None
    assert boot_facts(str(x86))["reboot_required"] is False


def test_nvme_link_at_gen2_and_gen3(tmp_path, x86):
    stock = fakehw.build("pi5_stock", tmp_path / "stock")
    (drive,) = nvme_facts(str(stock))
    assert drive == {
        "address": "0001:01:00.0",
        "current_link_speed": "5.0 GT/s PCIe",
        "current_link_gts": 5.0,
        "current_link_generation": 2,
        "current_link_width": 1,
        "max_link_speed": "8.0 GT/s PCIe",
        "max_link_gts": 8.0,
        "max_link_generation": 3,
        "max_link_width": 4,
    }
    stock.pi_boot(config_txt=fakehw.PI5_CONFIG_TXT + "dtparam=pciex1_gen=3\n")
    assert nvme_facts(str(stock))[0]["current_link_generation"] == 3
    # The x86 tree's NVMe has no link attributes; the GPU is not a drive.
    assert [drive["current_link_generation"] for drive in nvme_facts(str(x86))] == [None]


def test_gather_is_json_ready_and_picks_nvidia_gpus(x86):
    facts = gather(str(x86))
    assert json.loads(json.dumps(facts)) == facts
    assert [gpu["address"] for gpu in facts["nvidia_gpus"]] == [NVIDIA_GPU_ADDRESS]
    assert facts["throttled"] == {"available": False}
    assert facts["root"] == str(x86)


def test_gather_decodes_or_reports_throttled_output(pi5):
    assert gather(str(pi5), "throttled=0x0")["throttled"]["ok"] is True
    broken = gather(str(pi5), "nonsense")["throttled"]
    assert broken["available"] is False
    assert "expected 'throttled=0x<hex>'" in broken["error"]
