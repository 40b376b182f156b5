#!/usr/bin/env bash
# On the GPU machine (it has torch and transformers 5.17): runs the fixture scripts that need
# transformers and packs what they write into $OUT/fixtures.tar.xz, one log per script beside it.
#   bash build/device/make_fixtures.sh [moe] [next] [vision] [vl]     (all four when none is named)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/fixtures}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
which=("$@")
[ ${#which[@]} -eq 0 ] && which=(moe next vision vl)
paths=()
pids=()
for w in "${which[@]}"; do
  case $w in
    moe) python3 tests/fixtures/make_moe_fixtures.py > "$OUT/fixtures-moe.log" 2>&1 & pids+=($!); paths+=(tests/fixtures/qwen3_moe) ;;
    next) python3 tests/fixtures/make_next_fixtures.py > "$OUT/fixtures-next.log" 2>&1 & pids+=($!); paths+=(tests/fixtures/qwen3_next) ;;
    vision) python3 tests/fixtures/vision/make_gold.py > "$OUT/fixtures-vision.log" 2>&1 & pids+=($!); paths+=(tests/fixtures/vision/gold.json) ;;
    vl) python3 tests/fixtures/make_vl_fixtures.py > "$OUT/fixtures-vl.log" 2>&1 & pids+=($!); paths+=(tests/fixtures/qwen3_vl) ;;
    *) echo "unknown fixture set: $w"; exit 2 ;;
  esac
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; r=$?
  echo "== fixtures ${which[$i]} rc=$r"; tail -5 "$OUT/fixtures-${which[$i]}.log"
  [ $r -ne 0 ] && rc=1
done
existing=()
for p in "${paths[@]}"; do [ -e "$p" ] && existing+=("$p"); done
[ ${#existing[@]} -gt 0 ] && tar cJf "$OUT/fixtures.tar.xz" "${existing[@]}" && ls -la "$OUT/fixtures.tar.xz"
exit $rc
