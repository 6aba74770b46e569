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
