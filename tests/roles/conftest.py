"""Render the deploy roles' templates on this machine; no host is changed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ansiblerun import playbook

HERE = Path(__file__).resolve().parent
INVENTORY = HERE / "inventory.yml"


def nft_usable() -> bool:
    """nft can check a ruleset here (it needs netlink, which some sandboxes lack)."""
    if shutil.which("nft") is None:
        return False
    probe = subprocess.run(
        ["nft", "-c", "-f", "-"], input="table inet llmfleet_probe {}\n", text=True, check=False
    )
    return probe.returncode == 0


def render(tmp_path: Path, inventory: Path = INVENTORY, **extra) -> Path:
    """Render every host's templates into tmp_path/<host>/ and return tmp_path."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    # systemd-analyze verify wants ExecStart's program to exist.
    (venv_bin / "python").symlink_to(sys.executable)
    variables = {
        "render_dir": str(tmp_path),
        "rpc_worker_venv": str(tmp_path / "venv"),
        "inference_head_venv": str(tmp_path / "venv"),
        "nft_validate": nft_usable(),
        **extra,
    }
    rc, output = playbook(tmp_path, HERE / "render.yml", inventory, variables)
    assert rc == 0, output
    return tmp_path


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> Path:
    """Every host of inventory.yml rendered in one run (the tuned variants as pi1-tuned, gpu1-tuned)."""
    return render(tmp_path_factory.mktemp("rendered"))
