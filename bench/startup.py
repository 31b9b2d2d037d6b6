"""Start-up time: from ``LLM(...)`` to the first generated token, cold and with a warm compile cache.

    python bench/startup.py --model smollm2-135m            # default engine flags
    python bench/startup.py --model smollm2-135m -- --max-num-seqs 8   # extra LLM kwargs as flags

Runs two fresh processes against one new JAXLLM_COMPILE_CACHE directory and one new
JAXLLM_GGUF_CACHE directory: the first compiles every bucket and converts the GGUF checkpoint
(cold), the second loads both from the caches (warm). Each prints the seconds from the
``LLM(...)`` call to the first token of a 1-token greedy request (process start-up and imports not
included; the import time is printed separately).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

T_IMPORT0 = time.perf_counter()


def child(model: str, extra: dict) -> None:
    from jaxllm import LLM, SamplingParams

    t_import = time.perf_counter() - T_IMPORT0
    t0 = time.perf_counter()
    llm = LLM(model=model, **extra)
    t_built = time.perf_counter() - t0
    out = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    t_first = time.perf_counter() - t0
    assert len(out[0].outputs[0].token_ids) == 1
    print(json.dumps({"import_s": t_import, "engine_ready_s": t_built, "first_token_s": t_first}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kwargs", default="{}", help="extra LLM keyword arguments as JSON")
    args = ap.parse_args(argv)
    extra = json.loads(args.kwargs)
    if args.child:
        child(args.model, extra)
        return 0
    cache = tempfile.mkdtemp(prefix="jaxllm-xla-")
    gguf_cache = tempfile.mkdtemp(prefix="jaxllm-gguf-")
    env = dict(os.environ, JAXLLM_COMPILE_CACHE=cache, JAXLLM_GGUF_CACHE=gguf_cache)
    env.setdefault("JAX_PLATFORMS", "cpu")
    results = {}
    for name in ("cold", "warm"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model, "--kwargs", args.kwargs]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-4000:], file=sys.stderr)
            return 1
        results[name] = json.loads(res.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name}: LLM(...) -> first token {r['first_token_s']:.1f}s (engine ready {r['engine_ready_s']:.1f}s; "
              f"imports before it {r['import_s']:.1f}s)", flush=True)
        for line in res.stderr.splitlines():
            if line.startswith("[jaxllm]"):
                print(f"    {line}")
    print(f"model {args.model}, kwargs {extra or 'defaults'}, compile cache {cache}, GGUF cache {gguf_cache}")
    shutil.rmtree(gguf_cache, ignore_errors=True)  # a converted checkpoint is ~0.5 GB
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
