#!/usr/bin/env python3
"""Single-thread throughput of Hugging Face `tokenizers` on the tokenizer gold corpus (one text per
call, as the C# side encodes), printed as one JSON line. Usage: tokenizer_hf.py TOKENIZER_JSON GOLD_JSON [PASSES]"""
import json
import os
import sys
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
from tokenizers import Tokenizer  # noqa: E402

tok = Tokenizer.from_file(sys.argv[1])
texts = [c["text"] for c in json.load(open(sys.argv[2], encoding="utf-8"))["encode"]]
passes = int(sys.argv[3]) if len(sys.argv) > 3 else 20
nbytes = sum(len(t.encode("utf-8")) for t in texts)
for t in texts:  # warm-up pass
    tok.encode(t, add_special_tokens=False)
start = time.perf_counter()
for _ in range(passes):
    for t in texts:
        tok.encode(t, add_special_tokens=False)
seconds = time.perf_counter() - start
# The same corpus as one document: per-call overheads (Python's included) out of the picture.
document = "\n".join(texts)
tok.encode(document, add_special_tokens=False)
start = time.perf_counter()
for _ in range(passes):
    tok.encode(document, add_special_tokens=False)
doc_seconds = time.perf_counter() - start
import tokenizers  # noqa: E402
print(json.dumps({"implementation": f"HF tokenizers {tokenizers.__version__}", "texts": len(texts),
                  "bytes_per_pass": nbytes, "passes": passes, "seconds": seconds,
                  "mb_per_s": nbytes * passes / seconds / 1e6,
                  "document_mb_per_s": len(document.encode("utf-8")) * passes / doc_seconds / 1e6}))
