"""bad_words' cost: decode throughput with and without bad words, same engine, same run.

    JAX_PLATFORMS=cpu python bench/bad_words.py                 # SmolLM2, 8 sequences x 64 tokens

``--num-seqs`` requests (greedy, ignore_eos, exactly ``--output-len`` tokens each) run once free and
once with the same ``--num-words`` bad words each (sea-story words: one-token words banned every
step, multi-token ones whose last token is banned when the generated tail matches), alternating
for ``--rounds`` timed rounds after one warm-up round of each. The bans ride in the sampler's
existing mask input: the bench asserts that nothing compiles or retraces while it runs. It also counts how often the free run produced a bad word, and checks the
constrained run never does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# 8 words of one token in SmolLM2's vocabulary (both spellings), then 8 of two or three (the
# as-is spelling; vLLM's rule drops a spaced spelling of another length)
WORDS = ["the", "and", "of", "was", "ocean", "waves", "storm", "ship",
         "sailor", "captain", "lighthouse", "seagull", "treasure", "mermaid", "island", "whale"]


def occurrences(seqs, ids) -> int:
    return sum(ids[k:k + len(s)] == list(s) for s in seqs for k in range(len(ids)))


def main(argv=None) -> int:
    from bench.common import log_machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model (default: smollm2-135m)")
    ap.add_argument("--num-seqs", type=int, default=8, help="sequences, all in one batch (default: 8)")
    ap.add_argument("--output-len", type=int, default=64, help="tokens per sequence (default: 64)")
    ap.add_argument("--num-words", type=int, default=16, help="bad words per request, at most 16 (default: 16)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (default: 3)")
    args = ap.parse_args(argv)
    log_machine()

    from jaxllm.config import EngineConfig
    from jaxllm.engine.bad_words import tokenize_bad_words
    from jaxllm.engine.factory import build_engine
    from jaxllm.llm import LLM
    from jaxllm.sampling_params import SamplingParams

    engine = build_engine(EngineConfig(model=args.model, max_model_len=512, max_num_seqs=args.num_seqs,
                                       max_num_batched_tokens=512))
    llm = LLM(args.model, engine=engine)
    prompts = [f"Tell me a story about the sea, part {i}:" for i in range(args.num_seqs)]
    words = WORDS[:args.num_words]
    seqs = tokenize_bad_words(words, engine.tokenizer, engine.vocab_size)
    multi = sum(len(s) > 1 for s in seqs)
    modes = {"none": None, f"bad_words ({len(words)} words, {len(seqs)} sequences, {multi} multi-token)": words}
    traces, compiles = engine.runner.num_traces, engine.runner.compile_count
    results = {m: [] for m in modes}
    hits = {}
    for r in range(args.rounds + 1):  # round 0 warms the host paths
        for mode, bw in modes.items():
            params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, bad_words=bw)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            secs = time.perf_counter() - t0
            ids = [list(o.outputs[0].token_ids) for o in outs]
            n = sum(map(len, ids))
            hits[mode] = sum(occurrences(seqs, t) for t in ids)
            if r:
                results[mode].append(n / secs)
    assert (engine.runner.num_traces, engine.runner.compile_count) == (traces, compiles), "compiled during the bench"
    rows = [dict(mode=m, tok_s=statistics.median(v), runs=v) for m, v in results.items()]
    for row in rows:
        print(f"{row['mode']:52s} {row['tok_s']:8.1f} output tok/s (median of "
              f"{', '.join(f'{x:.1f}' for x in row['runs'])}); bad-word occurrences in the output: "
              f"{hits[row['mode']]}")
    assert hits[rows[1]["mode"]] == 0, "a bad word was generated"
    print(f"bad_words / none: {rows[1]['tok_s'] / rows[0]['tok_s']:.3f}; "
          f"{args.num_seqs} sequences x {args.output_len} tokens, no compile after warm-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
