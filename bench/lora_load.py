"""How long other requests stall while a cold LoRA adapter is first requested.

    python bench/lora_load.py --model smollm2-135m --rank 64 --repeats 3 --output-json /tmp/ll.json

One engine (``enable_lora=True, max_loras=2, max_lora_rank=--rank``, warm). ``--repeats`` random
PEFT adapters (rank ``--rank``, all seven projections: bench/lora.py's writer) are written first.
Per repeat: ``--streams`` base-model requests decode (long outputs, greedy); after ``--warm-steps``
steps with tokens a request for one not-yet-loaded adapter is added (``add_request``) and the
engine keeps stepping until that request has its first ``--adapter-tokens`` tokens. Measured per
repeat (wall clock, ``time.perf_counter``):

- ``steady_gap_ms``: the median gap between one stream's consecutive tokens before the add;
- ``max_gap_ms``: the longest gap between that stream's consecutive tokens from the last token
  before the add to the adapter request's first token (what a streaming client sees stall), the
  ``add_request`` call included;
- ``add_ms``: the ``add_request`` call itself; ``ttft_ms``: add to the adapter request's first token;
- ``set_lora_ms``: time on the engine thread in the manager's ``set_lora`` call (the device slot
  write, plus, where the loader does not prepare it, the host-side slot layout);
- ``stream_tokens_during_load``: tokens one stream got between the add and the adapter's first token;
- ``base_add_max_gap_ms``: the floor: the same ``max_gap_ms`` for a base-model request of the same
  shape added ``--warm-steps // 2`` tokens earlier (its prefill step stretches one gap too; nothing
  loads). ``max_gap_ms - base_add_max_gap_ms`` is what the adapter's load and slot write add.

The same script runs on any commit of the engine (only public API: add_request / step): for the
"before" figure run it from a checkout of that commit. Machine load is printed and stored (CPU
numbers are noisy); the adapters are read from the page cache (just written), so a cold disk adds
to the load time of both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_repeat(engine, lora, args, vocab: int, rng, tag: str) -> dict:
    from jaxllm.sampling_params import SamplingParams

    long = SamplingParams(max_tokens=args.warm_steps + 400, ignore_eos=True, temperature=0.0)
    for i in range(args.streams):
        engine.add_request(f"{tag}-s{i}", {"prompt_token_ids": rng.integers(10, vocab, args.input_len).tolist()}, long)
    watch = f"{tag}-s0"
    set_lora_s = [0.0]
    inner = engine.lora._set_lora

    def timed_set_lora(slot, adapter):
        t = time.perf_counter()
        inner(slot, adapter)
        set_lora_s[0] += time.perf_counter() - t
    engine.lora._set_lora = timed_set_lora
    times: list[float] = []  # when the watched stream got a token
    t_add = t_add_end = t_first = None
    t_base = t_base_first = None
    n_adapter = 0
    while engine.has_unfinished_requests():
        if t_base is None and len(times) >= args.warm_steps // 2:
            t_base = time.perf_counter()
            engine.add_request(f"{tag}-base", {"prompt_token_ids": rng.integers(10, vocab, args.input_len).tolist()},
                               SamplingParams(max_tokens=args.adapter_tokens, ignore_eos=True, temperature=0.0))
        if t_add is None and len(times) >= args.warm_steps:
            t_add = time.perf_counter()
            engine.add_request(f"{tag}-lora", {"prompt_token_ids": rng.integers(10, vocab, args.input_len).tolist()},
                               SamplingParams(max_tokens=args.adapter_tokens, ignore_eos=True, temperature=0.0),
                               lora_request=lora)
            t_add_end = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id == watch and o.outputs[0].token_ids:
                times.append(now)
            if o.request_id == f"{tag}-base" and o.outputs[0].token_ids and t_base_first is None:
                t_base_first = now
            if o.request_id == f"{tag}-lora" and o.outputs[0].token_ids:
                n_adapter = len(o.outputs[0].token_ids)
                if t_first is None:
                    t_first = now
        if t_first is not None and n_adapter >= args.adapter_tokens:
            break
    engine.lora._set_lora = inner
    engine.abort_request([f"{tag}-s{i}" for i in range(args.streams)])
    while engine.has_unfinished_requests():
        engine.step()
    before = [t for t in times if t < t_base]
    gaps_before = [b - a for a, b in zip(before, before[1:])]

    def max_gap(start: float, first: float) -> float:
        """The longest gap of the watched stream from its last token before ``start`` to its first
        token after ``first`` (a gap that spans the add or the first token counts)."""
        window = [max(t for t in times if t < start)] + [t for t in times if start <= t <= first]
        after = [t for t in times if t > first]
        return max(b - a for a, b in zip(window + after[:1], (window + after[:1])[1:]))
    return {"steady_gap_ms": 1e3 * statistics.median(gaps_before), "max_gap_ms": 1e3 * max_gap(t_add, t_first),
            "add_ms": 1e3 * (t_add_end - t_add), "ttft_ms": 1e3 * (t_first - t_add),
            "set_lora_ms": 1e3 * set_lora_s[0],
            "stream_tokens_during_load": sum(1 for t in times if t_add <= t <= t_first),
            "base_add_max_gap_ms": 1e3 * max_gap(t_base, t_base_first)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rank", type=int, default=64, help="adapter rank (also max_lora_rank)")
    ap.add_argument("--streams", type=int, default=4, help="base-model requests decoding meanwhile")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--warm-steps", type=int, default=24, help="stream tokens before the adapter request")
    ap.add_argument("--adapter-tokens", type=int, default=4, help="adapter tokens awaited per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="cold adapters, one per repeat")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=268435456)
    ap.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--output-json")
    args = ap.parse_args(argv)

    import numpy as np

    from bench.common import log_machine
    from bench.lora import write_random_adapter
    from checkpoints import load_config
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine
    from jaxllm.lora import LoRARequest

    mc, _ = load_config(args.model, args.load_format)
    tmp = tempfile.TemporaryDirectory(prefix="jaxllm-lora-load-")
    loras = [LoRARequest(f"cold{i + 1}", i + 1, write_random_adapter(os.path.join(tmp.name, f"a{i + 1}"), mc,
                                                                     args.rank, seed=i + 1))
             for i in range(args.repeats)]
    size = os.path.getsize(os.path.join(loras[0].lora_path, "adapter_model.safetensors"))
    machine = log_machine()
    asyn = {"auto": None, "on": True, "off": False}[args.async_scheduling]
    engine = build_engine(EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                                       max_model_len=args.input_len + args.warm_steps + 512,
                                       max_num_seqs=args.streams + 2, max_num_batched_tokens=512,
                                       kv_cache_memory_bytes=args.kv_cache_memory_bytes, enable_lora=True,
                                       max_loras=2, max_lora_rank=args.rank, max_cpu_loras=2,
                                       async_scheduling=asyn))
    vocab = engine.vocab_size
    rng = np.random.default_rng(0)
    print(f"adapter: rank {args.rank}, all 7 projections, {size / 2**20:.1f} MiB; async_scheduling="
          f"{engine.async_scheduling}; load {os.getloadavg()}", flush=True)
    rows = []
    for rep, lora in enumerate(loras):
        r = run_repeat(engine, lora, args, vocab, rng, f"r{rep}")
        rows.append(r)
        print(json.dumps({"repeat": rep, **{k: round(v, 1) for k, v in r.items()}}), flush=True)
    compiles = getattr(engine.runner, "compile_count", 0) - engine.compiles_at_warmup
    summary = {k: round(statistics.median(r[k] for r in rows), 1) for k in rows[0]}
    print(f"\nmedian over {len(rows)} cold adapters: {summary}; compiles after warm-up: {compiles}; "
          f"load {os.getloadavg()}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"rows": rows, "median": summary, "compiles_after_warmup": compiles, "machine": machine,
                       "adapter_bytes": size, "args": vars(args), "load_after": os.getloadavg()}, f, indent=1)
    tmp.cleanup()
    return 0 if compiles == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
