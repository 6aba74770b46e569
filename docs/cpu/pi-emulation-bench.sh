#!/usr/bin/env bash
# Layer split against expert split on an emulated four-Pi cluster (docs/benchmarks.md, "Expert split"), on a
# bare x86 machine of 16 or more cores with CMake, a C++ compiler and Python 3 with numpy, aiohttp, jinja2,
# prometheus-client, pyyaml, requests and tqdm, and no network.
#
#   docs/cpu/pi-emulation-bench.sh drive SECONDS   start the pipeline if it is not running, wait for it at most
#                                                 SECONDS, then copy what it has written to $OUT (if set)
#   docs/cpu/pi-emulation-bench.sh pipeline        the pipeline itself, in the foreground
#
# Inputs, in $CARRY (default .gpu): llama.cpp-src.tar.gz (the llama.cpp of the llama-cpp-python 0.3.36 sdist
# with inference/patches/llama.cpp applied), llama_cpp-py.tar.gz (that sdist's Python package) and whl/
# (gguf, diskcache). Four workers of $WORKER_THREADS threads pinned to $PI_CPUS stand for the Pis, each behind
# a relay that gives its link 940 Mbit/s and 0.15 ms one way (inference/netsim.py); the head runs on
# $HEAD_CPUS with 4 threads. Work and results go to $W (default /tmp/w). $SPLITS, $REQUESTS and $PREFILL
# (below) trim the run to fit a machine's time. HEAD=gpu builds llama.cpp with CUDA (sm_$CUDA_ARCH, a build of
# its own beside the CPU one) and gives the head the GPU, the workers staying on their pinned CPU cores; its
# results are named *-gpu-head. REPACK=yes also measures llama.cpp's repacked Q4_0 CPU kernels with
# llama-bench on one Pi's cores, --repack 0 against 1. A split in $SPLITS may end in /no-repack (workers
# started with --no-repack), e.g. SPLITS=experts,experts/no-repack; SPLITS= (empty) skips llama.cpp altogether
# (build, model and benchmarks; REPACK=yes still builds it and writes its model). An expert split may also end
# in /hidden-f32, /partial-f16 or /partial-q8_0 (the wire types of patch 0006, set in the head's environment);
# any split in /sync-inputs (the blocking input copies that patch 0007 replaced).
# $CLIENTS (default 1,4) are the decoding runs' client counts; $BENCH_ARGS go to every bench as they are
# (e.g. "--skip-local --rounds 2", or "--relay-cpus worker" to run each relay on its worker's cores instead of
# the head's; with a CPU head that measured slower, the relays then waiting on the workers' compute threads).
#
# DLLAMA=yes then also runs distributed-llama on the same cores and links (docs/cpu/dllama_bench.py): from
# $CARRY/dllama-src.tar.gz (its sources, with a COMMIT file) it builds dllama with make, writes a random-weight
# Q40 model of $DLLAMA_SHAPE (docs/cpu/dllama_synth.py, 18.3 GB for qwen3-30b-a3b, under $W/dllama) and
# generates $DLLAMA_TOKENS tokens on a root and workers, one a CPU list of $DLLAMA_CPUS (default $PI_CPUS:
# a root and three workers) with $WORKER_THREADS threads each, every link through a relay, the driver and the
# relays on $HEAD_CPUS. Results: $RES/dllama.md and dllama.err. E.g. distributed-llama alone:
#   SPLITS= DLLAMA=yes docs/cpu/pi-emulation-bench.sh drive 580
set -u
CARRY=${CARRY:-$PWD/.gpu}
SRC=${SRC:-$PWD}
W=${W:-/tmp/w}
RES=$W/out
MODEL=${MODEL:-$W/qwen3-30b-a3b-q4_0.gguf}
HEAD=${HEAD:-cpu}                 # cpu or gpu
CUDA_ARCH=${CUDA_ARCH:-90}
REPACK=${REPACK:-no}
BUILD=$W/llama.cpp/build
[ "$HEAD" = gpu ] && BUILD=$W/llama.cpp/build-cuda
BIN=$BUILD/bin
PI_CPUS=${PI_CPUS:-0-2:3-5:6-8:9-11}
WORKER_THREADS=${WORKER_THREADS:-3}
HEAD_CPUS=${HEAD_CPUS:-12-15}
PYTHON=${PYTHON:-python3}
SPLITS=${SPLITS-layer,experts}    # the RPC splits to run, after the single node; empty: no llama.cpp
REQUESTS=${REQUESTS:-2}           # decoding requests per client
CLIENTS=${CLIENTS:-1,4}           # client counts of the decoding runs
BENCH_ARGS=${BENCH_ARGS:-}        # more options of every bench
PREFILL=${PREFILL:-yes}           # also the 512-token prefill run
DLLAMA=${DLLAMA:-no}              # also distributed-llama, after llama.cpp
DLLAMA_SHAPE=${DLLAMA_SHAPE:-qwen3-30b-a3b}   # or tiny (docs/cpu/dllama_synth.py), for a quick check
DLLAMA_CPUS=${DLLAMA_CPUS:-$PI_CPUS}          # one CPU list a node, the root's first
DLLAMA_TOKENS=${DLLAMA_TOKENS:-64}
DLLAMA_RUNS=${DLLAMA_RUNS:-1}                 # inference runs (each reloads the weights)
DLLAMA_ARGS=${DLLAMA_ARGS:-}                  # more options of docs/cpu/dllama_bench.py, e.g. --no-relay

log() { echo "$(date +%T) $*" | tee -a "$RES/progress.log"; }

build() {
  local targets=(llama) cuda=()
  [ "$REPACK" = yes ] && targets+=(llama-bench)
  [ "$HEAD" = gpu ] && cuda=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH")
  [ -e "$BIN/libllama.so" ] && { [ "$REPACK" != yes ] || [ -e "$BIN/llama-bench" ]; } && return 0
  [ -d "$W/llama.cpp" ] || { mkdir -p "$W" && tar xzf "$CARRY/llama.cpp-src.tar.gz" -C "$W"; }
  local started=$SECONDS
  # The system compiler: a toolchain that links libstdc++ statically into every shared library (as some
  # machine images set up through CC/CXX) gives the Python process two libstdc++ copies, and llama.cpp then
  # crashes in its model loader. RDMA stays off, as on a Pi (the transport is auto-detected from libibverbs).
  CC=${BUILD_CC:-gcc} CXX=${BUILD_CXX:-g++} \
  cmake -S "$W/llama.cpp" -B "$BUILD" -DGGML_RPC=ON -DGGML_RPC_RDMA=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF \
    "${cuda[@]}" -DCMAKE_BUILD_TYPE=Release >"$RES/build.log" 2>&1 || return 1
  cmake --build "$BUILD" --target "${targets[@]}" -j "$(nproc)" >>"$RES/build.log" 2>&1 || return 1
  log "build done in $((SECONDS - started)) s"
}

synth() {
  [ -e "$MODEL" ] && return 0
  local started=$SECONDS
  $PYTHON -m inference synth-model --shape qwen3-30b-a3b --quant q4_0 --out "$MODEL" --jobs "$(nproc)" >"$RES/synth.log" 2>&1 ||
    return 1
  log "model written in $((SECONDS - started)) s: $(tail -1 "$RES/synth.log")"
  started=$SECONDS
  $PYTHON -m inference reshard --model "$MODEL" --workers 4 >"$RES/reshard.log" 2>&1 || return 1
  log "resharded in $((SECONDS - started)) s: $(tail -1 "$RES/reshard.log")"
}

bench() { # NAME SECONDS ARGS...
  local name=$1 limit=$2
  shift 2
  log "bench $name: $*"
  timeout "$limit" taskset -c "$HEAD_CPUS" $PYTHON -m inference bench --model "$MODEL" --skip-llama-cpp-python \
    --ready-timeout 600 --json "$RES/$name.json" "$@" >"$RES/$name.md" 2>"$RES/$name.err"
  log "bench $name exited $?: $(grep -c clients "$RES/$name.err") measurements"
  if [ -f "$LLMFLEET_CACHE/bench-logs/pids" ]; then
    while read -r pid; do kill -9 -- "-$pid" 2>/dev/null; done <"$LLMFLEET_CACHE/bench-logs/pids"
  fi
  cp -r "$LLMFLEET_CACHE/bench-logs" "$RES/logs-$name" 2>/dev/null
  rm -rf "$LLMFLEET_CACHE/bench-logs"
}

repack() { # llama-bench on one Pi's cores, llama.cpp's repacked CPU kernels off and on
  local cpus=${PI_CPUS%%:*}
  log "llama-bench --repack 0,1 on cores $cpus"
  timeout 600 taskset -c "$cpus" "$BIN/llama-bench" -m "$MODEL" -t "$WORKER_THREADS" -p 0 -n 16 -r 2 -fa 1 \
    --repack 0,1 -o md >"$RES/repack.md" 2>"$RES/repack.err"
  log "llama-bench exited $?"
}

dllama_build() {
  local dir=$W/distributed-llama
  [ -x "$dir/dllama" ] && return 0
  rm -rf "$dir" && mkdir -p "$dir" && tar xzf "$CARRY/dllama-src.tar.gz" -C "$dir" || return 1
  local started=$SECONDS
  make -C "$dir" -j "$(nproc)" CXX="${BUILD_CXX:-g++}" dllama >"$RES/dllama-build.log" 2>&1 || return 1
  log "dllama $(cat "$dir/COMMIT" 2>/dev/null) built in $((SECONDS - started)) s"
}

dllama_synth() { # MODEL TOKENIZER
  [ -e "$1" ] && [ -e "$2" ] && return 0
  local started=$SECONDS
  $PYTHON "$SRC/docs/cpu/dllama_synth.py" --shape "$DLLAMA_SHAPE" --out "$1" --tokenizer-out "$2" \
    --jobs "$(nproc)" >"$RES/dllama-synth.log" 2>&1 || return 1
  log "dllama model written in $((SECONDS - started)) s: $(tail -1 "$RES/dllama-synth.log")"
}

dllama_stage() {
  local model=$W/dllama/$DLLAMA_SHAPE.m tokenizer=$W/dllama/$DLLAMA_SHAPE.t
  log "dllama: build"
  dllama_build || { log "dllama build failed"; tail -20 "$RES/dllama-build.log" >>"$RES/progress.log"; return 1; }
  dllama_synth "$model" "$tokenizer" ||
    { log "dllama model generation failed"; tail -5 "$RES/dllama-synth.log" >>"$RES/progress.log"; return 1; }
  log "dllama bench: $DLLAMA_SHAPE on $DLLAMA_CPUS, $WORKER_THREADS threads a node, $DLLAMA_TOKENS tokens"
  timeout $((900 * DLLAMA_RUNS + 120)) taskset -c "$HEAD_CPUS" $PYTHON "$SRC/docs/cpu/dllama_bench.py" \
    --dllama "$W/distributed-llama/dllama" --model "$model" --tokenizer "$tokenizer" --cpus "$DLLAMA_CPUS" \
    --threads "$WORKER_THREADS" --tokens "$DLLAMA_TOKENS" --runs "$DLLAMA_RUNS" --link-rate-mbit 940 \
    --link-delay-ms 0.15 --log-dir "$RES/logs-dllama" --json "$RES/dllama.json" $DLLAMA_ARGS \
    >"$RES/dllama.md" 2>"$RES/dllama.err"
  log "dllama bench exited $?: $(grep -c '^| distributed-llama' "$RES/dllama.md") runs"
}

llama_cpp_stage() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$CARRY"/whl/*.whl
  tar xzf "$CARRY/llama_cpp-py.tar.gz" -C /tmp/site
  build || { log "build failed"; tail -30 "$RES/build.log" >>"$RES/progress.log"; return 1; }
  export LLAMA_CPP_LIB_PATH=$BIN
  ln -sfn "$BIN" /tmp/site/llama_cpp/lib
  $PYTHON -c "from inference import ggml; print(ggml.devices())" >>"$RES/progress.log" 2>&1 ||
    { log "the Python package cannot load the build"; return 1; }
  synth || { log "model generation failed"; tail -5 "$RES/synth.log" "$RES/reshard.log" >>"$RES/progress.log"; return 1; }
  # The reshard above filled the head's cache (~/.cache/llmfleet/sharded), so the experts run loads at once.
  local common=(--threads 4 --ctx 4096 --parallel 4 --flash-attn on --rpc-splits "$SPLITS" --rpc-workers 4
    --rpc-worker-threads "$WORKER_THREADS" --rpc-worker-cpus "$PI_CPUS" --rpc-worker-device cpu
    --link-rate-mbit 940 --link-delay-ms 0.15 --link-after-load $BENCH_ARGS) suffix=
  if [ "$HEAD" = gpu ]; then
    common+=(--gpu-layers 999 --skip-local) suffix=-gpu-head
  else
    common+=(--rpc-head-device cpu)
  fi
  # Decoding (short prompts, so the rates are not those of queued prefills), then a 512-token prefill.
  if [ -n "$SPLITS" ]; then
    bench "pi-decode$suffix" 1200 "${common[@]}" --clients "$CLIENTS" --requests "$REQUESTS" --max-tokens 64
    [ "$PREFILL" = yes ] &&
      bench "pi-prefill$suffix" 900 "${common[@]}" --clients 1 --requests 1 --max-tokens 4 --prompt-tokens 512
  fi
  [ "$REPACK" = yes ] && repack
  return 0
}

pipeline() {
  mkdir -p "$RES"
  export PYTHONPATH=$SRC:/tmp/site PYTHONUNBUFFERED=1 LLMFLEET_CACHE=$W/cache
  [ "$HEAD" = gpu ] || export CUDA_VISIBLE_DEVICES=
  log "pipeline start (head: $HEAD)"
  { lscpu; free -g; python3 --version; } >"$RES/machine.txt" 2>&1
  if [ -n "$SPLITS" ] || [ "$REPACK" = yes ]; then
    llama_cpp_stage || return 1
  fi
  if [ "$DLLAMA" = yes ]; then
    dllama_stage || return 1
  fi
  log "pipeline done"
}

collect() {
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/results.tar.gz" -C "$W" out 2>/dev/null
  for f in progress.log pi-{decode,prefill}{,-gpu-head}.{md,err} repack.md repack.err reshard.log \
    dllama.{md,err,json} dllama-synth.log; do
    [ -e "$RES/$f" ] && cp "$RES/$f" "$OUT/"
  done
}

case "${1:-}" in
  pipeline) pipeline ;;
  drive)
    limit=${2:-540}
    mkdir -p "$RES"
    if [ ! -e "$W/pipeline.pid" ]; then
      setsid bash "$0" pipeline >"$W/pipeline.out" 2>&1 </dev/null &
      echo $! >"$W/pipeline.pid"
      echo "pipeline started"
    fi
    pid=$(cat "$W/pipeline.pid")
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt "$limit" ]; do sleep 5; done
    kill -0 "$pid" 2>/dev/null && echo "pipeline still running" || echo "pipeline finished"
    tail -25 "$RES/progress.log"
    collect
    ;;
  *) sed -n 2,33p "$0"; exit 2 ;;
esac
