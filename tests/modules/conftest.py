"""Our modules against real processes on loopback: RPC workers and heads started as users start them."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import ansible.module_utils
import pytest

from tests.inference.conftest import Server, Worker, tiny_model  # noqa: F401  (tiny_model is a fixture)

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"

# Modules import `ansible.module_utils.llmfleet_*`; Ansible finds those through ansible.cfg when it packs a
# module, and the tests find them here, so both run the same import lines.
if str(REPO / "module_utils") not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(str(REPO / "module_utils"))


def load_library_module(name: str):
    """Import ``library/<name>.py`` as a Python module."""
    spec = importlib.util.spec_from_file_location(f"llmfleet_library_{name}", REPO / "library" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_module(capsys):
    """Run a library module's ``main()`` as Ansible would, with arguments; return its JSON result."""
    from ansible.module_utils.testing import patch_module_args

    def run(name: str, args: dict, check_mode: bool = False) -> dict:
        module = load_library_module(name)
        with patch_module_args(dict(args, _ansible_check_mode=check_mode)), pytest.raises(SystemExit):
            module.main()
        return json.loads(capsys.readouterr().out)

    return run


def ansible_env(tmp_path: Path) -> dict:
    """Ansible with our library, module_utils and roles and no other configuration."""
    config = tmp_path / "ansible.cfg"
    config.write_text("[defaults]\n")
    return dict(
        os.environ,
        ANSIBLE_LIBRARY=str(REPO / "library"),
        ANSIBLE_MODULE_UTILS=str(REPO / "module_utils"),
        ANSIBLE_ROLES_PATH=str(REPO / "roles"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_CONFIG=str(config),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_DEPRECATION_WARNINGS="0",
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
        ANSIBLE_LOCALHOST_WARNING="0",
    )


def ansible_adhoc(tmp_path: Path, module: str, args: dict, *extra: str) -> dict:
    """Run ``ansible localhost -m <module>`` with our library and module_utils; return the task result."""
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(
        [
            str(bin_dir / "ansible"),
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-m",
            module,
            "-a",
            json.dumps(args),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=ansible_env(tmp_path),
        timeout=120,
    )
    try:
        output = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"ansible printed no JSON (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        ) from None
    return output["plays"][0]["tasks"][0]["hosts"]["localhost"]


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("procs")


@pytest.fixture(scope="module")
def worker(module_tmp):
    proc = Worker(module_tmp)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def head(module_tmp, worker, tiny_model):  # noqa: F811
    """A head with an API key, sharding the tiny model over the one worker."""
    key_file = module_tmp / "api-key"
    key_file.write_text(API_KEY + "\n")
    proc = Server(
        module_tmp, tiny_model, "--rpc", worker.endpoint, "--ctx", "1024", "--api-key-file", str(key_file)
    )
    yield proc
    with contextlib.suppress(Exception):
        proc.stop()
