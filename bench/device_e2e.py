"""The end-to-end part of the GPU device check (bench/device_check.sh calls it).

    python bench/device_e2e.py --output-json $OUT/device_e2e.json           # on the GPU machine
    python bench/device_e2e.py --smoke --output-json /tmp/e2e.json          # tiny shapes, any backend

On the card, in one run (no network needed: dummy weights, no tokenizer):
1. copy bandwidth (a jitted elementwise op over a large bf16 array: read + write bytes / time)
   and bf16 matmul rate (square matmul, 2·n³ / time);
2. HF transformers generate() with random bf16 weights of the same shapes (Llama-2-13B by
   default), at batch 1 and naive static batching of 8 (left padding, wait for the longest), on
   subsets of the workload; HF runs first and frees the card before JAX allocates;
3. jaxllm (dummy bf16 weights, same shapes): all requests at once (continuous batching);
4. batch-1 decode: one request alone, time per output token vs the weight-read roofline
   (weight bytes / measured copy bandwidth);
5. with --profile DIR: the same workload twice more under jax.profiler (jaxllm.profiling): its first
   12 steps (prefill chunks beside decodes) and 20 steady decode steps (nothing waiting); each trace
   summarised by bench/profile_report.py (device time per category: attention, matmul, sampling,
   cache writes, other; device idle = host overhead; top ops) into result["profile_mixed"] and
   ["profile_decode"]; --profile-only skips the timed run and the batch-1 decode;
6. with --article-requests N (issue 12's article-sized run, bench/article.py): N chat-like requests
   on the same engine (build it with --max-num-seqs 256 --max-model-len 2048), output and total
   tok/s, TTFT and inter-token latency P50/P99. --article-only runs 5 alone (after 1).
Prints a table and writes {"rows": [...], "micro": {...}, "roofline": {...}, "article": {...},
"machine": {...}, "profile_decode": {...}, "profile_mixed": {...}, "decode_attention": {...}} (the last:
the decode attention kernel the engine's warm-up timed and chose, jaxllm/runner/decode_tuning.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.article import add_article_args, print_article, requests_from_args, run_article  # noqa: E402
from bench.common import (BenchRequest, add_workload_args, log, machine_info, merge_json,  # noqa: E402
                          print_results, workload_from_args, write_json)
from bench.throughput import make_row  # noqa: E402  (the same row fields as the CPU comparison)


def micro_benchmarks(copy_bytes: int, matmul_n: int, reps: int) -> dict:
    """Copy bandwidth as bench/attention_kernels.py measures it (calls queued, one block), and a bf16 matmul."""
    import jax
    import jax.numpy as jnp

    from bench.attention_kernels import copy_bandwidth, time_call

    gbs = copy_bandwidth(copy_bytes, iters=10)
    a = jnp.ones((matmul_n, matmul_n), jnp.bfloat16)
    t_mm = time_call(jax.jit(lambda p, q: p @ q), (a, a), iters=reps)
    del a
    return {"copy_bytes": 2 * copy_bytes, "copy_s": 2 * copy_bytes / gbs / 1e9, "copy_gbytes_per_s": gbs,
            "matmul_n": matmul_n, "matmul_s": t_mm, "matmul_tflops": 2 * matmul_n ** 3 / t_mm / 1e12}


# ----- HF ---------------------------------------------------------------------------
def hf_model(preset: str, device: str, dtype: str = "bfloat16"):
    """Random weights of a dummy preset's shapes, born on `device` in `dtype` (also bench/latency.py's
    HF baseline for --load-format dummy)."""
    import torch
    import transformers

    from checkpoints.dummy import PRESETS

    spec = dict(PRESETS[preset])
    cfg = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    tdtype = getattr(torch, dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=tdtype)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def hf_run(model, reqs: list[BenchRequest], batch: int, device: str) -> float:
    from bench.throughput import hf_generate  # the same static batching as the CPU comparison

    return hf_generate(model, reqs, batch, pad_id=0, device=device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-json", help="write the result here (a file of its own)")
    ap.add_argument("--json", help="merge the result into this JSON file under --json-key (device_check.sh)")
    ap.add_argument("--json-key", default="e2e")
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes (CPU test of the script)")
    ap.add_argument("--model", default="llama-2-13b", help="dummy preset (checkpoints/dummy.py)")
    add_workload_args(ap)
    ap.add_argument("--hf-batch1-requests", type=int, default=4)
    ap.add_argument("--hf-batched-requests", type=int, default=16)
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--decode-tokens", type=int, default=128, help="batch-1 decode: output tokens")
    ap.add_argument("--copy-mib", type=int, default=2048)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--quantization", default=None, choices=("int8", "fp8", "int4"),
                    help="weight-only quantization (issue 17; int4: rounded at load, groups of 128)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"), help="KV cache element type (issue 17)")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the batch-1 decode vs the roofline (no HF, no 64-request run): for A/B of XLA flags")
    ap.add_argument("--no-warmup", action="store_true",
                    help="build the engine without compiling every bucket (with --decode-only: the KV block "
                         "count and a batch-1 decode at a fraction of the start-up)")
    ap.add_argument("--profile", metavar="DIR", help="trace the workload's first 12 steps and 20 steady decode steps "
                    "(two more runs of it) and summarise them (bench/profile_report.py)")
    ap.add_argument("--profile-only", action="store_true",
                    help="with --profile: no timed run, no batch-1 decode, no HF (a phase of its own)")
    add_article_args(ap)
    args = ap.parse_args(argv)
    if args.profile_only and not args.profile:
        ap.error("--profile-only needs --profile DIR")
    if args.profile_only:
        args.skip_hf = True
    if args.article_only:
        args.article_requests = args.article_requests or 512
        args.skip_hf = True
    if args.smoke:
        args.model, args.num_prompts, args.input_len, args.output_len = "tiny-llama", 6, "8..24", "4..8"
        args.hf_batch1_requests, args.hf_batched_requests, args.hf_batch_size = 2, 4, 2
        args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len = 8, 64, 128
        args.decode_tokens, args.copy_mib, args.matmul_n = 8, 8, 256
        if args.article_requests:  # the same draw scaled to the tiny engine (12 requests, <= 128 tokens)
            args.article_requests, args.article_input_mean, args.article_output_mean = 12, 16.0, 8.0
            args.article_max_prompt, args.article_max_total = 64, 128
    if args.article_requests and args.article_max_total > args.max_model_len:
        ap.error(f"--article-max-total={args.article_max_total} is invalid: above --max-model-len="
                 f"{args.max_model_len} (the article run needs --max-model-len 2048)")

    from checkpoints.dummy import dummy_config

    def save():  # after each phase: a timeout in a later phase keeps what was measured
        result["rows"] = rows
        if args.output_json:
            write_json(args.output_json, result)
        if args.json:
            merge_json(args.json, args.json_key, result)

    mc = dummy_config(args.model)
    reqs = workload_from_args(args, mc.vocab_size, seed=0)
    rows, result = [], {"model": args.model, "num_params": mc.num_params, "xla_flags": os.environ.get("XLA_FLAGS", "")}

    # HF first: torch frees the card before JAX preallocates its share.
    if not (args.skip_hf or args.decode_only):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        model = hf_model(args.model, device)
        log(f"HF {args.model} random bf16 on {device} in {time.perf_counter() - t0:.1f}s")
        hf_run(model, [BenchRequest([5] * 8, 2)], 1, device)  # warm-up
        sub = reqs[:args.hf_batch1_requests]
        rows.append(make_row("hf generate", sub, hf_run(model, sub, 1, device), 1, f"first {len(sub)} requests"))
        log(f"HF batch 1: {rows[-1]['output_tokens_per_s']:.1f} tok/s")
        sub = reqs[:args.hf_batched_requests]
        rows.append(make_row("hf generate", sub, hf_run(model, sub, args.hf_batch_size, device), args.hf_batch_size,
                        f"first {len(sub)} requests, static batches"))
        log(f"HF batch {args.hf_batch_size}: {rows[-1]['output_tokens_per_s']:.1f} tok/s")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        result["hf_device"] = device
        save()

    import jax

    from jaxllm.llm import LLM
    from jaxllm.runner import device_pool
    from jaxllm.sampling_params import SamplingParams

    device_pool.claim(args.gpu_memory_utilization)  # the engine's pool: before the micro-benchmarks start jax
    machine = machine_info()
    micro = micro_benchmarks(args.copy_mib << 20, args.matmul_n, reps=5)
    log(f"copy {micro['copy_gbytes_per_s']:.0f} GB/s, bf16 matmul {micro['matmul_tflops']:.1f} TFLOP/s")
    result.update({"micro": micro, "machine": machine})
    save()
    t0 = time.perf_counter()
    kw = dict(load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    if args.no_warmup:  # buckets compile on first use: the KV block count comes back in seconds
        from jaxllm.config import EngineConfig
        from jaxllm.engine.factory import build_engine

        llm = LLM(args.model, engine=build_engine(EngineConfig(model=args.model, **kw), warmup=False), **kw)
    else:
        llm = LLM(model=args.model, **kw)
    startup = time.perf_counter() - t0
    from jaxllm.engine.gc_heap import freeze_startup_heap
    freeze_startup_heap()  # as the servers run: no full-heap collection stalls in the timed runs
    result["config"] = {"quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
                        "kv_blocks": llm.engine.get_stats().num_blocks, "block_size": llm.engine.config.block_size}
    log(f"jaxllm {args.model} built{'' if args.no_warmup else ' and warm'} in {startup:.1f}s")
    result["engine_start_s"] = startup
    # the decode attention kernel warm-up picked (runner/decode_tuning.py: timings, dropped variants; None
    # with --no-warmup): {"mode": "tuned" | "env" | "skipped" | "failed", "group", "times_ms", ...}
    result["decode_attention"] = llm.engine.runner.decode_tuning
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0) for r in reqs]
    if args.profile_only:
        return profile_runs(llm, reqs, params, args.profile, result, save)
    if not (args.decode_only or args.article_only):
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs], params, use_tqdm=False)
        secs = time.perf_counter() - t0
        rows.insert(0, make_row("jaxllm", reqs, secs, f"<={args.max_num_seqs}", f"engine start {startup:.1f}s"))
        log(f"jaxllm: {rows[0]['output_tokens_per_s']:.1f} tok/s")
        save()

    if args.article_only:
        return article(llm.engine, args, result, save)

    # Batch-1 decode against the weight-read roofline.
    one = BenchRequest(reqs[0].prompt_token_ids[:128], args.decode_tokens)
    if args.no_warmup:  # compile this request's buckets outside the timing
        llm.generate([{"prompt_token_ids": one.prompt_token_ids}], SamplingParams(max_tokens=4, ignore_eos=True),
                     use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": one.prompt_token_ids}],
                       SamplingParams(max_tokens=one.output_len, ignore_eos=True, temperature=0.0), use_tqdm=False)[0]
    m = out.metrics
    per_tok = (m.finished_time - m.first_token_time) / max(1, one.output_len - 1)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(llm.engine.runner.state))
    roof = weight_bytes / (micro["copy_gbytes_per_s"] * 1e9)
    result["roofline"] = {"weight_bytes": weight_bytes, "decode_s_per_token": per_tok,
                          "decode_tokens_per_s": 1 / per_tok, "roofline_s_per_token": roof,
                          "fraction_of_roofline": roof / per_tok}
    rows.append(make_row("jaxllm batch-1 decode", [one], per_tok * (one.output_len - 1), 1,
                    f"{1e3 * per_tok:.2f} ms/token vs weight-read roofline {1e3 * roof:.2f} ms "
                    f"({100 * roof / per_tok:.0f}%)"))

    ratios = {}
    for r in rows:
        if r["system"] == "hf generate" and rows[0]["system"] == "jaxllm":
            ratios[f"jaxllm_vs_hf_batch{r['batch']}"] = rows[0]["output_tokens_per_s"] / r["output_tokens_per_s"]
    cols = [("system", "system", ""), ("batch", "batch", ""), ("requests", "reqs", ""),
            ("output_tokens", "out tok", ""), ("elapsed_s", "secs", ".2f"),
            ("output_tokens_per_s", "output tok/s", ".1f"), ("total_tokens_per_s", "total tok/s", ".1f")]
    print(f"\n{machine.get('device')} ({machine.get('backend')}), model {args.model} dummy bf16")
    print(f"copy bandwidth {micro['copy_gbytes_per_s']:.1f} GB/s; bf16 matmul {micro['matmul_tflops']:.1f} TFLOP/s "
          f"(n={args.matmul_n})")
    print_results(rows, cols, ratios)
    result.update({"rows": rows, "ratios": ratios, "micro": micro, "machine": machine, "engine_start_s": startup})
    save()
    if args.profile:
        profile_runs(llm, reqs, params, args.profile, result, save)
    return article(llm.engine, args, result, save) if args.article_requests else 0


def profile_runs(llm, reqs, params, root: str, result: dict, save) -> int:
    """The workload twice under jax.profiler: its first 12 steps of any kind ("mixed": prefill chunks
    beside decodes) and 20 steady decode steps ("decode"); each trace summarised by
    bench/profile_report.py into result["profile_<name>"] (per-step device time by category, idle =
    host overhead, top ops). Returns 1 when a trace left no report."""
    from bench.profile_report import render, report_dir
    from jaxllm.profiling import EngineProfiler

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    rc = 0
    for name, mode, skip, steps in (("decode", "decode", 2, 20), ("mixed", "any", 0, 12)):
        out_dir = os.path.join(root, name)
        prof = EngineProfiler(llm.engine, out_dir, num_steps=steps, mode=mode, skip=skip)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        if prof.finish() is None:
            log(f"profile {name}: nothing traced")
            rc = 1
            continue
        report, measured, trace_path = report_dir(out_dir, top=12)  # the trace, the steps, the bucket's HLO
        log(f"profile {name}: {len(measured['steps'])} steps traced, run + summary {time.perf_counter() - t0:.1f}s")
        print(f"\n-- profile: {name} --\n" + render(report, measured, trace_path))
        result[f"profile_{name}"] = report
        save()
    return rc


def article(engine, args, result: dict, save) -> int:
    """The article-sized run on this engine, stored under result["article"] (bench/article.py)."""
    reqs = requests_from_args(args, engine.vocab_size)
    deadline = args.article_deadline_s
    if args.article_stop_by:  # the caller's own timeout: stop in time to write what was measured
        deadline = min(deadline, args.article_stop_by - time.time())
    res = run_article(engine, reqs, deadline)
    res["max_num_seqs"], res["max_model_len"] = args.max_num_seqs, args.max_model_len
    result["article"] = res
    save()
    print_article(res, args.max_num_seqs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
