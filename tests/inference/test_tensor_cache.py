"""The worker's tensor cache (--cache-dir): a short or corrupt entry is never used, and the cache is bounded.

The bench model's output matrix (17 MiB) is above ggml-rpc's 10 MiB threshold, so a worker holding it caches
it and a restarted head sends its hash instead of its bytes.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import replace
from pathlib import Path

import pytest

from inference import worker as worker_module
from inference.synth import SHAPES, synth_model
from tests.inference.conftest import Server, Worker

PROMPT = "The cache"


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory) -> Path:
    # One layer of the bench shape with 48 experts: its expert tensors (13 MB each) are over ggml-rpc's
    # 10 MiB threshold for sending a hash first, and they are what reaches the worker (the output matrix,
    # the other large tensor, stays on the head).
    path = tmp_path_factory.mktemp("models") / "bench-1layer.gguf"
    shape = replace(SHAPES["bench"], n_layer=1, n_expert=48)
    synth_model("bench-1layer-48-experts", "q8_0", path, seed=3, shape=shape)
    return path


class CachingWorker(Worker):
    """A worker with --cache-dir, optionally under a file-size limit (a stand-in for a full disk)."""

    def __init__(self, tmp: Path, cache: Path, file_size_limit: int | None = None, port: int | None = None):
        self.cache, self.limit = cache, file_size_limit
        super().__init__(tmp, port=port)

    def _popen_kwargs(self) -> dict:
        if self.limit is None:
            return {}
        limit = self.limit
        return {"preexec_fn": lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))}

    def _args(self) -> list[str]:
        return [*super()._args(), "--cache-dir", str(self.cache)]


def _greedy(server: Server) -> str:
    status, _, body = server.complete(PROMPT, max_tokens=12)
    assert status == 200, body
    return body["choices"][0]["text"]


def _serve_once(procs, tmp_path, model, worker) -> str:
    server = procs(Server, tmp_path, model, "--rpc", worker.endpoint, "--ctx", "512", "--parallel", "1")
    try:
        return _greedy(server)
    finally:
        server.stop()


def _entries(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in cache.iterdir()}


@pytest.fixture(scope="module")
def reference(bench_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    worker = Worker(tmp)
    try:
        server = Server(tmp, bench_model, "--rpc", worker.endpoint, "--ctx", "512", "--parallel", "1")
        try:
            return _greedy(server)
        finally:
            server.stop()
    finally:
        worker.stop()


def test_a_write_cut_short_by_a_full_disk_is_not_kept_and_the_text_stays_right(
    bench_model, reference, procs, tmp_path
):
    cache = tmp_path / "cache"
    worker = procs(CachingWorker, tmp_path, cache, file_size_limit=1 << 20)
    assert _serve_once(procs, tmp_path, bench_model, worker) == reference
    assert _entries(cache) == {}, "a short entry (or its temporary file) was left in the cache"
    assert "could not save" in worker.output()
    # A second head on the same worker (a reload) is not given a short entry either.
    assert _serve_once(procs, tmp_path, bench_model, worker) == reference


def test_a_corrupt_entry_is_dropped_and_replaced_and_reloads_use_the_cache(
    bench_model, reference, procs, tmp_path
):
    cache = tmp_path / "cache"
    worker = procs(CachingWorker, tmp_path, cache)
    assert _serve_once(procs, tmp_path, bench_model, worker) == reference
    saved = _entries(cache)
    assert saved and all(size > 10 << 20 for size in saved.values()), saved
    # Cut one entry short, as an older build left it after a full disk.
    name, size = next(iter(saved.items()))
    with open(cache / name, "r+b") as handle:
        handle.truncate(size // 3)
    worker.stop()
    worker = procs(CachingWorker, tmp_path, cache, port=worker.port)
    assert _serve_once(procs, tmp_path, bench_model, worker) == reference
    assert "does not match its hash; removed" in worker.output()
    assert _entries(cache) == saved, "the head re-sent the tensor and the worker saved it whole again"
    # A good entry is used: the next load sends its hash, and the worker logs no new save.
    saves = worker.output().count("saved to")
    assert _serve_once(procs, tmp_path, bench_model, worker) == reference
    assert worker.output().count("saved to") == saves


def _entry(cache: Path, index: int, size: int, age_s: int) -> Path:
    path = cache / f"{index:016x}"
    path.write_bytes(b"x" * size)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_pruning_removes_unfinished_writes_and_the_least_recently_used_entries(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    old = _entry(cache, 1, 400, age_s=3000)
    middle = _entry(cache, 2, 400, age_s=2000)
    new = _entry(cache, 3, 400, age_s=10)
    partial = cache / f"{4:016x}.partial"
    partial.write_bytes(b"half")
    unrelated = cache / "notes.txt"
    unrelated.write_text("not ours")
    result = worker_module.prune_cache(str(cache), max_bytes=900)
    assert result == worker_module.PruneResult(
        kept=2, kept_bytes=800, removed=1, removed_bytes=400, partial=1
    )
    assert not old.exists() and not partial.exists()
    assert middle.exists() and new.exists() and unrelated.exists()


@pytest.mark.parametrize(
    ("text", "size"),
    [("16G", 16 << 30), ("512M", 512 << 20), ("1048576", 1 << 20), ("1.5GiB", 3 << 29), ("2t", 2 << 40)],
)
def test_cache_sizes_parse_with_binary_units(text, size):
    assert worker_module.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "-1G", "5X"])
def test_a_bad_cache_size_names_the_option(text):
    with pytest.raises(worker_module.ConfigError, match="--cache-max-size"):
        worker_module.parse_size(text)
