"""One request's block table kept incrementally as numpy (host only, no jax; vLLM's persistent block table).

The KV cache managers keep, beside each request's ``KVBlock`` lists, its block ids as an int32 array
``[num_groups, n]`` (one row per KV cache group; the classic manager has one): appended when blocks are
allocated, so a decode step costs O(new blocks) here instead of rebuilding every id, and the runner copies a
row with one slice assignment (runner/inputs.build_inputs).

Snapshot contract: ``view()`` is read-only and never changes afterwards. Appends write past every view
handed out; a rewrite of held entries (``set_null``: a sliding window's freed blocks) first moves the table
to a fresh buffer, so a view taken before still shows the table as it was then (a ScheduledSeq's
``block_ids`` stays the table "after this step's allocation" however long it is kept).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NULL_BLOCK_ID = -1  # a null entry (no block: a sliding group's block out of its window)


class BlockTable:
    __slots__ = ("_buf", "_n", "_view")

    def __init__(self, num_groups: int = 1, capacity: int = 16) -> None:
        self._buf = np.empty((num_groups, max(capacity, 1)), np.int32)
        self._n = 0
        self._view: np.ndarray | None = None

    def __len__(self) -> int:
        return self._n

    @property
    def num_groups(self) -> int:
        return self._buf.shape[0]

    def _reserve(self, n: int, fresh: bool = False) -> None:
        """Room for ``n`` entries; ``fresh``: in a new buffer even when this one has room (a rewrite)."""
        cap = self._buf.shape[1]
        if n > cap or fresh:
            buf = np.empty((self._buf.shape[0], max(n, 2 * cap if n > cap else cap)), np.int32)
            buf[:, :self._n] = self._buf[:, :self._n]
            self._buf = buf

    def extend(self, rows: Sequence[Sequence[int]]) -> None:
        """Append entries: ``rows[g]`` to group g (every row the same length; ids or NULL_BLOCK_ID)."""
        k = len(rows[0])
        if len(rows) != self.num_groups or any(len(r) != k for r in rows):
            raise ValueError(f"rows of lengths {[len(r) for r in rows]} are invalid for a table of "
                             f"num_groups={self.num_groups}: one row per group, all the same length")
        if not k:
            return
        n = self._n
        self._reserve(n + k)
        self._buf[:, n:n + k] = rows
        self._n = n + k
        self._view = None

    def set_null(self, g: int, lo: int, hi: int) -> None:
        """Entries ``lo..hi-1`` of group g become NULL_BLOCK_ID (in a fresh buffer: earlier views keep theirs)."""
        if not 0 <= lo <= hi <= self._n:
            raise ValueError(f"entries {lo}..{hi - 1} are invalid: the table has {self._n}")
        if lo == hi:
            return
        self._reserve(self._n, fresh=True)
        self._buf[g, lo:hi] = NULL_BLOCK_ID
        self._view = None

    def view(self) -> np.ndarray:
        """The table, ``[num_groups, n]`` int32, read-only; it never changes (see the module doc)."""
        v = self._view
        if v is None:
            v = self._view = self._buf[:, :self._n]
            v.flags.writeable = False
        return v
