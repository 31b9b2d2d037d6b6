"""The contract between the model runner, the model and the attention kernels.

KV cache layout (chosen for the kernels; see README "KV cache layout"):
    k, v: [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
One array per K and V holds every layer, so the model's `lax.scan` over layers carries the whole
cache and each layer reads/writes it through a layer index: the cache is never sliced or copied,
and donating it to the jitted step makes every write in place. A token's *slot* is
`block_id * block_size + offset`; slot -1 marks padding.

A flat ragged batch holds `num_tokens` (T) query tokens from up to `max_num_seqs` (S) sequences:
sequence i owns tokens `cu_q_lens[i]:cu_q_lens[i+1]`, which are the *last* q_len tokens of its
context of `context_lens[i]` tokens (context includes the new tokens). Padding sequences have
q_len 0 and context 0; padding tokens sit after cu_q_lens[-1] and have slot -1.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v: jax.Array  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def zeros(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, sharding=None) -> "KVCache":
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        if sharding is None:
            return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        mk = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return KVCache(mk(), mk())

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-step attention metadata: array fields are traced, `decode_only` is static."""

    slot_mapping: jax.Array  # [T] int32, -1 for padding tokens
    block_tables: jax.Array  # [S, max_blocks_per_seq] int32 (entries past a sequence's length are ignored)
    context_lens: jax.Array  # [S] int32, kv length including the new tokens; 0 for padding sequences
    cu_q_lens: jax.Array  # [S + 1] int32, query start offsets; q_len 0 for padding sequences
    # Static: True when every sequence has at most one new token and token i belongs to sequence i
    # (T == S). Lets the dispatcher pick the decode kernel without looking at values.
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]
