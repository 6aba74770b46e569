"""Build the llama-cpp-python wheel every host runs: the PyPI sdist, our llama.cpp patch series, the RPC backend.

    python inference/patches/build_wheel.py --version 0.3.36+llmfleet.8 --out DIR [--cmake-args="-DGGML_RPC=on"]

Downloads the sdist of the public version (``0.3.36``) with pip, applies the patches listed in
``llama.cpp/series`` beside this file in order (``patch -p1`` from the sdist's root; each patch's header says
what it changes and why), writes the full version with its local label into ``llama_cpp/__init__.py`` so the
wheel, ``pip list`` and ``llama_cpp.__version__`` all name the patched build, and builds the wheel into DIR.
Only the standard library: it runs before anything is installed. Exit status non-zero on any failure.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

PATCHES = pathlib.Path(__file__).resolve().parent / "llama.cpp"
VERSION_FILE = "llama_cpp/__init__.py"


def series(directory: pathlib.Path = PATCHES) -> list[pathlib.Path]:
    """The patches in the order of ``series`` (blank lines and ``#`` comments skipped)."""
    names = []
    for line in (directory / "series").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line)
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise SystemExit(f"series names patches that are not in {directory}: {', '.join(missing)}")
    return [directory / name for name in names]


def label(version: str) -> tuple[str, str]:
    """``0.3.36+llmfleet.8`` -> (``0.3.36``, ``llmfleet.8``)."""
    public, _, local = version.partition("+")
    if not re.fullmatch(r"\d+(\.\d+)*", public) or not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9]+)*", local):
        raise SystemExit(
            f"--version {version!r} must look like 0.3.36+llmfleet.8 (a public version, a label)"
        )
    return public, local


def set_version(source: pathlib.Path, version: str) -> None:
    path = source / VERSION_FILE
    text = path.read_text()
    new, count = re.subn(r'^__version__ = "[^"]*"', f'__version__ = "{version}"', text, flags=re.M)
    if count != 1:
        raise SystemExit(f"{path} has no single __version__ line to mark with {version}")
    path.write_text(new)


def build(version: str, out: pathlib.Path, cmake_args: str) -> pathlib.Path:
    public, _ = label(version)
    patches = series()
    with tempfile.TemporaryDirectory(prefix="llama-cpp-python-build-") as tmp:
        work = pathlib.Path(tmp)
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"),
                *("--dest", str(work), f"llama-cpp-python=={public}"),
            ],
            check=True,
        )
        archive = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        source = work / f"llama_cpp_python-{public}"
        for patch in patches:
            print(f"Applying {patch.name}", flush=True)
            subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)], cwd=source, check=True)
        set_version(source, version)
        env = dict(os.environ, CMAKE_ARGS=cmake_args)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        staging = work / "wheels"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-cache-dir",
                "-w",
                str(staging),
                str(source),
            ],
            check=True,
            env=env,
        )
        wheel = next(staging.glob("llama_cpp_python-*.whl"))
        out.mkdir(parents=True, exist_ok=True)
        target = out / wheel.name
        shutil.move(str(wheel), target)
    return target


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--version", required=True, help="full version with its local label, e.g. 0.3.36+llmfleet.8"
    )
    parser.add_argument("--out", required=True, type=pathlib.Path, help="directory to put the wheel in")
    parser.add_argument(
        "--cmake-args",
        default="-DGGML_RPC=on",
        help="CMAKE_ARGS of the build; it starts with a dash, so give it as --cmake-args=VALUE",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    print(f"Built {build(args.version, args.out, args.cmake_args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
