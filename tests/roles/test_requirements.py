"""The hosts install the same pinned versions as the project declares."""

from __future__ import annotations

import tomllib

import yaml

from tests.ansiblerun import REPO


def test_runtime_requirements_are_pinned_as_in_pyproject():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    defaults = yaml.safe_load((REPO / "roles/inference_package/defaults/main.yml").read_text())
    installed = defaults["inference_package_requirements"]
    assert set(installed) <= set(declared), set(installed) - set(declared)
    assert any(r.startswith("llama-cpp-python==") for r in installed)
