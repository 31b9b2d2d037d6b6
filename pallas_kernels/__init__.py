"""Paged KV cache and attention kernels: each Pallas kernel beside its pure-jnp reference.

Public API (used by the model and the runner):
    KVCache, AttentionMetadata, write_kv, ragged_paged_attention
See README.md for the cache layout, the entry points, dispatch and tolerances.
"""
from pallas_kernels.attention import ragged_paged_attention
from pallas_kernels.kv_write import write_kv
from pallas_kernels.metadata import AttentionMetadata, KVCache

__all__ = ["AttentionMetadata", "KVCache", "ragged_paged_attention", "write_kv"]
