"""The sampling program with lax.cond (CPU's default) vs branchless select (GPUs' default), timed alone.

    python bench/sampler_branches.py [--rows 1 64 256] [--vocab 32000 128256] [--iters 20] [--json OUT --json-key K]

runner/sampler.py: a GPU samples without device-side branches because each XLA conditional blocks
the host until the device reaches it; the expensive parts (the Gumbel draw, the filters' [S, V] sort,
the top-20 log-softmax) are then left out by the host (a program per SamplePlan, sampler.plan_of, as
the runner picks them) and the cheap ones computed every step. This times the
sampling program (step_programs.sample_step, the runner's own) for a greedy batch with no extras, the
case where select does the most needless work, and for a batch that uses every branch, in both
modes: ms per call, each call's result fetched (device_get), so the cond mode's host round trips count.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import log, machine_info, merge_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--json-key", default="sampler_branches")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxllm.runner.sampler import SamplingInputs, plan_of
    from jaxllm.runner.step_programs import step_programs

    def inputs(S: int, V: int, busy: bool) -> SamplingInputs:
        rng = np.random.default_rng(0)
        f = lambda v: np.full(S, v, np.float32)  # noqa: E731
        ids = lambda w: (rng.integers(0, V, (S, w)) if busy else np.full((S, w), -1)).astype(np.int32)  # noqa: E731
        return SamplingInputs(f(0.8 if busy else 0.0), np.full(S, 50 if busy else 0, np.int32), f(0.9 if busy else 1.0),
                              f(0.05 if busy else 0.0), f(0.1 if busy else 0.0), f(0.1 if busy else 0.0),
                              f(1.1 if busy else 1.0), np.arange(S, dtype=np.uint32), np.full(S, 7, np.int32),
                              ids(4), ids(4), np.zeros((S, 4), np.float32), ids(8),
                              np.full((S, -(-V // 32)), -1, np.int32), np.full(S, busy, bool))

    rows = []
    for V in args.vocab:
        for S in args.rows:
            R = S + 1
            logits = jax.device_put(jax.random.normal(jax.random.key(0), (S, V), jnp.float32) * 3)
            counts, seen = jnp.zeros((R, V), jnp.int32), jnp.zeros((R, V), bool)
            seq_rows = np.arange(S, dtype=np.int32)
            for busy in (False, True):
                p = inputs(S, V, busy)
                for mode in ("cond", "select"):
                    fn = jax.jit(step_programs(None, lambda: None, mode == "select").sample_step, donate_argnums=(3,),
                                 static_argnames=("plan",))
                    plan = plan_of(p, np.asarray(busy), V)
                    last = jnp.zeros(R, jnp.int32)
                    last, out = fn(logits, counts, seen, last, p, np.asarray(busy), seq_rows, plan=plan)  # compile + warm
                    jax.device_get(out.token_ids)
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        last, out = fn(logits, counts, seen, last, p, np.asarray(busy), seq_rows, plan=plan)
                        jax.device_get(out.token_ids)
                    ms = 1e3 * (time.perf_counter() - t0) / args.iters
                    rows.append({"vocab": V, "rows": S, "batch": "every branch" if busy else "greedy, nothing else",
                                 "mode": mode, "ms_per_call": ms})
                    log(f"V={V} S={S} {rows[-1]['batch']:<22} {mode:<6} {ms:8.3f} ms")
    print(f"\n{'vocab':>7} {'rows':>5}  {'batch':<22} {'cond ms':>9} {'select ms':>10}")
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]
        print(f"{a['vocab']:>7} {a['rows']:>5}  {a['batch']:<22} {a['ms_per_call']:9.3f} {b['ms_per_call']:10.3f}")
    if args.json:
        merge_json(args.json, args.json_key, {"rows": rows, "machine": machine_info(), "iters": args.iters})
    return 0


if __name__ == "__main__":
    sys.exit(main())
