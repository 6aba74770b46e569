"""Keep a host's writable fake files looking like kernel attributes after each write (inotify, no packages).

A write from inside the host lands in a plain file on the controller. When the writer closes it, the file is
rewritten in place (a bind mount pins the inode, so no rename) to what the kernel would show: the bracketed
selection, the bare number, or the previous value for a write the kernel would have refused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
import time
from pathlib import Path

from tests.cluster.fakehw import Setting

IN_CLOSE_WRITE = 0x00000008
IN_CLOEXEC = 0o2000000
_EVENT_HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


class SettingsWatcher:
    """Watch the given fake files in a background thread until `stop()`."""

    def __init__(self, settings: dict[Path, Setting]) -> None:
        self._settings = settings
        self._by_target = {setting.path: path for path, setting in settings.items()}
        self._values = {path: setting.factory for path, setting in settings.items()}
        self._fd = _check(_libc.inotify_init1(IN_CLOEXEC), "inotify_init1")
        self._watches: dict[int, Path] = {}
        for path in settings:
            wd = _check(_libc.inotify_add_watch(self._fd, os.fsencode(path), IN_CLOSE_WRITE), str(path))
            self._watches[wd] = path
        self._stop_read, self._stop_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name="settings-watch", daemon=True)

    def start(self) -> SettingsWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        os.write(self._stop_write, b"x")
        self._thread.join(timeout=5)
        for fd in (self._fd, self._stop_read, self._stop_write):
            os.close(fd)

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._stop_read], [], [])
            if self._stop_read in ready:
                return
            try:
                data = os.read(self._fd, 65536)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
                offset += _EVENT_HEADER.size + length
                path = self._watches.get(wd)
                if path is not None:
                    self.settle(path)

    def settle(self, path: Path) -> None:
        """Rewrite one file as the kernel would show it after the write it just received."""
        setting = self._settings[path]
        before = setting.render(self._values[path])
        value = setting.written_value(before, _read_written(path))
        if value is None:
            value = self._values[path]
        self._values[path] = value
        _rewrite(path, setting.render(value))
        if setting.clears and value != "0" and setting.clears in self._by_target:
            other = self._by_target[setting.clears]
            self._values[other] = "0"
            _rewrite(other, self._settings[other].render("0"))


# How long an empty file may stay empty before it counts as an empty write rather than one caught between its
# truncation and its bytes (two writers in a row: the second truncates while the first one's event is handled).
EMPTY_GRACE_S = 0.5


def _read_written(path: Path) -> str:
    text = path.read_text(errors="replace")
    deadline = time.monotonic() + EMPTY_GRACE_S
    while not text and time.monotonic() < deadline:
        time.sleep(0.005)
        text = path.read_text(errors="replace")
    return text


def _rewrite(path: Path, text: str) -> None:
    if path.read_text(errors="replace") == text:
        return
    with open(path, "r+") as handle:
        handle.write(text)
        handle.truncate()
