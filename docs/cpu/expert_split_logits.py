"""How far --split experts moves the logits from a local load, and what re-quantizing a K-quant model's
down_exps slices to Q8_0 costs. Prints one markdown table.

    .venv/bin/python docs/cpu/expert_split_logits.py [--steps 64] [--shape tiny]

Each row runs 64 greedy steps of a synthetic model with teacher forcing (every run sees the reference run's
tokens), in processes of their own, and gives the largest |logit difference| over all steps and the whole
vocabulary, next to the largest |logit| of the reference, for scale.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="expert-logits-") as name:
        tmp = pathlib.Path(name)
        for quant in ("q8_0", "q4_0", "q4_k"):
            model = tmp / f"{args.shape}-{quant}.gguf"
            synth_model(args.shape, quant, model, seed=11)
            local, tokens = _run_apart(_config(model, tmp), PROMPT, args.steps, None, tmp / "local")
            scale = float(abs(local[numpy.isfinite(local)]).max())
            for workers in (2, 4):
                sharded = reshard.ensure_sharded(model, workers, tmp / "sharded")
                same_file, _ = _run_apart(_config(sharded, tmp), PROMPT, args.steps, tokens, tmp / "file")
                nodes = [Worker(tmp) for _ in range(workers)]
                try:
                    endpoints = [w.endpoint for w in nodes]
                    split, _ = _run_apart(
                        _config(model, tmp, endpoints, "experts"), PROMPT, args.steps, tokens, tmp / "split"
                    )
                finally:
                    for node in nodes:
                        node.stop()
                rows.append(
                    (
                        quant,
                        workers,
                        max_difference(local, split),
                        max_difference(same_file, split),
                        max_difference(local, same_file),
                        scale,
                    )
                )
    print(f"{args.shape} model, {args.steps} greedy steps, teacher-forced\n")
    print(
        "| weights | workers | split vs source, local | split vs sliced file, local | sliced file vs source, "
        "both local | max abs logit |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for quant, workers, total, execution, slicing, scale in rows:
        print(f"| {quant} | {workers} | {total:.2e} | {execution:.2e} | {slicing:.2e} | {scale:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
