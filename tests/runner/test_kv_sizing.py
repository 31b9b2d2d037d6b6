"""KV cache sizing from device memory statistics (no device needed: the stats are given)."""
from jaxllm.runner.kv_sizing import contiguous_bytes

GiB = 2 ** 30


def test_preallocated_pool_is_limited_by_its_largest_free_block():
    # one preallocated 100 GiB pool, 30 GiB in use, the free space split by holes: 50 GiB at the end
    stats = dict(bytes_limit=100 * GiB, bytes_in_use=30 * GiB, pool_bytes=100 * GiB,
                 largest_free_block_bytes=50 * GiB)
    assert contiguous_bytes(stats) == 50 * GiB


def test_growing_pool_counts_what_it_may_still_add():
    stats = dict(bytes_limit=100 * GiB, bytes_in_use=30 * GiB, pool_bytes=40 * GiB,
                 largest_free_block_bytes=5 * GiB)
    assert contiguous_bytes(stats) == 60 * GiB


def test_without_allocator_details_the_limit_stands():
    assert contiguous_bytes(dict(bytes_limit=80 * GiB, bytes_in_use=10 * GiB)) == 80 * GiB


def test_fp8_cache_fits_twice_the_bf16_blocks():
    """kv_cache_blocks counts the cache's element size: fp8 (1 byte) gets 2x the blocks of bf16 and
    4x those of f32 in the same budget, also per device under tensor parallelism."""
    import jax.numpy as jnp

    from jaxllm.models.config import ModelConfig
    from jaxllm.runner.kv_cache_dtype import cache_dtype
    from jaxllm.runner.kv_sizing import kv_cache_blocks

    mc = ModelConfig.from_hf(dict(model_type="llama", vocab_size=512, hidden_size=576, intermediate_size=1536,
                                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                  max_position_embeddings=2048), source="test")  # SmolLM2-135M's shape
    from pallas_kernels import KVCache

    for tp in (1, 3):
        budget = 1000 * KVCache.bytes_per_block(30, 16, 3 // tp, 64, jnp.float32)  # 1000 f32 blocks per device
        n = {name: kv_cache_blocks(mc, 16, cache_dtype(kv, dt), budget, 0.9, tp=tp)
             for name, kv, dt in (("f32", "auto", jnp.float32), ("bf16", "auto", jnp.bfloat16),
                                  ("fp8", "fp8", jnp.bfloat16))}
        assert n["fp8"] == 2 * n["bf16"] == 4 * n["f32"] == 4000, n
    assert kv_cache_blocks(mc, 16, cache_dtype("fp8", jnp.float32), GiB, 0.9) == GiB // (2 * 30 * 16 * 3 * 64)
