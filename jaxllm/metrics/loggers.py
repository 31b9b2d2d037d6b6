"""Stat loggers: consumers of the engine's per-step stats (host only, no jax).

A logger is anything with ``record(scheduler_stats, iteration_stats)``; the engine calls every
attached logger after each step (and after an abort) on its own thread. ``LoggingStatLogger``
writes vLLM's periodic one-line summary; ``jaxllm.metrics.prometheus.PrometheusStatLogger``
feeds the Prometheus series.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

from jaxllm.metrics.stats import IterationStats, SchedulerStats

log = logging.getLogger("jaxllm.metrics")


class StatLogger(Protocol):
    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats | None) -> None: ...


def validate_interval(interval) -> float:
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval >= 0:
        raise ValueError(f"log_stats_interval={interval!r} is invalid: must be a number of seconds >= 0")
    return float(interval)


class LoggingStatLogger:
    """Every ``interval`` seconds (checked when a step is recorded; 0 = every step) one line:

    ``Avg prompt throughput: 412.0 tokens/s, Avg generation throughput: 96.5 tokens/s, Running: 8
    reqs, Waiting: 3 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 40.0%``

    Throughputs are the tokens counted since the previous line over the seconds since it; the
    gauges are the latest step's; the prefix cache hit rate is over every lookup since start.
    With speculative decoding, when some sequence carried drafts since the previous line, it ends
    with ``, Spec decode: mean acceptance length 2.31, acceptance rate 32.8% (105/320 draft
    tokens)``: 1 + accepted / drafts (tokens per sequence-step with drafts) and accepted / drafted
    draft tokens, over the same interval (vLLM's SpecDecoding metrics line)."""

    def __init__(self, interval: float = 10.0, *, emit: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = validate_interval(interval)
        self.emit = emit if emit is not None else log.info
        self.clock = clock
        self.last_log_time = clock()
        self.prompt_tokens = 0  # since the last line
        self.generation_tokens = 0
        self.prefix_queries = 0  # since start
        self.prefix_hits = 0
        self.scheduler_stats: SchedulerStats | None = None
        self.spec = [0, 0, 0]  # drafts, draft tokens, accepted tokens since the last line

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats | None) -> None:
        self.scheduler_stats = scheduler_stats
        self.prefix_queries += scheduler_stats.prefix_cache_queries
        self.prefix_hits += scheduler_stats.prefix_cache_hits
        if iteration_stats is not None:
            self.prompt_tokens += iteration_stats.num_prompt_tokens
            self.generation_tokens += iteration_stats.num_generation_tokens
            sd = iteration_stats.spec_decoding
            if sd is not None:
                self.spec[0] += sd.num_drafts
                self.spec[1] += sd.num_draft_tokens
                self.spec[2] += sd.num_accepted_tokens
        if self.clock() - self.last_log_time >= self.interval:
            self.log()

    def log(self) -> str | None:
        """Write the line now (and start a new interval); None before anything was recorded."""
        s = self.scheduler_stats
        if s is None:
            return None
        now = self.clock()
        secs = max(now - self.last_log_time, 1e-9)
        hit_rate = self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
        line = (f"Avg prompt throughput: {self.prompt_tokens / secs:.1f} tokens/s, "
                f"Avg generation throughput: {self.generation_tokens / secs:.1f} tokens/s, "
                f"Running: {s.num_running_reqs} reqs, Waiting: {s.num_waiting_reqs} reqs, "
                f"KV cache usage: {100 * s.kv_cache_usage:.1f}%, Prefix cache hit rate: {100 * hit_rate:.1f}%")
        if s.num_compiles_since_warmup:
            line += f", XLA compiles since warm-up: {s.num_compiles_since_warmup}"
        drafts, drafted, accepted = self.spec
        if drafts:
            line += (f", Spec decode: mean acceptance length {1 + accepted / drafts:.2f}, acceptance rate "
                     f"{100 * accepted / drafted:.1f}% ({accepted}/{drafted} draft tokens)")
        self.emit(line)
        self.last_log_time = now
        self.prompt_tokens = self.generation_tokens = 0
        self.spec = [0, 0, 0]
        return line
