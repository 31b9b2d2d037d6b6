"""Why 4-bit weights are slow on XLA CPU: the cost of turning one SmolLM2-sized [576, 3072] weight
into f32, per held form, and of the chunked dot (jaxllm/models/quant_dot.py) with block-32 scales.

    python bench/int4_convert.py

Forms: int8 (Q8_0), XLA's packed int4 / uint4 (`astype`; via int8; bitcast to uint8 pairs then
shifts), and a hand-packed uint8 array holding two rows a byte (each block's first 16 rows in the low
nibbles, the next 16 in the high ones, GGUF's order) unpacked with shifts: a possible CPU held form.
Median of 30 runs, ms.
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


if __name__ == "__main__":
    main()
