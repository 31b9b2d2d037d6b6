"""The floor under the offline-throughput workload on this machine: what a perfect engine would take.

    python bench/cpu_roofline.py --model smollm2-135m --num-prompts 64 --input-len 64..512 \\
        --output-len 64..256 --hf-batch1-tok-s 23.0 --engine-tok-s 102.7

Counts the work bench/throughput.py's workload needs (same generator, same seed): the projection
and LM-head FLOPs of every token the model must process (each prompt token, each generated token
but the last fed back; one LM-head row per generated token) and the KV bytes decode attention must
read (every generated token reads its whole context, K and V, all layers). Measures this machine's
best fp32 GEMM rate on the model's own projection shapes (XLA and torch, best of both) and its
best read bandwidth (a large reduction, numpy and torch). Prints the floor, seconds = FLOPs / GEMM
rate + KV bytes / bandwidth (no overlap; the perfect-overlap floor, their max, beside it), the
output tok/s it allows, and, given HF's batch-1 rate and the engine's measured rate from
throughput.py, the best ratio any engine could reach here and the share of the floor the engine
achieves. Ignored, so the floor is low: weight reads, attention FLOPs, norms, sampling, host time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import add_workload_args, log_machine, workload_from_args  # noqa: E402


def workload_cost(config, reqs) -> dict:
    """FLOPs and KV bytes the workload needs at fp32 (pure arithmetic on the config)."""
    c = config
    e, f, h, k, d, layers = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers
    layer_params = e * h * d * 2 + e * k * d * 2 + 3 * e * f  # q, o, k, v, gate, up, down
    fed = sum(r.prompt_len + r.output_len - 1 for r in reqs)  # tokens through the layers
    out = sum(r.output_len for r in reqs)
    flops = 2 * layer_params * layers * fed + 2 * c.vocab_size * e * out
    kv_token_bytes = 2 * layers * k * d * 4  # K and V, fp32
    # the step producing generated token j (0-based) reads prompt_len + j tokens of context
    ctx = sum(r.output_len * r.prompt_len + r.output_len * (r.output_len - 1) // 2 for r in reqs)
    return {"tokens_fed": fed, "output_tokens": out, "gemm_flops": flops, "kv_read_bytes": ctx * kv_token_bytes}


def _best_time(fn, iters: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_gemm(config, tokens: int) -> dict:
    """Best fp32 GEMM FLOP/s on [tokens, hidden] @ [hidden, intermediate], XLA and torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    e, f = config.hidden_size, config.intermediate_size
    flops = 2 * tokens * e * f
    x, w = jnp.ones((tokens, e), jnp.float32), jnp.ones((e, f), jnp.float32)
    dot = jax.jit(jnp.dot)
    xla = flops / _best_time(lambda: dot(x, w).block_until_ready())
    tx, tw = torch.from_numpy(np.ones((tokens, e), np.float32)), torch.from_numpy(np.ones((e, f), np.float32))
    with torch.inference_mode():
        tor = flops / _best_time(lambda: tx @ tw)
    return {"xla": xla, "torch": tor, "torch_threads": torch.get_num_threads()}


def measure_read_bandwidth(nbytes: int = 1 << 30) -> dict:
    """Best bytes/s reading a large fp32 array (a sum), numpy and torch."""
    import numpy as np
    import torch

    a = np.ones(nbytes // 4, np.float32)
    npy = nbytes / _best_time(lambda: a.sum(), iters=3)
    t = torch.from_numpy(a)
    tor = nbytes / _best_time(lambda: t.sum(), iters=3)
    return {"numpy": npy, "torch": tor}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    add_workload_args(ap)
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument("--hf-batch1-tok-s", type=float, help="HF generate() batch-1 output tok/s (throughput.py)")
    ap.add_argument("--engine-tok-s", type=float, help="jaxllm output tok/s on the same workload (throughput.py)")
    ap.add_argument("--target-ratio", type=float, default=8.0)
    args = ap.parse_args(argv)
    log_machine()
    from checkpoints.dummy import dummy_config

    config = dummy_config(args.model)  # a preset (the packaged models' shapes) or a config.json
    reqs = workload_from_args(args, config.vocab_size, args.workload_seed)
    cost = workload_cost(config, reqs)
    gemm = {t: measure_gemm(config, t) for t in (64, 2048)}
    bw = measure_read_bandwidth()
    peak = max(max(g["xla"], g["torch"]) for g in gemm.values())
    read = max(bw.values())
    t_gemm, t_kv = cost["gemm_flops"] / peak, cost["kv_read_bytes"] / read
    floor, overlap = t_gemm + t_kv, max(t_gemm, t_kv)
    out = cost["output_tokens"]
    print(f"workload: {len(reqs)} requests, {cost['tokens_fed']} tokens through the layers, {out} generated")
    print(f"work: {cost['gemm_flops'] / 1e12:.2f} TFLOP of fp32 projections + LM head; "
          f"{cost['kv_read_bytes'] / 1e9:.1f} GB of KV read by decode attention")
    for t, g in gemm.items():
        print(f"GEMM fp32 [{t} x {config.hidden_size}] @ [{config.hidden_size} x {config.intermediate_size}]: "
              f"XLA {g['xla'] / 1e9:.0f}, torch {g['torch'] / 1e9:.0f} GFLOP/s ({g['torch_threads']} threads)")
    print(f"read bandwidth (1 GiB sum): numpy {bw['numpy'] / 1e9:.1f}, torch {bw['torch'] / 1e9:.1f} GB/s")
    print(f"floor: {t_gemm:.1f} s GEMM at {peak / 1e9:.0f} GFLOP/s + {t_kv:.1f} s KV at {read / 1e9:.1f} GB/s "
          f"= {floor:.1f} s -> at most {out / floor:.0f} output tok/s (perfect overlap: {overlap:.1f} s, "
          f"{out / overlap:.0f} tok/s)")
    if args.hf_batch1_tok_s:
        need = args.target_ratio * args.hf_batch1_tok_s
        print(f"{args.target_ratio:g}x HF batch 1 ({args.hf_batch1_tok_s} tok/s) needs {need:.0f} tok/s = "
              f"{out / need:.1f} s: {100 * (out / floor) ** -1 * need:.0f}% of the floor's rate "
              f"({100 * need / (out / overlap):.0f}% with perfect overlap); best possible ratio "
              f"{out / floor / args.hf_batch1_tok_s:.1f}x ({out / overlap / args.hf_batch1_tok_s:.1f}x)")
    if args.engine_tok_s:
        print(f"engine: {args.engine_tok_s} tok/s = {100 * args.engine_tok_s / (out / floor):.0f}% of the floor's rate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
