"""N-gram speculative decoding vs plain decoding on the real engine (SmolLM2-135M by default).

    JAX_PLATFORMS=cpu python bench/spec_decode.py                   # batch 1 and 8, both workloads
    JAX_PLATFORMS=cpu python bench/spec_decode.py --batch 1 --max-tokens 64 --k 4

One build with ``speculative_config`` (so the mixed buckets hold 1 + K rows per sequence), then, per
(workload, batch), a plain LLMEngine and a speculative one around the SAME runner and tokenizer,
run back to back on the same greedy requests: generated tokens/s over the whole run (prefill
included), steps, mean tokens per sequence-step with drafts (accepted drafts + 1), and whether the
outputs are identical token for token. Workloads: "repeat" (the model is asked to repeat a
paragraph: prompt lookup finds the continuation in the prompt) and "chat" (open questions).
Synchronous steps in both modes (speculation runs synchronously; async is off on CPU anyway).
"""
from __future__ import annotations

import argparse
import os
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=4)
    ap.add_argument("--lookup-min", type=int, default=1)
    ap.add_argument("--workloads", nargs="*", default=["repeat", "chat"])
    args = ap.parse_args()

    from jaxllm.config import EngineConfig
    from jaxllm.engine.engine import LLMEngine
    from jaxllm.engine.factory import build_engine

    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max,
            "prompt_lookup_min": args.lookup_min}
    kw = dict(max_model_len=1024, max_num_seqs=max(args.batch), max_num_batched_tokens=256)
    t0 = time.perf_counter()
    built = build_engine(EngineConfig(model=args.model, speculative_config=spec, **kw))
    print(f"build + warm-up: {time.perf_counter() - t0:.1f}s; buckets: {built.runner.buckets.describe()}")
    runner, tok = built.runner, built.tokenizer
    compiled = runner.compile_count
    mc = built.config
    print(f"{'workload':8} {'batch':>5} {'mode':5} {'tok/s':>7} {'steps':>6} {'tokens':>7} {'mean acc':>8} same")
    for wl in args.workloads:
        texts = REPEAT if wl == "repeat" else CHAT
        for b in args.batch:
            prompts = [tok.apply_chat_template([{"role": "user", "content": texts[i % len(texts)]}])
                       for i in range(b)]
            res = {}
            for mode in ("plain", "spec"):
                cfg = EngineConfig(model=mc.model, max_model_len=mc.max_model_len, max_num_seqs=mc.max_num_seqs,
                                   max_num_batched_tokens=mc.max_num_batched_tokens, block_size=mc.block_size,
                                   async_scheduling=False, speculative_config=spec if mode == "spec" else None)
                eng = LLMEngine(cfg, runner, tok)
                outs, dt, steps = run(eng, prompts, args.max_tokens)
                n = sum(len(v) for v in outs.values())
                res[mode] = outs
                acc = f"{eng.mean_accepted_tokens:8.2f}" if mode == "spec" else f"{'':8}"
                same = "" if mode == "plain" else ("yes" if outs == res["plain"] else "NO")
                print(f"{wl:8} {b:5d} {mode:5} {n / dt:7.1f} {steps:6d} {n:7d} {acc} {same}", flush=True)
    print(f"compiled after warm-up: {runner.compile_count - compiled}")


if __name__ == "__main__":
    main()
