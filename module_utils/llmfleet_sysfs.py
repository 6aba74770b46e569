"""Read and write sysfs and procfs attributes below a root prefix.

Everything here takes ``root`` (``"/"`` on a real host) so tests can point it at a fake tree.
Attribute paths are always written as on a real host (``/sys/...``) and joined to ``root`` only
when the file is opened; results and messages use the real-host form.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import time
from dataclasses import asdict, dataclass

__all__ = [
    "AttributeChange",
    "Choice",
    "SysfsError",
    "apply_attribute_changes",
    "expand",
    "format_cpu_list",
    "host_path",
    "natural_key",
    "offline_cpus",
    "online_cpus",
    "owner_of",
    "parse_choice",
    "parse_cpu_list",
    "plan_attribute_changes",
    "read_attr",
    "read_attr_or_error",
    "read_int",
    "render_state",
]


class SysfsError(Exception):
    """A sysfs attribute could not be read, matched or set; the message says what to do."""


@dataclass(frozen=True)
class Choice:
    """A sysfs value and, where the file lists them, the values it accepts."""

    selected: str | None
    offered: tuple[str, ...] | None


@dataclass(frozen=True)
class AttributeChange:
    """What writing one attribute would do; ``changed`` is decided before anything is written."""

    path: str
    owner: str
    before: str
    after: str
    changed: bool
    # Why the attribute was left alone (its CPU is offline); empty for an attribute that was planned.
    skipped: str = ""

    def as_dict(self) -> dict:
        """The planned attribute as the module returns it (a skipped one is reported apart)."""
        return {key: value for key, value in asdict(self).items() if key != "skipped"}


def host_path(root: str, path: str) -> str:
    """Join a real-host absolute path to the root prefix."""
    if not path.startswith("/"):
        raise SysfsError(f"path '{path}' is relative; give the absolute path as on the host, e.g. /sys/...")
    return os.path.join(root, path.lstrip("/"))


def read_attr(root: str, path: str) -> str | None:
    """Return the stripped text of an attribute, or None when it is absent or unreadable."""
    return read_attr_or_error(root, path)[0]


def read_attr_or_error(root: str, path: str) -> tuple[str | None, OSError | None]:
    """Return the stripped text of an attribute and None, or None and the error that stopped the read."""
    try:
        with open(host_path(root, path), encoding="utf-8", errors="replace") as handle:
            return handle.read().replace("\x00", "").strip(), None
    except OSError as exc:
        return None, exc


def read_int(root: str, path: str) -> int | None:
    """Return an attribute as an integer, or None when it is absent or not a number."""
    text = read_attr(root, path)
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


_BRACKETED = re.compile(r"\[([^\]]+)\]")


def parse_choice(text: str) -> Choice:
    """Parse ``always [madvise] never`` or ``[mq-deadline] none`` into the selection and the offer.

    A file without brackets holds a plain value: it is the selection, and the offer is unknown.
    """
    text = text.strip()
    match = _BRACKETED.search(text)
    if match is None:
        return Choice(selected=text, offered=None)
    offered = tuple(word.strip("[]") for word in text.split())
    return Choice(selected=match.group(1), offered=offered)


def parse_cpu_list(text: str) -> list[int]:
    """Parse a kernel CPU list such as ``0-3,8-11`` (as in ``online`` or ``cpulist``)."""
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return []
    for part in text.split(","):
        part = part.strip()
        first, sep, last = part.partition("-")
        try:
            start = int(first)
            stop = int(last) if sep else start
        except ValueError:
            raise SysfsError(
                f"CPU list '{text}' has '{part}', expected numbers and ranges like 0-3,8"
            ) from None
        if stop < start:
            raise SysfsError(f"CPU list '{text}' has the range '{part}' going down; expected low-high")
        cpus.update(range(start, stop + 1))
    return sorted(cpus)


def format_cpu_list(cpus) -> str:
    """Format CPUs as the kernel and systemd write them: ``0-3,5``."""
    ordered = sorted(set(int(cpu) for cpu in cpus))
    ranges: list[str] = []
    index = 0
    while index < len(ordered):
        start = stop = ordered[index]
        while index + 1 < len(ordered) and ordered[index + 1] == stop + 1:
            index += 1
            stop = ordered[index]
        ranges.append(str(start) if start == stop else f"{start}-{stop}")
        index += 1
    return ",".join(ranges)


def natural_key(text: str) -> list:
    """Sort ``cpu2`` before ``cpu10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def expand(root: str, pattern: str) -> list[str]:
    """Return the real-host paths matching a glob below the root, in natural order."""
    prefix = host_path(root, "/").rstrip("/")
    matches = glob.glob(host_path(root, pattern))
    return sorted(("/" + os.path.relpath(match, prefix or "/") for match in matches), key=natural_key)


CPU_ROOT = "/sys/devices/system/cpu"
_CPU_OWNER = re.compile(r"^cpu(\d+)$")


def online_cpus(root: str) -> list[int] | None:
    """The CPUs in /sys/devices/system/cpu/online, or None where the kernel does not show the file."""
    text = read_attr(root, f"{CPU_ROOT}/online")
    return None if text is None else parse_cpu_list(text)


def offline_cpus(root: str) -> list[int]:
    """The CPUs present but not online (taken down with ``chcpu -d`` or ``maxcpus=``)."""
    online = online_cpus(root)
    present_text = read_attr(root, f"{CPU_ROOT}/present")
    if online is None or present_text is None:
        return []
    return sorted(set(parse_cpu_list(present_text)) - set(online))


def _read_failure(root: str, path: str, label: str, exc: OSError | None, what: str = "") -> str:
    """Why an attribute could not be read, with what to do: the cause, not a guess."""
    reason = (exc.strerror or str(exc)) if exc is not None else "no such file"
    code = errno.errorcode.get(exc.errno, "") if exc is not None and exc.errno else ""
    head = f"cannot read {what or path}: {reason}{f' ({code})' if code else ''}"
    if exc is not None and exc.errno in (errno.EACCES, errno.EPERM):
        return f"{head}; expected a readable {label} attribute. Run the module as root (become: true)"
    cpu = _CPU_OWNER.match(owner_of(path))
    if cpu is not None and exc is not None and exc.errno in (errno.EBUSY, errno.EINVAL, errno.ENODEV):
        online = read_attr(root, f"{CPU_ROOT}/online")
        return (
            f"{head}; the kernel refuses reads of a cpufreq policy whose CPUs are all offline "
            f"(online: {online or 'unknown'}). Bring cpu{cpu.group(1)} online (chcpu -e {cpu.group(1)}) "
            "or leave it out"
        )
    return f"{head}; expected a readable {label} attribute. Check that the kernel shows it on this host"


_OWNER_PART = re.compile(r"^(cpu\d+|policy\d+|node\d+)$")


def owner_of(path: str) -> str:
    """Name what an attribute belongs to, for messages: ``cpu2``, ``nvme0n1``, ``transparent_hugepage``."""
    parts = [part for part in path.split("/") if part]
    if "block" in parts[:-1]:
        return parts[parts.index("block") + 1]
    for part in reversed(parts[:-1]):
        if _OWNER_PART.match(part):
            return part
    return parts[-2] if len(parts) > 1 else path


def plan_attribute_changes(
    root: str,
    pattern: str,
    value: str,
    available: str | None = None,
    label: str | None = None,
    hint: str | None = None,
    missing: str = "fail",
    online_only: bool = True,
) -> list[AttributeChange]:
    """Decide, without writing, what setting every attribute matching ``pattern`` to ``value`` changes.

    ``available`` names a file beside each attribute that lists the accepted values (as
    ``scaling_available_governors`` does for ``scaling_governor``); bracketed files list them
    themselves. Paths that resolve to the same file (``cpu1/cpufreq`` is a link to ``policy0``
    on a shared-clock cluster) are planned once. With ``online_only``, an attribute of a CPU that is not
    in /sys/devices/system/cpu/online is left alone and returned with ``skipped`` saying so: the kernel
    refuses reads of an inactive cpufreq policy, and an offline CPU runs nothing.
    """
    label = label or os.path.basename(pattern)
    paths = expand(root, pattern)
    if not paths:
        if missing == "ignore":
            return []
        raise SysfsError(
            f"no file matches {pattern}; expected at least one {label} attribute. Check the path, "
            "or set missing=ignore where the hardware may lack it"
        )
    changes: list[AttributeChange] = []
    seen: set[str] = set()
    online = online_cpus(root) if online_only else None
    for path in paths:
        owner = owner_of(path)
        cpu = _CPU_OWNER.match(owner)
        if online is not None and cpu is not None and int(cpu.group(1)) not in online:
            reason = f"{owner} is offline (online: {format_cpu_list(online)})"
            changes.append(AttributeChange(path, owner, "", "", False, skipped=reason))
            continue
        real = os.path.realpath(host_path(root, path))
        if real in seen:
            continue
        seen.add(real)
        text, error = read_attr_or_error(root, path)
        if text is None:
            raise SysfsError(_read_failure(root, path, label, error))
        choice = parse_choice(text)
        offered = choice.offered
        if available:
            beside = os.path.join(os.path.dirname(path), available)
            listing, error = read_attr_or_error(root, beside)
            if listing is None:
                raise SysfsError(
                    _read_failure(
                        root, beside, f"list of accepted {label} values", error, f"{available} beside {path}"
                    )
                )
            offered = tuple(listing.split())
        if offered is not None and value not in offered:
            message = f"{label} '{value}' not offered by {owner}; available: {' '.join(offered)}"
            raise SysfsError(f"{message}; {hint}" if hint else message)
        before = choice.selected or ""
        changes.append(AttributeChange(path, owner, before, value, before != value))
    return changes


def apply_attribute_changes(root: str, changes: list[AttributeChange]) -> None:
    """Write the attributes whose plan says they change."""
    for change in changes:
        if not change.changed or change.skipped:
            continue
        try:
            with open(host_path(root, change.path), "w", encoding="utf-8") as handle:
                handle.write(change.after)
        except OSError as exc:
            raise SysfsError(
                f"writing '{change.after}' to {change.path} failed: {exc.strerror or exc}; "
                f"it held '{change.before}'. The kernel refused the value: "
                f"check that {change.owner} accepts it"
            ) from exc
        now = _read_back(root, change.path, change.after)
        if now != change.after:
            raise SysfsError(
                f"wrote '{change.after}' to {change.path} but it reads '{now}'; the kernel kept or rounded "
                f"another value. Write a value {change.owner} holds exactly"
            )


def _read_back(root: str, path: str, expected: str, attempts: int = 5, pause_s: float = 0.1) -> str | None:
    """The value an attribute shows after a write.

    A kernel attribute shows it at once. A file standing in for one (the test cluster's fake hardware)
    is rewritten into the kernel's form just after the write, so a read can catch it half-written;
    a few short retries ride that out without hiding a value the kernel really kept.
    """
    now = None
    for attempt in range(attempts):
        text = read_attr(root, path)
        now = parse_choice(text).selected if text else None
        if now == expected:
            break
        if attempt + 1 < attempts:
            time.sleep(pause_s)
    return now


def render_state(changes: list[AttributeChange], side: str) -> str:
    """Render ``before`` or ``after`` of a plan as ``path: value`` lines for ``--diff``."""
    return "".join(f"{change.path}: {getattr(change, side)}\n" for change in changes if not change.skipped)
