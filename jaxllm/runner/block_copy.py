"""Copy whole KV blocks on the device (forks: beam search's KVCacheManager.pin_fork).

``copy_blocks(cache, src, dst, n)`` copies block ``src[i]`` to block ``dst[i]`` in every layer, K
and V, for i < n; ``src``/``dst`` are [max_copies] int32 (one compiled shape, the rest padding).
A dynamic-count loop of dynamic-update-slices on the donated cache: it writes ``n`` blocks in
place and costs nothing else (a fixed-size gather would build a [layers, max_copies, block, heads,
dim] temporary every time). An fp8 cache's per-layer scales do not depend on the block: untouched.
"""
from __future__ import annotations

import dataclasses

import jax
from jax import lax

from pallas_kernels import KVCache


def copy_blocks(cache: KVCache, src: jax.Array, dst: jax.Array, n: jax.Array) -> KVCache:
    # src, dst: [max_copies] i32 block ids; n: i32 scalar, the pairs in use
    def body(i, kv):
        k, v = kv
        k = lax.dynamic_update_slice_in_dim(k, lax.dynamic_slice_in_dim(k, src[i], 1, axis=1), dst[i], axis=1)
        v = lax.dynamic_update_slice_in_dim(v, lax.dynamic_slice_in_dim(v, src[i], 1, axis=1), dst[i], axis=1)
        return k, v

    k, v = lax.fori_loop(0, n, body, (cache.k, cache.v))
    return dataclasses.replace(cache, k=k, v=v)
