"""N-gram speculative decoding vs plain decoding on the real engine (SmolLM2-135M by default).

    JAX_PLATFORMS=cpu python bench/spec_decode.py                   # batch 1 and 8, both workloads
    JAX_PLATFORMS=cpu python bench/spec_decode.py --batch 1 --max-tokens 64 --k 4
    python bench/spec_decode.py --model llama-2-13b --load-format dummy --dtype bfloat16 --json OUT.json

One build with ``speculative_config`` (so the runner has draft buckets and mixed buckets holding
1 + K rows per sequence), then, per (workload, batch), a plain LLMEngine and a speculative one
around the SAME runner and tokenizer, run back to back on the same greedy requests: generated
tokens/s over the whole run (prefill included), steps, mean tokens per sequence-step with drafts
(accepted drafts + 1), draft tokens, and whether the outputs are identical token for token.
prompt_lookup_min/max default to vLLM's (5 and 5 when neither is given). Mode "nobackoff" (in
--modes) is "spec" without the low-acceptance pause (engine/spec_backoff.py).
Workloads: "repeat" (the model is asked to repeat a paragraph: prompt lookup finds the
continuation in the prompt) and "chat" (open questions). With --load-format dummy there is no
tokenizer: "repeat" is a random 48-token paragraph three times, "chat" 48 random tokens; random
weights make the greedy continuation unrelated to the prompt, so acceptance there measures how
often a random model loops on its own output, not prompt lookup on real text.
Synchronous steps in both modes (speculation runs synchronously; async is off on CPU anyway).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARAGRAPH = ("The scheduler hands out tokens under a budget. Running requests come first, in arrival "
             "order; when the cache runs out of blocks, the latest arrival is preempted and recomputed "
             "later from its prompt and the tokens it has produced so far.")
REPEAT = [f"Repeat the following paragraph exactly, word for word, {i + 1} time(s):\n\n{PARAGRAPH}"
          for i in range(8)]
CHAT = ["What is the capital of France?", "Write a short poem about the sea.", "Explain what a hash map is.",
        "Give three tips for learning to cook.", "Why is the sky blue?", "Describe your ideal weekend.",
        "What does a compiler do?", "Tell me a fun fact about octopuses."]


def run(engine, prompts, max_tokens):
    from jaxllm.sampling_params import SamplingParams

    p = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    for i, ids in enumerate(prompts):
        engine.add_request(f"q{i}", {"prompt_token_ids": ids}, p)
    steps0, t0 = engine.num_steps, time.perf_counter()
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    dt = time.perf_counter() - t0
    return outs, dt, engine.num_steps - steps0


def prompts_for(workload: str, batch: int, tok, dummy: bool, vocab: int) -> list[list[int]]:
    if dummy:  # token ids only: no tokenizer, no chat template
        rng = random.Random(0)
        para = [rng.randrange(3, vocab) for _ in range(48)]
        if workload == "repeat":
            return [para * 3 for _ in range(batch)]
        return [[rng.randrange(3, vocab) for _ in range(48)] for _ in range(batch)]
    texts = REPEAT if workload == "repeat" else CHAT
    return [tok.apply_chat_template([{"role": "user", "content": texts[i % len(texts)]}]) for i in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="auto", help="'dummy': random weights of a preset's shapes")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=None, help="prompt_lookup_max (vLLM's default when unset)")
    ap.add_argument("--lookup-min", type=int, default=None, help="prompt_lookup_min (vLLM's default when unset)")
    ap.add_argument("--workloads", nargs="*", default=["repeat", "chat"])
    ap.add_argument("--modes", nargs="*", default=["plain", "spec"], choices=["plain", "spec", "nobackoff"])
    ap.add_argument("--json", help="merge the results into this JSON file under --json-key (device_check.sh)")
    ap.add_argument("--json-key", default="spec_decode")
    ap.add_argument("--smoke", action="store_true", help="tiny dummy model, 8 tokens, K=2, a 64-token step budget "
                    "(device_check.sh's CPU flow: 5 step buckets to compile instead of 7)")
    args = ap.parse_args()
    token_budget = 256
    if args.smoke:
        args.model, args.load_format, args.max_tokens, args.kv_cache_memory_bytes = "tiny-llama", "dummy", 8, 1 << 20
        args.k, token_budget = 2, 64  # mixed T in [64] (not [64, 256]); draft T in [8, 16, 24] (not up to 40)

    from jaxllm.config import EngineConfig
    from jaxllm.engine.engine import LLMEngine
    from jaxllm.engine.factory import build_engine

    spec = {"method": "ngram", "num_speculative_tokens": args.k}
    if args.lookup_max is not None:
        spec["prompt_lookup_max"] = args.lookup_max
    if args.lookup_min is not None:
        spec["prompt_lookup_min"] = args.lookup_min
    kw = dict(max_model_len=1024, max_num_seqs=max(args.batch), max_num_batched_tokens=token_budget,
              load_format=args.load_format, dtype=args.dtype)
    if args.kv_cache_memory_bytes:
        kw["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    t0 = time.perf_counter()
    built = build_engine(EngineConfig(model=args.model, speculative_config=spec, **kw))
    startup = time.perf_counter() - t0
    sc = built.speculative
    print(f"build + warm-up: {startup:.1f}s; buckets: {built.runner.buckets.describe()}; K={sc.num_speculative_tokens}"
          f", prompt_lookup {sc.prompt_lookup_min}..{sc.prompt_lookup_max}")
    runner, tok = built.runner, built.tokenizer
    compiled = runner.compile_count
    mc = built.config
    doc = {"model": args.model, "load_format": args.load_format, "engine_start_s": round(startup, 1),
           "speculative_config": {"num_speculative_tokens": sc.num_speculative_tokens,
                                  "prompt_lookup_min": sc.prompt_lookup_min, "prompt_lookup_max": sc.prompt_lookup_max},
           "buckets": runner.buckets.describe(), "max_tokens": args.max_tokens, "rows": []}

    def save():
        if args.json:
            from bench.common import merge_json

            merge_json(args.json, args.json_key, doc)

    save()
    print(f"{'workload':8} {'batch':>5} {'mode':9} {'tok/s':>7} {'steps':>6} {'tokens':>7} {'drafts':>6} "
          f"{'mean acc':>8} same")
    for wl in args.workloads:
        for b in args.batch:
            prompts = prompts_for(wl, b, tok, args.load_format == "dummy", runner.vocab_size)
            res = {}
            for mode in args.modes:
                cfg = EngineConfig(model=mc.model, max_model_len=mc.max_model_len, max_num_seqs=mc.max_num_seqs,
                                   max_num_batched_tokens=mc.max_num_batched_tokens, block_size=mc.block_size,
                                   async_scheduling=False, speculative_config=None if mode == "plain" else spec)
                eng = LLMEngine(cfg, runner, tok)
                if mode == "nobackoff":
                    eng.spec_backoff = None
                outs, dt, steps = run(eng, prompts, args.max_tokens)
                n = sum(len(v) for v in outs.values())
                res[mode] = outs
                same = None if mode == "plain" or "plain" not in res else outs == res["plain"]
                row = {"workload": wl, "batch": b, "mode": mode, "tok_per_s": round(n / dt, 2), "steps": steps,
                       "tokens": n, "draft_tokens": eng.num_draft_tokens,
                       "mean_accepted": round(eng.mean_accepted_tokens, 3), "same_output": same}
                doc["rows"].append(row)
                save()
                acc = f"{eng.mean_accepted_tokens:8.2f}" if mode != "plain" else f"{'':8}"
                print(f"{wl:8} {b:5d} {mode:9} {n / dt:7.1f} {steps:6d} {n:7d} {eng.num_draft_tokens:6d} {acc} "
                      f"{'' if same is None else ('yes' if same else 'NO')}", flush=True)
    doc["compiled_after_warmup"] = runner.compile_count - compiled
    save()
    print(f"compiled after warm-up: {doc['compiled_after_warmup']}")
    if any(r["same_output"] is False for r in doc["rows"]) or doc["compiled_after_warmup"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
