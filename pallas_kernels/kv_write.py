"""Writing new tokens' K/V into the paged cache.

`write_kv` is one XLA scatter per K and V into the stacked cache at `layer`. The cache is viewed
as `[num_layers, num_blocks * block_size, kv_heads, head_dim]` (a free reshape of a row-major
array), and the update is a scatter of `[T, kv_heads, head_dim]` rows: when the caller donates the
cache to its jitted step, or carries it through `lax.scan` over layers, XLA updates the buffer in
place — the cost is the T rows written, never the cache size. Slot -1 (padding) is mapped past the
end and dropped (`mode="drop"`); negative slots would otherwise wrap around.

An fp8 cache (`cache.quantized`) quantizes the rows on the way in with its per-layer, per-kv-head
scales (kv_quant.py) and scatters their uint8 bits. The engine's cache has `scales_fixed` (set at
start): that is all. A raw cache (tests, bench/perplexity.py "first") may hold 0 = unset scales: its
write sets them from the absmax of the rows (`first_write_scale`) and writes the layer's scales back,
one [kv_heads] row of each [L, kv_heads] scale array.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.kv_quant import first_write_scale, quantize_rows, to_storage
from pallas_kernels.metadata import KVCache


def _scatter(cache_arr: jax.Array, layer: jax.Array, rows: jax.Array, slots: jax.Array) -> jax.Array:
    # Indexed as [layer, block, offset] on the 5-D array itself: no reshape of the cache, whose
    # layout XLA may then pick freely when num_kv_heads is 1 (it did, and copied the whole cache
    # back to the parameter's layout after every write: issue 18).
    block_size = cache_arr.shape[2]
    blocks, offsets = slots // block_size, slots % block_size  # [T] i32 each
    return cache_arr.at[layer, blocks, offsets].set(rows.astype(cache_arr.dtype), mode="drop")


def write_kv(cache: KVCache, layer, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> KVCache:
    """Writes k, v `[T, num_kv_heads, head_dim]` into `cache.{k,v}[layer]` at `slot_mapping` [T].

    slot = block_id * block_size + offset; slot -1 (or any slot outside the cache) writes nothing.
    `layer` is a Python int or a traced int32 scalar (e.g. inside `lax.scan` over layers).
    """
    expected = (slot_mapping.shape[0], cache.k.shape[3], cache.k.shape[4])
    if k.shape != expected or v.shape != expected:
        raise ValueError(
            f"k and v must be [num_tokens, num_kv_heads, head_dim] = {expected}, "
            f"got {k.shape} and {v.shape}")
    num_slots = cache.num_blocks * cache.block_size
    slots = slot_mapping.astype(jnp.int32)
    slots = jnp.where((slots >= 0) & (slots < num_slots), slots, num_slots)  # [T] i32, OOB = dropped
    layer = jnp.asarray(layer, dtype=jnp.int32).reshape(())
    if not cache.quantized:
        return KVCache(_scatter(cache.k, layer, k, slots), _scatter(cache.v, layer, v, slots))
    if cache.scales_fixed:  # the engine's cache: set at start, never changed; nothing to derive
        k_scale, v_scale = cache.k_scale[layer], cache.v_scale[layer]  # [kvh] f32 each
        return dataclasses.replace(cache, k=_scatter(cache.k, layer, to_storage(quantize_rows(k, k_scale)), slots),
                                   v=_scatter(cache.v, layer, to_storage(quantize_rows(v, v_scale)), slots))
    valid = slots < num_slots  # [T] bool
    k_scale = first_write_scale(cache.k_scale[layer], k, valid)  # [kvh] f32
    v_scale = first_write_scale(cache.v_scale[layer], v, valid)  # [kvh] f32
    return KVCache(_scatter(cache.k, layer, to_storage(quantize_rows(k, k_scale)), slots),  # uint8 bits
                   _scatter(cache.v, layer, to_storage(quantize_rows(v, v_scale)), slots),
                   cache.k_scale.at[layer].set(k_scale), cache.v_scale.at[layer].set(v_scale))
