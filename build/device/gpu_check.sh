#!/usr/bin/env bash
# On a GPU machine: build with CUDA, run the whole C++ suite (CPU and CUDA tests), then the GPU
# decode benchmark. Packages the GPU machine lacks come from .carry/ (see build/device/README.md).
#   bash build/device/gpu_check.sh [bench-config ...]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
CARRY=$PWD/.carry/root
extra=()
[ -d "$CARRY/usr/src/googletest" ] && extra+=(-DQ3N_GTEST_SOURCE="$CARRY/usr/src/googletest")
[ -d "$CARRY/usr/share/cmake/nlohmann_json" ] && extra+=(-Dnlohmann_json_DIR="$CARRY/usr/share/cmake/nlohmann_json")
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B out/gpu-build "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DQWEN3_CUDA=ON "${extra[@]}" > "$OUT/configure.log" 2>&1 \
  || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build out/gpu-build -j "$(nproc)" > "$OUT/build.log" 2>&1 || { grep -E "error|Error" -A3 "$OUT/build.log" | head -60; exit 1; }
echo "== build ok"
# A hung kernel must not eat the whole lease.
timeout "${TEST_TIMEOUT:-400}" out/gpu-build/q3n_tests --gtest_output=xml:"$OUT/gtest.xml" > "$OUT/tests.log" 2>&1
rc=$?
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|Skipped|SKIPPED" "$OUT/tests.log" | head -40
grep -E "CudaOps|CudaFixture" "$OUT/tests.log" | grep -E "OK|FAILED|SKIPPED" | head -30
echo "== tests rc=$rc"
for cfg in "$@"; do
  out/gpu-build/bench_cuda_decode --config "$cfg" --batches "${BATCHES:-1,8,32}" --prompt "${PROMPT:-512}" --tokens "${TOKENS:-64}" --out "$OUT" 2>&1 | tail -8
done
