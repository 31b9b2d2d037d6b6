import pytest

from jaxllm.core.kv_cache_manager import KVCacheManager
from jaxllm.core.request import Request
from jaxllm.sampling_params import SamplingParams


def req(rid, tokens, **kw):
    return Request(rid, list(tokens), SamplingParams(**kw), seed=0)


def test_allocate_and_free_tail_first():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = req("a", range(10))
    blocks, n = kv.get_computed_blocks(r)
    assert (blocks, n) == ([], 0)
    new = kv.allocate_slots(r, 10)
    assert len(new) == 3 and kv.num_free_blocks == 5
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 2) == []  # fits in the third block
    r.num_computed_tokens = 12
    assert len(kv.allocate_slots(r, 1)) == 1
    ids = kv.get_block_ids("a")
    kv.free(r)
    assert kv.num_free_blocks == 8
    # freed tail first: the last block of "a" is the first to be reused (after the never-used ones)
    fresh = kv.pool.get_new_blocks(8)
    assert [b.block_id for b in fresh][-4:] == ids[::-1]


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = req("a", range(12))
    assert kv.allocate_slots(r, 12) is None
    assert kv.num_free_blocks == 2 and kv.get_block_ids("a") == []


def test_prefix_hit_never_whole_prompt_and_sharing():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", range(12))
    kv.allocate_slots(a, 12)  # 3 full blocks, cached at allocation
    assert len(kv.pool.cached) == 3
    b = req("b", range(12))  # identical prompt: may reuse only 2 blocks (1 token must be computed)
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and [x.block_id for x in blocks] == kv.get_block_ids("a")[:2]
    kv.allocate_slots(b, 4, blocks)
    assert kv.get_block_ids("b")[:2] == kv.get_block_ids("a")[:2]
    assert kv.get_block_ids("b")[2] != kv.get_block_ids("a")[2]
    assert [x.ref_cnt for x in kv.req_blocks["b"]] == [2, 2, 1]
    c = req("c", list(range(8)) + [99, 98, 97, 96, 95])  # diverges in block 2
    blocks, n = kv.get_computed_blocks(c)
    assert n == 8
    # prompt_logprobs needs every prompt position: no cache
    assert kv.get_computed_blocks(req("d", range(12), prompt_logprobs=1)) == ([], 0)
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10
    # freed but still cached: a new request hits them and takes them back from the free queue
    e = req("e", range(13))
    blocks, n = kv.get_computed_blocks(e)
    assert n == 12
    assert kv.allocate_slots(e, 1, blocks) is not None
    assert kv.num_free_blocks == 6
    kv.free(e)
    assert kv.num_free_blocks == 10
    kv.pool.check_invariants()


def test_reclaimed_cached_blocks_count_against_free():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = req("a", range(6))
    kv.allocate_slots(a, 6)
    kv.free(a)  # 3 cached free blocks
    b = req("b", range(6))
    blocks, n = kv.get_computed_blocks(b)
    assert n == 4
    # 2 cached blocks reclaimed + 1 new: exactly fits
    assert kv.allocate_slots(b, 2, blocks) is not None
    assert kv.num_free_blocks == 0
    kv.free(b)
    c = req("c", range(4))
    blocks, n = kv.get_computed_blocks(c)
    assert n == 2
    # would need 1 reclaimed + 3 new (> 2 free others): None, nothing touched
    assert kv.allocate_slots(c, 6, blocks) is None
    assert kv.num_free_blocks == 3
    kv.pool.check_invariants()


def test_fork_pins_shares_full_blocks_and_copies_the_partial_one():
    """pin_fork (beam search): the fork takes the source's full blocks as prefix hits and a fresh
    block for the partial one, (source, destination) handed out once at admission; the source block
    stays pinned until then (even after the source is freed), and nothing leaks either way."""
    kv = KVCacheManager(num_blocks=10, block_size=4)
    src = req("src", range(10))  # 10 computed tokens: blocks 0-1 full, block 2 holds 2 of them
    kv.allocate_slots(src, 10)
    src.num_computed_tokens = 10
    src.append_output_token(77)  # sampled, not computed
    src_blocks = kv.get_block_ids("src")
    fork = req("fork", list(range(10)) + [55])
    assert kv.pin_fork(fork, src) and kv.pool.blocks[src_blocks[2]].ref_cnt == 2
    assert not kv.pin_fork(req("other", list(range(9)) + [3, 55]), src)  # tokens differ: no pin
    kv.free(src)  # the source goes (its partial block stays pinned for the fork)
    assert kv.pool.blocks[src_blocks[2]].ref_cnt == 1 and kv.num_free_blocks == 9
    blocks, n = kv.get_computed_blocks(fork)
    assert [b.block_id for b in blocks] == src_blocks[:2] and n == 10
    assert len(kv.allocate_slots(fork, 1, blocks, n - 8)) == 1  # one fresh block: the copy's destination
    fork.num_computed_tokens = n
    dst = kv.get_block_ids("fork")[2]
    assert kv.take_fork_copies(fork) == [(src_blocks[2], dst)] and dst != src_blocks[2]
    kv.release_pins()
    assert kv.pool.blocks[src_blocks[2]].ref_cnt == 0 and not kv.fork_pins
    kv.free(fork)
    assert kv.num_free_blocks == 10
    kv.pool.check_invariants()
    # a pinned fork that never runs (aborted while waiting): free() drops the pin
    a = req("a", range(6))
    kv.allocate_slots(a, 6)
    a.num_computed_tokens = 6
    f = req("f", list(range(6)) + [1])
    assert kv.pin_fork(f, a)
    kv.free(a)
    kv.free(f)
    assert kv.num_free_blocks == 10 and not kv.fork_pins
    kv.pool.check_invariants()


def rope_sets(prompt_len, num_tokens, threshold):
    """The reference rule (jaxllm/models/rope.py, longrope): the token at position p is written with
    the long set iff its sequence's prompt is longer than the threshold or p >= threshold."""
    return [prompt_len > threshold or p >= threshold for p in range(num_tokens)]


def test_long_prompt_threshold_hashes_differ_exactly_when_the_rope_set_differs():
    """Same 24 tokens, prompts of 3 / 10 / 11 / 20 of them (the rest generated), threshold 10, block 4:
    block i of two requests hashes equal iff every token up to its end was written with the same set
    (a block's KV depends on every key before it); without a threshold all hash equal."""
    from jaxllm.core.block_pool import hash_request_blocks

    tokens, thr, bs = list(range(100, 124)), 10, 4
    kv = KVCacheManager(num_blocks=16, block_size=bs, long_prompt_threshold=thr)
    plain = KVCacheManager(num_blocks=16, block_size=bs)
    reqs = []
    for n in (3, 10, 11, 20):
        r = Request(f"p{n}", tokens[:n], SamplingParams(), seed=0, output_token_ids=tokens[n:])
        reqs.append((r, hash_request_blocks(r.all_token_ids, bs, kv.block_key(r)),
                     rope_sets(n, len(tokens), thr)))
    pairs = 0
    for ra, ha, sa in reqs:
        assert hash_request_blocks(ra.all_token_ids, bs, plain.block_key(ra)) == \
            hash_request_blocks(reqs[0][0].all_token_ids, bs, plain.block_key(reqs[0][0]))
        for rb, hb, sb in reqs:
            for i in range(len(tokens) // bs):
                end = (i + 1) * bs
                assert (ha[i] == hb[i]) == (sa[:end] == sb[:end]), (ra.request_id, rb.request_id, i)
                pairs += ra is not rb and ha[i] == hb[i]
    assert pairs == 4 * 6  # ordered pairs: p3 / p10 share all 6 blocks (both short), p11 / p20 too (long)


def test_long_prompt_threshold_lookups_and_forks():
    """A long prompt's blocks serve an identical long prompt and a longer one, never a short prompt
    with the same first tokens (nor a fork across the threshold); short prompts share as usual."""
    kv = KVCacheManager(num_blocks=32, block_size=4, long_prompt_threshold=10)
    long_a = req("long_a", range(16))
    kv.allocate_slots(long_a, 16)
    long_a.num_computed_tokens = 16
    assert kv.get_computed_blocks(req("long_b", range(16)))[1] == 12
    assert kv.get_computed_blocks(req("long_c", list(range(16)) + [7]))[1] == 16
    assert kv.get_computed_blocks(req("short", range(9))) == ([], 0)  # same 8 first tokens, short set
    short_a = req("short_a", range(9))
    kv.allocate_slots(short_a, 9)
    short_a.num_computed_tokens = 9
    assert kv.get_computed_blocks(req("short_b", range(10)))[1] == 8
    assert kv.get_computed_blocks(req("long_d", range(12)))[1] == 8  # long_a's, not short_a's blocks
    assert kv.get_computed_blocks(req("long_d2", range(12)))[0] == kv.req_blocks["long_a"][:2]
    # a fork of short_a whose prompt (its 9 tokens + 1) is still short shares; one made long cannot
    assert kv.pin_fork(req("fork_short", list(range(9)) + [5]), short_a)
    long_src = Request("long_src", list(range(5)), SamplingParams(), seed=0, output_token_ids=list(range(5, 11)))
    kv.allocate_slots(long_src, 11)
    long_src.num_computed_tokens = 11
    assert not kv.pin_fork(req("fork_long", list(range(11)) + [5]), long_src)  # prompt 12 > 10 vs 5
    with pytest.raises(ValueError, match="long_prompt_threshold=0 is invalid: must be None or an integer >= 1"):
        KVCacheManager(num_blocks=4, block_size=4, long_prompt_threshold=0)
