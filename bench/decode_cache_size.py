"""A decode step must cost the same whatever the KV cache size (the cache is donated, never copied).

    python bench/decode_cache_size.py --model smollm2-135m --blocks 256 --factor 4 --batch 8 --context 256

Builds two ModelRunners over the same weights, with --blocks and --factor x --blocks KV blocks,
compiles only their decode bucket, then times identical decode steps (batch --batch, each sequence
at --context tokens) on both, interleaved round by round. Prints the median step time of each and
the ratio (goal: within 10%).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5, help="decode steps per round per runner")
    args = ap.parse_args(argv)

    import jax

    from checkpoints import load_checkpoint
    from jaxllm.core.scheduler_output import ScheduledSeq, SchedulerOutput
    from jaxllm.engine.factory import resolve_dtype
    from jaxllm.models.llama import build_model
    from jaxllm.runner.model_runner import ModelRunner
    from jaxllm.sampling_params import SamplingParams
    from pallas_kernels import KVCache

    dtype = resolve_dtype("auto")
    ckpt = load_checkpoint(args.model, args.load_format, dtype=dtype)
    mc = ckpt.config
    model = build_model(mc, ckpt.params, dtype)
    bs, ctx, B = args.block_size, args.context, args.batch
    per_seq = -(-(ctx + 1) // bs)
    assert B * per_seq <= args.blocks, "--blocks too small for --batch x --context"
    max_len = max(ctx + 16, 512)
    sizes = [args.blocks, args.blocks * args.factor]
    per_block = KVCache.bytes_per_block(mc.num_layers, bs, mc.num_kv_heads, mc.head_dim, dtype)
    runners = [ModelRunner(model, block_size=bs, num_blocks=n, max_model_len=max_len, max_num_seqs=B,
                           max_num_batched_tokens=B) for n in sizes]
    params = SamplingParams(temperature=0.0)
    # the same block ids in both caches: only the cache size differs
    seqs = [ScheduledSeq(request_id=f"r{i}", token_ids=[100 + i], start_pos=ctx, block_ids=list(
        range(i * per_seq, (i + 1) * per_seq)), sample=True, num_prompt_tokens=ctx, params=params, seed=i,
        prefix_token_ids=None) for i in range(B)]
    sched = SchedulerOutput(seqs=seqs, num_batched_tokens=B)
    for r in runners:  # compile + first run
        t0 = time.perf_counter()
        r.execute(sched)
        print(f"[bench] {r.num_blocks} blocks ({r.num_blocks * per_block / 2**20:.0f} MiB): first step "
              f"(compile) {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    times = [[], []]
    for _ in range(args.rounds):
        for k, r in enumerate(runners):
            for _ in range(args.steps):
                t0 = time.perf_counter()
                r.execute(sched)  # returns host values: the step is complete
                times[k].append(time.perf_counter() - t0)
    med = [statistics.median(t) * 1e3 for t in times]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); model {args.model}; "
          f"decode batch {B} at context {ctx}")
    for n, m, t in zip(sizes, med, times):
        print(f"KV cache {n:6d} blocks ({n * per_block / 2**20:7.0f} MiB): median decode step {m:7.2f} ms "
              f"(min {min(t) * 1e3:.2f}, n={len(t)})")
    print(f"ratio {args.factor}x cache / 1x cache: {med[1] / med[0]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
