"""The benchmark's own parts: prompts of an exact token count, per-stream rates, worker placement."""

from __future__ import annotations

import itertools
import json

import pytest

from inference import bench
from inference.tokenizer import Tokenizer


def _words(text: str) -> list[int]:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return [hash(w) % 1000 for w in text.split()]


@pytest.mark.parametrize("n", [1, 2, 5, 63, 512])
def test_prompt_of_tokens_has_exactly_n_tokens(n):
    assert len(bench.prompt_of_tokens(_words, n, seed=3)) == n


def test_prompts_of_different_seeds_differ_from_the_start_and_repeat_for_the_same_seed():
    first = bench.prompt_of_tokens(_words, 64, seed=1)
    assert first == bench.prompt_of_tokens(_words, 64, seed=1)
    assert first[0] != bench.prompt_of_tokens(_words, 64, seed=2)[0]


def test_prompt_of_tokens_refuses_an_empty_prompt():
    with pytest.raises(ValueError, match="at least one token"):
        bench.prompt_of_tokens(_words, 0, seed=1)


def test_prompt_of_tokens_with_the_model_tokenizer_round_trips_to_n_tokens(tiny_model):
    tokenizer = Tokenizer(str(tiny_model))

    def tokenize(text: str) -> list[int]:
        return tokenizer.tokenize(text, add_special=False)

    for n in (7, 512):
        tokens = bench.prompt_of_tokens(tokenize, n, seed=n)
        assert len(tokens) == n
        # A prefix of a tokenization is the text it decodes to, up to the cut.
        assert tokenize(tokenizer.detokenize(tokens))[: n - 1] == tokens[: n - 1]


def test_stream_decode_rate_counts_tokens_after_the_first():
    assert bench.Stream(tokens=11, ttft=0.5, last=1.5).decode_rate == pytest.approx(10.0)
    assert bench.Stream(tokens=1, ttft=0.5, last=0.5).decode_rate is None


def test_worker_cpu_sets_parse_one_list_per_worker():
    assert bench.parse_cpu_sets("0-3:4-7,9", 2) == ["0-3", "4-7,9"]
    assert bench.parse_cpu_sets(None, 3) == [None, None, None]
    with pytest.raises(ValueError, match="needs 4"):
        bench.parse_cpu_sets("0-3:4-7", 4)
    assert bench.cpu_numbers("0-2,5") == {0, 1, 2, 5}
    with pytest.raises(ValueError, match="'0-x'"):
        bench.cpu_numbers("0-x")
    with pytest.raises(ValueError, match="'5-2' going down"):
        bench.cpu_numbers("0,5-2")
    with pytest.raises(ValueError, match="--rpc-worker-cpus: CPU list '4-y'"):
        bench.parse_cpu_sets("0-3:4-y", 2)


def test_relays_on_the_workers_cpus_need_the_workers_cpu_lists(capsys):
    argv = ["--skip-llama-cpp-python", "--skip-local", "--rpc-splits", "experts", "--rpc-workers", "2"]
    assert (
        bench.parse_args([*argv, "--rpc-worker-cpus", "0:1", "--relay-cpus", "worker"]).relay_cpus == "worker"
    )
    assert bench.parse_args(argv).relay_cpus == "bench"
    with pytest.raises(SystemExit):
        bench.parse_args([*argv, "--relay-cpus", "worker"])
    assert "give --rpc-worker-cpus too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args([*argv, "--rpc-worker-cpus", "0:a"])
    assert "--rpc-worker-cpus: CPU list 'a'" in capsys.readouterr().err


def test_pinned_workers_start_under_taskset():
    cmd = bench.worker_command(5000, 4, "4-7")
    assert cmd[:3] == ["taskset", "-c", "4-7"]
    assert cmd[-4:] == ["--port", "5000", "--threads", "4"]
    assert bench.worker_command(5000, 1, None)[0] != "taskset"


def test_the_expert_split_s_wire_variants_set_the_head_s_environment(tmp_path):
    # Patch 0006's wire types are read by the head, so a variant is the same split with one more variable.
    argv = ["--model", "m.gguf", "--skip-llama-cpp-python", "--skip-local", "--rpc-head-device", "cpu"]
    args = bench.parse_args([*argv, "--rpc-splits", "experts,experts/hidden-f32,experts/partial-f16"])
    made = [make() for _name, make in bench.targets(args, tmp_path / "m.gguf")]
    assert [t.env for t in made] == [
        {"CUDA_VISIBLE_DEVICES": ""},
        {"CUDA_VISIBLE_DEVICES": "", "LLAMA_EXPERT_SPLIT_HIDDEN_TYPE": "f32"},
        {"CUDA_VISIBLE_DEVICES": "", "LLAMA_EXPERT_SPLIT_PARTIAL_TYPE": "f16"},
    ]
    assert all(t.command[-2:] == ["--split", "experts"] for t in made)
    with pytest.raises(SystemExit):
        bench.parse_args([*argv, "--rpc-splits", "experts/partial-f8"])
    # Patch 0007's switch back to the blocking input copies, for any split.
    args = bench.parse_args([*argv, "--rpc-splits", "layer/sync-inputs"])
    (made,) = [make() for _name, make in bench.targets(args, tmp_path / "m.gguf")]
    assert made.env == {"CUDA_VISIBLE_DEVICES": "", "GGML_SCHED_RPC_SYNC_INPUTS": "1"}
    assert made.command[-2:] == ["--split", "layer"]


def test_bench_against_this_service_with_exact_prompts(tiny_model, tmp_path, monkeypatch, capsys):
    """End to end on the CPU: two RPC workers behind counting relays, 40-token prompts checked by usage."""
    monkeypatch.setattr(bench, "CACHE", tmp_path)
    out = tmp_path / "results.json"
    argv = ["--model", str(tiny_model), "--skip-llama-cpp-python", "--threads", "1", "--ctx", "1024"]
    argv += ["--parallel", "2", "--clients", "1,2", "--requests", "1", "--max-tokens", "6"]
    argv += ["--prompt-tokens", "40", "--rpc-splits", "layer", "--link-after-load", "--link-delay-ms", "1"]
    argv += ["--json", str(out)]
    assert bench.run(argv) == 0
    results = json.loads(out.read_text())
    assert [(r["target"], r["clients"]) for r in results] == [
        ("llmfleet", 1),
        ("llmfleet", 2),
        ("llmfleet rpc x2 layer", 1),
        ("llmfleet rpc x2 layer", 2),
    ]
    for r in results:
        assert r["prompt_tokens"] == 40
        assert r["tokens"] == 6 * r["clients"]
        assert r["decode_rate"] > 0
    rpc = [r for r in results if "rpc" in r["target"]]
    assert all(r["rpc_bytes_per_token"] > 0 and r["rpc_round_trips_per_token"] >= 1 for r in rpc)
    assert "40-token prompts" in capsys.readouterr().out


def test_no_measured_prompt_repeats_or_starts_like_the_warm_up():
    prompts = [bench.default_prompt(k) for k in range(4 * len(bench.PROMPTS))]
    assert len(set(prompts)) == len(prompts)
    first_words = {p.split()[0] for p in prompts}
    assert bench.WARM_UP_PROMPT.split()[0] not in first_words


def test_paired_ratios_compare_servers_within_each_round():
    def result(target, rnd, rate, clients=1):
        return bench.Result(
            target=target, clients=clients, tokens=int(rate * 10), seconds=10.0, ttft=0.1, round=rnd
        )

    results = [
        result("llama-server", 0, 100),
        result("llmfleet", 0, 90),
        result("llama-server", 1, 200),  # a fast round for both: the ratio of medians would blur it
        result("llmfleet", 1, 190),
        result("llmfleet", 2, 500),  # no reference in this round: not paired
        result("llmfleet", 0, 40, clients=4),
    ]
    ratios = bench.paired_ratios(results)
    assert ratios[("llmfleet", 1)] == pytest.approx([0.9, 0.95])
    assert ratios[("llama-server", 1)] == pytest.approx([1.0, 1.0])
    assert ("llmfleet", 4) not in ratios


def test_a_multi_turn_conversation_re_sends_every_earlier_turn_whole():
    from inference.bench import conversation

    def tokenize(text: str) -> list[int]:
        return [len(word) for word in text.split()]

    prompts = conversation(tokenize, 4, 30, seed=1)
    assert [len(p) for p in prompts] == [30, 60, 90, 120]
    assert all(b[: len(a)] == a for a, b in itertools.pairwise(prompts))
    assert conversation(tokenize, 2, 30, seed=2)[0] != prompts[0]
