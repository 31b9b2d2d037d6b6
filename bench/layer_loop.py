"""The layer loop's trade-off on this machine: cold warm-up and decode step time, scan vs unroll.

    JAX_PLATFORMS=cpu python bench/layer_loop.py                       # SmolLM2, both loops
    JAX_PLATFORMS=cpu python bench/layer_loop.py --loops scan --src /path/to/older/checkout

Each loop runs in its own process (JAXLLM_LAYER_LOOP set there): build the engine without the
compile cache, time the warm-up of every bucket, then decode S = 1 and 64 sequences of 128-token
prompts greedily: ms per decode step = (n-token run - 1-token run) / (n - 1), best of 2. `--src`
runs the same measurement on another checkout (an A/B against an older commit).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(model: str, sync: bool) -> dict:
    import numpy as np

    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine
    from jaxllm.llm import LLM
    from jaxllm.sampling_params import SamplingParams

    kw = {"async_scheduling": False} if sync else {}  # older checkouts have no such field
    e = build_engine(EngineConfig(model=model, max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=512,
                                  kv_cache_memory_bytes=1 << 30, **kw), compile_cache=False, warmup=False)
    out = {"warmup_s": e.runner.warmup(), "buckets": len(e.runner.buckets.all())}
    llm = LLM(model, engine=e)
    rng = np.random.default_rng(0)
    for S in (1, 64):
        prompts = [{"prompt_token_ids": rng.integers(100, 20000, 128).tolist()} for _ in range(S)]

        def run(n: int) -> float:
            t = time.perf_counter()
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            return time.perf_counter() - t

        run(2)
        n = 33 if S == 1 else 17
        out[f"decode_ms_s{S}"] = 1000 * min((run(n) - run(1)) / (n - 1) for _ in range(2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--loops", nargs="+", default=["scan", "unroll"], choices=["scan", "unroll", "auto"])
    ap.add_argument("--src", default=ROOT, help="checkout to measure (default: this one)")
    ap.add_argument("--no-async-scheduling", action="store_true", help="run the engine synchronously")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.model, args.no_async_scheduling)), flush=True)
        return 0
    rows = []
    for loop in args.loops:
        env = dict(os.environ, JAXLLM_LAYER_LOOP=loop, PYTHONPATH=args.src)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model]
        r = subprocess.run(cmd + (["--no-async-scheduling"] if args.no_async_scheduling else []),
                           cwd=args.src, env=env, capture_output=True, text=True)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{loop}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(dict(json.loads(line[7:]), loop=loop))
        print(f"{args.src} loop={loop}{' sync' if args.no_async_scheduling else ''}: warm-up {rows[-1]['warmup_s']:.1f} s ({rows[-1]['buckets']} buckets), "
              f"decode S=1 {rows[-1]['decode_ms_s1']:.1f} ms, S=64 {rows[-1]['decode_ms_s64']:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
