"""Cost of Multi-LoRA in the jitted step (issue 15, device side), in one run.

    python bench/lora_step.py [--model smollm2-135m] [--batch 64] [--max-loras 4] [--rank 16]

1. "formulations": the delta of one fused wqkv projection (the model's shapes, P = 3 parts,
   --max-loras slots of --rank) as a one-hot einsum over slots (jaxllm/lora/delta.py: A [in, S, P·R],
   one block-diagonal B [S, P·R, out], two matmuls) vs the previous one-hot layout (A [S, in, P·R], one
   B per part [S, R, out_p]: a matmul per part and a concatenate, written out here) vs gathering each
   token's A and B ([T, in, P·R], [T, R, out_p] per part), at T = --batch (decode) and prefill sizes:
   ms per call, median of --repeats; and the dot_generals of each (jax.jit(...).lower) text.
2. "decode step": a --batch-sequence decode step of the ModelRunner (dummy weights of --model's
   shape, context --context tokens each, greedy) with LoRA off, and with LoRA on (--max-loras slots,
   rank --rank) with 0, 1 and 4 distinct adapters among the sequences: ms per step, median of
   --rounds interleaved rounds of --steps steps, all in the same process; plus the slots' device
   bytes beside the weights'.
Machine load is printed: compare rows of one run only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import log_machine  # noqa: E402


def timed(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def formulations(mc, S: int, R: int, tokens: list[int], repeats: int, dtype) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jaxllm.lora.delta import lora_delta

    E, P = mc.hidden_size, 3
    outs = [mc.num_heads * mc.head_dim] + [mc.num_kv_heads * mc.head_dim] * 2  # q, k, v
    N = sum(outs)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((S, E, P * R)), dtype)  # [S, E, PR]
    b = tuple(jnp.asarray(rng.standard_normal((S, R, n)), dtype) for n in outs)  # [S, R, N_p]
    a_now = jnp.transpose(a, (1, 0, 2))  # [E, S, PR]
    cols = np.cumsum([0] + outs)
    b_now = jnp.zeros((S, P * R, N), dtype)  # block-diagonal (tp=1: the fused order is concatenation)
    for p, bp in enumerate(b):
        b_now = b_now.at[:, p * R:(p + 1) * R, cols[p]:cols[p + 1]].set(bp)
    a0 = jnp.concatenate([jnp.zeros_like(a[:1]), a])  # [S+1, ...]: slot 0 = zeros for the gather
    b0 = tuple(jnp.concatenate([jnp.zeros_like(x[:1]), x]) for x in b)

    @jax.jit
    def onehot(x, slots, a, b):  # the model's (jaxllm/lora/delta.py)
        return lora_delta("te,en->tn", x, a, b, jax.nn.one_hot(slots - 1, S, dtype=x.dtype))

    @jax.jit
    def per_part(x, slots, a, b):  # main 89b2bea's lora_delta at tp=1 (its join: a concatenate)
        u = jnp.einsum("te,SeR->tSR", x, a) * jax.nn.one_hot(slots - 1, S, dtype=x.dtype)[:, :, None]
        return jnp.concatenate([jnp.einsum("tSR,SRn->tn", u[..., p * R:(p + 1) * R], bp)
                                for p, bp in enumerate(b)], axis=1)

    @jax.jit
    def gather(x, slots, a0, b0):
        u = jnp.einsum("te,ter->tr", x, a0[slots])  # [T, PR] from [T, E, PR]
        return jnp.concatenate([jnp.einsum("tr,trn->tn", u[:, p * R:(p + 1) * R], bp[slots])  # [T, R, N_p]
                                for p, bp in enumerate(b0)], axis=1)

    rows = []
    for T in tokens:
        x = jnp.asarray(rng.standard_normal((T, E)), dtype)
        slots = jnp.asarray(rng.integers(0, S + 1, T), jnp.int32)
        want = np.asarray(gather(x, slots, a0, b0), np.float32)
        for got in (onehot(x, slots, a_now, b_now), per_part(x, slots, a, b)):
            np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2 * R)
        if T == tokens[0]:
            dots = {n: f.lower(x, slots, *w).as_text().count("stablehlo.dot_general")
                    for n, f, w in (("one-hot", onehot, (a_now, b_now)), ("per-part", per_part, (a, b)))}
            print(f"  dot_generals of one wqkv delta: one-hot (block-diagonal B) {dots['one-hot']}, "
                  f"per-part B {dots['per-part']}", flush=True)
        base = jnp.asarray(rng.standard_normal((E, N)), dtype)  # [E, N] the fused wqkv
        rows.append(dict(T=T, base_ms=timed(lambda: jax.jit(jnp.dot)(x, base), repeats),
                         onehot_ms=timed(lambda: onehot(x, slots, a_now, b_now), repeats),
                         per_part_ms=timed(lambda: per_part(x, slots, a, b), repeats),
                         gather_ms=timed(lambda: gather(x, slots, a0, b0), repeats)))
        r = rows[-1]
        print(f"  wqkv delta T={T:5d}: base matmul {r['base_ms']:7.3f} ms | one-hot {r['onehot_ms']:7.3f} ms | "
              f"per-part B (before) {r['per_part_ms']:7.3f} ms | gather {r['gather_ms']:7.3f} ms", flush=True)
    return rows


def decode_steps(runner, batch: int, context: int, slots: list[int], steps: int, tag: str) -> list[float]:
    """Seconds of each of `steps` decode steps of `batch` sequences (after one untimed step)."""
    from jaxllm.core.scheduler_output import ScheduledSeq, SchedulerOutput
    from jaxllm.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    per = -(-(context + steps + 2) // runner.block_size)
    pos = [context] * batch
    ts = []
    for k in range(steps + 1):  # step 0 compiles the bucket (first call) and warms up
        seqs = [ScheduledSeq(f"{tag}{i}", [5 + i], pos[i], list(range(i * per, (i + 1) * per)), True, context,
                             params, 0, prefix_token_ids=[] if k == 0 else None, lora_slot=slots[i])
                for i in range(batch)]
        t0 = time.perf_counter()
        runner.execute(SchedulerOutput(seqs, batch))
        if k:
            ts.append(time.perf_counter() - t0)
        pos = [p + 1 for p in pos]
    runner.release([f"{tag}{i}" for i in range(batch)])
    return ts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a dummy-weights preset (checkpoints/dummy.py)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--max-loras", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--prefill-tokens", default="512,2048")
    args = ap.parse_args(argv)
    log_machine()

    import jax

    from checkpoints import load_checkpoint
    from jaxllm.engine.factory import resolve_dtype
    from jaxllm.lora.config import LoRAConfig
    from jaxllm.lora.peft import LoRAAdapter, module_shapes
    from jaxllm.models.llama import build_model
    from jaxllm.runner.model_runner import ModelRunner

    dtype = resolve_dtype(args.dtype)
    ckpt = load_checkpoint(args.model, "dummy", dtype=dtype)
    mc = ckpt.config
    print(f"backend {jax.default_backend()}; {args.model} shape ({mc.num_layers} layers, hidden {mc.hidden_size}), "
          f"{jax.numpy.dtype(dtype).name}; {args.max_loras} slots of rank {args.rank}", flush=True)
    print("formulations (one fused wqkv delta):", flush=True)
    tokens = [args.batch] + [int(t) for t in args.prefill_tokens.split(",") if t]
    formulations(mc, args.max_loras, args.rank, tokens, args.repeats, dtype)

    model = build_model(mc, ckpt.params, dtype)
    del ckpt
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(__import__("flax").nnx.state(model)))
    kw = dict(block_size=16, num_blocks=args.batch * (-(-(args.context + args.steps + 2) // 16)),
              max_model_len=args.context + args.steps + 16, max_num_seqs=args.batch, max_num_batched_tokens=args.batch)
    rng = np.random.default_rng(0)
    adapters = []
    for k in range(4):
        mods = {p: ((rng.standard_normal((mc.num_layers,) + i + (args.rank,)) * 0.01).astype(np.float32),
                    (rng.standard_normal((mc.num_layers, args.rank) + o) * 0.01).astype(np.float32))
                for p, (i, o) in module_shapes(mc).items()}
        adapters.append(LoRAAdapter(f"bench{k}", args.rank, mods))
    off = ModelRunner(model, **kw)
    on = ModelRunner(model, lora_config=LoRAConfig(args.max_loras, args.rank), **kw)
    for k in range(min(4, args.max_loras)):
        on.set_lora(k + 1, adapters[k])
    configs = [("LoRA off", off, [0] * args.batch)]
    for n in (0, 1, 4):
        if n <= args.max_loras:
            configs.append((f"LoRA on, {n} adapters", on, [0 if n == 0 else 1 + i % n for i in range(args.batch)]))
    times = {name: [] for name, _, _ in configs}
    for r in range(args.rounds):  # interleaved rounds: a load change on a shared machine hits every row
        for name, runner, slots in configs:
            times[name] += decode_steps(runner, args.batch, args.context, slots, args.steps, f"r{r}{name[-11:]}")
    print(f"decode step, {args.batch} sequences x {args.context} context (median of {args.rounds} x {args.steps}):")
    ref = statistics.median(times["LoRA off"])
    for name, ts in times.items():
        ms = 1e3 * statistics.median(ts)
        print(f"  {name:22s} {ms:8.2f} ms/step  ({ms / (1e3 * ref):.2f}x LoRA off)")
    print(f"device bytes: weights {weight_bytes / 2**20:.0f} MiB, LoRA slots {on.lora.nbytes / 2**20:.1f} MiB "
          f"({100 * on.lora.nbytes / weight_bytes:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
