"""Structured outputs' cost (issue 14): host time per step for matchers + mask, and constrained vs
unconstrained decode throughput, in one run.

    JAX_PLATFORMS=cpu python bench/structured_output.py                 # SmolLM2, both parts
    JAX_PLATFORMS=cpu python bench/structured_output.py --skip-engine   # host part only (no model)

1. Host: the engine's per-step structured-outputs work for N = 1, 16, 64 constrained sequences
   with SmolLM2's tokenizer (49,152 ids): ``GrammarCompiler.fill_bitmask`` (llguidance computes the
   N next-token masks, in parallel for N > 1), the accept of each sequence's token
   (``GrammarState.accept``), and the mask's copy to the device (``jax.device_put`` of the
   ``[S, 1536]`` i32 batch). The sequences follow a JSON schema (an object with a string, an integer,
   an enum and an array); each step every sequence takes a random allowed token (seeded), and a
   finished one restarts from a fresh matcher, so the masks stay those of mid-JSON states.
2. Engine: SmolLM2, ``--num-seqs`` requests decoding exactly ``--output-len`` tokens each
   (min_tokens = max_tokens), seeded sampling at temperature 1, free and under an unbounded regex
   (``[a-z ,.]*``: a real mask every step, never finished), each synchronously and with async
   scheduling; the regex under async twice: masks written after the forward pass (late_bitmask) and
   waiting for each token (before late masks), on every request and on every other one (beside free
   requests a waiting one skips every other step). Output tok/s and engine steps per output token
   (1.0: every step advances every request); same engine, warm.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "kind": {"enum": ["cat", "dog", "bird"]}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
    "required": ["name", "age", "kind", "tags"], "additionalProperties": False}


def host_part(model: str, counts: list[int], steps: int) -> list[dict]:
    import jax
    import numpy as np

    from checkpoints.loader import load_config, load_tokenizer
    from jaxllm.engine.grammar import GrammarCompiler, hf_grammar_tokenizer
    from jaxllm.structured_outputs import StructuredOutputsParams

    mc, src = load_config(model)
    tok = load_tokenizer(src, mc)
    compiler = GrammarCompiler(lambda: hf_grammar_tokenizer(tok, mc.vocab_size), mc.vocab_size, tok.eos_token_ids)
    key = compiler.check(StructuredOutputsParams(json=SCHEMA))
    W = -(-mc.vocab_size // 32)
    rng = random.Random(0)
    rows = []
    for n in counts:
        states = [compiler.new_state(key) for _ in range(n)]
        for s in states:
            s.wait(60)
        fill, accept, upload = [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            masks = compiler.fill_bitmask(states, W)  # [n, W] i32
            t1 = time.perf_counter()
            batch = np.zeros((max(n, 1), W), np.int32)
            batch[:n] = masks
            jax.block_until_ready(jax.device_put(batch))
            t2 = time.perf_counter()
            bits = np.unpackbits(masks.view(np.uint8), axis=-1, bitorder="little")[:, :mc.vocab_size]
            picks = [rng.choice(np.flatnonzero(b).tolist()) for b in bits]
            t3 = time.perf_counter()
            for s, t in zip(states, picks):
                s.accept(t)
            t4 = time.perf_counter()
            fill.append(t1 - t0)
            upload.append(t2 - t1)
            accept.append(t4 - t3)
            states = [compiler.new_state(key) if s.finished else s for s in states]
        med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
        rows.append(dict(seqs=n, fill_ms=med(fill), accept_ms=med(accept), upload_ms=med(upload),
                         total_ms=med([a + b + c for a, b, c in zip(fill, accept, upload)])))
    compiler.close()
    return rows


def engine_part(model: str, num_seqs: int, output_len: int, rounds: int) -> list[dict]:
    """Free vs constrained, each synchronously and with async scheduling; constrained async twice: masks
    written after the forward pass (late_bitmask, the default) and waiting for each token (the engine
    before late masks: a constrained request skipped while its token is in flight). One engine, warm."""
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine
    from jaxllm.llm import LLM
    from jaxllm.sampling_params import SamplingParams
    from jaxllm.structured_outputs import StructuredOutputsParams

    engine = build_engine(EngineConfig(model=model, max_model_len=512, max_num_seqs=num_seqs,
                                       max_num_batched_tokens=512, async_scheduling=True))
    llm = LLM(model, engine=engine)
    prompts = [f"Write a short list of things number {i}:" for i in range(num_seqs)]
    regex = StructuredOutputsParams(regex=r"[a-z ,.]*")
    half = "half"  # every other request under the regex, the rest free
    modes = {"sync free": (False, None, False), "sync regex": (False, regex, False),
             "async free": (True, None, True), "async regex, late mask": (True, regex, True),
             "async regex, waits": (True, regex, False), "async half regex, late mask": (True, half, True),
             "async half regex, waits": (True, half, False)}  # (async, spec, late_grammar_mask)
    traces = engine.runner.num_traces
    results = {m: [] for m in modes}
    for r in range(rounds + 1):  # round 0 warms the grammar cache and the host paths
        for mode, (on, so, late) in modes.items():
            engine.async_scheduling, engine.scheduler.late_grammar_mask = on, late  # idle engine: safe
            params = [SamplingParams(temperature=1.0, seed=i, max_tokens=output_len, min_tokens=output_len,
                                     structured_outputs=(regex if i % 2 else None) if so is half else so)
                      for i in range(num_seqs)]
            steps0, t0 = engine.num_steps, time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            secs = time.perf_counter() - t0
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            if r:
                results[mode].append((n / secs, (engine.num_steps - steps0) / output_len))
    assert engine.runner.num_traces == traces, "a step compiled during the bench"
    return [dict(mode=m, tok_s=statistics.median(t for t, _ in v), steps_per_token=statistics.median(s for _, s in v),
                 runs=len(v)) for m, v in results.items()]


def main(argv=None) -> int:
    from bench.common import log_machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model (default: smollm2-135m)")
    ap.add_argument("--counts", default="1,16,64", help="constrained sequences per step (default: 1,16,64)")
    ap.add_argument("--steps", type=int, default=50, help="host steps timed per count (default: 50)")
    ap.add_argument("--num-seqs", type=int, default=16, help="engine part: sequences (default: 16)")
    ap.add_argument("--output-len", type=int, default=48, help="engine part: tokens per sequence (default: 48)")
    ap.add_argument("--rounds", type=int, default=2, help="engine part: timed rounds per mode (default: 2)")
    ap.add_argument("--skip-engine", action="store_true", help="only the host part (default: both)")
    args = ap.parse_args(argv)
    log_machine()
    for r in host_part(args.model, [int(c) for c in args.counts.split(",")], args.steps):
        print(f"host  seqs={r['seqs']:3d}  fill {r['fill_ms']:7.3f} ms  accept {r['accept_ms']:6.3f} ms  "
              f"upload {r['upload_ms']:6.3f} ms  total {r['total_ms']:7.3f} ms / step (median)")
    if not args.skip_engine:
        rows = engine_part(args.model, args.num_seqs, args.output_len, args.rounds)
        for r in rows:
            print(f"engine  {r['mode']:24s} {r['tok_s']:8.1f} output tok/s  {r['steps_per_token']:.2f} steps "
                  f"per output token (median of {r['runs']})")
        tok = {r["mode"]: r["tok_s"] for r in rows}
        print(f"constrained / free: sync {tok['sync regex'] / tok['sync free']:.2f}, async (late mask) "
              f"{tok['async regex, late mask'] / tok['async free']:.2f}, async (waits) "
              f"{tok['async regex, waits'] / tok['async free']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
