"""The wheelhouse: every Python package the hosts need, as wheels built once on the controller.

The hosts are offline, so they install with ``pip install --no-index --find-links``. Two directories under
``~/.cache/llmfleet/wheelhouse/`` make it up:

- ``llama-cpp-python-<version>-rpc/``: llama-cpp-python built with ``-DGGML_RPC=on`` (``make wheelhouse``);
- ``deps-<hash>/``: the project's other dependencies and llama-cpp-python's own, keyed by a hash of the
  dependency list in pyproject.toml so that changing it fills a new directory.

On the local cluster the whole wheelhouse is bind-mounted read-only at /opt/llmfleet/wheelhouse in every host.
On real hardware the roles copy the same directories to the hosts and install from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tomllib
from pathlib import Path

from tests.cluster import config
from tests.cluster.system import HarnessError, remove_tree, run, write_text

MARKER = "requirements.json"
# The hosts run Debian 12's python3.11; wheels are picked for the interpreter that builds them.
HOST_PYTHON = (3, 11)


def project_dependencies(pyproject: Path = config.REPO_ROOT / "pyproject.toml") -> list[str]:
    with open(pyproject, "rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


def deps_dir(dependencies: list[str] | None = None) -> Path:
    dependencies = project_dependencies() if dependencies is None else dependencies
    key = json.dumps({"python": HOST_PYTHON, "dependencies": sorted(dependencies)})
    return config.WHEELHOUSE_ROOT / f"deps-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def llama_wheel() -> Path | None:
    wheels = sorted(config.LLAMA_WHEEL_DIR.glob(f"llama_cpp_python-{config.LLAMA_CPP_PYTHON_VERSION}-*.whl"))
    return wheels[-1] if wheels else None


def is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def ensure() -> tuple[Path, bool]:
    """Fill the deps directory if it is missing; return it and whether it was filled now."""
    target = deps_dir()
    if is_complete(target):
        print(f"Wheelhouse {target} is complete; nothing changed.")
        return target, False
    if sys.version_info[:2] != HOST_PYTHON:
        wanted = ".".join(map(str, HOST_PYTHON))
        raise HarnessError(
            f"run the wheelhouse step with Python {wanted} (the hosts' python3), not {sys.version}"
        )
    if llama_wheel() is None:
        raise HarnessError(
            f"no llama-cpp-python {config.LLAMA_CPP_PYTHON_VERSION} wheel in {config.LLAMA_WHEEL_DIR}; "
            "build it first with `make wheelhouse`"
        )
    dependencies = project_dependencies()
    staging = target.with_name(target.name + ".tmp")
    remove_tree(staging)
    staging.mkdir(parents=True)
    print(f"Collecting wheels for {len(dependencies)} dependencies into {target} ...", flush=True)
    run(
        [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--prefer-binary",
            "--only-binary", "llama-cpp-python",
            "--find-links", config.LLAMA_WHEEL_DIR,
            "--wheel-dir", staging,
            *dependencies,
        ],
        capture=False,
    )  # fmt: skip
    # llama-cpp-python has its own directory; keep one copy of it.
    for copy in staging.glob("llama_cpp_python-*.whl"):
        copy.unlink()
    wheels = sorted(path.name for path in staging.glob("*.whl"))
    write_text(
        staging / MARKER, json.dumps({"dependencies": dependencies, "wheels": wheels}, indent=1) + "\n"
    )
    os.rename(staging, target)
    print(f"Wheelhouse ready: {len(wheels)} wheels in {target} plus {config.LLAMA_WHEEL_DIR.name}/.")
    return target, True


def host_path(directory: Path) -> str:
    """Where a wheelhouse directory appears inside the local cluster's hosts."""
    return f"{config.HOST_WHEELHOUSE}/{directory.relative_to(config.WHEELHOUSE_ROOT)}"
