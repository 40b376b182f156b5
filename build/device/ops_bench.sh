#!/usr/bin/env bash
# On a GPU machine: build the CUDA benchmarks and run the per-kernel benchmark (bench_cuda_ops) on
# the FP8 and BF16 dense configs, the Qwen3-Next / Qwen3-MoE kernels (bench_cuda_next_ops) on their
# FP8 configs, then the decode benchmark for the step time of the same run.
#   bash build/device/ops_bench.sh CONFIG_DIR [decode-config ...]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
configs=$1; shift
CARRY=$PWD/.carry/root
extra=()
[ -d "$CARRY/usr/src/googletest" ] && extra+=(-DQ3N_GTEST_SOURCE="$CARRY/usr/src/googletest")
[ -d "$CARRY/usr/share/cmake/nlohmann_json" ] && extra+=(-Dnlohmann_json_DIR="$CARRY/usr/share/cmake/nlohmann_json")
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B out/gpu-build "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DQWEN3_CUDA=ON "${extra[@]}" > "$OUT/configure.log" 2>&1 \
  || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build out/gpu-build -j "$(nproc)" --target bench_cuda_ops bench_cuda_next_ops bench_cuda_decode > "$OUT/build.log" 2>&1 \
  || { grep -E "error|Error" -A3 "$OUT/build.log" | head -60; exit 1; }
for c in Qwen3-4B-Instruct-2507-FP8 Qwen3-4B-Instruct-2507; do
  out/gpu-build/bench_cuda_ops --config "$configs/$c.json" --out "$OUT" 2>&1 | tee "$OUT/ops-$c.log"
done
for c in Qwen3-Next-80B-A3B-Instruct-FP8 Qwen3-30B-A3B-FP8; do
  out/gpu-build/bench_cuda_next_ops --config "$configs/$c.json" --out "$OUT" 2>&1 | tee "$OUT/next-ops-$c.log"
done
for c in "$@"; do
  out/gpu-build/bench_cuda_decode --config "$configs/$c.json" --batches "${BATCHES:-1,32}" --prompt "${PROMPT:-512}" \
    --tokens "${TOKENS:-64}" --out "$OUT" 2>&1 | tail -4
done
