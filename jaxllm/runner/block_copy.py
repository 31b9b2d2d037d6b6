"""Copy whole KV blocks on the device (forks: beam search's KVCacheManager.pin_fork).

``copy_blocks(cache, src, dst)`` copies block ``src[i]`` to block ``dst[i]`` in every layer, K and V,
in order, for each of the COPY_CHUNK pairs; ``src``/``dst`` are [COPY_CHUNK] int32 (one compiled
shape). The runner sends any number of pairs as chunks of COPY_CHUNK, the last padded with (0, 0):
the null block copied onto itself, a no-op. A loop of dynamic-update-slices on the donated cache
(written in place; a fixed-size gather would build a [layers, n, block, heads, dim] temporary, and
the same copies unrolled made XLA CPU copy a uint8 (fp8) cache whole) with a static trip count: XLA
knows it (`known_trip_count`), so a GPU runs the body COPY_CHUNK times without reading a predicate
back. The earlier loop to a traced count made XLA GPU copy the predicate to the host each
iteration and block until the device reached it: the host waited for the previous step to finish
before it could launch the fork's step.
An fp8 cache's per-layer scales do not depend on the block: untouched.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax import lax

from pallas_kernels import KVCache

COPY_CHUNK = 8  # pairs per call: beam search forks at most a tail block per beam and step


def copy_blocks(cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    # src, dst: [COPY_CHUNK] i32 block ids (padding: 0 -> 0)
    def body(i, kv):
        k, v = kv
        k = lax.dynamic_update_slice_in_dim(k, lax.dynamic_slice_in_dim(k, src[i], 1, axis=1), dst[i], axis=1)
        v = lax.dynamic_update_slice_in_dim(v, lax.dynamic_slice_in_dim(v, src[i], 1, axis=1), dst[i], axis=1)
        return k, v

    k, v = lax.fori_loop(0, src.shape[0], body, (cache.k, cache.v))  # a static trip count
    return dataclasses.replace(cache, k=k, v=v)


def copy_chunks(pairs) -> list[tuple[np.ndarray, np.ndarray]]:
    """(source, destination) block id pairs → [(src, dst)] arrays of [COPY_CHUNK] i32, in order, the
    last padded with the null block's (0, 0)."""
    out = []
    for start in range(0, len(pairs), COPY_CHUNK):
        src = np.zeros(COPY_CHUNK, np.int32)  # [COPY_CHUNK] i32
        dst = np.zeros(COPY_CHUNK, np.int32)
        part = pairs[start:start + COPY_CHUNK]
        src[:len(part)], dst[:len(part)] = zip(*part)
        out.append((src, dst))
    return out
