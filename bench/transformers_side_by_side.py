#!/usr/bin/env python3
"""Hugging Face transformers on a Qwen3 dense config, side by side with the engine's own benchmarks.

What it measures, in one run, on random bf16 weights built from a config.json (no checkpoint needed):
  decode       model.generate at batch 1 and 8 (default prompt 512, 64 new tokens, greedy, never stopping
               early): eager with the dynamic cache, then the static cache with transformers' torch.compile
               of the decode step (mode reduce-overhead). Compile time is reported apart from the figures.
  ttft         one prefill forward at prompts 1024 and 8192 (eager, batch 1).
  fp8_matmul   torch._scaled_mm with e4m3 operands on every projection shape of the config, for
               M in 1, 16, 64, 512, 4096: block scales (1x128 activations, 128x128 weights, what the
               released FP8 checkpoints need), row-wise and tensor-wise scales, and a bf16 matmul.

Decode figures follow bench_cuda_decode: a decode step is one token per sequence after the first, so
    decode_ms_per_step = (generate(N tokens) - generate(1 token)) / (N - 1)
    decode_tokens_per_s = batch * 1000 / decode_ms_per_step
generate(1 token) is the prefill plus generate's own set-up, which must not be charged to decode. The
pure prefill forward is reported as ttft_forward_ms. Every figure also goes against the weight-streaming
floor measured in the same run (device-to-device copy bandwidth), as PERF.md asks.

Usage (PyTorch 2.11, transformers 5.17, one H100; about 5 minutes):
    python3 bench/transformers_side_by_side.py --config /work/shared/configs/Qwen3-4B-Instruct-2507.json
Writes bench/results/transformers-<config stem>.json (rewritten after every stage, so a crash in a
late stage keeps the earlier figures) and prints a table. Every stage can be skipped (--skip-*).
"""
import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

T_START = time.perf_counter()  # the time budget counts the imports of torch and transformers too
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP8_MAX = 448.0
BLOCK = 128


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a Qwen3 dense config.json (quantization_config is ignored)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"), help="directory for the JSON")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens for the decode runs")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per decode run (>= 2)")
    p.add_argument("--batches", default="1,8", help="decode batch sizes")
    p.add_argument("--compile-batches", default=None,
                   help="batch sizes for the static+compile variant (default: --batches); each one recompiles")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    p.add_argument("--ttft-prompts", default="1024,8192", help="prompt lengths for the TTFT stage")
    p.add_argument("--fp8-m", default="1,16,64,512,4096", help="M values for the FP8 matmul stage")
    p.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode for the decode step")
    p.add_argument("--static-eager", action="store_true",
                   help="also time the static cache without compile (separates the cache from the compiler)")
    p.add_argument("--fast-accum", action="store_true", help="use_fast_accum=True in _scaled_mm")
    p.add_argument("--skip-eager", action="store_true", help="skip the eager (dynamic cache) decode")
    p.add_argument("--skip-compile", action="store_true", help="skip the static cache + torch.compile decode")
    p.add_argument("--skip-ttft", action="store_true", help="skip the long-prompt TTFT stage")
    p.add_argument("--skip-fp8", action="store_true", help="skip the FP8 matmul stage")
    p.add_argument("--time-budget", type=float, default=330.0,
                   help="seconds; a stage (or compile batch) that would start past this is skipped and noted")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.batches = [int(x) for x in a.batches.split(",") if x.strip()]
    a.compile_batches = [int(x) for x in a.compile_batches.split(",")] if a.compile_batches else list(a.batches)
    a.ttft_prompts = [int(x) for x in a.ttft_prompts.split(",") if x.strip()]
    a.fp8_m = [int(x) for x in a.fp8_m.split(",") if x.strip()]
    if a.tokens < 2:
        p.error("--tokens must be at least 2 (decode is measured as the steps after the first token)")
    return a


def git_commit():
    if os.environ.get("Q3N_COMMIT"):
        return os.environ["Q3N_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def err_text(e, limit=1500):
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= limit else s[:limit] + " ..."


def r(x, nd=4):
    return None if x is None else round(float(x), nd)


def median(xs):
    return statistics.median(xs) if xs else None


class Bench:
    def __init__(self, args, torch):
        self.args = args
        self.torch = torch
        self.t_start = T_START
        self.results = {"errors": [], "skipped": []}
        self.out_path = None

    def elapsed(self):
        return time.perf_counter() - self.t_start

    def within_budget(self, what, need_s=0.0):
        left = self.args.time_budget - self.elapsed()
        if left < need_s:
            msg = f"{what}: skipped, {self.elapsed():.0f} s elapsed of the {self.args.time_budget:.0f} s budget"
            print("  " + msg, flush=True)
            self.results["skipped"].append(msg)
            return False
        return True

    def error(self, stage, variant, e):
        text = err_text(e)
        print(f"  [{stage}/{variant}] failed: {text}", flush=True)
        self.results["errors"].append({"stage": stage, "variant": variant, "error": text})

    def save(self):
        os.makedirs(os.path.dirname(self.out_path), exist_ok=True)
        self.results["wall_s"] = r(self.elapsed(), 1)
        with open(self.out_path, "w", encoding="utf-8") as f:
            json.dump(self.results, f, indent=1)
            f.write("\n")

    def sync(self):
        self.torch.cuda.synchronize()

    def is_oom(self, e):
        return isinstance(e, self.torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()

    def free(self):
        import gc
        gc.collect()
        self.torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------

def load_config_dict(path):
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    dropped = "quantization_config" in d
    # transformers would route the FP8 checkpoint through its fine-grained FP8 path, which does not run
    # here (FIXTURES.md: it needs the `kernels` package); the comparison is against its BF16 model.
    d.pop("quantization_config", None)
    return d, dropped


def build_model(b, cfg_dict):
    torch = b.torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    if cfg_dict.get("model_type") not in (None, "qwen3"):
        raise SystemExit(f"model_type {cfg_dict.get('model_type')!r}: this benchmark covers Qwen3 dense only")
    d = dict(cfg_dict)
    d["attn_implementation"] = "sdpa"
    config = Qwen3Config.from_dict(d)
    t0 = time.perf_counter()
    prev = torch.get_default_dtype()
    # Building under the cuda device and a bf16 default dtype makes the weights and their random
    # initialisation (normal_ with initializer_range) happen on the GPU in seconds.
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    if next(model.parameters()).dtype != torch.bfloat16:
        model = model.to(torch.bfloat16)
    model.eval()
    attn = getattr(model.config, "_attn_implementation", None)
    if attn != "sdpa":
        try:
            model.set_attn_implementation("sdpa")
            attn = model.config._attn_implementation
        except Exception as e:
            b.error("build", "set_attn_implementation", e)
    # No EOS: every run generates exactly --tokens tokens. generate falls back to the model's own
    # generation_config for special tokens left unset, so clear them there too.
    gc_ = model.generation_config
    gc_.eos_token_id = None
    gc_.bos_token_id = None
    gc_.pad_token_id = 0
    b.sync()
    init_s = time.perf_counter() - t0
    return model, config, attn, init_s


def model_facts(model, config):
    params = sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = config.hidden_size
    vocab = config.vocab_size
    if not getattr(config, "tie_word_embeddings", False):
        # An untied embedding table is gathered row by row, not streamed: it is not in the decode floor.
        weight_bytes -= vocab * hidden * 2
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_bytes_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2
    return params, weight_bytes, head_dim, kv_bytes_per_token


def measure_d2d_bandwidth(b):
    torch = b.torch
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del src, dst
    b.free()
    return 2 * n / (median(times) / 1e3) / 1e9  # bytes read + written, GB/s


# ----------------------------------------------------------------------------------------------------
# Decode and TTFT
# ----------------------------------------------------------------------------------------------------

def make_gen_config(new_tokens, cache_impl=None, compile_config=None, disable_compile=False):
    from transformers import GenerationConfig
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1,
              eos_token_id=None, bos_token_id=None, pad_token_id=0, use_cache=True,
              temperature=None, top_p=None, top_k=None)
    if cache_impl:
        kw["cache_implementation"] = cache_impl
    if compile_config is not None:
        kw["compile_config"] = compile_config
    if disable_compile:
        kw["disable_compile"] = True
    return GenerationConfig(**kw)


def timed_generate(b, model, ids, mask, gen_config, expect_new):
    b.sync()
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
    b.sync()
    dt = (time.perf_counter() - t0) * 1e3
    seqs = out.sequences if hasattr(out, "sequences") else out
    got = seqs.shape[1] - ids.shape[1]
    if got != expect_new:
        raise RuntimeError(f"generate produced {got} new tokens, expected {expect_new}")
    return dt


def prefill_forward_ms(b, model, ids, repeats):
    torch = b.torch

    def once():
        with torch.inference_mode():
            try:
                # Only the last position's logits: an engine computes no more, and at 8K tokens the full
                # [L, 151936] logits would dominate the time and the memory.
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
            except TypeError:
                model(input_ids=ids, use_cache=True)

    once()  # warm-up: kernel selection for this shape
    times = []
    for _ in range(repeats):
        b.sync()
        t0 = time.perf_counter()
        once()
        b.sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times), times


def decode_figures(b, variant, batch, total_ms, total_runs, ttft_gen_ms, ttft_gen_runs, facts, bw):
    a = b.args
    _, weight_bytes, _, kv_per_tok = facts
    step_ms = (total_ms - ttft_gen_ms) / (a.tokens - 1)
    ctx = a.prompt + a.tokens / 2  # mean context over the decode steps
    floor_ms = (weight_bytes + batch * ctx * kv_per_tok) / (bw * 1e9) * 1e3 if bw else None
    return {
        "variant": variant, "batch": batch, "prompt_tokens": a.prompt, "new_tokens": a.tokens,
        "ttft_generate_ms": r(ttft_gen_ms), "generate_total_ms": r(total_ms),
        "decode_ms_per_step": r(step_ms), "decode_tokens_per_s": r(batch * 1e3 / step_ms, 2),
        "end_to_end_tokens_per_s": r(batch * a.tokens / (total_ms / 1e3), 2),
        "floor_ms_per_step": r(floor_ms), "fraction_of_floor": r(floor_ms / step_ms) if floor_ms else None,
        "runs_total_ms": [r(x, 2) for x in total_runs], "runs_ttft_generate_ms": [r(x, 2) for x in ttft_gen_runs],
    }


def run_variant(b, model, batch, ids, mask, variant, gc_full, gc_one, facts, bw, warmups):
    """Times one decode variant at one batch size. Returns (row, first_call_ms)."""
    a = b.args
    first_ms = timed_generate(b, model, ids, mask, gc_full, a.tokens)
    for _ in range(warmups - 1):
        timed_generate(b, model, ids, mask, gc_full, a.tokens)
    # The full-length runs go first and back to back: should a 1-token call make generate rebuild its
    # static cache, CUDA graphs would re-record in the next full run, and that must not be a timed one.
    total_runs = [timed_generate(b, model, ids, mask, gc_full, a.tokens) for _ in range(a.repeats)]
    ttft_runs = [timed_generate(b, model, ids, mask, gc_one, 1) for _ in range(a.repeats)]
    row = decode_figures(b, variant, batch, median(total_runs), total_runs, median(ttft_runs), ttft_runs, facts, bw)
    return row, first_ms


def prompt_ids(b, batch, length, vocab, seed):
    torch = b.torch
    g = torch.Generator(device="cuda")
    g.manual_seed(seed * 1000 + batch * 7 + length)
    ids = torch.randint(0, vocab, (batch, length), device="cuda", generator=g)
    return ids, torch.ones_like(ids)


def stage_eager(b, model, facts, bw):
    a = b.args
    rows = b.results.setdefault("decode", [])
    gc_full = make_gen_config(a.tokens, disable_compile=True)
    gc_one = make_gen_config(1, disable_compile=True)
    for batch in a.batches:
        if not b.within_budget(f"decode eager batch {batch}"):
            continue
        print(f"decode: eager (dynamic cache), batch {batch}", flush=True)
        ids, mask = prompt_ids(b, batch, a.prompt, model.config.vocab_size, a.seed)
        try:
            fwd_ms, fwd_runs = prefill_forward_ms(b, model, ids, a.repeats)
            # The first eager call only warms up kernels; one is enough.
            row, _ = run_variant(b, model, batch, ids, mask, "eager_dynamic", gc_full, gc_one, facts, bw, warmups=1)
            row["ttft_forward_ms"] = r(fwd_ms)
            row["runs_ttft_forward_ms"] = [r(x, 2) for x in fwd_runs]
            rows.append(row)
        except Exception as e:
            b.error("decode", f"eager_dynamic/b{batch}", e)
            if b.is_oom(e):
                b.free()
        b.save()
        if a.static_eager and b.within_budget(f"decode static eager batch {batch}"):
            print(f"decode: static cache, no compile, batch {batch}", flush=True)
            try:
                gs_full = make_gen_config(a.tokens, cache_impl="static", disable_compile=True)
                gs_one = make_gen_config(1, cache_impl="static", disable_compile=True)
                row, _ = run_variant(b, model, batch, ids, mask, "static_eager", gs_full, gs_one, facts, bw, warmups=1)
                rows.append(row)
            except Exception as e:
                b.error("decode", f"static_eager/b{batch}", e)
            b.save()


def make_compile_config(mode, fullgraph):
    try:
        from transformers import CompileConfig
    except ImportError:
        from transformers.generation.configuration_utils import CompileConfig
    import inspect
    want = {"mode": mode}
    if fullgraph is not None:
        want["fullgraph"] = fullgraph
    try:
        accepted = inspect.signature(CompileConfig.__init__).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            want = {k: v for k, v in want.items() if k in accepted}
    except (TypeError, ValueError):
        pass
    cc = CompileConfig(**want)
    desc = {k: getattr(cc, k, None) for k in ("mode", "fullgraph", "dynamic", "backend")}
    return cc, desc


def dynamo_graph_count(torch):
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def reset_compiled(b, model):
    b.torch._dynamo.reset()
    if "_q3n_eager_forward" in model.__dict__:
        model.forward = model.__dict__.pop("_q3n_eager_forward")
    for attr in ("_compiled_call", "_last_compile_config"):
        if attr in model.__dict__:
            try:
                delattr(model, attr)
            except Exception:
                pass
    b.free()


def stage_compile(b, model, facts, bw):
    a = b.args
    torch = b.torch
    rows = b.results.setdefault("decode", [])
    comp = b.results.setdefault("compile", {"attempts": [], "per_batch": []})
    # Tried in order until one runs: transformers' default CompileConfig with the asked mode, then
    # without fullgraph (a graph break is not an error then), then without CUDA graphs.
    attempts = [(a.compile_mode, None), (a.compile_mode, False)]
    if a.compile_mode != "default":
        attempts.append(("default", False))
    chosen = None
    failed = set()
    # One compile of a 36-layer model takes a minute or two; a batch size is not started without about
    # the time the previous one took (90 s for the first), so the run stays near its budget.
    need_s = 90.0
    for batch in a.compile_batches:
        if not b.within_budget(f"decode static+compile batch {batch}", need_s=need_s):
            continue
        t_batch = time.perf_counter()
        ids, mask = prompt_ids(b, batch, a.prompt, model.config.vocab_size, a.seed)
        todo = [chosen] if chosen else attempts
        for mode, fullgraph in todo:
            try:
                cc, desc = make_compile_config(mode, fullgraph)
            except Exception as e:
                b.error("compile", "CompileConfig", e)
                cc, desc = None, {"mode": mode, "note": "no CompileConfig; model.forward compiled by hand"}
            variant = f"static_compile[{desc.get('mode')}]"
            key = json.dumps(desc, sort_keys=True, default=str)
            if key in failed:
                continue  # the same settings as an attempt that already failed
            print(f"decode: static cache + torch.compile {desc}, batch {batch} (first call compiles)", flush=True)
            try:
                if cc is None:
                    # transformers without CompileConfig does not compile generate itself.
                    if not hasattr(model, "_q3n_eager_forward"):
                        model._q3n_eager_forward = model.forward
                        model.forward = torch.compile(model.forward, mode=mode)
                    gs_full = make_gen_config(a.tokens, cache_impl="static")
                    gs_one = make_gen_config(1, cache_impl="static")
                else:
                    gs_full = make_gen_config(a.tokens, cache_impl="static", compile_config=cc)
                    gs_one = make_gen_config(1, cache_impl="static", compile_config=cc)
                graphs_before = dynamo_graph_count(torch)
                # Two untimed calls: the first compiles, the second lets CUDA graphs record.
                row, first_ms = run_variant(b, model, batch, ids, mask, variant, gs_full, gs_one, facts, bw, warmups=2)
                graphs = dynamo_graph_count(torch)
                row["compile_config"] = desc
                row["compiled_call_on_model"] = cc is None or bool(getattr(model, "_compiled_call", None))
                row["dynamo_graphs_compiled"] = None if graphs is None or graphs_before is None else graphs - graphs_before
                if not row["compiled_call_on_model"] and not row["dynamo_graphs_compiled"]:
                    row["note"] = ("no sign that generate compiled the decode step (no _compiled_call, no new "
                                   "dynamo graph): these may be eager static-cache figures")
                rows.append(row)
                comp["per_batch"].append({"batch": batch, "first_call_s": r(first_ms / 1e3, 2),
                                          "compile_s_estimate": r((first_ms - row["generate_total_ms"]) / 1e3, 2),
                                          "compile_config": desc})
                comp["attempts"].append({"batch": batch, "compile_config": desc, "ok": True})
                chosen = (mode, fullgraph)
                need_s = time.perf_counter() - t_batch
                b.save()
                break
            except Exception as e:
                failed.add(key)
                b.error("compile", f"{variant}/b{batch}", e)
                comp["attempts"].append({"batch": batch, "compile_config": desc, "ok": False, "error": err_text(e, 400)})
                traceback.print_exc(limit=3)
                reset_compiled(b, model)
                b.save()
                if chosen or not b.within_budget(f"next compile attempt at batch {batch}", need_s=60.0):
                    break


def stage_ttft(b, model):
    a = b.args
    rows = b.results.setdefault("ttft", [])
    limit = getattr(model.config, "max_position_embeddings", None)
    for length in a.ttft_prompts:
        if not b.within_budget(f"ttft prompt {length}"):
            continue
        if limit and length > limit:
            rows.append({"prompt_tokens": length, "skipped": f"longer than max_position_embeddings {limit}"})
            continue
        print(f"ttft: prompt {length}, batch 1, eager", flush=True)
        ids = None
        try:
            ids, _ = prompt_ids(b, 1, length, model.config.vocab_size, a.seed)
            ms, runs = prefill_forward_ms(b, model, ids, a.repeats)
            rows.append({"prompt_tokens": length, "batch": 1, "ttft_ms": r(ms), "runs_ms": [r(x, 2) for x in runs],
                         "prefill_tokens_per_s": r(length / (ms / 1e3), 1)})
        except Exception as e:
            if b.is_oom(e):
                rows.append({"prompt_tokens": length, "skipped": "out of memory"})
            b.error("ttft", f"prompt{length}", e)
        del ids
        b.free()
        b.save()


# ----------------------------------------------------------------------------------------------------
# FP8 matmul
# ----------------------------------------------------------------------------------------------------

def scaling_recipes(torch):
    """The ScalingType members for 1x128 and 128x128 from torch.nn.functional (PyTorch 2.10+), found by
    name because their spelling changed between releases (Blockwise_1x128, BlockWise1x128)."""
    F = torch.nn.functional
    st = getattr(F, "ScalingType", None)
    if st is None or not hasattr(F, "scaled_mm"):
        return None, None
    found = {}
    # A Python Enum iterates; the pybind11 enum of PyTorch 2.11 does not, but lists its members.
    members = getattr(st, "__members__", None)
    for name, m in (members.items() if members else ((m.name, m) for m in st)):
        found[name.lower().replace("_", "")] = m
    return found.get("blockwise1x128"), found.get("blockwise128x128")


def quant_blockwise(torch, x, w):
    """Activations per row and 128 columns, weights per 128x128 block; scale = amax/448, e4m3 values.
    Returns the operands, the scales laid out as torch._scaled_mm (v1) and F.scaled_mm (v2) want them,
    and dequantised copies for a numerical check."""
    F = torch.nn.functional
    M, K = x.shape
    N = w.shape[0]
    kb, nb = math.ceil(K / BLOCK), math.ceil(N / BLOCK)
    xg = F.pad(x.float(), (0, kb * BLOCK - K)).view(M, kb, BLOCK)
    sx = (xg.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)  # [M, kb]
    xq = (xg / sx[..., None]).view(M, kb * BLOCK)[:, :K].to(torch.float8_e4m3fn).contiguous()
    # 1x128 scales must be outer-dim-major: shape [M, kb] with strides (1, M).
    scale_a = torch.empty((kb, M), dtype=torch.float32, device=x.device).t()
    scale_a.copy_(sx)
    wb = F.pad(w.float(), (0, kb * BLOCK - K, 0, nb * BLOCK - N)).view(nb, BLOCK, kb, BLOCK)
    sw = (wb.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)  # [nb, kb]
    wq = (wb / sw[:, None, :, None]).view(nb * BLOCK, kb * BLOCK)[:N, :K].to(torch.float8_e4m3fn).contiguous()
    # mat_b is wq.t() [K, N]; its 128x128 scales are the transpose of the [nb, kb] grid. v2 wants the
    # K-block count rounded up to 4 (16-byte rows of fp32); v1 checks the exact count.
    scale_b_v1 = sw.contiguous().t()
    kb4 = (kb + 3) // 4 * 4
    swp = torch.zeros((nb, kb4), dtype=torch.float32, device=x.device)
    swp[:, :kb] = sw
    scale_b_v2 = swp.t()
    x_deq = xq.float() * sx.repeat_interleave(BLOCK, 1)[:, :K]
    w_deq = wq.float() * sw.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:N, :K]
    return xq, scale_a, wq, (scale_b_v1, scale_b_v2), x_deq, w_deq


def quant_rowwise(torch, x, w):
    sx = (x.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [M, 1]
    sw = (w.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [N, 1]
    xq = (x.float() / sx).to(torch.float8_e4m3fn).contiguous()
    wq = (w.float() / sw).to(torch.float8_e4m3fn).contiguous()
    return xq, sx.contiguous(), wq, sw.view(1, -1).contiguous(), xq.float() * sx, wq.float() * sw


def quant_tensorwise(torch, x, w):
    sx = (x.float().abs().amax() / FP8_MAX).clamp(min=1e-12)
    sw = (w.float().abs().amax() / FP8_MAX).clamp(min=1e-12)
    xq = (x.float() / sx).to(torch.float8_e4m3fn).contiguous()
    wq = (w.float() / sw).to(torch.float8_e4m3fn).contiguous()
    return xq, sx.reshape(()), wq, sw.reshape(()), xq.float() * sx, wq.float() * sw


def gpu_time_ms(b, fn, n_copies):
    """Median GPU time of one call. The calls are captured in a CUDA graph, because at M = 1 a kernel
    takes microseconds and an eager loop would time Python's launch rate instead; fn(i) reads weight
    copy i % n_copies so the weights come from HBM, not from L2."""
    torch = b.torch
    fn(0)
    b.sync()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for i in range(10):
        fn(i % n_copies)
    e.record()
    e.synchronize()
    per = max(s.elapsed_time(e) / 10, 1e-3)
    iters = int(min(400, max(20, 20.0 / per)))
    iters = max(n_copies, iters // n_copies * n_copies)
    how = "cuda_graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(3):
                fn(i % n_copies)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(iters):
                fn(i % n_copies)
        run = graph.replay
        run()
    except Exception:
        how = "eager_loop"
        try:
            b.sync()
        except Exception:
            pass

        def run():
            for i in range(iters):
                fn(i % n_copies)
    b.sync()
    times = []
    for _ in range(5):
        s.record()
        run()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / iters)
    return median(times), how


def projection_shapes(config):
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    h, inter = config.hidden_size, config.intermediate_size
    return [("qkv", (heads + 2 * kv) * hd, h), ("o", h, heads * hd),
            ("gate_up", 2 * inter, h), ("down", h, inter)]


def stage_fp8(b, config):
    a = b.args
    torch = b.torch
    rows = b.results.setdefault("fp8_matmul", [])
    info = b.results.setdefault("fp8_setup", {})
    cap = torch.cuda.get_device_capability()
    info["compute_capability"] = f"{cap[0]}.{cap[1]}"
    info["use_fast_accum"] = a.fast_accum
    info["timing"] = ("CUDA-graph replay of many calls, median of 5; weight copies rotated past L2; "
                      "activation quantisation not included")
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20)
    info["l2_bytes"] = l2
    rec_1x128, rec_128x128 = scaling_recipes(torch)
    info["functional_scaled_mm"] = bool(rec_1x128 and rec_128x128)
    fa = a.fast_accum
    bf16 = torch.bfloat16
    seen_errors = set()

    def note_error(scheme, api, m, e):
        key = (scheme, api, str(e)[:200])
        if key not in seen_errors:
            seen_errors.add(key)
            b.error("fp8", f"{scheme}/{api}/M{m}", e)

    g = torch.Generator(device="cuda")
    g.manual_seed(a.seed + 17)
    for proj, N, K in projection_shapes(config):
        if not b.within_budget(f"fp8 {proj}"):
            continue
        print(f"fp8 matmul: {proj} N={N} K={K}", flush=True)
        w = (torch.randn((N, K), device="cuda", generator=g) * 0.02).to(bf16)
        nw16 = max(1, min(16, math.ceil(2.5 * l2 / (N * K * 2))))
        nw8 = max(1, min(16, math.ceil(2.5 * l2 / (N * K))))
        w16 = [w.clone() for _ in range(nw16)]
        for M in a.fp8_m:
            row = {"proj": proj, "N": N, "K": K, "M": M, "flop": 2 * M * N * K}
            x = torch.randn((M, K), device="cuda", generator=g).to(bf16)
            try:
                ms, how = gpu_time_ms(b, lambda i: torch.matmul(x, w16[i].t()), nw16)
                row["bf16"] = {"ms": r(ms, 5), "tflops": r(2 * M * N * K / (ms / 1e3) / 1e12, 2), "timing": how}
            except Exception as e:
                note_error("bf16", "torch.matmul", M, e)
                if b.is_oom(e):
                    b.free()
            row["fp8"] = {}
            m16 = (M + 15) // 16 * 16
            for scheme, quant in (("blockwise_1x128_128x128", quant_blockwise), ("rowwise", quant_rowwise),
                                  ("tensorwise", quant_tensorwise)):
                done = False
                for m_run in ([M, m16] if m16 != M else [M]):
                    if done:
                        break
                    xr = x if m_run == M else torch.cat([x, torch.zeros((m_run - M, K), device="cuda", dtype=bf16)])
                    try:
                        xq, sa, wq, sb, x_deq, w_deq = quant(torch, xr, w)
                    except Exception as e:
                        note_error(scheme, "quantise", m_run, e)
                        break
                    wqs = [wq] + [wq.clone() for _ in range(nw8 - 1)]
                    calls = []
                    if scheme.startswith("blockwise"):
                        calls.append(("torch._scaled_mm", lambda i, sb=sb[0]: torch._scaled_mm(
                            xq, wqs[i].t(), sa, sb, out_dtype=bf16, use_fast_accum=fa)))
                        if rec_1x128 is not None and rec_128x128 is not None:
                            calls.append(("torch.nn.functional.scaled_mm", lambda i, sb=sb[1]: torch.nn.functional.scaled_mm(
                                xq, wqs[i].t(), sa, rec_1x128, sb, rec_128x128, output_dtype=bf16, use_fast_accum=fa)))
                    else:
                        calls.append(("torch._scaled_mm", lambda i: torch._scaled_mm(
                            xq, wqs[i].t(), sa, sb, out_dtype=bf16, use_fast_accum=fa)))
                    for api, fn in calls:
                        try:
                            out = fn(0)
                            b.sync()
                            ref = x_deq @ w_deq.t()
                            rel = ((out.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
                            del out, ref
                            ms, how = gpu_time_ms(b, fn, nw8)
                            row["fp8"][scheme] = {
                                "api": api, "M_run": m_run, "ms": r(ms, 5),
                                "tflops": r(2 * M * N * K / (ms / 1e3) / 1e12, 2),
                                "rel_err_vs_dequantised": r(rel, 6), "timing": how}
                            if m_run != M:
                                row["fp8"][scheme]["note"] = f"M padded from {M} to {m_run} (alignment); TFLOP/s use M={M}"
                            done = True
                            break
                        except Exception as e:
                            note_error(scheme, api, m_run, e)
                            if b.is_oom(e):
                                b.free()
                    del xq, sa, wq, sb, x_deq, w_deq, wqs, calls
            ran = [s for s in ("blockwise_1x128_128x128", "rowwise", "tensorwise") if s in row["fp8"]]
            row["scaling_ran"] = ran[0] if ran else None
            rows.append(row)
            del x
        del w, w16
        b.free()
        b.save()


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-".rjust(len(format(0.0, spec)))


def print_report(res):
    print()
    print(f"transformers {res.get('transformers')} / torch {res.get('torch')} on {res.get('device')}, "
          f"config {res.get('config')}, commit {res.get('commit')}")
    m = res.get("model", {})
    print(f"weights {m.get('weight_bytes', 0) / 1e9:.2f} GB streamed per step, d2d bandwidth "
          f"{res.get('d2d_bandwidth_gb_s') or 0:.0f} GB/s, attention {m.get('attn_implementation')}")
    dec = res.get("decode", [])
    if dec:
        print("\nDecode (prompt %s, %s new tokens; step = token after the first)" % (dec[0]["prompt_tokens"], dec[0]["new_tokens"]))
        print(f"{'variant':34} {'batch':>5} {'TTFT fwd':>9} {'TTFT gen':>9} {'ms/step':>9} {'tok/s':>9} {'floor ms':>9} {'of floor':>9}")
        for d in dec:
            frac = d.get("fraction_of_floor")
            print(f"{d['variant']:34} {d['batch']:>5} {fmt(d.get('ttft_forward_ms'), '9.2f')} "
                  f"{fmt(d.get('ttft_generate_ms'), '9.2f')} {fmt(d.get('decode_ms_per_step'), '9.3f')} "
                  f"{fmt(d.get('decode_tokens_per_s'), '9.1f')} {fmt(d.get('floor_ms_per_step'), '9.3f')} "
                  f"{(f'{100 * frac:8.1f}%') if frac else '        -'}")
    comp = res.get("compile", {})
    for c in comp.get("per_batch", []):
        print(f"compile batch {c['batch']}: first generate call {c['first_call_s']} s, compile about "
              f"{c['compile_s_estimate']} s ({c['compile_config']})")
    tt = res.get("ttft", [])
    if tt:
        print("\nTTFT (eager, batch 1, one prefill forward)")
        for t in tt:
            if "ttft_ms" in t:
                print(f"  prompt {t['prompt_tokens']:>6}: {t['ttft_ms']:9.2f} ms  ({t['prefill_tokens_per_s']:.0f} tok/s)")
            else:
                print(f"  prompt {t['prompt_tokens']:>6}: skipped ({t.get('skipped')})")
    fp = res.get("fp8_matmul", [])
    if fp:
        print("\nFP8 e4m3 torch._scaled_mm vs bf16 matmul (ms, TFLOP/s; * = M padded to 16)")
        print(f"{'proj':8} {'N':>6} {'K':>6} {'M':>5} | {'bf16':>8} {'TF/s':>6} | {'block':>8} {'TF/s':>6} | "
              f"{'row':>8} {'TF/s':>6} | {'tensor':>8} {'TF/s':>6}")
        for f in fp:
            cells = []
            for key in ("bf16", "blockwise_1x128_128x128", "rowwise", "tensorwise"):
                c = f.get("bf16") if key == "bf16" else f.get("fp8", {}).get(key)
                if c:
                    star = "*" if c.get("M_run", f["M"]) != f["M"] else " "
                    cells.append(f"{c['ms']:7.4f}{star} {c['tflops']:6.1f}")
                else:
                    cells.append(f"{'-':>8} {'-':>6}")
            print(f"{f['proj']:8} {f['N']:>6} {f['K']:>6} {f['M']:>5} | " + " | ".join(cells))
        apis = {c.get("api") for f in fp for k, c in f.get("fp8", {}).items() if k.startswith("block")}
        if apis:
            print(f"block scaling ran through: {', '.join(sorted(a for a in apis if a))}")
        errs = [c.get("rel_err_vs_dequantised") for f in fp for c in f.get("fp8", {}).values()]
        errs = [e for e in errs if e is not None]
        if errs:
            print(f"largest relative error against the dequantised product: {max(errs):.2e}")
    if res.get("errors"):
        print("\nFailed:")
        for e in res["errors"]:
            print(f"  [{e['stage']}/{e['variant']}] {e['error'][:300]}")
    if res.get("skipped"):
        print("\nSkipped:")
        for s in res["skipped"]:
            print("  " + s)


def main():
    args = parse_args()
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    b = Bench(args, torch)
    stem = os.path.splitext(os.path.basename(args.config))[0]
    b.out_path = os.path.join(os.path.abspath(args.out), f"transformers-{stem}.json")
    cfg_dict, dropped = load_config_dict(args.config)
    res = b.results
    res.update({
        "benchmark": "transformers_side_by_side",
        "config": stem,
        "config_path": args.config,
        "quantization_config_dropped": dropped,
        "device": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "decode_definition": "decode_ms_per_step = (generate N tokens - generate 1 token) / (N - 1), medians; "
                             "floor = (weight bytes + batch * (prompt + N/2) * KV bytes per token) / d2d bandwidth",
    })
    torch.manual_seed(args.seed)
    print(f"{res['device']}, torch {torch.__version__}, transformers {transformers.__version__}, config {stem}"
          + (" (quantization_config dropped: BF16 model)" if dropped else ""), flush=True)

    bw = None
    try:
        bw = measure_d2d_bandwidth(b)
        res["d2d_bandwidth_gb_s"] = r(bw, 1)
    except Exception as e:
        b.error("setup", "d2d_bandwidth", e)

    need_model = not (args.skip_eager and args.skip_compile and args.skip_ttft)
    model = config = facts = None
    if need_model:
        print("building the model (random bf16 weights on the GPU)", flush=True)
        model, config, attn, init_s = build_model(b, cfg_dict)
        facts = model_facts(model, config)
        res["model"] = {"params": facts[0], "weight_bytes": facts[1], "head_dim": facts[2],
                        "kv_bytes_per_token": facts[3], "dtype": "bfloat16", "attn_implementation": attn,
                        "init_s": r(init_s, 2), "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False))}
        print(f"  {facts[0] / 1e9:.2f} B parameters in {init_s:.1f} s, attention {attn}", flush=True)
    else:
        from transformers import Qwen3Config
        config = Qwen3Config.from_dict(dict(cfg_dict))
    b.save()

    if not args.skip_eager:
        stage_eager(b, model, facts, bw)
    if not args.skip_ttft:
        stage_ttft(b, model)
    if not args.skip_fp8:
        try:
            stage_fp8(b, config)
        except Exception as e:
            b.error("fp8", "stage", e)
            traceback.print_exc()
        b.save()
    # Last: compiling is the slowest and most fragile stage, and CUDA graphs it leaves behind should not
    # disturb the other measurements.
    if not args.skip_compile:
        try:
            stage_compile(b, model, facts, bw)
        except Exception as e:
            b.error("compile", "stage", e)
            traceback.print_exc()
    b.save()
    print_report(res)
    print(f"\nwrote {b.out_path} ({b.elapsed():.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
