"""Every shared library of the installed llama-cpp-python build loads on its own, in a fresh process.

A patched backend library that calls into a library it is not linked against (libggml-rpc into libggml's
backend registry, say) still works inside the engine, which loads libggml first, but fails where a host
checks the RPC build alone (tests/cluster/test_cluster.py, `ctypes.CDLL` of libggml-rpc.so)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

LIB = Path(llama_cpp.__file__).parent / "lib"


@pytest.mark.parametrize(
    "name", ["libggml-base.so", "libggml-cpu.so", "libggml-rpc.so", "libggml.so", "libllama.so"]
)
def test_each_library_loads_alone(name):
    path = LIB / name
    assert path.is_file(), f"{path} is missing from the llama-cpp-python build"
    code = f"import ctypes; ctypes.CDLL({str(path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
