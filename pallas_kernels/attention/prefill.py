"""Pallas (Triton) ragged paged attention for mixed prefill + decode batches (flash-attention style).

Grid `(num_q_tiles, num_kv_heads)`. A q tile is up to `bq` consecutive query tokens of one
sequence (the tile table comes from `build_q_tiles`, a few jnp ops in the wrapper). Program (t, h)
stacks the tile's tokens x the q heads of kv head h into the rows of one `[bq * gp, head_dim]`
block (row r = token r // gp, head r % gp; q-per-kv padded to a power of two, padded rows masked),
then walks the sequence's KV in chunks of `block_k` tokens from the window start (0 without a
sliding window) up to its last query's position, gathering K/V rows through the block table from
the full stacked cache ref at the traced `layer`. Online softmax in fp32 (base 2), causal mask per
row. Rows of padding tokens are never stored: the output buffer is aliased in, zeros or (mixed
batches) the decode kernel's rows for the single-token sequences, which get no tiles here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.common import (
    MASK_VALUE, TILE_CTX, TILE_NUM_Q, TILE_POS0, TILE_Q_START, TILE_SEQ, build_q_tiles,
    check_inputs, dot_dtype, layer_index, next_pow2, resolve_scale)
from pallas_kernels.attention.decode import decode_rows
from pallas_kernels.attention.paged_chunk import attend_chunk
from pallas_kernels.metadata import AttentionMetadata, KVCache



def _prefill_kernel(layer_ref, tiles_ref, bt_ref, q_ref, k_ref, v_ref, _, *refs,
                    q_per_kv, gp, bq, num_heads, block_k, sm_scale, soft_cap, sliding_window, fp8):
    # refs: [k_scale_ref, v_scale_ref ([L, kvh] f32, fp8 cache only)], then the output o_ref
    scale_refs, o_ref = refs[:-1], refs[-1]
    t, h = pl.program_id(0), pl.program_id(1)
    head_dim = q_ref.shape[1]
    block_size, num_blocks = k_ref.shape[2], k_ref.shape[1]
    max_blocks = bt_ref.shape[1]
    layer = layer_ref[0]
    if fp8:  # this program's kv head scales: K's goes into the logit scale, V's onto the output
        sm_scale = sm_scale * scale_refs[0][layer, h]
    seq, q_start = tiles_ref[t, TILE_SEQ], tiles_ref[t, TILE_Q_START]
    n_q, pos0, ctx = tiles_ref[t, TILE_NUM_Q], tiles_ref[t, TILE_POS0], tiles_ref[t, TILE_CTX]

    r = jnp.arange(bq * gp, dtype=jnp.int32)  # [M] i32, M = bq * gp
    qi, g = r // gp, r % gp
    row_ok = (qi < n_q) & (g < q_per_kv)
    rows = jnp.where(row_ok, (q_start + qi) * num_heads + h * q_per_kv + g, 0)  # rows of [T*H, d]
    dcol = jnp.arange(head_dim, dtype=jnp.int32)[None, :]  # [1, d] i32
    q = plgpu.load(q_ref.at[rows[:, None], dcol], mask=row_ok[:, None], other=0.0)  # [M, d]
    q_pos = pos0 + qi  # [M] i32

    hi = jnp.minimum(ctx, pos0 + n_q)  # exclusive end of the KV this tile needs
    lo = jnp.int32(0)
    if sliding_window is not None:
        lo = jnp.maximum(pos0 - sliding_window + 1, 0)
    num_chunks = jnp.where(n_q > 0, (jnp.maximum(hi - lo, 0) + block_k - 1) // block_k, 0)

    def body(i, carry):  # carry: [M, d] f32, [M] f32, [M] f32
        k_pos = lo + i * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [bk] i32
        k_ok = k_pos < hi
        mask = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        return attend_chunk(carry, q, k_ref, v_ref, bt_ref, seq=seq, layer=layer, head=h, dcol=dcol, k_pos=k_pos,
                            k_ok=k_ok, mask=mask, block_size=block_size, max_blocks=max_blocks,
                            num_blocks=num_blocks, sm_scale=sm_scale, soft_cap=soft_cap)

    init = (jnp.zeros((bq * gp, head_dim), jnp.float32),
            jnp.full((bq * gp,), MASK_VALUE, jnp.float32), jnp.zeros((bq * gp,), jnp.float32))
    acc, _, l_i = lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.where(l_i > 0, l_i, 1.0)[:, None]
    if fp8:
        out = out * scale_refs[1][layer, h]
    # Masked rows point one past the end: never touched on GPU, dropped by interpret mode's scatter
    # (pointing them at a real row would make interpret mode write back stale values there).
    out_rows = jnp.where(row_ok, rows, o_ref.shape[0])
    plgpu.store(o_ref.at[out_rows[:, None], dcol], out.astype(o_ref.dtype), mask=row_ok[:, None])


def tile_rows(q_per_kv: int, rows_target: int = 64) -> tuple[int, int]:
    """(bq, gp): q tokens per tile and padded q-per-kv, bq * gp >= 16 rows, both powers of two."""
    gp = next_pow2(q_per_kv)
    bq = max(1, rows_target // gp)
    while bq * gp < 16:
        bq *= 2
    return bq, gp


def paged_prefill_attention(
    q: jax.Array,
    cache: KVCache,
    layer,
    metadata: AttentionMetadata,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    rows_per_tile: int = 64,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    split_decodes: bool = True,
    mha_group: int | str | None = None,
) -> jax.Array:
    """Ragged paged attention for any mix of prefill chunks and decode tokens. `split_decodes` (mixed
    batches): the single-token sequences go through the decode kernel (`decode_rows`: one q row per
    kv head, padded to 16) and only the longer ones get q tiles here, as the reference splits them;
    a decode token in a tile of `rows_per_tile` rows would do 64x its attention FLOPs and softmax work
    (an MHA model's q-per-kv 1). False: every sequence in tiles (the kernel alone, for tests).
    `mha_group`: decode_rows' switch to the G-heads-per-program MHA decode kernel (decode_mha.py)."""
    num_kv_heads, q_per_kv, head_dim = check_inputs(q, cache, metadata)
    num_tokens, num_heads, _ = q.shape
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"pallas_prefill needs a power-of-two head_dim >= 16, got {head_dim}")
    bq, gp = tile_rows(q_per_kv, rows_per_tile)
    block_k = block_k or (64 if head_dim <= 128 else 32)
    base = jnp.zeros((num_tokens, num_heads, head_dim), q.dtype)  # [T, H, d]: rows no tile writes
    seq_mask = None
    if split_decodes and not metadata.decode_only:
        q_lens = (metadata.cu_q_lens[1:] - metadata.cu_q_lens[:-1]).astype(jnp.int32)  # [S] i32
        one = q_lens == 1
        tok = jnp.where(one, metadata.cu_q_lens[:-1].astype(jnp.int32), 0)  # [S] i32: the decode token's row
        dec = decode_rows(q, cache, layer, metadata, jnp.where(one, metadata.context_lens, 0), tok,
                          sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                          interpret=interpret, num_warps=num_warps, num_stages=num_stages,
                          mha_group=mha_group)  # [S, H, d]
        base = base.at[jnp.where(one, tok, num_tokens)].set(dec, mode="drop")
        seq_mask = q_lens > 1
    tiles = build_q_tiles(metadata.cu_q_lens, metadata.context_lens, num_tokens, bq, seq_mask)  # [NT, 5] i32
    kernel = functools.partial(
        _prefill_kernel, q_per_kv=q_per_kv, gp=gp, bq=bq, num_heads=num_heads, block_k=block_k,
        sm_scale=resolve_scale(sm_scale, head_dim), fp8=cache.quantized,
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window))
    # [T*H, d] in the cache dtype (fp8 cache: q's dtype): the tensor-core dots take one input dtype.
    q_rows = q.reshape(num_tokens * num_heads, head_dim).astype(dot_dtype(q, cache))
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        grid=(tiles.shape[0], num_kv_heads), input_output_aliases={6: 0}, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="jaxllm_paged_prefill",
    )(layer_index(layer), tiles, metadata.block_tables.astype(jnp.int32), q_rows, cache.k, cache.v,
      base.reshape(q_rows.shape), *((cache.k_scale, cache.v_scale) if cache.quantized else ()))
    return out.reshape(num_tokens, num_heads, head_dim)
