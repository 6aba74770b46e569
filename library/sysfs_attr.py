#!/usr/bin/python
"""Ansible module: set a sysfs attribute on every file a glob matches, idempotently."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.llmfleet_sysfs import (
    SysfsError,
    apply_attribute_changes,
    plan_attribute_changes,
    render_state,
)

DOCUMENTATION = r"""
---
module: sysfs_attr
short_description: Set a sysfs attribute now, on every CPU or device a glob matches
description:
  - Reads every attribute matching O(path), decides which differ from O(value), and writes only those.
  - "Understands the bracketed form the kernel uses for choices (C(always [madvise] never),
    C([mq-deadline] none)): the bracketed word is the current value and the words are the offer."
  - Where the offer lives in a file beside the attribute (C(scaling_available_governors) beside
    C(scaling_governor)), name it in O(available). A value that is not offered fails before anything
    is written, with the offer in the message.
  - Paths that resolve to the same file (per-CPU links to one cpufreq policy) are set once.
  - "An attribute of a CPU missing from C(/sys/devices/system/cpu/online) is left alone and listed in
    RV(skipped) with a warning: an offline CPU runs nothing, and the kernel refuses reads of a cpufreq
    policy whose CPUs are all offline."
  - A read that fails says why (the kernel's error), not a guess.
  - The setting lasts until reboot; the roles persist it with a unit, a udev rule or tmpfiles.
options:
  path:
    description:
      - Absolute sysfs path of the attribute; shell globs match several
        (C(/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor)).
    type: str
    required: true
  value:
    description:
      - The value to write. Compared as text with the current value (the bracketed word, if any).
    type: str
    required: true
  available:
    description:
      - Name of a file in the same directory as each attribute that lists the accepted values.
    type: str
  label:
    description:
      - What the attribute is called in messages (C(governor)); defaults to the file name.
    type: str
  hint:
    description:
      - What to check when the value is not offered, appended to that error.
    type: str
  missing:
    description:
      - What to do when O(path) matches nothing. V(ignore) suits hardware that may lack the attribute.
    type: str
    choices: [fail, ignore]
    default: fail
  root:
    description:
      - Directory that stands for C(/); tests point it at a fake tree.
    type: path
    default: /
attributes:
  check_mode:
    support: full
    description: Reads, validates and reports what would change; writes nothing.
  diff_mode:
    support: full
    description: "Shows every matched attribute as C(path: value), before and after."
author:
  - llmfleet maintainers
"""

EXAMPLES = r"""
- name: Run every CPU at the performance governor
  sysfs_attr:
    path: /sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor
    value: performance
    available: scaling_available_governors
    label: governor
    hint: is the cpufreq driver loaded?

- name: Use transparent huge pages only where programs ask for them
  sysfs_attr:
    path: /sys/kernel/mm/transparent_hugepage/enabled
    value: madvise

- name: Let NVMe disks bypass the I/O scheduler
  sysfs_attr:
    path: /sys/block/nvme[0-9]*n[0-9]*/queue/scheduler
    value: none
    missing: ignore
"""

RETURN = r"""
attributes:
  description: Every matched attribute (one per distinct file) with what it held and what it holds now.
  returned: always
  type: list
  elements: dict
  contains:
    path:
      description: The attribute path as on the host.
      type: str
    owner:
      description: What the attribute belongs to (C(cpu2), C(nvme0n1), C(transparent_hugepage)).
      type: str
    before:
      description: The value before the task.
      type: str
    after:
      description: The value after the task (or after it, in check mode).
      type: str
    changed:
      description: Whether this attribute was (or would be) written.
      type: bool
  sample:
    - path: /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor
      owner: cpu0
      before: ondemand
      after: performance
      changed: true
skipped:
  description: Attributes left alone because their CPU is offline, with the reason.
  returned: always
  type: list
  elements: dict
  contains:
    path:
      description: The attribute path as on the host.
      type: str
    owner:
      description: The CPU it belongs to.
      type: str
    reason:
      description: Why it was left alone.
      type: str
  sample:
    - path: /sys/devices/system/cpu/cpu3/cpufreq/scaling_governor
      owner: cpu3
      reason: "cpu3 is offline (online: 0-2)"
changed_paths:
  description: The attributes that were (or would be) written.
  returned: always
  type: list
  elements: str
  sample: [/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor]
"""


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="str", required=True),
            value=dict(type="str", required=True),
            available=dict(type="str"),
            label=dict(type="str"),
            hint=dict(type="str"),
            missing=dict(type="str", choices=["fail", "ignore"], default="fail"),
            root=dict(type="path", default="/"),
        ),
        supports_check_mode=True,
    )
    params = module.params
    try:
        changes = plan_attribute_changes(
            params["root"],
            params["path"],
            params["value"].strip(),
            available=params["available"],
            label=params["label"],
            hint=params["hint"],
            missing=params["missing"],
        )
        if not module.check_mode:
            apply_attribute_changes(params["root"], changes)
    except SysfsError as exc:
        module.fail_json(msg=str(exc))
    planned = [change for change in changes if not change.skipped]
    skipped = [
        dict(path=change.path, owner=change.owner, reason=change.skipped)
        for change in changes
        if change.skipped
    ]
    for reason in sorted({entry["reason"] for entry in skipped}):
        module.warn(f"{reason}: its {params['label'] or 'attribute'} is left alone")
    result = dict(
        changed=any(change.changed for change in planned),
        attributes=[change.as_dict() for change in planned],
        skipped=skipped,
        changed_paths=[change.path for change in planned if change.changed],
    )
    if module._diff:
        result["diff"] = dict(before=render_state(changes, "before"), after=render_state(changes, "after"))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
