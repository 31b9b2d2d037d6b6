"""Host time to build one step's input arrays (runner/inputs.build_inputs) for a decode batch: the runner's
own share of a step's host work, beside bench/host_overhead.py's engine share.

    JAX_PLATFORMS=cpu python bench/step_inputs.py                    # 256 decode seqs, 500-token contexts
    JAX_PLATFORMS=cpu python bench/step_inputs.py --num-seqs 64 --context 2000
    JAX_PLATFORMS=cpu python bench/step_inputs.py --context 2000 --lists   # tables as Python lists

The seqs' block tables are read-only int32 arrays, as the scheduler hands them (KVCacheManager.block_table);
--lists hands Python lists instead (ScheduledSeqs built by hand; the scheduler's form before 2026-12-05).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--context", type=int, default=500, help="tokens before the decoded one")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--lists", action="store_true", help="block tables as Python lists instead of int32 arrays")
    args = ap.parse_args(argv)

    import numpy as np

    from jaxllm.core.scheduler_output import ScheduledSeq
    from jaxllm.runner.inputs import build_inputs
    from jaxllm.sampling_params import SamplingParams

    S, bs = args.num_seqs, args.block_size
    nb = args.context // bs + 8
    params = SamplingParams(temperature=0.8, max_tokens=4096)
    def table(i):
        ids = np.arange(i * nb, (i + 1) * nb, dtype=np.int32)
        ids.flags.writeable = False
        return ids.tolist() if args.lists else ids

    seqs = [ScheduledSeq(request_id=f"r{i}", token_ids=[5], start_pos=args.context + i % 7,
                         block_ids=table(i), sample=True, num_prompt_tokens=args.context // 2,
                         params=params, seed=i, placeholder=True) for i in range(S)]
    rows = list(range(S))
    build = lambda: build_inputs(seqs, rows, S + 1, [2], S, S, True, bs, nb, 256, vocab_size=49152)  # noqa: E731
    for _ in range(5):
        build()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        build()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    print(f"build_inputs, {S} decode seqs, {args.context}-token contexts, tables as "
          f"{'lists' if args.lists else 'int32 arrays'}: median {1e3 * med:.2f} ms "
          f"({1e6 * med / S:.1f} us per sequence), best {1e3 * times[0]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
