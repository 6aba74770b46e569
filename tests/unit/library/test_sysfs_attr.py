"""The sysfs_attr module, built and run as Ansible runs it: check mode, diff, idempotence, errors."""

from __future__ import annotations

GOVERNOR = "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor"
POLICY0 = "sys/devices/system/cpu/cpufreq/policy0/scaling_governor"


def governor_args(host, value="performance"):
    return {
        "root": str(host),
        "path": GOVERNOR,
        "value": value,
        "available": "scaling_available_governors",
        "label": "governor",
        "hint": "is the cpufreq driver loaded?",
    }


def test_check_mode_reports_the_change_and_writes_nothing(run_module, pi5):
    result = run_module("sysfs_attr", governor_args(pi5), check_mode=True, diff=True)
    assert result["changed"] is True
    assert result["changed_paths"] == ["/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"]
    assert result["diff"] == {
        "before": "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor: ondemand\n",
        "after": "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor: performance\n",
    }
    assert pi5.read(POLICY0) == "ondemand"


def test_apply_then_repeat_is_idempotent(run_module, rk3588):
    first = run_module("sysfs_attr", governor_args(rk3588))
    assert first["changed"] is True
    assert len(first["changed_paths"]) == 3
    assert "diff" not in first
    for policy in (0, 4, 6):
        assert rk3588.read(f"sys/devices/system/cpu/cpufreq/policy{policy}/scaling_governor") == "performance"
    second = run_module("sysfs_attr", governor_args(rk3588), diff=True)
    assert second["changed"] is False
    assert second["changed_paths"] == []
    assert second["diff"]["before"] == second["diff"]["after"]


def test_bracketed_attribute_is_set_to_the_bare_word(run_module, pi5):
    args = {"root": str(pi5), "path": "/sys/kernel/mm/transparent_hugepage/defrag", "value": "defer+madvise"}
    assert run_module("sysfs_attr", args)["changed"] is True
    # A fake tree keeps the bare word; a kernel shows it bracketed again.
    pi5.write("sys/kernel/mm/transparent_hugepage/defrag", "always defer [defer+madvise] madvise never")
    assert run_module("sysfs_attr", args)["changed"] is False


def test_value_not_offered_fails_before_writing(run_module, x86):
    x86.write("sys/devices/system/cpu/cpufreq/policy2/scaling_available_governors", "ondemand powersave")
    result = run_module("sysfs_attr", governor_args(x86))
    assert result["failed"] is True
    assert result["msg"] == (
        "governor 'performance' not offered by cpu2; available: ondemand powersave; "
        "is the cpufreq driver loaded?"
    )
    assert x86.read("sys/devices/system/cpu/cpufreq/policy0/scaling_governor") == "powersave"


def test_missing_attribute_fails_unless_ignored(run_module, pi5):
    args = {"root": str(pi5), "path": "/sys/devices/system/cpu/cpu*/power/energy_perf_bias", "value": "0"}
    failed = run_module("sysfs_attr", args)
    assert failed["failed"] is True
    assert "no file matches" in failed["msg"]
    ignored = run_module("sysfs_attr", dict(args, missing="ignore"))
    assert ignored["changed"] is False
    assert ignored["attributes"] == []


def test_argument_spec_rejects_a_bad_choice_and_a_missing_value(run_module, pi5):
    bad_choice = run_module(
        "sysfs_attr", {"root": str(pi5), "path": GOVERNOR, "value": "x", "missing": "skip"}
    )
    assert bad_choice["failed"] is True
    assert "missing" in bad_choice["msg"]
    no_value = run_module("sysfs_attr", {"root": str(pi5), "path": GOVERNOR})
    assert no_value["failed"] is True
    assert "value" in no_value["msg"]


def test_offline_cpu_is_skipped_with_a_warning_and_the_rest_set(run_module, x86):
    x86.take_offline(6, 7)
    result = run_module("sysfs_attr", governor_args(x86))
    assert result["changed"] is True
    assert [entry["owner"] for entry in result["attributes"]] == [f"cpu{cpu}" for cpu in range(6)]
    assert [entry["owner"] for entry in result["skipped"]] == ["cpu6", "cpu7"]
    assert "cpu6 is offline (online: 0-5): its governor is left alone" in str(result["warnings"])
    assert x86.read("sys/devices/system/cpu/cpufreq/policy5/scaling_governor") == "performance"
