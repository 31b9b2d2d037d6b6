"""Pure-jnp ragged paged attention: the reference for the kernels and THE CPU path of the engine.

Same signature as `ragged_paged_attention`. Algorithm (vectorised, static shapes):
  * sequences with one new token (decodes; all of a decode_only batch) go through
    `_attend_decodes`: rows sorted by context on device, cut into _DECODE_GROUPS groups, each
    looping over KV chunks only up to its own longest context (work ~ the sum of the contexts);
  * longer ones (prefill chunks) are cut into q tiles of up to `bq` tokens of one sequence, so K/V
    gathered for a tile is reused by all its queries, attended in sequential groups of
    ~_ROWS_PER_GROUP query rows (`lax.map`);
  * per batch / group, a `lax.fori_loop` with a *traced* trip count walks KV chunks of `P` pages up
    to the group's last query (causal skipping; never the block-table width), gathering
    `[tiles, kv_heads, P pages]` straight from the stacked cache at `layer` (no layer slice is
    materialised), with an fp32 online softmax.
A decode step reads each sequence's pages once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention.common import build_q_tiles, check_inputs, next_pow2, resolve_scale
from pallas_kernels.kv_quant import STORAGE, from_storage
from pallas_kernels.metadata import AttentionMetadata, KVCache

# Target number of fp32 logits per KV chunk (all tiles, heads and queries together).
_LOGITS_PER_CHUNK = 1 << 24
# Prefill tiles: every group of ~_ROWS_PER_GROUP q rows walks KV chunks of up to _MAX_CHUNK tokens
# to its own last query, so short chunks and groups compute fewer logits above the causal diagonal
# (SmolLM2 mixed 2048-token step on CPU, 7 prompts of 84-496 tokens: 512 / 256 -> 128 / 128 cut
# the attention 47 -> 33 ms per layer; one 2048-token prompt unchanged; bench/RESULTS.md).
_MAX_CHUNK = 128  # tokens
_ROWS_PER_GROUP = 128  # mixed batches: q rows (tiles x bq) attended together per sequential step
# Decode rows: sorted by context and cut into this many groups, each looping to its own longest
# context in chunks of _DECODE_CHUNK tokens (SmolLM2 CPU bench, bench/RESULTS.md "CPU decode").
_DECODE_GROUPS = 8
_DECODE_CHUNK = 128  # tokens


def _choose_bq(num_tokens: int, num_seqs: int) -> int:
    return int(min(256, next_pow2(max(1, -(-num_tokens // max(1, num_seqs))))))


def _pages(x):
    """Gathered pages: an fp8 cache's uint8 bits as float8_e4m3fn (only the gathered chunk is
    bitcast, kv_quant.STORAGE); other caches unchanged."""
    return from_storage(x) if x.dtype == STORAGE else x


def _head_scales(cache: KVCache, layer):
    """(k_scale, v_scale) [kvh] f32 of `layer` for an fp8 cache, else (None, None)."""
    if not cache.quantized:
        return None, None
    return cache.k_scale[layer], cache.v_scale[layer]


def _attend_tiles(q_tiles, tables, q_pos, q_valid, ctx, n_q, pos0, *, cache, layer, scale,
                  sliding_window, soft_cap, num_heads):
    """Online-softmax attention of a batch of q tiles over their sequences' pages.

    q_tiles [NT, bq, kvh, G, d]; tables [NT, max_blocks] i32; q_pos, q_valid [NT, bq]; ctx, n_q,
    pos0 [NT]. Returns [NT, kvh, G, bq, d] f32. The KV loop runs from the first chunk any tile needs
    to the last (traced bounds), so its cost follows the contexts, not the table width.
    """
    num_tiles, bq, num_kv_heads, q_per_kv, head_dim = q_tiles.shape
    block_size, num_blocks = cache.block_size, cache.num_blocks
    dot_dtype = q_tiles.dtype
    # KV chunk of P pages; logits per chunk [NT, kvh, G, bq, C] stay near _LOGITS_PER_CHUNK.
    # Short chunks waste little past each context's end; at most the block-table width.
    max_blocks = tables.shape[1]
    chunk = max(block_size, min(_MAX_CHUNK, _LOGITS_PER_CHUNK // max(1, num_tiles * bq * num_heads)))
    pages_per_chunk = max(1, min(max_blocks, chunk // block_size))
    chunk = pages_per_chunk * block_size
    padded_blocks = -(-max_blocks // pages_per_chunk) * pages_per_chunk
    tables = jnp.pad(tables, ((0, 0), (0, padded_blocks - max_blocks)))  # [NT, MBp] i32
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32)
    k_scale, v_scale = _head_scales(cache, layer)  # fp8: [kvh] f32 each
    # per kv head logit scale, [kvh, 1, 1, 1] (sm_scale x the fp8 K scale) or a float
    s_scale = scale if k_scale is None else (scale * k_scale)[:, None, None, None]

    has_q = n_q > 0
    kv_hi = jnp.where(has_q, jnp.minimum(ctx, pos0 + n_q), 0)  # [NT] exclusive end of needed KV
    if sliding_window is not None:
        kv_lo = jnp.where(has_q, jnp.maximum(pos0 - sliding_window + 1, 0), jnp.iinfo(jnp.int32).max)
        first_chunk = jnp.minimum(jnp.min(kv_lo), jnp.max(kv_hi)) // chunk
    else:
        first_chunk = jnp.int32(0)
    last_chunk = (jnp.max(kv_hi) + chunk - 1) // chunk

    def body(c, carry):
        m, l, acc = carry  # [NT, kvh, G, bq] f32 x2, [NT, kvh, G, bq, d] f32
        pages = lax.dynamic_slice_in_dim(tables, c * pages_per_chunk, pages_per_chunk, axis=1)
        blocks = jnp.clip(pages, 0, num_blocks - 1)  # [NT, P] i32
        # Gathered head-major, [NT, kvh, P, bs, d] -> [NT, kvh, C, d]: the dots' batch dims (n, kvh)
        # lead, so XLA needs no transpose of the gathered pages.
        idx = (layer, blocks[:, None, :], slice(None), heads[None, :, None])
        k = _pages(cache.k[idx]).reshape(num_tiles, num_kv_heads, chunk, head_dim)  # [NT, kvh, C, d]
        v = _pages(cache.v[idx]).reshape(num_tiles, num_kv_heads, chunk, head_dim)  # [NT, kvh, C, d]
        s = jnp.einsum("nqkgd,nkcd->nkgqc", q_tiles, k.astype(dot_dtype),
                       preferred_element_type=jnp.float32) * s_scale  # [NT, kvh, G, bq, C] f32
        if soft_cap is not None:
            s = jnp.tanh(s / soft_cap) * soft_cap
        k_pos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)  # [C] i32
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < ctx[:, None, None])
        mask &= q_valid[:, :, None]
        if sliding_window is not None:
            mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        s = jnp.where(mask[:, None, None], s, -jnp.inf)  # [NT, kvh, G, bq, C] f32
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])  # [NT, kvh, G, bq, C] f32
        l = alpha * l + p.sum(axis=-1)
        # Like the kernels (and flash attention), P is cast to the cache dtype for P @ V.
        pv = jnp.einsum("nkgqc,nkcd->nkgqd", p.astype(dot_dtype), v.astype(dot_dtype),
                        preferred_element_type=jnp.float32)
        acc = alpha[..., None] * acc + pv
        return m_new, l, acc

    stat_shape = (num_tiles, num_kv_heads, q_per_kv, bq)
    init = (jnp.full(stat_shape, -jnp.inf, jnp.float32), jnp.zeros(stat_shape, jnp.float32),
            jnp.zeros(stat_shape + (head_dim,), jnp.float32))
    _, l, acc = lax.fori_loop(first_chunk, last_chunk, body, init)
    if v_scale is not None:  # P @ (V x s) = (P @ V) x s: the fp8 V scale factors out per kv head
        acc = acc * v_scale[:, None, None, None]
    return jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


def _attend_decodes(q_rows, tables, ctx, *, cache, layer, scale, sliding_window, soft_cap):
    """Decode attention: row i is the last token of a sequence of ctx[i] tokens (ctx 0: no query).

    q_rows [S, kvh, G, d] (dot dtype); tables [S, max_blocks] i32; ctx [S] i32. Returns
    [S, kvh, G, d] f32 (zeros where ctx == 0). Work follows the sum of the contexts, not
    S x the longest: rows are sorted by context on device and cut into _DECODE_GROUPS groups, each
    walking KV chunks of _DECODE_CHUNK tokens only up to its own longest context (context-0 rows sort
    first and cost nothing); results are scattered back to the original rows.
    """
    num_seqs, num_kv_heads, q_per_kv, head_dim = q_rows.shape
    block_size, num_blocks = cache.block_size, cache.num_blocks
    dot_dtype = q_rows.dtype
    max_blocks = tables.shape[1]
    pages_per_chunk = max(1, min(max_blocks, _DECODE_CHUNK // block_size))
    chunk = pages_per_chunk * block_size
    padded_blocks = -(-max_blocks // pages_per_chunk) * pages_per_chunk
    num_groups = min(_DECODE_GROUPS, num_seqs)
    group = -(-num_seqs // num_groups)
    padded_seqs = group * num_groups
    order = jnp.pad(jnp.argsort(ctx).astype(jnp.int32), (0, padded_seqs - num_seqs))  # [Sp] i32
    real = jnp.arange(padded_seqs) < num_seqs
    q_s = q_rows[order].reshape(num_groups, group, num_kv_heads, q_per_kv, head_dim)
    t_s = jnp.pad(tables, ((0, 0), (0, padded_blocks - max_blocks)))[order].reshape(num_groups, group, padded_blocks)
    c_s = jnp.where(real, ctx[order], 0).reshape(num_groups, group)  # padded rows: ctx 0
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32)
    k_scale, v_scale = _head_scales(cache, layer)  # fp8: [kvh] f32 each
    s_scale = scale if k_scale is None else (scale * k_scale)[:, None, None]  # [kvh, 1, 1] or float

    def attend_group(args):
        qg, tg, cg = args  # [n, kvh, G, d], [n, MBp] i32, [n] i32
        last_chunk = (jnp.max(cg) + chunk - 1) // chunk
        if sliding_window is not None:
            kv_lo = jnp.where(cg > 0, jnp.maximum(cg - sliding_window, 0), jnp.iinfo(jnp.int32).max)
            first_chunk = jnp.minimum(jnp.min(kv_lo), jnp.max(cg)) // chunk
        else:
            first_chunk = jnp.int32(0)

        def body(c, carry):
            m, l, acc = carry  # [n, kvh, G] f32 x2, [n, kvh, G, d] f32
            pages = lax.dynamic_slice_in_dim(tg, c * pages_per_chunk, pages_per_chunk, axis=1)
            blocks = jnp.clip(pages, 0, num_blocks - 1)  # [n, P] i32
            # Gathered head-major [n, kvh, P, bs, d] -> [n, kvh, C, d]: the dots' batch dims lead.
            idx = (layer, blocks[:, None, :], slice(None), heads[None, :, None])
            k = _pages(cache.k[idx]).reshape(group, num_kv_heads, chunk, head_dim)
            v = _pages(cache.v[idx]).reshape(group, num_kv_heads, chunk, head_dim)
            s = jnp.einsum("nkgd,nkcd->nkgc", qg, k.astype(dot_dtype),
                           preferred_element_type=jnp.float32) * s_scale  # [n, kvh, G, C] f32
            if soft_cap is not None:
                s = jnp.tanh(s / soft_cap) * soft_cap
            k_pos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)  # [C] i32
            mask = k_pos[None, :] < cg[:, None]  # [n, C]: the query sits at position ctx - 1
            if sliding_window is not None:
                mask &= k_pos[None, :] > cg[:, None] - 1 - sliding_window
            s = jnp.where(mask[:, None, None], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[..., None])  # [n, kvh, G, C] f32
            l = alpha * l + p.sum(axis=-1)
            pv = jnp.einsum("nkgc,nkcd->nkgd", p.astype(dot_dtype), v.astype(dot_dtype),
                            preferred_element_type=jnp.float32)
            return m_new, l, alpha[..., None] * acc + pv

        stat_shape = (group, num_kv_heads, q_per_kv)
        init = (jnp.full(stat_shape, -jnp.inf, jnp.float32), jnp.zeros(stat_shape, jnp.float32),
                jnp.zeros(stat_shape + (head_dim,), jnp.float32))
        _, l, acc = lax.fori_loop(first_chunk, last_chunk, body, init)
        if v_scale is not None:
            acc = acc * v_scale[:, None, None]
        return jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)

    out = lax.map(attend_group, (q_s, t_s, c_s)).reshape(padded_seqs, num_kv_heads, q_per_kv, head_dim)
    dest = jnp.where(real, order, num_seqs)  # padded rows dropped
    return jnp.zeros((num_seqs, num_kv_heads, q_per_kv, head_dim), jnp.float32).at[dest].set(out, mode="drop")


def ragged_paged_attention_reference(
    q: jax.Array,
    cache: KVCache,
    layer,
    metadata: AttentionMetadata,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    del interpret  # Signature parity with the kernels.
    num_kv_heads, q_per_kv, head_dim = check_inputs(q, cache, metadata)
    num_tokens, num_heads, _ = q.shape
    num_seqs = metadata.num_seqs
    scale = resolve_scale(sm_scale, head_dim)
    layer = jnp.asarray(layer, dtype=jnp.int32).reshape(())

    q_grouped = q.reshape(num_tokens, num_kv_heads, q_per_kv, head_dim)
    # Dots take the cache's dtype with fp32 accumulation: bf16 x bf16 products are exact in fp32, so
    # QK^T equals the upcast computation without an fp32 copy of the gathered pages. An fp8 cache's
    # pages are converted to q's dtype (exact: e4m3 values are bf16/f16/f32 values) and scaled per
    # kv head on the logits and the output (kv_quant.py).
    dot_dtype = q.dtype if cache.quantized else jnp.promote_types(q.dtype, cache.k.dtype)
    attend = functools.partial(
        _attend_plan, q_grouped.astype(dot_dtype), metadata.block_tables.astype(jnp.int32),
        cache=cache, layer=layer, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)

    if metadata.decode_only:
        q_lens = metadata.cu_q_lens[1:] - metadata.cu_q_lens[:-1]
        ctx = jnp.where(q_lens == 1, metadata.context_lens.astype(jnp.int32), 0)  # [S] i32, 0 = none
        out = _attend_decodes(q_grouped.astype(dot_dtype), metadata.block_tables.astype(jnp.int32), ctx,
                              cache=cache, layer=layer, scale=scale, sliding_window=sliding_window,
                              soft_cap=soft_cap)  # [S, kvh, G, d] f32
        return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
    # Mixed batch, two plans over disjoint tokens: single-token sequences (decodes) through the
    # decode path (one row each), longer ones in tiles of bq tokens, attended group by group.
    q_lens = (metadata.cu_q_lens[1:] - metadata.cu_q_lens[:-1]).astype(jnp.int32)
    one = q_lens == 1
    q_start = jnp.where(one, metadata.cu_q_lens[:-1].astype(jnp.int32), 0)  # [S] i32
    out = _attend_decodes(q_grouped.astype(dot_dtype)[q_start], metadata.block_tables.astype(jnp.int32),
                          jnp.where(one, metadata.context_lens.astype(jnp.int32), 0), cache=cache, layer=layer,
                          scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)  # [S, kvh, G, d] f32
    res = jnp.zeros((num_tokens, num_kv_heads, q_per_kv, head_dim), q.dtype)
    res = res.at[jnp.where(one, q_start, num_tokens)].set(out.astype(q.dtype), mode="drop")
    bq = _choose_bq(num_tokens, num_seqs)
    tiles = build_q_tiles(metadata.cu_q_lens, metadata.context_lens, num_tokens, bq, seq_mask=q_lens > 1)
    out, dest = attend(tiles, bq, group=max(1, _ROWS_PER_GROUP // bq))
    res = res.at[dest].set(out.reshape(-1, num_kv_heads, q_per_kv, head_dim).astype(q.dtype), mode="drop")
    return res.reshape(num_tokens, num_heads, head_dim)


def _attend_plan(q_grouped, block_tables, tiles, bq, *, group, cache, layer, scale, sliding_window, soft_cap):
    """Attention for one tile plan. q_grouped [T, kvh, G, d]; tiles [NT, 5] i32.

    Returns (out [NT, bq, kvh, G, d] f32, dest [NT * bq] i32 token of each row, T = none). Tiles
    run in sequential groups of `group` (one group = one batched KV loop up to its last query).
    """
    num_tokens, num_kv_heads, q_per_kv, _ = q_grouped.shape
    seq, q_start, n_q, pos0, ctx = (tiles[:, i] for i in range(5))  # each [NT] i32
    j = jnp.arange(bq, dtype=jnp.int32)
    tok = q_start[:, None] + j  # [NT, bq] i32
    q_valid = j[None, :] < n_q[:, None]  # [NT, bq] bool
    q_pos = pos0[:, None] + j  # [NT, bq] i32
    q_tiles = q_grouped[jnp.clip(tok, 0, num_tokens - 1)]  # [NT, bq, kvh, G, d]
    tables = block_tables[seq]  # [NT, max_blocks] i32
    attend = functools.partial(
        _attend_tiles, cache=cache, layer=layer, scale=scale, sliding_window=sliding_window,
        soft_cap=soft_cap, num_heads=num_kv_heads * q_per_kv)
    tile_args = (q_tiles, tables, q_pos, q_valid, ctx, n_q, pos0)
    num_tiles = q_tiles.shape[0]
    if group >= num_tiles:
        out = attend(*tile_args)  # [NT, kvh, G, bq, d] f32
    else:
        num_groups = -(-num_tiles // group)
        pad = num_groups * group - num_tiles  # padded tiles have n_q = 0: empty
        grouped = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(num_groups, group, *x.shape[1:])
                        for x in tile_args)
        out = lax.map(lambda a: attend(*a), grouped)  # [groups, group, kvh, G, bq, d] f32
        out = out.reshape(num_groups * group, *out.shape[2:])[:num_tiles]
    out = out.transpose(0, 3, 1, 2, 4)  # [NT, bq, kvh, G, d] f32
    return out, jnp.where(q_valid, tok, num_tokens).reshape(-1)
