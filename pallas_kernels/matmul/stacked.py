"""`x @ w[layer]` for small x, reading the stacked weight `w [L, K, N]` in place.

Why: inside `lax.scan` over layers, XLA (CPU and GPU alike, seen in the optimized HLO) copies each
layer's weight slice out of the stacked array before the matmul, so a decode step reads every
weight twice and writes it once. The attention kernels already avoid this for the KV cache by
indexing the whole stacked ref at the traced layer; this kernel does the same for the projections.

Pallas Triton. Grid `(N / block_n, splits)`: program (n, s) computes the `[Mp, block_n]` tile of
output columns n over the s-th of `splits` equal parts of K (split-K, so that a decode-sized
problem still has enough programs to keep every SM streaming weights), in fp32. A jnp epilogue sums
the splits. x is padded to Mp = max(16, next power of two) rows for the tensor-core dot; each split writes
only x's M real rows of its partial tile.
Reference: `stacked_matmul_reference` (a dynamic index and a dot).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.common import layer_index, next_pow2
from pallas_kernels.kv_quant import from_storage_as
from pallas_kernels.matmul.packed4 import nibbles

MAX_ROWS = 64  # beyond this the matmul is compute-bound and XLA's own gemm (plus the copy) wins
# Programs to launch: 4 per SM of a 132-SM H100/H200. bench/triton_static.py (the kernel compiled for sm_90 on a
# CPU machine) shows 3-7 of these programs resident per SM (72-162 registers a thread at 4 warps, 8-72 KiB of
# shared memory): the earlier 264 ("two waves", counting one program per SM) left each SM 2 programs, 8 of its
# 64 warps, to keep the weight stream's loads in flight (bench/RESULTS.md, "The Pallas kernels compiled for sm_90").
TARGET_PROGRAMS = 4 * 132


def stacked_matmul_reference(x: jax.Array, w: jax.Array, layer) -> jax.Array:
    """x [M, K], w [L, K, N] -> x @ w[layer] [M, N] in x.dtype (fp32 accumulation)."""
    wl = lax.dynamic_index_in_dim(w, jnp.asarray(layer, jnp.int32), axis=0, keepdims=False)
    return jnp.dot(x, wl, preferred_element_type=jnp.float32).astype(x.dtype)


def _block_n(n: int) -> int | None:
    return next((b for b in (128, 64, 32, 16) if n % b == 0), None)


def stacked_matmul_supported(m: int, k: int, n: int, block_k: int = 64) -> bool:
    """Shapes the kernel takes without masks: few rows, K a multiple of block_k, N of 16."""
    return m <= MAX_ROWS and k % block_k == 0 and _block_n(n) is not None


def _plan_splits(k_chunks: int, n_tiles: int) -> int:
    """The most splits up to TARGET_PROGRAMS programs (read at trace time) that divide K's chunks evenly."""
    want = max(1, -(-TARGET_PROGRAMS // n_tiles))
    return max(d for d in range(1, min(want, k_chunks) + 1) if k_chunks % d == 0)


def _dot(x, w):
    return lax.dot_general(x, w.astype(x.dtype), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(layer_ref, x_ref, w_ref, *rest, m, block_k, block_n, chunks_per_split, block_scaled, has_offset, packed):
    """Program (n, split): acc [Mp, BN] f32 over its K chunks. The weight tile is converted to x's dtype
    in registers (int8 / float8_e4m3fn, or uint8 holding e4m3fn bits); with `block_scaled` each
    chunk is one scale block (block_k = the block size) whose partial dot is scaled per column (and,
    `has_offset`, gets the block's x sum times its offset) before it is accumulated. `packed`
    ("int4" / "uint4"): w holds two rows a byte, per block the first half's rows in the low nibbles
    and the second half's in the high ones (jaxllm/models/quant_pack4.py): two half-block dots."""
    s_ref = rest[0] if block_scaled else None
    off_ref = rest[1] if has_offset else None
    o_ref = rest[-1]
    n, split = pl.program_id(0), pl.program_id(1)
    mp, bn = x_ref.shape[0], block_n
    layer = layer_ref[0]
    rows = jnp.arange(mp, dtype=jnp.int32)[:, None]  # [Mp, 1] i32
    cols = (n * bn + jnp.arange(bn, dtype=jnp.int32))[None, :]  # [1, BN] i32
    c0 = split * chunks_per_split  # the program's first K chunk

    def body(j, acc):  # acc [Mp, BN] f32
        if packed:
            half = block_k // 2
            kl = (c0 + j) * block_k + jnp.arange(half, dtype=jnp.int32)  # [BK/2] i32: the block's first half
            kp = (c0 + j) * half + jnp.arange(half, dtype=jnp.int32)  # [BK/2] i32: its packed rows
            lo, hi = nibbles(plgpu.load(w_ref.at[layer, kp[:, None], cols]), packed)  # [BK/2, BN] each
            x_lo = plgpu.load(x_ref.at[rows, kl[None, :]])  # [Mp, BK/2]
            x_hi = plgpu.load(x_ref.at[rows, kl[None, :] + half])  # [Mp, BK/2]
            part = _dot(x_lo, lo) + _dot(x_hi, hi)
            xsum = lambda: (jnp.sum(x_lo.astype(jnp.float32), axis=1, keepdims=True)  # noqa: E731
                            + jnp.sum(x_hi.astype(jnp.float32), axis=1, keepdims=True))  # [Mp, 1] f32
        else:
            ks = (c0 + j) * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [BK] i32
            x = plgpu.load(x_ref.at[rows, ks[None, :]])  # [Mp, BK]
            w = plgpu.load(w_ref.at[layer, ks[:, None], cols])  # [BK, BN] in the weight's storage dtype
            part = _dot(x, from_storage_as(w, x.dtype))  # uint8: float8_e4m3fn bits
            xsum = lambda: jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)  # noqa: E731  [Mp, 1] f32
        if block_scaled:
            kb = jnp.full((1, bn), c0 + j, jnp.int32)  # [1, BN] i32: this chunk's scale block
            part = part * plgpu.load(s_ref.at[layer, kb, cols]).astype(jnp.float32)
            if has_offset:
                part = part + xsum() * plgpu.load(off_ref.at[layer, kb, cols]).astype(jnp.float32)
        return acc + part

    acc = lax.fori_loop(0, chunks_per_split, body, jnp.zeros((mp, bn), jnp.float32))
    # only x's m real rows go out (a decode step's M=1 would write 16 rows of partials per split); padded
    # rows point one past the end of the flat [splits * m, N] partials: masked on GPU, dropped by interpret mode
    real = rows < m
    out = jnp.where(real, split * m + rows, o_ref.shape[0])  # [Mp, 1] i32
    plgpu.store(o_ref.at[out, cols], acc, mask=real)


def small_m_matmul(x: jax.Array, w: jax.Array, layer, *, block_scale: jax.Array | None = None,
                   offset: jax.Array | None = None, packed: str | None = None, block_k: int = 64, block_n: int | None = None,
                   splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
                   interpret: bool = False) -> jax.Array:
    """The kernel call: x [M, K] (M <= MAX_ROWS) @ w[layer] with w [L, K, N] read in place -> the f32
    split-K partials summed, [M, N] f32. `block_scale` (and `offset`) [L, K / block_k, N]: per-block
    dequantization in the kernel (block_k is the block size). `packed`: w is [L, K / 2, N] uint8 of
    4-bit pairs (block scales required). Shapes are the caller's to check."""
    m, k = x.shape
    n = w.shape[2]
    block_n = block_n or _block_n(n)
    mp = max(16, next_pow2(m))
    n_tiles, k_chunks = n // block_n, k // block_k
    splits = splits or _plan_splits(k_chunks, n_tiles)
    if k_chunks % splits:
        raise ValueError(f"splits={splits} must divide K / block_k = {k_chunks}")
    dot_dtype = x.dtype if w.dtype.itemsize == 1 else w.dtype  # a 1-byte weight converts to x's dtype
    xp = jnp.pad(x.astype(dot_dtype), ((0, mp - m), (0, 0)))  # [Mp, K] in the dot dtype
    extra = tuple(a for a in (block_scale, offset) if a is not None)
    partial = pl.pallas_call(
        functools.partial(_kernel, m=m, block_k=block_k, block_n=block_n, chunks_per_split=k_chunks // splits,
                          block_scaled=block_scale is not None, has_offset=offset is not None, packed=packed),
        out_shape=jax.ShapeDtypeStruct((splits * m, n), jnp.float32), grid=(n_tiles, splits),
        interpret=interpret, compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="jaxllm_small_m_matmul",
    )(layer_index(layer), xp, w, *extra)
    return partial.reshape(splits, m, n).sum(axis=0)  # [M, N] f32


def stacked_matmul(x: jax.Array, w: jax.Array, layer, *, block_k: int = 64, block_n: int | None = None,
                   splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
                   interpret: bool = False) -> jax.Array:
    """x [M, K] @ w[layer] with w [L, K, N] read in place -> [M, N] in x.dtype (fp32 accumulation)."""
    m, k = x.shape
    if w.ndim != 3 or w.shape[1] != k:
        raise ValueError(f"w must be [num_layers, K={k}, N], got {w.shape}")
    n = w.shape[2]
    block_n = block_n or _block_n(n)
    if m > MAX_ROWS or k % block_k or block_n is None or n % block_n:
        raise ValueError(f"stacked_matmul takes M <= {MAX_ROWS}, K % {block_k} == 0 and N % 16 == 0; "
                         f"got M={m}, K={k}, N={n} (check stacked_matmul_supported first)")
    return small_m_matmul(x.astype(w.dtype), w, layer, block_k=block_k, block_n=block_n, splits=splits,
                          num_warps=num_warps, num_stages=num_stages, interpret=interpret).astype(x.dtype)
