"""LLMEngine's stats (mixin, no jax): the stat loggers' per-step records (``SchedulerStats``,
``IterationStats``: jaxllm/metrics), the ``EngineStats`` snapshot ``get_stats()`` returns, and the
KV cache's start-up summary and prefix-cache reset.
Host arithmetic only: nothing here reads the device."""

from __future__ import annotations

from jaxllm.core.kv_cache_manager import cdiv
from jaxllm.engine.stats import EngineStats
from jaxllm.metrics.stats import IterationStats, SchedulerStats


class EngineStatsMixin:
    def blocks_per_request(self) -> int:
        """Blocks one request of max_model_len tokens may hold: one per block_size tokens, or with KV cache
        groups each full group's plus each sliding group's window and chunk (kv_cache_groups.py)."""
        groups = getattr(self, "kv_groups", None)
        if groups is None:
            return cdiv(self.config.max_model_len, self.config.block_size)
        c = self.config
        return groups.blocks_per_request(c.max_model_len, c.max_num_batched_tokens, c.block_size)

    def cache_summary(self) -> str:
        """One line for start-up: blocks, tokens, and how many max_model_len requests fit."""
        bs, nb = self.config.block_size, self.kv.num_blocks
        per_req = self.blocks_per_request()
        return (f"KV cache: {nb} blocks x {bs} tokens = {nb * bs} tokens; maximum concurrency "
                f"at max_model_len={self.max_model_len}: {nb / per_req:.2f}x")

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    def evict_free_cached(self) -> int:
        """Drop the prefix cache's free blocks (no request holds them), while requests run: the
        serving ``/reset_prefix_cache``. Returns the number of blocks dropped."""
        return self.kv.evict_free_cached()

    def add_stat_logger(self, logger) -> None:
        """Attach a stat logger (``jaxllm.metrics.loggers.StatLogger``): it gets every step's
        ``SchedulerStats`` and ``IterationStats`` from now on, on the thread that steps."""
        if not self.stat_loggers:  # counters report increments from here on
            self._stats_base = (self.kv.prefix_queries, self.kv.prefix_hits, self.scheduler.num_preemptions)
        self.stat_loggers.append(logger)

    def exclude_from_stats(self, prefix: str) -> None:
        """Leave requests whose id starts with ``prefix`` (a server's synthetic health probes) out of
        the stat loggers' request-level records (success counts, prompt/generation tokens, latency
        and length histograms) and out of ``get_stats()``'s prompt/generated token totals. The steps
        they run in still count (tokens per step, step time, ``num_steps``, gauges, prefix-cache and
        preemption counters): that is real engine work."""
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix={prefix!r} is invalid: must be a non-empty str")
        self._stats_excluded += (prefix,)

    def _in_stats(self, request_id: str) -> bool:
        """Whether request ``request_id`` enters the request-level stats (see exclude_from_stats)."""
        return not request_id.startswith(self._stats_excluded)

    def scheduler_stats(self) -> SchedulerStats:
        """The gauges now, and the counters' increments since the previous call."""
        kv, sched = self.kv, self.scheduler
        q, h, p = kv.prefix_queries, kv.prefix_hits, sched.num_preemptions
        q0, h0, p0 = self._stats_base
        self._stats_base = (q, h, p)
        lora = {}
        if getattr(self, "lora", None) is not None:  # O(running + waiting), only with a stat logger
            lora = dict(max_lora=self.lora.max_loras,
                        running_lora_adapters=_adapter_names(sched.running),
                        waiting_lora_adapters=_adapter_names(sched.waiting))
        return SchedulerStats(
            **lora, num_running_reqs=sched.num_running, num_waiting_reqs=sched.num_waiting,
            kv_cache_usage=1.0 - kv.num_free_blocks / kv.num_blocks,
            prefix_cache_queries=q - q0, prefix_cache_hits=h - h0, num_preemptions=p - p0,
            num_compiles_since_warmup=getattr(self.runner, "compile_count", 0) - self.compiles_at_warmup)

    def _record_stats(self, it: IterationStats) -> None:
        s = self.scheduler_stats()
        for logger in self.stat_loggers:
            logger.record(s, it)

    def _bucket_label(self, out) -> str:
        """The runner's shape bucket for step ``out`` ("decode_8", "draft_40", "mixed_64"), from the
        step's seqs (host arithmetic, the runner's own ``Buckets.pick_step``)."""
        buckets = getattr(self.runner, "buckets", None)
        if buckets is None:
            return "none"
        return buckets.label(out.seqs)

    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_blocks=self.kv.num_blocks,
            num_free_blocks=self.kv.num_free_blocks,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_unfinished_requests=len(self._parents) + len(self._embeds),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_steps=self.num_steps,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generated_tokens=self.num_generated_tokens,
        )


def _adapter_names(requests) -> tuple[str, ...]:
    return tuple(sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None}))
