"""Decode speed with full-precision vs int8 vs fp8 vs 4-bit weights, in one run (issue 17).

    python bench/quant.py --model smollm2-135m --output-json /tmp/quant.json
    python bench/quant.py --methods none,int8,int4 --batches 8   # the Q4_1 GGUF kept 4-bit vs fp32

For each of --methods (none = --dtype weights: a GGUF's Q4_0 / Q4_1 projections dequantized to fp32
as before 4-bit weights were kept, JAXLLM_GGUF_Q4=fp32; int4 = the checkpoint's 4-bit weights as
they load off CPU by default, JAXLLM_GGUF_Q4=keep, no flag; a "-plain" suffix, e.g. int8-plain, builds that
method with the plain dot instead of CPU's column-chunked one, jaxllm/models/quant_dot.py: the
"before"; "fp8-f8" holds the fp8 weights as float8_e4m3fn instead of their uint8 bits, so each step
bitcasts them, a copy on XLA CPU: the "before" of quant_dot.holds_fp8_bits; "int4-xla" holds the 4-bit
weights as XLA's int4 / uint4 instead of uint8 two a byte: the "before" of quant_dot.packs_int4; "int4-rtn"
rounds the --dtype weights to int4 at load, `--quantization int4`, groups of 128, quant.quantize_int4,
a GGUF's Q4 projections dequantized to fp32 first; "none-copy" = none with the CPU scan's per-layer copy of
the fp32 projections, JAXLLM_CPU_STACKED_DOT=xla, the "before" of jaxllm/models/stacked_dot.py) the engine is built
(warm); then --rounds rounds, each measuring every engine in turn (interleaved, so a load change on
the shared machine hits all alike); the median over rounds:
- batch-1 decode: one request alone (--input-len prompt tokens drawn from the vocabulary, seeded,
  --output-len greedy tokens, ignore_eos), ms/token = (last token - first token) / (n - 1), median of
  --repeats (bench/latency.py's timing);
- batched decode step: --batches requests (8 and 64 by default) added together with 16-token prompts,
  stepped until every one has its first token, then --steps decode steps timed: ms per step.
Weight bytes: the device bytes of the model's parameters. Machine load is printed and stored.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import log_machine  # noqa: E402
from bench.latency import jaxllm_one  # noqa: E402


def step_ms(engine, batch: int, steps: int, vocab: int, rng) -> float:
    from jaxllm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True, temperature=0.0)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, {"prompt_token_ids": rng.integers(10, vocab, 16).tolist()}, params)
    started = set()
    while len(started) < batch:
        started |= {o.request_id for o in engine.step() if o.outputs and o.outputs[0].token_ids}
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = 1e3 * (time.perf_counter() - t0) / steps
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--methods", default="none,int8,fp8")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--output-json")
    args = ap.parse_args(argv)
    import jax
    import numpy as np

    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    machine = log_machine()
    batches = [int(b) for b in args.batches.split(",")]
    from jaxllm.models import quant_dot, stacked_dot

    engines = {}
    for method in args.methods.split(","):
        base = method.removesuffix("-copy").removesuffix("-plain").removesuffix("-f8").removesuffix("-xla").removesuffix("-rtn")
        rtn = method.endswith("-rtn")
        quant_dot.ENABLED = not method.endswith("-plain")  # read when the engine's steps are traced (warm-up)
        quant_dot.HOLD_FP8_BITS = not method.endswith("-f8")  # read at load
        quant_dot.PACK_INT4 = not method.endswith("-xla")  # read at load
        os.environ[stacked_dot.ENV] = "xla" if method.endswith("-copy") else "auto"  # read at trace (warm-up)
        os.environ["JAXLLM_GGUF_Q4"] = "keep" if base == "int4" and not rtn else "fp32"  # read at load
        engine = build_engine(EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                                           quantization=None if base == "none" or (base == "int4" and not rtn) else base,
                                           max_model_len=512, max_num_seqs=max(batches),
                                           max_num_batched_tokens=1024))
        vocab = engine.runner.model_config.vocab_size
        jaxllm_one(engine, "warm", np.random.default_rng(0).integers(10, vocab, args.input_len).tolist(), 4)
        for b in batches:
            step_ms(engine, b, 2, vocab, np.random.default_rng(0))  # warm the path at this batch
        engines[method] = engine
    quant_dot.ENABLED = quant_dot.HOLD_FP8_BITS = quant_dot.PACK_INT4 = True
    os.environ.pop(stacked_dot.ENV)
    samples = {m: {} for m in engines}
    for rnd in range(args.rounds):
        for method, engine in engines.items():
            vocab = engine.runner.model_config.vocab_size
            rng = np.random.default_rng(rnd)
            runs = [jaxllm_one(engine, f"r{rnd}-{i}", rng.integers(10, vocab, args.input_len).tolist(),
                               args.output_len) for i in range(args.repeats)]
            samples[method].setdefault("b1_ms_per_token", []).append(statistics.median(r["ms_per_token"] for r in runs))
            for b in batches:
                samples[method].setdefault(f"b{b}_step_ms", []).append(step_ms(engine, b, args.steps, vocab, rng))
            print(method, f"round {rnd}", {k: round(v[-1], 2) for k, v in samples[method].items()},
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for method, engine in engines.items():
        # device bytes (int4 / uint4 are packed two a byte; jax's nbytes counts a byte each)
        weight_bytes = sum(sh.data.on_device_size_in_bytes() for x in jax.tree.leaves(engine.runner.state)
                           for sh in x.addressable_shards)
        row = {"weights": method, "weight_MiB": round(weight_bytes / 2**20, 1)}
        row.update({k: round(statistics.median(v), 2) for k, v in samples[method].items()})
        rows.append(row)
    print(f"\nload {os.getloadavg()}")
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"rows": rows, "machine": machine, "args": vars(args), "load_after": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
