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
    """K and V pages of every layer. An fp8 cache (kv_quant.py) stores float8_e4m3fn values as their
    uint8 bits and holds one f32 scale per layer and kv head for each of K and V: element x stands
    for `x * scale[layer, head]`; 0 = not set yet (the first write to that layer sets it; the engine
    sets every scale at start: jaxllm/runner/kv_calibration.py). `scales_fixed` (static): every
    scale is set and never changes (the engine's cache), so writes quantize with them as they are:
    no per-write absmax, no scale write-back (kv_write.py)."""

    k: jax.Array  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim] model dtype, or uint8 = fp8 bits
    v: jax.Array  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim] model dtype, or uint8 = fp8 bits
    k_scale: jax.Array | None = None  # [num_layers, num_kv_heads] f32, fp8 caches only
    v_scale: jax.Array | None = None  # [num_layers, num_kv_heads] f32, fp8 caches only
    scales_fixed: bool = dataclasses.field(default=False, metadata=dict(static=True))  # fp8 caches only

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def dtype(self):
        """The element type the pages stand for: float8_e4m3fn for an fp8 cache, else k's dtype."""
        return jnp.dtype(jnp.float8_e4m3fn) if self.quantized else self.k.dtype

    def like(self, pages, scales) -> "KVCache":
        """A KVCache-shaped pytree of (pages, pages[, scales, scales]): shardings or specs that
        match this cache's structure."""
        if not self.quantized:
            return KVCache(pages, pages)
        return KVCache(pages, pages, scales, scales, scales_fixed=self.scales_fixed)

    @staticmethod
    def zeros(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, sharding=None,
              scale_sharding=None, scale_init: float = 0.0, scales_fixed: bool = False,
              num_scale_layers: int | None = None) -> "KVCache":
        """An all-zero cache. `dtype` float8_e4m3fn makes an fp8 cache with scales [L, kvh] f32 set
        to `scale_init` (0: each layer's first write derives them, kv_quant.py; 1.0: a fixed
        scale, vLLM's default without calibration; the engine replaces them with its calibrated
        scales at start, jaxllm/runner/kv_calibration.py). `scales_fixed`: writes never derive or
        change the scales (the engine's runner: kv_write.py), so they must start > 0. `num_scale_layers`:
        the model's layers when `num_layers` counts layer slots of KV cache groups (the hybrid cache:
        pages [P, ...], scales stay per real layer [L, kvh]); None = num_layers."""
        if scales_fixed and not scale_init > 0:
            raise ValueError(f"scale_init={scale_init} is invalid with scales_fixed=True: must be > 0")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        fp8 = jnp.dtype(dtype) == jnp.float8_e4m3fn

        def make(shape, dtype, value, sharding):
            if sharding is None:
                return jnp.full(shape, value, dtype)
            return jax.jit(lambda: jnp.full(shape, value, dtype), out_shardings=sharding)()

        pages = [make(shape, jnp.uint8 if fp8 else dtype, 0, sharding) for _ in "kv"]  # fp8: its bits
        if not fp8:
            return KVCache(*pages)
        scales = [make((num_scale_layers or num_layers, num_kv_heads), jnp.float32, scale_init, scale_sharding) for _ in "kv"]
        return KVCache(*pages, *scales, scales_fixed=scales_fixed)

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        """Bytes of one block's K and V pages over all layers (layer slots of a hybrid cache) (an fp8 cache's scales are a fixed
        2 x num_layers x num_kv_heads f32, not per block)."""
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
    # [S] int32, each sequence's prompt length (0 for padding sequences); the kernels never read it.
    # Only longrope's per-sequence set choice does (jaxllm/models/rope.py); None = not given (the
    # model then takes context_lens in its place, which is the same for a one-step prefill).
    prompt_lens: jax.Array | None = None
    # Hybrid KV cache (jaxllm/core/kv_cache_groups.py): every KV cache group's slot mapping and block
    # tables, group 0's equal to slot_mapping / block_tables; layer l of group g reads and writes its page
    # slot through `for_group(g)`. A sliding group's null entries (blocks out of its window) hold block 0:
    # never written (no slot maps there) and only ever masked. None with one group.
    group_slot_mapping: jax.Array | None = None  # [G, T] int32, -1 for padding tokens
    group_block_tables: jax.Array | None = None  # [G, S, max_blocks_per_seq] int32

    def for_group(self, g: int) -> "AttentionMetadata":
        """The metadata layers of KV cache group `g` attend with (self when there are no groups)."""
        if self.group_slot_mapping is None:
            return self
        return dataclasses.replace(self, slot_mapping=self.group_slot_mapping[g],
                                   block_tables=self.group_block_tables[g], group_slot_mapping=None,
                                   group_block_tables=None)

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]
