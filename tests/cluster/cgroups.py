"""One cgroup per host, so that everything a host runs can be found and stopped without guessing by name.

Without systemd as PID 1, systemd-nspawn (run with --keep-unit) creates its `payload` and `supervisor`
cgroups below the cgroup it is started in. Each host's supervisor therefore first moves itself into
``llmfleet/<host>`` in every hierarchy systemd-nspawn uses; the container, its processes and anything a crash
leaves behind are then exactly the processes below that cgroup.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from tests.cluster.config import Host

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "llmfleet"


def hierarchies() -> list[Path]:
    """The hierarchies to use: the unified one alone, or systemd's named v1 one plus the unified one."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    candidates = (CGROUP_ROOT / "systemd", CGROUP_ROOT / "unified")
    return [path for path in candidates if (path / "cgroup.procs").exists()]


def host_dirs(host: Host) -> list[Path]:
    return [root / host.cgroup for root in hierarchies()]


def join(host: Host, pid: int | None = None) -> None:
    for directory in host_dirs(host):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text(f"{pid or os.getpid()}\n")


def _subtree(directory: Path) -> list[Path]:
    """Cgroup directories at and below `directory`, deepest first."""
    if not directory.is_dir():
        return []
    found = [Path(dirpath) for dirpath, _, _ in os.walk(directory)]
    return sorted(found, key=lambda path: len(path.parts), reverse=True)


def pids(host: Host) -> set[int]:
    found: set[int] = set()
    for directory in host_dirs(host):
        for group in _subtree(directory):
            try:
                found.update(int(line) for line in (group / "cgroup.procs").read_text().split())
            except OSError:
                continue  # removed while we looked
    return found


def signal_all(host: Host, signum: int = signal.SIGKILL) -> None:
    for pid in pids(host):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def remove(host: Host, keep_top: bool = False) -> None:
    """Remove the host's empty cgroups (all of them, or only those below its own with `keep_top`)."""
    for directory in host_dirs(host):
        for group in _subtree(directory):
            if keep_top and group == directory:
                continue
            # One that still has processes stays; the caller kills them first.
            with contextlib.suppress(OSError):
                group.rmdir()


def remove_parent() -> None:
    for root in hierarchies():
        with contextlib.suppress(OSError):
            (root / PARENT).rmdir()


def unit_pids(host: Host, unit: str) -> set[int]:
    """The processes of the host's systemd unit ``unit`` (its cgroup, wherever its slice puts it)."""
    found: set[int] = set()
    for directory in host_dirs(host):
        for group in _subtree(directory):
            if group.name == unit:
                with contextlib.suppress(OSError):
                    found.update(int(line) for line in (group / "cgroup.procs").read_text().split())
    return found


@contextlib.contextmanager
def cpu_throttled(host: Host, unit: str, quota_us: int, period_us: int = 200_000):
    """Cap the CPU time of the host's ``unit`` at ``quota_us`` per ``period_us`` while the block runs, from
    outside the container: on a cgroup v1 hybrid hierarchy the containers get no ``cpu`` controller, so a
    unit's own CPUQuota= enforces nothing there, and the cap is the kernel's CFS bandwidth control applied
    by the controller, a cgroup of the v1 ``cpu`` hierarchy (or ``cpu.max`` of the unit's cgroup on v2).
    Processes the unit starts meanwhile are not capped. Raises HarnessError when neither is available."""
    from tests.cluster.system import HarnessError

    pids_now = unit_pids(host, unit)
    if not pids_now:
        raise HarnessError(f"{host.name} runs no process of {unit}")
    v1 = CGROUP_ROOT / "cpu"
    if (v1 / "cpu.cfs_quota_us").exists():
        group = v1 / f"{PARENT}-throttle-{host.name}"
        group.mkdir(exist_ok=True)
        try:
            (group / "cpu.cfs_period_us").write_text(f"{period_us}\n")
            (group / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
            for pid in pids_now:
                with contextlib.suppress(ProcessLookupError):
                    (group / "cgroup.procs").write_text(f"{pid}\n")
            yield
        finally:
            for line in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    (v1 / "cgroup.procs").write_text(f"{line}\n")
            group.rmdir()
        return
    groups = [
        group
        for directory in host_dirs(host)
        for group in _subtree(directory)
        if group.name == unit and "cpu" in (group / "cgroup.controllers").read_text().split()
    ]
    if not groups:
        raise HarnessError(
            f"no CPU bandwidth control for {unit} on {host.name}: no v1 cpu hierarchy, no cpu.max"
        )
    before = (groups[0] / "cpu.max").read_text()
    (groups[0] / "cpu.max").write_text(f"{quota_us} {period_us}\n")
    try:
        yield
    finally:
        (groups[0] / "cpu.max").write_text(before)
