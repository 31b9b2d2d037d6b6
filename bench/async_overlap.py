"""Device idle time between engine steps, with and without async scheduling (issue 12).

    JAX_PLATFORMS=cpu python bench/async_overlap.py                      # SmolLM2, 1 and 64 sequences
    JAX_PLATFORMS=cpu python bench/async_overlap.py --num-seqs 64 --steps 40

The real engine: one build (every bucket compiled once), then for each mode a fresh LLMEngine
around the same runner and tokenizer decodes N sequences (text prompts, seeded sampling, a stop
string that never matches, so detokenization and stop checks run every step). The runner's
dispatch is wrapped to stamp when each step was launched; a watcher thread waits on each step
(PendingStep.wait_device) and stamps when the device finished it. Per decode step k:

    idle(k) = max(0, launched(k) - done(k-1))      the device had nothing queued
    busy(k) = done(k) - max(launched(k), done(k-1))

Synchronous, the host reads step k-1 back, schedules, detokenizes, checks stops, builds inputs and
only then launches step k: idle ~ that host time. Async, step k is launched before step k-1 is read
back, so that host work hides behind the device unless it is longer than a step. On CPU the
"device" is XLA's thread pool on the same cores as the Python host (overlap there also competes for
cores); the done stamps can lag by a GIL hand-off (the switch interval is lowered to 0.5 ms).
"""
from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Timeline:
    """Stamps launch and device-done times of every step the runner dispatches."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.launched: list[float] = []
        self.decode: list[bool] = []
        self.done: dict[int, float] = {}
        self._q: queue.Queue = queue.Queue()
        self._orig = runner.dispatch
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

        def dispatch(out):
            pending = self._orig(out)
            k = len(self.launched)
            self.launched.append(time.perf_counter())
            self.decode.append(all(len(s.token_ids) == 1 for s in out.seqs))
            self._q.put((k, pending))
            return pending
        runner.dispatch = dispatch

    def _watch(self) -> None:
        while (item := self._q.get()) is not None:
            k, pending = item
            pending.wait_device()
            self.done[k] = time.perf_counter()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        del self.runner.dispatch  # the instance attribute: back to the class's method

    def gaps(self, first: int, last: int) -> tuple[list[float], list[float]]:
        """(idle, busy) seconds of steps first..last (each needs step k-1)."""
        idle, busy = [], []
        for k in range(max(first, 1), last + 1):
            prev_done = self.done[k - 1]
            idle.append(max(0.0, self.launched[k] - prev_done))
            busy.append(self.done[k] - max(self.launched[k], prev_done))
        return idle, busy


def measure(base, async_scheduling: bool, num_seqs: int, steps: int, skip: int) -> dict:
    import msgspec

    from jaxllm.engine.engine import LLMEngine
    from jaxllm.sampling_params import SamplingParams

    cfg = msgspec.structs.replace(base.config, async_scheduling=async_scheduling)
    engine = LLMEngine(cfg, base.runner, base.tokenizer, detokenizer_factory=base.detokenizer_factory)
    assert engine.async_scheduling == async_scheduling
    from jaxllm.tokenizer import TokenIdsOnlyTokenizer

    text = not isinstance(base.tokenizer, TokenIdsOnlyTokenizer)  # dummy / tiny models: token ids only
    for i in range(num_seqs):
        prompt = "Once upon a time " * 10 if text else [100 + (7 * i + j) % 150 for j in range(40)]
        engine.add_request(f"r{i}", prompt, SamplingParams(
            max_tokens=skip + steps + 8, ignore_eos=True, temperature=0.8, seed=i, detokenize=text,
            stop=["\x00never\x00"] if text else None))
    tl = Timeline(base.runner)
    try:
        t0 = time.perf_counter()
        while len(tl.launched) < skip + steps + 1:
            engine.step()
        wall_end = len(tl.launched) - 1
        engine.abort_request([f"r{i}" for i in range(num_seqs)])  # drains the step in flight
        wall = time.perf_counter() - t0
    finally:
        tl.close()
    first, last = skip, skip + steps - 1
    assert all(tl.decode[first:last + 1]), "measured a non-decode step: raise --skip"
    idle, busy = tl.gaps(first, last)
    span = tl.done[last] - tl.done[first - 1]
    return {"mode": "async" if async_scheduling else "sync", "num_seqs": num_seqs, "steps": len(idle),
            "ms_per_step": 1e3 * span / len(idle), "busy_median_ms": 1e3 * statistics.median(busy),
            "idle_median_ms": 1e3 * statistics.median(idle), "idle_mean_ms": 1e3 * statistics.mean(idle),
            "idle_share": sum(idle) / span, "total_s": wall, "dispatched": wall_end + 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-seqs", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=40, help="timed decode steps per mode")
    ap.add_argument("--skip", type=int, default=4, help="steps before timing (prefill, first decodes)")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    args = ap.parse_args(argv)
    sys.setswitchinterval(0.0005)

    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    cfg = EngineConfig(model=args.model, max_model_len=args.max_model_len, max_num_seqs=max(args.num_seqs),
                       max_num_batched_tokens=args.max_num_batched_tokens)
    base = build_engine(cfg)
    rows = []
    for n in args.num_seqs:
        for mode in args.modes:
            r = measure(base, mode == "async", n, args.steps, args.skip)
            rows.append(r)
            print(f"{r['mode']:>5} {n:>3} seqs: {r['ms_per_step']:7.2f} ms/step, device busy median "
                  f"{r['busy_median_ms']:7.2f} ms, idle between steps median {r['idle_median_ms']:6.2f} ms "
                  f"mean {r['idle_mean_ms']:6.2f} ms ({100 * r['idle_share']:4.1f}% of wall), "
                  f"{r['steps']} decode steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
