"""The local inventory describes the same hosts the harness starts."""

from __future__ import annotations

import yaml

from tests.cluster import config


def _load(relative: str) -> dict:
    with open(config.REPO_ROOT / relative) as handle:
        return yaml.safe_load(handle)


def test_inventory_lists_the_harness_hosts_in_their_groups() -> None:
    children = _load("inventory/local/hosts.yml")["all"]["children"]
    assert set(children) == set(config.GROUPS)
    listed = {
        name: (group, values["ansible_host"])
        for group, body in children.items()
        for name, values in body["hosts"].items()
    }
    assert listed == {host.name: (host.group, host.address) for host in config.HOSTS}


def test_inventory_uses_the_harness_key_as_root_with_debian_python() -> None:
    values = _load("inventory/local/group_vars/all.yml")
    assert values["ansible_user"] == "root"
    assert values["ansible_ssh_private_key_file"] == str(config.SSH_KEY)
    assert values["ansible_python_interpreter"] == "/usr/bin/python3"
    assert "StrictHostKeyChecking=no" in values["ansible_ssh_common_args"]
