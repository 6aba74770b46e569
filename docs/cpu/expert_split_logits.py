"""How far --split experts moves the logits from a local load, and what re-quantizing a K-quant model's
down_exps slices to Q8_0 costs. Prints one markdown table.

    .venv/bin/python docs/cpu/expert_split_logits.py [--steps 64] [--shape tiny] [--quants q8_0,q4_0,q4_k]
        [--wire auto/f32,f32/f32,auto/f16,auto/q8_0] [--head-env ",GGML_SCHED_NO_STAGED_REUSE=1"]

Each row runs 64 greedy steps of a synthetic model with teacher forcing (every run sees the reference run's
tokens), in processes of their own, and gives the largest |logit difference| over all steps and the whole
vocabulary, next to the largest |logit| of the reference, for scale. --wire runs the split once per pair of
the head's LLAMA_EXPERT_SPLIT_HIDDEN_TYPE/LLAMA_EXPERT_SPLIT_PARTIAL_TYPE (patch 0006's wire types), a row each,
and --head-env once per setting of the head's environment (NAME=VALUE, several joined by "+"; empty: none).

With a CUDA build of llama.cpp the head (local loads included) runs on the GPU, as `serve` does by default, and
the workers on the CPU (started without CUDA devices), as on the Pi cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from inference import reshard  # noqa: E402  (this checkout's, also when the package is not installed)
from inference.synth import synth_model  # noqa: E402
from tests.inference.conftest import Worker  # noqa: E402
from tests.inference.test_expert_split import _config, _run_apart  # noqa: E402

PROMPT = [5, 17, 300, 42, 7]


def max_difference(a, b) -> float:
    import numpy

    finite = numpy.isfinite(a)
    return float(numpy.abs(a[finite] - b[finite]).max())


@contextlib.contextmanager
def environment(settings: dict[str, str]):
    """os.environ with ``settings`` for the processes started inside."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def settings_of(text: str) -> dict[str, str]:
    """Settings from ``A=1+B=2`` ({"A": "1", "B": "2"}); none from an empty string."""
    return dict(item.split("=", 1) for item in text.split("+") if item)


def main() -> int:
    import numpy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--quants", default="q8_0,q4_0,q4_k")
    parser.add_argument("--wire", default="auto/f32", help="comma list of HIDDEN/PARTIAL wire types")
    parser.add_argument(
        "--head-env", default="", help='comma list of the head\'s extra environment, e.g. ",A=1+B=2"'
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="expert-logits-") as name:
        tmp = pathlib.Path(name)
        for quant in args.quants.split(","):
            model = tmp / f"{args.shape}-{quant}.gguf"
            synth_model(args.shape, quant, model, seed=11)
            local, tokens = _run_apart(_config(model, tmp), PROMPT, args.steps, None, tmp / "local")
            scale = float(abs(local[numpy.isfinite(local)]).max())
            for workers in (2, 4):
                sharded = reshard.ensure_sharded(model, workers, tmp / "sharded")
                same_file, _ = _run_apart(_config(sharded, tmp), PROMPT, args.steps, tokens, tmp / "file")
                _, file_tokens = _run_apart(_config(sharded, tmp), PROMPT, args.steps, None, tmp / "file")
                with environment({"CUDA_VISIBLE_DEVICES": ""}):
                    nodes = [Worker(tmp) for _ in range(workers)]
                try:
                    endpoints = [w.endpoint for w in nodes]
                    split = _config(model, tmp, endpoints, "experts")
                    for wire in args.wire.split(","):
                        hidden, _, partial = wire.partition("/")
                        for head_env in args.head_env.split(","):
                            settings = settings_of(head_env)
                            settings["LLAMA_EXPERT_SPLIT_HIDDEN_TYPE"] = hidden
                            settings["LLAMA_EXPERT_SPLIT_PARTIAL_TYPE"] = partial or "f32"
                            with environment(settings):
                                # free-running for the greedy text, then teacher-forced for the logits
                                _, split_tokens = _run_apart(split, PROMPT, args.steps, None, tmp / "split")
                                forced, _ = _run_apart(split, PROMPT, args.steps, tokens, tmp / "split")
                            rows.append(
                                (
                                    quant,
                                    workers,
                                    wire + (f" {head_env}" if head_env else ""),
                                    max_difference(local, forced),
                                    max_difference(same_file, forced),
                                    max_difference(local, same_file),
                                    scale,
                                    split_tokens == tokens,
                                    split_tokens == file_tokens,
                                )
                            )
                finally:
                    for node in nodes:
                        node.stop()
    print(f"{args.shape} model, {args.steps} greedy steps, teacher-forced\n")
    print(
        "| weights | workers | wire: hidden/partial, head environment | split vs source, local | split vs sliced file, local | "
        "sliced file vs source, both local | max abs logit | greedy text = source, local | greedy text = "
        "sliced file, local |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---|---|")
    for quant, workers, wire, total, execution, slicing, scale, same, same_file in rows:
        print(
            f"| {quant} | {workers} | {wire} | {total:.2e} | {execution:.2e} | {slicing:.2e} | {scale:.1f} | "
            f"{'yes' if same else 'no'} | {'yes' if same_file else 'no'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
