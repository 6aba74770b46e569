"""playbooks/retune.yml refuses settings it cannot run with before it measures or changes anything: wrong
thresholds, and role lists that would apply the roles taking cpu_pinning's CPU sets without it. The hosts run
on this machine (ansible_connection local); the run stops in its first checks, so no head is needed."""

from __future__ import annotations

import json

import pytest

from tests.ansible_playbook import REPO, local_inventory, run_playbook

RETUNE = REPO / "playbooks" / "retune.yml"


def retune_checks(tmp_path, extra_vars: dict):
    inventory = local_inventory(
        tmp_path / "inventory.yml",
        {"pi1": {}, "gpu1": {}},
        {"rpc_workers": ["pi1"], "inference_head": ["gpu1"]},
    )
    return run_playbook(RETUNE, inventory, "-e", json.dumps(extra_vars))


def first_failure(run) -> tuple[str, str]:
    task, before = run.first_failure("gpu1")
    assert task is not None, [t.task for t in run.host_tasks("gpu1")]
    assert not any(t.changed for t in before)
    return task.task, " ".join(task.message.split())


@pytest.mark.parametrize(
    ("roles", "why"),
    [
        ({"rpc_workers": ["memory_tuning", "cgroup_slices", "rpc_worker"]}, "without cpu_pinning"),
        ({"inference_head": ["inference_head", "cpu_pinning"]}, "cpu_pinning after the role that needs it"),
        ({"rpc_workers": ["memory_tunin"]}, "a role name misspelt"),
        ({"rpc_workers": "memory_tuning"}, "a string, not a list"),
    ],
)
def test_a_role_list_that_cannot_run_is_refused_before_the_baseline(tmp_path, roles, why):
    defaults = {"rpc_workers": ["memory_tuning"], "inference_head": ["memory_tuning"]}
    run = retune_checks(tmp_path, {"llmfleet_retune_roles": {**defaults, **roles}})
    assert run.returncode != 0, why
    task, message = first_failure(run)
    assert task == "Check the roles to apply", (why, task)
    group = next(iter(roles))
    assert f"llmfleet_retune_roles.{group} is " in message, message
    assert (
        "with cpu_pinning before cgroup_slices, rpc_worker, inference_head wherever one of those" in message
    )
    assert "Measure the baseline" not in [t.task for t in run.host_tasks("gpu1")]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("llmfleet_retune_max_slowdown_percent", 100, "(expected 0 to 99)"),
        ("llmfleet_retune_samples", 0, "(expected 1 or more)"),
        ("llmfleet_retune_prompt", " ", "(expected some text)"),
        ("llmfleet_retune_rollback_checks", 0, "(expected 1 or more)"),
        ("llmfleet_retune_rollback_check_delay_s", "10s", "(expected whole seconds, 0 or more)"),
    ],
)
def test_a_threshold_out_of_range_is_refused_naming_it(tmp_path, name, value, expected):
    run = retune_checks(tmp_path, {name: value})
    assert run.returncode != 0
    task, message = first_failure(run)
    assert task == "Check the re-tune thresholds"
    shown = json.dumps(value) if name == "llmfleet_retune_prompt" else value
    assert f"{name} is {shown} {expected}" in message, message
