"""The patched llama-cpp-python build is named the same everywhere a host or the controller installs it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.ansiblerun import REPO
from tests.cluster import config as cluster_config

sys.path.insert(0, str(REPO / "inference" / "patches"))
import build_wheel


def makefile_build() -> str:
    text = (REPO / "Makefile").read_text()
    public = re.search(r"^LLAMA_CPP_PYTHON_VERSION := (\S+)$", text, re.M)[1]
    build = re.search(r"^LLAMA_CPP_PYTHON_BUILD := (\S+)$", text, re.M)[1]
    return build.replace("$(LLAMA_CPP_PYTHON_VERSION)", public)


def test_every_pin_names_the_makefile_s_build():
    build = makefile_build()
    assert "+" in build, "the build carries a local label naming the patch series"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"llama-cpp-python=={build}" in pyproject["project"]["dependencies"]
    defaults = yaml.safe_load((REPO / "roles/inference_package/defaults/main.yml").read_text())
    assert f"llama-cpp-python=={build}" in defaults["inference_package_requirements"]
    specs = yaml.safe_load((REPO / "roles/inference_package/meta/argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert f"llama-cpp-python=={build}" in options["inference_package_requirements"]["default"]
    assert build == cluster_config.LLAMA_CPP_PYTHON_VERSION


def test_the_series_lists_every_patch_once_and_each_has_a_header():
    patches = build_wheel.series()
    on_disk = sorted(p.name for p in build_wheel.PATCHES.glob("*.patch"))
    assert sorted(p.name for p in patches) == on_disk
    assert len(set(patches)) == len(patches)
    for patch in patches:
        header = patch.read_text().split("\n---\n", 1)[0]
        for field in ("Description:", "Forwarded:", "Last-Update:"):
            assert field in header, f"{patch.name} lacks {field}"


def test_a_version_without_a_label_is_refused():
    with pytest.raises(SystemExit, match=re.escape("must look like 0.3.36+llmfleet.")):
        build_wheel.label("0.3.36")
    assert build_wheel.label("0.3.36+llmfleet.2") == ("0.3.36", "llmfleet.2")


def test_the_makefile_s_wheel_build_command_parses(tmp_path):
    # CMAKE_ARGS starts with a dash: passed as a separate word, argparse takes it for an option of its own.
    printed = subprocess.run(
        ["make", "-n", "wheelhouse", f"WHEELHOUSE={tmp_path / 'none'}", "BIN=/usr/bin"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    command = re.search(r"build_wheel\.py (.*?);", printed)
    assert command, printed
    args = build_wheel.parser().parse_args(shlex.split(command[1]))
    assert args.cmake_args.startswith("-DGGML_RPC=on") and args.version == makefile_build()
