"""The article-sized run (issue 12): chat-like requests through one engine, every token's arrival stamped.

bench/device_e2e.py runs it on its engine (``--article-requests 512``, with ``--max-num-seqs 256
--max-model-len 2048``) after the 64-request workload and the batch-1 decode; ``--article-only``
runs it alone. Reported, as the vLLM article's table (../shared/reference/vllm-article.txt:
"Throughput (tokens/s), P50 latency, P99 latency" in ms per token): output tok/s and total tok/s
over the run, TTFT P50/P99 and inter-token latency (ITL) P50/P99.

Workload (offline, like the article's throughput column): every request is added at t=0, greedy,
ignore_eos, so each produces exactly its drawn output length. Lengths are drawn like a chat
workload: lognormal with the ShareGPT means that the vLLM paper reports (Kwon et al., SOSP 2023,
"Efficient Memory Management for Large Language Model Serving with PagedAttention", section 6.1,
Figure 11: ShareGPT mean input 161.31, mean output 337.99 tokens) and sigma 1.0 for both (a heavy right
tail; an assumption, not a fit), then vLLM's own ShareGPT filter (benchmarks' sample_requests:
a pair is redrawn when prompt or output < 4 tokens, prompt > 1024, or prompt + output > 2048).
Seed 0, 512 requests: see ``chat_requests`` for the realised means (printed by every run).

Timing: ``LLMEngine.step`` returns cumulative outputs; after each step every request whose token
count grew gets ``perf_counter()`` stamped on its new tokens (the client's view; with async
scheduling a token shows up one step after the device made it). TTFT = first stamp - submission,
ITL = the gaps between consecutive stamps of one request (all of them, pooled), TPOT = per-request
(last - first) / (n - 1). ``--article-deadline-s`` bounds the run: what is unfinished then is
aborted, and the figures cover the tokens made until then (``truncated``: true).
"""
from __future__ import annotations

import math
import random
import time

from bench.common import FIRST_PLAIN_TOKEN, BenchRequest, log, summarize

# vLLM paper, section 6.1 (ShareGPT); the filter bounds of vLLM's benchmarks/benchmark_throughput.py.
SHAREGPT_INPUT_MEAN = 161.31
SHAREGPT_OUTPUT_MEAN = 337.99
CHAT_SIGMA = 1.0
MIN_LEN, MAX_PROMPT, MAX_TOTAL = 4, 1024, 2048


def add_article_args(ap) -> None:
    ap.add_argument("--article-requests", type=int, default=0,
                    help="the article-sized run: this many chat-like requests after the other runs (0: off)")
    ap.add_argument("--article-only", action="store_true",
                    help="only the article-sized run on the engine (no HF, no 64-request run, no batch-1 decode)")
    ap.add_argument("--article-deadline-s", type=float, default=100.0,
                    help="abort what is unfinished after this many seconds and report what was made")
    ap.add_argument("--article-stop-by", type=float, default=None,
                    help="unix time by which the article run stops (device_check.sh: its phase timeout less 10 s)")
    ap.add_argument("--article-input-mean", type=float, default=SHAREGPT_INPUT_MEAN)
    ap.add_argument("--article-output-mean", type=float, default=SHAREGPT_OUTPUT_MEAN)
    ap.add_argument("--article-max-prompt", type=int, default=MAX_PROMPT)
    ap.add_argument("--article-max-total", type=int, default=MAX_TOTAL)


def lognormal_mu(mean: float, sigma: float) -> float:
    """mu of a lognormal with this mean and sigma (mean = exp(mu + sigma^2 / 2))."""
    return math.log(mean) - sigma * sigma / 2


def chat_lengths(num: int, seed: int = 0, input_mean: float = SHAREGPT_INPUT_MEAN,
                 output_mean: float = SHAREGPT_OUTPUT_MEAN, sigma: float = CHAT_SIGMA,
                 max_prompt: int = MAX_PROMPT, max_total: int = MAX_TOTAL) -> list[tuple[int, int]]:
    """`num` (prompt_len, output_len) pairs: each length lognormal(mean, sigma) rounded, the pair
    redrawn until it passes vLLM's ShareGPT filter (both >= 4, prompt <= max_prompt, sum <= max_total).
    Same seed -> same pairs on every machine (Python's Mersenne Twister)."""
    if max_prompt < MIN_LEN or max_total < max_prompt + MIN_LEN:
        raise ValueError(f"max_prompt={max_prompt}, max_total={max_total} are invalid: need "
                         f"max_prompt >= {MIN_LEN} and max_total >= max_prompt + {MIN_LEN}")
    rng = random.Random(seed)
    mu_in, mu_out = lognormal_mu(input_mean, sigma), lognormal_mu(output_mean, sigma)
    out = []
    while len(out) < num:
        p = round(rng.lognormvariate(mu_in, sigma))
        o = round(rng.lognormvariate(mu_out, sigma))
        if p < MIN_LEN or o < MIN_LEN or p > max_prompt or p + o > max_total:
            continue
        out.append((p, o))
    return out


def chat_requests(num: int, vocab_size: int, seed: int = 0, **kw) -> list[BenchRequest]:
    """chat_lengths' pairs with prompt tokens drawn uniformly from the plain vocabulary (seeded)."""
    rng = random.Random(seed + 1)
    lo_tok = min(FIRST_PLAIN_TOKEN, vocab_size // 2)
    return [BenchRequest([rng.randrange(lo_tok, vocab_size) for _ in range(p)], o)
            for p, o in chat_lengths(num, seed, **kw)]


def requests_from_args(args, vocab_size: int) -> list[BenchRequest]:
    return chat_requests(args.article_requests, vocab_size, seed=0, input_mean=args.article_input_mean,
                         output_mean=args.article_output_mean, max_prompt=args.article_max_prompt,
                         max_total=args.article_max_total)


def latency_stats(stamps: dict[str, list[float]], t_submit: float) -> dict:
    """Per-request token stamps (perf_counter s) -> TTFT, ITL and TPOT summaries in ms."""
    ttft, itl, tpot = [], [], []
    for ts in stamps.values():
        if not ts:
            continue
        ttft.append(1e3 * (ts[0] - t_submit))
        itl.extend(1e3 * (b - a) for a, b in zip(ts, ts[1:]))
        if len(ts) > 1:
            tpot.append(1e3 * (ts[-1] - ts[0]) / (len(ts) - 1))
    return {"ttft_ms": summarize(ttft), "itl_ms": summarize(itl), "tpot_ms": summarize(tpot)}


def run_article(engine, reqs: list[BenchRequest], deadline_s: float) -> dict:
    """Add every request at once, step the engine to the end (or the deadline), stamp each token."""
    from jaxllm.sampling_params import SamplingParams

    if engine.has_unfinished_requests():
        raise RuntimeError("the engine must be idle: the article run times its own requests only")
    compiles0 = getattr(engine.runner, "compile_count", 0)
    preempt0 = engine.get_stats().num_preemptions
    ids = [f"article-{i}" for i in range(len(reqs))]
    stamps: dict[str, list[float]] = {rid: [] for rid in ids}
    t_submit = time.perf_counter()
    for rid, r in zip(ids, reqs):
        engine.add_request(rid, {"prompt_token_ids": r.prompt_token_ids},
                           SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0,
                                          detokenize=False))
    truncated, steps = False, 0
    while engine.has_unfinished_requests():
        if time.perf_counter() - t_submit > deadline_s:
            truncated = True
            engine.abort_request(ids)  # finished ids are a no-op
            break
        outs = engine.step()
        now = time.perf_counter()
        steps += 1
        for out in outs:
            ts = stamps.get(out.request_id)
            if ts is not None:
                ts.extend([now] * (len(out.outputs[0].token_ids) - len(ts)))
    elapsed = time.perf_counter() - t_submit
    out_tok = sum(len(ts) for ts in stamps.values())
    # prompt tokens count once their request has its first token (its prefill is done)
    in_tok = sum(r.prompt_len for rid, r in zip(ids, reqs) if stamps[rid])
    done = sum(len(stamps[rid]) == r.output_len for rid, r in zip(ids, reqs))
    if not truncated and done != len(reqs):
        raise RuntimeError(f"article run: {done} of {len(reqs)} requests produced their drawn length "
                           f"(ignore_eos should force it)")
    res = {"requests": len(reqs), "completed": done, "truncated": truncated, "deadline_s": deadline_s,
           "elapsed_s": elapsed, "steps": steps, "prompt_tokens": in_tok, "output_tokens": out_tok,
           "output_tokens_per_s": out_tok / elapsed, "total_tokens_per_s": (in_tok + out_tok) / elapsed,
           "workload": workload_summary(reqs),
           "preemptions": engine.get_stats().num_preemptions - preempt0,
           "compiles": getattr(engine.runner, "compile_count", 0) - compiles0,
           **latency_stats(stamps, t_submit)}
    log(f"article run: {out_tok} output tokens in {elapsed:.1f}s = {res['output_tokens_per_s']:.1f} tok/s"
        f"{' (TRUNCATED at the deadline)' if truncated else ''}; ITL p50 {res['itl_ms']['p50']:.1f} ms, "
        f"p99 {res['itl_ms']['p99']:.1f} ms")
    return res


def workload_summary(reqs: list[BenchRequest]) -> dict:
    p = [r.prompt_len for r in reqs]
    o = [r.output_len for r in reqs]
    return {"prompt_tokens": sum(p), "output_tokens": sum(o), "prompt_mean": sum(p) / len(p),
            "output_mean": sum(o) / len(o), "prompt_max": max(p), "output_max": max(o),
            "max_total": max(a + b for a, b in zip(p, o))}


def print_article(res: dict, max_num_seqs) -> None:
    """The vLLM article's columns: throughput and per-token latency percentiles."""
    w = res["workload"]
    print(f"\narticle-sized run: {res['requests']} chat-like requests (prompt mean {w['prompt_mean']:.0f}, "
          f"output mean {w['output_mean']:.0f} tokens), max_num_seqs {max_num_seqs}, all at t=0"
          f"{'; TRUNCATED at the deadline: ' + str(res['completed']) + ' completed' if res['truncated'] else ''}")
    print(f"{'output tok/s':>12}  {'total tok/s':>11}  {'TTFT P50':>9}  {'TTFT P99':>9}  {'ITL P50':>8}  "
          f"{'ITL P99':>8}  {'TPOT P50':>8}  {'TPOT P99':>8}")
    print(f"{res['output_tokens_per_s']:>12.1f}  {res['total_tokens_per_s']:>11.1f}  "
          f"{res['ttft_ms']['p50']:>6.0f} ms  {res['ttft_ms']['p99']:>6.0f} ms  {res['itl_ms']['p50']:>5.1f} ms  "
          f"{res['itl_ms']['p99']:>5.1f} ms  {res['tpot_ms']['p50']:>5.1f} ms  {res['tpot_ms']['p99']:>5.1f} ms")
    print(f"  {res['output_tokens']} output + {res['prompt_tokens']} prompt tokens in {res['elapsed_s']:.1f}s, "
          f"{res['steps']} steps, {res['preemptions']} preemptions, {res['compiles']} compiles")
