"""`x @ dequantize(q)` for decode-sized x, the weight read once as its int8 / fp8 bytes (GPU).

Why: on an H200, XLA's own gemm for an int8 or fp8 weight-only matmul ran batch-1 decode of the
13B shape at 6.77 / 6.70 ms per token against bf16's 7.68 (1.13-1.15x for half the bytes, 48% of
the int8 weight-read roofline), and the 64-request workload slower than bf16 (bench/RESULTS.md,
"Issue 17 on the GPU"): its Triton gemm for a few rows does not stream the weight at bandwidth.
This kernel is the stacked matmul's (pallas_kernels/matmul/stacked.py: split-K over a grid of
column tiles, x padded to 16+ rows for the tensor-core dot) with the weight tile converted to x's
dtype in registers: int8 and float8_e4m3fn (or its uint8 bits) are exact in bf16.

Scales: per output column (`scale` [N]: applied once to the summed f32 result), or per block of
`B` rows of K (`scale` [K / B, N], GGUF Q8_0's 32, a checkpoint's group): each K chunk of the
kernel is one block, its partial dot scaled per column before it is accumulated, plus the block's
x sum times `offset` [K / B, N] for asymmetric formats (weight = scale * q + offset). 4-bit weights
come packed two a byte as uint8 [K / 2, N] (`packed` "int4" / "uint4"; per block of B rows the first
B / 2 in the low nibbles, the rest in the high ones: jaxllm/models/quant_pack4.py's order) with block
scales, B >= 32: each chunk unpacks its [B / 2, N] bytes with a mask and shifts, two half-block dots.

With `layer`, q is stacked [L, K, N] (scales [L, ...]) and read in place at that (traced) layer.
Reference: `quant_matmul_reference` (dequantize, then a dot).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kv_quant import from_storage_as
from pallas_kernels.matmul.packed4 import nibbles
from pallas_kernels.matmul.stacked import MAX_ROWS, _block_n, small_m_matmul

DTYPES = (jnp.int8, jnp.float8_e4m3fn, jnp.uint8)  # uint8: float8_e4m3fn bits, or packed 4-bit pairs
PACKED = ("int4", "uint4")
BLOCK_KS = (64, 32, 16)  # per-column scales: the K chunk per iteration, the first dividing K (block scales: the block)


def _block_k(k: int) -> int | None:
    return next((b for b in BLOCK_KS if k % b == 0), None)


def unpack_reference(b: jax.Array, packed: str, nblocks: int) -> jax.Array:
    """uint8 [K / 2, N] of 4-bit pairs -> the values [K, N] f32, rows in order (per block: low nibbles
    then high ones)."""
    lo, hi = (a.astype(jnp.float32) for a in nibbles(b, packed))  # [K/2, N] each
    half, n = b.shape[0] // nblocks, b.shape[1]
    pair = jnp.stack([lo.reshape(nblocks, half, n), hi.reshape(nblocks, half, n)], axis=1)  # [nb, 2, B/2, N]
    return pair.reshape(2 * b.shape[0], n)


def quant_matmul_reference(x: jax.Array, q: jax.Array, scale: jax.Array, offset: jax.Array | None = None,
                           layer=None, packed: str | None = None) -> jax.Array:
    """x [M, K] @ (q * scale (+ offset)) -> [M, N] in x.dtype (f32 math). q [K, N] (or [L, K, N] with
    `layer`; `packed`: uint8 [K / 2, N]); scale [N] or block scales [K / B, N] (offset the same
    shape), [L, ...] with `layer`."""
    if layer is not None:
        q, scale = q[layer], scale[layer]
        offset = None if offset is None else offset[layer]
    w = unpack_reference(q, packed, scale.shape[0]) if packed else from_storage_as(q, jnp.float32)  # [K, N] f32
    if scale.ndim == 2:  # blocks of B rows of K
        nb = scale.shape[0]
        w = w.reshape(nb, -1, w.shape[-1]) * scale[:, None, :].astype(jnp.float32)
        if offset is not None:
            w = w + offset[:, None, :].astype(jnp.float32)
        w = w.reshape(-1, w.shape[-1])
    else:
        w = w * scale.astype(jnp.float32)
    return jnp.dot(x.astype(jnp.float32), w, precision="highest").astype(x.dtype)


def quant_matmul_supported(m: int, k: int, n: int, dtype, block: int | None = None, packed: str | None = None) -> bool:
    """Shapes and dtypes the kernel takes: M <= MAX_ROWS rows, a 1-byte weight (int8, float8_e4m3fn,
    its uint8 bits; `packed` 4-bit pairs in uint8), N a multiple of 16, K a multiple of 16 or, with
    block scales of `block` rows, of a block size 16..256 (a tensor-core dot needs K >= 16 per chunk;
    packed: 32..256, each half a dot), a power of two (Triton's tiles are)."""
    bk = _block_k(k) if block is None else block
    if packed is not None and (packed not in PACKED or block is None or bk < 32 or jnp.dtype(dtype) != jnp.uint8):
        return False
    return (m <= MAX_ROWS and jnp.dtype(dtype) in tuple(map(jnp.dtype, DTYPES)) and _block_n(n) is not None
            and bk is not None and 16 <= bk <= 256 and bk & (bk - 1) == 0 and k % bk == 0)  # Triton: 2^n tiles


def quant_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, offset: jax.Array | None = None, *, layer=None,
                 packed: str | None = None, block_n: int | None = None, splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
                 interpret: bool = False) -> jax.Array:
    """x [M, K] @ dequantized q -> [M, N] in x.dtype (f32 accumulation); shapes as in the reference."""
    m, k = x.shape
    stacked = layer is not None
    qs = q if stacked else q[None]  # [L, K, N]
    ss = scale if stacked else scale[None]  # [L, N] or [L, K / B, N]
    kq = k // 2 if packed else k  # q's rows
    if qs.ndim != 3 or qs.shape[1] != kq:
        raise ValueError(f"q must be [K={kq}, N] (or [L, K, N] with layer; packed 4-bit: K / 2 rows), got {q.shape}")
    n = qs.shape[2]
    blocked = ss.ndim == 3
    block = k // ss.shape[1] if blocked else None
    if (ss.shape[-1] != n or (blocked and k % ss.shape[1])
            or not quant_matmul_supported(m, k, n, q.dtype, block, packed)):
        raise ValueError(f"quant_matmul takes M <= {MAX_ROWS}, a 1-byte q, N % 16 == 0 and K a multiple of the "
                         f"block (16..256; 16 without block scales; packed 4-bit: block scales of 32..256); got "
                         f"M={m}, K={k}, N={n}, q {q.dtype}, packed={packed}, scale {scale.shape} "
                         f"(check quant_matmul_supported first)")
    if offset is not None and (not blocked or (offset if stacked else offset[None]).shape != ss.shape):
        raise ValueError(f"offset must have the block scales' shape {scale.shape}, got {offset.shape}")
    kw = dict(block_n=block_n, splits=splits, num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    li = layer if stacked else 0
    if blocked:
        offs = None if offset is None else (offset if stacked else offset[None])
        y = small_m_matmul(x, qs, li, block_scale=ss, offset=offs, packed=packed, block_k=block, **kw)  # [M, N] f32
    else:
        y = small_m_matmul(x, qs, li, block_k=_block_k(k), **kw) * ss[li].astype(jnp.float32)  # [M, N] f32
    return y.astype(x.dtype)
