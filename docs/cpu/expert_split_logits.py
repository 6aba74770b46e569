"""How far --split experts moves the logits from a local load, and what re-quantizing a K-quant model's
down_exps slices to Q8_0 costs. Prints one markdown table.

    .venv/bin/python docs/cpu/expert_split_logits.py [--steps 64] [--shape tiny] [--quants q8_0,q4_0,q4_k]
        [--wire auto/f32,f32/f32,auto/f16,auto/q8_0]

Each row runs 64 greedy steps of a synthetic model with teacher forcing (every run sees the reference run's
tokens), in processes of their own, and gives the largest |logit difference| over all steps and the whole
vocabulary, next to the largest |logit| of the reference, for scale. --wire runs the split once per pair of
the head's LLAMA_EXPERT_SPLIT_HIDDEN_TYPE/LLAMA_EXPERT_SPLIT_PARTIAL_TYPE (patch 0006's wire types), a row each.
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    import numpy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--quants", default="q8_0,q4_0,q4_k")
    parser.add_argument("--wire", default="auto/f32", help="comma list of HIDDEN/PARTIAL wire types")
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
                nodes = [Worker(tmp) for _ in range(workers)]
                try:
                    endpoints = [w.endpoint for w in nodes]
                    split = _config(model, tmp, endpoints, "experts")
                    for wire in args.wire.split(","):
                        hidden, _, partial = wire.partition("/")
                        os.environ["LLAMA_EXPERT_SPLIT_HIDDEN_TYPE"] = hidden
                        os.environ["LLAMA_EXPERT_SPLIT_PARTIAL_TYPE"] = partial or "f32"
                        # free-running for the greedy text, then teacher-forced for the logits
                        _, split_tokens = _run_apart(split, PROMPT, args.steps, None, tmp / "split")
                        forced, _ = _run_apart(split, PROMPT, args.steps, tokens, tmp / "split")
                        rows.append(
                            (
                                quant,
                                workers,
                                wire,
                                max_difference(local, forced),
                                max_difference(same_file, forced),
                                max_difference(local, same_file),
                                scale,
                                split_tokens == tokens,
                                split_tokens == file_tokens,
                            )
                        )
                finally:
                    os.environ.pop("LLAMA_EXPERT_SPLIT_HIDDEN_TYPE", None)
                    os.environ.pop("LLAMA_EXPERT_SPLIT_PARTIAL_TYPE", None)
                    for node in nodes:
                        node.stop()
    print(f"{args.shape} model, {args.steps} greedy steps, teacher-forced\n")
    print(
        "| weights | workers | wire: hidden/partial | split vs source, local | split vs sliced file, local | "
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
