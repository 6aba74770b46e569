"""Run Ansible from tests with this checkout's library, module_utils and roles, and read its JSON result."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ansible_env(tmp_path: Path, **extra: str) -> dict:
    """Ansible with our library, module_utils and roles and no other configuration."""
    config = tmp_path / "ansible.cfg"
    if not config.exists():
        config.write_text("[defaults]\n")
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(config),
        ANSIBLE_LIBRARY=str(REPO / "library"),
        ANSIBLE_MODULE_UTILS=str(REPO / "module_utils"),
        ANSIBLE_ROLES_PATH=str(REPO / "roles"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_DEPRECATION_WARNINGS="0",
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    env.update(extra)  # the caller's settings win, ANSIBLE_CONFIG included
    return env


def run(tmp_path: Path, argv: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, capture_output=True, text=True, env=ansible_env(tmp_path, **env), cwd=REPO, timeout=timeout
    )


def run_json(tmp_path: Path, argv: list[str], timeout: float = 300, **env: str) -> tuple[int, dict]:
    """Run an Ansible command with the JSON callback; return its exit status and parsed output."""
    proc = run(tmp_path, argv, timeout, **env)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"{argv[0]} printed no JSON (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        ) from None


def adhoc(tmp_path: Path, module: str, args: dict, *extra: str) -> dict:
    """Run ``ansible localhost -m <module>``; return the task's result."""
    _, output = run_json(
        tmp_path,
        [
            str(BIN / "ansible"),
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
        timeout=120,
    )
    return output["plays"][0]["tasks"][0]["hosts"]["localhost"]


def playbook(tmp_path: Path, path: Path, inventory: Path, extra_vars: dict, *args: str, **env: str):
    """Run a playbook with extra variables; return (exit status, JSON output)."""
    vars_file = tmp_path / f"extra-vars-{len(list(tmp_path.glob('extra-vars-*')))}.json"
    vars_file.write_text(json.dumps({"ansible_python_interpreter": sys.executable, **extra_vars}))
    return run_json(
        tmp_path,
        [str(BIN / "ansible-playbook"), "-i", str(inventory), "-e", f"@{vars_file}", str(path), *args],
        **env,
    )


def host_results(output: dict, host: str) -> dict[str, dict]:
    """Task name -> that host's result, over every play of a JSON callback output."""
    results = {}
    for play in output["plays"]:
        for task in play["tasks"]:
            if host in task["hosts"]:
                results[task["task"]["name"]] = task["hosts"][host]
    return results


def load_library_module(name: str):
    """Import ``library/<name>.py`` as a Python module."""
    spec = importlib.util.spec_from_file_location(f"llmfleet_library_{name}", REPO / "library" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
