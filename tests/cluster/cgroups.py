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


def unit_file_cpu_quota(root: Path, unit: str) -> int | None:
    """``CPUQuota=`` of ``unit`` as its unit file and drop-ins under ``root``/etc/systemd/system set it, in
    microseconds of CPU time per 100 ms period (systemd's default CPUQuotaPeriodSec=), or None when unset or
    empty. ``CPUQuota=150%`` is 150000: one and a half CPUs. The last assignment wins, as in systemd."""
    base = root / "etc/systemd/system"
    files = [base / unit, *sorted((base / f"{unit}.d").glob("*.conf"))]
    percent: float | None = None
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.strip().partition("=")
            if key.strip() == "CPUQuota":
                value = value.strip()
                percent = float(value.rstrip("%")) if value else None
    return None if percent is None else int(percent * 1_000)


@contextlib.contextmanager
def slice_cpu_quota_enforced(hosts: list[Host], slice_unit: str, interval: float = 0.5):
    """While the block runs, hold every process of each host's ``slice_unit`` to the ``CPUQuota=`` its unit
    file says, re-read every ``interval`` seconds: a setting written, changed or removed by a playbook takes
    effect within that time, and processes started in the slice meanwhile (a restarted service) are held too.

    On a cgroup v1 hybrid hierarchy a container gets no ``cpu`` controller, so systemd inside it accepts
    CPUQuota= and enforces nothing; this does the kernel's part from outside, with the CFS bandwidth control
    of a v1 ``cpu`` cgroup per host, as cpu_throttled() does for one unit. The unit file stands in for the
    value systemd would load from it at the next daemon-reload. On the unified hierarchy, where systemd
    enforces the quota itself through ``cpu.max``, it does nothing. Raises HarnessError when neither is
    available."""
    import threading

    from tests.cluster.hoststate import HostFiles
    from tests.cluster.system import HarnessError

    v1 = CGROUP_ROOT / "cpu"
    if not (v1 / "cpu.cfs_quota_us").exists():
        if (CGROUP_ROOT / "cgroup.controllers").exists() and "cpu" in (
            CGROUP_ROOT / "cgroup.subtree_control"
        ).read_text().split():
            yield
            return
        raise HarnessError(f"no CPU bandwidth control to enforce {slice_unit}'s CPUQuota=")
    groups = {host.name: v1 / f"{PARENT}-quota-{host.name}" for host in hosts}
    stop = threading.Event()
    errors: list[BaseException] = []

    def slice_pids(host: Host) -> set[int]:
        found: set[int] = set()
        for directory in host_dirs(host):
            for group in _subtree(directory):
                if slice_unit in group.parts:
                    with contextlib.suppress(OSError):
                        found.update(int(line) for line in (group / "cgroup.procs").read_text().split())
        return found

    def release(group: Path) -> None:
        for line in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                (v1 / "cgroup.procs").write_text(f"{line}\n")

    def enforce_once() -> None:
        for host in hosts:
            group = groups[host.name]
            quota = unit_file_cpu_quota(HostFiles(host).root, slice_unit)
            if quota is None:
                (group / "cpu.cfs_quota_us").write_text("-1\n")
                release(group)
                continue
            (group / "cpu.cfs_quota_us").write_text(f"{max(quota, 1_000)}\n")
            for pid in slice_pids(host) - {int(p) for p in (group / "cgroup.procs").read_text().split()}:
                with contextlib.suppress(ProcessLookupError):
                    (group / "cgroup.procs").write_text(f"{pid}\n")

    def watch() -> None:
        while not stop.wait(interval):
            try:
                enforce_once()
            except OSError as exc:  # a host that stops or reboots meanwhile; report it at the end
                errors.append(exc)
                return

    for group in groups.values():
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text("100000\n")
        (group / "cpu.cfs_quota_us").write_text("-1\n")
    thread = threading.Thread(target=watch, name="slice-cpu-quota", daemon=True)
    try:
        enforce_once()
        thread.start()
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=10)
        for group in groups.values():
            with contextlib.suppress(OSError):
                release(group)
                group.rmdir()
    if errors:
        raise HarnessError(f"enforcing {slice_unit}'s CPUQuota= stopped: {errors[0]}")
