"""The ``jaxllm:*`` Prometheus series (vLLM's ``vllm:*`` names), fed by the engine's stats.

Every series lives on the ``CollectorRegistry`` passed in (never the process-global default, so
several engines or tests in one process do not collide) and carries a ``model_name`` label.
Counters get prometheus-client's ``_total`` suffix in the exposition (``jaxllm:prompt_tokens_total``),
as vLLM's do. Host only: prometheus-client is pure Python; ``record`` runs on the engine thread
and a scrape reads the registry from another thread (the client's metrics are thread-safe).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge

from jaxllm.metrics.histogram import BatchHistogram
from jaxllm.metrics.stats import IterationStats, SchedulerStats

FINISH_REASONS = ("stop", "length", "abort")
# seconds; a CPU decode step of a 135M model is ~10-100 ms, a GPU one ~1-10 ms
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0)


def token_buckets(limit: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to (and including) ``limit``: request lengths and tokens per step."""
    out, v = [], 1
    while v < limit:
        out.append(float(v))
        v *= 2
    out.append(float(max(limit, 1)))
    return tuple(out)


class PrometheusStatLogger:
    def __init__(self, registry: CollectorRegistry, model_name: str, *, max_model_len: int = 131072,
                 max_num_batched_tokens: int = 8192, num_speculative_tokens: int = 0) -> None:
        """`num_speculative_tokens` (K > 0: speculative decoding is on): the spec_decode series
        exist from the start, one per-position child for positions 0..K-1 (vLLM's)."""
        self.registry = registry
        self.model_name = model_name
        r, m = registry, [model_name]

        def gauge(name, doc):
            return Gauge(name, doc, ["model_name"], registry=r).labels(*m)

        def counter(name, doc):
            return Counter(name, doc, ["model_name"], registry=r).labels(*m)

        def histogram(name, doc, buckets):
            return BatchHistogram(name, doc, ["model_name"], buckets, r)

        self.num_requests_running = gauge("jaxllm:num_requests_running", "Sequences running (holding KV blocks).")
        self.num_requests_waiting = gauge("jaxllm:num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_usage = gauge("jaxllm:kv_cache_usage_perc", "KV-cache usage: 1 = every block in use.")
        self.compiles = gauge("jaxllm:xla_compiles_since_warmup",
                              "XLA executables compiled after warm-up (a new shape reached the device; must stay 0).")
        self.prefix_queries = counter("jaxllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("jaxllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("jaxllm:num_preemptions", "Sequences preempted (blocks freed, recomputed later).")
        self.prompt_tokens = counter("jaxllm:prompt_tokens", "Prefilled prompt tokens (a sequence's at its first "
                                     "token, an embedding request's when it is pooled).")
        self.generation_tokens = counter("jaxllm:generation_tokens", "Generated tokens.")
        success = Counter("jaxllm:request_success", "Finished sequences and embedding requests by finish reason.",
                          ["model_name", "finished_reason"], registry=r)
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._success = success
        self.ttft = histogram("jaxllm:time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS)
        self.itl = histogram("jaxllm:inter_token_latency_seconds", "Gap between two tokens of a sequence.",
                             LATENCY_BUCKETS)
        self.e2e = histogram("jaxllm:e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue_time = histogram("jaxllm:request_queue_time_seconds", "Arrival to first scheduled.",
                                    REQUEST_BUCKETS)
        self.request_prompt_tokens = histogram("jaxllm:request_prompt_tokens", "Prompt length of finished sequences.",
                                               token_buckets(max_model_len))
        self.request_generation_tokens = histogram("jaxllm:request_generation_tokens",
                                                   "Generated length of finished sequences (not embeddings).",
                                                   token_buckets(max_model_len))
        self.iteration_tokens = histogram("jaxllm:iteration_tokens_total", "Tokens computed per engine step (unpadded).",
                                          token_buckets(max_num_batched_tokens))
        self.step_time = BatchHistogram("jaxllm:step_time_seconds", "engine.step() wall time by shape bucket.",
                                        ["model_name", "bucket"], LATENCY_BUCKETS, r)
        self._labels = (model_name,)
        # vLLM's multi-LoRA info series: value = the time of the record, labels = the adapters now
        self.lora_info = Gauge("jaxllm:lora_requests_info", "Running stats on LoRA requests (vLLM's series).",
                               ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r)
        self._lora_labels: tuple[str, str, str] | None = None
        self.spec = None  # (drafts, draft tokens, accepted tokens, [accepted per position]) once K is known
        if num_speculative_tokens:
            self._spec_series(num_speculative_tokens)

    def _spec_series(self, k: int):
        """vLLM V1's spec-decode counters: a *draft* is one sequence-step that carried drafts."""
        if self.spec is None:
            r, m = self.registry, self.model_name

            def counter(name, doc):
                return Counter(name, doc, ["model_name"], registry=r).labels(m)

            per_pos = Counter("jaxllm:spec_decode_num_accepted_tokens_per_pos",
                              "Accepted draft tokens by position in the draft (0 = the first).",
                              ["model_name", "position"], registry=r)
            self.spec = (counter("jaxllm:spec_decode_num_drafts", "Sequence-steps that carried draft tokens."),
                         counter("jaxllm:spec_decode_num_draft_tokens", "Draft tokens proposed and verified."),
                         counter("jaxllm:spec_decode_num_accepted_tokens", "Draft tokens accepted."),
                         [per_pos.labels(m, str(i)) for i in range(k)])
        return self.spec

    def record(self, s: SchedulerStats, it: IterationStats | None) -> None:
        self.num_requests_running.set(s.num_running_reqs)
        self.num_requests_waiting.set(s.num_waiting_reqs)
        self.kv_cache_usage.set(s.kv_cache_usage)
        self.compiles.set(s.num_compiles_since_warmup)
        if s.max_lora:
            labels = (str(s.max_lora), ",".join(s.waiting_lora_adapters), ",".join(s.running_lora_adapters))
            if labels != self._lora_labels:  # one series at a time: drop the previous label set
                if self._lora_labels is not None:
                    self.lora_info.remove(*self._lora_labels)
                self._lora_labels = labels
            self.lora_info.labels(*labels).set(time.time())
        if s.prefix_cache_queries:
            self.prefix_queries.inc(s.prefix_cache_queries)
            self.prefix_hits.inc(s.prefix_cache_hits)
        if s.num_preemptions:
            self.preemptions.inc(s.num_preemptions)
        if it is None:
            return
        if it.num_prompt_tokens:
            self.prompt_tokens.inc(it.num_prompt_tokens)
        if it.num_generation_tokens:
            self.generation_tokens.inc(it.num_generation_tokens)
        m = self._labels
        self.ttft.observe(it.time_to_first_tokens, m)
        self.itl.observe(it.inter_token_latencies, m)
        done = it.finished_requests
        if done:
            for f in done:
                child = self.request_success.get(f.finish_reason)
                if child is None:
                    child = self.request_success[f.finish_reason] = self._success.labels(self.model_name,
                                                                                         f.finish_reason)
                child.inc()
            self.e2e.observe([f.e2e_latency for f in done], m)
            self.queue_time.observe([f.queue_time for f in done], m)
            self.request_prompt_tokens.observe([f.num_prompt_tokens for f in done], m)
            self.request_generation_tokens.observe(
                [f.num_generation_tokens for f in done if f.num_generation_tokens is not None], m)
        sd = it.spec_decoding
        if sd is not None:
            drafts, draft_tokens, accepted, per_pos = self._spec_series(sd.num_spec_tokens)
            drafts.inc(sd.num_drafts)
            draft_tokens.inc(sd.num_draft_tokens)
            accepted.inc(sd.num_accepted_tokens)
            for child, n in zip(per_pos, sd.num_accepted_tokens_per_pos):
                if n:
                    child.inc(n)
        if it.step_time is not None:
            self.iteration_tokens.observe((it.num_batched_tokens,), m)
            self.step_time.observe((it.step_time,), (self.model_name, it.bucket or "none"))
