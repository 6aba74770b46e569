"""The watcher that makes plain files behave like kernel attributes after a write."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.fakehw import THP_SETTINGS, Setting
from tests.cluster.settings_watch import SettingsWatcher

RATIO = Setting("/proc/sys/vm/dirty_ratio", "20", minimum=0, maximum=100, clears="/proc/sys/vm/dirty_bytes")
BYTES = Setting("/proc/sys/vm/dirty_bytes", "0", minimum=0, clears="/proc/sys/vm/dirty_ratio")


@pytest.fixture
def files(tmp_path: Path) -> Iterator[dict[str, Path]]:
    settings = {"thp": THP_SETTINGS[0], "ratio": RATIO, "bytes": BYTES}
    paths = {name: tmp_path / name for name in settings}
    for name, setting in settings.items():
        paths[name].write_text(setting.render(setting.factory))
    watcher = SettingsWatcher({paths[name]: setting for name, setting in settings.items()}).start()
    yield paths
    watcher.stop()


def _eventually(path: Path, expected: str) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and path.read_text() != expected:
        time.sleep(0.01)
    return path.read_text()


def test_a_selection_reads_back_bracketed(files: dict[str, Path]) -> None:
    files["thp"].write_text("madvise\n")
    assert _eventually(files["thp"], "always [madvise] never\n") == "always [madvise] never\n"


def test_a_refused_value_leaves_the_old_one(files: dict[str, Path]) -> None:
    files["thp"].write_text("never\n")
    _eventually(files["thp"], "always madvise [never]\n")
    files["thp"].write_text("sometimes\n")
    assert _eventually(files["thp"], "always madvise [never]\n") == "always madvise [never]\n"


def test_an_untruncated_write_keeps_only_the_new_value(files: dict[str, Path]) -> None:
    with open(files["thp"], "r+") as handle:
        handle.write("never")
    assert _eventually(files["thp"], "always madvise [never]\n") == "always madvise [never]\n"


def test_dirty_bytes_zeroes_dirty_ratio(files: dict[str, Path]) -> None:
    files["bytes"].write_text("268435456\n")
    assert _eventually(files["ratio"], "0\n") == "0\n"
    assert files["bytes"].read_text() == "268435456\n"


def test_a_write_caught_between_truncation_and_its_bytes_is_not_refused(tmp_path: Path) -> None:
    # Two CPUs sharing a cpufreq policy: the boot script writes the governor through each, and the watcher may
    # read the file after the second write truncated it but before its bytes landed.
    setting = THP_SETTINGS[0]
    path = tmp_path / "thp"
    path.write_text("")
    late_bytes = threading.Timer(0.05, path.write_text, args=("never",))
    late_bytes.start()
    watcher = SettingsWatcher({path: setting})
    watcher.settle(path)
    late_bytes.join()
    watcher.start().stop()
    assert path.read_text() == "always madvise [never]\n"


def test_an_empty_write_is_refused_once_it_stays_empty(files: dict[str, Path]) -> None:
    files["thp"].write_text("")
    assert _eventually(files["thp"], "[always] madvise never\n") == "[always] madvise never\n"
