"""4-bit weights held as uint8, two values a byte, on the CPU chunked-dot path (jaxllm/models/quant_dot.py).

XLA CPU's int4 / uint4 → f32 convert is ~3x int8's (bench/int4_convert.py), which made a 4-bit
model decode 2-3x slower than fp32 there. So where the chunked dot runs, a 4-bit `q` is held as
uint8 bytes that each hold two input rows of the same block (the block scales' blocks of B along
the last contracted axis): byte j of block g holds row g*B + j in its low nibble and row
g*B + B/2 + j in its high one, j < B/2 (GGUF Q4's own byte order within a block). Each chunk of
output columns unpacks with a mask and a shift; the activation is split once into the matching
"low" and "high" halves, so no unpacked chunk is re-interleaved: two half-K dots per chunk
(`quant_dot.chunked_quant_dot`). int4 nibbles are two's complement (signed shifts), uint4 plain.

`QuantWeight(q, scale, offset, packed="int4" | "uint4", pack_axis)`: q [in..., in_last/2, out...]
uint8, pack_axis the packed (last contracted) axis counted from the end (negative, so a leading
layer axis added or indexed away leaves it right). The values, and so every product, are those of
the int4 / uint4 q it was packed from (`unpack4(pack4(q)) == q`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pallas_kernels.matmul.packed4 import nibbles  # one definition: the Triton kernel's (and these jnp paths')

PACKED = ("int4", "uint4")  # the value dtypes a packed q can hold


def can_pack(q_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> int | None:
    """The (negative) packing axis of a 4-bit q with block scales: the one axis where q and its scale
    differ (the blocked, last contracted one), when its blocks have an even size; None otherwise
    (per-output-channel scales, odd blocks: the q stays int4 / uint4)."""
    if len(q_shape) != len(scale_shape):
        return None
    axes = [a for a in range(len(q_shape)) if q_shape[a] != scale_shape[a]]
    if len(axes) != 1 or q_shape[axes[0]] % scale_shape[axes[0]]:
        return None
    a = axes[0]
    return a - len(q_shape) if (q_shape[a] // scale_shape[a]) % 2 == 0 else None


def pack4(q, axis: int, nblocks: int, xp=np):
    """q [..., K, ...] int4 / uint4 (numpy's ml_dtypes or jax) with `nblocks` blocks along `axis` →
    uint8 [..., K/2, ...]: per block, the first half's rows in the low nibbles, the second's in the high."""
    a = axis % q.ndim
    k = q.shape[a]
    v = q.astype(xp.int8 if _signed(q.dtype) else xp.uint8)  # the values, one a byte
    if xp is jnp:
        v = jax.lax.bitcast_convert_type(v, jnp.uint8) if v.dtype == jnp.int8 else v
    else:
        v = v.view(np.uint8)
    v = v.reshape(q.shape[:a] + (nblocks, 2, k // (2 * nblocks)) + q.shape[a + 1:])
    at = (slice(None),) * (a + 1)
    lo, hi = v[at + (0,)] & 0x0F, v[at + (1,)] & 0x0F  # [..., nb, B/2, ...] each
    return (lo | (hi << 4)).astype(xp.uint8).reshape(q.shape[:a] + (k // 2,) + q.shape[a + 1:])


def unpack4(b, packed: str, axis: int, nblocks: int, xp=jnp):
    """`pack4`'s inverse: uint8 [..., K/2, ...] → int4 / uint4 [..., K, ...] (jax, or numpy's ml_dtypes)."""
    a = axis % b.ndim
    half = b.shape[a]
    if xp is jnp:
        lo, hi = nibbles(b, packed)
    else:
        lo = (b & 0x0F).astype(np.int8)
        hi = (b >> 4).astype(np.int8)
        if packed == "int4":
            lo, hi = np.where(lo > 7, lo - 16, lo), np.where(hi > 7, hi - 16, hi)
    blk = half // nblocks
    lo = lo.reshape(b.shape[:a] + (nblocks, 1, blk) + b.shape[a + 1:])
    hi = hi.reshape(lo.shape)
    v = xp.concatenate([lo, hi], axis=a + 1).reshape(b.shape[:a] + (2 * half,) + b.shape[a + 1:])
    dt = {"int4": jnp.int4, "uint4": jnp.uint4} if xp is jnp else {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}
    return v.astype(dt[packed])


def split_halves(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """x [T, K] → the rows packed low and high: ([T, K/2], [T, K/2]) in the packed q's row order."""
    t, k = x.shape
    xr = x.reshape(t, k // block, 2, block // 2)  # [T, nb, 2, B/2]
    return xr[:, :, 0].reshape(t, k // 2), xr[:, :, 1].reshape(t, k // 2)


def _signed(dtype) -> bool:
    return np.dtype(dtype) == np.dtype(ml_dtypes.int4)
