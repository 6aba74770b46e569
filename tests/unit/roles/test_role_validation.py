"""Wrong variables make every role fail in a check before anything changes, with a message that says
what was found and what is accepted. One check-mode ansible-playbook run covers all cases, one host
each, against fake hardware trees; the same run checks the CPU sets cpu_pinning chooses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import fakehw
from tests.ansible_playbook import PlaybookRun, local_inventory, run_playbook

PLAYBOOK = Path(__file__).with_name("run_role.yml")


def rt_unthrottled(root: Path) -> fakehw.FakeHost:
    host = fakehw.build("x86", root)
    host.write("proc/sys/kernel/sched_rt_runtime_us", "-1")
    return host


def cgroup_hybrid(root: Path) -> fakehw.FakeHost:
    host = fakehw.build("pi5", root)
    host.remove("sys/fs/cgroup/cgroup.controllers")
    host.write("sys/fs/cgroup/unified/cgroup.controllers", "")
    return host


def old_thp(root: Path) -> fakehw.FakeHost:
    host = fakehw.build("pi5", root)
    host.write("sys/kernel/mm/transparent_hugepage/defrag", "always defer [madvise] never")
    return host


def no_thp(root: Path) -> fakehw.FakeHost:
    host = fakehw.build("pi5", root)
    host.remove("sys/kernel/mm/transparent_hugepage/enabled")
    host.remove("sys/kernel/mm/transparent_hugepage/defrag")
    return host


def pi5_old_boot_dir(root: Path) -> fakehw.FakeHost:
    host = fakehw.build("pi5", root)
    host.path("boot/firmware/cmdline.txt").rename(host.path("boot/firmware/moved.txt"))
    host.write("boot/cmdline.txt", fakehw.PI5_CMDLINE_TXT)
    return host


def sysctl_after_ours(root: Path) -> fakehw.FakeHost:
    host = fakehw.build("pi5", root)
    host.write("etc/sysctl.conf", "vm.swappiness = 10\n")
    host.link("etc/sysctl.d/99-sysctl.conf", "../sysctl.conf")
    host.write("etc/sysctl.d/zz-local.conf", "vm.dirty_ratio = 40\n")
    return host


def tuned_enabled(root: Path) -> fakehw.FakeHost:
    host = fakehw.build("x86", root)
    host.link("etc/systemd/system/multi-user.target.wants/tuned.service", "/lib/systemd/system/tuned.service")
    return host


TREES = {
    "pi5": lambda root: fakehw.build("pi5", root),
    "rk3588": lambda root: fakehw.build("rk3588", root),
    "x86": lambda root: fakehw.build("x86", root),
    "x86_rt_unthrottled": rt_unthrottled,
    "pi5_cgroup_hybrid": cgroup_hybrid,
    "pi5_old_thp": old_thp,
    "pi5_no_thp": no_thp,
    "pi5_stock": lambda root: fakehw.build("pi5_stock", root),
    "pi5_old_boot_dir": pi5_old_boot_dir,
    "pi5_sysctl_after_ours": sysctl_after_ours,
    "x86_tuned": tuned_enabled,
}

# case: (tree, role, variables, fragment of the failure message)
FAILURES = {
    "governor_not_offered": (
        "x86",
        "cpu_tuning",
        {"cpu_tuning_governor": "ondemand"},
        "cpu_tuning_governor is 'ondemand', which governor_not_offered does not offer; "
        "available: performance powersave.",
    ),
    "governor_unknown": (
        "pi5",
        "cpu_tuning",
        {"cpu_tuning_governor": "turbo"},
        "available: ondemand performance",
    ),
    "min_freq_above_max": (
        "rk3588",
        "cpu_tuning",
        {"cpu_tuning_min_freq_khz": 2000000},
        "cpu_tuning_min_freq_khz is 2000000; min_freq_above_max accepts 408000 to 1800000 kHz",
    ),
    "energy_bias_16": (
        "x86",
        "cpu_tuning",
        {"cpu_tuning_energy_perf_bias": 16},
        "accepts 0 (performance) to 15",
    ),
    "min_freq_not_a_number": (
        "pi5",
        "cpu_tuning",
        {"cpu_tuning_min_freq_khz": "fast"},
        "cpu_tuning_min_freq_khz",
    ),
    "swappiness_500": (
        "pi5",
        "memory_tuning",
        {"memory_tuning_swappiness": 500},
        "memory_tuning_swappiness is 500; vm.swappiness accepts 0 to 200",
    ),
    "dirty_background_above_dirty": (
        "pi5",
        "memory_tuning",
        {"memory_tuning_dirty_ratio": 10, "memory_tuning_dirty_background_ratio": 20},
        "the background ratio\nbelow the other",
    ),
    "thp_unknown": (
        "pi5",
        "memory_tuning",
        {"memory_tuning_thp_enabled": "sometimes"},
        "memory_tuning_thp_enabled",
    ),
    "thp_not_offered": (
        "pi5_old_thp",
        "memory_tuning",
        {},
        "memory_tuning_thp_defrag is 'defer+madvise'; thp_not_offered offers always defer madvise never",
    ),
    "thp_without_kernel_support": (
        "pi5_no_thp",
        "memory_tuning",
        {},
        "memory_tuning_thp_enabled is 'madvise'; thp_without_kernel_support offers nothing "
        "(a kernel without THP) in /sys/kernel/mm/transparent_hugepage/enabled. Pick an offered value, "
        "or null to leave it alone.",
    ),
    "sysctl_file_before_distribution": (
        "pi5",
        "memory_tuning",
        {"memory_tuning_sysctl_file": "/etc/sysctl.d/60-llmfleet-memory.conf"},
        "memory_tuning_sysctl_file is /etc/sysctl.d/60-llmfleet-memory.conf; systemd-sysctl applies",
    ),
    "sysctl_set_again_after_ours": (
        "pi5_sysctl_after_ours",
        "memory_tuning",
        {},
        "/etc/sysctl.d/zz-local.conf line 1 sets vm.dirty_ratio = 40 (wanted 10). That is applied after ours",
    ),
    "governor_daemon_enabled": (
        "x86_tuned",
        "cpu_tuning",
        {},
        "tuned (/etc/systemd/system/multi-user.target.wants/tuned.service: applies its profile's governor",
    ),
    "page_cluster_20": (
        "pi5",
        "memory_tuning",
        {"memory_tuning_page_cluster": 20},
        "memory_tuning_page_cluster is 20",
    ),
    "zram_size_0": (
        "pi5",
        "memory_tuning",
        {"memory_tuning_zram_enabled": True, "memory_tuning_zram_size_percent": 0},
        "memory_tuning_zram_size_percent is 0 (expected 1 to 200)",
    ),
    "prewarm_relative": (
        "pi5",
        "memory_tuning",
        {"memory_tuning_prewarm_files": ["models/model.gguf"]},
        "expected\nabsolute paths",
    ),
    "scheduler_unknown": (
        "pi5",
        "storage_tuning",
        {"storage_tuning_block_queues": [{"match": "nvme[0-9]*n[0-9]*", "scheduler": "cfq"}]},
        "scheduler",
    ),
    "scheduler_not_offered": (
        "pi5",
        "storage_tuning",
        {"storage_tuning_block_queues": [{"match": "mmcblk[0-9]*", "scheduler": "kyber"}]},
        "scheduler 'kyber' not offered by mmcblk0; available: mq-deadline none; "
        "set storage_tuning_block_queues[].scheduler for 'mmcblk[0-9]*' to one offered, or load its module "
        "(modprobe kyber-iosched)",
    ),
    "xfs_nobarrier": (
        "x86",
        "storage_tuning",
        {
            "storage_tuning_model_source": "LABEL=models",
            "storage_tuning_model_fstype": "xfs",
            "storage_tuning_model_options": ["noatime", "nobarrier"],
        },
        "kernels since 4.19 dropped the barrier/nobarrier options",
    ),
    "source_by_device_name": (
        "pi5",
        "storage_tuning",
        {"storage_tuning_model_source": "/dev/nvme0n1p1"},
        "storage_tuning_model_source is '/dev/nvme0n1p1'; expected LABEL=<label> or UUID=<uuid>",
    ),
    "format_without_device": (
        "pi5",
        "storage_tuning",
        {"storage_tuning_model_source": "LABEL=models", "storage_tuning_format_ok": True},
        "storage_tuning_format_device must name the device",
    ),
    "xfs_label_too_long": (
        "x86",
        "storage_tuning",
        {
            "storage_tuning_model_source": "LABEL=much-too-long-label",
            "storage_tuning_model_fstype": "xfs",
            "storage_tuning_format_ok": True,
            "storage_tuning_format_device": "/dev/nvme0n1p1",
        },
        "xfs takes labels of at most 12",
    ),
    "read_ahead_negative": (
        "pi5",
        "storage_tuning",
        {"storage_tuning_block_queues": [{"match": "nvme*", "read_ahead_kb": -1}]},
        "read_ahead_kb from 0 to 65536",
    ),
    "housekeeping_takes_all": (
        "pi5",
        "cpu_pinning",
        {"cpu_pinning_housekeeping_cpus": [0, 1, 2, 3]},
        "leaves no CPU for inference on housekeeping_takes_all: "
        "the candidates are the performance cores (0,1,2,3)",
    ),
    "housekeeping_offline": (
        "pi5",
        "cpu_pinning",
        {"cpu_pinning_housekeeping_cpus": [9]},
        "cpu_pinning_housekeeping_cpus has [9], which housekeeping_offline does not have online "
        "(online: 0-3)",
    ),
    "gpu_index_missing": (
        "x86",
        "cpu_pinning",
        {"cpu_pinning_gpu_index": 2},
        "has 1 NVIDIA GPU(s) (0000:81:00.0)",
    ),
    "fifo_unthrottled": (
        "x86_rt_unthrottled",
        "cpu_pinning",
        {"cpu_pinning_sched_fifo": True},
        "kernel.sched_rt_runtime_us -1",
    ),
    "memory_high_words": (
        "pi5",
        "cgroup_slices",
        {"cgroup_slices_inference_memory_high": "lots"},
        "cgroup_slices_inference_memory_high is 'lots'; expected e.g. 6G or 80%",
    ),
    "cpu_quota_bare_number": (
        "pi5",
        "cgroup_slices",
        {"cgroup_slices_inference_cpu_quota": "350"},
        "cgroup_slices_inference_cpu_quota is '350'; expected e.g. 350%",
    ),
    "slice_nested": (
        "pi5",
        "cgroup_slices",
        {"cgroup_slices_inference_slice": "llm-fleet.slice"},
        "top-level slice",
    ),
    "allowed_cpus_offline": (
        "pi5",
        "cgroup_slices",
        {"cgroup_slices_inference_allowed_cpus": [1, 7]},
        "has CPUs\n0-3 online",
    ),
    "cpuset_on_cgroup_v1": (
        "pi5_cgroup_hybrid",
        "cgroup_slices",
        {"cgroup_slices_inference_allowed_cpus": [1, 2, 3]},
        "has\ncgroup version 1 (hybrid)",
    ),
    "slice_memory_limit_without_memory_controller": (
        "pi5_stock",
        "cgroup_slices",
        {"cgroup_slices_inference_memory_high": "6G"},
        "cgroup_slices_inference_memory_high is 6G for slice_memory_limit_without_memory_controller, but the "
        "memory cgroup controller is off there (/proc/cgroups says memory is not enabled), so systemd would "
        "accept the limit and enforce nothing. Raspberry Pi OS boots with cgroup_disable=memory. Add "
        "cgroup_enable=memory to the one line of /boot/firmware/cmdline.txt and reboot, or set "
        "pi_boot_reboot_ok: true",
    ),
    "pi_boot_memory_limit_without_reboot": (
        "pi5_stock",
        "pi_boot",
        {"rpc_worker_memory_max": "7G"},
        "rpc_worker_memory_max is 7G for pi_boot_memory_limit_without_reboot, but the memory cgroup controller "
        "is off there",
    ),
    "pi_boot_memory_limit_without_memory_cgroup": (
        "pi5_stock",
        "pi_boot",
        {"rpc_worker_memory_high": "6G", "pi_boot_reboot_ok": True, "pi_boot_memory_cgroup": False},
        "rpc_worker_memory_high is 6G for pi_boot_memory_limit_without_memory_cgroup",
    ),
    "pi_boot_pcie_gen_4": (
        "pi5",
        "pi_boot",
        {"pi_boot_pcie_gen": 4, "pi_boot_default_governor": "schedutil"},
        'Found pi_boot_default_governor "schedutil" (expected null or a governor pi_boot_pcie_gen_4 offers: '
        "ondemand performance powersave) and pi_boot_pcie_gen 4 (expected null, 1, 2 or 3",
    ),
    "pi_boot_config_section": (
        "pi5",
        "pi_boot",
        {"pi_boot_config_lines": ["[pi5]"]},
        'pi_boot_config_lines has "[pi5]"; expected one setting per entry such as dtparam=pciex1',
    ),
    "pi_boot_cmdline_two_tokens": (
        "pi5",
        "pi_boot",
        {"pi_boot_cmdline_absent": ["quiet splash"]},
        'pi_boot_cmdline_absent has "quiet splash"; expected one kernel parameter per entry',
    ),
    "pi_boot_old_boot_dir": (
        "pi5_old_boot_dir",
        "pi_boot",
        {},
        "pi_boot_firmware_dir is /boot/firmware, but pi_boot_old_boot_dir has its cmdline.txt in /boot. "
        "Set pi_boot_firmware_dir to /boot.",
    ),
    "debloat_ssh": (
        "pi5",
        "debloat",
        {"debloat_units": ["bluetooth.service", "ssh.service"]},
        "debloat_units lists ssh.service; this role never stops ssh or networking",
    ),
    "debloat_wifi_instance": (
        "pi5",
        "debloat",
        {"debloat_units": ["wpa_supplicant@wlan0.service", "networking"]},
        "debloat_units lists wpa_supplicant@wlan0.service, networking",
    ),
}

# case: (tree, expected cpu_pinning_cpus, cpu_pinning_numa_node, cpu_pinning_systemd)
PINNING = {
    "pin_pi5": ("pi5", {}, [1, 2, 3], None, {"CPUAffinity": "1 2 3"}),
    "pin_rk3588": ("rk3588", {}, [4, 5, 6, 7], None, {"CPUAffinity": "4 5 6 7"}),
    "pin_x86_gpu_node": (
        "x86",
        {"cpu_pinning_numa_policy": "bind"},
        [4, 5, 6, 7],
        1,
        {"CPUAffinity": "4 5 6 7", "NUMAPolicy": "bind", "NUMAMask": "1"},
    ),
    "pin_x86_gpu_node_cpus_only": (
        "x86",
        {"cpu_pinning_numa_policy": "none"},
        [4, 5, 6, 7],
        1,
        {"CPUAffinity": "4 5 6 7"},
    ),
    "pin_x86_without_gpu": ("x86", {"cpu_pinning_follow_gpu": False}, [1, 2, 3, 4, 5, 6, 7], None, None),
    "pin_x86_fifo": (
        "x86",
        {"cpu_pinning_sched_fifo": True, "cpu_pinning_housekeeping_cpus": [0, 4]},
        [5, 6, 7],
        1,
        {
            "CPUAffinity": "5 6 7",
            "NUMAPolicy": "preferred",
            "NUMAMask": "1",
            "CPUSchedulingPolicy": "fifo",
            "CPUSchedulingPriority": 10,
        },
    ),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> PlaybookRun:
    base = tmp_path_factory.mktemp("roles")
    roots = {name: str(build(base / name)) for name, build in TREES.items()}
    hosts = {}
    for case, (tree, role, variables, _fragment) in FAILURES.items():
        hosts[case] = {"case_role": role, "tuning_facts_root": roots[tree], **variables}
    for case, (tree, variables, *_expected) in PINNING.items():
        hosts[case] = {
            "case_role": "cpu_pinning",
            "case_entry": "facts",
            "tuning_facts_root": roots[tree],
            **variables,
        }
    inventory = local_inventory(base / "inventory.yml", hosts)
    # Check mode: a case that wrongly passed its checks still changes nothing on this machine.
    return run_playbook(PLAYBOOK, inventory, "--check", "--forks", "8")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FAILURES))
def test_wrong_variable_fails_in_a_check_before_any_change(run, case):
    failure, before = run.first_failure(case)
    assert failure is not None, f"{case} ran through: {[task.task for task in run.host_tasks(case)]}"
    assert failure.task.split(" : ")[-1].startswith(("Check", "Validating arguments")), failure.task
    assert not [task.task for task in before if task.changed]
    fragment = FAILURES[case][3]
    assert " ".join(fragment.split()) in " ".join(failure.message.split())


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PINNING))
def test_pinning_facts(run, case):
    _tree, _variables, cpus, node, systemd = PINNING[case]
    failure, tasks = run.first_failure(case)
    assert failure is None, failure.message
    facts = {}
    for task in tasks:
        facts.update(task.result.get("ansible_facts", {}))
    assert facts["cpu_pinning_cpus"] == cpus
    assert facts["cpu_pinning_numa_node"] == node
    assert facts["cpu_pinning_cpu_affinity"] == " ".join(str(cpu) for cpu in cpus)
    if systemd is not None:
        assert facts["cpu_pinning_systemd"] == systemd
    warned = any(
        task.task.endswith("Warn that SCHED_FIFO inference can starve the kernel's own work")
        and not task.result.get("skipped")
        for task in tasks
    )
    assert warned == ("fifo" in case)
