"""Command line: parses arguments and hands them to the command's own module."""

from __future__ import annotations

import argparse
import sys


def _check_build(_args: argparse.Namespace) -> int:
    from inference import ggml

    ggml.check_rpc_build()
    print("llama-cpp-python has the RPC backend")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-build", help="verify llama-cpp-python was built with the RPC backend")
    check.set_defaults(func=_check_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
