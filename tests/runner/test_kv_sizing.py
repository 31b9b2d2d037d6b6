"""KV cache sizing from device memory statistics (no device needed: the stats are given)."""
from jaxllm.runner.model_runner import contiguous_bytes

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
