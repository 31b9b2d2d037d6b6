"""Pallas (Triton) paged decode attention: one query token per sequence, split-K over the context.

Grid `(num_seqs, num_kv_heads, num_splits)`. Program (s, h, p) takes the q heads of kv head h of
sequence s together as the rows of one tile (`[gp, head_dim]`, q-per-kv padded to a power of two
>= 16 for the tensor-core dot, padded rows masked) and walks split p of the context in chunks of
`block_k` tokens, gathering each token's K/V row from the stacked cache through the block table:
`k_ref[layer, block, offset, h, :]` indexes the full cache ref, so the traced layer needs no slice.
Each split leaves an unnormalised fp32 accumulator with its running max and sum for the real q
heads only (rows of a flat [splits * S * H, d]: masked stores, no padded rows written); a small jnp
epilogue merges the splits (log-sum-exp, common.merge_splits) and casts to q.dtype.
MHA models (q-per-kv 1) can run decode_mha.py's kernel instead, G kv heads per program: `decode_rows`
switches on `mha_group=` (the engine passes the G it timed at warm-up: tune.py) / JAXLLM_DECODE_MHA_GROUP.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.common import (
    MASK_VALUE, check_inputs, launch_split_decode, next_pow2, plan_splits, resolve_scale,
    split_range)
from pallas_kernels.attention.decode_mha import decode_rows_mha, resolve_mha_group
from pallas_kernels.attention.paged_chunk import attend_chunk
from pallas_kernels.metadata import AttentionMetadata, KVCache



def _decode_kernel(layer_ref, ctx_ref, tok_ref, bt_ref, q_ref, k_ref, v_ref, *refs,
                   q_per_kv, gp, num_heads, block_k, split_len, sm_scale, soft_cap, sliding_window, fp8):
    # refs: [k_scale_ref, v_scale_ref ([L, kvh] f32, fp8 cache only)], then outputs o_ref, m_ref, l_ref
    scale_refs, (o_ref, m_ref, l_ref) = refs[:-3], refs[-3:]
    s, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = o_ref.shape[-1]  # gp: q_per_kv padded to a power of two >= 16 (the tile's rows)
    block_size, num_blocks = k_ref.shape[2], k_ref.shape[1]
    max_blocks = bt_ref.shape[1]
    layer = layer_ref[0]
    ctx = ctx_ref[s]
    if fp8:  # this program's kv head scales: K's goes into the logit scale, V's onto the output
        sm_scale = sm_scale * scale_refs[0][layer, h]

    g = jnp.arange(gp, dtype=jnp.int32)  # [gp] i32
    dcol = jnp.arange(head_dim, dtype=jnp.int32)[None, :]  # [1, d] i32
    head_ok = g < q_per_kv
    q_rows = jnp.where(head_ok, tok_ref[s] * num_heads + h * q_per_kv + g, 0)  # rows of q viewed [T*H, d]
    q = plgpu.load(q_ref.at[q_rows[:, None], dcol], mask=head_ok[:, None], other=0.0)  # [gp, d]

    lo, hi, num_chunks = split_range(split, split_len, ctx, sliding_window, block_k)

    def body(i, carry):  # carry: [gp, d] f32, [gp] f32, [gp] f32
        k_pos = lo + i * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [bk] i32
        k_ok = k_pos < hi
        return attend_chunk(carry, q, k_ref, v_ref, bt_ref, seq=s, layer=layer, head=h, dcol=dcol, k_pos=k_pos,
                            k_ok=k_ok, mask=k_ok[None, :], block_size=block_size, max_blocks=max_blocks,
                            num_blocks=num_blocks, sm_scale=sm_scale, soft_cap=soft_cap)

    init = (jnp.zeros((gp, head_dim), jnp.float32), jnp.full((gp,), MASK_VALUE, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    acc, m_i, l_i = lax.fori_loop(0, num_chunks, body, init)
    if fp8:
        acc = acc * scale_refs[1][layer, h]
    # only the q_per_kv real rows go out (a padded row would be written and read back for nothing: 15 of
    # the 16 rows of an MHA model's tile). Padded lanes point one past the end, as the prefill kernel's
    # masked rows: never touched on GPU, dropped by interpret mode's scatter.
    row0 = (split * pl.num_programs(0) + s) * num_heads + h * q_per_kv  # first q head of kv head h
    out_rows = jnp.where(head_ok, row0 + g, m_ref.shape[0])  # [gp] i32: rows of the flat [splits * S * H, d]
    plgpu.store(o_ref.at[out_rows[:, None], dcol], acc, mask=head_ok[:, None])
    plgpu.store(m_ref.at[out_rows], m_i, mask=head_ok)
    plgpu.store(l_ref.at[out_rows], l_i, mask=head_ok)


def paged_decode_attention(
    q: jax.Array,
    cache: KVCache,
    layer,
    metadata: AttentionMetadata,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    mha_group: int | str | None = None,
) -> jax.Array:
    """Decode-only paged attention (token i is the single new token of sequence i). `mha_group`: see
    `decode_rows`."""
    if not metadata.decode_only:
        raise ValueError("pallas_decode needs metadata.decode_only=True (one token per sequence)")
    q_lens = metadata.cu_q_lens[1:] - metadata.cu_q_lens[:-1]
    ctx = jnp.where(q_lens > 0, metadata.context_lens, 0).astype(jnp.int32)  # [S] i32; padding: no work
    tok = jnp.arange(metadata.num_seqs, dtype=jnp.int32)  # [S] i32: sequence i's token is row i
    out = decode_rows(q, cache, layer, metadata, ctx, tok, sm_scale=sm_scale, sliding_window=sliding_window,
                      soft_cap=soft_cap, interpret=interpret, block_k=block_k, num_splits=num_splits,
                      num_warps=num_warps, num_stages=num_stages, mha_group=mha_group)  # [S, H, d]
    return out.reshape(q.shape)


def decode_rows(q: jax.Array, cache: KVCache, layer, metadata: AttentionMetadata, ctx: jax.Array, tok: jax.Array, *,
                sm_scale: float | None = None, sliding_window: int | None = None, soft_cap: float | None = None,
                interpret: bool = False, block_k: int | None = None, num_splits: int | None = None,
                num_warps: int = 4, num_stages: int = 2, mha_group: int | str | None = None) -> jax.Array:
    """One query token per sequence: sequence s's token `tok[s]` (a row of q [T, H, d]) attends to its
    first `ctx[s]` cache positions (ctx 0: no work, zeros out) -> [S, H, d] in q.dtype. The decode
    kernel proper; `paged_decode_attention` (decode-only batches) and the mixed batches' single-token
    sequences (pallas_kernels/attention/prefill.py) call it.

    `mha_group` (None: the environment variable JAXLLM_DECODE_MHA_GROUP, unset / "tune" = this kernel; 0 /
    "off": this kernel): an MHA model (q_per_kv 1) with a group G ("auto" = 16, or a power of two) runs
    decode_mha.py's kernel, G kv heads per program, instead of this one. The engine's runner times both
    at warm-up on GPUs and passes its choice (jaxllm/runner/decode_tuning.py). The one switch point."""
    num_kv_heads, q_per_kv, head_dim = check_inputs(q, cache, metadata)
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"pallas_decode needs a power-of-two head_dim >= 16, got {head_dim}")
    group = resolve_mha_group(mha_group, q_per_kv)
    if group is not None:  # MHA, G heads per program (decode_mha.py); block_k there is tokens per chunk too
        return decode_rows_mha(q, cache, layer, metadata, ctx, tok, group=group, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
                               block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)
    num_tokens, num_heads, _ = q.shape
    num_seqs = metadata.num_seqs
    gp = max(16, next_pow2(q_per_kv))
    block_k = block_k or (64 if head_dim <= 128 else 32)
    table_tokens = metadata.block_tables.shape[1] * cache.block_size
    splits, split_len = plan_splits(num_seqs, num_kv_heads, table_tokens, block_k, num_splits)
    kernel = functools.partial(
        _decode_kernel, q_per_kv=q_per_kv, gp=gp, num_heads=num_heads, block_k=block_k,
        split_len=split_len, sm_scale=resolve_scale(sm_scale, head_dim), fp8=cache.quantized,
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window))
    return launch_split_decode(kernel, name="jaxllm_paged_decode", grid=(num_seqs, num_kv_heads, splits), splits=splits,
                               q=q, cache=cache, layer=layer, metadata=metadata, ctx=ctx, tok=tok, interpret=interpret,
                               num_warps=num_warps, num_stages=num_stages)  # [S, H, d]
