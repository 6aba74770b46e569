"""What a host sets at boot besides our own files, and whether it undoes our settings.

A setting we persist holds after a reboot only when nothing applied later sets it otherwise. Each function
reads the files below ``root`` (``"/"`` on a real host) and names every other source of the same setting, in
the order the boot applies them:

- sysctls: systemd-sysctl reads ``*.conf`` from the sysctl.d directories, sorted by file name across all of
  them (a name in /etc hides the same name further down), each file in order, the last value winning.
  /etc/sysctl.conf counts where a sysctl.d entry links to it, as Debian's ``99-sysctl.conf`` does.
  The kernel command line (``sysctl.vm.swappiness=``) is applied before any of them.
- transparent huge pages: ``transparent_hugepage=`` on the command line, then ``w`` lines of tmpfiles.d
  files, sorted the same way.
- the CPU governor: scripts and units that set one at boot. Our unit runs after the ones that run once
  (``After=`` in its template), so those are overridden; a daemon that keeps choosing governors is not.

A conflict is ``overridden`` when ours is applied after it, and ``wins`` when it is applied after ours.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import asdict, dataclass

from ansible.module_utils.llmfleet_sysfs import host_path, read_attr

__all__ = [
    "GOVERNOR_DAEMONS",
    "GOVERNOR_RUN_ONCE",
    "SYSCTL_DIRS",
    "TMPFILES_DIRS",
    "Conflict",
    "governor_conflicts",
    "parse_cmdline",
    "parse_sysctl_text",
    "sysctl_conflicts",
    "thp_conflicts",
]

# sysctl.d(5) and tmpfiles.d(5), highest precedence first.
SYSCTL_DIRS = (
    "/etc/sysctl.d",
    "/run/sysctl.d",
    "/usr/local/lib/sysctl.d",
    "/usr/lib/sysctl.d",
    "/lib/sysctl.d",
)
TMPFILES_DIRS = (
    "/etc/tmpfiles.d",
    "/run/tmpfiles.d",
    "/usr/local/lib/tmpfiles.d",
    "/usr/lib/tmpfiles.d",
    "/lib/tmpfiles.d",
)

# Scripts and units that set a governor once at boot, and where they take it from. The cpu_tuning unit is
# ordered after each of these units, so its value is the one left.
GOVERNOR_RUN_ONCE = {
    "raspi-config": "Raspberry Pi OS's init script sets ondemand at every boot",
    "cpufrequtils": "GOVERNOR in /etc/default/cpufrequtils",
    "ondemand": "Debian's ondemand script sets ondemand (or powersave) at boot",
    "cpupower": "the governor in /etc/default/cpupower or /etc/sysconfig/cpupower",
}
# Daemons that change the governor whenever they see fit: a value set at boot does not hold under them.
GOVERNOR_DAEMONS = {
    "power-profiles-daemon": "switches the governor and EPP with the power profile",
    "tuned": "applies its profile's governor and re-applies it",
}


@dataclass(frozen=True)
class Conflict:
    """Another source of a setting we persist, with a different value."""

    setting: str
    wanted: str
    found: str
    source: str
    effect: str  # "overridden" (ours is applied later) or "wins" (it is applied after ours)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.source} sets {self.setting} = {self.found} (wanted {self.wanted})"


def _normalise_key(key: str) -> str:
    # sysctl.d(5): "kernel/domainname" and "kernel.domainname" are the same key.
    key = key.strip().lstrip("-")
    return key.replace("/", ".") if "/" in key and "." not in key.split("/")[0] else key


def parse_sysctl_text(text: str) -> list[tuple[int, str, str]]:
    """``(line number, key, value)`` of each assignment in a sysctl.d file."""
    assignments = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        assignments.append((number, _normalise_key(key), value.strip()))
    return assignments


def _ordered_files(root: str, directories: tuple[str, ...], suffix: str) -> list[tuple[str, str]]:
    """``(name, host path)`` of the files the boot reads, sorted by name; a name in an earlier directory
    hides the same name further down. A link to /dev/null (a masked file) is left out."""
    chosen: dict[str, str] = {}
    for directory in directories:
        for found in glob.glob(os.path.join(host_path(root, directory), f"*{suffix}")):
            name = os.path.basename(found)
            if name not in chosen:
                chosen[name] = f"{directory}/{name}"
    ordered = []
    for name in sorted(chosen):
        path = chosen[name]
        if os.path.islink(host_path(root, path)) and os.readlink(host_path(root, path)) == "/dev/null":
            continue
        ordered.append((name, path))
    return ordered


def _read_text(root: str, path: str) -> str | None:
    """A file's text below the root, following a link as the host would (an absolute target is under root)."""
    full = host_path(root, path)
    for _ in range(8):
        if not os.path.islink(full):
            break
        target = os.readlink(full)
        full = (
            host_path(root, target) if target.startswith("/") else os.path.join(os.path.dirname(full), target)
        )
    try:
        with open(full, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _shown(root: str, path: str) -> str:
    """A sysctl.d entry as a person would name it: ``/etc/sysctl.d/99-sysctl.conf -> /etc/sysctl.conf``."""
    full = host_path(root, path)
    if os.path.islink(full):
        target = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(full)))
        return f"{path} -> {target}"
    return path


def parse_cmdline(root: str) -> dict[str, str]:
    """The ``key=value`` words of /proc/cmdline (the last one of a key counts, as for the kernel)."""
    words = (read_attr(root, "/proc/cmdline") or "").split()
    return {key: value for key, sep, value in (word.partition("=") for word in words) if sep}


def sysctl_conflicts(root: str, own_file: str, wanted: dict) -> list[Conflict]:
    """Other sources of the sysctls in ``wanted`` with a different value, judged as if ``own_file`` (a path
    under /etc/sysctl.d) held ``wanted``: ours is applied at its name's place in the order."""
    wanted = {key: str(value).strip() for key, value in wanted.items()}
    own_name = os.path.basename(own_file)
    files = [(name, path) for name, path in _ordered_files(root, SYSCTL_DIRS, ".conf") if name != own_name]
    conflicts: list[Conflict] = []
    cmdline = parse_cmdline(root)
    for key, value in wanted.items():
        found = cmdline.get(f"sysctl.{key}")
        if found is not None and found != value:
            conflicts.append(
                Conflict(key, value, found, "the kernel command line (/proc/cmdline)", "overridden")
            )
    for name, path in files:
        text = _read_text(root, path)
        if text is None:
            continue
        effect = "wins" if name > own_name else "overridden"
        for number, key, found in parse_sysctl_text(text):
            if key in wanted and found != wanted[key]:
                source = f"{_shown(root, path)} line {number}"
                conflicts.append(Conflict(key, wanted[key], found, source, effect))
    return conflicts


_TMPFILES_THP = re.compile(
    r"^[wW]\+?\s+/sys/kernel/mm/transparent_hugepage/(enabled|defrag)\s+(?:\S+\s+){4}(\S+)"
)


def thp_conflicts(root: str, own_file: str, wanted: dict) -> list[Conflict]:
    """Other sources of the THP settings in ``wanted`` (``{"enabled": "madvise"}``): the kernel command line
    and other tmpfiles.d files."""
    wanted = {key: str(value) for key, value in wanted.items() if value is not None}
    conflicts: list[Conflict] = []
    found = parse_cmdline(root).get("transparent_hugepage")
    if found is not None and "enabled" in wanted and found != wanted["enabled"]:
        conflicts.append(
            Conflict(
                "transparent_hugepage/enabled",
                wanted["enabled"],
                found,
                "the kernel command line (transparent_hugepage=)",
                "overridden",
            )
        )
    own_name = os.path.basename(own_file)
    for name, path in _ordered_files(root, TMPFILES_DIRS, ".conf"):
        text = _read_text(root, path)
        if name == own_name or text is None:
            continue
        lines = text.splitlines()
        for number, line in enumerate(lines, start=1):
            match = _TMPFILES_THP.match(line.strip())
            if match and match.group(1) in wanted and match.group(2) != wanted[match.group(1)]:
                conflicts.append(
                    Conflict(
                        f"transparent_hugepage/{match.group(1)}",
                        wanted[match.group(1)],
                        match.group(2),
                        f"{path} line {number}",
                        "wins" if name > own_name else "overridden",
                    )
                )
    return conflicts


def _enabled(root: str, name: str) -> str | None:
    """Where a unit or init script named ``name`` is enabled for boot, or None."""
    for pattern in (
        f"/etc/systemd/system/*.wants/{name}.service",
        f"/etc/rc[2-5].d/S[0-9][0-9]{name}",
    ):
        found = glob.glob(host_path(root, pattern))
        if found:
            prefix = host_path(root, "/").rstrip("/")
            return "/" + os.path.relpath(sorted(found)[0], prefix or "/")
    return None


def _default_governor(root: str, name: str) -> str | None:
    for path in (f"/etc/default/{name}", f"/etc/sysconfig/{name}"):
        text = read_attr(root, path)
        for line in (text or "").splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.strip().lower() in ("governor", "governor_cpus"):
                return value.strip().strip("'\"")
    return None


def governor_conflicts(root: str, wanted: str) -> list[Conflict]:
    """Boot-time scripts and daemons that set a CPU governor other than ``wanted``."""
    conflicts: list[Conflict] = []
    for name, why in GOVERNOR_RUN_ONCE.items():
        where = _enabled(root, name)
        if where is None:
            continue
        found = _default_governor(root, name) or (
            "ondemand" if name in ("raspi-config", "ondemand") else None
        )
        if found is None or found == wanted:
            continue
        conflicts.append(Conflict("governor", wanted, found, f"{name} ({where}: {why})", "overridden"))
    for name, why in GOVERNOR_DAEMONS.items():
        where = _enabled(root, name)
        if where is not None:
            conflicts.append(
                Conflict("governor", wanted, "changed at run time", f"{name} ({where}: {why})", "wins")
            )
    return conflicts
