#!/usr/bin/python
"""Ansible module: find what else sets our tuning at boot, and fail where it would undo it."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.llmfleet_boot_conflicts import governor_conflicts, sysctl_conflicts, thp_conflicts

DOCUMENTATION = r"""
---
module: boot_conflicts
short_description: Find other boot-time sources of the sysctls, THP settings or CPU governor we persist
description:
  - Reads, never writes. A setting persisted in a file holds after a reboot only when nothing applied
    later sets it otherwise; this module names every other source of the same setting with another value.
  - "Sysctls: every C(*.conf) in the sysctl.d directories in systemd-sysctl's order (by file name across
    all of them), /etc/sysctl.conf where a sysctl.d link reads it (Debian's C(99-sysctl.conf)), and
    C(sysctl.*) words of the kernel command line."
  - "Transparent huge pages: C(transparent_hugepage=) on the kernel command line and C(w) lines of other
    tmpfiles.d files."
  - "CPU governor: enabled boot scripts and units that set one (raspi-config, cpufrequtils, ondemand,
    cpupower) and daemons that keep changing it (power-profiles-daemon, tuned)."
  - A source applied before ours is reported as C(overridden) with a warning. One applied after ours
    C(wins) and fails the task with the file, the line and what to do, unless O(on_conflict=warn).
options:
  sysctls:
    description: Sysctls by full name with the values we persist.
    type: dict
    default: {}
  sysctl_file:
    description: The sysctl.d file that holds O(sysctls); its name decides its place in the order.
    type: path
  thp:
    description: "THP settings we persist, C({enabled: madvise, defrag: never}); null values are left out."
    type: dict
    default: {}
  thp_tmpfiles:
    description: The tmpfiles.d file that holds O(thp).
    type: path
  governor:
    description: The CPU governor our boot unit sets.
    type: str
  on_conflict:
    description: What a source that wins over ours does to the task.
    type: str
    choices: [fail, warn]
    default: fail
  root:
    description:
      - Directory that stands for C(/); tests point it at a fake tree.
    type: path
    default: /
attributes:
  check_mode:
    support: full
    description: The module only reads, so it runs unchanged in check mode.
  diff_mode:
    support: none
author:
  - llmfleet maintainers
"""

EXAMPLES = r"""
- name: Check that no other sysctl file undoes the memory settings at boot
  boot_conflicts:
    sysctls:
      vm.swappiness: 150
    sysctl_file: /etc/sysctl.d/99-zz-llmfleet-memory.conf

- name: Check that nothing else sets the CPU governor at boot
  boot_conflicts:
    governor: performance
    on_conflict: warn
"""

RETURN = r"""
conflicts:
  description: Every other source of a setting with another value, in boot order.
  returned: always
  type: list
  elements: dict
  contains:
    setting:
      description: The sysctl name, C(transparent_hugepage/enabled) or C(governor).
      type: str
    wanted:
      description: Our value.
      type: str
    found:
      description: The other source's value.
      type: str
    source:
      description: The file and line, the kernel command line, or the unit.
      type: str
    effect:
      description: C(overridden) where ours is applied later, C(wins) where it is applied after ours.
      type: str
  sample:
    - setting: vm.swappiness
      wanted: "150"
      found: "10"
      source: /etc/sysctl.d/99-sysctl.conf -> /etc/sysctl.conf line 3
      effect: overridden
"""


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            sysctls=dict(type="dict", default={}),
            sysctl_file=dict(type="path"),
            thp=dict(type="dict", default={}),
            thp_tmpfiles=dict(type="path"),
            governor=dict(type="str"),
            on_conflict=dict(type="str", choices=["fail", "warn"], default="fail"),
            root=dict(type="path", default="/"),
        ),
        required_if=[],
        supports_check_mode=True,
    )
    params = module.params
    root = params["root"]
    if params["sysctls"] and not params["sysctl_file"]:
        module.fail_json(msg="sysctls needs sysctl_file, the sysctl.d file that holds them")
    if params["thp"] and not params["thp_tmpfiles"]:
        module.fail_json(msg="thp needs thp_tmpfiles, the tmpfiles.d file that holds them")
    conflicts = []
    if params["sysctls"]:
        conflicts += sysctl_conflicts(root, params["sysctl_file"], params["sysctls"])
    if params["thp"]:
        conflicts += thp_conflicts(root, params["thp_tmpfiles"], params["thp"])
    if params["governor"]:
        conflicts += governor_conflicts(root, params["governor"])
    for conflict in conflicts:
        if conflict.effect == "overridden":
            module.warn(f"{conflict.describe()}; ours is applied after it at boot and wins")
    winners = [conflict for conflict in conflicts if conflict.effect == "wins"]
    result = dict(changed=False, conflicts=[conflict.as_dict() for conflict in conflicts])
    if winners:
        message = (
            "; ".join(conflict.describe() for conflict in winners)
            + ". That is applied after ours at boot, so the host would come up with it, not ours. Remove the "
            "line (or disable the unit), or give it our value"
        )
        if params["on_conflict"] == "fail":
            module.fail_json(msg=message, **result)
        module.warn(message)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
