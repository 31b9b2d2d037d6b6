"""KV block bookkeeping for a model with KV cache groups (host only, no jax; vLLM's hybrid KV cache manager).

Same contract as KVCacheManager (jaxllm/core/kv_cache_manager.py), with one block list per group
(jaxllm/core/kv_cache_groups.py) over ONE shared BlockPool. It also serves a model whose layers all slide
(Mistral v0.1): ONE sliding group, its one table with null entries where blocks fell out of the window.
Entry ``i`` of every group's list covers positions ``[i * block_size, (i + 1) * block_size)``; an entry may
be None (a *null* block: no block, its table entry on the device is a harmless id that is never written,
because no new token lands there).

* Full-attention groups: as the classic manager, one block per ``block_size`` tokens.
* Sliding-window groups (window ``w``): a query at position ``p`` reads positions ``> p - w``. The next
  query of a request sits at ``num_computed_tokens``, so a block whose every position is before
  ``num_computed_tokens - w + 1`` is never read again: ``allocate_slots`` frees it (its entry turns
  None) and never allocates one for positions already out of the window (a long prompt's chunk takes
  the window's blocks plus the chunk's). Freed blocks keep their prefix-cache hash in the LRU queue like
  any freed block.
* Capacity: ``allocate_slots`` counts the new blocks of every group against the free ones, all or
  nothing (blocks out of the window are released first: that is always valid).
* Prefix caching: a block's cache key is its chained hash plus its group (the pages of two groups hold
  other layers). A hit of ``k`` blocks needs, in every full group, blocks ``0..k-1`` cached and, in every
  sliding group, the blocks covering the ``w - 1`` positions before ``k * block_size`` (the first query's
  window); the longest ``k`` every group serves is taken (vLLM's rule).
* Forks (beam search): the source's partial block is pinned and copied in every group
  (``take_fork_copies``: one (source, destination) pair per group).
* Tables: ``group_block_tables`` is every group's ids as one read-only ``[G, n]`` int32 array kept
  incrementally (jaxllm/core/block_table.py: new entries appended after each allocation, freed ones nulled);
  ``get_group_block_ids`` rebuilds the same as lists.
"""

from __future__ import annotations

import numpy as np

from jaxllm.core.block_pool import BlockHash, KVBlock
# NULL_BLOCK_ID: a null entry in the tables (the runner maps it to block 0); importable from here too
from jaxllm.core.block_table import NULL_BLOCK_ID, BlockTable
from jaxllm.core.kv_cache_groups import KVCacheGroups, cdiv
from jaxllm.core.kv_cache_manager import KVCacheManager
from jaxllm.core.request import Request


class HybridKVCacheManager(KVCacheManager):
    def __init__(self, num_blocks: int, block_size: int, groups: KVCacheGroups, enable_caching: bool = True,
                 long_prompt_threshold: int | None = None) -> None:
        super().__init__(num_blocks, block_size, enable_caching, long_prompt_threshold)
        self.groups = groups
        self.windows = [g.window for g in groups.groups]
        # request id -> one list per group (entries None where a sliding group freed or skipped the block)
        self.req_blocks: dict[str, list[list[KVBlock | None]]] = {}
        self.fork_pins: dict[str, tuple[list[KVBlock], int]] = {}

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    def _key(self, h: BlockHash, g: int) -> BlockHash:
        return h + g.to_bytes(2, "big")

    def _first_needed(self, g: int, num_computed: int) -> int:
        """Index of group g's first block a query at position ``num_computed`` (or later) may read."""
        w = self.windows[g]
        return 0 if w is None else max(0, num_computed - w + 1) // self.block_size

    def num_hit_tokens(self, computed: list[list[KVBlock | None]]) -> int:
        return len(computed[0]) * self.block_size if computed else 0

    # ----- prefix cache ---------------------------------------------------------------
    def _cached(self, g: int, hashes: list[BlockHash], i: int) -> KVBlock | None:
        return self.pool.get_cached_block(self._key(hashes[i], g))

    def _sliding_hit(self, g: int, hashes: list[BlockHash], k: int) -> int:
        """The largest j <= k whose window blocks (``_first_needed(g, j * bs)``..j-1) are all cached in g."""
        j = k
        while j > 0:
            for b in range(j - 1, self._first_needed(g, j * self.block_size) - 1, -1):
                if self._cached(g, hashes, b) is None:
                    j = b  # no hit above b can skip block b
                    break
            else:
                return j
        return 0

    def get_computed_blocks(self, req: Request) -> tuple[list[list[KVBlock | None]], int]:
        """The longest prefix hit every group serves, as (one block list per group, num_tokens); sliding
        groups' lists hold None before the hit's window. See KVCacheManager.get_computed_blocks."""
        empty = [[] for _ in self.windows]
        if not self.enable_caching or req.params.prompt_logprobs is not None or req.pooling is not None:
            return empty, 0
        hashes = self._hashes(req)
        k = (req.num_tokens - 1) // self.block_size
        for g, w in enumerate(self.windows):
            if w is None:
                k = next((i for i in range(k) if self._cached(g, hashes, i) is None), k)
        while True:  # every sliding group at k, or lower k to what one serves (then check again)
            low = min((self._sliding_hit(g, hashes, k) for g, w in enumerate(self.windows) if w is not None),
                      default=k)
            if low == k:
                break
            k = low
        if k == 0:
            blocks = empty
        else:
            blocks = [[None] * (first := self._first_needed(g, k * self.block_size))
                      + [self._cached(g, hashes, i) for i in range(first, k)] for g in range(self.num_groups)]
        pin = self.fork_pins.get(req.request_id)
        if pin is not None and k == pin[1] // self.block_size:
            return blocks, pin[1]
        return blocks, k * self.block_size

    # ----- forks ----------------------------------------------------------------------
    def pin_fork(self, req: Request, source: Request) -> bool:
        m = req.num_tokens - 1
        lists = self.req_blocks.get(source.request_id)
        i = m // self.block_size
        if (not self.enable_caching or req.params.prompt_logprobs is not None or m % self.block_size == 0
                or req.request_id in self.fork_pins or not lists or any(len(b) <= i or b[i] is None for b in lists)
                or source.num_computed_tokens < m or self.block_key(req) != self.block_key(source)
                or req.all_token_ids[:m] != source.all_token_ids[:m]):
            return False
        pinned = [b[i] for b in lists]
        self.pool.touch(pinned)
        self.fork_pins[req.request_id] = (pinned, m)
        return True

    def take_fork_copies(self, req: Request) -> list[tuple[int, int]]:
        """At admission: one (source block, destination block) pair per group when ``req`` was admitted as a
        fork (else []); its pins are released after this schedule's allocations (release_pins)."""
        pin = self.fork_pins.pop(req.request_id, None)
        if pin is None:
            return []
        pinned, m = pin
        i = m // self.block_size
        lists = self.req_blocks.get(req.request_id)
        copies = []
        if req.num_computed_tokens == m and lists and all(len(b) > i and b[i] is not None for b in lists):
            copies = [(src.block_id, b[i].block_id) for src, b in zip(pinned, lists)]
        self._pinned_to_release.extend(pinned)
        return copies

    # ----- allocation -----------------------------------------------------------------
    def _free_skipped(self, lists: list[list[KVBlock | None]], table: BlockTable, num_computed: int) -> None:
        """Free every sliding group's blocks before its window at ``num_computed`` (entries turn None, and
        NULL_BLOCK_ID in the table)."""
        for g, (w, blocks) in enumerate(zip(self.windows, lists)):
            if w is None:
                continue
            i = min(max(0, num_computed - w + 1) // self.block_size, len(blocks)) - 1
            if i < 0 or blocks[i] is None:  # freed entries form a prefix: nothing new to free
                continue
            freed = []
            hi = i + 1
            while i >= 0 and blocks[i] is not None:
                freed.append(blocks[i])
                blocks[i] = None
                i -= 1
            table.set_null(g, i + 1, hi)
            self.pool.free_blocks(freed)

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       new_computed_blocks: list[list[KVBlock | None]] | None = None,
                       num_copied_tokens: int = 0) -> list[KVBlock] | None:
        """Make room for ``num_new_tokens`` after the computed tokens in every group. Returns the newly
        allocated blocks, or None when the pool cannot supply every group's: then nothing was allocated
        (blocks that fell out of a sliding window may have been freed, which is always valid)."""
        bs = self.block_size
        hit = len(new_computed_blocks[0]) if new_computed_blocks else 0
        lists = self.req_blocks.get(req.request_id)
        num_computed = req.num_computed_tokens + hit * bs + num_copied_tokens
        total = num_computed + num_new_tokens
        want = cdiv(total, bs)
        if lists is not None:
            self._free_skipped(lists, self.req_tables[req.request_id], num_computed)
        firsts = [0 if w is None else max(0, num_computed - w + 1) // bs for w in self.windows]
        num_needed = 0
        for g, first in enumerate(firsts):
            have = hit + (len(lists[g]) if lists is not None else 0)
            num_needed += max(0, want - max(have, first))
        num_reclaimed = 0 if not hit else sum(
            1 for blocks in new_computed_blocks for b in blocks if b is not None and b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_reclaimed:
            return None
        if lists is None:
            lists = self.req_blocks[req.request_id] = [[] for _ in self.windows]
        if hit:
            for g, blocks in enumerate(lists):
                self.pool.touch([b for b in new_computed_blocks[g] if b is not None])
                blocks.extend(new_computed_blocks[g])
            self.num_cached_blocks[req.request_id] = hit
        new_blocks = self.pool.get_new_blocks(num_needed) if num_needed else []
        it = iter(new_blocks)
        for blocks, first in zip(lists, firsts):
            if len(blocks) < first:  # positions already out of the window: no block
                blocks.extend([None] * (first - len(blocks)))
            if len(blocks) < want:
                blocks.extend(next(it) for _ in range(want - len(blocks)))
        self._append_table(req.request_id, lists)
        if self.enable_caching and req.pooling is None:
            self._cache_group_blocks(req, lists, total)
        return new_blocks

    def _append_table(self, request_id: str, lists: list[list[KVBlock | None]]) -> None:
        """Append the lists' entries past the request's table to it (every group's list is as long)."""
        table = self._table(request_id, len(lists[0]))
        n = len(table)
        if len(lists[0]) > n:
            table.extend([[NULL_BLOCK_ID if b is None else b.block_id for b in blocks[n:]] for blocks in lists])

    def _cache_group_blocks(self, req: Request, lists: list[list[KVBlock | None]], num_tokens: int) -> None:
        start = self.num_cached_blocks.get(req.request_id, 0)
        end = min(num_tokens, req.num_tokens) // self.block_size
        if end <= start:
            return
        hashes = self._hashes(req)
        for g, blocks in enumerate(lists):
            for i in range(start, end):
                if blocks[i] is not None:
                    self.pool.cache_block(blocks[i], self._key(hashes[i], g))
        self.num_cached_blocks[req.request_id] = end

    # ----- tables -----------------------------------------------------------------------
    def group_block_tables(self, request_id: str) -> np.ndarray:
        """Every group's ``block_table``: ``[G, n]`` int32 (NULL_BLOCK_ID for a null entry), read-only and never
        changed later (KVCacheManager.block_table); equal to ``get_group_block_ids``."""
        table = self.req_tables.get(request_id)
        return np.zeros((self.num_groups, 0), np.int32) if table is None else table.view()

    def block_table(self, request_id: str) -> np.ndarray:
        """Group 0's row of ``group_block_tables``."""
        return self.group_block_tables(request_id)[0]

    def get_group_block_ids(self, request_id: str) -> list[list[int]]:
        """Every group's block table (NULL_BLOCK_ID for a null entry)."""
        lists = self.req_blocks.get(request_id)
        if lists is None:
            return [[] for _ in self.windows]
        return [[NULL_BLOCK_ID if b is None else b.block_id for b in blocks] for blocks in lists]

    def get_block_ids(self, request_id: str) -> list[int]:
        """Group 0's table (a full-attention group whenever the model has one; an all-sliding model's one table)."""
        lists = self.req_blocks.get(request_id)
        return [] if lists is None else [NULL_BLOCK_ID if b is None else b.block_id for b in lists[0]]

    def num_held_blocks(self, request_id: str, g: int) -> int:
        """Blocks group ``g`` holds for the request (null entries not counted)."""
        lists = self.req_blocks.get(request_id)
        return 0 if lists is None else sum(b is not None for b in lists[g])

    def free(self, req: Request) -> None:
        """Release every group's blocks, tail first, and the fork pins."""
        pin = self.fork_pins.pop(req.request_id, None)
        if pin is not None:
            self.pool.free_blocks(pin[0])
        for blocks in self.req_blocks.pop(req.request_id, []):
            self.pool.free_blocks(b for b in reversed(blocks) if b is not None)
        self.req_tables.pop(req.request_id, None)
        self.num_cached_blocks.pop(req.request_id, None)
