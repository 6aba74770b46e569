"""Command line: parses arguments and hands them to the command's own module."""

from __future__ import annotations

import argparse
import sys


def _check_build(_args: argparse.Namespace) -> int:
    from inference import ggml

    ggml.check_rpc_build()
    print("llama-cpp-python has the RPC backend")
    return 0


def _synth_model(args: argparse.Namespace) -> int:
    from inference import synth

    return synth.main_synth(args.shape, args.quant, args.out, args.seed, args.layers)


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: give e.g. --seed 0") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is out of range: give an integer from 0 to {2**32 - 1}")
    return value


def _layers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: give e.g. --layers 2") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small: give at least 1 layer")
    return value


def _add_synth_model(sub: argparse._SubParsersAction) -> None:
    from inference.synth import QUANTS, SHAPES

    p = sub.add_parser(
        "synth-model",
        help="write a qwen3moe GGUF with random weights (for tests and benchmarks)",
        description="Write a qwen3moe GGUF with random weights and a byte-level BPE vocabulary that "
        "llama.cpp loads and runs like the real model. Shapes: "
        + "; ".join(
            f"{name}: {s.n_layer} layers, hidden {s.n_embd}, {s.n_expert} experts ({s.n_expert_used} used), "
            f"vocab {s.n_vocab}"
            for name, s in SHAPES.items()
        ),
    )
    p.add_argument("--shape", required=True, choices=list(SHAPES), help="model dimensions")
    p.add_argument("--quant", required=True, choices=list(QUANTS), help="weight type of the matrices")
    p.add_argument("--out", required=True, metavar="PATH", help="GGUF file to write (replaced if present)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed of the weights (default 0)")
    p.add_argument(
        "--layers",
        type=_layers,
        default=None,
        help="write only the first N layers of the shape (to try the writer on a large shape quickly)",
    )
    p.set_defaults(func=_synth_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-build", help="verify llama-cpp-python was built with the RPC backend")
    check.set_defaults(func=_check_build)
    _add_synth_model(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
