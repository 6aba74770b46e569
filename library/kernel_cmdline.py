#!/usr/bin/python
"""Ansible module: add, remove or set tokens of a one-line kernel command line file (cmdline.txt)."""

from __future__ import annotations

import os
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.llmfleet_boot import CmdlineError, plan_cmdline

DOCUMENTATION = r"""
---
module: kernel_cmdline
short_description: Edit the tokens of a one-line kernel command line file such as a Raspberry Pi's cmdline.txt
description:
  - "The Raspberry Pi firmware passes the first line of C(cmdline.txt) to the kernel. This module edits that
    line token by token: tokens it is not asked about keep their place and the whitespace around them byte for
    byte; new tokens go at the end of the line, in the order given (first O(present), then O(parameters))."
  - Decides whether anything changes before writing; writes nothing in check mode; the change takes effect
    at the next boot.
  - Fails when the file has a second non-empty line, which the firmware would ignore.
options:
  path:
    description:
      - The command line file.
    type: path
    default: /boot/firmware/cmdline.txt
  present:
    description:
      - Tokens that must be on the line, appended when missing. The same key may appear several times
        (C(cgroup_enable=cpuset cgroup_enable=memory)).
    type: list
    elements: str
    default: []
  absent:
    description:
      - Tokens that must not be on the line; every occurrence is removed.
    type: list
    elements: str
    default: []
  parameters:
    description:
      - "Parameters that take one value, as name and value (C(cpufreq.default_governor: performance)). The first
        token with that name is replaced in place, later ones are removed, a missing one is appended. An empty
        value gives the bare name (a flag such as C(quiet))."
    type: dict
    default: {}
  backup:
    description:
      - Keep a copy of the file, stamped with the time, before changing it.
    type: bool
    default: false
  root:
    description:
      - Directory that stands for C(/); tests point it at a fake tree.
    type: path
    default: /
attributes:
  check_mode:
    support: full
    description: Reads the file and reports what would change; writes nothing.
  diff_mode:
    support: full
    description: Shows the whole file (the line) before and after.
author:
  - llmfleet maintainers
"""

EXAMPLES = r"""
- name: Turn the memory cgroup controller on at the next boot
  kernel_cmdline:
    present: [cgroup_enable=memory]
    absent: [cgroup_disable=memory]

- name: Start the kernel with the performance governor
  kernel_cmdline:
    parameters:
      cpufreq.default_governor: performance
"""

RETURN = r"""
cmdline:
  description: The first line of the file after the task (or after it, in check mode).
  returned: always
  type: str
  sample: console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 rootwait cgroup_enable=memory
added:
  description: Tokens that were (or would be) added, a replaced value included.
  returned: always
  type: list
  elements: str
  sample: [cgroup_enable=memory]
removed:
  description: Tokens that were (or would be) removed, a replaced value included.
  returned: always
  type: list
  elements: str
  sample: [cgroup_disable=memory]
backup_file:
  description: Where the copy of the old file went.
  returned: when O(backup) is true and the file changed
  type: str
"""


def write_atomically(module: AnsibleModule, path: str, data: bytes) -> None:
    """Write next to the file and rename over it, so a power cut leaves the old line or the new one."""
    directory = os.path.dirname(path) or "."
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".cmdline.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    module.atomic_move(temporary, path)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", default="/boot/firmware/cmdline.txt"),
            present=dict(type="list", elements="str", default=[]),
            absent=dict(type="list", elements="str", default=[]),
            parameters=dict(type="dict", default={}),
            backup=dict(type="bool", default=False),
            root=dict(type="path", default="/"),
        ),
        supports_check_mode=True,
    )
    params = module.params
    shown = params["path"]
    path = os.path.join(params["root"], shown.lstrip("/"))
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except OSError as exc:
        module.fail_json(
            msg=f"cannot read {shown}: {exc.strerror}. Is this the boot partition the firmware reads "
            "(/boot/firmware on Raspberry Pi OS 12 and later, /boot before)?"
        )
    # surrogateescape keeps any byte that is not UTF-8 as it was when the text is written back.
    text = raw.decode("utf-8", "surrogateescape")
    try:
        plan = plan_cmdline(text, params["present"], params["absent"], params["parameters"])
    except CmdlineError as exc:
        module.fail_json(msg=f"cannot edit {shown}: {exc}")
    result = dict(
        changed=plan.changed,
        cmdline=plan.after.partition("\n")[0],
        added=plan.added,
        removed=plan.removed,
    )
    if plan.changed and not module.check_mode:
        if params["backup"]:
            result["backup_file"] = module.backup_local(path)
        write_atomically(module, path, plan.after.encode("utf-8", "surrogateescape"))
    if module._diff:
        result["diff"] = dict(before=plan.before, after=plan.after, before_header=shown, after_header=shown)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
