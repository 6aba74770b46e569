"""Every library module documents itself in YAML that ansible-doc can read, with honest attributes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.ansiblerun import REPO, ansible_env

LIBRARY = REPO / "library"
MODULES = sorted(path.stem for path in LIBRARY.glob("*.py"))


@pytest.mark.parametrize("name", MODULES)
def test_documentation_examples_and_return_are_yaml(library_module, name):
    module = library_module(name)
    documentation = yaml.safe_load(module.DOCUMENTATION)
    assert documentation["module"] == name
    assert set(documentation["attributes"]) >= {"check_mode", "diff_mode"}
    examples = yaml.safe_load(module.EXAMPLES)
    assert any(name in task for task in examples)
    assert isinstance(yaml.safe_load(module.RETURN), dict)


class SpecCaptured(Exception):
    """Raised by the stand-in AnsibleModule once it has seen the argument spec."""


@pytest.mark.parametrize("name", MODULES)
def test_documented_options_match_the_argument_spec(library_module, name, monkeypatch):
    module = library_module(name)
    seen = {}

    def capture(argument_spec, supports_check_mode=False, **_kwargs):
        seen.update(spec=argument_spec, check_mode=supports_check_mode)
        raise SpecCaptured

    monkeypatch.setattr(module, "AnsibleModule", capture)
    with pytest.raises(SpecCaptured):
        module.main()
    documentation = yaml.safe_load(module.DOCUMENTATION)
    options = documentation["options"]
    assert set(options) == set(seen["spec"])
    for option, spec in seen["spec"].items():
        assert options[option]["type"] == spec["type"], option
        assert options[option].get("default") == spec.get("default"), option
        assert options[option].get("choices") == spec.get("choices"), option
        assert options[option].get("elements") == spec.get("elements"), option
        assert options[option].get("required", False) == spec.get("required", False), option
    assert seen["check_mode"] == (documentation["attributes"]["check_mode"]["support"] == "full")


def test_ansible_doc_reads_every_module(tmp_path: Path):
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-doc"), "--json", *MODULES],
        capture_output=True,
        text=True,
        env=ansible_env(tmp_path),
        cwd=REPO,
        timeout=120,
        check=True,
    )
    docs = json.loads(proc.stdout)
    assert set(docs) == set(MODULES)
    for name in MODULES:
        assert docs[name]["return"], name
