"""The inference_package role applied to this machine: build once per source change, install, idempotence."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ansiblerun import REPO, playbook
from tests.cluster.config import LLAMA_WHEEL_DIR

SYSTEM_PYTHON = Path("/usr/bin/python3")
LLAMA_WHEELS = LLAMA_WHEEL_DIR


def system_python_can_build() -> bool:
    """Debian's python3 with setuptools, wheel and venv builds the wheel and the venv offline."""
    if not SYSTEM_PYTHON.exists():
        return False
    probe = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import setuptools, wheel, ensurepip, pip"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not system_python_can_build(), reason="needs /usr/bin/python3 with setuptools, wheel, venv"
    ),
    pytest.mark.skipif(
        not list(LLAMA_WHEELS.glob("*.whl")), reason=f"no llama-cpp-python wheel in {LLAMA_WHEELS}"
    ),
]


def changed(output: dict) -> int:
    return output["stats"]["localhost"]["changed"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    source.mkdir()
    shutil.copytree(REPO / "inference", source / "inference", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheelhouse = root / "wheelhouse-on-controller" / LLAMA_WHEELS.name
    wheelhouse.mkdir(parents=True)
    for wheel in LLAMA_WHEELS.glob("*.whl"):
        (wheelhouse / wheel.name).symlink_to(wheel)
    return {
        "root": root,
        "source": source,
        "vars": {
            # Modules on this machine run in Debian's python3, whose apt bindings the package task needs.
            "ansible_python_interpreter": str(SYSTEM_PYTHON),
            "ansible_connection": "local",
            "inference_package_venv": str(root / "opt/venv"),
            "inference_package_dist_dir": str(root / "opt/dist"),
            "inference_package_wheelhouse": str(wheelhouse.parent),
            "inference_package_wheelhouse_dest": str(root / "opt/wheelhouse"),
            # The dependencies' wheels are not on this machine; llmfleet itself installs without them.
            "inference_package_requirements": [],
            "inference_package_source": str(source),
            "inference_package_build_cache": str(root / "cache"),
            "inference_package_build_python": str(SYSTEM_PYTHON),
            "inference_package_python": str(SYSTEM_PYTHON),
        },
    }


def apply(scratch: dict, *args: str) -> dict:
    rc, output = playbook(
        scratch["root"], REPO / "tests/roles/package.yml", Path("localhost,"), scratch["vars"], *args
    )
    assert rc == 0, output
    return output


def installed_file(scratch: dict) -> Path:
    venv_python = scratch["root"] / "opt/venv/bin/python"
    proc = subprocess.run(
        [str(venv_python), "-c", "import inference; print(inference.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=scratch["root"],
    )
    return Path(proc.stdout.strip())


def test_first_run_builds_copies_and_installs(scratch):
    output = apply(scratch)
    assert changed(output) > 0
    assert installed_file(scratch).is_relative_to(scratch["root"] / "opt/venv")
    assert list((scratch["root"] / "opt/dist").glob("llmfleet-0.1.0-py3-none-any.whl"))
    assert list((scratch["root"] / "opt/wheelhouse").glob("*/llama_cpp_python-*.whl"))
    assert len(list((scratch["root"] / "cache").iterdir())) == 1


def test_second_run_and_check_mode_change_nothing(scratch):
    assert changed(apply(scratch)) == 0
    assert changed(apply(scratch, "--check", "--diff")) == 0


def test_changed_source_is_rebuilt_and_reinstalled(scratch):
    init = scratch["source"] / "inference/__init__.py"
    init.write_text(init.read_text() + "# rebuilt\n")
    output = apply(scratch)
    assert changed(output) > 0
    assert installed_file(scratch).read_text().endswith("# rebuilt\n")
    assert len(list((scratch["root"] / "cache").iterdir())) == 2
    assert changed(apply(scratch)) == 0
