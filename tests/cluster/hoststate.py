"""The files a host keeps under its state directory on the controller, and what they say about it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.cluster.config import Host

SUPERVISE_COMMAND = "_supervise"


@dataclass(frozen=True)
class HostFiles:
    host: Host

    @property
    def directory(self) -> Path:
        return self.host.state_dir

    @property
    def upper(self) -> Path:
        """The host's own changes on top of the base image: its disk state, kept across reboots."""
        return self.directory / "upper"

    @property
    def work(self) -> Path:
        return self.directory / "work"

    @property
    def root(self) -> Path:
        """The overlay of the base image and `upper` that the container boots from."""
        return self.directory / "root"

    @property
    def fakehw(self) -> Path:
        return self.directory / "fakehw"

    @property
    def model_volume(self) -> Path:
        return self.directory / "model-volume.img"

    @property
    def loop_device(self) -> Path:
        """Holds the name of the loop device (e.g. loop3) that backs the model volume."""
        return self.directory / "loop-device"

    @property
    def image(self) -> Path:
        """Holds the version of the base image the host was created from."""
        return self.directory / "image"

    @property
    def supervisor_pid(self) -> Path:
        return self.directory / "supervisor.pid"

    @property
    def supervisor_log(self) -> Path:
        return self.directory / "supervisor.log"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def boots(self) -> Path:
        """Counts the boots of this host since `up` created it."""
        return self.directory / "boots"

    def read(self, path: Path, default: str = "") -> str:
        try:
            return path.read_text().strip()
        except OSError:
            return default

    def boot_count(self) -> int:
        return int(self.read(self.boots, "0") or 0)

    def loop_name(self) -> str | None:
        return self.read(self.loop_device) or None

    def supervisor(self) -> int | None:
        """The pid of the host's live supervisor, or None (no pid file, or the pid is now someone else)."""
        text = self.read(self.supervisor_pid)
        if not text.isdigit():
            return None
        pid = int(text)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if SUPERVISE_COMMAND.encode() in cmdline and self.host.name.encode() in cmdline:
            return pid
        return None

    def console_tail(self, lines: int = 25) -> str:
        text = self.read(self.console_log)
        return "\n".join(text.splitlines()[-lines:])
