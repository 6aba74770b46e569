"""Edit a kernel command line file (a Raspberry Pi's ``cmdline.txt``) token by token.

The firmware reads the first line of ``cmdline.txt`` and hands it to the kernel. ``plan_cmdline`` takes the
file's text and the tokens asked for and returns the new text: the tokens that are not touched keep their
place and the whitespace around them byte for byte; new tokens go at the end of the line, in the order given.
Nothing here touches a file; the ``kernel_cmdline`` module reads, decides and writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A token runs to the next whitespace, except inside double quotes (param="a value").
_TOKEN = re.compile(r'(?:[^\s"]+|"[^"]*")+')


class CmdlineError(ValueError):
    """The file or the request cannot be handled; the message says what was found and what to do."""


@dataclass
class CmdlinePlan:
    before: str
    after: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.before != self.after


def token_key(token: str) -> str:
    """The parameter name of a token: ``cgroup_enable`` for ``cgroup_enable=memory``, ``quiet`` for ``quiet``."""
    return token.split("=", 1)[0]


def tokens(line: str) -> list[str]:
    return _TOKEN.findall(line)


def split_first_line(text: str) -> tuple[str, str]:
    """The first line (without its newline) and everything after it, which must be blank."""
    line, newline, rest = text.partition("\n")
    if rest.strip():
        extra = rest.strip().splitlines()[0]
        raise CmdlineError(
            f"it has more than one line (the next one starts '{extra[:40]}'); the firmware passes only the "
            "first line to the kernel, so the rest is ignored. Join the lines into one, separated by spaces."
        )
    return line, newline + rest


def _check_token(option: str, token: str) -> None:
    if not token or _TOKEN.fullmatch(token) is None:
        raise CmdlineError(
            f"{option} has {token!r}, which is not one kernel parameter; give each as one word such as "
            "cgroup_enable=memory (values with spaces in double quotes)."
        )


def _parameter_token(key: str, value: object) -> str:
    if value is None or value == "":
        return key
    if isinstance(value, bool):
        value = "1" if value else "0"
    return f"{key}={value}"


def validate_request(present: list[str], absent: list[str], parameters: dict) -> dict[str, str]:
    """Check the request; return ``parameters`` as key -> token."""
    for token in present:
        _check_token("present", token)
    for token in absent:
        _check_token("absent", token)
    both = [token for token in present if token in absent]
    if both:
        raise CmdlineError(
            f"{', '.join(both)} is in both present and absent; keep each token in one of them."
        )
    wanted: dict[str, str] = {}
    for key, value in parameters.items():
        token = _parameter_token(str(key), value)
        _check_token(f"parameters.{key}", token)
        if "=" in str(key):
            raise CmdlineError(
                f"parameters has the key {key!r}; give the name alone as key and the value as its value "
                "(cpufreq.default_governor: performance)."
            )
        wanted[str(key)] = token
    for token in present:
        if token_key(token) in wanted:
            raise CmdlineError(
                f"present has {token} and parameters sets {token_key(token)}; name each parameter in one of them."
            )
    for token in absent:
        if token in wanted.values():
            raise CmdlineError(f"parameters sets {token}, which absent removes; keep it in one of them.")
    return wanted


def plan_cmdline(
    text: str,
    present: list[str] | None = None,
    absent: list[str] | None = None,
    parameters: dict | None = None,
) -> CmdlinePlan:
    """The file text after the edit.

    ``present``: tokens that must be there (appended when missing; a key may repeat, as cgroup_enable does).
    ``absent``: tokens that must not be there (every occurrence is removed).
    ``parameters``: key -> value for parameters that take one value: the first token with that key is
    replaced in place, later ones are removed, and a missing one is appended. A value of None or "" gives the
    bare key (a flag such as ``quiet``).
    """
    present = list(present or [])
    absent = list(absent or [])
    wanted = validate_request(present, absent, dict(parameters or {}))
    line, rest = split_first_line(text)
    matches = list(_TOKEN.finditer(line))
    leading = line[: matches[0].start()] if matches else line
    trailing = line[matches[-1].end() :] if matches else ""
    # Each entry is [index in the line, whitespace before the token, token]; the first token's whitespace
    # is `leading`, kept apart so that a removed first token leaves no gap behind it.
    items = [
        [i, line[matches[i - 1].end() : m.start()] if i else "", m.group()] for i, m in enumerate(matches)
    ]
    added: list[str] = []
    removed: list[str] = []
    seen_keys: set[str] = set()
    kept = []
    for item in items:
        token = item[2]
        key = token_key(token)
        if token in absent:
            removed.append(token)
            continue
        if key in wanted:
            if key in seen_keys:
                removed.append(token)
                continue
            seen_keys.add(key)
            if token != wanted[key]:
                removed.append(token)
                added.append(wanted[key])
                item[2] = wanted[key]
        kept.append(item)
    if kept and kept[0][0] != 0:
        kept[0][1] = ""
    current = {item[2] for item in kept}
    for token in present + [token for key, token in wanted.items() if key not in seen_keys]:
        if token not in current:
            kept.append([None, " " if kept else "", token])
            current.add(token)
            added.append(token)
    new_line = leading + "".join(separator + token for _, separator, token in kept) + trailing
    return CmdlinePlan(before=text, after=new_line + rest, added=added, removed=removed)
