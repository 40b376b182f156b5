#!/usr/bin/env bash
# Both tokenizers on one machine, one after the other, on the same corpus; writes
# bench/results/tokenizer-throughput.json. Needs a published TokenizerBench (or dotnet) and python3
# with `tokenizers`:  bash bench/tokenizer_compare.sh [path/to/TokenizerBench]
set -euo pipefail
cd "$(dirname "$0")/.."
tok=tests/fixtures/qwen3/real_vocab_tiny/tokenizer.json
gold=tests/fixtures/tokenizer/gold.json
bench=${1:-}
if [ -z "$bench" ]; then
  ours=$(dotnet run -c Release --project bench/TokenizerBench -- "$tok" "$gold" 20)
else
  ours=$("$bench" "$tok" "$gold" 20)
fi
hf=$(python3 bench/tokenizer_hf.py "$tok" "$gold" 20)
out=${OUT_DIR:-bench/results}
mkdir -p "$out"
python3 - "$ours" "$hf" "$out/tokenizer-throughput.json" <<'PY'
import json, platform, sys, datetime, os
ours, hf = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
res = {"benchmark": "tokenizer_throughput", "device": cpu,
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "commit": os.environ.get("Q3N_COMMIT", ""),
       "ours": ours, "hf": hf, "ratio_per_text": ours["mb_per_s"] / hf["mb_per_s"],
       "ratio_document": ours["document_mb_per_s"] / hf["document_mb_per_s"]}
json.dump(res, open(sys.argv[3], "w"), indent=2)
print(f"per text: Qwen3Native {ours['mb_per_s']:.1f} MB/s, {hf['implementation']} {hf['mb_per_s']:.1f} MB/s, ratio {res['ratio_per_text']:.2f}")
print(f"one document: Qwen3Native {ours['document_mb_per_s']:.1f} MB/s, {hf['implementation']} {hf['document_mb_per_s']:.1f} MB/s, ratio {res['ratio_document']:.2f}")
PY
