"""Random ragged paged-attention batches and an independent dense numpy attention (float64).

A case has static shapes (num_tokens T, num_seqs S, max_blocks MB, num_blocks NB, ...) and random
contents, so cases of one config share one compilation.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pallas_kernels import AttentionMetadata, KVCache, ragged_paged_attention


@dataclasses.dataclass(frozen=True)
class Config:
    num_seqs: int  # S (incl. padding sequences)
    num_tokens: int  # T (incl. padding tokens)
    max_ctx: int
    block_size: int = 16
    num_kv_heads: int = 2
    q_per_kv: int = 1
    head_dim: int = 64
    dtype: str = "float32"
    decode_only: bool = False
    num_layers: int = 2
    extra_blocks: int = 3  # unused blocks in the cache (stale random data)


@dataclasses.dataclass
class Case:
    q: np.ndarray  # [T, H, d]
    cache: KVCache
    layer: int
    metadata: AttentionMetadata
    q_lens: np.ndarray  # [S]
    ctx: np.ndarray  # [S]
    tables: np.ndarray  # [S, MB]


def make_case(cfg: Config, seed: int, *, reverse_seq: int | None = None,
              ctx_override: list[int] | None = None, q_override: list[int] | None = None) -> Case:
    """Random batch: some decode tokens, some (chunked) prefills, padding sequences and tokens."""
    rng = np.random.default_rng(seed)
    S, T, bs = cfg.num_seqs, cfg.num_tokens, cfg.block_size
    max_blocks = -(-cfg.max_ctx // bs)
    ctx = np.zeros(S, np.int32)
    q_lens = np.zeros(S, np.int32)
    budget = T
    num_real = max(1, S - int(rng.integers(0, S // 3 + 1)))
    # Padding sequences sit anywhere in a mixed batch, but only at the end of a decode-only one
    # (there token i belongs to sequence i).
    real = np.arange(num_real) if cfg.decode_only else rng.permutation(S)[:num_real]
    for i in sorted(real):
        if budget <= 0:
            break
        c = int(rng.integers(1, cfg.max_ctx + 1)) if rng.random() < 0.8 else int(
            rng.integers(1, max_blocks + 1) * bs if rng.random() < 0.5 else cfg.max_ctx)
        c = min(c, cfg.max_ctx)
        if cfg.decode_only or rng.random() < 0.4:
            ql = 1
        else:
            ql = int(rng.integers(1, c + 1)) if rng.random() < 0.5 else c
        ctx[i], q_lens[i] = c, min(ql, budget)
        budget -= q_lens[i]
    if ctx_override is not None:
        ctx[:] = ctx_override
        q_lens[:] = q_override
    if cfg.decode_only:
        assert T == S
        q_lens = np.minimum(q_lens, 1)
        ctx = np.where(q_lens > 0, ctx, 0).astype(np.int32)
    else:
        ctx = np.where(q_lens > 0, ctx, 0).astype(np.int32)
    assert q_lens.sum() <= T

    # Block tables: distinct shuffled blocks; entries past a sequence's length are garbage.
    need = [-(-int(c) // bs) for c in ctx]
    num_blocks = S * max_blocks + cfg.extra_blocks  # static per config: one compile per config
    pool = rng.permutation(num_blocks)
    tables = rng.integers(-5, num_blocks + 5, size=(S, max_blocks)).astype(np.int32)
    start = 0
    for i, n in enumerate(need):
        tables[i, :n] = pool[start:start + n]
        start += n
    if reverse_seq is not None:
        n = need[reverse_seq]
        tables[reverse_seq, :n] = np.sort(tables[reverse_seq, :n])[::-1]

    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    slots = np.full(T, -1, np.int32)
    for i in range(S):
        for j in range(q_lens[i]):
            pos = ctx[i] - q_lens[i] + j
            slots[cu[i] + j] = tables[i, pos // bs] * bs + pos % bs

    dtype = jnp.dtype(cfg.dtype)
    H, d = cfg.num_kv_heads * cfg.q_per_kv, cfg.head_dim
    shape = (cfg.num_layers, num_blocks, bs, cfg.num_kv_heads, d)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    meta = AttentionMetadata(
        slot_mapping=jnp.asarray(slots), block_tables=jnp.asarray(tables),
        context_lens=jnp.asarray(ctx), cu_q_lens=jnp.asarray(cu), decode_only=cfg.decode_only)
    cache = KVCache(jnp.asarray(k, dtype), jnp.asarray(v, dtype))
    layer = int(rng.integers(0, cfg.num_layers))
    return Case(jnp.asarray(q, dtype), cache, layer, meta, q_lens, ctx, tables)


def to_fp8(case: Case, seed: int) -> Case:
    """The case with an fp8 cache: each (layer, kv head) of K and V first multiplied by its own
    random magnitude (0.05 .. 50, so one scale per head matters), then quantized with a scale a
    random 1..8x its absmax / 448 (kv_quant.quantize_rows, what write_kv does)."""
    from pallas_kernels.kv_quant import FP8_MAX, quantize_rows

    rng = np.random.default_rng(seed)
    pages, scales = [], []
    for arr in (case.cache.k, case.cache.v):
        x = np.asarray(arr, np.float32)  # [L, NB, bs, kvh, d]
        L, kvh = x.shape[0], x.shape[3]
        x = x * np.exp(rng.uniform(np.log(0.05), np.log(50), (L, 1, 1, kvh, 1))).astype(np.float32)
        scale = np.abs(x).max(axis=(1, 2, 4)) / FP8_MAX * rng.uniform(1, 8, (L, kvh))  # [L, kvh]
        q = np.stack([np.asarray(quantize_rows(jnp.asarray(x[i].reshape(-1, kvh, x.shape[4])),
                                               jnp.asarray(scale[i], jnp.float32))).reshape(x.shape[1:])
                      for i in range(L)])
        pages.append(jnp.asarray(q.view(np.uint8)))  # the cache stores the e4m3fn bits
        scales.append(jnp.asarray(scale, jnp.float32))
    return dataclasses.replace(case, cache=KVCache(pages[0], pages[1], scales[0], scales[1]))


def _pages64(cache: KVCache, layer: int, name: str) -> np.ndarray:
    """[NB, bs, kvh, d] float64 values of one layer's K or V (an fp8 cache's dequantized)."""
    x = getattr(cache, name)[layer]
    if not cache.quantized:
        return np.asarray(x, np.float64)
    x = np.asarray(x).view(ml_dtypes.float8_e4m3fn).astype(np.float64)  # the uint8 pages are e4m3fn bits
    return x * np.asarray(getattr(cache, f"{name}_scale")[layer], np.float64)[None, None, :, None]
    return x


def dense_attention(case: Case, *, sm_scale=None, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Brute force, per sequence, float64: position -> (block, offset) looked up one by one."""
    q = np.asarray(case.q, np.float64)
    k_all = _pages64(case.cache, case.layer, "k")  # [NB, bs, kvh, d]
    v_all = _pages64(case.cache, case.layer, "v")
    T, H, d = q.shape
    bs, kvh = k_all.shape[1], k_all.shape[2]
    G = H // kvh
    scale = sm_scale if sm_scale is not None else 1.0 / np.sqrt(d)
    out = np.zeros((T, H, d))
    cu = np.asarray(case.metadata.cu_q_lens)
    for i in range(len(case.ctx)):
        c, ql = int(case.ctx[i]), int(case.q_lens[i])
        if ql == 0:
            continue
        ks = np.stack([k_all[case.tables[i, p // bs], p % bs] for p in range(c)])  # [c, kvh, d]
        vs = np.stack([v_all[case.tables[i, p // bs], p % bs] for p in range(c)])
        ks, vs = np.repeat(ks, G, axis=1), np.repeat(vs, G, axis=1)  # [c, H, d]: q head h -> kv h // G
        for j in range(ql):
            pos = c - ql + j
            t = cu[i] + j
            s = np.einsum("chd,hd->hc", ks[: pos + 1], q[t]) * scale  # [H, pos + 1]
            if soft_cap is not None:
                s = np.tanh(s / soft_cap) * soft_cap
            if sliding_window is not None:
                s[:, : max(0, pos + 1 - sliding_window)] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[t] = np.einsum("hc,chd->hd", p / p.sum(axis=1, keepdims=True), vs[: pos + 1])
    return out


def valid_tokens(case: Case) -> np.ndarray:
    """Boolean [T]: tokens that belong to a sequence."""
    return np.asarray(case.metadata.slot_mapping) >= 0


@functools.lru_cache(maxsize=None)
def jitted_attention(impl: str, opts_items: tuple = ()):
    """`ragged_paged_attention(q, cache, layer, metadata, impl=impl, interpret=True, **opts)` jitted once per
    (impl, options): `opts_items` are the options' sorted (name, value) pairs, e.g. (("mha_group", 16),
    ("soft_cap", 4.0)) (the reference ignores mha_group)."""
    opts = dict(opts_items)
    return jax.jit(lambda q, c, layer, m: ragged_paged_attention(q, c, layer, m, impl=impl, interpret=True, **opts))

