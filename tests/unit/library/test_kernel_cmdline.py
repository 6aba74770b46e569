"""The kernel_cmdline module, built and run as Ansible runs it, on a fake Pi 5's boot partition."""

from __future__ import annotations

from pathlib import Path

from tests import fakehw

CMDLINE = "boot/firmware/cmdline.txt"
ENABLE = {"present": ["cgroup_enable=memory"], "absent": ["cgroup_disable=memory"]}


def stock(tmp_path) -> fakehw.FakeHost:
    return fakehw.build("pi5_stock", tmp_path / "pi")


def test_check_diff_shows_the_line_before_and_after_and_writes_nothing(run_module, tmp_path):
    pi = stock(tmp_path)
    result = run_module("kernel_cmdline", {"root": str(pi), **ENABLE}, check_mode=True, diff=True)
    line = fakehw.PI5_CMDLINE_TXT.rstrip("\n")
    assert result["changed"] is True
    assert result["diff"]["before"] == line + "\n"
    assert result["diff"]["after"] == line + " cgroup_enable=memory\n"
    assert result["diff"]["before_header"] == "/boot/firmware/cmdline.txt"
    assert result["added"] == ["cgroup_enable=memory"]
    assert pi.path(CMDLINE).read_text() == fakehw.PI5_CMDLINE_TXT


def test_apply_keeps_the_rest_byte_for_byte_and_a_second_run_changes_nothing(run_module, tmp_path):
    pi = stock(tmp_path)
    # Bytes that are not UTF-8 and a CRLF ending must come back as they were.
    original = b"console=tty1  root=PARTUUID=4e639091-02 \xff splash\r\n"
    pi.path(CMDLINE).write_bytes(original)
    args = {"root": str(pi), "parameters": {"cpufreq.default_governor": "performance"}, **ENABLE}
    first = run_module("kernel_cmdline", args)
    assert first["changed"] is True
    assert "diff" not in first
    written = pi.path(CMDLINE).read_bytes()
    assert written == (
        b"console=tty1  root=PARTUUID=4e639091-02 \xff splash cgroup_enable=memory"
        b" cpufreq.default_governor=performance\r\n"
    )
    second = run_module("kernel_cmdline", args, diff=True)
    assert second["changed"] is False
    assert second["diff"]["before"] == second["diff"]["after"]
    assert pi.path(CMDLINE).read_bytes() == written


def test_backup_keeps_the_old_line(run_module, tmp_path):
    pi = stock(tmp_path)
    result = run_module("kernel_cmdline", {"root": str(pi), "backup": True, **ENABLE})
    assert result["backup_file"].startswith(str(pi.path(CMDLINE)))
    assert Path(result["backup_file"]).read_text() == fakehw.PI5_CMDLINE_TXT
    assert pi.path(CMDLINE).read_text() != fakehw.PI5_CMDLINE_TXT


def test_missing_file_and_second_line_fail_with_the_fix(run_module, tmp_path, x86):
    missing = run_module("kernel_cmdline", {"root": str(x86), **ENABLE})
    assert missing["failed"] is True
    assert missing["msg"].startswith("cannot read /boot/firmware/cmdline.txt: No such file or directory.")
    assert "/boot before" in missing["msg"]
    pi = stock(tmp_path)
    pi.write(CMDLINE, "console=tty1 rootwait\ncgroup_enable=memory\n")
    split = run_module("kernel_cmdline", {"root": str(pi), **ENABLE})
    assert split["failed"] is True
    assert split["msg"].startswith(
        "cannot edit /boot/firmware/cmdline.txt: it has more than one line (the next one starts "
        "'cgroup_enable=memory'); the firmware passes only the first line to the kernel"
    )


def test_argument_spec_names_the_bad_option(run_module, tmp_path):
    result = run_module("kernel_cmdline", {"root": str(stock(tmp_path)), "parameters": "quiet"})
    assert result["failed"] is True
    assert "parameters" in result["msg"]
