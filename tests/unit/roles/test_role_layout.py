"""Every role keeps its public variables in three places that must agree: defaults/main.yml, the
argument spec of its main entry point, and its README. Names carry the role's prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROLES = Path(__file__).resolve().parents[3] / "roles"
ROLE_NAMES = sorted(path.name for path in ROLES.iterdir() if (path / "defaults" / "main.yml").exists())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_defaults_spec_and_readme_agree(role):
    defaults = load(ROLES / role / "defaults" / "main.yml")
    spec = load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    readme = (ROLES / role / "README.md").read_text()
    assert set(defaults) == set(spec)
    for name in defaults:
        assert name.startswith(f"{role}_"), name
        assert f"{name}:" in readme, f"{name} is not in {role}/README.md"
        assert spec[name].get("description"), name
        assert spec[name].get("type"), name


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_spec_defaults_match_plain_defaults(role):
    defaults = load(ROLES / role / "defaults" / "main.yml")
    spec = load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    for name, value in defaults.items():
        if isinstance(value, str) and "{{" in value:
            assert "default" not in spec[name], f"{name} is computed; its spec must not claim a fixed default"
        elif value is None:
            assert spec[name].get("default") is None, name
        elif "default" in spec[name] or value not in ([], {}, ""):
            assert spec[name].get("default") == value, name


@pytest.mark.parametrize("role", [r for r in ROLE_NAMES if (ROLES / r / "vars" / "main.yml").exists()])
def test_internal_variables_are_marked(role):
    for name in load(ROLES / role / "vars" / "main.yml"):
        assert name.startswith(f"__{role}_"), name
