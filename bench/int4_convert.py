"""Why 4-bit weights are slow on XLA CPU: the cost of turning one SmolLM2-sized [576, 3072] weight
into f32, per held form, and of the chunked dot (jaxllm/models/quant_dot.py) with block-32 scales.

    python bench/int4_convert.py

Forms: int8 (Q8_0), XLA's packed int4 / uint4 (`astype`; via int8; bitcast to uint8 pairs then
shifts), and a hand-packed uint8 array holding two rows a byte (each block's first 16 rows in the low
nibbles, the next 16 in the high ones, GGUF's order) unpacked with shifts: a possible CPU held form.
Median of 30 runs, ms.

    python bench/int4_convert.py --layouts [T]

The evidence for the CPU's held form (jaxllm/models/quant_pack4.py): the same [576, 3072] uint4 +
offset weight, block 32, as uint8 two rows a byte, paired within a block as halves (row j with
j + 16, GGUF's order) or adjacent (2i with 2i + 1), each chunk of columns unpacked and then either
re-interleaved into the weight's row order for one dot ("natural"), dotted as two half-K dots
against x's matching rows ("two", what quant_dot does), or concatenated low-then-high against a
permuted x for one dot ("cat"); with today's uint4 + offset chunked dot and int8 beside them. T
activation rows (default 1; try 8).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

K, N = 576, 3072


def timed(f, *a) -> float:
    f = jax.jit(f)
    f(*a).block_until_ready()
    ts = []
    for _ in range(30):
        t0 = time.perf_counter()
        f(*a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def main() -> None:
    from jaxllm.models.quant_dot import chunked_quant_dot

    rng = np.random.default_rng(0)
    q8 = jnp.asarray(rng.integers(-8, 8, (K, N)).astype(np.int8))  # [K, N]
    q4, u4 = q8.astype(jnp.int4), (q8 + 8).astype(jnp.uint4)  # [K, N] packed by XLA
    rows = jnp.asarray(rng.integers(0, 256, (K // 2, N)).astype(np.uint8))  # [K/2, N]: two rows a byte
    x = jnp.asarray(rng.standard_normal((1, K)).astype(np.float32))  # [1, K]
    s = jnp.asarray((rng.random((K // 32, N)) * 0.01).astype(np.float16))  # [K/32, N]

    def via_bits(q):
        b = lax.bitcast_convert_type(q.reshape(K, N // 2, 2), jnp.uint8)  # [K, N/2]
        return jnp.stack([b & 0xF, b >> 4], -1).reshape(K, N).astype(jnp.float32)

    def rows_unpack(b):
        bb = b.reshape(K // 32, 16, N)
        return jnp.concatenate([bb & 0xF, bb >> 4], axis=1).reshape(K, N).astype(jnp.float32)

    out = {
        "int8 astype f32": timed(lambda q: q.astype(jnp.float32), q8),
        "int4 astype f32": timed(lambda q: q.astype(jnp.float32), q4),
        "uint4 astype f32": timed(lambda q: q.astype(jnp.float32), u4),
        "int4 -> int8 -> f32": timed(lambda q: q.astype(jnp.int8).astype(jnp.float32), q4),
        "uint4 bitcast u8 + shifts": timed(via_bits, u4),
        "u8 two rows a byte + shifts": timed(rows_unpack, rows),
        "f32 dot [1,K]x[K,N]": timed(lambda x, w: x @ w, x, q8.astype(jnp.float32)),
        "chunked dot int8 block-32": timed(lambda x, q, s: chunked_quant_dot(x, q, s, 32), x, q8, s),
        "chunked dot int4 block-32": timed(lambda x, q, s: chunked_quant_dot(x, q, s, 32), x, q4, s),
        "chunked dot uint4 block-32 + offset": timed(lambda x, q, s: chunked_quant_dot(x, q, s, 32, offset=s), x, u4, s),
    }
    for k, v in out.items():
        print(f"{k:40s} {v:7.3f} ms")


def layouts(t: int) -> None:
    from jaxllm.models.quant_dot import chunk_cols, chunked_quant_dot

    b = 32
    nb = K // b
    rng = np.random.default_rng(0)
    u = rng.integers(0, 16, (K, N)).astype(np.uint8)  # [K, N] values
    s = jnp.asarray((rng.random((nb, N)) * 0.01).astype(np.float16))  # [K/32, N]
    x = jnp.asarray(rng.standard_normal((t, K)).astype(np.float32))  # [T, K]
    ub = u.reshape(nb, 2, b // 2, N)
    held = {"halves": jnp.asarray((ub[:, 0] | (ub[:, 1] << 4)).reshape(K // 2, N)),  # [K/2, N]
            "adjacent": jnp.asarray(u[0::2] | (u[1::2] << 4))}  # [K/2, N]
    ch = chunk_cols(K, N, 4)

    def loop(x, parts, fn):
        def body(i, y):
            sl = [lax.dynamic_slice_in_dim(p, i * ch, ch, axis=1) for p in parts]
            return lax.dynamic_update_slice_in_dim(y, fn(*sl), i * ch, axis=1)
        return lax.fori_loop(0, N // ch, body, jnp.zeros((x.shape[0], N), jnp.float32))

    def variant(form, mode):
        def f(x, bq, s):
            if form == "halves":
                xr = x.reshape(t, nb, 2, b // 2)
                xl, xh = xr[:, :, 0].reshape(t, K // 2), xr[:, :, 1].reshape(t, K // 2)
            else:
                xl, xh = x[:, 0::2], x[:, 1::2]

            def fn(bc, sc):
                c = bc.shape[1]
                lo, hi = bc & 0xF, bc >> 4
                sf = sc.astype(jnp.float32)[:, None]
                if mode == "natural":
                    w = (jnp.concatenate([lo.reshape(nb, b // 2, c), hi.reshape(nb, b // 2, c)], axis=1)
                         if form == "halves" else jnp.stack([lo, hi], axis=1).reshape(nb, b, c))
                    return x @ (w.astype(jnp.float32) * sf + sf).reshape(K, c)
                ws = [(h.reshape(nb, b // 2, c).astype(jnp.float32) * sf + sf).reshape(K // 2, c) for h in (lo, hi)]
                if mode == "two":
                    return xl @ ws[0] + xh @ ws[1]
                return jnp.concatenate([xl, xh], 1) @ jnp.concatenate(ws, 0)
            return loop(x, [bq, s], fn)
        return f

    print(f"T={t}, chunk {ch} columns")
    def dot(packed=None):
        return lambda x, q, s: chunked_quant_dot(x, q, s, b, offset=s, packed=packed)

    rows = {"today uint4 + offset": (dot(), jnp.asarray(u).astype(jnp.uint4)),
            "today int8 + offset": (dot(), jnp.asarray(u.astype(np.int8))),
            "quant_dot packed uint4 (halves, two)": (dot("uint4"), held["halves"])}
    for name, (f, q) in rows.items():
        print(f"{name:40s} {timed(f, x, q, s):7.3f} ms")
    for form in held:
        for mode in ("natural", "two", "cat"):
            print(f"{form + ' ' + mode:40s} {timed(variant(form, mode), x, held[form], s):7.3f} ms")


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--layouts":
        layouts(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    else:
        main()
