"""Command line of the inference service: parses arguments, builds the config, runs the command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

from inference import config as config_module
from inference import worker as worker_module
from inference.worker import ConfigError


def _check_build(args: argparse.Namespace) -> int:
    import llama_cpp

    from inference import ggml

    if args.expect and llama_cpp.__version__ != args.expect:
        print(
            f"error: llama-cpp-python {llama_cpp.__version__} is installed, {args.expect} was expected; "
            "run `make install` (it builds and installs the patched wheel)",
            file=sys.stderr,
        )
        return 1
    ggml.check_rpc_build()
    print(f"llama-cpp-python {llama_cpp.__version__} has the RPC backend")
    return 0


def _worker(args: argparse.Namespace) -> int:
    config = worker_module.WorkerConfig(
        host=args.host,
        port=args.port,
        threads=args.threads,
        cache_dir=args.cache_dir,
        allow_remote=args.allow_remote,
        cache_max_bytes=worker_module.parse_size(args.cache_max_size),
        metrics_port=args.metrics_port,
        repack=args.repack,
    )
    worker_module.run(config)
    return 1


def _serve(args: argparse.Namespace) -> int:
    from inference import server

    config = config_module.ServeConfig(
        model=args.model,
        rpc=tuple(config_module.parse_endpoints(args.rpc)) if args.rpc else (),
        split=args.split,
        tensor_split=tuple(config_module.parse_floats(args.tensor_split, "--tensor-split"))
        if args.tensor_split
        else (),
        ctx=args.ctx,
        parallel=args.parallel,
        experts_used=args.experts_used,
        api_key_file=args.api_key_file,
        cors_origins=tuple(args.cors_origin),
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        threads=args.threads,
        batch=args.batch,
        ubatch=args.ubatch,
        queue_size=args.queue_size,
        flash_attn=args.flash_attn,
        threadpool=args.threadpool,
        cache_prompt=args.cache_prompt,
        gpu_layers=args.gpu_layers,
        model_alias=args.alias,
        rpc_timeout=args.rpc_timeout,
        sharded_cache_dir=args.sharded_cache_dir,
        experts_partial_type=args.experts_partial_type,
        worker_probe_interval=args.worker_probe_interval,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keepalive_timeout=args.keepalive_timeout,
        max_connections=args.max_connections,
        reasoning_format=args.reasoning_format,
        degrade_target_ms_per_token=args.degrade_target_ms_per_token,
        degrade_window=args.degrade_window,
        degrade_max_tokens=args.degrade_max_tokens,
    ).validated()
    asyncio.run(server.serve(config))
    return 0


def _synth_model(args: argparse.Namespace) -> int:
    from inference import synth

    return synth.main_synth(args.shape, args.quant, args.out, args.seed, args.layers, args.jobs)


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: give e.g. --seed 0") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is out of range: give an integer from 0 to {2**32 - 1}")
    return value


def _at_least_one(flag: str, example: int, unit: str) -> Callable[[str], int]:
    """An argparse type for a whole number of ``unit`` of at least 1, whose errors name ``flag``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer: give e.g. {flag} {example}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} is too small: give at least 1 {unit}")
        return value

    return parse


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
        type=_at_least_one("--layers", 2, "layer"),
        default=None,
        help="write only the first N layers of the shape (to try the writer on a large shape quickly)",
    )
    p.add_argument(
        "--jobs",
        type=_at_least_one("--jobs", 4, "process"),
        default=1,
        help="processes making the random data (default 1); the file is the same for any number",
    )
    p.set_defaults(func=_synth_model)


def _reshard(args: argparse.Namespace) -> int:
    from inference import reshard

    return reshard.main_reshard(args.model, args.workers, args.out, args.cache_dir)


def _add_reshard(sub: argparse._SubParsersAction) -> None:
    cache_dir = config_module.DEFAULT_SHARDED_CACHE  # inference.reshard's default too

    p = sub.add_parser(
        "reshard",
        help="cut every layer's expert tensors into one slice per RPC worker (for serve --split experts)",
        description="Write a copy of a mixture-of-experts GGUF whose ffn_{gate,up,down}_exps tensors are cut "
        "along the expert FFN dimension into one slice per RPC worker (blk.N.ffn_gate_exps.shardK.weight), "
        "with <arch>.expert_shard_count set. Progress goes to stderr, the output path alone to stdout.",
    )
    p.add_argument("--model", required=True, metavar="PATH", help="the .gguf model to split")
    p.add_argument(
        "--workers", required=True, type=int, metavar="N", help="RPC workers, i.e. slices per tensor"
    )
    p.add_argument(
        "--out", metavar="PATH", help="file to write (replaced if present); default: a file in --cache-dir"
    )
    p.add_argument(
        "--cache-dir",
        default=cache_dir,
        metavar="DIR",
        help="without --out, keep the split here, named by the model's SHA-256 and N, and reuse it "
        f"(default {cache_dir})",
    )
    p.set_defaults(func=_reshard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check-build", help="verify llama-cpp-python was built with the RPC backend")
    check.add_argument("--expect", metavar="VERSION", help="fail unless llama-cpp-python is this version")
    check.set_defaults(func=_check_build)

    w = sub.add_parser("worker", help="serve this machine's ggml device over llama.cpp RPC")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    w.add_argument("--port", type=int, default=worker_module.DEFAULT_PORT)
    w.add_argument("--threads", type=int, default=0, help="compute threads (default: every usable core)")
    w.add_argument("--cache-dir", help="directory for llama.cpp's tensor cache (speeds up model reloads)")
    w.add_argument(
        "--cache-max-size",
        default="16G",
        metavar="SIZE",
        help="prune the tensor cache to this size at start, least recently used first (default 16G)",
    )
    w.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host; RPC has no authentication, so firewall the port to the head",
    )
    w.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve /health and Prometheus /metrics on this port of --host (default 0: none)",
    )
    w.add_argument(
        "--no-repack",
        dest="repack",
        action="store_false",
        help="keep weights as the head sends them instead of repacking those the CPU backend has faster "
        "matrix kernels for (llama.cpp's --no-repack; for heads that read weights back)",
    )
    w.set_defaults(func=_worker)

    s = sub.add_parser("serve", help="load a GGUF model (optionally sharded over RPC workers) and serve it")
    s.add_argument("--model", required=True, help="path of the .gguf file")
    s.add_argument("--rpc", help="RPC workers as host:port,host:port")
    s.add_argument(
        "--split",
        default="layer",
        choices=config_module.SPLIT_MODES,
        help="layer: whole layers per device, one after another; experts: attention and router on this "
        "host, every layer's experts cut into one slice per RPC worker, computed in parallel; tensor: "
        "llama.cpp's tensor parallelism; none: this host alone (default layer)",
    )
    s.add_argument(
        "--sharded-cache-dir",
        default=config_module.DEFAULT_SHARDED_CACHE,
        metavar="DIR",
        help="where --split experts keeps the resharded model, keyed by the source's digest and the worker "
        f"count (default {config_module.DEFAULT_SHARDED_CACHE})",
    )
    s.add_argument(
        "--experts-partial-type",
        default="f32",
        choices=config_module.EXPERTS_PARTIAL_TYPES,
        help="--split experts: the type each worker's sum of a layer's expert slices comes back in; f32 is "
        "exact, f16 and q8_0 send 1/2 and 17/64 of its bytes over the link and change the logits (default f32)",
    )
    s.add_argument("--tensor-split", help="relative share of the model per device, e.g. 1,1,2")
    s.add_argument("--ctx", type=int, default=32768, help="KV cache size in tokens, shared by --parallel")
    s.add_argument("--parallel", type=int, default=4, help="sequences decoded together")
    s.add_argument("--experts-used", type=int, help="override the model's number of experts used per token")
    s.add_argument("--api-key-file", help="file holding the bearer API key clients must send")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=config_module.DEFAULT_PORT)
    s.add_argument(
        "--metrics-port", type=int, help="also serve /metrics and the admin endpoints (API key) on this port"
    )
    s.add_argument("--threads", type=int, default=0, help="compute threads (default: every usable core)")
    s.add_argument("--batch", type=int, default=2048, help="most tokens in one decode step")
    s.add_argument("--ubatch", type=int, default=512, help="physical batch size")
    s.add_argument("--queue-size", type=int, default=64, help="requests that may wait for a free sequence")
    s.add_argument("--flash-attn", default="auto", choices=config_module.FLASH_ATTN_MODES)
    s.add_argument(
        "--no-threadpool",
        dest="threadpool",
        action="store_false",
        help="start ggml's CPU threads for every decode step instead of keeping a pool (for comparisons)",
    )
    s.add_argument(
        "--no-cache-prompt",
        dest="cache_prompt",
        action="store_false",
        help="compute every prompt in full: finished sequences' KV cells are not kept for a later prompt that "
        "starts the same way (by default a request reuses the longest cached prefix, as llama-server's "
        "cache_prompt)",
    )
    s.add_argument("--gpu-layers", type=int, default=999, help="layers offloaded to GPUs and RPC devices")
    s.add_argument("--alias", help="model name in the API (default: the file name without .gguf)")
    s.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let pages of this origin (https://host[:port]; repeat or comma-separate; * for any) call the "
        "API from a browser: CORS preflights are answered and replies carry Access-Control-Allow-Origin "
        "(default: none)",
    )
    s.add_argument(
        "--rpc-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="longest wait for the RPC workers per micro-batch of a decode step, or between two tensors "
        "while loading; past it the engine restarts and /health names the worker (default 60)",
    )
    s.add_argument(
        "--worker-probe-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often an idle engine checks that its RPC workers answer (default 5)",
    )
    s.add_argument(
        "--header-timeout",
        type=float,
        default=config_module.DEFAULT_HEADER_TIMEOUT,
        metavar="SECONDS",
        help="a connection must send a whole request line and headers within this time of opening (or, "
        "when kept alive, of the request's first byte), else it is closed "
        f"(default {config_module.DEFAULT_HEADER_TIMEOUT:g})",
    )
    s.add_argument(
        "--body-timeout",
        type=float,
        default=config_module.DEFAULT_BODY_TIMEOUT,
        metavar="SECONDS",
        help="a request's body must arrive within this time of its headers, else the answer is 408 and "
        f"the connection is closed (default {config_module.DEFAULT_BODY_TIMEOUT:g})",
    )
    s.add_argument(
        "--keepalive-timeout",
        type=float,
        default=config_module.DEFAULT_KEEPALIVE_TIMEOUT,
        metavar="SECONDS",
        help="close a kept-alive connection that sends no new request within this time of the last "
        f"response (default {config_module.DEFAULT_KEEPALIVE_TIMEOUT:g})",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=config_module.DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="open connections served at once; a further one gets 503 with Retry-After and is closed "
        f"(default {config_module.DEFAULT_MAX_CONNECTIONS})",
    )
    s.add_argument(
        "--reasoning-format",
        default="auto",
        choices=config_module.REASONING_FORMATS,
        help="where a chat reply's <think> block goes: auto or deepseek move it to message.reasoning_content "
        "(delta.reasoning_content when streamed), none leaves it in the content; a request's "
        "reasoning_format overrides it (default auto)",
    )
    s.add_argument(
        "--degrade-target-ms-per-token",
        type=float,
        default=0.0,
        metavar="MS",
        help="step down when the mean time per output token over --degrade-window exceeds MS: first cap "
        "max_tokens (--degrade-max-tokens), then reload with 3/4 and 1/2 of the experts per token; step back "
        "up below 0.7 x MS (default 0: off; 80 is the Pi-cluster guide's alert)",
    )
    s.add_argument(
        "--degrade-window",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a degradation level is measured before the next step (default 60)",
    )
    s.add_argument(
        "--degrade-max-tokens",
        type=int,
        default=256,
        metavar="N",
        help="max_tokens cap of new requests from degradation level 1 on (default 256)",
    )
    s.set_defaults(func=_serve)

    _add_synth_model(sub)
    _add_reshard(sub)
    sub.add_parser(
        "bench", help="compare throughput with llama-server and llama-cpp-python's server (--help)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from inference import demo

        return demo.run()
    if argv[:1] == ["bench"]:
        from inference import bench

        return bench.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog} {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
