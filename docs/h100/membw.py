"""Memory bandwidth of a few cores, the way a Pi-sized RPC worker sees it.

``python docs/h100/membw.py 0 0-3 0-15`` runs one group per argument: one process per CPU of the group, each
pinned to its CPU, all starting together on private 256 MiB buffers. It prints, per group, the copy rate
(bytes read plus bytes written) and the read rate (a sum over the buffer), in total and per core.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import numpy as np

BUFFER = 256 << 20
REPEATS = 8


def _cpus(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _worker(cpu: int, barrier, results) -> None:
    os.sched_setaffinity(0, {cpu})
    a = np.ones(BUFFER // 8, dtype=np.int64)
    b = np.empty_like(a)
    np.copyto(b, a)
    a.sum()
    barrier.wait()
    started = time.perf_counter()
    for _ in range(REPEATS):
        np.copyto(b, a)
    copy = time.perf_counter() - started
    barrier.wait()
    started = time.perf_counter()
    for _ in range(REPEATS):
        a.sum()
    read = time.perf_counter() - started
    results.put((2 * REPEATS * BUFFER / copy, REPEATS * BUFFER / read))


def group(cpus: list[int]) -> tuple[float, float]:
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(len(cpus)), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(c, barrier, results)) for c in cpus]
    for p in procs:
        p.start()
    rates = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(r[0] for r in rates), sum(r[1] for r in rates)


def main(argv: list[str]) -> None:
    print(
        "| CPUs | processes | copy GB/s (read+write) | copy GB/s per core | read GB/s | read GB/s per core |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    usable = os.sched_getaffinity(0)
    for spec in argv or ["0", "0-3"]:
        cpus = _cpus(spec)
        if not set(cpus) <= usable:
            print(f"| {spec} | CPUs {sorted(set(cpus) - usable)} are not usable here | | | | |")
            continue
        copy, read = group(cpus)
        n = len(cpus)
        print(
            f"| {spec} | {n} | {copy / 1e9:.1f} | {copy / 1e9 / n:.1f} | {read / 1e9:.1f} | {read / 1e9 / n:.1f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
