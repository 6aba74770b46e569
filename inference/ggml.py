"""The parts of ggml's backend registry that llama-cpp-python does not bind.

llama-cpp-python's wheel ships ``libggml.so``, ``libggml.so.0`` and ``libggml.so.0.x.y`` as separate files.
``libllama`` links ``libggml.so.0`` by soname, so that is the copy whose backend registry the model loader
reads; loading any other copy creates a second, invisible registry. Everything here goes through the
libraries libllama itself loaded.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
from dataclasses import dataclass

import llama_cpp

RPC_BACKEND_NAME = "RPC"
# ggml_backend_dev_type
DEVICE_TYPE_NAMES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


class GgmlError(RuntimeError):
    """The ggml build or one of its backends cannot do what was asked."""


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str
    memory_free: int
    memory_total: int


def library_dir() -> pathlib.Path:
    """Where libllama was loaded from: llama-cpp-python honours LLAMA_CPP_LIB_PATH (a llama.cpp build of
    one's own, e.g. with CUDA), else its bundled lib/."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    return pathlib.Path(override) if override else pathlib.Path(llama_cpp.__file__).parent / "lib"


def _load(soname: str) -> ctypes.CDLL:
    path = library_dir() / soname
    if not path.exists():
        raise GgmlError(f"{path} not found: is llama-cpp-python installed from a wheel that ships {soname}?")
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


@functools.cache
def libggml() -> ctypes.CDLL:
    lib = _load("libggml.so.0")
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    signatures = {
        "ggml_backend_reg_by_name": ([cp], vp),
        "ggml_backend_reg_get_proc_address": ([vp, cp], vp),
        "ggml_backend_register": ([vp], None),
        "ggml_backend_reg_count": ([], sz),
        "ggml_backend_reg_get": ([sz], vp),
        "ggml_backend_dev_count": ([], sz),
        "ggml_backend_dev_get": ([sz], vp),
        "ggml_backend_dev_by_type": ([ctypes.c_int], vp),
        "ggml_backend_load_all": ([], None),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@functools.cache
def libggml_base() -> ctypes.CDLL:
    lib = _load("libggml-base.so.0")
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    signatures = {
        "ggml_backend_reg_name": ([vp], cp),
        "ggml_backend_reg_dev_count": ([vp], ctypes.c_size_t),
        "ggml_backend_reg_dev_get": ([vp, ctypes.c_size_t], vp),
        "ggml_backend_dev_name": ([vp], cp),
        "ggml_backend_dev_description": ([vp], cp),
        "ggml_backend_dev_type": ([vp], ctypes.c_int),
        "ggml_backend_dev_backend_reg": ([vp], vp),
        "ggml_backend_dev_buffer_type": ([vp], vp),
        "ggml_threadpool_params_init": ([vp, ctypes.c_int], None),
        "ggml_backend_dev_memory": (
            [vp, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
            None,
        ),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


class ThreadpoolParams(ctypes.Structure):
    """struct ggml_threadpool_params (ggml.h)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),  # GGML_MAX_N_THREADS
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


# llama.cpp's tools default: threads busy-wait a little for the next graph before they sleep.
THREADPOOL_POLL = 50


def attach_threadpool(ctx: int, n_threads: int, poll: int = THREADPOOL_POLL) -> int:
    """Give the context a CPU threadpool that lives as long as the process, as llama.cpp's own tools do.

    Without one, ggml makes a throwaway pool for every graph, i.e. for every decoded token (and, in a build
    without OpenMP, starts and joins its threads each time); a persistent pool keeps them, polling briefly and
    then asleep, between tokens. Returns the pool's handle.
    """
    lib, base = libggml(), libggml_base()
    cpu = lib.ggml_backend_dev_by_type(0)
    if not cpu:
        raise GgmlError("ggml has no CPU backend")
    reg = base.ggml_backend_dev_backend_reg(cpu)
    new_address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new")
    if not new_address:
        raise GgmlError("the CPU backend does not export ggml_threadpool_new")
    threadpool_new = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(ThreadpoolParams))(new_address)
    params = ThreadpoolParams()
    base.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
    params.poll = poll
    pool = threadpool_new(ctypes.byref(params))
    if not pool:
        raise GgmlError(f"ggml could not start a threadpool of {n_threads} threads")
    attach = llama_cpp.llama_cpp._lib.llama_attach_threadpool
    attach.argtypes, attach.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], None
    attach(ctx, pool, None)
    return pool


def _rpc_reg() -> int:
    reg = libggml().ggml_backend_reg_by_name(RPC_BACKEND_NAME.encode())
    if not reg:
        raise GgmlError(
            "llama-cpp-python was built without the RPC backend; "
            'rebuild it with CMAKE_ARGS="-DGGML_RPC=on" (make wheelhouse does this)'
        )
    return reg


def _rpc_proc(name: str, restype, argtypes):
    address = libggml().ggml_backend_reg_get_proc_address(_rpc_reg(), name.encode())
    if not address:
        raise GgmlError(f"the RPC backend does not export {name}; is this llama-cpp-python 0.3.36 or later?")
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def check_rpc_build() -> None:
    """Raise GgmlError unless the installed llama.cpp can both serve and use RPC devices."""
    _rpc_proc("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
    _rpc_proc(
        "ggml_backend_rpc_start_server",
        None,
        [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p],
    )


def describe(dev: int) -> Device:
    base = libggml_base()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return Device(
        name=base.ggml_backend_dev_name(dev).decode(),
        description=(base.ggml_backend_dev_description(dev) or b"").decode(),
        kind=DEVICE_TYPE_NAMES.get(base.ggml_backend_dev_type(dev), "unknown"),
        memory_free=free.value,
        memory_total=total.value,
    )


def device_handles() -> list[int]:
    """Handles of every device in the registry that llama.cpp's model loader sees, in order."""
    lib = libggml()
    return [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]


def devices() -> list[Device]:
    """Every device in the registry that llama.cpp's model loader sees, in order."""
    return [describe(handle) for handle in device_handles()]


def cpu_device() -> int:
    """The handle of this machine's CPU device."""
    handle = libggml().ggml_backend_dev_by_type(0)
    if not handle:
        raise GgmlError("this llama.cpp build has no CPU device")
    return handle


def add_rpc_server(endpoint: str) -> list[Device]:
    """Register the devices of the RPC server at ``host:port`` for the model loader.

    Connects to the server: raises GgmlError when it does not answer or speaks another protocol version.
    """
    return [describe(handle) for handle in add_rpc_server_handles(endpoint)]


def add_rpc_server_handles(endpoint: str) -> list[int]:
    """As add_rpc_server, returning the devices' handles (for describe() and device_memory())."""
    add_server = _rpc_proc("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
    reg = add_server(endpoint.encode())
    if not reg:
        raise GgmlError(f"RPC server {endpoint} did not answer or speaks another RPC protocol version")
    base = libggml_base()
    count = base.ggml_backend_reg_dev_count(reg)
    if count == 0:
        raise GgmlError(f"RPC server {endpoint} offers no device")
    libggml().ggml_backend_register(reg)
    return [base.ggml_backend_reg_dev_get(reg, i) for i in range(count)]


def buffer_type(dev: int) -> int:
    """The device's default buffer type (``ggml_backend_buffer_type_t``), e.g. for tensor_buft_overrides."""
    buft = libggml_base().ggml_backend_dev_buffer_type(dev)
    if not buft:
        raise GgmlError(f"device {describe(dev).name} has no buffer type")
    return buft


def device_memory(dev: int) -> tuple[int, int]:
    """(free, total) bytes of a device. For an RPC device this is one round trip to its server over the
    connection the model uses (RPC_CMD_GET_DEVICE_MEMORY), so it doubles as a heartbeat."""
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    libggml_base().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def local_devices() -> list[int]:
    """Handles of the devices of this machine (CPU first, then any GPU), for serving them over RPC."""
    lib = libggml()
    lib.ggml_backend_load_all()
    base = libggml_base()
    handles = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    local = [h for h in handles if base.ggml_backend_dev_type(h) in (0, 1, 2, 3)]
    gpus = [h for h in local if base.ggml_backend_dev_type(h) != 0]
    # Serve the accelerators when there are any, else the CPU, as llama.cpp's rpc-server does.
    return gpus or [h for h in local if base.ggml_backend_dev_type(h) == 0]


def start_rpc_server(endpoint: str, cache_dir: str | None, threads: int, device_handles: list[int]) -> None:
    """Serve the given devices at ``endpoint``. Blocks for the life of the server."""
    start = _rpc_proc(
        "ggml_backend_rpc_start_server",
        None,
        [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p],
    )
    array = (ctypes.c_void_p * len(device_handles))(*device_handles)
    start(
        endpoint.encode(),
        cache_dir.encode() if cache_dir else None,
        threads,
        len(device_handles),
        ctypes.cast(array, ctypes.c_void_p),
    )
