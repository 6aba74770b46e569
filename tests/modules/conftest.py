"""Our modules against real processes on loopback: RPC workers and heads started as users start them."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import ansible.module_utils
import pytest

from tests.ansiblerun import REPO, load_library_module
from tests.inference.conftest import Server, Worker, tiny_model  # noqa: F401  (tiny_model is a fixture)

API_KEY = "test-key-0123456789"

# Modules import `ansible.module_utils.llmfleet_*`; Ansible finds those through ansible.cfg when it packs a
# module, and the tests find them here, so both run the same import lines.
if str(REPO / "module_utils") not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(str(REPO / "module_utils"))


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
