#!/usr/bin/python
"""Ansible module: the tuning-relevant state and topology of a host, as ``ansible_facts.tuning``."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.llmfleet_tuning_facts import gather

DOCUMENTATION = r"""
---
module: tuning_facts
short_description: Gather the CPU, memory, storage and cgroup state that the tuning roles act on
description:
  - Reads sysfs and procfs (never writes) and returns C(ansible_facts.tuning).
  - "CPUs: online set, per-CPU capacity, frequencies, governor and offered governors, and the
    performance cores (all four Cortex-A76 on a Raspberry Pi 5, the big cluster on big.LITTLE
    boards, every CPU on x86)."
  - "NUMA nodes and their CPUs; GPUs (PCI class 0x03xxxx) with vendor, NVIDIA flag and NUMA node."
  - "Transparent huge pages, the vm sysctls the memory role sets, total memory, swap devices
    (zram flagged), block devices with rotational flag, scheduler and read-ahead, mounts with
    options, real-time throttling, cgroup version and controllers."
  - "Whether the host is a Raspberry Pi (device-tree model) and, where C(vcgencmd) exists, the
    decoded C(get_throttled) bits."
  - "What the running kernel does, not what the boot files ask for: whether the memory cgroup controller
    is enabled, the kernel command line, the NVMe link's speed and width, and whether a reboot is pending."
options:
  root:
    description:
      - Directory that stands for C(/) when reading C(/sys) and C(/proc). Tests point it at a
        fake tree; C(vcgencmd) is only run when it is C(/).
    type: path
    default: /
  vcgencmd:
    description:
      - Run C(vcgencmd get_throttled) where the command exists.
    type: bool
    default: true
attributes:
  check_mode:
    support: full
    description: The module only reads, so it runs unchanged in check mode.
  diff_mode:
    support: none
  facts:
    support: full
author:
  - llmfleet maintainers
"""

EXAMPLES = r"""
- name: Gather the tuning facts of the host
  tuning_facts:

- name: Show the performance cores
  ansible.builtin.debug:
    msg: "{{ ansible_facts.tuning.cpu.performance_list }}"

- name: Read a fake tree instead of the host
  tuning_facts:
    root: /tmp/fake-pi5
"""

RETURN = r"""
ansible_facts:
  description: Facts added to the host.
  returned: always
  type: dict
  contains:
    tuning:
      description: The tuning state of the host.
      type: dict
      contains:
        cpu:
          description: >-
            C(online) and C(performance) CPU ids with C(online_list) and C(performance_list) in
            kernel list form (C(0-3)); C(cpus) has per-CPU C(capacity), C(max_freq_khz),
            C(governor), C(governors_offered), C(driver), C(energy_perf_bias).
          type: dict
          sample:
            count: 4
            online: [0, 1, 2, 3]
            online_list: "0-3"
            performance: [0, 1, 2, 3]
            performance_list: "0-3"
        cpufreq:
          description: >-
            C(present), C(driver), C(governors_offered) (offered by every online CPU),
            C(governors_current), C(governor) (where all agree), C(energy_perf_bias) and
            C(energy_performance_preference) support.
          type: dict
          sample:
            present: true
            driver: cpufreq-dt
            governors_offered: [ondemand, performance, powersave]
            governors_current: [ondemand]
            governor: ondemand
        numa:
          description: C(nodes) with C(id), C(cpus) and C(cpulist); empty where the kernel shows no NUMA.
          type: dict
          sample:
            count: 2
            nodes: [{id: 0, cpus: [0, 1], cpulist: "0-1"}, {id: 1, cpus: [2, 3], cpulist: "2-3"}]
        gpus:
          description: >-
            PCI display controllers with C(address), C(vendor), C(nvidia), C(numa_node), C(local_cpus).
          type: list
          elements: dict
        nvidia_gpus:
          description: The entries of C(gpus) whose vendor is NVIDIA (0x10de).
          type: list
          elements: dict
        thp:
          description: Transparent huge pages C(enabled) and C(defrag) with what each offers.
          type: dict
          sample: {present: true, enabled: madvise, enabled_offered: [always, madvise, never]}
        vm:
          description: The vm sysctls the memory role sets, by sysctl name, where the kernel has them.
          type: dict
          sample: {swappiness: 60, dirty_ratio: 20, page-cluster: 3}
        memory:
          description: C(total_kb) and C(total_mb) from /proc/meminfo.
          type: dict
        swap:
          description: >-
            Active swap C(devices) (C(zram) flagged), C(total_kb), and whether C(zram) or C(disk) swap is on.
          type: dict
        block:
          description: >-
            Whole block devices with C(kind) (nvme, mmc, scsi, zram, ...), C(rotational), C(scheduler),
            C(schedulers_offered), C(read_ahead_kb), C(size_bytes).
          type: list
          elements: dict
        mounts:
          description: Mounted filesystems with C(device), C(mountpoint), C(fstype), C(options).
          type: list
          elements: dict
        board:
          description: Device-tree C(model), C(raspberry_pi) and C(raspberry_pi_generation).
          type: dict
          sample: {model: Raspberry Pi 5 Model B Rev 1.0, raspberry_pi: true, raspberry_pi_generation: 5}
        throttled:
          description: >-
            Decoded C(vcgencmd get_throttled): C(available), C(raw), C(ok), and the flags C(now) and
            C(since_boot) (under_voltage, arm_freq_capped, throttled, soft_temp_limit); C(error) when the
            output could not be read.
          type: dict
        sched:
          description: >-
            Real-time throttling from /proc/sys/kernel, C(rt_runtime_us) of every C(rt_period_us)
            (C(rt_runtime_us) -1 means RT tasks are never throttled).
          type: dict
          sample: {rt_runtime_us: 950000, rt_period_us: 1000000}
        cgroup:
          description: >-
            C(version) (1 or 2), C(hybrid), the cgroup v2 C(controllers), C(enabled) (controller name to the
            enabled flag of /proc/cgroups), and C(memory_controller): whether the running kernel enforces
            memory limits (false on Raspberry Pi OS, which boots with C(cgroup_disable=memory), until
            C(cgroup_enable=memory) is on the command line and the Pi has rebooted); null where unknown.
          type: dict
          sample: {version: 2, hybrid: false, controllers: [cpuset, cpu, io, pids], memory_controller: false}
        boot:
          description: >-
            C(cmdline) and C(cmdline_tokens) of the running kernel (/proc/cmdline); C(firmware_dir) where the
            Raspberry Pi firmware's C(cmdline.txt) is (/boot/firmware, /boot, or null) with its first line
            C(cmdline_file) and C(cmdline_file_tokens); C(cmdline_pending), the tokens of that file the running
            kernel lacks (C(console=), which the firmware rewrites, excepted); C(reboot_required) with
            C(reboot_required_reasons) (those tokens, or /run/reboot-required).
          type: dict
          sample:
            cmdline: "reboot=w coherent_pool=1M cgroup_disable=memory console=tty1 root=PARTUUID=4e639091-02 rootwait"
            firmware_dir: /boot/firmware
            cmdline_pending: [cgroup_enable=memory]
            reboot_required: true
        nvme:
          description: >-
            NVMe controllers on PCIe with the link they run at and the best they could
            (C(current_link_speed), C(current_link_gts), C(current_link_generation), C(current_link_width),
            and the same with C(max_)). A Pi 5 runs its connector at generation 2 unless config.txt has
            C(dtparam=pciex1_gen=3).
          type: list
          elements: dict
          sample:
            - address: "0001:01:00.0"
              current_link_speed: 5.0 GT/s PCIe
              current_link_generation: 2
              current_link_width: 1
              max_link_speed: 8.0 GT/s PCIe
              max_link_generation: 3
              max_link_width: 4
"""


def read_throttled(module: AnsibleModule) -> str | None:
    """What ``vcgencmd get_throttled`` prints, or None where the command is absent or failed."""
    if not module.params["vcgencmd"] or module.params["root"] != "/":
        return None
    vcgencmd = module.get_bin_path("vcgencmd")
    if vcgencmd is None:
        return None
    rc, out, _err = module.run_command([vcgencmd, "get_throttled"])
    return out if rc == 0 else None


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            root=dict(type="path", default="/"),
            vcgencmd=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    facts = gather(module.params["root"], read_throttled(module))
    module.exit_json(changed=False, ansible_facts={"tuning": facts})


if __name__ == "__main__":
    main()
