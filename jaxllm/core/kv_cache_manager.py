"""Per-request KV block bookkeeping on top of the BlockPool (host only, no jax).

Contract with the runner: a request's block table maps token position ``p`` to slot
``block_ids[p // block_size] * block_size + p % block_size``. Full blocks are registered in the
prefix cache *when they are allocated* for the step that computes them (as vLLM V1 does), so a
request scheduled later in the same step may already reuse them: the runner must write the KV
of every scheduled token of a step before attention of that layer reads the cache.

Forks (``pin_fork``; beam search): a new request whose tokens are a running request's computed
tokens plus one takes that request's full blocks as prefix-cache hits and a *copy* of its partial
last block: the source block is pinned (one reference) from ``pin_fork`` until the fork is
admitted, when a fresh block takes the copy (``ScheduledSeq``-independent: the SchedulerOutput's
``block_copies``, applied by the runner before the step) and the pin is dropped. A fork whose full
blocks are no longer all cached when it is admitted drops the pin and recomputes as any request.

Block tables: ``block_table`` hands the scheduler a request's block ids as a read-only int32 numpy array kept
incrementally (jaxllm/core/block_table.py: appended as blocks are allocated, never rebuilt per step);
``get_block_ids`` rebuilds the same ids as a list from the request's blocks.

Block keys: a block's hash covers its tokens, every token before it and the request's ``extra_key``
(its LoRA adapter), plus, for a model whose KV also depends on the prompt's length, which side of
``long_prompt_threshold`` the prompt is on. That is longrope (Phi-3 / Phi-3.5 128k): a prompt longer
than original_max_position_embeddings writes every key with the long rope set, a shorter one writes
the keys before that length with the short set (jaxllm/models/rope.py), so the two never share a
block, nor a fork's copied block; prompts on one side share as any others.
"""

from __future__ import annotations

import numpy as np

from jaxllm.core.block_pool import BlockHash, BlockPool, KVBlock, hash_request_blocks
from jaxllm.core.block_table import BlockTable
from jaxllm.core.request import Request


_EMPTY = np.zeros(0, np.int32)
_EMPTY.flags.writeable = False


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 long_prompt_threshold: int | None = None) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} is invalid: must be an integer >= 1")
        if long_prompt_threshold is not None and (isinstance(long_prompt_threshold, bool) or not isinstance(
                long_prompt_threshold, int) or long_prompt_threshold < 1):
            raise ValueError(f"long_prompt_threshold={long_prompt_threshold!r} is invalid: must be None or an "
                             f"integer >= 1")
        self.long_prompt_threshold = long_prompt_threshold
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_tables: dict[str, BlockTable] = {}  # the ids of req_blocks, kept incrementally
        self.req_hashes: dict[str, list[BlockHash]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of a request already registered
        self.fork_pins: dict[str, tuple[KVBlock, int]] = {}  # fork id -> (pinned source block, tokens it covers)
        self._pinned_to_release: list[KVBlock] = []
        # prefix cache statistics, in tokens
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def block_key(self, req: Request) -> object:
        """The part of ``req``'s block hashes beyond its tokens: its extra_key, and with a
        long_prompt_threshold whether its prompt is longer than that (see the module doc)."""
        if self.long_prompt_threshold is None:
            return req.extra_key
        return (req.extra_key, "long-prompt" if req.num_prompt_tokens > self.long_prompt_threshold else "short-prompt")

    def _hashes(self, req: Request) -> list[BlockHash]:
        hashes = self.req_hashes.setdefault(req.request_id, [])
        return hash_request_blocks(req.all_token_ids, self.block_size, self.block_key(req), hashes)

    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of the request's tokens, as (blocks, num_tokens).

        Never the whole sequence: at least one token is left to compute so the step has
        logits to sample from. Requests asking for prompt logprobs bypass the cache (every
        prompt position must go through the model), and so do embedding requests (MEAN pooling
        needs every position's hidden state; their blocks are not registered either, see
        ``allocate_slots``). Takes no reference; pass the blocks to
        ``allocate_slots``."""
        if not self.enable_caching or req.params.prompt_logprobs is not None or req.pooling is not None:
            return [], 0
        hashes = self._hashes(req)
        max_blocks = (req.num_tokens - 1) // self.block_size
        blocks: list[KVBlock] = []
        for h in hashes[:max_blocks]:
            b = self.pool.get_cached_block(h)
            if b is None:
                break
            blocks.append(b)
        pin = self.fork_pins.get(req.request_id)
        if pin is not None and len(blocks) == pin[1] // self.block_size:
            return blocks, pin[1]  # the partial block's tokens come from the pinned source's copy
        return blocks, len(blocks) * self.block_size

    # ----- forks ----------------------------------------------------------------------
    def pin_fork(self, req: Request, source: Request) -> bool:
        """Make ``req`` (waiting, its tokens = ``source``'s first m computed tokens + 1 more) a fork
        of running ``source``: pin source's partial block m // block_size. False (nothing pinned)
        when there is nothing to copy or the tokens / adapter differ."""
        m = req.num_tokens - 1
        blocks = self.req_blocks.get(source.request_id)
        if (not self.enable_caching or req.params.prompt_logprobs is not None or m % self.block_size == 0
                or req.request_id in self.fork_pins or not blocks or len(blocks) <= m // self.block_size
                or source.num_computed_tokens < m or self.block_key(req) != self.block_key(source)
                or req.all_token_ids[:m] != source.all_token_ids[:m]):
            return False
        block = blocks[m // self.block_size]
        self.pool.touch([block])
        self.fork_pins[req.request_id] = (block, m)
        return True

    def take_fork_copies(self, req: Request) -> list[tuple[int, int]]:
        """At admission (after ``allocate_slots``): the (source block, destination block) pairs to copy
        when ``req`` was admitted as a fork (one here; the hybrid manager's one per KV cache group), else
        []; either way its pin is released (the caller applies the copies in the step it schedules,
        before any later allocation can reuse the source)."""
        pin = self.fork_pins.pop(req.request_id, None)
        if pin is None:
            return []
        block, m = pin
        blocks = self.req_blocks.get(req.request_id, [])
        copies = []
        if req.num_computed_tokens == m and len(blocks) > m // self.block_size:
            copies = [(block.block_id, blocks[m // self.block_size].block_id)]
        self._pinned_to_release.append(block)
        return copies

    def num_hit_tokens(self, computed: list[KVBlock]) -> int:
        """Tokens the cached blocks of a ``get_computed_blocks`` answer hold (a fork's copied rest aside)."""
        return len(computed) * self.block_size

    def release_pins(self) -> None:
        """Drop the pins of forks admitted in this schedule (after its allocations)."""
        blocks, self._pinned_to_release = self._pinned_to_release, []
        self.pool.free_blocks(blocks)

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup in the hit-rate statistics."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVBlock] | None = None,
                       num_copied_tokens: int = 0) -> list[KVBlock] | None:
        """Make room for ``num_new_tokens`` tokens after the computed ones (``req.num_computed_tokens``
        plus the cached ``new_computed_blocks``, plus ``num_copied_tokens`` a fork's copied partial
        block holds). Returns the newly allocated blocks, or None (nothing changed) when the pool
        cannot supply them."""
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_blocks.get(req.request_id, [])
        num_computed = req.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_copied_tokens
        total = num_computed + num_new_tokens
        num_needed = cdiv(total, self.block_size) - len(blocks) - len(new_computed_blocks)
        # cached blocks we are about to take back leave the free queue too
        num_reclaimed = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_reclaimed:
            return None
        blocks = self.req_blocks.setdefault(req.request_id, [])
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            self.num_cached_blocks[req.request_id] = len(blocks)
        new_blocks = self.pool.get_new_blocks(max(num_needed, 0))
        blocks.extend(new_blocks)
        if new_computed_blocks or new_blocks:
            self._table(req.request_id, len(blocks)).extend(
                [[b.block_id for b in new_computed_blocks] + [b.block_id for b in new_blocks]])
        if self.enable_caching and req.pooling is None:
            # embedding requests keep their blocks out of the prefix cache: they are freed the step
            # their prompt is done and would only evict generation prefixes from the LRU queue
            self._cache_full_blocks(req, blocks, total)
        return new_blocks

    def _cache_full_blocks(self, req: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        start = self.num_cached_blocks.get(req.request_id, 0)
        end = min(num_tokens, req.num_tokens) // self.block_size
        if end <= start:
            return
        hashes = self._hashes(req)
        for i in range(start, end):
            self.pool.cache_block(blocks[i], hashes[i])
        self.num_cached_blocks[req.request_id] = end

    @property
    def num_groups(self) -> int:
        """KV cache groups (rows of a block table): one here; HybridKVCacheManager has one per group."""
        return 1

    def _table(self, request_id: str, size: int) -> BlockTable:
        """The request's table, made on its first allocation (room for `size` entries and then some)."""
        table = self.req_tables.get(request_id)
        if table is None:
            table = self.req_tables[request_id] = BlockTable(self.num_groups, size + 16)
        return table

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block ids, rebuilt as a new list (the scheduler reads ``block_table`` instead)."""
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def block_table(self, request_id: str) -> np.ndarray:
        """The request's block ids, ``[n]`` int32, read-only and never changed later (a snapshot, kept
        incrementally: no per-step rebuild); equal to ``get_block_ids``."""
        table = self.req_tables.get(request_id)
        return _EMPTY if table is None else table.view()[0]

    def group_block_tables(self, request_id: str) -> np.ndarray | None:
        """Every KV cache group's ``block_table``: None here (one group); see HybridKVCacheManager."""
        return None

    def get_group_block_ids(self, request_id: str) -> list[list[int]] | None:
        """Every KV cache group's table: None here (one group, ``get_block_ids``); see HybridKVCacheManager."""
        return None

    def free(self, req: Request) -> None:
        """Release the request's blocks, tail first (so its tail is evicted first), and its fork pin."""
        pin = self.fork_pins.pop(req.request_id, None)
        if pin is not None:
            self.pool.free_blocks([pin[0]])
        blocks = self.req_blocks.pop(req.request_id, [])
        self.req_tables.pop(req.request_id, None)
        self.pool.free_blocks(reversed(blocks))
        self.num_cached_blocks.pop(req.request_id, None)
        # hashes depend only on the tokens: keep them while the request lives (resume after
        # preemption); drop them when it is gone for good via ``forget``.

    def forget(self, request_id: str) -> None:
        self.req_hashes.pop(request_id, None)

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def evict_free_cached(self) -> int:
        """Forget the cached prefixes of blocks no request holds (see BlockPool.evict_free_cached)."""
        return self.pool.evict_free_cached()
