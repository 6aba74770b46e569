"""Other boot-time sources of the settings we persist, in the order the boot applies them, on fake roots."""

from __future__ import annotations

from ansible.module_utils.llmfleet_boot_conflicts import (
    governor_conflicts,
    parse_sysctl_text,
    sysctl_conflicts,
    thp_conflicts,
)

OURS = "/etc/sysctl.d/99-zz-llmfleet-memory.conf"
OLD = "/etc/sysctl.d/60-llmfleet-memory.conf"


def debian_sysctl(host, conf: str) -> None:
    """Debian 12: /etc/sysctl.conf, read through the 99-sysctl.conf link, and a package file in /usr/lib."""
    host.write("etc/sysctl.conf", conf)
    host.link("etc/sysctl.d/99-sysctl.conf", "../sysctl.conf")
    host.write("usr/lib/sysctl.d/50-pid-max.conf", "kernel.pid_max = 4194304\n")


def effects(conflicts):
    return [(c.setting, c.found, c.source, c.effect) for c in conflicts]


def test_parse_sysctl_text_skips_comments_and_reads_slashes():
    text = "# comment\n; other\nvm.swappiness = 10\n-vm/dirty_ratio=5\n\nnonsense\n"
    assert parse_sysctl_text(text) == [(3, "vm.swappiness", "10"), (4, "vm.dirty_ratio", "5")]


def test_sysctl_conf_loses_to_our_file_name_and_is_reported(pi5):
    debian_sysctl(pi5, "#vm.swappiness=1\nvm.swappiness=10\n")
    conflicts = sysctl_conflicts(str(pi5), OURS, {"vm.swappiness": 150, "vm.dirty_ratio": 10})
    assert effects(conflicts) == [
        ("vm.swappiness", "10", "/etc/sysctl.d/99-sysctl.conf -> /etc/sysctl.conf line 2", "overridden")
    ]


def test_sysctl_conf_wins_over_the_old_file_name(pi5):
    debian_sysctl(pi5, "vm.swappiness=10\n")
    (conflict,) = sysctl_conflicts(str(pi5), OLD, {"vm.swappiness": 150})
    assert conflict.effect == "wins"


def test_a_file_sorting_after_ours_wins_and_one_with_our_value_is_no_conflict(pi5):
    pi5.write("etc/sysctl.d/zz-local.conf", "vm.swappiness = 30\nvm.dirty_ratio = 10\n")
    pi5.write("usr/lib/sysctl.d/10-defaults.conf", "vm.dirty_ratio = 20\n")
    conflicts = sysctl_conflicts(str(pi5), OURS, {"vm.swappiness": 150, "vm.dirty_ratio": 10})
    assert effects(conflicts) == [
        ("vm.dirty_ratio", "20", "/usr/lib/sysctl.d/10-defaults.conf line 1", "overridden"),
        ("vm.swappiness", "30", "/etc/sysctl.d/zz-local.conf line 1", "wins"),
    ]


def test_a_file_in_etc_hides_the_same_name_below_and_a_masked_one_counts_for_nothing(pi5):
    pi5.write("usr/lib/sysctl.d/zz-vendor.conf", "vm.swappiness = 30\n")
    pi5.write("etc/sysctl.d/zz-vendor.conf", "vm.swappiness = 150\n")
    pi5.link("etc/sysctl.d/zz-masked.conf", "/dev/null")
    pi5.write("usr/lib/sysctl.d/zz-masked.conf", "vm.swappiness = 40\n")
    assert sysctl_conflicts(str(pi5), OURS, {"vm.swappiness": 150}) == []


def test_the_kernel_command_line_is_applied_first(pi5):
    pi5.write("proc/cmdline", "console=tty1 sysctl.vm.swappiness=5 transparent_hugepage=always quiet")
    assert effects(sysctl_conflicts(str(pi5), OURS, {"vm.swappiness": 150})) == [
        ("vm.swappiness", "5", "the kernel command line (/proc/cmdline)", "overridden")
    ]
    assert effects(thp_conflicts(str(pi5), "/etc/tmpfiles.d/llmfleet-thp.conf", {"enabled": "madvise"})) == [
        (
            "transparent_hugepage/enabled",
            "always",
            "the kernel command line (transparent_hugepage=)",
            "overridden",
        )
    ]


def test_a_later_tmpfiles_line_wins_over_ours(pi5):
    pi5.write(
        "etc/tmpfiles.d/thp-local.conf", "w /sys/kernel/mm/transparent_hugepage/defrag - - - - always\n"
    )
    pi5.write("usr/lib/tmpfiles.d/aa.conf", "w /sys/kernel/mm/transparent_hugepage/enabled - - - - never\n")
    wanted = {"enabled": "madvise", "defrag": "defer+madvise"}
    assert effects(thp_conflicts(str(pi5), "/etc/tmpfiles.d/llmfleet-thp.conf", wanted)) == [
        ("transparent_hugepage/enabled", "never", "/usr/lib/tmpfiles.d/aa.conf line 1", "overridden"),
        ("transparent_hugepage/defrag", "always", "/etc/tmpfiles.d/thp-local.conf line 1", "wins"),
    ]


def test_raspberry_pi_os_sets_ondemand_before_our_unit(pi5):
    pi5.write("etc/init.d/raspi-config", "#!/bin/sh\n")
    pi5.link("etc/rc2.d/S01raspi-config", "../init.d/raspi-config")
    (conflict,) = governor_conflicts(str(pi5), "performance")
    assert (conflict.found, conflict.effect) == ("ondemand", "overridden")
    assert conflict.source.startswith("raspi-config (/etc/rc2.d/S01raspi-config: ")
    assert governor_conflicts(str(pi5), "ondemand") == []


def test_cpufrequtils_reads_its_default_and_a_daemon_wins(x86):
    x86.write("etc/default/cpufrequtils", 'GOVERNOR="powersave"\n')
    x86.link("etc/systemd/system/multi-user.target.wants/cpufrequtils.service", "/lib/systemd/system/x")
    x86.link(
        "etc/systemd/system/graphical.target.wants/power-profiles-daemon.service", "/lib/systemd/system/y"
    )
    assert [(c.setting, c.found, c.effect) for c in governor_conflicts(str(x86), "performance")] == [
        ("governor", "powersave", "overridden"),
        ("governor", "changed at run time", "wins"),
    ]
