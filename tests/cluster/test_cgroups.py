"""What the harness reads as a slice's CPUQuota= from a host's unit files (cgroups.unit_file_cpu_quota)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.cgroups import unit_file_cpu_quota

SLICE = "llmfleet.slice"


def write(root: Path, name: str, text: str) -> None:
    path = root / "etc/systemd/system" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[Slice]\nCPUQuota=5%\nTasksMax=4096\n", 5_000),
        ("[Slice]\nCPUQuota=150%\n", 150_000),
        ("[Slice]\nCPUQuota=0.5%\n", 500),
        ("[Slice]\nTasksMax=4096\n", None),
        ("[Slice]\nCPUQuota=5%\nCPUQuota=\n", None),
    ],
)
def test_the_unit_file_sets_the_quota_per_100_ms(tmp_path, text, expected):
    write(tmp_path, SLICE, text)
    assert unit_file_cpu_quota(tmp_path, SLICE) == expected


def test_a_drop_in_overrides_the_unit_file_in_name_order(tmp_path):
    write(tmp_path, SLICE, "[Slice]\nCPUQuota=300%\n")
    write(tmp_path, f"{SLICE}.d/20-b.conf", "[Slice]\nCPUQuota=10%\n")
    write(tmp_path, f"{SLICE}.d/10-a.conf", "[Slice]\nCPUQuota=50%\n")
    assert unit_file_cpu_quota(tmp_path, SLICE) == 10_000


def test_no_unit_file_means_no_quota(tmp_path):
    assert unit_file_cpu_quota(tmp_path, SLICE) is None
