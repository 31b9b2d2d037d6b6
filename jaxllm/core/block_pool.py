"""KV block pool: free list, reference counts, automatic prefix caching (host only, no jax).

Blocks are numbered ``0 .. num_blocks-1`` (block 0 is an ordinary block). A block is *free*
when its ref count is 0; free blocks sit in one queue in LRU order (the head is evicted
first). A free block may still hold a *cached* prefix: its ``block_hash`` is registered in
``cached`` so a later request with the same prefix can take it back (``touch``) without
recomputing. Allocating a free block that is cached evicts it (drops the hash entry).

Block hashes are chained: ``hash(parent_hash, block token ids, extra_key)`` (sha256), so a
hash identifies the whole prefix up to and including the block. ``extra_key`` holds what else
the KV depends on (the LoRA adapter; longrope's prompt side, KVCacheManager.block_key): different
keys never share blocks.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes

_ROOT_HASH = b"jaxllm-root"


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int],
                      extra_key: object = None) -> BlockHash:
    h = hashlib.sha256(parent if parent is not None else _ROOT_HASH)
    h.update(array("q", token_ids).tobytes())
    if extra_key is not None:
        h.update(b"|extra|" + repr(extra_key).encode())
    return h.digest()


def hash_request_blocks(token_ids: Sequence[int], block_size: int, extra_key: object = None,
                        existing: list[BlockHash] | None = None) -> list[BlockHash]:
    """Hashes of every *full* block of ``token_ids``, extending ``existing`` (a prefix of them)."""
    hashes = existing if existing is not None else []
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size], extra_key)
        hashes.append(parent)
    return hashes


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={h})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r} is invalid: must be an integer >= 1")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # ref_cnt == 0 blocks, LRU order: popitem(last=False) takes the eviction candidate.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0

    # ----- queries ------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (free, cached-but-unused included)."""
        return len(self._free)

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    # ----- allocation ---------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[KVBlock]:
        if n > len(self._free):
            raise ValueError(f"num_blocks requested={n} is invalid: only {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on (cached) blocks; a free one leaves the free queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each, in the given order: blocks reaching 0 join the queue tail
        (so pass a request's blocks tail-first to have its tail evicted first)."""
        for b in blocks:
            if b.ref_cnt <= 0:
                raise RuntimeError(f"double free: block {b.block_id} has ref_cnt={b.ref_cnt}")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._free[b.block_id] = b

    # ----- prefix caching -----------------------------------------------------------
    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full block's hash. A block already cached, or a hash already held by
        another block (same content computed twice), is left as is."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
            self.num_evictions += 1

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; only allowed when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for b in self.blocks:
            b.block_hash = None
        self.cached.clear()
        return True

    def evict_free_cached(self) -> int:
        """Drop the hash of every cached block no request holds (ref_cnt 0), so no later request
        finds them; blocks in use keep theirs (requests in flight are unaffected). The blocks
        stay free. Returns how many were dropped."""
        dropped = 0
        for b in self._free.values():
            if b.block_hash is not None:
                if self.cached.get(b.block_hash) is b:
                    del self.cached[b.block_hash]
                b.block_hash = None
                dropped += 1
        return dropped

    def check_invariants(self) -> None:
        """Debug/test helper: raise AssertionError when the pool's bookkeeping is inconsistent."""
        for b in self.blocks:
            assert b.ref_cnt >= 0, b
            assert (b.ref_cnt == 0) == (b.block_id in self._free), b
            if b.block_hash is not None:
                assert self.cached.get(b.block_hash) is b, b
        for h, b in self.cached.items():
            assert b.block_hash == h, b
