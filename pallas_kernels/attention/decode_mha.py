"""Pallas (Triton) paged decode attention for MHA models (q_per_kv == 1): G kv heads per program.

Why. The decode kernel (decode.py) gives each program one kv head of one sequence. For an MHA model
(Llama-2-13B: 40 q heads = 40 kv heads, d 128) that is one real q row padded to a 16-row tile, K/V
rows of 256 bytes gathered at a stride of kvh * d * 2 bytes (10 KB) and S * kvh * splits programs.
Here program (group, s, p) takes G consecutive kv heads h0 .. h0+G-1 of sequence s (G = 16 by
default; heads past num_kv_heads masked):
  * q tile: the G heads' query rows `[R, d]`, R = max(G, 16) rows (a tensor-core dot needs >= 16);
  * each chunk of `block_k` tokens loads K and V as `[C, d]`, C = block_k * G, column c = (token
    c // G, head c % G): one token's G heads are G * d contiguous elements of the cache row
    `[L, num_blocks, block_size, kvh, d]` (4 KB at G 16, d 128, bf16);
  * logits `[R, C]` in one dot; (row g, column (t, g')) is masked unless g' == g and the token is in
    the context (and window), so each row's online softmax and P @ V see only its own head (masked
    columns get probability 0). The same 15/16 of wasted dot work as the 16-row padded tile of the
    one-head kernel, 16x fewer programs, contiguous loads.
Split-K and its log-sum-exp merge, fp8 caches (the per-(layer, kv head) K/V scales become per-row
vectors), sliding windows and soft caps are as in decode.py; the flash step is paged_chunk's.

Selection (trace time, in decode.py's `decode_rows`, the one place): `mha_group=` argument, else the
environment variable JAXLLM_DECODE_MHA_GROUP: "off" / "0" = the one-head kernel; "auto" = G 16; "<G>" = that G
(a power of two, 1..64); unset / "tune" (the default) = the one-head kernel here, while the engine's runner
times the variants at warm-up on the model's shapes (tune.py, jaxllm/runner/decode_tuning.py) and passes
its choice as `mha_group=` (0 for the one-head kernel), so a direct call of the kernels never tunes.
bench/device_check.sh's attn13b phase times both (impl `pallas_mha16` of bench/attention_kernels.py).
It applies to q_per_kv == 1 only; GQA models always take the one-head kernel (its tile already holds
a kv head's q_per_kv rows).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.common import (
    MASK_VALUE, launch_split_decode, next_pow2, plan_splits, resolve_scale,
    split_range)
from pallas_kernels.attention.paged_chunk import attend_chunk
from pallas_kernels.metadata import AttentionMetadata, KVCache

ENV_VAR = "JAXLLM_DECODE_MHA_GROUP"
AUTO_GROUP = 16
MAX_GROUP = 64
COLUMNS = 128  # default K/V columns per chunk (block_k * G) at head_dim <= 128; 64 above


TUNE = "tune"  # JAXLLM_DECODE_MHA_GROUP's default: the engine measures (jaxllm/runner/decode_tuning.py)


def env_setting() -> str:
    """JAXLLM_DECODE_MHA_GROUP as set, lower-cased; "tune" when unset or empty (the default)."""
    return os.environ.get(ENV_VAR, "").strip().lower() or TUNE


def resolve_mha_group(mha_group: int | str | None, q_per_kv: int) -> int | None:
    """The head group G the decode kernels use, or None for the one-head kernel. `mha_group` None reads
    JAXLLM_DECODE_MHA_GROUP (unset = "tune"). "off"/"0"/0 -> None; "tune" -> None (the kernels do not
    measure: the engine's runner does and passes its choice); "auto" -> 16; an int or "<int>" -> G, which
    must be a power of two in [1, 64]. None whenever q_per_kv != 1 (the variant is MHA-only)."""
    source = f"mha_group={mha_group!r}"
    if mha_group is None:
        mha_group = env_setting()
        source = f"{ENV_VAR}={os.environ.get(ENV_VAR, '')!r}"
    if isinstance(mha_group, str):
        word = mha_group.strip().lower()
        if word in ("off", "0", "none", "", TUNE):
            return None
        if word == "auto":
            mha_group = AUTO_GROUP
        else:
            try:
                mha_group = int(word)
            except ValueError:
                raise ValueError(f"{source}: expected 'tune', 'off', 'auto' or a power of two in [1, {MAX_GROUP}]") from None
    group = int(mha_group)
    if group == 0:
        return None
    if not 1 <= group <= MAX_GROUP or group & (group - 1):
        raise ValueError(f"{source}: the head group must be a power of two in [1, {MAX_GROUP}], got {group}")
    return group if q_per_kv == 1 else None


def effective_group(group: int, num_kv_heads: int) -> int:
    """The G the kernel runs with for `group` over `num_kv_heads` heads: at most next_pow2(kvh), so a
    smaller model gets no all-padding heads (G 16 and 32 over 4 heads are both G 4)."""
    return min(group, next_pow2(num_kv_heads))


def _decode_mha_kernel(layer_ref, ctx_ref, tok_ref, bt_ref, q_ref, k_ref, v_ref, *refs,
                       group, rows, num_seqs, num_heads, block_k, split_len, sm_scale, soft_cap,
                       sliding_window, fp8):
    # refs: [k_scale_ref, v_scale_ref ([L, kvh] f32, fp8 cache only)], then outputs o_ref, m_ref, l_ref
    scale_refs, (o_ref, m_ref, l_ref) = refs[:-3], refs[-3:]
    grp, s, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = o_ref.shape[-1]
    block_size, num_blocks, num_kv_heads = k_ref.shape[2], k_ref.shape[1], k_ref.shape[3]
    max_blocks = bt_ref.shape[1]
    layer = layer_ref[0]
    ctx = ctx_ref[s]
    h0 = grp * group  # first kv head (= q head: q_per_kv 1) of this program

    r = jnp.arange(rows, dtype=jnp.int32)  # [R] i32: tile row r = head h0 + r
    row_ok = (r < group) & (h0 + r < num_kv_heads)
    row_head = jnp.minimum(h0 + r, num_kv_heads - 1)  # [R] i32
    dcol = jnp.arange(head_dim, dtype=jnp.int32)[None, :]  # [1, d] i32
    q_rows = jnp.where(row_ok, tok_ref[s] * num_heads + row_head, 0)  # rows of q viewed [T*H, d]
    q = plgpu.load(q_ref.at[q_rows[:, None], dcol], mask=row_ok[:, None], other=0.0)  # [R, d]
    if fp8:  # per-row kv head scales: K's into the logit scale ([R, 1]), V's onto the output rows
        sm_scale = sm_scale * plgpu.load(scale_refs[0].at[layer, row_head], mask=row_ok, other=1.0)[:, None]

    c = jnp.arange(block_k * group, dtype=jnp.int32)  # [C] i32: column c = (token c // G, head c % G)
    col_tok, col_g = c // group, c % group
    col_ok = h0 + col_g < num_kv_heads
    col_head = jnp.minimum(h0 + col_g, num_kv_heads - 1)[:, None]  # [C, 1] i32
    own = col_g[None, :] == r[:, None]  # [R, C] bool: row g sees only its own head's columns

    lo, hi, num_chunks = split_range(split, split_len, ctx, sliding_window, block_k)

    def body(i, carry):  # carry: [R, d] f32, [R] f32, [R] f32
        k_pos = lo + i * block_k + col_tok  # [C] i32
        k_ok = (k_pos < hi) & col_ok
        return attend_chunk(carry, q, k_ref, v_ref, bt_ref, seq=s, layer=layer, head=col_head, dcol=dcol,
                            k_pos=k_pos, k_ok=k_ok, mask=own & k_ok[None, :], block_size=block_size,
                            max_blocks=max_blocks, num_blocks=num_blocks, sm_scale=sm_scale, soft_cap=soft_cap)

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m_i, l_i = lax.fori_loop(0, num_chunks, body, init)
    if fp8:
        acc = acc * plgpu.load(scale_refs[1].at[layer, row_head], mask=row_ok, other=1.0)[:, None]
    # Only the real heads' rows go out; the others point one past the end (never touched on GPU,
    # dropped by interpret mode's scatter), as in decode.py.
    out_rows = jnp.where(row_ok, (split * num_seqs + s) * num_heads + h0 + r, m_ref.shape[0])  # [R] i32
    plgpu.store(o_ref.at[out_rows[:, None], dcol], acc, mask=row_ok[:, None])
    plgpu.store(m_ref.at[out_rows], m_i, mask=row_ok)
    plgpu.store(l_ref.at[out_rows], l_i, mask=row_ok)


def decode_rows_mha(q: jax.Array, cache: KVCache, layer, metadata: AttentionMetadata, ctx: jax.Array,
                    tok: jax.Array, *, group: int = AUTO_GROUP, sm_scale: float | None = None,
                    sliding_window: int | None = None, soft_cap: float | None = None, interpret: bool = False,
                    block_k: int | None = None, num_splits: int | None = None, num_warps: int = 4,
                    num_stages: int = 2) -> jax.Array:
    """`decode_rows`' contract (sequence s's token tok[s], a row of q [T, H, d], attends to its first
    ctx[s] cache positions; ctx 0: zeros) for q_per_kv == 1, G = `group` kv heads per program
    (clamped to next_pow2(kvh): a smaller model gets no all-padding heads). `block_k`: tokens per chunk
    (default COLUMNS // G, 64 // G above head_dim 128), so that block_k * G (the K/V tile's rows) is a
    power of two >= 16. The caller (decode_rows) has validated q, the cache and the metadata.
    Returns [S, H, d] in q.dtype."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = cache.k.shape[3]
    if num_heads != num_kv_heads:
        raise ValueError(f"the MHA decode kernel needs num_heads == num_kv_heads, got {num_heads} and {num_kv_heads}")
    group = effective_group(group, num_kv_heads)
    block_k = block_k or max(1, (COLUMNS if head_dim <= 128 else COLUMNS // 2) // group)
    cols = block_k * group
    if block_k & (block_k - 1) or cols < 16:
        raise ValueError(f"the MHA decode kernel needs block_k (tokens per chunk) a power of two with "
                         f"block_k * G >= 16, got block_k {block_k}, G {group}")
    num_seqs = metadata.num_seqs
    num_groups = -(-num_kv_heads // group)
    table_tokens = metadata.block_tables.shape[1] * cache.block_size
    splits, split_len = plan_splits(num_seqs, num_groups, table_tokens, block_k, num_splits)
    kernel = functools.partial(
        _decode_mha_kernel, group=group, rows=max(16, group), num_seqs=num_seqs, num_heads=num_heads,
        block_k=block_k, split_len=split_len, sm_scale=resolve_scale(sm_scale, head_dim), fp8=cache.quantized,
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window))
    # grid: the head group varies fastest, so programs launched together read adjacent bytes of the
    # same cache rows (one token's kvh * d elements), then sequences, then splits.
    return launch_split_decode(kernel, name="jaxllm_paged_decode_mha", grid=(num_groups, num_seqs, splits),
                               splits=splits, q=q, cache=cache, layer=layer, metadata=metadata, ctx=ctx, tok=tok,
                               interpret=interpret, num_warps=num_warps, num_stages=num_stages)  # [S, H, d]
