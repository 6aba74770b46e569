"""Make our module_utils importable as Ansible's, and give each test fresh fake hosts."""

from __future__ import annotations

import json
from pathlib import Path

import ansible.module_utils
import pytest

from tests import fakehw
from tests.ansiblerun import load_library_module

REPO = Path(__file__).resolve().parents[2]

# Modules import `ansible.module_utils.llmfleet_*`; Ansible finds those through ansible.cfg when it
# packs a module, and tests find them here, so both run the same import lines.
if str(REPO / "module_utils") not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(str(REPO / "module_utils"))


@pytest.fixture
def pi5(tmp_path: Path) -> fakehw.FakeHost:
    return fakehw.build("pi5", tmp_path / "pi5")


@pytest.fixture
def rk3588(tmp_path: Path) -> fakehw.FakeHost:
    return fakehw.build("rk3588", tmp_path / "rk3588")


@pytest.fixture
def x86(tmp_path: Path) -> fakehw.FakeHost:
    return fakehw.build("x86", tmp_path / "x86")


@pytest.fixture
def library_module():
    """Import a library module by name."""
    return load_library_module


@pytest.fixture
def run_module(capsys):
    """Run a library module's ``main()`` with arguments; return its JSON result."""
    from ansible.module_utils.testing import patch_module_args

    def run(name: str, args: dict, check_mode: bool = False, diff: bool = False) -> dict:
        module = load_library_module(name)
        args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
        with patch_module_args(args), pytest.raises(SystemExit):
            module.main()
        return json.loads(capsys.readouterr().out)

    return run
