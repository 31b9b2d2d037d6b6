"""Hybrid KV cache (jaxllm/core/kv_cache_groups.py, vLLM's hybrid KV cache manager) vs one full-length
cache for every layer (--disable-hybrid-kv-cache-manager).

Part 1 (host arithmetic, no device): for the Gemma dummy presets' shapes and Mistral-7B-v0.1's (every layer a
4096-token window: one sliding group of 32 slots, its out-of-window blocks freed), at a fixed KV budget per device
and context length, the KV blocks the budget buys and the requests of that length that fit at once
(blocks / the blocks one request holds: full groups its whole length, sliding groups window + chunk).

Part 2 (`--engine`): a small CPU engine per layout, same model (a dummy Gemma 3 config: 6 layers,
5 sliding (window 64) : 1 full), same 8 requests (384-token prompts, 96 tokens out), steps of the two
engines alternated: the KV blocks, the median decode step (host and device) and the forward pass alone
(one decode step's inputs placed beforehand, the device time only).

    python bench/hybrid_kv.py [--budget-gib 40] [--context 32768 131072] [--engine]
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

PRESETS = ("gemma-2-9b", "gemma-3-1b", "gemma-3-27b", "mistral-7b-v0.1")
# mistralai/Mistral-7B-v0.1's config.json (not a dummy preset): every layer a 4096-token sliding window
MISTRAL_7B_V01 = dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32000, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                      tie_word_embeddings=False)


def capacity_rows(budget_bytes: int, contexts, block_size: int, chunk: int, dtype_bytes: int):
    from checkpoints.dummy import dummy_config
    from jaxllm.core.kv_cache_groups import make_groups
    from jaxllm.models.config import ModelConfig
    from jaxllm.models.gemma_config import layer_attention

    rows = []
    for name in PRESETS:
        c = (ModelConfig.from_hf(MISTRAL_7B_V01, source=name) if name == "mistral-7b-v0.1" else dummy_config(name))
        windows = [layer_attention(c, i)[0] for i in range(c.num_layers)]
        for hybrid in (False, True):
            g = make_groups(windows, hybrid=hybrid)
            per_block = 2 * g.slots * block_size * c.num_kv_heads * c.head_dim * dtype_bytes
            blocks = budget_bytes // per_block
            for ctx in contexts:
                need = g.blocks_per_request(ctx, chunk, block_size)
                layout = "hybrid" if g.hybrid else "sliding" if g.managed else "classic"  # sliding: one group
                rows.append(dict(model=name, layout=layout, groups=g.num_groups,
                                 slots=g.slots, layers=c.num_layers, window=c.sliding_window, context=ctx,
                                 blocks=blocks, blocks_per_request=need, max_concurrency=blocks / need))
    return rows


def build(hybrid: bool, cfg_path: str, num_requests: int):
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    return build_engine(EngineConfig(model=cfg_path, load_format="dummy", max_model_len=1024, block_size=16,
                                     max_num_seqs=num_requests, max_num_batched_tokens=512,
                                     kv_cache_memory_bytes=64 << 20, disable_hybrid_kv_cache_manager=not hybrid),
                        compile_cache=False)


def forward_ms(engine, iters: int = 30) -> float:
    """Median device time of the forward pass of the step the scheduler would run next (a decode
    step of every running request), inputs built and placed beforehand: no host work timed."""
    import jax

    from jaxllm.runner.inputs import build_inputs

    r = engine.runner
    out = engine.scheduler.schedule()
    T, S, decode_only = r.buckets.pick_step(out.seqs)
    inp = build_inputs(out.seqs, [r._row(s.request_id) for s in out.seqs], r.num_rows, r.eos_ids, T, S, decode_only,
                       r.block_size, r.max_blocks_per_seq, r.max_model_len, vocab_size=r.vocab_size,
                       num_groups=r.num_kv_groups)
    inp = jax.device_put(r._with_zero_bitmask(inp, S))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(r._forward_local(inp))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def engine_runs(cfg_path: str, num_requests: int, prompt_len: int, max_tokens: int) -> list[dict]:
    """Both layouts on the same requests, their steps alternated (load drift hits both alike): the
    median decode step (scheduling, inputs, device, outputs), then the forward pass alone."""
    import numpy as np

    from jaxllm import SamplingParams

    engines = {h: build(h, cfg_path, num_requests) for h in (False, True)}
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for e in engines.values():
        rng = np.random.default_rng(0)
        for rid in range(num_requests):
            e.add_request(str(rid), {"prompt_token_ids": rng.integers(0, 1000, prompt_len).tolist()}, params)
    steps = {h: [] for h in engines}
    while any(e.has_unfinished_requests() for e in engines.values()):
        for h, e in engines.items():
            if not e.has_unfinished_requests():
                continue
            decoding = all(r.num_computed_tokens >= r.num_prompt_tokens for r in e.scheduler.running)
            t0 = time.perf_counter()
            e.step()
            if decoding:
                steps[h].append(time.perf_counter() - t0)
    rows = []
    for h, e in engines.items():  # one more round of requests, stopped mid-decode for the forward timing
        rng = np.random.default_rng(1)
        for rid in range(num_requests):
            e.add_request(f"f{rid}", {"prompt_token_ids": rng.integers(0, 1000, prompt_len).tolist()}, params)
        while e.scheduler.waiting or not all(r.num_computed_tokens > r.num_prompt_tokens for r in e.scheduler.running):
            e.step()
        rows.append(dict(layout="hybrid" if h else "classic", blocks=e.kv.num_blocks, decode_steps=len(steps[h]),
                         median_step_ms=1e3 * statistics.median(steps[h][2:])))
    for _ in range(2):  # alternated, the second pass reported
        for row, e in zip(rows, engines.values()):
            row["forward_ms"] = forward_ms(e)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-gib", type=float, default=40.0, help="KV cache bytes per device (bf16)")
    ap.add_argument("--context", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=2048,
                    help="max_num_batched_tokens (a sliding group holds window + chunk)")
    ap.add_argument("--engine", action="store_true", help="also time a small CPU engine run per layout")
    ap.add_argument("--repeats", type=int, default=2, help="engine runs per layout")
    ap.add_argument("--output-json")
    args = ap.parse_args(argv)
    rows = capacity_rows(int(args.budget_gib * 2**30), args.context, args.block_size, args.chunk, 2)
    print(f"KV budget {args.budget_gib} GiB bf16 per device, block_size {args.block_size}, chunk {args.chunk}")
    print("| model | layout | groups x slots (layers) | context | KV blocks | blocks / request | max concurrency |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} (window {r['window']}) | {r['layout']} | {r['groups']} x {r['slots']} ({r['layers']}) | "
              f"{r['context']} | {r['blocks']} | {r['blocks_per_request']} | {r['max_concurrency']:.1f}x |")
    runs = []
    if args.engine:
        cfg = dict(model_type="gemma3_text", vocab_size=1024, hidden_size=256, intermediate_size=512,
                   num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   query_pre_attn_scalar=64, sliding_window=64, sliding_window_pattern=6,
                   max_position_embeddings=2048)
        d = tempfile.mkdtemp()
        path = os.path.join(d, "config.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        for _ in range(args.repeats):
            for row in engine_runs(path, num_requests=8, prompt_len=384, max_tokens=96):
                runs.append(row)
                print(row, flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(capacity=rows, engine=runs), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
