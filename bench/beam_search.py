"""Beam search cost: greedy generate vs LLM.beam_search at beam_width 1 and 4, one engine, same run.

    python bench/beam_search.py --model smollm2-135m --num-prompts 4 --output-len 32 \\
        --widths 1,4 --output-json /tmp/beam.json

Every mode decodes the same prompts for --output-len tokens (ignore_eos, so every mode does the same
number of steps). Columns, per mode:
- ``tok/s``: tokens of the returned best sequences per second (what the caller gets);
- ``beam tok/s``: beam positions decoded per second (prompts x beams x depth);
- ``steps/tok``: engine steps per output position (1 = every depth of every prompt in one step);
- ``computed/tok``: tokens the engine computed (prefill chunks + decodes, unpadded) per output
  position of all beams, prompts' first prefill excluded: 1.0 = pure decode; above 1 = forks
  prefilling their partial last block again;
- ``vllm-scheme/tok``: the same figure for vLLM's scheme (each beam resubmitted every step, its
  full blocks prefix-cache hits, the rest prefilled: ``L - ((L-1)//block)*block`` tokens for a
  length-L beam), computed from the run's beam counts, not measured;
- ``forks``: engine requests the search added (one per prompt is the initial prefill).
``beam W no-fork`` rows (``--no-fork-too``, on by default) run the same search with the runner's
block copies switched off: forks then prefill their partial last block again (prefix caching only),
the engine before forks shared KV.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import format_table, log, log_machine, write_json  # noqa: E402

PROMPTS = ["The three primary colors are", "Once upon a time, in a small village by the sea,",
           "The most important thing to know about photosynthesis is", "def fibonacci(n):",
           "A good breakfast should include", "The capital of Australia is", "To train a neural network you",
           "Here is a short poem about autumn:"]


class StepCounter:
    """A stat logger: sums the engine's computed tokens and counts its steps."""

    def __init__(self):
        self.steps = 0
        self.tokens = 0

    def record(self, scheduler_stats, iteration_stats) -> None:
        if iteration_stats is not None and iteration_stats.step_time is not None:
            self.steps += 1
            self.tokens += iteration_stats.num_batched_tokens


def vllm_scheme_tokens(prompt_lens: list[int], beams_per_depth: list[list[int]], block: int) -> int:
    """Tokens vLLM's resubmit-every-beam scheme computes after the first prefill: each beam of length
    L at each depth prefills its tokens past the last full block (at least 1)."""
    total = 0
    for p, beams in zip(prompt_lens, beams_per_depth):
        for d, n in enumerate(beams[1:], start=1):
            L = p + d
            total += n * (L - ((L - 1) // block) * block)
    return total


def run_mode(llm, counter, prompts, width, output_len, fork: bool = True) -> dict:
    from jaxllm import BeamSearchParams, SamplingParams

    engine = llm.engine
    assert engine.reset_prefix_cache()  # every mode and repeat starts cold (its prompts prefilled in full)
    adds = []
    real_add = engine.add_request

    def counting_add(rid, prompt, params, *a, **kw):
        adds.append(rid)
        return real_add(rid, prompt, params, *a, **kw)

    engine.add_request = counting_add
    runner = engine.runner
    copies = runner.supports_block_copy
    runner.supports_block_copy = copies and fork
    s0, t0, c0 = counter.steps, counter.tokens, time.perf_counter()
    try:
        if width == 0:  # greedy generate
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True), use_tqdm=False)
            best = sum(len(o.outputs[0].token_ids) for o in outs)
            beams = [[1] * output_len for _ in prompts]
        else:
            outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                                   BeamSearchParams(beam_width=width, max_tokens=output_len, ignore_eos=True))
            best = sum(len(o.sequences[0].tokens) - len(p) for o, p in zip(outs, prompts))
            # ignore_eos: 1 beam at depth 0, then min(width, 2*width*beams) every later depth
            beams = [[1] + [width] * (output_len - 1) for _ in prompts]
    finally:
        del engine.add_request  # the bound method again
        runner.supports_block_copy = copies
    secs = time.perf_counter() - c0
    steps, computed = counter.steps - s0, counter.tokens - t0
    beam_positions = sum(sum(b) for b in beams)
    prompt_tokens = sum(len(p) for p in prompts)
    block = llm.config.block_size
    mode = "greedy" if width == 0 else f"beam {width}" + ("" if fork else " no-fork")
    return {"mode": mode, "seconds": secs, "output_tokens": best,
            "tok_s": best / secs, "beam_tok_s": beam_positions / secs, "steps": steps,
            "steps_per_tok": steps / output_len, "computed": computed,
            "computed_per_tok": (computed - prompt_tokens) / (beam_positions - len(prompts)),
            "vllm_per_tok": None if width == 0 else  # greedy: vLLM decodes it as one request too
            vllm_scheme_tokens([len(p) for p in prompts], beams, block) / (beam_positions - len(prompts)),
            "forks": len(adds)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--widths", default="1,4", help="beam widths, comma-separated (greedy always runs first)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode; the fastest is reported")
    ap.add_argument("--no-fork-too", action=argparse.BooleanOptionalAction, default=True,
                    help="also run each width > 1 with the runner's block copies off (forks re-prefill)")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    machine = log_machine()
    from jaxllm import LLM

    widths = [int(w) for w in args.widths.split(",")]
    llm = LLM(args.model, max_model_len=512, max_num_seqs=max(8, args.num_prompts * max(widths)),
              max_num_batched_tokens=512, block_size=args.block_size, enable_prefix_caching=True)
    counter = StepCounter()
    llm.engine.add_stat_logger(counter)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.num_prompts)]
    rows = []
    modes = [(0, True)] + [(w, f) for w in widths for f in ((True, False) if args.no_fork_too and w > 1 else (True,))]
    for width, fork in modes:
        runs = [run_mode(llm, counter, prompts, width, args.output_len, fork) for _ in range(args.repeats)]
        rows.append(min(runs, key=lambda r: r["seconds"]))
        log(f"{rows[-1]['mode']}: {rows[-1]['seconds']:.2f}s")
    cols = [("mode", "mode", ""), ("seconds", "s", ".2f"), ("tok_s", "tok/s", ".1f"),
            ("beam_tok_s", "beam tok/s", ".1f"), ("steps_per_tok", "steps/tok", ".2f"),
            ("computed_per_tok", "computed/tok", ".2f"), ("vllm_per_tok", "vllm-scheme/tok", ".2f"),
            ("forks", "forks", "")]
    print(format_table(rows, cols))
    if args.output_json:
        write_json(args.output_json, {"machine": machine, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
