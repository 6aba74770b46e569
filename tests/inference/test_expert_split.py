"""Expert split (--split experts): attention and router on the head, every layer's experts cut into one slice per
RPC worker. Its logits must equal a local load's up to float summation order, and the service must serve it."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from inference import reshard
from inference.config import ServeConfig
from inference.engine import Engine, SamplingParams
from inference.netsim import Relay
from inference.synth import SHAPES, synth_model
from tests.ansiblerun import REPO
from tests.inference.conftest import Server, Worker

MAX_LOGIT_DIFFERENCE = 1e-3
STEPS = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert-split")
    paths = {}
    for quant in ("q8_0", "q4_k"):
        paths[quant] = root / f"tiny-{quant}.gguf"
        synth_model("tiny", quant, paths[quant], seed=11)
    return paths


def logits_of_greedy_run(config: ServeConfig, prompt: list[int], steps: int, forced: list[int] | None):
    """Greedy decode ``steps`` tokens (or replay ``forced`` ones: teacher forcing, so both runs see the same
    context) and return each step's full logits row and the tokens. Run in a process of its own: ggml keeps
    every RPC server ever registered in its registry, so one process cannot load over two sets of workers."""
    import numpy

    engine = Engine(config)
    rows, tokens = [], []
    try:
        params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
        assert engine.submit(1, prompt, params) is None
        seq = engine.sequences[1]
        while len(tokens) < steps:
            results = engine.step()
            if not results:
                continue
            logits = engine.llama_cpp.llama_get_logits_ith(engine.ctx, -1)
            rows.append(numpy.ctypeslib.as_array(logits, shape=(engine.n_vocab,)).copy())
            token = results[0][1] if forced is None else forced[len(tokens)]
            seq.pending[-1] = token
            tokens.append(token)
    finally:
        engine.close()
    return numpy.array(rows), tokens


def head_gpu_stand_in(endpoint: str) -> None:
    """Make the head take the RPC worker at ``endpoint`` for its GPU: the dense part of an expert split then
    sits on a device outside host memory that fetches asynchronously, as a GPU does, so the scheduler's path
    for a GPU head's inputs runs on a machine without one."""
    from inference import ggml

    handles = ggml.add_rpc_server_handles(endpoint)
    Engine._local_gpus = lambda self: list(handles)


def _run_apart(config: ServeConfig, prompt, steps, forced, out: Path, env=None, gpu_stand_in=None):
    """logits_of_greedy_run in a process of its own, with ``env`` (None: this one's) and, if given, the RPC
    worker ``gpu_stand_in`` as the head's GPU."""
    import numpy

    code = (
        # llama.cpp's libraries before numpy's, as in Engine: on the GPU machines numpy imported first (2.5,
        # built by GCC 14) made the model loader of llama.cpp (built by GCC 13) crash
        "import llama_cpp, json, pickle, sys, numpy\n"
        "from tests.inference.test_expert_split import head_gpu_stand_in, logits_of_greedy_run\n"
        "config, prompt, steps, forced, out, gpu = pickle.loads(bytes.fromhex(sys.argv[1]))\n"
        "if gpu:\n"
        "    head_gpu_stand_in(gpu)\n"
        "rows, tokens = logits_of_greedy_run(config, prompt, steps, forced)\n"
        "numpy.save(out + '.npy', rows)\n"
        "open(out + '.json', 'w').write(json.dumps(tokens))\n"
    )
    argument = pickle.dumps((config, prompt, steps, forced, str(out), gpu_stand_in)).hex()
    result = subprocess.run(
        [sys.executable, "-c", code, argument], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return numpy.load(f"{out}.npy"), json.loads(Path(f"{out}.json").read_text())


def _config(model, tmp_path, rpc=(), split="layer") -> ServeConfig:
    return ServeConfig(
        model=str(model),
        rpc=tuple(rpc),
        split=split,
        ctx=512,
        parallel=1,
        threads=1,
        flash_attn="off",
        sharded_cache_dir=str(tmp_path / "sharded"),
    ).validated()


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("quant", ["q8_0", "q4_k"])
def test_expert_split_logits_equal_a_local_load(models, quant, workers, tmp_path, procs):
    import numpy

    prompt = [5, 17, 300, 42, 7]
    # A K-quant's down_exps slices are not whole blocks, so the reshard writes them as Q8_0: compare with a
    # local load of that same file, so that only the split's execution is under test (the requantization's
    # own effect is measured in docs/benchmarks.md). Q8_0 slices are byte copies: compare with the source.
    reference = models[quant]
    if quant == "q4_k":
        reference = reshard.ensure_sharded(models[quant], workers, tmp_path / "sharded")
    local = _config(reference, tmp_path)
    expected, tokens = _run_apart(local, prompt, STEPS, None, tmp_path / "local")
    nodes = [procs(Worker, tmp_path) for _ in range(workers)]
    split = _config(models[quant], tmp_path, [w.endpoint for w in nodes], "experts")
    got, _ = _run_apart(split, prompt, STEPS, tokens, tmp_path / "split")
    # ignore_eos sets the end-of-generation logits to -inf in both runs; compare the rest.
    finite = numpy.isfinite(expected)
    assert (numpy.isfinite(got) == finite).all()
    difference = float(numpy.abs(got[finite] - expected[finite]).max())
    assert difference < MAX_LOGIT_DIFFERENCE, f"max |delta logit| {difference} over {STEPS} tokens"
    # Every worker computed its slice: each holds a share of the experts' weights.
    for worker in nodes:
        assert "Accepted client connection" in worker.output()


def test_the_service_serves_the_expert_split_with_the_local_greedy_text(models, tmp_path, procs):
    workers = [procs(Worker, tmp_path) for _ in range(2)]
    rpc = ",".join(w.endpoint for w in workers)
    common = ("--ctx", "1024", "--parallel", "2", "--sharded-cache-dir", str(tmp_path / "sharded"))
    # The reference runs the same slices on this CPU: each worker sums its slice before the head adds the
    # slices, an order another CPU's kernels may round differently from the whole, unsliced experts.
    sliced = reshard.ensure_sharded(models["q8_0"], len(workers), tmp_path / "sharded")
    local = procs(Server, tmp_path, sliced, *common)
    status, _, reference = local.complete("Experts everywhere", max_tokens=24)
    assert status == 200
    local.stop()
    server = procs(Server, tmp_path, models["q8_0"], "--rpc", rpc, "--split", "experts", *common)
    health = server.health()
    assert health["status"] == "ok" and len(health["engine"]["rpc_devices"]) == 2
    status, _, body = server.complete("Experts everywhere", max_tokens=24)
    assert status == 200, body
    assert body["choices"][0]["text"] == reference["choices"][0]["text"]
    # The resharded model is cached by the source's digest and the worker count.
    assert len(list((tmp_path / "sharded").glob("*.gguf"))) == 1


def test_a_gpu_heads_workers_share_each_fetch_of_their_inputs(models, tmp_path, procs):
    # With a GPU head every worker's slice reads the same three tensors from the GPU each layer (the hidden
    # state, the expert choice and weights). Patch 0008 fetches each once a layer for all the workers, not
    # once a worker; GGML_SCHED_NO_STAGED_REUSE=1 fetches them per worker as before, so the two runs must give
    # the same logits, bit for bit, and the head's device must send about a quarter of those bytes. An RPC
    # worker stands in for the GPU (this machine has none), behind a relay that counts what it sends.
    import numpy

    prompt = [5, 17, 300, 42, 7]
    nodes = [procs(Worker, tmp_path) for _ in range(4)]
    gpu = procs(Worker, tmp_path)
    relay = Relay(("127.0.0.1", gpu.port)).start()
    try:
        split = _config(models["q8_0"], tmp_path, [w.endpoint for w in nodes], "experts")
        sent, round_trips, logits = {}, {}, {}
        for name, env in (("per worker", {"GGML_SCHED_NO_STAGED_REUSE": "1"}), ("shared", {})):
            before = relay.stats.snapshot()
            logits[name], _ = _run_apart(
                split,
                prompt,
                STEPS,
                None,
                tmp_path / name.replace(" ", "-"),
                dict(os.environ, **env),
                relay.endpoint,
            )
            after = relay.stats.snapshot()
            sent[name] = after["to_head"] - before["to_head"]
            round_trips[name] = after["round_trips"] - before["round_trips"]
    finally:
        relay.stop()
    # The same computation: the same floats.
    assert numpy.array_equal(logits["shared"], logits["per worker"])
    # The per-worker run sends each layer's three inputs four times; the shared run once. The rest of what
    # the stand-in sends (the logits, the load's replies) is the same in both runs.
    assert sent["shared"] < 0.8 * sent["per worker"], sent
    # ... in one round trip a layer instead of four.
    assert round_trips["shared"] < 0.5 * round_trips["per worker"], round_trips


def test_expert_split_needs_rpc_workers(models):
    from inference.worker import ConfigError

    with pytest.raises(ConfigError, match="--split experts"):
        ServeConfig(model=str(models["q8_0"]), split="experts").validated()


def test_the_expert_split_of_qwen3s_depth_fits_llama_cpps_graph(tmp_path, procs):
    # Qwen3-30B-A3B's 48 layers and 8 experts per token at the smallest widths, cut four ways: four MoE
    # blocks per layer make a graph of about 7,000 nodes, more than llama.cpp sizes its graph for from the
    # tensor count alone.
    deep = replace(
        SHAPES["tiny"], n_layer=48, n_embd=128, n_head=2, n_head_kv=1, n_expert=16, n_expert_used=8,
        n_ff_exp=128, n_ff=256,
    )  # fmt: skip
    model = tmp_path / "tiny-deep.gguf"
    synth_model("tiny-deep", "q8_0", model, seed=3, shape=deep)
    workers = [procs(Worker, tmp_path) for _ in range(4)]
    rpc = ",".join(w.endpoint for w in workers)
    common = ("--ctx", "1024", "--parallel", "4", "--sharded-cache-dir", str(tmp_path / "sharded"))
    # The reference runs the same slices on this CPU, so the text is the same whatever the CPU's kernels do
    # to summation order (48 random layers amplify any difference from the whole, unsliced experts).
    sliced = reshard.ensure_sharded(model, len(workers), tmp_path / "sharded")
    local = procs(Server, tmp_path, sliced, *common)
    status, _, reference = local.complete("Forty-eight layers", max_tokens=8)
    assert status == 200
    local.stop()
    server = procs(Server, tmp_path, model, "--rpc", rpc, "--split", "experts", *common)
    assert server.health()["status"] == "ok", server.output()
    status, _, body = server.complete("Forty-eight layers", max_tokens=8)
    assert status == 200, body
    assert body["choices"][0]["text"] == reference["choices"][0]["text"]


def cpu_has_q4_0_repack() -> bool:
    """Whether ggml-cpu has interleaved Q4_0 kernels for this CPU, from its system info: built with REPACK,
    and AVX2, or NEON with dot products or int8 matrix multiply (ggml_repack_get_optimal_repack_type in
    ggml-cpu/repack.cpp; Q4_0 rows come in multiples of 4 and 8 here)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()

    def has(feature: str) -> bool:
        return f"{feature} = 1" in info

    return has("REPACK") and (has("AVX2") or (has("NEON") and (has("DOTPROD") or has("MATMUL_INT8"))))


@pytest.mark.parametrize(("split", "repack"), [("experts", True), ("experts", False), ("layer", True)])
def test_workers_repack_the_weights_the_cpu_has_interleaved_kernels_for(split, repack, tmp_path, procs):
    """A local load repacks Q4_0 weights for this CPU's interleaved matrix kernels (AVX2 here, NEON dot
    products on a Pi); the workers do the same (patch 0005) unless started with --no-repack, in both split
    modes, and either way compute what a local load of the same weights computes."""
    import numpy

    source = tmp_path / "tiny-q4_0.gguf"
    synth_model("tiny", "q4_0", source, seed=11)
    prompt = [5, 17, 300, 42, 7]
    reference = reshard.ensure_sharded(source, 2, tmp_path / "sharded") if split == "experts" else source
    expected, tokens = _run_apart(_config(reference, tmp_path), prompt, 16, None, tmp_path / "local")

    class NoRepackWorker(Worker):
        def _args(self):
            return [*super()._args(), "--no-repack"]

    nodes = [procs(Worker if repack else NoRepackWorker, tmp_path) for _ in range(2)]
    config = _config(source, tmp_path, [w.endpoint for w in nodes], split)
    got, _ = _run_apart(config, prompt, 16, tokens, tmp_path / "split")
    finite = numpy.isfinite(expected)
    difference = float(numpy.abs(got[finite] - expected[finite]).max())
    assert difference < MAX_LOGIT_DIFFERENCE, f"max |delta logit| {difference} over 16 tokens"
    for worker in nodes:
        output = worker.output()
        assert ("repacked for the CPU kernels" if repack else "as sent (--no-repack)") in output
        repacked = [
            line for line in output.splitlines() if "repacked for the CPU backend's matrix kernels" in line
        ]
        if not repack or not cpu_has_q4_0_repack():
            # Off, or a CPU without interleaved Q4_0 kernels (a local load keeps them as they are too).
            assert not repacked, repacked
        elif split == "experts":
            # 3 expert slices a layer (gate, up, down), every one Q4_0, over the tiny model's 4 layers.
            assert repacked and repacked[-1].split("] ")[1].startswith("12 weights"), output[-2000:]
        else:
            # The worker's layers: their attention and expert matrices (the norms are F32).
            assert repacked, output[-2000:]
