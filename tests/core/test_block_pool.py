import random

import pytest

from jaxllm.core.block_pool import BlockPool, hash_block_tokens, hash_request_blocks


def test_refcounts_and_double_free():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert (a.ref_cnt, b.ref_cnt) == (1, 1) and pool.num_free_blocks == 2
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free_blocks([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free_blocks([a, b])
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks([a])
    with pytest.raises(ValueError, match="num_blocks requested=5"):
        pool.get_new_blocks(5)
    pool.check_invariants()


def test_hash_chaining():
    h1 = hash_block_tokens(None, [1, 2, 3])
    assert h1 == hash_block_tokens(None, [1, 2, 3])
    assert h1 != hash_block_tokens(None, [1, 2, 4])
    # same block tokens under a different parent -> different hash
    p = hash_block_tokens(None, [9, 9, 9])
    assert hash_block_tokens(p, [1, 2, 3]) != h1
    # the extra key (adapters) separates otherwise equal prefixes
    assert hash_block_tokens(None, [1, 2, 3], extra_key="lora-1") != h1
    hs = hash_request_blocks([1, 2, 3, 4, 5, 6, 7], block_size=3)
    assert len(hs) == 2 and hs[0] == h1 and hs[1] == hash_block_tokens(h1, [4, 5, 6])
    # extending reuses the prefix
    ext = hash_request_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, existing=list(hs))
    assert ext[:2] == hs and len(ext) == 3


def test_cached_blocks_lru_eviction_order():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    for i, b in enumerate(blocks):
        pool.cache_block(b, bytes([i]))
    # free in the order 2, 0, 3, 1: that is the eviction order (head first)
    pool.free_blocks([blocks[2], blocks[0], blocks[3], blocks[1]])
    assert pool.num_free_blocks == 4 and len(pool.cached) == 4
    # a cache hit takes block 0 back out of the queue
    assert pool.get_cached_block(bytes([0])) is blocks[0]
    pool.touch([blocks[0]])
    assert pool.num_free_blocks == 3
    got = pool.get_new_blocks(2)
    assert [b.block_id for b in got] == [2, 3]
    assert bytes([2]) not in pool.cached and bytes([3]) not in pool.cached  # evicted
    assert got[0].block_hash is None
    assert pool.get_cached_block(bytes([1])) is blocks[1]
    pool.check_invariants()
    pool.free_blocks(got + [blocks[0]])
    assert pool.num_free_blocks == 4
    assert pool.reset_prefix_cache() and not pool.cached


def test_caching_disabled():
    pool = BlockPool(2, enable_caching=False)
    (b,) = pool.get_new_blocks(1)
    pool.cache_block(b, b"x")
    assert pool.get_cached_block(b"x") is None


def test_randomized_against_brute_force():
    rng = random.Random(0)
    n = 12
    pool = BlockPool(n)
    ref = {i: 0 for i in range(n)}  # brute force: ref counts
    lru: list[int] = list(range(n))  # free ids, eviction order
    cached: dict[bytes, int] = {}
    held: list = []  # one entry per reference we hold
    for step in range(3000):
        op = rng.random()
        if op < 0.35 and lru:
            k = rng.randint(1, min(3, len(lru)))
            got = pool.get_new_blocks(k)
            exp = lru[:k]
            del lru[:k]
            assert [b.block_id for b in got] == exp
            for b in got:
                cached = {h: i for h, i in cached.items() if i != b.block_id}
                ref[b.block_id] = 1
                held.append(b)
                if rng.random() < 0.6:
                    h = bytes([rng.randrange(256)])
                    pool.cache_block(b, h)
                    if h not in cached:
                        cached[h] = b.block_id
        elif op < 0.7 and held:
            b = held.pop(rng.randrange(len(held)))
            pool.free_blocks([b])
            ref[b.block_id] -= 1
            if ref[b.block_id] == 0:
                lru.append(b.block_id)
        elif cached:
            h = rng.choice(sorted(cached))
            b = pool.get_cached_block(h)
            assert b is not None and b.block_id == cached[h]
            pool.touch([b])
            if ref[b.block_id] == 0:
                lru.remove(b.block_id)
            ref[b.block_id] += 1
            held.append(b)
        assert pool.num_free_blocks == len(lru)
        assert {h: b.block_id for h, b in pool.cached.items()} == cached
        assert all(pool.blocks[i].ref_cnt == r for i, r in ref.items())
        if step % 100 == 0:
            pool.check_invariants()
    pool.free_blocks(held)
    assert pool.num_free_blocks == n


def test_evict_free_cached_keeps_held_blocks_cached():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    for i, b in enumerate(blocks):
        pool.cache_block(b, bytes([i]))
    pool.free_blocks([blocks[1], blocks[2]])  # blocks[0] stays held by a "request"
    assert pool.evict_free_cached() == 2
    assert pool.get_cached_block(bytes([0])) is blocks[0]  # in use: still found
    assert pool.get_cached_block(bytes([1])) is None and pool.get_cached_block(bytes([2])) is None
    assert pool.num_free_blocks == 3  # nothing allocated or leaked
    pool.check_invariants()
    assert pool.evict_free_cached() == 0
    pool.free_blocks([blocks[0]])
    assert pool.evict_free_cached() == 1 and not pool.cached and pool.num_free_blocks == 4
    pool.check_invariants()
