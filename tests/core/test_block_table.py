"""Incremental block tables (jaxllm/core/block_table.py) against a brute-force rebuild.

* BlockTable alone: appends, nulls, growth; views are read-only snapshots that later appends and nulls
  never change; malformed input fails naming what is wrong.
* The KV cache managers (classic, hybrid with sliding groups, all-sliding): after every operation of a
  random run (admission with prefix-cache hits and fork copies, prefill chunks, decode appends, speculative
  over-allocation, failed allocations, preemption, finishing) every request's ``block_table`` /
  ``group_block_tables`` equals its ids rebuilt from the manager's KVBlock lists, requests holding nothing
  have empty tables, and every table handed out earlier still reads as it did then.
"""
import random

import numpy as np
import pytest

from jaxllm.core.block_table import NULL_BLOCK_ID, BlockTable
from jaxllm.core.hybrid_kv_cache_manager import HybridKVCacheManager
from jaxllm.core.kv_cache_groups import make_groups
from jaxllm.core.kv_cache_manager import KVCacheManager
from jaxllm.core.request import Request
from jaxllm.sampling_params import SamplingParams

BS = 4


def test_block_table_appends_nulls_and_snapshots():
    t = BlockTable(2, capacity=2)
    assert len(t) == 0 and t.view().shape == (2, 0)
    t.extend([[1, 2], [3, NULL_BLOCK_ID]])
    first = t.view()
    t.extend([[4, 5, 6], [7, 8, 9]])  # past the capacity: grows
    second = t.view()
    t.set_null(1, 0, 2)
    assert t.view().tolist() == [[1, 2, 4, 5, 6], [-1, -1, 7, 8, 9]]
    assert first.tolist() == [[1, 2], [3, -1]] and second.tolist() == [[1, 2, 4, 5, 6], [3, -1, 7, 8, 9]]
    for v in (first, second, t.view(), t.view()[0]):
        with pytest.raises(ValueError):
            v[0] = 42  # read-only
    t.set_null(0, 3, 3)  # empty range: nothing
    assert t.view()[0].tolist() == [1, 2, 4, 5, 6]
    with pytest.raises(ValueError, match=r"num_groups=2"):
        t.extend([[1]])
    with pytest.raises(ValueError, match=r"all the same length"):
        t.extend([[1], [2, 3]])
    with pytest.raises(ValueError, match=r"entries 4..5 are invalid: the table has 5"):
        t.set_null(0, 4, 6)


def rebuilt(kv, rid):
    """The request's table rebuilt from the manager's KVBlock lists ([G][n] ids, -1 for a null entry)."""
    lists = kv.req_blocks.get(rid)
    if lists is None:
        return None
    if isinstance(kv, HybridKVCacheManager):
        return [[NULL_BLOCK_ID if b is None else b.block_id for b in blocks] for blocks in lists]
    return [[b.block_id for b in lists]]


def tables(kv, rid):
    if isinstance(kv, HybridKVCacheManager):
        t = kv.group_block_tables(rid)
        assert t.dtype == np.int32 and t.shape[0] == kv.num_groups
        assert kv.block_table(rid).tolist() == t[0].tolist()
        return t
    assert kv.group_block_tables(rid) is None
    return kv.block_table(rid)[None]


def make_kv(kind, num_blocks):
    if kind == "classic":
        return KVCacheManager(num_blocks, BS)
    if kind == "classic-nocache":
        return KVCacheManager(num_blocks, BS, enable_caching=False)
    windows = [6, 6, None] * 2 if kind == "hybrid" else [6] * 3  # Gemma 3-like / all sliding (window 6)
    return HybridKVCacheManager(num_blocks, BS, make_groups(windows))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["classic", "classic-nocache", "hybrid", "all-sliding"])
def test_incremental_tables_equal_a_rebuild(kind, seed):
    rng = random.Random(seed)
    kv = make_kv(kind, num_blocks=24)
    stems = [[rng.randrange(30) for _ in range(rng.randrange(3, 14))] for _ in range(3)]
    waiting: dict[str, Request] = {}  # not holding blocks (new, preempted, forks)
    running: dict[str, Request] = {}
    snapshots = []  # (table handed out, its ids then)
    next_id = iter(range(10**6))
    counts = dict.fromkeys(["admit", "hit", "fork", "chunk", "decode", "fail", "preempt", "finish", "null"], 0)

    def new_request(tokens):
        r = Request(f"r{next(next_id)}", list(tokens), SamplingParams(max_tokens=64), seed=0, max_output_tokens=64)
        waiting[r.request_id] = r
        return r

    for _ in range(400):
        op = rng.random()
        if op < 0.15 or not (waiting or running):
            new_request(rng.choice(stems) + [rng.randrange(30) for _ in range(rng.randrange(1, 12))])
        elif op < 0.35 and waiting:  # admission: prefix-cache hit (a fork's pinned copy), then a first chunk
            r = waiting[rng.choice(sorted(waiting))]
            computed, n = kv.get_computed_blocks(r)
            num_hit = kv.num_hit_tokens(computed)
            chunk = rng.randrange(1, r.num_tokens - n + 1)
            if kv.allocate_slots(r, chunk, computed, n - num_hit) is None:
                counts["fail"] += 1
            else:
                r.num_computed_tokens = n
                counts["fork"] += bool(kv.take_fork_copies(r))
                counts["hit"] += num_hit > 0
                r.num_computed_tokens = n + chunk
                running[r.request_id] = waiting.pop(r.request_id)
                counts["admit"] += 1
        elif op < 0.75 and running:  # the next step of a running request: a prefill chunk or a decode
            r = running[rng.choice(sorted(running))]
            if r.num_computed_tokens == r.num_tokens:
                r.append_output_token(rng.randrange(30))
                counts["decode"] += 1
            else:
                counts["chunk"] += 1
            left = r.num_tokens - r.num_computed_tokens
            extra = rng.choice([0, 0, 0, 2])  # speculative drafts: slots past the known tokens
            chunk = rng.randrange(1, left + 1)
            nulls = sum(b is None for blocks in kv.req_blocks[r.request_id] for b in blocks) if kind in (
                "hybrid", "all-sliding") else 0
            if kv.allocate_slots(r, chunk + (extra if chunk == left else 0)) is None:
                counts["fail"] += 1
            else:
                r.num_computed_tokens += chunk
            if kind in ("hybrid", "all-sliding"):
                counts["null"] += sum(b is None for blocks in kv.req_blocks[r.request_id] for b in blocks) > nulls
        elif op < 0.85 and running:  # fork a running request (beam search), admitted later
            src = running[rng.choice(sorted(running))]
            m = src.num_computed_tokens
            if m <= src.num_tokens and m % BS:
                fork = new_request(src.all_token_ids[:m] + [rng.randrange(30)])
                kv.pin_fork(fork, src)
        elif op < 0.93 and running:  # preemption: blocks back, the request waits to be admitted again
            r = running.pop(rng.choice(sorted(running)))
            kv.free(r)
            r.num_computed_tokens = 0
            waiting[r.request_id] = r
            counts["preempt"] += 1
        elif running or waiting:  # finished (or aborted while waiting)
            pool = running if running and rng.random() < 0.8 else (waiting or running)
            r = pool.pop(rng.choice(sorted(pool)))
            kv.free(r)
            kv.forget(r.request_id)
            counts["finish"] += 1
        kv.release_pins()  # the scheduler's end of a step
        for rid in list(running) + list(waiting):
            want = rebuilt(kv, rid)
            got = tables(kv, rid)
            if want is None:
                assert rid in waiting and got.shape[1] == 0, (rid, got)
            else:
                assert got.tolist() == want, (rid, got, want)
                if rng.random() < 0.1:
                    snapshots.append((got, want))
        for got, want in snapshots:  # tables handed out earlier never change
            assert got.tolist() == want
    for r in list(running.values()) + list(waiting.values()):
        kv.free(r)
    kv.release_pins()
    assert kv.num_free_blocks == kv.num_blocks and not kv.req_tables and not kv.req_blocks
    kv.pool.check_invariants()
    # the run went through every path it is meant to check
    assert counts["admit"] > 20 and counts["decode"] > 20 and counts["preempt"] > 5 and counts["finish"] > 5
    assert counts["fail"] > 0 and len(snapshots) > 20
    if kind != "classic-nocache":
        assert counts["hit"] > 3 and counts["fork"] > 0
    if kind in ("hybrid", "all-sliding"):
        assert counts["null"] > 5
