"""Attention kernel bench: paged decode and prefill, each implementation on this machine's backend.

    python bench/attention_kernels.py                       # reference (CPU); reference + Pallas on a GPU
    python bench/attention_kernels.py --impls pallas --json out.json --check
    python bench/attention_kernels.py --impls reference,pallas,pallas_mha16 --only decode --ragged --check \
        --batch 64 --context 768 --heads 40 --kv-heads 40   # the MHA decode kernel A/B (13B shapes)

(Named so that it shadows nothing: `python bench/x.py` puts bench/ on sys.path, and a bench/kernels.py
made transformers >= 5.25 import it as the PyPI `kernels` package, failing HF's import in every bench.)

Decode: batch 64 x context 2048 x 32 q heads / 8 kv heads x head_dim 128, block_size 16, bf16 cache,
shuffled block tables. Reported: time per call, bytes read (K+V of every context token + q + out),
GB/s. Prefill: one 2048-token chunk (context 2048, causal), reported as TFLOP/s counting the causal
FLOPs only (4 * heads * head_dim per (query, visible key) pair). On a GPU the bench also measures a
device-to-device copy (read + write bytes / time) as the bandwidth yardstick, and --check compares
each implementation against the reference on the bench inputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import machine_info, merge_json  # noqa: E402
from pallas_kernels import AttentionMetadata, KVCache, ragged_paged_attention  # noqa: E402
from pallas_kernels.attention.decode import paged_decode_attention  # noqa: E402
from pallas_kernels.attention.prefill import paged_prefill_attention  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


def make_workload(num_seqs: int, context: int, q_len: int, num_heads: int, num_kv_heads: int,
                  head_dim: int, block_size: int, dtype, seed: int = 0, ragged: bool = False):
    """Every sequence has `context` tokens, the last `q_len` of them new; pages shuffled.

    ragged (decode, q_len 1): contexts drawn uniformly in [min(64, context), context] instead.
    """
    rng = np.random.default_rng(seed)
    ctx = (rng.integers(min(64, context), context + 1, num_seqs) if ragged and q_len == 1
           else np.full(num_seqs, context)).astype(np.int32)
    blocks_per_seq = -(-context // block_size)
    num_blocks = num_seqs * blocks_per_seq
    tables = rng.permutation(num_blocks).astype(np.int32).reshape(num_seqs, blocks_per_seq)
    T = num_seqs * q_len
    pos = ctx[:, None] - q_len + np.arange(q_len)[None, :]  # [S, q_len]
    slots = (np.take_along_axis(tables, pos // block_size, axis=1) * block_size
             + pos % block_size).reshape(-1).astype(np.int32)
    key = jax.random.key(seed)
    kq, kk, kv = jax.random.split(key, 3)
    shape = (1, num_blocks, block_size, num_kv_heads, head_dim)
    cache = KVCache(jax.random.normal(kk, shape, dtype), jax.random.normal(kv, shape, dtype))
    q = jax.random.normal(kq, (T, num_heads, head_dim), dtype)
    md = AttentionMetadata(
        slot_mapping=jnp.asarray(slots), block_tables=jnp.asarray(tables),
        context_lens=jnp.asarray(ctx),
        cu_q_lens=jnp.arange(num_seqs + 1, dtype=jnp.int32) * q_len, decode_only=q_len == 1)
    return q, cache, md


def time_call(fn, args, iters: int, warmup: int = 2) -> float:
    """Seconds per call, compile excluded. CPU: median of blocked calls. GPU: `iters` calls queued
    back to back, blocked once at the end (a sub-millisecond kernel would otherwise be timed with
    the host's dispatch latency), the best of 3 such rounds."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    if jax.default_backend() == "gpu":
        rounds = []
        for _ in range(3):
            t0 = time.perf_counter()
            outs = [fn(*args) for _ in range(iters)]
            jax.block_until_ready(outs)
            rounds.append((time.perf_counter() - t0) / iters)
            del outs
        return float(min(rounds))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_variants(row: dict, calls: dict, iters: int, nbytes: int) -> dict:
    """Times each `label: (fn, args)` of `calls` (time_call) into row[f"{label}_us"] and row[f"{label}_GB/s"]
    (`nbytes` read per call); returns row."""
    for label, (fn, fargs) in calls.items():
        t = time_call(fn, fargs, iters)
        row[f"{label}_us"], row[f"{label}_GB/s"] = t * 1e6, nbytes / t / 1e9
    return row


def save_device_rows(path: str | None, key: str, rows: list) -> None:
    """Merges {backend, device, rows} into the JSON file `path` under `key` (nothing without a path)."""
    if path:
        merge_json(path, key, {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "rows": rows})


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """Device-to-device copy, GB/s counting read + write."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0 + 0.0)  # one read + one write of every byte
    t = time_call(f, (x,), iters, warmup=2)
    return 2 * x.nbytes / t / 1e9


def attn_fn(impl: str):
    """impl: reference, pallas, pallas_decode, pallas_prefill, pallas_tiles (the prefill kernel with
    every sequence of a mixed batch in q tiles, single-token ones included: the path before 2026-12-05),
    or pallas_mha<G> (e.g. pallas_mha16): "pallas" with the decode tokens through the MHA decode kernel,
    G kv heads per program (decode_mha.py; the JAXLLM_DECODE_MHA_GROUP=<G> path; engines time it at warm-up; a GQA
    model falls back to the one-head kernel, so its row equals "pallas")."""
    interpret = jax.default_backend() != "gpu" and impl != "reference"  # CPU: interpret (smoke only)
    if impl == "pallas_tiles":
        return jax.jit(lambda q, c, md: paged_prefill_attention(q, c, 0, md, interpret=interpret, split_decodes=False))
    if impl.startswith("pallas_mha"):
        group = int(impl[len("pallas_mha"):])

        def mha(q, c, md):
            fn = paged_decode_attention if md.decode_only else paged_prefill_attention  # md.decode_only: static
            return fn(q, c, 0, md, interpret=interpret, mha_group=group)
        return jax.jit(mha)
    return jax.jit(lambda q, c, md: ragged_paged_attention(q, c, 0, md, impl=impl, interpret=interpret))


def make_mixed_workload(num_decodes: int, context: int, prefill: int, num_heads: int, num_kv_heads: int,
                        head_dim: int, block_size: int, dtype, seed: int = 0):
    """A mixed batch as a serving step has it: `num_decodes` single-token sequences at contexts drawn
    in [64, context] and one `prefill`-token prompt chunk (a fresh request); pages shuffled."""
    rng = np.random.default_rng(seed)
    ctx = np.append(rng.integers(min(64, context), context + 1, num_decodes), prefill).astype(np.int32)  # [S]
    q_lens = np.append(np.ones(num_decodes, np.int32), prefill)  # [S]
    blocks_per_seq = -(-max(context, prefill) // block_size)
    num_seqs = num_decodes + 1
    tables = rng.permutation(num_seqs * blocks_per_seq).astype(np.int32).reshape(num_seqs, blocks_per_seq)
    pos = np.concatenate([np.arange(c - n, c) for c, n in zip(ctx, q_lens)])  # [T] positions of the new tokens
    seq_of = np.repeat(np.arange(num_seqs), q_lens)
    slots = (tables[seq_of, pos // block_size] * block_size + pos % block_size).astype(np.int32)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    shape = (1, tables.size, block_size, num_kv_heads, head_dim)
    cache = KVCache(jax.random.normal(kk, shape, dtype), jax.random.normal(kv, shape, dtype))
    q = jax.random.normal(kq, (int(q_lens.sum()), num_heads, head_dim), dtype)
    md = AttentionMetadata(slot_mapping=jnp.asarray(slots), block_tables=jnp.asarray(tables),
                           context_lens=jnp.asarray(ctx), cu_q_lens=jnp.asarray(np.append(0, np.cumsum(q_lens)), jnp.int32),
                           decode_only=False)
    return q, cache, md


def _bandwidth_rows(kernel: str, what: str, impls, inputs: tuple, nbytes: int, shape: str, args, results):
    """Each impl on `inputs` (q, cache, metadata): time, `nbytes` over it, and with --check its error."""
    ref_out = None
    for impl in impls:
        fn = attn_fn(impl)
        t = time_call(fn, inputs, args.iters)
        row = {"kernel": kernel, "impl": impl, "ms": t * 1e3, "bytes_read": nbytes, "GB/s": nbytes / t / 1e9,
               "shape": shape}
        if args.check:
            ref_out = error_vs_reference(row, fn, inputs, ref_out)
        results.append(row)
        print(f"{kernel:7s} {impl:15s} {t * 1e3:9.3f} ms  {nbytes / 1e6:9.1f} MB {what}  {nbytes / t / 1e9:8.1f} GB/s"
              + (f"  err {row['max_abs_err_vs_ref']:.2e}" if "max_abs_err_vs_ref" in row else ""), flush=True)


def bench_mixed(impls, args, results):
    """A mixed step: --batch decodes (contexts <= --context) + one --mixed-prefill-token chunk."""
    q, cache, md = make_mixed_workload(args.batch, args.context, args.mixed_prefill, args.heads, args.kv_heads,
                                       args.head_dim, args.block_size, jnp.dtype(args.dtype))
    kv_bytes = 2 * int(np.asarray(md.context_lens).sum()) * args.kv_heads * args.head_dim * jnp.dtype(args.dtype).itemsize
    shape = (f"B{args.batch} ctx<={args.context} + prefill {args.mixed_prefill} H{args.heads}/{args.kv_heads} "
             f"d{args.head_dim} bs{args.block_size} {args.dtype}")
    _bandwidth_rows("mixed", "of KV", impls, (q, cache, md), kv_bytes, shape, args, results)


def bench_decode(impls, args, results):
    q, cache, md = make_workload(args.batch, args.context, 1, args.heads, args.kv_heads, args.head_dim,
                                 args.block_size, jnp.dtype(args.dtype), ragged=args.ragged)
    kv_bytes = 2 * int(np.asarray(md.context_lens).sum()) * args.kv_heads * args.head_dim * jnp.dtype(args.dtype).itemsize
    nbytes = kv_bytes + 2 * q.nbytes + md.block_tables.nbytes
    shape = (f"B{args.batch} ctx{'<=' if args.ragged else ''}{args.context} H{args.heads}/{args.kv_heads} "
             f"d{args.head_dim} bs{args.block_size} {args.dtype}")
    _bandwidth_rows("decode", "read", impls, (q, cache, md), nbytes, shape, args, results)


def error_vs_reference(row: dict, fn, inputs: tuple, ref_out):
    """row["max_abs_err_vs_ref"]: max |fn - the reference| on `inputs`; returns the reference's output
    (`ref_out`, computed here on the first call of a kernel's loop)."""
    out = np.asarray(fn(*inputs), np.float32)
    if ref_out is None:
        ref_out = np.asarray(attn_fn("reference")(*inputs), np.float32)
    row["max_abs_err_vs_ref"] = float(np.abs(out - ref_out).max())
    return ref_out


def bench_prefill(impls, args, results):
    n = args.prefill_tokens
    q, cache, md = make_workload(1, n, n, args.heads, args.kv_heads, args.head_dim, args.block_size,
                                 jnp.dtype(args.dtype))
    flops = 4 * args.heads * args.head_dim * (n * (n + 1) // 2)  # causal: QK^T and PV
    ref_out = None
    for impl in impls:
        fn = attn_fn(impl)
        t = time_call(fn, (q, cache, md), args.iters)
        row = {"kernel": "prefill", "impl": impl, "ms": t * 1e3, "flops": flops, "TFLOP/s": flops / t / 1e12,
               "shape": f"T{n} ctx{n} H{args.heads}/{args.kv_heads} d{args.head_dim} bs{args.block_size} {args.dtype}"}
        if args.check:
            ref_out = error_vs_reference(row, fn, (q, cache, md), ref_out)
        results.append(row)
        print(f"prefill {impl:15s} {t * 1e3:9.3f} ms  {flops / 1e9:9.1f} GFLOP    {flops / t / 1e12:8.3f} TFLOP/s"
              + (f"  err {row['max_abs_err_vs_ref']:.2e}" if "max_abs_err_vs_ref" in row else ""), flush=True)


def check_random_cases(num_cases: int, results) -> bool:
    """Each Pallas kernel (compiled, not interpreted) vs the reference on seeded random batches."""
    from tests.pallas_kernels.pk_cases import Config, make_case, valid_tokens

    configs = [  # (config, options): mixed and decode-only, GQA 1/3/4/8, head_dim 64/128, fp32/bf16
        (Config(8, 256, 2048, block_size=16, num_kv_heads=3, q_per_kv=3, dtype="bfloat16"), {}),
        (Config(16, 512, 1024, block_size=32, num_kv_heads=8, q_per_kv=4, head_dim=128, dtype="bfloat16"),
         dict(sliding_window=200, soft_cap=30.0)),
        (Config(4, 128, 700, block_size=8, num_kv_heads=2, q_per_kv=1, head_dim=128), {}),
        (Config(32, 32, 2048, block_size=16, num_kv_heads=3, q_per_kv=3, dtype="bfloat16", decode_only=True), {}),
        (Config(16, 16, 1500, block_size=16, num_kv_heads=8, q_per_kv=8, head_dim=128, decode_only=True),
         dict(sliding_window=300)),
    ]
    all_ok = True
    for cfg, opts in configs:
        impls = ["pallas_decode", "pallas_prefill"] if cfg.decode_only else ["pallas_prefill"]
        interpret = jax.default_backend() != "gpu"  # CPU: a (slow) smoke run of this check itself
        fns = {impl: jax.jit(lambda q, c, layer, m, i=impl, o=opts: ragged_paged_attention(
            q, c, layer, m, impl=i, interpret=interpret, **o)) for impl in impls + ["reference"]}
        # bf16: output rounding. fp32: the kernels' and XLA's GPU dots both default to TF32 inputs
        # (10-bit mantissa), so each side carries ~1e-3 relative error.
        tol = 2e-2 if cfg.dtype == "bfloat16" else 5e-3
        for seed in range(num_cases):
            case = make_case(cfg, 1000 + seed, reverse_seq=seed % cfg.num_seqs)
            args = (case.q, case.cache, case.layer, case.metadata)
            ok = valid_tokens(case)
            want = np.asarray(fns["reference"](*args), np.float32)[ok]
            for impl in impls:
                got = np.asarray(fns[impl](*args), np.float32)
                err = float(np.abs(got[ok] - want).max()) if ok.any() else 0.0
                finite = bool(np.isfinite(got).all())
                passed = finite and bool(np.allclose(got[ok], want, atol=tol, rtol=tol))
                all_ok &= passed
                results.append({"kernel": "check", "impl": impl, "config": repr(cfg), "options": opts,
                                "seed": 1000 + seed, "max_abs_err": err, "finite": finite, "passed": passed})
        print(f"check   {cfg.num_seqs}x{cfg.num_tokens} g{cfg.q_per_kv} d{cfg.head_dim} {cfg.dtype} {opts}: "
              f"{'ok' if all_ok else 'FAILED'}", flush=True)
    return all_ok


# Variants timed by --sweep: the defaults first, then one knob at a time around them, then the
# combinations that usually matter (bigger chunks with more warps). ~30 compiles, about a minute.
DECODE_SWEEP = (
    [dict()]
    + [dict(block_k=bk) for bk in (16, 32, 128)]
    + [dict(num_warps=w) for w in (2, 8)]
    + [dict(num_stages=st) for st in (1, 3, 4)]
    + [dict(num_splits=n) for n in (1, 2, 4, 8, 16)]
    + [dict(block_k=bk, num_warps=w) for bk in (32, 128) for w in (2, 8)]
    + [dict(block_k=128, num_warps=8, num_stages=3), dict(block_k=128, num_splits=8)]
)
# The MHA decode kernel (decode_mha.py), swept only on MHA shapes (--heads == --kv-heads): G kv heads
# per program, block_k tokens per chunk (block_k * G K/V rows), warps, stages.
MHA_SWEEP = (
    [dict(mha_group=16)]
    + [dict(mha_group=g) for g in (8, 32)]
    + [dict(mha_group=16, block_k=bk) for bk in (4, 16)]
    + [dict(mha_group=16, num_warps=w) for w in (2, 8)]
    + [dict(mha_group=16, num_stages=st) for st in (1, 3)]
)
PREFILL_SWEEP = (
    [dict()]
    + [dict(rows_per_tile=r) for r in (32, 128)]
    + [dict(block_k=bk) for bk in (32, 128)]
    + [dict(num_warps=w) for w in (8,)]
    + [dict(num_stages=st) for st in (1, 3)]
    + [dict(rows_per_tile=128, num_warps=8), dict(rows_per_tile=128, block_k=32, num_warps=8),
       dict(rows_per_tile=128, num_warps=8, num_stages=3)]
)


def sweep_configs(args, results):
    """Times Pallas kernel variants (tile sizes, warps, stages, splits; on MHA shapes the MHA decode kernel
    too) on the bench shapes."""

    dtype = jnp.dtype(args.dtype)
    dq, dc, dmd = make_workload(args.batch, args.context, 1, args.heads, args.kv_heads, args.head_dim,
                                args.block_size, dtype)
    dec_bytes = (2 * int(np.asarray(dmd.context_lens).sum()) * args.kv_heads * args.head_dim * dtype.itemsize
                 + 2 * dq.nbytes + dmd.block_tables.nbytes)
    n = args.prefill_tokens
    decode_variants = DECODE_SWEEP + (MHA_SWEEP if args.heads == args.kv_heads else [])
    work = {"decode": (paged_decode_attention, decode_variants, (dq, dc, dmd)),
            "prefill": (paged_prefill_attention, PREFILL_SWEEP,
                        make_workload(1, n, n, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype))}
    flops = 4 * args.heads * args.head_dim * (n * (n + 1) // 2)
    for kind, (fn, variants, (q, cache, md)) in work.items():
        if args.only not in (None, kind):
            continue
        for kw in variants:
            interp = jax.default_backend() != "gpu"  # CPU: a smoke run of the sweep itself
            f = jax.jit(lambda q, c, md, kw=kw: fn(q, c, 0, md, interpret=interp, **kw))
            try:
                t = time_call(f, (q, cache, md), args.iters)
            except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
                results.append({"kernel": f"sweep_{kind}", **kw, "error": str(e)[:300]})
                print(f"sweep   {kind:7s} {kw}  FAILED {str(e)[:200]}", flush=True)
                continue
            rate = (f"{dec_bytes / t / 1e9:8.1f} GB/s" if kind == "decode" else f"{flops / t / 1e12:8.3f} TFLOP/s")
            results.append({"kernel": f"sweep_{kind}", **kw, "ms": t * 1e3,
                            **({"GB/s": dec_bytes / t / 1e9} if kind == "decode" else {"TFLOP/s": flops / t / 1e12})})
            print(f"sweep   {kind:7s} {str(kw or 'defaults'):55s} {t * 1e3:8.3f} ms {rate}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default=None,
                   help="comma list of reference, pallas, pallas_decode, pallas_prefill, pallas_tiles, pallas_mha<G> "
                        "(default: reference; reference,pallas on a GPU)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--ragged", action="store_true",
                   help="decode: contexts drawn uniformly in [64, --context] (seeded) instead of all equal")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--mixed-prefill", type=int, default=0,
                   help="with --only mixed: one prompt chunk of this many tokens beside the --batch decodes")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=None, help="timed calls per case (default 3 CPU, 20 GPU)")
    p.add_argument("--only", choices=["decode", "prefill", "mixed"], default=None)
    p.add_argument("--check", action="store_true", help="also compare each impl with the reference")
    p.add_argument("--sweep", action="store_true", help="also time Pallas tile/warp/stage/split variants (on CPU: interpret mode, tiny shapes only)")
    p.add_argument("--skip-bench", action="store_true", help="no copy/decode/prefill timings (with --sweep or --cases)")
    p.add_argument("--cases", type=int, default=0,
                   help="first check each Pallas kernel against the reference on this many random batches per config")
    p.add_argument("--json", default=None, help="write results here (merged into the file under --json-key)")
    p.add_argument("--json-key", default="kernels")
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    impls = (args.impls or ("reference,pallas" if on_gpu else "reference")).split(",")
    args.iters = args.iters or (20 if on_gpu else 3)
    info = machine_info()
    print(f"# {info['date']}  {info['device']} ({info['backend']})  cpu: {info['cpu']} x{info['cores']}  "
          f"commit {info['commit']}  jax {info['jax']}", flush=True)
    results = []
    checks_ok = True

    def save():  # after each phase: a timeout in a later phase keeps what was measured
        if not args.json:
            return
        merge_json(args.json, args.json_key, {"machine": info, "checks_passed": checks_ok, "results": results})

    if args.cases:
        checks_ok = check_random_cases(args.cases, results)
        save()
    if on_gpu and not args.skip_bench:
        bw = copy_bandwidth(1 << 30, args.iters)
        results.append({"kernel": "copy", "impl": "xla", "GB/s": bw, "bytes": 1 << 30})
        print(f"copy    {'xla (r+w)':15s} {bw:8.1f} GB/s (1 GiB device-to-device)", flush=True)
    if args.only in (None, "decode") and not args.skip_bench:
        bench_decode(impls, args, results)
    if args.only in (None, "prefill") and not args.skip_bench:
        bench_prefill(impls, args, results)
    if args.only == "mixed" and not args.skip_bench:
        bench_mixed(impls, args, results)
    save()
    if args.sweep:
        sweep_configs(args, results)
        save()
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
