"""The pi_boot role applied to fake Raspberry Pi 5 boot partitions, as a real run applies it (no check mode):
the first run edits cmdline.txt and config.txt and reports the reboot, the second changes nothing, --check
--diff shows the line before and after, and a host that is not a Pi is left alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import fakehw
from tests.ansible_playbook import PlaybookRun, local_inventory, run_playbook

PLAYBOOK = Path(__file__).with_name("run_role.yml")
SETTINGS = {"pi_boot_pcie_gen": 3, "pi_boot_default_governor": "performance"}
LINE = fakehw.PI5_CMDLINE_TXT.rstrip("\n")
NEW_LINE = f"{LINE} cgroup_enable=memory cpufreq.default_governor=performance\n"


def task(run: PlaybookRun, host: str, name: str):
    matches = [entry for entry in run.host_tasks(host) if entry.task.endswith(f" : {name}")]
    assert matches, f"{name} did not run on {host}: {[entry.task for entry in run.host_tasks(host)]}"
    return matches[0].result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pi_boot")
    trees = {"pi1": fakehw.build("pi5_stock", base / "pi1"), "gpu1": fakehw.build("x86", base / "gpu1")}
    hosts = {
        name: {"case_role": "pi_boot", "tuning_facts_root": str(tree), **SETTINGS}
        for name, tree in trees.items()
    }
    inventory = local_inventory(base / "inventory.yml", hosts)
    check = run_playbook(PLAYBOOK, inventory, "--check", "--diff")
    after_check = {
        path: trees["pi1"].path(path).read_text() if trees["pi1"].path(path).exists() else None
        for path in ("boot/firmware/cmdline.txt", "boot/firmware/config.txt", "run/reboot-required")
    }
    first = run_playbook(PLAYBOOK, inventory)
    second = run_playbook(PLAYBOOK, inventory, "--diff")
    return trees, check, after_check, first, second


def test_check_diff_shows_the_line_before_and_after_and_changes_nothing(runs):
    _, check, after_check, _, _ = runs
    assert check.returncode == 0, check.stderr
    diff = task(check, "pi1", "Edit the kernel command line in cmdline.txt")["diff"]
    assert diff["before"] == LINE + "\n"
    assert diff["after"] == NEW_LINE
    config = task(check, "pi1", "Write the settings of the [all] section at the end of config.txt")
    assert "dtparam=pciex1_gen=3" in config["diff"][0]["after"]
    assert after_check == {
        "boot/firmware/cmdline.txt": fakehw.PI5_CMDLINE_TXT,
        "boot/firmware/config.txt": fakehw.PI5_CONFIG_TXT,
        "run/reboot-required": None,
    }


def test_first_run_edits_the_boot_files_and_reports_the_reboot(runs):
    trees, _, _, first, _ = runs
    assert first.returncode == 0, first.stderr
    pi = trees["pi1"]
    assert pi.path("boot/firmware/cmdline.txt").read_text() == NEW_LINE
    config = pi.path("boot/firmware/config.txt").read_text()
    assert config == fakehw.PI5_CONFIG_TXT + (
        "# BEGIN llmfleet pi_boot\n[all]\ndtparam=pciex1_gen=3\n# END llmfleet pi_boot\n"
    )
    assert pi.path("run/reboot-required").exists()
    report = task(first, "pi1", "Report that the host needs a reboot to apply its boot configuration")["msg"]
    assert report.startswith(
        "REBOOT REQUIRED on pi1: cmdline.txt: +cgroup_enable=memory +cpufreq.default_governor=performance; "
        "config.txt: dtparam=pciex1_gen=3."
    )
    assert "pi_boot_reboot_ok: true" in report


def test_second_run_changes_nothing_and_still_reports_the_reboot(runs):
    _, _, _, _, second = runs
    assert second.returncode == 0, second.stderr
    assert [entry.task for entry in second.host_tasks("pi1") if entry.changed] == []
    report = task(second, "pi1", "Report that the host needs a reboot to apply its boot configuration")["msg"]
    assert "/run/reboot-required exists" in report
    assert "cmdline.txt has cgroup_enable=memory, the running kernel does not" in report


def test_a_host_that_is_not_a_pi_is_left_alone(runs):
    trees, check, _, first, _ = runs
    for run in (check, first):
        edit = task(run, "gpu1", "Edit the kernel command line in cmdline.txt")
        assert edit.get("skipped") is True
        assert not [entry.task for entry in run.host_tasks("gpu1") if entry.changed]
    assert not trees["gpu1"].path("boot").exists()
