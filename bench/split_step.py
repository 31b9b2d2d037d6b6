"""What splitting the step in two programs costs: a decode step run as the runner runs it (the forward
pass, then the sampling: two launches, the logits [S, V] between them in device memory) vs the same
two functions fused into one jit (the step before the split), in one process, interleaved rounds.

    JAX_PLATFORMS=cpu python bench/split_step.py [--model smollm2-135m] [--batches 1,64] [--rounds 6]

Dummy weights of --model's shape, each sequence at --context tokens, greedy; inputs built once (the
host's per-step work is the same in both and not timed). Median ms per step and split / fused.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import log_machine  # noqa: E402


def time_batch(model, batch: int, context: int, rounds: int, steps: int) -> tuple[float, float]:
    import jax
    from flax import nnx

    from jaxllm.core.scheduler_output import ScheduledSeq
    from jaxllm.runner.inputs import build_inputs
    from jaxllm.runner.model_runner import ModelRunner
    from jaxllm.runner.step_programs import step_programs
    from jaxllm.sampling_params import SamplingParams

    per = -(-(context + 8) // 16)
    r = ModelRunner(model, block_size=16, num_blocks=batch * per, max_model_len=context + 16, max_num_seqs=batch,
                    max_num_batched_tokens=batch)
    p = step_programs(nnx.split(model)[0], lambda: None)

    def fused(state, cache, counts, prompt_mask, last_tokens, inp):
        cache, counts, prompt_mask, logits, hidden = p.fed_forward(state, cache, counts, prompt_mask, last_tokens, inp)
        last_tokens, out = p.sample_step(logits, counts, prompt_mask, last_tokens, inp.sampling,
                                         inp.want_top_logprobs, inp.seq_rows)
        return cache, counts, prompt_mask, last_tokens, out, hidden

    fused_jit = jax.jit(fused, donate_argnums=(1, 2, 3, 4))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    seqs = [ScheduledSeq(f"s{i}", [5 + i], context, list(range(i * per, (i + 1) * per)), True, context, params, 0)
            for i in range(batch)]
    rows = [r._row(s.request_id) for s in seqs]
    T, S, decode_only = r.buckets.pick_step(seqs)
    inp = jax.device_put(build_inputs(seqs, rows, r.num_rows, r.eos_ids, T, S, decode_only, r.block_size,
                                      r.max_blocks_per_seq, r.max_model_len, vocab_size=r.vocab_size))

    def split_step():
        jax.block_until_ready(r._run_local(inp))

    def fused_step():
        r.kv_cache, r.counts, r.prompt_mask, r.last_tokens, out, r._hidden = fused_jit(
            r.state, r.kv_cache, r.counts, r.prompt_mask, r.last_tokens, inp)
        jax.block_until_ready(out)

    split_step(), fused_step()  # compile both
    ts = {"split": [], "fused": []}
    for k in range(rounds):  # interleaved, alternating which goes first
        order = (("split", split_step), ("fused", fused_step))
        for name, f in order if k % 2 else order[::-1]:
            for _ in range(steps):
                t0 = time.perf_counter()
                f()
                ts[name].append(time.perf_counter() - t0)
    return statistics.median(ts["split"]), statistics.median(ts["fused"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a dummy-weights preset (default: smollm2-135m)")
    ap.add_argument("--batches", default="1,64", help="sequences per decode step (default: 1,64)")
    ap.add_argument("--context", type=int, default=128, help="tokens per sequence (default: 128)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default: 6)")
    ap.add_argument("--steps", type=int, default=5, help="steps per round and mode (default: 5)")
    args = ap.parse_args(argv)
    log_machine()
    from checkpoints import load_checkpoint
    from jaxllm.engine.factory import resolve_dtype
    from jaxllm.models.llama import build_model

    dtype = resolve_dtype("auto")
    ckpt = load_checkpoint(args.model, "dummy", dtype=dtype)
    model = build_model(ckpt.config, ckpt.params, dtype)
    for batch in (int(b) for b in args.batches.split(",")):
        s, f = time_batch(model, batch, args.context, args.rounds, args.steps)
        print(f"batch {batch:3d}: split {1e3 * s:8.2f} ms  fused {1e3 * f:8.2f} ms  split / fused {s / f:.3f} "
              f"(median of {args.rounds * args.steps})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
