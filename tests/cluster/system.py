"""Small helpers around the controller: running commands, Debian packages, the harness lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.cluster import config


class HarnessError(RuntimeError):
    """A step of the harness failed; the message says what was found and what to do."""


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    capture: bool = True,
    input_text: str | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise HarnessError with the command and its stderr."""
    args = [str(a) for a in argv]
    try:
        result = subprocess.run(
            args,
            check=False,
            text=True,
            input=input_text,
            capture_output=capture,
            timeout=timeout,
            env=env,
        )
    except FileNotFoundError as exc:
        raise HarnessError(f"{args[0]} is not installed; run `python -m tests.cluster up` as root") from exc
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip() if capture else ""
        raise HarnessError(f"`{' '.join(args)}` failed with exit status {result.returncode}: {detail}")
    return result


def require_root() -> None:
    if os.geteuid() != 0:
        raise HarnessError(
            "the local cluster needs root (containers, network namespaces, mounts); run as root"
        )


def missing_packages(packages: Sequence[str]) -> list[str]:
    missing = []
    for package in packages:
        result = run(["dpkg-query", "-W", "-f=${Status}", package], check=False)
        if "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def ensure_packages(packages: Sequence[str] = config.CONTROLLER_PACKAGES) -> list[str]:
    """Install the Debian packages that are missing; return the ones installed."""
    missing = missing_packages(packages)
    if missing:
        print(f"Installing Debian packages: {' '.join(missing)}", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)
    return missing


@contextlib.contextmanager
def harness_lock() -> Iterator[None]:
    """Serialise harness commands: two `up`s at once would race for the same bridge and names."""
    config.STATE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(config.LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("Waiting for another harness command to finish...", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
