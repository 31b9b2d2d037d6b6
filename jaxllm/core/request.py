"""Host-side request state (no jax).

A ``Request`` is one sequence the scheduler knows about (an ``n > 1`` request fans out into
``n`` child Requests in the engine). It carries the one number the scheduling model runs on,
``num_computed_tokens``: tokens of ``all_token_ids`` whose KV is in the cache. Each step a
request is given ``num_new_tokens``; when that reaches the end of ``all_token_ids`` the runner
samples one token, which is appended (and not yet computed).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from jaxllm.pooling_params import PoolingParams
from jaxllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # waiting again, to be recomputed from scratch
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {3: "stop", 4: "length", 5: "abort"}.get(int(self))


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # effective per-request seed (see ScheduledSeq.seed)
    arrival_time: float = 0.0
    arrival_seq: int = 0  # monotonic admission counter: the FCFS / preemption order
    # scheduling_policy "priority" (vLLM's): lower runs first, ties by arrival_seq; 0 under "fcfs"
    priority: int = 0
    max_output_tokens: int = 16  # min(params.max_tokens, max_model_len - prompt length)
    # part of every block hash: the adapter's lora_int_id (None = the base model), so requests of two
    # adapters never share KV blocks and requests of one adapter do
    extra_key: object = None
    # Multi-LoRA: the adapter this request runs with (jaxllm.lora.LoRARequest; None = the base model)
    lora_request: object = None
    # an embedding request (resolved PoolingParams): prefill only, never samples, finishes in the
    # step that computes its last prompt token; bypasses the prefix cache (kv_cache_manager.py)
    pooling: PoolingParams | None = None
    # structured outputs: the sequence's grammar state (jaxllm.engine.grammar.GrammarState, duck-typed
    # here: ``.ready``). Its next-token mask depends on the last token: on a token still in flight
    # (async scheduling) the engine writes it after the forward pass (Scheduler.late_grammar_mask), or
    # the request waits for the token. It waits unscheduled until the grammar compiles.
    grammar: object = None
    # bad_words (jaxllm/engine/bad_words.py): the words' token sequences; the engine bans each one's
    # last token at a step whose generated tokens end with the rest of it
    bad_words: tuple[tuple[int, ...], ...] = ()
    # step gate (``add_request(..., step_gate=True)``, a beam search's driver): the number of output
    # tokens the driver has allowed so far (None = ungated). A request whose outputs (in flight
    # included) reach it is not scheduled until ``LLMEngine.release_step`` raises it by one.
    gate: int | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # tokens sampled by steps still in flight (async scheduling), not yet appended: they sit after
    # all_token_ids, and num_computed_tokens already counts the step that samples them (vLLM's
    # num_output_placeholders). 0 whenever the engine runs synchronously.
    num_output_placeholders: int = 0
    # speculative decoding: draft tokens proposed for the next step (after all_token_ids). The
    # scheduler feeds them behind the last known token and clears them once scheduled or preempted.
    spec_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = -1  # prefix-cache hit at first schedule; -1 = not scheduled yet
    num_preemptions: int = 0
    first_scheduled_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def lora_int_id(self) -> int | None:
        return None if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def waits_for_grammar(self) -> bool:
        return self.grammar is not None and not self.grammar.ready

    @property
    def gate_closed(self) -> bool:
        """Step-gated and its allowed output tokens all produced (or in flight): not scheduled."""
        return self.gate is not None and self.num_output_tokens + self.num_output_placeholders >= self.gate

    @property
    def needs_last_token(self) -> bool:
        """Its next step's sampling depends on its last token (a grammar's mask; a bad word of 2+
        tokens): never given speculative drafts."""
        return self.grammar is not None or self.bans_need_last_token

    @property
    def bans_need_last_token(self) -> bool:
        """A bad word of 2+ tokens: the next step's bans depend on its last token, so it is never
        scheduled on a token still in flight (a grammar's mask may follow later: late_bitmask)."""
        return any(len(ids) > 1 for ids in self.bad_words)

    @property
    def is_finished(self) -> bool:
        return self.status.finished
