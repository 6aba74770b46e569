"""Parsing, planning and writing sysfs attributes against fake trees."""

from __future__ import annotations

import errno
import os
import re

import pytest
from ansible.module_utils import llmfleet_sysfs
from ansible.module_utils.llmfleet_sysfs import (
    Choice,
    SysfsError,
    apply_attribute_changes,
    expand,
    format_cpu_list,
    host_path,
    natural_key,
    owner_of,
    parse_choice,
    parse_cpu_list,
    plan_attribute_changes,
    read_attr,
    read_int,
    render_state,
)

GOVERNOR = "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("always [madvise] never", Choice("madvise", ("always", "madvise", "never"))),
        ("[mq-deadline] none\n", Choice("mq-deadline", ("mq-deadline", "none"))),
        (
            "always defer defer+madvise [madvise] never",
            Choice("madvise", ("always", "defer", "defer+madvise", "madvise", "never")),
        ),
        ("none", Choice("none", None)),
        ("1024", Choice("1024", None)),
    ],
)
def test_parse_choice_reads_bracketed_and_plain_values(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0-3", [0, 1, 2, 3]), ("0-1,4-5,7", [0, 1, 4, 5, 7]), ("2", [2]), ("", []), (" 3,1 ", [1, 3])],
)
def test_parse_cpu_list(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(
    ("text", "fragment"), [("0-x", "'0-x'"), ("3-1", "going down"), ("a", "expected numbers")]
)
def test_parse_cpu_list_rejects_junk(text, fragment):
    with pytest.raises(SysfsError, match=fragment):
        parse_cpu_list(text)


@pytest.mark.parametrize(
    ("cpus", "text"), [([0, 1, 2, 3], "0-3"), ([5, 0, 1, 3], "0-1,3,5"), ([], ""), (["2", "3"], "2-3")]
)
def test_format_cpu_list_round_trips(cpus, text):
    assert format_cpu_list(cpus) == text
    assert parse_cpu_list(text) == sorted(int(cpu) for cpu in cpus)


def test_natural_key_orders_cpu10_after_cpu2():
    assert sorted(["cpu10", "cpu2", "cpu1"], key=natural_key) == ["cpu1", "cpu2", "cpu10"]


def test_host_path_joins_the_root_and_refuses_relative_paths(tmp_path):
    assert host_path(str(tmp_path), "/sys/block") == os.path.join(str(tmp_path), "sys/block")
    assert host_path("/", "/sys/block") == "/sys/block"
    with pytest.raises(SysfsError, match="relative"):
        host_path("/", "sys/block")


def test_read_attr_strips_nul_and_newline_and_tolerates_absence(pi5):
    assert read_attr(str(pi5), "/proc/device-tree/model") == "Raspberry Pi 5 Model B Rev 1.0"
    assert read_attr(str(pi5), "/sys/does/not/exist") is None


def test_read_int_parses_hex_and_refuses_words(x86, pi5):
    assert read_int(str(x86), "/sys/bus/pci/devices/0000:81:00.0/vendor") == 0x10DE
    assert read_int(str(pi5), "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") is None
    assert read_int(str(pi5), "/missing") is None


def test_expand_returns_host_paths_in_natural_order(tmp_path):
    for cpu in (0, 2, 10, 1):
        (tmp_path / f"sys/devices/system/cpu/cpu{cpu}").mkdir(parents=True)
    found = expand(str(tmp_path), "/sys/devices/system/cpu/cpu[0-9]*")
    assert found == [f"/sys/devices/system/cpu/cpu{cpu}" for cpu in (0, 1, 2, 10)]


@pytest.mark.parametrize(
    ("path", "owner"),
    [
        ("/sys/devices/system/cpu/cpu2/cpufreq/scaling_governor", "cpu2"),
        ("/sys/devices/system/cpu/cpufreq/policy4/scaling_governor", "policy4"),
        ("/sys/block/nvme0n1/queue/scheduler", "nvme0n1"),
        ("/sys/kernel/mm/transparent_hugepage/enabled", "transparent_hugepage"),
        ("/sys/devices/system/cpu/cpu3/power/energy_perf_bias", "cpu3"),
        ("/enabled", "/enabled"),
    ],
)
def test_owner_of_names_the_cpu_or_device(path, owner):
    assert owner_of(path) == owner


def test_plan_sets_a_shared_policy_once_and_reports_the_first_cpu(pi5):
    changes = plan_attribute_changes(
        str(pi5), GOVERNOR, "performance", available="scaling_available_governors"
    )
    assert [change.as_dict() for change in changes] == [
        {
            "path": "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor",
            "owner": "cpu0",
            "before": "ondemand",
            "after": "performance",
            "changed": True,
        }
    ]


def test_plan_covers_each_policy_of_a_big_little_board(rk3588):
    changes = plan_attribute_changes(
        str(rk3588), GOVERNOR, "performance", available="scaling_available_governors"
    )
    assert [change.owner for change in changes] == ["cpu0", "cpu4", "cpu6"]
    assert all(change.changed for change in changes)


def test_plan_is_unchanged_when_the_value_is_already_set(pi5):
    changes = plan_attribute_changes(str(pi5), THP_ENABLED, "madvise")
    assert [(change.before, change.changed) for change in changes] == [("madvise", False)]


def test_plan_refuses_a_governor_the_cpu_does_not_offer(x86):
    x86.write("sys/devices/system/cpu/cpufreq/policy2/scaling_available_governors", "ondemand powersave")
    with pytest.raises(SysfsError) as error:
        plan_attribute_changes(
            str(x86),
            GOVERNOR,
            "performance",
            available="scaling_available_governors",
            label="governor",
            hint="is the cpufreq driver loaded?",
        )
    assert str(error.value) == (
        "governor 'performance' not offered by cpu2; available: ondemand powersave; "
        "is the cpufreq driver loaded?"
    )


def test_plan_refuses_a_bracketed_value_not_in_the_file(pi5):
    with pytest.raises(
        SysfsError, match=r"scheduler 'bfq' not offered by mmcblk0; available: mq-deadline none$"
    ):
        plan_attribute_changes(str(pi5), "/sys/block/mmcblk0/queue/scheduler", "bfq")


def test_plan_fails_or_ignores_when_nothing_matches(pi5):
    with pytest.raises(
        SysfsError, match=r"no file matches /sys/block/sd\*/queue/scheduler; .*missing=ignore"
    ):
        plan_attribute_changes(str(pi5), "/sys/block/sd*/queue/scheduler", "none")
    assert plan_attribute_changes(str(pi5), "/sys/block/sd*/queue/scheduler", "none", missing="ignore") == []


def test_plan_fails_when_the_offer_file_is_missing(pi5):
    pi5.remove("sys/devices/system/cpu/cpufreq/policy0/scaling_available_governors")
    with pytest.raises(SysfsError, match="cannot read scaling_available_governors beside"):
        plan_attribute_changes(str(pi5), GOVERNOR, "performance", available="scaling_available_governors")


def test_plan_fails_when_the_attribute_is_unreadable(pi5):
    pi5.path("sys/kernel/mm/transparent_hugepage/enabled").unlink()
    pi5.path("sys/kernel/mm/transparent_hugepage/enabled").mkdir()
    with pytest.raises(SysfsError, match="cannot read /sys/kernel/mm/transparent_hugepage/enabled"):
        plan_attribute_changes(str(pi5), THP_ENABLED, "never")


def test_apply_writes_only_what_changes_and_verifies_it(pi5):
    pi5.write("sys/block/mmcblk0/queue/read_ahead_kb", "512")
    untouched = pi5.path("sys/block/nvme0n1/queue/read_ahead_kb")
    os.utime(untouched, ns=(0, 0))
    changes = plan_attribute_changes(str(pi5), "/sys/block/*/queue/read_ahead_kb", "128")
    assert [(change.owner, change.changed) for change in changes] == [
        ("mmcblk0", True),
        ("nvme0n1", False),
        ("zram0", False),
    ]
    apply_attribute_changes(str(pi5), changes)
    assert pi5.read("sys/block/mmcblk0/queue/read_ahead_kb") == "128"
    assert untouched.stat().st_mtime_ns == 0


def test_apply_reports_a_refused_write(pi5):
    changes = plan_attribute_changes(str(pi5), THP_ENABLED, "never")
    target = pi5.path("sys/kernel/mm/transparent_hugepage/enabled")
    target.unlink()
    target.mkdir()
    with pytest.raises(SysfsError, match=r"writing 'never' to .*enabled failed: .*it held 'madvise'"):
        apply_attribute_changes(str(pi5), changes)


def test_apply_reports_a_value_the_kernel_did_not_keep(pi5, monkeypatch):
    changes = plan_attribute_changes(str(pi5), THP_ENABLED, "never")
    real_open = open

    def kernel_that_ignores_writes(path, mode="r", **kwargs):
        if "w" in mode:
            return real_open(os.devnull, mode, **kwargs)
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr("builtins.open", kernel_that_ignores_writes)
    monkeypatch.setattr(llmfleet_sysfs.time, "sleep", lambda _seconds: None)
    with pytest.raises(SysfsError, match=r"wrote 'never' to .*enabled but it reads 'madvise'"):
        apply_attribute_changes(str(pi5), changes)


def test_apply_rereads_a_file_caught_half_rewritten(pi5, monkeypatch):
    changes = plan_attribute_changes(str(pi5), THP_ENABLED, "never")
    answers = iter(["", "always madvise [never]"])
    monkeypatch.setattr(llmfleet_sysfs, "read_attr", lambda _root, _path: next(answers))
    pauses = []
    monkeypatch.setattr(llmfleet_sysfs.time, "sleep", pauses.append)
    apply_attribute_changes(str(pi5), changes)
    assert pauses == [0.1]


def test_render_state_lists_every_attribute(rk3588):
    changes = plan_attribute_changes(str(rk3588), GOVERNOR, "performance")
    assert render_state(changes, "before").splitlines()[0] == (
        "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor: schedutil"
    )
    assert render_state(changes, "after").count("performance") == 3


def test_plan_leaves_an_offline_cpu_alone_and_says_so(x86):
    x86.take_offline(7)
    changes = plan_attribute_changes(
        str(x86), GOVERNOR, "performance", available="scaling_available_governors"
    )
    planned = [change.owner for change in changes if not change.skipped]
    assert planned == [f"cpu{cpu}" for cpu in range(7)]
    (skipped,) = [change for change in changes if change.skipped]
    assert skipped.owner == "cpu7"
    assert skipped.skipped == "cpu7 is offline (online: 0-6)"
    apply_attribute_changes(str(x86), changes)
    assert x86.read("sys/devices/system/cpu/cpufreq/policy0/scaling_governor") == "performance"
    assert "cpu7" not in render_state(changes, "after")


def test_plan_sets_a_shared_policy_through_its_online_cpu(pi5):
    pi5.take_offline(0)
    changes = plan_attribute_changes(str(pi5), GOVERNOR, "performance")
    assert [(change.owner, change.changed) for change in changes if not change.skipped] == [("cpu1", True)]


def test_plan_with_offline_cpus_included_fails_naming_the_read_error(x86):
    x86.take_offline(7)
    with pytest.raises(SysfsError) as failure:
        plan_attribute_changes(str(x86), GOVERNOR, "performance", online_only=False)
    message = str(failure.value)
    assert (
        "cannot read /sys/devices/system/cpu/cpu7/cpufreq/scaling_governor: Is a directory (EISDIR)"
        in message
    )
    assert "root" not in message


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        (errno.EBUSY, "(EBUSY); the kernel refuses reads of a cpufreq policy whose CPUs are all offline"),
        (errno.EACCES, "(EACCES); expected a readable scaling_governor attribute. Run the module as root"),
    ],
)
def test_a_failed_read_names_its_real_cause(x86, monkeypatch, code, fragment):
    def refuse(root, path):
        return None, OSError(code, os.strerror(code))

    monkeypatch.setattr(llmfleet_sysfs, "read_attr_or_error", refuse)
    with pytest.raises(SysfsError, match=re.escape(fragment)):
        plan_attribute_changes(str(x86), GOVERNOR, "performance")
