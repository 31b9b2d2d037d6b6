"""The records the engine hands its stat loggers after every step (host only, no jax).

Shaped like vLLM V1's: ``SchedulerStats`` is a snapshot of the scheduler and KV cache (gauges,
plus the counters' increments since the previous record); ``IterationStats`` is what one step
did (tokens, per-sequence latencies, finished sequences). The engine builds them in O(batch)
host time from values it already holds (no device reads) and only when a logger is attached.

Unit of counting: the *sequence*, as in vLLM V1 (an ``n > 1`` request runs as n sequences, each
with its prompt). A sequence's prompt tokens are counted once, when its first token arrives;
time to first token and end-to-end latency run from the request's arrival; inter-token latency
is the gap between two consecutive tokens of one sequence. Times are ``time.time()`` seconds,
the clock of ``RequestMetrics``.

Embedding (pooling) requests are counted as vLLM V1 counts them in its request-level series: a
finished one is a ``FinishedRequestStats`` (finish reason "stop", or "abort"), its prompt tokens are
counted when its last prompt chunk is computed, and its end-to-end and queue times are recorded.
It generates nothing, so it adds no time to first token, no inter-token latency and no generation
tokens (``num_generation_tokens`` is None: the per-request generation-length histogram skips it).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class SchedulerStats:
    num_running_reqs: int  # sequences running (holding KV blocks)
    num_waiting_reqs: int  # sequences waiting (new, or preempted)
    kv_cache_usage: float  # fraction of KV blocks in use, in [0, 1]
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache since the last record
    prefix_cache_hits: int = 0  # of those, tokens found cached
    num_preemptions: int = 0  # preemptions since the last record
    num_compiles_since_warmup: int = 0  # XLA executables compiled after warm-up (must stay 0)
    # multi-LoRA (enable_lora; max_lora = 0 otherwise): adapter names among running / waiting sequences
    max_lora: int = 0
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()


@dataclasses.dataclass(slots=True)
class FinishedRequestStats:
    finish_reason: str  # "stop" | "length" | "abort"
    e2e_latency: float  # seconds, arrival -> finished
    queue_time: float  # seconds, arrival -> first scheduled (-> finished if never scheduled)
    num_prompt_tokens: int
    num_generation_tokens: int | None  # None: an embedding request (it generates nothing)


@dataclasses.dataclass(slots=True)
class SpecDecodingStats:
    """Speculative decoding in one step (vLLM V1's): a *draft* is one sequence-step that carried
    drafts; ``num_accepted_tokens_per_pos[i]``: drafts whose token at position i was accepted."""
    num_spec_tokens: int  # K: the most drafts a sequence carries
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.num_accepted_tokens_per_pos:
            self.num_accepted_tokens_per_pos = [0] * self.num_spec_tokens

    def observe_draft(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        for i in range(num_accepted_tokens):
            self.num_accepted_tokens_per_pos[i] += 1


@dataclasses.dataclass(slots=True)
class IterationStats:
    num_prompt_tokens: int = 0  # prompt tokens of sequences that got their first token this step
    num_generation_tokens: int = 0  # tokens generated this step
    num_batched_tokens: int = 0  # tokens the step computed (prefill chunks + decodes), unpadded
    step_time: float | None = None  # seconds of engine.step() (None: no step, e.g. an abort)
    bucket: str | None = None  # the shape bucket the step ran in ("decode_8", "mixed_64", ...)
    time_to_first_tokens: list[float] = dataclasses.field(default_factory=list)
    inter_token_latencies: list[float] = dataclasses.field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = dataclasses.field(default_factory=list)
    spec_decoding: SpecDecodingStats | None = None  # None: no sequence carried drafts this step

    def add_token(self, seq, arrival_time: float, now: float) -> None:
        """One generated token of ``seq`` (an ``output_processor.SeqState``) at ``now``."""
        self.num_generation_tokens += 1
        last = seq.last_token_time
        if last is None:
            self.time_to_first_tokens.append(now - arrival_time)
            self.num_prompt_tokens += seq.req.num_prompt_tokens
        else:
            self.inter_token_latencies.append(now - last)
        seq.last_token_time = now

    def add_finished(self, seq, finish_reason: str, arrival_time: float, now: float) -> None:
        self._finished(seq.req, finish_reason, arrival_time, now, len(seq.token_ids))

    def add_embedding(self, req, finish_reason: str, arrival_time: float, now: float) -> None:
        """An embedding request (a ``core.request.Request`` with ``pooling``) finished at ``now``:
        "stop" (pooled; its prompt tokens count as prefilled) or "abort"."""
        if finish_reason == "stop":
            self.num_prompt_tokens += req.num_prompt_tokens
        self._finished(req, finish_reason, arrival_time, now, None)

    def _finished(self, req, finish_reason: str, arrival_time: float, now: float,
                  num_generation_tokens: int | None) -> None:
        scheduled = req.first_scheduled_time if req.first_scheduled_time is not None else now
        self.finished_requests.append(FinishedRequestStats(
            finish_reason=finish_reason, e2e_latency=now - arrival_time,
            queue_time=max(0.0, scheduled - arrival_time), num_prompt_tokens=req.num_prompt_tokens,
            num_generation_tokens=num_generation_tokens))
