"""EngineStats: the typed snapshot ``get_stats()`` returns (no jax).

One struct for the real ``LLMEngine`` and the serving fakes, so the front door, health and
metrics read the same names (``num_free_blocks``/``num_blocks``) instead of probing aliases.
Counters (``num_steps``, tokens, prefix-cache queries/hits, preemptions) are totals since the
engine was built; the rest is the state at the time of the call. The token totals leave out the
requests ``exclude_from_stats`` names (the servers' health probes), as the metrics do; the steps,
gauges and cache counters count them (engine work).
"""

from __future__ import annotations

import msgspec


class EngineStats(msgspec.Struct, kw_only=True, frozen=True):
    num_blocks: int = 0  # KV blocks in the cache
    num_free_blocks: int = 0  # blocks no running request holds (prefix-cached ones count as free)
    num_running: int = 0  # requests scheduled in the running set
    num_waiting: int = 0  # requests accepted, not yet scheduled
    num_unfinished_requests: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, found cached
    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use, [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    def __getitem__(self, name: str):
        """Dict-style read (``stats["num_free_blocks"]``) for code written against the old dict."""
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None
