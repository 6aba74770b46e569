"""Run ansible-playbook from the repository against local hosts and read its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")


@dataclass
class TaskResult:
    task: str
    result: dict

    @property
    def failed(self) -> bool:
        return bool(self.result.get("failed")) or any(
            item.get("failed") for item in self.result.get("results", []) if isinstance(item, dict)
        )

    @property
    def changed(self) -> bool:
        return bool(self.result.get("changed"))

    @property
    def message(self) -> str:
        messages = [self.result.get("msg", "")]
        messages += [item.get("msg", "") for item in self.result.get("results", []) if isinstance(item, dict)]
        return " ".join(str(message) for message in messages if message)


@dataclass
class PlaybookRun:
    returncode: int
    report: dict
    stderr: str

    def host_tasks(self, host: str) -> list[TaskResult]:
        """Every task that ran on ``host``, in order."""
        tasks = []
        for play in self.report.get("plays", []):
            for task in play["tasks"]:
                if host in task["hosts"]:
                    tasks.append(TaskResult(task["task"]["name"], task["hosts"][host]))
        return tasks

    def first_failure(self, host: str) -> tuple[TaskResult | None, list[TaskResult]]:
        """The first failed task on ``host`` and the tasks that ran before it."""
        tasks = self.host_tasks(host)
        for index, task in enumerate(tasks):
            if task.failed:
                return task, tasks[:index]
        return None, tasks


def local_inventory(path: Path, hosts: dict[str, dict], groups: dict[str, list[str]] | None = None) -> Path:
    """Write an inventory whose hosts all run locally with this Python."""
    children = {group: {"hosts": {name: {} for name in names}} for group, names in (groups or {}).items()}
    inventory = {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "ansible_become": False,
            },
            "hosts": hosts,
            "children": children,
        }
    }
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def run_playbook(playbook: Path, inventory: Path, *args: str, timeout: int = 600) -> PlaybookRun:
    """Run a playbook with the repository's ansible.cfg and return its JSON report."""
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        ANSIBLE_CACHE_PLUGIN="memory",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    completed = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), str(playbook), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    start = completed.stdout.find("{")
    report = json.loads(completed.stdout[start:]) if start >= 0 else {}
    return PlaybookRun(completed.returncode, report, completed.stderr)
