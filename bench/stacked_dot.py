"""The CPU layer scan's fp32 projections: sliced by the scan (a copy per layer) vs read in place.

    JAX_PLATFORMS=cpu python bench/stacked_dot.py --tokens 1,8,64,256
    JAX_PLATFORMS=cpu python bench/stacked_dot.py --tokens 8 --variants xs,rows:1024,rows:2048,cols:2048

A `lax.scan` over SmolLM2-135M's 30 layers of random fp32 projections (wqkv [576, 960], wo [576,
576], w_gate_up [576, 3072], w_down [1536, 576], flattened; a residual and SiLU between them, no
attention), one jitted call per step of T tokens. Variants:
- xs: the weights are the scan's xs, `jnp.dot` on the layer's slice (the path before: XLA copies
  each layer's slice into a buffer of its own before the dot);
- rows:KIB: jaxllm/models/stacked_dot.py's `stacked_dot`, blocks of ~KIB KiB of input rows read from
  the stacked weights at the traced layer (passed to the scan once);
- cols:KIB: the same with blocks of output columns (quant_dot.py's layout for quantized weights;
  a column block is a strided slice).
Prints, per T, the median and best ms per call over --rounds interleaved rounds of 3 calls, the
largest relative difference from xs, and XLA's temp bytes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

L, E, H, KV, D, F = 30, 576, 9, 3, 64, 1536
SHAPES = {"wqkv": (E, (H + 2 * KV) * D), "wo": (H * D, E), "w_gate_up": (E, 2 * F), "w_down": (F, E)}


def cols_dot(x, w, layer, chunk_bytes):
    """x [T, K] @ w[layer] by blocks of output columns sliced at `layer` (f32)."""
    import jax.numpy as jnp
    from jax import lax

    from jaxllm.models.quant_dot import chunk_cols

    t, k = x.shape
    n = w.shape[-1]
    ch = chunk_cols(k, n, 4, chunk_bytes)
    nf = n // ch

    def body(i, y):
        wc = lax.dynamic_slice(w, (layer, 0, i * ch), (1, k, ch))[0]
        return lax.dynamic_update_slice_in_dim(y, jnp.dot(x, wc, preferred_element_type=jnp.float32), i * ch, axis=1)

    y = lax.fori_loop(0, nf, body, jnp.zeros((t, n), jnp.float32))
    if nf * ch < n:
        y = y.at[:, nf * ch:].set(jnp.dot(x, w[layer, :, nf * ch:]))
    return y


def make(variant: str):
    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxllm.models.stacked_dot import stacked_dot

    mode, _, kib = variant.partition(":")
    cb = int(kib or 2048) * 1024

    def layer(x, proj):
        qkv = proj("wqkv", x)
        h = x + proj("wo", qkv[:, :H * D])
        gu = proj("w_gate_up", h)
        return h + proj("w_down", jax.nn.silu(gu[:, :F]) * gu[:, F:])

    if mode == "xs":
        def f(ws, x):
            def body(c, w):
                x, i = c
                return (layer(x, lambda n, h: jnp.dot(h, w[n])), i + 1), None
            return lax.scan(body, (x, jnp.int32(0)), ws)[0][0]
    else:
        fn = {"rows": stacked_dot, "cols": cols_dot}[mode]

        def f(ws, x):
            def body(c, _):
                x, i = c
                return (layer(x, lambda n, h: fn(h, ws[n], i, cb)), i + 1), None
            return lax.scan(body, (x, jnp.int32(0)), None, length=L)[0][0]
    return jax.jit(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--variants", default="xs,rows:1024,rows:2048,rows:4096,cols:512,cols:2048")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    ws = {n: jnp.asarray(rng.standard_normal((L,) + s, dtype=np.float32) * 0.02) for n, s in SHAPES.items()}
    variants = list(dict.fromkeys(args.variants.split(",")))
    print(f"load {os.getloadavg()}")
    for t in (int(v) for v in args.tokens.split(",")):
        x = jnp.asarray(rng.standard_normal((t, E), dtype=np.float32))
        exe, err, temp, ref = {}, {}, {}, None
        for v in variants:
            c = make(v).lower(ws, x).compile()
            out = np.asarray(c(ws, x))
            ref = out if ref is None else ref
            exe[v], temp[v] = c, c.memory_analysis().temp_size_in_bytes
            err[v] = float(np.abs(out - ref).max() / np.abs(ref).max())
        ms = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                t0 = time.perf_counter()
                for _ in range(3):
                    exe[v](ws, x).block_until_ready()
                ms[v].append((time.perf_counter() - t0) / 3 * 1e3)
        print(f"T={t} (load {os.getloadavg()[0]:.2f})")
        for v in variants:
            print(f"  {v:10s} median {np.median(ms[v]):8.2f} ms  best {min(ms[v]):8.2f}  "
                  f"rel. diff {err[v]:.1e}  temp {temp[v] / 2**20:6.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
