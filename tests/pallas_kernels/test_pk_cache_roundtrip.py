"""The model's use of the API end to end: write_kv then attention, layer by layer under lax.scan,
through a chunked prefill and decode steps, against plain causal attention over the raw K/V."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import AttentionMetadata, KVCache, ragged_paged_attention, write_kv

L, KVH, G, D, BS, NB = 2, 2, 3, 16, 4, 24


def _dense_causal(q, k, v, start):
    """q [n, H, D] at positions start.., k/v [ctx, KVH, D]; plain numpy attention."""
    k = np.repeat(k, G, axis=1)
    v = np.repeat(v, G, axis=1)
    s = np.einsum("nhd,chd->hnc", q, k) / np.sqrt(D)
    pos = start + np.arange(q.shape[0])
    s = np.where(np.arange(k.shape[0])[None, None, :] <= pos[None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hnc,chd->nhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("impl", ["reference", "pallas_prefill"])
def test_chunked_prefill_then_decode_through_scan(impl):
    rng = np.random.default_rng(0)
    # Two sequences: A prefills 7 tokens in chunks of 5 + 2, then decodes; B prefills 3 then decodes.
    tables = np.array([[9, 2, 17, 5], [11, 0, 20, 3]], np.int32)
    total = {0: 12, 1: 8}
    qkv = {i: rng.standard_normal((L, n, 3, KVH * G, D)).astype(np.float32) for i, n in total.items()}
    steps = [  # (seq ids, new tokens per seq, context after the step), padded to T=8 tokens, S=3
        ([0, 1], [5, 3], [5, 3]), ([0, 1], [2, 1], [7, 4]), ([0, 1], [1, 1], [8, 5]), ([1, 0], [1, 1], [6, 9]),
    ]
    cache = KVCache.zeros(L, NB, BS, KVH, D, jnp.float32)

    @jax.jit
    def step(cache, q, k, v, md):
        def layer_fn(c, xs):
            layer, ql, kl, vl = xs
            c = write_kv(c, layer, kl, vl, md.slot_mapping)
            return c, ragged_paged_attention(ql, c, layer, md, impl=impl, interpret=True)
        return jax.lax.scan(layer_fn, cache, (jnp.arange(L, dtype=jnp.int32), q, k, v))

    for seqs, news, ctxs in steps:
        T = 8
        q = np.zeros((L, T, KVH * G, D), np.float32)
        k = np.zeros((L, T, KVH, D), np.float32)
        v = np.zeros((L, T, KVH, D), np.float32)
        slots, cu, ctx_arr, rows, t = np.full(T, -1, np.int32), [0], [], [], 0
        for sid, n, c in zip(seqs, news, ctxs):
            for j in range(n):
                pos = c - n + j
                q[:, t] = qkv[sid][:, pos, 0]
                k[:, t] = qkv[sid][:, pos, 1, ::G]
                v[:, t] = qkv[sid][:, pos, 2, ::G]
                slots[t] = tables[sid, pos // BS] * BS + pos % BS
                t += 1
            cu.append(t)
            ctx_arr.append(c)
            rows.append(tables[sid])
        cu.append(t)  # a padding sequence
        ctx_arr.append(0)
        rows.append(np.zeros(4, np.int32))
        md = AttentionMetadata(jnp.asarray(slots), jnp.asarray(np.stack(rows)), jnp.asarray(ctx_arr, jnp.int32),
                               jnp.asarray(cu, jnp.int32))
        cache, out = step(cache, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), md)
        out = np.asarray(out)
        for layer in range(L):
            for i, (sid, n, c) in enumerate(zip(seqs, news, ctxs)):
                raw = qkv[sid][layer, :c]
                want = _dense_causal(raw[c - n:, 0], raw[:, 1, ::G], raw[:, 2, ::G], c - n)
                np.testing.assert_allclose(out[layer, cu[i]:cu[i + 1]], want, atol=1e-4, rtol=1e-4)
            assert np.all(out[layer, t:] == 0)
