"""Our check modules document themselves in YAML that ansible-doc reads, matching their argument specs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.ansiblerun import REPO, ansible_env
from tests.modules.conftest import load_library_module

MODULES = ["rpc_worker_info", "inference_health"]


class SpecCaptured(Exception):
    """Raised by the stand-in AnsibleModule once it has seen the argument spec."""


@pytest.mark.parametrize("name", MODULES)
def test_documented_options_match_the_argument_spec(name, monkeypatch):
    module = load_library_module(name)
    seen = {}

    def capture(argument_spec, supports_check_mode=False, **_kwargs):
        seen.update(spec=argument_spec, check_mode=supports_check_mode)
        raise SpecCaptured

    monkeypatch.setattr(module, "AnsibleModule", capture)
    with pytest.raises(SpecCaptured):
        module.main()
    documentation = yaml.safe_load(module.DOCUMENTATION)
    assert documentation["module"] == name
    assert set(documentation["options"]) == set(seen["spec"])
    for option, spec in seen["spec"].items():
        documented = documentation["options"][option]
        for key in ("type", "default", "choices", "elements"):
            assert documented.get(key) == spec.get(key), (option, key)
        assert documented.get("required", False) == spec.get("required", False), option
    assert seen["check_mode"] == (documentation["attributes"]["check_mode"]["support"] == "full")
    assert documentation["attributes"]["diff_mode"]["support"] == "none"
    assert any(name in task for task in yaml.safe_load(module.EXAMPLES))
    assert isinstance(yaml.safe_load(module.RETURN), dict)


def test_ansible_doc_reads_the_modules(tmp_path: Path):
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
