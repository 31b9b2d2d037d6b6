"""Prefix caching on vs off: a shared ~2,000-token system prompt plus distinct questions.

    python bench/prefix_cache.py --model smollm2-135m --num-questions 16 --prefix-len 2000 \\
        --question-len 20..60 --output-len 32 --output-json /tmp/prefix.json

Two phases per setting, on one compiled runner (caching is host-side only, so both engines share
the same model, KV buffers and executables; "off" runs first, so nothing is cached for it):
- batch: every request submitted at once (offline throughput): seconds, output and total tok/s,
  TTFT (arrival → first token, mean/P50/P90), prompt tokens served from the cache;
- sequential: --sequential requests one after another (an idle server): TTFT of each, which
  with caching on is the prefill of the question alone.
Prompts are seeded random plain-vocabulary tokens (same workload for both settings); ignore_eos.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (FIRST_PLAIN_TOKEN, format_table, log, loadavg, log_machine, parse_range,  # noqa: E402
                          summarize, write_json)


def make_prompts(vocab: int, prefix_len: int, num: int, question_len: tuple[int, int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo = min(FIRST_PLAIN_TOKEN, vocab // 2)
    prefix = [rng.randrange(lo, vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(lo, vocab) for _ in range(rng.randint(*question_len))] for _ in range(num)]


def run_batch(llm, prompts, params) -> dict:
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    secs = time.perf_counter() - t0
    return _row(outs, secs)


def run_sequential(llm, prompts, params) -> dict:
    outs, secs = [], 0.0
    for p, sp in zip(prompts, params):
        t0 = time.perf_counter()
        outs += llm.generate([{"prompt_token_ids": p}], [sp], use_tqdm=False)
        secs += time.perf_counter() - t0
    return _row(outs, secs)


def _row(outs, secs: float) -> dict:
    n_prompt = sum(len(o.prompt_token_ids) for o in outs)
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs
            if o.metrics and o.metrics.first_token_time is not None]
    t = summarize(ttft)
    return {"requests": len(outs), "prompt_tokens": n_prompt, "output_tokens": n_out,
            "cached_tokens": sum(o.num_cached_tokens for o in outs), "elapsed_s": secs,
            "requests_per_s": len(outs) / secs, "output_tokens_per_s": n_out / secs,
            "total_tokens_per_s": (n_prompt + n_out) / secs, "ttft_mean_ms": 1e3 * t["mean"],
            "ttft_p50_ms": 1e3 * t["p50"], "ttft_p90_ms": 1e3 * t["p90"]}


COLUMNS = [("caching", "prefix caching", ""), ("phase", "phase", ""), ("requests", "reqs", ""),
           ("prompt_tokens", "prompt tok", ""), ("cached_tokens", "cached tok", ""),
           ("elapsed_s", "secs", ".2f"), ("output_tokens_per_s", "output tok/s", ".1f"),
           ("total_tokens_per_s", "total tok/s", ".1f"), ("ttft_mean_ms", "TTFT mean ms", ".1f"),
           ("ttft_p50_ms", "TTFT P50 ms", ".1f"), ("ttft_p90_ms", "TTFT P90 ms", ".1f")]


def build_parser():
    from jaxllm.generate import add_engine_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-questions", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=2000, help="shared system prompt tokens")
    ap.add_argument("--question-len", default="20..60")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--sequential", type=int, default=4, help="requests run one at a time (0 = skip)")
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument("--output-json")
    ap.add_argument("--profile", metavar="DIR", help="trace steps of the caching-on batch run")
    ap.add_argument("--profile-steps", type=int, default=20)
    add_engine_args(ap)
    return ap


def main(argv=None) -> int:
    import msgspec

    from jaxllm.engine.engine import LLMEngine
    from jaxllm.generate import engine_config_from_args
    from jaxllm.llm import LLM
    from jaxllm.sampling_params import SamplingParams

    args = build_parser().parse_args(argv)
    machine = log_machine()
    cfg = engine_config_from_args(args)
    t0 = time.perf_counter()
    llm_on = LLM(**msgspec.structs.asdict(msgspec.structs.replace(cfg, enable_prefix_caching=True)))
    startup = time.perf_counter() - t0
    eng_on = llm_on.engine
    # Same runner (weights, KV buffers, executables), caching off in the host KV manager only.
    off_cfg = msgspec.structs.replace(eng_on.config, enable_prefix_caching=False)
    llm_off = LLM(model=off_cfg.model, engine=LLMEngine(off_cfg, eng_on.runner, eng_on.tokenizer),
                  **{k: v for k, v in msgspec.structs.asdict(off_cfg).items() if k != "model"})

    prompts = make_prompts(eng_on.vocab_size, args.prefix_len, args.num_questions + args.sequential,
                           parse_range(args.question_len), args.workload_seed)
    if len(prompts[0]) >= eng_on.max_model_len:
        raise SystemExit(f"prefix {args.prefix_len} + question does not fit max_model_len={eng_on.max_model_len}")
    batch_p, seq_p = prompts[:args.num_questions], prompts[args.num_questions:]
    params = [SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)] * len(prompts)
    log(f"workload: {len(batch_p)} batch + {len(seq_p)} sequential requests, prefix {args.prefix_len} tokens; "
        f"engine built in {startup:.1f}s")

    rows = []
    for caching, llm in (("off", llm_off), ("on", llm_on)):
        prof = None
        if caching == "on" and args.profile:
            from jaxllm.profiling import EngineProfiler
            prof = EngineProfiler(llm.engine, args.profile, num_steps=args.profile_steps, mode="any", skip=0)
        r = run_batch(llm, batch_p, params[:len(batch_p)])
        if prof is not None:
            prof.finish()
        rows.append({"caching": caching, "phase": "batch", **r, "load": loadavg()})
        log(f"caching {caching}, batch: {r['total_tokens_per_s']:.0f} total tok/s, TTFT mean {r['ttft_mean_ms']:.0f} ms")
        if seq_p:
            r = run_sequential(llm, seq_p, params[:len(seq_p)])
            rows.append({"caching": caching, "phase": "sequential", **r, "load": loadavg()})
            log(f"caching {caching}, sequential: TTFT mean {r['ttft_mean_ms']:.0f} ms")

    speedups = {}
    for phase in ("batch", "sequential"):
        on = next((r for r in rows if r["caching"] == "on" and r["phase"] == phase), None)
        off = next((r for r in rows if r["caching"] == "off" and r["phase"] == phase), None)
        if on and off:
            speedups[f"{phase}_throughput_x"] = on["total_tokens_per_s"] / off["total_tokens_per_s"]
            speedups[f"{phase}_ttft_mean_x"] = off["ttft_mean_ms"] / on["ttft_mean_ms"]
    print()
    print(format_table(rows, COLUMNS))
    for k, v in speedups.items():
        print(f"caching on vs off, {k.replace('_x', '')}: {v:.2f}x")
    print(f"engine start {startup:.1f}s; prefix cache hit rate (on): {eng_on.kv.prefix_hit_rate:.3f}; "
          f"load average now {loadavg()}")
    if args.output_json:
        write_json(args.output_json, {"rows": rows, "speedups": speedups, "machine": machine,
                                      "workload": {"num_questions": args.num_questions, "prefix_len": args.prefix_len,
                                                   "question_len": args.question_len, "output_len": args.output_len,
                                                   "sequential": args.sequential, "seed": args.workload_seed}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
