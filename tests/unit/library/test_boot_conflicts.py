"""The boot_conflicts module, built and run as Ansible runs it, on fake roots."""

from __future__ import annotations


def test_boot_conflicts_fails_on_a_later_sysctl_file_and_warns_on_an_earlier_one(run_module, pi5):
    pi5.write("etc/sysctl.conf", "vm.swappiness=10\n")
    pi5.link("etc/sysctl.d/99-sysctl.conf", "../sysctl.conf")
    args = {"root": str(pi5), "sysctls": {"vm.swappiness": 150}, "sysctl_file": "/etc/sysctl.d/99-zz-x.conf"}
    result = run_module("boot_conflicts", args)
    assert not result.get("failed")
    assert "sets vm.swappiness = 10 (wanted 150); ours is applied after it" in str(result["warnings"])
    result = run_module("boot_conflicts", dict(args, sysctl_file="/etc/sysctl.d/60-llmfleet-memory.conf"))
    assert result["failed"] is True
    assert result["msg"].startswith(
        "/etc/sysctl.d/99-sysctl.conf -> /etc/sysctl.conf line 1 sets vm.swappiness = 10 (wanted 150). "
        "That is applied after ours at boot"
    )
