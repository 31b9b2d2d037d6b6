"""KV cache groups and the hybrid KV cache manager (host only), against brute-force models:

* grouping: which layers share a table, how many slots, vLLM's group-size rule;
* a scheduler loop over random requests (chunked prefill, prefix-cache hits, preemption with few blocks)
  whose fake device keeps one KV store per group: after every step each query position reads, through
  its group's table, exactly the positions that group's layers attend to (full: all before it; sliding:
  the last ``window``) and finds there the tokens of its own sequence; sliding groups hold at most
  cdiv(window - 1 + chunk, bs) + 1 blocks; every block comes back at the end;
* the prefix-cache hit is the longest one every group serves (a direct scan over k);
* forks copy their partial block in every group.
"""
import random

import pytest

from jaxllm.config import SchedulerConfig
from jaxllm.core.hybrid_kv_cache_manager import NULL_BLOCK_ID, HybridKVCacheManager
from jaxllm.core.kv_cache_groups import cdiv, make_groups
from jaxllm.core.request import Request, RequestStatus
from jaxllm.core.scheduler import Scheduler
from jaxllm.sampling_params import SamplingParams

BS = 4
W = 6  # the sliding layers' window (not a multiple of BS: partial window blocks)


def gemma3_windows(n=6, w=W, period=3):
    return [None if (i + 1) % period == 0 else w for i in range(n)]


def test_grouping_rules():
    g2 = make_groups([W, None] * 13)  # Gemma 2: every other layer sliding
    assert g2.slots == 13 and [g.window for g in g2.groups] == [None, W]
    assert g2.groups[0].layers == tuple(range(1, 26, 2)) and g2.layer_slot(4) == (1, 2)
    g3 = make_groups([None if (i + 1) % 6 == 0 else 1024 for i in range(26)])  # Gemma 3 1B: 4 full, 22 sliding
    assert g3.slots == 4 and g3.num_groups == 7 and [g.window for g in g3.groups] == [None] + [1024] * 6
    assert g3.groups[-1].layers == (24, 25) and "(2 padding)" in g3.describe()  # 24 slots for 22 layers
    for lay in range(26):
        g, j = g3.layer_slot(lay)
        assert g3.groups[g].layers[j] == lay
    near = make_groups([None] * 12 + [8] * 14)  # within 25%: the larger count, one group per kind
    assert near.slots == 14 and near.num_groups == 2
    llama = make_groups([None] * 5)  # one kind, full attention: the classic cache and manager
    assert not llama.hybrid and not llama.managed and llama.slots == 5 and llama.groups[0].window is None
    mistral = make_groups([8] * 5)  # all sliding (Mistral v0.1): one sliding group of every layer
    assert not mistral.hybrid and mistral.managed and mistral.slots == 5 and mistral.groups[0].layers == tuple(range(5))
    assert mistral.groups[0].window == 8 and mistral.describe() == "1 group x 5 layer slots: window 8 [0, 1, 2, 3, 4]"
    for windows in ([W, None] * 3, [W] * 6):  # the flag: every layer full attention, full-length blocks
        off = make_groups(windows, hybrid=False)
        assert not off.hybrid and not off.managed and off.slots == 6 and off.layer_slot(5) == (0, 5)
        assert off.groups[0].window is None
    with pytest.raises(ValueError, match=r"^windows\[1\]=0 is invalid"):
        make_groups([None, 0])


def test_blocks_per_request():
    g = make_groups(gemma3_windows())  # 2 full layers, 4 sliding: P = 2, groups full, sliding, sliding
    assert g.slots == 2 and g.num_groups == 3
    # 100 tokens in chunks of 8: full 25 blocks; sliding: window 6 -> cdiv(5 + 8, 4) + 1 = 5 each
    assert g.blocks_per_request(100, 8, BS) == 25 + 5 + 5
    assert g.blocks_per_request(6, 8, BS) == 2 * 3  # short: never more than the full count
    one = make_groups([W] * 4)  # all sliding: the window's blocks, not the context's
    assert one.blocks_per_request(100, 8, BS) == 5 and one.blocks_per_request(6, 8, BS) == 2
    assert make_groups([W] * 4, hybrid=False).blocks_per_request(100, 8, BS) == 25


def req(rid, prompt, max_tokens=4, **kw):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw), seed=0,
                   max_output_tokens=max_tokens)


class GroupKVStore:
    """A fake device: per group, slot -> the (position, tokens up to it) written there; reads check that
    every position a group's layers attend to holds the reading sequence's own token prefix."""

    def __init__(self, windows):
        self.windows = windows
        self.store = [dict() for _ in windows]
        self.max_sliding_held = 0
        self.rng = random.Random(0)

    def step(self, out, sched):
        sampled = {}
        for s, r in zip(out.seqs, out.requests):
            # the scheduler's incremental [G, n] tables equal the manager's rebuild from its blocks
            assert s.group_block_ids is not None and s.block_ids.tolist() == s.group_block_ids[0].tolist()
            tables = s.group_block_ids.tolist()
            assert tables == sched.kv.get_group_block_ids(s.request_id)
            toks = r.all_token_ids[:s.start_pos] + s.token_ids
            for g, (w, table) in enumerate(zip(self.windows, tables)):
                real = [b for b in table if b != NULL_BLOCK_ID]
                assert len(set(real)) == len(real), table
                if w is not None:
                    self.max_sliding_held = max(self.max_sliding_held, len(real))
                    assert len(real) <= cdiv(W - 1 + len(s.token_ids), BS) + 1, (s.request_id, table)
                for p in range(s.start_pos, s.start_pos + len(s.token_ids)):
                    b = table[p // BS]
                    assert b != NULL_BLOCK_ID, ("write to a null block", s.request_id, g, p)
                    self.store[g][b * BS + p % BS] = (p, tuple(toks[:p + 1]))
                for q in range(s.start_pos, s.start_pos + len(s.token_ids)):
                    lo = 0 if w is None else max(0, q - w + 1)
                    for p in range(lo, q + 1):
                        b = table[p // BS]
                        assert b != NULL_BLOCK_ID, ("read of a freed block", s.request_id, g, q, p)
                        assert self.store[g].get(b * BS + p % BS) == (p, tuple(toks[:p + 1])), (s.request_id, g, q, p)
            if s.sample:
                new = (sum(toks[-3:]) * 7 + len(toks)) % 50
                d = s.num_draft_tokens  # speculative: accept a random prefix of the drafts, then the new token
                sampled[s.request_id] = (new if not d else
                                         s.token_ids[len(s.token_ids) - d:][:self.rng.randrange(d + 1)] + [new])
        return sampled


def drive(sched, store, max_steps=5000, spec: int = 0):
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return
        for r in sched.running:  # speculative decoding: drafts ride behind a decode, rejected ones roll back
            r.spec_token_ids = [store.rng.randrange(50) for _ in range(spec)]
        out = sched.schedule()
        for r, _ in sched.update_from_output(out, store.step(out, sched)):
            if r.num_output_tokens >= r.max_output_tokens:
                sched.finish_requests(r.request_id, RequestStatus.FINISHED_LENGTH)
    raise AssertionError("did not finish")


def assert_no_leaks(sched):
    assert not sched.requests and not sched.kv.req_blocks and not sched.kv.fork_pins
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    sched.kv.pool.check_invariants()


@pytest.mark.parametrize("windows,num_blocks,budget,seed", [
    (gemma3_windows(), 200, 8, 0), (gemma3_windows(), 24, 8, 1), (gemma3_windows(), 18, 5, 2),
    (gemma3_windows(), 400, 64, 3),
    ([W] * 4, 80, 8, 4), ([W] * 4, 9, 8, 5), ([W] * 4, 7, 5, 6), ([W] * 4, 200, 64, 7)],  # all sliding: 1 group
    ids=lambda x: "all-sliding" if x == [W] * 4 else "gemma3" if isinstance(x, list) else str(x))
def test_scheduler_loop_reads_what_each_group_needs(windows, num_blocks, budget, seed):
    """Random prompts (many sharing prefixes) much longer than the window, chunked, some preempted (few
    blocks): every read is right in every group; sliding groups stay bounded; nothing leaks. An
    all-sliding model (Mistral v0.1) is one sliding group: the same rules, one table."""
    rng = random.Random(seed)
    groups = make_groups(windows)
    kv = HybridKVCacheManager(num_blocks, BS, groups)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=200), kv)
    store = GroupKVStore([g.window for g in groups.groups])
    stems = [[rng.randrange(50) for _ in range(rng.randrange(5, 30))] for _ in range(3)]
    for i in range(12):
        prompt = rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
        sched.add_request(req(f"r{i}", prompt, max_tokens=rng.randrange(1, 25)))
    drive(sched, store)
    assert_no_leaks(sched)
    assert store.max_sliding_held > 0
    if num_blocks >= 80:
        assert kv.prefix_hits > 0  # the shared stems were reused
    else:
        assert sched.num_preemptions > 0  # tight pools preempt


@pytest.mark.parametrize("windows", [gemma3_windows(), [W] * 4], ids=["gemma3", "all-sliding"])
def test_speculative_drafts_roll_back_inside_the_window(windows):
    """Drafts take slots like any token and rejected ones roll num_computed_tokens back: a sliding group
    frees by the rolled-back count at the next allocation, so every later read still finds its window."""
    groups = make_groups(windows)
    kv = HybridKVCacheManager(200, BS, groups)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=200), kv)
    store = GroupKVStore([g.window for g in groups.groups])
    rng = random.Random(5)
    for i in range(4):
        sched.add_request(req(f"s{i}", [rng.randrange(50) for _ in range(rng.randrange(3, 20))], max_tokens=30))
    drafted = []
    real_schedule = sched.schedule
    sched.schedule = lambda: (out := real_schedule(), drafted.extend(s.num_draft_tokens for s in out.seqs))[0]
    drive(sched, store, spec=3)
    assert_no_leaks(sched)
    assert max(drafted) == 3


def test_block_keys_keep_groups_apart():
    """A LoRA adapter's requests (extra_key) never hit another key's blocks, in any group."""
    groups = make_groups(gemma3_windows())
    kv = HybridKVCacheManager(64, BS, groups)
    a = req("a", range(20))
    kv.allocate_slots(a, 20)
    a.num_computed_tokens = 20
    same, other = req("b", range(21)), req("c", range(21))
    other.extra_key = ("lora", 1)
    assert kv.get_computed_blocks(same)[1] == 20 and kv.get_computed_blocks(other) == ([[], [], []], 0)
    kv.free(a)
    assert kv.num_free_blocks == 64


def longest_hit_brute_force(kv, r):
    """The largest k (blocks) such that every full group caches blocks 0..k-1 and every sliding group the
    blocks of positions k*BS - w + 1 .. k*BS - 1: a direct scan from the top."""
    hashes = kv._hashes(r)
    for k in range((r.num_tokens - 1) // BS, 0, -1):
        ok = True
        for g, w in enumerate(kv.windows):
            lo = 0 if w is None else max(0, k * BS - w + 1) // BS
            ok &= all(kv.pool.get_cached_block(kv._key(hashes[i], g)) is not None for i in range(lo, k))
        if ok:
            return k
    return 0


def test_prefix_hit_is_the_longest_every_group_serves():
    """A long request runs to the end (its sliding groups free, but keep cached, early blocks); evicting
    chosen cached blocks from chosen groups then moves the hit exactly as the brute-force rule says."""
    groups = make_groups(gemma3_windows())
    for evict in [(), ((1, 5),), ((2, 7),), ((0, 3),), ((1, 9), (2, 8)), ((1, 2),)]:
        kv = HybridKVCacheManager(64, BS, groups)
        sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=200), kv)
        store = GroupKVStore([g.window for g in groups.groups])
        sched.add_request(req("a", range(40), max_tokens=1))
        drive(sched, store)
        hashes = kv._hashes(req("a", range(40)))
        for g, i in evict:  # forget one group's cached block i
            b = kv.pool.get_cached_block(kv._key(hashes[i], g))
            del kv.pool.cached[b.block_hash]
            b.block_hash = None
        probe = req("b", range(41))
        blocks, n = kv.get_computed_blocks(probe)
        assert n == longest_hit_brute_force(kv, probe) * BS, evict
        assert all(len(b) == n // BS for b in blocks)
        if not evict:
            assert n == 40  # everything cached: all 10 blocks
        # and the hit serves: run b from it (its reads are checked against its own tokens)
        sched.add_request(probe)
        drive(sched, store)
        assert_no_leaks(sched)


@pytest.mark.parametrize("windows", [gemma3_windows(), [W] * 4], ids=["gemma3", "all-sliding"])
def test_fork_copies_its_partial_block_in_every_group(windows):
    groups = make_groups(windows)
    G = groups.num_groups
    kv = HybridKVCacheManager(64, BS, groups)
    src = req("src", range(10))
    assert kv.allocate_slots(src, 10) is not None
    src.num_computed_tokens = 10
    ids = kv.get_group_block_ids("src")
    assert [len([b for b in t if b >= 0]) for t in ids] == [3] * G
    fork = req("fork", list(range(10)) + [55])
    assert kv.pin_fork(fork, src)
    blocks, n = kv.get_computed_blocks(fork)
    assert n == 10 and [[b.block_id for b in bl] for bl in blocks] == [t[:2] for t in ids]
    assert kv.allocate_slots(fork, 1, blocks, n - 8) is not None
    fork.num_computed_tokens = n
    copies = kv.take_fork_copies(fork)
    assert copies == [(ids[g][2], kv.get_group_block_ids("fork")[g][2]) for g in range(G)]
    kv.release_pins()
    kv.free(src)
    kv.free(fork)
    assert kv.num_free_blocks == 64 and not kv.fork_pins
    kv.pool.check_invariants()


def test_capacity_is_all_or_nothing():
    """A chunk that one group cannot get takes nothing in any group (the sliding groups' blocks that fell
    out of the window are released all the same)."""
    groups = make_groups(gemma3_windows())
    kv = HybridKVCacheManager(9, BS, groups)
    a = req("a", range(20))
    assert kv.allocate_slots(a, 8) is not None  # blocks 0-1 in each of 3 groups
    a.num_computed_tokens = 8
    assert kv.allocate_slots(a, 4) is not None and kv.num_free_blocks == 0  # block 2 each (position 3 still read)
    a.num_computed_tokens = 12
    before = kv.get_group_block_ids("a")
    assert kv.allocate_slots(a, 4) is None  # needs block 3 in 3 groups; only the 2 freed ones are free
    after = kv.get_group_block_ids("a")
    assert after[0] == before[0] and [t[0] for t in after[1:]] == [NULL_BLOCK_ID] * 2
    assert [len(t) for t in after] == [3, 3, 3] and kv.num_free_blocks == 2
    kv.free(a)
    assert kv.num_free_blocks == 9
    kv.pool.check_invariants()
