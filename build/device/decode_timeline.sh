#!/usr/bin/env bash
# On a GPU machine: a per-kernel timeline of decode steps (CUPTI, graph nodes included), from a
# bench_cuda_decode run of one batch size. Tracing slows the step by about a fifth; compare
# timelines with timelines, not with the benchmark's figures.
#   bash build/device/decode_timeline.sh CONFIG.json BATCH [kernels-per-layer] [prompt]
set -euo pipefail
cd "$(dirname "$0")/../.."
config=$1 batch=$2 per=${3:-} prompt=${4:-512}
cuda=${CUDA_HOME:-/usr/local/cuda}
record=$(grep -o 'CUpti_ActivityKernel[0-9]*' "$cuda/include/cupti_activity.h" | sort -V | tail -1)
g++ -O2 -shared -fPIC -DKREC="$record" -I"$cuda/include" build/device/cupti_trace.cpp -o /tmp/libq3n_trace.so \
  -L"$cuda/lib64" -lcupti -Wl,-rpath,"$cuda/lib64"
bench=$(find out/gpu-build -name bench_cuda_decode -type f | head -1)
[ -n "$bench" ] || { echo "build bench_cuda_decode first (build/device/gpu_check.sh)"; exit 1; }
Q3N_TRACE_OUT=/tmp/q3n_trace.csv LD_PRELOAD=/tmp/libq3n_trace.so "$bench" --config "$config" --batches "$batch" \
  --prompt "$prompt" --tokens 12 --out /tmp/q3n_trace_bench | grep tok/s
python3 build/device/decode_timeline.py /tmp/q3n_trace.csv $per
