#!/usr/bin/env bash
# The GPU-head benchmarks of docs/benchmarks.md ("GPU head (H100)"), on a bare machine with an NVIDIA GPU,
# CUDA's compiler, CMake, ninja and Python 3 with numpy and jinja2, and no network.
#
#   docs/h100/h100-bench.sh drive SECONDS   start the pipeline if it is not running, wait for it at most
#                                         SECONDS, then copy what it has written to $OUT (if set)
#   docs/h100/h100-bench.sh pipeline        the pipeline itself, in the foreground
#
# Inputs, in $CARRY (default .gpu): llama.cpp-src.tar.gz (the llama.cpp sources vendored in the
# llama-cpp-python 0.3.36 sdist), llama_cpp-py.tar.gz (that sdist's Python package), whl/ (wheels of
# aiohttp and its dependencies, prometheus-client, gguf, diskcache) and src/ (this repository's inference/ and
# docs/h100/). Work and results go to $W (default /tmp/w); results to $W/out. $STAGES names the benchmark
# stages to run (default all, in the order below).
set -u
CARRY=${CARRY:-$PWD/.gpu}
SRC=${SRC:-$CARRY/src}
W=${W:-/tmp/w}
RES=$W/out
MODEL=${MODEL:-$W/qwen3-30b-a3b-q4_0.gguf}
BUILD=$W/llama.cpp/build
BIN=${BIN:-$BUILD/bin}          # a llama.cpp build of one's own: its build and the model's are skipped
PI_CPUS=${PI_CPUS:-0-3:4-7:8-11:12-15}
PYTHON=${PYTHON:-python3}
STAGES=${STAGES-membw gpu-local gpu-rpc pi-emulation engine-profile gpu-rpc-relay gpu-local-t4 multi-turn}

want() { [[ " $STAGES " == *" $1 "* ]]; }

log() { echo "$(date +%T) $*" | tee -a "$RES/progress.log"; }

machine_info() {
  {
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
      --format=csv
    nvcc --version
    lscpu
    free -g
    df -h /tmp
    python3 --version
    python3 -c "import numpy, jinja2; print('numpy', numpy.__version__, 'jinja2', jinja2.__version__)"
  } >"$RES/machine.txt" 2>&1
}

setup_python() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$CARRY"/whl/*.whl
  tar xzf "$CARRY/llama_cpp-py.tar.gz" -C /tmp/site
}

build() {
  [ -x "$BIN/llama-server" ] && return 0
  mkdir -p "$W" && tar xzf "$CARRY/llama.cpp-src.tar.gz" -C "$W"
  local started=$SECONDS
  cmake -S "$W/llama.cpp" -B "$BUILD" -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DGGML_RPC=ON -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release >"$RES/build.log" 2>&1 || return 1
  ninja -C "$BUILD" -j "$(nproc)" llama llama-server >>"$RES/build.log" 2>&1 || return 1
  log "build done in $((SECONDS - started)) s"
  ls -la "$BIN" >>"$RES/build.log"
}

synth() {
  [ -e "$MODEL" ] && return 0
  local started=$SECONDS
  $PYTHON -m inference synth-model --shape qwen3-30b-a3b --quant q4_0 --out "$MODEL" --jobs "$(nproc)" \
    >"$RES/synth.log" 2>&1 ||
    return 1
  log "model written in $((SECONDS - started)) s: $(tail -1 "$RES/synth.log")"
}

bench() { # NAME SECONDS ARGS...: one bench invocation, its table in NAME.md, its log in NAME.err
  local name=$1 limit=$2
  shift 2
  log "bench $name: $*"
  timeout "$limit" $PYTHON -m inference bench --model "$MODEL" --skip-llama-cpp-python --ready-timeout 240 \
    --json "$RES/$name.json" "$@" >"$RES/$name.md" 2>"$RES/$name.err"
  log "bench $name exited $?: $(grep -c clients "$RES/$name.err") measurements"
  # Servers and workers lead process groups of their own; stop any that a killed run left behind.
  if [ -f "$LLMFLEET_CACHE/bench-logs/pids" ]; then
    while read -r pid; do kill -9 -- "-$pid" 2>/dev/null; done <"$LLMFLEET_CACHE/bench-logs/pids"
  fi
  cp -r "$LLMFLEET_CACHE/bench-logs" "$RES/logs-$name" 2>/dev/null
  rm -rf "$LLMFLEET_CACHE/bench-logs"
}

pipeline() {
  mkdir -p "$RES"
  cd "$W" || return 1 # not the repository root, whose own inference/ would shadow $SRC's
  export PYTHONPATH=$SRC:/tmp/site PYTHONUNBUFFERED=1 LLMFLEET_CACHE=$W/cache
  log "pipeline start"
  machine_info
  if [ -z "${SKIP_PIP:-}" ]; then setup_python || { log "pip install failed"; return 1; }; fi
  synth &
  local synth_pid=$!
  build || { log "build failed"; tail -30 "$RES/build.log" >>"$RES/progress.log"; }
  wait $synth_pid || { log "model generation failed"; return 1; }
  [ -x "$BIN/llama-server" ] || return 1
  export LLAMA_CPP_LIB_PATH=$BIN
  [ -d /tmp/site/llama_cpp ] && ln -sfn "$BIN" /tmp/site/llama_cpp/lib
  $PYTHON -c "from inference import ggml; print(ggml.devices())" >>"$RES/progress.log" 2>&1 ||
    { log "the Python package cannot load the build"; return 1; }
  if want membw; then
    timeout 120 $PYTHON "$SRC/docs/h100/membw.py" 0 0-3 0-7 0-15 >"$RES/membw.md" 2>&1
    log "memory bandwidth measured"
  fi

  # 1. Local GPU: this service against llama-server, same settings (-kvu: our engine has one KV pool).
  want gpu-local && bench gpu-local 360 --llama-server "$BIN/llama-server" --threads 16 --ctx 32768 \
    --parallel 16 --flash-attn on --gpu-layers 999 --kv-unified --clients 1,4,16 --requests 3 \
    --max-tokens 256 --prompt-tokens 512 --rpc-splits ''

  # 2. The head (no GPU of its own) with two RPC workers that serve the GPU, connected directly.
  want gpu-rpc && bench gpu-rpc 300 --threads 16 --ctx 32768 --parallel 16 --flash-attn on --gpu-layers 999 \
    --skip-local --clients 1,4,16 --requests 1 --max-tokens 128 --prompt-tokens 512 \
    --rpc-splits layer,tensor --rpc-workers 2 --rpc-worker-threads 8 --rpc-head-device cpu --no-relay

  # 3. Four Pi-sized CPU workers (4 pinned cores, 4 threads, no GPU) behind gigabit-link relays;
  #    the head without GPU too. The local run is this service alone on 4 threads, for reference.
  if want pi-emulation; then
    export CUDA_VISIBLE_DEVICES=
    bench pi-emulation 420 --threads 4 --ctx 4096 --parallel 4 --flash-attn on \
      --clients 1,4 --requests 1 --max-tokens 32 --rpc-splits layer,tensor --rpc-workers 4 \
      --rpc-worker-threads 4 --rpc-worker-cpus "$PI_CPUS" --rpc-worker-device cpu \
      --rpc-head-device cpu --link-rate-mbit 940 --link-delay-ms 0.15 --link-after-load
    unset CUDA_VISIBLE_DEVICES
  fi

  # Where the engine's decode step goes, without HTTP (compare llama-server's own "eval time" in its log).
  if want engine-profile; then
    timeout 150 $PYTHON "$SRC/docs/h100/engine_profile.py" "$MODEL" --threads 16 >"$RES/engine-profile.md" \
      2>"$RES/engine-profile.err"
    log "engine profile exited $?"
  fi

  # 2b. The same as 2 through counting relays (no link model): RPC bytes and round trips per token.
  want gpu-rpc-relay && bench gpu-rpc-relay 240 --threads 16 --ctx 32768 --parallel 16 --flash-attn on \
    --gpu-layers 999 --skip-local --clients 1 --requests 1 --max-tokens 64 --prompt-tokens 512 \
    --rpc-splits layer,tensor --rpc-workers 2 --rpc-worker-threads 8 --rpc-head-device cpu

  # 1b. Fewer CPU threads for both servers on the GPU.
  want gpu-local-t4 && bench gpu-local-t4 200 --llama-server "$BIN/llama-server" --threads 4 --ctx 32768 \
    --parallel 16 --flash-attn on --gpu-layers 999 --kv-unified --clients 1,4 --requests 2 \
    --max-tokens 256 --prompt-tokens 512 --rpc-splits ''

  # 4. Prompt reuse across the turns of a chat against llama-server's prompt cache, all on the GPU: the
  #    2-core machine's command with the model on the GPU.
  want multi-turn && bench multi-turn 420 --llama-server "$BIN/llama-server" --multi-turn 6 --ctx 4096 \
    --parallel 2 --rounds 5 --threads 16 --flash-attn on --gpu-layers 999
  log "pipeline done"
}

collect() { # at most 8 files: everything in one archive, and the main tables beside it
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/results.tar.gz" -C "$W" out 2>/dev/null
  for f in progress.log gpu-local.md engine-profile.md pi-emulation.md gpu-rpc.md membw.md multi-turn.md multi-turn.err; do
    [ -e "$RES/$f" ] && cp "$RES/$f" "$OUT/"
  done
}

case "${1:-}" in
  pipeline) pipeline ;;
  drive)
    limit=${2:-540}
    mkdir -p "$RES"
    if [ ! -e "$W/pipeline.pid" ]; then
      setsid bash "$0" pipeline >"$W/pipeline.out" 2>&1 < /dev/null &
      echo $! >"$W/pipeline.pid"
      echo "pipeline started"
    else
      echo "pipeline already running (pid $(cat "$W/pipeline.pid"))"
    fi
    pid=$(cat "$W/pipeline.pid")
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt "$limit" ]; do sleep 5; done
    kill -0 "$pid" 2>/dev/null && echo "pipeline still running" || echo "pipeline finished"
    tail -25 "$RES/progress.log"
    collect
    ;;
  *) sed -n 2,13p "$0"; exit 2 ;;
esac
