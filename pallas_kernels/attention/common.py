"""Helpers shared by the attention implementations: scale, shape checks and the q-tile plan.

A *q tile* is up to `bq` consecutive query tokens of ONE sequence. The mixed (prefill) kernel and
the reference both walk a static number of tiles, `max_num_q_tiles(T, S, bq)`, which bounds
`sum_i cdiv(q_len_i, bq)` for any ragged batch of T tokens in S sequences. Unused tiles are empty
(n_q == 0) and do nothing.
"""
from __future__ import annotations

import math

import jax
import jax.experimental.pallas.fuser  # noqa: F401  (see below)
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.metadata import AttentionMetadata, KVCache

# Importing the Pallas fuser registers a config flag that is part of jax's trace context. jax
# imports it lazily during the first pallas_call, which changes the trace context and makes every
# function jitted before that call compile again on its next call (a compile after warm-up).
# Importing it up front, with pallas_kernels, keeps the trace context fixed.

# Finite "minus infinity" for masked logits inside the Pallas kernels (fp32). A row whose every
# logit is masked never reaches the output: kernels store only rows of real tokens.
MASK_VALUE = -1e30
LOG2E = 1.4426950408889634

# Columns of the int32 tile table `[num_tiles, TILE_FIELDS]`.
TILE_SEQ, TILE_Q_START, TILE_NUM_Q, TILE_POS0, TILE_CTX = range(5)
TILE_FIELDS = 5


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def resolve_scale(sm_scale: float | None, head_dim: int) -> float:
    return float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(head_dim)


def dot_dtype(q: jax.Array, cache: KVCache):
    """The kernels' dot input dtype: the cache's, or q's over an fp8 cache (whose pages are
    converted in registers and scaled per kv head: pallas_kernels/kv_quant.py)."""
    return q.dtype if cache.quantized else cache.k.dtype


def layer_index(layer) -> jax.Array:
    """The layer as an int32 array of shape [1] (a Python int or a traced scalar)."""
    return jnp.asarray(layer, dtype=jnp.int32).reshape(1)


def check_inputs(q: jax.Array, cache: KVCache, metadata: AttentionMetadata) -> tuple[int, int, int]:
    """Validates shapes at the edge; returns (num_kv_heads, q_per_kv, head_dim)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {q.shape}")
    if cache.k.ndim != 5 or cache.k.shape != cache.v.shape:
        raise ValueError(
            "cache.k and cache.v must both be [num_layers, num_blocks, block_size, num_kv_heads, "
            f"head_dim], got {cache.k.shape} and {cache.v.shape}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, cache_head_dim = cache.k.shape[3], cache.k.shape[4]
    if cache_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if metadata.num_tokens != num_tokens:
        raise ValueError(
            f"metadata.slot_mapping has {metadata.num_tokens} tokens but q has {num_tokens}")
    if metadata.cu_q_lens.shape != (metadata.num_seqs + 1,):
        raise ValueError(
            f"cu_q_lens must be [num_seqs + 1] = [{metadata.num_seqs + 1}], "
            f"got {metadata.cu_q_lens.shape}")
    if metadata.block_tables.ndim != 2 or metadata.block_tables.shape[0] != metadata.num_seqs:
        raise ValueError(
            f"block_tables must be [num_seqs={metadata.num_seqs}, max_blocks_per_seq], "
            f"got {metadata.block_tables.shape}")
    if metadata.decode_only and num_tokens != metadata.num_seqs:
        raise ValueError(
            f"decode_only metadata needs num_tokens == num_seqs, got {num_tokens} tokens and "
            f"{metadata.num_seqs} sequences")
    return num_kv_heads, num_heads // num_kv_heads, head_dim


def max_num_q_tiles(num_tokens: int, num_seqs: int, bq: int) -> int:
    """Static upper bound of sum_i cdiv(q_len_i, bq) over sequences with sum_i q_len_i <= T."""
    return max(1, (num_tokens + num_seqs * (bq - 1)) // bq)


def build_q_tiles(cu_q_lens: jax.Array, context_lens: jax.Array, num_tokens: int, bq: int,
                  seq_mask: jax.Array | None = None) -> jax.Array:
    """Splits each sequence's query tokens into tiles of at most `bq` tokens.

    Returns int32 `[num_tiles, TILE_FIELDS]`: (seq, first token, tokens in tile, absolute position
    of the first token, context length of the sequence). Empty tiles have n_q == 0 and ctx == 0.
    `seq_mask` [S] bool, optional: only these sequences get tiles.
    """
    num_seqs = context_lens.shape[0]
    num_tiles = max_num_q_tiles(num_tokens, num_seqs, bq)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    q_lens = jnp.maximum(cu_q_lens[1:] - cu_q_lens[:-1], 0)  # [S] i32
    tiles_per_seq = (q_lens + bq - 1) // bq  # [S] i32
    if seq_mask is not None:
        tiles_per_seq = jnp.where(seq_mask, tiles_per_seq, 0)
    cu_tiles = jnp.cumsum(tiles_per_seq)  # [S] i32, inclusive
    tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)  # [NT] i32
    seq = jnp.searchsorted(cu_tiles, tile_ids, side="right").astype(jnp.int32)  # [NT] i32
    used = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1)
    local = tile_ids - (cu_tiles[seq] - tiles_per_seq[seq])  # tile index within its sequence
    q_start = cu_q_lens[seq] + local * bq
    n_q = jnp.where(used, jnp.clip(cu_q_lens[seq + 1] - q_start, 0, bq), 0)
    ctx = jnp.where(used, context_lens[seq].astype(jnp.int32), 0)
    pos0 = ctx - q_lens[seq] + local * bq
    q_start = jnp.where(used, q_start, 0)
    pos0 = jnp.where(used, pos0, 0)
    return jnp.stack([seq, q_start, n_q, pos0, ctx], axis=1).astype(jnp.int32)  # [NT, 5] i32


def plan_splits(num_seqs: int, programs_per_seq: int, table_tokens: int, block_k: int,
                num_splits: int | None = None) -> tuple[int, int]:
    """(num_splits, split_len) of the decode kernels, whose grids run `programs_per_seq` programs (kv
    heads, or head groups) per sequence and split: enough programs to fill a GPU several times over (an
    H100 runs ~3 of these programs per SM, 132 SMs: fewer programs leave a ragged last wave), each split
    >= 2 chunks of `block_k` tokens. Tune with `bench/attention_kernels.py --sweep` on the GPU.
    `num_splits` given: that many equal splits of the table, each a multiple of block_k."""
    if num_splits is not None:
        split_len = -(-table_tokens // num_splits)
        return num_splits, -(-split_len // block_k) * block_k
    target_programs = 1024
    want = max(1, -(-target_programs // (num_seqs * programs_per_seq)))
    most = max(1, table_tokens // (2 * block_k))
    num_splits = min(want, most)
    split_len = -(-table_tokens // num_splits)
    split_len = -(-split_len // block_k) * block_k
    num_splits = -(-table_tokens // split_len)
    return num_splits, split_len


def split_range(split, split_len: int, ctx, sliding_window: int | None, block_k: int):
    """Inside a decode kernel: split `split`'s cache positions [lo, hi) of a sequence with `ctx` of them
    (clipped to the last `sliding_window` positions), and its number of `block_k` chunks (0 when empty)."""
    lo = split * split_len
    hi = jnp.minimum(ctx, lo + split_len)
    if sliding_window is not None:
        lo = jnp.maximum(lo, ctx - sliding_window)
    return lo, hi, (jnp.maximum(hi - lo, 0) + block_k - 1) // block_k


def merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array, splits: int, num_seqs: int,
                 num_heads: int) -> jax.Array:
    """The decode kernels' split-K epilogue (log-sum-exp): acc [splits*S*H, d] f32 (unnormalised), m / l
    [splits*S*H] f32 (base-2 running max and sum; rows in (split, seq, head) order) -> [S, H, d] f32.
    A row with l == 0 (no context) comes out as zeros."""
    acc = acc.reshape(splits, num_seqs, num_heads, acc.shape[-1])
    m, l = (a.reshape(splits, num_seqs, num_heads) for a in (m, l))
    m_all = m.max(axis=0)
    w = jnp.exp2(m - m_all[None])  # [splits, S, H] f32
    l_all = (w * l).sum(axis=0)
    return (w[..., None] * acc).sum(axis=0) / jnp.where(l_all > 0, l_all, 1.0)[..., None]  # [S, H, d] f32


def launch_split_decode(kernel, *, name: str, grid: tuple[int, int, int], splits: int, q: jax.Array, cache: KVCache,
                        layer, metadata: AttentionMetadata, ctx: jax.Array, tok: jax.Array, interpret: bool,
                        num_warps: int, num_stages: int) -> jax.Array:
    """Runs a split-K decode kernel (decode.py's, decode_mha.py's) and merges its splits. The kernel takes
    (layer [1], ctx [S], tok [S], block tables [S, MB] (i32), q viewed [T*H, d] in the dot dtype, cache K,
    cache V, [K scales, V scales: an fp8 cache]) and writes the flat f32 partials acc [splits*S*H, d], m and
    l [splits*S*H] (rows in (split, seq, head) order). Returns [S, H, d] in q.dtype."""
    num_tokens, num_heads, head_dim = q.shape
    rows = splits * metadata.num_seqs * num_heads  # flat rows: Triton tiles are powers of two, H may not be
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((rows, head_dim), f32),  # acc
                 jax.ShapeDtypeStruct((rows,), f32),  # running max (base 2)
                 jax.ShapeDtypeStruct((rows,), f32))  # running sum
    acc, m, l = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )(layer_index(layer), ctx.astype(jnp.int32), tok.astype(jnp.int32), metadata.block_tables.astype(jnp.int32),
      q.reshape(num_tokens * num_heads, head_dim).astype(dot_dtype(q, cache)), cache.k, cache.v,
      *((cache.k_scale, cache.v_scale) if cache.quantized else ()))
    return merge_splits(acc, m, l, splits, metadata.num_seqs, num_heads).astype(q.dtype)  # [S, H, d]
