"""Model-side tensor-parallel ops. Each takes `layout` (a TPLayout, or None on one device, where
it is exactly the single-device computation).

* `paged_attention`: cache write + ragged paged attention per device under `jax.shard_map`: q/k/v
  arrive sharded on heads / kv_heads, the KV cache on kv_heads, the metadata replicated; each
  device runs the unmodified kernel (reference on CPU, Pallas on GPU) on its local heads. No
  communication: device d's q heads only read kv head(s) it holds (see layout.py).
* `embed_lookup`: Megatron vocab-parallel embedding: each device looks up the ids in its vocab
  slice, zeroes the rest, one psum (exact: one non-zero term per row).
* `lm_logits`: vocab-parallel LM head, logits all-gathered for the full-vocabulary sampler.
* `constrain`: pins an activation's sharding by logical axis names.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.parallel.rules import CACHE_AXES, CACHE_SCALE_AXES, TP
from pallas_kernels import KVCache, ragged_paged_attention, write_kv


def constrain(x: jax.Array, layout, logical_axes: tuple[str | None, ...]) -> jax.Array:
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, layout.spec(logical_axes)))


def paged_attention(q, k, v, cache: KVCache, layer, metadata, layout, scale_layer: int | None = None,
                    **attn_kwargs):
    """q [T, H, D], k/v [T, K, D] → (attention [T, H, D], cache with k/v written at `layer`).

    `scale_layer` (the hybrid KV cache: `layer` is a page slot shared by one layer of each KV cache
    group): the model layer whose fp8 scales [L, kvh] apply; None = `layer` itself."""

    def local(q, k, v, cache, layer, metadata):
        if scale_layer is None or not cache.quantized:
            cache = write_kv(cache, layer, k, v, metadata.slot_mapping)
            return ragged_paged_attention(q, cache, layer, metadata, **attn_kwargs), cache
        # a view whose every slot row holds scale_layer's scales (tiny: [P, kvh] f32), written back after
        scales = cache.k_scale, cache.v_scale  # [L, kvh] f32 each
        rows = [jnp.broadcast_to(s[scale_layer], (cache.num_layers,) + s.shape[1:]) for s in scales]
        view = dataclasses.replace(cache, k_scale=rows[0], v_scale=rows[1])
        view = write_kv(view, layer, k, v, metadata.slot_mapping)
        out = ragged_paged_attention(q, view, layer, metadata, **attn_kwargs)
        return out, dataclasses.replace(view, k_scale=scales[0].at[scale_layer].set(view.k_scale[layer]),
                                        v_scale=scales[1].at[scale_layer].set(view.v_scale[layer]))

    if layout is None:
        return local(q, k, v, cache, layer, metadata)
    q_spec = layout.spec(("tokens", "heads", "head_dim"))
    kv_spec = layout.spec(("tokens", "kv_heads", "head_dim"))
    cache_specs = cache.like(layout.spec(CACHE_AXES), layout.spec(CACHE_SCALE_AXES))  # fp8: + scales
    fn = jax.shard_map(local, mesh=layout.mesh, in_specs=(q_spec, kv_spec, kv_spec, cache_specs, P(), P()),
                       out_specs=(q_spec, cache_specs), check_vma=False)
    return fn(q, k, v, cache, layer, metadata)


def embed_lookup(table: jax.Array, tokens: jax.Array, layout) -> jax.Array:
    """table [V, E], tokens [T] i32 → [T, E] (replicated)."""
    if layout is None or not layout.shard_vocab:
        return table[tokens]

    def local(table, tokens):  # table [V / tp, E]
        n = table.shape[0]
        idx = tokens - jax.lax.axis_index(TP) * n
        ok = (idx >= 0) & (idx < n)
        rows = table[jnp.clip(idx, 0, n - 1)]  # [T, E]
        return jax.lax.psum(jnp.where(ok[:, None], rows, jnp.zeros((), rows.dtype)), TP)

    return jax.shard_map(local, mesh=layout.mesh, in_specs=(layout.spec(("vocab", "embed")), P()),
                         out_specs=P(), check_vma=False)(table, tokens)


def lm_logits(hidden: jax.Array, weight: jax.Array, layout, *, tied: bool) -> jax.Array:
    """hidden [N, E] (replicated) → f32 logits [N, V] (replicated, for the full-vocab sampler).

    weight: lm_head [E, V], or the tied embedding [V, E]. Vocab-parallel: each device computes its
    vocab slice of the logits and one all-gather of [N, V] assembles them (explicit: left to the
    partitioner, XLA may all-gather the [E, V] weight instead, which is far more bytes)."""
    eq = "ne,ve->nv" if tied else "ne,ev->nv"

    def logits(h, w):
        return jnp.einsum(eq, h, w, preferred_element_type=jnp.float32)

    if layout is None or not layout.shard_vocab:
        return logits(hidden, weight)
    w_spec = layout.spec(("vocab", "embed") if tied else ("embed", "vocab"))
    return jax.shard_map(lambda h, w: jax.lax.all_gather(logits(h, w), TP, axis=1, tiled=True),
                         mesh=layout.mesh, in_specs=(P(), w_spec), out_specs=P(), check_vma=False)(hidden, weight)
