"""`x @ w[layer]` at decode sizes: the Pallas stacked_matmul (reads w[layer] in place) vs XLA's dot
on a dynamically indexed layer (what the layer scan does today: slice copy + gemm).

    python bench/stacked_matmul.py            # Llama-2-13B projections, bf16, M = 1, 8, 64

Reported per shape: time per call and the weight bytes of one layer over that time (GB/s). On a
GPU compare with the device copy bandwidth (bench/attention_kernels.py); on CPU the kernel runs in interpret
mode (a smoke run, not a timing).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.attention_kernels import save_device_rows, time_variants  # noqa: E402
from pallas_kernels.matmul import stacked_matmul, stacked_matmul_reference  # noqa: E402

# (name, K, N) of Llama-2-13B's projections (q/k/v/o are 5120 x 5120; gate/up 5120 x 13824; down 13824 x 5120)
SHAPES_13B = [("qkvo", 5120, 5120), ("gate_up", 5120, 13824), ("down", 13824, 5120)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--layers", type=int, default=8, help="stacked layers (the timed call reads one)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--scale", type=int, default=1, help="divide K and N by this (CPU smoke runs; 8 keeps the shapes supported)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--json-key", default="stacked_matmul")
    args = ap.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    rows = []
    for name, k, n in SHAPES_13B:
        k, n = k // args.scale, n // args.scale
        w = jax.random.normal(jax.random.key(0), (args.layers, k, n), jnp.bfloat16)
        wbytes = k * n * 2
        for m in (int(r) for r in args.rows.split(",")):
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
            layer = jnp.int32(args.layers // 2)
            kern = jax.jit(lambda x, w, i: stacked_matmul(x, w, i, interpret=not gpu))
            xla = jax.jit(stacked_matmul_reference)
            err = float(jnp.abs(kern(x, w, layer).astype(jnp.float32) - xla(x, w, layer).astype(jnp.float32)).max())
            row = {"shape": name, "M": m, "K": k, "N": n, "max_abs_err": err}
            time_variants(row, {"pallas": (kern, (x, w, layer)), "xla": (xla, (x, w, layer))}, args.iters, wbytes)
            rows.append(row)
            print(f"{name:8s} M={m:3d} K={k:5d} N={n:5d}  pallas {row['pallas_us']:8.1f} us {row['pallas_GB/s']:7.0f} GB/s"
                  f"   xla {row['xla_us']:8.1f} us {row['xla_GB/s']:7.0f} GB/s   err {err:.3g}", flush=True)
    save_device_rows(args.json, args.json_key, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
