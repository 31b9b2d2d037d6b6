"""The scheduler's own host time per step under --scheduling-policy fcfs vs priority (no model, no
engine: Scheduler.schedule + update_from_output + finishing, the part the policy changes).

    python bench/priority_sched.py                       # 64 running, ample and tight KV pools

``--num-seqs`` requests (prompts of 64-320 tokens, 32-256 output tokens, seeded) start waiting; a
finished one is replaced by a fresh one, so admission, chunked prefill and decode all run every
step. Under priority every request draws one of 8 priorities. "tight" gives the pool a third of the
blocks the batch needs, so preemption and re-admission run too. Modes alternate, ``--repeats``
times; the figure is the median over all timed steps of a mode, beside the repeats' spread.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(policy: str, num_seqs: int, num_blocks: int, steps: int, seed: int) -> tuple[list[float], int]:
    """Per-step seconds of schedule + update + finish, and the preemptions seen."""
    from jaxllm.config import SchedulerConfig
    from jaxllm.core.kv_cache_manager import KVCacheManager
    from jaxllm.core.request import Request, RequestStatus
    from jaxllm.core.scheduler import Scheduler
    from jaxllm.sampling_params import SamplingParams

    rng = random.Random(seed)
    sched = Scheduler(SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=2048, max_model_len=1024,
                                      policy=policy), KVCacheManager(num_blocks, 16, enable_caching=False))
    params = SamplingParams(max_tokens=256, temperature=0.0)
    made = 0

    def new():
        nonlocal made
        out = rng.randint(32, 256)
        sched.add_request(Request(f"r{made}", [rng.randrange(100, 30000) for _ in range(rng.randint(64, 320))],
                                  params, seed=0, max_output_tokens=out,
                                  priority=rng.randrange(8) if policy == "priority" else 0))
        made += 1

    for _ in range(2 * num_seqs):
        new()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        done = [r for r, _ in sched.update_from_output(out, {s.request_id: 7 for s in out.seqs if s.sample})
                if r.num_output_tokens >= r.max_output_tokens]
        sched.finish_requests([r.request_id for r in done], RequestStatus.FINISHED_LENGTH)
        times.append(time.perf_counter() - t0)
        for _ in done:
            new()
    return times, sched.num_preemptions


def main(argv=None) -> int:
    from bench.common import log_machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-seqs", type=int, default=64, help="max_num_seqs (default: 64)")
    ap.add_argument("--steps", type=int, default=400, help="timed steps per run (default: 400)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per mode, alternating (default: 5)")
    args = ap.parse_args(argv)
    log_machine()
    need = args.num_seqs * (320 + 256) // 16
    pools = {"ample": need * 2, "tight": need // 3}
    results = {(p, k): ([], []) for k in pools for p in ("fcfs", "priority")}
    for rep in range(args.repeats):
        for (policy, pool), (times, pre) in results.items():
            t, n = run(policy, args.num_seqs, pools[pool], args.steps, seed=rep)
            times.extend(t)
            pre.append(n)
    for (policy, pool), (times, pre) in results.items():
        per_run = [statistics.median(times[i * args.steps:(i + 1) * args.steps]) * 1e6 for i in range(args.repeats)]
        print(f"{pool:5s} pool ({pools[pool]:5d} blocks)  {policy:8s}  schedule+update "
              f"{statistics.median(times) * 1e6:7.1f} us/step median (runs {min(per_run):.0f}-{max(per_run):.0f}), "
              f"preemptions per run {statistics.median(pre):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
