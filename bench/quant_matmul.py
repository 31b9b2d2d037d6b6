"""Weight-only int8 / fp8 matmul at decode sizes: the Pallas quant_matmul (weight tiles converted in
registers) vs XLA's dot as the model runs it without the kernel (`quant_einsum`: the convert fused into
XLA's gemm on a GPU), on Llama-2-13B's fused projections.

    python bench/quant_matmul.py      # int8, fp8 (per-column scales), int4 (AWQ-like: uint4 pairs, groups of 128
                                      # with offsets) at M = 1, 16, 64; int8 with GGUF Q8_0 blocks at M = 1
    python bench/quant_matmul.py --scale 16 --rows 1 --iters 2    # CPU smoke (interpret mode: not a timing)

Per row: time per call and the weight's bytes (1 per element, + its scales) over that time (GB/s);
"pallas_t264": the same kernel with the split count its plan gave before 2026-12-05 (264 programs
targeted, now 528: bench/RESULTS.md, "The Pallas kernels compiled for sm_90"); compare with the device copy bandwidth (bench/attention_kernels.py: 4,078 GB/s on the H200). The
roofline of a 13B int8 decode step is 13.35 GB at that bandwidth: 3.27 ms.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.attention_kernels import save_device_rows, time_variants  # noqa: E402
from jaxllm.models.quant import QuantWeight, pack_int4, quant_einsum  # noqa: E402
from pallas_kernels.matmul import quant_matmul  # noqa: E402
from pallas_kernels.matmul import stacked  # noqa: E402

OLD_TARGET = 264  # the split plan's program target before 2026-12-05 (now stacked.TARGET_PROGRAMS = 528)


def compiled_with_target(fn, args, target: int):
    """`fn` compiled for `args` with the split plan's program target set to `target` while it traces
    (stacked.TARGET_PROGRAMS is read then): the kernel's own plan, under the old target. `fn` is wrapped in a
    function of its own: jax.jit caches traces by function, so jit(fn) elsewhere would reuse this one."""
    kept = stacked.TARGET_PROGRAMS
    stacked.TARGET_PROGRAMS = target
    try:
        return jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    finally:
        stacked.TARGET_PROGRAMS = kept

# (name, K, N): Llama-2-13B's fused q/k/v, o, fused gate/up, down
SHAPES_13B = [("wqkv", 5120, 15360), ("wo", 5120, 5120), ("w_gate_up", 5120, 27648), ("w_down", 13824, 5120)]


def _weight(kind: str, k: int, n: int) -> QuantWeight:
    key = jax.random.key(0)
    if kind == "int4":  # as the GPU loader holds AWQ / GPTQ / --quantization int4: uint8 pairs, groups of 128
        q = jax.random.randint(key, (k, n), 0, 16, jnp.int32).astype(jnp.uint4)
        shape = (k // (128 if k % 128 == 0 else 32), n)  # groups of 32 in --scale's smoke shapes
        scale = jax.random.uniform(jax.random.key(1), shape, jnp.float32, 1e-3, 2e-2).astype(jnp.float16)
        return pack_int4(QuantWeight(q, scale, -8 * scale))
    if kind == "fp8":
        q = (jax.random.normal(key, (k, n), jnp.float32) * 64).astype(jnp.float8_e4m3fn)
    else:
        q = jax.random.randint(key, (k, n), -127, 128, jnp.int32).astype(jnp.int8)
    shape = (k // 32, n) if kind == "q8_0" else (n,)
    scale = jax.random.uniform(jax.random.key(1), shape, jnp.float32, 1e-3, 2e-2)
    return QuantWeight(q, scale.astype(jnp.float16) if kind == "q8_0" else scale)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--kinds", default="int8,fp8,int4,q8_0", help="q8_0: int8 with f16 scales per 32 rows (GGUF), M=1 only")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--scale", type=int, default=1, help="divide K and N by this (CPU smoke runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--json-key", default="quant_matmul")
    args = ap.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    rows = []
    for kind in args.kinds.split(","):
        for name, k, n in SHAPES_13B:
            k, n = k // args.scale, n // args.scale
            w = _weight(kind, k, n)
            wbytes = sum(a.size * a.dtype.itemsize for a in (w.q, w.scale, w.offset) if a is not None)
            for m in (int(r) for r in args.rows.split(",")):
                if kind == "q8_0" and m != 1:
                    continue
                x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
                call = lambda x, q, s, o, p=w.packed: quant_matmul(x, q, s, o, packed=p, interpret=not gpu)  # noqa: E731
                kargs = (x, w.q, w.scale, w.offset)
                kern, kern_old = jax.jit(call), compiled_with_target(call, kargs, OLD_TARGET)
                # XLA: what the model runs without the kernel (a 4-bit q as XLA's uint4, held unpacked)
                xla = jax.jit(lambda x, q, s, o: quant_einsum("tk,kn->tn", x, QuantWeight(q, s, o)))
                xla_args = (x, w.unpacked().q, w.scale, w.offset)
                a = kern(*kargs).astype(jnp.float32)
                b = xla(*xla_args).astype(jnp.float32)
                err = float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-6))
                row = {"kind": kind, "shape": name, "M": m, "K": k, "N": n, "max_rel_err": err}
                time_variants(row, {"pallas": (kern, kargs), "pallas_t264": (kern_old, kargs), "xla": (xla, xla_args)},
                              args.iters, wbytes)
                row["speedup"] = row["xla_us"] / row["pallas_us"]
                rows.append(row)
                print(f"{kind:5s} {name:9s} M={m:3d} K={k:5d} N={n:5d}  pallas {row['pallas_us']:8.1f} us "
                      f"{row['pallas_GB/s']:6.0f} GB/s (old plan {row['pallas_t264_GB/s']:5.0f})   xla {row['xla_us']:8.1f} us {row['xla_GB/s']:6.0f} GB/s   "
                      f"x{row['speedup']:.2f}   err {err:.2g}", flush=True)
    save_device_rows(args.json, args.json_key, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
