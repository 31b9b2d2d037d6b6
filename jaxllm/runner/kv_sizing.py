"""How many KV blocks fit: from an explicit byte budget, or from the accelerator's free memory (the
weights and the step's working memory already counted), or a 1 GiB default on CPU. The cache's
element size counts (an fp8 cache gets twice a bf16 cache's blocks)."""
from __future__ import annotations

import jax

from jaxllm.models.config import ModelConfig
from jaxllm.runner import device_pool
from pallas_kernels import KVCache

DEFAULT_CPU_KV_BYTES = 1 << 30


def contiguous_bytes(stats: dict) -> int:
    """The most the device allocator can hand out in consecutive large allocations (K then V):
    its largest free block, or what it may still add as a new region (limit - pool). Free holes
    between live arrays count in bytes_limit - bytes_in_use but cannot hold a cache array."""
    limit = int(stats["bytes_limit"])
    grow = limit - int(stats.get("pool_bytes", stats.get("bytes_reserved", 0)) or 0)
    largest = int(stats.get("largest_free_block_bytes", 0) or 0)
    return max(largest, grow) if ("pool_bytes" in stats or "largest_free_block_bytes" in stats) else limit


def kv_cache_blocks(model_config: ModelConfig, block_size: int, dtype, kv_cache_memory_bytes: int | None,
                    gpu_memory_utilization: float, reserve_bytes: int = 0, tp: int = 1,
                    kv_layers: int | None = None, pool_fraction: float = device_pool.XLA_DEFAULT_FRACTION) -> int:
    """Number of KV blocks: from kv_cache_memory_bytes (per device) if given; on accelerators
    utilization × the device's memory (on GPUs the card, whose pool is ``pool_fraction`` of it:
    device_pool.py) minus what is in use (weights), the step's own working memory and 1% of the
    pool (allocator rounding, the few small programs the profiling pass does not compile); on CPU a
    1 GiB default (split over the tp devices, which share host memory).
    With tensor parallelism each device holds num_kv_heads / tp heads of every block. `kv_layers`: the
    layer pages per block (a hybrid cache's group slots, jaxllm/core/kv_cache_groups.py); None = every layer."""
    per_block = KVCache.bytes_per_block(kv_layers or model_config.num_layers, block_size,
                                        model_config.num_kv_heads // tp,
                                        model_config.head_dim, dtype)
    budget = kv_cache_memory_bytes
    if budget is None:
        dev = jax.local_devices()[0]
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        if stats and "bytes_limit" in stats:
            reserve_bytes += int(stats["bytes_limit"]) // 100
            budget = device_pool.kv_budget(stats, dev.platform, gpu_memory_utilization, pool_fraction, reserve_bytes)
            budget = min(budget, contiguous_bytes(stats) - reserve_bytes)
        else:
            budget = DEFAULT_CPU_KV_BYTES // tp
    return max(0, budget // per_block)
