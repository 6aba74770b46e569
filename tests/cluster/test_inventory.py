"""The local inventory describes the same hosts the harness starts."""

from __future__ import annotations

import yaml

from tests.cluster import config


def _load(relative: str) -> dict:
    with open(config.REPO_ROOT / relative) as handle:
        return yaml.safe_load(handle)


def test_inventory_lists_the_harness_hosts_in_their_groups() -> None:
    children = _load("inventory/local/hosts.yml")["all"]["children"]
    assert set(config.GROUPS) <= set(children)
    listed = {
        name: (group, values["ansible_host"])
        for group in config.GROUPS
        for name, values in children[group]["hosts"].items()
    }
    assert listed == {host.name: (host.group, host.address) for host in config.HOSTS}


def test_the_other_groups_gather_harness_hosts_without_addresses_of_their_own() -> None:
    # A role group such as monitoring names hosts the harness starts; their address stays where it is.
    children = _load("inventory/local/hosts.yml")["all"]["children"]
    names = {host.name for host in config.HOSTS}
    others = {group: body["hosts"] for group, body in children.items() if group not in config.GROUPS}
    assert others["monitoring"] == {"gpu1": None}
    for group, hosts in others.items():
        assert set(hosts) <= names, group
        assert all(not values for values in hosts.values()), group


def test_inventory_uses_the_harness_key_as_root_with_debian_python() -> None:
    values = _load("inventory/local/group_vars/all.yml")
    assert values["ansible_user"] == "root"
    assert values["ansible_ssh_private_key_file"] == str(config.SSH_KEY)
    assert values["ansible_python_interpreter"] == "/usr/bin/python3"
    assert "StrictHostKeyChecking=no" in values["ansible_ssh_common_args"]
