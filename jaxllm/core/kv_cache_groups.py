"""KV cache groups: which layers share one block table (host only, no jax; vLLM's hybrid KV cache manager).

A model whose layers all attend alike has ONE group of ``num_layers`` slots, the cache
``[num_layers, num_blocks, ...]`` as always: a full-attention group (every block kept) or, when every layer
has the same window (Mistral-7B-v0.1's 4096; Qwen2 with use_sliding_window and max_window_layers=0), a
*sliding* group, whose blocks that fell out of the window are freed like any sliding group's (vLLM's
SlidingWindowManager; ``managed`` says the hybrid manager keeps its table). A model with sliding-window
layers beside full-attention ones (Gemma 2: every other layer a window; Gemma 3: 5 of 6; Qwen2/3 with
``use_sliding_window``) splits its layers by kind (full attention, then each distinct window) and each
kind into groups of ``P`` layers (the last group of a kind padded with unused slots). Every group has
its own block table over one shared block pool, and the cache holds ``P`` layer pages per block:
``[P, num_blocks, ...]``. Layer ``l`` is slot ``j`` of group ``g`` (``layer_slot``): it reads and
writes page ``j`` of the blocks in group ``g``'s table. A block then costs P layers' bytes instead of
L's, so the same memory holds ~L/P times more blocks, and a sliding group holds only the blocks of its
window (jaxllm/core/hybrid_kv_cache_manager.py): the long-context memory of those layers is freed.

``P`` is the smallest kind's layer count (Gemma 3's 1 full per 5 sliding: P = the full layers), or the
largest when the kinds are within 25% of each other (a few padded slots beat many small groups):
vLLM's rule. ``hybrid=False`` (``--disable-hybrid-kv-cache-manager``) makes every model one full-attention
group (vLLM: the flag handles every layer as full attention): full-length blocks for every layer, the
windows only masked by the kernels.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVCacheGroup:
    window: int | None  # the layers' sliding window in tokens; None = full attention (or every block kept)
    layers: tuple[int, ...]  # the model layers in slots 0..len-1; slots past them are padding

    @property
    def sliding(self) -> bool:
        return self.window is not None


@dataclass(frozen=True)
class KVCacheGroups:
    groups: tuple[KVCacheGroup, ...]
    slots: int  # P: layer pages per block (the cache's leading axis)
    num_layers: int

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def hybrid(self) -> bool:
        """More than one block table (the hybrid manager); False: one group, exactly the classic cache."""
        return len(self.groups) > 1

    @property
    def managed(self) -> bool:
        """The hybrid manager's rules apply (jaxllm/core/hybrid_kv_cache_manager.py): more than one group, or
        one sliding group (an all-sliding model). False: one full-attention group, the classic manager."""
        return self.hybrid or self.groups[0].sliding

    def layer_slot(self, layer: int) -> tuple[int, int]:
        """(group, slot) of model layer ``layer``."""
        for g, group in enumerate(self.groups):
            if layer in group.layers:
                return g, group.layers.index(layer)
        raise ValueError(f"layer={layer!r} is invalid: the model has {self.num_layers} layers")

    def blocks_for(self, g: int, num_tokens: int, chunk: int, block_size: int) -> int:
        """Most blocks group ``g`` holds for one request of ``num_tokens`` tokens computed in chunks of at
        most ``chunk`` tokens: all of them for a full group; for a sliding group the window before a
        chunk plus the chunk (and one block of misalignment), never more than the full count."""
        full = cdiv(num_tokens, block_size)
        w = self.groups[g].window
        if w is None:
            return full
        return min(full, cdiv(w - 1 + min(chunk, num_tokens), block_size) + 1)

    def blocks_per_request(self, num_tokens: int, chunk: int, block_size: int) -> int:
        """Blocks of the pool one request of ``num_tokens`` tokens may hold at once, over every group."""
        return sum(self.blocks_for(g, num_tokens, chunk, block_size) for g in range(self.num_groups))

    def describe(self) -> str:
        parts = []
        for group in self.groups:
            kind = "full" if group.window is None else f"window {group.window}"
            parts.append(f"{kind} {list(group.layers)}")
        pad = self.num_groups * self.slots - self.num_layers
        return (f"{self.num_groups} group{'s' if self.num_groups > 1 else ''} x {self.slots} layer slots"
                f"{f' ({pad} padding)' if pad else ''}: " + "; ".join(parts))


def make_groups(windows: Sequence[int | None], hybrid: bool = True) -> KVCacheGroups:
    """The groups of a model whose layer ``l`` has sliding window ``windows[l]`` (None = full attention)."""
    n = len(windows)
    if n < 1:
        raise ValueError(f"num_layers={n} is invalid: must be >= 1")
    for i, w in enumerate(windows):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"windows[{i}]={w!r} is invalid: must be None or an integer >= 1")
    kinds: dict[int | None, list[int]] = {}
    for i, w in enumerate(windows):
        kinds.setdefault(w, []).append(i)
    if not hybrid:
        return KVCacheGroups((KVCacheGroup(None, tuple(range(n))),), n, n)
    if len(kinds) == 1:  # all full attention, or all one window: one group of every layer
        return KVCacheGroups((KVCacheGroup(windows[0], tuple(range(n))),), n, n)
    counts = [len(v) for v in kinds.values()]
    smallest, largest = min(counts), max(counts)
    size = largest if largest * 4 < smallest * 5 else smallest
    order = sorted(kinds, key=lambda w: (w is not None, w or 0))  # full attention first, then by window
    groups = tuple(KVCacheGroup(w, tuple(kinds[w][i:i + size])) for w in order
                   for i in range(0, len(kinds[w]), size))
    return KVCacheGroups(groups, size, n)
