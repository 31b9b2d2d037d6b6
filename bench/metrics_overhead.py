"""What metrics cost the engine per step: host time per decode step with no stat logger vs with
the Prometheus logger and the periodic log line attached (no device: bench/host_overhead.py's
instant runner, so the step is all host work and any metrics cost shows in full).

    JAX_PLATFORMS=cpu python bench/metrics_overhead.py                     # 64 sequences
    JAX_PLATFORMS=cpu python bench/metrics_overhead.py --num-seqs 1

Two identical engines (same prompts, seeds, tokens) step in alternating rounds so machine-load
swings hit both alike; also timed: the loggers' own ``record`` calls inside the metrics engine
(the engine's side, building the records, is in the on/off difference only).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Timed:
    """A stat logger wrapper that times each ``record`` call."""

    def __init__(self, inner):
        self.inner, self.times = inner, []

    def record(self, s, it):
        t0 = time.perf_counter()
        self.inner.record(s, it)
        self.times.append(time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="whose tokenizer to use")
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps-per-round", type=int, default=10)
    args = ap.parse_args(argv)

    from prometheus_client import CollectorRegistry

    from bench.host_overhead import InstantRunner
    from checkpoints import load_checkpoint, load_tokenizer
    from jaxllm.config import EngineConfig
    from jaxllm.engine.engine import LLMEngine
    from jaxllm.metrics.loggers import LoggingStatLogger
    from jaxllm.metrics.prometheus import PrometheusStatLogger
    from jaxllm.sampling_params import SamplingParams

    ckpt = load_checkpoint(args.model, "auto")
    tok = load_tokenizer(ckpt.tokenizer_source, ckpt.config)
    del ckpt
    steps = args.rounds * args.steps_per_round
    cfg = EngineConfig(model=args.model, max_model_len=4096, max_num_seqs=args.num_seqs,
                       max_num_batched_tokens=8192).validate()
    engines = {}
    timed = []
    for name in ("off", "on"):
        eng = LLMEngine(cfg, InstantRunner(tok.vocab_size, args.num_seqs), tok)
        if name == "on":
            timed = [Timed(PrometheusStatLogger(CollectorRegistry(), args.model, max_model_len=4096)),
                     Timed(LoggingStatLogger(10.0, emit=lambda line: None))]
            for lg in timed:
                eng.add_stat_logger(lg)
        for i in range(args.num_seqs):
            eng.add_request(f"r{i}", "Once upon a time " * 10,
                            SamplingParams(max_tokens=steps + 10, ignore_eos=True, temperature=0.8, seed=i))
        eng.step()  # the prefill step
        engines[name] = eng
    for lg in timed:
        lg.times.clear()
    times = {"off": [], "on": []}
    for r in range(args.rounds):
        for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
            eng = engines[name]
            for _ in range(args.steps_per_round):
                t0 = time.perf_counter()
                eng.step()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_step = [sum(ts) for ts in zip(*(lg.times for lg in timed))]  # both loggers, each step
    rec = statistics.median(per_step)
    print(f"{args.num_seqs} sequences, {steps} decode steps each: host time per step median "
          f"off {1e3 * med['off']:.3f} ms, on {1e3 * med['on']:.3f} ms "
          f"(difference {1e3 * (med['on'] - med['off']):+.3f} ms, {100 * (med['on'] / med['off'] - 1):+.1f}%); "
          f"the loggers' record() median {1e6 * rec:.1f} us per step ("
          + ", ".join(f"{type(lg.inner).__name__} {1e6 * statistics.median(lg.times):.1f} us" for lg in timed) + ")")
    for eng in engines.values():
        eng.abort_request([f"r{i}" for i in range(args.num_seqs)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
